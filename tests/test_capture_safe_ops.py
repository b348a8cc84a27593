"""The capture-safe routing op and the custom-op registration (torch.compile / torch.export)."""
import pytest
import torch

from moespec import ExpertLayout, ops, reference

POLICIES = ("substitute", "truncate")


def _logits(seed, T, E, dtype=torch.float32, ties=False):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(T, E, generator=g) * 2
    return (z.round() if ties else z).to(dtype)


def _case(seed):
    g = torch.Generator().manual_seed(1000 + seed)
    T = int(torch.randint(1, 14, (1,), generator=g))
    E = int(torch.randint(4, 24, (1,), generator=g))
    k = int(torch.randint(1, min(E, 6) + 1, (1,), generator=g))
    budget = None if seed % 6 == 0 else int(torch.randint(k, E + 1, (1,), generator=g))
    coverage = None if seed % 3 else 0.3 + 0.7 * float(torch.rand(1, generator=g))
    return T, E, k, budget, coverage


@pytest.mark.parametrize("seed", range(24))
def test_masked_routing_is_budget_routing(seed):
    T, E, k, budget, coverage = _case(seed)
    z = _logits(seed, T, E, (torch.float32, torch.bfloat16, torch.float16)[seed % 3], ties=seed % 4 == 0)
    for policy in POLICIES:
        for score in ("prob", "topk"):
            for renorm in (False, True):
                want = ops.budget_routing(z, k, budget, policy, renorm, score, coverage)
                got = ops.budget_routing_masked(z, k, budget, policy, renorm, score, coverage)
                assert got.kept_mask.shape == (E,) and got.kept_mask.dtype == torch.bool
                assert torch.equal(got.topk_ids, want.topk_ids)
                assert torch.equal(got.topk_weights, want.topk_weights)
                assert torch.equal(got.kept_mask.nonzero().reshape(-1).to(torch.int32), want.kept_experts)
                assert int(got.union_size) == want.union_size and bool(got.budgeted) == want.budgeted


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("policy", POLICIES)
def test_token_mask_routes_real_tokens_as_if_padding_were_absent(seed, policy):
    """Rows under the mask route exactly as the real rows alone; padding gets zero weights."""
    T, E, k, budget, coverage = _case(seed)
    budget = budget or k
    z = _logits(seed, T, E)
    mask = torch.rand(T, generator=torch.Generator().manual_seed(seed)) < 0.6
    mask[0] = True
    got = ops.budget_routing_masked(z, k, budget, policy, True, "prob", coverage, token_mask=mask)
    alone = ops.budget_routing(z[mask], k, budget, policy, True, "prob", coverage)
    assert torch.equal(got.topk_ids[mask], alone.topk_ids)
    assert torch.equal(got.topk_weights[mask], alone.topk_weights)
    assert int(got.union_size) == alone.union_size
    assert torch.equal(got.kept_mask.nonzero().reshape(-1).to(torch.int32), alone.kept_experts)
    assert torch.all(got.topk_weights[~mask] == 0)
    # The list form agrees with the masked form.
    listed = ops.budget_routing(z, k, budget, policy, True, "prob", coverage, token_mask=mask)
    assert torch.equal(listed.topk_weights, got.topk_weights) and listed.union_size == alone.union_size


def test_token_mask_is_validated():
    z = _logits(0, 5, 8)
    with pytest.raises(TypeError, match="token_mask"):
        ops.budget_routing_masked(z, 2, 4, token_mask=torch.ones(5))
    with pytest.raises(ValueError, match="token_mask has 4 entries"):
        ops.budget_routing_masked(z, 2, 4, token_mask=torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="2-D|1-D"):
        ops.budget_routing(z, 2, 4, token_mask=torch.ones(5, 1, dtype=torch.bool))


