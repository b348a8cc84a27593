"""Bad input is rejected with clear errors, before any compute."""
import pytest
import torch

from moespec import ExpertLayout, _cuda, ops


@pytest.fixture
def layer(gen):
    T, H, I, E, k = 4, 16, 8, 8, 2
    return dict(
        x=torch.randn(T, H, generator=gen),
        w_gate_up=torch.randn(E, 2 * I, H, generator=gen),
        w_down=torch.randn(E, H, I, generator=gen),
        topk_ids=torch.randint(0, E, (T, k), generator=gen),
        topk_weights=torch.rand(T, k, generator=gen),
    )


def call(layer, **over):
    args = dict(layer)
    args.update(over)
    return ops.moe_experts(**args)


@pytest.mark.parametrize("field,value,exc,msg", [
    ("x", torch.randn(4, 16, 1), ValueError, "x must be 2-D"),
    ("x", torch.randint(0, 3, (4, 16)), TypeError, "x must have dtype"),
    ("w_gate_up", torch.randn(8, 16, 12), ValueError, "does not match hidden size"),
    ("w_gate_up", torch.randn(8, 15, 16), ValueError, "even, non-zero 2I"),
    ("w_down", torch.randn(8, 16, 7), ValueError, "expected \\(8, 16, 8\\)"),
    ("w_down", torch.randn(8, 16, 8, dtype=torch.float64), TypeError, "must match x dtype"),
    ("topk_ids", torch.randint(0, 8, (3, 2)), ValueError, "3 rows but there are 4 tokens"),
    ("topk_ids", torch.randint(0, 8, (4, 2)).float(), TypeError, "topk_ids must have dtype"),
    ("topk_ids", torch.tensor([[0, 1], [2, 8], [0, 1], [0, 1]]), ValueError, "outside \\[0, 8\\)"),
    ("topk_ids", torch.tensor([[0, 1], [2, -1], [0, 1], [0, 1]]), ValueError, "outside \\[0, 8\\)"),
    ("topk_weights", torch.rand(4, 3), ValueError, "topk_weights shape"),
    ("topk_weights", torch.ones(4, 2, dtype=torch.int64), TypeError, "topk_weights must have dtype"),
    ("kept_experts", torch.tensor([1, 9]), ValueError, "kept_experts holds expert ids outside"),
    ("kept_experts", torch.tensor([[1]]), ValueError, "kept_experts must be 1-D"),
    ("layout", "gpt_oss", TypeError, "layout must be a moespec.ExpertLayout"),
])
def test_moe_experts_rejects(layer, field, value, exc, msg):
    with pytest.raises(exc, match=msg):
        call(layer, **{field: value})


def test_non_contiguous_weights_rejected(layer):
    w = layer["w_gate_up"]
    nc = w.transpose(1, 2).contiguous().transpose(1, 2)
    assert not nc.is_contiguous()
    with pytest.raises(ValueError, match="w_gate_up must be contiguous"):
        call(layer, w_gate_up=nc)
    with pytest.raises(ValueError, match="x must have contiguous rows"):
        call(layer, x=torch.randn(16, 4).t())


def test_mismatched_devices_rejected(layer):
    with pytest.raises(ValueError, match="is on meta but x is on cpu"):
        call(layer, w_down=layer["w_down"].to("meta"))
    with pytest.raises(ValueError, match="is on meta"):
        ops.budgeted_moe(layer["x"], torch.randn(4, 8, device="meta"), layer["w_gate_up"], layer["w_down"], 2, 4)


def test_bias_shapes_checked(layer):
    with pytest.raises(ValueError, match="b_gate_up has shape"):
        call(layer, b_gate_up=torch.zeros(8, 15))
    with pytest.raises(ValueError, match="b_down has shape"):
        call(layer, b_down=torch.zeros(8, 17))


def test_transposed_layout_shapes_checked(layer):
    with pytest.raises(ValueError, match=r"expected \(8, 8, 16\) \(\[E, I, H\]\)"):
        call(layer, layout=ExpertLayout.gpt_oss())


@pytest.mark.parametrize("kwargs,msg", [
    (dict(budget=1), "budget \\(1\\) must be >= top_k \\(2\\)"),
    (dict(budget=0), "budget must be >= 1"),
    (dict(budget=-3), "budget must be >= 1"),
    (dict(budget=2.5), "budget must be an int"),
    (dict(budget=True), "budget must be an int"),
    (dict(budget=4, policy="drop"), "policy must be one of"),
    (dict(budget=4, score="mean"), "score must be one of"),
    (dict(budget=4, coverage=0.0), "coverage must be a number in \\(0, 1\\]"),
    (dict(budget=4, coverage=1.5), "coverage must be a number"),
    (dict(budget=4, min_budget=3), "min_budget only applies together with coverage"),
    (dict(budget=4, coverage=0.5, min_budget=1), "min_budget must be an int >= top_k"),
    (dict(budget=4, coverage=0.5, min_budget=6), "min_budget \\(6\\) must be <= budget \\(4\\)"),
])
def test_budget_routing_rejects(kwargs, msg):
    z = torch.randn(5, 8)
    with pytest.raises(ValueError, match=msg):
        ops.budget_routing(z, 2, **kwargs)


def test_routing_input_checks():
    with pytest.raises(ValueError, match="top_k must be a positive int"):
        ops.budget_routing(torch.randn(3, 8), 0, None)
    with pytest.raises(ValueError, match="top_k \\(9\\) exceeds the number of experts \\(8\\)"):
        ops.budget_routing(torch.randn(3, 8), 9, None)
    with pytest.raises(ValueError, match="router_logits must be 2-D"):
        ops.budget_routing(torch.randn(3), 1, None)
    with pytest.raises(TypeError, match="floating-point"):
        ops.score_experts(torch.ones(3, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="mode='topk' needs topk_ids and topk_weights"):
        ops.score_experts(torch.randn(3, 8), "topk")
    with pytest.raises(ValueError, match="num_experts must be a positive int"):
        ops.expert_union(torch.zeros(2, 2, dtype=torch.int64), 0)
    with pytest.raises(ValueError, match="outside \\[0, 4\\)"):
        ops.expert_union(torch.tensor([[0, 4]]), 4)
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.expert_union(torch.tensor([[0, 1]]), 4, backend="triton")
    with pytest.raises(ValueError, match="router_logits has 3 rows but x has 4 tokens"):
        ops.budgeted_moe(torch.randn(4, 16), torch.randn(3, 8), torch.randn(8, 16, 16), torch.randn(8, 16, 8), 2, 4)
    with pytest.raises(ValueError, match="router_logits has 6 experts but w_gate_up has 8"):
        ops.budgeted_moe(torch.randn(4, 16), torch.randn(4, 6), torch.randn(8, 16, 16), torch.randn(8, 16, 8), 2, 4)


def test_layout_config_rejects_unknown_values():
    with pytest.raises(ValueError, match="ExpertLayout.gate_up must be one of"):
        ExpertLayout(gate_up="mixed")
    with pytest.raises(ValueError, match="ExpertLayout.activation must be one of"):
        ExpertLayout(activation="gelu")


@pytest.mark.skipif(_cuda.available(), reason="this machine can run the CUDA kernels")
def test_cuda_backend_without_gpu_says_why(layer):
    with pytest.raises(RuntimeError, match="cannot run moe_experts with the CUDA kernels: .+"):
        call(layer, backend="cuda")
    with pytest.raises(RuntimeError, match="cannot run budget_routing with the CUDA kernels"):
        ops.budget_routing(torch.randn(3, 8), 2, 4, backend="cuda")
