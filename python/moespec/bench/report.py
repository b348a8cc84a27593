"""Run metadata and output: terminal tables, JSON, Markdown and PNG plots."""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch


def git_commit() -> str:
    """HEAD of the checkout moespec runs from (``MOESPEC_GIT_COMMIT`` overrides), else ``"unknown"``."""
    if os.environ.get("MOESPEC_GIT_COMMIT"):
        return os.environ["MOESPEC_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"
    except Exception:  # noqa: BLE001 - no git, or not a checkout
        return "unknown"


def device_name(device: torch.device) -> str:
    """Human-readable device: the GPU's name, or the CPU model and thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU: {cpu} ({torch.get_num_threads()} threads)"


def run_meta(device: torch.device, argv: Optional[Sequence[str]] = None) -> dict:
    """The fields every result file carries: command, date, device, git commit, versions."""
    from .. import __version__

    try:
        import transformers
        tf_version = transformers.__version__
    except Exception:  # noqa: BLE001
        tf_version = None
    args = list(sys.argv[1:] if argv is None else argv)
    return {
        "command": "moespec " + " ".join(args),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "device_type": torch.device(device).type,
        "git_commit": git_commit(),
        "moespec": __version__,
        "torch": torch.__version__,
        "transformers": tf_version,
        "python": platform.python_version(),
    }


def fmt(value, digits: int = 3) -> str:
    """Compact cell text: floats to ``digits`` significant figures, None as ``-``."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value == 0:
            return "0"
        mag = math.floor(math.log10(abs(value)))
        return f"{value:.{max(0, digits - 1 - mag)}f}" if -4 < mag < 7 else f"{value:.{digits - 1}e}"
    return str(value)


def table(rows: Iterable[dict], columns: Sequence[tuple[str, str]]) -> list[list[str]]:
    """Rows as lists of cell strings for ``columns`` = [(key, header), ...], header first."""
    out = [[h for _, h in columns]]
    for r in rows:
        out.append([fmt(r.get(k)) for k, _ in columns])
    return out


#: Default width of tables printed to a terminal (the Markdown files always carry every column).
TERMINAL_WIDTH = 120


def table_width(cells: Sequence[Sequence[str]], sep: int = 2) -> int:
    """Characters per line of `terminal_table` for ``cells`` (header row included)."""
    if not cells or not cells[0]:
        return 0
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return sum(widths) + sep * (len(widths) - 1)


def fit_columns(rows: Sequence[dict], columns: Sequence[tuple[str, str]], max_width: Optional[int],
                optional: Sequence[str] = ()) -> tuple[list[tuple[str, str]], list[str]]:
    """Drop the keys in ``optional`` (first listed, first dropped) until the table fits ``max_width``.

    Returns ``(kept columns, dropped headers)``. Columns not in ``optional`` are never dropped, so a
    table can stay wider than ``max_width`` when those alone do not fit; ``max_width=None`` keeps all.
    """
    cols = list(columns)
    dropped: list[str] = []
    if max_width is None:
        return cols, dropped
    rows = list(rows)
    for key in optional:
        if table_width(table(rows, cols)) <= max_width:
            break
        for c in cols:
            if c[0] == key:
                cols.remove(c)
                dropped.append(c[1])
                break
    return cols, dropped


def terminal_table(rows: Iterable[dict], columns: Sequence[tuple[str, str]], max_width: Optional[int] = None,
                   optional: Sequence[str] = ()) -> str:
    """A right-aligned plain-text table.

    With ``max_width``, columns listed in ``optional`` are dropped (see `fit_columns`) until it fits.
    """
    rows = list(rows)
    columns, _ = fit_columns(rows, columns, max_width, optional)
    cells = table(rows, columns)
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def wrap_notes(notes: Iterable[str], width: int = TERMINAL_WIDTH, bullet: str = "- ") -> str:
    """Notes as bulleted paragraphs wrapped to ``width`` characters (for printing under a table)."""
    import textwrap

    out = []
    for n in notes:
        out += textwrap.wrap(n, width=width, initial_indent=bullet, subsequent_indent=" " * len(bullet),
                             break_on_hyphens=False, break_long_words=False) or [bullet.rstrip()]
    return "\n".join(out)


def markdown_table(rows: Iterable[dict], columns: Sequence[tuple[str, str]]) -> str:
    """A GitHub-flavoured Markdown table."""
    cells = table(rows, columns)
    lines = ["| " + " | ".join(cells[0]) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells[1:]]
    return "\n".join(lines)


def write_json(path: Path, data: dict) -> Path:
    """Write ``data`` as indented JSON (non-finite floats become null)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite(data), indent=1) + "\n")
    return path


def write_outputs(result: dict, out_dir: Path, stem: str, markdown: Callable[[dict], str],
                  plot: Optional[Callable[[dict, Path], Optional[Path]]] = None, png: bool = True) -> dict:
    """Write ``<stem>.json``, ``<stem>.md`` and (with ``plot`` and matplotlib) ``<stem>.png``; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": write_json(out_dir / f"{stem}.json", result)}
    paths["markdown"] = out_dir / f"{stem}.md"
    paths["markdown"].write_text(markdown(result))
    if png and plot is not None:
        p = plot(result, out_dir / f"{stem}.png")
        if p is not None:
            paths["png"] = p
    return paths


def _finite(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {str(k): _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


def meta_markdown(meta: dict, extra: Sequence[str] = ()) -> list[str]:
    """Bullet lines describing a run."""
    lines = [f"- command: `{meta['command']}`", f"- date: {meta['date']}", f"- device: {meta['device']}",
             f"- git commit: {meta['git_commit']}", f"- torch {meta['torch']}, transformers {meta['transformers']}"]
    return lines + [f"- {e}" for e in extra]


def save_figure(fig, path: Path) -> Path:
    """Lay out ``fig`` under its title, write it as PNG to ``path`` and close it."""
    fig.tight_layout(rect=(0, 0, 1, 0.96))  # leave room for the title
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def matplotlib_pyplot():
    """``matplotlib.pyplot`` with a file-only backend, or None when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except Exception:  # noqa: BLE001
        return None
