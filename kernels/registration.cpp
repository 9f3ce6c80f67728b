// The operator schema, in one TORCH_LIBRARY block, and the Python module stub that makes
// `import fastcifar._C` load this library (and so register the operators).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(fastcifar, m) {
  m.def(
      "augment_batch(Tensor images, Tensor index, Tensor dy, Tensor dx, Tensor flip, "
      "Tensor? cut_y, Tensor? cut_x, int pad, int cutout, float[] mean, float[] std, "
      "ScalarType dtype) -> Tensor");
}

static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
