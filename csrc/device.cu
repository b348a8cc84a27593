// Device discovery for `moespec info` and for the clear error raised when a CUDA op is called
// on a machine without a usable GPU.
#include <cuda_runtime_api.h>

#include "moespec/api.h"

namespace moespec {

DeviceStatus query_devices() {
  DeviceStatus s;
  cudaRuntimeGetVersion(&s.runtime_version);
  if (cudaDriverGetVersion(&s.driver_version) != cudaSuccess) s.driver_version = 0;
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    s.error = cudaGetErrorString(err);
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
    n = 0;
  }
  s.device_count = n;
  return s;
}

}  // namespace moespec
