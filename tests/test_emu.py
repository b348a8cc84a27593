"""The CPU emulator of the CUDA kernels (csrc/emu), tested on its own through ``moespec._C``.

Only in an emulation build (``MOESPEC_CUDA=EMU``); marked ``emu``. What is checked:

- ``emu_selftest_mma``: the warp-wide mma.m16n8k16 (bf16 and fp16) against a float64 matrix
  product, and with single non-zero A / B / C elements, so that any fragment-position mistake shows;
- ``emu_selftest(name)``: every scenario of csrc/emu/selftest.cpp (barriers, poison, warp
  collectives, cp.async, launch checks, seeded block / thread order, co-resident blocks, static
  shared memory of template kernels). Scenarios that must fail
  with a deadlock or a collective error are first run in a subprocess with a timeout, so an
  emulator that hangs instead fails here;
- the 16-bit conversions ``emu_to_bf16 / emu_to_half / emu_from_bf16 / emu_from_half`` bitwise
  against torch (round to nearest even, subnormals, ties, overflow, inf; NaN stays NaN).
"""
from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap

import pytest
import torch

from moespec import _cuda

pytestmark = [
    pytest.mark.emu,
    pytest.mark.skipif(not _cuda.emu_compiled(),
                       reason=f"not an emulation build (moespec backend: {_cuda.backend()}; MOESPEC_CUDA=EMU)"),
]

C = _cuda._C
UNWRITTEN = -7  # what emu_selftest reports for values a scenario never wrote
POISON = -1  # a 0xFF-poisoned int


@pytest.fixture(autouse=True)
def _restore_emu_seed():
    """These tests set the scheduling seed themselves; put the previous one back afterwards."""
    before = C.emu_seed()
    yield
    C.emu_set_seed(before)


def _run(name, seed=None):
    if seed is not None:
        C.emu_set_seed(seed)
    err, values = C.emu_selftest(name)
    assert len(values) == 512
    return err, list(values)


# ----------------------------------------------------------------------------- mma.sync m16n8k16

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _mma(kind, a, b, c):
    """D = A B + C through one emulated warp; A [16,16], B [16,8] 16-bit, C [16,8] fp32."""
    dt = _DTYPES[kind]
    a, b = a.to(dt).contiguous(), b.to(dt).contiguous()
    c = c.float().contiguous()
    d = torch.full((16, 8), float("nan"))
    C.emu_selftest_mma(kind == "bf16", a.data_ptr(), b.data_ptr(), c.data_ptr(), d.data_ptr())
    return d


@pytest.mark.parametrize("kind", list(_DTYPES))
@pytest.mark.parametrize("seed", range(6))
def test_mma_matches_float64_product(kind, seed):
    g = torch.Generator().manual_seed(1000 * seed + len(kind))
    scale = [1.0, 1e-3, 30.0, 1.0, 0.01, 4.0][seed]
    a = (torch.randn(16, 16, generator=g) * scale).to(_DTYPES[kind])
    b = (torch.randn(16, 8, generator=g) * scale).to(_DTYPES[kind])
    c = torch.randn(16, 8, generator=g) * scale * scale * (0 if seed == 3 else 1)
    d = _mma(kind, a, b, c)
    assert torch.isfinite(d).all()
    ref = a.double() @ b.double() + c.double()
    # fp32 accumulation of 16 exact products: a few fp32 roundings of the magnitudes involved.
    bound = 4 * 2.0 ** -24 * (a.double().abs() @ b.double().abs() + c.double().abs()) + 1e-45
    err = (d.double() - ref).abs()
    assert (err <= bound).all(), f"max error {float(err.max())}, bound there {float(bound.flatten()[err.argmax()])}"


