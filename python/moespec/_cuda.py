"""Where the compiled extension is, whether its CUDA kernels can run here, and why not.

Importing this module never fails: a missing or CUDA-less extension is reported, not raised.
"""
from __future__ import annotations

import functools
import glob
from typing import Optional

try:  # the extension is optional at import time (e.g. a source checkout that was never built)
    from . import _C  # type: ignore[attr-defined]

    _IMPORT_ERROR: Optional[str] = None
except ImportError as exc:  # pragma: no cover - depends on how moespec was installed
    _C = None
    _IMPORT_ERROR = str(exc)


def extension_loaded() -> bool:
    """True when ``moespec._C`` imported."""
    return _C is not None


def cuda_compiled() -> bool:
    """True when the extension was built with the CUDA kernels."""
    return bool(_C is not None and _C.cuda_compiled)


def backend() -> str:
    """Which kernels the extension holds: ``"cuda"`` (GPU), ``"emu"`` (the same kernel sources built
    for the CPU emulator, MOESPEC_CUDA=EMU), ``"none"`` (reference only) or ``"missing"`` (no extension)."""
    if _C is None:
        return "missing"
    return str(getattr(_C, "backend", "cuda" if _C.cuda_compiled else "none"))


def emu_compiled() -> bool:
    """True when the extension is an emulation build: `moespec.kernels` runs on CPU tensors."""
    return backend() == "emu"


def compiled_archs() -> list[str]:
    """Architectures the kernels were compiled for, e.g. ``["80", "90a"]``."""
    if _C is None or not _C.cuda_archs:
        return []
    return str(_C.cuda_archs).split(",")


def cutlass_enabled() -> bool:
    """True when the extension was compiled against the CUTLASS/CuTe headers."""
    return bool(_C is not None and _C.cutlass)


@functools.lru_cache(maxsize=1)
def device_status() -> dict:
    """``{device_count, runtime_version, driver_version, error}`` as seen by the extension."""
    if _C is None:
        return {"device_count": 0, "runtime_version": 0, "driver_version": 0,
                "error": f"moespec._C is not importable: {_IMPORT_ERROR}"}
    return dict(_C.device_status())


def nvidia_device_nodes() -> list[str]:
    """The NVIDIA device files present (``/dev/nvidia0``, ``/dev/nvidiactl``, ...); empty without a driver."""
    return sorted(glob.glob("/dev/nvidia*"))


@functools.lru_cache(maxsize=1)
def libcuda_loadable() -> bool:
    """True when the NVIDIA driver library ``libcuda.so.1`` can be loaded (it ships with the driver)."""
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


def device_problem(status: dict, libcuda: Optional[bool] = None, device_nodes: Optional[list] = None) -> str:
    """Why ``status`` (a `device_status` dict with no usable device) shows no GPU, in words.

    ``driver_version == 0`` means the CUDA runtime found no driver at all; with no ``libcuda.so.1``
    and no ``/dev/nvidia*`` that is "no NVIDIA driver / GPU", whatever the runtime's error text
    (which says "driver version is insufficient" in that case too). A real version mismatch keeps
    the runtime's message together with both versions."""
    libcuda = libcuda_loadable() if libcuda is None else libcuda
    nodes = nvidia_device_nodes() if device_nodes is None else device_nodes
    err = status.get("error") or ""
    driver, runtime = int(status.get("driver_version") or 0), int(status.get("runtime_version") or 0)
    if driver == 0:
        if not libcuda and not nodes:
            return "no NVIDIA driver / GPU found (no libcuda.so.1, no /dev/nvidia* device)"
        if not libcuda:
            return (f"no NVIDIA driver library (libcuda.so.1) found, although {', '.join(nodes[:3])} exist"
                    f"{': ' + err if err else ''}")
        return f"the NVIDIA driver did not initialise ({err or 'no driver version reported'})"
    if runtime and driver < runtime:
        return (f"{err or 'CUDA driver version is insufficient for CUDA runtime version'} (driver supports CUDA "
                f"{_version(driver)}, moespec was built with the CUDA {_version(runtime)} runtime): update the "
                "NVIDIA driver or rebuild moespec with an older CUDA toolkit")
    return err or "no CUDA device found"


def _version(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"


def unavailable_reason() -> Optional[str]:
    """Why the CUDA kernels cannot run here, or None when they can."""
    if _C is None:
        return f"the moespec extension (moespec._C) failed to import: {_IMPORT_ERROR}"
    if emu_compiled():
        return ("moespec was built for the CPU emulator (MOESPEC_CUDA=EMU): the kernels run on CPU tensors with "
                "backend='emu'; reinstall with MOESPEC_CUDA=ON for a GPU")
    if not _C.cuda_compiled:
        return ("moespec was built without CUDA kernels (no nvcc at build time or MOESPEC_CUDA=OFF); "
                "reinstall with nvcc on PATH or MOESPEC_CUDA=ON")
    st = device_status()
    if st["device_count"] <= 0:
        return f"no usable CUDA device: {device_problem(st)}"
    return None


def available() -> bool:
    """True when the CUDA kernels are compiled and a GPU is visible."""
    return unavailable_reason() is None


def require(op: str = "this op") -> None:
    """Raise a `RuntimeError` that says why ``op`` cannot run on CUDA here."""
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"moespec: cannot run {op} with the CUDA kernels: {reason}")


def has_kernel(name: str) -> bool:
    """True when the extension exports the CUDA launcher ``name`` (kernels land op by op)."""
    return _C is not None and bool(_C.cuda_compiled) and hasattr(_C, name)


def has_emu_kernel(name: str) -> bool:
    """True when an emulation build exports the launcher ``name``."""
    return emu_compiled() and hasattr(_C, name)


def require_emu(op: str = "this op") -> None:
    """Raise a `RuntimeError` unless the kernels can run on the CPU emulator here."""
    if not emu_compiled():
        raise RuntimeError(f"moespec: cannot run {op} on the emulator: this moespec was built with backend "
                           f"'{backend()}'; reinstall with MOESPEC_CUDA=EMU to run the kernels on CPU tensors")
