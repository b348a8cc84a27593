"""The vLLM plugin through vLLM's own classes on the CPU (FusedMoEFactory -> MoERunner -> router).

Only the compiled expert apply (``UnquantizedFusedMoEMethod.apply``) is replaced, by
`moespec.reference.moe_experts`. Skipped where vLLM is not installed (the README's vllm lane installs it).
"""
import itertools
import os
from types import SimpleNamespace

import pytest

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")  # before vLLM picks its platform
if os.environ.get("MOESPEC_REQUIRE_VLLM"):
    import vllm  # the vllm CI lane: a broken install must fail, not skip
else:
    vllm = pytest.importorskip("vllm")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from moespec import reference  # noqa: E402
from moespec.integrations import vllm as mv  # noqa: E402

from vllm.config import VllmConfig, set_current_vllm_config  # noqa: E402
from vllm.config.compilation import CUDAGraphMode  # noqa: E402
from vllm.forward_context import BatchDescriptor, get_forward_context, set_forward_context  # noqa: E402
from vllm.model_executor.layers.fused_moe.layer import FusedMoEFactory  # noqa: E402
from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod  # noqa: E402
from vllm.v1.worker.gpu.model_runner import GPUModelRunner as V2Runner  # noqa: E402

try:  # the V1 model runner: vLLM 0.33 has it, 0.34 removed it
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner as V1Runner  # noqa: E402
except ImportError:
    V1Runner = None

E, K_TOP, H, I = 16, 4, 32, 24
_layer_no = itertools.count(100)


def _ref_apply(self, layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input):
    # vLLM's w13 is [E, 2I, H] gate-first and w2 [E, H, I]: moespec's default layout.
    return reference.moe_experts(x, layer.w13_weight, layer.w2_weight, topk_ids, topk_weights)


@pytest.fixture(scope="module")
def cfg():
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.distributed.parallel_state import model_parallel_is_initialized

    import vllm.triton_utils

    mp = pytest.MonkeyPatch()
    mp.setattr(UnquantizedFusedMoEMethod, "apply", _ref_apply)
    with pytest.MonkeyPatch.context() as config_mp:
        # vLLM 0.34 refuses to configure an x86 CPU without triton-cpu (0.33 warned), a serving
        # requirement: no triton-cpu is on PyPI, and the MoE classes tested here run no Triton on the
        # CPU, so the config is built as if it were installed.
        config_mp.setattr(vllm.triton_utils, "HAS_TRITON", True)
        config = VllmConfig()
    with set_current_vllm_config(config):
        if not model_parallel_is_initialized():
            init_distributed_environment(world_size=1, rank=0, local_rank=0,
                                         distributed_init_method="tcp://127.0.0.1:29571", backend="gloo")
            initialize_model_parallel(1, 1)
    mv.register()
    yield config
    mv.configure(None)
    mp.undo()


def _settings(**kw):
    layers = kw.pop("layers", None)
    return mv.VllmBudgetSettings(mv.BudgetConfig(**kw), layers)


def build(cfg, settings, layer=None, renormalize=True, seed=0):
    """One MoE layer through vLLM's factory; returns the runner (weights random, fixed seed)."""
    mv.configure(settings)
    layer = next(_layer_no) if layer is None else layer
    with set_current_vllm_config(cfg):
        r = FusedMoEFactory(num_experts=E, top_k=K_TOP, hidden_size=H, intermediate_size=I,
                            params_dtype=torch.float32, renormalize=renormalize,
                            prefix=f"model.layers.{layer}.mlp.experts")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        r.routed_experts.w13_weight.copy_(torch.randn(r.routed_experts.w13_weight.shape, generator=g) * 0.2)
        r.routed_experts.w2_weight.copy_(torch.randn(r.routed_experts.w2_weight.shape, generator=g) * 0.2)
    return r


def route(cfg, r, x, logits, is_padding=None, mode=CUDAGraphMode.NONE, desc=None):
    """(topk_weights, topk_ids, layer output) inside a vLLM forward context."""
    with set_current_vllm_config(cfg), set_forward_context(None, cfg, num_tokens=x.shape[0], cudagraph_runtime_mode=mode,
                                                           batch_descriptor=desc, is_padding=is_padding):
        w, ids = r.router.select_experts(x, logits)
        y = r(x, logits)
    return w, ids, y


