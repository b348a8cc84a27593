"""Routed-expert shapes of the models in docs/design.md §5, and the reduced set used on CPU."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Optional


@dataclass(frozen=True)
class LayerShape:
    """One MoE layer's routed experts.

    Attributes:
        name: preset name or ``"custom"``.
        H, I, E, k: hidden size, expert width, routed experts, experts per token.
        renorm: the model renormalises the top-k weights.
        layout: ``"v5"`` (transformers v5 fused gate/up) or ``"gpt_oss"`` (transposed, interleaved,
            clamped SwiGLU, biases).
        moe_layers: MoE layers in the model (to scale one layer's bytes to the whole model).
        note: free text (router type, shared experts), for the report only.
        scale: 1 for the real shape; the divisor of H and I for a reduced CPU shape.
    """

    name: str
    H: int
    I: int  # noqa: E741 - the conventional name of the expert width
    E: int
    k: int
    renorm: bool = True
    layout: str = "v5"
    moe_layers: int = 1
    note: str = ""
    scale: int = 1

    @property
    def bias(self) -> bool:
        return self.layout == "gpt_oss"

    def expert_bytes(self, elem_size: int) -> int:
        """Bytes of one expert's weights (gate, up, down; biases for gpt-oss)."""
        n = 3 * self.H * self.I + ((2 * self.I + self.H) if self.bias else 0)
        return n * elem_size

    def reduced(self, factor: int) -> "LayerShape":
        """The same router (E, k) with H and I divided by ``factor`` (rounded to multiples of 8)."""
        if factor <= 1:
            return self

        def shrink(v: int) -> int:
            return max(8, (v // factor) // 8 * 8)

        return replace(self, H=shrink(self.H), I=shrink(self.I), scale=self.scale * factor)

    def to_dict(self) -> dict:
        """JSON-serialisable fields."""
        return asdict(self)


# docs/design.md §5 table. DeepSeek's sigmoid/group-limited routers and the shared experts change which
# experts win, not the bytes of the routed experts, so all presets use softmax top-k routing.
PRESETS: dict[str, LayerShape] = {s.name: s for s in (
    LayerShape("mixtral-8x7b", 4096, 14336, 8, 2, True, "v5", 32, "softmax, renormalise"),
    LayerShape("qwen1.5-moe-a2.7b", 2048, 1408, 60, 4, False, "v5", 24, "1 shared expert x 5632 (not timed)"),
    LayerShape("qwen2-57b-a14b", 3584, 2560, 64, 8, False, "v5", 28, "1 shared expert x 20480 (not timed)"),
    LayerShape("qwen3-30b-a3b", 2048, 768, 128, 8, True, "v5", 48, "renormalise"),
    LayerShape("qwen3-235b-a22b", 4096, 1536, 128, 8, True, "v5", 94, "renormalise"),
    LayerShape("olmoe-1b-7b", 2048, 1024, 64, 8, False, "v5", 16, "no renormalise"),
    LayerShape("deepseek-v2-lite", 2048, 1408, 64, 6, False, "v5", 26, "2 shared experts (not timed)"),
    LayerShape("deepseek-v3", 7168, 2048, 256, 8, False, "v5", 58, "sigmoid+bias router approximated by softmax"),
    LayerShape("gpt-oss-20b", 2880, 2880, 32, 4, True, "gpt_oss", 24, "clamped SwiGLU, biases"),
    LayerShape("gpt-oss-120b", 2880, 2880, 128, 4, True, "gpt_oss", 36, "clamped SwiGLU, biases"),
)}

GPU_DEFAULT_MODELS = ("qwen3-30b-a3b", "olmoe-1b-7b", "mixtral-8x7b", "deepseek-v3", "gpt-oss-120b")
CPU_DEFAULT_MODELS = ("qwen3-30b-a3b", "olmoe-1b-7b")
# On CPU the layers are timed with H and I divided by this (routing, E and k unchanged).
CPU_REDUCTION = 16


def parse_shape(text: str) -> LayerShape:
    """``"H,I,E,k"`` (optionally ``",gpt_oss"`` or ``",norenorm"``) -> a custom `LayerShape`."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if len(parts) < 4:
        raise ValueError(f"--shape needs H,I,E,k (e.g. 2048,768,128,8), got {text!r}")
    try:
        H, I, E, k = (int(p) for p in parts[:4])  # noqa: E741
    except ValueError:
        raise ValueError(f"--shape needs four integers H,I,E,k, got {text!r}") from None
    if min(H, I, E, k) < 1 or k > E:
        raise ValueError(f"--shape needs positive H,I,E,k with k <= E, got {text!r}")
    layout, renorm = "v5", True
    for flag in parts[4:]:
        if flag == "gpt_oss":
            layout = "gpt_oss"
        elif flag == "norenorm":
            renorm = False
        else:
            raise ValueError(f"unknown --shape flag {flag!r} (use gpt_oss or norenorm)")
    return LayerShape(f"custom-{H}x{I}x{E}x{k}", H, I, E, k, renorm, layout)


def get_preset(name: str) -> LayerShape:
    """The preset called ``name`` (case-insensitive), or a `ValueError` listing the choices."""
    key = name.strip().lower()
    if key not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose from {', '.join(PRESETS)} or use --shape H,I,E,k")
    return PRESETS[key]


def select_shapes(models: Optional[str], shape: Optional[str], on_gpu: bool, reduce: Optional[int]) -> list[LayerShape]:
    """Shapes to benchmark: ``--models`` presets and/or a ``--shape``; defaults per device.

    ``reduce`` divides H and I of the presets (None: 1 on GPU, `CPU_REDUCTION` on CPU)."""
    presets: list[LayerShape] = []
    if models:
        names = list(PRESETS) if models.strip().lower() == "all" else models.split(",")
        presets += [get_preset(n) for n in names if n.strip()]
    if not models and not shape:
        presets = [PRESETS[n] for n in (GPU_DEFAULT_MODELS if on_gpu else CPU_DEFAULT_MODELS)]
    factor = reduce if reduce is not None else (1 if on_gpu else CPU_REDUCTION)
    out = [s.reduced(factor) for s in presets]
    if shape:
        # A shape the user typed is taken literally unless --reduce says otherwise.
        out.append(parse_shape(shape).reduced(reduce or 1))
    return out
