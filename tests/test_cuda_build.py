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


def test_kernel_argument_fields_exist():
    """Every `a.<field> = ...` that moespec/kernels.py writes into PlanArgs / ExpertsArgs must exist in the
    bindings: a misspelt field would otherwise only fail on a GPU (pybind11 structs reject new attributes)."""
    import ast
    import inspect

    if not _cuda.cuda_compiled():
        pytest.skip("extension built without CUDA kernels")
    from moespec import kernels

    tree = ast.parse(inspect.getsource(kernels))
    structs = {"PlanArgs": _cuda._C.PlanArgs(), "ExpertsArgs": _cuda._C.ExpertsArgs()}
    checked = 0
    for fn in [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]:
        kinds: dict[str, str] = {}  # local name -> struct kind
        for node in ast.walk(fn):
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                src = ast.unparse(node.value)
                for kind in structs:
                    if src.endswith(f"{kind}()"):
                        kinds[node.targets[0].id] = kind
                if src.startswith("_plan_args("):
                    kinds[node.targets[0].id] = "PlanArgs"
        for node in ast.walk(fn):
            if isinstance(node, ast.Assign):
                targets = [e for t in node.targets for e in (t.elts if isinstance(t, ast.Tuple) else [t])]
                for t in targets:
                    if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id in kinds:
                        assert hasattr(structs[kinds[t.value.id]], t.attr), (
                            f"kernels.{fn.name} sets {kinds[t.value.id]}.{t.attr}, which the bindings do not define")
                        checked += 1
    assert checked >= 40, f"only {checked} field assignments found: the check no longer sees kernels.py's structure"
