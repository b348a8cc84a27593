"""`patch` / `expert_budget`: budgeted MoE inside an unmodified transformers model.

How a patch works, without replacing any module (names, state-dict keys, TP plans and
``output_router_logits`` hooks stay valid):

- each supported block's router gets a forward hook that applies this call's budget to the
  router's ``(logits, weights, ids)`` output and leaves the kept set for the experts; the full
  logits pass through unchanged;
- the experts run through transformers' experts registry under the name ``"moespec"``
  (`moespec.ops.moe_experts` on the patch's ``backend``: by default kernels on CUDA, the
  reference elsewhere), reading only the kept experts' weights;
- forward hooks on the model open and close one "call" per top-level forward: they decide
  whether a budget applies (explicit `expert_budget`, else the default in ``"auto"`` or
  ``"always"`` mode) and collect one `CallStats`.
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from .architectures import (
    BlockSpec,
    bytes_per_expert,
    describe_unsupported,
    expert_layout,
    find_moe_blocks,
)
from .calls import CallShape, call_shape, positional_names
from .config import WHEN_MODES, BudgetConfig, BudgetSpec, LayerBudgets
from .experts import IMPLEMENTATION_NAME, ExpertsState, moespec_experts_forward, register
from .. import _cuda, reference
from .routing import RouterSpec, budget_router_output
from .stats import CallStats, LayerStats, RoutingStats

__all__ = ["patch", "expert_budget", "verification", "get_handle", "PatchHandle", "MoELayerInfo",
           "UnsupportedModelError"]

# model -> handle; weak so that a patched model can still be garbage-collected.
_HANDLES: "weakref.WeakKeyDictionary[torch.nn.Module, PatchHandle]" = weakref.WeakKeyDictionary()
# router module -> handle that hooks it: refuses a second patch of the same blocks through a
# parent or a child module.
_ROUTERS: "weakref.WeakKeyDictionary[torch.nn.Module, PatchHandle]" = weakref.WeakKeyDictionary()


class _VerificationScope:
    """Process-wide depth of `verification` contexts (a plain object: torch.compile reads it)."""

    depth = 0


_SCOPE = _VerificationScope()


@contextlib.contextmanager
def verification() -> Iterator[None]:
    """Mark every forward inside as a verification forward (for ``when="auto"`` patches).

    ``when="auto"`` budgets only verification forwards: those inside this context (whatever
    their shape), and verification-shaped calls (several new tokens on a non-empty cache) of
    transformers' assisted and prompt-lookup generation, which a patch marks by itself. A long
    prompt fed in chunks is never budgeted by its shape alone. `moespec.speculative.generate` wraps
    its verification forwards in this context.
    """
    _SCOPE.depth += 1
    try:
        yield
    finally:
        _SCOPE.depth -= 1


class UnsupportedModelError(ValueError):
    """The model has no MoE block moespec can patch; the message lists what is supported."""


@dataclass(frozen=True)
class MoELayerInfo:
    """A patched MoE layer.

    Attributes:
        ordinal: MoE layer index (0-based, MoE layers only; the key of per-layer budgets).
        name: qualified module name of the block (e.g. ``model.layers.3.mlp``).
        architecture: supported architecture name.
        router: the router's top-k rule.
        bytes_per_expert: bytes of one routed expert's weights in their dtype at patch time.
    """

    ordinal: int
    name: str
    architecture: str
    router: RouterSpec
    bytes_per_expert: int

    @property
    def top_k(self) -> int:
        return self.router.top_k

    @property
    def num_experts(self) -> int:
        return self.router.num_experts


class _OpenCall:
    """The forward call in progress: its budget settings, padding mask and statistics (None
    while torch.compile / torch.export trace: traced forwards are not recorded)."""

    def __init__(self, settings: Optional[LayerBudgets], stats: Optional[CallStats],
                 token_mask: Optional[torch.Tensor]) -> None:
        self.settings = settings
        self.stats = stats
        self.token_mask = token_mask


class _PatchedLayer:
    """Runtime glue of one MoE block: wraps its router and feeds its experts."""

    def __init__(self, handle: "PatchHandle", info: MoELayerInfo, block: torch.nn.Module, spec: BlockSpec) -> None:
        self.handle = handle
        self.info = info
        self.spec = spec
        self.router = getattr(block, spec.router_attr)
        self.experts = block.experts
        cfg = getattr(self.experts, "config", None)
        self.state = ExpertsState(expert_layout(self.experts), getattr(cfg, "_experts_implementation", None) or "eager",
                                  always=handle.experts == "moespec")
        self._router_hook = None
        self._saved_experts_forward = self.experts.__dict__.get("forward")
        self._experts_forward_overridden = False

    # -- install / remove

    def install(self, use_registry: bool) -> None:
        # A forward hook (not a replaced forward) keeps the router's own code and any other
        # hooks (transformers' router-logits recorder) untouched.
        self._router_hook = self.router.register_forward_hook(_router_hook_for(self))
        self.experts._moespec_state = self.state
        if not use_registry:
            # The experts module does not dispatch through transformers' registry (or its
            # config could not be switched): call the same function directly.
            self.experts.forward = moespec_experts_forward.__get__(self.experts)
            self._experts_forward_overridden = True

    def remove(self) -> None:
        if self._router_hook is not None:
            self._router_hook.remove()
            self._router_hook = None
        if self._experts_forward_overridden:
            _restore_attr(self.experts, "forward", self._saved_experts_forward)
        self.experts.__dict__.pop("_moespec_state", None)

    # -- per call

    def route(self, logits: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor):
        """Apply this call's budget to the router output; record statistics (on the device)."""
        handle = self.handle
        call = handle._call
        settings = call.settings if call is not None else handle._settings_for(None)
        i = self.info.ordinal
        mask = call.token_mask if call is not None else None
        if mask is not None and mask.shape[0] != ids.shape[0]:
            mask = None  # the block routes another token set than the call's (B x new)
        stats = call.stats if call is not None and handle.stats.enabled else None
        applies = settings is not None and settings.applies(i)
        cap = settings.cap(i) if applies else None
        # A cap of E or more with no coverage can never bind: run exactly as unpatched.
        if not applies or (settings.coverage is None and cap >= self.info.num_experts):
            self.state.budgeted = False
            self.state.backend = settings.backend if settings is not None else handle.backend
            if stats is not None:
                union = reference.union_mask(ids, self.info.num_experts, mask)
                self._record(stats, ids.shape[0] if mask is None else mask.sum(), union.sum(), union, cap, applies)
            return logits, weights, ids
        self.state.budgeted = True
        self.state.backend = settings.backend
        r = budget_router_output(self.info.router, logits, weights, ids, cap, settings,
                                 self.spec.correction_bias(self.router), mask)
        if stats is not None:
            E = self.info.num_experts
            # Experts actually read: those with a live (nonzero-weight) pair; a spare slot E
            # swallows the dead pairs (fixed shapes, no host sync).
            live = torch.where(r.topk_weights != 0, r.topk_ids, torch.full_like(r.topk_ids, E))
            read = torch.zeros(E + 1, dtype=torch.bool, device=ids.device).index_fill(0, live.reshape(-1), True)[:E]
            # Unbudgeted routing weight that sat on dropped experts (the model's own weights).
            w = weights.float().abs()
            if mask is not None:
                w = w * mask.reshape(-1, 1)
            lost = (w * (~r.kept_mask[ids.long()])).sum() / w.sum().clamp(min=1e-30)
            self._record(stats, ids.shape[0] if mask is None else mask.sum(), r.union_size, r.kept_mask, cap, True,
                         read & r.kept_mask, torch.where(r.budgeted, lost, torch.zeros_like(lost)))
        return logits, r.topk_weights, r.topk_ids

    def _record(self, stats: CallStats, tokens, union_size, kept_mask: torch.Tensor,
                cap: Optional[int], budgeted: bool, read_mask: Optional[torch.Tensor] = None,
                dropped_mass=0.0) -> None:
        # Device tensors, read when asked; bytes use the weights' current dtype (the model
        # may have been cast after patching).
        stats.layers.append(LayerStats(self.info.ordinal, tokens, union_size, kept_mask.clone(),
                                       bytes_per_expert(self.experts), budget=cap, budgeted=budgeted,
                                       read_experts=read_mask, dropped_mass=dropped_mass))


