"""The speech data of the examples: synthesis, resampling, SNR mixing, log-mel features, datasets."""

import math
import time

import numpy as np
import pytest
import torch

# Needs espeakng-loader (in the Makefile's DEPS): without it this file fails to import, loudly.
from examples.speech import audio, datasets, features, synth, vocabulary

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------------------ synthesis


def test_word_is_speech_of_plausible_length():
    wave = synth.synthesize(synth.SynthRequest("seven", synth.Voice("en-US"), rate=175, pitch=50))
    assert synth.sample_rate() == 22050
    assert wave.dtype == np.float32 and wave.ndim == 1
    seconds = len(wave) / synth.sample_rate()
    assert 0.2 < seconds < 1.5, seconds
    assert np.sqrt(np.mean(wave**2)) > 0.01  # not silence
    assert np.abs(wave).max() < 1.0
    # A slower rate says the same word for longer.
    slow = synth.synthesize(synth.SynthRequest("seven", synth.Voice("en-US"), rate=90, pitch=50))
    assert len(slow) > 1.3 * len(wave)


@pytest.mark.parametrize("voice", [synth.Voice("en-US", "m3"), synth.Voice("en-GB-scotland", "klatt"),
                                   synth.Voice("en", "whisper")])
def test_synthesis_is_deterministic(voice):
    request = synth.SynthRequest("three four five", voice, rate=160, pitch=40, seed=7)
    first = synth.synthesize(request)
    other = synth.synthesize(synth.SynthRequest("nine", voice, rate=200, pitch=70, seed=3))
    again = synth.synthesize(request)  # after another utterance: no state carried over
    np.testing.assert_array_equal(first, again)
    assert len(other) != len(first)
    higher = synth.synthesize(synth.SynthRequest("three four five", voice, rate=160, pitch=80, seed=7))
    assert not np.array_equal(first[: len(higher)], higher[: len(first)])


def test_process_pool_matches_serial():
    voices = [synth.Voice("en-US", v) for v in ("m1", "f2", "klatt3", "whisperf")]
    requests = [synth.SynthRequest(f"{w} {w}", voices[i % 4], 150 + i, 30 + i, seed=i)
                for i, w in enumerate(vocabulary.WORDS[:16])]
    serial = synth.synthesize_many(requests, workers=1)
    pooled = synth.synthesize_many(requests, workers=2)
    for a, b in zip(serial, pooled, strict=True):
        np.testing.assert_array_equal(a, b)


def test_voice_lists():
    accents = synth.list_accents("en")
    assert {"en", "en-US", "en-GB-scotland"} <= set(accents)
    assert "en-Shaw" not in accents
    variants = synth.list_variants()
    assert {"m3", "f2", "klatt", "whisper"} <= set(variants)
    assert all(" " not in v for v in variants)


# ------------------------------------------------------------------------------------------------- audio


@pytest.mark.parametrize("orig,new", [(22050, 16000), (16000, 22050), (48000, 16000)])
@pytest.mark.parametrize("freq", [440.0, 1000.0, 3000.0, 6000.0])
def test_resample_sine(orig, new, freq):
    t = torch.arange(orig, dtype=torch.float64) / orig
    y = audio.resample(torch.sin(2 * math.pi * freq * t + 0.3), orig, new)
    assert y.shape == (new,)
    ref = torch.sin(2 * math.pi * freq * torch.arange(new, dtype=torch.float64) / new + 0.3)
    edge = new // 20  # the ends see the zeros outside the signal
    assert float((y - ref)[edge:-edge].abs().max()) < 2e-5


def test_resample_removes_what_the_new_rate_cannot_hold():
    t = torch.arange(22050, dtype=torch.float64) / 22050
    y = audio.resample(torch.sin(2 * math.pi * 9500.0 * t), 22050, 16000)  # above the new Nyquist (8 kHz)
    rms = float(y[800:-800].pow(2).mean().sqrt())
    assert 20 * math.log10(rms / math.sqrt(0.5)) < -80.0


def test_resample_shapes_and_dtype():
    x = torch.randn(3, 2, 1001)
    y = audio.resample(x, 22050, 16000)
    assert y.shape == (3, 2, math.ceil(1001 * 16000 / 22050)) and y.dtype == torch.float32
    torch.testing.assert_close(y[1, 0], audio.resample(x[1, 0], 22050, 16000))
    assert torch.equal(audio.resample(x, 16000, 16000), x)


