import logging
import os
import sys
import warnings
import zlib

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """Skip tests marked `cuda` unless a GPU and the compiled kernels are both present."""
    from moespec import _cuda

    reason = None
    if not torch.cuda.is_available():
        reason = "no CUDA device visible to torch"
    elif not _cuda.available():
        reason = _cuda.unavailable_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"cuda test skipped: {reason}")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


class KernelDevice:
    """Where a kernel test runs the compiled kernels: ``name`` "cuda" (a GPU) or "emu" (the CPU
    emulator of an emulation build); ``device`` is the torch device of its tensors and
    ``backend`` the `moespec.ops` backend that selects the kernels."""

    def __init__(self, name: str):
        self.name = name
        self.backend = name
        self.device = torch.device("cuda" if name == "cuda" else "cpu")
        self.emulated = name == "emu"

    def __repr__(self) -> str:
        return f"KernelDevice({self.name})"


KERNEL_DEVICES = [pytest.param("cuda", marks=pytest.mark.cuda, id="cuda"),
                  pytest.param("emu", marks=pytest.mark.emu, id="emu")]


@pytest.fixture(params=KERNEL_DEVICES)
def kdev(request):
    """Each kernel test runs once per kernel device: the GPU when one is usable, the CPU emulator
    when moespec is an emulation build (MOESPEC_CUDA=EMU); otherwise that variant skips.

    On the emulator the block and thread order is seeded afresh for every test (set
    MOESPEC_EMU_SEED to reproduce a failure; the seed is printed on failure)."""
    from moespec import _cuda

    if request.param == "cuda":
        if not _cuda.available():
            pytest.skip(f"no usable GPU: {_cuda.unavailable_reason()}")
    elif not _cuda.emu_compiled():
        pytest.skip(f"not an emulation build (moespec backend: {_cuda.backend()}; install with MOESPEC_CUDA=EMU)")
    else:
        env = os.environ.get("MOESPEC_EMU_SEED")
        seed = int(env, 0) if env else int.from_bytes(os.urandom(4), "little")
        _cuda._C.emu_set_seed(seed)
        request.node.user_properties.append(("emu_seed", seed))
        print(f"emu seed: MOESPEC_EMU_SEED={seed}")
    return KernelDevice(request.param)


@pytest.fixture(params=["v1", "v2"])
def kgen(request, monkeypatch):
    """Both kernel generations (MOESPEC_KERNELS, docs/kernels-v2.md): the routing plan and the expert
    kernels of the generation reach every entry point, the op level included. (tests/test_cuda_kernels.py
    has its own copy for its expert tests.)"""
    monkeypatch.setenv("MOESPEC_KERNELS", request.param)
    return request.param


@pytest.fixture
def gen(request):
    """A generator seeded from the test id plus a per-run salt, so inputs are fresh every run
    (set MOESPEC_TEST_SEED to reproduce a failure; the seed is printed on failure)."""
    salt = int(os.environ.get("MOESPEC_TEST_SEED", torch.seed() % (2**31)))
    seed = (zlib.crc32(request.node.nodeid.encode()) ^ salt) % (2**31)
    request.node.user_properties.append(("seed", seed))
    print(f"seed={seed} (MOESPEC_TEST_SEED={salt})")
    return torch.Generator().manual_seed(seed)


# --- no transformers deprecation from moespec code ----------------------------------------------
def _module_of(frame) -> str:
    return frame.f_globals.get("__name__") or ""