def _router_hook_for(layer: _PatchedLayer):
    # A closure, not a bound method: deepcopy shares functions but copies bound methods'
    # owners, so a deep copy of a patched model gets a hook that recognises it is not ours.
    def hook(module, args, output):
        if module is not layer.router:
            return None
        logits, weights, ids = output
        return layer.route(logits, weights, ids)

    return hook


def _restore_attr(module: torch.nn.Module, name: str, saved) -> None:
    if saved is None:
        module.__dict__.pop(name, None)
    else:
        module.__dict__[name] = saved


class PatchHandle:
    """A patched model: its budget settings, its routing statistics, and the way back.

    Attributes:
        stats: `RoutingStats`, one `CallStats` per top-level forward that reached an MoE layer.
        layers: `MoELayerInfo` per MoE layer, in order.
        default: the default `LayerBudgets` (``None`` caps when no budget was given).
        when: ``"auto"`` (default budget only for verification-shaped calls) or ``"always"``.
        backend: the `moespec.ops` backend of budgeted calls (fixed at patch time; budgets set
            later, `set_budget` and `expert_budget`, keep it).
        experts: which experts implementation unbudgeted calls run: ``"model"`` (the model's own)
            or ``"moespec"`` (`moespec.ops.moe_experts` on ``backend``, like budgeted calls).
    """

    def __init__(self, model: torch.nn.Module, blocks, default: BudgetConfig, when: str,
                 experts: str = "model") -> None:
        self._model_ref = weakref.ref(model)
        self.experts = _check_experts(experts)
        self.stats = RoutingStats()
        self.layers: tuple[MoELayerInfo, ...] = ()
        self._patched: list[_PatchedLayer] = []
        for ordinal, (name, block, spec) in enumerate(blocks):
            router = getattr(block, spec.router_attr)
            info = MoELayerInfo(ordinal, name, spec.name, spec.router_spec(router), bytes_per_expert(block.experts))
            self._patched.append(_PatchedLayer(self, info, block, spec))
        self.layers = tuple(p.info for p in self._patched)
        self.default: LayerBudgets = self.resolve(default)
        for p in self._patched:
            p.state.backend = self.backend
        self.when = _check_when(when)
        self._overrides: list[LayerBudgets] = []
        self._call: Optional[_OpenCall] = None
        self._depth = 0
        self._assisted = 0  # depth of transformers' assisted / prompt-lookup generation
        self._assisted_class: Optional[type] = None
        self._hooks: list = []
        self._saved_impl: list[tuple[object, object]] = []
        self._active = False

    # -- public

    @property
    def model(self) -> Optional[torch.nn.Module]:
        """The patched model (None once it has been garbage-collected)."""
        return self._model_ref()

    @property
    def patched(self) -> bool:
        """True until `unpatch` is called."""
        return self._active

    @property
    def backend(self) -> str:
        """The `moespec.ops` backend budgeted calls run on (``"auto"``, ``"reference"``, ``"cuda"``, ``"emu"``,
        ``"cpu"``)."""
        return self.default.backend

    def resolve(self, config: BudgetConfig) -> LayerBudgets:
        """Validate ``config`` against this model's MoE layers."""
        return config.resolve([info.top_k for info in self.layers])

    def set_budget(self, budget: BudgetSpec = None, policy: str = "substitute", score: str = "prob",
                   coverage: Optional[float] = None, min_budget: Optional[int] = None,
                   when: Optional[str] = None, candidates: Optional[str] = None) -> None:
        """Replace the default budget (and optionally the mode) of the patched model."""
        self.default = self.resolve(BudgetConfig(budget, policy, score, coverage, min_budget, self.backend,
                                                 candidates))
        if when is not None:
            self.when = _check_when(when)

    @contextlib.contextmanager
    def budget(self, budget: BudgetSpec, policy: str = "substitute", score: Optional[str] = None,
               coverage: Optional[float] = None, min_budget: Optional[int] = None,
               candidates: Optional[str] = None) -> Iterator["PatchHandle"]:
        """Context manager: every forward inside uses this budget (see `expert_budget`)."""
        settings = self.resolve(BudgetConfig(budget, policy, self.default.score if score is None else score,
                                             coverage, min_budget, self.backend, candidates))
        self._overrides.append(settings)
        try:
            yield self
        finally:
            # Remove this entry even if inner contexts were exited out of order.
            for j in range(len(self._overrides) - 1, -1, -1):
                if self._overrides[j] is settings:
                    del self._overrides[j]
                    break

    def unpatch(self) -> None:
        """Restore the model exactly as it was before `patch` (idempotent)."""
        if not self._active:
            return
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for p in self._patched:
            p.remove()
            if _ROUTERS.get(p.router) is self:
                del _ROUTERS[p.router]
        model = self.model
        if model is not None:
            _restore_experts_implementation(model, self._saved_impl)
            if _HANDLES.get(model) is self:
                del _HANDLES[model]
        _unwrap_assisted_decoding(self._assisted_class)
        self._assisted_class = None
        self._saved_impl = []
        self._call = None
        self._depth = 0
        self._assisted = 0
        self._active = False

    def __enter__(self) -> "PatchHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.unpatch()

    def __repr__(self) -> str:
        caps = self.default.caps
        cap = caps[0] if len(set(caps)) == 1 and caps else list(caps)
        return (f"PatchHandle(layers={len(self.layers)}, budget={cap}, policy={self.default.policy!r}, "
                f"when={self.when!r}, backend={self.backend!r}, experts={self.experts!r}, patched={self._active})")

    # -- internals

    def _settings_for(self, shape: Optional[CallShape]) -> Optional[LayerBudgets]:
        """Budget settings of a call of this shape (None shape: a block called outside a model forward)."""
        if self._overrides:
            return self._overrides[-1]
        if not self.default.active:
            return None
        if self.when == "always" or _SCOPE.depth > 0:
            return self.default
        if self._assisted > 0 and shape is not None and shape.is_verification:
            return self.default
        return None

    def _install(self, model: torch.nn.Module) -> None:
        register()
        use_registry = _switch_experts_implementation(model, [p.experts for p in self._patched], self._saved_impl)
        for p in self._patched:
            p.install(use_registry)
            _ROUTERS[p.router] = self
        for module in _entry_modules(model, [p.info.name for p in self._patched]):
            names = positional_names(module.forward)
            self._hooks.append(module.register_forward_pre_hook(self._make_pre_hook(names, module), with_kwargs=True))
            self._hooks.append(module.register_forward_hook(self._make_post_hook(module), with_kwargs=True,
                                                            always_call=True))
        self._assisted_class = _wrap_assisted_decoding(type(model))
        self._active = True

    def _make_pre_hook(self, names: tuple, target: torch.nn.Module):
        def pre_hook(module, args, kwargs):
            if module is not target:  # carried along by a deep copy of the model
                return None
            self._depth += 1
            if self._depth == 1:
                try:
                    shape = call_shape(names, args, kwargs)
                except Exception:  # an input layout we cannot read: treat as not verification
                    shape = CallShape(0, 0, 0)
                settings = self._settings_for(shape)
                budgeted = settings is not None and settings.active
                stats = None
                if not torch.compiler.is_compiling():
                    tokens = shape.tokens if shape.token_mask is None else shape.token_mask.sum()
                    stats = CallStats(tokens=tokens, budgeted=budgeted, past_length=shape.past_length)
                self._call = _OpenCall(settings, stats, shape.token_mask)
            return None

        return pre_hook

    def _make_post_hook(self, target: torch.nn.Module):
        def post_hook(module, args, kwargs, output):
            if module is not target:
                return None
            self._depth = max(self._depth - 1, 0)
            if self._depth == 0 and self._call is not None:
                call, self._call = self._call, None
                if self.stats.enabled and call.stats is not None and call.stats.layers:
                    self.stats.calls.append(call.stats)
            return None

        return post_hook


