"""moe_experts against a dense per-expert loop in float64, for every layout."""
import pytest
import torch

from moespec import ExpertLayout, ops

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 1e-2}


def assert_close(y, expect, dtype):
    """Relative tolerance by dtype; the absolute floor scales with the output's magnitude because
    bf16/fp16 rounding of the intermediate and the output is relative to it. NaN never passes."""
    assert not torch.isnan(y).any()
    scale = max(1.0, float(expect.abs().max()))
    torch.testing.assert_close(y.double(), expect, rtol=TOL[dtype], atol=TOL[dtype] * scale)


def dense_loop(x, w_gate_up, w_down, ids, weights, kept, layout, b_gu=None, b_dn=None):
    """float64, token by token, slot by slot; the expert math written out from docs/design.md §2/§3."""
    T, H = x.shape
    out = torch.zeros(T, H, dtype=torch.float64)
    kept_set = None if kept is None else set(kept.tolist())
    for t in range(T):
        for s in range(ids.shape[1]):
            e, w = int(ids[t, s]), float(weights[t, s])
            if w == 0.0 or (kept_set is not None and e not in kept_set):
                continue
            xt = x[t].double()
            Wgu, Wd = w_gate_up[e].double(), w_down[e].double()
            if layout.transposed:
                gu = xt @ Wgu           # [2I]
            else:
                gu = Wgu @ xt
            if b_gu is not None:
                gu = gu + b_gu[e].double()
            I = gu.numel() // 2
            if layout.gate_up == "gate_up":
                g, u = gu[:I], gu[I:]
            elif layout.gate_up == "up_gate":
                u, g = gu[:I], gu[I:]
            else:
                g, u = gu[0::2], gu[1::2]
            if layout.activation == "silu":
                h = g / (1 + torch.exp(-g)) * u
            else:
                g = torch.clamp(g, max=layout.limit)
                u = torch.clamp(u, min=-layout.limit, max=layout.limit)
                h = g / (1 + torch.exp(-layout.alpha * g)) * (u + 1)
            y = (h @ Wd) if layout.transposed else (Wd @ h)
            if b_dn is not None:
                y = y + b_dn[e].double()
            out[t] += w * y
    return out


def make(gen, T, H, I, E, k, dtype, layout, bias=False):
    x = torch.randn(T, H, generator=gen).to(dtype)
    gu_shape = (E, H, 2 * I) if layout.transposed else (E, 2 * I, H)
    dn_shape = (E, I, H) if layout.transposed else (E, H, I)
    w_gu = (torch.randn(gu_shape, generator=gen) / H**0.5).to(dtype)
    w_dn = (torch.randn(dn_shape, generator=gen) / I**0.5).to(dtype)
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])
    w = torch.rand(T, k, generator=gen)
    b_gu = (0.1 * torch.randn(E, 2 * I, generator=gen)).to(dtype) if bias else None
    b_dn = (0.1 * torch.randn(E, H, generator=gen)).to(dtype) if bias else None
    return x, w_gu, w_dn, ids, w, b_gu, b_dn


LAYOUTS = {
    "v5": ExpertLayout(),
    "up_first": ExpertLayout(gate_up="up_gate"),
    "gpt_oss": ExpertLayout.gpt_oss(),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout_name", list(LAYOUTS))
@pytest.mark.parametrize("T,H,I,E,k", [(1, 24, 16, 8, 2), (3, 40, 24, 8, 2), (17, 72, 40, 60, 4), (8, 56, 8, 16, 8)])
def test_moe_experts_matches_dense_loop(gen, dtype, layout_name, T, H, I, E, k):
    layout = LAYOUTS[layout_name]
    bias = layout_name == "gpt_oss"
    x, w_gu, w_dn, ids, w, b_gu, b_dn = make(gen, T, H, I, E, k, dtype, layout, bias)
    if layout.activation == "clamped_swiglu":
        x = (x.float() * 4).to(dtype)  # push some pre-activations past the clamp limit
    y = ops.moe_experts(x, w_gu, w_dn, ids, w, layout=layout, b_gate_up=b_gu, b_down=b_dn)
    assert y.dtype == dtype and y.shape == (T, H)
    expect = dense_loop(x, w_gu, w_dn, ids, w, None, layout, b_gu, b_dn)
    assert torch.isfinite(y).all()
    assert_close(y, expect, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropped_and_zero_weight_pairs_are_never_read(gen, dtype):
    T, H, I, E, k = 9, 32, 16, 16, 4
    layout = ExpertLayout()
    x, w_gu, w_dn, ids, w, _, _ = make(gen, T, H, I, E, k, dtype, layout)
    kept = torch.unique(ids)[::2].to(torch.int32)
    w[0, 0] = 0.0
    zero_only = int(ids[0, 0])
    # Poison every expert that must not be evaluated: NaN would leak into the output if read.
    poisoned_gu, poisoned_dn = w_gu.clone(), w_dn.clone()
    live = set(kept.tolist())
    for e in range(E):
        if e not in live:
            poisoned_gu[e] = float("nan")
            poisoned_dn[e] = float("nan")
    y = ops.moe_experts(x, poisoned_gu, poisoned_dn, ids, w, kept_experts=kept)
    assert torch.isfinite(y).all()
    expect = dense_loop(x, w_gu, w_dn, ids, w, kept, layout)
    assert_close(y, expect, dtype)
    # An expert reached only through a zero-weight pair is not evaluated either.
    used_elsewhere = bool(((ids == zero_only) & (w != 0)).any())
    if not used_elsewhere and zero_only in live:
        p2 = w_gu.clone()
        p2[zero_only] = float("nan")
        y2 = ops.moe_experts(x, p2, w_dn, ids, w, kept_experts=kept)
        assert torch.isfinite(y2).all()


def test_truncated_token_gets_zero_output(gen):
    x, w_gu, w_dn, ids, w, _, _ = make(gen, 4, 16, 8, 8, 2, torch.float32, ExpertLayout())
    w[2] = 0.0
    y = ops.moe_experts(x, w_gu, w_dn, ids, w)
    assert torch.count_nonzero(y[2]) == 0


@pytest.mark.parametrize("policy", ["substitute", "truncate"])
def test_budgeted_moe_composes_routing_and_experts(gen, policy):
    T, H, I, E, k = 16, 48, 24, 32, 4
    x, w_gu, w_dn, _, _, _, _ = make(gen, T, H, I, E, k, torch.float32, ExpertLayout())
    z = torch.randn(T, E, generator=gen)
    y, r = ops.budgeted_moe(x, z, w_gu, w_dn, k, 6, policy=policy, renormalize=True)
    assert r.kept_size <= 6
    expect = dense_loop(x, w_gu, w_dn, r.topk_ids, r.topk_weights, r.kept_experts, ExpertLayout())
    assert_close(y, expect, torch.float32)
    y0, r0 = ops.budgeted_moe(x, z, w_gu, w_dn, k, None, renormalize=True)
    assert r0.kept_size == r0.union_size >= r.kept_size


def test_deterministic_repeats_are_bitwise_identical(gen):
    x, w_gu, w_dn, ids, w, _, _ = make(gen, 17, 40, 24, 16, 4, torch.bfloat16, ExpertLayout())
    a = ops.moe_experts(x, w_gu, w_dn, ids, w, deterministic=True)
    b = ops.moe_experts(x, w_gu, w_dn, ids, w, deterministic=True)
    assert torch.equal(a, b)
