"""The date-normalisation example: its data, the Transformer's cached decoding against the full causal pass,
weights moving between the seqfast model and its torch twin, and the smoke run end to end."""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch

from examples.translation import decoding
from examples.translation.dates import FORMATS, DateData, ordinal_suffix, ordinal_word
from examples.translation.model import ModelConfig, Seq2SeqTransformer, twin

BACKENDS = ["seqfast", "torch"]


@pytest.fixture(scope="module")
def data():
    return DateData(seed=0)


def _model(vocab: int, backend: str, share: bool = False, norm_first: bool = False) -> Seq2SeqTransformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab, d_model=32, heads=4, encoder_layers=2, decoder_layers=2, d_ff=48, share_embeddings=share)
    model = Seq2SeqTransformer(cfg, backend)
    for layer in model.decoder_layers:
        layer.norm_first = norm_first
    return model.eval()


def _batch(data, n, seed=1):
    return data.batch(data.sample(random.Random(seed), data.train, n))


# Data -------------------------------------------------------------------------------------------------------

def test_generator_is_deterministic_and_the_split_disjoint():
    a, b = DateData(seed=3), DateData(seed=3)
    assert a.test == b.test and a.val == b.val and a.train == b.train
    assert a.sample(random.Random(5), a.train, 50) == b.sample(random.Random(5), b.train, 50)
    assert a.held_out(a.test, 3) == b.held_out(b.test, 3)
    assert DateData(seed=4).test != a.test
    train, val, test = set(a.train), set(a.val), set(a.test)
    assert not (train & test) and not (train & val) and not (val & test)
    assert len(train) + len(val) + len(test) == 36525  # every day of 1950-2049
    # Disjoint by date, hence by source string: no training day can write a test source.
    test_sources = {s for s, _ in a.held_out(a.test, 3)}
    assert not test_sources & {f(d) for d in a.train[:3000] for f in FORMATS.values()}


def test_formats_say_the_right_date(data):
    d = dt.date(1979, 5, 3)
    for name, fmt in FORMATS.items():
        assert fmt(d) == name
        assert all(c in data.vocab.stoi for c in fmt(dt.date(2037, 9, 27)))
    assert FORMATS["03/05/79"](dt.date(2003, 11, 30)) == "30/11/03"
    assert [ordinal_word(i) for i in (1, 12, 20, 21, 30, 31)] == [
        "first", "twelfth", "twentieth", "twenty-first", "thirtieth", "thirty-first"]
    assert [ordinal_suffix(i) for i in (1, 2, 3, 4, 11, 12, 13, 21, 22, 23)] == [
        "1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "23rd"]


def test_batch_layout(data):
    b = data.batch([("3 may 1979", "1979-05-03"), ("03/05/79", "1979-05-03")])
    v = data.vocab
    assert b.src.shape == (2, 10) and b.src_padding[1].tolist() == [False] * 8 + [True] * 2
    assert b.tgt_in[:, 0].eq(v.BOS).all() and b.tgt_out[:, -1].eq(v.EOS).all()
    assert v.decode(b.tgt_out[0]) == "1979-05-03" and v.decode(b.src[1]) == "03/05/79"


# Cached decoding ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch,chunks,norm_first", [(1, [1] * 11, False), (3, [1] * 11, False),
                                                     (5, [4, 1, 1, 5], False), (3, [1] * 11, True)])
def test_cached_steps_equal_the_causal_forward(data, backend, batch, chunks, norm_first):
    model = _model(len(data.vocab), backend, norm_first=norm_first)
    b = _batch(data, batch)
    with torch.no_grad():
        memory = model.encode(b.src, b.src_padding)
        full = model.decode(b.tgt_in, memory, b.src_padding)
        state = model.start(memory, b.src_padding, capacity=16)
        steps, at = [], 0
        for n in chunks:
            steps.append(model.step(b.tgt_in[:, at:at + n], state))
            at += n
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=2e-5, rtol=1e-5)
    assert state.position == b.tgt_in.shape[1] == state.caches[0].length


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch", [3])
def test_greedy_and_beam_equal_with_and_without_cache(data, backend, batch):
    model = _model(len(data.vocab), backend)
    b = _batch(data, batch, seed=7)
    v = data.vocab
    for search in (lambda c: decoding.greedy(model, b.src, b.src_padding, 11, v.BOS, v.EOS, cached=c),
                   lambda c: decoding.beam_search(model, b.src, b.src_padding, 11, v.BOS, v.EOS, beam=3, cached=c)):
        cached, uncached = search(True), search(False)
        assert torch.equal(cached.tokens, uncached.tokens)
        torch.testing.assert_close(cached.scores, uncached.scores, atol=1e-4, rtol=1e-5)


def _rescored(model, b, tokens, bos, eos):
    """Teacher-forced sum of log-probabilities of ``tokens`` (B, T) up to and including their first EOS."""
    tgt_in = torch.cat([torch.full((tokens.shape[0], 1), bos, dtype=torch.long), tokens[:, :-1]], 1)
    with torch.no_grad():
        lp = model(b.src, b.src_padding, tgt_in).log_softmax(-1).gather(-1, tokens[..., None])[..., 0]
    ended = (tokens == eos).long().cumsum(1)
    keep = (ended == 0) | ((ended == 1) & (tokens == eos))
    return (lp * keep).sum(1)


