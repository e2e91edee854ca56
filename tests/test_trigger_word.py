"""The trigger-word detector example: its smoke run end to end, streaming against the offline pass, the two
backends on the same weights, and the detection metrics on synthetic probability tracks."""

import json
import math

import numpy as np
import pytest
import torch

from examples import trigger_word
from examples.speech import detection_metrics as dm
from examples.speech.detector_model import (
    CausalConv1d,
    DetectorConfig,
    TriggerDetector,
    set_backend,
)
from examples.speech.streaming import StreamingDetector, stream_in_chunks

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(seed: int = 0, **kwargs) -> TriggerDetector:
    torch.manual_seed(seed)
    cfg = DetectorConfig(**{"d_model": 32, "heads": 4, "layers": 2, "ffn": 48, "conv_strides": (2, 2, 2),
                            "dropout": 0.0, **kwargs})
    model = TriggerDetector(cfg)
    model.set_normalisation(torch.randn(4, 50, cfg.n_mels) * 3.0 - 5.0)  # not the identity
    return model.eval()


# ------------------------------------------------------------------------------------------- smoke run


def test_smoke_run_end_to_end(tmp_path):
    metrics = trigger_word.main(["--smoke", "--threads", "1", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("detection_rate", "false_alarms_per_hour", "threshold", "roc", "step_times"):
        assert key in saved, key
    for name in ("curves.png", "roc.png", "clip.png"):
        assert (tmp_path / name).stat().st_size > 10_000, name
    assert metrics["final_loss"] < 0.8 * metrics["first_loss"], (metrics["first_loss"], metrics["final_loss"])
    assert set(saved["step_times"]) == {"seqfast", "torch"}
    assert all(t["train_step_s"] > 0 and t["inference_batch_s"] > 0 for t in saved["step_times"].values())
    assert max(saved["streaming_max_abs_diff"].values()) < 1e-5
    assert 0.0 <= saved["detection_rate"] <= 1.0 and saved["false_alarms_per_hour"] >= 0.0
    assert len(saved["roc"]) == len(dm.default_thresholds())


def test_missing_espeak_says_how_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_espeak(name, *args, **kwargs):
        if name == "espeakng_loader":
            raise ImportError("No module named 'espeakng_loader'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_espeak)
    with pytest.raises(SystemExit, match="pip install -r examples/requirements.txt"):
        trigger_word._require_espeak()


# ------------------------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("backend", ["seqfast", "torch"])
@pytest.mark.parametrize("chunk", [1, 3, 8, 13, 64, 203])
def test_streaming_equals_offline(backend, chunk):
    model = set_backend(_model(), backend)
    feats = torch.randn(2, 203, 80) * 2.0 - 5.0
    with torch.no_grad():
        offline = torch.sigmoid(model.logits(feats))
    assert offline.shape == (2, 203 // 8)
    streamed = stream_in_chunks(model, feats, chunk)
    torch.testing.assert_close(streamed, offline, atol=1e-6, rtol=1e-5)


def test_streaming_uneven_chunks_and_cache():
    model = _model(1)
    feats = torch.randn(1, 160, 80)
    with torch.no_grad():
        offline = torch.sigmoid(model.logits(feats))[0]
    stream = StreamingDetector(model)
    sizes = [1, 0, 7, 2, 30, 1, 1, 5, 50, 63]
    assert sum(sizes) == 160
    pieces, start = [], 0
    for n in sizes:
        probs = stream.push(feats[0, start : start + n])
        start += n
        assert probs.shape == ((start // 8) - sum(p.shape[0] for p in pieces),)
        pieces.append(probs)
        assert stream.cached_keys == start // 8
    torch.testing.assert_close(torch.cat(pieces), offline, atol=1e-6, rtol=1e-5)
    stream.reset()
    torch.testing.assert_close(stream.push(feats[0]), offline, atol=1e-6, rtol=1e-5)


def test_outputs_only_see_the_past():
    model = _model(2)
    feats = torch.randn(1, 120, 80)
    changed = feats.clone()
    changed[:, 64:] += 3.0  # frames 64.. are output frame 8's inputs and later
    with torch.no_grad():
        a, b = model.logits(feats), model.logits(changed)
    torch.testing.assert_close(a[:, :8], b[:, :8], atol=0, rtol=0)
    assert (a[:, 8:] - b[:, 8:]).abs().max() > 1e-3


def test_causal_conv_any_chunking():
    torch.manual_seed(0)
    conv = CausalConv1d(3, 4, kernel=5, stride=2)
    x = torch.randn(2, 3, 21)
    full, _ = conv(x)
    assert full.shape == (2, 4, 10)
    state, outs = None, []
    for i in range(21):
        y, state = conv(x[..., i : i + 1], state)
        outs.append(y)
    torch.testing.assert_close(torch.cat(outs, -1), full, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", ["seqfast", "torch"])
def test_chunk_attention_is_bottom_right_causal(backend):
    # A chunk of 3 queries after 4 cached keys: query i sees keys 0 .. 4 + i, as an explicit bool mask says.
    torch.manual_seed(0)
    attn = set_backend(_model(), backend).layers[0].attn
    past = torch.randn(1, 4, 4, 8), torch.randn(1, 4, 4, 8)
    x = torch.randn(1, 3, 32)
    with torch.no_grad():
        y, (k, v) = attn(x, past)
        q = attn.qkv(x).view(1, 3, 3, 4, 8).permute(2, 0, 3, 1, 4)[0]
        mask = torch.arange(7)[None, :] <= torch.arange(3)[:, None] + 4
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        ref = attn.out(ref.transpose(1, 2).reshape(1, 3, 32))
    assert k.shape == (1, 4, 7, 8)
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=1e-5)


def test_backends_agree_on_the_same_weights():
    model = _model(3)
    feats = torch.randn(3, 96, 80)
    labels = (torch.rand(3, 12) > 0.8).float()
    outs, grads = {}, {}
    for backend in ("seqfast", "torch"):
        set_backend(model, backend)
        model.zero_grad()
        logits = model.logits(feats)
        torch.nn.functional.binary_cross_entropy_with_logits(logits, labels).backward()
        outs[backend] = logits.detach()
        grads[backend] = torch.cat([p.grad.flatten() for p in model.parameters()])
    torch.testing.assert_close(outs["seqfast"], outs["torch"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads["seqfast"], grads["torch"], atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------- metrics

RULES = dm.DetectionRules(hop=1280, window=6, smooth=1, tolerance=2, refractory=10)


def _track(n: int, bumps: list[tuple[int, int, float]]) -> np.ndarray:
    t = np.full(n, 0.05)
    for start, length, height in bumps:
        t[start : start + length] = height
    return t


def test_firings_rising_edges_and_refractory():
    track = _track(60, [(5, 3, 0.9), (10, 2, 0.9), (30, 1, 0.6), (40, 30, 0.95)])
    assert dm.firings(track, 0.5, refractory=10) == [5, 30, 40]  # 10 is 5 frames after 5: suppressed
    assert dm.firings(track, 0.5, refractory=1) == [5, 10, 30, 40]
    assert dm.firings(track, 0.7, refractory=1) == [5, 10, 40]
    assert dm.firings(np.full(5, 0.9), 0.5, refractory=3) == [0]


def test_detections_and_false_alarms_in_windows():
    # One trigger ending at sample 12800 -> frame 10; its window is frames 11..16, widened to 9..18.
    ends = [12800]
    assert dm.trigger_windows(ends, RULES) == [(9, 18)]
    assert dm.score_clip(_track(80, [(12, 4, 0.9)]), ends, 0.5, RULES) == (1, 0)
    assert dm.score_clip(_track(80, [(18, 4, 0.9)]), ends, 0.5, RULES) == (1, 0)  # last tolerated frame
    assert dm.score_clip(_track(80, [(19, 4, 0.9)]), ends, 0.5, RULES) == (0, 1)  # one frame late
    assert dm.score_clip(_track(80, [(12, 4, 0.9), (50, 2, 0.8)]), ends, 0.5, RULES) == (1, 1)
    assert dm.score_clip(_track(80, [(12, 4, 0.4)]), ends, 0.5, RULES) == (0, 0)
    # Two firings in one window: one detection, no false alarm.
    rules = dm.DetectionRules(hop=1280, window=6, smooth=1, tolerance=2, refractory=1)
    assert dm.score_clip(_track(80, [(11, 2, 0.9), (15, 2, 0.9)]), ends, 0.5, rules) == (1, 0)


def test_false_alarms_per_hour_over_trigger_and_background_clips():
    rules = RULES
    trigger_clips = np.stack([_track(80, [(12, 3, 0.9)]), _track(80, [(40, 3, 0.9)])])
    ends = [[12800], [12800]]  # the second clip fires far from its trigger: a miss and a false alarm
    s = dm.score(trigger_clips, ends, 10.0, 0.5, rules)
    assert (s.triggers, s.detected, s.false_alarms) == (2, 1, 1)
    assert s.detection_rate == 0.5
    assert math.isclose(s.false_alarms_per_hour, 1 / (20 / 3600))
    background = np.stack([_track(80, [(5, 2, 0.7), (60, 2, 0.9)]), _track(80, [])])
    b = dm.score(background, [[], []], 10.0, 0.5, rules)
    assert (b.triggers, b.false_alarms) == (0, 2) and math.isnan(b.detection_rate)
    both = dm.combine(s, b)
    assert (both.triggers, both.detected, both.false_alarms) == (2, 1, 3)
    assert math.isclose(both.false_alarms_per_hour, 3 / (40 / 3600))


def test_roc_is_monotone_and_the_chosen_threshold_meets_the_limit():
    rng = np.random.default_rng(0)
    tracks, ends, blips = [], [], []
    for _ in range(20):
        end = int(rng.integers(5, 50)) * 1280
        t = _track(80, [(end // 1280 + 2, 4, float(rng.uniform(0.6, 0.99)))])
        blips.append(float(rng.uniform(0.3, 0.8)))
        t[int(rng.integers(70, 78))] = blips[-1]  # a spurious firing, more than `refractory` after the trigger's
        tracks.append(t)
        ends.append([end])
    # Above the tracks' floor (0.05): below it a track is above threshold from frame 0 and fires only there.
    points = dm.roc([(np.stack(tracks), ends, 10.0)], RULES, thresholds=np.linspace(0.1, 0.99, 90))
    det = [p.detection_rate for p in points]
    fa = [p.false_alarms for p in points]
    assert all(a >= b for a, b in zip(det, det[1:])) and all(a >= b for a, b in zip(fa, fa[1:]))
    chosen = dm.choose_threshold(points, max_false_alarms_per_hour=1.0)
    assert chosen.false_alarms == 0 and chosen.threshold > max(blips)
    assert chosen.detection_rate == max(p.detection_rate for p in points if p.false_alarms == 0)


def test_smoothing_is_a_causal_moving_average():
    p = np.array([0.0, 1.0, 0.0, 1.0, 1.0])
    np.testing.assert_allclose(dm.smooth(p, 2), [0.0, 0.5, 0.5, 0.5, 1.0])
    np.testing.assert_allclose(dm.smooth(p, 1), p)


@pytest.mark.parametrize(("count", "low", "high"), [
    (0, 0.0, 3.6889), (1, 0.02532, 5.5716), (2, 0.2422, 7.2247), (5, 1.6235, 11.6683), (10, 4.7954, 18.3904),
])
def test_poisson_interval_matches_the_exact_tables(count, low, high):
    # Garwood's exact 95 % limits (chi-square quantiles / 2), as tabulated.
    lo, hi = dm.poisson_interval(count)
    assert math.isclose(lo, low, rel_tol=2e-4, abs_tol=1e-9) and math.isclose(hi, high, rel_tol=2e-4)
    # The tails it promises, against torch's Poisson distribution.
    cdf = lambda k, mean: float(torch.distributions.Poisson(torch.tensor(mean, dtype=torch.float64))  # noqa: E731
                                .log_prob(torch.arange(k + 1, dtype=torch.float64)).exp().sum())
    assert math.isclose(cdf(count, hi), 0.025, rel_tol=1e-6)
    if count:
        assert math.isclose(1.0 - cdf(count - 1, lo), 0.025, rel_tol=1e-6)


def test_operating_point_chooses_the_smoothing_on_the_given_clips():
    # One-frame spikes on background clips: smoothing over 3+ frames keeps them under a threshold the 4-frame
    # trigger responses still reach, so a smoothed track qualifies with every trigger detected and no false alarm.
    ends = [[12800], [12800], []]
    tracks = np.stack([_track(80, [(12, 4, 0.9)]), _track(80, [(12, 4, 0.85)]),
                       _track(80, [(30, 1, 0.99), (60, 1, 0.99)])])
    rules, point, summary = dm.choose_operating_point([(tracks, ends, 10.0)], RULES, 1.0, smoothing=(1, 3, 5))
    assert set(summary) == {1, 3, 5}
    assert (point.detected, point.false_alarms) == (2, 0)
    assert rules.smooth == 3 and summary[1]["detection_rate"] < 1.0  # unsmoothed: the spikes outrank a trigger
    assert point.threshold == summary[3]["threshold"]
