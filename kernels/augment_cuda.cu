// CUDA kernel of fastcifar::augment_batch and its raw-pointer launcher. No torch headers:
// the tensor handling lives in augment_cuda.cpp. One thread per output pixel (3 channels),
// so consecutive threads read and write consecutive pixels.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "augment.h"

namespace fastcifar {
namespace {

template <typename T>
__device__ T to_out(float v);
template <>
__device__ float to_out<float>(float v) { return v; }
template <>
__device__ __half to_out<__half>(float v) { return __float2half(v); }
template <>
__device__ __nv_bfloat16 to_out<__nv_bfloat16>(float v) { return __float2bfloat16(v); }

template <typename T>
__global__ void augment_kernel(AugmentArgs a, T* out) {
  const int64_t pixels = a.batch * a.height * a.width;
  for (int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; p < pixels;
       p += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = p / (a.height * a.width);
    const int64_t y = (p / a.width) % a.height, x = p % a.width;
    for (int c = 0; c < 3; ++c)
      out[p * 3 + c] = to_out<T>(augmented_pixel(a, b, y, x, c) * a.norm.scale[c] + a.norm.shift[c]);
  }
}

}  // namespace

void launch_augment_cuda(const AugmentArgs& args, void* out, int out_dtype, void* stream) {
  const int64_t pixels = args.batch * args.height * args.width;
  const int threads = 256;
  const int blocks = static_cast<int>((pixels + threads - 1) / threads < 65535 ? (pixels + threads - 1) / threads : 65535);
  auto s = static_cast<cudaStream_t>(stream);
  if (out_dtype == 0) augment_kernel<float><<<blocks, threads, 0, s>>>(args, static_cast<float*>(out));
  if (out_dtype == 1) augment_kernel<__half><<<blocks, threads, 0, s>>>(args, static_cast<__half*>(out));
  if (out_dtype == 2)
    augment_kernel<__nv_bfloat16><<<blocks, threads, 0, s>>>(args, static_cast<__nv_bfloat16*>(out));
}

}  // namespace fastcifar
