"""Proof that the emulated kernel tests bite: inject known kernel bugs, one at a time, and show
that each makes the emulated tests fail.

    python tests/kernel_mutations.py                 # every mutation, Markdown table on stdout
    python tests/kernel_mutations.py --only opt_in   # some of them (comma-separated names)
    python tests/kernel_mutations.py --list

Each mutation is an exact text edit of the kernel sources in a scratch copy of this checkout
(the edit must match exactly once, so a stale mutation fails loudly instead of testing nothing).
The copy is built once as an emulation build (cmake + ninja, MOESPEC_CUDA=EMU; later builds are
incremental) and the emulated kernel tests run against it with ``pytest -x`` in a Python whose
``site`` is off (``python -S``), so an installed moespec cannot shadow the mutated one. The
unmutated copy runs first and must pass, otherwise the table would mean nothing.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ["tests/test_cuda_kernels.py", "tests/test_kernel_edge_cases.py", "tests/test_routing_plan_v2.py",
         "tests/test_experts_v2_worklist.py",
         "tests/test_emu.py"]


@dataclass(frozen=True)
class Mutation:
    name: str
    what: str
    path: str
    old: str
    new: str


EXPERTS = "csrc/include/moespec/experts.cuh"
EXPERTS_V2 = "csrc/include/moespec/experts_v2.cuh"
ROUTING = "csrc/include/moespec/routing.cuh"
ROUTING_V2 = "csrc/include/moespec/routing_v2.cuh"
MUTATIONS = [
    Mutation("cp_async_wait", "weaker cp.async wait (one more group left in flight)", EXPERTS,
             "cp_async_wait<kStages - 2>();", "cp_async_wait<kStages - 1>();"),
    Mutation("no_syncthreads", "removed __syncthreads after a pipeline stage lands", EXPERTS,
             "    __syncthreads();  // stage kt landed for everyone", "    // (barrier removed)"),
    Mutation("swap_a_frag", "swapped A-fragment registers a1 and a2", EXPERTS,
             "          af[mf][1] = ld_u32(a + r1 * kPadK + c);\n          af[mf][2] = ld_u32(a + r0 * kPadK + c + 8);",
             "          af[mf][2] = ld_u32(a + r1 * kPadK + c);\n          af[mf][1] = ld_u32(a + r0 * kPadK + c + 8);"),
    Mutation("b_k_offset", "wrong k offset of the second B register (k+4 instead of k+8)", EXPERTS,
             "b1 = ld_u32(bp + 8);", "b1 = ld_u32(bp + 4);"),
    Mutation("zero_fill", "cp.async zero-fill ignored (tails read real memory)", EXPERTS,
             "const int n = pred ? 16 : 0;", "const int n = 16;"),
    Mutation("routing_barrier", "removed the routing plan's barrier before the ranking reads the union", ROUTING,
             "  __syncthreads();  // s_union complete before the ranking reads it", "  // (barrier removed)"),
    Mutation("candidates_ignored", "the routing plan ranks the union whatever the candidates flag says", ROUTING,
             "const bool all_cand = p.all_candidates != 0;", "const bool all_cand = false;"),
    Mutation("opt_in", "shared-memory opt-in done for the first GEMM kernel only", "csrc/experts.cu",
             "if (err == cudaSuccess) err = allow_smem<k2>(smem);", "if (err == cudaSuccess) err = allow_smem<k1>(smem);"),
    Mutation("s_brow_tail", "v1 GEMM1: the unused tail of the static shared s_brow left unwritten (template static shared memory)",
             EXPERTS, "s_brow[n] = n < nrows ? p.x + (int64_t)p.pair_token[p0 + nb + n] * p.x_stride : nullptr;",
             "if (n < nrows) s_brow[n] = p.x + (int64_t)p.pair_token[p0 + nb + n] * p.x_stride;"),
    Mutation("v2_cp_async_wait", "v2: weaker cp.async wait in the persistent ring", EXPERTS_V2,
             "experts::cp_async_wait<kStages - 2>();", "experts::cp_async_wait<kStages - 1>();"),
    Mutation("v2_h_tail", "v2: h columns of a one-pass slice left unwritten", EXPERTS_V2,
             "if (pc.passes == 1) hdst[r * hld + ii + experts::kGateUpTile] = 0;", "(void)hld;"),
    Mutation("v2_bias_every_slice", "v2: b_down added by every I-slice instead of the first", EXPERTS_V2,
             "(p.b_down != nullptr && pc.slice == 0)", "(p.b_down != nullptr)"),
    Mutation("pdl_no_wait", "v2 experts launched as a PDL dependent without griddepcontrol.wait", EXPERTS_V2,
             "  griddep_wait();  // launched as a PDL dependent", "  // (wait removed)"),
    Mutation("plan_v2_ticket", "v2 plan: off-by-one last-CTA ticket (the tail runs before the last CTA arrived)",
             ROUTING_V2, "atomicAdd(q.sync, 1) == (int)gridDim.x - 1", "atomicAdd(q.sync, 1) == (int)gridDim.x - 2"),
    Mutation("plan_v2_no_reset", "v2 plan: the tail does not reset the ticket (a reused plan never runs its tail)",
             ROUTING_V2, "    q.sync[0] = 0;  // every CTA has arrived", "    // (ticket not reset)"),
    Mutation("plan_v2_dup_ignored", "v2 plan: topk scores summed per token even when a token repeats an id",
             ROUTING_V2, "(p.score_mode == kScoreTopk && !s_dup)", "(p.score_mode == kScoreTopk)"),
    Mutation("plan_v2_rank_split", "v2 plan: the split ranking drops one step of its lane reduction", ROUTING_V2,
             "for (int off = R / 2; off > 0; off >>= 1) r +=", "for (int off = R / 4; off > 0; off >>= 1) r +="),
    # Stream-K (the split of items across CTAs).
    Mutation("v2_skip_unit", "v2 stream-K: a CTA skips the first unit of its share", EXPERTS_V2,
             "units_in(nc, rt2, kt1, my_lo - P, my_hi - P, &ua, &ub, &ra, &rb);",
             "units_in(nc, rt2, kt1, my_lo - P + (blockIdx.x > 0), my_hi - P, &ua, &ub, &ra, &rb);"),
    Mutation("v2_h_unit_unwritten", "v2 stream-K: a split pass publishes its last 8 h columns without writing them",
             EXPERTS_V2, "if (ci < c0 || ci >= c1) continue;", "if (ci < c0 || ci >= c1 - (pc.whole ? 0 : 8)) continue;"),
    Mutation("v2_piece_slots", "v2 ring across pieces: too few piece descriptors (one overwritten while in use)",
             EXPERTS_V2, "constexpr int kPieceSlots = kStages + 1;", "constexpr int kPieceSlots = 2;"),
    Mutation("v2_ring_tokens", "v2 ring across pieces: a stage of the next piece loads the current piece's tokens",
             EXPERTS_V2, "p.x + (int64_t)p.pair_token[lp.p0 + r] * p.x_stride + kg",
             "p.x + (int64_t)p.pair_token[s_piece[0].p0 + r] * p.x_stride + kg"),
    Mutation("v2_h_no_wait", "v2 stream-K: row tiles of a split item do not wait for its h", EXPERTS_V2,
             "if (tid == 0) s_flag = flag_wait_bits(h_flags + pc.slot, need, wait_ns);", "if (tid == 0) s_flag = need;"),
    Mutation("v2_h_wait_early", "v2 stream-K: row tiles wait for the first pass's h only (wrong order)", EXPERTS_V2,
             "const int need = unit_bits(0, 8 * pc.passes);", "const int need = unit_bits(0, 8);"),
    Mutation("v2_h_publish", "v2 stream-K: a pass publishes one 8-column unit of h too few (a missing arrival: "
             "every wait on it times out)", EXPERTS_V2,
             "flag_or_release(h_flags + pc.slot, unit_bits(pc.ua > 8 * pass ? pc.ua : 8 * pass,",
             "flag_or_release(h_flags + pc.slot, unit_bits(1 + (pc.ua > 8 * pass ? pc.ua : 8 * pass),"),
    Mutation("v2_recompute_part", "v2 bounded wait: a timed-out piece recomputes only its item's second pass of h",
             EXPERTS_V2, "pc.ua = 0, pc.ub = 8 * pc.passes, pc.whole = 1, pc.redo = 1;",
             "pc.ua = 8, pc.ub = 8 * pc.passes, pc.whole = 1, pc.redo = 1;"),
    # The combine kernel (the parallel reduction).
    Mutation("v2_combine_no_reset", "v2 combine: the stream-K flags not zeroed for the next launch", EXPERTS_V2,
             "for (int64_t i = tid; i < counters_zeroed(expert_grid); i += kCombineThreads) p.counters[i] = 0;",
             "(void)0;"),
    Mutation("v2_accum_no_reset", "v2 combine: the atomic accumulator not zeroed for the next launch", EXPERTS_V2,
             "*row = float4{0.f, 0.f, 0.f, 0.f};  // every contribution is in", "(void)row;  // (not zeroed)"),
    Mutation("v2_combine_chunk", "v2 combine: the last chunk of an output's slices dropped when threads share them",
             EXPERTS_V2, "for (int q = 0; q < split; ++q)", "for (int q = 0; q < split - 1; ++q)"),
    Mutation("v2_combine_no_wait", "v2 combine launched as a PDL dependent without griddepcontrol.wait", EXPERTS_V2,
             "  griddep_wait();  // the expert kernel has completed", "  // (wait removed)"),
    # Items of up to 64 tokens (both 32-token blocks per weight stage).
    Mutation("v2_wide_b_tokens", "v2 64-token items: the second token block's B tile loaded from the first block's tokens",
             EXPERTS_V2, "p.x + (int64_t)p.pair_token[lp.p0 + r] * p.x_stride + kg",
             "p.x + (int64_t)p.pair_token[lp.p0 + (r & 31)] * p.x_stride + kg"),
    Mutation("v2_wide_out_unwritten", "v2 64-token items: the second token block's partials not written",
             EXPERTS_V2, "if (r < pc.nrows) {", "if (r < pc.nrows && r < 32) {"),
]


def copy_tree(dst: Path) -> None:
    """Tracked and untracked-but-not-ignored files of the checkout (what CI would see)."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