def inputs(T, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, H, generator=g), torch.randn(T, E, generator=g) * 2


def verify_step(num_reqs=2, K=3):
    """Record a verification step (uniform, 1 + K tokens per request); returns num_tokens."""
    assert mv.begin_step(num_reqs * (1 + K), num_reqs, 1 + K, K)
    return num_reqs * (1 + K)


# ----------------------------------------------------------------------------- plugin loading


def test_plugin_loads_twice_and_replaces_the_runner(cfg):
    from vllm.model_executor.custom_op import op_registry_oot

    mv.register()
    mv.register()
    cls = op_registry_oot["MoERunner"]
    assert cls.__name__ == "BudgetedMoERunner"
    hooks = [V2Runner.gather_batch_req_state]
    if V1Runner is not None:
        hooks.append(V1Runner._determine_batch_execution_and_padding)
    for wrapped in hooks:
        assert wrapped._moespec and not getattr(wrapped.__wrapped__, "_moespec", False)  # hooked once
    r = build(cfg, _settings(budget=4))
    assert isinstance(r, cls) and hasattr(r.router, "_moespec_state")


def test_unsupported_vllm_version_is_a_clear_error(cfg, monkeypatch):
    monkeypatch.setattr(vllm, "__version__", "0.32.1")
    with pytest.raises(mv.UnsupportedVllmError, match=r"vllm 0\.33\.x or 0\.34\.x.*found vllm 0\.32\.1"):
        mv.register()


def test_entry_point_is_declared():
    from importlib.metadata import entry_points

    eps = [e for e in entry_points(group="vllm.general_plugins") if e.name == "moespec"]
    assert len(eps) == 1 and eps[0].load() is mv.register


# ----------------------------------------------------------------------------- routing


def test_union_fits_budget_routing_and_output_bit_identical(cfg):
    T = verify_step(num_reqs=2, K=3)
    x, logits = inputs(T)
    logits[:, 6:] -= 20  # every token's top-4 lies in experts 0..5: union <= 6
    plain = build(cfg, _settings(budget=None), seed=3)
    capped = build(cfg, _settings(budget=6), seed=3)
    w0, i0, y0 = route(cfg, plain, x, logits)
    assert int(reference.union_mask(i0, E).sum()) <= 6
    mv.reset_stats()
    w1, i1, y1 = route(cfg, capped, x, logits)
    assert torch.equal(i0, i1) and i0.dtype == i1.dtype
    assert torch.equal(w0, w1) and w0.dtype == w1.dtype
    assert torch.equal(y0, y1)
    s = mv.stats()[capped.layer_name]
    assert s["verify_calls"] == 2 and s["budgeted_calls"] == 0  # select_experts + the layer forward


@pytest.mark.parametrize("policy,candidates", [("substitute", "all"), ("substitute", "union"), ("truncate", "union")])
def test_over_budget_is_exact_moespec_routing(cfg, policy, candidates):
    T = verify_step(num_reqs=3, K=3)
    x, logits = inputs(T, seed=2)
    r = build(cfg, _settings(budget=K_TOP, policy=policy, candidates=candidates), seed=4)
    plain = build(cfg, _settings(budget=None), seed=4)
    want = reference.budget_routing_masked(logits, K_TOP, K_TOP, policy, True, "prob", None, None,
                                           candidates=candidates)
    assert bool(want[4]), "the test needs a union larger than the budget"
    w, ids, y = route(cfg, r, x, logits)
    assert torch.equal(ids.long(), want[0])
    assert torch.equal(w, want[1])
    assert ids[w != 0].unique().numel() <= K_TOP  # experts read (truncate leaves dropped pairs at weight 0)
    mv.reset_stats()
    route(cfg, r, x, logits)
    s = mv.stats()[r.layer_name]
    assert s["budgeted_calls"] == 2 and s["read"] == 2 * ids[w != 0].unique().numel()
    assert torch.equal(y, reference.moe_experts(x, r.routed_experts.w13_weight, r.routed_experts.w2_weight, ids, w))
    _, _, y_plain = route(cfg, plain, x, logits)
    assert not torch.allclose(y, y_plain)


