// fastcifar::winograd_conv3x3 and its weight gradient for fp32 channels-last activations,
// as Winograd F(2x2, 3x3) or F(4x4, 3x3) (a 6 x 6 patch for 4 x 4 output pixels: the
// forward given its 36 weight tiles, the weight gradient given tile 4) on a CPU with AVX2
// and FMA: the tiles, chunks and
// planes of winograd_cpu.cpp's bf16 kernels, 8 channels to a vector, the products on FMA.
// Where a CPU has no bf16 instructions training runs in fp32, and oneDNN's direct
// convolutions there run near the fp32 matmul peak: only fewer multiplications make them
// faster.
//
// Forward: per chunk of tiles, B^T d B of each tile's 4 x 4 patch into 16 planes
// (tiles x C_in), 16 matrix products with the weights' tiles G w G^T (C_in x C_out), and
// A^T m A + bias of each tile's 16 products into its 2 x 2 output pixels. Weight gradient:
// the same input planes and A g A^T of the output's gradient (tiles x C_out), summed over
// tiles as 16 products (C_in x tiles) by (tiles x C_out). F(4x4, 3x3) does the same with
// 36 planes.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <vector>

#include "cpu_features.h"
#include "winograd.h"

namespace fastcifar {

namespace {

// C[MR x 8 NV] (+)= A[MR x K] B[K x 8 NV]: A's element (r, p) at a + r * a_row + p * a_k,
// B's rows ldb floats apart, C's ldc apart, added to with kAccumulate.
template <int MR, int NV, bool kAccumulate>
FASTCIFAR_AVX2 void gemm_block(const float* a, int64_t a_row, int64_t a_k, const float* b, int64_t ldb,
                               int64_t k, float* c, int64_t ldc) {
  __m256 acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v)
      acc[r][v] = kAccumulate ? _mm256_loadu_ps(c + r * ldc + 8 * v) : _mm256_setzero_ps();
  int64_t p = 0;
  do {  // k >= 1
    __m256 w[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) w[v] = _mm256_loadu_ps(b + p * ldb + 8 * v);
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      const __m256 x = _mm256_broadcast_ss(a + r * a_row + p * a_k);
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_fmadd_ps(x, w[v], acc[r][v]);
    }
  } while (++p < k);
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(c + r * ldc + 8 * v, acc[r][v]);
}

constexpr int kRows = 6;  // rows of A per register block: 12 accumulators, 2 of B, 1 of A

// MR rows of A by a panel of B 16 columns wide, or 8 where only 8 are left.
template <int MR, bool kAccumulate>
FASTCIFAR_AVX2 inline void panel_block(const float* a, int64_t a_row, int64_t a_k, const float* b,
                                       int64_t ldb, int64_t k, float* c, int64_t ldc, bool wide) {
  if (wide) gemm_block<MR, 2, kAccumulate>(a, a_row, a_k, b, ldb, k, c, ldc);
  else gemm_block<MR, 1, kAccumulate>(a, a_row, a_k, b, ldb, k, c, ldc);
}

// C[m x n] (+)= A[m x k] B[k x n], n a multiple of 8, A laid out as gemm_block says. The
// panels of B's columns come outermost, so each stays in the L1 cache while A's rows pass.
template <bool kAccumulate>
FASTCIFAR_AVX2 void gemm(const float* a, int64_t a_row, int64_t a_k, int64_t m, const float* b,
                         int64_t n, int64_t k, float* c) {
  for (int64_t col = 0; col < n; col += 16) {
    const bool wide = col + 16 <= n;
    int64_t row = 0;
    for (; row + kRows <= m; row += kRows)
      panel_block<kRows, kAccumulate>(a + row * a_row, a_row, a_k, b + col, n, k, c + row * n + col, n, wide);
    const float* rest = a + row * a_row;
    float* c_rest = c + row * n + col;
    switch (m - row) {
      case 5: panel_block<5, kAccumulate>(rest, a_row, a_k, b + col, n, k, c_rest, n, wide); break;
      case 4: panel_block<4, kAccumulate>(rest, a_row, a_k, b + col, n, k, c_rest, n, wide); break;
      case 3: panel_block<3, kAccumulate>(rest, a_row, a_k, b + col, n, k, c_rest, n, wide); break;
      case 2: panel_block<2, kAccumulate>(rest, a_row, a_k, b + col, n, k, c_rest, n, wide); break;
      case 1: panel_block<1, kAccumulate>(rest, a_row, a_k, b + col, n, k, c_rest, n, wide); break;
      default: break;
    }
  }
}

