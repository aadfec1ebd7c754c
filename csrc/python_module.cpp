// Makes the op library importable as dyrate_ext._C; importing it runs the registrations in
// bindings.cpp. The ops themselves are reached through torch.ops.dyrate, not this module.
#include <Python.h>

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
