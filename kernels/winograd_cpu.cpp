// fastcifar::winograd_conv3x3: a 3x3 convolution, stride 1, padding 1, of bf16
// channels-last activations as Winograd F(2x2, 3x3), on a CPU with AVX512-BF16 (or, given
// 36 weight tiles, F(4x4, 3x3): the input's gradient with `input_grad_tile` 4).
//
// A tile is 2 x 2 output pixels; its input is the 4 x 4 patch d around them (zero outside
// the image). Per tile, the output is A^T [sum over input channels of (B^T d B) * U] A,
// with U = G w G^T the weights' tiles (fastcifar/ops/winograd.py prepares them): the 16
// elementwise products summed over input channels are 16 matrix products of (tiles x
// C_in) by (C_in x C_out), 2.25x fewer multiplications than the nine 3x3 taps. Each
// thread takes a chunk of tiles at a time and keeps its transformed inputs (bf16) and
// products (fp32) in its own buffers, small enough for its L2 cache: only the input and
// the output pass through memory. The products run on `vdpbf16ps` (bf16 pairs summed
// into fp32) from a register-blocked kernel, with the weight tiles packed as pairs of
// input channels, [16][C_in / 2][C_out][2].
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <tuple>
#include <vector>

#include "avx512.h"
#include "winograd.h"

