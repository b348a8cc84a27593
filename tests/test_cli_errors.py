"""A new user's rough edges: clear errors instead of crashes, checked outputs, honest messages, threads.

Mostly in-process `cli.main` calls (fast); a few subprocesses check the installed entry point.
"""
import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from moespec import _cuda, cli, ops

transformers = pytest.importorskip("transformers")

from moespec.speculative import engine  # noqa: E402
from moespec.speculative.drafters import check_drafter_vocab, vocab_sizes  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _restore_threads():
    """The CLI sets torch's global thread count; keep it from leaking into other tests."""
    n = torch.get_num_threads()
    warned = engine._threads_warned
    yield
    torch.set_num_threads(n)
    engine._threads_warned = warned


def fail(argv, capsys):
    """Run the CLI in-process, expecting a user error: (exit code, stderr)."""
    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as exc:
        rc = exc.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


def tiny(vocab: int, seed: int = 0, moe: bool = True):
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                  head_dim=16, intermediate_size=32, max_position_embeddings=256, bos_token_id=None,
                  eos_token_id=None, pad_token_id=None)
    if moe:
        m = Qwen3MoeForCausalLM(Qwen3MoeConfig(moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2,
                                               **common))
        m.set_experts_implementation("eager")
        return m.eval()
    return Qwen3ForCausalLM(Qwen3Config(**common)).eval()


class FakeTokenizer:
    def __init__(self, vocab: dict):
        self.vocab = vocab

    def get_vocab(self):
        return dict(self.vocab)


# ----------------------------------------------------------------------------- 1. crashes -> errors


@pytest.mark.parametrize("argv,message", [
    (["generate", "--drafter", "tiny:mixtral"], "smaller than the target's"),
    (["generate", "--target", "tiny:qwen3_moe", "--drafter", "default"], "has no tokenizer"),
], ids=["smaller-drafter", "other-tokenizer"])
def test_generate_refuses_a_drafter_with_other_token_ids(argv, message, capsys):
    rc, err = fail(argv + ["--max-new-tokens", "2"], capsys)
    assert rc == 2 and "moespec: error: --drafter" in err and message in err, err
    assert "IndexError" not in err


def test_speculative_generate_checks_vocabularies():
    target = tiny(64)
    ids = torch.tensor([[1, 2, 3, 1, 2]])
    with pytest.raises(ValueError, match="smaller than the target's"):
        engine.generate(target, ids, drafter=tiny(48, moe=False), max_new_tokens=2, draft=2, threads=1)
    with pytest.raises(ValueError, match="outside the target's vocabulary"):
        engine.generate(target, torch.tensor([[1, 64]]), max_new_tokens=2, threads=1)
    # A larger draft vocabulary drafts only ids the target can read: runs, and stays lossless.
    big = tiny(80, seed=3, moe=False)
    ref, _ = engine.generate(target, ids, max_new_tokens=6, draft=0, threads=1)
    out, st = engine.generate(target, ids, drafter=big, max_new_tokens=6, draft=3, threads=1)
    assert torch.equal(out, ref) and max(out[0].tolist()) < 64
    assert check_drafter_vocab(target, big) == 64 and check_drafter_vocab(target, tiny(64, moe=False)) is None


def test_a_drafter_proposing_foreign_ids_is_refused():
    class Wild:
        def begin(self, prompt):
            pass

        def propose(self, context, config):
            from moespec.speculative import DraftTree
            return DraftTree.chain([999])

        def commit(self, context, tree, path):
            pass

    with pytest.raises(ValueError, match="Wild drafted token id 999, outside"):
        engine.generate(tiny(64), torch.tensor([[1, 2]]), drafter=Wild(), max_new_tokens=3, draft=1, threads=1)


def test_check_drafter_vocab_compares_tokenizers():
    target, draft = tiny(8), tiny(8, moe=False)
    assert vocab_sizes(target) == (8, 8)
    same = FakeTokenizer({f"t{i}": i for i in range(8)})
    assert check_drafter_vocab(target, draft, same, FakeTokenizer(same.vocab)) is None
    swapped = FakeTokenizer({**same.vocab, "t1": 2, "t2": 1})
    with pytest.raises(ValueError, match="tokenizer differs from the target's: token 't1' is id 1"):
        check_drafter_vocab(target, draft, same, swapped)
    # Different sizes need both tokenizers where the caller asks for proof (the CLI).
    with pytest.raises(ValueError, match="has no tokenizer"):
        check_drafter_vocab(target, tiny(12, moe=False), None, same, require_tokenizers=True)
    assert check_drafter_vocab(target, tiny(12, moe=False), same, FakeTokenizer(same.vocab),
                               require_tokenizers=True) == 8