@pytest.mark.parametrize("kind", list(_DTYPES))
def test_mma_fragment_positions(kind):
    """One non-zero element at a time: a misplaced fragment element moves or drops a value."""
    b_vals = (torch.arange(128, dtype=torch.float32) + 1).reshape(16, 8)  # exact in bf16 and fp16
    a_vals = (torch.arange(256, dtype=torch.float32) + 1).reshape(16, 16)
    zero_c = torch.zeros(16, 8)
    for m in range(16):
        for k in range(16):
            a = torch.zeros(16, 16)
            a[m, k] = 1.0
            d = _mma(kind, a, b_vals, zero_c)
            want = torch.zeros(16, 8)
            want[m] = b_vals[k]
            assert torch.equal(d, want), f"A[{m},{k}] = 1: row {m} must be B[{k}], the rest 0; got {d}"
    for k in range(16):
        for n in range(8):
            b = torch.zeros(16, 8)
            b[k, n] = 1.0
            d = _mma(kind, a_vals, b, zero_c)
            want = torch.zeros(16, 8)
            want[:, n] = a_vals[:, k]
            assert torch.equal(d, want), f"B[{k},{n}] = 1: column {n} must be A[:, {k}], the rest 0; got {d}"
    # C passes through unchanged (bitwise) when A B = 0, element by element.
    c = torch.randn(16, 8, generator=torch.Generator().manual_seed(7)) * 1e3
    assert torch.equal(_mma(kind, torch.zeros(16, 16), b_vals, c), c)
    assert torch.equal(_mma(kind, a_vals, torch.zeros(16, 8), c), c)


# ----------------------------------------------------------------------------- self-test scenarios

SEEDS = [1, 2, 3, 0xDEADBEEF, 2**63 + 5, 12345678901234]

# Scenarios that must end in an error a broken emulator could turn into a hang, and what the
# error must say.
FAILING = {
    "early_exit_barrier": ("deadlock", "__syncthreads"),
    "partial_mask": ("mask", "0x0000ffff"),
    "divergent_collective": ("divergent",),
    "warp_vs_block": ("deadlock", "__syncwarp", "__syncthreads"),
    "grid_barrier_oversubscribed": ("deadlock", "every resident block waits on a flag", "1 blocks not started"),
    "flag_never_set": ("deadlock", "blocks (0,0,0)"),
}

