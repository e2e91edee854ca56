"""CTC prefix beam search (``seqfast.ctc_beam_search``, C++ on the CPU) against the exhaustive search, the CTC
loss, the Python reference of the same search, greedy decoding, and its own LM and hot-word scorers.

Sizes are tiny for the exhaustive checks (every labelling of at most T tokens) and small elsewhere, so the
file runs in seconds.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

import seqfast
from seqfast import ArgumentError, CharNGramLM, ctc_beam_search
from seqfast.reference import ctc_beam_search as ref
from seqfast.validation import ctc_beam_search_arguments


def random_log_probs(T, N, C, *, seed=0, scale=2.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T, N, C, generator=g, dtype=torch.float64) * scale).log_softmax(-1).to(dtype)


def peaky_log_probs(T, N, C, *, seed=0, blank=0, peak=8.0):
    """Model-like frames: one dominant class per frame (blank about half the time), the rest small."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, N, C, generator=g, dtype=torch.float64)
    dominant = torch.randint(0, C, (T, N), generator=g)
    dominant = torch.where(torch.rand(T, N, generator=g) < 0.5, blank, dominant)
    logits.scatter_add_(2, dominant[..., None], torch.full((T, N, 1), peak, dtype=torch.float64))
    return logits.log_softmax(-1)


def as_tuples(hyps):
    return [(tuple(h.tokens), h.score) for h in hyps]


def reference_hyps(log_probs, length, beam_size, **kwargs):
    return ref.beam_search(log_probs[:length], beam_size, **kwargs)


# ------------------------------------------------------------------------------------------------
# Exactness