def test_exact_routing_is_the_default_for_substitute(cfg):
    """No candidates given: substitute chooses among all experts (exact MoE-Spec routing)."""
    T = verify_step(num_reqs=2, K=7)
    x, logits = inputs(T, seed=5)
    r = build(cfg, _settings(budget=5))
    want = reference.budget_routing_masked(logits, K_TOP, 5, "substitute", True, candidates="all")
    w, ids, _ = route(cfg, r, x, logits)
    assert torch.equal(ids.long(), want[0]) and torch.equal(w, want[1])


def test_no_renormalize_router(cfg):
    T = verify_step(num_reqs=2, K=3)
    x, logits = inputs(T, seed=6)
    r = build(cfg, _settings(budget=K_TOP), renormalize=False)
    want = reference.budget_routing_masked(logits, K_TOP, K_TOP, "substitute", False, candidates="all")
    w, ids, _ = route(cfg, r, x, logits)
    assert torch.equal(ids.long(), want[0]) and torch.equal(w, want[1])


@pytest.mark.parametrize("num_tokens,num_reqs,max_q,K", [
    (8, 1, 8, 3),    # prefill of one request
    (8, 3, 4, 3),    # mixed: one request with 4 tokens, two with 2
    (6, 6, 1, 0),    # K=0: plain decode without speculation
    (6, 6, 1, 3),    # decode step without drafts while K=3
    (8, 2, 4, 0),    # K=0 configured: never a verification step
])
def test_no_budget_outside_verification(cfg, num_tokens, num_reqs, max_q, K):
    from vllm.v1.worker.utils import get_uniform_decode_token_count

    if V1Runner is not None:
        verify = mv.begin_step(num_tokens, num_reqs, max_q, K)
        # The same rule as vLLM's own uniform-decode test with query length 1 + K.
        assert verify == (K > 0 and V1Runner._is_uniform_decode(max_q, 1 + K, num_tokens, num_reqs))
        assert not verify
    # The V2 runner's rule, from the uniform count vLLM computes for a batch without prefill.
    uniform = get_uniform_decode_token_count(num_reqs, num_tokens, max_q, decode_graph_eligible=True)
    assert not mv.begin_uniform_step(uniform, K)
    x, logits = inputs(num_tokens, seed=7)
    r = build(cfg, _settings(budget=K_TOP), seed=8)
    plain = build(cfg, _settings(budget=None), seed=8)
    mv.reset_stats()
    w, ids, y = route(cfg, r, x, logits)
    w0, i0, y0 = route(cfg, plain, x, logits)
    assert torch.equal(ids, i0) and torch.equal(w, w0) and torch.equal(y, y0)
    assert mv.stats()[r.layer_name]["verify_calls"] == 0


def test_padded_rows_do_not_count(cfg):
    T = verify_step(num_reqs=2, K=3)
    x, logits = inputs(T + 4, seed=9)
    logits[T:] = 0
    logits[T:, 8:] = 30  # padding would pull experts 8..15 into the union and the scores
    is_padding = torch.zeros(T + 4, dtype=torch.bool)
    is_padding[T:] = True
    r = build(cfg, _settings(budget=6))
    mv.reset_stats()
    w, ids, _ = route(cfg, r, x, logits, is_padding=is_padding)
    want = reference.budget_routing_masked(logits, K_TOP, 6, "substitute", True, token_mask=~is_padding,
                                           candidates="all")
    assert torch.equal(ids[:T].long(), want[0][:T]) and torch.equal(w[:T], want[1][:T])
    assert torch.all(w[T:] == 0)
    s = mv.stats()[r.layer_name]
    assert s["tokens"] == 2 * T  # two calls, padding excluded
    real_union = int(reference.union_mask(reference.route_topk_softmax(logits, K_TOP, True)[1], E,
                                          ~is_padding).sum())
    assert s["union"] == 2 * real_union