_SUBPROCESS = textwrap.dedent("""
    import importlib.util, json, sys
    spec = importlib.util.spec_from_file_location("moespec._C", sys.argv[1])
    C = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(C)
    out = {}
    for seed in (1, 2, 3):
        C.emu_set_seed(seed)
        for name in sys.argv[2:]:
            err, values = C.emu_selftest(name)
            out.setdefault(name, []).append(err)
        C.emu_set_seed(seed)
        out.setdefault("after", []).append(C.emu_selftest("barrier_ok"))
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def failing_in_subprocess():
    """Run the FAILING scenarios in a fresh process (only the extension is loaded, no torch) with
    a timeout: an emulator that hangs on them fails the tests instead of hanging the run."""
    try:
        proc = subprocess.run([sys.executable, "-c", _SUBPROCESS, C.__file__, *FAILING], capture_output=True,
                              text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("the emulator hung on a deadlock / collective-error scenario (no result within 120 s)")
    assert proc.returncode == 0, f"the scenarios crashed the process (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(FAILING))
def test_failing_scenarios_report_and_never_hang(name, failing_in_subprocess):
    for err in failing_in_subprocess[name]:
        assert err, f"{name} must fail"
        for word in FAILING[name]:
            assert word.lower() in err.lower(), f"{name}: {word!r} not in the error {err!r}"
    # The process still launches normally after the failed launches.
    for err, values in failing_in_subprocess["after"]:
        assert err == "" and values[:64] == [(t + 1) % 64 for t in range(64)]


def test_emulator_recovers_after_failed_launches(failing_in_subprocess):
    """In this process too (the subprocess showed none of these hangs): after every kind of failed
    launch, launches work again and see freshly poisoned shared memory."""
    del failing_in_subprocess
    for seed in SEEDS[:3]:
        for name in (*FAILING, "cp_async_misaligned", "dyn_smem_without_opt_in", "block_too_large",
                     "grid_y_too_large"):
            err, _ = _run(name, seed)
            assert err, name
            err, values = _run("barrier_ok")
            assert err == "" and values[:64] == [(t + 1) % 64 for t in range(64)], f"after {name}"
            err, values = _run("smem_poison")
            assert err == "" and values[:128] == [POISON] * 128, f"after {name}"


def test_barrier_ok():
    for seed in SEEDS:
        err, v = _run("barrier_ok", seed)
        assert err == ""
        assert v[:64] == [(t + 1) % 64 for t in range(64)]
        assert v[64:] == [UNWRITTEN] * (512 - 64)


def test_missing_barrier_shows_poison():
    """Without the barrier a thread may read its neighbour's word before it is written: shared
    memory then still holds the poison. Which threads do depends on the seeded thread order."""
    patterns = set()
    for seed in SEEDS:
        err, v = _run("missing_barrier", seed)
        assert err == ""
        for t in range(64):
            assert v[t] in ((t + 1) % 64, POISON), (seed, t, v[t])
        assert POISON in v[:64], f"seed {seed}: no thread read unwritten (poisoned) shared memory"
        patterns.add(tuple(x == POISON for x in v[:64]))
    assert len(patterns) > 1, "the thread order does not depend on the seed"


def test_shuffles_and_votes_exact():
    """64 threads (2 warps), value 10 * threadIdx.x; per thread: xor 5, up 3, down 7, idx 9,
    all(t < 40), any(lane == 31), ballot(lane % 3 == 0)."""
    ballot = sum(1 << lane for lane in range(0, 32, 3))
    for seed in SEEDS[:3]:
        err, v = _run("shuffles", seed)
        assert err == ""
        for t in range(64):
            w, lane = divmod(t, 32)
            base = 32 * w
            want = [
                10 * (base + (lane ^ 5)),
                10 * (base + (lane - 3 if lane >= 3 else lane)),
                10 * (base + (lane + 7 if lane + 7 < 32 else lane)),
                10 * (base + 9),
                1 if w == 0 else 0,
                1,
                ballot,
            ]
            assert v[7 * t:7 * t + 7] == want, (seed, t, v[7 * t:7 * t + 7], want)
        assert v[7 * 64:] == [UNWRITTEN] * (512 - 7 * 64)


def test_cp_async_lands_at_wait_group():
    """Each of 32 threads copies 16 bytes (even threads with zero-fill): the destination reads as
    poison right after the issue, as the data (or zeros) after wait_group; a neighbour's word read
    without a barrier is either still poison or already its data."""
    neighbour_states = set()
    for seed in SEEDS:
        err, v = _run("cp_async", seed)
        assert err == ""
        landed = [0 if t % 2 == 0 else 1000 + 4 * t for t in range(32)]
        for t in range(32):
            assert v[3 * t] == POISON, (seed, t, "before wait_group")
            assert v[3 * t + 1] == landed[t], (seed, t, "after wait_group")
            nb = v[3 * t + 2]
            assert nb in (POISON, landed[(t + 1) % 32]), (seed, t, "neighbour", nb)
            neighbour_states.add(nb == POISON)
        assert v[96:] == [UNWRITTEN] * (512 - 96)
    assert neighbour_states == {True, False}, "no seed showed both an in-flight and a landed neighbour"


def test_cp_async_misaligned_is_an_error():
    err, _ = _run("cp_async_misaligned", 1)
    assert "misaligned" in err and "illegal memory access" in err, err


def test_shared_memory_poisoned():
    for seed in SEEDS[:3]:
        err, v = _run("smem_poison", seed)
        assert err == ""
        assert v[:128] == [POISON] * 128, "static and dynamic shared memory must start as 0xFF bytes"
        assert v[128:] == [UNWRITTEN] * (512 - 128)


def test_template_kernel_static_shared_memory_poisoned():
    """A template kernel's __shared__ variables (GCC drops emu.h's section attribute in template
    instantiations; csrc/emu/shared.ld gathers them) start as 0xFF bytes in every block, whether
    the instantiation has external linkage (a COMDAT section, like the kernels') or internal
    linkage, and whether or not the variable's type depends on a template parameter. The blocks
    run one after another and write their shared memory after reading it, so a second block that
    is not poisoned again sees the first one's values."""
    for seed in SEEDS[:3]:
        err, v = _run("smem_poison_template", seed)
        assert err == ""
        for base, linkage in ((0, "external"), (256, "internal")):
            for b in range(2):
                got = v[base + b * 128:base + (b + 1) * 128]
                assert got == [POISON] * 128, (
                    f"seed {seed}: {linkage} linkage, block {b}: static shared memory of a template kernel "
                    f"is not poisoned (first values {sorted(set(got))[:4]})")


def test_dynamic_smem_needs_opt_in():
    err, v = _run("dyn_smem_without_opt_in", 1)
    assert "smem_user_c" in err and "65536" in err and "cudaFuncAttributeMaxDynamicSharedMemorySize" in err, err
    assert v == [UNWRITTEN] * 512, "a rejected launch must not run"


def test_dynamic_smem_opt_in_is_per_kernel():
    """Opting in one kernel must not let another kernel of the same function type use more."""
    err, v = _run("dyn_smem_opt_in_per_kernel", 1)
    assert err, "the kernel that never opted in must be rejected"
    assert not err.startswith("opted-in kernel failed"), err
    assert "smem_user_b" in err and "98304" in err and "cudaFuncAttributeMaxDynamicSharedMemorySize" in err, err
    assert v[0] == 1 and v[1:] == [UNWRITTEN] * 511, "the opted-in kernel runs, the other does not"


@pytest.mark.parametrize("name,words", [("block_too_large", ("2048", "exceeds")),
                                        ("grid_y_too_large", ("70000", "exceeds"))])
def test_launch_limits(name, words):
    err, v = _run(name, 1)
    assert "invalid configuration" in err, err
    for w in words:
        assert w in err, err
    assert v == [UNWRITTEN] * 512, "a rejected launch must not run"


@pytest.mark.parametrize("name,count", [("block_order", 16), ("thread_order", 64)])
def test_seeded_order(name, count):
    """Blocks (16) and the threads of a block (64) run in a seeded random order: a permutation,
    the same for the same seed, different across seeds."""
    orders = []
    for seed in SEEDS:
        err, v = _run(name, seed)
        assert err == ""
        assert sorted(v[:count]) == list(range(count)), v[:count]
        assert v[count:] == [UNWRITTEN] * (512 - count)
        again = _run(name, seed)[1]
        assert again == v, "the same seed must give the same order"
        orders.append(tuple(v[:count]))
    assert len(set(orders)) == len(orders), "different seeds gave the same order"


def test_programmatic_dependent_launch_needs_the_wait():
    """A PDL launch (launch_kernel_pdl) fails when a thread exits without griddepcontrol.wait (on a
    GPU it could read its predecessor's outputs too early); a plain launch does not need the wait."""
    err, v = _run("pdl_wait", 3)
    assert err == "" and v[:64] == [1] * 64
    err, v = _run("pdl_missing_wait", 3)
    assert "exited without griddepcontrol.wait in a programmatic dependent launch" in err
    assert "thread (0,0,0)" in err
    err, v = _run("plain_launch_skips_wait", 3)
    assert err == "" and v[0] == UNWRITTEN and v[1:64] == [1] * 63


def test_l2_prefetch_is_checked_and_logged():
    """The L2 prefetch seam logs the range it was given and rejects a misaligned one."""
    C.emu_take_prefetches()
    err, _ = _run("prefetch_ok", 1)
    assert err == ""  # the scenario itself checks the logged (address, bytes)
    err, _ = _run("prefetch_misaligned", 1)
    assert "misaligned range" in err
    assert C.emu_take_prefetches() == []


@pytest.mark.parametrize("sms", [1, 2, 5, 7])
def test_flag_chain_interleaves_resident_blocks(sms):
    """Block b waits for block b+1's flag: the blocks must be resident together and interleave at
    the wait. Each keeps its own static and dynamic shared memory across the switches, and the
    waits release in chain order (last block first), whatever the seeded start order."""
    try:
        C.emu_set_sms(sms)
        for seed in SEEDS[:4]:
            err, v = _run("flag_chain", seed)
            assert err == ""
            assert v[:sms] == [100 + b for b in range(sms)] and v[sms:16] == [UNWRITTEN] * (16 - sms)
            assert v[16:16 + sms] == [200 + b for b in range(sms)]
            assert v[32:32 + sms] == list(range(sms - 1, -1, -1))
    finally:
        C.emu_set_sms(5)


@pytest.mark.parametrize("sms", [1, 2, 5, 7])
def test_flag_chain_template_keeps_static_shared_per_block(sms):
    """The flag chain with a template kernel (external and internal linkage): each resident block
    keeps its own static shared variables across the switches at its wait."""
    try:
        C.emu_set_sms(sms)
        for seed in SEEDS[:4]:
            err, v = _run("flag_chain_template", seed)
            assert err == ""
            for base, linkage in ((0, "external"), (64, "internal")):
                w = v[base:base + 64]
                assert w[:sms] == [100 + b for b in range(sms)], f"{linkage} linkage: {w[:sms]}"
                assert w[16:16 + sms] == [300 + b for b in range(sms)], f"{linkage} linkage: {w[16:16 + sms]}"
                assert w[32:32 + sms] == list(range(sms - 1, -1, -1))
                assert w[sms:16] == [UNWRITTEN] * (16 - sms) and w[16 + sms:32] == [UNWRITTEN] * (16 - sms)
            assert v[128:] == [UNWRITTEN] * (512 - 128)
    finally:
        C.emu_set_sms(5)


@pytest.mark.parametrize("sms", [1, 3, 5])
def test_grid_barrier_needs_residency(sms):
    """A grid barrier completes when the grid fits the emulated SMs (one block each) and is
    reported as a deadlock, never a hang, when one block more cannot become resident."""
    try:
        C.emu_set_sms(sms)
        assert C.emu_sms() == sms
        for seed in SEEDS[:3]:
            err, v = _run("grid_barrier_resident", seed)
            assert err == "" and v[:sms] == [sms] * sms and v[sms:] == [UNWRITTEN] * (512 - sms)
            err, _ = _run("grid_barrier_oversubscribed", seed)
            assert "every resident block waits on a flag" in err and f"on {sms} emulated SMs" in err
    finally:
        C.emu_set_sms(5)


@pytest.mark.parametrize("sms", [1, 3, 5, 7])
def test_competing_blocks_hang_unbounded_waits_not_bounded_ones(sms):
    """Competing resident blocks (another kernel holds all but `limit` SMs, emu_set_resident_limit):
    the flag chain, whose waits are unbounded, is a reported deadlock as soon as fewer blocks than
    the grid can be resident (its grid is the device's SM count, as a persistent kernel sizes it),
    unless the blocks happen to start in the chain's order;
    the bounded chain completes with any residency down to one block: the waits that cannot be
    met time out (counted) and the block recomputes, and with the whole grid resident none does."""
    try:
        C.emu_set_sms(sms)
        for limit in range(1, sms + 1):
            C.emu_set_resident_limit(limit)
            assert C.emu_resident_limit() == limit
            for seed in SEEDS[:3]:
                C.emu_take_wait_timeouts()
                err, v = _run("bounded_chain", seed)
                assert err == "" and v[:sms] == [100 + b for b in range(sms)], (limit, err, v[:sms])
                timeouts = C.emu_take_wait_timeouts()
                assert timeouts == sum(v[64:64 + sms]), (timeouts, v[64:64 + sms])
                if limit == sms:
                    assert timeouts == 0, "a resident grid must never time out"
                elif limit == 1:
                    # one block at a time: every wait but the last block's (it has none) that runs before its producer
                    assert timeouts >= 1
            hung = 0
            for seed in SEEDS:
                err, _ = _run("flag_chain", seed)
                if err:  # only a start order that happens to run the chain backwards completes
                    assert limit < sms, err
                    assert "every resident block waits on a flag" in err and f"on {limit} emulated SMs" in err, err
                    hung += 1
            if limit == 1 and sms >= 3:
                assert hung > 0, f"no seed hung the unbounded chain with {limit} of {sms} blocks resident"
    finally:
        C.emu_set_resident_limit(0)
        C.emu_set_sms(5)


def test_bounded_waits_time_out_at_the_set_rate():
    """emu_set_wait_timeout_rate(1) times out every unmet bounded wait even with the grid resident
    (so the recompute paths run without a deadlock), and 0 puts the default back."""
    try:
        C.emu_set_wait_timeout_rate(1.0)
        C.emu_take_wait_timeouts()
        err, v = _run("bounded_chain", 7)
        assert err == "" and v[:5] == [100 + b for b in range(5)]
        assert C.emu_take_wait_timeouts() == sum(v[64:69]) >= 1
    finally:
        C.emu_set_wait_timeout_rate(0.0)
    for seed in SEEDS[:3]:
        err, v = _run("bounded_chain", seed)
        assert err == "" and v[64:69] == [0] * 5 and C.emu_take_wait_timeouts() == 0


def test_pdl_only_from_an_image_with_the_wait():
    """launch_kernel_pdl (common.cuh) asks the runtime about the loaded image: built for sm_90+
    (the default emulated image) it launches as a programmatic dependent; a compute_80 image on
    this sm_90 device (emu_set_image_arch(80): griddep_wait compiled out) gets a plain launch,
    which is safe without the wait, while a forced PDL launch of that image is the race the check
    prevents (the emulator reports its threads exiting without the wait)."""
    try:
        C.emu_take_launches()
        err, v = _run("pdl_by_image", 3)
        assert err == "" and v[:64] == [1] * 64
        assert C.emu_take_launches() == [("griddep_kernel", True)]
        C.emu_set_image_arch(80)
        assert C.emu_image_arch() == 80
        err, v = _run("pdl_by_image", 3)
        assert err == "" and v[:64] == [1] * 64
        assert C.emu_take_launches() == [("griddep_kernel", False)]
        err, _ = _run("pdl_wait", 3)  # the same image launched as a dependent regardless
        assert "exited without griddepcontrol.wait" in err
    finally:
        C.emu_set_image_arch(90)
        C.emu_take_launches()


@pytest.mark.parametrize("count_only", [False, True])
def test_perf_trace_counts(count_only):
    """The performance trace: per block the cp.async source bytes (zero-fills count nothing), the
    explicit bytes of perf_event(kPerfBytes) summed over threads, the longest round-trip chain of
    any thread, thread 0's events in order stamped with the block's cp.async bytes so far; in
    count-only mode the copies are counted but never land (the shared words stay poisoned)."""
    try:
        C.emu_set_perf(True, count_only)
        err, v = _run("perf_counts", 5)
        assert err == ""
        launches = C.emu_take_perf()
    finally:
        C.emu_set_perf(False)
    assert len(launches) == 1
    (l,) = launches
    assert l["name"] == "perf_kernel" and l["grid"] == (2, 1, 1) and l["threads"] == 32 and not l["pdl"]
    assert [b[0] for b in l["blocks"]] == [0, 1]
    for idx, cp_bytes, mem_bytes, chain, events in l["blocks"]:
        assert cp_bytes == 16 * 16 and mem_bytes == 8 * 32 and chain == 4
        kinds = [(k, a, b) for k, a, b, _ in events]
        assert kinds == [(1, 2, 0), (5, 8, 0), (4, 0, 0), (1, 7, 1)], kinds
        stamps = [s for *_, s in events]
        assert stamps == sorted(stamps) and stamps[-1] >= 16 and stamps[-1] <= 256
    want = [POISON if count_only else (0 if t % 2 == 0 else 1000 + 4 * t) for t in range(32)]
    assert v[:32] == want * 1
    assert C.emu_take_perf() == [], "tracing off records nothing"


def test_every_scenario_is_tested():
    tested = {*FAILING, "barrier_ok", "missing_barrier", "shuffles", "cp_async", "cp_async_misaligned",
              "smem_poison", "dyn_smem_without_opt_in", "dyn_smem_opt_in_per_kernel", "block_too_large",
              "grid_y_too_large", "block_order", "thread_order", "pdl_wait", "pdl_missing_wait",
              "plain_launch_skips_wait", "prefetch_ok", "prefetch_misaligned",
              "flag_chain", "grid_barrier_resident", "smem_poison_template", "flag_chain_template",
              "bounded_chain", "pdl_by_image", "perf_counts"}
    assert set(C.emu_selftest_names()) == tested
    err, _ = C.emu_selftest("no_such_scenario")
    assert "no such self-test" in err


# ----------------------------------------------------------------------------- 16-bit conversions


def _conversion_inputs() -> torch.Tensor:
    """fp32 values: random bit patterns (all exponents, subnormals, inf, NaN), random normals of
    many scales, bf16 ties and neighbours, every fp16 midpoint (ties, incl. subnormal ones) and
    the overflow and underflow boundaries of both formats."""
    g = torch.Generator().manual_seed(20240607)
    parts = []
    raw = torch.randint(-(2**31), 2**31, (40000,), generator=g, dtype=torch.int64).to(torch.int32)
    parts.append(raw.view(torch.float32))
    sub = torch.randint(1, 2**23, (3000,), generator=g, dtype=torch.int64)  # fp32 subnormals, both signs
    sub = torch.cat([sub, sub | (1 << 31)]).to(torch.int64)
    parts.append(((sub + 2**31) % 2**32 - 2**31).to(torch.int32).view(torch.float32))
    for scale in (1e-30, 1e-8, 6e-5, 1e-3, 1.0, 300.0, 6e4, 1e30):
        parts.append(torch.randn(2000, generator=g) * scale)
    # bf16 ties (low 16 bits exactly 0x8000) and their neighbours, over random upper halves.
    upper = torch.randint(0, 2**16, (3000,), generator=g, dtype=torch.int64)
    for low in (0x8000, 0x7FFF, 0x8001, 0x0000, 0xFFFF):
        bits = (upper << 16) | low
        parts.append(((bits + 2**31) % 2**32 - 2**31).to(torch.int32).view(torch.float32))
    # Every midpoint between consecutive finite fp16 values (exact in fp32), both signs.
    h = torch.arange(0, 0x7BFF, dtype=torch.int64)
    lo = h.to(torch.int16).view(torch.float16).double()
    hi = (h + 1).to(torch.int16).view(torch.float16).double()
    mid = ((lo + hi) / 2).float()
    parts += [mid, -mid, torch.nextafter(mid, torch.full_like(mid, float("inf"))),
              torch.nextafter(mid, torch.zeros_like(mid))]
    specials = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), -float("nan"),
                65504.0, 65519.99, 65520.0, 65536.0, 1e5, -65520.0, 2.0 ** -14, 2.0 ** -24, 2.0 ** -25,
                1.5 * 2.0 ** -24, 2.0 ** -26, 2.0 ** -14 - 2.0 ** -25, 3.4028234663852886e38, 3.3961e38,
                1.1754943508222875e-38, 1e-45, -1e-45]
    parts.append(torch.tensor(specials, dtype=torch.float32))
    near = torch.tensor([65520.0, 2.0 ** -25, 3.3961e38], dtype=torch.float32)
    parts += [torch.nextafter(near, torch.full_like(near, float("inf"))), torch.nextafter(near, torch.zeros_like(near))]
    parts.append(torch.tensor([0x7F800001, 0x7FBFFFFF, 0x7FC00000, -1, 0x7FFFFFFF], dtype=torch.int32).view(torch.float32))
    return torch.cat([p.float().reshape(-1) for p in parts])


