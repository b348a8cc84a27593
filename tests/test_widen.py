"""`moespec.integrations.widen.widen_experts`: wider experts, the same function; and
`moespec.patch(..., experts="moespec")`, which runs moespec's experts for every forward."""
import pytest
import torch

import moespec
from moespec import ops
from moespec.integrations.tiny import tiny_model
from moespec.integrations.widen import widen_experts


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _experts_modules(model):
    return [m for m in model.modules() if hasattr(m, "gate_up_proj") and hasattr(m, "down_proj")]


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "olmoe", "qwen2_moe"])
def test_widened_model_computes_the_same_outputs(arch):
    torch.manual_seed(0)
    model = tiny_model(arch, seed=3)
    ids = torch.randint(0, model.config.vocab_size, (2, 11))
    before = _logits(model, ids)
    widths = {m.down_proj.shape[-1] for m in _experts_modules(model)}
    assert len(widths) == 1
    width = widths.pop()
    info = widen_experts(model, width * 5 + 8, seed=1)  # +8: a partial AVX-512 vector (grouped_mm needs 16-byte strides)
    assert (info.intermediate_size, info.widened_size) == (width, width * 5 + 8)
    for m in _experts_modules(model):
        E, two_i, H = m.gate_up_proj.shape
        assert two_i == 2 * (width * 5 + 8) and m.down_proj.shape == (E, H, width * 5 + 8)
        assert torch.count_nonzero(m.down_proj[:, :, width:]) == 0
        # The extra gate/up rows are real numbers to stream, not zeros.
        assert torch.count_nonzero(m.gate_up_proj[:, width:width * 5 + 8]) > 0.99 * E * width * 4 * H
    after = _logits(model, ids)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert info.expert_bytes_after == pytest.approx(info.expert_bytes_before * (width * 5 + 8) / width)
    assert info.total_expert_bytes == info.layers * info.experts_per_layer * info.expert_bytes_after


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_widened_outputs_are_bitwise_on_moespec_experts(dtype):
    """moespec's kernels sum the intermediate dimension in a fixed per-position order, so zero
    down-projection columns appended at the end change no bit of the output."""
    model = tiny_model("qwen3_moe", seed=5, dtype=dtype)
    ids = torch.randint(0, model.config.vocab_size, (1, 13))
    with moespec.patch(model, experts="moespec"):
        before = _logits(model, ids)
    widen_experts(model, 8 * model.config.moe_intermediate_size, seed=2)
    with moespec.patch(model, experts="moespec"):
        after = _logits(model, ids)
    assert torch.isfinite(after).all()
    assert torch.equal(after, before)


def test_widening_is_seeded_and_per_layer():
    a, b = tiny_model("qwen3_moe", seed=0), tiny_model("qwen3_moe", seed=0)
    w = a.config.moe_intermediate_size
    assert w < 64
    widen_experts(a, 64, seed=7)
    widen_experts(b, 64, seed=7)
    wa, wb = _experts_modules(a), _experts_modules(b)
    assert all(torch.equal(x.gate_up_proj, y.gate_up_proj) for x, y in zip(wa, wb))
    c = tiny_model("qwen3_moe", seed=0)
    widen_experts(c, 64, seed=8)
    assert not torch.equal(_experts_modules(c)[0].gate_up_proj, wa[0].gate_up_proj)
    # Two layers get different extra rows.
    assert not torch.equal(wa[0].gate_up_proj[:, w:64], wa[1].gate_up_proj[:, w:64])
    assert a.config.moe_intermediate_size == 64


def test_widening_bytes_reach_the_statistics():
    model = tiny_model("qwen3_moe", seed=1)
    ids = torch.randint(0, model.config.vocab_size, (1, 4))
    handle = moespec.patch(model)
    _logits(model, ids)
    small = handle.stats.last().expert_bytes
    handle.unpatch()
    widen_experts(model, 4 * model.config.moe_intermediate_size)
    handle = moespec.patch(model)
    _logits(model, ids)
    assert handle.stats.last().expert_bytes == 4 * small
    handle.unpatch()


def test_widening_refusals():
    dense = tiny_model("qwen3_moe", seed=0)
    width = dense.config.moe_intermediate_size
    with pytest.raises(ValueError, match="smaller than"):
        widen_experts(dense, width - 1)
    with pytest.raises(ValueError, match="must be an int"):
        widen_experts(dense, float(width * 2))
    with pytest.raises(ValueError, match="no supported MoE block"):
        widen_experts(torch.nn.Linear(4, 4), 8)
    with pytest.raises(ValueError, match="default layout"):
        widen_experts(tiny_model("gpt_oss", seed=0), 4096)
    info = widen_experts(dense, width)  # a no-op
    assert info.factor == 1.0 and _experts_modules(dense)[0].down_proj.shape[-1] == width


def test_experts_moespec_runs_every_forward_on_moespec_ops(monkeypatch):
    model = tiny_model("qwen3_moe", seed=2)
    ids = torch.randint(0, model.config.vocab_size, (1, 9))
    ref = _logits(model, ids)
    calls = []
    real = ops.moe_experts

    def spy(*args, **kwargs):
        calls.append(kwargs.get("backend"))
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "moe_experts", spy)
    handle = moespec.patch(model, experts="moespec")
    assert "experts='moespec'" in repr(handle)
    out = _logits(model, ids)  # unbudgeted: the model's routing, moespec's experts
    n_layers = len(handle.layers)
    assert calls == ["auto"] * n_layers
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    handle.unpatch()
    calls.clear()
    handle = moespec.patch(model)  # the default: unbudgeted forwards stay on the model's own experts
    assert "experts='model'" in repr(handle)
    assert torch.equal(_logits(model, ids), ref) and calls == []
    handle.unpatch()


def test_experts_moespec_keeps_the_backend_and_refuses_bad_names():
    model = tiny_model("qwen3_moe", seed=2)
    with pytest.raises(ValueError, match="experts must be one of"):
        moespec.patch(model, experts="fast")
    ids = torch.randint(0, model.config.vocab_size, (1, 5))
    ref = _logits(model, ids)
    with moespec.patch(model, experts="moespec", backend="reference"):
        torch.testing.assert_close(_logits(model, ids), ref, rtol=1e-5, atol=1e-5)
