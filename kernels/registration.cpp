// The operator schema, in one TORCH_LIBRARY block, and the Python module stub that makes
// `import fastcifar._C` load this library (and so register the operators).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(fastcifar, m) {
  m.def(
      "augment_batch(Tensor images, Tensor index, Tensor dy, Tensor dx, Tensor flip, "
      "Tensor? cut_y, Tensor? cut_x, int pad, int cutout, float[] mean, float[] std, "
      "ScalarType dtype) -> Tensor");
  // 2x2 max pooling, stride 2, channels-last, CPU with AVX-512: (output, each window's
  // winner 0..3 as uint8), and the input gradient from them
  m.def("max_pool2x2(Tensor x) -> (Tensor, Tensor)");
  m.def("max_pool2x2_backward(Tensor grad, Tensor where, int height, int width) -> Tensor");
  // 3x3 convolution, stride 1, padding 1, as Winograd F(2x2, 3x3): bf16 channels-last
  // input, the weights' tiles packed (16, C_in / 2, C_out, 2), CPU with AVX512-BF16; or
  // fp32 input, the tiles (16, C_in, C_out), or (36, C_in, C_out) for F(4x4, 3x3), CPU
  // with AVX2 and FMA
  m.def("winograd_conv3x3(Tensor x, Tensor packed_weight, Tensor? bias) -> Tensor");
  // its weights' tiles' gradient (16, C_in, C_out) float and its bias's gradient (C_out)
  // float, from the output's gradient and the input (bf16: channels in multiples of 16;
  // fp32: of 8); with tile 4, as F(4x4, 3x3): (36, C_in, C_out)
  m.def("winograd_conv3x3_weight_grad(Tensor grad, Tensor x, int tile=2) -> (Tensor, Tensor)");
  // ReLU then training-mode BatchNorm, channels-last, CPU with AVX-512 (bf16 or float)
  // or AVX2 and FMA (float), the ReLU
  // recomputed from the pre-activation x: per-channel sums (2, C) float64 of (relu(x),
  // relu(x)^2) and of (grad, grad * relu(x)); relu(x) * scale + shift; and the input's
  // gradient, x > 0 ? grad * grad_scale + x * x_scale + offset : 0
  m.def("relu_moments(Tensor x) -> Tensor");
  m.def("relu_grad_moments(Tensor grad, Tensor x) -> Tensor");
  m.def("relu_affine(Tensor x, Tensor scale, Tensor shift) -> Tensor");
  m.def(
      "relu_affine_backward(Tensor grad, Tensor x, Tensor grad_scale, Tensor x_scale, "
      "Tensor offset) -> Tensor");
  // relu_affine_backward and relu_grad_moments in one pass: (input gradient, sums)
  m.def(
      "relu_affine_backward_moments(Tensor grad, Tensor x, Tensor grad_scale, Tensor x_scale, "
      "Tensor offset) -> (Tensor, Tensor)");
  // relu_affine followed by max_pool2x2 (same values and winners): (output, each winner's
  // relu(x), each window's winner 0..3 as uint8); and relu_affine_backward of
  // max_pool2x2_backward, the input's gradient at once
  m.def("relu_affine_max_pool(Tensor x, Tensor scale, Tensor shift) -> (Tensor, Tensor, Tensor)");
  m.def(
      "relu_affine_max_pool_backward(Tensor grad, Tensor where, Tensor x, Tensor grad_scale, "
      "Tensor x_scale, Tensor offset) -> Tensor");
  // A 3x3, stride-1, padding-1 convolution's weight gradient (C_out, C_in, 3, 3) and
  // bias gradient (C_out), float, from its output's gradient and its input: channels-last
  // bf16, CPU with AMX-BF16, channels in multiples of 32; with `windows`, also the output
  // gradient's sums over each tap's window (C_out, 3, 3): the output pixels whose tap
  // reads an input pixel inside the image
  m.def("conv3x3_weight_grad(Tensor grad, Tensor x, bool windows=False) -> Tensor[]");
  m.def("amx_tiles_usable() -> bool");
  // The same gradients (C_out, C_in, 3, 3) and (C_out), float, for fp32 channels-last
  // tensors with few input channels (a first layer), output channels in multiples of 8,
  // CPU with AVX2 and FMA
  m.def("conv3x3_narrow_weight_grad(Tensor grad, Tensor x) -> (Tensor, Tensor)");
}

static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
