// Writes JPEG files through libjpeg for the tests and benchmarks that decode them (the product only reads
// JPEG). Links JPEG::JPEG.
#pragma once

#include <ATen/ATen.h>
#include <jpeglib.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

namespace diffuse_test {

// Encodes uint8 [H, W, C] pixels (C = 1 grey, 3 RGB, 4 CMYK as Adobe stores it) as a JPEG at `quality` with
// no chroma subsampling. `scans` 0: baseline; -1: libjpeg's standard progressive script; > 0: a progressive
// file of 1 + 5 * scans scans per component (the DC scan, then AC bands 1..scans each sent in five
// successive-approximation steps; the bands after them never come).
inline std::string jpeg_bytes(const at::Tensor& hwc, int scans = 0, int quality = 100) {
  jpeg_compress_struct cinfo;
  jpeg_error_mgr errors;
  cinfo.err = jpeg_std_error(&errors);
  jpeg_create_compress(&cinfo);
  unsigned char* out = nullptr;
  unsigned long size = 0;
  jpeg_mem_dest(&cinfo, &out, &size);
  const int c = static_cast<int>(hwc.size(2));
  cinfo.image_width = static_cast<JDIMENSION>(hwc.size(1));
  cinfo.image_height = static_cast<JDIMENSION>(hwc.size(0));
  cinfo.input_components = c;
  cinfo.in_color_space = c == 1 ? JCS_GRAYSCALE : (c == 3 ? JCS_RGB : JCS_CMYK);
  jpeg_set_defaults(&cinfo);
  jpeg_set_quality(&cinfo, quality, TRUE);
  for (int i = 0; i < cinfo.num_components; ++i)
    cinfo.comp_info[i].h_samp_factor = cinfo.comp_info[i].v_samp_factor = 1;
  std::vector<jpeg_scan_info> script;
  if (scans < 0) jpeg_simple_progression(&cinfo);
  if (scans > 0) {
    script.push_back({cinfo.num_components, {0, 1, 2, 3}, 0, 0, 0, 0});
    for (int band = 1; band <= scans; ++band) {
      for (int comp = 0; comp < cinfo.num_components; ++comp) {
        script.push_back({1, {comp}, band, band, 0, 4});
        for (int al = 3; al >= 0; --al) script.push_back({1, {comp}, band, band, al + 1, al});
      }
    }
    cinfo.scan_info = script.data();
    cinfo.num_scans = static_cast<int>(script.size());
  }
  jpeg_start_compress(&cinfo, TRUE);
  at::Tensor px = hwc.contiguous();
  const size_t row = static_cast<size_t>(hwc.size(1) * c);
  while (cinfo.next_scanline < cinfo.image_height) {
    JSAMPROW r = px.data_ptr<uint8_t>() + row * cinfo.next_scanline;
    jpeg_write_scanlines(&cinfo, &r, 1);
  }
  jpeg_finish_compress(&cinfo);
  jpeg_destroy_compress(&cinfo);
  std::string bytes(reinterpret_cast<const char*>(out), size);
  std::free(out);
  return bytes;
}

}  // namespace diffuse_test
