"""A CTC speech recogniser on seqfast: spoken digit strings and short phrases, synthesised with espeak-ng.

    python examples/speech_recognition.py                       # the default run (see examples/speech/README.md)
    python examples/speech_recognition.py --quick               # minutes
    python examples/speech_recognition.py --backend torch       # the same run on torch's modules and loss
    python examples/speech_recognition.py --quick --compare     # both backends back to back, a comparison table

Writes OUT/metrics.json (CER and WER on held-out voices, digit strings apart, of greedy decoding in `cer`, `wer`,
..., and of every decoder of examples/speech/recogniser_decoding.py in `decoders`; step times, data sizes),
OUT/curves.png (training loss, validation CER and WER), OUT/posteriors.png (a held-out utterance's log-mel
and per-frame CTC posteriors), OUT/model.pt, and with --compare OUT/comparison.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

# Run as a script from anywhere: the repository root holds the `examples` package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from examples.common import add_common_arguments, plot_curves, seed_everything, write_metrics  # noqa: E402
from examples.speech import datasets, recogniser_decoding, recogniser_training  # noqa: E402
from examples.speech.recogniser_plots import plot_posteriors  # noqa: E402
from examples.speech.recogniser_training import SIZES, Utterances, evaluate, is_digit_string, train  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, default_out="runs/speech_recognition")
    parser.add_argument("--compare", action="store_true",
                        help="train with both backends back to back (seqfast first) and write comparison.md")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the run size's)")
    parser.add_argument("--cache", default=None, help=f"dataset cache (default {datasets.default_cache_dir()})")
    return parser.parse_args(argv)


def _sizes(name: str, data: Utterances) -> dict:
    return {f"{name}_utterances": len(data), f"{name}_hours": round(data.seconds() / 3600.0, 3),
            f"{name}_digit_strings": sum(is_digit_string(t) for t in data.texts)}


def _run_backend(backend: str, size: recogniser_training.RunSize, sets: dict[str, Utterances],
                 args: argparse.Namespace) -> tuple[dict, recogniser_training.TrainResult]:
    seed_everything(args.seed)
    result = train(size, backend, sets["train"], sets["valid"], args.seed, steps=args.steps)
    test = evaluate(result.model, sets["test"])
    per_decoder, decoding = recogniser_decoding.evaluate_decoders(result.model, sets["test"], sets["valid"],
                                                                  sets["train"].texts)
    decoders = recogniser_decoding.summary(per_decoder)
    last = [v for _, v in result.losses[-50:]]
    summary = {
        "cer": test.rates.cer, "wer": test.rates.wer,
        "cer_digits": test.digits.cer, "wer_digits": test.digits.wer,
        "cer_phrases": test.phrases.cer, "wer_phrases": test.phrases.wer,
        "first_loss": result.losses[0][1], "final_loss": statistics.mean(last),
        "train_step_s": result.step_timer.median(),
        "infer_batch_s": statistics.median(test.batch_seconds[1:] or test.batch_seconds),
        "train_step_cpu_s": result.step_timer.cpu_median(),
        "infer_batch_cpu_s": statistics.median(test.batch_cpu_seconds[1:] or test.batch_cpu_seconds),
        "train_seconds": result.train_seconds,
        "valid_curve": result.valid,
        "decoders": decoders, "decoding": decoding,
        "examples": [{"reference": r, "greedy": h, "beam_lexicon_lm": b} for r, h, b in
                     zip(sets["test"].texts[:12], test.hypotheses, per_decoder["beam_lexicon_lm"].hypotheses)],
    }
    print(f"[{backend}] test (held-out voices): CER {test.rates.cer:.4f}  WER {test.rates.wer:.4f}  "
          f"digit strings: CER {test.digits.cer:.4f} WER {test.digits.wer:.4f}  "
          f"train step {summary['train_step_s'] * 1e3:.1f} ms (CPU {summary['train_step_cpu_s'] * 1e3:.1f} ms), "
          f"inference batch {summary['infer_batch_s'] * 1e3:.1f} ms (CPU {summary['infer_batch_cpu_s'] * 1e3:.1f} ms), "
          f"trained in {result.train_seconds:.0f} s", flush=True)
    print(f"[{backend}] test (held-out voices), each decoder (seqfast's CTC decoding ops; LM weight and insertion "
          f"bonus chosen on the validation set):\n{recogniser_decoding.table(decoders)}", flush=True)
    return summary, result


def comparison_table(per_backend: dict[str, dict]) -> str:
    """Markdown table of the backends' step times and metrics (seqfast first), with torch / seqfast ratios."""
    rows = [("training step, wall-clock (ms, median)", "train_step_s", 1e3, ".1f"),
            ("training step, process CPU time (ms, median)", "train_step_cpu_s", 1e3, ".1f"),
            ("inference batch of 32, wall-clock (ms, median)", "infer_batch_s", 1e3, ".1f"),
            ("inference batch of 32, process CPU time (ms, median)", "infer_batch_cpu_s", 1e3, ".1f"),
            ("training wall-clock (s)", "train_seconds", 1.0, ".0f"),
            ("final training loss", "final_loss", 1.0, ".3f"),
            ("CER, held-out voices", "cer", 100.0, ".2f"),
            ("WER, held-out voices", "wer", 100.0, ".2f"),
            ("CER, digit strings", "cer_digits", 100.0, ".2f"),
            ("WER, digit strings", "wer_digits", 100.0, ".2f")]
    names = list(per_backend)
    lines = ["| | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    for label, key, scale, fmt in rows:
        unit = " (%)" if scale == 100.0 else ""
        lines.append(f"| {label}{unit} | " + " | ".join(format(per_backend[n][key] * scale, fmt) for n in names) + " |")
    for decoder in recogniser_decoding.DECODERS[1:]:
        cers = (per_backend[n]["decoders"][decoder]["cer_digits"] * 100.0 for n in names)
        lines.append(f"| CER, digit strings, {decoder} (%) | " + " | ".join(f"{c:.2f}" for c in cers) + " |")
    if "seqfast" in per_backend and "torch" in per_backend:
        s, t = per_backend["seqfast"], per_backend["torch"]
        for label, key in (("training step", "train_step"), ("inference batch", "infer_batch")):
            lines.append(f"| torch / seqfast, {label}: wall-clock {t[key + '_s'] / s[key + '_s']:.2f}x, "
                         f"CPU time {t[key + '_cpu_s'] / s[key + '_cpu_s']:.2f}x | | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    size_name = "smoke" if args.smoke else "quick" if args.quick else "default"
    size = SIZES[size_name]
    out = Path(args.out)

    start = time.perf_counter()
    sets = {name: recogniser_training.load_utterances(getattr(size, name), args.cache)
            for name in ("train", "valid", "test")}
    data_seconds = time.perf_counter() - start
    data = {**_sizes("train", sets["train"]), **_sizes("valid", sets["valid"]), **_sizes("test", sets["test"]),
            "load_seconds": data_seconds}
    print(f"data ({data_seconds:.0f} s): {data['train_utterances']} training utterances "
          f"({data['train_hours']:.2f} h), {data['valid_utterances']} validation (training voices), "
          f"{data['test_utterances']} test (held-out voices)", flush=True)

    backends = ["seqfast", "torch"] if args.compare else [args.backend]
    per_backend, results = {}, {}
    for backend in backends:
        per_backend[backend], results[backend] = _run_backend(backend, size, sets, args)
    main_backend = backends[0]
    main_result = per_backend[main_backend]

    result = results[main_backend]
    plot_curves(out / "curves.png", {
        "training loss (CTC, per character)": [(s, v) for s, v in result.losses],
        "validation CER": [(s, c) for s, c, _ in result.valid],
        "validation WER": [(s, w) for s, _, w in result.valid],
    }, title=f"CTC recogniser ({main_backend}, {size_name} run)", log_y={"training loss (CTC, per character)"})
    test_sets = datasets.recogniser_set(size.test, args.cache)
    shown = next((i for i, t in enumerate(sets["test"].texts) if is_digit_string(t)), 0)
    plot_posteriors(out / "posteriors.png", result.model, test_sets.features(shown), sets["test"].features[shown],
                    sets["test"].texts[shown])
    torch.save({"config": asdict(size.model), "backend": main_backend, "state_dict": result.model.state_dict()},
               out / "model.pt")

    metrics = {
        "backend": main_backend, "size": size_name, "seed": args.seed,
        **{k: main_result[k] for k in ("cer", "wer", "cer_digits", "wer_digits", "cer_phrases", "wer_phrases")},
        "decoders": main_result["decoders"], "decoding": main_result["decoding"],
        "step_time_s": {b: m["train_step_s"] for b, m in per_backend.items()},
        "infer_batch_time_s": {b: m["infer_batch_s"] for b, m in per_backend.items()},
        "step_cpu_time_s": {b: m["train_step_cpu_s"] for b, m in per_backend.items()},
        "infer_batch_cpu_time_s": {b: m["infer_batch_cpu_s"] for b, m in per_backend.items()},
        "train_seconds": {b: m["train_seconds"] for b, m in per_backend.items()},
        "data": data,
        "model": asdict(size.model),
        "schedule": {"steps": args.steps or size.steps, "batch_size": size.batch_size, "peak_lr": size.peak_lr,
                     "warmup_steps": size.warmup_steps},
        "backends": per_backend,
    }
    path = write_metrics(out, metrics)
    if args.compare:
        table = comparison_table(per_backend)
        (out / "comparison.md").write_text(table)
        print(table)
    print(f"wrote {path}, {out / 'curves.png'}, {out / 'posteriors.png'}")
    return metrics


if __name__ == "__main__":
    main()
