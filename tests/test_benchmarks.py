"""The benchmark pipeline end to end on tiny shapes: ``benchmarks/run.py --smoke`` under the float64
reference backend (runs without the C++ extension) must time every case, then write the JSON, one PNG
per op and the summary table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OPS = ("attention", "ctc_loss", "ctc_loss_from_logits", "overhead_attention", "overhead_ctc_loss")
# Forward-only ops (no gradient); the beam search's baseline is another library (pyctcdecode, in the
# table's torch column).
FORWARD_ONLY_OPS = ("ctc_greedy_decode", "ctc_forced_align", "ctc_beam_search", "attention_decode")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "SEQFAST_"))}
    proc = subprocess.run(
        [sys.executable, "benchmarks/run.py", "--smoke", "--backend", "reference", "--device", "cpu",
         "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    return proc, out


def test_run_succeeds(smoke_run):
    proc, _ = smoke_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout
    assert "on cpu (" in proc.stdout and "threads), torch " in proc.stdout  # where the numbers come from
    assert "cpu: " in proc.stdout and "FMA loop (" in proc.stdout  # the machine and its measured peak


def test_json_has_paired_cases(smoke_run):
    _, out = smoke_run
    (path,) = out.glob("cpu-smoke-*.json")
    benches = json.loads(path.read_text())["benchmarks"]
    infos = [b["extra_info"] for b in benches]
    assert {i["op"] for i in infos} == {*OPS, *FORWARD_ONLY_OPS, "matmul"}
    for info in infos:
        assert info["device"] == "cpu"
        assert info["gflops"] > 0 and info["work"] > 0
        if info["op"] != "ctc_beam_search" or info["provider"] == "seqfast":  # pyctcdecode allocates no tensor
            assert info["peak_mem_bytes"] > 0, info  # every case allocates at least its output
        assert info["backend"] == ("reference" if info["provider"] == "seqfast" else "torch")
    for op in OPS:
        for direction in ("fwd", "fwd+bwd"):
            providers = [i["provider"] for i in infos if i["op"] == op and i["direction"] == direction]
            assert providers.count("torch") == providers.count("seqfast") > 0, (op, direction)
    for op in FORWARD_ONLY_OPS:
        providers = [i["provider"] for i in infos if i["op"] == op and i["direction"] == "fwd"]
        assert providers.count("torch") == providers.count("seqfast") > 0, op
    groups = {b["group"] for b in benches}
    assert "attention B1_H2_L16_D8_causal fwd+bwd" in groups


def test_table_and_plots(smoke_run):
    proc, out = smoke_run
    table = proc.stdout.split("median of each case\n", 1)[1]
    header = table.splitlines()[0]
    for column in ("op", "shape", "dir", "torch ms", "seqfast ms", "speedup", "GFLOP/s torch", "peak mem seqfast"):
        assert column in header
    lines = [line for line in table.splitlines() if line.startswith(("attention", "ctc_loss", "matmul"))]
    # 2 CTC shapes x 2 directions x 2 ops + 4 attention shapes x 2 directions + 1 decoding step + matmul
    assert len(lines) == 18
    ctc = next(line for line in lines if line.startswith("ctc_loss ") and "fwd+bwd" in line)
    assert ctc.split()[5].endswith("x")  # both providers timed: a speedup is shown
    for op in OPS:
        (png,) = out.glob(f"cpu-smoke-*-{op}.png")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tiers():
    """The real tiers hold the documented shapes; default on CPU leaves out attention L=4096 fwd+bwd only."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import _harness as h
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert [(s.T, s.N, s.C, s.S) for s in h.ctc_shapes("default")] == [
        (500, 16, 32, 100), (1000, 32, 1000, 200), (200, 64, 5000, 50), (4000, 8, 64, 1200)]
    assert h.ctc_shapes("full") == h.ctc_shapes("default") and len(h.ctc_shapes("quick")) == 1
    full = h.attention_cases("full", "cpu")
    assert len(full) == 4 * 2 * 2 * 2 and {(s.B, s.H) for s, _ in full} == {(2, 8)}
    assert h.attention_cases("default", "cuda") == full
    dropped = set(full) - set(h.attention_cases("default", "cpu"))
    assert {(s.L, d) for s, d in dropped} == {(4096, "fwd+bwd")} and len(dropped) == 4
    assert {s.L for s, _ in h.attention_cases("quick", "cpu")} == {512}
    assert h.matmul_shape("quick").n == 2048
    assert [(s.B, s.H, s.Lq, s.L, s.D) for s in h.decode_shapes("default")] == [
        (32, 8, 1, 256, 64), (8, 8, 1, 1024, 64), (8, 8, 1, 4096, 64), (8, 8, 1, 1024, 128), (8, 8, 16, 2048, 128)]
    assert h.decode_shapes("full") == h.decode_shapes("default") and len(h.decode_shapes("quick")) == 1
    assert h.DecodeShape(8, 8, 1024, 64).work("fwd") == 4 * 8 * 8 * 1024 * 64
    assert h.DecodeShape(8, 8, 2048, 128, Lq=16).work("fwd") == 4 * 8 * 8 * 16 * 2048 * 128
    assert h.DecodeShape(8, 8, 2048, 128, Lq=16).label == "B8_H8_Lq16_L2048_D128"
    # work counts: attention 4*B*H*L*L*D (halved causal, x3.5 with backward); CTC N*T*(2S+1) per recursion
    a = h.AttentionShape(2, 8, 512, 64, causal=True)
    assert a.work("fwd") == 4 * 2 * 8 * 512 * 512 * 64 / 2 and a.work("fwd+bwd") == 3.5 * a.work("fwd")
    c = h.CtcShape(500, 16, 32, 100)
    assert c.work("fwd") == 16 * 500 * 201 and c.work("fwd+bwd") == 2 * c.work("fwd")


