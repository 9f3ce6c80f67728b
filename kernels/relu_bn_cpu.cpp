// CPU kernels of a ReLU followed by training-mode BatchNorm over channels-last
// activations (fastcifar.ops.relu_bn holds the per-channel arithmetic between them). The
// ReLU is recomputed from the pre-activation x wherever it is needed, so a layer reads
// x twice and writes y once forward, and reads (grad, x) twice and writes the input's
// gradient once backward, where ATen's ReLU, BatchNorm and their backwards make separate
// passes of their own. Where a 2x2 max pool follows, the affine pass pools as it goes
// (writing a quarter of the pixels) and the backward takes the pooled gradient, so the
// full-size output and its gradient are never written. Channels come 16 at a time (a
// multiple of 16 is required).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <tuple>
#include <vector>

#include "avx512.h"

namespace fastcifar {
namespace {

constexpr int64_t kFlush = 64;  // pixels summed in floats before the doubles take them

void check_input(const at::Tensor& x, const char* what) {
  TORCH_CHECK(has_avx512(), "the ReLU-BatchNorm kernels need a CPU with AVX-512");
  TORCH_CHECK(x.device().is_cpu(), what, " must be on the CPU");
  TORCH_CHECK(x.dim() == 4, what, " must be 4-D (N, C, H, W), not ", x.dim(), "-D");
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast), what, " must be channels-last");
  TORCH_CHECK(x.size(1) % 16 == 0, what, " needs channels in multiples of 16, not ", x.size(1));
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat,
              what, " must be bf16 or float");
}

at::Tensor per_channel(const at::Tensor& v, int64_t c, const char* what) {
  TORCH_CHECK(v.dim() == 1 && v.size(0) == c, what, " must hold one value per channel (", c, ")");
  return v.to(at::kFloat).contiguous();
}

// Adds 16 float sums to 16 doubles.
FASTCIFAR_AVX512 inline void add_to_doubles(double* out, __m512 v) {
  _mm512_storeu_pd(out, _mm512_add_pd(_mm512_loadu_pd(out),
                                      _mm512_cvtps_pd(_mm512_castps512_ps256(v))));
  const __m256 high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
  _mm512_storeu_pd(out + 8, _mm512_add_pd(_mm512_loadu_pd(out + 8), _mm512_cvtps_pd(high)));
}

// The per-channel terms of the input gradient, x > 0 ? grad * scale + x * shift + offset
// : 0, for moments_rows to write as it sums (out == nullptr: none).
template <typename T>
struct InputGrad {
  const float *scale = nullptr, *shift = nullptr, *offset = nullptr;
  T* out = nullptr;
};

// Channels [first, first + 16 G) of moments_rows, the sums in registers.
template <typename T, int G>
FASTCIFAR_AVX512 void moments_channels(const T* x, const T* grad, int64_t c, int64_t first,
                                       int64_t begin, int64_t end, double* out,
                                       const InputGrad<T>& dx) {
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t start = begin; start < end; start += kFlush) {
    __m512 s[G], q[G];
    for (int j = 0; j < G; ++j) s[j] = q[j] = zero;
    const int64_t stop = std::min(end, start + kFlush);
    for (int64_t p = start; p < stop; ++p) {
      for (int j = 0; j < G; ++j) {
        const int64_t at = p * c + first + 16 * j;
        const __m512 v = load16(x + at, 0xFFFF);
        const __m512 h = _mm512_max_ps(v, zero);
        const __m512 a = grad ? load16(grad + at, 0xFFFF) : h;
        s[j] = _mm512_add_ps(s[j], a);
        q[j] = _mm512_fmadd_ps(a, h, q[j]);
        if (dx.out) {
          const int64_t ch = first + 16 * j;
          __m512 r = _mm512_fmadd_ps(v, _mm512_loadu_ps(dx.shift + ch), _mm512_loadu_ps(dx.offset + ch));
          r = _mm512_fmadd_ps(a, _mm512_loadu_ps(dx.scale + ch), r);
          store16_rounded(dx.out + at, 0xFFFF,
                          _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, zero, _CMP_GT_OQ), r));
        }
      }
    }
    for (int j = 0; j < G; ++j) {
      add_to_doubles(out + first + 16 * j, s[j]);
      add_to_doubles(out + c + first + 16 * j, q[j]);
    }
  }
}

