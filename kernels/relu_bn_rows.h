// The ReLU-BatchNorm kernels' passes over rows of channels-last pixels, written once over
// a vector type V of V::kWidth floats. An instruction-set file (relu_bn_avx512.cpp,
// relu_bn_avx2.cpp) defines V and FASTCIFAR_ROWS_TARGET (its instructions' attribute) and
// then includes this file, so that each copy is compiled for its own CPU.
//
// V has the register types Reg (V::kWidth floats) and Mask (one bit or lane per float),
// V::kGroups (how many groups of V::kWidth channels keep their two sums in registers), and
// zero, set, load<T> and loadf (floats), store<T>, store_rounded<T> and as_stored<T> (a
// computed value as stored in T), max, add, fmadd (a b + c), greater, less, equal,
// unordered, both, either, invert, blend (b where the mask is set, else a), keep (zero
// where not), add_to_doubles, and store_positions and load_positions (small whole numbers
// as bytes).
#pragma once
#include <algorithm>
#include <cstdint>

#include "relu_bn.h"

namespace fastcifar {
namespace {

constexpr int64_t kFlush = 64;  // pixels summed in floats before the doubles take them

// Channels [first, first + G V::kWidth) of moments_rows, the sums in registers.
template <class V, typename T, int G>
FASTCIFAR_ROWS_TARGET void moments_channels(const T* x, const T* grad, int64_t c, int64_t first,
                                            int64_t begin, int64_t end, double* out,
                                            const InputGrad<T>& dx) {
  using Reg = typename V::Reg;
  const Reg zero = V::zero();
  for (int64_t start = begin; start < end; start += kFlush) {
    Reg s[G], q[G];
    for (int j = 0; j < G; ++j) s[j] = q[j] = zero;
    const int64_t stop = std::min(end, start + kFlush);
    for (int64_t p = start; p < stop; ++p) {
      for (int j = 0; j < G; ++j) {
        const int64_t ch = first + V::kWidth * j, at = p * c + ch;
        const Reg v = V::load(x + at);
        const Reg h = V::max(v, zero);
        const Reg a = grad ? V::load(grad + at) : h;
        s[j] = V::add(s[j], a);
        q[j] = V::fmadd(a, h, q[j]);
        if (dx.out) {
          Reg r = V::fmadd(v, V::loadf(dx.shift + ch), V::loadf(dx.offset + ch));
          r = V::fmadd(a, V::loadf(dx.scale + ch), r);
          V::store_rounded(dx.out + at, V::keep(V::greater(v, zero), r));
        }
      }
    }
    for (int j = 0; j < G; ++j) {
      V::add_to_doubles(out + first + V::kWidth * j, s[j]);
      V::add_to_doubles(out + c + first + V::kWidth * j, q[j]);
    }
  }
}

// moments_channels for the last `groups` (< V::kGroups) groups of channels from `first`.
template <class V, typename T, int G>
FASTCIFAR_ROWS_TARGET void moments_last_channels(const T* x, const T* grad, int64_t c,
                                                 int64_t first, int64_t begin, int64_t end,
                                                 double* out, const InputGrad<T>& dx,
                                                 int64_t groups) {
  if constexpr (G > 0) {
    if (groups == G) moments_channels<V, T, G>(x, grad, c, first, begin, end, out, dx);
    else moments_last_channels<V, T, G - 1>(x, grad, c, first, begin, end, out, dx, groups);
  }
}

// Per channel, over pixels [begin, end): sums of a and of a * b, where a = relu(x) and b =
// relu(x) (grad == nullptr), or a = grad and b = relu(x); floats over kFlush pixels at a
// time, then doubles, into out[0, c) and out[c, 2 c). With dx.out, also the input
// gradient's rows.
template <class V, typename T>
FASTCIFAR_ROWS_TARGET void moments_rows(const T* x, const T* grad, int64_t c, int64_t begin,
                                        int64_t end, double* out, const InputGrad<T>& dx) {
  constexpr int64_t kBlock = V::kGroups * V::kWidth;
  int64_t first = 0;
  for (; first + kBlock <= c; first += kBlock) {
    moments_channels<V, T, V::kGroups>(x, grad, c, first, begin, end, out, dx);
  }
  moments_last_channels<V, T, V::kGroups - 1>(x, grad, c, first, begin, end, out, dx,
                                              (c - first) / V::kWidth);
}

// out = relu(x) * scale + shift (grad == nullptr), or out = x > 0 ? grad * scale + x *
// shift + offset : 0, per channel, for pixels [begin, end).
template <class V, typename T>
FASTCIFAR_ROWS_TARGET void affine_rows(const T* x, const T* grad, const float* scale,
                                       const float* shift, const float* offset, T* out,
                                       int64_t c, int64_t begin, int64_t end) {
  using Reg = typename V::Reg;
  const Reg zero = V::zero();
  for (int64_t p = begin; p < end; ++p) {
    for (int64_t ch = 0; ch < c; ch += V::kWidth) {
      const Reg v = V::load(x + p * c + ch);
      const Reg a = V::loadf(scale + ch), b = V::loadf(shift + ch);
      Reg r;
      if (grad) {
        const Reg g = V::load(grad + p * c + ch);
        r = V::keep(V::greater(v, zero), V::fmadd(g, a, V::fmadd(v, b, V::loadf(offset + ch))));
      } else {
        r = V::fmadd(V::max(v, zero), a, b);
      }
      V::store_rounded(out + p * c + ch, r);
    }
  }
}

// relu_affine followed by max_pool2x2, for output rows [begin, end) of all images: each
// window's four values y = relu(x) * scale + shift as stored, the winner chosen as
// max_pool2x2 chooses it (the larger of each column's two, ties and NaN to the top; then
// the left column's unless the right one's is larger, on a tie the earlier in row-major
// order). Writes the winner's y, its relu(x) and its position (0 to 3).
template <class V, typename T>
FASTCIFAR_ROWS_TARGET void affine_pool_rows(const T* x, const float* scale, const float* shift,
                                            T* y, T* winner_relu, uint8_t* where, int64_t height,
                                            int64_t width, int64_t c, int64_t begin, int64_t end) {
  using Reg = typename V::Reg;
  using Mask = typename V::Mask;
  const int64_t oh = height / 2, ow = width / 2;
  const Reg zero = V::zero(), top_right = V::set(1), bottom_left = V::set(2),
            bottom_right = V::set(3);
  for (int64_t row = begin; row < end; ++row) {
    const T* top = x + ((row / oh * height + 2 * (row % oh)) * width) * c;
    const T* bottom = top + width * c;
    const int64_t out_row = row * ow * c;
    for (int64_t ox = 0; ox < ow; ++ox) {
      const T* corner[4] = {top + 2 * ox * c, top + (2 * ox + 1) * c, bottom + 2 * ox * c,
                            bottom + (2 * ox + 1) * c};
      for (int64_t ch = 0; ch < c; ch += V::kWidth) {
        const Reg a = V::loadf(scale + ch), b = V::loadf(shift + ch);
        Reg h[4], v[4];
        for (int p = 0; p < 4; ++p) {
          h[p] = V::max(V::load(corner[p] + ch), zero);
          v[p] = V::template as_stored<T>(V::fmadd(h[p], a, b));
        }
        const Mask left_low = V::less(v[0], v[2]), right_low = V::less(v[1], v[3]);
        const Reg l = V::blend(left_low, v[0], v[2]), r = V::blend(right_low, v[1], v[3]);
        const Mask take_left =
            V::either(V::either(V::greater(l, r), V::unordered(l)),
                      V::both(V::equal(l, r), V::either(right_low, V::invert(left_low))));
        const Reg hl = V::blend(left_low, h[0], h[2]), hr = V::blend(right_low, h[1], h[3]);
        const int64_t at = out_row + ox * c + ch;
        V::store(y + at, V::blend(take_left, r, l));
        V::store(winner_relu + at, V::blend(take_left, hr, hl));
        const Reg left_at = V::blend(left_low, zero, bottom_left);
        const Reg right_at = V::blend(right_low, top_right, bottom_right);
        V::store_positions(where + at, V::blend(take_left, right_at, left_at));
      }
    }
  }
}

// relu_affine_backward of max_pool2x2_backward(grad, where), for input rows [begin, end)
// of all images: each pixel's gradient from its window's (grad where it won, else 0; 0
// outside the windows of an odd height or width), with the same arithmetic.
template <class V, typename T>
FASTCIFAR_ROWS_TARGET void affine_pool_backward_rows(const T* grad, const uint8_t* where,
                                                     const T* x, const float* grad_scale,
                                                     const float* x_scale, const float* offset,
                                                     T* out, int64_t height, int64_t width,
                                                     int64_t c, int64_t begin, int64_t end) {
  using Reg = typename V::Reg;
  const int64_t oh = height / 2, ow = width / 2;
  const Reg zero = V::zero();
  for (int64_t row = begin; row < end; ++row) {
    const int64_t image = row / height, y = row % height;
    const bool pooled_row = y < 2 * oh;
    const int64_t window_row = ((image * oh + y / 2) * ow) * c;
    for (int64_t px = 0; px < width; ++px) {
      const bool pooled = pooled_row && px < 2 * ow;
      const Reg position = V::set(static_cast<float>(2 * (y % 2) + px % 2));
      const int64_t at = (row * width + px) * c, window = window_row + (px / 2) * c;
      for (int64_t ch = 0; ch < c; ch += V::kWidth) {
        Reg g = zero;
        if (pooled) {
          g = V::keep(V::equal(V::load_positions(where + window + ch), position),
                      V::load(grad + window + ch));
        }
        const Reg v = V::load(x + at + ch);
        const Reg r = V::fmadd(g, V::loadf(grad_scale + ch),
                               V::fmadd(v, V::loadf(x_scale + ch), V::loadf(offset + ch)));
        V::store_rounded(out + at + ch, V::keep(V::greater(v, zero), r));
      }
    }
  }
}

// The four passes for V and T
template <class V, typename T>
ReluBnRows<T> rows_for() {
  return {&moments_rows<V, T>, &affine_rows<V, T>, &affine_pool_rows<V, T>,
          &affine_pool_backward_rows<V, T>};
}

}  // namespace
}  // namespace fastcifar