namespace fastcifar {
namespace {

#define FASTCIFAR_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

// C[MR x 16 NV] (+)= A[MR x K] B[K x 16 NV]: A bf16, its pair of elements (r, 2p), (r, 2p + 1)
// at a + r * a_row + p * a_pair (rows: a_row = K, a_pair = 2; packed as pairs of columns,
// [K / 2][M][2]: a_row = 2, a_pair = 2 M); B packed as pairs of rows ([K / 2][ldb][2] bf16,
// columns from `b`); C fp32 rows (ldc apart), added to with kAccumulate. K is even.
template <int MR, int NV, bool kAccumulate>
FASTCIFAR_AVX512_BF16 void gemm_block(const at::BFloat16* a, int64_t a_row, int64_t a_pair,
                                      const at::BFloat16* b, int64_t ldb, int64_t k, float* c,
                                      int64_t ldc) {
  __m512 acc[MR][NV];
  if constexpr (kAccumulate)  // the same columns of the next block of rows, for later
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < NV; ++v) _mm_prefetch((const char*)(c + (MR + r) * ldc + 16 * v), _MM_HINT_T0);
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v)
      acc[r][v] = kAccumulate ? _mm512_loadu_ps(c + r * ldc + 16 * v) : _mm512_setzero_ps();
  for (int64_t p = 0; p < k / 2; ++p) {
    __m512bh w[NV];
    for (int v = 0; v < NV; ++v) w[v] = (__m512bh)_mm512_loadu_si512(b + (p * ldb + 16 * v) * 2);
    for (int r = 0; r < MR; ++r) {
      int32_t pair;
      std::memcpy(&pair, a + r * a_row + p * a_pair, sizeof(pair));
      const __m512bh x = (__m512bh)_mm512_set1_epi32(pair);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], x, w[v]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(c + r * ldc + 16 * v, acc[r][v]);
}

constexpr int kRows = 6;  // rows of A per register block

// Rows [0, m) of C (+)= A B, n columns (a multiple of 16).
template <int MR, bool kAccumulate>
FASTCIFAR_AVX512_BF16 void gemm_rows(const at::BFloat16* a, int64_t a_row, int64_t a_pair,
                                     const at::BFloat16* b, int64_t n, int64_t k, float* c,
                                     int64_t ldc) {
  int64_t col = 0;
  for (; col + 64 <= n; col += 64)
    gemm_block<MR, 4, kAccumulate>(a, a_row, a_pair, b + 2 * col, n, k, c + col, ldc);
  switch ((n - col) / 16) {
    case 3: gemm_block<MR, 3, kAccumulate>(a, a_row, a_pair, b + 2 * col, n, k, c + col, ldc); break;
    case 2: gemm_block<MR, 2, kAccumulate>(a, a_row, a_pair, b + 2 * col, n, k, c + col, ldc); break;
    case 1: gemm_block<MR, 1, kAccumulate>(a, a_row, a_pair, b + 2 * col, n, k, c + col, ldc); break;
    default: break;
  }
}

// C[m x n] (+)= A[m x k] B[k x n], A's element pairs laid out as gemm_block says.
template <bool kAccumulate>
FASTCIFAR_AVX512_BF16 void gemm(const at::BFloat16* a, int64_t a_row, int64_t a_pair, int64_t m,
                                const at::BFloat16* b, int64_t n, int64_t k, float* c) {
  int64_t row = 0;
  for (; row + kRows <= m; row += kRows)
    gemm_rows<kRows, kAccumulate>(a + row * a_row, a_row, a_pair, b, n, k, c + row * n, n);
  const at::BFloat16* rest = a + row * a_row;
  float* c_rest = c + row * n;
  switch (m - row) {
    case 5: gemm_rows<5, kAccumulate>(rest, a_row, a_pair, b, n, k, c_rest, n); break;
    case 4: gemm_rows<4, kAccumulate>(rest, a_row, a_pair, b, n, k, c_rest, n); break;
    case 3: gemm_rows<3, kAccumulate>(rest, a_row, a_pair, b, n, k, c_rest, n); break;
    case 2: gemm_rows<2, kAccumulate>(rest, a_row, a_pair, b, n, k, c_rest, n); break;
    case 1: gemm_rows<1, kAccumulate>(rest, a_row, a_pair, b, n, k, c_rest, n); break;
    default: break;
  }
}

// 16 floats rounded to the nearest bf16, ties to even, in one instruction (vcvtneps2bf16:
// round_to_bf16's values, but for subnormals, which it flushes to zero).
FASTCIFAR_AVX512_BF16 inline __m256i to_bf16(__m512 v) { return (__m256i)_mm512_cvtneps_pbh(v); }

// Where the 4 x 4 input patch around a tile lies: its rows' starts and its columns'
// offsets, clamped into the image, and which of its 16 values lie inside it. A value
// outside is zero: its load is masked off (at a clamped address, inside the tensor), so
// every tile's patch loads the same way, without branches, and stays in registers.
struct Patch {
  const at::BFloat16* rows[4];
  int64_t cols[4];
  __mmask16 inside[16];
  bool all_inside;
};

inline Patch patch_at(const at::BFloat16* x, const Shape& s, const TileAt& where) {
  Patch p;
  p.all_inside = true;
  bool col_inside[4];
  for (int j = 0; j < 4; ++j) {
    const int64_t col = 2 * where.tx - 1 + j;
    col_inside[j] = col >= 0 && col < s.w;
    p.cols[j] = std::clamp<int64_t>(col, 0, s.w - 1) * s.c_in;
  }
  for (int i = 0; i < 4; ++i) {
    const int64_t row = 2 * where.ty - 1 + i;
    const bool row_inside = row >= 0 && row < s.h;
    p.rows[i] = x + (where.image * s.h + std::clamp<int64_t>(row, 0, s.h - 1)) * s.w * s.c_in;
    for (int j = 0; j < 4; ++j) {
      p.inside[4 * i + j] = row_inside && col_inside[j] ? 0xFFFF : 0;
      p.all_inside = p.all_inside && row_inside && col_inside[j];
    }
  }
  return p;
}

// B^T d B of a tile's patch for 16 input channels from ch (lanes m): v[4 i + j]. With
// kAllInside, the whole patch lies inside the image (most tiles): no per-value masks.
template <bool kAllInside>
FASTCIFAR_AVX512 inline void patch_transform(const Patch& p, int64_t ch, __mmask16 m, __m512 v[16]) {
  __m512 d[4][4];
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4; ++j)
      d[i][j] = load16(p.rows[i] + p.cols[j] + ch, kAllInside ? m : p.inside[4 * i + j] & m);
  __m512 r[4][4];  // B^T d: rows
  for (int j = 0; j < 4; ++j) {
    r[0][j] = _mm512_sub_ps(d[0][j], d[2][j]);
    r[1][j] = _mm512_add_ps(d[1][j], d[2][j]);
    r[2][j] = _mm512_sub_ps(d[2][j], d[1][j]);
    r[3][j] = _mm512_sub_ps(d[1][j], d[3][j]);
  }
  for (int i = 0; i < 4; ++i) {  // (B^T d) B: columns
    v[4 * i + 0] = _mm512_sub_ps(r[i][0], r[i][2]);
    v[4 * i + 1] = _mm512_add_ps(r[i][1], r[i][2]);
    v[4 * i + 2] = _mm512_sub_ps(r[i][2], r[i][1]);
    v[4 * i + 3] = _mm512_sub_ps(r[i][1], r[i][3]);
  }
}

