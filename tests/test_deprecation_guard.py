"""The conftest deprecation guard, and `moespec.integrations.hf_compat` (cache argument/field names)."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import types
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import DeprecationGuard  # noqa: E402
from transformers.utils.deprecation import deprecate_kwarg  # noqa: E402

from moespec.integrations.hf_compat import cache_argument, forward_kwargs, output_cache  # noqa: E402

_PROBE_SOURCE = '''
def call(fn, **kwargs):
    return fn(**kwargs)

def read(obj, name):
    return getattr(obj, name)

def compat_cache(obj):
    from moespec.integrations.hf_compat import output_cache
    return output_cache(obj)
'''


def _probe():
    """A module that looks like moespec code (``__name__`` in the moespec package)."""
    mod = types.ModuleType("moespec._guard_probe")
    mod.__file__ = "<moespec._guard_probe>"
    exec(compile(_PROBE_SOURCE, mod.__file__, "exec"), mod.__dict__)
    return mod


@deprecate_kwarg("old", version="99.0.0", new_name="new")
def _renamed(new=None):
    return new


@contextlib.contextmanager
def _shown():
    """Collect the warnings shown inside (through the showwarning hook a `DeprecationGuard` chains to)."""
    seen = []
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, category, *rest: seen.append(category)
        yield seen


@pytest.fixture(scope="module")
def tiny():
    from moespec.integrations.tiny import tiny_model

    return tiny_model("qwen3_moe", seed=0)


# --- the guard --------------------------------------------------------------------------------
def test_guard_records_deprecation_under_moespec_frame(moespec_deprecation_guard):
    probe = _probe()
    with DeprecationGuard() as guard:
        assert probe.call(_renamed, old=3) == 3
    assert len(guard.offences) == 1, guard.offences
    assert guard.offences[0].startswith("<moespec._guard_probe>:3 (call): FutureWarning: `old` is deprecated")
    assert "moespec.integrations.hf_compat" in guard.report()
    # The autouse guard around this test saw it too (the inner guard forwards every warning);
    # clear it, or this test would fail at teardown.
    assert moespec_deprecation_guard.offences == guard.offences
    moespec_deprecation_guard.offences.clear()


def test_guard_ignores_test_code_and_other_warnings():
    probe = _probe()
    with _shown() as seen, DeprecationGuard() as guard:
        warnings.simplefilter("always", UserWarning)
        assert _renamed(old=1) == 1  # test code calling transformers directly
        probe.call(warnings.warn, message="deprecated, but not from transformers", category=FutureWarning)
        probe.call(warnings.warn, message="transformers deprecated? no, a UserWarning", category=UserWarning)
    assert guard.offences == []
    assert seen == [FutureWarning, FutureWarning, UserWarning]


def test_guard_skips_pass_through_wrappers():
    # A moespec wrapper that transformers calls and that forwards unchanged (PASS_THROUGH) is not
    # blamed for what transformers does below it; moespec code further up still is.
    wrapper = types.ModuleType("moespec.integrations.patching")
    exec("def _assisted_decoding(fn, **kwargs):\n    return fn(**kwargs)\n", wrapper.__dict__)
    with _shown(), DeprecationGuard() as guard:
        wrapper._assisted_decoding(_renamed, old=1)
    assert guard.offences == []
    with _shown(), DeprecationGuard() as guard:
        _probe().call(functools.partial(wrapper._assisted_decoding, _renamed), old=1)
    assert len(guard.offences) == 1 and guard.offences[0].startswith("<moespec._guard_probe>:3 (call)")


def test_guard_forwards_to_pytest(recwarn):
    # recwarn (set up after the autouse guard) replaces the hook; the warning still reaches pytest.
    _renamed(old=1)
    assert any(issubclass(w.category, FutureWarning) for w in recwarn.list)


def test_guard_forwards_to_previous_handler():
    probe = _probe()
    with _shown() as seen, DeprecationGuard() as guard:
        probe.call(_renamed, old=1)
        probe.call(_renamed, old=2)  # "always": the repeat is seen as well
    assert seen == [FutureWarning, FutureWarning] and len(guard.offences) == 2


def test_guard_keeps_error_filters():
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        with DeprecationGuard():
            with pytest.raises(FutureWarning):
                _renamed(old=1)


def test_guard_records_transformers_deprecation_logs(moespec_deprecation_guard):
    from transformers.utils import logging as hf_logging

    logger = hf_logging.get_logger("transformers.utils.generic")
    probe = _probe()
    with DeprecationGuard() as guard:
        probe.call(logger.warning, msg="`thing` is deprecated. Use `other` instead.")
        probe.call(logger.warning, msg="an unrelated warning")
        logger.warning("`thing` is deprecated, logged from test code")
    assert len(guard.offences) == 1 and "transformers log" in guard.offences[0], guard.offences
    assert moespec_deprecation_guard.offences == guard.offences  # the autouse guard's handler saw it too
    moespec_deprecation_guard.offences.clear()


# --- hf_compat --------------------------------------------------------------------------------
def test_cache_argument_matches_the_forward(tiny):
    params = inspect.signature(tiny.forward).parameters
    expected = "cache" if "cache" in params else "past_key_values"
    assert cache_argument(tiny) == expected
    assert forward_kwargs(tiny, "C", use_cache=True) == {expected: "C", "use_cache": True}
    with pytest.raises(TypeError, match="forward_kwargs"):
        forward_kwargs(tiny, "C", past_key_values="D")


def test_cache_argument_errors_and_wrappers(tiny):
    with pytest.raises(TypeError, match="no KV-cache argument"):
        cache_argument(torch.nn.Linear(2, 2))

    class Wrapper(torch.nn.Module):  # PEFT-like: forward(**kwargs), the model behind get_base_model()
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def get_base_model(self):
            return self.inner

        def forward(self, *args, **kwargs):
            return self.inner(*args, **kwargs)

    assert cache_argument(Wrapper(tiny)) == cache_argument(tiny)

    class Old(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, use_cache=None):
            return past_key_values

    m = Old()
    assert cache_argument(m) == "past_key_values"
    m.forward = lambda input_ids=None, cache=None: cache  # an instance override is not cached per class
    assert cache_argument(m) == "cache"
    assert cache_argument(Old()) == "past_key_values"


def test_output_cache_reads_the_field(tiny, moespec_deprecation_guard):
    from transformers import DynamicCache

    cache = DynamicCache(config=tiny.config)
    probe = _probe()
    with DeprecationGuard() as guard:
        out = probe.call(tiny, input_ids=torch.tensor([[1, 2, 3]]), **forward_kwargs(tiny, cache, use_cache=True))
        assert probe.compat_cache(out) is cache
    assert guard.offences == []
    assert cache.get_seq_length() == 3

    # 5.24+: `past_key_values` is a compatibility property that logs a deprecation; the guard sees it.
    names = {f.name for f in dataclasses.fields(out)}
    if "cache" in names and isinstance(getattr(type(out), "past_key_values", None), property):
        with DeprecationGuard() as guard:
            assert probe.read(out, "past_key_values") is cache
        assert len(guard.offences) == 1 and "deprecated" in guard.offences[0], guard.offences
        moespec_deprecation_guard.offences.clear()

    @dataclasses.dataclass
    class OldOutput:
        logits: object = None
        past_key_values: object = None

    assert output_cache(OldOutput(past_key_values="kv")) == "kv"
    assert output_cache(OldOutput()) is None
    assert output_cache({"past_key_values": "kv"}) == "kv"
    assert output_cache({"cache": "kv2", "logits": 1}) == "kv2"
    assert output_cache(types.SimpleNamespace(cache="kv3")) == "kv3"
    assert output_cache(types.SimpleNamespace(logits=1)) is None


def test_speculative_generate_passes_no_deprecated_argument(tiny):
    from moespec.speculative.drafters import DraftModelDrafter
    from moespec.speculative.engine import generate
    from moespec.speculative.tree import DraftConfig

    from moespec.integrations.tiny import tiny_model

    draft = tiny_model("qwen3_moe", seed=1)
    prompt = torch.tensor([[5, 6, 7, 8, 9]])
    with _shown() as seen, DeprecationGuard() as guard:
        tokens, stats = generate(tiny, prompt, drafter=DraftModelDrafter(draft), draft=DraftConfig.tree(2, 2, 4),
                                 max_new_tokens=6)
    assert guard.offences == []
    assert not [c for c in seen if issubclass(c, (FutureWarning, DeprecationWarning))], seen
    assert stats.new_tokens >= 1 and tokens.shape[1] == prompt.shape[1] + stats.new_tokens