// Per channel, over pixels [begin, end): sums of a and of a * b, where a = relu(x) and b =
// relu(x) (grad == nullptr), or a = grad and b = relu(x); floats over kFlush pixels at a
// time, then doubles. Up to eight groups of 16 channels at a time keep their sums in
// registers. With dx.out, also the input gradient's rows.
template <typename T>
FASTCIFAR_AVX512 void moments_rows(const T* x, const T* grad, int64_t c, int64_t begin,
                                   int64_t end, double* out, const InputGrad<T>& dx) {
  int64_t first = 0;
  for (; first + 128 <= c; first += 128) {
    moments_channels<T, 8>(x, grad, c, first, begin, end, out, dx);
  }
  switch ((c - first) / 16) {
    case 7: moments_channels<T, 7>(x, grad, c, first, begin, end, out, dx); break;
    case 6: moments_channels<T, 6>(x, grad, c, first, begin, end, out, dx); break;
    case 5: moments_channels<T, 5>(x, grad, c, first, begin, end, out, dx); break;
    case 4: moments_channels<T, 4>(x, grad, c, first, begin, end, out, dx); break;
    case 3: moments_channels<T, 3>(x, grad, c, first, begin, end, out, dx); break;
    case 2: moments_channels<T, 2>(x, grad, c, first, begin, end, out, dx); break;
    case 1: moments_channels<T, 1>(x, grad, c, first, begin, end, out, dx); break;
  }
}

// Per channel sums of (relu(x), relu(x)^2), or with grad of (grad, grad * relu(x)): a
// (2, C) float64 tensor, summed over chunks of pixels in a fixed order (the same result
// for any number of threads). With `terms` (grad_scale, x_scale, offset), also the input
// gradient, as relu_affine_backward writes it.
std::tuple<at::Tensor, at::Tensor> relu_moments_impl(
    const at::Tensor& x, const c10::optional<at::Tensor>& grad,
    const std::vector<at::Tensor>& terms = {}) {
  check_input(x, "relu_bn's input");
  const int64_t c = x.size(1), pixels = x.numel() / c;
  at::Tensor g, input_grad;
  if (grad.has_value()) {
    g = grad->contiguous(at::MemoryFormat::ChannelsLast);
    TORCH_CHECK(g.sizes() == x.sizes() && g.scalar_type() == x.scalar_type(),
                "relu_bn's gradient must match its input's shape and dtype");
  }
  std::vector<at::Tensor> coefficients;
  if (!terms.empty()) {
    coefficients = {per_channel(terms[0], c, "grad_scale"), per_channel(terms[1], c, "x_scale"),
                    per_channel(terms[2], c, "offset")};
    input_grad = at::empty_like(x, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  }
  const int64_t chunk = 256, chunks = (pixels + chunk - 1) / chunk;
  std::vector<double> partial(chunks * 2 * c, 0.0);
  AT_DISPATCH_SWITCH(x.scalar_type(), "relu_moments", FASTCIFAR_FLOAT_AND_BF16([&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.defined() ? g.const_data_ptr<scalar_t>() : nullptr;
    InputGrad<scalar_t> dx;
    if (input_grad.defined()) {
      dx = {coefficients[0].const_data_ptr<float>(), coefficients[1].const_data_ptr<float>(),
            coefficients[2].const_data_ptr<float>(), input_grad.mutable_data_ptr<scalar_t>()};
    }
    at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
      for (int64_t k = first; k < last; ++k) {
        moments_rows<scalar_t>(xp, gp, c, k * chunk, std::min(pixels, (k + 1) * chunk),
                               partial.data() + k * 2 * c, dx);
      }
    });
  }));
  auto out = at::zeros({2, c}, x.options().dtype(at::kDouble));
  double* o = out.mutable_data_ptr<double>();
  for (int64_t k = 0; k < chunks; ++k) {
    for (int64_t i = 0; i < 2 * c; ++i) o[i] += partial[k * 2 * c + i];
  }
  return {out, input_grad};
}

at::Tensor relu_moments(const at::Tensor& x) {
  return std::get<0>(relu_moments_impl(x, c10::nullopt));
}

at::Tensor relu_grad_moments(const at::Tensor& grad, const at::Tensor& x) {
  return std::get<0>(relu_moments_impl(x, grad));
}