# transformers' candidate-verification loop (assisted and prompt-lookup generation). generate()
# looks it up on the class, so the model class gets a pass-through wrapper while at least one
# of its instances is patched: calls of a patched instance are marked as verification scope.
_ASSISTED_METHOD = "_assisted_decoding"
_ASSISTED_WRAPPED: dict = {}  # class -> [wrapper, number of live patches, the class's own attribute]


def _wrap_assisted_decoding(cls: type) -> Optional[type]:
    entry = _ASSISTED_WRAPPED.get(cls)
    if entry is not None:
        entry[1] += 1
        return cls
    original = getattr(cls, _ASSISTED_METHOD, None)
    if not callable(original):
        return None

    def _assisted_decoding(self, *args, **kwargs):
        handle = get_handle(self)
        if handle is None:
            return original(self, *args, **kwargs)
        handle._assisted += 1
        try:
            return original(self, *args, **kwargs)
        finally:
            handle._assisted -= 1

    _assisted_decoding.__wrapped__ = original
    _assisted_decoding.__doc__ = original.__doc__
    _ASSISTED_WRAPPED[cls] = [_assisted_decoding, 1, cls.__dict__.get(_ASSISTED_METHOD)]
    setattr(cls, _ASSISTED_METHOD, _assisted_decoding)
    return cls


