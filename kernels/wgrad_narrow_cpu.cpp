// fastcifar::conv3x3_narrow_weight_grad: the weight and bias gradients of a 3x3, stride-1,
// padding-1 convolution whose input has few channels (a network's first layer, RGB in),
// for fp32 channels-last tensors on a CPU with AVX2 and FMA. oneDNN's backward-weights
// runs such a layer at a fifth of the fp32 matmul rate: its products are long sums (one
// term a pixel) into a small (C_out x 27) result. Here each output pixel's gradient
// vector is multiplied by the input values under each tap and summed in registers, 8
// output channels a vector: per chunk of image rows (its gradient rows kept in the L2
// cache), per group of 16 output channels, per input channel and tap row, the three taps
// of a row in 6 accumulators over the chunk's pixels.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "cpu_features.h"

namespace fastcifar {
namespace {

constexpr int64_t kChunkRows = 16;  // image rows a chunk: 16 rows of 32 pixels at 64 channels, 128 KiB

struct Sizes {
  int64_t h, w, c_in, c_out;
};

// Adds to sums[(ci * 9 + 3 kh + kw) * c_out + co ...] the gradient's channels [co, co + 8
// NV) times the input under tap (kh, kw), for input channel ci, tap row kh and every
// pixel of image rows [begin, end) (rows counted over the batch).
template <int NV>
FASTCIFAR_AVX2 void tap_row(const float* x, const float* grad, const Sizes& s, int64_t begin,
                            int64_t end, int64_t ci, int kh, int64_t co, float* sums) {
  __m256 acc[3][NV];
  for (int k = 0; k < 3; ++k)
    for (int v = 0; v < NV; ++v) acc[k][v] = _mm256_setzero_ps();
  for (int64_t row = begin; row < end; ++row) {
    const int64_t image = row / s.h, y = row % s.h, source = y + kh - 1;
    if (source < 0 || source >= s.h) continue;  // the tap row lies in the padding
    const float* in = x + (image * s.h + source) * s.w * s.c_in + ci;
    const float* g = grad + row * s.w * s.c_out + co;
    for (int64_t col = 0; col < s.w; ++col, g += s.c_out) {
      __m256 gv[NV];
      for (int v = 0; v < NV; ++v) gv[v] = _mm256_loadu_ps(g + 8 * v);
      if (col > 0) {
        const __m256 left = _mm256_broadcast_ss(in + (col - 1) * s.c_in);
        for (int v = 0; v < NV; ++v) acc[0][v] = _mm256_fmadd_ps(left, gv[v], acc[0][v]);
      }
      const __m256 middle = _mm256_broadcast_ss(in + col * s.c_in);
      for (int v = 0; v < NV; ++v) acc[1][v] = _mm256_fmadd_ps(middle, gv[v], acc[1][v]);
      if (col + 1 < s.w) {
        const __m256 right = _mm256_broadcast_ss(in + (col + 1) * s.c_in);
        for (int v = 0; v < NV; ++v) acc[2][v] = _mm256_fmadd_ps(right, gv[v], acc[2][v]);
      }
    }
  }
  for (int k = 0; k < 3; ++k) {
    float* out = sums + (ci * 9 + 3 * kh + k) * s.c_out + co;
    for (int v = 0; v < NV; ++v)
      _mm256_storeu_ps(out + 8 * v, _mm256_add_ps(_mm256_loadu_ps(out + 8 * v), acc[k][v]));
  }
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

// One chunk of rows into a thread's sums (c_in * 9 + 1 rows of c_out: the taps, then the bias)
FASTCIFAR_AVX2 void chunk_sums(const float* x, const float* grad, const Sizes& s, int64_t begin,
                               int64_t end, float* sums) {
  for (int64_t co = 0; co < s.c_out; co += 16) {
    const bool pair = co + 16 <= s.c_out;
    for (int64_t ci = 0; ci < s.c_in; ++ci)
      for (int kh = 0; kh < 3; ++kh) {
        if (pair) tap_row<2>(x, grad, s, begin, end, ci, kh, co, sums);
        else tap_row<1>(x, grad, s, begin, end, ci, kh, co, sums);
      }
    float* bias = sums + s.c_in * 9 * s.c_out;
    if (pair) bias_rows<2>(grad, s, begin, end, co, bias);
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
  const int64_t rows = n * h, chunks = (rows + kChunkRows - 1) / kChunkRows;
  const int64_t threads = at::get_num_threads(), per_thread = (c_in * 9 + 1) * c_out;
  auto sums = at::zeros({threads, per_thread}, x.options().memory_format(at::MemoryFormat::Contiguous));
  const float* in = x.const_data_ptr<float>();
  const float* g = grad.const_data_ptr<float>();
  float* all = sums.mutable_data_ptr<float>();
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    const int64_t thread = at::get_thread_num();
    TORCH_INTERNAL_ASSERT(thread < threads, "conv3x3_narrow_weight_grad: thread ", thread);
    for (int64_t chunk = first; chunk < last; ++chunk)
      chunk_sums(in, g, s, chunk * kChunkRows, std::min(rows, (chunk + 1) * kChunkRows),
                 all + thread * per_thread);
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
