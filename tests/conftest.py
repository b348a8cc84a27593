import os
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


@pytest.fixture
def gen(request):
    """A generator seeded from the test id plus a per-run salt, so inputs are fresh every run
    (set MOESPEC_TEST_SEED to reproduce a failure; the seed is printed on failure)."""
    salt = int(os.environ.get("MOESPEC_TEST_SEED", torch.seed() % (2**31)))
    seed = (zlib.crc32(request.node.nodeid.encode()) ^ salt) % (2**31)
    request.node.user_properties.append(("seed", seed))
    print(f"seed={seed} (MOESPEC_TEST_SEED={salt})")
    return torch.Generator().manual_seed(seed)