// Where the N x N input patch around a tile (N - 2 square output pixels) lies: its rows'
// starts and its columns' offsets, clamped into the image, and which of its values (bit
// N i + j) lie inside it. A value outside is zero: loaded from the clamped address and
// masked off.
template <int N>
struct Patch {
  const float* rows[N];
  int64_t cols[N];
  uint64_t inside;
  static constexpr uint64_t kAll = (uint64_t(1) << (N * N)) - 1;
};

template <int N>
inline Patch<N> patch_at(const float* x, const Shape& s, const TileAt& where) {
  Patch<N> p;
  p.inside = 0;
  const int64_t top = (N - 2) * where.ty - 1, left = (N - 2) * where.tx - 1;
  for (int j = 0; j < N; ++j) p.cols[j] = std::clamp<int64_t>(left + j, 0, s.w - 1) * s.c_in;
  for (int i = 0; i < N; ++i) {
    const int64_t row = top + i;
    p.rows[i] = x + (where.image * s.h + std::clamp<int64_t>(row, 0, s.h - 1)) * s.w * s.c_in;
    for (int j = 0; j < N; ++j) {
      const int64_t col = left + j;
      const bool inside = row >= 0 && row < s.h && col >= 0 && col < s.w;
      p.inside |= uint64_t(inside) << (N * i + j);
    }
  }
  return p;
}

// The patch's value (i, j) for 8 channels from ch; with kAllInside no mask.
template <bool kAllInside, int N>
FASTCIFAR_AVX2 inline __m256 patch_value(const Patch<N>& p, int i, int j, int64_t ch) {
  const __m256 d = _mm256_loadu_ps(p.rows[i] + p.cols[j] + ch);
  if constexpr (kAllInside) return d;
  const int keep = -int((p.inside >> (N * i + j)) & 1);
  return _mm256_and_ps(d, _mm256_castsi256_ps(_mm256_set1_epi32(keep)));
}

// F(2x2, 3x3)'s B^T d B of a tile's 4 x 4 patch for 8 input channels from ch: v[4 i + j].
// With kAllInside the whole patch lies inside the image (most tiles): no masks.
template <bool kAllInside>
FASTCIFAR_AVX2 inline void patch_transform(const Patch<4>& p, int64_t ch, __m256 v[16]) {
  __m256 d[4][4];
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4; ++j) d[i][j] = patch_value<kAllInside>(p, i, j, ch);
  __m256 r[4][4];  // B^T d: rows
  for (int j = 0; j < 4; ++j) {
    r[0][j] = _mm256_sub_ps(d[0][j], d[2][j]);
    r[1][j] = _mm256_add_ps(d[1][j], d[2][j]);
    r[2][j] = _mm256_sub_ps(d[2][j], d[1][j]);
    r[3][j] = _mm256_sub_ps(d[1][j], d[3][j]);
  }
  for (int i = 0; i < 4; ++i) {  // (B^T d) B: columns
    v[4 * i + 0] = _mm256_sub_ps(r[i][0], r[i][2]);
    v[4 * i + 1] = _mm256_add_ps(r[i][1], r[i][2]);
    v[4 * i + 2] = _mm256_sub_ps(r[i][2], r[i][1]);
    v[4 * i + 3] = _mm256_sub_ps(r[i][1], r[i][3]);
  }
}