@pytest.mark.parametrize("T,C,blank", [(4, 3, 0), (3, 4, 2), (5, 2, 1), (1, 3, 0)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_wide_beam_equals_exhaustive_search_and_ctc_loss(T, C, blank, dtype):
    lp = random_log_probs(T, 2, C, seed=T * 10 + C, dtype=dtype)
    prefixes = sum((C - 1) ** k for k in range(T + 1))
    results = ctc_beam_search(lp, [T, T - 1], beam_size=prefixes, blank=blank)
    tol = dict(rel=1e-9, abs=1e-9) if dtype == torch.float64 else dict(rel=1e-5, abs=1e-5)
    for n, hyps in enumerate(results):
        length = T - n
        exact = ref.exhaustive_search(lp[:length, n].double(), blank)
        assert [h.tokens for h in hyps] == [list(seq) for seq, _ in exact]
        assert [h.score for h in hyps] == pytest.approx([s for _, s in exact], **tol)
        assert [h.acoustic_score for h in hyps] == [h.score for h in hyps]
        # Every hypothesis' score is minus the CTC loss of its labelling, computed in the same run.
        with_labels = [h for h in hyps if h.tokens]
        if with_labels:
            S = max(len(h.tokens) for h in with_labels)
            targets = torch.tensor([h.tokens + [(blank + 1) % C] * (S - len(h.tokens)) for h in with_labels])
            nll = seqfast.ctc_loss(lp[:, n:n + 1].expand(-1, len(with_labels), -1), targets,
                                   [length] * len(with_labels), [len(h.tokens) for h in with_labels],
                                   blank=blank, reduction="none")
            assert [h.score for h in with_labels] == pytest.approx((-nll.double()).tolist(), **tol)


def test_narrow_beam_matches_the_python_reference():
    T, N, C = 14, 4, 6
    lp = random_log_probs(T, N, C, seed=3, scale=1.5)
    lengths = [14, 9, 0, 1]
    for beam in (1, 2, 5):
        for prune in ({}, dict(top_k_tokens=2), dict(token_min_logp=-2.0), dict(beam_prune_logp=-1.5),
                      dict(blank_skip_logp=-1.0)):
            got = ctc_beam_search(lp, lengths, beam_size=beam, blank=3, return_frames=True, **prune)
            ref_prune = {k: v for k, v in prune.items()}
            for n in range(N):
                want = reference_hyps(lp[:, n], lengths[n], beam, blank=3, **ref_prune)
                assert [tuple(h.tokens) for h in got[n]] == [w[0] for w in want], (beam, prune, n)
                assert [tuple(h.frames) for h in got[n]] == [w[3] for w in want], (beam, prune, n)
                assert [h.score for h in got[n]] == pytest.approx([w[1] for w in want], rel=1e-12, abs=1e-12)


def test_forced_reference_backend_equals_the_cpp_kernel():
    lp = random_log_probs(8, 3, 5, seed=4)
    lm = CharNGramLM.from_sequences([[1, 2, 3], [2, 2, 4, 1]], 5, order=3)
    kwargs = dict(beam_size=3, return_frames=True, lm=lm, lm_weight=0.7, insertion_bonus=0.3, hotwords=[[2, 4]])
    cpp = ctc_beam_search(lp, [8, 5, 2], **kwargs)
    with seqfast.backend("reference"):
        py = ctc_beam_search(lp, [8, 5, 2], **kwargs)
    assert [[(h.tokens, h.frames) for h in s] for s in cpp] == [[(h.tokens, h.frames) for h in s] for s in py]
    for ours, theirs in zip(cpp, py):
        assert [h.score for h in ours] == pytest.approx([h.score for h in theirs], rel=1e-12)


def test_pruning_is_off_by_default_and_changes_results_when_asked():
    lp = random_log_probs(10, 1, 6, seed=5, scale=0.5)  # flat frames: pruning bites
    wide = ctc_beam_search(lp, beam_size=8)
    assert ctc_beam_search(lp, beam_size=8, top_k_tokens=5, token_min_logp=-1e9) == wide  # all non-blank: a no-op
    pruned = ctc_beam_search(lp, beam_size=8, top_k_tokens=1)
    assert as_tuples(pruned[0]) != as_tuples(wide[0])
    assert ctc_beam_search(lp, beam_size=8, blank_skip_logp=0.0) == wide  # no blank reaches probability 1
    skipped = ctc_beam_search(lp, beam_size=8, blank_skip_logp=-3.0)
    assert as_tuples(skipped[0]) != as_tuples(wide[0])


# ------------------------------------------------------------------------------------------------
# Greedy, threads, repeat runs


def test_width_one_equals_greedy_on_peaked_frames():
    lp = peaky_log_probs(40, 6, 7, seed=6, peak=12.0)
    lengths = [40, 33, 17, 1, 0, 40]
    results = ctc_beam_search(lp, lengths, beam_size=1)
    for n, hyps in enumerate(results):
        best = lp[: lengths[n], n].argmax(-1).tolist()
        greedy = [c for i, c in enumerate(best) if c != 0 and (i == 0 or best[i - 1] != c)]
        assert len(hyps) == 1 and hyps[0].tokens == greedy


def test_same_result_at_one_and_two_threads_and_on_repeat():
    lp = peaky_log_probs(60, 8, 9, seed=7, peak=3.0)
    lengths = torch.tensor([60, 59, 31, 2, 0, 60, 45, 12])
    lm = CharNGramLM.from_sequences([[1, 2, 3, 4], [5, 6, 7, 8, 1]], 9, order=3)
    kwargs = dict(beam_size=6, return_frames=True, lm=lm, lm_weight=0.4, hotwords=[[1, 2], [3, 4, 5]])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ctc_beam_search(lp, lengths, **kwargs)
        torch.set_num_threads(2)
        two = ctc_beam_search(lp, lengths, **kwargs)
        again = ctc_beam_search(lp, lengths, **kwargs)
    finally:
        torch.set_num_threads(before)
    assert one == two == again  # exact: tokens, frames and score bits


# ------------------------------------------------------------------------------------------------
# Inputs: dtypes, layouts, empty, unbatched


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_is_read_as_float32(dtype):
    lp = random_log_probs(9, 2, 5, seed=8).to(dtype)
    assert ctc_beam_search(lp, beam_size=4) == ctc_beam_search(lp.float(), beam_size=4)


def test_non_contiguous_and_unbatched_inputs():
    lp = random_log_probs(9, 3, 5, seed=9)
    strided = lp.transpose(0, 1).contiguous().transpose(0, 1)  # (T, N, C) with batch-major storage
    assert not strided.is_contiguous()
    assert ctc_beam_search(strided, beam_size=3) == ctc_beam_search(lp, beam_size=3)
    assert ctc_beam_search(lp[:, 1], 7, beam_size=3) == ctc_beam_search(lp, [9, 7, 9], beam_size=3)[1]
    assert ctc_beam_search(lp[:, 1], torch.tensor(7), beam_size=3) == ctc_beam_search(lp[:, 1, :][:7], beam_size=3)


def test_empty_inputs_and_zero_lengths():
    assert ctc_beam_search(torch.zeros(5, 0, 4), []) == []
    empty = ctc_beam_search(torch.zeros(0, 2, 4).log_softmax(-1), [0, 0], return_frames=True)
    assert empty == [[seqfast.Hypothesis([], 0.0, [], 0.0)]] * 2
    lp = random_log_probs(6, 2, 4, seed=10)
    mixed = ctc_beam_search(lp, [0, 6])
    assert mixed[0] == [seqfast.Hypothesis([], 0.0, None, 0.0)] and len(mixed[1]) > 1


def test_impossible_frames_leave_no_hypothesis():
    lp = torch.full((3, 1, 4), -math.inf, dtype=torch.float64)
    assert ctc_beam_search(lp) == [[]]


# ------------------------------------------------------------------------------------------------
# Bad arguments: each names the argument


GOOD = dict(input_lengths=[4, 3], beam_size=2, blank=0)


@pytest.mark.parametrize("change,name", [
    (dict(log_probs=torch.zeros(4, 2, 3, dtype=torch.int64)), "log_probs"),
    (dict(log_probs=torch.zeros(4, 2, 3, 1)), "log_probs"),
    (dict(log_probs=torch.zeros(4)), "log_probs"),
    (dict(log_probs=torch.tensor([[[0.0, math.nan, 0.0]] * 2] * 4)), "log_probs"),
    (dict(log_probs=torch.tensor([[[0.0, math.inf, 0.0]] * 2] * 4)), "log_probs"),
    (dict(input_lengths=[4, 5]), "input_lengths"),
    (dict(input_lengths=[4, -1]), "input_lengths"),
    (dict(input_lengths=[4]), "input_lengths"),
    (dict(input_lengths=[4.0, 3.0]), "input_lengths"),
    (dict(input_lengths=torch.tensor([4.0, 3.0])), "input_lengths"),
    (dict(blank=3), "blank"),
    (dict(blank=-1), "blank"),
    (dict(blank=True), "blank"),
    (dict(beam_size=0), "beam_size"),
    (dict(beam_size=2.0), "beam_size"),
    (dict(beam_size=None), "beam_size"),
    (dict(top_k_tokens=0), "top_k_tokens"),
    (dict(top_k_tokens="3"), "top_k_tokens"),
    (dict(token_min_logp=math.nan), "token_min_logp"),
    (dict(token_min_logp="x"), "token_min_logp"),
    (dict(beam_prune_logp=1.0), "beam_prune_logp"),
    (dict(beam_prune_logp=math.nan), "beam_prune_logp"),
    (dict(blank_skip_logp=0.5), "blank_skip_logp"),
    (dict(blank_skip_logp="x"), "blank_skip_logp"),
    (dict(lm=object()), "lm"),
    (dict(lm="3-gram"), "lm"),
    (dict(lm=CharNGramLM.from_sequences([[1, 2]], 5)), "lm"),
    (dict(lm_weight=-1.0), "lm_weight"),
    (dict(lm_weight=math.inf), "lm_weight"),
    (dict(insertion_bonus=math.nan), "insertion_bonus"),
    (dict(hotwords=[[]]), "hotwords[0]"),
    (dict(hotwords=[[1], [0]]), "hotwords[1]"),
    (dict(hotwords=[[1, 3]]), "hotwords[0]"),
    (dict(hotwords="ab"), "hotwords"),
    (dict(hotwords=[[1]], hotword_bonus=-1.0), "hotword_bonus"),
    (dict(lexicon=[[1]]), "word_delimiter"),
    (dict(lexicon=[[1]], word_delimiter=0), "word_delimiter"),
    (dict(lexicon=[[1, 2]], word_delimiter=2), "lexicon[0]"),
    (dict(lexicon=[], word_delimiter=2), "lexicon"),
    (dict(lexicon=[[1], [5]], word_delimiter=2), "lexicon[1]"),
    (dict(word_delimiter=2), "word_delimiter"),
])
def test_bad_arguments_raise_argument_error_naming_them(change, name):
    kwargs = dict(GOOD, log_probs=random_log_probs(4, 2, 3, dtype=torch.float32))
    kwargs.update(change)
    with pytest.raises(ArgumentError, match="^" + re.escape(name) + " "):
        ctc_beam_search(**kwargs)


def test_language_model_arguments():
    with pytest.raises(ArgumentError, match="^order"):
        CharNGramLM.from_sequences([[1]], 4, order=0)
    with pytest.raises(ArgumentError, match="^sentences"):
        CharNGramLM.from_sequences([[0, 1]], 4)
    with pytest.raises(ArgumentError, match="^order"):
        CharNGramLM.from_sequences([[1]], 1000, order=8)


# ------------------------------------------------------------------------------------------------
# Language model and hot-words


def test_char_ngram_lm_is_a_distribution_and_the_op_tables_agree():
    labels = ["_", "a", "b", "c", " "]
    lm = CharNGramLM.from_text("abc ab\nbca\n\ncab cab a\n", labels, order=3)
    tables = CharNGramLM.from_tables(lm.tables())
    for prefix in ([], [1], [1, 2], [3, 3], [2, 1], [4, 4], [3, 1, 2, 4]):
        probs = [lm.score([5] + prefix, s) for s in range(6)]  # 5 = beginning of sentence
        assert math.fsum(math.exp(p) for p in probs) == pytest.approx(1.0, abs=1e-12)
        assert [tables.score([5] + prefix, s) for s in range(6)] == pytest.approx(probs, abs=1e-12)
    # Seen text is likelier than its reversal.
    assert lm.log_prob([1, 2, 3]) > lm.log_prob([3, 2, 1])


def test_lm_weight_zero_does_not_depend_on_the_lm():
    lp = random_log_probs(12, 3, 6, seed=11, scale=1.0)
    plain = ctc_beam_search(lp, beam_size=4)
    for lm in (CharNGramLM.from_sequences([[1, 1, 2]], 6), CharNGramLM.from_sequences([[5, 4, 3, 2]] * 3, 6, 4)):
        assert ctc_beam_search(lp, beam_size=4, lm=lm, lm_weight=0.0) == plain


def test_lm_steers_the_search_and_scores_add_up():
    # Two frames, each torn between tokens 1 and 2; the LM has only seen "2 1".
    lp = torch.tensor([[[-5.0, -0.6, -0.8]], [[-5.0, -0.8, -0.6]]], dtype=torch.float64)
    lm = CharNGramLM.from_sequences([[2, 1]] * 5, 3, order=2)
    assert ctc_beam_search(lp, beam_size=4)[0][0].tokens == [1, 2]
    best = ctc_beam_search(lp, beam_size=4, lm=lm, lm_weight=1.0, insertion_bonus=0.25)[0][0]
    assert best.tokens == [2, 1]
    assert best.score == pytest.approx(best.acoustic_score + lm.log_prob([2, 1]) + 0.5, abs=1e-12)
    assert best.acoustic_score == pytest.approx(ref.labelling_log_prob(lp[:, 0], [2, 1]), abs=1e-12)


def test_python_scorer_hook_equals_the_native_lm():
    lp = random_log_probs(10, 2, 5, seed=15, scale=1.0)
    lm = CharNGramLM.from_sequences([[1, 2, 3], [2, 2, 4, 1], [4, 3]], 5, order=3)
    calls = []

    def scorer(prefix, token):
        calls.append((prefix, token))
        return lm.score((5, *prefix), 5 if token is None else token)

    kwargs = dict(beam_size=4, lm_weight=0.8, insertion_bonus=0.2, return_frames=True, token_min_logp=-3.0)
    native = ctc_beam_search(lp, [10, 7], lm=lm, **kwargs)
    hooked = ctc_beam_search(lp, [10, 7], lm=scorer, **kwargs)
    assert calls and len(calls) == len(set(calls))  # one call per distinct (prefix, token) in a call
    for ours, theirs in zip(native, hooked):
        assert [(h.tokens, h.frames) for h in ours] == [(h.tokens, h.frames) for h in theirs]
        assert [h.score for h in ours] == pytest.approx([h.score for h in theirs], abs=1e-12)
    assert ctc_beam_search(lp[:7, 1], lm=scorer, **kwargs) == hooked[1]  # unbatched, through the same path


def test_hotwords_boost_their_tokens_and_match_the_reference():
    lp = torch.tensor([[[-5.0, -0.6, -0.8]], [[-5.0, -0.8, -0.6]], [[-0.1, -3.0, -3.0]]], dtype=torch.float64)
    assert ctc_beam_search(lp, beam_size=4)[0][0].tokens == [1, 2]
    best = ctc_beam_search(lp, beam_size=4, hotwords=[[2, 1]], hotword_bonus=1.0)[0][0]
    assert best.tokens == [2, 1]
    assert best.score == pytest.approx(best.acoustic_score + 2.0, abs=1e-12)
    # A partial match keeps no bonus in the final score.
    partial = ctc_beam_search(lp, beam_size=4, hotwords=[[1, 1, 1]], hotword_bonus=1.0)[0]
    assert all(h.score == pytest.approx(h.acoustic_score, abs=1e-12) for h in partial if h.tokens != [1, 1, 1])
    lp2 = random_log_probs(16, 3, 5, seed=12, scale=1.0)
    words = [[1, 2], [1, 2, 3], [2, 3, 4], [4]]
    got = ctc_beam_search(lp2, beam_size=4, hotwords=words, hotword_bonus=0.7, return_frames=True)
    hw = seqfast.ngram_lm.hotword_tables(words, 5, 0)
    for n in range(3):
        want = ref.beam_search(lp2[:, n], 4, hotword_tables=hw, hotword_bonus=0.7)
        assert [(tuple(h.tokens), tuple(h.frames)) for h in got[n]] == [(w[0], w[3]) for w in want]
        assert [h.score for h in got[n]] == pytest.approx([w[1] for w in want], abs=1e-12)


def _spells_lexicon(tokens, words, delimiter):
    parts, word = [], []
    for c in tokens + [delimiter]:
        if c == delimiter:
            if word:
                parts.append(tuple(word))
            word = []
        else:
            word.append(c)
    return all(p in words for p in parts)


def test_lexicon_wide_beam_equals_the_exhaustive_search_over_lexicon_labellings():
    T, C, delimiter = 5, 4, 3
    words = [[1, 2], [2], [1, 1, 2]]
    lp = random_log_probs(T, 1, C, seed=14, scale=1.0)
    hyps = ctc_beam_search(lp, beam_size=200, lexicon=words, word_delimiter=delimiter)[0]
    exact = [(list(seq), score) for seq, score in ref.exhaustive_search(lp[:, 0])
             if _spells_lexicon(list(seq), {tuple(w) for w in words}, delimiter)]
    assert [h.tokens for h in hyps] == [seq for seq, _ in exact]
    assert [h.score for h in hyps] == pytest.approx([s for _, s in exact], abs=1e-9)
    assert len(exact) < len(ref.exhaustive_search(lp[:, 0]))  # the constraint removes labellings
    narrow = ctc_beam_search(lp, beam_size=3, lexicon=words, word_delimiter=delimiter, return_frames=True)[0]
    want = ref.beam_search(lp[:, 0], 3, lexicon_tables=seqfast.ngram_lm.hotword_tables(words, C, 0),
                           word_delimiter=delimiter)
    assert [(tuple(h.tokens), tuple(h.frames)) for h in narrow] == [(w[0], w[3]) for w in want]


# ------------------------------------------------------------------------------------------------
# The op and devices


def test_op_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = ctc_beam_search_arguments(random_log_probs(7, 2, 5), [7, 3], 3, 0, None, None, None, None, 0.0, 0.0,
                                     None, 0.0)
    with FakeTensorMode(allow_non_fake_inputs=True):
        out = torch.ops.seqfast.ctc_beam_search(args.log_probs, args.input_lengths, 0, 3, 0, -math.inf, -math.inf,
                                                True, [], 0.0, 0.0, [], 0.0, [], -1, math.inf)
    real = torch.ops.seqfast.ctc_beam_search(args.log_probs, args.input_lengths, 0, 3, 0, -math.inf, -math.inf,
                                             True, [], 0.0, 0.0, [], 0.0, [], -1, math.inf)
    assert [(t.shape, t.dtype) for t in out] == [(t.shape, t.dtype) for t in real]
    lm = CharNGramLM.from_sequences([[1, 2, 3]], 5)
    hw = seqfast.ngram_lm.hotword_tables([[2, 3]], 5, 0)
    result = torch.library.opcheck(torch.ops.seqfast.ctc_beam_search.default,
                                   (args.log_probs, args.input_lengths, 0, 3, 2, -3.0, -5.0, True, lm.tables(), 0.5,
                                    0.1, hw, 1.0, hw, 4, -0.5))
    assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_input_is_decoded_on_the_host():
    lp = random_log_probs(20, 3, 6, seed=13)
    lengths = torch.tensor([20, 11, 0])
    assert ctc_beam_search(lp.cuda(), lengths.cuda(), beam_size=3) == ctc_beam_search(lp, lengths, beam_size=3)
