// Python bindings of the CUDA kernels: module diffusion_fast._C.
//
// No torch headers: arguments are raw device addresses and stream handles as Python ints, sizes and
// strides in elements, dtypes as codes (0 = float32, 1 = float16, 2 = bfloat16, -1 = absent). A failed
// launch raises diffusion_fast._C.KernelError (a RuntimeError) naming the kernel and the CUDA error.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <utility>

#include "launchers.h"

#ifndef DF_CUDA_ARCHS
#define DF_CUDA_ARCHS ""
#endif

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "CUDA kernels of diffusion_fast (raw pointers, sizes, strides and a stream; no torch ABI).";
  py::register_exception<df::KernelError>(m, "KernelError", PyExc_RuntimeError);
  m.attr("ARCHS") = std::string(DF_CUDA_ARCHS);

  m.def(
      "device_count",
      []() {
        std::string err;
        int n = df::device_count(&err);
        return std::make_pair(n, err);
      },
      "(number of CUDA devices the runtime sees, the error text when that query failed)");
  m.def("probe", &df::probe, py::arg("device"),
        "'' when the kernels can run on `device`, else the reason");
  m.def("compute_capability", &df::compute_capability, py::arg("device"));

  m.def("group_norm_vec", &df::group_norm_vec, py::arg("x"), py::arg("out"), py::arg("dtype"), py::arg("C"),
        py::arg("HW"), py::arg("channels_last"));
  m.def("group_norm_splits", &df::group_norm_splits, py::arg("N"), py::arg("C"), py::arg("HW"), py::arg("G"),
        py::arg("channels_last"), py::arg("vec"), py::arg("sm_count"));
  m.def("group_norm_workspace", &df::group_norm_workspace, py::arg("N"), py::arg("G"), py::arg("splits"));
  m.def("group_norm_nhwc_fits", &df::group_norm_nhwc_fits, py::arg("C"), py::arg("vec"));
  m.def("group_norm", &df::group_norm, py::arg("x"), py::arg("out"), py::arg("weight"), py::arg("bias"),
        py::arg("w_stride"), py::arg("b_stride"), py::arg("add"), py::arg("add_sn"), py::arg("add_sc"),
        py::arg("ws"), py::arg("dtype"), py::arg("param_dtype"), py::arg("add_dtype"), py::arg("N"),
        py::arg("C"), py::arg("HW"), py::arg("G"), py::arg("channels_last"), py::arg("eps"), py::arg("silu"),
        py::arg("vec"), py::arg("splits"), py::arg("device"), py::arg("stream"));

  m.def("sampler_step", &df::sampler_step, py::arg("x"), py::arg("mo"), py::arg("mo_dtype"), py::arg("cfg"),
        py::arg("coef"), py::arg("coef_stride"), py::arg("slots"), py::arg("slots_stride"),
        py::arg("slots_int64"), py::arg("hist"), py::arg("K"), py::arg("noise"), py::arg("noise_dtype"),
        py::arg("out"), py::arg("net"), py::arg("net_dtype"), py::arg("net_cfg"), py::arg("n"),
        py::arg("sm_count"), py::arg("device"), py::arg("stream"));

  m.def("attention_supports_head_dim", &df::attention_supports_head_dim, py::arg("D"));
  m.def("attention_path", &df::attention_path, py::arg("Sk"), py::arg("D"), py::arg("device"));
  m.def("attention", &df::attention, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"),
        py::arg("dtype"), py::arg("B"), py::arg("H"), py::arg("Sq"), py::arg("Sk"), py::arg("D"),
        py::arg("q_sb"), py::arg("q_ss"), py::arg("q_sh"), py::arg("k_sb"), py::arg("k_ss"), py::arg("k_sh"),
        py::arg("v_sb"), py::arg("v_ss"), py::arg("v_sh"), py::arg("o_sb"), py::arg("o_ss"), py::arg("o_sh"),
        py::arg("scale"), py::arg("device"), py::arg("stream"));
}