def _unwrap_assisted_decoding(cls: Optional[type]) -> None:
    entry = _ASSISTED_WRAPPED.get(cls) if cls is not None else None
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] <= 0:
        del _ASSISTED_WRAPPED[cls]
        if cls.__dict__.get(_ASSISTED_METHOD) is entry[0]:
            if entry[2] is not None:
                setattr(cls, _ASSISTED_METHOD, entry[2])
            else:
                delattr(cls, _ASSISTED_METHOD)


def _check_backend_can_run(backend: str, blocks) -> None:
    """Refuse, at patch time, a ``backend`` that cannot run the budgeted ops of these MoE blocks
    where they are (the name itself is checked by `BudgetConfig.resolve`)."""
    if backend not in ("cuda", "emu", "cpu"):
        return  # "auto" and "reference" run anywhere
    tensors = [t for _, block, _ in blocks for t in (*block.parameters(), *block.buffers())]
    devices = sorted({str(t.device) for t in tensors})
    if backend == "cpu":
        from .. import cpu_kernels

        reason = cpu_kernels.unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"moespec.patch: backend='cpu' cannot run here: {reason}")
        if any(t.device.type != "cpu" for t in tensors):
            raise ValueError(f"moespec.patch: backend='cpu' needs the MoE blocks on the CPU, but their weights are "
                             f"on {', '.join(devices)}; use backend='auto' (kernels for each device)")
        return
    # The plan kernel serves the softmax top-k routers' routing op; every block runs the experts op.
    launchers = ["moe_experts"]
    if any(spec.router_spec(getattr(block, spec.router_attr)).kind == "softmax_topk" for _, block, spec in blocks):
        launchers.append("routing_plan")
    if backend == "cuda":
        reason = _cuda.unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"moespec.patch: backend='cuda' cannot run here: {reason}. Use backend='auto' "
                               "(kernels where available) or 'reference'")
        if any(t.device.type != "cuda" for t in tensors):
            raise ValueError(f"moespec.patch: backend='cuda' needs the MoE blocks on a CUDA device, but their "
                             f"weights are on {', '.join(devices)}; move the model first (model.to('cuda')) or "
                             "use backend='auto' / 'reference'")
        missing = [name for name in launchers if not _cuda.has_kernel(name)]
        if missing:
            raise RuntimeError(f"moespec.patch: backend='cuda': this build has no CUDA kernel {', '.join(missing)}")
    else:
        if not _cuda.emu_compiled():
            raise RuntimeError(f"moespec.patch: backend='emu' needs an emulation build of moespec, but this one was "
                               f"built with backend {_cuda.backend()!r}; reinstall with MOESPEC_CUDA=EMU to run the "
                               "kernels on CPU tensors, or use backend='auto' / 'reference'")
        if any(t.device.type != "cpu" for t in tensors):
            raise ValueError(f"moespec.patch: backend='emu' runs the kernels on CPU tensors, but the MoE blocks' "
                             f"weights are on {', '.join(devices)}; move the model to the CPU (model.to('cpu')) "
                             "or use backend='cuda' / 'auto' on a GPU")
        missing = [name for name in launchers if not _cuda.has_emu_kernel(name)]
        if missing:
            raise RuntimeError(f"moespec.patch: backend='emu': this emulation build has no kernel {', '.join(missing)}")


