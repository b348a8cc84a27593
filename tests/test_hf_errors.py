"""Bad input to moespec.patch / expert_budget is rejected clearly, leaving the model untouched."""
import pytest
import torch

import moespec
from moespec.integrations import UnsupportedModelError, get_handle
from moespec.integrations.tiny import tiny_model

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen3_moe", seed=0)  # 16 experts, top-4, 2 MoE layers


def _untouched(model):
    assert get_handle(model) is None
    assert model.config._experts_implementation != "moespec"
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert not any(m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("kwargs, match", [
    ({"budget": 0}, "budget must be >= 1"),
    ({"budget": 3}, r"budget \(3\) must be >= top_k \(4\)"),
    ({"budget": 4.5}, "budget must be None, an int, .* got float"),
    ({"budget": True}, "budget must be an int or None"),
    ({"budget": "8"}, "budget must be None, an int"),
    ({"budget": [8]}, "one entry per MoE layer: got 1 entries for 2 MoE layers"),
    ({"budget": [8, 2]}, r"MoE layer 1: budget \(2\) must be >= top_k"),
    ({"budget": lambda i: 1 / 0}, "budget callable failed for MoE layer 0"),
    ({"budget": lambda i: "x"}, "budget must be an int or None"),
    ({"budget": 8, "policy": "drop"}, "policy must be one of"),
    ({"budget": 8, "score": "logit"}, "score must be one of"),
    ({"budget": 8, "coverage": 1.5}, r"coverage must be a number in \(0, 1\]"),
    ({"budget": 8, "coverage": 0}, r"coverage must be a number in \(0, 1\]"),
    ({"budget": 8, "min_budget": 5}, "min_budget only applies together with coverage"),
    ({"budget": 8, "coverage": 0.5, "min_budget": 9}, r"min_budget \(9\) must be <= budget \(8\)"),
    ({"budget": 8, "when": "sometimes"}, "when must be one of"),
])
def test_bad_patch_settings_rejected(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        moespec.patch(model, **kwargs)
    _untouched(model)


def test_bad_expert_budget_rejected_and_model_restored(model):
    with pytest.raises(ValueError, match="policy must be one of"):
        with moespec.expert_budget(model, 8, policy="nope"):
            pass
    _untouched(model)
    with moespec.patch(model) as handle:
        with pytest.raises(ValueError, match=r"budget \(2\) must be >= top_k"):
            with moespec.expert_budget(model, 2):
                pass
        assert get_handle(model) is handle and not handle._overrides
        with pytest.raises(ValueError, match="must be one of"):
            handle.set_budget(8, when="never")
    _untouched(model)


def test_double_patch_rejected(model):
    with moespec.patch(model):
        with pytest.raises(RuntimeError, match="already patched"):
            moespec.patch(model)
    _untouched(model)


def test_unsupported_architecture_left_untouched():
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    dense = transformers.LlamaForCausalLM(cfg).eval()
    with pytest.raises(UnsupportedModelError) as err:
        moespec.patch(dense, budget=4)
    msg = str(err.value)
    assert "LlamaForCausalLM" in msg and "'llama'" in msg and "left untouched" in msg
    for name in ("Mixtral", "Qwen2-MoE", "Qwen3-MoE", "OLMoE", "DeepSeek-V3", "gpt-oss"):
        assert name in msg
    _untouched(dense)
    with pytest.raises(UnsupportedModelError):
        with moespec.expert_budget(dense, 4):
            pass
    with pytest.raises(TypeError, match="torch.nn.Module"):
        moespec.patch("not a model")


def test_import_moespec_does_not_import_transformers():
    import subprocess
    import sys

    code = "import sys, moespec; assert 'transformers' not in sys.modules; moespec.patch; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_unfused_v4_style_block_is_reported_as_a_version_problem():
    class MixtralSparseMoeBlock(torch.nn.Module):  # v4 layout: a ModuleList of expert MLPs
        def __init__(self):
            super().__init__()
            self.gate = torch.nn.Linear(8, 4, bias=False)
            self.experts = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(4))

    model = torch.nn.Sequential(MixtralSparseMoeBlock())
    with pytest.raises(UnsupportedModelError, match=r"without transformers v5 fused experts .* transformers>=5"):
        moespec.patch(model)


def test_patching_a_parent_or_child_of_a_patched_model_is_refused():
    model = tiny_model("qwen3_moe", seed=0)
    with moespec.patch(model.model, budget=4):
        with pytest.raises(RuntimeError, match="already patched through Qwen3MoeModel .a submodule of this model"):
            moespec.patch(model)
        assert get_handle(model) is None
    with moespec.patch(model, budget=4) as handle:
        with pytest.raises(RuntimeError, match="already patched through Qwen3MoeForCausalLM .a module that contains"):
            moespec.patch(model.model)
        with pytest.raises(RuntimeError, match="already patched"):
            moespec.patch(model)
        assert get_handle(model) is handle
    # Once unpatched, either may be patched again, and hooks do not stack.
    with moespec.patch(model.model, budget=4) as inner:
        model(torch.tensor([[1, 2, 3]]))
        assert len(inner.stats.calls) == 1
    assert not model.model.layers[0].mlp.gate._forward_hooks


def test_integer_like_budgets_are_accepted_and_bools_and_floats_refused():
    """numpy / 0-d tensor budgets behave like the int they hold (also per layer); bools and floats are errors."""
    import numpy as np

    model = tiny_model("qwen3_moe", seed=0)
    prompt = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        with moespec.patch(model, budget=5, when="always") as handle:
            want = model(prompt).logits
        for budget in (np.int64(5), torch.tensor(5), [np.int32(5), torch.tensor(5)]):
            with moespec.patch(model, budget=budget, when="always") as handle:
                assert all(type(c) is int and c == 5 for c in handle.default.caps)
                assert torch.equal(model(prompt).logits, want)
    for bad in (True, np.bool_(True), 5.0, np.float64(5.0), torch.tensor([5])):
        with pytest.raises(ValueError, match="budget"):
            moespec.patch(model, budget=bad)
        assert get_handle(model) is None
