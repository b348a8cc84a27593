"""The transformers range moespec states, and canaries for the transformers internals it relies on.

(a) The installed transformers lies inside the range moespec's installed metadata states.
(b) Per supported architecture: the pieces of transformers the drop-in (`moespec.patch`) and the
    spec engine (`moespec.speculative`) read still exist, so a transformers release that renames or drops
    one fails here with a message naming the version, instead of somewhere deep in a patch.
Only stable transformers API is used, so these tests run unchanged on every supported version
(the compat lane in .ci/run runs them on the oldest one).
"""
from __future__ import annotations

import functools
import importlib.metadata
import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moespec.integrations.architectures import SUPPORTED_BLOCKS  # noqa: E402
from moespec.integrations.tiny import TINY_ARCHITECTURES, tiny_model  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The models are tiny: one thread is faster than two on a busy CI machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _broke(what: str) -> str:
    return f"transformers {transformers.__version__} broke the moespec drop-in: {what}"


@functools.lru_cache(maxsize=None)
def _model(arch: str) -> torch.nn.Module:
    return tiny_model(arch)


def _moe_block(model: torch.nn.Module, arch: str):
    """The first MoE block of ``model`` that moespec's table knows, and its spec."""
    for _, module in model.named_modules():
        spec = SUPPORTED_BLOCKS.get(type(module).__name__)
        if spec is not None and spec.model_type == arch:
            return module, spec
    classes = sorted({type(m).__name__ for m in model.modules() if hasattr(m, "experts")})
    pytest.fail(_broke(f"{type(model).__name__} has no MoE block class moespec knows for {arch!r} "
                       f"(expected one of {sorted(SUPPORTED_BLOCKS)}; found {classes})"))


