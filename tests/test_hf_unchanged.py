"""A patch whose budget cannot bind changes nothing users rely on, bit for bit.

For every tiny architecture and four "no-op" patch settings (no budget, or a cap of E = the number
of experts, which no union can exceed; each in ``when="auto"`` and ``when="always"``), a patched
model must give exactly (``torch.equal``) what the unpatched model gives: forward logits (prompt,
prefill with a cache, a 4-token verification-shaped call on that cache), router logits, every
``generate`` mode (greedy, seeded sampling, assisted, prompt lookup, beam search) and its logits, and
a ``save_pretrained`` / ``from_pretrained`` round trip. Each patched check also asserts from the
handle's statistics that the patch really ran (and, with the cap, that budgeted calls happened), so
equality is never vacuous.

The last tests pin `moespec.speculative.generate` on the shipped models: greedy, no budget, it equals plain
greedy decoding and the golden tokens in ``tests/data/spec_golden.json`` (recorded on transformers
5.24 by ``tests/data/make_spec_golden.py``), so the same tokens come out across the supported
transformers range.
"""
import contextlib
import copy
import inspect
import json
from pathlib import Path

import pytest
import torch

import moespec
from moespec.integrations import get_handle
from moespec.integrations.tiny import TINY_ARCHITECTURES, tiny_model

transformers = pytest.importorskip("transformers")

GOLDEN = Path(__file__).resolve().parent / "data" / "spec_golden.json"
NEW = 8  # new tokens per generate call

# Patch settings under which no budget can take effect: id -> kwargs for moespec.patch given E.
SETTINGS = {
    "none-auto": lambda E: {},
    "none-always": lambda E: {"when": "always"},
    "capE-auto": lambda E: {"budget": E},
    "capE-always": lambda E: {"budget": E, "when": "always"},
}

SEED_PROMPT = torch.tensor([[5, 6, 7, 8, 9, 10]])


