"""The MoE-layer implementations compared by ``moespec bench layer``, side by side on one routing.

Each implementation turns a `LayerCase` into a zero-argument callable returning ``y [T, H]``,
or gives the reason it cannot run here. ``routing`` says whether the timed call includes the
routing/budget step (moespec's full layer) or only the experts over the precomputed budgeted
routing (every baseline: that favours them).

- ``moespec``: the whole budgeted layer on the CUDA kernels (routing plan + grouped GEMMs),
  graph-capturable; ``moespec-experts`` / ``moespec-experts-atomic``: the CUDA expert kernels
  alone over a prebuilt plan (deterministic / atomic combine); ``moespec-plan``: the routing
  plan (scores, top-C, re-routing, CSR) alone, which has no output to check. These run the expert
  kernels of the generation ``MOESPEC_KERNELS`` selects (v1 by default); ``moespec-v2`` /
  ``moespec-experts-v2`` / ``moespec-experts-v2-atomic`` force generation 2 (docs/kernels-v2.md),
  so one run times both generations side by side.
- ``moespec-cpu``: the whole budgeted layer on the C++ CPU kernels (`moespec.cpu_kernels`: routing plan +
  grouped experts, preallocated plan and output); ``moespec-cpu-experts``: the CPU expert kernels alone
  over a prebuilt plan.
- ``reference``: `moespec.reference` (PyTorch), the whole budgeted layer.
- ``hf-eager`` / ``hf-grouped_mm`` / ``hf-batched_mm``: transformers' experts implementations
  (v5 layout only), over the same budgeted routing.
- ``torch-grouped_mm``: a lean experts forward on ``torch.nn.functional.grouped_mm``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .. import _cuda, ops
from ..types import ExpertLayout

IMPLEMENTATIONS = ("moespec", "moespec-v2", "moespec-experts", "moespec-experts-atomic", "moespec-experts-v2",
                   "moespec-experts-v2-atomic", "moespec-plan", "moespec-cpu",
                   "moespec-cpu-experts", "reference", "hf-eager", "hf-grouped_mm", "hf-batched_mm",
                   "torch-grouped_mm")
INCLUDES_ROUTING = {"moespec": True, "moespec-v2": True, "moespec-plan": True, "moespec-cpu": True, "reference": True}
# batched_mm materialises one weight copy per (token, slot) pair; beyond this it is skipped.
BATCHED_MM_MAX_BYTES = {"cuda": 16 << 30, "cpu": 1 << 30}


@dataclass
class LayerCase:
    """One benchmark case: inputs, weights and the budgeted routing all implementations share.

    ``ids``/``weights`` come from `moespec.ops.budget_routing` on ``logits``; ``baseline_ids``
    points zero-weight pairs (``truncate``) at a kept expert so baselines read only kept experts.
    """

    x: torch.Tensor
    logits: torch.Tensor
    w_gate_up: torch.Tensor
    w_down: torch.Tensor
    b_gate_up: Optional[torch.Tensor]
    b_down: Optional[torch.Tensor]
    top_k: int
    budget: Optional[int]
    policy: str
    renorm: bool
    layout: ExpertLayout
    ids: torch.Tensor
    weights: torch.Tensor
    kept: torch.Tensor
    baseline_ids: torch.Tensor

    @property
    def device(self) -> torch.device:
        return self.x.device


Builder = Callable[[LayerCase], Callable[[], torch.Tensor]]


class Unavailable(Exception):
    """The implementation cannot run for this case (the message says why)."""


def _need_cuda(case: LayerCase) -> None:
    if case.device.type != "cuda":
        raise Unavailable("needs a CUDA device")
    reason = _cuda.unavailable_reason()
    if reason:
        raise Unavailable(f"moespec CUDA kernels unavailable: {reason}")


def _moespec_fn(generation: Optional[str]) -> Builder:
    return lambda case: _moespec(case, generation)


def _moespec(case: LayerCase, generation: Optional[str] = None):
    _need_cuda(case)
    from .. import kernels

    T, E = case.logits.shape
    policy = case.policy if case.budget is not None else "substitute"
    if hasattr(kernels, "budgeted_moe_planned") and kernels.plan_supported(E, case.top_k):
        # Preallocated plan and output: no allocation or host sync, so the layer captures in a graph.
        plan = kernels.RoutingPlan.empty(T, E, case.top_k, case.device)
        out = torch.empty_like(case.x)

        def run():
            return kernels.budgeted_moe_planned(case.x, case.logits, case.w_gate_up, case.w_down, case.top_k,
                                                case.budget, policy, case.renorm, layout=case.layout,
                                                b_gate_up=case.b_gate_up, b_down=case.b_down, plan=plan,
                                                out=out, generation=generation)[0]
        return run
    if generation == "v2":
        raise Unavailable("this build has no planned API, so no generation 2")
    return lambda: ops.budgeted_moe(case.x, case.logits, case.w_gate_up, case.w_down, case.top_k, case.budget,
                                    policy, case.renorm, layout=case.layout, b_gate_up=case.b_gate_up,
                                    b_down=case.b_down, backend="cuda")[0]


def _moespec_experts_fn(deterministic: bool, generation: Optional[str] = None) -> Builder:
    def build(case: LayerCase):
        _need_cuda(case)
        from .. import kernels

        if hasattr(kernels, "plan_from_routing") and hasattr(kernels, "moe_experts_planned"):
            # Plan built once outside the timed call: this times the expert kernels alone.
            plan = kernels.plan_from_routing(case.ids, case.weights, case.w_gate_up.shape[0], case.kept)
            out = torch.empty_like(case.x)
            return lambda: kernels.moe_experts_planned(case.x, case.w_gate_up, case.w_down, plan, case.layout,
                                                       case.b_gate_up, case.b_down, deterministic, out, generation)
        if generation == "v2":
            raise Unavailable("this build has no planned API, so no generation 2")
        return lambda: ops.moe_experts(case.x, case.w_gate_up, case.w_down, case.ids, case.weights, case.kept,
                                       deterministic, case.layout, b_gate_up=case.b_gate_up, b_down=case.b_down,
                                       backend="cuda")
    return build


def _moespec_plan(case: LayerCase):
    _need_cuda(case)
    from .. import kernels

    if not hasattr(kernels, "plan_routing"):
        raise Unavailable("this build has no kernels.plan_routing")
    T, E = case.logits.shape
    plan = kernels.RoutingPlan.empty(T, E, case.top_k, case.device)
    policy = case.policy if case.budget is not None else "substitute"
    # Returns None: a routing plan has no layer output to compare.
    return lambda: (kernels.plan_routing(case.logits, case.top_k, case.budget, policy, case.renorm, plan=plan),
                    None)[1]


def _need_cpu_kernels(case: LayerCase) -> None:
    from .. import cpu_kernels

    if case.device.type != "cpu":
        raise Unavailable("the C++ CPU kernels need CPU tensors")
    reason = cpu_kernels.unavailable_reason()
    if reason:
        raise Unavailable(reason)


def _moespec_cpu(case: LayerCase):
    _need_cpu_kernels(case)
    from .. import cpu_kernels
    from ..kernels import RoutingPlan

    T, E = case.logits.shape
    policy = case.policy if case.budget is not None else "substitute"
    # Preallocated plan and output, as a decode loop would keep them: the layer allocates nothing.
    plan = RoutingPlan.empty(T, E, case.top_k, "cpu")
    out = torch.empty_like(case.x)
    return lambda: cpu_kernels.budgeted_moe_planned(case.x, case.logits, case.w_gate_up, case.w_down, case.top_k,
                                                    case.budget, policy, case.renorm, layout=case.layout,
                                                    b_gate_up=case.b_gate_up, b_down=case.b_down, plan=plan,
                                                    out=out)[0]


def _moespec_cpu_experts(case: LayerCase):
    _need_cpu_kernels(case)
    from .. import cpu_kernels

    # Plan built once outside the timed call: this times the expert kernels alone.
    plan = cpu_kernels.plan_from_routing(case.ids, case.weights, case.w_gate_up.shape[0], case.kept)
    out = torch.empty_like(case.x)
    return lambda: cpu_kernels.moe_experts_planned(case.x, case.w_gate_up, case.w_down, plan, case.layout,
                                                   case.b_gate_up, case.b_down, out)


def _reference(case: LayerCase):
    policy = case.policy if case.budget is not None else "substitute"
    return lambda: ops.budgeted_moe(case.x, case.logits, case.w_gate_up, case.w_down, case.top_k, case.budget,
                                    policy, case.renorm, layout=case.layout, b_gate_up=case.b_gate_up,
                                    b_down=case.b_down, backend="reference")[0]


def hf_experts_module(w_gate_up: torch.Tensor, w_down: torch.Tensor, implementation: str) -> torch.nn.Module:
    """A transformers ``Qwen3MoeExperts`` holding the given v5-layout weights (no copy).

    Built on the meta device so the real-size parameters are never allocated twice."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    E, two_i, H = w_gate_up.shape
    cfg = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=two_i // 2, num_experts=E, num_experts_per_tok=1)
    cfg._experts_implementation = implementation
    with torch.device("meta"):
        mod = Qwen3MoeExperts(cfg)
    mod.gate_up_proj = torch.nn.Parameter(w_gate_up, requires_grad=False)
    mod.down_proj = torch.nn.Parameter(w_down, requires_grad=False)
    return mod


