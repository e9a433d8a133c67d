#pragma once
// DIFFUSE_CPU_CLONES before a function compiles its hot loop for AVX-512, AVX2 and the baseline; the loader picks
// one for the CPU it runs on. Not under AddressSanitizer (whose run-time does not expect ifunc resolvers) and not
// off x86-64 with GCC or clang: there it expands to nothing.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__SANITIZE_ADDRESS__)
#define DIFFUSE_CPU_CLONES_ON 1
#endif
#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#undef DIFFUSE_CPU_CLONES_ON
#endif
#endif
// The AVX2 clone is x86-64-v3 (AVX2 with FMA) under GCC: GCC's "avx2" target leaves FMA out (its "avx512f" one
// has it), and the kernels' multiply-adds then compile to a multiply and an add (GroupNorm + SiLU inference ran
// 1.4-1.6x slower so on an AVX2 CPU). Clang 14 takes no "arch=" clones: there "avx2".
#if defined(DIFFUSE_CPU_CLONES_ON) && !defined(__clang__)
#define DIFFUSE_CPU_CLONES __attribute__((target_clones("avx512f", "arch=x86-64-v3", "default")))
#elif defined(DIFFUSE_CPU_CLONES_ON)
#define DIFFUSE_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define DIFFUSE_CPU_CLONES
#endif

// For kernels written with 4-double vectors whose sums should contract to FMA: AVX2 + FMA (x86-64-v3) and the
// baseline. GCC only (clang 14 takes no "arch=" clones): elsewhere DIFFUSE_CPU_CLONES.
#if defined(DIFFUSE_CPU_CLONES_ON) && !defined(__clang__)
#define DIFFUSE_CPU_CLONES_FMA __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define DIFFUSE_CPU_CLONES_FMA DIFFUSE_CPU_CLONES
#endif
