"""Where the compiled extension is, whether its CUDA kernels can run here, and why not.

Importing this module never fails: a missing or CUDA-less extension is reported, not raised.
"""
from __future__ import annotations

import functools
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
        return f"no usable CUDA device: {st['error'] or 'none found'}"
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
