"""Step times of the recogniser on both backends, interleaved: the same batches, torch and seqfast taking turns
(the order flips every round), so a change in the machine's load falls on both alike.

    PYTHONPATH=. python -m examples.speech.time_recogniser_steps [--rounds 3] [--batches 12] [--threads 1]

Prints the median wall-clock and process CPU time per training step (forward, CTC loss, backward, AdamW) and
per inference batch (eval mode, no gradients) for each backend.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from . import recogniser_training as rt
from .recogniser_model import ctc_loss

BACKENDS = ("torch", "seqfast")


def measure(rounds: int, num_batches: int, batch_size: int, size: str = "quick",
            cache_dir: str | None = None) -> dict[str, dict[str, float]]:
    """Median seconds per backend: keys train_wall, train_cpu, infer_wall, infer_cpu, over the validation set
    of run size `size`. The first 2 batches of every round are warm-up and not counted."""
    run = rt.SIZES[size]
    data = rt.load_utterances(run.valid, cache_dir)
    order = rt.length_sorted_batches(data, batch_size, torch.Generator().manual_seed(0))
    batches = [rt.collate(data, next(order)) for _ in range(num_batches)]
    models = {b: rt.build_model(run.model, b, seed=0) for b in BACKENDS}
    optimisers = {b: torch.optim.AdamW(m.parameters(), 1e-4) for b, m in models.items()}
    samples: dict[str, dict[str, list[float]]] = {b: {} for b in BACKENDS}
    for r in range(rounds):
        for backend in BACKENDS if r % 2 == 0 else BACKENDS[::-1]:
            model, optimiser = models[backend], optimisers[backend]
            for i, batch in enumerate(batches):
                model.train()
                wall, cpu = time.perf_counter(), time.process_time()
                logits, out_lengths = model(batch.features, batch.lengths)
                loss = ctc_loss(backend, logits, batch.targets, out_lengths, batch.target_lengths)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                train = (time.perf_counter() - wall, time.process_time() - cpu)
                model.eval()
                wall, cpu = time.perf_counter(), time.process_time()
                with torch.no_grad():
                    model(batch.features, batch.lengths)
                infer = (time.perf_counter() - wall, time.process_time() - cpu)
                if i >= 2:
                    for key, value in zip(("train_wall", "train_cpu", "infer_wall", "infer_cpu"), train + infer):
                        samples[backend].setdefault(key, []).append(value)
    return {b: {k: statistics.median(v) for k, v in s.items()} for b, s in samples.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    medians = measure(args.rounds, args.batches, args.batch_size)
    print("| backend | training step, wall (ms) | training step, CPU (ms) | inference batch, wall (ms) | "
          "inference batch, CPU (ms) |")
    print("| --- | --- | --- | --- | --- |")
    for backend, m in medians.items():
        print(f"| {backend} | {m['train_wall'] * 1e3:.1f} | {m['train_cpu'] * 1e3:.1f} | {m['infer_wall'] * 1e3:.1f} | "
              f"{m['infer_cpu'] * 1e3:.1f} |")


if __name__ == "__main__":
    main()
