"""Router-logit generators for layer benchmarks (docs/design.md §5: i.i.d. overstates the union).

Every generator returns fp32 router logits ``[T, E]`` on the CPU; the benchmark applies the
model's top-k (and the budget) to them, so the same logits drive every implementation.

Specs (``--routing``):

- ``iid``: independent standard-normal logits per token (uniform expert popularity).
- ``zipf[:S]``: a fixed Zipf popularity ``-S*log(rank)`` over a random expert order plus per-token
  noise (S defaults to 1.0).
- ``tree[:B[:RHO]]``: a draft tree with branching B (default 2) in breadth-first order; each
  token's logits are its parent's times RHO plus fresh noise (RHO defaults to 0.8), so tokens that
  share a prefix share experts. The root's parent is the last accepted token.
- ``replay:FILE``: windows of T consecutive tokens of a routing capture (`moespec capture`),
  cycling over the captured layers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

KINDS = ("iid", "zipf", "tree", "replay")


@dataclass
class RoutingGenerator:
    """A parsed ``--routing`` spec; call `logits(T, E, gen)` for one batch of router logits."""

    kind: str
    zipf: float = 1.0
    branching: int = 2
    rho: float = 0.8
    path: Optional[str] = None
    capture: Optional[dict] = field(default=None, repr=False)
    _cursor: int = 0

    @property
    def label(self) -> str:
        """Short description for tables and JSON."""
        if self.kind == "zipf":
            return f"zipf:{self.zipf:g}"
        if self.kind == "tree":
            return f"tree:{self.branching}:{self.rho:g}"
        if self.kind == "replay":
            return f"replay:{self.path}"
        return self.kind

    def logits(self, T: int, E: int, gen: torch.Generator) -> torch.Tensor:
        """``[T, E]`` fp32 router logits for one verification batch of T tokens."""
        if self.kind == "iid":
            return torch.randn(T, E, generator=gen)
        if self.kind == "zipf":
            ranks = torch.randperm(E, generator=gen).float() + 1.0
            return -self.zipf * torch.log(ranks) + torch.randn(T, E, generator=gen)
        if self.kind == "tree":
            return self._tree(T, E, gen)
        return self._replay(T, E, gen)

    def _tree(self, T: int, E: int, gen: torch.Generator) -> torch.Tensor:
        parents = tree_parents(T, self.branching)
        noise = torch.randn(T + 1, E, generator=gen)
        z = torch.empty(T + 1, E)
        z[0] = noise[0]  # the root: last accepted token
        keep = math.sqrt(max(0.0, 1.0 - self.rho ** 2))
        for i, p in enumerate(parents):
            z[i + 1] = self.rho * z[p + 1] + keep * noise[i + 1]
        return z[1:].contiguous()

    def _replay(self, T: int, E: int, gen: torch.Generator) -> torch.Tensor:
        cap = self.capture
        layers = cap["logits"]
        if int(cap["num_experts"]) != E:
            raise ValueError(f"routing capture {self.path} has E={cap['num_experts']} experts, the benchmarked "
                             f"shape has E={E}; use --shape with the capture's H,I,E,k or omit --models")
        n = layers[0].shape[0]
        if T > n:
            raise ValueError(f"routing capture {self.path} holds {n} tokens per layer, fewer than T={T}")
        # Deterministic walk over (layer, window) pairs so successive calls see different tokens.
        layer = self._cursor % len(layers)
        start = int(torch.randint(0, n - T + 1, (1,), generator=gen))
        self._cursor += 1
        return layers[layer][start:start + T].float()


def tree_parents(T: int, branching: int) -> list[int]:
    """Parents (-1 = root) of a breadth-first tree of T nodes with ``branching`` children per node."""
    return [(i // branching) - 1 for i in range(T)]


def parse_routing(spec: str) -> RoutingGenerator:
    """Parse a ``--routing`` spec (see the module docstring); raises `ValueError` on bad input."""
    text = spec.strip()
    kind, _, rest = text.partition(":")
    kind = kind.lower()
    try:
        if kind == "iid" and not rest:
            return RoutingGenerator("iid")
        if kind == "zipf":
            s = float(rest) if rest else 1.0
            if not 0 <= s < float("inf"):  # also refuses nan
                raise ValueError
            return RoutingGenerator("zipf", zipf=s)
        if kind == "tree":
            parts = rest.split(":") if rest else []
            b = int(parts[0]) if parts else 2
            rho = float(parts[1]) if len(parts) > 1 else 0.8
            if b < 1 or not 0.0 <= rho <= 1.0 or len(parts) > 2:
                raise ValueError
            return RoutingGenerator("tree", branching=b, rho=rho)
    except ValueError:
        raise ValueError(f"bad --routing {spec!r}: use iid, zipf[:S>=0], tree[:B>=1[:RHO in 0..1]] "
                         "or replay:FILE") from None
    if kind == "replay":
        if not rest:
            raise ValueError("--routing replay needs a file: replay:FILE (written by `moespec capture`)")
        from .capture import load_capture

        return RoutingGenerator("replay", path=rest, capture=load_capture(rest))
    raise ValueError(f"unknown --routing {spec!r}: use iid, zipf[:S], tree[:B[:RHO]] or replay:FILE")