def test_beam_of_one_is_greedy_and_scores_are_the_sequences_log_probs(data):
    # (A wider beam need not beat greedy: greedy's prefix can fall out of the beam and its rivals end worse.)
    model = _model(len(data.vocab), "seqfast")
    b = _batch(data, 6, seed=2)
    v = data.vocab
    g = decoding.greedy(model, b.src, b.src_padding, 11, v.BOS, v.EOS)
    one = decoding.beam_search(model, b.src, b.src_padding, 11, v.BOS, v.EOS, beam=1, alpha=0.0)
    assert torch.equal(g.tokens, one.tokens)
    torch.testing.assert_close(g.scores, one.scores)
    five = decoding.beam_search(model, b.src, b.src_padding, 11, v.BOS, v.EOS, beam=5, alpha=0.0)
    for d in (g, five):
        torch.testing.assert_close(d.scores, _rescored(model, b, d.tokens, v.BOS, v.EOS), atol=1e-4, rtol=1e-5)


def test_recorded_cross_attention_is_a_distribution_over_the_source(data):
    model = _model(len(data.vocab), "seqfast")
    b = data.batch([("3 may 1979", "1979-05-03"), ("thursday, may 3 1979", "1979-05-03")])
    v = data.vocab
    out = decoding.greedy(model, b.src, b.src_padding, 11, v.BOS, v.EOS, record_attention=True)
    weights = torch.cat([step[-1] for step in out.attention], dim=2)  # (B, H, T, S)
    assert weights.shape[:2] == (2, 4)
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:3]))
    assert weights[0, :, :, 10:].eq(0).all()  # padding is never attended


# Weights across backends ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("source", BACKENDS)
@pytest.mark.parametrize("share", [False, True])
def test_state_dict_loads_both_ways_with_equal_outputs(data, source, share):
    model = _model(len(data.vocab), source, share=share)
    other = twin(model, "torch" if source == "seqfast" else "seqfast")
    assert type(other.decoder_layers[0]) is not type(model.decoder_layers[0])
    assert model.state_dict().keys() == other.state_dict().keys()
    b = _batch(data, 4)
    with torch.no_grad():
        torch.testing.assert_close(other(b.src, b.src_padding, b.tgt_in), model(b.src, b.src_padding, b.tgt_in),
                                   atol=1e-5, rtol=1e-5)
    if share:
        assert other.generator.weight is other.src_embed.weight is other.tgt_embed.weight
    # Gradients too: the same loss, the same parameter gradients.
    model.train(), other.train()
    for m in (model, other):
        m.embed_dropout.p = 0.0
        for layer in [*m.encoder_layers, *m.decoder_layers]:
            for mod in layer.modules():
                if isinstance(mod, torch.nn.Dropout):
                    mod.p = 0.0
                if isinstance(mod, torch.nn.MultiheadAttention):
                    mod.dropout = 0.0
        m(b.src, b.src_padding, b.tgt_in).square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), other.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)


# The example end to end ------------------------------------------------------------------------------------------

def test_smoke_run_learns(tmp_path):
    # The CLI is the script examples/translation.py, beside the package of the same name: load it by path.
    script = Path(__file__).resolve().parents[1] / "examples" / "translation.py"
    spec = importlib.util.spec_from_file_location("translation_cli", script)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main(["--smoke", "--threads", "1", "--out", str(tmp_path)]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    losses = [loss for _, loss in metrics["curves"]["loss"]]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    for key in ("exact_match", "step_time_s", "decode_tokens_per_s", "peak_rss_mib"):
        assert key in metrics
    assert set(metrics["decode_tokens_per_s"]) == {"greedy_cached", "greedy_uncached", "beam3_cached",
                                                   "beam3_uncached"}
    assert (tmp_path / "curves.png").stat().st_size > 0 and (tmp_path / "cross_attention.png").stat().st_size > 0


def test_interleaved_timing_reports_every_figure_for_both_backends():
    from examples.translation.speed import interleaved
    from examples.translation.train import RunConfig

    cfg = RunConfig(size="smoke", batch_size=8, speed_examples=4)
    speed = interleaved(cfg, seed=0, weights=None, rounds=1, base=False)
    assert set(speed) == set(BACKENDS)
    for figures in speed.values():
        assert set(figures) == {"step_time_s", "greedy_cached", "greedy_uncached", "beam3_cached", "beam3_uncached"}
        assert all(x > 0 for x in figures.values())


def test_kv_cache_reorder_moves_rows():
    from seqfast.nn import KVCache

    cache = KVCache(batch=3, heads=2, capacity=5, head_dim=4)
    k, v = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    cache.append(k, v)
    index = torch.tensor([2, 2, 0])
    cache.reorder(index)
    assert torch.equal(cache.keys[:, :, :4], k[index]) and torch.equal(cache.values[:, :, :4], v[index])
    with pytest.raises(ValueError, match="reorder index"):
        cache.reorder(torch.tensor([0, 1]))
