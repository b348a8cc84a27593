// Host-side entry points of the moespec CUDA library, as seen by csrc/bindings.cpp.
// Plain C++ (no CUDA or torch headers): pointers travel as raw addresses, the stream as an
// opaque handle. Each launcher validates what it can cheaply and returns an error string
// instead of throwing across the library boundary.
#pragma once

#include <cstdint>
#include <string>

namespace moespec {

struct DeviceStatus {
  int device_count = 0;     // 0 when no usable GPU or driver
  int runtime_version = 0;  // CUDA runtime the library was linked with (e.g. 13000)
  int driver_version = 0;   // 0 when no driver is installed
  std::string error;        // empty on success; why no device is usable otherwise
};

// Never throws and never aborts, also on machines without a driver.
DeviceStatus query_devices();

}  // namespace moespec
