"""Train the Transformer encoder-decoder to normalise dates ("thursday, may 3 1979" -> "1979-05-03").

    python examples/translation.py --small                    # CPU-friendly model, ~99%+ exact match
    python examples/translation.py --small --compare          # seqfast and torch from the same initial weights
    python examples/translation.py --smoke                    # seconds (tests)

Writes ``OUT/metrics.json`` (exact match, step and decoding times, memory), ``OUT/curves.png`` and
``OUT/cross_attention.png``; with ``--compare`` one such folder per backend and ``OUT/comparison.md``.
See examples/translation/README.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `examples` and `seqfast` importable from the checkout
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from examples.common import add_common_arguments, seed_everything, write_metrics  # noqa: E402
from examples.translation.dates import DateData  # noqa: E402
from examples.translation.model import Seq2SeqTransformer  # noqa: E402
from examples.translation.speed import interleaved  # noqa: E402
from examples.translation.train import RunConfig, model_config, run  # noqa: E402


def run_config(args: argparse.Namespace) -> RunConfig:
    if args.smoke:
        cfg = RunConfig(size="smoke", steps=40, batch_size=32, peak_lr=3e-3, warmup=10, eval_every=20,
                        val_examples=32, test_examples=64, beam_examples=16, speed_examples=16, base_timing=False)
    elif args.small or args.quick:
        cfg = RunConfig(size="small", steps=600 if args.quick else 2000, batch_size=64, peak_lr=1.5e-3, warmup=200)
    else:
        cfg = RunConfig()
    overrides = {k: v for k, v in (("steps", args.steps), ("batch_size", args.batch_size)) if v is not None}
    if args.no_base_timing:
        overrides["base_timing"] = False
    return replace(cfg, **overrides)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, default_out="runs/translation")
    parser.add_argument("--small", action="store_true", help="d_model 128, 4 heads, d_ff 256, 2+2 layers (default: "
                        "the paper's base: d_model 512, 8 heads, 6+6 layers)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (overrides the size's default)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--init", type=Path, default=None, help="initial weights (a state_dict saved by torch.save)")
    parser.add_argument("--no-base-timing", action="store_true", help="skip timing the base-shape model's step")
    parser.add_argument("--compare", action="store_true",
                        help="run both backends, each in its own process, from the same initial weights")
    parser.add_argument("--speed", action="store_true",
                        help="no training: time both backends on the --init weights in one process, alternating")
    parser.add_argument("--rounds", type=int, default=5, help="--speed / --compare timing rounds")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = run_config(args)
    out = Path(args.out)
    if args.compare:
        return compare(args, cfg, out, argv if argv is not None else sys.argv[1:])
    if args.speed:
        speed = interleaved(cfg, args.seed, args.init, args.rounds, cfg.base_timing)
        write_metrics(out, {"interleaved": speed, "rounds": args.rounds, "run": asdict(cfg), "weights": str(args.init)})
        print(json.dumps(speed, indent=2))
        return 0
    metrics = run(args.backend, cfg, out, args.seed, args.init)
    path = write_metrics(out, metrics)
    print(f"{args.backend}: exact match {metrics['exact_match']:.4f} on {metrics['test_examples']} held-out dates, "
          f"step {metrics['step_time_s'] * 1e3:.1f} ms, greedy decoding "
          f"{metrics['decode_tokens_per_s']['greedy_cached']:.0f} tokens/s cached / "
          f"{metrics['decode_tokens_per_s']['greedy_uncached']:.0f} uncached, peak RSS "
          f"{metrics['peak_rss_mib']:.0f} MiB -> {path}")
    return 0


def compare(args: argparse.Namespace, cfg: RunConfig, out: Path, argv: list[str]) -> int:
    """Each backend in a fresh process (so that the peak RSS is its own) from one saved initialisation."""
    seed_everything(args.seed)
    out.mkdir(parents=True, exist_ok=True)
    init = out / "init.pt"
    torch.save(Seq2SeqTransformer(model_config(cfg.size, len(DateData(args.seed).vocab))).state_dict(), init)
    rest = [a for a in argv if a not in ("--compare",)]
    rest = _drop_option(_drop_option(_drop_option(rest, "--out"), "--backend"), "--init")
    results = {}
    for backend in ("seqfast", "torch"):
        cmd = [sys.executable, str(Path(__file__).resolve()), *rest, "--backend", backend,
               "--out", str(out / backend), "--init", str(init)]
        if subprocess.run(cmd).returncode != 0:
            return 1
        results[backend] = json.loads((out / backend / "metrics.json").read_text())
    # The runs trained one after the other; their timings met different loads. Time again on the trained
    # weights, the backends alternating in one process.
    speed = interleaved(cfg, args.seed, out / "seqfast" / "model.pt", args.rounds, cfg.base_timing)
    (out / "speed.json").write_text(json.dumps(speed, indent=2) + "\n")
    table = comparison_table(results, speed)
    (out / "comparison.md").write_text(table)
    print(table)
    return 0


def _drop_option(argv: list[str], name: str) -> list[str]:
    """``argv`` without ``name VALUE`` / ``name=VALUE``."""
    kept, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == name:
            skip = True
        elif not a.startswith(name + "="):
            kept.append(a)
    return kept


def comparison_table(results: dict[str, dict], speed: dict[str, dict[str, float]]) -> str:
    """A Markdown table: timings from ``speed`` (:func:`interleaved`), memory and accuracy from the runs."""
    def ms(x):
        return "–" if x is None else f"{x * 1e3:.1f} ms"

    def tps(key):
        return lambda n: f"{speed[n][key]:.0f} tokens/s"

    rows = [
        ("training step (median)", lambda n: ms(speed[n]["step_time_s"])),
        ("greedy decoding, KV cache", tps("greedy_cached")),
        ("greedy decoding, no cache", tps("greedy_uncached")),
        ("beam 3 decoding, KV cache", tps("beam3_cached")),
        ("beam 3 decoding, no cache", tps("beam3_uncached")),
        ("peak RSS (ru_maxrss), training + decoding", lambda n: f"{results[n]['peak_rss_mib']:.0f} MiB"),
        ("exact match, greedy", lambda n: f"{results[n]['exact_match'] * 100:.2f}% of {results[n]['test_examples']}"),
        ("exact match, beam 3",
         lambda n: f"{results[n]['exact_match_beam3'] * 100:.2f}% of {results[n]['beam_examples']}"),
        ("base shape fwd+bwd, one batch", lambda n: ms(speed[n].get("base_fwd_bwd_step_s"))),
    ]
    names = list(results)
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines += [f"| {label} | " + " | ".join(f(n) for n in names) + " |" for label, f in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
