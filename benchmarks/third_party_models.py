"""Hugging Face models under seqfast.patch_functional: equal outputs and gradients, and the step-time ratio.

For each model (BertForMaskedLM, GPT2LMHeadModel, Wav2Vec2ForCTC; sdpa attention; random weights built
from a config, no download; dropout 0 so that both runs compute the same function) one training step
(forward with labels, backward) runs unpatched and under ``seqfast.patch_functional()``, and once more
unpatched on a float64 copy of the model (the reference): the largest differences of loss, logits and
parameter gradients between patched and unpatched are reported, and each one's largest gradient error
against float64 (float32 rounding differs between the two; what matters is that seqfast's error is no
larger than torch's own). Then the median step time of each, timed alternately. Prints a markdown table.

Usage::

    python benchmarks/third_party_models.py [--steps 20] [--models bert,gpt2,wav2vec2] [--shape K=V,...]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

import seqfast
from seqfast.patching import TORCH_CTC_LOSS
from seqfast.profile import WORKLOADS, build_workload

MODELS = ("bert", "gpt2", "wav2vec2")


def _run(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    return out.loss.detach(), out.logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def _max_diff(a, b) -> float:
    return float((a - b).abs().max())


def measure(name: str, shape: dict[str, int], steps: int) -> dict:
    torch.manual_seed(0)
    w = build_workload(name, shape, device="cpu")
    model, batch = w.model, w.batch
    loss, logits, grads = _run(model, batch)
    with seqfast.patch_functional() as calls:
        loss_p, logits_p, grads_p = _run(model, batch)
    model64 = copy.deepcopy(model).double()
    batch64 = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
    # Wav2Vec2ForCTC takes log_softmax(logits, dtype=float32) even for a float64 model: the reference's CTC
    # would be float32 torch, the very computation under test. Its log-probabilities go to float64 here.
    F.ctc_loss = lambda log_probs, *args, **kwargs: TORCH_CTC_LOSS(log_probs.double(), *args, **kwargs)
    try:
        _, _, grads64 = _run(model64, batch64)
    finally:
        F.ctc_loss = TORCH_CTC_LOSS
    row = {
        "model": type(model).__name__,
        "shape": " ".join(f"{k}={v}" for k, v in {**WORKLOADS[name][0], **shape}.items()),
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "loss_diff": _max_diff(loss, loss_p),
        "logits_diff": _max_diff(logits, logits_p),
        "grad_diff": max(_max_diff(g, h) for g, h in zip(grads, grads_p)),
        "torch_err": max(_max_diff(g.double(), r) for g, r in zip(grads, grads64)),
        "seqfast_err": max(_max_diff(g.double(), r) for g, r in zip(grads_p, grads64)),
        "served": dict(calls.served),
        "fell_through": calls.total_fell_through,
    }
    times: dict[str, list[float]] = {"torch": [], "seqfast": []}
    for _ in range(2):
        w.torch_step()
        w.seqfast_step()
    for _ in range(steps):
        for provider, step in (("torch", w.torch_step), ("seqfast", w.seqfast_step)):
            start = time.perf_counter()
            step()
            times[provider].append(time.perf_counter() - start)
    row["torch_ms"] = statistics.median(times["torch"]) * 1e3
    row["seqfast_ms"] = statistics.median(times["seqfast"]) * 1e3
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--shape", default="", help="KEY=VALUE,... applied to every model (e.g. B=2)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    shape = {k: int(v) for k, v in (p.split("=") for p in args.shape.split(",") if p)}
    print(f"cpu, {torch.get_num_threads()} threads, torch {torch.__version__}, float32, training step "
          f"(forward + backward), median of {args.steps} steps each, alternating\n")
    print("| model | shape | params (M) | torch ms | patched ms | torch / patched | patched - torch, max abs: "
          "loss, logits, grads | max grad error vs float64: torch, patched | calls served by seqfast per step "
          "(fell through) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        r = measure(name, shape, args.steps)
        served = ", ".join(f"{k} {v}" for k, v in sorted(r["served"].items()))
        print(f"| {r['model']} | {r['shape']} | {r['params_M']:.2f} | {r['torch_ms']:.1f} | {r['seqfast_ms']:.1f} | "
              f"{r['torch_ms'] / r['seqfast_ms']:.2f}x | {r['loss_diff']:.1e}, {r['logits_diff']:.1e}, "
              f"{r['grad_diff']:.1e} | {r['torch_err']:.1e}, {r['seqfast_err']:.1e} | {served} "
              f"({r['fell_through']}) |", flush=True)


if __name__ == "__main__":
    main()
