// The weight and bias gradients of a 3x3, stride-1, padding-1 convolution over
// channels-last bf16 activations, on AMX tiles (Intel CPUs with amx_bf16). oneDNN's
// backward-weights runs at a third to a half of its forward rate on these shapes
// (benchmarks/NOTES.md); this kernel is a plain tiled matrix product instead.
//
// The pixels are walked on a padded grid (Grid, below) where a tap (dy, dx) of the
// kernel is one constant shift off of the flat pixel index, so dW[tap] = sum over q of
// g[q] (x) x[q + off], with the output gradient g and the input x zero on the padding.
// Blocks of kBlock grid pixels are packed once for all nine taps. AMX multiplies pairs
// of the summed-over index, here pixels; a block pairs each pixel of its first half with
// the pixel half a block on, so that any tap's shift moves a whole pair: g transposed
// to (channel, pair) rows, AMX's left tiles, and x's pairs (with a margin of a shift
// either side), AMX's right-tile layout. Every tile then starts on a 64-byte boundary (a
// tile at a shift of one pixel would cross two cache lines a row). Pairing neighbouring
// pixels instead needed x packed twice, from an even and from an odd pixel, for 7% to
// 11% more time (benchmarks/NOTES.md). The bias gradient is the sum of g's transposed
// rows. Each thread sums its blocks into float tiles of its own, zeroed in the tile
// registers at its first block (not in memory); the partial sums of the threads that ran
// add up at the end, straight into the weight's channels-last layout. The buffers come
// from torch's allocator, 64-byte aligned (in 16-byte aligned buffers the tiles' rows
// crossed two cache lines, at half the speed).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <sys/syscall.h>
#include <torch/library.h>
#include <unistd.h>

#include <algorithm>
#include <vector>

#include "avx512.h"

namespace fastcifar {
namespace {

#define FASTCIFAR_AMX __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl")))
#define FASTCIFAR_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

constexpr int64_t kBlock = 256;  // grid pixels packed at a time (a multiple of 32; 128,
                                 // 192, 512, 1024 and 2048 were slower)
constexpr int64_t kPair = 32;     // channels a thread's inner loop takes per side (2 tiles)

// The CPU has AMX-BF16 (and AVX512-BF16), and Linux lets this process use its tiles.
bool amx_usable() {
  static const bool usable = [] {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("amx-bf16") || !__builtin_cpu_supports("amx-tile") ||
        !__builtin_cpu_supports("avx512bf16"))  // the bias sums' dot products
      return false;
    constexpr long kRequestPermission = 0x1023, kTileData = 18;  // ARCH_REQ_XCOMP_PERM
    return syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
  }();
  return usable;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

// An image's border sums, each c floats: rows 0 and H - 1, columns 0 and W - 1, corners
// (0, 0), (0, W - 1), (H - 1, 0), (H - 1, W - 1).
enum Border { kTop, kBottom, kLeft, kRight, kCorners, kBorders = kCorners + 4 };

// The padded grid: each image's rows of W + 1 pixels, a padding pixel first, then a
// padding row first; the padding after a row or an image is the next one's, and the last
// image's is past the end. A tap (dy, dx) is the flat shift (dy - 1) * (W + 1) + dx - 1.
struct Grid {
  int64_t n, h, w;
  int64_t stride() const { return w + 1; }
  int64_t plane() const { return (h + 1) * (w + 1); }
  int64_t pixels() const { return n * plane(); }
  int64_t shift(int64_t tap) const { return (tap / 3 - 1) * stride() + tap % 3 - 1; }

  // rows[i]: the NHWC row of grid pixel first + i in a tensor of c channels, or `zeros`
  // (c zeros) on the padding and outside the grid
  void rows(const uint16_t* base, int64_t c, int64_t first, int64_t count, const uint16_t* zeros,
            const uint16_t** rows) const {
    int64_t i = 0, q = first;
    for (; i < count && q < 0; ++i, ++q) rows[i] = zeros;
    // grid pixel q is (image, y, x), walked from here on
    int64_t image = q / plane(), y = q % plane() / stride(), x = q % stride();
    for (; i < count; ++i, ++q) {
      const bool inside = q < pixels() && y > 0 && x > 0;
      rows[i] = inside ? base + ((image * h + y - 1) * w + x - 1) * c : zeros;
      if (++x == stride()) {
        x = 0;
        if (++y == h + 1) y = 0, ++image;
      }
    }
  }