FASTCIFAR_AVX512 inline void input_tile(const Patch& p, int64_t ch, __mmask16 m, __m512 v[16]) {
  if (p.all_inside) patch_transform<true>(p, ch, m, v);
  else patch_transform<false>(p, ch, m, v);
}

// A g A^T of the tile at `where` for 16 output channels from ch: v[4 i + j], g the
// output's gradient at the tile's 2 x 2 pixels (the gradient of the tile's products).
FASTCIFAR_AVX512 inline void gradient_tile(const at::BFloat16* grad, const Shape& s,
                                           const TileAt& where, int64_t ch, __m512 v[16]) {
  const at::BFloat16* top = grad + ((where.image * s.h + 2 * where.ty) * s.w + 2 * where.tx) * s.c_out + ch;
  const __m512 g00 = load16(top, 0xFFFF), g01 = load16(top + s.c_out, 0xFFFF);
  const __m512 g10 = load16(top + s.w * s.c_out, 0xFFFF);
  const __m512 g11 = load16(top + (s.w + 1) * s.c_out, 0xFFFF);
  const __m512 zero = _mm512_setzero_ps();
  const __m512 r[4][2] = {{g00, g01},  // A g: rows
                          {_mm512_add_ps(g00, g10), _mm512_add_ps(g01, g11)},
                          {_mm512_sub_ps(g00, g10), _mm512_sub_ps(g01, g11)},
                          {_mm512_sub_ps(zero, g10), _mm512_sub_ps(zero, g11)}};
  for (int i = 0; i < 4; ++i) {  // (A g) A^T: columns
    v[4 * i + 0] = r[i][0];
    v[4 * i + 1] = _mm512_add_ps(r[i][0], r[i][1]);
    v[4 * i + 2] = _mm512_sub_ps(r[i][0], r[i][1]);
    v[4 * i + 3] = _mm512_sub_ps(zero, r[i][1]);
  }
}

// Two tiles' values rounded to bf16 as pairs: each word's low half from a, high half from
// b. vcvtne2ps2bf16 puts a's 16 values in the low half of the vector and b's in the high
// half; one permutation of the 32 halves interleaves them.
FASTCIFAR_AVX512_BF16 inline __m512i bf16_pairs(__m512 a, __m512 b) {
  const __m512i halves = (__m512i)_mm512_cvtne2ps_pbh(b, a);
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9,
                                              24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17,
                                              1, 16, 0);
  return _mm512_permutexvar_epi16(interleave, halves);
}

// F(4x4, 3x3), for the weight gradient: a tile is 4 x 4 output pixels, its input patch
// 6 x 6, and B^T (6 x 6), A^T (4 x 6) and G (6 x 3) are Lavin and Gray's, with the
// points 0, 1, -1, 2, -2. 36 products a tile where F(2x2, 3x3) does 16 for a quarter of
// its pixels, with coefficients up to 8: six times F(2x2)'s rounding error in bf16
// (benchmarks/NOTES.md).

// B^T x of one column (or row) x[0..5] of a patch.
FASTCIFAR_AVX512 inline void bt6(const __m512 x[6], __m512 y[6]) {
  const __m512 four = _mm512_set1_ps(4.0f), five = _mm512_set1_ps(5.0f), two = _mm512_set1_ps(2.0f);
  const __m512 x4_x2 = _mm512_sub_ps(x[4], x[2]), x3_x1 = _mm512_sub_ps(x[3], x[1]);
  y[0] = _mm512_add_ps(_mm512_fnmadd_ps(five, x[2], _mm512_mul_ps(four, x[0])), x[4]);
  y[1] = _mm512_sub_ps(_mm512_add_ps(x[4], x[3]), _mm512_mul_ps(four, _mm512_add_ps(x[1], x[2])));
  y[2] = _mm512_add_ps(_mm512_sub_ps(x[4], x[3]), _mm512_mul_ps(four, _mm512_sub_ps(x[1], x[2])));
  y[3] = _mm512_fmadd_ps(two, x3_x1, x4_x2);
  y[4] = _mm512_fnmadd_ps(two, x3_x1, x4_x2);
  y[5] = _mm512_add_ps(_mm512_fnmadd_ps(five, x[3], _mm512_mul_ps(four, x[1])), x[5]);
}