EXPERTS_MODES = ("model", "moespec")


def _check_experts(experts: str) -> str:
    if experts not in EXPERTS_MODES:
        raise ValueError(f"moespec: experts must be one of {EXPERTS_MODES}, got {experts!r}")
    return experts


def _check_when(when: str) -> str:
    if when not in WHEN_MODES:
        raise ValueError(f"moespec: when must be one of {WHEN_MODES}, got {when!r}")
    return when


def _entry_modules(model: torch.nn.Module, block_names: list[str]) -> list[torch.nn.Module]:
    """The model and every transformers model module between it and the MoE blocks.

    Hooking the inner base model too makes a direct ``model.model(...)`` call count as one
    call; the depth counter keeps a nested call from opening a second one.
    """
    from transformers import PreTrainedModel

    modules = [model]
    prefixes = set()
    for name in block_names:
        parts = name.split(".")
        prefixes.update(".".join(parts[:i]) for i in range(1, len(parts)))
    for name in sorted(prefixes, key=len):
        sub = model.get_submodule(name)
        if sub is not model and isinstance(sub, PreTrainedModel):
            modules.append(sub)
    return modules


def _switch_experts_implementation(model: torch.nn.Module, experts: list, saved: list) -> bool:
    """Point transformers' experts dispatch at ``"moespec"``; False if that is not possible.

    Records each experts config's previous implementation in ``saved`` for the restore.
    """
    configs = []
    for e in experts:
        cfg = getattr(e, "config", None)
        if cfg is None or not hasattr(cfg, "_experts_implementation") or not hasattr(e, "is_transposed"):
            return False
        if all(c is not cfg for c in configs):
            configs.append(cfg)
    setter = getattr(model, "set_experts_implementation", None)
    if setter is None:
        return False
    for cfg in configs:
        saved.append((cfg, cfg._experts_implementation))
    try:
        setter(IMPLEMENTATION_NAME)
    except (ValueError, KeyError, RuntimeError):
        _restore_experts_implementation(model, saved)
        saved.clear()
        return False
    if any(cfg._experts_implementation != IMPLEMENTATION_NAME for cfg in configs):
        _restore_experts_implementation(model, saved)
        saved.clear()
        return False
    return True


