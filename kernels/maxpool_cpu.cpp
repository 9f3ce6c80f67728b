// CPU implementation of fastcifar::max_pool2x2 and its backward: 2x2 max pooling, stride
// 2, over channels-last activations, with the values and gradients of F.max_pool2d(x, 2)
// (each window's gradient to its first maximum in row-major order, as ATen's). ATen's
// channels-last kernel vectorises over channels and falls far behind when they are few
// (lenet's 6). Here, with AVX-512, the forward takes each window row pair's maxima over
// its whole width (16 lanes of one long row), then each pixel pair's, and keeps each
// window's winner as a byte; the backward writes all four window elements from it.
// Without AVX-512 they refuse to run, and fastcifar keeps ATen's pooling. Windows holding a NaN give NaN, but their gradient
// may go to another element than ATen's.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <cstring>
#include <torch/library.h>
#include <vector>

#include "avx512.h"

namespace fastcifar {
namespace {

// Window positions: 0 top left, 1 top right, 2 bottom left, 3 bottom right. Output rows
// `begin` to `end` (of all images' rows).
template <typename T>
FASTCIFAR_AVX512 void max_pool_rows(const T* in, T* out, uint8_t* where, int64_t h, int64_t w,
                                    int64_t c, int64_t begin, int64_t end) {
  const int64_t oh = h / 2, ow = w / 2, pair = 2 * ow * c;  // a row pair's cropped width
  std::vector<float> column(pair);   // each column's maximum of its two rows
  std::vector<uint8_t> lower(pair);  // 1 where the bottom row holds it
  const __m128i one = _mm_set1_epi8(1);
  for (int64_t row = begin; row < end; ++row) {
    const int64_t image = row / oh, y = row % oh;
    const T* top = in + ((image * h + 2 * y) * w) * c;
    const T* bottom = top + w * c;
    for (int64_t j = 0; j < pair; j += 16) {  // ties (and a NaN): the top element
      const __mmask16 m = lanes(pair - j);
      const __m512 a = load16(top + j, m), b = load16(bottom + j, m);
      const __mmask16 down = _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ);
      _mm512_mask_storeu_ps(column.data() + j, m, _mm512_mask_blend_ps(down, a, b));
      _mm_mask_storeu_epi8(lower.data() + j, m, _mm_maskz_mov_epi8(down, one));
    }
    T* o = out + row * ow * c;
    uint8_t* k = where + row * ow * c;
    for (int64_t x = 0; x < ow; ++x) {
      const float* left = column.data() + 2 * x * c;
      const uint8_t* left_low = lower.data() + 2 * x * c;
      for (int64_t ch = 0; ch < c; ch += 16) {
        const __mmask16 m = lanes(c - ch);
        const __m512 l = _mm512_maskz_loadu_ps(m, left + ch);
        const __m512 r = _mm512_maskz_loadu_ps(m, left + c + ch);
        const __m128i dl = _mm_maskz_loadu_epi8(m, left_low + ch);
        const __m128i dr = _mm_maskz_loadu_epi8(m, left_low + c + ch);
        const __mmask16 l_low = _mm_test_epi8_mask(dl, dl), r_low = _mm_test_epi8_mask(dr, dr);
        // On a tie the earlier of the two column winners in row-major order: the left one
        // if it is on top (position 0) or the right one is at the bottom (3).
        const __mmask16 take_left =
            _mm512_cmp_ps_mask(l, r, _CMP_GT_OQ) | _mm512_cmp_ps_mask(l, l, _CMP_UNORD_Q) |
            (_mm512_cmp_ps_mask(l, r, _CMP_EQ_OQ) & (r_low | (__mmask16)~l_low));
        store16(o + x * c + ch, m, _mm512_mask_blend_ps(take_left, r, l));
        const __m128i right_at = _mm_add_epi8(one, _mm_add_epi8(dr, dr));  // 1 or 3
        const __m128i left_at = _mm_add_epi8(dl, dl);                      // 0 or 2
        _mm_mask_storeu_epi8(k + x * c + ch, m, _mm_mask_blend_epi8(take_left, right_at, left_at));
      }
    }
  }
}

template <typename T>
FASTCIFAR_AVX512 void max_pool_backward_rows(const T* grad, const uint8_t* where, T* out,
                                             int64_t h, int64_t w, int64_t c, int64_t begin,
                                             int64_t end) {
  const int64_t oh = h / 2, ow = w / 2;
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t row = begin; row < end; ++row) {
    const int64_t image = row / oh, y = row % oh;
    T* top = out + ((image * h + 2 * y) * w) * c;
    T* bottom = top + w * c;
    const T* g = grad + row * ow * c;
    const uint8_t* k = where + row * ow * c;
    for (int64_t x = 0; x < ow; ++x) {  // every element of the window written once
      T* corner[4] = {top + 2 * x * c, top + (2 * x + 1) * c, bottom + 2 * x * c,
                      bottom + (2 * x + 1) * c};
      for (int64_t ch = 0; ch < c; ch += 16) {
        const __mmask16 m = lanes(c - ch);
        const __m512 v = load16(g + x * c + ch, m);
        const __m128i at = _mm_maskz_loadu_epi8(m, k + x * c + ch);
        for (int p = 0; p < 4; ++p) {
          const __mmask16 here = _mm_cmpeq_epi8_mask(at, _mm_set1_epi8(static_cast<char>(p)));
          store16(corner[p] + ch, m, _mm512_mask_blend_ps(here, zero, v));
        }
      }
    }
    // an odd width's last column, and after the last window row an odd height's last row
    if (w % 2) {
      std::memset(top + (w - 1) * c, 0, c * sizeof(T));
      std::memset(bottom + (w - 1) * c, 0, c * sizeof(T));
    }
    if (h % 2 && y == oh - 1) std::memset(bottom + w * c, 0, w * c * sizeof(T));
  }
}

