#!/usr/bin/env python3
"""Static resource check of moespec's CUDA kernels (registers, shared memory, local-memory spills).

Compiles every ``csrc/*.cu`` to a cubin per architecture with ``nvcc -Xptxas -v`` (no host code, no
link, no GPU needed), parses ptxas's per-function report and

* fails (exit 1) when any function spills to local memory (spill stores or loads > 0), naming them;
* with ``--write``, rewrites ``docs/kernel-resources.md``: one row per kernel and architecture. Rows of
  architectures not compiled in this run are kept from the existing file, so a build for one GPU
  refreshes its own rows only;
* with ``--check``, also fails when the checked-in table differs from what ``--write`` would write.

The CMake build runs it (cmake/kernel_resources.cmake, option MOESPEC_RESOURCE_CHECK) after every change
to the CUDA sources. By hand, from the repository root:

    python tools/kernel_resources.py --write            # sm_80 and sm_90a, refresh the table
    python tools/kernel_resources.py --check            # CI: spills or a stale table fail

Exit codes: 0 clean, 1 spills or a stale table, 2 a compile or usage error. Python stdlib only.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import difflib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ARCHS = "80,90a"
MD_PATH = ROOT / "docs" / "kernel-resources.md"
# The flags of the moespec_cuda target that matter to code generation (CMakeLists.txt). MOESPEC_EMU
# (the CPU emulation of device code) is never defined here: the table is about real SASS.
BASE_FLAGS = ["-std=c++17", "--expt-relaxed-constexpr", "-O3", "-Xptxas", "-v"]
TABLE_HEAD = ("| file | kernel | arch | registers | static smem (B) | stack (B) | spill stores (B) "
              "| spill loads (B) |")
TABLE_RULE = "|---|---|---|---:|---:|---:|---:|---:|"


@dataclass
class Func:
    mangled: str
    arch: str
    file: str
    entry: bool = False
    registers: int = 0
    smem: int = 0
    cmem: str = ""
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    name: str = ""  # demangled and shortened

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0


# ----------------------------------------------------------------------------- compile + parse

_RE_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_RE_PROPS = re.compile(r"Function properties for (\S+)")
_RE_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_RE_USED = re.compile(r"Used (\d+) registers")
_RE_SMEM = re.compile(r"(\d+) bytes smem")
_RE_CMEM = re.compile(r"(\d+) bytes (cmem\[\d+\])")


def parse_ptxas(text: str, arch: str, file: str) -> list[Func]:
    """Per-function resources from ptxas -v output (entries and non-inlined device functions)."""
    funcs: dict[str, Func] = {}
    current: Func | None = None  # the function the next "Used ..." / frame line belongs to

    def get(name: str) -> Func:
        if name not in funcs:
            funcs[name] = Func(name, arch, file)
        return funcs[name]

    for line in text.splitlines():
        m = _RE_ENTRY.search(line)
        if m:
            current = get(m.group(1))
            current.entry = True
            continue
        m = _RE_PROPS.search(line)
        if m:
            current = get(m.group(1))
            continue
        m = _RE_FRAME.search(line)
        if m and current is not None:
            current.stack, current.spill_stores, current.spill_loads = map(int, m.groups())
            continue
        m = _RE_USED.search(line)
        if m and current is not None:
            current.registers = int(m.group(1))
            s = _RE_SMEM.search(line)
            current.smem = int(s.group(1)) if s else 0
            current.cmem = ", ".join(f"{n} {k}" for n, k in _RE_CMEM.findall(line))
    return list(funcs.values())


def norm_arch(a: str) -> str:
    """'80', 'sm_80', '80-real', 'compute_90a' -> '80' / '90a'."""
    a = a.strip().lower()
    a = re.sub(r"^(sm_|compute_)", "", a)
    a = re.sub(r"-(real|virtual)$", "", a)
    if not re.fullmatch(r"\d+[a-z]?", a):
        raise ValueError(f"bad architecture {a!r} (expected e.g. 80, 90a, sm_90a, 80-real)")
    return a


def compile_one(nvcc: str, src: Path, arch: str, out_dir: Path, extra: list[str]) -> tuple[str, str, int, str]:
    cubin = out_dir / f"{src.stem}.sm_{arch}.cubin"
    cmd = [nvcc, "-gencode", f"arch=compute_{arch},code=sm_{arch}", *BASE_FLAGS,
           f"-I{ROOT / 'csrc' / 'include'}", *extra, "-cubin", "-o", str(cubin), str(src)]
    p = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return src.name, arch, p.returncode, " ".join(cmd) + "\n" + p.stdout


def find_demangler(nvcc: str) -> list[str] | None:
    here = Path(nvcc).resolve().parent if os.path.sep in nvcc else None
    for cand in ([str(here / "cu++filt")] if here else []) + ["cu++filt", "c++filt"]:
        path = shutil.which(cand)
        if path:
            return [path]
    return None


def demangle(names: list[str], tool: list[str] | None) -> dict[str, str]:
    if not names or tool is None:
        return {n: n for n in names}
    p = subprocess.run(tool, input="\n".join(names) + "\n", stdout=subprocess.PIPE, text=True)
    out = p.stdout.splitlines()
    if p.returncode != 0 or len(out) != len(names):
        return {n: n for n in names}
    return dict(zip(names, out))


def _strip_args(sig: str) -> str:
    """Drop the trailing '(...)' parameter list (balanced), if any."""
    if not sig.endswith(")"):
        return sig
    depth = 0
    for i in range(len(sig) - 1, -1, -1):
        depth += {")": 1, "(": -1}.get(sig[i], 0)
        if depth == 0:
            return sig[:i]
    return sig


_RE_TEMPLATE_KERNEL = re.compile(
    r"template\s*<([^<>]*)>\s*__global__(?:\s+__launch_bounds__\s*\([^()]*\)|\s+[\w:]+)*?"
    r"\s+(?!__launch_bounds__)(\w+)\s*\(")


def kernel_template_params() -> dict[str, list[str]]:
    """Template parameter names of the __global__ templates in csrc ('gemm1_swiglu_kernel' -> ['BF16', 'TRANS'])."""
    names: dict[str, list[str]] = {}
    for path in sorted((ROOT / "csrc").glob("*.cu")) + sorted((ROOT / "csrc" / "include").rglob("*.cuh")):
        for params, kernel in _RE_TEMPLATE_KERNEL.findall(path.read_text(errors="replace")):
            decls = [d.split("=")[0].strip() for d in params.split(",")]
            ids = [re.findall(r"\w+", d)[-1] if re.findall(r"\w+", d) else "" for d in decls]
            if all(ids):
                names.setdefault(kernel, ids)
    return names


def shorten(demangled: str, params: dict[str, list[str]] | None = None) -> str:
    """'void moespec::experts::k<false, true>(moespec::experts::P)' -> 'experts::k<BF16=false, TRANS=true>(experts::P)'."""
    s = re.sub(r"^void ", "", demangled)  # kernels return void
    s = s.replace("moespec::", "")
    m = re.match(r"^([\w:]*?)(\w+)<([^<>()]*)>(.*)$", s)
    if m and params and m.group(2) in params:
        args = [a.strip() for a in m.group(3).split(",")]
        if len(args) == len(params[m.group(2)]):
            named = ", ".join(f"{n}={a}" for n, a in zip(params[m.group(2)], args))
            s = f"{m.group(1)}{m.group(2)}<{named}>{m.group(4)}"
    return s


def name_functions(funcs: list[Func], tool: list[str] | None) -> None:
    full = demangle(sorted({f.mangled for f in funcs}), tool)
    params = kernel_template_params()
    for f in funcs:
        f.name = shorten(full[f.mangled], params)
    # Without the parameter list unless that makes two functions of one file look alike (overloads).
    groups: dict[tuple[str, str, str], set[str]] = {}
    for f in funcs:
        groups.setdefault((f.file, f.arch, _strip_args(f.name)), set()).add(f.name)
    for f in funcs:
        if len(groups[(f.file, f.arch, _strip_args(f.name))]) == 1:
            f.name = _strip_args(f.name)


# ----------------------------------------------------------------------------- markdown


def nvcc_version(nvcc: str) -> str:
    try:
        out = subprocess.run([nvcc, "--version"], stdout=subprocess.PIPE, text=True).stdout
    except OSError:
        return "unknown"
    m = re.search(r"release ([\d.]+), (V[\d.]+)", out)
    return f"CUDA {m.group(1)} ({m.group(2)})" if m else "unknown"


def _arch_key(arch: str) -> tuple[int, str]:
    m = re.match(r"(\d+)(\w*)", arch)
    return (int(m.group(1)), m.group(2)) if m else (0, arch)


def _row_arch(row: str) -> str:
    cells = [c.strip() for c in row.strip().strip("|").split("|")]
    return cells[2].replace("`", "").removeprefix("sm_") if len(cells) >= 3 else ""


def _row_key(row: str) -> tuple:
    cells = [c.strip() for c in row.strip().strip("|").split("|")]
    return (cells[0], cells[1], _arch_key(_row_arch(row))) if len(cells) >= 3 else (row,)


def existing_rows(md: str) -> list[str]:
    rows, in_table = [], False
    for line in md.splitlines():
        if line.startswith(TABLE_HEAD[:20]):
            in_table = True
            continue
        if in_table:
            if not line.startswith("|"):
                break
            if not line.startswith("|---"):
                rows.append(line)
    return rows


def render(funcs: list[Func], archs: list[str], keep_rows: list[str], version: str) -> str:
    rows = [f"| {f.file} | `{f.name}`{'' if f.entry else ' (device function)'} | sm_{f.arch} | {f.registers} | {f.smem} | {f.stack} | "
            f"{f.spill_stores} | {f.spill_loads} |" for f in funcs if f.entry or f.spills]
    rows += [r for r in keep_rows if _row_arch(r) not in archs]
    rows.sort(key=_row_key)
    all_archs = sorted({_row_arch(r) for r in rows}, key=_arch_key)
    lines = [
        "# CUDA kernel resources",
        "",
        "Registers, static shared memory, stack frame and local-memory spills of every kernel in `csrc/*.cu`,",
        "as reported by `ptxas -v` for " + ", ".join(f"sm_{a}" for a in all_archs) + ".",
        "Generated by `tools/kernel_resources.py`; do not edit by hand. A CUDA build refreshes it (CMake option",
        "`MOESPEC_RESOURCE_CHECK`, on by default) and fails when a kernel spills to local memory; rows of",
        "architectures a build did not compile are kept as they were. To regenerate, from the repository root:",
        "",
        "    python tools/kernel_resources.py --write",
        "",
        "Static smem excludes the dynamic shared memory a kernel is launched with (the expert GEMMs' tile",
        "pipeline); stack is the per-thread stack frame. Spill columns must stay 0.",
        f"Last written with nvcc {version}, flags `{' '.join(BASE_FLAGS[:-2])}`.",
        "",
        TABLE_HEAD,
        TABLE_RULE,
        *rows,
        "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help=f"rewrite {MD_PATH.relative_to(ROOT)}")
    ap.add_argument("--check", action="store_true",
                    help="also fail when the checked-in table differs from what --write would write")
    ap.add_argument("--nvcc", default=None, help="nvcc to use (default: $CUDA_HOME/bin, PATH, /usr/local/cuda/bin)")
    ap.add_argument("--archs", default=DEFAULT_ARCHS,
                    help=f"comma or semicolon list of architectures (default {DEFAULT_ARCHS})")
    ap.add_argument("--jobs", type=int, default=2, help="parallel nvcc processes (default 2)")
    ap.add_argument("--out-dir", default=None, help="scratch folder for the cubins (default: a temporary one)")
    ap.add_argument("--md", default=str(MD_PATH), help="the Markdown table (default docs/kernel-resources.md)")
    ap.add_argument("-D", "--define", action="append", default=[], metavar="NAME[=VALUE]",
                    help="extra preprocessor definition, as the build passes it (repeatable)")
    ap.add_argument("-I", "--include-dir", action="append", default=[], metavar="DIR",
                    help="extra include folder (repeatable)")
    ap.add_argument("--ccbin", default=None, help="host compiler for nvcc (-ccbin)")
    ap.add_argument("-q", "--quiet", action="store_true", help="print only failures and the summary line")
    args = ap.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # keep stdout and stderr in order in build logs

    try:
        archs = list(dict.fromkeys(norm_arch(a) for a in re.split(r"[,;\s]+", args.archs) if a.strip()))
    except ValueError as e:
        ap.error(str(e))
    if not archs:
        ap.error("--archs is empty")
    if any(d.split("=")[0] == "MOESPEC_EMU" for d in args.define):
        ap.error("MOESPEC_EMU is the CPU emulation of device code; the resource check is about real SASS")

    nvcc = args.nvcc
    if nvcc is None:
        cands = [os.path.join(os.environ[v], "bin", "nvcc") for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
        cands += [shutil.which("nvcc") or "", "/usr/local/cuda/bin/nvcc"]
        nvcc = next((c for c in cands if c and os.access(c, os.X_OK)), None)
    if not nvcc or not (os.access(nvcc, os.X_OK) or shutil.which(nvcc)):
        print("kernel_resources: nvcc not found (pass --nvcc PATH or put it on PATH)", file=sys.stderr)
        return 2

    sources = sorted((ROOT / "csrc").glob("*.cu"))
    if not sources:
        print("kernel_resources: no csrc/*.cu files", file=sys.stderr)
        return 2
    extra = [f"-D{d}" for d in args.define] + [f"-I{d}" for d in args.include_dir]
    if args.ccbin:
        extra += ["-ccbin", args.ccbin]

    t0 = time.monotonic()
    tmp = None
    if args.out_dir:
        out_dir = Path(args.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="moespec-kres-")
        out_dir = Path(tmp.name)
    try:
        jobs = [(src, a) for src in sources for a in archs]
        # Longest compiles first (the expert GEMMs), so the parallel tail stays short.
        jobs.sort(key=lambda j: -j[0].stat().st_size)
        results = []
        with cf.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as ex:
            futs = [ex.submit(compile_one, nvcc, src, a, out_dir, extra) for src, a in jobs]
            for fut in cf.as_completed(futs):
                results.append(fut.result())
    finally:
        if tmp is not None:
            tmp.cleanup()

    failed = [r for r in results if r[2] != 0]
    if failed:
        for name, arch, rc, log in failed:
            print(f"kernel_resources: nvcc failed for {name} sm_{arch} (exit {rc}):\n{log}", file=sys.stderr)
        return 2

    funcs: list[Func] = []
    for name, arch, _, log in results:
        funcs += parse_ptxas(log, arch, name)
    name_functions(funcs, find_demangler(nvcc))
    funcs.sort(key=lambda f: (f.file, f.name, _arch_key(f.arch)))
    elapsed = time.monotonic() - t0

    if not args.quiet:
        w = max((len(f.name) for f in funcs), default=10)
        print(f"{'kernel':<{w}}  arch     regs  smem  stack  spill st/ld  ({'; '.join(sorted({f.file for f in funcs}))})")
        for f in funcs:
            print(f"{f.name:<{w}}  sm_{f.arch:<5} {f.registers:4d} {f.smem:5d} {f.stack:6d}  "
                  f"{f.spill_stores:5d}/{f.spill_loads:<5d}{'' if f.entry else '  (device function)'}")

    rc = 0
    md_path = Path(args.md)
    old = md_path.read_text() if md_path.exists() else ""
    new = render(funcs, archs, existing_rows(old), nvcc_version(nvcc))
    if args.check and new != old:
        rel = os.path.relpath(md_path, ROOT)
        print(f"kernel_resources: {rel} is out of date; run `python tools/kernel_resources.py --write` "
              "and commit it:", file=sys.stderr)
        sys.stderr.writelines(difflib.unified_diff(old.splitlines(True), new.splitlines(True),
                                                   f"{rel} (checked in)", f"{rel} (now)"))
        rc = 1
    if args.write and new != old:
        try:
            md_path.parent.mkdir(parents=True, exist_ok=True)
            md_path.write_text(new)
            print(f"kernel_resources: wrote {os.path.relpath(md_path, ROOT)}")
        except OSError as e:  # a read-only source tree must not fail the build; spills still do
            print(f"kernel_resources: warning: could not write {md_path}: {e}", file=sys.stderr)

    spills = [f for f in funcs if f.spills]
    if spills:
        print("kernel_resources: LOCAL-MEMORY SPILLS (reduce register pressure, or change __launch_bounds__):",
              file=sys.stderr)
        for f in spills:
            print(f"  {f.file}: {f.name} sm_{f.arch}: {f.spill_stores} bytes spill stores, "
                  f"{f.spill_loads} bytes spill loads ({f.registers} registers, {f.stack} bytes stack)",
                  file=sys.stderr)
        rc = 1
    kernels = [f for f in funcs if f.entry]
    top = max(kernels, key=lambda f: f.registers, default=None)
    print(f"kernel_resources: {len({f.name for f in kernels})} kernels x sm_{', sm_'.join(archs)} from "
          f"{len(sources)} files in "
          f"{elapsed:.1f} s; {len(spills)} with spills"
          + (f"; most registers {top.registers} ({top.name}, sm_{top.arch})" if top else ""))
    return rc


if __name__ == "__main__":
    sys.exit(main())
