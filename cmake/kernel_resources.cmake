# Static resource check of the CUDA kernels (tools/kernel_resources.py), for CUDA builds.
#
# Included by CMakeLists.txt once the moespec_cuda target exists. Adds the target
# moespec_kernel_resources (part of ALL) that compiles csrc/*.cu to cubins with `nvcc -Xptxas -v` for
# the configured architectures (_moespec_arch_list), refreshes docs/kernel-resources.md (registers,
# static shared memory, stack and spills per kernel; rows of other architectures are kept) and fails
# the build when a kernel spills to local memory. It runs next to the library's compile and again only
# when a kernel source, a header under csrc/include or the tool changes.
# Opt out: -DMOESPEC_RESOURCE_CHECK=OFF (pip: CMAKE_ARGS=-DMOESPEC_RESOURCE_CHECK=OFF, or
# -C cmake.define.MOESPEC_RESOURCE_CHECK=OFF).

option(MOESPEC_RESOURCE_CHECK
       "CUDA builds: fail on local-memory spills (ptxas -v) and refresh docs/kernel-resources.md" ON)

if(NOT MOESPEC_RESOURCE_CHECK OR NOT MOESPEC_WITH_CUDA OR NOT TARGET moespec_cuda)
  return()
endif()

get_filename_component(_kres_root "${CMAKE_CURRENT_LIST_DIR}/.." ABSOLUTE)
set(_kres_tool "${_kres_root}/tools/kernel_resources.py")
if(NOT EXISTS "${_kres_tool}")
  message(STATUS "moespec: ${_kres_tool} not found; kernel resource check disabled")
  return()
endif()
string(REPLACE ";" "," _kres_archs "${_moespec_arch_list}")
if(_kres_archs STREQUAL "")
  return()
endif()

# The same preprocessor view as moespec_cuda (CMakeLists.txt): CUTLASS headers when found.
set(_kres_extra "")
if(MOESPEC_CUTLASS_INCLUDE)
  list(APPEND _kres_extra "-I${MOESPEC_CUTLASS_INCLUDE}" "-DMOESPEC_HAVE_CUTLASS=1" "-DCUTE_USE_PACKED_TUPLE=1")
endif()
if(CMAKE_CUDA_HOST_COMPILER)
  list(APPEND _kres_extra --ccbin "${CMAKE_CUDA_HOST_COMPILER}")
endif()

file(GLOB _kres_deps CONFIGURE_DEPENDS "${_kres_root}/csrc/*.cu")
file(GLOB_RECURSE _kres_headers CONFIGURE_DEPENDS "${_kres_root}/csrc/include/*.cuh" "${_kres_root}/csrc/include/*.h")
list(APPEND _kres_deps ${_kres_headers} "${_kres_tool}")

set(_kres_stamp "${CMAKE_CURRENT_BINARY_DIR}/kernel_resources.stamp")
add_custom_command(
  OUTPUT "${_kres_stamp}"
  COMMAND "${Python_EXECUTABLE}" "${_kres_tool}" --write --quiet --archs "${_kres_archs}"
          --nvcc "${CMAKE_CUDA_COMPILER}" --out-dir "${CMAKE_CURRENT_BINARY_DIR}/kernel_resources"
          ${_kres_extra}
  COMMAND "${CMAKE_COMMAND}" -E touch "${_kres_stamp}"
  DEPENDS ${_kres_deps}
  WORKING_DIRECTORY "${_kres_root}"
  COMMENT "moespec: ptxas resource check of the CUDA kernels (sm ${_kres_archs}), docs/kernel-resources.md"
  VERBATIM)
add_custom_target(moespec_kernel_resources ALL DEPENDS "${_kres_stamp}")