void check_channels_last(const at::Tensor& x, const char* what) {
  TORCH_CHECK(has_avx512(), "max_pool2x2 needs a CPU with AVX-512 (F.max_pool2d serves the others)");
  TORCH_CHECK(x.device().is_cpu(), what, " must be on the CPU");
  TORCH_CHECK(x.dim() == 4, what, " must be 4-D (N, C, H, W), not ", x.dim(), "-D");
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast), what, " must be channels-last");
}

std::tuple<at::Tensor, at::Tensor> max_pool2x2_cpu(const at::Tensor& x) {
  check_channels_last(x, "max_pool2x2's input");
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  TORCH_CHECK(h >= 2 && w >= 2, "max_pool2x2 needs at least 2 x 2 pixels, not ", h, " x ", w);
  auto options = x.options().memory_format(at::MemoryFormat::ChannelsLast);
  auto out = at::empty({n, c, h / 2, w / 2}, options);
  auto where = at::empty({n, c, h / 2, w / 2}, options.dtype(at::kByte));
  AT_DISPATCH_SWITCH(x.scalar_type(), "max_pool2x2", FASTCIFAR_FLOAT_AND_BF16([&] {
    const scalar_t* in = x.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    uint8_t* k = where.mutable_data_ptr<uint8_t>();
    at::parallel_for(0, n * (h / 2), 1, [&](int64_t begin, int64_t end) {
      max_pool_rows<scalar_t>(in, o, k, h, w, c, begin, end);
    });
  }));
  return {out, where};
}

at::Tensor max_pool2x2_backward_cpu(const at::Tensor& grad, const at::Tensor& where,
                                    int64_t height, int64_t width) {
  check_channels_last(where, "max_pool2x2_backward's window positions");
  TORCH_CHECK(where.scalar_type() == at::kByte, "window positions must be uint8");
  TORCH_CHECK(height >= 2 && width >= 2, "max_pool2x2_backward needs at least 2 x 2 pixels");
  auto g = grad.contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(g.sizes() == where.sizes() && g.size(2) == height / 2 && g.size(3) == width / 2,
              "max_pool2x2_backward: gradient, window positions and input size do not match");
  const int64_t n = g.size(0), c = g.size(1);
  auto out = at::empty({n, c, height, width},
                       g.options().memory_format(at::MemoryFormat::ChannelsLast));
  AT_DISPATCH_SWITCH(g.scalar_type(), "max_pool2x2_backward", FASTCIFAR_FLOAT_AND_BF16([&] {
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const uint8_t* k = where.const_data_ptr<uint8_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n * (height / 2), 1, [&](int64_t begin, int64_t end) {
      max_pool_backward_rows<scalar_t>(gp, k, o, height, width, c, begin, end);
    });
  }));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcifar, CPU, m) {
  m.impl("max_pool2x2", &max_pool2x2_cpu);
  m.impl("max_pool2x2_backward", &max_pool2x2_backward_cpu);
}

}  // namespace fastcifar