def _cache_kwargs(model, cache):
    """The KV cache under the name this transformers' forward takes (``cache`` from 5.24 on)."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}


def _output_cache(out):
    return out["cache"] if "cache" in out else out.past_key_values


def _ids(seed, batch=1, length=8):
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def _num_experts(model):
    cfg = model.config
    for name in ("num_local_experts", "num_experts", "n_routed_experts"):
        if getattr(cfg, name, None):
            return int(getattr(cfg, name))
    raise AssertionError("no expert count in config")


def _assert_same(got, want, what):
    """Bitwise equality (dtype, shape and every bit), with the size of any difference."""
    assert isinstance(got, torch.Tensor) and isinstance(want, torch.Tensor), what
    assert got.dtype == want.dtype and got.shape == want.shape, \
        f"{what}: {got.dtype}{tuple(got.shape)} != {want.dtype}{tuple(want.shape)}"
    if not torch.equal(got, want):
        if got.is_floating_point():
            diff = (got.double() - want.double()).abs()
            detail = f"max |diff| {diff.max().item():.3e}, {int((diff != 0).sum())}/{diff.numel()} differ"
        else:
            detail = f"{int((got != want).sum())}/{got.numel()} differ: {got.tolist()} vs {want.tolist()}"
        raise AssertionError(f"{what} changed by the patch: {detail}")


class Env:
    """One architecture: the model to patch, a never-patched twin, a draft, memoised references."""

    def __init__(self, arch):
        self.arch = arch
        self.ref = tiny_model(arch, seed=1)
        self.model = copy.deepcopy(self.ref)
        self.draft = tiny_model(arch, seed=7)
        gc = self.draft.generation_config
        gc.num_assistant_tokens = 3  # short drafts keep it quick
        gc.num_assistant_tokens_schedule = "constant"  # no state carried from one call to the next
        self.E = _num_experts(self.ref)
        self.k = int(self.ref.config.num_experts_per_tok)
        self._refs = {}
        # Every vocabulary token once (prompt lookup then finds a match at every step), then
        # p + (the model's own greedy continuation of p) + p (so some lookup drafts are accepted):
        # generation makes verification calls on a cache, both accepted and rejected.
        with torch.no_grad():
            cont = self.ref.generate(SEED_PROMPT, max_new_tokens=8, do_sample=False, pad_token_id=0)
        vocab = torch.randperm(self.ref.config.vocab_size, generator=torch.Generator().manual_seed(0))
        self.prompt = torch.cat([vocab.view(1, -1), SEED_PROMPT, cont[:, SEED_PROMPT.shape[1]:], SEED_PROMPT], dim=1)

    def reference(self, key, fn):
        """``fn(unpatched model)``, computed once; an exception is remembered and re-raised."""
        if key not in self._refs:
            try:
                self._refs[key] = ("ok", fn(self.ref))
            except Exception as err:  # re-raised (or turned into a skip) by the caller
                self._refs[key] = ("err", err)
        status, value = self._refs[key]
        if status == "err":
            raise value
        return value

    def patch(self, setting):
        return moespec.patch(self.model, **SETTINGS[setting](self.E))


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and results do not depend on the machine's core count)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module", params=TINY_ARCHITECTURES)
def env(request):
    torch.manual_seed(0)
    return Env(request.param)


def _check_handle(handle, env, setting, expect_budgeted_call):
    """The patch ran on every MoE layer and nothing was dropped; a cap was really applied."""
    calls = handle.stats.calls
    assert calls, "the patch saw no forward call: the comparison would prove nothing"
    n_layers = len(handle.layers)
    for c in calls:
        assert len(c.layers) == n_layers
        assert all(s.kept_size == s.union_size for s in c.layers), "a no-op budget dropped experts"
    budgeted = [c for c in calls if c.budgeted]
    if setting.startswith("none"):
        assert not budgeted
    else:
        assert all(s.budget == env.E for c in budgeted for s in c.layers)
        if setting.endswith("always"):
            assert len(budgeted) == len(calls)
        if expect_budgeted_call:
            assert budgeted, "no budgeted call: the cap's code path was not exercised"


# ----------------------------------------------------------------------------- forward


def _verification_scope():
    """`moespec.verification()` where this moespec has it (there ``when="auto"`` budgets a direct
    verification-shaped call only inside it); earlier versions budget such a call by its shape."""
    scope = getattr(moespec, "verification", None)
    return scope() if scope is not None else contextlib.nullcontext()


def _forward_outputs(model):
    """Logits of a batch-2 prompt, of a prefill with a cache and of 4 new tokens on that cache."""
    ids = _ids(0, batch=2, length=10)
    full = model(ids, use_cache=False).logits
    pre = model(ids[:, :6], use_cache=True)
    with _verification_scope():
        cont = model(ids[:, 6:], use_cache=True, **_cache_kwargs(model, _output_cache(pre)))
    return {"prompt logits": full, "prefill logits": pre.logits, "cached continuation logits": cont.logits}


@pytest.mark.parametrize("setting", SETTINGS)
@torch.no_grad()
def test_forward_and_cached_continuation_logits_bitwise(env, setting):
    want = env.reference("forward", _forward_outputs)
    with env.patch(setting) as handle:
        got = _forward_outputs(env.model)
        _check_handle(handle, env, setting, expect_budgeted_call=setting.startswith("capE"))
        if setting == "capE-auto":  # only the continuation is verification-shaped
            assert [c.budgeted for c in handle.stats.calls] == [False, False, True]
    for name in want:
        _assert_same(got[name], want[name], f"{env.arch}/{setting}: {name}")


@torch.no_grad()
def test_forward_bitwise_on_two_threads(env):
    """Also on a multi-threaded CPU, where a different matmul or summation order would show.

    (Everything else here runs on one thread, for speed; the autouse fixture restores the count.)
    """
    torch.set_num_threads(2)
    ids = _ids(6, batch=2, length=10)
    want = env.ref(ids).logits
    with env.patch("none-auto") as handle:
        got = env.model(ids).logits
        _check_handle(handle, env, "none-auto", expect_budgeted_call=False)
    _assert_same(got, want, f"{env.arch}/none-auto, 2 threads: logits")


def _router_outputs(model):
    out = model(_ids(1, batch=2, length=6), output_router_logits=True)
    res = {"logits": out.logits}
    res.update({f"router logits of MoE layer {i}": r for i, r in enumerate(out.router_logits)})
    if getattr(out, "aux_loss", None) is not None:
        res["aux_loss"] = out.aux_loss
    return res


@pytest.mark.parametrize("setting", SETTINGS)
@torch.no_grad()
def test_output_router_logits_bitwise(env, setting):
    if not hasattr(env.ref.config, "output_router_logits"):
        pytest.skip(f"{env.arch} config has no output_router_logits")
    want = env.reference("router", _router_outputs)
    assert sum(k.startswith("router logits") for k in want) >= 2
    with env.patch(setting) as handle:
        got = _router_outputs(env.model)
        _check_handle(handle, env, setting, expect_budgeted_call=setting == "capE-always")
    assert got.keys() == want.keys()
    for name in want:
        _assert_same(got[name], want[name], f"{env.arch}/{setting}: {name}")


# ----------------------------------------------------------------------------- generate

MODES = {
    "greedy": lambda env: dict(do_sample=False),
    "sample": lambda env: dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0),
    "assisted": lambda env: dict(do_sample=False, assistant_model=env.draft),
    "prompt_lookup": lambda env: dict(do_sample=False, prompt_lookup_num_tokens=3),
    "beam": lambda env: dict(do_sample=False, num_beams=2, output_scores=True),
}
# Modes whose target calls include verification-shaped ones (budgeted under capE-auto).
VERIFYING = ("assisted", "prompt_lookup")


def _generate(model, env, mode):
    torch.manual_seed(1234)
    out = model.generate(env.prompt, max_new_tokens=NEW, pad_token_id=0, return_dict_in_generate=True,
                         output_logits=True, **MODES[mode](env))
    res = {"sequences": out.sequences}
    for name in ("logits", "scores"):
        steps = getattr(out, name, None)
        if steps:
            res[name] = torch.stack(steps)
    for name in ("sequences_scores", "beam_indices"):
        if getattr(out, name, None) is not None:
            res[name] = getattr(out, name)
    return res


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("setting", SETTINGS)
@torch.no_grad()
def test_generate_bitwise(env, setting, mode):
    try:
        want = env.reference(("generate", mode), lambda m: _generate(m, env, mode))
    except Exception as err:
        # Only the never-patched twin ran: transformers itself refuses (or cannot run) this mode on
        # this architecture, e.g. 5.0 cannot crop gpt-oss's sliding-window cache for assisted
        # decoding. The patched model's own call below is never guarded.
        pytest.skip(f"transformers {transformers.__version__} cannot run {mode} on unpatched {env.arch}: "
                    f"{type(err).__name__}: {err}")
    assert want["sequences"].shape[1] > env.prompt.shape[1]
    with env.patch(setting) as handle:
        got = _generate(env.model, env, mode)
        _check_handle(handle, env, setting, expect_budgeted_call=mode in VERIFYING or setting == "capE-always")
    assert got.keys() == want.keys()
    for name in want:
        _assert_same(got[name], want[name], f"{env.arch}/{setting}/{mode}: generate {name}")


# ----------------------------------------------------------------------------- weights


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(got, want, what):
    assert list(got) == list(want), f"{what}: state-dict keys differ"
    for k in want:
        _assert_same(got[k], want[k], f"{what}: {k}")


@pytest.mark.parametrize("setting", ["none-auto", "capE-always"])
@torch.no_grad()
def test_save_pretrained_round_trip(env, setting, tmp_path):
    want_state = _state(env.ref)
    ids = _ids(2, batch=2, length=7)
    want_logits = env.reference("round trip logits", lambda m: m(ids).logits)
    with env.patch(setting) as handle:
        env.model.save_pretrained(tmp_path)
        assert get_handle(env.model) is handle  # saving leaves the patch in place
    config_text = (tmp_path / "config.json").read_text()
    assert "moespec" not in config_text, "the saved config refers to moespec: it would not load without it"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert get_handle(reloaded) is None
    assert reloaded.config._experts_implementation == env.ref.config._experts_implementation
    _assert_same_state(_state(reloaded), want_state, f"{env.arch}/{setting}: reloaded")
    _assert_same(reloaded(ids).logits, want_logits, f"{env.arch}/{setting}: reloaded model's logits")


@torch.no_grad()
def test_state_dict_same_before_while_and_after_patch(env):
    before = _state(env.model)
    _assert_same_state(before, _state(env.ref), f"{env.arch}: before")
    handle = moespec.patch(env.model, budget=env.E, when="always")
    try:
        _assert_same_state(_state(env.model), before, f"{env.arch}: patched")
        # Running patched forwards, binding budgets included, must not write into any weight.
        env.model(_ids(3, batch=2, length=6))
        with moespec.expert_budget(env.model, env.k, policy="substitute"):
            env.model(_ids(4, batch=2, length=6))
        with moespec.expert_budget(env.model, env.k, policy="truncate"):
            env.model(_ids(5, batch=2, length=6))
        assert handle.stats.calls[-1].budgeted
        _assert_same_state(_state(env.model), before, f"{env.arch}: patched, after budgeted forwards")
    finally:
        handle.unpatch()
    _assert_same_state(_state(env.model), before, f"{env.arch}: after unpatch()")


# ----------------------------------------------------------------------------- spec.generate, shipped models


@pytest.fixture(scope="module")
def shipped():
    from moespec.models import load_draft, load_target

    torch.manual_seed(0)
    golden = json.loads(GOLDEN.read_text())
    assert golden["settings"]["dtype"] == "float32" and golden["settings"]["budget"] is None
    return load_target(dtype=torch.float32), load_draft(dtype=torch.float32), golden


GOLDEN_CASES = [0, 1]


@pytest.mark.parametrize("case", GOLDEN_CASES)
@torch.no_grad()
def test_speculative_generate_matches_greedy_and_golden_tokens(shipped, case):
    """Greedy, no budget: model.generate(do_sample=False) and spec.generate (the recorded chain,
    a tree, prompt lookup) all give exactly the recorded tokens."""
    from moespec import speculative as spec

    target, draft, golden = shipped
    c = golden["cases"][case]
    s = golden["settings"]
    n = s["max_new_tokens"]
    ids = torch.tensor([c["prompt_ids"]])
    where = (f"prompt {c['prompt']!r} on transformers {transformers.__version__} / torch {torch.__version__} "
             f"(golden recorded on transformers {golden['recorded_with']['transformers']}, "
             f"smallest greedy margin {c['min_top2_margin']})")
    # Plain greedy decoding (the golden tokens hold no eos, so it runs the full length too).
    greedy = target.generate(ids, max_new_tokens=n, do_sample=False)[0, ids.shape[1]:].tolist()
    assert greedy == c["tokens"], f"plain greedy decoding differs from the golden tokens: {where}"
    drafters = {
        "draft model, chain": dict(drafter=draft, draft=s["draft"]),
        "draft model, tree": dict(drafter=draft, draft=spec.DraftConfig.tree(depth=3, branching=2, nodes=8)),
        "prompt lookup, chain": dict(drafter=spec.PromptLookupDrafter(), draft=s["draft"]),
    }
    for name, kw in drafters.items():
        out, _ = spec.generate(target, ids, max_new_tokens=n, do_sample=False, **kw)
        assert out[0, :ids.shape[1]].tolist() == c["prompt_ids"]
        tokens = out[0, ids.shape[1]:].tolist()
        assert tokens == c["tokens"], f"spec.generate ({name}) differs from the golden tokens: {where}"
    assert get_handle(target) is None  # no budget: the engine left the target unpatched


def test_golden_file_is_complete():
    golden = json.loads(GOLDEN.read_text())
    assert {"transformers", "torch"} <= golden["recorded_with"].keys()
    assert golden["settings"]["eos_token_id"] is None
    assert len(golden["cases"]) == len(GOLDEN_CASES)
    for c in golden["cases"]:
        assert c["prompt"] and c["prompt_ids"] and len(c["tokens"]) == golden["settings"]["max_new_tokens"]