class _StubBenchmark:
    """pytest-benchmark's fixture reduced to what ``measure`` uses: pedantic runs rounds x iterations calls."""

    def __init__(self):
        self.extra_info, self.group, self.stats, self.calls = {}, None, None, []

    def pedantic(self, target, rounds, iterations, warmup_rounds):
        self.calls.append((rounds, iterations, warmup_rounds))
        for _ in range(rounds * iterations):
            target()


def test_cuda_timing_synchronises_once_per_round(monkeypatch):
    """Short CUDA calls are repeated within a round and synchronised at its end only (checked without a GPU)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import _harness as h
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    syncs, calls = [], []
    monkeypatch.setattr(h, "synchronize", lambda device: syncs.append(len(calls)))
    monkeypatch.setattr(h, "peak_memory", lambda fn, device: (fn(), 123)[1])
    monkeypatch.setattr(h, "describe", lambda device: "cuda (a GPU)")
    bench = _StubBenchmark()
    h.measure(bench, lambda: calls.append(1), op="attention", shape=h.AttentionShape(1, 1, 16, 8, False),
              direction="fwd", provider="seqfast", device="cuda", size="quick")
    ((rounds, iterations, warmup),) = bench.calls
    assert warmup == 0 and rounds >= 10 and iterations > 1  # a call of microseconds: many per round
    timed = syncs[2:]  # the first sync closes the warm-up, the second the plain timing of a short call
    assert len(timed) == rounds and all(b - a == iterations for a, b in zip(timed, timed[1:]))
    info = bench.extra_info
    assert info["peak_mem_bytes"] == 123 and info["iterations"] == iterations and info["device"] == "cuda"
    assert bench.group == "attention B1_H1_L16_D8 fwd" and info["work"] == 4 * 16 * 16 * 8


def test_ctc_cpu_timing_runs_with_sorted_lengths():
    """benchmarks/ctc_cpu_timing.py (the issue tables' script) on a tiny shape, length-sorted batch, backward too."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "SEQFAST_"))}
    env["PYTHONPATH"] = str(ROOT)  # the script imports seqfast from the checkout (PYTHONPATH=.)
    proc = subprocess.run(
        [sys.executable, "benchmarks/ctc_cpu_timing.py", "--repeat", "1", "--shapes", "20,3,5,4", "--backward",
         "--lengths", "sorted", "--threads", "1", "--burst", "2"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "cpu: " in proc.stdout and "lengths=sorted" in proc.stdout and "burst=2" in proc.stdout
    row = next(line for line in proc.stdout.splitlines() if line.strip().startswith("(20, 3, 5, 4)"))
    assert len(row.split()) == 4 + 9  # the shape's four numbers, then three (torch, ours, x) column sets


@pytest.mark.parametrize("burst, expected", [(1, 10.0), (3, 1.5), (4, 2.0)])
def test_ctc_cpu_timing_bursts_time_the_calls_after_a_turns_first(monkeypatch, burst, expected):
    """--burst B: each implementation runs B times a turn and the turn's time is the median of the calls after
    its first (the one that follows the other implementation's); B = 1 keeps that first call."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("ctc_cpu_timing", ROOT / "benchmarks" / "ctc_cpu_timing.py")
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setattr(sys, "argv", ["ctc_cpu_timing.py"])
    spec.loader.exec_module(mod)
    now = [0.0]
    calls = [0]

    def fn(*args):
        # A turn's first call takes 10, its next ones 1, 2, 6.
        now[0] += (10.0, 1.0, 2.0, 6.0)[calls[0] % burst]
        calls[0] += 1

    monkeypatch.setattr(mod, "CLOCK", lambda: now[0])
    monkeypatch.setattr(mod, "BURST", burst)
    times = mod.alternating_times([fn, fn], (None,) * 4, backward=False, repeat=3)
    assert calls[0] == 2 * 3 * burst
    assert times == [[expected] * 3, [expected] * 3]
