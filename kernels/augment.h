// The fused augmentation: one pass from stored uint8 images to a normalised training
// batch. Shared by the CPU implementation and the CUDA launcher (no torch headers here).
#pragma once
#include <cstdint>

namespace fastcifar {

// Per-channel normalisation as scale and shift in pixel units: out = px * scale + shift.
struct Normalize {
  float scale[3];
  float shift[3];
};

// Arguments of one batch: B samples of H x W x 3 uint8 images, read from `images`
// (N x H x W x 3) at rows `index`, cropped at (dy - pad, dx - pad) with zero padding,
// mirrored where `flip`, with a `cutout` x `cutout` square centred at (cut_y, cut_x)
// blacked out (in output coordinates), written channels-last (B x H x W x 3).
struct AugmentArgs {
  const uint8_t* images;
  const int64_t* index;
  const int64_t* dy;
  const int64_t* dx;
  const bool* flip;
  const int64_t* cut_y;  // null when cutout == 0
  const int64_t* cut_x;
  int64_t batch, height, width, pad, cutout;
  Normalize norm;
};

// The value of output pixel (y, x), channel c, of sample b, in pixel units (0..255).
#if defined(__CUDACC__)
__host__ __device__
#endif
inline float augmented_pixel(const AugmentArgs& a, int64_t b, int64_t y, int64_t x, int c) {
  if (a.cutout > 0) {
    const int64_t top = a.cut_y[b] - a.cutout / 2, left = a.cut_x[b] - a.cutout / 2;
    if (y >= top && y < top + a.cutout && x >= left && x < left + a.cutout) return 0.f;
  }
  const int64_t col = a.flip[b] ? a.width - 1 - x : x;
  const int64_t sy = y + a.dy[b] - a.pad, sx = col + a.dx[b] - a.pad;
  if (sy < 0 || sy >= a.height || sx < 0 || sx >= a.width) return 0.f;
  return a.images[((a.index[b] * a.height + sy) * a.width + sx) * 3 + c];
}

// CUDA launcher (augment_cuda.cu); `out_dtype` 0 = float32, 1 = float16, 2 = bfloat16.
void launch_augment_cuda(const AugmentArgs& args, void* out, int out_dtype, void* stream);

}  // namespace fastcifar