def _in_package(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


_WARNING_MACHINERY = ("warnings", "_py_warnings")

# moespec functions that only pass a transformers call through unchanged, called by transformers
# itself (e.g. the wrapper around `GenerationMixin._assisted_decoding`): whatever transformers does
# below them is transformers' own doing (5.24's assisted generation logs a generation_config
# deprecation by itself), so they do not count as moespec frames. (module, function name).
PASS_THROUGH = {
    ("moespec.integrations.patching", "_assisted_decoding"),
}


class DeprecationGuard:
    """Records transformers deprecations that moespec code triggers.

    While active (a context manager), an offence is:
    - a FutureWarning / DeprecationWarning / PendingDeprecationWarning issued by a frame inside the
      ``transformers`` package, or
    - a WARNING record of a ``transformers`` logger whose text mentions "deprecat" (transformers
      5.24 reports e.g. ``output.past_key_values`` this way, through ``logger.warning_once``),
    emitted while a ``moespec`` frame (other than a `PASS_THROUGH` wrapper) is on the call stack.
    Warnings that test code causes by calling transformers directly have no moespec frame on the
    stack and are not offences.

    `offences` lists them as "moespec/file.py:line (function): Category: text" (the innermost
    moespec frame). Every warning is forwarded to the handler that was active before, so pytest
    still collects and summarises them. Inside an inner ``catch_warnings(record=True)`` (e.g.
    ``pytest.warns``, ``recwarn``) the warning hook is bypassed.

    Deprecation categories are shown "always" while active, so a warning that transformers
    already issued once from the same place (e.g. torch's ``Module._call_impl``, the usual
    ``stacklevel`` target) is still seen; explicit "error" filters keep precedence.
    """

    CATEGORIES = (FutureWarning, DeprecationWarning, PendingDeprecationWarning)

    def __init__(self):
        self.offences: list[str] = []
        self._catcher = None
        self._previous = None
        self._handler = None

    # -- deciding ---------------------------------------------------------------------------------
    @staticmethod
    def moespec_frame(frame):
        """The innermost frame at or above ``frame`` whose module is in the moespec package (other
        than a `PASS_THROUGH` wrapper), or None."""
        while frame is not None:
            module = _module_of(frame)
            if _in_package(module, "moespec") and (module, frame.f_code.co_name) not in PASS_THROUGH:
                return frame
            frame = frame.f_back
        return None

    def _offence(self, frame, text: str) -> None:
        f = self.moespec_frame(frame)
        if f is not None:
            code = f.f_code
            self.offences.append(f"{code.co_filename}:{f.f_lineno} ({code.co_name}): {text}")

    def check_warning(self, message, category, frame) -> None:
        """Record ``message`` (a warning of ``category`` whose ``warnings.warn`` call is at or above
        ``frame``) if it is a transformers deprecation raised under a moespec frame."""
        if not (isinstance(category, type) and issubclass(category, self.CATEGORIES)):
            return
        hook = DeprecationGuard._showwarning.__code__  # a nested guard forwarding to this one
        while frame is not None and (_module_of(frame) in _WARNING_MACHINERY or frame.f_code is hook):
            frame = frame.f_back  # the frame that called warnings.warn
        if frame is None or not _in_package(_module_of(frame), "transformers"):
            return
        self._offence(frame, f"{category.__name__}: {message}")

    def check_record(self, record: logging.LogRecord, frame) -> None:
        """Record a transformers log ``record`` that reports a deprecation under a moespec frame."""
        if record.levelno < logging.WARNING or not _in_package(record.name, "transformers"):
            return
        text = record.getMessage()
        if "deprecat" in text.lower():
            self._offence(frame, f"transformers log ({record.name}): {text}")

    # -- hooks ------------------------------------------------------------------------------------
    def _showwarning(self, message, category, filename, lineno, file=None, line=None):
        # Called synchronously inside warnings.warn: the stack above is the warning's.
        self.check_warning(message, category, sys._getframe(1))
        previous = self._previous
        original = getattr(warnings, "_showwarning_orig", None)
        impl = getattr(warnings, "_showwarnmsg_impl", None)
        if previous is original and impl is not None:
            # pytest's catch_warnings(record=True) collects through _showwarnmsg_impl, not showwarning.
            impl(warnings.WarningMessage(message, category, filename, lineno, file, line))
        else:
            previous(message, category, filename, lineno, file, line)

    def __enter__(self):
        self._catcher = warnings.catch_warnings()
        self._catcher.__enter__()
        errors = [f for f in warnings.filters if f[0] == "error"]
        for category in self.CATEGORIES:
            warnings.simplefilter("always", category)
        for action, msg, category, module, lineno in reversed(errors):  # keep -W error / filterwarnings=error
            warnings.filterwarnings(action, msg.pattern if msg is not None else "", category,
                                    module.pattern if module is not None else "", lineno)
        self._previous = warnings.showwarning
        warnings.showwarning = self._showwarning

        guard = self

        class _Handler(logging.Handler):
            def emit(self, record):
                guard.check_record(record, sys._getframe(1))

        self._handler = _Handler(logging.WARNING)
        logging.getLogger("transformers").addHandler(self._handler)
        # transformers' logger.warning_once is an lru_cache: let this scope see its messages again.
        once = getattr(logging.Logger, "warning_once", None)
        if hasattr(once, "cache_clear"):
            once.cache_clear()
        return self

    def __exit__(self, *exc):
        logging.getLogger("transformers").removeHandler(self._handler)
        self._catcher.__exit__(*exc)  # restores filters and showwarning
        return False

    def report(self) -> str:
        """Failure text listing the offences."""
        lines = "\n".join(f"  - {o}" for o in dict.fromkeys(self.offences))
        return (f"moespec code triggered {len(self.offences)} transformers deprecation(s); route the call "
                f"through moespec.integrations.hf_compat:\n{lines}")


@pytest.fixture(autouse=True)
def moespec_deprecation_guard():
    """Every test: fail (at teardown) when moespec code triggers a transformers deprecation."""
    with DeprecationGuard() as guard:
        yield guard
    if guard.offences:
        pytest.fail(guard.report(), pytrace=False)
