// Which vector instructions this CPU has, read once, and the attributes that compile a
// function for them (the rest of the extension stays baseline x86-64, so that it loads
// on any CPU and each kernel checks before it runs).
#pragma once

namespace fastcifar {

#define FASTCIFAR_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))
#define FASTCIFAR_AVX2 __attribute__((target("avx2,fma")))

inline bool has_avx512() {
  static const bool supported = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl");
  }();
  return supported;
}

inline bool has_avx512_bf16() {  // and the bf16 dot products (vdpbf16ps)
  static const bool supported = [] {
    __builtin_cpu_init();
    return has_avx512() && __builtin_cpu_supports("avx512bf16");
  }();
  return supported;
}

inline bool has_avx2_fma() {
  static const bool supported = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return supported;
}

}  // namespace fastcifar
