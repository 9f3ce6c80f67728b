// The ReLU-BatchNorm kernels' passes over rows of pixels (relu_bn_rows.h), as compiled for
// one CPU's vector instructions, for relu_bn_cpu.cpp's operators to call.
#pragma once
#include <c10/util/BFloat16.h>

#include <cstdint>

namespace fastcifar {

// The per-channel terms of the input gradient, x > 0 ? grad * scale + x * shift + offset
// : 0, for the moments pass to write as it sums (out == nullptr: none).
template <typename T>
struct InputGrad {
  const float *scale = nullptr, *shift = nullptr, *offset = nullptr;
  T* out = nullptr;
};

// One instruction set's passes for activations of type T (relu_bn_rows.h says what each
// computes); channels in multiples of 16.
template <typename T>
struct ReluBnRows {
  void (*moments)(const T* x, const T* grad, int64_t c, int64_t begin, int64_t end,
                  double* out, const InputGrad<T>& dx);
  void (*affine)(const T* x, const T* grad, const float* scale, const float* shift,
                 const float* offset, T* out, int64_t c, int64_t begin, int64_t end);
  void (*affine_pool)(const T* x, const float* scale, const float* shift, T* y, T* winner_relu,
                      uint8_t* where, int64_t height, int64_t width, int64_t c, int64_t begin,
                      int64_t end);
  void (*affine_pool_backward)(const T* grad, const uint8_t* where, const T* x,
                               const float* grad_scale, const float* x_scale, const float* offset,
                               T* out, int64_t height, int64_t width, int64_t c, int64_t begin,
                               int64_t end);
};

// AVX-512 (relu_bn_avx512.cpp): float and bf16
const ReluBnRows<float>& avx512_rows(float);
const ReluBnRows<c10::BFloat16>& avx512_rows(c10::BFloat16);
// AVX2 with FMA (relu_bn_avx2.cpp): float only, as CPUs without bf16 instructions train
const ReluBnRows<float>& avx2_rows(float);

}  // namespace fastcifar
