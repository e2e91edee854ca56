"""Makes (or loads from the cache) the speech datasets and says how long it took.

    PYTHONPATH=. python -m examples.speech.generate --kind recogniser --split train --num 1000 [--cache DIR]
    PYTHONPATH=. python -m examples.speech.generate --kind trigger --split test --num 50 --workers 2
"""

from __future__ import annotations

import argparse
import time

from . import datasets, synth


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=["recogniser", "trigger"], default="recogniser")
    parser.add_argument("--split", choices=["train", "test"], default="train")
    parser.add_argument("--num", type=int, default=None, help="utterances or clips (default: the config's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default=None, help=f"cache directory (default {datasets.default_cache_dir()})")
    parser.add_argument("--workers", type=int, default=None, help="synthesis processes (default: CPU count)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    calls = synth.synth_calls
    if args.kind == "recogniser":
        config = datasets.RecogniserConfig(split=args.split, seed=args.seed)
        if args.num is not None:
            config = datasets.RecogniserConfig(split=args.split, seed=args.seed, num_utterances=args.num)
        data = datasets.recogniser_set(config, args.cache, args.workers)
        seconds_of_audio = data.waves.shape[0] / datasets.SAMPLE_RATE
    else:
        config = datasets.TriggerConfig(split=args.split, seed=args.seed)
        if args.num is not None:
            config = datasets.TriggerConfig(split=args.split, seed=args.seed, num_clips=args.num)
        data = datasets.trigger_set(config, args.cache, args.workers)
        seconds_of_audio = data.waves.numel() / datasets.SAMPLE_RATE
    elapsed = time.perf_counter() - start
    how = "generated" if data.generated else "loaded from the cache"
    print(f"{args.kind} {args.split}: {len(data)} items, {seconds_of_audio:.0f} s of audio, {how} in {elapsed:.2f} s "
          f"({len(data) / elapsed:.1f} items/s, {synth.synth_calls - calls} utterances synthesised)")
    print(f"file: {data.path}")


if __name__ == "__main__":
    main()
