// CPU implementation of fastcifar::augment_batch: parallel over the batch with ATen's
// parallel_for, one pass from uint8 images to the normalised channels-last batch.
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <algorithm>
#include <torch/library.h>

#include "augment_checks.h"

namespace fastcifar {
namespace {

// Row by row: each output row is a run of padding, a run of source pixels read forwards
// (or backwards when flipped) through a per-channel table of the 256 normalised levels,
// and another run of padding; the cutout square is blanked afterwards. Padding and cutout
// hold the normalised value of a zero pixel, as in augmented_pixel().
template <typename T>
void augment_cpu_kernel(const AugmentArgs& a, T* out) {
  T table[3][256];
  for (int c = 0; c < 3; ++c)
    for (int v = 0; v < 256; ++v)
      table[c][v] = static_cast<T>(static_cast<float>(v) * a.norm.scale[c] + a.norm.shift[c]);
  const T zero[3] = {table[0][0], table[1][0], table[2][0]};
  const int64_t W = a.width, H = a.height, row_len = W * 3;
  auto blank = [&](T* dst, int64_t pixels) {
    for (int64_t i = 0; i < pixels; ++i, dst += 3) dst[0] = zero[0], dst[1] = zero[1], dst[2] = zero[2];
  };
  at::parallel_for(0, a.batch, 16, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const uint8_t* image = a.images + a.index[b] * H * row_len;
      const int64_t oy = a.dy[b] - a.pad, ox = a.dx[b] - a.pad;
      const bool flip = a.flip[b];
      // Output columns whose source column lies inside the image.
      const int64_t lo = std::max<int64_t>(0, flip ? ox : -ox);
      const int64_t hi = std::min<int64_t>(W, flip ? W + ox : W - ox);
      T* dst = out + b * H * row_len;
      for (int64_t y = 0; y < H; ++y, dst += row_len) {
        const int64_t sy = y + oy;
        if (sy < 0 || sy >= H || lo >= hi) {
          blank(dst, W);
          continue;
        }
        blank(dst, lo);
        const int64_t first = flip ? W - 1 - lo + ox : lo + ox;  // source column of x = lo
        const uint8_t* src = image + sy * row_len + first * 3;
        const int64_t step = flip ? -3 : 3;
        T* d = dst + lo * 3;
        for (int64_t x = lo; x < hi; ++x, src += step, d += 3) {
          d[0] = table[0][src[0]];
          d[1] = table[1][src[1]];
          d[2] = table[2][src[2]];
        }
        blank(dst + hi * 3, W - hi);
      }
      if (a.cutout > 0) {
        const int64_t top = a.cut_y[b] - a.cutout / 2, left = a.cut_x[b] - a.cutout / 2;
        const int64_t y0 = std::max<int64_t>(0, top), y1 = std::min<int64_t>(H, top + a.cutout);
        const int64_t x0 = std::max<int64_t>(0, left), x1 = std::min<int64_t>(W, left + a.cutout);
        T* base = out + b * H * row_len;
        for (int64_t y = y0; y < y1 && x0 < x1; ++y) blank(base + y * row_len + x0 * 3, x1 - x0);
      }
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
