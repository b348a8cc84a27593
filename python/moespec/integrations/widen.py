"""Function-preserving widening of a transformers MoE model's experts (real bytes, same function).

A small trained model fits in a CPU's caches, so its forwards cost Python and launches, not
bytes, and the effect moespec exists for (verification reads the union of the draft tokens'
experts) cannot show. `widen_experts` gives every routed expert a larger intermediate size while
leaving what the model computes unchanged:

- the gate and up projections get ``I_new - I`` extra rows each (random, with the spread of the
  trained rows, so they are real numbers to stream, not zeros a kernel could skip);
- the down projection gets ``I_new - I`` extra columns, all zero.

The extra intermediate units compute ``silu(g) * u`` from the extra rows, then contribute
``0 * h = 0`` to every output: the outputs are those of the trained model (bitwise for kernels that
sum the intermediate dimension in a fixed per-position order, as moespec's do; within rounding
for others), while every routed expert now streams ``I_new / I`` times its trained bytes.
The routing, acceptance and quality stay the trained model's; only the bytes are a larger model's.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .architectures import expert_layout, expert_weights, find_moe_blocks

__all__ = ["WidenInfo", "widen_experts"]


@dataclass(frozen=True)
class WidenInfo:
    """What `widen_experts` did: the model's trained and widened expert widths, the layers touched,
    the bytes of one expert before and after, and all experts' bytes after (every MoE layer)."""

    intermediate_size: int
    widened_size: int
    layers: int
    experts_per_layer: int
    expert_bytes_before: int
    expert_bytes_after: int
    total_expert_bytes: int
    seed: int

    @property
    def factor(self) -> float:
        return self.widened_size / self.intermediate_size

    def to_dict(self) -> dict:
        return asdict(self) | {"factor": self.factor}


@torch.no_grad()
def widen_experts(model: torch.nn.Module, intermediate_size: int, seed: int = 0) -> WidenInfo:
    """Widen every routed expert of ``model`` in place to ``intermediate_size`` (same outputs).

    Args:
        model: a transformers v5 MoE model with fused experts in the default layout
            (``gate_up_proj [E, 2I, H]`` gate rows first, ``down_proj [E, H, I]``; Qwen3-MoE, Qwen2-MoE,
            Mixtral, OLMoE), already in its final dtype and device.
        intermediate_size: the new per-expert intermediate size ``I_new >= I`` (``I_new == I``
            leaves the model as it is).
        seed: seed of the extra gate/up rows (drawn per layer, so the result does not depend on
            the order in which layers are visited).

    Returns:
        `WidenInfo`.

    Raises:
        ValueError: no supported MoE block, a layout other than the default one (transposed,
            interleaved, biases), experts of different widths, or ``intermediate_size < I``.
    """
    blocks = find_moe_blocks(model)
    if not blocks:
        raise ValueError("widen_experts: the model has no supported MoE block")
    if isinstance(intermediate_size, bool) or not isinstance(intermediate_size, int):
        raise ValueError(f"widen_experts: intermediate_size must be an int, got {intermediate_size!r}")
    widths = set()
    for name, block, _ in blocks:
        experts = block.experts
        layout = expert_layout(experts)
        w_gate_up, w_down, b_gate_up, b_down = expert_weights(experts)
        if layout is None or layout.transposed or layout.gate_up != "gate_up" or b_gate_up is not None \
                or b_down is not None:
            raise ValueError(f"widen_experts: the experts of {name!r} are not in the default layout "
                             "(gate_up_proj [E, 2I, H] gate-first, down_proj [E, H, I], no biases)")
        widths.add(w_down.shape[-1])
    if len(widths) != 1:
        raise ValueError(f"widen_experts: the MoE layers have different expert widths {sorted(widths)}")
    width = widths.pop()
    if intermediate_size < width:
        raise ValueError(f"widen_experts: intermediate_size {intermediate_size} is smaller than the experts' "
                         f"{width}; widening cannot shrink a model")
    before = after = total = 0
    n_experts = 0
    for ordinal, (_, block, _) in enumerate(blocks):
        experts = block.experts
        w_gate_up, w_down = experts.gate_up_proj, experts.down_proj
        E, two_i, H = w_gate_up.shape
        n_experts = E
        before = w_gate_up[0].numel() * w_gate_up.element_size() + w_down[0].numel() * w_down.element_size()
        if intermediate_size > width:
            new_gu = _widened_gate_up(w_gate_up, width, intermediate_size, seed * 1_000_003 + ordinal)
            new_down = torch.zeros((E, H, intermediate_size), dtype=w_down.dtype, device=w_down.device)
            new_down[:, :, :width] = w_down
            experts.gate_up_proj = torch.nn.Parameter(new_gu, requires_grad=False)
            experts.down_proj = torch.nn.Parameter(new_down, requires_grad=False)
            if hasattr(experts, "intermediate_dim"):
                experts.intermediate_dim = intermediate_size
        after = experts.gate_up_proj[0].numel() * experts.gate_up_proj.element_size() \
            + experts.down_proj[0].numel() * experts.down_proj.element_size()
        total += after * E
    cfg = getattr(model.config, "text_config", None) or model.config
    for attr in ("moe_intermediate_size", "intermediate_size"):
        if getattr(cfg, attr, None) == width:  # Mixtral-style configs name the expert width intermediate_size
            setattr(cfg, attr, intermediate_size)
            break
    return WidenInfo(width, intermediate_size, len(blocks), n_experts, before, after, total, seed)


def _widened_gate_up(w: torch.Tensor, width: int, new: int, seed: int) -> torch.Tensor:
    """``[E, 2*new, H]``: trained gate rows, extra gate rows, trained up rows, extra up rows."""
    E, _, H = w.shape
    out = torch.empty((E, 2 * new, H), dtype=w.dtype, device=w.device)
    out[:, :width] = w[:, :width]
    out[:, new:new + width] = w[:, width:]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    extra = new - width
    for e in range(E):  # one expert at a time: the fp32 scratch stays small at any width
        for lo, part in ((width, w[e, :width]), (new + width, w[e, width:])):
            std = float(part.float().std()) or 1e-2
            rows = torch.randn((extra, H), generator=gen, dtype=torch.float32) * std
            out[e, lo:lo + extra] = rows.to(device=w.device, dtype=w.dtype)
    return out
