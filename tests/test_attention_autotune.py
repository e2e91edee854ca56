"""Opt-in autotuning of the attention launches (SEQFAST_ATTENTION_AUTOTUNE=1; kernels/autotune.py).

The tuner on its own with fake launches (a wrong and a failing candidate are dropped with a warning, the winner
is cached in memory and in a JSON-lines file), then the attention launchers through Triton's interpreter on
tiny shapes with a timer of the test's own: the tuned launch is used and its outputs equal the table config's,
nothing is tuned in deterministic mode, and a shipped cache file is used without timing.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from seqfast import _backend, _triton

pytestmark = [pytest.mark.interpreter, pytest.mark.usefixtures("on_kernel_device")]
OPS = torch.ops.seqfast


@pytest.fixture
def kernels(on_kernel_device):
    return _triton.kernels("attention", torch.zeros(1, device=on_kernel_device))


@pytest.fixture
def autotune(on_kernel_device):
    return _triton.kernels("autotune", torch.zeros(1, device=on_kernel_device))


class FakeTimer:
    """Decreasing times in call order (the last config timed wins), counting its calls."""

    def __init__(self, start: float = 10.0):
        self.calls = 0
        self.start = start

    def __call__(self, fn) -> float:
        fn()
        self.calls += 1
        return self.start - self.calls


# ------------------------------------------------------------------------------------------ the tuner alone


def test_tuner_drops_wrong_and_failing_candidates_and_caches(autotune, tmp_path, monkeypatch):
    x = torch.arange(6.0)
    runs = []

    def run(config):
        runs.append(config["id"])
        if config["id"] == 3:
            raise RuntimeError("out of resources: shared memory")
        return (x + (1.0 if config["id"] == 2 else 0.0), None)

    cache = tmp_path / "tuned.jsonl"
    monkeypatch.setenv("TUNE_CACHE", str(cache))
    times = {0: 5.0, 1: 4.0, 2: 1.0, 3: 0.5}
    def timer(fn):
        fn()
        return times[runs[-1]]

    tuner = autotune.Tuner("test", "TUNE_CACHE", timer=timer)
    default, candidates = {"id": 0}, [{"id": 1}, {"id": 2}, {"id": 3}, {"id": 0}, {"id": 1}]
    with pytest.warns(RuntimeWarning) as caught:
        chosen = tuner.choose("k", default, candidates, run, tol=1e-6)
    assert chosen == {"id": 1}  # 2 and 3 would be faster, but 2 is wrong and 3 fails
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2
    assert '{"id": 2}' in messages[0] and "differs" in messages[0]
    assert '{"id": 3}' in messages[1] and "RuntimeError" in messages[1]
    assert runs.count(0) == 2 and runs.count(1) == 2  # reference + timing; duplicates and the default not rerun
    entry = tuner.entries["k"]
    assert (entry["config"], entry["candidates"], entry["dropped"]) == ({"id": 1}, 3, 2)
    assert (entry["ms"], entry["default_ms"]) == (4.0, 5.0)

    runs.clear()
    assert tuner.choose("k", default, candidates, run, tol=1e-6) == {"id": 1}
    assert runs == []  # cached in memory
    fresh = autotune.Tuner("test", "TUNE_CACHE", timer=lambda fn: pytest.fail("timed a cached key"))
    assert fresh.choose("k", default, candidates, run, tol=1e-6) == {"id": 1}
    assert runs == []  # read from the file
    assert [json.loads(line)["autotune"]["key"] for line in cache.read_text().splitlines()] == ["k"]


def test_cache_file_reads_later_lines_and_gpu_validate_records(autotune, tmp_path):
    path = tmp_path / "gpu_validate.jsonl"
    lines = [
        json.dumps({"autotune": {"key": "a", "config": {"v": 1}}}),
        json.dumps({"group": "sweep", "name": "x", "metrics": {"autotune": {"key": "b", "config": {"v": 2}}}}),
        json.dumps({"group": "facts", "metrics": {"gpu": "none"}}),
        json.dumps({"autotune": {"key": "a", "config": {"v": 3}}}),
        '{"autotune": {"key": "c", "conf',  # a torn last line
    ]
    path.write_text("\n".join(lines))
    entries = autotune.read_entries(path)
    assert {k: e["config"] for k, e in entries.items()} == {"a": {"v": 3}, "b": {"v": 2}}
    assert autotune.read_entries(tmp_path / "missing.jsonl") == {}


def test_outputs_match_treats_nan_and_inf_like_values(autotune):
    nan, inf = float("nan"), float("inf")
    want = torch.tensor([1.0, nan, inf, -2.0])
    assert autotune.outputs_match((want.clone(),), (want,), 0.0) is None
    assert autotune.outputs_match((torch.tensor([1.0, nan, inf, -2.001]),), (want,), 1e-3) is None
    assert "differs" in autotune.outputs_match((torch.tensor([1.0, nan, inf, -2.1]),), (want,), 1e-3)
    assert "NaN" in autotune.outputs_match((torch.tensor([1.0, 0.0, inf, -2.0]),), (want,), 1.0)
    assert "infinities" in autotune.outputs_match((torch.tensor([1.0, nan, -inf, -2.0]),), (want,), 1.0)
    assert "shape" in autotune.outputs_match((want[:2],), (want,), 1.0)


# ------------------------------------------------------------------------------------------ the launchers


@pytest.fixture
def tuning(kernels, autotune, monkeypatch):
    """Autotuning on for CPU tensors (the interpreter) with a fake timer and an empty tuner."""
    monkeypatch.setenv("SEQFAST_ATTENTION_AUTOTUNE", "1")
    monkeypatch.delenv(kernels.AUTOTUNE_CACHE_ENV, raising=False)
    monkeypatch.setattr(kernels, "_AUTOTUNE_DEVICES", ("cpu", "cuda"))
    timer = FakeTimer()
    monkeypatch.setattr(kernels, "_TUNER", autotune.Tuner("seqfast attention", kernels.AUTOTUNE_CACHE_ENV, timer))
    # Two candidates for the forward: one that launches (16-row query tiles) and one that cannot (a tile that
    # is not a power of two).
    monkeypatch.setitem(kernels.CONFIG_SPACE, "fwd", [
        {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1},
        {"BLOCK_M": 24, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1},
    ])
    return timer


def qkv(dtype=torch.float16, B=1, H=2, L=24, D=16):
    return [torch.randn(B, H, L, D, dtype=dtype) for _ in range(3)]


def forward(q, k, v, causal=True):
    return _backend.dispatch("triton", OPS.attention_forward.default, q, k, v, None, 0.0, int(causal), 0.25,
                             torch.tensor(0))


def backward(go, q, k, v, out, lse):
    return _backend.dispatch("triton", OPS.attention_backward.default, go, q, k, v, None, out, lse, 0.0, 1, 0.25,
                             torch.tensor(0), False)


def test_forward_is_tuned_once_and_failing_candidate_dropped(kernels, tuning):
    q, k, v = qkv()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, lse = forward(q, k, v)
    dropped = [str(w.message) for w in caught if "dropped" in str(w.message)]
    assert len(dropped) == 1 and '"block_m": 24' in dropped[0]
    key = kernels.autotune_key("fwd", "cpu", torch.float16, 16, 24, 24, causal=True)
    assert key == "cpu/fwd/fp16/d64/causal/q32k32"
    entry = kernels._TUNER.entries[key]
    assert entry["config"]["block_m"] == 16 and (entry["candidates"], entry["dropped"]) == (2, 1)
    assert tuning.calls == 2  # the default, then the 16-row candidate (which the fake timer makes faster)
    calls = tuning.calls
    out2, lse2 = forward(q, k, v)  # the same key: no tuning, the tuned launch
    assert tuning.calls == calls
    with kernels.forced_config("fwd", {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}):
        ref_out, ref_lse = forward(q, k, v)  # forced configs bypass the tuner
    assert tuning.calls == calls
    torch.testing.assert_close(out2, ref_out, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(lse2, ref_lse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, out2, atol=0, rtol=0)


def test_wrong_candidate_is_dropped_in_a_real_launch(kernels, autotune, tuning, monkeypatch):
    class WrongFor16Rows(autotune.Tuner):
        def choose(self, key, default, candidates, run, tol):
            def bad_run(config):
                outs = run(config)
                return (outs[0] + 1,) + tuple(outs[1:]) if config["block_m"] == 16 else outs
            return super().choose(key, default, candidates, bad_run, tol)

    monkeypatch.setattr(kernels, "_TUNER", WrongFor16Rows("seqfast attention", kernels.AUTOTUNE_CACHE_ENV, tuning))
    q, k, v = qkv()
    with pytest.warns(RuntimeWarning, match="differs"):
        forward(q, k, v, causal=False)
    (entry,) = kernels._TUNER.entries.values()
    assert entry["config"]["block_m"] != 16 and entry["dropped"] == 2


def test_backward_launches_are_tuned_and_match_the_default(kernels, tuning, monkeypatch):
    monkeypatch.setitem(kernels.CONFIG_SPACE, "dkdv", [{"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4,
                                                        "num_stages": 1}])
    monkeypatch.setitem(kernels.CONFIG_SPACE, "dq", [{"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4,
                                                      "num_stages": 1}])
    q, k, v = qkv(torch.float32, L=20)
    go = torch.randn_like(q)
    monkeypatch.setenv("SEQFAST_ATTENTION_AUTOTUNE", "0")
    out, lse = forward(q, k, v)
    ref = backward(go, q, k, v, out, lse)
    monkeypatch.setenv("SEQFAST_ATTENTION_AUTOTUNE", "1")
    got = backward(go, q, k, v, out, lse)
    keys = sorted(k for k in kernels._TUNER.entries if "/fwd/" not in k)
    assert keys == ["cpu/dkdv/fp32-ieee/d64/causal/q32k32", "cpu/dq/fp32-ieee/d64/causal/q32k32"]
    assert all(kernels._TUNER.entries[k]["config"]["block_n"] == 16 for k in keys)
    for a, b in zip(got[:3], ref[:3]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_deterministic_mode_keeps_the_table_configs(kernels, tuning):
    q, k, v = qkv()
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        forward(q, k, v)
    finally:
        torch.use_deterministic_algorithms(before)
    assert tuning.calls == 0 and kernels._TUNER.entries == {}


def test_shipped_cache_file_is_used_without_timing(kernels, autotune, tuning, tmp_path, monkeypatch):
    key = kernels.autotune_key("fwd", "cpu", torch.float16, 16, 24, 24, causal=True)
    path = tmp_path / "attention_autotune.jsonl"
    config = {"block_m": 16, "block_n": 32, "warps": 4, "stages": 1, "maxnreg": None, "chunk": 64}
    autotune.append_entry(path, {"key": key, "config": config})
    monkeypatch.setenv(kernels.AUTOTUNE_CACHE_ENV, str(path))
    used = []
    run = kernels._attn_fwd.run

    def spy(*args, **kw):
        used.append((kw["BLOCK_M"], kw["BLOCK_N"]))
        return run(*args, **kw)

    monkeypatch.setattr(kernels._attn_fwd, "run", spy)
    forward(*qkv())
    assert tuning.calls == 0 and used == [(16, 32)]


def test_bad_flag_is_refused(kernels, tuning, monkeypatch):
    monkeypatch.setenv("SEQFAST_ATTENTION_AUTOTUNE", "maybe")
    with pytest.raises(ValueError, match="SEQFAST_ATTENTION_AUTOTUNE must be 1 or 0"):
        forward(*qkv())
