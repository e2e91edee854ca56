"""What every validation group shares: the record file, the group's deadline, cases, timers and error measures.

A record is one JSON line appended (and flushed) to ``gpu_validate.jsonl`` as soon as it is known:
``{"group", "name", "status", "metrics", "seconds", "error", "shard", "dry_run", "time"}`` with status
``ok`` / ``fail`` / ``error`` / ``skip``. A worker that dies mid-group keeps everything it wrote before.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

RECORDS = "gpu_validate.jsonl"
STATUSES = ("error", "fail", "skip", "ok")  # the summary's order: failures first

# Messages after which the CUDA context is unusable: the rest of the group would only repeat the error.
_FATAL_CUDA = ("illegal memory access", "illegal address", "device-side assert", "unspecified launch failure",
               "misaligned address", "CUDA error: an illegal", "cudaErrorLaunchFailure", "CUBLAS_STATUS_EXECUTION")


class Stop(Exception):
    """Raised inside a worker when its time is up (SIGTERM from the parent) or its CUDA context is lost."""


_stop_requested = False


def request_stop() -> None:
    """Called by the worker's SIGTERM handler: no further case starts, even where the Stop raised in the middle
    of a library call comes back wrapped in another exception (Triton's interpreter does that)."""
    global _stop_requested
    _stop_requested = True


def _is_stop(exc: BaseException | None) -> bool:
    seen = 0
    while exc is not None and seen < 20:
        if isinstance(exc, Stop):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return _stop_requested


def append_record(out_dir: str | Path, record: dict[str, Any]) -> None:
    """Append one record to ``out_dir/gpu_validate.jsonl`` and flush it to the file at once."""
    data = (json.dumps(record, default=_json_default, allow_nan=True) + "\n").encode()
    # One write() on an O_APPEND descriptor: lines of workers running at once never interleave.
    fd = os.open(Path(out_dir) / RECORDS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def read_records(out_dir: str | Path) -> list[dict[str, Any]]:
    """Every record written so far (a torn last line, from a killed writer, is dropped)."""
    path = Path(out_dir) / RECORDS
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item") and callable(obj.item):
        try:
            return obj.item()
        except (ValueError, RuntimeError):
            pass
    return str(obj)


def error_text(exc: BaseException, limit: int = 1500) -> str:
    """The exception's last traceback lines, at most ``limit`` characters (the end, where the cause is)."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return text[-limit:]


class Case:
    """What one check collects: metrics, failures and an optional skip reason."""

    def __init__(self) -> None:
        self.metrics: dict[str, Any] = {}
        self.failures: list[str] = []
        self.skip_reason: str | None = None

    def check(self, ok: bool, message: str) -> bool:
        if not ok:
            self.failures.append(message)
        return ok

    def skip(self, reason: str) -> None:
        self.skip_reason = reason


class Context:
    """One group's worker: where records go, its deadline, and whether this is a CPU dry run.

    ``shard`` / ``shards``: a group run by several workers at once gives case i to worker i % shards
    (:meth:`run` skips the others silently).
    """

    def __init__(self, out_dir: str | Path, group: str, deadline: float, dry_run: bool,
                 shard: int = 0, shards: int = 1) -> None:
        self.out_dir = Path(out_dir)
        self.group = group
        self.deadline = deadline
        self.dry_run = dry_run
        self.shard, self.shards = shard, shards
        self.device = "cpu" if dry_run else "cuda"
        self._case_index = 0

    # ----------------------------------------------------------------------------------------- records

    def time_left(self) -> float:
        return self.deadline - time.time()

    def record(self, name: str, status: str, metrics: dict[str, Any] | None = None, error: str | None = None,
               seconds: float | None = None, group: str | None = None) -> None:
        assert status in STATUSES, status
        append_record(self.out_dir, {
            "group": group or self.group, "name": name, "status": status, "metrics": metrics or {},
            "seconds": None if seconds is None else round(seconds, 3), "error": error,
            "shard": self.shard if self.shards > 1 else None, "dry_run": self.dry_run, "time": round(time.time(), 3),
        })

    def mine(self) -> bool:
        """Whether the next case belongs to this shard (advances the case counter)."""
        index = self._case_index
        self._case_index += 1
        return index % self.shards == self.shard

    def run(self, name: str, fn: Callable[[Case], None], min_seconds: float = 2.0) -> Case | None:
        """Run one check ``fn(case)`` and record it: ok, fail (``case.failures``), skip, or error (an exception).

        Skipped without running when less than ``min_seconds`` are left. A CUDA error that poisons the context
        is recorded, then :class:`Stop` ends the group (the next group starts in a fresh process).
        """
        if not self.mine():
            return None
        if self.dry_run:
            min_seconds *= 0.25  # interpreter cases at tiny sizes take about a second
        if self.time_left() < min_seconds or _stop_requested:
            self.record(name, "skip", error=f"out of time ({self.time_left():.1f} s left in the group)")
            return None
        case = Case()
        start = time.perf_counter()
        try:
            fn(case)
            self.synchronize()
        except Stop:
            self.record(name, "error", case.metrics, "stopped: the group's time limit", time.perf_counter() - start)
            raise
        except Exception as exc:  # noqa: BLE001 (every failure of a check is a record, not the end of the run)
            if _is_stop(exc):
                self.record(name, "error", case.metrics, "stopped: the group's time limit",
                            time.perf_counter() - start)
                raise Stop("stopped: the group's time limit") from exc
            text = error_text(exc)
            self.record(name, "error", case.metrics, text, time.perf_counter() - start)
            if any(marker in text for marker in _FATAL_CUDA):
                raise Stop(f"CUDA context lost in {name}") from exc
            return case
        seconds = time.perf_counter() - start
        if case.skip_reason is not None:
            self.record(name, "skip", case.metrics, case.skip_reason, seconds)
        elif case.failures:
            self.record(name, "fail", case.metrics, "; ".join(case.failures)[:1500], seconds)
        else:
            self.record(name, "ok", case.metrics, None, seconds)
        return case

    # ----------------------------------------------------------------------------------------- device

    def synchronize(self) -> None:
        if not self.dry_run:
            import torch

            torch.cuda.synchronize()

    def seqfast_backend(self) -> contextlib.AbstractContextManager:
        """The backend seqfast calls run under: the dispatcher's own choice on CUDA (the Triton kernels), the
        Triton kernels forced on CPU in a dry run (through the interpreter, instead of the C++ kernels)."""
        if not self.dry_run:
            return contextlib.nullcontext()
        import seqfast

        return seqfast.backend("triton")

    def op(self, op: Any, *args: Any) -> Any:
        """Call a ``torch.ops.seqfast`` op under :meth:`seqfast_backend` (with its autograd)."""
        from seqfast import _backend

        return _backend.dispatch("triton" if self.dry_run else None, op, *args)

    def bench(self, fn: Callable[[], Any], grad_to_none: list | None = None, warmup_ms: int = 20,
              rep_ms: int = 60) -> dict[str, Any]:
        """Median (and 20 / 80 % quantiles) of ``fn``'s time in ms.

        CUDA: ``triton.testing.do_bench`` (CUDA events, L2 flushed between calls). Dry run: a CPU
        ``perf_counter`` over one call, labelled as such (numbers of no meaning beyond the code path).
        """
        if self.dry_run:
            times = []
            for _ in range(1):
                if grad_to_none:
                    for t in grad_to_none:
                        t.grad = None
                start = time.perf_counter()
                fn()
                times.append((time.perf_counter() - start) * 1e3)
            return {"median_ms": statistics.median(times), "p20_ms": min(times), "p80_ms": max(times),
                    "timer": "cpu perf_counter (dry run)"}
        import triton.testing

        try:
            q = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none,
                                        quantiles=[0.5, 0.2, 0.8])
            median, p20, p80 = (float(x) for x in q)
        except TypeError:  # a triton whose do_bench lacks these keywords: its plain call (mean)
            median = p20 = p80 = float(triton.testing.do_bench(fn))
        return {"median_ms": median, "p20_ms": p20, "p80_ms": p80, "timer": "triton do_bench (CUDA events)"}


# --------------------------------------------------------------------------------------------- error measures


def max_abs_err(got: Any, want: Any) -> float:
    """max |got - want| in float64; inf when ``got`` is NaN / inf where ``want`` is finite (or the reverse)."""
    import torch

    got, want = got.detach().double(), want.detach().double()
    if got.shape != want.shape:
        raise ValueError(f"shapes differ: {tuple(got.shape)} vs {tuple(want.shape)}")
    if got.numel() == 0:
        return 0.0
    both_nan = torch.isnan(got) & torch.isnan(want)
    same_inf = torch.isinf(got) & torch.isinf(want) & (got == want)
    diff = (got - want).abs()
    diff = torch.where(both_nan | same_inf, torch.zeros_like(diff), diff)
    diff = torch.nan_to_num(diff, nan=math.inf)
    return float(diff.max())


def max_abs(t: Any) -> float:
    import torch

    t = t.detach().double()
    finite = t[torch.isfinite(t)]
    return float(finite.abs().max()) if finite.numel() else 0.0


# Relative (to max |reference|) floor added to the bound: exact zeros (masked rows) give torch an error of 0;
# float32 is judged at about 1e-5 relative whatever torch's own float32 error.
_FLOOR = {"float16": 1e-6, "bfloat16": 1e-6, "float32": 1e-5, "float64": 1e-9}


def judge(case: Case, label: str, got: Any, reference: Any, baseline: Any | None, fallback_rel: float = 0.0,
          by_baseline: bool = True) -> None:
    """Check ``got`` against the float64 ``reference``: its error at most twice ``baseline``'s (torch's result
    in the same dtype) plus a small floor; without a baseline (or with ``by_baseline`` off: float32, judged on
    its own), at most ``fallback_rel`` x max |reference| plus the floor. ``got is None``: nothing to judge.

    Metrics ``<label>_err``, ``<label>_torch_err`` and ``<label>_ratio`` (seqfast / torch error) go to the case.
    """
    import torch

    if got is None or reference is None:
        return
    dtype = str(got.dtype).replace("torch.", "")
    scale = max(max_abs(reference), 1e-30)
    err = max_abs_err(got, reference)
    floor = _FLOOR.get(dtype, 1e-6) * scale
    case.metrics[f"{label}_err"] = _round(err / scale)
    if baseline is not None:
        base = max_abs_err(torch.nan_to_num(baseline.detach().double(), nan=0.0), reference)
        bound = 2.0 * base + floor if by_baseline else fallback_rel * scale + floor
        case.metrics[f"{label}_torch_err"] = _round(base / scale)
        case.metrics[f"{label}_ratio"] = _round(err / base) if base > 0 else None
    else:
        bound = fallback_rel * scale + floor
    case.check(err <= bound, f"{label}: error {err / scale:.3g} > bound {bound / scale:.3g} (relative to max |ref|)")


def _round(x: float | None) -> float | None:
    if x is None or not math.isfinite(x):
        return x
    return float(f"{x:.4g}")


# --------------------------------------------------------------------------------------------- compiled kernels


def compiled_kernels(fn: Any) -> Iterator[Any]:
    """The compiled kernels in a ``triton.jit`` function's in-memory caches.

    Triton 3.x keeps ``fn.device_caches[device]`` as a tuple whose first item is the key -> kernel dict (3.9 may
    hold a future while a kernel compiles); older releases kept ``fn.cache[device]`` as that dict.
    """
    caches = getattr(fn, "device_caches", None)
    if caches is None:
        caches = getattr(fn, "cache", None)
    if not isinstance(caches, dict):
        return
    for entry in list(caches.values()):
        table = entry
        if isinstance(entry, (tuple, list)):
            table = next((item for item in entry if isinstance(item, dict)), None)
        if not isinstance(table, dict):
            continue
        for kernel in list(table.values()):
            if not hasattr(kernel, "metadata") and hasattr(kernel, "result"):
                try:
                    kernel = kernel.result()
                except Exception:  # noqa: BLE001 (a compile that failed left no kernel)
                    continue
            if hasattr(kernel, "metadata"):
                yield kernel


def describe_kernel(kernel: Any, arg_names: list[str] | None = None) -> dict[str, Any]:
    """Registers, spills, shared memory, warps, stages and constexprs of one compiled kernel, read defensively
    (``n_regs`` / ``n_spills`` exist once the kernel was loaded on a device; names differ across releases)."""
    meta = kernel.metadata
    get = (lambda k: meta.get(k)) if isinstance(meta, dict) else (lambda k: getattr(meta, k, None))
    if getattr(kernel, "n_regs", None) is None and hasattr(kernel, "_init_handles"):
        with contextlib.suppress(Exception):
            kernel._init_handles()
    info = {
        "kernel": getattr(kernel, "name", None) or get("name"),
        "hash": str(getattr(kernel, "hash", None) or get("hash") or "")[:12],
        "regs": getattr(kernel, "n_regs", None),
        "spills": getattr(kernel, "n_spills", None),
        "shared": get("shared"),
        "warps": get("num_warps"),
        "stages": get("num_stages"),
        "maxnreg": get("maxnreg"),
    }
    info["constexprs"] = _constexprs(kernel, arg_names)
    return info


def _constexprs(kernel: Any, arg_names: list[str] | None) -> str:
    constants = getattr(getattr(kernel, "src", None), "constants", None)
    if not isinstance(constants, dict):
        return ""
    parts = []
    for key, value in constants.items():
        if isinstance(key, tuple) and len(key) == 1 and isinstance(key[0], int) and arg_names:
            key = arg_names[key[0]] if key[0] < len(arg_names) else key[0]
        elif isinstance(key, int) and arg_names and key < len(arg_names):
            key = arg_names[key]
        if isinstance(key, str) and key.isupper():
            parts.append(f"{key}={value}")
    return " ".join(parts)[:300]


def jit_functions(module: Any) -> list[Any]:
    """The ``triton.jit`` functions a module defines (anything with a JIT cache and argument names)."""
    found = []
    for name in sorted(vars(module)):
        obj = getattr(module, name)
        if hasattr(obj, "arg_names") and (hasattr(obj, "device_caches") or hasattr(obj, "cache")):
            found.append(obj)
    return found


def inventory(modules: list[Any]) -> list[dict[str, Any]]:
    """Every compiled variant held in the JIT caches of ``modules``' kernels."""
    variants = []
    for module in modules:
        for fn in jit_functions(module):
            for kernel in compiled_kernels(fn):
                try:
                    variants.append(describe_kernel(kernel, list(getattr(fn, "arg_names", []) or [])))
                except Exception as exc:  # noqa: BLE001
                    variants.append({"kernel": getattr(fn, "__name__", "?"), "error": repr(exc)[:200]})
    return variants
