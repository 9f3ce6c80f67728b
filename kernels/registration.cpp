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
  // input, the weights' tiles packed (16, C_in / 2, C_out, 2), CPU with AVX512-BF16
  m.def("winograd_conv3x3(Tensor x, Tensor packed_weight, Tensor? bias) -> Tensor");
}

static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