  // Adds the rows of the image-border pixels among grid pixels [first, first + count)
  // (rows[i] is pixel first + i's, first >= 0) to border[kBorders][c].
  FASTCIFAR_AVX512 void add_border(const uint16_t* const* rows, int64_t c, int64_t first,
                                   int64_t count, float* border) const {
    int64_t y = first % plane() / stride(), x = first % stride();
    for (int64_t i = 0, q = first; i < count && q < pixels(); ++i, ++q) {
      const bool top = y == 1, bottom = y == h, left = x == 1, right = x == w;
      if (y > 0 && x > 0 && (top || bottom || left || right)) {
        // a one-row image's row is both its top and bottom, and likewise for a column
        int which[8], n = 0;
        const bool edge_row[2] = {top, bottom}, edge_column[2] = {left, right};
        for (int r = 0; r < 2; ++r) {
          if (edge_row[r]) which[n++] = r ? kBottom : kTop;
          if (edge_column[r]) which[n++] = r ? kRight : kLeft;
          for (int k = 0; k < 2; ++k) {
            if (edge_row[r] && edge_column[k]) which[n++] = kCorners + 2 * r + k;
          }
        }
        for (int64_t ch = 0; ch < c; ch += 16) {
          const __m512 v = load16(rows[i] + ch, 0xFFFF);
          for (int k = 0; k < n; ++k) {
            float* sum = border + which[k] * c + ch;
            _mm512_storeu_ps(sum, _mm512_add_ps(_mm512_loadu_ps(sum), v));
          }
        }
      }
      if (++x == stride()) {
        x = 0;
        if (++y == h + 1) y = 0;
      }
    }
  }
};

// The output gradient's sums over each tap's window, out[c][i][j]: over the output
// pixels whose tap (i, j) reads an input pixel inside the image, (y + i - 1, x + j - 1).
// Only the border differs from the sum over all pixels (the bias gradient): a tap in the
// kernel's row 0 misses output row 0, one in row 2 the last row, and likewise for the
// columns, so each window is the total less a border row and a border column, plus the
// corner both took away. border[kBorders][c] holds the border's sums.
void tap_windows(const float* total, const float* border, int64_t c, float* out) {
  for (int64_t ch = 0; ch < c; ++ch) {
    for (int i = 0; i < 3; ++i) {
      for (int j = 0; j < 3; ++j) {
        float sum = total[ch];
        if (i != 1) sum -= border[(i == 0 ? kTop : kBottom) * c + ch];
        if (j != 1) sum -= border[(j == 0 ? kLeft : kRight) * c + ch];
        if (i != 1 && j != 1) sum += border[(kCorners + i / 2 * 2 + j / 2) * c + ch];
        out[(ch * 3 + i) * 3 + j] = sum;
      }
    }
  }
}

// 16 channels of two pixels' rows, interleaved: dword c holds (a[c], b[c]).
FASTCIFAR_AVX512 inline __m512i interleave_rows(const uint16_t* a, const uint16_t* b) {
  const __m512i order = _mm512_set_epi16(
      31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
      23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m256i lo = _mm256_loadu_si256((const __m256i*)a);
  const __m256i hi = _mm256_loadu_si256((const __m256i*)b);
  return _mm512_permutexvar_epi16(order, _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1));
}

// r[i] holds row i of a 16 x 16 matrix of dwords; afterwards r[i] holds column i.
FASTCIFAR_AVX512 inline void transpose16x16(__m512i* r) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // each 128-bit lane l of r[i] now holds column (i % 4) + 4 * ... of rows 4 * (i / 4)..:
  // gather lanes across registers
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xDD);
    t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xDD);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xDD);
    r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xDD);
  }
}