def _cache_argument(model: torch.nn.Module) -> str:
    """The forward's cache argument: ``cache`` (transformers >= 5.24) or ``past_key_values``."""
    params = inspect.signature(type(model).forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    pytest.fail(_broke(f"{type(model).__name__}.forward has neither a `cache` nor a `past_key_values` argument "
                       f"(parameters: {list(params)})"))


# --- (a) the stated range ----------------------------------------------------------------------
def test_installed_transformers_is_inside_the_stated_range():
    requirements_mod = pytest.importorskip("packaging.requirements")
    version_mod = pytest.importorskip("packaging.version")
    try:
        requires = importlib.metadata.requires("moespec") or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("moespec is not installed as a distribution (no metadata to read the stated range from)")
    stated = {}
    for line in requires:
        req = requirements_mod.Requirement(line)
        if req.name.lower() == "transformers":
            stated[str(req.marker) if req.marker else ""] = req.specifier
    assert stated, f"moespec's metadata states no transformers requirement: {requires}"
    installed = version_mod.Version(transformers.__version__)
    for where, spec in stated.items():
        assert spec.contains(installed, prereleases=True), (
            f"installed transformers {installed} is outside the range moespec states "
            f"(transformers{spec}{' for ' + where if where else ''}); install a version in that range "
            "or re-test and widen the range in pyproject.toml")


# --- (b) canaries ----------------------------------------------------------------------------
def test_experts_registry_exists():
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError as exc:
        pytest.fail(_broke(f"transformers.integrations.moe.ExpertsInterface is gone ({exc})"))
    assert callable(getattr(ExpertsInterface, "register", None)), _broke("ExpertsInterface.register is gone")


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_router_and_fused_experts_attributes(arch):
    model = _model(arch)
    block, spec = _moe_block(model, arch)
    where = f"{arch} ({type(block).__name__})"
    router = getattr(block, spec.router_attr, None)
    assert router is not None, _broke(f"{where} has no router child `{spec.router_attr}`")
    assert isinstance(getattr(router, "weight", None), torch.Tensor), _broke(f"{where} router has no `weight`")
    needed = ["num_experts", "top_k"]
    if spec.router_kind == "sigmoid_group_topk":
        needed += ["num_group", "topk_group", "routed_scaling_factor", "e_score_correction_bias"]
    for name in needed:
        assert hasattr(router, name), _broke(f"{where} router {type(router).__name__} has no `{name}`")

    experts = getattr(block, "experts", None)
    assert experts is not None, _broke(f"{where} has no `experts` child")
    what = f"{where} experts {type(experts).__name__}"
    for name in ("gate_up_proj", "down_proj"):
        w = getattr(experts, name, None)
        assert isinstance(w, torch.Tensor) and w.dim() == 3, _broke(
            f"{what}.{name} is not a fused 3-D tensor (got {type(w).__name__}"
            f"{'' if not isinstance(w, torch.Tensor) else f' of shape {tuple(w.shape)}'})")
    # Flags set by transformers' @use_experts_implementation, read by moespec's expert_layout.
    for name in ("is_transposed", "is_concatenated", "has_gate", "has_bias", "num_experts"):
        assert hasattr(experts, name), _broke(f"{what} has no `{name}` flag")
    assert callable(getattr(type(experts), "_apply_gate", None)), _broke(f"{what} has no `_apply_gate`")
    assert hasattr(type(experts).forward, "__wrapped__"), _broke(
        f"{what}.forward is not wrapped by the experts dispatch (no `__wrapped__` eager forward)")
    if arch == "gpt_oss":
        # Interleaved gate/up must be flagged, or moespec would read the weights as [gate; up].
        assert experts.is_concatenated is False, _broke(f"{what} does not flag its interleaved gate/up "
                                                        "(is_concatenated is not False)")
        for name in ("alpha", "limit"):
            assert hasattr(experts, name), _broke(f"{what} has no `{name}`")
    else:
        from transformers.integrations import moe

        assert hasattr(moe, "_default_apply_gate"), _broke("transformers.integrations.moe._default_apply_gate is gone")
        assert getattr(type(experts)._apply_gate, "__name__", "") == "_default_apply_gate", _broke(
            f"{what} no longer uses transformers' _default_apply_gate")
        assert hasattr(experts, "act_fn"), _broke(f"{what} has no `act_fn`")


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
@torch.no_grad()
def test_experts_dispatch_through_the_registry(arch):
    from transformers.integrations.moe import ExpertsInterface

    model = _model(arch)
    setter = getattr(model, "set_experts_implementation", None)
    assert callable(setter), _broke(f"{type(model).__name__} has no `set_experts_implementation`")
    cfg = model.config
    assert hasattr(cfg, "_experts_implementation"), _broke("the config has no `_experts_implementation`")
    assert hasattr(cfg, "_experts_implementation_internal"), _broke(
        "the config has no `_experts_implementation_internal` (moespec's unpatch restores it)")
    calls = []

    def canary(self, hidden_states, top_k_index, top_k_weights):
        calls.append(type(self).__name__)
        return torch.zeros_like(hidden_states)

    ExpertsInterface.register("moespec_range_canary", canary)
    before = cfg._experts_implementation
    try:
        setter("moespec_range_canary")
        model(torch.tensor([[1, 2, 3]]), use_cache=False)
    except Exception as exc:
        pytest.fail(_broke(f"{arch}: set_experts_implementation(<a name registered in ExpertsInterface>) "
                           f"and a forward with it failed: {exc!r}"))
    finally:
        setter(before)
    assert cfg._experts_implementation == before
    assert calls, _broke(f"{arch}: set_experts_implementation with a registered name does not route the experts "
                         "through ExpertsInterface")


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
@torch.no_grad()
def test_dynamic_cache_layers_and_4d_masks(arch):
    model = _model(arch)
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    arg = _cache_argument(model)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9]])
    try:
        out = model(input_ids=ids, use_cache=True, **{arg: cache})
    except Exception as exc:  # the forward itself no longer takes a DynamicCache this way
        pytest.fail(_broke(f"a {arch} forward with `{arg}=DynamicCache(config=...)` failed: {exc!r}"))
    layers = getattr(cache, "layers", None)
    assert layers, _broke(f"DynamicCache has no `.layers` after a {arch} forward with `{arg}=`")
    for i, layer in enumerate(layers):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            assert isinstance(t, torch.Tensor) and t.shape[-2] == ids.shape[1], _broke(
                f"DynamicCache.layers[{i}] ({type(layer).__name__}) has no `.{name}` tensor holding the "
                f"{ids.shape[1]} prompt positions")
    assert cache.get_seq_length() == ids.shape[1], _broke("DynamicCache.get_seq_length() does not count the prompt")
    assert callable(getattr(cache, "crop", None)), _broke("DynamicCache has no `crop`")
    if arch == "gpt_oss":
        return  # sliding-window targets are refused by moespec.speculative's tree verification anyway
    # The spec engine verifies trees with an additive float 4-D mask; a causal one must match the default.
    q = ids.shape[1]
    mask = torch.full((q, q), torch.finfo(torch.float32).min).triu(1)[None, None]
    masked = model(input_ids=ids, attention_mask=mask, use_cache=False)
    torch.testing.assert_close(masked.logits, out.logits, rtol=1e-4, atol=1e-5,
                               msg=lambda m: _broke(f"{arch}: a 4-D float attention mask is not honoured: {m}"))