// relu_affine_backward and relu_grad_moments in one pass: (input gradient, sums)
std::tuple<at::Tensor, at::Tensor> relu_affine_backward_moments(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& grad_scale,
    const at::Tensor& x_scale, const at::Tensor& offset) {
  auto [sums, input_grad] = relu_moments_impl(x, grad, {grad_scale, x_scale, offset});
  return {input_grad, sums};
}

// out = relu(x) * scale + shift (grad == nullptr), or out = x > 0 ? grad * scale + x *
// shift + offset : 0, per channel.
template <typename T>
FASTCIFAR_AVX512 void affine_rows(const T* x, const T* grad, const float* scale,
                                  const float* shift, const float* offset, T* out, int64_t c,
                                  int64_t begin, int64_t end) {
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t p = begin; p < end; ++p) {
    for (int64_t ch = 0; ch < c; ch += 16) {
      const __m512 v = load16(x + p * c + ch, 0xFFFF);
      const __m512 a = _mm512_loadu_ps(scale + ch), b = _mm512_loadu_ps(shift + ch);
      __m512 r;
      if (grad) {
        const __m512 g = load16(grad + p * c + ch, 0xFFFF);
        r = _mm512_fmadd_ps(g, a, _mm512_fmadd_ps(v, b, _mm512_loadu_ps(offset + ch)));
        r = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, zero, _CMP_GT_OQ), r);
      } else {
        r = _mm512_fmadd_ps(_mm512_max_ps(v, zero), a, b);
      }
      store16_rounded(out + p * c + ch, 0xFFFF, r);
    }
  }
}

at::Tensor affine_impl(const at::Tensor& x, const c10::optional<at::Tensor>& grad,
                       const at::Tensor& scale, const at::Tensor& shift,
                       const c10::optional<at::Tensor>& offset) {
  check_input(x, "relu_bn's input");
  const int64_t c = x.size(1), pixels = x.numel() / c;
  auto a = per_channel(scale, c, "scale"), b = per_channel(shift, c, "shift");
  at::Tensor g, o3;
  if (grad.has_value()) {
    g = grad->contiguous(at::MemoryFormat::ChannelsLast);
    TORCH_CHECK(g.sizes() == x.sizes() && g.scalar_type() == x.scalar_type(),
                "relu_bn's gradient must match its input's shape and dtype");
    o3 = per_channel(*offset, c, "offset");
  }
  auto out = at::empty_like(x, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  AT_DISPATCH_SWITCH(x.scalar_type(), "relu_bn_affine", FASTCIFAR_FLOAT_AND_BF16([&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.defined() ? g.const_data_ptr<scalar_t>() : nullptr;
    const float* op = o3.defined() ? o3.const_data_ptr<float>() : nullptr;
    scalar_t* out_p = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, pixels, 256, [&](int64_t begin, int64_t end) {
      affine_rows<scalar_t>(xp, gp, a.const_data_ptr<float>(), b.const_data_ptr<float>(), op,
                            out_p, c, begin, end);
    });
  }));
  return out;
}

at::Tensor relu_affine(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift) {
  return affine_impl(x, c10::nullopt, scale, shift, c10::nullopt);
}

at::Tensor relu_affine_backward(const at::Tensor& grad, const at::Tensor& x,
                                const at::Tensor& grad_scale, const at::Tensor& x_scale,
                                const at::Tensor& offset) {
  return affine_impl(x, grad, grad_scale, x_scale, offset);
}

// The value a computed float takes once stored as T (store16_rounded): for bf16, rounded
// with the low half cleared; a float as it is.
template <typename T>
FASTCIFAR_AVX512 inline __m512 as_stored(__m512 v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    return _mm512_castsi512_ps(_mm512_and_si512(round_to_bf16(v), _mm512_set1_epi32(0xFFFF0000)));
  }
}

