"""Run the seqfast benchmark suite against torch and summarise it (``make bench``).

Picks the best device present (CUDA when torch sees one, else CPU), runs ``benchmarks/bench_*.py`` through
pytest-benchmark with one progress line per case, then writes under ``benchmarks/results/``:

- ``<device>-<size>-<time>.json``: pytest-benchmark's JSON (timings, plus op/shape/rate/peak memory in
  each benchmark's ``extra_info``);
- ``<device>-<size>-<time>-<op>.png``: speedup against work, one plot per op;

and prints a table: op, shape, direction, torch and seqfast median ms, speedup, GFLOP/s (TFLOP/s on CUDA;
for CTC the rate counts alpha/beta state updates, not FLOPs) and peak memory of each. On CPU it also prints
the machine (CPU model and family, ISA in use, the FMA-loop peak measured in the same run, load average).

Options: ``--smoke`` (tiny shapes: checks the pipeline), ``--quick`` (smallest real shapes), ``--full``
(also attention L=4096 forward+backward on CPU), ``--filter EXPR`` (pytest ``-k``), ``--device``,
``--backend`` (seqfast backend: ``auto`` times the C++ kernels on CPU and the Triton kernels on CUDA;
``reference`` the float64 reference). Arguments it does not know are handed to pytest.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from _results import Row, load_rows  # noqa: E402

BENCH_FILES = sorted(str(p.relative_to(ROOT)) for p in HERE.glob("bench_*.py"))
BACKENDS = ("auto", "triton", "cpp", "reference")


def _parse(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description="Benchmark seqfast against torch.")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--smoke", dest="size", action="store_const", const="smoke", help="tiny shapes (seconds)")
    size.add_argument("--quick", dest="size", action="store_const", const="quick", help="smallest real shapes")
    size.add_argument("--full", dest="size", action="store_const", const="full",
                      help="every shape, also attention L=4096 forward+backward on CPU")
    parser.set_defaults(size="default")
    parser.add_argument("--filter", "-k", default=None, help="pytest -k expression on the case names")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="seqfast backend timed (sets SEQFAST_BACKEND); default auto")
    parser.add_argument("--out", default=str(HERE / "results"), help="folder for the JSON and the plots")
    return parser.parse_known_args(argv)


def _device(choice: str) -> str:
    if choice == "cpu":
        return choice  # no need to pay for importing torch here
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available():
        raise SystemExit("run.py: --device cuda, but torch sees no CUDA device")
    return choice


def _environment(device: str, backend: str) -> dict[str, str]:
    env = dict(os.environ)
    env["SEQFAST_BACKEND"] = backend
    # Triton kernels run CPU tensors only through the interpreter; on CUDA they must compile for real.
    env["TRITON_INTERPRET"] = "1" if (device == "cpu" and backend == "triton") else "0"
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton's default, said explicitly (silences its warning)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    return env


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _cpu_machine_line() -> str | None:
    """CPU model, ISA in use and the FMA-loop peak measured now (``_harness.cpu_record``), so every CPU ratio
    of the run can be read against the machine's limit; None when the extension does not load."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # the checkout's seqfast, as the benchmarks themselves get it
    try:
        from _harness import cpu_record

        return cpu_record()
    except (ImportError, RuntimeError) as e:
        return f"cpu: (no record: {e})"


def format_table(rows: list[Row], device: str) -> str:
    """The summary table as text; rates in GFLOP/s on CPU, TFLOP/s on CUDA."""
    scale, unit = (1e3, "TFLOP/s") if device == "cuda" else (1.0, "GFLOP/s")
    headers = ["op", "shape", "dir", "torch ms", "seqfast ms", "speedup", f"{unit} torch", f"{unit} seqfast",
               "peak mem torch", "peak mem seqfast"]
    body = []
    for r in rows:
        t, s = r.torch, r.seqfast
        body.append([
            r.op, r.shape, r.direction,
            f"{t.median_s * 1e3:.3f}" if t else "-",
            f"{s.median_s * 1e3:.3f}" if s else "-",
            f"{r.speedup:.2f}x" if r.speedup is not None else "-",
            f"{t.rate / scale:.3g}" if t else "-",
            f"{s.rate / scale:.3g}" if s else "-",
            _bytes(t.peak_mem_bytes if t else None),
            _bytes(s.peak_mem_bytes if s else None),
        ])
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(headers)]
    numeric = set(range(3, len(headers)))

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [line(headers), "  ".join("-" * w for w in widths), *(line(b) for b in body)]
    out.append(f"(speedup = torch ms / seqfast ms; ctc rates count alpha/beta state updates, not FLOPs: "
               f"G updates/s{' x1000' if device == 'cuda' else ''})")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args, pytest_extra = _parse(argv)
    device = _device(args.device)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    json_path = out_dir / f"{device}-{args.size}-{stamp}.json"

    cmd = [sys.executable, "-m", "pytest", *BENCH_FILES, "-v", "--tb=short", "-p", "no:cacheprovider",
           "--bench-size", args.size, "--bench-device", device, f"--benchmark-json={json_path}",
           "--benchmark-columns=median,iqr,rounds", "--benchmark-sort=name", *pytest_extra]
    if args.filter:
        cmd += ["-k", args.filter]
    print(f"seqfast bench: device={device} backend={args.backend} size={args.size}", flush=True)
    machine = _cpu_machine_line() if device == "cpu" else None
    if machine:
        print(machine, flush=True)
    print("$ " + " ".join(cmd), flush=True)
    rc = subprocess.call(cmd, cwd=ROOT, env=_environment(device, args.backend))

    if not json_path.is_file():
        print(f"run.py: pytest exited with {rc} and wrote no results", file=sys.stderr)
        return rc or 1
    rows = load_rows(json_path)
    from plot import plot_speedups

    pngs = plot_speedups(rows, out_dir, prefix=f"{json_path.stem}-")
    print()
    where = rows[0].where if rows else device
    print(f"seqfast {args.backend} backend vs torch on {where}, {args.size} shapes; median of each case")
    print(format_table(rows, device))
    if machine:
        print(machine)
    print(f"\nresults: {json_path}")
    for p in pngs:
        print(f"plot:    {p}")
    if rc != 0:
        print(f"run.py: some benchmark cases failed (pytest exit {rc}); see above", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
