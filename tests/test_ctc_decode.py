"""CTC greedy decoding and forced alignment (C++ kernels, reference, public API).

The recursions are judged by brute force over every path of tiny problems (seqfast/reference/ctc_decode.py
enumerates them); the C++ kernels against the float64 reference on awkward sizes, dtypes, layouts and
argument forms; every bad argument must raise seqfast.ArgumentError naming it.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import seqfast
from seqfast.ops import ctc_decode as decode_ops
from seqfast.reference import ctc_decode as ref
from tests.ctc_decode_checks import _assert_best, _check_alignment, _log_probs, _targets

pytestmark = pytest.mark.filterwarnings("ignore:.*opcheck.*:UserWarning")


# --------------------------------------------------------------------------------------------------------------
# Brute force


@pytest.mark.parametrize("seed", range(6))
def test_greedy_against_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    T, C = 1 + seed % 4, 2 + seed % 2
    lp = torch.randn(T, 1, C, generator=g, dtype=torch.float64)
    expected = ref.brute_force_greedy(lp[:, 0].tolist(), blank=seed % C)
    for backend in ("cpp", "reference"):
        with seqfast.backend(backend):
            tokens, length = seqfast.ctc_greedy_decode(lp, [T], blank=seed % C)
        assert tokens[0, : int(length[0])].tolist() == expected


def _tiny_problems():
    """(T, target, C) covering repeats, adjacent repeats, empty targets and targets that just fit."""
    for T, target in [(1, []), (1, [1]), (2, [1]), (3, [1, 1]), (4, [1, 1]), (4, [1, 2]), (5, [2, 1, 2]),
                      (5, [1, 2, 2]), (6, [1, 1, 1]), (6, [2, 1]), (3, []), (5, [1, 2, 1])]:
        yield T, target, 3


@pytest.mark.parametrize("case", list(_tiny_problems()), ids=str)
@pytest.mark.parametrize("values", ["random", "ties"])
def test_viterbi_against_brute_force(case, values):
    T, target, C = case
    g = torch.Generator().manual_seed(T * 7 + len(target))
    if values == "random":
        lp = torch.randn(T, 1, C, generator=g, dtype=torch.float64).log_softmax(-1)
    else:  # small integers: many paths tie exactly, and the documented rule must pick one
        lp = -torch.randint(0, 2, (T, 1, C), generator=g).double()
    rows = lp[:, 0].tolist()
    best_states = ref.brute_force_align(rows, target, 0)
    ext, _ = ref._states(target, 0)
    expected = [ext[s] for s in best_states]
    best_score = ref.path_score(rows, best_states, target, 0)
    assert all(ref.path_score(rows, p, target, 0) <= best_score for p in ref.all_alignments(T, target, 0))
    tg = torch.tensor([target + [1] * (3 - len(target))])
    for backend in ("cpp", "reference"):
        with seqfast.backend(backend):
            paths, scores = seqfast.ctc_forced_align(lp, tg, [T], [len(target)])
        assert paths[0].tolist() == expected, backend
        assert scores.sum().item() == pytest.approx(best_score, abs=1e-12)


def test_viterbi_ties_all_equal_and_all_minus_inf():
    """Every path ties: labels entered as early as possible, ending on the last label."""
    for fill in (0.0, float("-inf"), float("nan")):
        lp = torch.full((6, 1, 3), fill, dtype=torch.float64)
        for backend in ("cpp", "reference"):
            with seqfast.backend(backend):
                paths, _ = seqfast.ctc_forced_align(lp, torch.tensor([[1, 2]]), [6], [2])
            assert paths[0].tolist() == [1, 2, 2, 2, 2, 2], (fill, backend)


# --------------------------------------------------------------------------------------------------------------
# C++ against the reference


@pytest.mark.parametrize("T,N,C", [(1, 1, 2), (7, 3, 29), (97, 5, 2), (97, 2, 1000), (7, 4, 1000), (33, 5, 29)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_cpp_against_reference(T, N, C, dtype):
    lp = _log_probs(T, N, C, dtype, seed=T + N + C)
    il = torch.tensor([T - (n * 3) % (T + 1) if n else T for n in range(N)])
    blank = C - 1 if N % 2 else 0
    tokens, lengths, frames = seqfast.ctc_greedy_decode(lp, il, blank=blank, return_frames=True)
    e_tokens, e_lengths, e_frames = ref.ctc_greedy_decode(lp, il, blank)
    assert torch.equal(tokens, e_tokens) and torch.equal(lengths, e_lengths) and torch.equal(frames, e_frames)

    tg, tl = _targets(N, C, il.tolist(), seed=C, blank=blank)
    paths, scores = seqfast.ctc_forced_align(lp, tg, il, tl, blank=blank)
    assert paths.dtype == torch.int64 and scores.dtype == dtype and paths.shape == scores.shape == (N, T)
    if dtype == torch.float64:
        e_paths, e_scores = ref.ctc_forced_align(lp, tg, il, tl, blank)
        assert torch.equal(paths, e_paths) and torch.equal(scores, e_scores)
    rtol = {torch.float64: 1e-9, torch.float32: 1e-5}.get(dtype, 1e-5)  # low precision: same values, float32 sums
    _assert_best(paths, scores, lp, tg, il, tl, blank, rtol)


def test_views_argument_forms_and_unbatched():
    T, N, C = 12, 3, 6
    lp = _log_probs(T, N, C)
    il = [12, 9, 0]
    tg, tl = _targets(N, C, il, seed=2)
    expected = seqfast.ctc_forced_align(lp, tg, il, tl)
    greedy = seqfast.ctc_greedy_decode(lp, il)
    ntc = lp.transpose(0, 1).contiguous().transpose(0, 1)  # torchaudio's layout, seen as (T, N, C)
    assert not ntc.is_contiguous()
    concatenated = torch.cat([tg[n, : tl[n]] for n in range(N)])
    for lp_, tg_, il_, tl_ in [(ntc, tg, il, tl), (lp, concatenated, torch.tensor(il), tl.tolist()),
                               (lp, tg.int(), tuple(torch.tensor(v) for v in il), tl.int())]:
        got = seqfast.ctc_forced_align(lp_, tg_, il_, tl_)
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
        assert all(torch.equal(a, b) for a, b in zip(seqfast.ctc_greedy_decode(lp_, il_), greedy))
    paths, scores = seqfast.ctc_forced_align(lp[:, 0], tg[0, : tl[0]], 12, int(tl[0]))
    assert torch.equal(paths, expected[0][0]) and torch.equal(scores, expected[1][0])
    tokens, length = seqfast.ctc_greedy_decode(lp[:, 1], 9)
    assert torch.equal(tokens[:9], greedy[0][1, :9]) and length.dim() == 0 and length == greedy[1][1]


def test_empty_inputs_and_zero_lengths():
    for T, N in [(0, 3), (5, 0), (0, 0)]:
        lp = torch.zeros(T, N, 4)
        tokens, lengths = seqfast.ctc_greedy_decode(lp, [0] * N)
        assert tokens.shape == (N, T) and lengths.shape == (N,)
        paths, scores = seqfast.ctc_forced_align(lp, torch.zeros(N, 0, dtype=torch.long), [0] * N, [0] * N)
        assert paths.shape == scores.shape == (N, T)
    lp = _log_probs(5, 3, 4)
    paths, scores = seqfast.ctc_forced_align(lp, torch.tensor([[1, 2], [1, 1], [3, 3]]), [5, 0, 3], [0, 0, 2])
    assert paths.tolist() == [[0] * 5, [0] * 5, [3, 0, 3, 0, 0]]
    assert torch.equal(scores[0], lp[:, 0, 0]) and (scores[1] == 0).all() and (scores[2, 3:] == 0).all()
    tokens, lengths = seqfast.ctc_greedy_decode(lp, [5, 0, 2])
    assert lengths[1] == 0 and (tokens[1] == 0).all()


def test_nan_greedy_matches_torch_argmax_and_align_counts_nan_as_minus_inf():
    lp = _log_probs(6, 2, 5, torch.float32)
    lp[1, 0, 3] = float("nan")
    lp[2, 0, 1] = lp[2, 0, 4] = float("nan")
    lp[3, 1, :] = float("-inf")
    am = lp.argmax(-1)
    assert am[1, 0] == 3 and am[2, 0] == 1 and am[3, 1] == 0  # torch's rule, which the decoder follows
    for backend in ("cpp", "reference"):
        with seqfast.backend(backend):
            tokens, lengths = seqfast.ctc_greedy_decode(lp, [6, 6])
        for n in range(2):
            assert tokens[n, : lengths[n]].tolist() == ref.collapse(am[:, n].tolist(), 0)[0]
    tg = torch.tensor([[3, 1], [2, 4]])
    for backend in ("cpp", "reference"):
        with seqfast.backend(backend):
            paths, scores = seqfast.ctc_forced_align(lp, tg, [6, 6], [2, 2])
        _check_alignment(paths, lp, tg, torch.tensor([6, 6]), torch.tensor([2, 2]), 0)
        assert not scores.isnan().any()  # finite paths exist, so no NaN frame is chosen
        lp_inf = torch.where(lp.isnan(), float("-inf"), lp)
        assert torch.equal(paths, seqfast.ctc_forced_align(lp_inf, tg, [6, 6], [2, 2])[0])


@pytest.mark.parametrize("T,C,lengths", [
    (60, 30, [60, 41, 60, 7, 33]),  # little work: alignment on one thread
    (400, 40, [400, 370, 320, 270, 220, 170, 120, 70, 20]),  # sorted by length: samples go longest first to threads
])
def test_results_do_not_depend_on_thread_count(T, C, lengths):
    N = len(lengths)
    lp = _log_probs(T, N, C, torch.float32)
    il = torch.tensor(lengths)
    tg, tl = _targets(N, C, il.tolist(), seed=4)
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append((*seqfast.ctc_forced_align(lp, tg, il, tl), *seqfast.ctc_greedy_decode(lp, il)))
    finally:
        torch.set_num_threads(before)
    _check_alignment(outs[0][0], lp, tg, il, tl, 0)  # every sample aligned (a skipped one stays all blank)
    for other in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0], other))


def test_token_spans():
    path = torch.tensor([0, 3, 3, 0, 0, 3, 5, 5, 0])
    scores = torch.arange(9, dtype=torch.float32)
    spans = seqfast.ctc_token_spans(path, scores)
    assert spans == [seqfast.TokenSpan(3, 1, 3, 1.5), seqfast.TokenSpan(3, 5, 6, 5.0), seqfast.TokenSpan(5, 6, 8, 6.5)]
    lp = _log_probs(10, 2, 6)
    tg, tl = torch.tensor([[1, 1, 2], [4, 0, 0]]), torch.tensor([3, 1])
    paths, scores = seqfast.ctc_forced_align(lp, tg, [10, 4], tl)
    batched = seqfast.ctc_token_spans(paths, scores, lengths=[10, 4])
    assert [[s.token for s in spans] for spans in batched] == [[1, 1, 2], [4]]
    for spans, n in zip(batched, range(2)):
        for s in spans:
            assert (paths[n, s.start:s.end] == s.token).all()
            assert s.score == pytest.approx(scores[n, s.start:s.end].mean().item())
    assert seqfast.ctc_token_spans(torch.zeros(0, dtype=torch.long), torch.zeros(0)) == []
    with pytest.raises(seqfast.ArgumentError, match="scores"):
        seqfast.ctc_token_spans(path, scores[:3])
    with pytest.raises(seqfast.ArgumentError, match="lengths"):
        seqfast.ctc_token_spans(paths, scores, lengths=[11, 0])


# --------------------------------------------------------------------------------------------------------------
# Arguments


def _good():
    lp = _log_probs(6, 2, 5, torch.float32)
    return dict(log_probs=lp, targets=torch.tensor([[1, 2], [3, 3]]), input_lengths=[6, 5], target_lengths=[2, 2])


ALIGN_ERRORS = [
    ({"log_probs": torch.zeros(6, 2, 5, dtype=torch.long)}, "log_probs must be a floating"),
    ({"log_probs": torch.zeros(6, 2, 5, 1)}, r"log_probs must be \(T, N, C\)"),
    ({"input_lengths": [6, 7]}, "input_lengths must be <= T"),
    ({"input_lengths": [6, -1]}, "input_lengths must be >= 0"),
    ({"input_lengths": [6.0, 5.0]}, "input_lengths must hold integers"),
    ({"input_lengths": [6, 5, 4]}, "input_lengths must have 2 entries.*transpose"),
    ({"target_lengths": [3, 2]}, "target_lengths must be <= S"),
    ({"target_lengths": [-1, 2]}, "target_lengths must be >= 0"),
    ({"targets": torch.tensor([[1, 0], [3, 3]])}, "targets must hold labels"),
    ({"targets": torch.tensor([[1, 5], [3, 3]])}, "targets must hold labels"),
    ({"targets": torch.tensor([[1, 2]])}, "targets has batch size 1.*transpose"),
    ({"targets": torch.tensor([1, 2, 3])}, "sum\\(target_lengths\\)"),
    ({"blank": 5}, "blank must be in"),
    ({"blank": -1}, "blank must be in"),
    ({"input_lengths": [6, 2]}, r"targets\[1\] cannot be aligned.*1 repeat.*need 3 frames"),
    ({"input_lengths": [1, 5]}, r"targets\[0\] cannot be aligned"),
]


@pytest.mark.parametrize("change,match", ALIGN_ERRORS, ids=[m for _, m in ALIGN_ERRORS])
def test_align_argument_errors(change, match):
    kwargs = {**_good(), **change}
    with pytest.raises(seqfast.ArgumentError, match=match):
        seqfast.ctc_forced_align(**kwargs)


GREEDY_ERRORS = [
    ({"log_probs": torch.zeros(6, 2, 5, dtype=torch.int32)}, "log_probs must be a floating"),
    ({"log_probs": torch.zeros(6)}, r"log_probs must be \(T, N, C\)"),
    ({"input_lengths": [7, 1]}, "input_lengths must be <= T"),
    ({"input_lengths": [-2, 1]}, "input_lengths must be >= 0"),
    ({"input_lengths": torch.tensor([1.0, 2.0])}, "input_lengths must hold integers"),
    ({"input_lengths": [6]}, "input_lengths must have 2 entries.*transpose"),
    ({"blank": 5}, "blank must be in"),
    ({"blank": True}, "blank must be in"),
]


@pytest.mark.parametrize("change,match", GREEDY_ERRORS, ids=[m for _, m in GREEDY_ERRORS])
def test_greedy_argument_errors(change, match):
    good = _good()
    kwargs = {"log_probs": good["log_probs"], "input_lengths": good["input_lengths"], **change}
    with pytest.raises(seqfast.ArgumentError, match=match):
        seqfast.ctc_greedy_decode(**kwargs)


def test_torchaudio_layout_hint():
    """A batch-first (1, T, C) tensor, as torchaudio takes, is refused with the transpose to use."""
    lp = _log_probs(8, 1, 5).transpose(0, 1)  # (1, 8, 5)
    with pytest.raises(seqfast.ArgumentError, match=r"transpose\(0, 1\)"):
        seqfast.ctc_forced_align(lp, torch.tensor([[1, 2]]), [8], [2])
    with pytest.raises(seqfast.ArgumentError, match=r"transpose\(0, 1\)"):
        seqfast.ctc_greedy_decode(lp, [8])


# --------------------------------------------------------------------------------------------------------------
# Op machinery


def test_opcheck_with_non_contiguous_inputs():
    lp = _log_probs(9, 6, 7, torch.float32)[:, ::2]  # (9, 3, 7) with a batch stride of 14
    il = torch.tensor([9, 4, 6])
    tg, tl = _targets(3, 7, il.tolist(), seed=1)
    torch.library.opcheck(decode_ops.GREEDY, (lp, il, 0))
    torch.library.opcheck(decode_ops.ALIGN, (lp.transpose(0, 1).contiguous().transpose(0, 1), tg, il, tl, 0))
    torch.library.opcheck(decode_ops.ALIGN, (lp, tg, il, tl, 2 if (tg != 2).all() else 0))


def test_compiled_fullgraph_equals_eager():
    lp = _log_probs(10, 3, 6, torch.float32)
    il = torch.tensor([10, 8, 5])
    tg, tl = _targets(3, 6, il.tolist(), seed=5)

    def fn(lp, tg, il, tl):
        paths, scores = seqfast.ctc_forced_align(lp, tg, il, tl)
        tokens, lengths = seqfast.ctc_greedy_decode(lp, il)
        return paths, scores.sum(-1), tokens, lengths

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for a, b in zip(compiled(lp, tg, il, tl), fn(lp, tg, il, tl)):
        assert torch.equal(a, b)


def test_reference_backend_equals_brute_force_on_many_small_cases():
    """All targets of length <= 2 over 2 labels on 4 frames, random log-probs: both kernels, the brute force."""
    g = torch.Generator().manual_seed(11)
    lp = torch.randn(4, 1, 3, generator=g, dtype=torch.float64)
    rows = lp[:, 0].tolist()
    for L in range(3):
        for target in itertools.product([1, 2], repeat=L):
            target = list(target)
            ext, _ = ref._states(target, 0)
            expected = [ext[s] for s in ref.brute_force_align(rows, target, 0)]
            tg = torch.tensor([target + [1] * (2 - L)])
            for backend in ("cpp", "reference"):
                with seqfast.backend(backend):
                    assert seqfast.ctc_forced_align(lp, tg, [4], [L])[0][0].tolist() == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_isa_paths_give_the_same_results(dtype):
    """The AVX-512, AVX2 and baseline builds of the Viterbi row and the argmax: identical outputs (the ISAs this
    CPU lacks run the baseline), on row lengths around the vector widths, with NaN, -inf and exact ties."""
    from seqfast import _C

    T, N, C = 41, 4, 37
    lp = _log_probs(T, N, C, dtype, seed=9)
    lp[:, 3] = -torch.randint(0, 2, (T, C)).to(dtype)  # exact ties
    lp[5, 0, 7] = lp[9, 1, :] = float("nan")
    lp[11, 2, :] = float("-inf")
    il = torch.tensor([41, 40, 33, 41])
    tg, tl = _targets(N, C, il.tolist(), seed=9)
    old = _C.set_cpu_isa("avx512")
    runs = []
    try:
        for isa in ("avx512", "avx2", "baseline"):
            _C.set_cpu_isa(isa)
            runs.append((*seqfast.ctc_forced_align(lp, tg, il, tl), *seqfast.ctc_greedy_decode(lp, il)))
    finally:
        _C.set_cpu_isa(old)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    paths, scores = runs[0][:2]
    e_paths, _ = ref.ctc_forced_align(lp, tg, il, tl, 0)
    if dtype == torch.float64:
        assert torch.equal(paths, e_paths)


@pytest.mark.parametrize("C", [1, 15, 16, 17, 33, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_greedy_matches_torch_argmax_on_awkward_rows(C, dtype):
    """Rows of integers (exact ties), scattered NaN and -inf, an all -inf frame, C around the 16 vector lanes:
    the decoded labels are torch.argmax's, collapsed."""
    g = torch.Generator().manual_seed(C)
    x = torch.randint(-3, 1, (20, 5, C), generator=g).to(dtype)
    x[torch.rand(x.shape, generator=g) < 0.02] = float("nan")
    x[torch.rand(x.shape, generator=g) < 0.3] = float("-inf")
    x[3] = float("-inf")
    am = x.argmax(-1)
    tokens, lengths = seqfast.ctc_greedy_decode(x, [20] * 5)
    for n in range(5):
        assert tokens[n, : lengths[n]].tolist() == ref.collapse(am[:, n].tolist(), 0)[0]
