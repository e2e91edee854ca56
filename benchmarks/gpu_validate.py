#!/usr/bin/env python3
"""One-shot GPU validation and timing of seqfast's Triton kernels, made to survive anything a first GPU run
can throw at it.

    python3 benchmarks/gpu_validate.py --out DIR [--dry-run] [--budget-s 450] [--only GROUP,...]

Groups (``benchmarks/gpu/groups.py``), in priority order: facts, attention_correctness, ctc_correctness,
ctc_decoding, opcheck, determinism, big_tensor, attention_timing, ctc_timing, profile_split, registers, sweep.

Each group runs in its own worker process (forked from this one after torch / triton / seqfast are imported,
before any CUDA call; or, with ``--spawn`` or when those imports fail here, a fresh ``--worker GROUP``
process), with a time limit drawn from what is left of the budget. A worker that crashes (segfault, illegal
address, Python error) or outruns its limit (SIGTERM, then SIGKILL) costs its own group only; the next group
starts in a fresh process. What comes out, in DIR (3 files):

- ``gpu_validate.jsonl``: one JSON record per line, appended as each result is known (group, name, status
  ok / fail / error / skip, metrics, seconds, error text);
- ``gpu_validate.md``: the summary, rewritten after every group (so it exists whenever the run stops);
- ``gpu_validate_workers.log``: the workers' stdout and stderr.

``--dry-run`` runs the same code on CPU through Triton's interpreter (``TRITON_INTERPRET=1``) with tiny shapes,
a CPU timer and a small budget: it proves the script before a GPU touches it. Stdlib only at import time.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for _path in (str(ROOT), str(BENCH)):  # seqfast from the checkout, the gpu package beside this file
    if _path not in sys.path:
        sys.path.insert(0, _path)

from gpu import report  # noqa: E402
from gpu.groups import BY_NAME, GROUPS  # noqa: E402

LOG = "gpu_validate_workers.log"
DEFAULT_BUDGET_S = 450.0  # ends well inside 8 minutes, also when every group runs to its limit
DRY_RUN_BUDGET_S = 120.0  # the dry run ends when its work is done, about a minute on 2 cores
SUMMARY_RESERVE_S = 3.0  # kept back at the end for the last summary
STOP_GRACE_S = 3.0  # between SIGTERM and SIGKILL of a worker past its time limit


class Interrupted(Exception):
    """SIGTERM / SIGINT to the parent: stop the running workers, write the summary, exit."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", help="output folder (created); required except with --list")
    p.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny shapes, CPU timer")
    p.add_argument("--budget-s", type=float, default=None,
                   help=f"wall-clock budget of the whole run (default {DEFAULT_BUDGET_S:g}; dry run "
                        f"{DRY_RUN_BUDGET_S:g})")
    p.add_argument("--only", default="", help="comma-separated groups to run (default: all), e.g. facts,opcheck")
    p.add_argument("--spawn", action="store_true", help="start each worker as a fresh process instead of a fork")
    p.add_argument("--list", action="store_true", help="list the groups and exit")
    # Worker side (started by the parent) and testing options.
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--shard", default="0/1", help=argparse.SUPPRESS)
    # GROUP[:segv|raise|hang],...: make a group's workers crash, to test that only that group is lost.
    p.add_argument("--crash-group", default=os.environ.get("SEQFAST_GPU_VALIDATE_CRASH", ""), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.out and not args.list:
        p.error("the following arguments are required: --out")
    if args.budget_s is None:
        args.budget_s = DRY_RUN_BUDGET_S if args.dry_run else DEFAULT_BUDGET_S
    return args


def _set_triton_mode(dry_run: bool) -> None:
    # Must precede the first `import triton` in this process (and the workers inherit it).
    if dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default, said once (3.9 warns otherwise)
    # Every check and timing is of the built-in configs (the sweep forces its own): no attention autotuning
    # inherited from the caller's environment, which would time candidates inside the "default" measurements.
    for name in ("SEQFAST_ATTENTION_AUTOTUNE", "SEQFAST_ATTENTION_AUTOTUNE_CACHE"):
        os.environ.pop(name, None)
    # Triton's on-disk cache (~/.triton/cache) is what the workers share compiled kernels through: where the
    # home folder is not writable, one under the temporary folder instead.
    if "TRITON_CACHE_DIR" not in os.environ:
        home = Path.home()
        if not os.access(home / ".triton" if (home / ".triton").exists() else home, os.W_OK):
            import tempfile

            os.environ["TRITON_CACHE_DIR"] = str(Path(tempfile.gettempdir()) / "seqfast_triton_cache")


# --------------------------------------------------------------------------------------------- worker


def _crash_mode(spec: str, group: str) -> str | None:
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, mode = item.partition(":")
        if name == group:
            return mode or "segv"
    return None


def worker_main(group: str, out: str, deadline: float, dry_run: bool, shard: int, shards: int, crash: str) -> int:
    """Run one group (or one shard of it) and record everything; the exit code says how it ended."""
    from gpu import registers, runtime

    ctx = runtime.Context(out, group, deadline, dry_run, shard, shards)

    def on_term(signum, frame):
        runtime.request_stop()
        raise runtime.Stop("stopped by the parent: the group's time limit")

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    try:
        import faulthandler
        import resource

        faulthandler.enable()  # a segfault prints the Python stack to the workers' log
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core dump of a process holding GiBs of GPU state
    except (ImportError, OSError, ValueError):
        pass
    code = 0
    try:
        mode = _crash_mode(crash, group)
        if mode == "segv":
            os.kill(os.getpid(), signal.SIGSEGV)
        elif mode == "raise":
            raise RuntimeError(f"forced crash of {group} (--crash-group)")
        elif mode == "hang":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # only SIGKILL ends it
            while True:
                time.sleep(1)
        BY_NAME[group].function()(ctx)
    except runtime.Stop as exc:
        ctx.record("group", "error", error=f"{exc}")
        code = 3
    except BaseException as exc:  # noqa: BLE001 (the group's own failure: recorded, the parent goes on)
        ctx.record("group", "error", error=runtime.error_text(exc))
        code = 2
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        try:
            registers.record_variants(ctx)
        except Exception:  # noqa: BLE001, S110 (the inventory is a bonus; never let it mask the group's outcome)
            pass
    return code


# --------------------------------------------------------------------------------------------- parent


def _preload() -> str | None:
    """Import torch, triton, seqfast and the kernel modules once, so forked workers start at once; the reason
    when that fails (workers are then spawned, each importing for itself). Never touches CUDA."""
    try:
        import importlib

        import torch  # noqa: F401
        import triton  # noqa: F401
        import triton.testing  # noqa: F401

        import seqfast  # noqa: F401
        from seqfast import _triton

        _triton._kernels_package()
        for name in ("attention", "ctc_loss"):
            importlib.import_module(f"seqfast.kernels.{name}")
        for g in GROUPS:
            g.function()
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"
    return None


def _describe_exit(status: int) -> tuple[int, str]:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return -sig, f"killed by {name}"
    code = os.WEXITSTATUS(status)
    return code, {0: "ok", 2: "the group raised", 3: "stopped at its time limit"}.get(code, f"exit code {code}")


class _Worker:
    """One worker process: forked (``start_fork``) or spawned (``start_spawn``)."""

    def __init__(self, group: str, shard: int, shards: int):
        self.group, self.shard, self.shards = group, shard, shards
        self.pid = -1
        self.popen = None
        self.started = time.time()
        self.status: int | None = None
        self._alive_fd: int | None = None  # read end of the pipe a forked worker writes one byte to on starting

    def start_fork(self, args: argparse.Namespace, deadline: float, log_path: Path) -> None:
        import warnings

        sys.stdout.flush()
        sys.stderr.flush()
        with warnings.catch_warnings():
            # Python 3.12 warns when forking a process with native threads (torch starts one at import); the
            # child runs no code of those threads, and a child that hangs is stopped at its time limit anyway.
            warnings.simplefilter("ignore", DeprecationWarning)
            read_fd, write_fd = os.pipe()
            pid = os.fork()
        if pid == 0:  # the worker: never returns into the parent's code
            code = 70
            try:
                os.close(read_fd)
                os.write(write_fd, b"1")
                os.close(write_fd)
                fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                os.close(fd)
                print(f"==== {self.group} shard {self.shard}/{self.shards} pid {os.getpid()} (fork)", flush=True)
                code = worker_main(self.group, args.out, deadline, args.dry_run, self.shard, self.shards,
                                   args.crash_group)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        os.close(write_fd)
        os.set_blocking(read_fd, False)
        self._alive_fd = read_fd
        self.pid = pid

    def reached_worker(self) -> bool:
        """Whether the worker got past the fork (spawned workers: always counted as started)."""
        if self._alive_fd is None:
            return True
        try:
            return os.read(self._alive_fd, 1) == b"1"
        except BlockingIOError:
            return False
        finally:
            os.close(self._alive_fd)
            self._alive_fd = None

    def start_spawn(self, args: argparse.Namespace, deadline: float, log_path: Path) -> None:
        import subprocess

        cmd = [sys.executable, str(Path(__file__).resolve()), "--out", args.out, "--worker", self.group,
               "--deadline", repr(deadline), "--shard", f"{self.shard}/{self.shards}",
               "--crash-group", args.crash_group]
        if args.dry_run:
            cmd.append("--dry-run")
        with open(log_path, "ab") as log:
            log.write(f"==== {self.group} shard {self.shard}/{self.shards} (spawn)\n".encode())
            log.flush()
            self.popen = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT))
        self.pid = self.popen.pid

    def poll(self) -> bool:
        """True once the worker has exited (its status is then in ``self.status``)."""
        if self.status is not None:
            return True
        if self.popen is not None:
            rc = self.popen.poll()
            if rc is None:
                return False
            self.status = (rc & 0xFF) << 8 if rc >= 0 else -rc  # as os.waitpid reports it
            return True
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        if pid == 0:
            return False
        self.status = status
        return True

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM (the worker records where it stopped), then SIGKILL after ``grace_s``."""
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
            if self.poll():
                return
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass
            end = time.time() + wait
            while time.time() < end:
                if self.poll():
                    return
                time.sleep(0.05)


def _log_tail(log_path: Path, pid: int, lines: int = 12) -> str:
    """The last lines a forked worker wrote to the log (its section starts with a header naming its pid)."""
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return ""
    marker = f" pid {pid} (fork)"
    at = text.rfind(marker)
    if at < 0:
        return ""
    section = [ln for ln in text[at:].split("\n==== ", 1)[0].splitlines()[1:]
               if ln.strip() and not ln.startswith("Extension modules:")]
    return "\n".join(section[-lines:])[-1500:]


def _run_group(args, group, timeout: float, fork: bool, log_path: Path) -> bool:
    """Run one group's workers to the end or to ``timeout``; False when a worker never started its own code."""
    from gpu.runtime import append_record

    shards = group.shards if not args.dry_run else min(group.shards, 2)
    start = time.time()
    # The parent stops the workers early enough that SIGTERM's grace still ends inside the time limit; the
    # workers stop starting new cases a little before that.
    hard_deadline = start + timeout - STOP_GRACE_S
    soft_deadline = hard_deadline - min(8.0, max(1.5, 0.1 * timeout))
    workers = [_Worker(group.name, i, shards) for i in range(shards)]
    try:
        for w in workers:
            (w.start_fork if fork else w.start_spawn)(args, soft_deadline, log_path)
        while not all(w.poll() for w in workers):
            if time.time() > hard_deadline:
                for w in workers:
                    w.stop()
                break
            time.sleep(0.05)
    finally:
        for w in workers:
            if not w.poll():
                w.stop()
    alive = all(w.reached_worker() for w in workers)
    for w in workers:
        code, text = _describe_exit(w.status if w.status is not None else 0)
        timed_out = time.time() > hard_deadline and code != 0
        if timed_out:
            text += f" (time limit {timeout:.0f} s)"
        if code < 0:  # killed by a signal: what it printed last (faulthandler's stack, a CUDA message)
            tail = _log_tail(log_path, w.pid)
            if tail:
                text += "; last output:\n" + tail
        append_record(args.out, {
            "group": group.name, "name": "worker" + (f" {w.shard}/{shards}" if shards > 1 else ""),
            "status": "ok" if code == 0 else "error", "metrics": {"exit": code, "time_limit_s": round(timeout, 1),
                                                                  "mode": "fork" if fork else "spawn"},
            "seconds": round(time.time() - w.started, 3), "error": None if code == 0 else f"worker {text}",
            "shard": w.shard if shards > 1 else None, "dry_run": args.dry_run, "time": round(time.time(), 3),
        })
    return alive