// A x of one column (or row) x[0..3] of a gradient block.
FASTCIFAR_AVX512 inline void a6(const __m512 x[4], __m512 y[6]) {
  const __m512 two = _mm512_set1_ps(2.0f), four = _mm512_set1_ps(4.0f), eight = _mm512_set1_ps(8.0f);
  const __m512 even = _mm512_add_ps(x[0], x[2]), odd = _mm512_add_ps(x[1], x[3]);
  const __m512 even4 = _mm512_fmadd_ps(four, x[2], x[0]), odd8 = _mm512_fmadd_ps(eight, x[3], _mm512_mul_ps(two, x[1]));
  y[0] = x[0];
  y[1] = _mm512_add_ps(even, odd);
  y[2] = _mm512_sub_ps(even, odd);
  y[3] = _mm512_add_ps(even4, odd8);
  y[4] = _mm512_sub_ps(even4, odd8);
  y[5] = x[3];
}

// A^T m of one column (or row) m[0..5] of F(4x4)'s 6 x 6 products: 4 values.
FASTCIFAR_AVX512 inline void at6(const __m512 m[6], __m512 y[4]) {
  const __m512 two = _mm512_set1_ps(2.0f), four = _mm512_set1_ps(4.0f), eight = _mm512_set1_ps(8.0f);
  const __m512 s12 = _mm512_add_ps(m[1], m[2]), d12 = _mm512_sub_ps(m[1], m[2]);
  const __m512 s34 = _mm512_add_ps(m[3], m[4]), d34 = _mm512_sub_ps(m[3], m[4]);
  y[0] = _mm512_add_ps(_mm512_add_ps(m[0], s12), s34);
  y[1] = _mm512_fmadd_ps(two, d34, d12);
  y[2] = _mm512_fmadd_ps(four, s34, s12);
  y[3] = _mm512_add_ps(_mm512_fmadd_ps(eight, d34, d12), m[5]);
}

// The 6 x 6 patch around F(4x4)'s tile at `where` (rows and columns from 4 t - 1), zero
// outside the image, for 16 channels from ch: B^T d B as v[6 i + j].
FASTCIFAR_AVX512 inline void input_tile6(const at::BFloat16* x, const Shape& s, const TileAt& where,
                                         int64_t ch, __m512 v[36]) {
  __m512 r[6][6];  // B^T d, column by column
  for (int j = 0; j < 6; ++j) {
    const int64_t col = 4 * where.tx - 1 + j;
    __m512 d[6];
    for (int i = 0; i < 6; ++i) {
      const int64_t row = 4 * where.ty - 1 + i;
      const bool inside = row >= 0 && row < s.h && col >= 0 && col < s.w;
      d[i] = inside ? load16(x + ((where.image * s.h + row) * s.w + col) * s.c_in + ch, 0xFFFF)
                    : _mm512_setzero_ps();
    }
    __m512 column[6];
    bt6(d, column);
    for (int i = 0; i < 6; ++i) r[i][j] = column[i];
  }
  for (int i = 0; i < 6; ++i) bt6(r[i], v + 6 * i);  // (B^T d) B, row by row
}

// A g A^T of F(4x4)'s tile at `where`, g the output's gradient at its 4 x 4 pixels, for 16
// output channels from ch: v[6 i + j].
FASTCIFAR_AVX512 inline void gradient_tile6(const at::BFloat16* grad, const Shape& s,
                                            const TileAt& where, int64_t ch, __m512 v[36]) {
  __m512 r[6][4];  // A g, column by column
  for (int q = 0; q < 4; ++q) {
    __m512 g[4];
    for (int p = 0; p < 4; ++p)
      g[p] = load16(grad + ((where.image * s.h + 4 * where.ty + p) * s.w + 4 * where.tx + q) * s.c_out + ch,
                    0xFFFF);
    __m512 column[6];
    a6(g, column);
    for (int i = 0; i < 6; ++i) r[i][q] = column[i];
  }
  for (int i = 0; i < 6; ++i) a6(r[i], v + 6 * i);  // (A g) A^T, row by row
}