// F(4x4, 3x3) (Lavin and Gray's matrices, points 0, 1, -1, 2, -2; fastcifar/ops/winograd.py
// has them): B^T x of one column (or row) x[0..5] of a 6 x 6 patch.
FASTCIFAR_AVX2 inline void bt6(const __m256 x[6], __m256 y[6]) {
  const __m256 four = _mm256_set1_ps(4.0f), five = _mm256_set1_ps(5.0f), two = _mm256_set1_ps(2.0f);
  const __m256 x4_x2 = _mm256_sub_ps(x[4], x[2]), x3_x1 = _mm256_sub_ps(x[3], x[1]);
  y[0] = _mm256_add_ps(_mm256_fnmadd_ps(five, x[2], _mm256_mul_ps(four, x[0])), x[4]);
  y[1] = _mm256_fnmadd_ps(four, _mm256_add_ps(x[1], x[2]), _mm256_add_ps(x[4], x[3]));
  y[2] = _mm256_fmadd_ps(four, _mm256_sub_ps(x[1], x[2]), _mm256_sub_ps(x[4], x[3]));
  y[3] = _mm256_fmadd_ps(two, x3_x1, x4_x2);
  y[4] = _mm256_fnmadd_ps(two, x3_x1, x4_x2);
  y[5] = _mm256_add_ps(_mm256_fnmadd_ps(five, x[3], _mm256_mul_ps(four, x[1])), x[5]);
}

// A^T m of one column (or row) m[0..5] of a tile's 6 x 6 products: 4 values.
FASTCIFAR_AVX2 inline void at6(const __m256 m[6], __m256 y[4]) {
  const __m256 two = _mm256_set1_ps(2.0f), four = _mm256_set1_ps(4.0f), eight = _mm256_set1_ps(8.0f);
  const __m256 s12 = _mm256_add_ps(m[1], m[2]), d12 = _mm256_sub_ps(m[1], m[2]);
  const __m256 s34 = _mm256_add_ps(m[3], m[4]), d34 = _mm256_sub_ps(m[3], m[4]);
  y[0] = _mm256_add_ps(_mm256_add_ps(m[0], s12), s34);
  y[1] = _mm256_fmadd_ps(two, d34, d12);
  y[2] = _mm256_fmadd_ps(four, s34, s12);
  y[3] = _mm256_add_ps(_mm256_fmadd_ps(eight, d34, d12), m[5]);
}

// F(4x4, 3x3)'s B^T d B of a tile's 6 x 6 patch for 8 input channels from ch: v[6 i + j].
template <bool kAllInside>
FASTCIFAR_AVX2 inline void patch_transform(const Patch<6>& p, int64_t ch, __m256 v[36]) {
  __m256 r[6][6];  // B^T d, column by column
  for (int j = 0; j < 6; ++j) {
    __m256 d[6], column[6];
    for (int i = 0; i < 6; ++i) d[i] = patch_value<kAllInside>(p, i, j, ch);
    bt6(d, column);
    for (int i = 0; i < 6; ++i) r[i][j] = column[i];
  }
  for (int i = 0; i < 6; ++i) bt6(r[i], v + 6 * i);  // (B^T d) B, row by row
}

// V[N^2][count][c_in], planes `plane` floats apart: B^T d B of the N x N patches of tiles
// first .. first + count of the whole batch (N = 4: F(2x2, 3x3); 6: F(4x4, 3x3)).
template <int N>
FASTCIFAR_AVX2 void input_tiles(const float* x, const Shape& s, int64_t first, int64_t count, float* v,
                                int64_t plane) {
  for (int64_t t = 0; t < count; ++t) {
    float* out = v + t * s.c_in;
    const Patch<N> patch = patch_at<N>(x, s, locate(s, first + t));
    for (int64_t ch = 0; ch < s.c_in; ch += 8) {
      __m256 tile[N * N];
      if (patch.inside == Patch<N>::kAll) patch_transform<true>(patch, ch, tile);
      else patch_transform<false>(patch, ch, tile);
      for (int k = 0; k < N * N; ++k) _mm256_storeu_ps(out + k * plane + ch, tile[k]);
    }
  }
}

