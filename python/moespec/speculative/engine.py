"""`generate`: the speculative decoding loop (draft -> verify the tree in one forward -> accept -> compact)."""
from __future__ import annotations

import contextlib
import time
import warnings
from typing import Any, Callable, Sequence

import torch

from ..integrations.hf_compat import forward_kwargs
from .budget import BudgetSession, num_experts
from .cascade import CascadeController, make_controller
from .cascade_state import cascade_key, resolve_state
from .drafters import DraftModelDrafter, Drafter, PromptLookupDrafter, check_drafter_vocab, vocab_sizes
from .stats import IterationStats, SpecStats
from .tree import DraftConfig, DraftTree
from .verify import (accept_greedy, accept_sampling, cache_length, check_cache_supported, compact_cache, target_probs,
                     tree_forward)

__all__ = ["generate", "default_budget_choices", "SMALL_MODEL_PARAMS"]

#: Below this many target parameters a CPU run is "small": one torch thread is then usually the
#: fastest, and `generate` warns (once per process) when it runs such a model on several threads
#: without an explicit ``threads=``.
SMALL_MODEL_PARAMS = 100_000_000
_threads_warned = False  # the CLI sets it when the user chose --threads


def default_budget_choices(model) -> list:
    """Budgets Cascade tries in joint mode, loosest first: unbudgeted, then E/2, E/4, ... (>= top-k)."""
    e = num_experts(model)
    if e is None:
        raise ValueError("controller='cascade+budget' needs an MoE target (no expert count in its config)")
    cfg = getattr(model.config, "text_config", None) or model.config
    k = int(getattr(cfg, "num_experts_per_tok", 1) or 1)
    out: list = [None]
    c = e // 2
    while c >= k and len(out) < 5:
        out.append(c)
        c //= 2
    return out


def _as_prompt(input_ids) -> torch.Tensor:
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    if ids.dim() == 1:
        ids = ids.view(1, -1)
    if ids.dim() != 2:
        raise ValueError(f"input_ids must be [S] or [B, S], got shape {tuple(ids.shape)}")
    if ids.shape[0] != 1:
        raise ValueError(
            f"moespec.speculative.generate supports batch size 1 only (got {ids.shape[0]}): draft trees and "
            "accepted lengths differ per sequence; call it once per prompt"
        )
    if ids.shape[1] == 0:
        raise ValueError("input_ids is empty")
    return ids


def _check_prompt_ids(prompt: torch.Tensor, rows: int) -> None:
    lo, hi = int(prompt.min()), int(prompt.max())
    if lo < 0 or hi >= rows:
        bad = hi if hi >= rows else lo
        raise ValueError(f"input_ids holds token id {bad}, outside the target's vocabulary [0, {rows}): the prompt "
                         "was encoded with another tokenizer than the target's")