// V[N^2][count][c_in], planes `plane` elements apart, N = kTile + 2: B^T d B for tiles
// first .. first + count of the whole batch, F(2x2, 3x3)'s (kTile 2) or F(4x4, 3x3)'s
// (kTile 4, input channels in multiples of 16).
template <int kTile>
FASTCIFAR_AVX512_BF16 void input_tiles(const at::BFloat16* x, const Shape& s, int64_t first,
                                       int64_t count, at::BFloat16* v, int64_t plane) {
  constexpr int kPlanes = (kTile + 2) * (kTile + 2);
  const int64_t c = s.c_in;
  for (int64_t t = 0; t < count; ++t) {
    at::BFloat16* out = v + t * c;
    const TileAt where = locate(s, first + t);
    const Patch patch = kTile == 2 ? patch_at(x, s, where) : Patch{};
    for (int64_t ch = 0; ch < c; ch += 16) {
      const __mmask16 m = lanes(c - ch);
      __m512 tile[kPlanes];
      if constexpr (kTile == 2) input_tile(patch, ch, m, tile);
      else input_tile6(x, s, where, ch, tile);
      for (int k = 0; k < kPlanes; ++k) _mm256_mask_storeu_epi16(out + k * plane + ch, m, to_bf16(tile[k]));
    }
  }
}

// P[planes][count / 2][c][2], planes `plane` elements apart: the transform of each of
// tiles first .. first + count (count even; a tile from `tiles` on is zero), two tiles to
// a pair, as gemm takes either operand: the input's B^T d B (kGradient false, c = C_in)
// or the gradient's A g A^T (c = C_out, channels in multiples of 16), with F(2x2, 3x3)'s
// 16 planes (kTile 2) or F(4x4, 3x3)'s 36 (kTile 4). For the gradient it also adds each
// channel's sum over the tiles' pixels into `pixel_sums` (C_out floats): a tile's pixels
// sum to its A g A^T's value (1, 1).
template <int kTile, bool kGradient>
FASTCIFAR_AVX512_BF16 void paired_tiles(const at::BFloat16* src, const Shape& s, int64_t first,
                                        int64_t count, int64_t tiles, at::BFloat16* out,
                                        int64_t plane, float* pixel_sums = nullptr) {
  constexpr int kPlanes = (kTile + 2) * (kTile + 2), kPixelSum = kTile + 3;  // value (1, 1)
  constexpr bool kPatch = !kGradient && kTile == 2;  // F(2x2)'s input patch, located once
  const int64_t c = kGradient ? s.c_out : s.c_in, pairs = count / 2;
  for (int64_t p = 0; p < pairs; ++p) {
    const int64_t t0 = first + 2 * p, t1 = t0 + 1;
    const bool second = t1 < tiles;  // else the pair's second tile is zero
    const TileAt at[2] = {locate(s, t0), locate(s, second ? t1 : t0)};
    const Patch patch[2] = {kPatch ? patch_at(src, s, at[0]) : Patch{},
                            kPatch ? patch_at(src, s, at[1]) : Patch{}};
    for (int64_t ch = 0; ch < c; ch += 16) {
      __m512 v[2][kPlanes];
      for (int k = 0; k < 2; ++k) {
        if (k == 1 && !second) {
          for (int q = 0; q < kPlanes; ++q) v[1][q] = _mm512_setzero_ps();
        } else if constexpr (kGradient && kTile == 2) {
          gradient_tile(src, s, at[k], ch, v[k]);
        } else if constexpr (kGradient) {
          gradient_tile6(src, s, at[k], ch, v[k]);
        } else if constexpr (kTile == 2) {
          input_tile(patch[k], ch, 0xFFFF, v[k]);
        } else {
          input_tile6(src, s, at[k], ch, v[k]);
        }
      }
      for (int q = 0; q < kPlanes; ++q)
        _mm512_storeu_si512(out + q * plane + (p * c + ch) * 2, bf16_pairs(v[0][q], v[1][q]));
      if constexpr (kGradient)
        _mm512_storeu_ps(pixel_sums + ch, _mm512_add_ps(_mm512_loadu_ps(pixel_sums + ch),
                                                        _mm512_add_ps(v[0][kPixelSum], v[1][kPixelSum])));
    }
  }
}