// A x of one column (or row) x[0..3] of F(4x4, 3x3)'s 4 x 4 gradient block: 6 values.
FASTCIFAR_AVX2 inline void a6(const __m256 x[4], __m256 y[6]) {
  const __m256 two = _mm256_set1_ps(2.0f), four = _mm256_set1_ps(4.0f), eight = _mm256_set1_ps(8.0f);
  const __m256 even = _mm256_add_ps(x[0], x[2]), odd = _mm256_add_ps(x[1], x[3]);
  const __m256 even4 = _mm256_fmadd_ps(four, x[2], x[0]);
  const __m256 odd8 = _mm256_fmadd_ps(eight, x[3], _mm256_mul_ps(two, x[1]));
  y[0] = x[0];
  y[1] = _mm256_add_ps(even, odd);
  y[2] = _mm256_sub_ps(even, odd);
  y[3] = _mm256_add_ps(even4, odd8);
  y[4] = _mm256_sub_ps(even4, odd8);
  y[5] = x[3];
}

// A g A^T of the tile at `where` for 8 output channels from ch, g the output's gradient at
// its kTile x kTile pixels: v[N i + j], N = kTile + 2 (F(2x2, 3x3): 16 values; F(4x4,
// 3x3): 36).
template <int kTile>
FASTCIFAR_AVX2 inline void gradient_tile(const float* grad, const Shape& s, const TileAt& where,
                                         int64_t ch, __m256* v) {
  const int64_t c = s.c_out;
  const float* top = grad + ((where.image * s.h + kTile * where.ty) * s.w + kTile * where.tx) * c + ch;
  if constexpr (kTile == 2) {
    const __m256 g00 = _mm256_loadu_ps(top), g01 = _mm256_loadu_ps(top + c);
    const __m256 g10 = _mm256_loadu_ps(top + s.w * c), g11 = _mm256_loadu_ps(top + (s.w + 1) * c);
    const __m256 zero = _mm256_setzero_ps();
    const __m256 r[4][2] = {{g00, g01},  // A g: rows
                            {_mm256_add_ps(g00, g10), _mm256_add_ps(g01, g11)},
                            {_mm256_sub_ps(g00, g10), _mm256_sub_ps(g01, g11)},
                            {_mm256_sub_ps(zero, g10), _mm256_sub_ps(zero, g11)}};
    for (int i = 0; i < 4; ++i) {  // (A g) A^T: columns
      v[4 * i + 0] = r[i][0];
      v[4 * i + 1] = _mm256_add_ps(r[i][0], r[i][1]);
      v[4 * i + 2] = _mm256_sub_ps(r[i][0], r[i][1]);
      v[4 * i + 3] = _mm256_sub_ps(zero, r[i][1]);
    }
  } else {
    __m256 r[6][4];  // A g, column by column
    for (int q = 0; q < 4; ++q) {
      __m256 g[4], column[6];
      for (int p = 0; p < 4; ++p) g[p] = _mm256_loadu_ps(top + (p * s.w + q) * c);
      a6(g, column);
      for (int i = 0; i < 6; ++i) r[i][q] = column[i];
    }
    for (int i = 0; i < 6; ++i) a6(r[i], v + 6 * i);  // (A g) A^T, row by row
  }
}

// G[N^2][count][c_out], planes `plane` floats apart: A g A^T for tiles first .. first +
// count (N = kTile + 2); and each channel's sum of their pixels added into `pixel_sums` (a
// tile's pixels sum to its value (1, 1)).
template <int kTile>
FASTCIFAR_AVX2 void gradient_tiles(const float* grad, const Shape& s, int64_t first, int64_t count,
                                   float* out, int64_t plane, float* pixel_sums) {
  constexpr int kN = kTile + 2;
  const int64_t c = s.c_out;
  for (int64_t t = 0; t < count; ++t) {
    const TileAt where = locate(s, first + t);
    for (int64_t ch = 0; ch < c; ch += 8) {
      __m256 v[kN * kN];
      gradient_tile<kTile>(grad, s, where, ch, v);
      float* o = out + t * c + ch;
      for (int k = 0; k < kN * kN; ++k) _mm256_storeu_ps(o + k * plane, v[k]);
      _mm256_storeu_ps(pixel_sums + ch, _mm256_add_ps(_mm256_loadu_ps(pixel_sums + ch), v[kN + 1]));
    }
  }
}