@contextlib.contextmanager
def _thread_scope(threads, model, device: torch.device):
    """``threads=N``: N torch CPU threads for the call, restored afterwards. ``None``: torch's setting as it
    is (never changed), with a one-time warning when a small model runs on the CPU with several threads."""
    global _threads_warned
    if threads is None:
        n = torch.get_num_threads()
        if device.type == "cpu" and n > 1 and not _threads_warned:
            params = sum(p.numel() for p in model.parameters())
            if params < SMALL_MODEL_PARAMS:
                _threads_warned = True
                warnings.warn(
                    f"moespec.speculative.generate: a small model ({params / 1e6:.1f} M parameters) runs on the CPU "
                    f"with {n} torch threads. One thread is usually several times faster for models this size "
                    "(their matmuls are too small to split), and on a busy machine multi-threaded runs can be 10x "
                    "slower. Pass threads=1 (this call only) or call torch.set_num_threads(1); passing threads=N "
                    "also silences this warning.", UserWarning, stacklevel=5)
        yield
        return
    from ..ops import as_int

    n = as_int("threads", threads)
    if n < 1:
        raise ValueError(f"threads must be >= 1 (or None: leave torch's setting), got {threads!r}")
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _sync(device: torch.device) -> None:
    # Wall times must cover the device work, not just the launches.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate(
    model,
    input_ids,
    drafter: Drafter | Any = None,
    max_new_tokens: int = 32,
    draft: DraftConfig | int | dict | None = None,
    budget: Any = None,
    policy: str = "substitute",
    controller: str | Any = "static",
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: int | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    budget_choices: Sequence[Any] | None = None,
    cost_model: Callable[[IterationStats], float] | None = None,
    clock: Callable[[], float] = time.perf_counter,
    controller_options: dict | None = None,
    routing_stats: bool | None = None,
    threads: int | None = None,
    candidates: str | None = None,
    cascade_state: Any = None,
) -> tuple[torch.Tensor, SpecStats]:
    """Speculative decoding with draft trees, optional expert budgets and a speculation controller.

    Args:
        model: transformers v5 causal LM (the target); batch size 1.
        input_ids: prompt, [S] or [1, S].
        drafter: a `Drafter`, or a small causal LM (wrapped in `DraftModelDrafter`); default
            `PromptLookupDrafter()`.
        max_new_tokens: tokens to generate (fewer if `eos_token_id` is produced).
        draft: `DraftConfig` (chain or tree), an int K (chain), or a dict of DraftConfig fields;
            for the Cascade controllers it is the largest shape (K_max = its node count).
        budget: expert budget for verification forwards: a cap C (int, per-layer list or callable),
            a whole rule (`moespec.integrations.BudgetConfig`: cap, coverage, policy, candidates),
            ``"auto"`` (the measured default rule, `moespec.integrations.auto_budget`), or None
            (unbudgeted). Prefill and plain one-token decode are never budgeted.
        policy: re-routing policy passed to the integration ("substitute" or "truncate").
        candidates: the experts a kept set is chosen from ("all", "union"; None: the policy's
            default); a `BudgetConfig` budget carries its own policy and candidates.
        controller: "static", "cascade" (picks K), "cascade+budget" (picks K and C), or an object
            with `next() -> Decision` and `observe(accepted, t_iter)`.
        do_sample / temperature / seed: sampling with multi-branch speculative sampling, which
            keeps the target distribution; greedy (lossless vs. greedy decoding) otherwise.
        budget_choices: candidate budgets for "cascade+budget" (default: None, E/2, E/4, ...).
        cost_model: f(IterationStats) -> time fed to the controller instead of the wall clock
            (deterministic tests, simulations).
        clock: wall clock for the recorded times.
        controller_options: extra keyword arguments for `CascadeController`.
        routing_stats: record per-layer union / kept sizes and expert bytes through
            `moespec.integrations`. None (default): when a budget is in play or the model is
            already patched; True: always (patches the target for the call); False: only if needed.
        threads: torch CPU threads for this call (restored afterwards). None (default) leaves torch's
            setting alone; on the CPU with a small target (< `SMALL_MODEL_PARAMS`) and several threads
            it warns once per process that ``threads=1`` is usually much faster.
        cascade_state: what the Cascade controllers learned, kept across calls (a `CascadeState`, see
            `moespec.speculative.cascade_state`): a request resumes at the last decided point. None
            (default): the process-wide `default_cascade_state()`, unless a cost model or another clock
            supplies the times (then each call starts cold); False: cold; True: the process-wide one.

    A draft model must share the target's token ids: a smaller draft vocabulary is refused, a larger
    one is restricted to the target's ids (see `check_drafter_vocab`); prompt ids outside the target's
    vocabulary and drafts outside it are refused with a `ValueError`.

    Returns:
        (tokens [1, S + n], SpecStats). `stats.to_json()` exports one record per iteration.
    """
    prompt = _as_prompt(input_ids)
    cfg = DraftConfig.coerce(draft)
    if drafter is None:
        drafter = PromptLookupDrafter()
    elif isinstance(drafter, torch.nn.Module):
        drafter = DraftModelDrafter(drafter)
    for name in ("begin", "propose", "commit"):
        if not callable(getattr(drafter, name, None)):
            raise TypeError(f"drafter must implement the Drafter protocol (missing {name}())")
    from ..ops import validate_candidates

    candidates = validate_candidates(candidates, policy)  # resolved once: "all" or "union"
    budget = _coerce_budget(model, budget)
    target_rows, _ = vocab_sizes(model)
    _check_prompt_ids(prompt, target_rows)
    if isinstance(drafter, DraftModelDrafter):
        drafter.vocab_limit = check_drafter_vocab(model, drafter.model)
    if do_sample and temperature <= 0:
        raise ValueError("do_sample=True needs temperature > 0 (use do_sample=False for greedy)")
    eos = set() if eos_token_id is None else (
        {int(eos_token_id)} if isinstance(eos_token_id, int) else {int(t) for t in eos_token_id})

    joint = isinstance(controller, str) and controller.lower() in ("cascade+budget", "cascade_budget")
    if joint and budget_choices is None:
        budget_choices = default_budget_choices(model)
        if isinstance(budget, int) and budget not in budget_choices:
            # A user's budget joins the candidates (loosest first: None, then descending C).
            budget_choices = [None] + sorted([c for c in budget_choices if c is not None] + [budget], reverse=True)
    ctrl = make_controller(controller, cfg.size, budget=budget, budgets=budget_choices,
                           **(controller_options or {}))
    need_budget = budget is not None or joint or (
        isinstance(ctrl, CascadeController) and any(b is not None for b in ctrl.budgets))

    store = resolve_state(cascade_state, ctrl, isinstance(controller, str),
                          cost_model is None and clock is time.perf_counter)

    device = next(model.parameters()).device
    with _thread_scope(threads, model, device):
        rule = {"policy": policy, "candidates": candidates}
        key = cascade_key(model, drafter, cfg.to_dict(), ctrl, rule) if store is not None else None  # threads are in it
        if store is not None:
            store.restore(key, ctrl)
        out = _generate(model, prompt, drafter, cfg, ctrl, need_budget, device, target_rows, max_new_tokens,
                        budget, policy, controller, do_sample, temperature, seed, eos, cost_model, clock,
                        routing_stats, candidates)
        if store is not None:
            store.put(key, ctrl.state_dict())
        return out


