// The `diffuse` program: a thin layer that fills config structs and calls the library.
#include <iostream>

#include "diffuse/common.h"

int main(int argc, char** argv) {
  std::cout << "diffuse\n";
  return 0;
}
