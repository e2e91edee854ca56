"""benchmarks/gpu_validate.py on CPU: its dry run (Triton's interpreter, tiny shapes) end to end, with two groups
made to crash (a segfault, an exception) to show that a crash costs that group only; the spawned-worker mode;
and the pieces that only a GPU run would otherwise exercise (JIT-cache walking, the summary) on stand-ins.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_validate.py"
sys.path.insert(0, str(ROOT / "benchmarks"))
from gpu import report, runtime  # noqa: E402
from gpu.groups import GROUPS  # noqa: E402

sys.path.remove(str(ROOT / "benchmarks"))

CRASHED = {"determinism": "killed by SIGSEGV", "big_tensor": "forced crash"}
# Groups whose work needs CUDA: on CPU they record skips (with the reason) and nothing else.
CUDA_ONLY = {"big_tensor", "registers"}


def _run(out: Path, *extra: str, timeout: float = 400) -> tuple[subprocess.CompletedProcess, list[dict]]:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--dry-run", *extra],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=str(ROOT))
    return done, runtime.read_records(out)


def test_dry_run_end_to_end(tmp_path):
    """One dry run (one test, so that parallel test workers never start two): exit 0, every group recorded,
    the crashes cost their groups only, the checks and timings ran, the summary has its tables."""
    start = time.time()
    done, records = _run(tmp_path, "--budget-s", "240", "--crash-group", "determinism:segv,big_tensor:raise")
    assert done.returncode == 0, done.stderr[-3000:]
    _check_records(tmp_path, records)
    _check_crashes(records)
    _check_content(records)
    _check_summary(tmp_path)
    _check_autotune_cache(tmp_path, records)
    print(f"dry run: {time.time() - start:.1f} s, {len(records)} records")


def _check_records(out: Path, records: list[dict]) -> None:
    import seqfast

    cuda_only = CUDA_ONLY | (set() if seqfast.EXTENSION_AVAILABLE else {"opcheck"})  # CPU ops need the extension
    by_group: dict[str, list[dict]] = {}
    for r in records:
        assert set(r) >= {"group", "name", "status", "metrics", "seconds", "error"}, r
        assert r["status"] in runtime.STATUSES
        by_group.setdefault(r["group"], []).append(r)
    for g in GROUPS:
        assert by_group.get(g.name), f"no records for {g.name}"
        if g.name in CRASHED:
            continue
        recs = [r for r in by_group[g.name] if not r["name"].startswith("worker")]
        assert recs, f"no records but the worker's for {g.name}"
        errors = [(r["name"], (r["error"] or "")[-300:]) for r in by_group[g.name] if r["status"] == "error"]
        assert not errors, (g.name, errors)
        if g.name not in cuda_only:
            assert any(r["status"] in ("ok", "fail") for r in recs), (g.name, recs)
    assert sorted(os.listdir(out)) == ["gpu_validate.jsonl", "gpu_validate.md", "gpu_validate_workers.log"]


def _check_crashes(records: list[dict]) -> None:
    for group, text in CRASHED.items():
        workers = [r for r in records if r["group"] == group and r["name"] == "worker"]
        assert workers and workers[0]["status"] == "error", workers
        assert any(text in (r["error"] or "") for r in records if r["group"] == group), group
    # The groups after the crashes ran in fresh workers and finished.
    order = [g.name for g in GROUPS]
    for group in order[order.index("big_tensor") + 1:]:
        workers = [r for r in records if r["group"] == group and r["name"] == "worker"]
        assert workers and all(w["status"] == "ok" for w in workers), (group, workers)


def _check_content(records: list[dict]) -> None:
    names = {(r["group"], r["name"]): r for r in records}
    # Correctness against the reference and torch: error metrics recorded.
    attention = [r for r in records if r["group"] == "attention_correctness" and "out_err" in r["metrics"]]
    assert attention and all(r["metrics"]["out_err"] < 1e-2 for r in attention)
    # Every check holds in the interpreter too: 16-bit errors within 2x CPU torch's, float32 within 1e-5.
    judged = [r for r in records if r["group"] == "attention_correctness" and r["name"] != "worker"]
    # ... but the comparison with torch's varlen_attn, which runs on CUDA only: a skip that says so.
    (torch_varlen,) = [r for r in judged if r["name"] == "varlen_attn against torch's"]
    assert torch_varlen["status"] == "skip" and "CUDA" in torch_varlen["error"], torch_varlen
    judged.remove(torch_varlen)
    assert judged and all(r["status"] == "ok" for r in judged), [(r["name"], r["error"]) for r in judged
                                                                 if r["status"] != "ok"]
    ctc = [r for r in records if r["group"] == "ctc_correctness" and "loss_err" in r["metrics"]]
    assert ctc and all(r["status"] == "ok" for r in ctc), ctc
    decoding = [r for r in records if r["group"] == "ctc_decoding" and "scores_max_abs_err" in r["metrics"]]
    assert decoding and all(r["status"] == "ok" for r in decoding), decoding
    # Timings carry the dry-run timer label, never a CUDA figure.
    timed = [r for r in records if r["group"] in ("attention_timing", "ctc_timing") and "timer" in r["metrics"]]
    assert timed and all("dry run" in r["metrics"]["timer"] for r in timed)
    # The sweep engine ranked the good configs of the stand-in module and rejected the wrong and broken ones.
    assert names[("sweep", "self-test on gpu.fake_tunable")]["status"] == "ok"
    # The attention sweep's winners are autotuning cache entries, readable from gpu_validate.jsonl as it is.
    tuned = {r["metrics"]["autotune"]["key"]: r["metrics"]["autotune"] for r in records
             if r["group"] == "sweep" and "autotune" in r["metrics"]}
    launches = {key.split("/")[1] for key in tuned}
    assert {"fwd", "dkdv", "dq"} <= launches and all(key.startswith("cpu/") for key in tuned), sorted(tuned)
    assert all(set(e["config"]) == {"block_m", "block_n", "warps", "stages", "maxnreg", "chunk"}
               for e in tuned.values())
    # CUDA-only work is a skip with its reason.
    assert all(r["status"] == "skip" and "CUDA" in r["error"]
               for r in records if r["group"] == "big_tensor" and r["name"].startswith("attention"))


def _check_autotune_cache(out: Path, records: list[dict]) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("_autotune_under_test", ROOT / "kernels" / "autotune.py")
    autotune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(autotune)
    entries = autotune.read_entries(out / "gpu_validate.jsonl")
    written = [r["metrics"]["autotune"] for r in records if "autotune" in r["metrics"]]
    assert written and {e["key"]: e for e in written} == entries


def _check_summary(out: Path) -> None:
    md = (out / report.SUMMARY).read_text()
    assert "| group | ok | fail | error | skip |" in md
    assert "## attention_correctness" in md and "| check | status |" in md
    assert "killed by SIGSEGV" in md
    assert "state: complete" in md


def test_spawned_workers(tmp_path):
    done, records = _run(tmp_path, "--spawn", "--only", "big_tensor", "--budget-s", "60")
    assert done.returncode == 0, done.stderr[-3000:]
    workers = [r for r in records if r["name"] == "worker"]
    assert [w["group"] for w in workers] == ["big_tensor"]
    assert all(w["status"] == "ok" and w["metrics"]["mode"] == "spawn" for w in workers)


def test_sweep_takes_a_candidate_space_file(tmp_path, monkeypatch):
    """SEQFAST_GPU_SWEEP_SPACE replaces CONFIG_SPACE: only the launches, modules and shapes it names are swept,
    and the shipped space files name launches the kernels know."""
    space = tmp_path / "space.json"
    space.write_text(json.dumps({"shapes": ["causal"], "attention": {"dkdv": [
        {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}]}}))
    monkeypatch.setenv("SEQFAST_GPU_SWEEP_SPACE", str(space))
    done, records = _run(tmp_path / "out", "--only", "sweep", "--budget-s", "90")
    assert done.returncode == 0, done.stderr[-3000:]
    names = [r["name"] for r in records if r["group"] == "sweep"]
    assert "kernels.attention.dkdv @ fp32 B1 H2 L24 D16 causal: best" in names
    assert [r["status"] for r in records if r["name"] == "kernels.ctc_loss"] == ["skip"]
    assert not any(".fwd @" in n or ".dq @" in n or "decode" in n for n in names)
    best = next(r for r in records if r["name"].endswith("causal: best"))
    assert best["status"] == "ok" and best["metrics"]["ranked"] == 1
    import torch

    from seqfast import _triton

    for path in sorted((ROOT / "benchmarks" / "gpu" / "spaces").glob("*.json")):
        spec = json.loads(path.read_text())
        for module, launches in spec.items():
            if module != "shapes":
                known = _triton.kernels(module, torch.empty(0, device="meta")).CONFIG_SPACE
                assert set(launches) <= set(known), path.name


# --------------------------------------------------------------------------------------------- stand-ins


def _fake_kernel(name, regs, spills, shared):
    meta = SimpleNamespace(name=name, shared=shared, num_warps=8, num_stages=3, maxnreg=None)
    src = SimpleNamespace(constants={(3,): 128, (4,): True})
    return SimpleNamespace(metadata=meta, name=name, hash="abcdef0123456789", n_regs=regs, n_spills=spills, src=src)


def test_jit_cache_walk_on_triton_3_layouts():
    kernel = _fake_kernel("_attn_fwd", 168, 0, 49152)
    # triton >= 3.2: device_caches[device] = (kernel_cache, [key cache,] target, backend, binder)
    new = SimpleNamespace(arg_names=["Q", "K", "x", "BLOCK_M", "CAUSAL"],
                          device_caches={0: ({"key": kernel}, {}, "target", "backend", "binder")})
    # older: cache[device] = {key: kernel}; and a future-like entry that resolves to a kernel
    future = SimpleNamespace(result=lambda: _fake_kernel("_attn_bwd_dq", 255, 4, 1024))
    old = SimpleNamespace(arg_names=["Q"], cache={0: {"a": kernel, "b": future}})
    assert [k.name for k in runtime.compiled_kernels(new)] == ["_attn_fwd"]
    assert [k.name for k in runtime.compiled_kernels(old)] == ["_attn_fwd", "_attn_bwd_dq"]
    info = runtime.describe_kernel(kernel, new.arg_names)
    assert info["regs"] == 168 and info["spills"] == 0 and info["shared"] == 49152 and info["warps"] == 8
    assert info["constexprs"] == "BLOCK_M=128 CAUSAL=True"
    module = SimpleNamespace(fwd=new, other=3)
    assert [v["kernel"] for v in runtime.inventory([module])] == ["_attn_fwd"]


def test_judge_rule():
    import torch

    ref = torch.tensor([1.0, -2.0, 0.0], dtype=torch.float64)
    baseline = torch.tensor([1.001, -2.0, 0.0])
    case = runtime.Case()
    runtime.judge(case, "out", torch.tensor([1.002, -2.0, 0.0]), ref, baseline)  # 2x torch's error: passes
    assert not case.failures and case.metrics["out_ratio"] == pytest.approx(2.0, rel=1e-3)
    runtime.judge(case, "out", torch.tensor([1.0, -2.0, float("nan")]), ref, baseline)  # NaN where ref is 0
    assert case.failures and "out" in case.failures[0]
    # float32 on its own: within 1e-5 of max |ref| plus the 1e-5 floor, whatever the baseline says.
    fp32 = runtime.Case()
    runtime.judge(fp32, "x", torch.tensor([1.0, -2.0, 3e-5]), ref, baseline, fallback_rel=1e-5, by_baseline=False)
    assert not fp32.failures
    runtime.judge(fp32, "y", torch.tensor([1.0, -2.0, 1e-4]), ref, None, fallback_rel=1e-5)
    assert len(fp32.failures) == 1 and fp32.failures[0].startswith("y")


def test_summary_from_records(tmp_path):
    records = [
        {"group": "facts", "name": "software", "status": "ok", "metrics": {"torch": "2.11"}, "seconds": 1.0,
         "error": None},
        {"group": "opcheck", "name": "a | b", "status": "ok", "metrics": {"x": 1.5}, "seconds": 0.2, "error": None},
        {"group": "opcheck", "name": "c", "status": "fail", "metrics": {}, "seconds": 0.2, "error": "bad\nworse"},
        {"group": "attention_timing", "name": "bf16 L1024", "status": "ok",
         "metrics": {"seqfast_ms": 0.5, "flash_ms": 0.4, "timer": "t"}, "seconds": 1, "error": None},
    ]
    path = report.write_summary(tmp_path, records, ["facts", "opcheck", "attention_timing"], {"state": "complete"})
    md = path.read_text()
    assert md.index("| c | fail |") < md.index("| a \\| b | ok |")  # failures first, pipes escaped
    assert "| case | status | seqfast_ms | flash_ms | error |" in md and "worse" in md


def test_registers_merges_the_workers_inventories(tmp_path):
    from gpu import registers

    variant = {"kernel": "_attn_fwd", "hash": "abc", "regs": 168, "spills": 0, "shared": 49152, "warps": 8,
               "stages": 3, "maxnreg": None, "constexprs": "BLOCK_M=128"}
    spilling = dict(variant, kernel="_attn_bwd_dkdv", hash="def", spills=6)
    for group, variants in (("attention_correctness", [variant]), ("determinism", [variant, spilling])):
        runtime.Context(tmp_path, group, time.time() + 60, dry_run=True).record(
            registers.VARIANTS_RECORD, "ok", {"variants": variants})
    registers.registers(runtime.Context(tmp_path, "registers", time.time() + 60, dry_run=True))
    got = {r["name"]: r for r in runtime.read_records(tmp_path) if r["group"] == "registers"}
    assert got["_attn_fwd abc"]["status"] == "ok"
    assert got["_attn_fwd abc"]["metrics"]["seen_in"] == "attention_correctness,determinism"
    assert got["_attn_bwd_dkdv def"]["status"] == "fail" and got["_attn_bwd_dkdv def"]["metrics"]["local_bytes"] == 24
    assert got["variants counted"]["metrics"]["distinct_variants"] == 2