def _bits16(t: torch.Tensor) -> list[int]:
    return [b & 0xFFFF for b in t.view(torch.int16).tolist()]


def _f32_bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


@pytest.mark.parametrize("fmt", ["bf16", "fp16"])
def test_to_16_bit_matches_torch(fmt):
    x = _conversion_inputs()
    dt, conv = (torch.bfloat16, C.emu_to_bf16) if fmt == "bf16" else (torch.float16, C.emu_to_half)
    exp_mask, man_mask = (0x7F80, 0x007F) if fmt == "bf16" else (0x7C00, 0x03FF)
    want = _bits16(x.to(dt))
    values = x.tolist()
    nan_in = torch.isnan(x).tolist()
    assert sum(nan_in) > 10 and torch.isinf(x).any()
    mismatches = []
    for v, w, is_nan in zip(values, want, nan_in):
        got = conv(v)
        if is_nan:
            if not ((got & exp_mask) == exp_mask and (got & man_mask) != 0):
                mismatches.append((v, hex(_f32_bits(v)), hex(got), "NaN must stay NaN"))
        elif got != w:
            mismatches.append((v, hex(_f32_bits(v)), hex(got), hex(w)))
    assert not mismatches, f"{len(mismatches)} of {len(values)} differ from torch; first: {mismatches[:10]}"


@pytest.mark.parametrize("fmt", ["bf16", "fp16"])
def test_from_16_bit_matches_torch_exhaustively(fmt):
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int16)
    dt, conv = (torch.bfloat16, C.emu_from_bf16) if fmt == "bf16" else (torch.float16, C.emu_from_half)
    want = bits.view(dt).float()
    mismatches = []
    for b, w in zip(bits.tolist(), want.tolist()):
        got = conv(b & 0xFFFF)
        if w != w:
            if got == got:
                mismatches.append((hex(b & 0xFFFF), got, "NaN must stay NaN"))
        elif _f32_bits(got) != _f32_bits(w):
            mismatches.append((hex(b & 0xFFFF), got, w))
    assert not mismatches, f"{len(mismatches)} of 65536 differ from torch; first: {mismatches[:10]}"
