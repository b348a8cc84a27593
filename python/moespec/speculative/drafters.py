"""Drafters: the `Drafter` protocol and two implementations.

- `DraftModelDrafter(small_model)`: a small causal LM sharing the target's vocabulary. Chains, and
  EAGLE-2-style dynamic trees (beam of `branching` nodes per depth by cumulative log-probability,
  then the best `nodes` of all candidates). Keeps its own KV cache, compacted to the accepted path.
- `PromptLookupDrafter(max_ngram, num_tokens)`: model-free n-gram lookup in the context; a chain
  from the most recent match, or a tree merging the continuations of several matches.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from ..integrations.hf_compat import forward_kwargs
from .tree import DraftConfig, DraftTree
from .verify import cache_length, check_cache_supported, compact_cache, crop_cache, tree_forward

__all__ = ["Drafter", "DraftModelDrafter", "PromptLookupDrafter", "vocab_sizes", "check_drafter_vocab"]


def vocab_sizes(model) -> tuple[int, int]:
    """``(rows, width)`` of a causal LM: token ids it can read (input embedding rows) and ids it can emit
    (width of its logits). Both fall back to ``config.vocab_size`` where the model does not expose them."""
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    fallback = getattr(cfg, "vocab_size", None)
    rows = width = None
    try:
        emb = model.get_input_embeddings()
        rows = getattr(emb, "num_embeddings", None) or int(emb.weight.shape[0])
    except Exception:  # noqa: BLE001 - not a transformers model, or no embedding table
        rows = None
    try:
        out = model.get_output_embeddings()
        width = getattr(out, "out_features", None) or int(out.weight.shape[0])
    except Exception:  # noqa: BLE001
        width = None
    rows = int(rows or fallback or 0)
    width = int(width or fallback or rows)
    if rows <= 0:
        raise ValueError(f"cannot tell the vocabulary size of {type(model).__name__} (no input embeddings, no "
                         "config.vocab_size)")
    return rows, width


def _vocab_of(tokenizer) -> dict:
    return dict(tokenizer.get_vocab())


def check_drafter_vocab(target, draft_model, target_tokenizer=None, draft_tokenizer=None,
                        require_tokenizers: bool = False):
    """Refuse a draft model whose token ids do not mean the target's; returns the id limit for its drafts.

    The rule (`moespec.speculative.generate` applies it to every `DraftModelDrafter`):

    - The draft model must read every token the target can emit: its embedding rows must be >= the
      width of the target's logits. A SMALLER draft vocabulary is refused: the first target token
      beyond it would crash the draft model's embedding.
    - A LARGER draft vocabulary is accepted when its ids map identically onto the target's (the same
      tokenizer, with extra or padding rows at the end); its drafts are then restricted to the ids the
      target can read, and the returned limit is that count (None when no restriction is needed).
    - With both tokenizers given they must agree on every id both vocabularies hold. With
      ``require_tokenizers`` (the CLI), vocabularies of different sizes are accepted only when both
      tokenizers are known and agree, since otherwise nothing shows the ids map identically.

    Raises:
        ValueError: naming both sizes (and the first differing token) and what would work.
    """
    t_rows, t_width = vocab_sizes(target)
    d_rows, d_width = vocab_sizes(draft_model)
    sizes = (f"the target has {t_width} token ids ({t_rows} embedding rows), the draft model {d_rows} "
             f"({d_width} logits)")
    if d_rows < t_width:
        raise ValueError(
            f"the draft model's vocabulary is smaller than the target's: {sizes}. It cannot read every token "
            "the target emits; use a draft model with the target's tokenizer and a vocabulary at least as large "
            "(a larger one is accepted when its first ids are the target's tokens), or the prompt-lookup drafter")
    if target_tokenizer is not None and draft_tokenizer is not None and target_tokenizer is not draft_tokenizer:
        tv, dv = _vocab_of(target_tokenizer), _vocab_of(draft_tokenizer)
        for tok, i in sorted(tv.items(), key=lambda kv: kv[1]):
            if i < d_rows and dv.get(tok) != i:
                where = "is missing" if tok not in dv else f"is id {dv[tok]}"
                raise ValueError(f"the draft model's tokenizer differs from the target's: token {tok!r} is id {i} "
                                 f"for the target but {where} for the draft model; speculative decoding needs the "
                                 "same token ids (use a draft model built with the target's tokenizer)")
        for tok, i in sorted(dv.items(), key=lambda kv: kv[1]):
            if i < t_rows and tv.get(tok) != i:
                raise ValueError(f"the draft model's tokenizer differs from the target's: token {tok!r} is id {i} "
                                 "for the draft model but not for the target; speculative decoding needs the same "
                                 "token ids")
    elif require_tokenizers and (d_rows, d_width) != (t_rows, t_width):
        missing = " and ".join(n for n, t in (("the target", target_tokenizer), ("the draft model", draft_tokenizer))
                               if t is None)
        raise ValueError(f"the draft model's vocabulary differs from the target's ({sizes}) and {missing} has no "
                         "tokenizer, so nothing shows that the ids mean the same tokens; use a draft model with the "
                         "target's tokenizer (for a tiny:ARCH target: tiny:ARCH or prompt-lookup)")
    return t_rows if d_width > t_rows else None


@runtime_checkable
class Drafter(Protocol):
    """What `moespec.speculative.generate` needs from a drafter.

    `context` is always the 1-D LongTensor of every token so far (prompt + emitted); its last
    token is the *root*, which the target has not processed yet. Drafts continue after it.

    - `begin(prompt)`: a new request starts (drop all per-request state).
    - `propose(context, config) -> DraftTree`: at most `config.nodes` nodes and `config.depth`
      levels, parents before children, distinct siblings. May return an empty tree.
    - `commit(context, tree, path)`: the target accepted `path` (node ids, root to leaf) of the
      tree just proposed for `context`; a stateful drafter keeps what it can (e.g. KV) of it.
    """

    def begin(self, prompt: torch.Tensor) -> None: ...

    def propose(self, context: torch.Tensor, config: DraftConfig) -> DraftTree: ...

    def commit(self, context: torch.Tensor, tree: DraftTree, path: list[int]) -> None: ...


class DraftModelDrafter:
    """Drafts with a small causal LM (same vocabulary as the target).

    Chains are greedy (`branching=1`). Trees follow EAGLE-2: at depth 1 take the top-`branching`
    tokens; at each further depth feed the frontier (one forward, tree mask), give each frontier
    node its top-`branching` children scored by cumulative log-probability, keep the best
    `branching` as the next frontier, and finally keep the best `nodes` of every candidate seen.
    A child never outscores its parent, so the kept set is ancestor-closed.
    """

    def __init__(self, model, temperature: float = 1.0):
        self.model = model
        self.temperature = float(temperature)
        # Drafts use token ids < vocab_limit only (None: all of the draft model's). `generate` sets it
        # when the draft vocabulary is larger than the target's (see `check_drafter_vocab`).
        self.vocab_limit: int | None = None
        self.cache = None
        self.ids: list[int] = []  # tokens whose KV is in `self.cache`, in order
        self._fed: dict[int, int] = {}  # node id -> cache row, for the last proposal
        self._fed_rows: dict[int, int] = {}
        self._ctx_len = 0

    def _new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def begin(self, prompt: torch.Tensor) -> None:
        self.cache = self._new_cache()
        self.ids = []
        self._fed = {}

    @torch.no_grad()
    def _catch_up(self, context: list[int]) -> torch.Tensor:
        """Bring the cache to `context` (reusing the longest cached prefix); log-probs after it."""
        if self.cache is None:
            self.begin(torch.tensor(context))
        n = 0
        limit = min(len(self.ids), len(context) - 1)  # always re-feed >= 1 token to get its logits
        while n < limit and self.ids[n] == context[n]:
            n += 1
        crop_cache(self.cache, n)
        self.ids = self.ids[:n]
        new = context[n:]
        tree = DraftTree.chain(new)
        logits = tree_forward(self.model, self.cache, tree, root=None)
        if n == 0:
            check_cache_supported(self.cache, who="draft")
        self.ids = list(context)
        return torch.log_softmax(logits[-1] / self.temperature, dim=-1)

    @torch.no_grad()
    def propose(self, context: torch.Tensor, config: DraftConfig) -> DraftTree:
        context = [int(t) for t in context.view(-1).tolist()]
        self._fed = {}
        self._ctx_len = len(context)
        if config.nodes <= 0 or config.depth <= 0:
            return DraftTree.empty()
        root_logp = self._limit(self._catch_up(context))
        self._fed_rows = {}  # candidate id -> draft cache row
        k = max(1, int(config.branching))

        # Candidate nodes, in creation order (so parents precede children).
        tokens: list[int] = []
        parents: list[int] = []
        scores: list[float] = []
        depth_of: list[int] = []

        top = torch.topk(root_logp, min(k, root_logp.numel()))
        frontier = []
        for lp, tok in zip(top.values.tolist(), top.indices.tolist()):
            tokens.append(tok), parents.append(-1), scores.append(lp), depth_of.append(1)
            frontier.append(len(tokens) - 1)

        for depth in range(2, config.depth + 1):
            # Feed the frontier: each node attends to the context, its fed ancestors and itself.
            logits = self._feed(frontier, tokens, parents)
            logp = self._limit(torch.log_softmax(logits / self.temperature, dim=-1))
            cand = []
            for row, f in enumerate(frontier):
                t = torch.topk(logp[row], min(k, logp.shape[-1]))
                for lp, tok in zip(t.values.tolist(), t.indices.tolist()):
                    cand.append((scores[f] + lp, f, tok))
            new_ids = []
            for s, f, tok in cand:
                tokens.append(tok), parents.append(f), scores.append(s), depth_of.append(depth)
                new_ids.append(len(tokens) - 1)
            # The next frontier: the best `k` new candidates by cumulative log-probability.
            new_ids.sort(key=lambda i: (-scores[i], i))
            frontier = new_ids[:k]

        # Keep the best `nodes` candidates; ties go to shallower / older nodes so parents win.
        order = sorted(range(len(tokens)), key=lambda i: (-scores[i], depth_of[i], i))
        chosen: set[int] = set()
        for i in order:
            if len(chosen) >= config.nodes:
                break
            if parents[i] < 0 or parents[i] in chosen:
                chosen.add(i)
        keep = sorted(chosen)
        remap = {old: new for new, old in enumerate(keep)}
        tree = DraftTree(
            [tokens[i] for i in keep],
            [-1 if parents[i] < 0 else remap[parents[i]] for i in keep],
            scores=[scores[i] for i in keep],
        )
        # Remember the cache rows of the kept nodes that were fed (for `commit`).
        self._fed = {remap[i]: row for i, row in self._fed_rows.items() if i in remap}
        return tree

    def _limit(self, logp: torch.Tensor) -> torch.Tensor:
        """Only the ids the target can read (`vocab_limit`) are draft candidates."""
        if self.vocab_limit is not None and logp.shape[-1] > self.vocab_limit:
            return logp[..., : self.vocab_limit]
        return logp

    def _feed(self, frontier: list[int], tokens: list[int], parents: list[int]) -> torch.Tensor:
        """Append the frontier nodes to the draft cache under a tree mask; their logits [F, V]."""
        past = cache_length(self.cache)
        device = next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype
        q = len(frontier)
        allowed = torch.zeros(q, past + q, dtype=torch.bool)
        allowed[:, : self._ctx_len] = True
        pos = []
        for r, f in enumerate(frontier):
            allowed[r, past + r] = True
            a, d = parents[f], 1
            while a >= 0:
                allowed[r, self._fed_rows[a]] = True
                a, d = parents[a], d + 1
            pos.append(self._ctx_len - 1 + d)
        mask = torch.zeros(q, past + q, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
        ids = torch.tensor([tokens[f] for f in frontier], dtype=torch.long, device=device).view(1, -1)
        out = self.model(
            input_ids=ids,
            attention_mask=mask.view(1, 1, q, past + q).to(device),
            position_ids=torch.tensor(pos, dtype=torch.long, device=device).view(1, -1),
            **forward_kwargs(self.model, self.cache, use_cache=True),
        )
        for r, f in enumerate(frontier):
            self._fed_rows[f] = past + r
        logits = out.logits[0]
        return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()

    def commit(self, context: torch.Tensor, tree: DraftTree, path: list[int]) -> None:
        """Compact the draft cache to context + the accepted nodes it already processed."""
        if self.cache is None:
            return
        n = self._ctx_len
        if cache_length(self.cache) <= n or not self._fed:
            crop_cache(self.cache, min(n, cache_length(self.cache)))
            self.ids = self.ids[: cache_length(self.cache)]
            self._reset_proposal()
            return
        rows = list(range(n))
        kept = []
        for node in path:
            if node not in self._fed:
                break  # fed nodes form a prefix of any root path
            rows.append(self._fed[node])
            kept.append(tree.tokens[node])
        compact_cache(self.cache, torch.tensor(rows, dtype=torch.long))
        self.ids = self.ids[:n] + kept
        self._reset_proposal()

    def _reset_proposal(self):
        self._fed = {}
        self._fed_rows = {}


class PromptLookupDrafter:
    """Model-free drafting from n-gram matches in the context (prompt lookup decoding).

    The last `n` tokens (n from `max_ngram` down to `min_ngram`) are searched earlier in the
    context; the tokens that followed a match are the draft. Chains use the most recent match of
    the longest n-gram; trees merge the continuations of up to `branching` matches into a trie.
    """

    def __init__(self, max_ngram: int = 3, num_tokens: int = 8, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError("need 1 <= min_ngram <= max_ngram")
        self.max_ngram = int(max_ngram)
        self.min_ngram = int(min_ngram)
        self.num_tokens = int(num_tokens)

    def begin(self, prompt: torch.Tensor) -> None:
        pass

    def commit(self, context: torch.Tensor, tree: DraftTree, path: list[int]) -> None:
        pass

    def _continuations(self, ctx: list[int], depth: int, want: int) -> list[list[int]]:
        conts: list[list[int]] = []
        seen: set[tuple[int, ...]] = set()
        L = len(ctx)
        for n in range(min(self.max_ngram, L - 1), self.min_ngram - 1, -1):
            tail = ctx[L - n:]
            # Most recent match first: recent text is the likeliest to repeat.
            for start in range(L - n - 1, -1, -1):
                if ctx[start:start + n] == tail:
                    cont = ctx[start + n:start + n + depth]
                    if cont and tuple(cont) not in seen:
                        seen.add(tuple(cont))
                        conts.append(cont)
                        if len(conts) >= want:
                            return conts
            if conts:
                return conts  # a longer n-gram match beats any shorter one
        return conts

    def propose(self, context: torch.Tensor, config: DraftConfig) -> DraftTree:
        depth = min(config.depth, self.num_tokens)
        if depth <= 0 or config.nodes <= 0:
            return DraftTree.empty()
        ctx = [int(t) for t in context.view(-1).tolist()]
        conts = self._continuations(ctx, depth, max(1, config.branching))
        if not conts:
            return DraftTree.empty()
        if config.is_chain:
            conts = conts[:1]
        return DraftTree.from_paths(conts, max_nodes=config.nodes)