@pytest.mark.parametrize("snr", [10.0, 17.5, 30.0])
def test_mix_hits_the_snr(snr):
    gen = torch.Generator().manual_seed(0)
    signal = torch.sin(torch.linspace(0, 300, 16000)) * torch.linspace(0, 1, 16000)
    noise = audio.colored_noise(12000, 1.0, gen)  # shorter than the signal: repeated
    mixed = audio.mix_at_snr(signal, noise, snr)
    assert abs(audio.snr_db(signal, mixed - signal) - snr) < 0.1


def test_gain_and_colored_noise():
    x = torch.randn(1000)
    torch.testing.assert_close(audio.power(audio.gain_db(x, -20.0)), audio.power(x) / 100.0)
    gen = torch.Generator().manual_seed(1)
    for exponent in (0.0, 1.0, 2.0):
        n = audio.colored_noise(32768, exponent, gen)
        assert abs(float(audio.power(n)) - 1.0) < 1e-5
    # Brown noise has far more low than high frequency power; white has about the same.
    spec_brown = torch.fft.rfft(audio.colored_noise(32768, 2.0, gen)).abs().pow(2)
    spec_white = torch.fft.rfft(audio.colored_noise(32768, 0.0, gen)).abs().pow(2)
    assert spec_brown[10:100].mean() > 1000 * spec_brown[-1000:].mean()
    assert 0.5 < float(spec_white[10:1000].mean() / spec_white[-1000:].mean()) < 2.0


def test_place_trim_and_starts():
    clip = torch.zeros(100)
    audio.place(clip, torch.ones(30), 80)
    assert clip.sum() == 20 and clip[80:].eq(1).all()
    word = torch.cat([torch.zeros(800), torch.ones(480), torch.zeros(800)])
    trimmed = audio.trim_silence(word, frame=160)
    assert trimmed.shape[0] == 480 and trimmed.eq(1).all()
    faded = audio.fade(torch.ones(1000), 80)
    assert faded[80:-80].eq(1).all() and float(faded[0]) < 1e-3 and float(faded[-1]) < 1e-3
    assert torch.equal(faded[:80], faded[-80:].flip(0)) and bool((faded[1:80] > faded[:79]).all())
    gen = torch.Generator().manual_seed(0)
    lengths = [3000, 5000, 1000, 4000]
    starts = audio.random_starts(lengths, 20000, 500, gen)
    spans = sorted((s, s + n) for s, n in zip(starts, lengths))
    assert all(b_start >= a_end + 500 for (_, a_end), (b_start, _) in zip(spans, spans[1:]))
    assert spans[-1][1] <= 20000
    assert audio.random_starts([15000, 15000], 20000, 0, gen) is None


# ----------------------------------------------------------------------------------------------- features


def test_mel_scale_known_values():
    # HTK: 2595 * log10(1 + f / 700), evaluated with Python's math module: 1000 Hz is ~1000 mel by design.
    assert abs(float(features.hz_to_mel(1000.0)) - 999.9855371396) < 1e-6
    assert abs(float(features.hz_to_mel(8000.0)) - 2840.0230467083) < 1e-6
    assert abs(float(features.mel_to_hz(features.hz_to_mel(4321.0))) - 4321.0) < 1e-9


def _triangle(m, f, n_mels=80, f_max=8000.0):
    # Filter m at frequency f, written out scalar by scalar from the definition.
    top = 2595.0 * math.log10(1.0 + f_max / 700.0)
    edge = [700.0 * (10.0 ** (top * i / (n_mels + 1) / 2595.0) - 1.0) for i in range(n_mels + 2)]
    lo, mid, hi = edge[m], edge[m + 1], edge[m + 2]
    if lo < f <= mid:
        return (f - lo) / (mid - lo)
    if mid < f < hi:
        return (hi - f) / (hi - mid)
    return 0.0


def test_mel_filterbank():
    fb = features.mel_filterbank()
    assert fb.shape == (80, 257) and fb.dtype == torch.float32
    bin_hz = 16000 / 512
    for m, k in [(0, 1), (10, 12), (40, 50), (79, 250), (79, 256), (5, 100)]:
        assert abs(float(fb[m, k]) - _triangle(m, k * bin_hz)) < 1e-6, (m, k)
    assert float(fb.max()) <= 1.0 and float(fb.min()) >= 0.0
    # Neighbouring triangles add up to 1 between the first and last centres (peak-1 filters).
    first_centre = float(features.mel_to_hz(features.hz_to_mel(8000.0) / 81))
    last_centre = float(features.mel_to_hz(features.hz_to_mel(8000.0) * 80 / 81))
    inside = [k for k in range(257) if first_centre <= k * bin_hz <= last_centre]
    torch.testing.assert_close(fb[:, inside].sum(0), torch.ones(len(inside)), atol=1e-6, rtol=0)