def _hf(implementation: str) -> Builder:
    def build(case: LayerCase):
        if case.layout != ExpertLayout() or case.b_gate_up is not None:
            raise Unavailable("transformers experts baselines are timed for the v5 layout only")
        if implementation == "batched_mm":
            T, k = case.ids.shape
            E, two_i, H = case.w_gate_up.shape
            need = T * k * 3 * (two_i // 2) * H * case.w_gate_up.element_size()
            if need > BATCHED_MM_MAX_BYTES.get(case.device.type, 1 << 30):
                raise Unavailable(f"batched_mm would gather {need / 2**30:.1f} GiB of weight copies")
        mod = hf_experts_module(case.w_gate_up, case.w_down, implementation)
        w = case.weights.to(case.x.dtype)
        return lambda: mod(case.x, case.baseline_ids, w)
    return build


def torch_grouped_mm_experts(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, ids: torch.Tensor,
                             weights: torch.Tensor) -> torch.Tensor:
    """Experts forward with ``F.grouped_mm``: pairs sorted by expert, one grouped GEMM per projection."""
    T, k = ids.shape
    E = w_gate_up.shape[0]
    order = torch.argsort(ids.reshape(-1), stable=True)
    rows = x[order // k]
    ends = torch.cumsum(torch.bincount(ids.reshape(-1), minlength=E), 0).to(torch.int32)
    gate, up = F.grouped_mm(rows, w_gate_up.transpose(1, 2), offs=ends).chunk(2, dim=-1)
    h = F.grouped_mm(F.silu(gate) * up, w_down.transpose(1, 2), offs=ends)
    contrib = h.float() * weights.reshape(-1)[order].float().unsqueeze(1)
    y = torch.zeros(T, x.shape[1], dtype=torch.float32, device=x.device)
    y.index_add_(0, order // k, contrib)
    return y.to(x.dtype)


def _torch_grouped_mm(case: LayerCase):
    if not hasattr(F, "grouped_mm"):
        raise Unavailable(f"torch {torch.__version__} has no torch.nn.functional.grouped_mm")
    if case.layout != ExpertLayout() or case.b_gate_up is not None:
        raise Unavailable("timed for the v5 layout only")
    return lambda: torch_grouped_mm_experts(case.x, case.w_gate_up, case.w_down, case.baseline_ids, case.weights)


BUILDERS: dict[str, Builder] = {
    "moespec": _moespec_fn(None),
    "moespec-v2": _moespec_fn("v2"),
    "moespec-experts": _moespec_experts_fn(True),
    "moespec-experts-atomic": _moespec_experts_fn(False),
    "moespec-experts-v2": _moespec_experts_fn(True, "v2"),
    "moespec-experts-v2-atomic": _moespec_experts_fn(False, "v2"),
    "moespec-plan": _moespec_plan,
    "moespec-cpu": _moespec_cpu,
    "moespec-cpu-experts": _moespec_cpu_experts,
    "reference": _reference,
    "hf-eager": _hf("eager"),
    "hf-grouped_mm": _hf("grouped_mm"),
    "hf-batched_mm": _hf("batched_mm"),
    "torch-grouped_mm": _torch_grouped_mm,
}


def parse_impls(text: Optional[str]) -> list[str]:
    """``--impls`` (comma list or ``all``) -> names; `ValueError` on unknown names."""
    if not text or text.strip().lower() == "all":
        return list(IMPLEMENTATIONS)
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in BUILDERS]
    if bad:
        raise ValueError(f"unknown implementation(s) {', '.join(bad)}; choose from {', '.join(IMPLEMENTATIONS)}")
    return names
