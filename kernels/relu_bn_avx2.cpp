// The ReLU-BatchNorm passes (relu_bn_rows.h) on AVX2 with FMA: 8 channels a vector, float
// activations (CPUs without bf16 instructions train in fp32), the masks as vectors of
// all-ones or zero lanes.
#include <immintrin.h>

#include <type_traits>

#include "cpu_features.h"
#include "relu_bn.h"

namespace fastcifar {
namespace {

struct Avx2 {
  using Reg = __m256;
  using Mask = __m256;
  static constexpr int kWidth = 8, kGroups = 4;  // 8 of the 16 registers hold sums

  FASTCIFAR_AVX2 static Reg zero() { return _mm256_setzero_ps(); }
  FASTCIFAR_AVX2 static Reg set(float v) { return _mm256_set1_ps(v); }
  template <typename T>
  FASTCIFAR_AVX2 static Reg load(const T* p) {
    static_assert(std::is_same_v<T, float>, "AVX2's ReLU-BatchNorm passes take float");
    return _mm256_loadu_ps(p);
  }
  FASTCIFAR_AVX2 static Reg loadf(const float* p) { return _mm256_loadu_ps(p); }
  template <typename T>
  FASTCIFAR_AVX2 static void store(T* p, Reg v) { _mm256_storeu_ps(p, v); }
  template <typename T>
  FASTCIFAR_AVX2 static void store_rounded(T* p, Reg v) { _mm256_storeu_ps(p, v); }
  template <typename T>
  FASTCIFAR_AVX2 static Reg as_stored(Reg v) { return v; }
  FASTCIFAR_AVX2 static Reg max(Reg a, Reg b) { return _mm256_max_ps(a, b); }
  FASTCIFAR_AVX2 static Reg add(Reg a, Reg b) { return _mm256_add_ps(a, b); }
  FASTCIFAR_AVX2 static Reg fmadd(Reg a, Reg b, Reg c) { return _mm256_fmadd_ps(a, b, c); }
  FASTCIFAR_AVX2 static Mask greater(Reg a, Reg b) { return _mm256_cmp_ps(a, b, _CMP_GT_OQ); }
  FASTCIFAR_AVX2 static Mask less(Reg a, Reg b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
  FASTCIFAR_AVX2 static Mask equal(Reg a, Reg b) { return _mm256_cmp_ps(a, b, _CMP_EQ_OQ); }
  FASTCIFAR_AVX2 static Mask unordered(Reg a) { return _mm256_cmp_ps(a, a, _CMP_UNORD_Q); }
  FASTCIFAR_AVX2 static Mask both(Mask a, Mask b) { return _mm256_and_ps(a, b); }
  FASTCIFAR_AVX2 static Mask either(Mask a, Mask b) { return _mm256_or_ps(a, b); }
  FASTCIFAR_AVX2 static Mask invert(Mask a) {
    return _mm256_xor_ps(a, _mm256_castsi256_ps(_mm256_set1_epi32(-1)));
  }
  FASTCIFAR_AVX2 static Reg blend(Mask m, Reg a, Reg b) { return _mm256_blendv_ps(a, b, m); }
  FASTCIFAR_AVX2 static Reg keep(Mask m, Reg v) { return _mm256_and_ps(m, v); }
  // adds the 8 floats to 8 doubles
  FASTCIFAR_AVX2 static void add_to_doubles(double* out, Reg v) {
    _mm256_storeu_pd(out, _mm256_add_pd(_mm256_loadu_pd(out), _mm256_cvtps_pd(_mm256_castps256_ps128(v))));
    _mm256_storeu_pd(out + 4, _mm256_add_pd(_mm256_loadu_pd(out + 4),
                                            _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1))));
  }
  FASTCIFAR_AVX2 static void store_positions(uint8_t* p, Reg v) {
    const __m256i words = _mm256_cvttps_epi32(v);
    const __m128i halves = _mm_packs_epi32(_mm256_castsi256_si128(words), _mm256_extracti128_si256(words, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packus_epi16(halves, halves));
  }
  FASTCIFAR_AVX2 static Reg load_positions(const uint8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
};

}  // namespace
}  // namespace fastcifar

#define FASTCIFAR_ROWS_TARGET FASTCIFAR_AVX2
#include "relu_bn_rows.h"

namespace fastcifar {

const ReluBnRows<float>& avx2_rows(float) {
  static const ReluBnRows<float> rows = rows_for<Avx2, float>();
  return rows;
}

}  // namespace fastcifar