def test_unbudgeted_masked_routing_keeps_the_union():
    z = _logits(3, 6, 10)
    r = ops.budget_routing_masked(z, 3, None)
    _, ids, w = reference.route_topk_softmax(z, 3)
    assert torch.equal(r.topk_ids, ids) and torch.equal(r.topk_weights, w)
    assert torch.equal(r.kept_mask.nonzero().reshape(-1), torch.unique(ids))
    assert not bool(r.budgeted)


def _experts(seed, T=6, H=16, I=8, E=6, k=2, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).to(dtype)
    wgu = (torch.randn(E, 2 * I, H, generator=g) * 0.2).to(dtype)
    wd = (torch.randn(E, H, I, generator=g) * 0.2).to(dtype)
    z = torch.randn(T, E, generator=g)
    return x, wgu, wd, z, k


def test_moe_experts_takes_a_kept_mask_like_kept_ids():
    x, wgu, wd, z, k = _experts(1)
    r = ops.budget_routing(z, k, 3, "truncate")
    mask = torch.zeros(wgu.shape[0], dtype=torch.bool)
    mask[r.kept_experts.long()] = True
    by_ids = ops.moe_experts(x, wgu, wd, r.topk_ids, r.topk_weights, r.kept_experts)
    by_mask = ops.moe_experts(x, wgu, wd, r.topk_ids, r.topk_weights, mask)
    assert torch.equal(by_ids, by_mask)
    with pytest.raises(ValueError, match="one entry per expert"):
        ops.moe_experts(x, wgu, wd, r.topk_ids, r.topk_weights, mask[:-1])


def _opcheck(op, args):
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static",
                                                 "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("shape", [(1, 4, 1), (5, 8, 2), (9, 16, 4)])
def test_custom_ops_pass_opcheck(shape):
    T, E, k = shape
    z = _logits(T, T, E)
    mask = torch.ones(T, dtype=torch.bool)
    mask[-1] = T == 1
    _opcheck(torch.ops.moespec.budget_routing_masked.default, (z, k, max(k, E // 2), "substitute", True, "prob",
                                                               None, None, mask, "all", "auto"))
    _opcheck(torch.ops.moespec.budget_routing_masked.default, (z, k, None, "truncate", False, "topk", 0.8, k,
                                                               None, "union", "auto"))
    _opcheck(torch.ops.moespec.score_experts.default, (z, "prob", None, None, "auto"))
    x, wgu, wd, zz, kk = _experts(T, T=T, E=E, k=k)
    r = ops.budget_routing_masked(zz, kk, max(kk, E // 2), "truncate")
    lay = ExpertLayout()
    _opcheck(torch.ops.moespec.moe_experts.default, (x, wgu, wd, r.topk_ids, r.topk_weights, r.kept_mask, None,
                                                     None, True, lay.gate_up, lay.transposed, lay.activation,
                                                     lay.alpha, lay.limit, "auto"))


def test_a_budgeted_layer_compiles_fullgraph_and_exports():
    x, wgu, wd, z, k = _experts(7, T=8, E=8, k=2, dtype=torch.bfloat16)

    def layer(x, z):
        r = ops.budget_routing_masked(z, k, 3, "substitute", True)
        y = ops.moe_experts(x, wgu, wd, r.topk_ids, r.topk_weights, r.kept_mask)
        return y, r.union_size, r.budgeted

    want = layer(x, z)
    torch._dynamo.reset()
    got = torch.compile(layer, fullgraph=True, backend="aot_eager")(x, z)
    assert all(torch.equal(a, b) for a, b in zip(got, want))

    class Layer(torch.nn.Module):
        def forward(self, x, z):
            return layer(x, z)

    ep = torch.export.export(Layer(), (x, z))
    assert {str(n.target) for n in ep.graph.nodes} >= {"moespec.budget_routing_masked.default",
                                                      "moespec.moe_experts.default"}
    x2, _, _, z2, _ = _experts(8, T=8, E=8, k=2, dtype=torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(ep.module()(x2, z2), layer(x2, z2)))