// The kTile x kTile output pixels of each tile, A^T m A + bias, from M[(kTile + 2)^2]
// [count][c_out], planes `plane` floats apart (kTile 2: F(2x2, 3x3); 4: F(4x4, 3x3)).
template <int kTile>
FASTCIFAR_AVX2 void output_pixels(const float* mt, int64_t plane, const float* bias, const Shape& s,
                                  int64_t first, int64_t count, float* y) {
  const int64_t c = s.c_out;
  for (int64_t t = 0; t < count; ++t) {
    const TileAt where = locate(s, first + t);
    const float* in = mt + t * c;
    float* top = y + ((where.image * s.h + kTile * where.ty) * s.w + kTile * where.tx) * c;
    for (int64_t ch = 0; ch < c; ch += 8) {
      const __m256 b = bias ? _mm256_loadu_ps(bias + ch) : _mm256_setzero_ps();
      if constexpr (kTile == 2) {
        __m256 r[2][4];  // A^T m: rows
        for (int j = 0; j < 4; ++j) {
          const __m256 m0 = _mm256_loadu_ps(in + j * plane + ch);
          const __m256 m1 = _mm256_loadu_ps(in + (4 + j) * plane + ch);
          const __m256 m2 = _mm256_loadu_ps(in + (8 + j) * plane + ch);
          const __m256 m3 = _mm256_loadu_ps(in + (12 + j) * plane + ch);
          r[0][j] = _mm256_add_ps(_mm256_add_ps(m0, m1), m2);
          r[1][j] = _mm256_sub_ps(_mm256_sub_ps(m1, m2), m3);
        }
        for (int a = 0; a < 2; ++a) {  // (A^T m) A: columns
          const __m256 left = _mm256_add_ps(_mm256_add_ps(r[a][0], r[a][1]), r[a][2]);
          const __m256 right = _mm256_sub_ps(_mm256_sub_ps(r[a][1], r[a][2]), r[a][3]);
          _mm256_storeu_ps(top + a * s.w * c + ch, _mm256_add_ps(left, b));
          _mm256_storeu_ps(top + (a * s.w + 1) * c + ch, _mm256_add_ps(right, b));
        }
      } else {
        __m256 r[4][6];  // A^T m, column by column
        for (int j = 0; j < 6; ++j) {
          __m256 m[6], column[4];
          for (int i = 0; i < 6; ++i) m[i] = _mm256_loadu_ps(in + (6 * i + j) * plane + ch);
          at6(m, column);
          for (int a = 0; a < 4; ++a) r[a][j] = column[a];
        }
        for (int a = 0; a < 4; ++a) {  // (A^T m) A, row by row
          __m256 row[4];
          at6(r[a], row);
          for (int q = 0; q < 4; ++q) _mm256_storeu_ps(top + (a * s.w + q) * c + ch, _mm256_add_ps(row[q], b));
        }
      }
    }
  }
}

// Tiles a chunk of the forward: its transformed inputs and products about 384 KiB, so
// that they stay in the L2 cache between the transforms and the products. For F(4x4,
// 3x3) (36 planes) also as many, up to 64, as fit one plane's inputs, weights and
// products into those 384 KiB: each chunk reads every plane of the weights once, and at
// 256 channels 5 tiles a chunk would read 9 MiB of them for 80 pixels.
int64_t forward_chunk(int64_t planes, int64_t c_in, int64_t c_out) {
  const int64_t fit = 393216 / (planes * 4 * (c_in + c_out));
  if (planes == 16) return std::max<int64_t>(kRows, fit);
  const int64_t plane_fit = std::max<int64_t>(0, (393216 - 4 * c_in * c_out) / (4 * (c_in + c_out)));
  return std::max<int64_t>({kRows, fit, std::min<int64_t>(plane_fit, 64)});
}