// The kTile x kTile output pixels of each tile, A^T m A + bias, from M[(kTile + 2)^2]
// [count][c_out], planes `plane` elements apart (kTile 2: F(2x2, 3x3); 4: F(4x4, 3x3)).
template <int kTile>
FASTCIFAR_AVX512_BF16 void output_pixels(const float* mt, int64_t plane, const float* bias,
                                         const Shape& s, int64_t first, int64_t count,
                                         at::BFloat16* y) {
  const int64_t c = s.c_out;
  for (int64_t t = 0; t < count; ++t) {
    const TileAt where = locate(s, first + t);
    const float* in = mt + t * c;
    at::BFloat16* top = y + ((where.image * s.h + kTile * where.ty) * s.w + kTile * where.tx) * c;
    for (int64_t ch = 0; ch < c; ch += 16) {
      const __mmask16 m = lanes(c - ch);
      const __m512 b = bias ? _mm512_maskz_loadu_ps(m, bias + ch) : _mm512_setzero_ps();
      if constexpr (kTile == 2) {
        __m512 r[2][4];  // A^T m: rows
        for (int j = 0; j < 4; ++j) {
          const __m512 m0 = _mm512_maskz_loadu_ps(m, in + j * plane + ch);
          const __m512 m1 = _mm512_maskz_loadu_ps(m, in + (4 + j) * plane + ch);
          const __m512 m2 = _mm512_maskz_loadu_ps(m, in + (8 + j) * plane + ch);
          const __m512 m3 = _mm512_maskz_loadu_ps(m, in + (12 + j) * plane + ch);
          r[0][j] = _mm512_add_ps(_mm512_add_ps(m0, m1), m2);
          r[1][j] = _mm512_sub_ps(_mm512_sub_ps(m1, m2), m3);
        }
        for (int a = 0; a < 2; ++a) {  // (A^T m) A: columns
          const __m512 left = _mm512_add_ps(_mm512_add_ps(r[a][0], r[a][1]), r[a][2]);
          const __m512 right = _mm512_sub_ps(_mm512_sub_ps(r[a][1], r[a][2]), r[a][3]);
          _mm256_mask_storeu_epi16(top + a * s.w * c + ch, m, to_bf16(_mm512_add_ps(left, b)));
          _mm256_mask_storeu_epi16(top + (a * s.w + 1) * c + ch, m, to_bf16(_mm512_add_ps(right, b)));
        }
      } else {
        __m512 r[4][6];  // A^T m, column by column
        for (int j = 0; j < 6; ++j) {
          __m512 col[6], out[4];
          for (int i = 0; i < 6; ++i) col[i] = _mm512_maskz_loadu_ps(m, in + (6 * i + j) * plane + ch);
          at6(col, out);
          for (int a = 0; a < 4; ++a) r[a][j] = out[a];
        }
        for (int a = 0; a < 4; ++a) {  // (A^T m) A, row by row
          __m512 row[4];
          at6(r[a], row);
          for (int q = 0; q < 4; ++q)
            _mm256_mask_storeu_epi16(top + (a * s.w + q) * c + ch, m, to_bf16(_mm512_add_ps(row[q], b)));
        }
      }
    }
  }
}

// Tiles a chunk of the forward: its transformed inputs (bf16) and products (fp32) about
// 384 KiB, so that they stay in the L2 cache between the transforms and the products;
// for F(4x4, 3x3)'s 36 planes at least as many, up to 16, as fit one plane's inputs,
// weights and products into those 384 KiB, since each chunk reads every plane of the
// weights (caps of 8 to 64 within 8% of each other at CerberusNet's shapes, 16 fastest or
// tied; 128 up to 1.3x slower).
int64_t forward_chunk(int64_t planes, int64_t c_in, int64_t c_out) {
  const int64_t fit = 393216 / (planes * (2 * c_in + 4 * c_out));
  if (planes == 16) return std::max<int64_t>(kRows, fit);
  const int64_t plane_fit = std::max<int64_t>(0, (393216 - 2 * c_in * c_out) / (2 * c_in + 4 * c_out));
  return std::max<int64_t>({kRows, fit, std::min<int64_t>(plane_fit, 16)});
}

// winograd_conv3x3's bf16 body for kTile x kTile output tiles.
template <int kTile>
void forward_tiles(const at::Tensor& x, const at::Tensor& packed, const float* bias, at::Tensor& y) {
  constexpr int kPlanes = (kTile + 2) * (kTile + 2);
  const int64_t n = x.size(0), c_in = x.size(1), h = x.size(2), w = x.size(3), c_out = packed.size(2);
  const Shape s{h, w, c_in, c_out, (h / kTile) * (w / kTile), w / kTile};
  const int64_t tiles = n * s.tiles_per_image;
  const int64_t chunk = forward_chunk(kPlanes, c_in, c_out);
  const int64_t chunks = (tiles + chunk - 1) / chunk;
  const auto* in = reinterpret_cast<const at::BFloat16*>(x.const_data_ptr());
  const auto* u = reinterpret_cast<const at::BFloat16*>(packed.const_data_ptr());
  auto* out = reinterpret_cast<at::BFloat16*>(y.mutable_data_ptr());
  const int64_t v_plane = chunk * c_in + kPlanePad, m_plane = chunk * c_out + kPlanePad / 2;
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<at::BFloat16> v(kPlanes * v_plane);
    std::vector<float> products(kPlanes * m_plane);
    for (int64_t part = begin; part < end; ++part) {
      const int64_t first = part * chunk, count = std::min(chunk, tiles - first);
      input_tiles<kTile>(in, s, first, count, v.data(), v_plane);
      for (int k = 0; k < kPlanes; ++k)
        gemm<false>(v.data() + k * v_plane, c_in, 2, count, u + k * c_in * c_out, c_out, c_in,
                    products.data() + k * m_plane);
      output_pixels<kTile>(products.data(), m_plane, bias, s, first, count, out);
    }
  });
}

