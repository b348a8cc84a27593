"""Bad arguments to the new `moespec` commands: a clear one-line error and a non-zero exit, no traceback."""
import subprocess
import sys

import pytest
import torch

from moespec import cli


@pytest.fixture(autouse=True)
def _restore_threads():
    """`--threads` sets torch's global thread count; keep it from leaking into other tests."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


PARSER_ERRORS = [
    ["bench"],
    ["bench", "layer", "--tokens", "0,4"],
    ["bench", "layer", "--tokens", "a"],
    ["bench", "layer", "--budgets", "x"],
    ["bench", "layer", "--policies", "drop"],
    ["bench", "layer", "--dtype", "int8"],
    ["bench", "layer", "--iters", "0"],
    ["bench", "generate", "--modes", "turbo"],
    ["bench", "generate", "--max-new-tokens", "0"],
    ["generate", "--controller", "magic"],
    ["capture", "--target", "tiny:qwen3_moe"],  # --out is required
]

RUNTIME_ERRORS = [
    (["bench", "layer", "--models", "gpt-5"], "unknown model preset"),
    (["bench", "layer", "--shape", "64,32,8"], "H,I,E,k"),
    (["bench", "layer", "--shape", "64,32,8,16"], "k <= E"),
    (["bench", "layer", "--shape", "64,32,8,2", "--routing", "zipf:-1"], "--routing"),
    (["bench", "layer", "--shape", "64,32,8,2", "--budgets", "1"], "no budget"),
    (["bench", "layer", "--shape", "64,32,8,2", "--impls", "cutlass"], "unknown implementation"),
    (["bench", "layer", "--routing", "replay:/nonexistent.pt"], "does not exist"),
    (["bench", "generate", "--target", "tiny:nope"], "unknown tiny architecture"),
    (["bench", "generate", "--target", "tiny:qwen3_moe", "--prompts", "/nonexistent.jsonl"], "does not exist"),
    (["bench", "generate", "--target", "tiny:qwen3_moe", "--budgets", "2"], "top-k"),
    (["generate", "--target", "tiny:qwen3_moe", "--controller", "cascade", "--k", "0"], "--k"),
]


@pytest.mark.parametrize("argv", PARSER_ERRORS, ids=lambda a: " ".join(a))
def test_parser_rejects(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", RUNTIME_ERRORS, ids=lambda a: " ".join(a) if isinstance(a, list) else "")
def test_runtime_rejects_with_one_line(argv, message, capsys, tmp_path):
    assert cli.main(argv + (["--out", str(tmp_path)] if argv[:2] == ["bench", "layer"] else [])) == 2
    err = capsys.readouterr().err
    assert err.startswith("moespec: error:") and message in err, err
    assert "Traceback" not in err


def test_no_traceback_from_the_installed_command():
    out = subprocess.run([sys.executable, "-m", "moespec", "bench", "layer", "--shape", "1,2"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().startswith("moespec: error:") and "Traceback" not in out.stderr
