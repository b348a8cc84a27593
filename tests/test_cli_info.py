"""The `moespec` command: info and the CPU demo."""
import json
import os
import subprocess
import sys

import moespec
from moespec import _cuda


def run_cli(*args):
    out = subprocess.run([sys.executable, "-m", "moespec", *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_info_json_reports_build_and_device():
    info = json.loads(run_cli("info", "--json"))
    assert info["moespec"] == moespec.__version__
    assert info["cuda_kernels_compiled"] == _cuda.cuda_compiled()
    assert info["cuda_archs"] == _cuda.compiled_archs()
    assert info["kernel_backend"] == _cuda.backend() in ("cuda", "emu", "none")
    if info["kernel_backend"] == "emu":  # an emulation build has kernels, but none for a GPU
        assert not info["cuda_kernels_compiled"] and not info["kernels_usable"]
        assert "emulator" in info["why_not"]
    assert isinstance(info["gpu_visible"], bool)
    assert info["expert_kernels"] == (os.environ.get("MOESPEC_KERNELS") or "v1")
    if not info["kernels_usable"]:
        assert info["why_not"]


def test_info_reports_the_kernel_generation():
    env = dict(os.environ, MOESPEC_KERNELS="v2")
    out = subprocess.run([sys.executable, "-m", "moespec", "info", "--json"], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["expert_kernels"] == "v2"
    env["MOESPEC_KERNELS"] = "v9"  # a bad setting is reported, not a crash
    out = subprocess.run([sys.executable, "-m", "moespec", "info", "--json"], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert "MOESPEC_KERNELS" in json.loads(out.stdout)["expert_kernels"]


def test_info_table():
    out = run_cli("info")
    assert "cuda_kernels_compiled" in out and "torch" in out


def test_demo_writes_consistent_rows(tmp_path):
    path = tmp_path / "demo.json"
    out = run_cli("demo", "--tokens", "12", "--seed", "3", "--json", str(path))
    assert "budget" in out
    rows = json.loads(path.read_text())["rows"]
    base = rows[0]
    assert base["budget"] is None and base["output_rel_err"] == 0.0 and base["kept"] == base["union"]
    for row in rows[1:]:
        assert row["kept"] <= max(row["budget"], 0) and row["kept"] <= row["union"]
        if row["budget"] >= row["union"]:
            assert row["output_rel_err"] == 0.0
        else:
            assert row["output_rel_err"] > 0.0


def test_bad_arguments_exit_nonzero():
    out = subprocess.run([sys.executable, "-m", "moespec", "demo", "--tokens", "zero"], capture_output=True, text=True)
    assert out.returncode == 2 and "argument --tokens" in out.stderr and "'zero'" in out.stderr
    out = subprocess.run([sys.executable, "-m", "moespec"], capture_output=True, text=True)
    assert out.returncode != 0


def test_ci_build_compiled_the_cuda_sources():
    """CI builds with MOESPEC_CUDA=ON: the extension must then carry the kernels for sm_80 and sm_90a."""
    if os.environ.get("MOESPEC_CUDA", "").upper() != "ON":
        import pytest

        pytest.skip("not a MOESPEC_CUDA=ON build")
    assert _cuda.cuda_compiled()
    assert _cuda.compiled_archs() == ["80", "90a"]


def test_readme_demo_table_is_what_demo_prints():
    """README's demo table is `moespec demo`'s default table, row for row."""
    import contextlib
    import io
    import pathlib

    from moespec.demo import demo_table, run_demo

    with contextlib.redirect_stdout(io.StringIO()):
        rows = run_demo(tokens=16, seed=0, zipf=1.0)
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert demo_table(rows, markdown=True) in readme
