// AVX-512 helpers the CPU kernels share: 16 channels at a time as floats, loaded from
// and stored to float or bf16.
#pragma once
#include <ATen/Dispatch.h>
#include <immintrin.h>
#include <cstdint>
#include <type_traits>

#include "cpu_features.h"

namespace fastcifar {

// The two dtypes the kernels take, as cases of ATen's AT_DISPATCH_SWITCH
#define FASTCIFAR_FLOAT_AND_BF16(...) \
  AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)

// 16 elements as floats, and back; bf16 is the upper half of a float, so converting a
// value that came from bf16 back is exact (store16); a computed value needs rounding
// (store16_rounded).
template <typename T>
FASTCIFAR_AVX512 inline __m512 load16(const T* p, __mmask16 m) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_maskz_loadu_ps(m, p);
  } else {
    __m256i bits = _mm256_maskz_loadu_epi16(m, reinterpret_cast<const void*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
  }
}

template <typename T>
FASTCIFAR_AVX512 inline void store16(T* p, __mmask16 m, __m512 v) {
  if constexpr (std::is_same_v<T, float>) {
    _mm512_mask_storeu_ps(p, m, v);
  } else {
    __m256i bits = _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(v), 16));
    _mm256_mask_storeu_epi16(reinterpret_cast<void*>(p), m, bits);
  }
}

// 16 floats rounded to the nearest bf16 (ties to even), as torch's casts do: the bf16
// values are the upper halves of the result's words, the lower halves left as they come.
FASTCIFAR_AVX512 inline __m512i round_to_bf16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  return _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
}

// As store16, rounding to the nearest bf16 (round_to_bf16).
template <typename T>
FASTCIFAR_AVX512 inline void store16_rounded(T* p, __mmask16 m, __m512 v) {
  if constexpr (std::is_same_v<T, float>) {
    _mm512_mask_storeu_ps(p, m, v);
  } else {
    __m256i half = _mm512_cvtepi32_epi16(_mm512_srli_epi32(round_to_bf16(v), 16));
    _mm256_mask_storeu_epi16(reinterpret_cast<void*>(p), m, half);
  }
}

inline __mmask16 lanes(int64_t left) { return left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1); }

}  // namespace fastcifar
