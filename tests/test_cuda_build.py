"""CPU checks of the compiled extension: a CUDA build must export every kernel (no GPU needed)."""
from __future__ import annotations

import os

import pytest

from moespec import _cuda

KERNELS = ("expert_union", "score_experts", "budget_routing", "moe_experts")


def test_cuda_build_exports_all_kernels():
    """When the build asked for CUDA (MOESPEC_CUDA=ON) or compiled it, all four op kernels exist."""
    wanted = os.environ.get("MOESPEC_CUDA", "").upper() == "ON"
    if not wanted and not _cuda.cuda_compiled():
        pytest.skip("extension built without CUDA kernels and MOESPEC_CUDA=ON was not requested")
    assert _cuda.extension_loaded(), f"moespec._C failed to import: {_cuda._IMPORT_ERROR}"
    assert _cuda.cuda_compiled(), "MOESPEC_CUDA=ON but moespec._C was built without CUDA kernels"
    C = _cuda._C
    missing = [name for name in KERNELS if not hasattr(C, name)]
    assert not missing, f"moespec._C lacks kernels {missing}"
    for name in ("routing_plan", "PlanArgs", "ExpertsArgs", "plan_max_experts", "plan_max_topk"):
        assert hasattr(C, name), name


def test_kernels_module_imports_without_gpu():
    """`moespec.kernels` must import on a CPU-only machine (ops.py imports it lazily)."""
    from moespec import kernels

    assert callable(kernels.plan_routing) and callable(kernels.moe_experts_planned)