def test_outputs_are_checked_before_the_work(tmp_path, capsys):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    t0 = time.perf_counter()
    rc, err = fail(["bench", "layer", "--out", a_file], capsys)
    assert rc == 2 and "usage: moespec bench layer" in err and "is an existing file, but a folder is expected" in err
    assert time.perf_counter() - t0 < 5  # nothing was benchmarked
    rc, err = fail(["bench", "generate", "--out", a_file / "sub"], capsys)
    assert rc == 2 and f"{a_file} is a file" in err
    rc, err = fail(["bench", "layer", "--name", "a/b", "--out", tmp_path], capsys)
    assert rc == 2 and "plain file stem" in err
    rc, err = fail(["capture", "--target", "tiny:qwen3_moe", "--out", tmp_path], capsys)
    assert rc == 2 and "is a folder, but a file path is expected" in err
    rc, err = fail(["generate", "--json", a_file / "x.json"], capsys)
    assert rc == 2 and "usage: moespec generate" in err and f"{a_file}: is an existing file" in err
    rc, err = fail(["demo", "--json", tmp_path], capsys)
    assert rc == 2 and "is a folder" in err and "moespec demo" not in capsys.readouterr().out


def test_missing_output_folders_are_created(tmp_path, capsys):
    path = tmp_path / "new" / "deeper" / "demo.json"
    assert cli.main(["demo", "--tokens", "4", "--json", str(path)]) == 0
    assert json.loads(path.read_text())["tokens"] == 4 and f"wrote {path}" in capsys.readouterr().out
    assert cli.main(["demo", "--tokens", "5", "--json", str(path)]) == 0  # an existing file is overwritten
    assert json.loads(path.read_text())["tokens"] == 5
    cap = tmp_path / "caps" / "r.pt"
    assert cli.main(["capture", "--target", "tiny:qwen3_moe", "--prompt", "abc", "--out", str(cap)]) == 0
    assert cap.is_file()
    out = tmp_path / "layer" / "out"
    assert cli.main(["bench", "layer", "--shape", "32,16,8,2", "--tokens", "1", "--budgets", "none", "--impls",
                     "reference", "--iters", "1", "--warmup", "0", "--no-png", "--quiet", "--out", str(out)]) == 0
    assert (out / "bench_layer.json").is_file()


def test_train_writes_to_the_working_directory_by_default(tmp_path, capsys):
    from moespec.models import train

    out = train.build_parser().parse_args([]).out
    assert out == Path("moespec_results") / "models" and not out.is_absolute()
    a_file = tmp_path / "f"
    a_file.write_text("x")
    with pytest.raises(SystemExit) as exc:
        train.main(["--out", str(a_file), "--quick"])
    assert exc.value.code == 2 and "is an existing file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.main(["--out", str(tmp_path), "--lr", "0"])
    assert "--lr must be > 0" in capsys.readouterr().err


def test_moespec_results_is_ignored_by_git():
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "check-ignore", "-q", "moespec_results/bench_layer.json"], cwd=REPO)
    assert out.returncode == 0


# ----------------------------------------------------------------------------- 2. messages


def test_a_model_folder_without_tokenizer_says_so(tmp_path, capsys):
    from moespec.integrations.tiny import tiny_model

    tiny_model("qwen3_moe").save_pretrained(tmp_path)
    rc, err = fail(["generate", "--target", tmp_path, "--max-new-tokens", "2"], capsys)
    assert rc == 2 and "tokenizer of --target" in err and "is missing" in err and "prompt is empty" not in err


def test_no_driver_is_told_apart_from_an_old_driver():
    no_driver = {"device_count": 0, "runtime_version": 13000, "driver_version": 0,
                 "error": "CUDA driver version is insufficient for CUDA runtime version"}
    msg = _cuda.device_problem(no_driver, libcuda=False, device_nodes=[])
    assert msg.startswith("no NVIDIA driver / GPU found") and "insufficient" not in msg
    old = dict(no_driver, driver_version=12020)
    msg = _cuda.device_problem(old, libcuda=True, device_nodes=["/dev/nvidia0"])
    assert "insufficient" in msg and "12.2" in msg and "13.0" in msg
    none_seen = {"device_count": 0, "runtime_version": 12080, "driver_version": 12080,
                 "error": "no CUDA-capable device is detected"}
    assert _cuda.device_problem(none_seen, libcuda=True, device_nodes=[]) == "no CUDA-capable device is detected"


def test_info_reports_the_gpu_problem(capsys):
    assert cli.main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    if info["gpu_visible"]:
        assert info["gpu_problem"] is None
    else:
        assert info["gpu_problem"]
        if not _cuda.nvidia_device_nodes() and not _cuda.libcuda_loadable():
            assert info["gpu_problem"].startswith("no NVIDIA driver / GPU found")
            assert "insufficient" not in (info["why_not"] or "")