// relu_affine followed by max_pool2x2, for output rows [begin, end) of all images: each
// window's four values y = relu(x) * scale + shift as stored, the winner chosen as
// max_pool2x2 chooses it (the larger of each column's two, ties and NaN to the top; then
// the left column's unless the right one's is larger, on a tie the earlier in row-major
// order). Writes the winner's y, its relu(x) and its position (0 to 3).
template <typename T>
FASTCIFAR_AVX512 void affine_pool_rows(const T* x, const float* scale, const float* shift, T* y,
                                       T* winner_relu, uint8_t* where, int64_t height,
                                       int64_t width, int64_t c, int64_t begin, int64_t end) {
  const int64_t oh = height / 2, ow = width / 2;
  const __m512 zero = _mm512_setzero_ps();
  const __m128i top_right = _mm_set1_epi8(1), bottom_left = _mm_set1_epi8(2),
                bottom_right = _mm_set1_epi8(3);
  for (int64_t row = begin; row < end; ++row) {
    const T* top = x + ((row / oh * height + 2 * (row % oh)) * width) * c;
    const T* bottom = top + width * c;
    const int64_t out_row = row * ow * c;
    for (int64_t ox = 0; ox < ow; ++ox) {
      const T* corner[4] = {top + 2 * ox * c, top + (2 * ox + 1) * c, bottom + 2 * ox * c,
                            bottom + (2 * ox + 1) * c};
      for (int64_t ch = 0; ch < c; ch += 16) {
        const __m512 a = _mm512_loadu_ps(scale + ch), b = _mm512_loadu_ps(shift + ch);
        __m512 h[4], v[4];
        for (int p = 0; p < 4; ++p) {
          h[p] = _mm512_max_ps(load16(corner[p] + ch, 0xFFFF), zero);
          v[p] = as_stored<T>(_mm512_fmadd_ps(h[p], a, b));
        }
        const __mmask16 left_low = _mm512_cmp_ps_mask(v[0], v[2], _CMP_LT_OQ);
        const __mmask16 right_low = _mm512_cmp_ps_mask(v[1], v[3], _CMP_LT_OQ);
        const __m512 l = _mm512_mask_blend_ps(left_low, v[0], v[2]);
        const __m512 r = _mm512_mask_blend_ps(right_low, v[1], v[3]);
        const __mmask16 take_left =
            _mm512_cmp_ps_mask(l, r, _CMP_GT_OQ) | _mm512_cmp_ps_mask(l, l, _CMP_UNORD_Q) |
            (_mm512_cmp_ps_mask(l, r, _CMP_EQ_OQ) & (right_low | (__mmask16)~left_low));
        const __m512 hl = _mm512_mask_blend_ps(left_low, h[0], h[2]);
        const __m512 hr = _mm512_mask_blend_ps(right_low, h[1], h[3]);
        const int64_t at = out_row + ox * c + ch;
        store16(y + at, 0xFFFF, _mm512_mask_blend_ps(take_left, r, l));
        store16(winner_relu + at, 0xFFFF, _mm512_mask_blend_ps(take_left, hr, hl));
        const __m128i left_at = _mm_maskz_mov_epi8(left_low, bottom_left);
        const __m128i right_at = _mm_mask_mov_epi8(top_right, right_low, bottom_right);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(where + at),
                         _mm_mask_blend_epi8(take_left, right_at, left_at));
      }
    }
  }
}

// relu_affine_backward of max_pool2x2_backward(grad, where), for input rows [begin, end)
// of all images: each pixel's gradient from its window's (grad where it won, else 0; 0
// outside the windows of an odd height or width), with the same arithmetic.
template <typename T>
FASTCIFAR_AVX512 void affine_pool_backward_rows(const T* grad, const uint8_t* where, const T* x,
                                                const float* grad_scale, const float* x_scale,
                                                const float* offset, T* out, int64_t height,
                                                int64_t width, int64_t c, int64_t begin,
                                                int64_t end) {
  const int64_t oh = height / 2, ow = width / 2;
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t row = begin; row < end; ++row) {
    const int64_t image = row / height, y = row % height;
    const bool pooled_row = y < 2 * oh;
    const int64_t window_row = ((image * oh + y / 2) * ow) * c;
    for (int64_t px = 0; px < width; ++px) {
      const bool pooled = pooled_row && px < 2 * ow;
      const __m128i position = _mm_set1_epi8(static_cast<char>(2 * (y % 2) + px % 2));
      const int64_t at = (row * width + px) * c, window = window_row + (px / 2) * c;
      for (int64_t ch = 0; ch < c; ch += 16) {
        __m512 g = zero;
        if (pooled) {
          const __m128i won = _mm_loadu_si128(reinterpret_cast<const __m128i*>(where + window + ch));
          g = _mm512_maskz_mov_ps(_mm_cmpeq_epi8_mask(won, position),
                                  load16(grad + window + ch, 0xFFFF));
        }
        const __m512 v = load16(x + at + ch, 0xFFFF);
        __m512 r = _mm512_fmadd_ps(g, _mm512_loadu_ps(grad_scale + ch),
                                   _mm512_fmadd_ps(v, _mm512_loadu_ps(x_scale + ch),
                                                   _mm512_loadu_ps(offset + ch)));
        r = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, zero, _CMP_GT_OQ), r);
        store16_rounded(out + at + ch, 0xFFFF, r);
      }
    }
  }
}

