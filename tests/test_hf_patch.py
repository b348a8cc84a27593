"""moespec.patch on tiny transformers models: exactness, restore, budget scope, generation, stats."""
import copy
import json

import pytest
import torch

import moespec
from moespec.integrations import get_handle
from moespec.integrations.hf_compat import forward_kwargs, output_cache
from moespec.integrations.tiny import TINY_ARCHITECTURES, tiny_model

pytest.importorskip("transformers")

ARCHS = TINY_ARCHITECTURES


def _ids(seed, batch=1, length=8):
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def _greedy(model, ids, **kw):
    out = model.generate(ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_logits=True,
                         pad_token_id=0, **kw)
    return out.sequences, torch.stack(out.logits)


def _num_experts(model):
    cfg = model.config
    for name in ("num_local_experts", "num_experts", "n_routed_experts"):
        if getattr(cfg, name, None):
            return getattr(cfg, name)
    raise AssertionError("no expert count in config")


@pytest.fixture(params=ARCHS)
def pair(request):
    """(arch, model to patch, untouched copy)."""
    model = tiny_model(request.param, seed=1)
    return request.param, model, copy.deepcopy(model)


@torch.no_grad()
def test_exact_without_budget_and_with_budget_at_least_union(pair):
    arch, model, ref = pair
    prompt = _ids(0, batch=2)
    want_logits = ref(prompt).logits
    want_seq, want_gen_logits = _greedy(ref, prompt[:1])
    E = _num_experts(model)
    for kwargs in ({}, {"budget": E, "when": "always"}):
        with moespec.patch(model, **kwargs) as handle:
            got = model(prompt).logits
            assert (got - want_logits).abs().max().item() <= 1e-5
            seq, gen_logits = _greedy(model, prompt[:1])
            assert torch.equal(seq, want_seq)
            assert (gen_logits - want_gen_logits).abs().max().item() <= 1e-5
            assert handle.stats.calls and all(s.kept_size == s.union_size
                                               for c in handle.stats.calls for s in c.layers)


@torch.no_grad()
def test_unpatch_restores_model_exactly(pair):
    arch, model, ref = pair
    before_keys = list(model.state_dict().keys())
    before_modules = [(n, type(m)) for n, m in model.named_modules()]
    impl = model.config._experts_implementation
    handle = moespec.patch(model, budget=_num_experts(model) // 2)
    assert get_handle(model) is handle
    assert [(n, type(m)) for n, m in model.named_modules()] == before_modules
    assert list(model.state_dict().keys()) == before_keys
    handle.unpatch()
    handle.unpatch()  # idempotent
    assert get_handle(model) is None
    assert model.config._experts_implementation == impl
    for m in model.modules():
        assert "forward" not in m.__dict__ and "_moespec_state" not in m.__dict__
        assert not m._forward_hooks and not m._forward_pre_hooks
    prompt = _ids(1)
    assert torch.equal(model(prompt).logits, ref(prompt).logits)


@torch.no_grad()
def test_output_router_logits_still_work(pair):
    arch, model, ref = pair
    prompt = _ids(2, batch=2, length=5)
    want = ref(prompt, output_router_logits=True)
    with moespec.patch(model):
        got = model(prompt, output_router_logits=True)
    assert len(got.router_logits) == len(want.router_logits) >= 2
    for g, w in zip(got.router_logits, want.router_logits):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-6)
    if getattr(want, "aux_loss", None) is not None:
        torch.testing.assert_close(got.aux_loss, want.aux_loss)
    # Under a budget the routers still report their full, unbudgeted logits (the first MoE
    # layer sees the same input, later ones see the budgeted hidden states).
    with moespec.patch(model, budget=model.config.num_experts_per_tok, when="always"):
        got = model(prompt, output_router_logits=True)
    assert [g.shape for g in got.router_logits] == [w.shape for w in want.router_logits]
    torch.testing.assert_close(got.router_logits[0], want.router_logits[0], rtol=0, atol=1e-6)