// The channels of x (here the output gradient) as rows of `span` grid pixels from
// `first` (zeros on the padding), paired as AMX's left tiles take them: pixel i of the
// first half beside pixel i of the second, out[channel * span + 2 * i + h] =
// x[first + h * span / 2 + i][channel]; span is a multiple of 32.
FASTCIFAR_AVX512 void pack_transposed(const uint16_t* x, const Grid& g, int64_t c, int64_t first,
                                      int64_t span, const uint16_t* zeros, const uint16_t** rows,
                                      uint16_t* out) {
  g.rows(x, c, first, span, zeros, rows);
  const int64_t half = span / 2;
  __m512i r[16];
  for (int64_t i0 = 0; i0 < half; i0 += 16) {
    for (int64_t cb = 0; cb < c; cb += 16) {
      for (int j = 0; j < 16; ++j) r[j] = interleave_rows(rows[i0 + j] + cb, rows[half + i0 + j] + cb);
      transpose16x16(r);
      for (int ch = 0; ch < 16; ++ch) _mm512_storeu_si512(out + (cb + ch) * span + 2 * i0, r[ch]);
    }
  }
}

// Pairs of pixels `half` apart as right tiles (rows[i] is pixel first + i's row):
// out[c / 16][j][16][2] holds (x[first + j][c], x[first + half + j][c]) for j < pairs; c is
// a multiple of 32.
FASTCIFAR_AVX512 void pack_pairs(const uint16_t* const* rows, int64_t c, int64_t half,
                                 int64_t pairs, uint16_t* out) {
  // word 2k of the result is a's word k, word 2k + 1 b's (index 32 + k): channels 0-15,
  // and with 16 added, channels 16-31
  const __m512i low = _mm512_set_epi16(
      47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
      39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i high = _mm512_add_epi16(low, _mm512_set1_epi16(16));
  for (int64_t t = 0; t < c / 16; t += 2, out += 2 * pairs * 32) {
    for (int64_t j = 0; j < pairs; ++j) {
      const __m512i a = _mm512_loadu_si512(rows[j] + t * 16);
      const __m512i b = _mm512_loadu_si512(rows[half + j] + t * 16);
      _mm512_storeu_si512(out + j * 32, _mm512_permutex2var_epi16(a, low, b));
      _mm512_storeu_si512(out + (pairs + j) * 32, _mm512_permutex2var_epi16(a, high, b));
    }
  }
}

// Adds the sum of each of c rows of n bf16 values (n a multiple of 32) to sums: dot
// products of pairs with (1, 1), summed in floats.
FASTCIFAR_AVX512_BF16 void add_row_sums(const uint16_t* rows, int64_t c, int64_t n, float* sums) {
  const __m512bh ones = (__m512bh)_mm512_set1_epi16(0x3F80);
  for (int64_t r = 0; r < c; ++r, rows += n) {
    __m512 s = _mm512_setzero_ps();
    for (int64_t k = 0; k < n; k += 32)
      s = _mm512_dpbf16_ps(s, (__m512bh)_mm512_loadu_si512(rows + k), ones);
    sums[r] += _mm512_reduce_add_ps(s);
  }
}

int64_t margin_of(const Grid& g) { return g.stride() + 1; }  // the largest shift, W + 2
// the pairs of x a block needs: its half-block's pixels and a margin either side
int64_t pairs_of(const Grid& g) { return kBlock / 2 + 2 * margin_of(g); }

// One thread's buffers: the packed blocks (64-byte aligned), the row pointers, and its
// float tiles acc[tap][co / 16][ci / 16] (16 x 16, output channels down, input channels
// across) and bias sums.
struct Scratch {
  uint16_t* gt;    // g transposed, [co][kBlock]
  uint16_t* pairs;  // x's pairs from pixel q0 - margin and q0 + kBlock / 2 - margin on
  const uint16_t** rows;
  const uint16_t* zeros;  // a padding pixel's row, max(ci, co) zeros
  float* acc;  // not zeroed: the tiles start from zero at the thread's first block
  float* bias;
  float* border;  // the border's sums [kBorders][co], or nullptr for none
};

// One thread's blocks [first, last), summed into its scratch's tiles, which hold earlier
// sums or, if `fresh`, nothing yet (the first block's products are stored, not added).
FASTCIFAR_AMX void weight_grad_blocks(const uint16_t* x, const uint16_t* grad, const Grid& g,
                                      int64_t ci, int64_t co, int64_t first, int64_t last,
                                      bool fresh, const Scratch& s) {
  const int64_t margin = margin_of(g), pairs = pairs_of(g), ci_tiles = ci / 16,
                co_tiles = co / 16;
  TileConfig config;
  for (int t = 0; t < 8; ++t) config.bytes_per_row[t] = 64, config.rows[t] = 16;
  _tile_loadconfig(&config);
  for (int64_t block = first; block < last; ++block) {
    const int64_t q0 = block * kBlock;
    const bool zero = fresh && block == first;
    pack_transposed(grad, g, co, q0, kBlock, s.zeros, s.rows, s.gt);
    add_row_sums(s.gt, co, kBlock, s.bias);
    if (s.border) g.add_border(s.rows, co, q0, kBlock, s.border);
    g.rows(x, ci, q0 - margin, kBlock / 2 + pairs, s.zeros, s.rows);
    pack_pairs(s.rows, ci, kBlock / 2, pairs, s.pairs);
    // two tiles of output channels (g's rows) and two of input channels (x's pairs)
    for (int64_t o = 0; o < co_tiles; o += 2) {
      for (int64_t i = 0; i < ci_tiles; i += 2) {
        for (int64_t tap = 0; tap < 9; ++tap) {
          // the pair of x[q0 + j + shift] and x[q0 + kBlock / 2 + j + shift] is pair
          // margin + shift + j of the block's packing
          const uint16_t* b = s.pairs + (i * pairs + margin + g.shift(tap)) * 32;
          float* c00 = s.acc + ((tap * co_tiles + o) * ci_tiles + i) * 256;
          float* c01 = c00 + 256;
          float* c10 = c00 + ci_tiles * 256;
          float* c11 = c10 + 256;
          if (zero) {
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
          } else {
            _tile_loadd(0, c00, 64);
            _tile_loadd(1, c01, 64);
            _tile_loadd(2, c10, 64);
            _tile_loadd(3, c11, 64);
          }
          const uint16_t* a = s.gt + o * 16 * kBlock;
          for (int64_t k = 0; k < kBlock; k += 32) {
            _tile_loadd(4, a + k, kBlock * 2);
            _tile_loadd(5, a + 16 * kBlock + k, kBlock * 2);
            _tile_loadd(6, b + k * 16, 64);
            _tile_loadd(7, b + pairs * 32 + k * 16, 64);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
          }
          _tile_stored(0, c00, 64);
          _tile_stored(1, c01, 64);
          _tile_stored(2, c10, 64);
          _tile_stored(3, c11, 64);
        }
      }
    }
  }
  _tile_release();
}

// Rows [begin, end) of out[co][tap][ci] (a (co, ci, 3, 3) weight laid out channels-last):
// the tiles acc[tap][co / 16][ci / 16] of the threads that ran (`ran`) added up.
FASTCIFAR_AVX512 void sum_partials(const float* acc, const std::vector<uint8_t>& ran,
                                   int64_t co, int64_t ci, int64_t begin, int64_t end,
                                   float* out) {
  for (int64_t row = begin; row < end; ++row) {
    const int64_t o = row / 9, tap = row % 9;
    for (int64_t i = 0; i < ci; i += 16) {
      const float* tile =
          acc + ((tap * (co / 16) + o / 16) * (ci / 16) + i / 16) * 256 + (o % 16) * 16;
      __m512 s = _mm512_setzero_ps();
      for (size_t t = 0; t < ran.size(); ++t)
        if (ran[t]) s = _mm512_add_ps(s, _mm512_loadu_ps(tile + t * 9 * ci * co));
      _mm512_storeu_ps(out + row * ci + i, s);
    }
  }
}

std::vector<at::Tensor> conv3x3_weight_grad(const at::Tensor& grad, const at::Tensor& x,
                                            bool windows) {
  TORCH_CHECK(amx_usable(), "conv3x3_weight_grad needs a CPU with AMX-BF16");
  for (const auto* t : {&grad, &x}) {
    TORCH_CHECK(t->device().is_cpu() && t->dim() == 4 && t->scalar_type() == at::kBFloat16 &&
                    t->is_contiguous(at::MemoryFormat::ChannelsLast),
                "conv3x3_weight_grad takes 4-D channels-last bf16 CPU tensors");
    TORCH_CHECK(t->size(1) % kPair == 0, "conv3x3_weight_grad needs channels in multiples of ",
                kPair, ", not ", t->size(1));
  }
  TORCH_CHECK(grad.size(0) == x.size(0) && grad.size(2) == x.size(2) && grad.size(3) == x.size(3),
              "conv3x3_weight_grad: the gradient's batch and size must match the input's");
  const int64_t ci = x.size(1), co = grad.size(1);
  const Grid g{x.size(0), x.size(2), x.size(3)};
  const int64_t blocks = (g.pixels() + kBlock - 1) / kBlock, tile_floats = 9 * ci * co;
  const int64_t pairs = pairs_of(g), rows_per_thread = kBlock / 2 + pairs;
  const int threads = at::get_num_threads();
  // every thread's buffers allocated here, on the calling thread, so that they come from
  // its heap call after call (a worker thread's allocations go to heaps of their own)
  auto gt = at::empty({threads * co * kBlock}, at::kShort);
  auto packed_pairs = at::empty({threads * ci * pairs * 2}, at::kShort);
  auto acc = at::empty({threads * tile_floats}, at::kFloat);
  auto bias = at::zeros({threads, co}, at::kFloat);
  auto border = at::zeros({windows ? threads : 0, kBorders, co}, at::kFloat);
  auto zeros = at::zeros({std::max(ci, co)}, at::kShort);
  std::vector<const uint16_t*> rows(threads * rows_per_thread);
  std::vector<uint8_t> ran(threads, 0);  // whose tiles hold sums
  const auto* xp = reinterpret_cast<const uint16_t*>(x.const_data_ptr<at::BFloat16>());
  const auto* gp = reinterpret_cast<const uint16_t*>(grad.const_data_ptr<at::BFloat16>());
  auto part = [threads](at::Tensor& buffer, int t) {
    return reinterpret_cast<uint16_t*>(buffer.mutable_data_ptr<int16_t>()) +
           t * buffer.numel() / threads;
  };
  at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
    const int t = at::get_thread_num();
    const Scratch scratch{part(gt, t), part(packed_pairs, t),
                          rows.data() + t * rows_per_thread,
                          reinterpret_cast<const uint16_t*>(zeros.const_data_ptr<int16_t>()),
                          acc.mutable_data_ptr<float>() + t * tile_floats,
                          bias.mutable_data_ptr<float>() + t * co,
                          windows ? border.mutable_data_ptr<float>() + t * kBorders * co
                                  : nullptr};
    weight_grad_blocks(xp, gp, g, ci, co, first, last, !ran[t], scratch);
    ran[t] = 1;
  });
  // acc[tap][co / 16][ci / 16][16][16] summed over threads into the weight's gradient,
  // (co, ci, 3, 3) laid out channels-last as a convolution's weight: [co][tap][ci]
  auto weight = at::empty({co, ci, 3, 3}, x.options().dtype(at::kFloat).memory_format(
                                                at::MemoryFormat::ChannelsLast));
  float* out = weight.mutable_data_ptr<float>();
  at::parallel_for(0, 9 * co, 16, [&](int64_t begin, int64_t end) {
    sum_partials(acc.const_data_ptr<float>(), ran, co, ci, begin, end, out);
  });
  auto db = bias.sum(0);
  if (!windows) return {weight, db};
  auto border_sums = border.sum(0);
  auto taps = at::empty({co, 3, 3}, db.options());
  tap_windows(db.const_data_ptr<float>(), border_sums.const_data_ptr<float>(), co,
              taps.mutable_data_ptr<float>());
  return {weight, db, taps};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcifar, CPU, m) { m.impl("conv3x3_weight_grad", &conv3x3_weight_grad); }
// no tensor argument to dispatch on: the same kernel for every dispatch key
TORCH_LIBRARY_IMPL(fastcifar, CompositeExplicitAutograd, m) {
  m.impl("amx_tiles_usable", [] { return amx_usable(); });
}

}  // namespace fastcifar
