// The sums of a 3x3, stride-1, padding-1 convolution's output gradient over each tap's
// window: out[c][i][j] sums grad[n][c][y][x] over the output pixels whose tap (i, j)
// reads an input pixel inside the image, (y + i - 1, x + j - 1). Summed with the
// convolution's weights they give the sum of its input's gradient per channel
// (fastcifar.ops.relu_bn_conv), without reading that gradient. Only the border differs
// from the sum over every pixel (`total`, the bias gradient): a tap in row 0 of the
// kernel misses output row 0, one in row 2 the last row, and likewise for the columns,
// so each window is the total less a border row and a border column, plus the corner
// both took away. Channels-last float or bf16, channels in multiples of 16.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "avx512.h"

namespace fastcifar {
namespace {

// The border's sums, in this order, each c floats: rows 0 and H - 1, columns 0 and
// W - 1, corners (0, 0), (0, W - 1), (H - 1, 0), (H - 1, W - 1).
enum Border { kTop, kBottom, kLeft, kRight, kCorners, kBorders = kCorners + 4 };

// Adds the sums over `count` pixels `stride` elements apart, from `first`, to sum[c].
template <typename T>
FASTCIFAR_AVX512 void add_line(const T* first, int64_t count, int64_t stride, int64_t c,
                               float* sum) {
  for (int64_t ch = 0; ch < c; ch += 16) {
    __m512 acc = _mm512_loadu_ps(sum + ch);
    for (int64_t k = 0; k < count; ++k) acc = _mm512_add_ps(acc, load16(first + k * stride + ch, 0xFFFF));
    _mm512_storeu_ps(sum + ch, acc);
  }
}

// Adds images [begin, end)'s border sums to sums[kBorders][c].
template <typename T>
void border_sums(const T* g, int64_t c, int64_t h, int64_t w, int64_t begin, int64_t end,
                 float* sums) {
  for (int64_t n = begin; n < end; ++n) {
    const T* image = g + n * h * w * c;
    const T* last_row = image + (h - 1) * w * c;
    add_line(image, w, c, c, sums + kTop * c);
    add_line(last_row, w, c, c, sums + kBottom * c);
    add_line(image, h, w * c, c, sums + kLeft * c);
    add_line(image + (w - 1) * c, h, w * c, c, sums + kRight * c);
    add_line(image, 1, 0, c, sums + kCorners * c);
    add_line(image + (w - 1) * c, 1, 0, c, sums + (kCorners + 1) * c);
    add_line(last_row, 1, 0, c, sums + (kCorners + 2) * c);
    add_line(last_row + (w - 1) * c, 1, 0, c, sums + (kCorners + 3) * c);
  }
}

at::Tensor conv3x3_tap_sums(const at::Tensor& grad, const at::Tensor& total) {
  TORCH_CHECK(has_avx512(), "conv3x3_tap_sums needs a CPU with AVX-512");
  TORCH_CHECK(grad.device().is_cpu() && grad.dim() == 4 &&
                  grad.is_contiguous(at::MemoryFormat::ChannelsLast) &&
                  (grad.scalar_type() == at::kBFloat16 || grad.scalar_type() == at::kFloat),
              "conv3x3_tap_sums takes a 4-D channels-last bf16 or float CPU tensor");
  const int64_t n = grad.size(0), c = grad.size(1), h = grad.size(2), w = grad.size(3);
  TORCH_CHECK(c % 16 == 0, "conv3x3_tap_sums needs channels in multiples of 16, not ", c);
  TORCH_CHECK(total.dim() == 1 && total.size(0) == c,
              "conv3x3_tap_sums: total must hold one value per channel (", c, ")");
  // images in fixed chunks, their sums added in chunk order: the same result for any
  // number of threads
  const int64_t chunk = 16, chunks = (n + chunk - 1) / chunk;
  std::vector<float> partial(chunks * kBorders * c, 0.0f);
  AT_DISPATCH_SWITCH(grad.scalar_type(), "conv3x3_tap_sums", FASTCIFAR_FLOAT_AND_BF16([&] {
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
      for (int64_t k = first; k < last; ++k) {
        border_sums<scalar_t>(g, c, h, w, k * chunk, std::min(n, (k + 1) * chunk),
                              partial.data() + k * kBorders * c);
      }
    });
  }));
  std::vector<float> border(kBorders * c, 0.0f);
  for (int64_t k = 0; k < chunks; ++k) {
    for (int64_t i = 0; i < kBorders * c; ++i) border[i] += partial[k * kBorders * c + i];
  }
  auto t = total.to(at::kFloat).contiguous();
  const float* all = t.const_data_ptr<float>();
  auto out = at::empty({c, 3, 3}, grad.options().dtype(at::kFloat));
  float* o = out.mutable_data_ptr<float>();
  for (int64_t ch = 0; ch < c; ++ch) {
    for (int i = 0; i < 3; ++i) {
      for (int j = 0; j < 3; ++j) {
        // the row and column the tap misses (none for the middle row or column), and
        // the corner where they meet
        float sum = all[ch];
        if (i != 1) sum -= border[(i == 0 ? kTop : kBottom) * c + ch];
        if (j != 1) sum -= border[(j == 0 ? kLeft : kRight) * c + ch];
        if (i != 1 && j != 1) sum += border[(kCorners + (i / 2) * 2 + j / 2) * c + ch];
        o[(ch * 3 + i) * 3 + j] = sum;
      }
    }
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcifar, CPU, m) { m.impl("conv3x3_tap_sums", &conv3x3_tap_sums); }

}  // namespace fastcifar