void check_fp32(const at::Tensor& t, const char* op) {
  TORCH_CHECK(has_avx2_fma(), op, " in fp32 needs a CPU with AVX2 and FMA");
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 4 && t.scalar_type() == at::kFloat &&
                  t.is_contiguous(at::MemoryFormat::ChannelsLast),
              op, " in fp32 takes 4-D float channels-last tensors on the CPU");
}

}  // namespace

at::Tensor winograd_conv3x3_fp32(const at::Tensor& x, const at::Tensor& tiles,
                                 const std::optional<at::Tensor>& bias) {
  check_fp32(x, "winograd_conv3x3");
  const int64_t n = x.size(0), c_in = x.size(1), h = x.size(2), w = x.size(3);
  TORCH_CHECK(tiles.scalar_type() == at::kFloat && tiles.is_contiguous() && tiles.dim() == 3 &&
                  (tiles.size(0) == 16 || tiles.size(0) == 36) && tiles.size(1) == c_in,
              "winograd_conv3x3: the fp32 weight tiles must be contiguous float (16 or 36, C_in, "
              "C_out) for ", c_in, " input channels");
  const int64_t planes = tiles.size(0), tile = planes == 16 ? 2 : 4, c_out = tiles.size(2);
  TORCH_CHECK(h % tile == 0 && w % tile == 0, "winograd_conv3x3 with ", planes, " weight tiles needs ",
              tile == 2 ? "an even height and width" : "a height and width in multiples of 4",
              ", not ", h, " x ", w);
  TORCH_CHECK(c_in % 8 == 0 && c_out % 8 == 0,
              "winograd_conv3x3 in fp32 needs channels in multiples of 8, not ", c_in, " and ", c_out);
  at::Tensor b;
  if (bias) {
    b = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(b.dim() == 1 && b.size(0) == c_out, "winograd_conv3x3: the bias needs ", c_out, " values");
  }
  auto y = at::empty({n, c_out, h, w}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  const Shape s{h, w, c_in, c_out, (h / tile) * (w / tile), w / tile};
  const int64_t count_all = n * s.tiles_per_image;
  const int64_t chunk = forward_chunk(planes, c_in, c_out);
  const int64_t chunks = (count_all + chunk - 1) / chunk;
  const float* in = x.const_data_ptr<float>();
  const float* u = tiles.const_data_ptr<float>();
  float* out = y.mutable_data_ptr<float>();
  const float* bp = b.defined() ? b.const_data_ptr<float>() : nullptr;
  const int64_t v_plane = chunk * c_in + kPlanePad / 2, m_plane = chunk * c_out + kPlanePad / 2;
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> v(planes * v_plane), products(planes * m_plane);
    for (int64_t part = begin; part < end; ++part) {
      const int64_t first = part * chunk, count = std::min(chunk, count_all - first);
      if (tile == 2) input_tiles<4>(in, s, first, count, v.data(), v_plane);
      else input_tiles<6>(in, s, first, count, v.data(), v_plane);
      for (int k = 0; k < planes; ++k)
        gemm<false>(v.data() + k * v_plane, c_in, 1, count, u + k * c_in * c_out, c_out, c_in,
                    products.data() + k * m_plane);
      if (tile == 2) output_pixels<2>(products.data(), m_plane, bp, s, first, count, out);
      else output_pixels<4>(products.data(), m_plane, bp, s, first, count, out);
    }
  });
  return y;
}

