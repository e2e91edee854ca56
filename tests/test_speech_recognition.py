"""The CTC recogniser example: edit distance and error rates, greedy decoding, the model's shapes, the two
backends' agreement on a batch, and the smoke run end to end (loss drops, files and metrics written)."""

from __future__ import annotations

import functools
import json
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from examples import speech_recognition
from examples.speech import (
    ctc_metrics,
    recogniser_decoding,
    recogniser_model,
    recogniser_training,
    time_recogniser_steps,
    vocabulary,
)

# ------------------------------------------------------------------------------------- edit distance


@pytest.mark.parametrize(
    ("reference", "hypothesis", "distance"),
    [
        ("", "", 0),
        ("abc", "", 3),
        ("", "abc", 3),
        ("abc", "abc", 0),
        ("kitten", "sitting", 3),  # two substitutions and an insertion
        ("flaw", "lawn", 2),  # a deletion and an insertion
        ("one two", "one too", 1),
        (["one", "two", "three"], ["one", "three"], 1),  # words: a deleted word costs 1
        (["one", "two"], ["two", "one"], 2),
    ],
)
def test_edit_distance_known_values(reference, hypothesis, distance):
    assert ctc_metrics.edit_distance(reference, hypothesis) == distance
    assert ctc_metrics.edit_distance(hypothesis, reference) == distance


def _recursive_distance(a: str, b: str) -> int:
    """The definition, memoised: the independent reference for the dynamic programme."""
    @functools.cache
    def d(i: int, j: int) -> int:
        if i == 0 or j == 0:
            return i + j
        return min(d(i - 1, j) + 1, d(i, j - 1) + 1, d(i - 1, j - 1) + (a[i - 1] != b[j - 1]))
    return d(len(a), len(b))


@settings(max_examples=200, deadline=None)
@given(st.text("abc ", max_size=9), st.text("abc ", max_size=9))
def test_edit_distance_matches_the_definition(a, b):
    distance = ctc_metrics.edit_distance(a, b)
    assert distance == _recursive_distance(a, b)
    assert abs(len(a) - len(b)) <= distance <= max(len(a), len(b))


def test_error_rates_are_corpus_level():
    refs = ["one two three", "four five"]
    hyps = ["one too three", "four"]
    rates = ctc_metrics.error_rates(refs, hyps)
    # characters: "two"->"too" 1 edit; "four five"->"four" deletes " five" (5); reference chars 13 + 9
    assert (rates.char_edits, rates.chars) == (6, 22)
    assert rates.cer == pytest.approx(6 / 22)
    # words: 1 substitution + 1 deletion over 5 reference words
    assert (rates.word_edits, rates.words) == (2, 5)
    assert rates.wer == pytest.approx(0.4)
    perfect = ctc_metrics.error_rates(refs, refs)
    assert perfect.cer == 0.0 and perfect.wer == 0.0
    with pytest.raises(ValueError):
        ctc_metrics.error_rates(refs, hyps[:1])


# --------------------------------------------------------------------------------------- decoding


def test_greedy_decoding_merges_repeats_drops_blanks_and_stops_at_the_length():
    paths = [[3, 3, 0, 3, 1, 1, 0, 0, 2, 2], [0, 5, 5, 5, 0, 0, 0, 0, 0, 9]]
    logits = torch.nn.functional.one_hot(torch.tensor(paths), 28).float().transpose(0, 1)  # [T, N, C]
    labels = ctc_metrics.greedy_labels(logits, torch.tensor([10, 6]))
    assert labels == [[3, 3, 1, 2], [5]]  # the blank between the 3s keeps both; frame 9 of row 2 is past its end
    assert ctc_metrics.greedy_transcripts(logits, torch.tensor([10, 6])) == ["bb a", "d"]


def _peaked_log_probs(paths: list[list[int]], peak: float = 8.0) -> torch.Tensor:
    """[T, N, 28] log-probabilities whose argmax at each frame is paths[n][t]."""
    logits = peak * torch.nn.functional.one_hot(torch.tensor(paths), 28).double().transpose(0, 1)
    return logits.log_softmax(-1)