at::Tensor winograd_conv3x3_cpu(const at::Tensor& x, const at::Tensor& packed,
                                const std::optional<at::Tensor>& bias) {
  if (x.scalar_type() == at::kFloat) return winograd_conv3x3_fp32(x, packed, bias);
  TORCH_CHECK(has_avx512_bf16(), "winograd_conv3x3 in bf16 needs a CPU with AVX512-BF16");
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 4 && x.scalar_type() == at::kBFloat16 &&
                  x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "winograd_conv3x3 takes a 4-D bf16 channels-last input on the CPU");
  const int64_t n = x.size(0), c_in = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t planes = packed.dim() == 4 ? packed.size(0) : 0, tile = planes == 36 ? 4 : 2;
  TORCH_CHECK(packed.scalar_type() == at::kBFloat16 && packed.is_contiguous() && packed.dim() == 4 &&
                  (planes == 16 || planes == 36) && 2 * packed.size(1) == c_in && packed.size(3) == 2,
              "winograd_conv3x3: the weight tiles must be contiguous bf16 (16 or 36, C_in / 2, "
              "C_out, 2) for ", c_in, " input channels");
  TORCH_CHECK(h % tile == 0 && w % tile == 0, "winograd_conv3x3 with ", planes, " weight tiles needs ",
              tile == 2 ? "an even height and width" : "a height and width in multiples of 4",
              ", not ", h, " x ", w);
  const int64_t c_out = packed.size(2);
  TORCH_CHECK(c_in % (tile == 2 ? 2 : 16) == 0 && c_out % 16 == 0,
              "winograd_conv3x3 with ", planes, " weight tiles needs input channels in multiples of ",
              tile == 2 ? 2 : 16, " and output channels in multiples of 16, not ", c_in, " and ", c_out);
  at::Tensor b;
  if (bias) {
    b = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(b.dim() == 1 && b.size(0) == c_out, "winograd_conv3x3: the bias needs ", c_out, " values");
  }
  auto y = at::empty({n, c_out, h, w}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  const float* bp = b.defined() ? b.const_data_ptr<float>() : nullptr;
  if (tile == 2) forward_tiles<2>(x, packed, bp, y);
  else forward_tiles<4>(x, packed, bp, y);
  return y;
}