@pytest.mark.parametrize("mode,desc", [
    (CUDAGraphMode.NONE, BatchDescriptor(8)),  # V1 and V2 eager
    (CUDAGraphMode.PIECEWISE, BatchDescriptor(8, num_reqs=None, uniform=False)),  # V1's relaxed key; V2's is BatchDescriptor(8)
    (CUDAGraphMode.FULL, BatchDescriptor(8, num_reqs=2, uniform=True)),  # V1's FULL decode key
    (CUDAGraphMode.FULL, None),  # V2 captures FULL graphs under no descriptor (and replays them with no context)
])
def test_graph_modes_follow_the_step_not_the_descriptor(cfg, mode, desc):
    x, logits = inputs(8, seed=10)
    r = build(cfg, _settings(budget=K_TOP))
    want = reference.budget_routing_masked(logits, K_TOP, K_TOP, "substitute", True, candidates="all")
    verify_step(num_reqs=2, K=3)
    w, ids, _ = route(cfg, r, x, logits, mode=mode, desc=desc)
    assert torch.equal(ids.long(), want[0])
    # No key tells a mixed 8-token batch from a verification one (V2's varlen FULL decode graphs serve both;
    # PIECEWISE and eager keys carry the token count only): the step does.
    assert not mv.begin_step(8, 3, 4, 3)
    w2, ids2, _ = route(cfg, r, x, logits, mode=mode, desc=desc)
    assert not torch.equal(ids2.long(), want[0])
    assert torch.equal(ids2.long().sort(dim=1).values, reference.route_topk_softmax(logits, K_TOP, True)[1]
                       .sort(dim=1).values)


def test_router_padding_marks_are_kept(cfg, monkeypatch):
    """vLLM's GPU routers give padded rows expert id -1 (VLLM_MOE_SKIP_PADDING) so that the experts skip
    them; the budgeted routing keeps those marks and its counters do not index with them."""
    T = verify_step(num_reqs=2, K=3)
    x, logits = inputs(T + 4, seed=14)
    is_padding = torch.zeros(T + 4, dtype=torch.bool)
    is_padding[T:] = True
    router_cls = type(build(cfg, _settings(budget=None)).router)
    plain_compute = router_cls._compute_routing

    def marking(self, hidden_states, router_logits, indices_type, *, input_ids=None):
        w, ids = plain_compute(self, hidden_states, router_logits, indices_type, input_ids=input_ids)
        pad = get_forward_context().is_padding
        return w, torch.where(pad[:ids.shape[0], None], torch.full_like(ids, -1), ids)

    monkeypatch.setattr(router_cls, "_compute_routing", marking)
    r = build(cfg, _settings(budget=6), seed=15)
    mv.reset_stats()
    with set_current_vllm_config(cfg), set_forward_context(None, cfg, num_tokens=T + 4, is_padding=is_padding):
        w, ids = r.router.select_experts(x, logits)
    want = reference.budget_routing_masked(logits, K_TOP, 6, "substitute", True, token_mask=~is_padding,
                                           candidates="all")
    assert bool(want[4]), "the test needs a union larger than the budget"
    assert torch.equal(ids[:T].long(), want[0][:T]) and torch.equal(w[:T], want[1][:T])
    assert torch.all(ids[T:] == -1)
    s = mv.stats()[r.layer_name]
    assert s["tokens"] == T and s["read"] == ids[:T][w[:T] != 0].unique().numel() <= 6


# ----------------------------------------------------------------------------- the V2 model runner's step


def _v2_runner(K, reqs):
    """The state `V2Runner.gather_batch_req_state` reads; reqs: {req_id: (prompt length, prompt tokens computed)}."""
    order = list(reqs)
    states = SimpleNamespace(req_id_to_index={q: i for i, q in enumerate(order)},
                             prefill_len=SimpleNamespace(np=np.array([reqs[q][0] for q in order])),
                             num_computed_prefill_tokens=np.array([reqs[q][1] for q in order]))
    return SimpleNamespace(num_speculative_steps=K, decode_query_len=1 + K, req_states=states, use_pp=False,
                           adaptive_verification=None, pcp_manager=None)


