// qwenvl_megatron._indexed: the C++ indexed-dataset reader and the sample-order helpers.
#include <pybind11/pybind11.h>

namespace py = pybind11;

namespace qwenvl {
void register_indexed_reader(py::module_& m);
void register_sample_order(py::module_& m);
}  // namespace qwenvl

PYBIND11_MODULE(_indexed, m) {
  m.doc() = "Memory-mapped multimodal indexed dataset reader and on-the-fly sample order (C++).";
  m.attr("FORMAT_VERSION") = 1;
  qwenvl::register_indexed_reader(m);
  qwenvl::register_sample_order(m);
}