void check_poolable(const at::Tensor& x, const char* op) {
  check_input(x, "relu_affine_max_pool's input");
  TORCH_CHECK(x.size(2) >= 2 && x.size(3) >= 2, op, " needs at least 2 x 2 pixels, not ",
              x.size(2), " x ", x.size(3));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> relu_affine_max_pool(const at::Tensor& x,
                                                                    const at::Tensor& scale,
                                                                    const at::Tensor& shift) {
  check_poolable(x, "relu_affine_max_pool");
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  auto a = per_channel(scale, c, "scale"), b = per_channel(shift, c, "shift");
  auto options = x.options().memory_format(at::MemoryFormat::ChannelsLast);
  auto y = at::empty({n, c, h / 2, w / 2}, options);
  auto winner_relu = at::empty_like(y);
  auto where = at::empty({n, c, h / 2, w / 2}, options.dtype(at::kByte));
  AT_DISPATCH_SWITCH(x.scalar_type(), "relu_affine_max_pool", FASTCIFAR_FLOAT_AND_BF16([&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    scalar_t* hp = winner_relu.mutable_data_ptr<scalar_t>();
    uint8_t* k = where.mutable_data_ptr<uint8_t>();
    at::parallel_for(0, n * (h / 2), 1, [&](int64_t begin, int64_t end) {
      affine_pool_rows<scalar_t>(xp, a.const_data_ptr<float>(), b.const_data_ptr<float>(), yp, hp,
                                 k, h, w, c, begin, end);
    });
  }));
  return {y, winner_relu, where};
}

at::Tensor relu_affine_max_pool_backward(const at::Tensor& grad, const at::Tensor& where,
                                         const at::Tensor& x, const at::Tensor& grad_scale,
                                         const at::Tensor& x_scale, const at::Tensor& offset) {
  check_poolable(x, "relu_affine_max_pool_backward");
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  auto g = grad.contiguous(at::MemoryFormat::ChannelsLast);
  const std::vector<int64_t> pooled = {n, c, h / 2, w / 2};
  TORCH_CHECK(g.sizes() == pooled && where.sizes() == pooled && g.scalar_type() == x.scalar_type(),
              "relu_affine_max_pool_backward: the gradient and window positions must be x's "
              "pooled shape, the gradient of x's dtype");
  TORCH_CHECK(where.scalar_type() == at::kByte &&
                  where.is_contiguous(at::MemoryFormat::ChannelsLast),
              "window positions must be channels-last uint8");
  auto a = per_channel(grad_scale, c, "grad_scale"), b = per_channel(x_scale, c, "x_scale");
  auto o3 = per_channel(offset, c, "offset");
  auto out = at::empty_like(x, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  AT_DISPATCH_SWITCH(x.scalar_type(), "relu_affine_max_pool_backward",
                     FASTCIFAR_FLOAT_AND_BF16([&] {
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const uint8_t* k = where.const_data_ptr<uint8_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n * h, 1, [&](int64_t begin, int64_t end) {
      affine_pool_backward_rows<scalar_t>(gp, k, xp, a.const_data_ptr<float>(),
                                          b.const_data_ptr<float>(), o3.const_data_ptr<float>(),
                                          op, h, w, c, begin, end);
    });
  }));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcifar, CPU, m) {
  m.impl("relu_moments", &relu_moments);
  m.impl("relu_grad_moments", &relu_grad_moments);
  m.impl("relu_affine", &relu_affine);
  m.impl("relu_affine_backward", &relu_affine_backward);
  m.impl("relu_affine_backward_moments", &relu_affine_backward_moments);
  m.impl("relu_affine_max_pool", &relu_affine_max_pool);
  m.impl("relu_affine_max_pool_backward", &relu_affine_max_pool_backward);
}

}  // namespace fastcifar