@torch.no_grad()
def test_budget_scope_in_auto_mode(pair):
    """Auto mode budgets verification forwards only: prefill, one-token decode and a multi-token
    call on a cache outside a verification scope (e.g. a prompt chunk) run unbudgeted."""
    arch, model, ref = pair
    k = model.config.num_experts_per_tok
    prompt = _ids(3, batch=2, length=10)
    handle = moespec.patch(model, budget=k)
    try:
        pre = model(prompt[:, :6], use_cache=True)
        prefill = handle.stats.last()
        assert not prefill.budgeted and prefill.past_length == 0 and prefill.tokens == 12
        assert torch.equal(pre.logits, ref(prompt[:, :6]).logits)
        cache = output_cache(pre)
        model(prompt[:, 6:7], **forward_kwargs(model, cache, use_cache=True))
        decode = handle.stats.last()
        assert not decode.budgeted and decode.tokens == 2 and decode.past_length == 6
        assert all(s.kept_size == s.union_size and s.budget is None for s in decode.layers)
        with moespec.verification():
            model(prompt[:, 7:], **forward_kwargs(model, cache, use_cache=True))
        verify = handle.stats.last()
        assert verify.budgeted and verify.tokens == 6 and verify.past_length == 7
        assert all(s.kept_size <= k and s.budget == k and s.budgeted for s in verify.layers)
        assert verify.expert_bytes == sum(s.expert_bytes for s in verify.layers)
        assert len(handle.stats.calls) == 3
        # Explicit control overrides automatic mode, in both directions.
        with moespec.expert_budget(model, k):
            model(prompt)
        assert handle.stats.last().budgeted
        with moespec.expert_budget(model, None), moespec.verification():
            model(prompt[:, 7:], **forward_kwargs(model, output_cache(pre)))
        assert not handle.stats.last().budgeted
        handle.set_budget(k, when="always")
        model(prompt)
        assert handle.stats.last().budgeted
    finally:
        handle.unpatch()


@torch.no_grad()
def test_chunked_prefill_is_not_budgeted(pair):
    """A prompt fed in chunks (later chunks: many new tokens on a non-empty cache) stays exact."""
    arch, model, ref = pair
    k = model.config.num_experts_per_tok
    prompt = _ids(11, length=24)
    want = ref(prompt).logits
    with moespec.patch(model, budget=k) as handle:
        cache = None
        chunks = []
        for s in range(0, 24, 8):
            out = model(prompt[:, s:s + 8], **forward_kwargs(model, cache, use_cache=True))
            cache = output_cache(out)
            chunks.append(out.logits)
        assert [c.past_length for c in handle.stats.calls] == [0, 8, 16]
        assert not any(c.budgeted for c in handle.stats.calls)
        assert all(s.kept_size == s.union_size for c in handle.stats.calls for s in c.layers)
    torch.testing.assert_close(torch.cat(chunks, dim=1), want, rtol=1e-4, atol=1e-4)
    # The same chunks on the unpatched model give bitwise the same logits as patched.
    cache, plain = None, []
    for s in range(0, 24, 8):
        out = ref(prompt[:, s:s + 8], **forward_kwargs(ref, cache, use_cache=True))
        cache = output_cache(out)
        plain.append(out.logits)
    assert torch.equal(torch.cat(chunks, dim=1), torch.cat(plain, dim=1))