// Sum over tiles of (B^T d B) * (A g A^T), (P, C_in, C_out) float, P = 16 planes for
// F(2x2, 3x3) (kTile 2) or 36 for F(4x4, 3x3) (kTile 4): the gradient of the weights'
// tiles G w G^T (fastcifar/ops/winograd.py turns it into the weights' gradient); and the
// gradient's sum over pixels, (C_out) float: the bias's gradient. Each thread adds its
// chunks of tiles into its own sums (the pixel sums of a chunk in fp32, the chunks' in
// fp64); the threads' sums are added last.
template <int kTile>
std::tuple<at::Tensor, at::Tensor> weight_grad_tiles(const at::Tensor& grad, const at::Tensor& x) {
  constexpr int kPlanes = (kTile + 2) * (kTile + 2);
  const int64_t n = x.size(0), c_in = x.size(1), h = x.size(2), w = x.size(3), c_out = grad.size(1);
  const Shape s{h, w, c_in, c_out, (h / kTile) * (w / kTile), w / kTile};
  const int64_t tiles = n * s.tiles_per_image;
  // tiles a chunk (even): both transforms together about 2 MiB, and for F(4x4) at least
  // 128 tiles, so that each chunk's products outweigh reading and writing the thread's
  // sums (36 planes: 9 MiB at 256 channels, beyond the L2 cache)
  const int64_t fit = (1 << 21) / (2 * kPlanes * (c_in + c_out));
  const int64_t chunk = 2 * std::max<int64_t>(kTile == 2 ? 32 : 64, fit / 2);
  const int64_t chunks = (tiles + chunk - 1) / chunk;
  const int64_t threads = at::get_num_threads();
  auto sums = at::zeros({threads, kPlanes, c_in, c_out}, x.options().dtype(at::kFloat));
  auto pixel_sums = at::zeros({threads, c_out}, x.options().dtype(at::kDouble));
  const auto* in = reinterpret_cast<const at::BFloat16*>(x.const_data_ptr());
  const auto* g = reinterpret_cast<const at::BFloat16*>(grad.const_data_ptr());
  float* all = sums.mutable_data_ptr<float>();
  const int64_t v_plane = chunk * c_in + kPlanePad, m_plane = chunk * c_out + kPlanePad;
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    const int64_t thread = at::get_thread_num();
    TORCH_INTERNAL_ASSERT(thread < threads, "winograd_conv3x3_weight_grad: thread ", thread);
    float* mine = all + thread * kPlanes * c_in * c_out;
    double* my_pixel_sums = pixel_sums.mutable_data_ptr<double>() + thread * c_out;
    std::vector<at::BFloat16> v(kPlanes * v_plane), m(kPlanes * m_plane);
    std::vector<float> chunk_pixel_sums(c_out);
    for (int64_t part = begin; part < end; ++part) {
      const int64_t first = part * chunk, count = std::min(chunk, tiles - first);
      const int64_t even = count + (count & 1);
      std::fill(chunk_pixel_sums.begin(), chunk_pixel_sums.end(), 0.0f);
      paired_tiles<kTile, false>(in, s, first, even, tiles, v.data(), v_plane);
      paired_tiles<kTile, true>(g, s, first, even, tiles, m.data(), m_plane, chunk_pixel_sums.data());
      for (int k = 0; k < kPlanes; ++k)
        gemm<true>(v.data() + k * v_plane, 2, 2 * c_in, c_in, m.data() + k * m_plane, c_out, even,
                   mine + k * c_in * c_out);
      for (int64_t o = 0; o < c_out; ++o) my_pixel_sums[o] += chunk_pixel_sums[o];
    }
  });
  return {sums.sum(0), pixel_sums.sum(0).to(at::kFloat)};
}

std::tuple<at::Tensor, at::Tensor> winograd_conv3x3_weight_grad_cpu(const at::Tensor& grad,
                                                                    const at::Tensor& x, int64_t tile) {
  TORCH_CHECK(tile == 2 || tile == 4, "winograd_conv3x3_weight_grad: tile must be 2 or 4, not ", tile);
  if (x.scalar_type() == at::kFloat) return winograd_conv3x3_weight_grad_fp32(grad, x, tile);
  TORCH_CHECK(has_avx512_bf16(), "winograd_conv3x3_weight_grad in bf16 needs a CPU with AVX512-BF16");
  for (const at::Tensor* t : {&grad, &x})
    TORCH_CHECK(t->device().is_cpu() && t->dim() == 4 && t->scalar_type() == at::kBFloat16 &&
                    t->is_contiguous(at::MemoryFormat::ChannelsLast),
                "winograd_conv3x3_weight_grad takes 4-D bf16 channels-last tensors on the CPU");
  const int64_t c_in = x.size(1), h = x.size(2), w = x.size(3), c_out = grad.size(1);
  TORCH_CHECK(grad.size(0) == x.size(0) && grad.size(2) == h && grad.size(3) == w,
              "winograd_conv3x3_weight_grad: the gradient's batch and size must be the input's");
  TORCH_CHECK(h % tile == 0 && w % tile == 0 && c_in % 16 == 0 && c_out % 16 == 0,
              "winograd_conv3x3_weight_grad with tile ", tile, " needs a height and width in "
              "multiples of ", tile, " and channels in multiples of 16, not ", h, " x ", w,
              " with ", c_in, " and ", c_out);
  return tile == 2 ? weight_grad_tiles<2>(grad, x) : weight_grad_tiles<4>(grad, x);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcifar, CPU, m) {
  m.impl("winograd_conv3x3", &winograd_conv3x3_cpu);
  m.impl("winograd_conv3x3_weight_grad", &winograd_conv3x3_weight_grad_cpu);
}

}  // namespace fastcifar