def _coerce_budget(model, budget):
    """Validate the ``budget`` argument of `generate`; "auto" becomes the measured `BudgetConfig`."""
    from ..ops import as_int

    if budget is None or isinstance(budget, (list, tuple)) or callable(budget):
        return budget
    if isinstance(budget, str):
        if budget != "auto":
            raise ValueError(f"budget must be an int, a per-layer list, a callable, a BudgetConfig, 'auto' or None; "
                             f"got {budget!r}")
        from ..integrations import auto_budget

        return auto_budget(model)
    from .budget import is_budget_config

    if is_budget_config(budget):
        return budget
    return as_int("budget", budget)  # numpy / 0-d tensor budgets become ints; bools are refused


def _generate(model, prompt, drafter, cfg, ctrl, need_budget, device, target_rows, max_new_tokens, budget, policy,
              controller, do_sample, temperature, seed, eos, cost_model, clock, routing_stats, candidates=None):
    gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
    stats = SpecStats(config={
        "draft": cfg.to_dict(), "budget": budget, "policy": policy, "candidates": candidates,
        "controller": controller if isinstance(controller, str) else type(controller).__name__,
        "do_sample": bool(do_sample), "temperature": float(temperature), "max_new_tokens": int(max_new_tokens),
        "drafter": type(drafter).__name__, "threads": torch.get_num_threads() if device.type == "cpu" else None,
    })

    def pick(logits_row: torch.Tensor) -> int:
        if not do_sample:
            return int(logits_row.argmax())
        return int(torch.multinomial(target_probs(logits_row, temperature), 1, generator=gen).item())

    from transformers import DynamicCache

    session = BudgetSession(model, policy=policy, need_budget=need_budget or bool(routing_stats),
                            candidates=candidates)
    t_begin = clock()
    try:
        ctx = prompt[0].tolist()
        cache = DynamicCache(config=model.config)
        # Prefill, never budgeted.
        _sync(device)
        t0 = clock()
        with session.forward(None, verification=False) as pinfo:
            out = model(input_ids=prompt.to(device), **forward_kwargs(model, cache, use_cache=True))
        check_cache_supported(cache)
        first = pick(out.logits[0, -1])
        _sync(device)
        stats.prefill = {"tokens": prompt.shape[1], "time_s": clock() - t0, **pinfo}
        new = [first] if max_new_tokens > 0 else []
        ctx.extend(new)
        drafter.begin(prompt[0])

        it = 0
        while len(new) < max_new_tokens and not (new and new[-1] in eos):
            dec = ctrl.next()
            shape = cfg.sized(dec.k)
            t_it = clock()
            context = torch.tensor(ctx, dtype=torch.long)
            tree = drafter.propose(context, shape) if shape.nodes > 0 else DraftTree.empty()
            if len(tree) > shape.nodes or tree.depth > shape.depth:
                raise ValueError(f"drafter returned {tree!r}, larger than the requested {shape}")
            if len(tree) and (min(tree.tokens) < 0 or max(tree.tokens) >= target_rows):
                bad = [t for t in tree.tokens if not 0 <= t < target_rows][0]
                raise ValueError(f"{type(drafter).__name__} drafted token id {bad}, outside the target's vocabulary "
                                 f"[0, {target_rows}); a drafter must use the target's token ids")
            _sync(device)
            t_draft = clock()

            past = cache_length(cache)
            vbudget = dec.budget if len(tree) > 0 else None  # one-token decode stays unbudgeted
            with session.forward(vbudget, verification=len(tree) > 0) as vinfo:
                logits = tree_forward(model, cache, tree, root=ctx[-1])
            acc = (accept_sampling(tree, logits, temperature, gen) if do_sample else accept_greedy(tree, logits))
            _sync(device)
            t_verify = clock()

            # Keep prefix + root + accepted path; a fully accepted chain is already in place.
            if acc.path != list(range(len(tree))):
                keep = list(range(past + 1)) + [past + 1 + i for i in acc.path]
                compact_cache(cache, torch.tensor(keep, dtype=torch.long))
            if len(tree) > 0:
                drafter.commit(context, tree, acc.path)

            emit = acc.tokens + [acc.bonus]
            emit = emit[: max_new_tokens - len(new)]
            for j, t in enumerate(emit):
                if t in eos:
                    emit = emit[: j + 1]
                    break
            new.extend(emit)
            ctx.extend(emit)
            t_end = clock()

            rec = IterationStats(
                index=it, k=dec.k, budget=vbudget, phase=dec.phase, draft_size=len(tree),
                draft_depth=tree.depth, accepted=acc.accepted, emitted=len(emit),
                draft_time_s=t_draft - t_it, verify_time_s=t_verify - t_draft, iter_time_s=t_end - t_it,
                expert_bytes=vinfo.get("expert_bytes"), layers=vinfo.get("layers"),
            )
            if cost_model is not None:
                rec.cost = float(cost_model(rec))
            ctrl.observe(acc.accepted, rec.cost if rec.cost is not None else rec.iter_time_s)
            stats.iterations.append(rec)
            it += 1
    finally:
        session.close()

    stats.new_tokens = len(new)
    stats.wall_time_s = clock() - t_begin
    stats.controller = ctrl.to_dict() if hasattr(ctrl, "to_dict") else {}
    tokens = torch.tensor([ctx], dtype=torch.long, device=prompt.device)
    return tokens, stats
