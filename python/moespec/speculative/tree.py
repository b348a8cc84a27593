"""Draft shapes (`DraftConfig`) and draft trees (`DraftTree`).

A draft tree hangs below a *root*: the last emitted token, which the target has not processed yet.
Nodes are numbered 0..N-1 in an order where every parent precedes its children; `parents[i] == -1`
means the parent is the root. A chain is the tree whose node i has parent i-1.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, Sequence

import torch

__all__ = ["DraftConfig", "DraftTree"]


@dataclass(frozen=True)
class DraftConfig:
    """Shape of the draft proposed each iteration.

    depth:     longest root-to-leaf path (the chain length K for a chain).
    branching: children expanded per node / beam width per depth (1 = chain).
    nodes:     total draft nodes, root excluded (defaults to `depth` for a chain, and to
               `depth * branching` for a tree).
    """

    depth: int = 4
    branching: int = 1
    nodes: int | None = None

    def __post_init__(self):
        if self.depth < 0 or self.branching < 1:
            raise ValueError(f"DraftConfig needs depth >= 0 and branching >= 1, got {self}")
        if self.nodes is None:
            object.__setattr__(self, "nodes", self.depth * self.branching)
        if self.nodes < 0:
            raise ValueError(f"DraftConfig needs nodes >= 0, got {self}")
        if self.depth == 0 or self.nodes == 0:
            object.__setattr__(self, "depth", 0)
            object.__setattr__(self, "nodes", 0)

    @classmethod
    def chain(cls, k: int) -> "DraftConfig":
        """A chain of k draft tokens."""
        return cls(depth=k, branching=1, nodes=k)

    @classmethod
    def tree(cls, depth: int, branching: int, nodes: int | None = None) -> "DraftConfig":
        """A dynamic tree: `branching` children per expanded node, at most `nodes` nodes in all."""
        return cls(depth=depth, branching=branching, nodes=nodes)

    @classmethod
    def coerce(cls, draft: "DraftConfig | int | dict | None", default_k: int = 4) -> "DraftConfig":
        """Accept a DraftConfig, an int (chain length) or a dict of fields."""
        if draft is None:
            return cls.chain(default_k)
        if isinstance(draft, DraftConfig):
            return draft
        if isinstance(draft, int):
            return cls.chain(draft)
        if isinstance(draft, dict):
            return cls(**draft)
        raise TypeError(f"draft must be a DraftConfig, an int or a dict, not {type(draft).__name__}")

    @property
    def is_chain(self) -> bool:
        return self.branching == 1

    @property
    def size(self) -> int:
        """The controller's "K": draft nodes (the chain length for chains)."""
        return int(self.nodes)

    def sized(self, k: int) -> "DraftConfig":
        """The same shape scaled to k nodes (a chain of k; a tree capped at k nodes and depth)."""
        if k <= 0:
            return replace(self, depth=0, nodes=0)
        if self.is_chain:
            return DraftConfig.chain(k)
        return DraftConfig(depth=min(self.depth, k), branching=self.branching, nodes=k)

    def to_dict(self) -> dict:
        return {"depth": self.depth, "branching": self.branching, "nodes": self.nodes}


