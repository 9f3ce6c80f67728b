// CPU kernels of a ReLU followed by training-mode BatchNorm over channels-last
// activations (fastcifar.ops.relu_bn holds the per-channel arithmetic between them). The
// ReLU is recomputed from the pre-activation x wherever it is needed, so a layer reads
// x twice and writes y once forward, and reads (grad, x) twice and writes the input's
// gradient once backward, where ATen's ReLU, BatchNorm and their backwards make separate
// passes of their own. Where a 2x2 max pool follows, the affine pass pools as it goes
// (writing a quarter of the pixels) and the backward takes the pooled gradient, so the
// full-size output and its gradient are never written. Channels come in multiples of
// 16. The passes themselves are relu_bn_rows.h's, as compiled for
// AVX-512 (float and bf16) or AVX2 (float); these operators check, allocate and split
// the work.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <tuple>
#include <type_traits>
#include <vector>

#include "avx512.h"  // and the CPU checks, and the dtypes the kernels take
#include "relu_bn.h"

namespace fastcifar {
namespace {

void check_input(const at::Tensor& x, const char* what) {
  TORCH_CHECK(x.device().is_cpu(), what, " must be on the CPU");
  TORCH_CHECK(x.dim() == 4, what, " must be 4-D (N, C, H, W), not ", x.dim(), "-D");
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast), what, " must be channels-last");
  TORCH_CHECK(x.size(1) % 16 == 0, what, " needs channels in multiples of 16, not ", x.size(1));
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat,
              what, " must be bf16 or float");
  TORCH_CHECK(has_avx512() || (has_avx2_fma() && x.scalar_type() == at::kFloat),
              "the ReLU-BatchNorm kernels need a CPU with AVX-512, or AVX2 and FMA for float");
}

at::Tensor per_channel(const at::Tensor& v, int64_t c, const char* what) {
  TORCH_CHECK(v.dim() == 1 && v.size(0) == c, what, " must hold one value per channel (", c, ")");
  return v.to(at::kFloat).contiguous();
}

// This CPU's passes for T: AVX-512's where it has them, else AVX2's (float only)
template <typename T>
const ReluBnRows<T>& rows() {
  if constexpr (std::is_same_v<T, float>) {
    return has_avx512() ? avx512_rows(T()) : avx2_rows(T());
  } else {
    return avx512_rows(T());
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
        rows<scalar_t>().moments(xp, gp, c, k * chunk, std::min(pixels, (k + 1) * chunk),
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
      rows<scalar_t>().affine(xp, gp, a.const_data_ptr<float>(), b.const_data_ptr<float>(), op,
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
      rows<scalar_t>().affine_pool(xp, a.const_data_ptr<float>(), b.const_data_ptr<float>(), yp, hp,
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
      rows<scalar_t>().affine_pool_backward(gp, k, xp, a.const_data_ptr<float>(),
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