def _v2_step(runner, tokens, drafts, dummy_run=False):
    """Run vLLM's own (hooked) V2 `gather_batch_req_state` for one scheduled batch; returns the step decision."""
    out = SimpleNamespace(num_scheduled_tokens=tokens, total_num_scheduled_tokens=sum(tokens.values()),
                          scheduled_spec_decode_tokens=drafts)
    V2Runner.gather_batch_req_state(runner, out, dummy_run)
    flag = mv._STEP.flag(torch.device("cpu"))
    assert bool(flag) == mv.is_verification_step()  # the device flag the graphs read follows the host value
    return mv.is_verification_step()


DECODING = {"a": (5, 5), "b": (7, 7)}


@pytest.mark.parametrize("K,reqs,tokens,drafts,verify", [
    (3, DECODING, {"a": 4, "b": 4}, {"a": [1, 2, 3], "b": [4, 5, 6]}, True),   # 1 + K tokens each
    (3, DECODING, {"a": 2, "b": 2}, {"a": [1], "b": [4]}, True),               # dynamic SD scheduled k=1 < K
    (3, DECODING, {"a": 4, "b": 2}, {"a": [1, 2, 3], "b": [4]}, False),        # not uniform
    (3, DECODING, {"a": 1, "b": 1}, {}, False),                                # drafts skipped (k=0)
    (3, {"a": (9, 5), "b": (7, 7)}, {"a": 4, "b": 4}, {"b": [4, 5, 6]}, False),  # a prefill chunk of 4
    (0, DECODING, {"a": 1, "b": 1}, {}, False),                                # no speculation configured
])
def test_v2_runner_step_decision(cfg, K, reqs, tokens, drafts, verify):
    mv.register()
    assert V2Runner.gather_batch_req_state._moespec
    mv.begin_step(8, 2, 4, 3)  # a verification step before: the hook must overwrite the decision
    assert _v2_step(_v2_runner(K, reqs), tokens, drafts) is verify
    # Routing follows the decision (the layer reads the step, whatever graph mode it runs in).
    n = sum(tokens.values())
    x, logits = inputs(n, seed=16)
    r = build(cfg, _settings(budget=K_TOP), seed=17)
    _, ids, _ = route(cfg, r, x, logits, desc=BatchDescriptor(n))
    want = reference.budget_routing_masked(logits, K_TOP, K_TOP, "substitute", True, candidates="all")
    plain = reference.route_topk_softmax(logits, K_TOP, True)[1]
    if verify:
        assert torch.equal(ids.long(), want[0])
    else:
        assert torch.equal(ids.long().sort(dim=1).values, plain.sort(dim=1).values)


def test_v2_runner_dummy_steps_use_the_same_rule(cfg):
    """Dummy batches (warm-up, DP padding steps) are uniform by construction: decided by their shape."""
    mv.register()
    runner = _v2_runner(3, {})
    assert _v2_step(runner, {"a": 4, "b": 4}, {}, dummy_run=True)
    assert not _v2_step(runner, {"a": 1, "b": 1, "c": 1}, {}, dummy_run=True)


def test_v2_runner_without_the_step_method_is_refused(monkeypatch):
    monkeypatch.setattr(V2Runner, "gather_batch_req_state", lambda self, scheduler_output: None)
    with pytest.raises(mv.UnsupportedVllmError, match=r"gather_batch_req_state\(scheduler_output, dummy_run\)"):
        mv._hook_v2_runner()


def test_decision_is_data_inside_a_compiled_graph(cfg):
    """Traced once, the routing reads the step flag: flipping it changes the result without a recompile,
    as a captured CUDA graph replays it."""
    x, logits = inputs(8, seed=11)
    r = build(cfg, _settings(budget=K_TOP))
    state = r.router._moespec_state

    def f(lg, w, ids):
        return mv.budgeted_routing(state, lg, w, ids)

    _, i0, w0 = reference.route_topk_softmax(logits, K_TOP, True)
    want = reference.budget_routing_masked(logits, K_TOP, K_TOP, "substitute", True, candidates="all")
    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True, backend="eager")
    mv.begin_step(8, 3, 4, 3)  # not verification
    w, ids = cf(logits, w0, i0)
    assert torch.equal(ids, i0) and torch.equal(w, w0)
    verify_step(num_reqs=2, K=3)
    with torch.compiler.set_stance("fail_on_recompile"):
        w, ids = cf(logits, w0, i0)
    assert torch.equal(ids, want[0]) and torch.equal(w, want[1])