@torch.no_grad()
def test_padding_counts_neither_as_tokens_nor_in_the_union(pair):
    """Left padding (attention_mask zeros) is left out of token counts, union and scores."""
    arch, model, _ = pair
    if arch == "gpt_oss":
        pytest.skip("gpt-oss sliding-window attention with a padded 2-row batch is not what this checks")
    k = model.config.num_experts_per_tok
    E = _num_experts(model)
    ids = _ids(5, batch=2, length=9)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :4] = 0  # row 1 is left-padded by 4
    pre_ids, new_ids = ids[:, :6], ids[:, 6:]
    with moespec.patch(model, budget=E) as handle:
        pre = model(pre_ids, attention_mask=mask[:, :6], use_cache=True)
        assert handle.stats.last().tokens == 12 - 4
        with moespec.expert_budget(model, k):
            model(new_ids, **forward_kwargs(model, output_cache(pre), attention_mask=mask))
        verify = handle.stats.last()
        assert verify.tokens == 6 and verify.past_length == 6
    # The union of the real tokens only: recompute each layer's routing on real rows.
    with moespec.patch(model, budget=None) as handle:
        pre = model(pre_ids, attention_mask=mask[:, :6], use_cache=True)
        model(new_ids, **forward_kwargs(model, output_cache(pre), attention_mask=mask))
        unbudgeted = handle.stats.last()
    # The first MoE layer sees the same hidden states in both runs: same union of real tokens.
    assert verify.layers[0].union_size == unbudgeted.layers[0].union_size
    assert all(s.kept_size <= k for s in verify.layers)
    # A row whose new tokens are all padding adds nothing to the union.
    mask2 = mask.clone()
    mask2[1, :] = 0
    mask2[1, 0] = 1
    with moespec.patch(model, budget=None) as handle:
        pre = model(pre_ids, attention_mask=mask2[:, :6], use_cache=True)
        model(new_ids, **forward_kwargs(model, output_cache(pre), attention_mask=mask2))
        half = handle.stats.last()
    assert half.tokens == 3
    with moespec.patch(model, budget=None) as handle:
        pre = model(pre_ids[:1], attention_mask=mask2[:1, :6], use_cache=True)
        model(new_ids[:1], **forward_kwargs(model, output_cache(pre), attention_mask=mask2[:1]))
        single = handle.stats.last()
    assert [s.union_size for s in half.layers] == [s.union_size for s in single.layers]


@torch.no_grad()
def test_assisted_and_prompt_lookup_generation_get_budgeted_verification(pair):
    arch, model, ref = pair
    draft = tiny_model(arch, seed=7)
    # Prompt p + (the model's own continuation of p) + p, so prompt lookup finds drafts.
    p = torch.tensor([[5, 6, 7, 8, 9, 10]])
    cont = ref.generate(p, max_new_tokens=8, do_sample=False)[:, p.shape[1]:]
    prompt = torch.cat([p, cont, p], dim=1)
    # Unbudgeted, the patched model follows exactly the same assisted path as the original.
    draft.generation_config.num_assistant_tokens = 4  # short drafts keep the test quick
    want = ref.generate(prompt, max_new_tokens=6, do_sample=False, assistant_model=draft)
    with moespec.patch(model) as handle:
        got = model.generate(prompt, max_new_tokens=6, do_sample=False, assistant_model=draft)
        assert torch.equal(got, want)
        assert not any(c.budgeted for c in handle.stats.calls)
    k = model.config.num_experts_per_tok
    with moespec.patch(model, budget=k) as handle:
        for kwargs in ({"assistant_model": draft}, {"prompt_lookup_num_tokens": 3}):
            handle.stats.reset()
            out = model.generate(prompt, max_new_tokens=12, do_sample=False, **kwargs)
            assert out.shape[0] == 1 and prompt.shape[1] < out.shape[1] <= prompt.shape[1] + 12
            assert torch.equal(out[:, :prompt.shape[1]], prompt)
            calls = handle.stats.calls
            assert not calls[0].budgeted  # the first target call has no cache yet
            verifications = [c for c in calls if c.budgeted]
            assert verifications, f"{kwargs}: no budgeted verification"
            assert all(c.tokens > 1 and c.past_length > 0 for c in verifications)
            assert all(s.kept_size <= k for c in verifications for s in c.layers)


