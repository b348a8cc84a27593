"""Print the CUTLASS/CuTe include directory shipped by the pinned `nvidia-cutlass` wheel.

Used by CMakeLists.txt at configure time. The package is located without importing it
(importing pulls in cuda-python); exit status 1 when it is not installed.
"""
import importlib.util
import os
import sys

spec = importlib.util.find_spec("cutlass_library")
if spec is None or not spec.submodule_search_locations:
    sys.exit(1)
include = os.path.join(list(spec.submodule_search_locations)[0], "source", "include")
if not os.path.isfile(os.path.join(include, "cutlass", "version.h")):
    sys.exit(1)
print(include)
