"""Record a real model run's per-layer router logits, for ``bench layer --routing replay:FILE``.

File format (``torch.save`` of a plain dict, loadable with ``weights_only=True``)::

    {"format": "moespec-routing/1", "model": str, "hidden_size": H, "intermediate_size": I,
     "num_experts": E, "top_k": k, "renorm": bool, "layout": "v5" | "gpt_oss",
     "num_layers": L, "tokens": N, "logits": [fp16 tensor [N, E] per MoE layer],
     "topk_ids": [int16 tensor [N, k] per MoE layer]}

Tokens are the concatenation of every prompt's tokens in order, so consecutive rows are
consecutive tokens of one text (what a draft chain verifies), except at prompt boundaries.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch

from .shapes import LayerShape

FORMAT = "moespec-routing/1"


def model_moe_config(model) -> dict:
    """H, I, E, k, renorm and layout read from a transformers MoE config."""
    cfg = getattr(model.config, "text_config", None) or model.config
    E = next((getattr(cfg, n) for n in ("num_experts", "num_local_experts", "n_routed_experts")
              if isinstance(getattr(cfg, n, None), int)), None)
    if E is None:
        raise ValueError("the model has no routed experts in its config (not an MoE model?)")
    inter = getattr(cfg, "moe_intermediate_size", None) or getattr(cfg, "intermediate_size")
    model_type = getattr(cfg, "model_type", "")
    return {
        "hidden_size": int(cfg.hidden_size),
        "intermediate_size": int(inter),
        "num_experts": int(E),
        "top_k": int(cfg.num_experts_per_tok),
        "renorm": bool(getattr(cfg, "norm_topk_prob", True)),
        "layout": "gpt_oss" if model_type == "gpt_oss" else "v5",
        "model_type": model_type,
    }


@torch.no_grad()
def capture_routing(model, sequences: Iterable[torch.Tensor], name: str = "model") -> dict:
    """Run ``model`` on each 1-D token tensor and return the capture dict (see module docstring)."""
    meta = model_moe_config(model)
    device = next(model.parameters()).device
    per_layer: list[list[torch.Tensor]] = []
    n = 0
    for ids in sequences:
        ids = torch.as_tensor(ids, dtype=torch.long).view(1, -1).to(device)
        try:
            out = model(input_ids=ids, output_router_logits=True)
        except TypeError as exc:
            raise ValueError(f"this model does not return router logits (output_router_logits): {exc}") from None
        logits = getattr(out, "router_logits", None)
        if not logits:
            raise ValueError("this model does not return router logits (output_router_logits=True gave none)")
        if not per_layer:
            per_layer = [[] for _ in logits]
        for layer, z in enumerate(logits):
            per_layer[layer].append(z.reshape(-1, z.shape[-1]).float().cpu())
        n += ids.shape[1]
    if not per_layer:
        raise ValueError("no tokens to capture")
    k = meta["top_k"]
    logits = [torch.cat(chunks).to(torch.float16) for chunks in per_layer]
    return {
        "format": FORMAT, "model": str(name), **meta, "num_layers": len(logits), "tokens": n,
        "logits": logits,
        "topk_ids": [torch.topk(z.float(), k, dim=-1).indices.to(torch.int16) for z in logits],
    }


def save_capture(capture: dict, path: str | Path) -> Path:
    """Write a capture dict; creates parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(capture, path)
    return path


def load_capture(path: str | Path) -> dict:
    """Read and check a capture file; raises `ValueError` with a clear message on a bad file."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"routing capture {path} does not exist (write one with `moespec capture`)")
    try:
        cap = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling problem means "not a capture"
        raise ValueError(f"{path} is not a moespec routing capture: {type(exc).__name__}: {exc}") from None
    if not isinstance(cap, dict) or cap.get("format") != FORMAT:
        raise ValueError(f"{path} is not a moespec routing capture (format {FORMAT})")
    return cap


def shape_from_capture(cap: dict) -> LayerShape:
    """The `LayerShape` of the captured model (for replay without ``--models``/``--shape``)."""
    return LayerShape(f"capture:{cap['model']}", int(cap["hidden_size"]), int(cap["intermediate_size"]),
                      int(cap["num_experts"]), int(cap["top_k"]), bool(cap["renorm"]), cap.get("layout", "v5"),
                      int(cap["num_layers"]), "replayed routing")
