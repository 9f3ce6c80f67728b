// CUDA registration of fastcifar::augment_batch: checks, output allocation, and the launch
// on the current stream. The kernel itself is in augment_cuda.cu.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "augment_checks.h"

namespace fastcifar {
namespace {

at::Tensor augment_batch_cuda(const at::Tensor& images, const at::Tensor& index,
                              const at::Tensor& dy, const at::Tensor& dx, const at::Tensor& flip,
                              const std::optional<at::Tensor>& cut_y,
                              const std::optional<at::Tensor>& cut_x, int64_t pad, int64_t cutout,
                              at::ArrayRef<double> mean, at::ArrayRef<double> std,
                              at::ScalarType dtype) {
  const c10::cuda::CUDAGuard guard(images.device());
  auto idx = index.contiguous(), ys = dy.contiguous(), xs = dx.contiguous(), fl = flip.contiguous();
  AugmentArgs a = check_augment_inputs(images, idx, ys, xs, fl, cut_y, cut_x, pad, cutout, mean,
                                       std, dtype);
  auto out = at::empty({a.batch, 3, a.height, a.width},
                       images.options().dtype(dtype).memory_format(at::MemoryFormat::ChannelsLast));
  if (a.batch == 0) return out;
  const int code = dtype == at::kFloat ? 0 : dtype == at::kHalf ? 1 : 2;
  launch_augment_cuda(a, out.data_ptr(), code, c10::cuda::getCurrentCUDAStream().stream());
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcifar, CUDA, m) { m.impl("augment_batch", &augment_batch_cuda); }

}  // namespace fastcifar