def test_drafter_layers_are_not_budgeted(cfg):
    from vllm.compilation.backends import set_model_tag

    T = verify_step(num_reqs=2, K=3)
    x, logits = inputs(T, seed=12)
    with set_model_tag("eagle_head"):
        d = build(cfg, _settings(budget=K_TOP), seed=13)
    plain = build(cfg, _settings(budget=None), seed=13)
    assert not hasattr(d.router, "_moespec_state")
    w, ids, y = route(cfg, d, x, logits)
    w0, i0, y0 = route(cfg, plain, x, logits)
    assert torch.equal(ids, i0) and torch.equal(y, y0)


def test_layer_selection(cfg):
    s = _settings(budget=K_TOP, layers=frozenset({1, 3}))
    built = {i: build(cfg, s, layer=i + 200 if i > 3 else i) for i in (0, 1, 3, 5)}
    assert [i for i, r in built.items() if hasattr(r.router, "_moespec_state")] == [1, 3]


def test_unsupported_router_is_left_alone_with_a_warning(cfg, caplog):
    mv.configure(_settings(budget=K_TOP))
    with set_current_vllm_config(cfg), caplog.at_level("WARNING", logger="moespec.vllm"):
        r = FusedMoEFactory(num_experts=E, top_k=K_TOP, hidden_size=H, intermediate_size=I,
                            params_dtype=torch.float32, renormalize=True, scoring_func="sigmoid",
                            use_grouped_topk=True, num_expert_group=4, topk_group=2,
                            prefix=f"model.layers.{next(_layer_no)}.mlp.experts")
    assert not hasattr(r.router, "_moespec_state")
    assert "only softmax top-k" in caplog.text


def test_budget_below_top_k_names_the_layer(cfg):
    with pytest.raises(ValueError, match=r"model\.layers\.\d+\.mlp\.experts.*top_k=4"):
        build(cfg, _settings(budget=2))


# ----------------------------------------------------------------------------- settings


def test_settings_from_environment_and_additional_config():
    s = mv.settings_from({"MOESPEC_VLLM_BUDGET": "16", "MOESPEC_VLLM_POLICY": "truncate",
                          "MOESPEC_VLLM_LAYERS": "0-2,7", "PATH": "/bin"})
    assert s.config.budget == 16 and s.config.policy == "truncate" and s.layers == frozenset({0, 1, 2, 7})
    s = mv.settings_from({"MOESPEC_VLLM_BUDGET": "16"}, {"moespec": {"budget": 32, "coverage": 0.9,
                                                                      "candidates": "union"}})
    assert (s.config.budget, s.config.coverage, s.config.candidates) == (32, 0.9, "union")
    assert not mv.settings_from({}).active
    assert not mv.settings_from({"MOESPEC_VLLM_BUDGET": "none"}).active


@pytest.mark.parametrize("env,match", [
    ({"MOESPEC_VLLM_BUDGET": "sixteen"}, "MOESPEC_VLLM_BUDGET"),
    ({"MOESPEC_VLLM_BUDGET": "0"}, "budget must be >= 1"),
    ({"MOESPEC_VLLM_POLICY": "drop"}, "policy"),
    ({"MOESPEC_VLLM_COVERAGE": "1.5"}, "coverage"),
    ({"MOESPEC_VLLM_CANDIDATES": "some"}, "candidates"),
    ({"MOESPEC_VLLM_LAYERS": "a-b"}, "MOESPEC_VLLM_LAYERS"),
    ({"MOESPEC_VLLM_BUDGT": "16"}, "unknown environment variable"),
    ({"MOESPEC_VLLM_BACKEND": "gpu"}, "backend"),
])
def test_bad_settings_are_clear_errors(env, match):
    with pytest.raises(ValueError, match=match):
        mv.settings_from(env)


def test_bad_additional_config_key():
    with pytest.raises(ValueError, match="unknown additional_config"):
        mv.settings_from({}, {"moespec": {"budgte": 16}})