def test_power_of_a_sine_on_a_bin():
    # A sine of amplitude A on FFT bin k: |X_k| = A/2 * sum(window) = A/2 * 200 for a periodic Hann of 400.
    amplitude, k = 0.3, 32  # 1000 Hz
    t = torch.arange(16000, dtype=torch.float64) / 16000
    wave = amplitude * torch.sin(2 * math.pi * k * 16000 / 512 * t + 0.7)
    p = features.power_spectrogram(wave.float())
    assert p.shape == (257, 101)
    expected = (amplitude / 2 * 200) ** 2
    interior = p[k, 5:-5]
    assert float((interior / expected - 1).abs().max()) < 1e-4


def test_log_mel_matches_a_direct_dft():
    gen = torch.Generator().manual_seed(3)
    wave = torch.randn(4000, generator=gen, dtype=torch.float64) * 0.1
    got = features.log_mel(wave.float())
    assert got.shape == (features.num_frames(4000), 80) == (26, 80)
    # Reference: frame t is the 400 samples centred on sample t * 160 (reflect-padded), Hann-weighted,
    # zero-padded to 512 on both sides equally, a plain DFT sum in float64, then the scalar triangles.
    x = np.pad(wave.numpy(), 256, mode="reflect")
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 400)
    window = np.zeros(512)
    window[56:456] = hann
    dft = np.exp(-2j * np.pi * np.outer(np.arange(257), np.arange(512)) / 512)
    fb = np.array([[_triangle(m, k * 16000 / 512) for k in range(257)] for m in range(80)])
    for frame in (0, 7, 25):
        spectrum = dft @ (x[frame * 160 : frame * 160 + 512] * window)
        ref = np.log(fb @ np.abs(spectrum) ** 2 + features.LOG_FLOOR)
        np.testing.assert_allclose(got[frame].numpy(), ref, atol=2e-4, rtol=0)


# ----------------------------------------------------------------------------------------------- datasets


def test_voice_split_is_disjoint():
    split = datasets.voice_split()
    train_variants = {v.variant for v in split.train}
    test_variants = {v.variant for v in split.test}
    assert train_variants and test_variants and not train_variants & test_variants
    assert "" in train_variants
    assert len(test_variants) == round(0.2 * len(synth.list_variants()))
    assert datasets.voice_split() == split  # deterministic


def test_recogniser_set_is_deterministic_and_cached(tmp_path):
    config = datasets.RecogniserConfig(split="test", num_utterances=6, seed=5)
    start = time.perf_counter()
    first = datasets.recogniser_set(config, cache_dir=tmp_path / "a", workers=1)
    generate_s = time.perf_counter() - start
    assert first.generated and first.path.exists() and len(first) == 6

    calls = synth.synth_calls
    start = time.perf_counter()
    cached = datasets.recogniser_set(config, cache_dir=tmp_path / "a")
    load_s = time.perf_counter() - start
    assert not cached.generated and synth.synth_calls == calls  # nothing synthesised
    assert load_s < max(0.5, generate_s / 4)
    assert torch.equal(cached.waves, first.waves) and cached.texts == first.texts

    fresh = datasets.recogniser_set(config, cache_dir=tmp_path / "b", workers=1)  # generated again
    assert fresh.generated and torch.equal(fresh.waves, first.waves) and fresh.voices == first.voices

    other = datasets.recogniser_set(datasets.RecogniserConfig(split="test", num_utterances=6, seed=6), tmp_path / "a")
    assert other.generated and other.path != first.path and other.texts != first.texts

    test_variants = {v.variant for v in datasets.voice_split().test}
    allowed = set(vocabulary.WORDS) | set(vocabulary.DIGITS)
    for i in range(len(first)):
        assert first.voices[i].split("+")[1] in test_variants  # only held-out speakers in the test split
        assert set(first.texts[i].split()) <= allowed
        wave = first.wave(i)
        assert wave.dtype == torch.float32 and 0.3 < wave.shape[0] / 16000 < 8.0
        assert first.features(i).shape == (features.num_frames(wave.shape[0]), 80)
        assert vocabulary.decode(first.targets(i).tolist()) == first.texts[i]


def test_trigger_labels_are_the_windows():
    labels = datasets.trigger_labels([1000, 50_000], num_frames=1001, hop=160, window=50)
    expected = torch.zeros(1001, dtype=torch.uint8)
    expected[7:57] = 1  # 1000 // 160 + 1 = 7: the first frame centred after sample 999
    expected[313:363] = 1  # 50000 // 160 + 1 = 313
    assert torch.equal(labels, expected)
    # Cut at the end of the clip, and at a coarser output rate (4 feature frames per output frame).
    assert int(datasets.trigger_labels([159_000], 1001, 160, 50).sum()) == 1001 - 994
    assert torch.equal(datasets.trigger_labels([1000], 251, 640, 12)[:16].nonzero().flatten(), torch.arange(2, 14))


