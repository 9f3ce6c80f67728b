// Input checks shared by the CPU and CUDA implementations: every op input gets a clear
// error.
#pragma once
#include <string>

#include <ATen/ATen.h>
#include "augment.h"

namespace fastcifar {

// Numbers reach the error messages as text made here, never through `stream << number`.
// On the GPU image the extension's own copy of std::ostream::_M_insert<long> ran for that
// and crashed (segfault in num_put lookup, cuda-gdb backtrace of the bad-input test), while
// inserting text worked.
inline std::string text(int64_t value) { return std::to_string(value); }

inline AugmentArgs check_augment_inputs(const at::Tensor& images, const at::Tensor& index,
                                        const at::Tensor& dy, const at::Tensor& dx,
                                        const at::Tensor& flip,
                                        const std::optional<at::Tensor>& cut_y,
                                        const std::optional<at::Tensor>& cut_x, int64_t pad,
                                        int64_t cutout, at::ArrayRef<double> mean,
                                        at::ArrayRef<double> std, at::ScalarType dtype) {
  TORCH_CHECK(images.scalar_type() == at::kByte, "augment_batch: images must be uint8, got ",
              images.scalar_type());
  TORCH_CHECK(images.dim() == 4 && images.size(3) == 3,
              "augment_batch: images must be (N, H, W, 3), got ", text(images.dim()),
              " dimensions, the last of size ", text(images.dim() > 0 ? images.size(-1) : 0));
  TORCH_CHECK(images.is_contiguous(), "augment_batch: images must be contiguous NHWC");
  const int64_t batch = index.numel();
  for (const auto* t : {&index, &dy, &dx}) {
    TORCH_CHECK(t->scalar_type() == at::kLong && t->dim() == 1 && t->numel() == batch,
                "augment_batch: index, dy and dx must be int64 vectors of one length");
    TORCH_CHECK(t->device() == images.device(), "augment_batch: all inputs must be on ",
                images.device());
  }
  TORCH_CHECK(flip.scalar_type() == at::kBool && flip.numel() == batch &&
                  flip.device() == images.device(),
              "augment_batch: flip must be a bool vector of the batch's length on the images' device");
  TORCH_CHECK(pad >= 0 && cutout >= 0, "augment_batch: pad and cutout must be >= 0");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "augment_batch: dtype must be float32, float16 or bfloat16");
  TORCH_CHECK(mean.size() == 3 && std.size() == 3, "augment_batch: mean and std need 3 values");
  AugmentArgs a{};
  for (int c = 0; c < 3; ++c) {
    TORCH_CHECK(std[c] > 0, "augment_batch: std must be positive");
    a.norm.scale[c] = static_cast<float>(1.0 / (std[c] * 255.0));
    a.norm.shift[c] = static_cast<float>(-mean[c] / std[c]);
  }
  if (cutout > 0) {
    TORCH_CHECK(cut_y.has_value() && cut_x.has_value(),
                "augment_batch: cutout > 0 needs cut_y and cut_x");
    for (const auto* t : {&*cut_y, &*cut_x})
      TORCH_CHECK(t->scalar_type() == at::kLong && t->numel() == batch &&
                      t->device() == images.device() && t->is_contiguous(),
                  "augment_batch: cut_y and cut_x must be int64 vectors of the batch's length");
    a.cut_y = cut_y->data_ptr<int64_t>();
    a.cut_x = cut_x->data_ptr<int64_t>();
  }
  a.images = images.data_ptr<uint8_t>();
  a.index = index.data_ptr<int64_t>();
  a.dy = dy.data_ptr<int64_t>();
  a.dx = dx.data_ptr<int64_t>();
  a.flip = flip.data_ptr<bool>();
  a.batch = batch;
  a.height = images.size(1);
  a.width = images.size(2);
  a.pad = pad;
  a.cutout = cutout;
  return a;
}

// Range checks that need the values: only cheap on the CPU, so the CPU path runs them.
inline void check_augment_ranges(const AugmentArgs& a, int64_t n_images) {
  for (int64_t b = 0; b < a.batch; ++b) {
    TORCH_CHECK(a.index[b] >= 0 && a.index[b] < n_images, "augment_batch: index ",
                text(a.index[b]), " out of range for ", text(n_images), " images");
    TORCH_CHECK(a.dy[b] >= 0 && a.dy[b] <= 2 * a.pad && a.dx[b] >= 0 && a.dx[b] <= 2 * a.pad,
                "augment_batch: crop offsets must be in 0..", text(2 * a.pad));
  }
}

}  // namespace fastcifar