def test_errors_are_prefixed_once(monkeypatch, capsys):
    def boom(args):
        raise ValueError("moespec: invalid budget settings: budget (1) must be >= top_k (2)")

    monkeypatch.setattr(cli, "_demo", boom)
    rc, err = fail(["demo"], capsys)
    assert rc == 2 and err == "moespec: error: invalid budget settings: budget (1) must be >= top_k (2)\n"
    assert cli.error_message(RuntimeError("moespec: moespec: x")) == "x"


@pytest.mark.parametrize("argv,usage", [
    (["bench", "layer", "--warmup", "-1"], "moespec bench layer"),
    (["bench", "layer", "--iters", "0"], "moespec bench layer"),
    (["bench", "layer", "--reduce", "0"], "moespec bench layer"),
    (["demo", "--zipf", "nan"], "moespec demo"),
    (["demo", "--zipf", "inf"], "moespec demo"),
    (["demo", "--zipf", "-1"], "moespec demo"),
    (["generate", "--threads", "0"], "moespec generate"),
    (["generate", "--k", "-1"], "moespec generate"),
    (["capture", "--out", "x.pt", "--max-tokens", "0"], "moespec capture"),
])
def test_argument_errors_print_the_subcommand_usage(argv, usage, capsys):
    rc, err = fail(argv, capsys)
    assert rc == 2 and f"usage: {usage}" in err and f"{usage}: error:" in err, err


# ----------------------------------------------------------------------------- 3. nonsense