def parent_main(args: argparse.Namespace) -> int:
    from gpu.runtime import append_record, read_records

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.out = str(out.resolve())
    log_path = out / LOG
    names = [g.strip() for g in args.only.split(",") if g.strip()] or [g.name for g in GROUPS]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        print(f"unknown group(s) {unknown}; groups: {[g.name for g in GROUPS]}", file=sys.stderr)
        return 2
    groups = [g for g in GROUPS if g.name in names]
    start = time.time()
    end = start + args.budget_s
    preload_error = None if args.spawn else _preload()
    fork = not args.spawn and preload_error is None and hasattr(os, "fork")
    run_info = {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(start)), "budget_s": args.budget_s,
                "dry_run": args.dry_run, "workers": "fork" if fork else "spawn", "groups": ",".join(names),
                "triton_cache": os.environ.get("TRITON_CACHE_DIR", "~/.triton/cache")}
    if preload_error:
        run_info["preload_error"] = preload_error
    append_record(args.out, {"group": "run", "name": "start", "status": "ok", "metrics": run_info, "seconds": None,
                             "error": None, "shard": None, "dry_run": args.dry_run, "time": round(start, 3)})

    def summary(state: str) -> None:
        info = dict(run_info, state=state, elapsed_s=round(time.time() - start, 1))
        try:
            report.write_summary(args.out, read_records(args.out), names, info)
        except Exception as exc:  # noqa: BLE001 (the jsonl is the primary record)
            print(f"summary failed: {exc!r}", file=sys.stderr)

    def on_signal(signum, frame):
        raise Interrupted(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # Every later group keeps at least this much back, so a slow group cannot take the time of all the rest.
    min_group_s = STOP_GRACE_S + (2.0 if args.dry_run else 5.0)
    reserve = max(min_group_s, 0.02 * args.budget_s)
    state = "complete"
    try:
        for i, group in enumerate(groups):
            later = len(groups) - i - 1
            left = end - time.time() - SUMMARY_RESERVE_S
            share = group.dry_share if args.dry_run else group.share
            if len(groups) < len(GROUPS):  # a chosen few share the budget more evenly
                share = max(share, 1.0 / len(groups))
            timeout = min(share * args.budget_s, left - later * reserve)
            if timeout < min_group_s:
                append_record(args.out, {"group": group.name, "name": "group", "status": "skip", "metrics": {},
                                         "seconds": None, "error": f"budget exhausted ({left:.0f} s left)",
                                         "shard": None, "dry_run": args.dry_run, "time": round(time.time(), 3)})
                state = "budget ran out"
                continue
            print(f"[{time.time() - start:6.1f} s] {group.name}: up to {timeout:.0f} s", flush=True)
            try:
                alive = _run_group(args, group, timeout, fork, log_path)
            except Interrupted:
                raise
            except Exception as exc:  # noqa: BLE001 (a fault of this script's own: that group is lost, not the run)
                import traceback

                append_record(args.out, {"group": group.name, "name": "parent", "status": "error", "metrics": {},
                                         "seconds": None, "error": traceback.format_exc()[-1500:],
                                         "shard": None, "dry_run": args.dry_run, "time": round(time.time(), 3)})
                print(f"{group.name}: {exc!r}", file=sys.stderr)
                alive = True
            if fork and not alive:
                # A forked worker that never reached its own code: fork itself is the problem (a lock held by an
                # import-time thread). The remaining groups start as fresh processes instead.
                fork = False
                run_info["workers"] = f"fork, then spawn after a forked {group.name} worker never started"
            summary("running" if i < len(groups) - 1 else state)
    except Interrupted as exc:
        state = f"interrupted ({exc})"
    finally:
        summary(state)
    print(f"[{time.time() - start:6.1f} s] done ({state}): {out / report.SUMMARY}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for g in GROUPS:
            print(f"{g.name:24s} share {g.share:.2f} (dry run {g.dry_share:.2f})  shards {g.shards}")
        return 0
    _set_triton_mode(args.dry_run)
    if args.worker:
        shard, shards = (int(x) for x in args.shard.split("/"))
        deadline = args.deadline if args.deadline is not None else time.time() + args.budget_s
        return worker_main(args.worker, str(Path(args.out).resolve()), deadline, args.dry_run, shard, shards,
                           args.crash_group)
    return parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
