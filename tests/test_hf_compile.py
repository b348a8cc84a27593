"""A patched model compiles with fullgraph=True and exports, with and without a budget."""
import pytest
import torch

import moespec
from moespec.integrations.tiny import TINY_ARCHITECTURES, tiny_model

pytest.importorskip("transformers")


def _budget(model):
    return model.config.num_experts_per_tok  # the smallest legal cap: it binds on 8 tokens


def _ids(seed, length=8):
    return torch.randint(0, 128, (1, length), generator=torch.Generator().manual_seed(seed))


def _moespec_nodes(graph):
    return {str(n.target) for n in graph.nodes if str(n.target).startswith("moespec.")}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("budgeted", [False, True], ids=["budget=None", "budget=k"])
@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
@torch.no_grad()
def test_export_and_fullgraph_compile_match_eager(arch, budgeted):
    model = tiny_model(arch, seed=1)
    ids = _ids(2)
    plain = model(ids, use_cache=False).logits
    budget = _budget(model) if budgeted else None
    with moespec.patch(model, budget=budget, when="always") as handle:
        eager = model(ids, use_cache=False).logits
        recorded = len(handle.stats.calls)
        if budgeted:
            assert handle.stats.last().budgeted
            assert any(s.kept_size < s.union_size for s in handle.stats.last().layers), "the cap did not bind"
            assert not torch.equal(eager, plain)
        else:
            assert torch.equal(eager, plain)

        compiled = torch.compile(model, fullgraph=True, backend="eager")
        assert torch.equal(compiled(ids, use_cache=False).logits, eager)

        ep = torch.export.export(model, (ids,), {"use_cache": False})
        assert torch.equal(ep.module()(ids, use_cache=False).logits, eager)
        nodes = _moespec_nodes(ep.graph)
        if budgeted:
            # Each budgeted MoE layer's experts are one opaque moespec node.
            assert "moespec.moe_experts.default" in nodes
            if arch not in ("deepseek_v3", "gpt_oss"):  # their routers' rules are plain torch ops
                assert "moespec.budget_routing_masked.default" in nodes
        else:
            assert not nodes  # unbudgeted layers run the model's own experts
        # Traced forwards are not recorded as calls.
        assert len(handle.stats.calls) == recorded
        # A fresh input through the exported program still follows eager.
        ids2 = _ids(3)
        assert torch.equal(ep.module()(ids2, use_cache=False).logits, model(ids2, use_cache=False).logits)


@torch.no_grad()
def test_aot_compile_of_a_budgeted_model_runs_the_custom_ops():
    """AOT autograd traces through the fake implementations of the custom ops."""
    model = tiny_model("qwen3_moe", seed=1)
    ids = _ids(4)
    with moespec.patch(model, budget=_budget(model), when="always"):
        eager = model(ids, use_cache=False).logits
        got = torch.compile(model, fullgraph=True, backend="aot_eager")(ids, use_cache=False).logits
    assert torch.equal(got, eager)


@pytest.mark.cuda
@torch.no_grad()
def test_cuda_graph_replay_of_a_budgeted_forward():
    """The budgeted forward has no host sync: it captures in a CUDA graph and replays exactly."""
    model = tiny_model("qwen3_moe", seed=1, dtype=torch.bfloat16).cuda()
    ids = _ids(5).cuda()
    with moespec.patch(model, budget=_budget(model), when="always") as handle:
        handle.stats.enabled = False
        eager = model(ids, use_cache=False).logits
        static_ids = ids.clone()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                model(static_ids, use_cache=False)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model(static_ids, use_cache=False).logits
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager)
        static_ids.copy_(_ids(6).cuda())
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, model(static_ids, use_cache=False).logits)


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
@torch.no_grad()
def test_budgeted_forward_on_kernels_is_deterministic_and_compiles(kdev, arch, monkeypatch):
    """The spirit of the CUDA-graph test on every kernel device, the CPU emulator included.

    The emulator has no graph capture (it runs each launch synchronously on the host), so this
    checks what capture relies on by other means: a bf16 budgeted forward through the kernels
    (``backend=kdev.backend``) repeats bitwise (the emulator reshuffles block order per launch
    seed, so this exercises the deterministic combine), agrees with the reference path, and
    ``torch.compile(fullgraph=True)`` / ``torch.export`` (no host sync, the backend travels as
    the custom ops' str argument) give the eager bits, also on a fresh input.
    """
    from moespec import kernels

    launches = []
    planned = kernels.moe_experts_planned
    monkeypatch.setattr(kernels, "moe_experts_planned", lambda *a, **kw: launches.append(1) or planned(*a, **kw))
    model = tiny_model(arch, seed=1, dtype=torch.bfloat16).to(kdev.device)
    ids, ids2 = _ids(5).to(kdev.device), _ids(6).to(kdev.device)
    with moespec.patch(model, budget=_budget(model), when="always", backend="reference"):
        want = model(ids, use_cache=False).logits
    assert not launches
    with moespec.patch(model, budget=_budget(model), when="always", backend=kdev.backend) as handle:
        eager = model(ids, use_cache=False).logits
        assert launches, "the budgeted forward did not reach the experts kernel"
        assert any(s.kept_size < s.union_size for s in handle.stats.last().layers), "the cap did not bind"
        handle.stats.enabled = False
        assert torch.equal(model(ids, use_cache=False).logits, eager)
        torch.testing.assert_close(eager, want, rtol=2e-2, atol=2e-2)

        compiled = torch.compile(model, fullgraph=True, backend="eager")
        assert torch.equal(compiled(ids, use_cache=False).logits, eager)
        ep = torch.export.export(model, (ids,), {"use_cache": False})
        experts_nodes = [n for n in ep.graph.nodes if str(n.target) == "moespec.moe_experts.default"]
        assert experts_nodes and all(n.args[-1] == kdev.backend for n in experts_nodes)
        assert torch.equal(ep.module()(ids, use_cache=False).logits, eager)
        assert torch.equal(ep.module()(ids2, use_cache=False).logits, model(ids2, use_cache=False).logits)