def test_trigger_set(tmp_path):
    config = datasets.TriggerConfig(split="train", num_clips=4, seed=2, triggers=(1, 3))
    clips = datasets.trigger_set(config, cache_dir=tmp_path)
    assert clips.generated and clips.waves.shape == (4, 160_000) and clips.labels.shape == (4, 1001)
    train_variants = {v.variant for v in datasets.voice_split().train}
    for i in range(4):
        ends = clips.trigger_ends[i]
        assert 1 <= len(ends) <= 3
        triggers = [(s, e) for w, s, e in clips.words[i] if w == config.trigger_word]
        assert [e for _, e in triggers] == ends
        assert all(w in vocabulary.WORDS for w, _, _ in clips.words[i] if w != config.trigger_word)
        spans = [(s, e) for _, s, e in clips.words[i]]
        assert all(b[0] >= a[1] for a, b in zip(spans, spans[1:]))  # foreground words do not overlap
        assert torch.equal(clips.labels[i], datasets.trigger_labels(ends, 1001, 160, 50))
        assert int(clips.labels[i].sum()) == 50 * len(ends)  # whole windows, none cut off or merged
        # The trigger stands out of the background (the samples under no foreground word).
        wave = clips.wave(i)
        background = torch.ones(wave.shape[0], dtype=torch.bool)
        for s, e in spans:
            background[s:e] = False
        s, e = triggers[0]
        assert float(audio.power(wave[s:e])) > 2 * float(audio.power(wave[background]))
        assert (clips.voices[i].split("+") + [""])[1] in train_variants
        assert clips.features(i).shape == (1001, 80)
    again = datasets.trigger_set(config, cache_dir=tmp_path)
    assert not again.generated and torch.equal(again.labels, clips.labels) and again.words == clips.words


def test_generate_and_preview_commands(tmp_path, capsys):
    import wave

    from examples.speech import generate, preview

    generate.main(["--kind", "recogniser", "--split", "test", "--num", "2", "--cache", str(tmp_path / "c")])
    generate.main(["--kind", "recogniser", "--split", "test", "--num", "2", "--cache", str(tmp_path / "c")])
    printed = capsys.readouterr().out
    assert "2 items" in printed and "generated in" in printed and "loaded from the cache" in printed

    preview.main(["--out", str(tmp_path / "p"), "--cache", str(tmp_path / "c"), "--count", "2"])
    out = tmp_path / "p"
    for name in ("recogniser.png", "trigger.png", "recogniser.txt", "trigger.txt"):
        assert (out / name).stat().st_size > 0
    with wave.open(str(out / "trigger_1.wav")) as f:
        assert (f.getframerate(), f.getnchannels(), f.getsampwidth(), f.getnframes()) == (16000, 1, 2, 160_000)
    assert (out / "recogniser.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_hard_negative_distractors(tmp_path):
    config = datasets.TriggerConfig(split="train", num_clips=3, seed=5, clip_seconds=4.0, triggers=(0, 1),
                                    distractors=(2, 2), babble_sentences=(1, 1), near_trigger_fraction=1.0)
    clips = datasets.trigger_set(config, cache_dir=tmp_path)
    distractors = [w for clip in clips.words for w, _, _ in clip if w != config.trigger_word]
    assert len(distractors) == 6 and set(distractors) <= set(vocabulary.NEAR_TRIGGER_WORDS)
    assert config.trigger_word not in vocabulary.NEAR_TRIGGER_WORDS
    assert not any(config.trigger_word in w for w in vocabulary.NEAR_TRIGGER_WORDS)


def test_cache_key_leaves_out_added_fields_at_their_old_value():
    # The sets cached before `near_trigger_fraction` existed keep their files: at 0 it is not in the key.
    plain = datasets.TriggerConfig()
    assert "near_trigger_fraction" not in datasets._cache_key("trigger", plain)
    assert "NEAR" not in datasets._cache_key("trigger", plain).upper()
    near = datasets.TriggerConfig(near_trigger_fraction=0.5)
    assert '"near_trigger_fraction": 0.5' in datasets._cache_key("trigger", near)
    assert datasets._cache_path("trigger", near, None) != datasets._cache_path("trigger", plain, None)
    assert "near" not in datasets._cache_key("recogniser", datasets.RecogniserConfig())
