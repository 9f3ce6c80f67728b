// What the Winograd kernels share (winograd_cpu.cpp: bf16 on AVX512-BF16;
// winograd_fp32_cpu.cpp: fp32 on AVX2 and FMA): where a tile lies, the planes' padding,
// and the fp32 kernels' entry points, which the ops' CPU implementations call for fp32.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace fastcifar {

// Elements after each of a chunk's transform planes (16 for F(2x2, 3x3)), so that the
// planes start a cache line more than a multiple of 4 KiB apart: a tile's values, one in
// each plane, then fall in different sets of the L1 cache rather than all in one (its 8
// ways) and evict each other. Counted in bf16 elements; fp32 planes take half as many.
constexpr int64_t kPlanePad = 32;

struct Shape {
  int64_t h, w, c_in, c_out, tiles_per_image, tiles_per_row;
};

// Where tile `tile` of the batch lies: its image, and its row and column of tiles.
struct TileAt {
  int64_t image, ty, tx;
};

inline TileAt locate(const Shape& s, int64_t tile) {
  return {tile / s.tiles_per_image, (tile % s.tiles_per_image) / s.tiles_per_row,
          tile % s.tiles_per_row};
}

// winograd_conv3x3 for fp32 channels-last x, the weights' tiles fp32 (16, C_in, C_out) for
// F(2x2, 3x3) or (36, C_in, C_out) for F(4x4, 3x3)
at::Tensor winograd_conv3x3_fp32(const at::Tensor& x, const at::Tensor& tiles,
                                 const std::optional<at::Tensor>& bias);

// winograd_conv3x3_weight_grad for fp32 channels-last grad and x: F(2x2, 3x3) (tile 2)
// or F(4x4, 3x3) (tile 4)
std::tuple<at::Tensor, at::Tensor> winograd_conv3x3_weight_grad_fp32(const at::Tensor& grad,
                                                                     const at::Tensor& x, int64_t tile);

}  // namespace fastcifar
