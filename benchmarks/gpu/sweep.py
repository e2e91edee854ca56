"""Config sweep over the shared tuning interface of the kernel modules (``sweep``).

A module offers ``CONFIG_SPACE`` ({launch name: [config dict, ...]}) and ``forced_config(name, config)`` (a
context manager forcing that launch's config; unknown names raise ``ValueError``). For each launch and key
shape: the default config's output and time, then every candidate under ``forced_config``: its output must
equal the default's within a tolerance (else "rejected", not ranked; an exception is recorded as an error),
then its median time. A summary record per (launch, shape) gives the ranking and the best config.

A module without the interface is recorded as "skip: not offered". ``gpu.fake_tunable`` (a tiny module with
a deliberately wrong and a non-launchable config) runs first as a self-test of this engine.

Which op a launch name is timed through (the launch itself cannot be called alone):
- attention: "fwd", names starting with "fwd" or containing "forward" -> ``attention_forward`` on the training
  shapes (and the decode shape when no launch is named "decode"); names containing "decode" ->
  ``attention_forward`` on the decode shape (Lq=1) only; any other name ("dkdv", "dq", "dq_atomic", ...) ->
  ``attention_backward`` (out / lse from the default forward) on the training shapes.
- ctc_loss: names containing "back", "bwd" or "grad" -> ``ctc_loss_backward``; "lse" -> ``ctc_loss_forward`` from
  logits; others -> ``ctc_loss_forward``. Attention names containing "atomic" run the backward with
  ``SEQFAST_ATTENTION_BWD=atomic``.
Outputs must match the default config's within 2e-2 (bf16 forward) / 5e-2 (bf16 gradients) / 1e-4 (fp32) of
their max |value|.

Attention's summary records also carry ``metrics["autotune"]``: the cache entry (``kernels.attention``'s
``autotune_entry``) that makes ``SEQFAST_ATTENTION_AUTOTUNE=1`` take the winner (the default where no candidate
beat it) for that key; ``SEQFAST_ATTENTION_AUTOTUNE_CACHE=DIR/gpu_validate.jsonl`` reads them straight from the
run's output.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gpu.runtime import Case, Context, Stop, error_text, max_abs, max_abs_err


@dataclass
class Target:
    """One key shape of a launch: ``prepare()`` builds the inputs once, ``run(state)`` launches the op (the
    launch under test among its kernels) and returns the output tensors compared across configs."""

    shape_key: str
    prepare: Callable[[], Any]
    run: Callable[[Any], tuple]
    tol: float  # max |out - default out| / max |default out|
    # Keyword arguments of the module's autotune_entry (dtype, head_dim, max_lq, max_lk, causal, ...): where
    # given, the winner is also recorded as an autotuning cache entry (metrics["autotune"]).
    tune: dict[str, Any] | None = None


def offers_interface(module: Any) -> bool:
    return isinstance(getattr(module, "CONFIG_SPACE", None), dict) and callable(getattr(module, "forced_config",
                                                                                        None))


def _rel_diff(outs: tuple, ref: tuple) -> float:
    worst = 0.0
    for a, b in zip(outs, ref):
        if a is None or b is None or a.numel() == 0:
            continue
        worst = max(worst, max_abs_err(a, b) / max(max_abs(b), 1e-30))
    return worst


def _config_label(config: dict) -> str:
    return json.dumps(config, sort_keys=True, separators=(",", ":"))


def sweep_target(ctx: Context, label: str, module: Any, kernel: str, configs: list[dict], target: Target,
                 write: bool = True) -> dict[int, str]:
    """Sweep one launch on one key shape; returns {config index: "ranked" / "rejected" / "error" / "skipped"}."""
    outcomes: dict[int, str] = {}
    state = target.prepare()
    default_out = target.run(state)
    ctx.synchronize()
    default_ms = ctx.bench(lambda: target.run(state))["median_ms"]
    timings: list[tuple[float, int]] = []
    for i, config in enumerate(configs):
        name = f"{label}.{kernel} @ {target.shape_key} #{i} {_config_label(config)}"

        def trial(c: Case, i=i, config=config) -> None:
            c.metrics["config"] = _config_label(config)
            with module.forced_config(kernel, config):
                out = target.run(state)
                ctx.synchronize()
                diff = _rel_diff(out, default_out)
                c.metrics["rel_diff_vs_default"] = float(f"{diff:.3g}")
                if not c.check(diff <= target.tol, f"output differs from the default config's by {diff:.3g} "
                                                   f"(tolerance {target.tol:g}): not ranked"):
                    outcomes[i] = "rejected"
                    return
                t = ctx.bench(lambda: target.run(state))
            c.metrics["median_ms"] = round(t["median_ms"], 4)
            c.metrics["vs_default"] = round(default_ms / t["median_ms"], 3)
            timings.append((t["median_ms"], i))
            outcomes[i] = "ranked"

        if write:
            case = ctx.run(name, trial, min_seconds=2.0)
            if case is None:
                outcomes[i] = "skipped"
        else:
            try:
                trial(Case())
            except Exception:  # noqa: BLE001 (the self-test expects some configs to fail to launch)
                pass
        outcomes.setdefault(i, "error")
    timings.sort()
    summary = {"default_ms": round(default_ms, 4), "ranked": len(timings),
               "rejected": sum(v == "rejected" for v in outcomes.values()),
               "errors": sum(v == "error" for v in outcomes.values())}
    if timings:
        best_ms, best = timings[0]
        summary.update(best_config=_config_label(configs[best]), best_ms=round(best_ms, 4),
                       best_vs_default=round(default_ms / best_ms, 3),
                       ranking=" < ".join(f"#{i} {ms:.4f}" for ms, i in timings))
    if target.tune is not None and callable(getattr(module, "autotune_entry", None)):
        # The launch SEQFAST_ATTENTION_AUTOTUNE should take for this key: the best candidate if it beat the
        # default, else the default. gpu_validate.jsonl then serves as the autotuning cache file as it is.
        winner = configs[timings[0][1]] if timings and timings[0][0] < default_ms else None
        summary["autotune"] = module.autotune_entry(kernel, winner, ctx.device, **target.tune)
    if write:
        ctx.record(f"{label}.{kernel} @ {target.shape_key}: best", "ok" if timings else "fail", summary,
                   None if timings else "no config passed the check")
    return outcomes


def sweep_module(ctx: Context, label: str, module: Any, targets: Callable[[str], list[Target]],
                 max_configs: int | None = None, space: dict[str, list[dict]] | None = None,
                 shapes: list[str] | None = None) -> None:
    """Sweep every launch of ``module.CONFIG_SPACE``, or of ``space`` (launch -> configs) where given, on the
    key shapes whose name holds one of ``shapes`` (default: all)."""
    if not offers_interface(module):
        missing = [n for n in ("CONFIG_SPACE", "forced_config") if not hasattr(module, n)]
        ctx.record(f"{label}", "skip", error=f"not offered (no {' / '.join(missing) or 'valid interface'})")
        return

    def interface(c: Case) -> None:
        space = module.CONFIG_SPACE
        c.metrics["launches"] = ",".join(sorted(space))
        c.metrics["configs"] = sum(len(v) for v in space.values())
        c.check(all(isinstance(k, str) and isinstance(v, list) and all(isinstance(x, dict) for x in v)
                    for k, v in space.items()), "CONFIG_SPACE is not {str: [dict, ...]}")
        try:
            with module.forced_config("__no_such_launch__", {}):
                pass
            c.check(False, "forced_config accepted an unknown launch name (ValueError expected)")
        except ValueError:
            pass

    ctx.run(f"{label} interface", interface, min_seconds=1.0)
    # The first key shape of every launch before the second of any: a budget cut still covers each launch.
    space = module.CONFIG_SPACE if space is None else space
    pairs = [(rank, kernel, target) for kernel in space for rank, target in enumerate(targets(kernel))
             if shapes is None or any(s in target.shape_key for s in shapes)]
    for _, kernel, target in sorted(pairs, key=lambda p: p[0]):
        chosen = list(space[kernel])[: max_configs or None]
        if ctx.time_left() < 5.0:
            ctx.record(f"{label}.{kernel} @ {target.shape_key}", "skip", error="out of time")
            continue
        try:
            sweep_target(ctx, label, module, kernel, chosen, target)
        except Stop:
            raise
        except Exception as exc:  # noqa: BLE001 (the default config itself failed: recorded, sweep goes on)
            ctx.record(f"{label}.{kernel} @ {target.shape_key}", "error", error=error_text(exc))


# --------------------------------------------------------------------------------------------- the modules


def _fake_targets(ctx: Context, module: Any) -> Callable[[str], list[Target]]:
    import torch

    def prepare():
        return torch.randn(64, 1000 if not ctx.dry_run else 100, device=ctx.device)

    return lambda kernel: [Target("R64 C1000" if not ctx.dry_run else "R64 C100", prepare,
                                  lambda x: (module.scaled_rows(x, 0.5),), 1e-6)]


def _is_forward(kernel: str) -> bool:
    return kernel == "fwd" or kernel.startswith("fwd") or "decode" in kernel or "forward" in kernel


def _attention_targets(ctx: Context, module: Any) -> Callable[[str], list[Target]]:
    import torch

    from seqfast.ops import attention as ops

    if ctx.dry_run:
        shapes = [("fp32 B1 H2 L24 D16 causal", torch.float32, 1, 2, 2, 24, 24, 16, 1)]
        decode = [("fp32 decode B2 Hq4 Hk2 Lq1 Lk24 D16", torch.float32, 2, 4, 2, 1, 24, 16, 0)]
    else:
        shapes = [("bf16 B4 H16 L4096 D128 causal", torch.bfloat16, 4, 16, 16, 4096, 4096, 128, 1),
                  ("bf16 B8 H32 L2048 D64 dense", torch.bfloat16, 8, 32, 32, 2048, 2048, 64, 0)]
        decode = [("bf16 decode B32 Hq32 Hk8 Lq1 Lk8192 D128", torch.bfloat16, 32, 32, 8, 1, 8192, 128, 0)]
    seed = torch.tensor(0)

    def prepare_for(shape, backward):
        _, dtype, B, Hq, Hk, Lq, Lk, D, causal = shape

        def prepare():
            g = torch.Generator(device=ctx.device).manual_seed(1)
            q = torch.randn(B, Hq, Lq, D, device=ctx.device, dtype=dtype, generator=g)
            k = torch.randn(B, Hk, Lk, D, device=ctx.device, dtype=dtype, generator=g)
            v = torch.randn(B, Hk, Lk, D, device=ctx.device, dtype=dtype, generator=g)
            state = {"q": q, "k": k, "v": v, "causal": causal, "scale": D ** -0.5}
            if backward:
                state["out"], state["lse"] = ctx.op(ops.FORWARD, q, k, v, None, 0.0, causal, D ** -0.5, seed)
                state["go"] = torch.randn_like(state["out"])
            return state
        return prepare

    def forward(s):
        return ctx.op(ops.FORWARD, s["q"], s["k"], s["v"], None, 0.0, s["causal"], s["scale"], seed)

    def backward(s):
        return ctx.op(ops.BACKWARD, s["go"], s["q"], s["k"], s["v"], None, s["out"], s["lse"], 0.0, s["causal"],
                      s["scale"], seed, False)[:3]

    def tol(shape, bwd):
        return 1e-4 if shape[1] == torch.float32 else (0.05 if bwd else 0.02)

    has_decode = any("decode" in k for k in getattr(module, "CONFIG_SPACE", {}))

    def atomic_backward(s):
        # The atomic dK/dV launch runs only when the backward is switched to it.
        old = os.environ.get("SEQFAST_ATTENTION_BWD")
        os.environ["SEQFAST_ATTENTION_BWD"] = "atomic"
        try:
            return backward(s)
        finally:
            if old is None:
                del os.environ["SEQFAST_ATTENTION_BWD"]
            else:
                os.environ["SEQFAST_ATTENTION_BWD"] = old

    def tune(shape):
        _, dtype, _, _, _, Lq, Lk, D, causal = shape
        return {"dtype": dtype, "head_dim": D, "max_lq": Lq, "max_lk": Lk, "causal": bool(causal)}

    def targets(kernel: str) -> list[Target]:
        if "decode" in kernel:
            return [Target(s[0], prepare_for(s, False), forward, tol(s, False)) for s in decode]
        if _is_forward(kernel):
            chosen = shapes + ([] if has_decode else decode)
            return [Target(s[0], prepare_for(s, False), forward, tol(s, False), tune(s) if s[5] > 1 else None)
                    for s in chosen]
        run = atomic_backward if "atomic" in kernel else backward
        return [Target(s[0], prepare_for(s, True), run, tol(s, True), tune(s)) for s in shapes]

    return targets


def _ctc_targets(ctx: Context, module: Any) -> Callable[[str], list[Target]]:
    import torch

    from seqfast.ops import ctc_loss as ops

    shapes = [(1000, 32, 1000, 200), (4000, 8, 64, 1200)] if not ctx.dry_run else [(6, 2, 5, 2)]

    def prepare_for(shape, backward):
        T, N, C, S = shape

        def prepare():
            g = torch.Generator(device=ctx.device).manual_seed(2)
            lp = torch.randn(T, N, C, device=ctx.device, generator=g).log_softmax(2)
            tg = torch.randint(1, C, (N, S), device=ctx.device, generator=g)
            il = torch.full((N,), T, device=ctx.device)
            tl = torch.full((N,), S, device=ctx.device)
            state = {"args": (lp, tg, il, tl)}
            if backward:
                state["nll"], state["alpha"] = ctx.op(ops.FORWARD, lp, tg, il, tl, 0, False, False, True)
                state["g"] = torch.ones(N, device=ctx.device, dtype=state["nll"].dtype)
            return state
        return prepare

    def forward(s):
        return ctx.op(ops.FORWARD, *s["args"], 0, False, False, True)[:1]

    def forward_from_logits(s):
        # The row log-sum-exp launch ("lse") runs only for logits.
        return ctx.op(ops.FORWARD, *s["args"], 0, False, True, True)[:1]

    def backward(s):
        lp, tg, il, tl = s["args"]
        return (ctx.op(ops.BACKWARD, s["g"], lp, tg, il, tl, s["nll"], s["alpha"], 0, False, False),)

    def targets(kernel: str) -> list[Target]:
        # The gradient rows ("grad") are written by the backward op.
        bwd = "back" in kernel or "bwd" in kernel or "grad" in kernel
        run = backward if bwd else (forward_from_logits if "lse" in kernel else forward)
        return [Target("T{} N{} C{} S{}".format(*s), prepare_for(s, bwd), run, 1e-4) for s in shapes]

    return targets


# A JSON file ({"attention": {launch: [config, ...]}, "ctc_loss": {...}, "shapes": [name part, ...]}) whose
# candidates replace the modules' CONFIG_SPACE: a hardware run can then try tiles outside the spill-free space
# (and only the launches / shapes named) without touching the kernels. Modules it does not name are skipped.
SPACE_ENV = "SEQFAST_GPU_SWEEP_SPACE"


def candidate_spaces() -> tuple[dict[str, dict[str, list[dict]]] | None, list[str] | None]:
    """(module name -> launch -> configs, shape name parts) from the file named by SEQFAST_GPU_SWEEP_SPACE, or
    (None, None) when it is not set."""
    path = os.environ.get(SPACE_ENV, "").strip()
    if not path:
        return None, None
    with open(path) as f:
        spaces = json.load(f)
    shapes = spaces.pop("shapes", None)
    return spaces, shapes


def sweep(ctx: Context) -> None:
    from seqfast import _triton

    fake = importlib.import_module("gpu.fake_tunable")

    def self_test(c: Case) -> None:
        for kernel, configs in fake.CONFIG_SPACE.items():
            for target in _fake_targets(ctx, fake)(kernel):
                outcomes = sweep_target(ctx, "fake_tunable", fake, kernel, configs, target, write=False)
                c.metrics[f"{kernel} outcomes"] = ", ".join(f"#{i} {o}" for i, o in sorted(outcomes.items()))
                c.check(outcomes == fake.EXPECTED[kernel], f"expected {fake.EXPECTED[kernel]}, got {outcomes}")

    ctx.run("self-test on gpu.fake_tunable", self_test, min_seconds=3.0)
    probe = __import__("torch").empty(0, device=ctx.device)
    stand_in_launches = {"attention": ("fwd", "dkdv"), "ctc_loss": ("backward",)}
    spaces, shapes = candidate_spaces()
    for name, make_targets in (("attention", _attention_targets), ("ctc_loss", _ctc_targets)):
        if spaces is not None and name not in spaces:
            ctx.record(f"kernels.{name}", "skip", error=f"not in {SPACE_ENV}")
            continue
        module = _triton.kernels(name, probe)
        sweep_module(ctx, f"kernels.{name}", module, make_targets(ctx, module),
                     max_configs=2 if ctx.dry_run else None, space=None if spaces is None else spaces[name],
                     shapes=shapes)
        if ctx.dry_run and not offers_interface(module):
            # Prove this module's shapes, runs and comparisons before a GPU meets them: the same sweep through
            # a stand-in interface whose one config changes nothing.
            stand_in = _StandIn(stand_in_launches[name])
            sweep_module(ctx, f"kernels.{name} (stand-in interface)", stand_in, make_targets(ctx, stand_in))


class _StandIn:
    """The tuning interface with one empty config per launch and a ``forced_config`` that forces nothing."""

    def __init__(self, launches: tuple[str, ...]) -> None:
        self.CONFIG_SPACE = {name: [{}] for name in launches}

    def forced_config(self, kernel: str, config: dict):
        import contextlib

        if kernel not in self.CONFIG_SPACE:
            raise ValueError(f"unknown kernel {kernel!r}")
        return contextlib.nullcontext()
