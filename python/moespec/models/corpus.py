"""The training corpus every machine has offline: the running interpreter's standard library sources.

Files are split into train and held-out test sets by a hash of their path relative to the stdlib
root, so the split does not depend on file order or on which machine builds it.
"""
from __future__ import annotations

import os
import sysconfig
import zlib
from pathlib import Path

# Test suites and GUI demos are long, repetitive and unlike ordinary library code.
_EXCLUDE_PARTS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "turtledemo", "__pycache__"}
HELDOUT_MODULUS = 10  # one file in ten is held out


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(root: Path | None = None) -> list[Path]:
    """All ``*.py`` files of the standard library, minus tests and GUI demos, sorted by path."""
    root = root or stdlib_root()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDE_PARTS)
        for name in sorted(filenames):
            if name.endswith(".py"):
                files.append(Path(dirpath) / name)
    return sorted(files)


def is_heldout(path: Path, root: Path | None = None) -> bool:
    rel = str(path.relative_to(root or stdlib_root())).replace(os.sep, "/")
    return zlib.crc32(rel.encode()) % HELDOUT_MODULUS == 0


def split_corpus(root: Path | None = None) -> tuple[list[Path], list[Path]]:
    """``(train_files, heldout_files)``."""
    root = root or stdlib_root()
    files = corpus_files(root)
    test = [f for f in files if is_heldout(f, root)]
    train = [f for f in files if not is_heldout(f, root)]
    return train, test


def read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")