def test_stats_records_and_json(pair):
    arch, model, _ = pair
    with moespec.patch(model, budget=model.config.num_experts_per_tok, when="always") as handle:
        with torch.no_grad():
            model(_ids(4, batch=2, length=4))
        call = handle.stats.last()
        assert len(call.layers) == len(handle.layers) and [s.layer for s in call.layers] == list(range(len(call.layers)))
        for s, info in zip(call.layers, handle.layers):
            assert s.tokens == 8
            assert s.kept_experts == tuple(sorted(s.kept_experts)) and len(s.kept_experts) == s.kept_size
            assert s.expert_bytes == s.kept_size * info.bytes_per_expert
        json.dumps(handle.stats.to_dict())
        assert json.loads(json.dumps(call.to_dict()))["expert_bytes"] == call.expert_bytes
        handle.stats.enabled = False
        with torch.no_grad():
            model(_ids(5))
        assert len(handle.stats.calls) == 1
        handle.stats.reset()
        assert handle.stats.last() is None


def test_expert_budget_patches_on_the_fly_and_restores():
    model = tiny_model("qwen3_moe", seed=2)
    ref = copy.deepcopy(model)
    prompt = _ids(6, batch=2)
    with torch.no_grad(), moespec.expert_budget(model, 4, policy="truncate") as handle:
        model(prompt)
        assert handle.stats.last().budgeted
        assert get_handle(model) is handle
    assert get_handle(model) is None
    with torch.no_grad():
        assert torch.equal(model(prompt).logits, ref(prompt).logits)


def test_bf16_model_runs_and_counts_bytes_in_weight_dtype():
    model = tiny_model("mixtral", seed=2, dtype=torch.bfloat16)
    ref = copy.deepcopy(model)
    prompt = _ids(7)
    with moespec.patch(model, budget=2, when="always") as handle, torch.no_grad():
        out = model(prompt).logits
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
        info = handle.layers[0]
        assert info.bytes_per_expert == 3 * 64 * 32 * 2
    with moespec.patch(model) as handle, torch.no_grad():
        torch.testing.assert_close(model(prompt).logits, ref(prompt).logits, rtol=2e-2, atol=2e-2)


