"""The `moespec` command line."""
from __future__ import annotations

import argparse
import json
import platform
import sys
from typing import Optional, Sequence


def _info(args: argparse.Namespace) -> int:
    import torch

    from . import __version__, _cuda

    st = _cuda.device_status()
    gpus = []
    if torch.cuda.is_available():
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    info = {
        "moespec": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "extension_loaded": _cuda.extension_loaded(),
        "cuda_kernels_compiled": _cuda.cuda_compiled(),
        "cuda_archs": _cuda.compiled_archs(),
        "cutlass_headers": _cuda.cutlass_enabled(),
        "cuda_runtime_version": st["runtime_version"],
        "cuda_driver_version": st["driver_version"],
        "gpu_visible": bool(gpus) or st["device_count"] > 0,
        "gpus": gpus,
        "kernels_usable": _cuda.available(),
        "why_not": _cuda.unavailable_reason(),
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(k) for k in info)
    for key, val in info.items():
        if isinstance(val, list):
            val = ", ".join(val) if val else "-"
        print(f"{key:<{width}}  {val if val is not None else '-'}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(tokens=args.tokens, seed=args.seed, zipf=args.zipf, out_json=args.json)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moespec", description=__doc__)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    pi = sub.add_parser("info", help="version, torch, compiled CUDA kernels and architectures, visible GPUs")
    pi.add_argument("--json", action="store_true", help="print JSON instead of a table")
    pi.set_defaults(func=_info)

    pd = sub.add_parser("demo", help="CPU demonstration of verification-time expert budgets on one MoE layer")
    pd.add_argument("--tokens", type=int, default=16, help="draft tokens verified at once (default 16)")
    pd.add_argument("--zipf", type=float, default=1.0, help="router skew: Zipf exponent of expert popularity")
    pd.add_argument("--seed", type=int, default=0)
    pd.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    pd.set_defaults(func=_demo)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