class DraftTree:
    """Draft tokens with parent links (parents precede children; -1 = root)."""

    def __init__(self, tokens: Sequence[int] | torch.Tensor, parents: Sequence[int],
                 scores: Sequence[float] | None = None):
        tokens = [int(t) for t in (tokens.tolist() if isinstance(tokens, torch.Tensor) else tokens)]
        parents = [int(p) for p in parents]
        if len(tokens) != len(parents):
            raise ValueError("tokens and parents must have the same length")
        depths = []
        for i, p in enumerate(parents):
            if not -1 <= p < i:
                raise ValueError(f"node {i} has parent {p}: parents must precede children")
            depths.append(1 if p < 0 else depths[p] + 1)
        self.tokens = tokens
        self.parents = parents
        self.depths = depths
        self.scores = list(scores) if scores is not None else None

    # --- construction -------------------------------------------------------------------
    @classmethod
    def empty(cls) -> "DraftTree":
        return cls([], [])

    @classmethod
    def chain(cls, tokens: Iterable[int]) -> "DraftTree":
        tokens = [int(t) for t in tokens]
        return cls(tokens, list(range(-1, len(tokens) - 1)))

    @classmethod
    def from_paths(cls, paths: Iterable[Sequence[int]], max_nodes: int | None = None) -> "DraftTree":
        """Merge token paths (each continuing the root) into a trie, in the given priority order.

        Shared prefixes become shared nodes, so siblings are always distinct tokens. Stops adding
        nodes once `max_nodes` is reached (a path may then be cut short)."""
        tokens: list[int] = []
        parents: list[int] = []
        child: dict[tuple[int, int], int] = {}
        for path in paths:
            cur = -1
            for t in path:
                t = int(t)
                nxt = child.get((cur, t))
                if nxt is None:
                    if max_nodes is not None and len(tokens) >= max_nodes:
                        break
                    nxt = len(tokens)
                    tokens.append(t)
                    parents.append(cur)
                    child[(cur, t)] = nxt
                cur = nxt
        return cls(tokens, parents)

    # --- queries ------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def depth(self) -> int:
        return max(self.depths, default=0)

    def children(self, node: int) -> list[int]:
        """Children of `node` (-1 = root) in node order."""
        return [i for i, p in enumerate(self.parents) if p == node]

    def path_to(self, node: int) -> list[int]:
        """Node ids from the root's child down to `node` (empty for the root)."""
        path = []
        while node >= 0:
            path.append(node)
            node = self.parents[node]
        return path[::-1]

    def is_chain(self) -> bool:
        return all(p == i - 1 for i, p in enumerate(self.parents))

    # --- verification inputs -----------------------------------------------------------
    def ancestor_matrix(self) -> torch.Tensor:
        """Boolean [N+1, N+1] over (root, nodes...): entry (i, j) is True when j is i or an ancestor of i."""
        n = len(self) + 1
        m = torch.zeros(n, n, dtype=torch.bool)
        m[:, 0] = True
        for i, p in enumerate(self.parents):
            r = i + 1
            m[r, r] = True
            if p >= 0:
                m[r] |= m[p + 1]
        return m

    def attention_mask(self, past: int, dtype: torch.dtype, device=None, include_root: bool = True) -> torch.Tensor:
        """Additive float mask [1, 1, q, past + q] (0 = attend, dtype-min = blocked).

        Float rather than bool because eager attention adds the mask to the scores and silently
        misreads a boolean one."""
        anc = self.ancestor_matrix()
        if not include_root:
            anc = anc[1:, 1:]
        q = anc.shape[0]
        allowed = torch.cat([torch.ones(q, past, dtype=torch.bool), anc], dim=1)
        mask = torch.zeros(q, past + q, dtype=dtype)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        return mask.view(1, 1, q, past + q).to(device)

    def position_ids(self, past: int, device=None, include_root: bool = True) -> torch.Tensor:
        """[1, q]: past + depth (root depth 0)."""
        d = ([0] if include_root else []) + self.depths
        off = 0 if include_root else -1
        return (torch.tensor(d, dtype=torch.long) + past + off).view(1, -1).to(device)

    def input_ids(self, root: int | None, device=None) -> torch.Tensor:
        """[1, q]: the root token (when given) followed by the node tokens."""
        ids = ([int(root)] if root is not None else []) + self.tokens
        return torch.tensor(ids, dtype=torch.long, device=device).view(1, -1)

    def to_dict(self) -> dict:
        return {"tokens": list(self.tokens), "parents": list(self.parents)}

    def __repr__(self) -> str:
        return f"DraftTree(n={len(self)}, depth={self.depth}, tokens={self.tokens}, parents={self.parents})"