# Tolerances of the kernels against the reference path, by model dtype.
_TOL = {torch.float32: dict(rtol=1e-3, atol=1e-4), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _count_kernel_calls(monkeypatch):
    """Count launches of the routing plan and experts kernels behind the ops (`moespec.kernels`)."""
    from moespec import kernels

    counts = {"routing": 0, "experts": 0}
    for name, key in (("budget_routing_masked", "routing"), ("moe_experts_planned", "experts")):
        fn = getattr(kernels, name)

        def spy(*a, _fn=fn, _key=key, **kw):
            counts[_key] += 1
            return _fn(*a, **kw)

        monkeypatch.setattr(kernels, name, spy)
    return counts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", ARCHS)
def test_patched_model_on_kernels_matches_cpu_reference(kdev, arch, dtype, monkeypatch):
    """Patched with ``backend=kdev.backend`` (a GPU, or the CPU emulator of an emulation build), the
    drop-in runs the moespec kernels and agrees with ``backend="reference"``.

    fp32 runs the routing kernel (softmax top-k routers) and the experts reference (the experts
    kernels are bf16/fp16 only); bf16 runs both kernels. fp32 compares with the reference path on the
    CPU; bf16 compares with the reference path on the kernels' device (the CPU on the emulator), so
    that bf16 attention on a GPU cannot move a near-tie in the routing of later layers.
    """
    model = tiny_model(arch, seed=1, dtype=dtype)
    dev_model = copy.deepcopy(model).to(kdev.device)
    ref_model = model.to(torch.device("cpu") if dtype == torch.float32 else kdev.device)
    prompt = _ids(8, batch=2)
    k = model.config.num_experts_per_tok
    counts = _count_kernel_calls(monkeypatch)
    with torch.no_grad():
        plain = dev_model(prompt.to(kdev.device)).logits
        for kwargs in ({}, {"budget": k, "when": "always"}):
            with moespec.patch(ref_model, backend="reference", **kwargs) as h_ref, \
                    moespec.patch(dev_model, backend=kdev.backend, **kwargs) as h_dev:
                assert h_dev.backend == kdev.backend
                want = ref_model(prompt.to(ref_model.device)).logits.cpu()
                got = dev_model(prompt.to(kdev.device)).logits
                if not kwargs:
                    # Unbudgeted calls run the model's own experts, whatever the backend: bitwise.
                    assert torch.equal(got, plain)
                    assert counts == {"routing": 0, "experts": 0}
                torch.testing.assert_close(got.cpu(), want, **_TOL[dtype])
                ref_layers, dev_layers = h_ref.stats.last().layers, h_dev.stats.last().layers
                assert len(ref_layers) == len(dev_layers) >= 2
                for a, b in zip(ref_layers, dev_layers):
                    assert a.kept_experts == b.kept_experts
                if kwargs:
                    assert any(s.kept_size < s.union_size for s in dev_layers), "the cap did not bind"
    # The budgeted forward reached the kernels (DeepSeek-V3's and gpt-oss' routing rules are plain torch).
    softmax_router = arch not in ("deepseek_v3", "gpt_oss")
    assert (counts["routing"] > 0) == softmax_router
    assert (counts["experts"] > 0) == (dtype == torch.bfloat16)


def _spy_ops(monkeypatch):
    """Record the ``backend`` of every `moespec.ops` call the integration makes."""
    seen = []
    for name in ("budget_routing_masked", "moe_experts"):
        fn = getattr(moespec.ops, name)

        def spy(*a, _fn=fn, _name=name, **kw):
            seen.append((_name, kw.get("backend", "auto")))
            return _fn(*a, **kw)

        monkeypatch.setattr(moespec.ops, name, spy)
    return seen


def _backends_here():
    from moespec import _cuda

    return ["auto", "reference"] + (["emu"] if _cuda.emu_compiled() else [])


@pytest.mark.parametrize("backend", _backends_here())
def test_backend_is_threaded_to_every_ops_call(backend, monkeypatch):
    """The patch's backend reaches the routing op and the experts op of every budgeted layer, also
    under budgets set later (`set_budget`, `expert_budget`); unbudgeted calls make no ops call."""
    model = tiny_model("qwen3_moe", seed=2, dtype=torch.bfloat16)
    ref = copy.deepcopy(model)
    seen = _spy_ops(monkeypatch)
    prompt = _ids(12, batch=2, length=4)
    with torch.no_grad(), moespec.patch(model, backend=backend) as handle:
        assert handle.backend == backend and f"backend={backend!r}" in repr(handle)
        assert torch.equal(model(prompt).logits, ref(prompt).logits)
        assert not seen
        with moespec.expert_budget(model, 4):
            model(prompt)
        assert seen == [("budget_routing_masked", backend), ("moe_experts", backend)] * 2
        handle.set_budget(4, policy="truncate", when="always")
        assert handle.backend == backend
        model(prompt)
        assert len(seen) == 8 and {b for _, b in seen} == {backend}


def _assert_untouched(model, impl):
    assert get_handle(model) is None
    assert model.config._experts_implementation == impl
    for m in model.modules():
        assert "_moespec_state" not in m.__dict__
        assert not m._forward_hooks and not m._forward_pre_hooks


def test_backend_validation_errors(monkeypatch):
    """A backend that is unknown, or cannot run where the model is, is refused at patch time and the
    model is left untouched."""
    from moespec import _cuda

    model = tiny_model("mixtral", seed=0)
    impl = model.config._experts_implementation
    for bad in ("gpu", "CUDA", "", None, 1):
        with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'reference', 'cuda', 'emu', 'cpu'\)"):
            moespec.patch(model, budget=2, backend=bad)
        _assert_untouched(model, impl)

    # "cuda" without a usable GPU / CUDA build.
    monkeypatch.setattr(_cuda, "unavailable_reason", lambda: "no usable CUDA device: none found (test)")
    with pytest.raises(RuntimeError, match=r"backend='cuda' cannot run here: no usable CUDA device"):
        moespec.patch(model, backend="cuda")
    _assert_untouched(model, impl)
    # "cuda" with the kernels available but the model on the CPU.
    monkeypatch.setattr(_cuda, "unavailable_reason", lambda: None)
    with pytest.raises(ValueError, match=r"backend='cuda' needs the MoE blocks on a CUDA device.*cpu"):
        moespec.patch(model, backend="cuda")
    _assert_untouched(model, impl)
    monkeypatch.undo()

    # "emu" outside an emulation build.
    monkeypatch.setattr(_cuda, "backend", lambda: "cuda")
    with pytest.raises(RuntimeError, match=r"backend='emu' needs an emulation build.*'cuda'.*MOESPEC_CUDA=EMU"):
        moespec.patch(model, backend="emu")
    _assert_untouched(model, impl)
    # "emu" in an emulation build, but the model is not on the CPU.
    monkeypatch.setattr(_cuda, "backend", lambda: "emu")
    meta = tiny_model("mixtral", seed=0).to("meta")
    with pytest.raises(ValueError, match=r"backend='emu' runs the kernels on CPU tensors.*meta"):
        moespec.patch(meta, backend="emu")
    _assert_untouched(meta, impl)
    # "emu" in an emulation build without the kernels the patch needs.
    monkeypatch.setattr(_cuda, "has_emu_kernel", lambda name: name != "routing_plan")
    with pytest.raises(RuntimeError, match=r"backend='emu': this emulation build has no kernel routing_plan"):
        moespec.patch(model, backend="emu")
    _assert_untouched(model, impl)
    monkeypatch.undo()

    # "cpu" (the C++ CPU kernels) needs the model on the CPU.
    with pytest.raises(ValueError, match=r"backend='cpu' needs the MoE blocks on the CPU.*meta"):
        moespec.patch(meta, backend="cpu")
    _assert_untouched(meta, impl)

    # "auto" and "reference" run anywhere; "cpu" runs a CPU model.
    for ok in ("auto", "reference", "cpu"):
        with moespec.patch(model, budget=2, backend=ok) as handle:
            assert handle.backend == ok