def build(src: Path, build_dir: Path) -> tuple[bool, str]:
    if not (build_dir / "build.ninja").exists():
        import pybind11

        cfg = ["cmake", "-S", str(src), "-B", str(build_dir), "-G", "Ninja", "-DMOESPEC_CUDA=EMU",
               "-DCMAKE_BUILD_TYPE=Release", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
               f"-DPython_EXECUTABLE={sys.executable}"]
        r = subprocess.run(cfg, capture_output=True, text=True)
        if r.returncode:
            return False, r.stdout[-2000:] + r.stderr[-2000:]
    r = subprocess.run(["ninja", "-C", str(build_dir), "_C"], capture_output=True, text=True)
    if r.returncode:
        return False, r.stdout[-3000:]
    for so in build_dir.glob("_C*.so"):
        shutil.copy2(so, src / "python" / "moespec" / so.name)
    return True, ""


def run_tests(src: Path, timeout: int) -> tuple[str, str]:
    """Returns (outcome, detail): outcome "pass", "fail" or "timeout"."""
    site = sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(src / "python"), *dict.fromkeys(site)]),
               PYTHONDONTWRITEBYTECODE="1")
    env.pop("MOESPEC_EMU_SEED", None)
    tests = [t for t in TESTS if (src / t).exists()]
    cmd = [sys.executable, "-S", "-m", "pytest", "-x", "-q", "-m", "emu and not emu_full", "-p", "no:cacheprovider",
           *tests]
    try:
        r = subprocess.run(cmd, cwd=src, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", f"no result within {timeout} s"
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    if r.returncode == 0:
        return "pass", lines[-1] if lines else ""
    failed = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))]
    return "fail", (failed[0] if failed else (lines[-1] if lines else r.stderr[-300:]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated mutation names")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--skip-baseline", action="store_true", help="do not run the unmutated tests first")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per test run")
    ap.add_argument("--keep", action="store_true", help="keep the scratch copy")
    args = ap.parse_args(argv)
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name:16} {m.what}")
        return 0
    chosen = MUTATIONS
    if args.only:
        names = set(args.only.split(","))
        unknown = names - {m.name for m in MUTATIONS}
        if unknown:
            ap.error(f"unknown mutations: {sorted(unknown)}")
        chosen = [m for m in MUTATIONS if m.name in names]

    scratch = Path(tempfile.mkdtemp(prefix="moespec-mutants-"))
    src, build_dir = scratch / "src", scratch / "build"
    copy_tree(src)
    rows = []
    try:
        if not args.skip_baseline:
            t0 = time.time()
            ok, log = build(src, build_dir)
            if not ok:
                print(f"baseline build failed:\n{log}", file=sys.stderr)
                return 2
            outcome, detail = run_tests(src, args.timeout)
            print(f"baseline: {outcome} in {time.time() - t0:.0f} s ({detail})", file=sys.stderr)
            if outcome != "pass":
                print("the unmutated kernels must pass first", file=sys.stderr)
                return 2
        for m in chosen:
            path = src / m.path
            original = path.read_text()
            count = original.count(m.old)
            if count != 1:
                rows.append((m, "stale", f"the edit matches {count} times"))
                continue
            path.write_text(original.replace(m.old, m.new))
            t0 = time.time()
            try:
                ok, log = build(src, build_dir)
                if not ok:
                    rows.append((m, "no build", log.strip().splitlines()[-1] if log.strip() else "?"))
                    continue
                outcome, detail = run_tests(src, args.timeout)
                verdict = {"fail": "caught", "timeout": "caught (hang)", "pass": "MISSED"}[outcome]
                rows.append((m, verdict, f"{detail} ({time.time() - t0:.0f} s)"))
            finally:
                path.write_text(original)
            print(f"{m.name}: {rows[-1][1]}", file=sys.stderr)
    finally:
        if args.keep:
            print(f"scratch copy kept in {scratch}", file=sys.stderr)
        else:
            shutil.rmtree(scratch, ignore_errors=True)

    print("| mutation | injected bug | result | first failing test |")
    print("|---|---|---|---|")
    for m, verdict, detail in rows:
        print(f"| `{m.name}` | {m.what} | {verdict} | {detail.replace('|', '/')} |")
    return 0 if all(v.startswith("caught") for _, v, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