def _restore_experts_implementation(model: torch.nn.Module, saved: list) -> None:
    if not saved:
        return
    setter = getattr(model, "set_experts_implementation", None)
    first = saved[0][1]
    if setter is not None and isinstance(first, str):
        try:
            setter(first)
        except (ValueError, KeyError, RuntimeError):
            pass
    for cfg, prev in saved:
        if cfg._experts_implementation != prev:
            # Set the stored value directly: the public setter would re-validate a value
            # that was valid when it was first set.
            cfg._experts_implementation_internal = prev


# ----------------------------------------------------------------------------- public API


def patch(
    model: torch.nn.Module,
    budget: BudgetSpec = None,
    policy: str = "substitute",
    score: str = "prob",
    coverage: Optional[float] = None,
    min_budget: Optional[int] = None,
    when: str = "auto",
    backend: str = "auto",
    candidates: Optional[str] = None,
    experts: str = "model",
) -> PatchHandle:
    """Make a loaded transformers MoE model run budgeted MoE layers (docs/design.md §3).

    Args:
        model: a transformers v5 model (``from_pretrained`` or ``from_config``) with supported
            MoE blocks: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3, gpt-oss.
        budget: default cap on distinct experts per MoE layer and forward call: None (no cap),
            an int, a list with one int-or-None per MoE layer, or ``f(moe_layer_ordinal)``.
        policy: ``"substitute"`` (re-route dropped tokens within the kept set) or ``"truncate"``.
        score: ``"prob"`` (router probability mass) or ``"topk"`` (summed top-k weights).
        coverage: adaptive budget: keep the fewest experts reaching this share of the score
            mass, between ``min_budget`` (default top-k) and ``budget``.
        min_budget: lower clamp for ``coverage``.
        when: ``"auto"``: the default budget applies only to verification-shaped calls (more
            than one new token per sequence with a non-empty KV cache), so transformers'
            ``generate(assistant_model=...)`` / ``prompt_lookup_num_tokens`` get budgeted
            verification; ``"always"``: every forward. `expert_budget` overrides both.
        backend: where budgeted calls run moespec's routing and experts ops (`moespec.ops`
            backends): ``"auto"`` (CUDA kernels for CUDA tensors, the reference elsewhere),
            ``"reference"`` (always the PyTorch reference), ``"cuda"`` (the kernels; the model
            must be on a GPU), ``"emu"`` (the kernels on the CPU emulator of an emulation build,
            ``MOESPEC_CUDA=EMU``; slow, for testing kernels without a GPU). Unbudgeted calls run
            the model's own experts whatever the backend. The ops' own fallbacks still apply
            (e.g. fp32 experts run the reference: the experts kernels are bf16/fp16).
        candidates: the experts a kept set is chosen from: ``"all"`` (every expert, MoE-Spec's
            rule), ``"union"`` (the union of the call's top-k; the default, chosen by measurement;
            the default for ``truncate``). Either way a layer whose union fits is untouched.
        experts: the experts implementation of unbudgeted calls: ``"model"`` (default: the model's
            own, so unbudgeted outputs stay bitwise the model's) or ``"moespec"`` (every call runs
            `moespec.ops.moe_experts` on ``backend``, e.g. the C++ CPU kernels, with the model's own
            routing: the same math, rounded by another summation order). ``"moespec"`` puts every
            forward (prefill, decode, verification) on one implementation, so that a benchmark's
            modes differ only in what they verify, not in whose kernels run.
        `PatchHandle` (``.stats``, ``.unpatch()``, usable as a context manager).

    Raises:
        UnsupportedModelError: no supported MoE block (the model is left untouched).
        ValueError: invalid budget, policy, score, coverage, mode or backend name, or a
            ``"cuda"`` / ``"emu"`` backend with the MoE blocks on another device.
        RuntimeError: the model is already patched (use `get_handle`), or the backend's kernels
            are not available here (no GPU / CUDA build for ``"cuda"``, not an emulation build
            for ``"emu"``).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"moespec.patch expects a torch.nn.Module, got {type(model).__name__}")
    if get_handle(model) is not None:
        raise RuntimeError("moespec.patch: this model is already patched; use moespec.integrations.get_handle(model) "
                           "or unpatch it first")
    blocks = find_moe_blocks(model)
    if not blocks:
        raise UnsupportedModelError(describe_unsupported(model))
    for name, block, spec in blocks:
        other = _ROUTERS.get(getattr(block, spec.router_attr))
        if other is not None and other.patched:
            owner = other.model
            what = type(owner).__name__ if owner is not None else "another module"
            relation = ("a submodule of this model" if owner is not None and any(m is owner for m in model.modules())
                        else "a module that contains this one")
            raise RuntimeError(
                f"moespec.patch: the MoE block {name or type(block).__name__!r} is already patched through "
                f"{what} ({relation}); unpatch that handle first (moespec.integrations.get_handle(...).unpatch()) "
                "instead of stacking two patches on the same routers")
    handle = PatchHandle(model, blocks, BudgetConfig(budget, policy, score, coverage, min_budget, backend, candidates),
                         when, experts)
    _check_backend_can_run(handle.backend, blocks)
    handle._install(model)
    _HANDLES[model] = handle
    return handle


def get_handle(model: torch.nn.Module) -> Optional[PatchHandle]:
    """The live `PatchHandle` of ``model``, or None if it is not patched."""
    try:
        handle = _HANDLES.get(model)
    except TypeError:
        return None
    return handle if handle is not None and handle.patched else None


@contextlib.contextmanager
def expert_budget(
    model: torch.nn.Module,
    budget: BudgetSpec,
    policy: str = "substitute",
    score: Optional[str] = None,
    coverage: Optional[float] = None,
    min_budget: Optional[int] = None,
    candidates: Optional[str] = None,
) -> Iterator[PatchHandle]:
    """Context manager: every forward of ``model`` inside uses this budget.

    Explicit control for a speculative-decoding loop: it overrides the default budget and the
    automatic mode, for every call shape (``budget=None`` without coverage runs unbudgeted).
    An unpatched model is patched on entry and restored on exit.

    Args:
        budget, policy, coverage, min_budget, candidates: as in `patch`.
        score: as in `patch`; None keeps the patch's score mode.

    Yields:
        The model's `PatchHandle` (for ``.stats``).
    """
    handle = get_handle(model)
    created = handle is None
    if created:
        handle = patch(model)
    try:
        with handle.budget(budget, policy, score, coverage, min_budget, candidates):
            yield handle
    finally:
        if created:
            handle.unpatch()