def test_greedy_decoder_is_the_seqfast_op_and_matches_the_python_one():
    torch.manual_seed(0)
    log_probs = torch.randn(40, 6, 28).log_softmax(-1)
    lengths = torch.tensor([40, 33, 1, 0, 17, 40])
    assert recogniser_decoding.decode("greedy", log_probs, lengths, None) == \
        ctc_metrics.greedy_transcripts(log_probs, lengths)


def test_beam_decoders_lexicon_spells_only_vocabulary_words():
    setup = recogniser_decoding.decoder_setup(["one two", "three four five", "two two"])
    # "onn tuo": a path off the vocabulary; the lexicon decoder must still spell only known words
    text = "onn tuo"
    path = [x for c in vocabulary.encode(text) for x in (c, 0)]
    log_probs = _peaked_log_probs([path], peak=2.0)
    lengths = torch.tensor([len(path)])
    assert recogniser_decoding.decode("beam", log_probs, lengths, setup) == [text]
    for name in ("beam_lexicon", "beam_lexicon_lm"):
        (hyp,) = recogniser_decoding.decode(name, log_probs, lengths, setup)
        words = set(vocabulary.DIGITS) | set(vocabulary.WORDS)
        assert hyp and all(w in words for w in hyp.split()), (name, hyp)
    with pytest.raises(ValueError, match="unknown decoder"):
        recogniser_decoding.decode("viterbi", log_probs, lengths, setup)


def test_tuning_picks_the_grid_pair_with_the_lowest_validation_cer(monkeypatch):
    setup = recogniser_decoding.decoder_setup(["one two"])
    cer_of = {(0.5, 1.0): 0.1, (0.25, 0.0): 0.1}  # a tie: the smaller pair wins

    def fake_rates(data, batches, name, s):
        return SimpleNamespace(rates=SimpleNamespace(cer=cer_of.get(s.weights[name], 0.5)))

    monkeypatch.setattr(recogniser_decoding, "log_probs_of", lambda model, data: [])
    monkeypatch.setattr(recogniser_decoding, "rates_of", fake_rates)
    found = recogniser_decoding.tune(None, None, setup, ("greedy", "beam_lm"))
    assert set(found) == {"beam_lm"} and setup.weights["beam_lm"] == (0.25, 0.0)
    assert len(found["beam_lm"]["valid_cer"]) == len(recogniser_decoding.LM_WEIGHTS) * len(
        recogniser_decoding.INSERTION_BONUSES)


# ------------------------------------------------------------------------------------------ model


@pytest.mark.parametrize("frames", [1, 2, 3, 4, 5, 97, 160])
def test_subsampled_lengths_match_the_convolutions(frames):
    sub = recogniser_model.ConvSubsampling(80, 4, 16)
    out, lengths = sub(torch.zeros(1, frames, 80), torch.tensor([frames]))
    assert out.shape == (1, int(lengths[0]), 16)


@pytest.mark.parametrize("outputs_per_frame", [1, 2])
def test_padding_does_not_change_an_utterance(outputs_per_frame):
    torch.manual_seed(0)
    config = recogniser_model.ModelConfig(conv_channels=4, d_model=32, num_layers=2, num_heads=2, dim_feedforward=64,
                                          outputs_per_frame=outputs_per_frame)
    model = recogniser_model.Recogniser(config, "seqfast").eval()
    short = torch.randn(1, 37, 80)
    padded = torch.cat([short, torch.zeros(1, 23, 80)], dim=1)
    alone, n_alone = model(short, torch.tensor([37]))
    batched, n_batched = model(torch.cat([padded, torch.randn(1, 60, 80)]), torch.tensor([37, 60]))
    frames = 10 * outputs_per_frame
    assert int(n_alone[0]) == int(n_batched[0]) == frames == alone.shape[0]
    assert batched.shape == (15 * outputs_per_frame, 2, recogniser_model.NUM_CLASSES)
    torch.testing.assert_close(batched[:frames, 0], alone[:, 0], atol=1e-5, rtol=1e-5)


