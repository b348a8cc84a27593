// The one pybind11 registration unit of moespec._C.
// Tensors cross this boundary as raw device addresses (Python ints) and the CUDA stream as an
// int handle, so the extension never links libtorch. All validation of shapes, dtypes and
// devices happens in python/moespec/ops.py before a launcher is called.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "moespec/api.h"

namespace py = pybind11;

#ifndef MOESPEC_CUDA_ARCHS_STR
#define MOESPEC_CUDA_ARCHS_STR ""
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "moespec native extension (torch-free CUDA kernels)";
#ifdef MOESPEC_WITH_CUDA
  m.attr("cuda_compiled") = true;
#else
  m.attr("cuda_compiled") = false;
#endif
#ifdef MOESPEC_HAVE_CUTLASS
  m.attr("cutlass") = true;
#else
  m.attr("cutlass") = false;
#endif
  m.attr("cuda_archs") = std::string(MOESPEC_CUDA_ARCHS_STR);

  m.def(
      "device_status",
      []() {
        py::dict d;
#ifdef MOESPEC_WITH_CUDA
        moespec::DeviceStatus s = moespec::query_devices();
        d["device_count"] = s.device_count;
        d["runtime_version"] = s.runtime_version;
        d["driver_version"] = s.driver_version;
        d["error"] = s.error;
#else
        d["device_count"] = 0;
        d["runtime_version"] = 0;
        d["driver_version"] = 0;
        d["error"] = std::string("moespec was built without CUDA kernels (MOESPEC_CUDA=OFF or no nvcc)");
#endif
        return d;
      },
      "Number of usable CUDA devices, runtime/driver versions and the error (if any) that hides them.");
}