def test_impls_that_cannot_run_here(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the CUDA implementations can run")
    base = ["bench", "layer", "--shape", "32,16,8,2", "--tokens", "1", "--budgets", "none", "--iters", "1",
            "--warmup", "0", "--no-png", "--quiet", "--out", tmp_path]
    rc, err = fail(base + ["--impls", "moespec,moespec-plan"], capsys)
    assert rc == 2 and "none of the requested implementations can run here" in err
    assert "moespec: needs a CUDA device" in err and "moespec-plan: needs a CUDA device" in err
    assert cli.main([str(a) for a in base + ["--impls", "moespec,reference"]]) == 0
    io = capsys.readouterr()
    assert "NOTE: --impls moespec cannot run here" in io.err and "needs a CUDA device" in io.err
    rows = json.loads((tmp_path / "bench_layer.json").read_text())["rows"]
    assert {r["impl"] for r in rows if r["time_us"]} == {"reference"}


def test_budget_rule_is_the_ops_rule():
    parse = cli.budget_list_type(allow_none=True)
    for v in range(-3, 6):
        try:
            ops.validate_budget(v, 1)
            ok = True
        except ValueError:
            ok = False
        if ok:
            assert parse(str(v)) == [v]
        else:
            with pytest.raises(argparse.ArgumentTypeError, match="budget must be >= 1"):
                parse(str(v))
    assert parse("none,8,16") == [None, 8, 16]
    for bad, msg in (("x", "integers"), ("8,8", "twice"), ("2.5", "integers"), ("", "at least one")):
        with pytest.raises(argparse.ArgumentTypeError, match=msg):
            parse(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="no 'none'"):
        cli.budget_list_type(allow_none=False)("none,8")
    with pytest.raises(ValueError, match=r"--budgets 2: budget \(2\) must be >= top_k \(4\)"):
        cli.check_budgets_for_top_k([None, 8, 2], 4)


def test_bench_layer_budgets_follow_the_ops_rule(tmp_path, capsys):
    base = ["bench", "layer", "--tokens", "1", "--impls", "reference", "--iters", "1", "--warmup", "0", "--no-png",
            "--quiet", "--out", tmp_path]
    rc, err = fail(base + ["--shape", "32,16,8,4", "--budgets", "none,2"], capsys)
    assert rc == 2 and "--budgets 2 applies to none of the chosen shapes: budget (2) must be >= top_k (4)" in err
    rc, err = fail(base + ["--shape", "32,16,8,4", "--budgets", "0"], capsys)
    assert rc == 2 and "budget must be >= 1" in err
    # Mixed top-k: a budget only some shapes can use is skipped for the others, with a note.
    assert cli.main([str(a) for a in base + ["--models", "mixtral-8x7b,olmoe-1b-7b", "--reduce", "256",
                                              "--budgets", "none,4"]]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("NOTE: budget")]
    assert notes == ["NOTE: budget 4 skipped for olmoe-1b-7b: budget (4) must be >= top_k (8): every token needs 8 "
                     "experts"]  # mixtral-8x7b (top-2, E=8) runs it


@pytest.mark.parametrize("make", [np.int64, np.int32, torch.tensor, lambda v: torch.tensor(v, dtype=torch.int32)],
                         ids=["np.int64", "np.int32", "tensor-int64", "tensor-int32"])
def test_ops_accept_integer_like_budgets(make):
    z = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    x, wgu, wd = torch.randn(6, 16), torch.randn(8, 16, 16), torch.randn(8, 16, 8)
    ref = ops.budget_routing(z, 2, 3)
    r = ops.budget_routing(z, make(2), make(3))
    assert torch.equal(r.topk_ids, ref.topk_ids) and torch.equal(r.kept_experts, ref.kept_experts)
    m = ops.budget_routing_masked(z, make(2), make(3))
    assert torch.equal(m.topk_ids, ref.topk_ids)
    c = ops.budget_routing(z, make(2), make(6), coverage=0.5, min_budget=make(3))
    assert c.kept_size >= 3
    y, _ = ops.budgeted_moe(x, z, wgu, wd, make(2), make(3))
    assert torch.equal(y, ops.budgeted_moe(x, z, wgu, wd, 2, 3)[0])
    assert ops.validate_budget(make(4), make(2)) == (4, 2, None)
    assert torch.equal(ops.expert_union(torch.tensor([[0, 1]]), make(4)).experts, torch.tensor([0, 1],
                                                                                              dtype=torch.int32))


@pytest.mark.parametrize("bad", [True, np.True_, torch.tensor(True), torch.tensor([3]), torch.tensor(3.0), 3.0,
                                 np.float64(3)], ids=repr)
def test_ops_reject_bool_and_non_integer_budgets(bad):
    z = torch.randn(4, 8)
    with pytest.raises(ValueError, match="budget must be an int"):
        ops.budget_routing(z, 2, bad)
    with pytest.raises(ValueError, match="budget must be an int"):
        ops.budget_routing_masked(z, 2, bad)
    with pytest.raises(ValueError, match="top_k must be a positive int"):
        ops.budget_routing(z, bad, None)
    with pytest.raises(ValueError, match="min_budget must be an int"):
        ops.budget_routing(z, 2, 4, coverage=0.5, min_budget=bad)


# ----------------------------------------------------------------------------- 4. threads


def test_cli_threads_default_is_one_on_the_cpu():
    torch.set_num_threads(2)
    ns = argparse.Namespace(threads=None, device="cpu")
    assert cli._apply_threads(ns) == 1 and torch.get_num_threads() == 1
    assert cli._apply_threads(argparse.Namespace(threads=2, device="cpu")) == 2 and torch.get_num_threads() == 2
    assert cli.build_parser().parse_args(["generate", "--threads", "auto"]).threads is None
    assert cli.build_parser().parse_args(["bench", "layer", "--threads", "3"]).threads == 3


def test_generate_threads_argument_and_warning():
    model, ids = tiny(32), torch.tensor([[1, 2, 3]])
    torch.set_num_threads(2)
    seen = []

    class Spy:  # records the thread count while drafting
        def begin(self, prompt):
            pass

        def propose(self, context, config):
            from moespec.speculative import DraftTree
            seen.append(torch.get_num_threads())
            return DraftTree.empty()

        def commit(self, context, tree, path):
            pass

    _, st = engine.generate(model, ids, drafter=Spy(), max_new_tokens=2, draft=1, threads=1)
    assert set(seen) == {1} and st.config["threads"] == 1
    assert torch.get_num_threads() == 2  # the caller's setting is restored
    engine._threads_warned = False
    with pytest.warns(UserWarning, match="threads=1"):
        engine.generate(model, ids, max_new_tokens=1)
    assert torch.get_num_threads() == 2  # never changed without threads=
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine.generate(model, ids, max_new_tokens=1)  # once per process
        engine._threads_warned = False
        engine.generate(model, ids, max_new_tokens=1, threads=2)  # an explicit choice is not warned about
    with pytest.raises(ValueError, match="threads must be >= 1"):
        engine.generate(model, ids, max_new_tokens=1, threads=0)


# ----------------------------------------------------------------------------- 5. version, help


def test_version_and_descriptions():
    from moespec import __version__

    out = subprocess.run([sys.executable, "-m", "moespec", "--version"], capture_output=True, text=True,
                         timeout=120, env=dict(os.environ))
    assert out.returncode == 0 and out.stdout.strip() == f"moespec {__version__}"

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sp in action.choices.items():
                    assert sp.description, f"`moespec {' '.join(path + [name])} --help` has no description"
                    walk(sp, path + [name])

    walk(cli.build_parser(), [])
