// fastcifar::conv3x3_narrow_weight_grad: the weight and bias gradients of a 3x3, stride-1,
// padding-1 convolution whose input has few channels (a network's first layer, RGB in),
// for fp32 channels-last tensors on a CPU with AVX2 and FMA. oneDNN's backward-weights
// runs such a layer at a fifth of the fp32 matmul rate: its products are long sums (one
// term a pixel) into a small (C_out x 27) result. Here each output pixel's gradient
// vector is multiplied by the input values under each tap and summed in registers, 8
// output channels a vector: per chunk of image rows (its gradient rows kept in the L2
// cache, its input rows under each tap row copied once into zero-padded lines), per
// group of 16 output channels, per two tap rows (an input channel under a kernel row),
// their six taps in 12 accumulators over the chunk's pixels.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "cpu_features.h"

namespace fastcifar {
namespace {

constexpr int64_t kChunkRows = 16;  // image rows a chunk: 16 rows of 32 pixels at 64 channels, 128 KiB

struct Sizes {
  int64_t h, w, c_in, c_out;
};

// A tap row: input channel ci under kernel row kh.
struct TapRow {
  int64_t ci;
  int kh;
};

// Copies the input rows under each tap row, for image rows [begin, end) (rows counted
// over the batch), into `padded`: tap row t's line for row r at (t (end - begin) + r)(w +
// 2), w + 2 floats, zero at both ends and where the tap row lies in the padding, so that
// the three taps of a tap row read it without branches.
FASTCIFAR_AVX2 void pad_rows(const float* x, const Sizes& s, int64_t begin, int64_t end,
                             const std::vector<TapRow>& taps, float* padded) {
  const int64_t stride = s.w + 2, rows = end - begin;
  for (size_t t = 0; t < taps.size(); ++t)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t image = (begin + r) / s.h, y = (begin + r) % s.h;
      float* line = padded + (static_cast<int64_t>(t) * rows + r) * stride;
      const int64_t source = y + taps[t].kh - 1;
      line[0] = line[s.w + 1] = 0.0f;
      if (source < 0 || source >= s.h) {
        std::fill(line + 1, line + 1 + s.w, 0.0f);
        continue;
      }
      const float* in = x + (image * s.h + source) * s.w * s.c_in + taps[t].ci;
      for (int64_t col = 0; col < s.w; ++col) line[col + 1] = in[col * s.c_in];
    }
}

// Adds to sums[(ci * 9 + 3 kh + kw) * c_out + co ...] the gradient's channels [co, co + 8
// NV) times the input under tap (kh, kw), for B tap rows at once (`lines`: their padded
// lines, as pad_rows lays them out) and every pixel of image rows [begin, end), begin <
// end: 6 B accumulators, 12 for B = 2, enough independent sums to keep both FMA pipes
// busy. The products run in loops that hold the accumulators in registers (no call
// inside, and loops that run at least once, else GCC keeps them in memory).
template <int NV, int B>
FASTCIFAR_AVX2 void tap_rows(const float* grad, const Sizes& s, int64_t begin, int64_t end,
                             const TapRow* taps, const float* lines, int64_t co, float* sums) {
  const int64_t stride = s.w + 2, rows = end - begin;
  __m256 acc[B][3][NV];
  for (int b = 0; b < B; ++b)
    for (int k = 0; k < 3; ++k)
      for (int v = 0; v < NV; ++v) acc[b][k][v] = _mm256_setzero_ps();
  // one loop over the rows' pixels (the gradient's rows lie one after another)
  const float* g = grad + begin * s.w * s.c_out + co;
  const float* at = lines;  // the pixel's left tap in its first tap row
  int64_t col = 0, left = rows * s.w;
  do {
    __m256 gv[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) gv[v] = _mm256_loadu_ps(g + 8 * v);
#pragma GCC unroll 2
    for (int b = 0; b < B; ++b)
#pragma GCC unroll 3
      for (int k = 0; k < 3; ++k) {
        const __m256 value = _mm256_broadcast_ss(at + b * rows * stride + k);
#pragma GCC unroll 2
        for (int v = 0; v < NV; ++v) acc[b][k][v] = _mm256_fmadd_ps(value, gv[v], acc[b][k][v]);
      }
    g += s.c_out;
    ++at;
    if (++col == s.w) {  // the next image row's lines
      col = 0;
      at += stride - s.w;
    }
  } while (--left > 0);
  for (int b = 0; b < B; ++b)
    for (int k = 0; k < 3; ++k) {
      float* out = sums + (taps[b].ci * 9 + 3 * taps[b].kh + k) * s.c_out + co;
      for (int v = 0; v < NV; ++v)
        _mm256_storeu_ps(out + 8 * v, _mm256_add_ps(_mm256_loadu_ps(out + 8 * v), acc[b][k][v]));
    }
}

// tap_rows for B tap rows at once and output channels [co, co + 16), or [co, co + 8)
// where only 8 are left.
template <int B>
FASTCIFAR_AVX2 void tap_rows_at(const float* grad, const Sizes& s, int64_t begin, int64_t end,
                                const TapRow* taps, const float* lines, int64_t co,
                                float* sums) {
  if (co + 16 <= s.c_out) tap_rows<2, B>(grad, s, begin, end, taps, lines, co, sums);
  else tap_rows<1, B>(grad, s, begin, end, taps, lines, co, sums);
}

// Adds the gradient's channels [co, co + 8 NV) over image rows [begin, end) to bias[co ...].
template <int NV>
FASTCIFAR_AVX2 void bias_rows(const float* grad, const Sizes& s, int64_t begin, int64_t end,
                              int64_t co, float* bias) {
  __m256 acc[NV];
  for (int v = 0; v < NV; ++v) acc[v] = _mm256_setzero_ps();
  for (int64_t p = begin * s.w; p < end * s.w; ++p)
    for (int v = 0; v < NV; ++v)
      acc[v] = _mm256_add_ps(acc[v], _mm256_loadu_ps(grad + p * s.c_out + co + 8 * v));
  for (int v = 0; v < NV; ++v)
    _mm256_storeu_ps(bias + co + 8 * v, _mm256_add_ps(_mm256_loadu_ps(bias + co + 8 * v), acc[v]));
}

// One chunk of rows into a thread's sums (c_in * 9 + 1 rows of c_out: the taps, then the
// bias): the input rows padded once, then the tap rows two at a time for each group of
// output channels.
FASTCIFAR_AVX2 void chunk_sums(const float* x, const float* grad, const Sizes& s, int64_t begin,
                               int64_t end, const std::vector<TapRow>& taps, float* sums,
                               float* padded) {
  pad_rows(x, s, begin, end, taps, padded);
  const int64_t count = static_cast<int64_t>(taps.size()), tap_lines = (end - begin) * (s.w + 2);
  for (int64_t co = 0; co < s.c_out; co += 16) {
    int64_t t = 0;
    for (; t + 2 <= count; t += 2)
      tap_rows_at<2>(grad, s, begin, end, &taps[t], padded + t * tap_lines, co, sums);
    if (t < count) tap_rows_at<1>(grad, s, begin, end, &taps[t], padded + t * tap_lines, co, sums);
    float* bias = sums + s.c_in * 9 * s.c_out;
    if (co + 16 <= s.c_out) bias_rows<2>(grad, s, begin, end, co, bias);
    else bias_rows<1>(grad, s, begin, end, co, bias);
  }
}

std::tuple<at::Tensor, at::Tensor> conv3x3_narrow_weight_grad(const at::Tensor& grad,
                                                              const at::Tensor& x) {
  TORCH_CHECK(has_avx2_fma(), "conv3x3_narrow_weight_grad needs a CPU with AVX2 and FMA");
  for (const at::Tensor* t : {&grad, &x})
    TORCH_CHECK(t->device().is_cpu() && t->dim() == 4 && t->scalar_type() == at::kFloat &&
                    t->is_contiguous(at::MemoryFormat::ChannelsLast),
                "conv3x3_narrow_weight_grad takes 4-D float channels-last tensors on the CPU");
  const int64_t n = x.size(0), c_in = x.size(1), h = x.size(2), w = x.size(3), c_out = grad.size(1);
  TORCH_CHECK(grad.size(0) == n && grad.size(2) == h && grad.size(3) == w,
              "conv3x3_narrow_weight_grad: the gradient's batch and size must be the input's");
  TORCH_CHECK(c_out % 8 == 0, "conv3x3_narrow_weight_grad needs output channels in multiples of 8, not ",
              c_out);
  const Sizes s{h, w, c_in, c_out};
  if (x.numel() == 0)  // no pixels (or no input channels): nothing to sum
    return {at::zeros({c_out, c_in, 3, 3}, x.options().memory_format(at::MemoryFormat::Contiguous)),
            at::zeros({c_out}, x.options())};
  const int64_t rows = n * h, chunks = (rows + kChunkRows - 1) / kChunkRows;
  const int64_t threads = at::get_num_threads(), per_thread = (c_in * 9 + 1) * c_out;
  auto sums = at::zeros({threads, per_thread}, x.options().memory_format(at::MemoryFormat::Contiguous));
  const float* in = x.const_data_ptr<float>();
  const float* g = grad.const_data_ptr<float>();
  float* all = sums.mutable_data_ptr<float>();
  std::vector<TapRow> taps;  // every input channel under every kernel row
  for (int64_t ci = 0; ci < c_in; ++ci)
    for (int kh = 0; kh < 3; ++kh) taps.push_back({ci, kh});
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    const int64_t thread = at::get_thread_num();
    TORCH_INTERNAL_ASSERT(thread < threads, "conv3x3_narrow_weight_grad: thread ", thread);
    std::vector<float> padded(taps.size() * kChunkRows * (w + 2));
    for (int64_t chunk = first; chunk < last; ++chunk)
      chunk_sums(in, g, s, chunk * kChunkRows, std::min(rows, (chunk + 1) * kChunkRows), taps,
                 all + thread * per_thread, padded.data());
  });
  const at::Tensor total = sums.sum(0);
  // (c_in, 3, 3, c_out) -> (c_out, c_in, 3, 3)
  at::Tensor weight = total.narrow(0, 0, c_in * 9 * c_out).view({c_in, 3, 3, c_out}).permute({3, 0, 1, 2});
  return {weight.contiguous(), total.narrow(0, c_in * 9 * c_out, c_out).clone()};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcifar, CPU, m) {
  m.impl("conv3x3_narrow_weight_grad", &conv3x3_narrow_weight_grad);
}

}  // namespace fastcifar