def test_unsupported_activation_falls_back_to_the_eager_loop(monkeypatch):
    """Experts moespec cannot express (here GELU) run transformers' own loop, still budgeted."""
    import moespec.integrations.experts as experts_mod

    model = tiny_model("mixtral", seed=3, hidden_act="gelu")
    ref = copy.deepcopy(model)
    calls = []
    monkeypatch.setattr(experts_mod.ops, "moe_experts", lambda *a, **k: calls.append(1))
    prompt = _ids(9, batch=2)
    with torch.no_grad():
        with moespec.patch(model):
            assert (model(prompt).logits - ref(prompt).logits).abs().max().item() <= 1e-5
        with moespec.patch(model, budget=2, when="always", policy="truncate") as handle:
            model(prompt)
            assert all(s.kept_size == 2 < s.union_size for s in handle.stats.last().layers)
    assert not calls


def test_moe_ordinals_skip_dense_layers():
    model = tiny_model("qwen2_moe", seed=0, num_hidden_layers=3, mlp_only_layers=[1])
    with moespec.patch(model, budget=[2, None]) as handle:
        assert [(i.ordinal, i.name) for i in handle.layers] == [(0, "model.layers.0.mlp"), (1, "model.layers.2.mlp")]
        with torch.no_grad(), moespec.expert_budget(model, [None, 2]):
            model(_ids(10, batch=2))
        assert [s.budget for s in handle.stats.last().layers] == [None, 2]


def test_deepcopy_of_a_patched_model_behaves_unpatched():
    model = tiny_model("olmoe", seed=2)
    ref = copy.deepcopy(model)
    with moespec.patch(model, budget=4, when="always") as handle:
        clone = copy.deepcopy(model)
        prompt = _ids(11, batch=2)
        with torch.no_grad():
            assert (clone(prompt).logits - ref(prompt).logits).abs().max().item() <= 1e-5
            assert not handle.stats.calls
            with moespec.patch(clone, budget=4, when="always") as h2:
                a, b = clone(prompt).logits, model(prompt).logits
                assert torch.equal(a, b)
                assert len(h2.stats.calls) == 1 and len(handle.stats.calls) == 1