namespace {

// winograd_conv3x3_weight_grad_fp32 for blocks of kTile x kTile output pixels
template <int kTile>
std::tuple<at::Tensor, at::Tensor> weight_grad_tiles(const at::Tensor& grad, const at::Tensor& x) {
  constexpr int kN = kTile + 2, kPlanes = kN * kN;
  const int64_t n = x.size(0), c_in = x.size(1), h = x.size(2), w = x.size(3), c_out = grad.size(1);
  const Shape s{h, w, c_in, c_out, (h / kTile) * (w / kTile), w / kTile};
  const int64_t count_all = n * s.tiles_per_image;
  // tiles a chunk: both transforms together about 2 MiB, and at least 64 (F(2x2)) or 128
  // (F(4x4)), so that each chunk's products outweigh reading and writing the thread's sums
  // (36 planes: 9 MiB at 256 channels, beyond the L2 cache)
  const int64_t fit = (1 << 21) / (kPlanes * 4 * (c_in + c_out));
  const int64_t chunk = std::max<int64_t>(kTile == 2 ? 64 : 128, fit);
  const int64_t chunks = (count_all + chunk - 1) / chunk;
  const int64_t threads = at::get_num_threads();
  auto sums = at::zeros({threads, kPlanes, c_in, c_out},
                        x.options().memory_format(at::MemoryFormat::Contiguous));
  auto pixel_sums = at::zeros({threads, c_out},
                              x.options().dtype(at::kDouble).memory_format(at::MemoryFormat::Contiguous));
  const float* in = x.const_data_ptr<float>();
  const float* g = grad.const_data_ptr<float>();
  float* all = sums.mutable_data_ptr<float>();
  const int64_t v_plane = chunk * c_in + kPlanePad / 2, m_plane = chunk * c_out + kPlanePad / 2;
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    const int64_t thread = at::get_thread_num();
    TORCH_INTERNAL_ASSERT(thread < threads, "winograd_conv3x3_weight_grad: thread ", thread);
    float* mine = all + thread * kPlanes * c_in * c_out;
    double* my_pixel_sums = pixel_sums.mutable_data_ptr<double>() + thread * c_out;
    std::vector<float> v(kPlanes * v_plane), m(kPlanes * m_plane), chunk_pixel_sums(c_out);
    for (int64_t part = begin; part < end; ++part) {
      const int64_t first = part * chunk, count = std::min(chunk, count_all - first);
      std::fill(chunk_pixel_sums.begin(), chunk_pixel_sums.end(), 0.0f);
      input_tiles<kN>(in, s, first, count, v.data(), v_plane);
      gradient_tiles<kTile>(g, s, first, count, m.data(), m_plane, chunk_pixel_sums.data());
      for (int k = 0; k < kPlanes; ++k)
        gemm<true>(v.data() + k * v_plane, 1, c_in, c_in, m.data() + k * m_plane, c_out, count,
                   mine + k * c_in * c_out);
      for (int64_t o = 0; o < c_out; ++o) my_pixel_sums[o] += chunk_pixel_sums[o];
    }
  });
  return {sums.sum(0), pixel_sums.sum(0).to(at::kFloat)};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> winograd_conv3x3_weight_grad_fp32(const at::Tensor& grad,
                                                                     const at::Tensor& x, int64_t tile) {
  for (const at::Tensor* t : {&grad, &x}) check_fp32(*t, "winograd_conv3x3_weight_grad");
  const int64_t n = x.size(0), c_in = x.size(1), h = x.size(2), w = x.size(3), c_out = grad.size(1);
  TORCH_CHECK(grad.size(0) == n && grad.size(2) == h && grad.size(3) == w,
              "winograd_conv3x3_weight_grad: the gradient's batch and size must be the input's");
  TORCH_CHECK(h % tile == 0 && w % tile == 0 && c_in % 8 == 0 && c_out % 8 == 0,
              "winograd_conv3x3_weight_grad in fp32 with tile ", tile, " needs a height and width "
              "in multiples of ", tile, " and channels in multiples of 8, not ", h, " x ", w, " with ",
              c_in, " and ", c_out);
  return tile == 2 ? weight_grad_tiles<2>(grad, x) : weight_grad_tiles<4>(grad, x);
}

}  // namespace fastcifar
