"""vLLM plugin: verification-time expert budgets inside vLLM's model runners (docs/vllm.md).

    pip install "moespec[vllm]"            # registers the entry point below
    MOESPEC_VLLM_BUDGET=16 vllm serve ... --speculative-config '{"method": "ngram", ...}'

vLLM calls `register` in every process before a model is built (entry-point group
``vllm.general_plugins``). It

- registers `BudgetedMoERunner` as the out-of-tree replacement of vLLM's ``MoERunner``: each MoE
  layer built by ``FusedMoEFactory`` then wraps its router's ``_compute_routing`` (logical expert
  ids, before EPLB mapping) with `moespec.ops.budget_routing_masked`;
- hooks the step of every model runner the installed vLLM has, once per step and outside any
  CUDA graph, to note whether the step is a verification step:
  the V2 runner (``vllm.v1.worker.gpu.model_runner``, vLLM's default; the only one in 0.34) through
  its ``gather_batch_req_state``, which returns the uniform-decode query length vLLM dispatches
  graphs by: a verification step is a decode-only batch whose requests all have ``1 + k`` tokens,
  ``0 < k <= K``; the V1 runner (0.33) through ``_determine_batch_execution_and_padding``: vLLM's
  "uniform decode" test with query length ``1 + K``, ``K > 0`` (the number of speculative tokens).

Why a device flag and not the ``BatchDescriptor``: FULL decode graphs are keyed by the batch shape
(V2 replays them with no forward context at all), but PIECEWISE graphs (which contain the MoE
layers) and eager steps get a relaxed descriptor (the token count only), so one captured PIECEWISE
graph serves verification and mixed batches of the same padded size. The step decision is
therefore written into a 0-d device tensor before each step and read by the routing inside
whatever graph replays: the same decision in eager, FULL and PIECEWISE modes, under either
runner, however and whenever the runner captured its graphs.

Not budgeted: prefill, mixed prefill/decode and K=0 steps, the drafter's own layers (built under
vLLM's ``draft_model`` / ``eagle_head`` model tag), layers outside ``layers``, and routers that
are not plain softmax top-k (grouped, biased, custom routing: a warning names them). Padded rows
(``ForwardContext.is_padding``) count neither towards the union nor the scores, and rows the
router marked as padding (expert id -1, vLLM's ``VLLM_MOE_SKIP_PADDING``) keep that mark.
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch

from .. import ops, reference
from .config import BudgetConfig, LayerBudgets

__all__ = ["SUPPORTED_VLLM", "VllmBudgetSettings", "settings_from", "register", "stats", "reset_stats",
           "UnsupportedVllmError", "begin_step", "begin_uniform_step", "is_verification_step", "configure",
           "budgeted_routing", "worker_stats", "worker_reset_stats"]

logger = logging.getLogger("moespec.vllm")

# Versions whose internals (MoERunner, router, model runners) this plugin was written and tested against.
SUPPORTED_VLLM = ("0.33", "0.34")
SUPPORTED_VLLM_TEXT = "vllm 0.33.x or 0.34.x (tested: 0.33.0, 0.34.0)"

# Environment variables (the additional_config key "moespec" takes the same names, lower case, without prefix).
ENV_PREFIX = "MOESPEC_VLLM_"
_FIELDS = ("budget", "policy", "score", "coverage", "candidates", "min_budget", "layers", "backend")


class UnsupportedVllmError(RuntimeError):
    """The installed vLLM is not one this plugin supports, or runs a mode it cannot budget."""


@dataclass(frozen=True)
class VllmBudgetSettings:
    """Budget settings of the plugin (one cap for every selected MoE layer).

    Attributes:
        config: the `BudgetConfig` (an int or None budget; policy, score, coverage, min_budget,
            candidates, backend as in `moespec.ops.budget_routing_masked`).
        layers: decoder-layer indices to budget (vLLM's layer number in the module name); None: all.
    """

    config: BudgetConfig
    layers: Optional[frozenset] = None

    @property
    def active(self) -> bool:
        """True when a cap or a coverage target is set."""
        return self.config.budget is not None or self.config.coverage is not None

    def applies_to(self, layer_index: Optional[int]) -> bool:
        return self.layers is None or (layer_index is not None and layer_index in self.layers)


def _parse_layers(v: Any) -> Optional[frozenset]:
    """``"0-3,10"``, a list of ints, or None / "all"."""
    if v is None or (isinstance(v, str) and v.strip().lower() in ("", "all")):
        return None
    if isinstance(v, (list, tuple)):
        items = list(v)
    else:
        items = []
        for part in str(v).split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = part.split("-", 1)
                items.extend(range(int(lo), int(hi) + 1))
            elif part:
                items.append(int(part))
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items) or not items:
        raise ValueError
    return frozenset(items)


def _parse(name: str, raw: Any, source: str) -> Any:
    """One setting from a string (environment) or a JSON value (additional_config)."""
    try:
        if name in ("budget", "min_budget"):
            if raw is None or (isinstance(raw, str) and raw.strip().lower() in ("", "none", "off")):
                return None
            if isinstance(raw, bool):
                raise ValueError
            v = int(raw) if isinstance(raw, str) else raw
            if not isinstance(v, int):
                raise ValueError
            return v
        if name == "coverage":
            if raw is None or (isinstance(raw, str) and raw.strip().lower() in ("", "none", "off")):
                return None
            return float(raw)
        if name == "layers":
            return _parse_layers(raw)
        if raw is None or (name == "candidates" and isinstance(raw, str) and raw.strip() == ""):
            return None
        if not isinstance(raw, str):
            raise ValueError
        return raw.strip()
    except (TypeError, ValueError):
        raise ValueError(f"moespec vLLM plugin: invalid {source} (expected {_HELP[name]})") from None


_HELP = {
    "budget": "an int >= top_k, or 'none'",
    "min_budget": "an int, or 'none'",
    "coverage": "a float in (0, 1], or 'none'",
    "policy": "'substitute' or 'truncate'",
    "score": "'prob' or 'topk'",
    "candidates": "'all' or 'union'",
    "layers": "decoder-layer indices such as '0-3,10', or 'all'",
    "backend": "a moespec.ops backend: 'auto', 'reference', 'cuda' or 'emu'",
}


def settings_from(environ: Optional[Mapping[str, str]] = None,
                  additional_config: Optional[Mapping[str, Any]] = None) -> VllmBudgetSettings:
    """Read the settings: ``MOESPEC_VLLM_*`` environment variables, overridden per field by
    ``additional_config["moespec"]`` (vLLM's ``--additional-config``).

    Raises:
        ValueError: a malformed value, an unknown key, or settings `BudgetConfig` rejects
            (checked against top-k when layers are built).
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in _FIELDS:
        key = ENV_PREFIX + f.upper()
        if key in environ:
            values[f] = _parse(f, environ[key], f"{key}={environ[key]!r}")
    unknown = [k for k in environ if k.startswith(ENV_PREFIX) and k[len(ENV_PREFIX):].lower() not in _FIELDS]
    if unknown:
        raise ValueError(f"moespec vLLM plugin: unknown environment variable(s) {sorted(unknown)}; "
                         f"known: {[ENV_PREFIX + f.upper() for f in _FIELDS]}")
    extra = (additional_config or {}).get("moespec") if additional_config else None
    if extra is not None:
        if not isinstance(extra, Mapping):
            raise ValueError("moespec vLLM plugin: additional_config['moespec'] must be a mapping, "
                             f"got {type(extra).__name__}")
        bad = [k for k in extra if k not in _FIELDS]
        if bad:
            raise ValueError(f"moespec vLLM plugin: unknown additional_config['moespec'] key(s) {bad}; "
                             f"known: {list(_FIELDS)}")
        for f, raw in extra.items():
            values[f] = _parse(f, raw, f"additional_config['moespec']['{f}']={raw!r}")
    layers = values.pop("layers", None)
    cfg = BudgetConfig(**values)
    # Policy, score, coverage, min_budget, candidates and backend are checked now; the cap against
    # each layer's top-k when the layer is built.
    if cfg.budget is not None and cfg.budget < 1:
        raise ValueError(f"moespec vLLM plugin: budget must be >= 1, got {cfg.budget}")
    try:
        BudgetConfig(None, cfg.policy, cfg.score, cfg.coverage, cfg.min_budget, cfg.backend,
                     cfg.candidates).resolve([1])
    except ValueError as err:
        raise ValueError(f"moespec vLLM plugin: {str(err).removeprefix('moespec: ')}") from None
    return VllmBudgetSettings(cfg, layers)


# ----------------------------------------------------------------------------- step state


class _StepState:
    """Whether the current step is a verification step: a host bool and one 0-d device flag per device.

    Written once per step, outside any graph (`begin_step`); read by every budgeted layer. Device
    flags are persistent tensors, so a captured graph reads the value of the step it replays in.
    """

    def __init__(self) -> None:
        self.verify = False
        self.flags: dict[torch.device, torch.Tensor] = {}
        self.lock = threading.Lock()

    def flag(self, device: torch.device) -> torch.Tensor:
        if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:0" must find the same flag
            device = torch.device("cuda", torch.cuda.current_device())
        f = self.flags.get(device)
        if f is None:
            with self.lock:
                f = self.flags.get(device)
                if f is None:
                    f = torch.full((), self.verify, dtype=torch.bool, device=device)
                    self.flags[device] = f
        return f

    def set(self, verify: bool) -> None:
        self.verify = bool(verify)
        for f in self.flags.values():
            f.fill_(self.verify)  # an async H2D write, no host sync


_STEP = _StepState()


def begin_step(num_tokens: int, num_reqs: int, max_query_len: int, num_spec_tokens: int,
               force_uniform_decode: Optional[bool] = None) -> bool:
    """Note the next forward's shape; returns (and records) whether it is a verification step.

    A verification step is vLLM's uniform decode with query length ``1 + K``: every request
    scheduled ``1 + K`` tokens, ``num_tokens == num_reqs * (1 + K)`` (unpadded) and ``K > 0``.
    ``force_uniform_decode`` (vLLM's flag for graph capture) overrides the shape test.
    """
    if num_spec_tokens <= 0:
        verify = False
    elif force_uniform_decode is not None:
        verify = bool(force_uniform_decode)
    else:
        q = 1 + num_spec_tokens
        verify = num_reqs > 0 and max_query_len == q and num_tokens == q * num_reqs
    _STEP.set(verify)
    return verify


def begin_uniform_step(uniform_query_len: Optional[int], num_spec_tokens: int, new_tokens_per_step: int = 1) -> bool:
    """The V2 model runner's rule; returns (and records) whether the next forward is a verification step.

    Args:
        uniform_query_len: the tokens every request of the batch has when the batch is a uniform
            decode (no request prefilling), else None: what the V2 runner's
            ``gather_batch_req_state`` returns and dispatches its graphs by.
        num_spec_tokens: K, the configured number of speculative tokens.
        new_tokens_per_step: tokens a request adds per step without drafts (1; the runner's
            ``decode_query_len - K``).

    A verification step is a uniform decode with ``new_tokens_per_step + k`` tokens per request,
    ``0 < k <= K``: k may be below K when vLLM's dynamic speculative decoding schedules fewer
    drafts for a large batch. A step whose drafts were skipped has ``k = 0`` and is not one.
    """
    verify = (num_spec_tokens > 0 and uniform_query_len is not None
              and new_tokens_per_step < uniform_query_len <= new_tokens_per_step + num_spec_tokens)
    _STEP.set(verify)
    return verify


def is_verification_step() -> bool:
    """The host value of the current step's decision (`begin_step`)."""
    return _STEP.verify


# ----------------------------------------------------------------------------- statistics

# Counters per budgeted layer (int64, on the device): verification calls, calls whose routing
# changed, and sums over verification calls of real tokens, union size and experts read.
_COUNTERS = ("verify_calls", "budgeted_calls", "tokens", "union", "read")
_LAYERS: dict[str, "_LayerState"] = {}


class _LayerState:
    def __init__(self, name: str, top_k: int, num_experts: int, cap: Optional[int], budgets: LayerBudgets,
                 renormalize: bool) -> None:
        self.name = name
        self.top_k = top_k
        self.num_experts = num_experts
        self.cap = cap
        self.budgets = budgets
        self.renormalize = renormalize
        self.counters: Optional[torch.Tensor] = None

    def counter(self, device: torch.device) -> torch.Tensor:
        if self.counters is None:
            self.counters = torch.zeros(len(_COUNTERS), dtype=torch.int64, device=device)
        return self.counters


def stats() -> dict[str, dict]:
    """Per budgeted layer (by vLLM layer name): the counters summed over verification calls.

    ``verify_calls``, ``budgeted_calls`` (routing changed), ``tokens`` (real tokens), ``union``
    (distinct experts of the unbudgeted routing, summed), ``read`` (distinct experts the
    returned routing reads, summed), plus ``mean_union`` / ``mean_read`` per verification call.
    One host sync for all layers; counters of graph replays are included (in-place adds are
    captured). Counts since the last `reset_stats` (warm-up and capture runs count too).
    """
    names = [n for n, s in _LAYERS.items() if s.counters is not None]
    if not names:
        return {}
    rows = torch.stack([_LAYERS[n].counters.cpu() for n in names]).tolist()
    out = {}
    for n, row in zip(names, rows):
        d = dict(zip(_COUNTERS, row))
        calls = max(d["verify_calls"], 1)
        d["mean_union"] = d["union"] / calls
        d["mean_read"] = d["read"] / calls
        d["budget"] = _LAYERS[n].cap
        out[n] = d
    return out


def reset_stats() -> None:
    """Zero every layer's counters (on their devices, no sync)."""
    for s in _LAYERS.values():
        if s.counters is not None:
            s.counters.zero_()


def worker_stats(worker=None) -> dict[str, dict]:
    """`stats` for ``LLM.collective_rpc(worker_stats)`` (vLLM passes the worker; unused)."""
    return stats()


def worker_reset_stats(worker=None) -> None:
    """`reset_stats` for ``LLM.collective_rpc(worker_reset_stats)``."""
    reset_stats()


# ----------------------------------------------------------------------------- routing


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _padding_mask(T: int) -> Optional[torch.Tensor]:
    """``[T]`` bool, True for real rows, from the forward context (None when unknown)."""
    try:
        from vllm.forward_context import get_forward_context, is_forward_context_available
    except ImportError:  # pragma: no cover - vllm present whenever this runs
        return None
    if not is_forward_context_available():
        return None
    pad = getattr(get_forward_context(), "is_padding", None)
    if pad is None or pad.dim() != 1 or pad.shape[0] != T:
        # e.g. tokens dispatched across data-parallel ranks: rows do not line up with the mask.
        return None
    return ~pad


def _read_count(ids: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor, E: int) -> torch.Tensor:
    """0-d int64: distinct experts with a non-zero-weight pair in a real row (weight-0 pairs, e.g.
    truncated ones, are skipped by the expert kernels, so their experts are not read). Ids of -1
    (rows the router marked as padding) read nothing."""
    valid = ids >= 0
    live = ((weights != 0) & valid & rows.reshape(-1, 1)).reshape(-1).to(torch.int32)
    index = torch.where(valid, ids, torch.zeros_like(ids)).reshape(-1).long()
    hits = torch.zeros(E, dtype=torch.int32, device=ids.device).index_add_(0, index, live)
    return (hits > 0).sum()


def budgeted_routing(state: _LayerState, router_logits: torch.Tensor, topk_weights: torch.Tensor,
                     topk_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Budget one layer's routing for a verification step (fixed shapes, no host sync).

    Args:
        state: the layer's settings and counters.
        router_logits: ``[T, E]`` logits the router routed from.
        topk_weights, topk_ids: ``[T, k]`` the router's own output (dtypes kept).

    Returns:
        ``(topk_weights, topk_ids)``: the router's own tensors (bitwise) when the step is not a
        verification step or the union fits the budget; otherwise `moespec.ops.budget_routing_masked`'s
        routing, with padded rows at weight 0, except that pairs the router gave expert id -1
        (vLLM's mark for padding rows the experts skip, ``VLLM_MOE_SKIP_PADDING``) keep the
        router's id and weight.
    """
    T = router_logits.shape[0]
    traced = torch.compiler.is_compiling() or _capturing(router_logits.device)
    if not traced and not _STEP.verify:
        return topk_weights, topk_ids  # eager non-verification step: skip the work
    b = state.budgets
    real = _padding_mask(T)
    r = ops.budget_routing_masked(router_logits, state.top_k, state.cap, b.policy, state.renormalize, b.score,
                                  b.coverage, b.min_budget, token_mask=real, candidates=b.candidates,
                                  backend=b.backend)
    flag = _STEP.flag(router_logits.device)
    apply = flag & r.budgeted
    # The router's -1 marks stay: the dispatch and the experts skip those rows.
    take = apply & (topk_ids >= 0)
    ids = torch.where(take, r.topk_ids.to(topk_ids.dtype), topk_ids)
    weights = torch.where(take, r.topk_weights.to(topk_weights.dtype), topk_weights)
    # Counters: in-place adds on a persistent tensor, so graph replays count too.
    rows = torch.ones(T, dtype=torch.bool, device=ids.device) if real is None else real
    read = _read_count(ids, weights, rows, state.num_experts)
    f = flag.long()
    state.counter(ids.device).add_(torch.stack([f, apply.long(), f * rows.sum(), f * r.union_size, f * read]))
    return weights, ids


# ----------------------------------------------------------------------------- vLLM glue

_SETTINGS: Optional[VllmBudgetSettings] = None


def configure(settings: Optional[VllmBudgetSettings]) -> None:
    """Use ``settings`` for MoE layers built from now on in this process (None: read the environment
    and vLLM's additional_config again at the next layer). For in-process use (tests, the offline
    ``LLM`` with in-process workers); worker processes read the environment themselves."""
    global _SETTINGS
    _SETTINGS = settings


def _settings() -> VllmBudgetSettings:
    global _SETTINGS
    if _SETTINGS is None:
        from vllm.config import get_current_vllm_config

        extra = getattr(get_current_vllm_config(), "additional_config", None) or {}
        _SETTINGS = settings_from(os.environ, extra)
    return _SETTINGS


def _unsupported_router(router) -> Optional[str]:
    """Why this router's rule is not plain softmax top-k (None when it is)."""
    if getattr(router, "scoring_func", "softmax") != "softmax":
        return f"scoring_func={router.scoring_func!r}"
    if getattr(router, "use_grouped_topk", False):
        return "grouped top-k"
    if getattr(router, "custom_routing_function", None) is not None:
        return "a custom routing function"
    if getattr(router, "e_score_correction_bias", None) is not None:
        return "an expert score correction bias"
    if getattr(router, "_hash_indices_table", None) is not None:
        return "hash routing"
    if not hasattr(router, "_compute_routing") or not hasattr(router, "renormalize"):
        return f"router class {type(router).__name__}"
    return None


def _is_drafter(layer_name: str) -> bool:
    try:
        from vllm.compilation import backends

        tag = getattr(backends, "model_tag", "backbone")
    except ImportError:  # pragma: no cover
        tag = "backbone"
    return tag != "backbone" or layer_name.startswith("draft_model")


def _install(runner) -> None:
    """Wrap one MoE layer's router (called from `BudgetedMoERunner.__init__`)."""
    settings = _settings()
    name = runner.layer_name
    if not settings.active:
        return
    from vllm.config import get_current_vllm_config

    if _is_drafter(name):
        logger.info("moespec: %s belongs to the drafter; not budgeted", name)
        return
    try:
        from vllm.model_executor.models.utils import extract_layer_index

        index = extract_layer_index(name)
    except Exception:  # names without a layer number
        index = None
    if not settings.applies_to(index):
        return
    router = runner.router
    why = _unsupported_router(router)
    if why is not None:
        logger.warning("moespec: %s not budgeted: its router uses %s (only softmax top-k is supported)", name, why)
        return
    # Logical experts: the logits' width (EPLB's redundant copies are mapped after this router step).
    top_k = int(router.top_k)
    E = int(getattr(runner.moe_config, "num_logical_experts", None) or router.global_num_experts)
    try:
        budgets = BudgetConfig(settings.config.budget, settings.config.policy, settings.config.score,
                               settings.config.coverage, settings.config.min_budget, settings.config.backend,
                               settings.config.candidates).resolve([top_k])
    except ValueError as err:
        raise ValueError(f"moespec vLLM plugin: layer {name} (top_k={top_k}, {E} experts): {err}") from None
    cap = budgets.cap(0)
    if cap is not None and cap >= E:
        logger.info("moespec: %s: budget %d >= %d experts; routing never changes", name, cap, E)
    state = _LayerState(name, top_k, E, cap, budgets, bool(router.renormalize))
    # Flag and counters exist before any trace or capture, so graphs read and update these tensors.
    device = torch.device(getattr(get_current_vllm_config().device_config, "device", None) or "cpu")
    _STEP.flag(device)
    state.counter(device)
    _LAYERS[name] = state
    compute = router._compute_routing

    def _compute_routing(hidden_states, router_logits, indices_type, *, input_ids=None):
        w, ids = compute(hidden_states, router_logits, indices_type, input_ids=input_ids)
        return budgeted_routing(state, router_logits, w, ids)

    router._compute_routing = _compute_routing
    router._moespec_state = state


def _check_version() -> str:
    import vllm

    v = getattr(vllm, "__version__", "unknown")
    if not any(v == s or v.startswith(s + ".") for s in SUPPORTED_VLLM):
        raise UnsupportedVllmError(f"moespec vLLM plugin supports {SUPPORTED_VLLM_TEXT}; found vllm {v}. "
                                   "Install a supported vLLM or uninstall moespec's plugin "
                                   "(VLLM_PLUGINS can exclude 'moespec').")
    return v


_RUNNER_CLS = None


def _runner_class():
    global _RUNNER_CLS
    if _RUNNER_CLS is None:
        from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner

        class BudgetedMoERunner(MoERunner):
            """vLLM's MoERunner whose router budgets verification steps (moespec)."""

            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self._moespec_checked = False
                _install(self)

            def _forward_impl(self, *args, **kwargs):
                if not self._moespec_checked:
                    self._moespec_checked = True
                    # Monolithic expert kernels route inside the kernel and never call the router.
                    if hasattr(self.router, "_moespec_state") and self.is_monolithic:
                        logger.warning("moespec: %s uses a monolithic MoE kernel that routes internally; "
                                       "its budget cannot apply (choose a modular MoE backend)", self.layer_name)
                return super()._forward_impl(*args, **kwargs)

        _RUNNER_CLS = BudgetedMoERunner
    return _RUNNER_CLS


def _hook_v1_runner() -> bool:
    """Hook the V1 model runner's per-step batch decision (vLLM 0.33); False where it is gone (0.34)."""
    try:
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    except ImportError:
        return False
    orig = GPUModelRunner._determine_batch_execution_and_padding
    if getattr(orig, "_moespec", False):
        return True

    def _determine_batch_execution_and_padding(self, num_tokens, num_reqs, num_scheduled_tokens_np,
                                               max_num_scheduled_tokens, *args, **kwargs):
        begin_step(num_tokens, num_reqs, max_num_scheduled_tokens, self.uniform_decode_query_len - 1,
                   kwargs.get("force_uniform_decode"))
        return orig(self, num_tokens, num_reqs, num_scheduled_tokens_np, max_num_scheduled_tokens, *args, **kwargs)

    _determine_batch_execution_and_padding._moespec = True
    _determine_batch_execution_and_padding.__wrapped__ = orig
    GPUModelRunner._determine_batch_execution_and_padding = _determine_batch_execution_and_padding
    return True


_V2_STEP_METHOD = "gather_batch_req_state"


def _hook_v2_runner() -> bool:
    """Hook the V2 model runner's per-step batch gathering; False where the installed vLLM has no V2 runner.

    ``gather_batch_req_state(scheduler_output, dummy_run)`` runs once at the start of every
    ``execute_model`` (real, dummy and DP-padding steps), before any forward or graph replay, and
    returns ``(batch state, uniform-decode query length or None)``. Graphs the runner captures
    outside ``execute_model`` need no hook: they read the device flag when they replay.

    Raises:
        UnsupportedVllmError: the V2 runner exists but the method is missing or takes other arguments.
    """
    import inspect

    try:
        from vllm.v1.worker.gpu.model_runner import GPUModelRunner
    except ImportError:
        return False
    orig = getattr(GPUModelRunner, _V2_STEP_METHOD, None)
    if getattr(orig, "_moespec", False):
        return True
    params = list(inspect.signature(orig).parameters) if callable(orig) else []
    if params[:3] != ["self", "scheduler_output", "dummy_run"]:
        raise UnsupportedVllmError(
            f"moespec vLLM plugin: vLLM's V2 model runner has no {_V2_STEP_METHOD}(scheduler_output, dummy_run) "
            f"(found {params or 'none'}), the step the plugin reads; this vLLM is not one the plugin supports")

    def gather_batch_req_state(self, scheduler_output, dummy_run, *args, **kwargs):
        out = orig(self, scheduler_output, dummy_run, *args, **kwargs)
        K = int(getattr(self, "num_speculative_steps", 0) or 0)
        new = int(getattr(self, "decode_query_len", 1 + K)) - K
        begin_uniform_step(out[1], K, new)
        return out

    gather_batch_req_state._moespec = True
    gather_batch_req_state.__wrapped__ = orig
    gather_batch_req_state.__doc__ = orig.__doc__
    setattr(GPUModelRunner, _V2_STEP_METHOD, gather_batch_req_state)
    return True


def _patch_model_runner() -> None:
    """Hook the step of every GPU model runner the installed vLLM has (V1 and/or V2)."""
    hooked = [_hook_v1_runner(), _hook_v2_runner()]
    if not any(hooked):
        raise UnsupportedVllmError("moespec vLLM plugin: found neither vLLM's V1 model runner "
                                   "(vllm.v1.worker.gpu_model_runner) nor its V2 one (vllm.v1.worker.gpu.model_runner)")


def register() -> None:
    """Entry point (``vllm.general_plugins``): check the vLLM version, register the runner, hook the steps.

    Safe to call more than once per process. Raises `UnsupportedVllmError` on an unsupported
    vLLM, or when another plugin already replaced ``MoERunner``.
    """
    _check_version()
    from vllm.model_executor.custom_op import op_registry_oot
    from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner

    cls = _runner_class()
    current = op_registry_oot.get("MoERunner")
    if current is None:
        MoERunner.register_oot(cls)
    elif current is not cls:
        raise UnsupportedVllmError(f"moespec vLLM plugin: MoERunner is already replaced by {current.__module__}."
                                   f"{current.__qualname__}; two plugins cannot both replace it")
    _patch_model_runner()
