// CPU implementation of fastcifar::augment_batch: parallel over the batch with ATen's
// parallel_for, one pass from uint8 images to the normalised channels-last batch.
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "augment_checks.h"

namespace fastcifar {
namespace {

template <typename T>
void augment_cpu_kernel(const AugmentArgs& a, T* out) {
  const int64_t plane = a.height * a.width * 3;
  at::parallel_for(0, a.batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      T* dst = out + b * plane;
      for (int64_t y = 0; y < a.height; ++y)
        for (int64_t x = 0; x < a.width; ++x)
          for (int c = 0; c < 3; ++c)
            *dst++ = static_cast<T>(augmented_pixel(a, b, y, x, c) * a.norm.scale[c] +
                                    a.norm.shift[c]);
    }
  });
}

at::Tensor augment_batch_cpu(const at::Tensor& images, const at::Tensor& index,
                             const at::Tensor& dy, const at::Tensor& dx, const at::Tensor& flip,
                             const std::optional<at::Tensor>& cut_y,
                             const std::optional<at::Tensor>& cut_x, int64_t pad, int64_t cutout,
                             at::ArrayRef<double> mean, at::ArrayRef<double> std,
                             at::ScalarType dtype) {
  auto idx = index.contiguous(), ys = dy.contiguous(), xs = dx.contiguous(), fl = flip.contiguous();
  AugmentArgs a = check_augment_inputs(images, idx, ys, xs, fl, cut_y, cut_x, pad, cutout, mean,
                                       std, dtype);
  check_augment_ranges(a, images.size(0));
  auto out = at::empty({a.batch, 3, a.height, a.width},
                       images.options().dtype(dtype).memory_format(at::MemoryFormat::ChannelsLast));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "augment_batch_cpu", [&] {
    augment_cpu_kernel<scalar_t>(a, out.data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcifar, CPU, m) { m.impl("augment_batch", &augment_batch_cpu); }

}  // namespace fastcifar
