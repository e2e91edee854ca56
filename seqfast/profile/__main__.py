"""``python -m seqfast.profile WORKLOAD [--out DIR] [--shape K=V,...]``: torch vs seqfast, side by side."""

from __future__ import annotations

import argparse
import sys

from seqfast.profile import profile_workload
from seqfast.profile.workloads import WORKLOADS


def _shape(text: str) -> dict[str, int]:
    out = {}
    for part in filter(None, text.split(",")):
        key, sep, value = part.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"shape options are KEY=VALUE, got {part!r}")
        try:
            out[key.strip()] = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"shape value must be an integer, got {part!r}") from None
    return out


def _listing() -> str:
    lines = ["workloads (default shape; override keys with --shape K=V,...):"]
    for name, (shape, desc) in WORKLOADS.items():
        lines.append(f"  {name:9s} {' '.join(f'{k}={v}' for k, v in shape.items())}\n            {desc}")
    lines.append("  module:function   your own step: the function returns a zero-argument step (or (model, step));\n"
                 "                    seqfast's side runs it under seqfast.patch_functional (and seqfast.patch(model))")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m seqfast.profile", description=__doc__, epilog=_listing(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("workload", nargs="?", help="a workload name (see below) or module:function")
    parser.add_argument("--out", default="profile-out", help="directory for traces, tables and chart "
                        "(default: %(default)s)")
    parser.add_argument("--shape", type=_shape, action="append", default=[], help="KEY=VALUE[,KEY=VALUE...]")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--dtype", choices=("float32", "float64", "bfloat16", "float16"), default="float32")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each first (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps of each (default: %(default)s)")
    parser.add_argument("--profiled-steps", type=int, default=3, help="steps of each under the profiler "
                        "(default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the run (default: "
                        "torch's own choice)")
    parser.add_argument("--top", type=int, default=10, help="ops listed per side (default: %(default)s)")
    parser.add_argument("--list", action="store_true", help="list the workloads and exit")
    args = parser.parse_args(argv)
    if args.list or not args.workload:
        print(_listing())
        return 0 if args.list else 2
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    shape: dict[str, int] = {}
    for part in args.shape:
        shape.update(part)
    try:
        comparison = profile_workload(
            args.workload, shape, device=None if args.device == "auto" else args.device, dtype=args.dtype,
            out_dir=args.out, warmup=args.warmup, steps=args.steps, profiled_steps=args.profiled_steps, top=args.top,
        )
    except (ValueError, RuntimeError, TypeError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(comparison.to_text())
    print("\nwrote:")
    for kind, path in comparison.files.items():
        print(f"  {kind:9s} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
