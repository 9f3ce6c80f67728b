// The ReLU-BatchNorm passes (relu_bn_rows.h) on AVX-512: 16 channels a vector, float or
// bf16 activations (bf16 loaded as floats and rounded back as torch's casts round).
#include <immintrin.h>

#include "avx512.h"
#include "relu_bn.h"

namespace fastcifar {
namespace {

struct Avx512 {
  using Reg = __m512;
  using Mask = __mmask16;
  static constexpr int kWidth = 16, kGroups = 8;  // 16 of the 32 registers hold sums

  FASTCIFAR_AVX512 static Reg zero() { return _mm512_setzero_ps(); }
  FASTCIFAR_AVX512 static Reg set(float v) { return _mm512_set1_ps(v); }
  template <typename T>
  FASTCIFAR_AVX512 static Reg load(const T* p) { return load16(p, 0xFFFF); }
  FASTCIFAR_AVX512 static Reg loadf(const float* p) { return _mm512_loadu_ps(p); }
  template <typename T>
  FASTCIFAR_AVX512 static void store(T* p, Reg v) { store16(p, 0xFFFF, v); }
  template <typename T>
  FASTCIFAR_AVX512 static void store_rounded(T* p, Reg v) { store16_rounded(p, 0xFFFF, v); }
  // the value a computed float takes once stored as T: for bf16 rounded, the low half
  // cleared; a float as it is
  template <typename T>
  FASTCIFAR_AVX512 static Reg as_stored(Reg v) {
    if constexpr (std::is_same_v<T, float>) {
      return v;
    } else {
      return _mm512_castsi512_ps(_mm512_and_si512(round_to_bf16(v), _mm512_set1_epi32(0xFFFF0000)));
    }
  }
  FASTCIFAR_AVX512 static Reg max(Reg a, Reg b) { return _mm512_max_ps(a, b); }
  FASTCIFAR_AVX512 static Reg add(Reg a, Reg b) { return _mm512_add_ps(a, b); }
  FASTCIFAR_AVX512 static Reg fmadd(Reg a, Reg b, Reg c) { return _mm512_fmadd_ps(a, b, c); }
  FASTCIFAR_AVX512 static Mask greater(Reg a, Reg b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
  FASTCIFAR_AVX512 static Mask less(Reg a, Reg b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
  FASTCIFAR_AVX512 static Mask equal(Reg a, Reg b) { return _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ); }
  FASTCIFAR_AVX512 static Mask unordered(Reg a) { return _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q); }
  static Mask both(Mask a, Mask b) { return a & b; }
  static Mask either(Mask a, Mask b) { return a | b; }
  static Mask invert(Mask a) { return static_cast<Mask>(~a); }
  FASTCIFAR_AVX512 static Reg blend(Mask m, Reg a, Reg b) { return _mm512_mask_blend_ps(m, a, b); }
  FASTCIFAR_AVX512 static Reg keep(Mask m, Reg v) { return _mm512_maskz_mov_ps(m, v); }
  // adds the 16 floats to 16 doubles
  FASTCIFAR_AVX512 static void add_to_doubles(double* out, Reg v) {
    _mm512_storeu_pd(out, _mm512_add_pd(_mm512_loadu_pd(out),
                                        _mm512_cvtps_pd(_mm512_castps512_ps256(v))));
    const __m256 high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    _mm512_storeu_pd(out + 8, _mm512_add_pd(_mm512_loadu_pd(out + 8), _mm512_cvtps_pd(high)));
  }
  FASTCIFAR_AVX512 static void store_positions(uint8_t* p, Reg v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(v)));
  }
  FASTCIFAR_AVX512 static Reg load_positions(const uint8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
};

}  // namespace
}  // namespace fastcifar

#define FASTCIFAR_ROWS_TARGET FASTCIFAR_AVX512
#include "relu_bn_rows.h"

namespace fastcifar {

const ReluBnRows<float>& avx512_rows(float) {
  static const ReluBnRows<float> rows = rows_for<Avx512, float>();
  return rows;
}

const ReluBnRows<c10::BFloat16>& avx512_rows(c10::BFloat16) {
  static const ReluBnRows<c10::BFloat16> rows = rows_for<Avx512, c10::BFloat16>();
  return rows;
}

}  // namespace fastcifar
