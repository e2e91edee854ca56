"""Trigger-word detector on synthesised speech: a causal convolutional front end and causal seqfast attention
layers, trained to fire just after the word "activate", evaluated on held-out voices and noise, and checked to
run streaming (chunked inference with cached keys and values) with the offline pass's outputs.

    python examples/trigger_word.py [--quick | --smoke] [--backend seqfast|torch] [--out DIR]

Writes DIR/metrics.json (detection rate, false alarms per hour at the chosen threshold, the ROC, step times of
both backends), DIR/curves.png, DIR/roc.png, DIR/clip.png and the trained weights DIR/model.pt.
See examples/speech/README.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from examples.common import add_common_arguments, plot_curves, seed_everything, write_metrics
from examples.speech import datasets, detection_metrics, detector_data, detector_plots, detector_training, streaming
from examples.speech.detector_model import DetectorConfig, TriggerDetector, set_backend
from examples.speech.detector_training import TrainConfig

ESPEAK_INSTALL = "pip install -r examples/requirements.txt"


def _require_espeak() -> None:
    """The clips are synthesised with espeak-ng: say how to install it rather than fail deep inside."""
    try:
        import ctypes

        import espeakng_loader

        ctypes.CDLL(espeakng_loader.get_library_path())
    except (ImportError, OSError) as exc:
        raise SystemExit(f"error: the espeak-ng library cannot load ({exc}); the speech examples synthesise their "
                         f"data with it. Install it with: {ESPEAK_INSTALL}") from exc


def _size(args: argparse.Namespace) -> str:
    return "smoke" if args.smoke else "quick" if args.quick else "full"


def run(args: argparse.Namespace) -> dict:
    """Train, evaluate, check streaming, time both backends; returns the metrics written to DIR/metrics.json."""
    _require_espeak()
    size = _size(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    model_cfg, train_cfg, timing_rounds = _presets(size)
    if args.steps:
        train_cfg = replace(train_cfg, steps=args.steps)
    if args.d_model:
        model_cfg = replace(model_cfg, d_model=args.d_model, ffn=2 * args.d_model)
    gen = seed_everything(args.seed)

    t0 = time.perf_counter()
    k = model_cfg.downsample
    sets = detector_data.detector_sets(size, args.seed, args.train_data)
    window = sets.test.label_window // k
    data = {name: detector_data.load_sets(cfgs, k, window, args.workers) for name, cfgs in sets.items()}
    data_seconds = time.perf_counter() - t0
    print(f"data: {', '.join(f'{n} {len(d)} clips' for n, d in data.items())} ({data_seconds:.1f} s)")
    base_rules = detection_metrics.DetectionRules(hop=sets.test.label_hop * k, window=window)

    model = TriggerDetector(model_cfg)
    model.set_normalisation(data["train"].features)
    set_backend(model, args.backend)
    print(f"model: {sum(p.numel() for p in model.parameters())} parameters, backend {args.backend}, "
          f"{train_cfg.steps} steps of {train_cfg.batch} crops")
    t1 = time.perf_counter()
    history = detector_training.train(model, data["train"], data["validation"], train_cfg, base_rules, gen,
                                      desc=f"train ({args.backend})")
    train_seconds = time.perf_counter() - t1

    # Operating point (smoothing and threshold) from the validation clips and validation background (training
    # voices, unseen clips); the figures from the held-out ones.
    probs = {name: detector_training.predict(model, data[name].features, train_cfg.batch)
             for name in ("validation", "validation_background", "test", "background")}

    def as_set(name: str) -> tuple[torch.Tensor, list[list[int]], float]:
        return probs[name], data[name].trigger_ends, data[name].seconds

    rules, chosen_val, smoothing_choice = detection_metrics.choose_operating_point(
        [as_set("validation"), as_set("validation_background")], base_rules, args.max_false_alarms)
    threshold = chosen_val.threshold
    held_out_roc = detection_metrics.roc([as_set("test"), as_set("background")], rules)
    held_out = next(p for p in held_out_roc if p.threshold == threshold)
    fa_low, fa_high = detection_metrics.poisson_interval(held_out.false_alarms)
    test_only = detection_metrics.score(*as_set("test"), threshold, rules)
    background_only = detection_metrics.score(*as_set("background"), threshold, rules)

    # Streaming: one held-out clip fed 1 frame and 25 frames at a time against the offline pass.
    clip_feats = data["test"].features[:1]
    offline = probs["test"][:1]
    stream_diff = {str(c): float((streaming.stream_in_chunks(model, clip_feats, c) - offline).abs().max())
                   for c in (1, 25)}

    timing = detector_training.time_backends(model, data["train"], data["test"], train_cfg, timing_rounds, gen)
    own_step = float(np.median(history.step_seconds)) if history.step_seconds else None

    out.mkdir(parents=True, exist_ok=True)
    torch.save({"config": asdict(model_cfg), "state_dict": model.state_dict()}, out / "model.pt")
    plot_curves(out / "curves.png", {
        "training loss (BCE)": history.loss,
        "validation loss": history.val_loss,
        "validation detection rate @0.5": history.val_detection,
        "validation false alarms/h @0.5": history.val_false_alarms,
    }, title=f"trigger-word detector ({args.backend}, {size})")
    detector_plots.plot_roc(out / "roc.png", held_out_roc, held_out,
                            title=f"held-out voices: {len(data['test'])} clips + {len(data['background'])} background")
    i = _clip_to_plot(data["test"].trigger_ends)
    detector_plots.plot_clip(
        out / "clip.png", data["test"].features[i], probs["test"][i],
        detection_metrics.smooth(probs["test"][i].numpy(), rules.smooth), data["test"].trigger_ends[i],
        data["test"].words[i], threshold, datasets.SAMPLE_RATE, sets.test.label_hop, rules.hop,
        title=f"held-out clip {i}: log-mel and P(trigger) (red: trigger ends)")

    metrics = {
        "example": "trigger_word",
        "backend": args.backend,
        "size": size,
        "seed": args.seed,
        "detection_rate": held_out.detection_rate,
        "false_alarms_per_hour": held_out.false_alarms_per_hour,
        "false_alarms_per_hour_ci95": [fa_low / held_out.hours, fa_high / held_out.hours],
        "held_out_hours": held_out.hours,
        "threshold": threshold,
        "smoothing": rules.smooth,
        "smoothing_choice": smoothing_choice,
        "train_data": args.train_data,
        "held_out": _score_dict(held_out),
        "held_out_trigger_clips": _score_dict(test_only),
        "held_out_background_clips": _score_dict(background_only),
        "validation_at_threshold": _score_dict(chosen_val),
        "roc": [_score_dict(p) for p in held_out_roc],
        "streaming_max_abs_diff": stream_diff,
        "train_step_s": own_step,
        "step_times": timing,
        "train_seconds": train_seconds,
        "data_seconds": data_seconds,
        "final_loss": float(np.mean([v for _, v in history.loss[-20:]])),
        "first_loss": float(np.mean([v for _, v in history.loss[:5]])),
        "loss_curve": history.loss,
        "validation_curve": {"loss": history.val_loss, "detection_rate": history.val_detection,
                             "false_alarms_per_hour": history.val_false_alarms},
        "model": asdict(model_cfg),
        "training": asdict(train_cfg),
        "rules": asdict(rules),
        "sets": {name: len(d) for name, d in data.items()},
    }
    path = write_metrics(out, metrics)
    _print_summary(metrics, path)
    return metrics


def _presets(size: str) -> tuple[DetectorConfig, TrainConfig, int]:
    """Model, training and timing rounds of a run size."""
    if size == "smoke":  # no frequency masking: in 40 steps the loss should fall clearly (the test checks it)
        return (DetectorConfig(d_model=32, heads=2, layers=2, ffn=64, conv_strides=(2, 2, 2), dropout=0.0),
                TrainConfig(steps=40, batch=8, crop_frames=200, lr=3e-3, warmup=5, eval_every=20, freq_masks=0), 2)
    model = DetectorConfig(d_model=64, heads=4, layers=3, ffn=128, conv_strides=(2, 2, 2), dropout=0.0)
    if size == "quick":
        return model, TrainConfig(steps=1000, batch=16, crop_frames=600, eval_every=100), 5
    return model, TrainConfig(steps=4000, batch=16, crop_frames=600, eval_every=200), 10


def _clip_to_plot(ends: list[list[int]]) -> int:
    """The first clip with the most triggers (at most 2: the plot should also show background)."""
    counts = [min(len(e), 2) for e in ends]
    return int(np.argmax(counts)) if counts else 0


def _score_dict(s: detection_metrics.Score) -> dict:
    return {"threshold": s.threshold, "detection_rate": s.detection_rate,
            "false_alarms_per_hour": s.false_alarms_per_hour, "triggers": s.triggers, "detected": s.detected,
            "false_alarms": s.false_alarms, "hours": s.hours}


def _print_summary(m: dict, path: Path) -> None:
    h, v = m["held_out"], m["validation_at_threshold"]
    low, high = m["false_alarms_per_hour_ci95"]
    print(f"validation ({v['hours']:.2f} h): detection {v['detection_rate']:.1%} ({v['detected']}/{v['triggers']}), "
          f"{v['false_alarms']} false alarms at threshold {m['threshold']:.4g}, smoothing {m['smoothing']}")
    print(f"held-out ({m['sets']['test']} clips + {m['sets']['background']} background, {h['hours']:.3f} h): "
          f"detection {h['detection_rate']:.1%} ({h['detected']}/{h['triggers']}), "
          f"{h['false_alarms_per_hour']:.2f} false alarms/h ({h['false_alarms']}; 95 % interval {low:.2f}-{high:.2f})")
    print(f"streaming vs offline, max |diff|: {m['streaming_max_abs_diff']}")
    print(f"training: {m['train_seconds']:.0f} s, loss {m['first_loss']:.4f} -> {m['final_loss']:.4f}, "
          f"median step {m['train_step_s']:.3f} s ({m['backend']})")
    for b, t in m["step_times"].items():
        ms = {key: value * 1e3 for key, value in t.items()}
        print(f"  {b:8s} train step {ms['train_step_s']:8.1f} ms (CPU {ms['train_step_cpu_s']:7.1f} ms)   "
              f"inference batch {ms['inference_batch_s']:8.1f} ms (CPU {ms['inference_batch_cpu_s']:7.1f} ms)")
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, default_out="runs/trigger_word")
    parser.add_argument("--steps", type=int, default=None, help="override the size's number of training steps")
    parser.add_argument("--d-model", type=int, default=None,
                        help="override the size's model width (feed-forward width twice it)")
    parser.add_argument("--workers", type=int, default=None, help="synthesis processes (default: the CPUs)")
    parser.add_argument("--max-false-alarms", type=float, default=1.0,
                        help="false alarms per hour allowed on the validation clips when choosing the threshold")
    parser.add_argument("--train-data", choices=detector_data.TRAIN_DATA, default="hard-negatives",
                        help="training clips: the plain sets, twice as many, or the plain sets plus as many "
                             "with words that sound like the trigger word among the distractors")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