def test_outputs_per_frame_splits_the_head_in_time_order():
    """Output frame k t + j is the head's j-th block of classes at encoder frame t."""
    torch.manual_seed(0)
    config = recogniser_model.ModelConfig(conv_channels=4, d_model=32, num_layers=1, num_heads=2, dim_feedforward=64,
                                          dropout=0.0, outputs_per_frame=2)
    model = recogniser_model.Recogniser(config, "torch").eval()
    features = torch.randn(1, 37, 80)
    captured = {}
    model.norm.register_forward_hook(lambda module, args, out: captured.setdefault("encoded", out))
    logits, _ = model(features, torch.tensor([37]))
    head = model.head(captured["encoded"])[0]  # [T', 2 C]
    c = recogniser_model.NUM_CLASSES
    torch.testing.assert_close(logits[0::2, 0], head[:, :c])
    torch.testing.assert_close(logits[1::2, 0], head[:, c:])


# ----------------------------------------------------------------------------------- the examples


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("speech-cache"))


def test_backends_agree_on_the_first_batch(cache):
    size = recogniser_training.SIZES["smoke"]
    data = recogniser_training.load_utterances(size.train, cache)
    batch = recogniser_training.collate(data, list(range(8)))
    losses, grads = {}, {}
    for backend in ("seqfast", "torch"):
        model = recogniser_training.build_model(size.model, backend, seed=0).eval()  # eval: no dropout
        logits, out_lengths = model(batch.features, batch.lengths)
        loss = recogniser_model.ctc_loss(backend, logits, batch.targets, out_lengths, batch.target_lengths)
        loss.backward()
        losses[backend] = loss.detach()
        grads[backend] = {n: p.grad for n, p in model.named_parameters()}
    assert grads["seqfast"].keys() == grads["torch"].keys()
    torch.testing.assert_close(losses["seqfast"], losses["torch"], atol=1e-5, rtol=1e-5)
    for name, grad in grads["seqfast"].items():
        torch.testing.assert_close(grad, grads["torch"][name], atol=1e-5, rtol=1e-4, msg=name)


def test_smoke_run_end_to_end(cache, tmp_path):
    out = tmp_path / "run"
    metrics = speech_recognition.main(["--smoke", "--compare", "--threads", "1", "--out", str(out), "--cache", cache])
    saved = json.loads((out / "metrics.json").read_text())
    for key in ("cer", "wer", "cer_digits", "wer_digits", "step_time_s", "infer_batch_time_s", "train_seconds",
                "data", "machine", "backends", "decoders", "decoding"):
        assert key in saved, key
    assert set(saved["decoders"]) == set(recogniser_decoding.DECODERS)
    assert saved["decoders"]["greedy"]["cer"] == pytest.approx(saved["cer"])  # the op and the Python decoder agree
    assert set(saved["step_time_s"]) == {"seqfast", "torch"}
    assert all(t > 0 for t in saved["step_time_s"].values())
    assert saved["data"]["train_utterances"] == 48 and saved["data"]["test_utterances"] == 16
    for backend, run in metrics["backends"].items():
        assert run["final_loss"] < 0.75 * run["first_loss"], backend  # the loss drops
        assert run["cer"] >= 0.0 and run["wer"] >= 0.0
    for name in ("curves.png", "posteriors.png", "comparison.md", "model.pt"):
        assert (out / name).stat().st_size > 0, name
    assert "| training step, wall-clock (ms, median) |" in (out / "comparison.md").read_text()


def test_interleaved_step_timer(cache):
    medians = time_recogniser_steps.measure(rounds=2, num_batches=3, batch_size=4, size="smoke", cache_dir=cache)
    assert set(medians) == {"seqfast", "torch"}
    for backend, m in medians.items():
        assert set(m) == {"train_wall", "train_cpu", "infer_wall", "infer_cpu"}, backend
        assert all(v > 0 for v in m.values()), backend
