"""Argument checks and normalisation for every public function, shared by all backends.

Each ``*_arguments`` function raises :class:`ArgumentError` (both a ``ValueError`` and, like torch's own
argument errors, a ``RuntimeError``) naming the argument and the offending value, and returns the canonical
tensors the ops take. The forms torch accepts are accepted with torch's meaning (lengths as lists of numpy
or 0-d tensor integers, float targets, broadcast batch dims, autocast's casting); checks that need values
held on a device are gathered into one device-to-host copy per call (values given on the host are checked
there and copied to the device without a sync, see :func:`to_device`), and inside ``torch.compile`` they
become asynchronous device asserts so that the call traces without a graph break.
"""

from __future__ import annotations

import math
import operator
import sys
from collections.abc import Sequence
from typing import NamedTuple

import torch

from seqfast import _backend, _extension

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("none", "mean", "sum")

IntLengths = torch.Tensor | Sequence[int] | int


class ArgumentError(ValueError, RuntimeError):
    """An argument seqfast (like torch) refuses. A ``ValueError``, and a ``RuntimeError`` as torch raises for
    bad arguments, so code written for either catches it."""


class ArgumentTypeError(ArgumentError, TypeError):
    """An argument of a type torch's signature refuses (``is_causal=1``, ``blank=1.0``): a ``TypeError`` as
    torch's argument parser raises there, and an :class:`ArgumentError`."""


def _type_name(v: object) -> str:
    if isinstance(v, torch.Tensor):
        return "Tensor"
    t = type(v)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def flag(fn: str, name: str, value: object) -> bool:
    """A ``bool`` argument as torch's C++ signatures take it: ``True`` or ``False`` only. Torch raises
    TypeError for ``1``, numpy bools, 0-d tensors and None there, where Python's truth value would silently pick
    a meaning."""
    if value is True or value is False or isinstance(value, torch.SymBool):
        return value
    raise ArgumentTypeError(f"{fn}(): argument '{name}' must be bool, not {_type_name(value)}")


def _numpy_scalar(v: object) -> bool:
    np = sys.modules.get("numpy")  # not imported: v cannot be a numpy scalar
    return np is not None and isinstance(v, (np.number, np.bool_))


def real(fn: str, name: str, value: object, optional: bool = False) -> float | None:
    """A ``float`` argument as torch's C++ signatures take it: a Python or numpy int, float or bool, or a 0-d
    tensor that needs no gradient (torch refuses one that does: the gradient could not reach it), as a Python
    float; None where ``optional``. Torch raises TypeError for anything else (complex, Fraction, a 1-element
    1-d tensor)."""
    t = type(value)
    if t is float:
        return value
    if t is int or t is bool or _numpy_scalar(value):
        return float(value)
    if value is None and optional:
        return None
    if isinstance(value, (torch.SymFloat, torch.SymInt)):
        return value
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.requires_grad:
        return float(value)
    raise ArgumentTypeError(f"{fn}(): argument '{name}' must be float, not {_type_name(value)}")


def _floating(name: str, t: object) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype not in FLOAT_DTYPES:
        raise ArgumentError(f"{name} must be a floating tensor of dtype {FLOAT_DTYPES}, got "
                            f"{getattr(t, 'dtype', type(t))}")


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The lower-precision dtype autocast casts to on ``device`` now, or None when autocast is off there."""
    if torch._C._is_any_autocast_enabled() and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


# --------------------------------------------------------------------------------------------------------------
# CTC


class CTCArguments(NamedTuple):
    log_probs: torch.Tensor  # (T, N, C) contiguous
    targets: torch.Tensor  # (N, S) int64, padded, S >= max target length
    input_lengths: torch.Tensor  # (N,) int64 on log_probs' device
    target_lengths: torch.Tensor  # (N,) int64 on log_probs' device
    batched: bool
    # min(target_lengths) where the checks read it (eager calls), None under torch.compile: 'mean' skips its
    # clamp_min(1) when this is >= 1 (the same divisors, so the same bits).
    min_target_length: int | None = None


def _index(name: str, v: object) -> int:
    """One length: an int, a numpy integer or a 0-d integer tensor (what torch's int lists take)."""
    if isinstance(v, bool) or (isinstance(v, torch.Tensor) and (v.dtype == torch.bool or v.dim() != 0)):
        raise ArgumentError(f"{name} must hold integers, got {v!r}")
    try:
        return operator.index(v)
    except TypeError:
        raise ArgumentError(f"{name} must hold integers, got {v!r}") from None


def _lengths(name: str, value: IntLengths, n: int) -> torch.Tensor:
    """(n,) int64 lengths where they are: a tensor stays on its device, a list becomes a CPU tensor."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise ArgumentError(f"{name} must hold integers, got dtype {value.dtype}")
        t = value if value.dtype == torch.int64 else value.to(torch.int64)
    else:
        if isinstance(value, (list, tuple)):
            values = value if all(type(v) is int for v in value) else [_index(name, v) for v in value]
        else:
            values = [_index(name, value)]
        t = torch.tensor(values, dtype=torch.int64)
    # torch reads a lengths tensor by its elements, whatever its shape ((N, 1), (1, N), 0-d for N = 1 and for an
    # unbatched sample): so here. (A list is 1-D already.)
    if t.dim() != 1 and t.numel() == n:
        t = t.reshape(-1)
    if t.dim() != 1 or t.shape[0] != n:
        raise ArgumentError(f"{name} must have {n} entr{'y' if n == 1 else 'ies'} (one per batch element), got "
                            f"shape {tuple(value.shape) if isinstance(value, torch.Tensor) else len(t)}")
    return t


def _blank(blank: object, C: int) -> None:
    if isinstance(blank, bool) or not isinstance(blank, int):
        raise ArgumentTypeError(f"blank must be in [0, {C}) (C = number of classes), got {blank!r}")
    if not 0 <= blank < C:
        raise ArgumentError(f"blank must be in [0, {C}) (C = number of classes), got {blank!r}")


def int_like(v: object) -> object:
    """``v`` as a Python int where torch's int arguments take it (numpy integers, 0-d integer tensors), else
    ``v`` unchanged, for the checks to refuse with their own message."""
    if isinstance(v, (int, bool)):
        return v
    try:
        return _index("", v)
    except ArgumentError:
        return v


def reduction_argument(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ArgumentError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def _vmapped(*args: object) -> bool:
    """Whether torch.vmap is active here. Eager: the functorch interpreter stack. Inside torch.compile, which
    cannot trace that stack: whether an argument is a batched tensor."""
    if torch.compiler.is_compiling():
        return any(isinstance(a, torch.Tensor) and torch._C._functorch.is_batchedtensor(a) for a in args)
    return _backend.functorch_transforms()[1]


def ctc_arguments(
    log_probs: torch.Tensor,
    targets: torch.Tensor,
    input_lengths: IntLengths,
    target_lengths: IntLengths,
    blank: int,
    name: str = "log_probs",
    allow_empty: bool = False,
    keep_strides: bool = False,
) -> CTCArguments:
    """Validate torch's ``ctc_loss`` arguments, every form, and bring them to the op's canonical form.

    Under autocast, float16/bfloat16 ``log_probs`` are computed in float32 (torch's ctc_loss runs in float32
    there). Targets of a floating or bool dtype are truncated to integers, as torch does. ``allow_empty``: accept
    N = 0 and T = 0 (the decoders do; torch's ctc_loss refuses them). ``keep_strides``: return ``log_probs`` as
    given (for kernels that read any layout) instead of a contiguous copy.
    """
    _floating(name, log_probs)
    vmapped = _vmapped(log_probs, targets, input_lengths, target_lengths)
    if vmapped and allow_empty:
        # Forced alignment (the one caller that allows empty inputs) checks and reads its arguments on the host.
        raise ArgumentError("seqfast.ctc_forced_align does not run under torch.vmap; call it once on the batched "
                            "(T, N, C) form instead")
    if log_probs.dim() not in (2, 3):
        raise ArgumentError(f"{name} must be (T, N, C) or unbatched (T, C), got shape {tuple(log_probs.shape)}")
    if log_probs.numel() == 0 and not allow_empty:
        raise ArgumentError(f"{name} must not be empty (torch refuses it too), got shape {tuple(log_probs.shape)}")
    if log_probs.dtype in (torch.float16, torch.bfloat16) and _autocast_dtype(log_probs.device) is not None:
        log_probs = log_probs.float()
    batched = log_probs.dim() == 3
    lp = log_probs if batched else log_probs.unsqueeze(1)
    T, N, C = lp.shape
    if not isinstance(targets, torch.Tensor) or targets.is_complex():
        raise ArgumentError(f"targets must be a real tensor, got {getattr(targets, 'dtype', type(targets))}")
    _blank(blank, C)
    device = lp.device
    il = _lengths("input_lengths", input_lengths, N)
    tl = _lengths("target_lengths", target_lengths, N)
    tg = targets if targets.dtype == torch.int64 else targets.to(torch.int64)
    if batched and tg.dim() not in (1, 2):
        raise ArgumentError(f"targets must be (N, S) padded or 1-D concatenated, got shape {tuple(targets.shape)}")
    if not batched and tg.dim() not in (1, 2):
        raise ArgumentError(f"unbatched targets must be 1-D (S,) or (1, S), got shape {tuple(targets.shape)}")
    # Unbatched (1, S) targets are a padded batch of one, as torch takes them (it unsqueezes log_probs only).
    padded = tg.dim() == 2
    if padded and tg.shape[0] != N:
        raise ArgumentError(f"targets has batch size {tg.shape[0]} but log_probs has {N}")
    if not batched and not padded:
        tg, padded = tg.unsqueeze(0), True
    S = tg.shape[1] if padded else tg.shape[0]
    if not vmapped and any(t.device.type in _SHAPE_ONLY_DEVICES for t in (tg, il, tl)):
        return _ctc_meta(lp, tg, il, tl, batched, padded, T, N, S, blank)
    if torch.compiler.is_compiling() and not vmapped:
        il, tl, tg = il.to(device), tl.to(device), tg.to(device)
        return _ctc_traced(lp, tg, il, tl, batched, padded, T, C, S, blank)
    if vmapped:
        # Under torch.vmap the values cannot be read here: the op's batching rule folds the vmapped dimension into
        # the batch and checks them there (check_ctc_values), before its kernels run.
        if not padded:
            raise ArgumentError("under torch.vmap seqfast's ctc_loss takes padded (N, S) targets; concatenated 1-D "
                                "targets would need their lengths read to pad them")
        return CTCArguments(lp.contiguous(), tg.to(device).contiguous(), il.to(device), tl.to(device), batched)

    # Checked where the values are: all on the host (lists, CPU tensors), no device sync at all; else on the
    # device, the host ones copied there asynchronously first, with one device-to-host read.
    on_host = tg.device.type == "cpu" and il.device.type == "cpu" and tl.device.type == "cpu"
    if not on_host:
        il, tl, tg = to_device(il, device), to_device(tl, device), to_device(tg, device)
    tl_min, tl_max = check_ctc_values(tg, il, tl, T, C, blank, padded, on_host)

    if on_host and device.type != "cpu":
        il, tl, tg = to_device(il, device), to_device(tl, device), to_device(tg, device)
    if padded:
        tg = tg[:, :tl_max] if tl_max < S else tg
    else:
        starts = torch.cumsum(tl, 0) - tl
        cols = torch.arange(tl_max, device=device)
        valid = cols[None, :] < tl[:, None]
        tg = torch.where(valid, tg[(starts[:, None] + cols[None, :]).clamp_max(max(S - 1, 0))] if S else
                         torch.zeros((N, tl_max), dtype=torch.int64, device=device), blank)
    return CTCArguments(lp if keep_strides else lp.contiguous(), tg.contiguous(), il, tl, batched, tl_min)


def check_ctc_values(tg: torch.Tensor, il: torch.Tensor, tl: torch.Tensor, T: int, C: int, blank: int, padded: bool,
                     on_host: bool) -> tuple[int, int]:
    """The value checks of :func:`ctc_arguments` (lengths in range, labels in [0, C) other than blank where they
    count), on int64 targets (N, S) padded or 1-D concatenated and (N,) lengths, all on the host (``on_host``) or
    all on one device; (min, max) of target_lengths. Also run by the ctc op's batching rule under torch.vmap, on
    the folded batch."""
    N = il.shape[0]
    S = tg.shape[1] if padded else tg.shape[0]
    if N == 0:  # nothing to check (min / max of no lengths)
        il_min = il_max = tl_min = tl_max = tl_sum = 0
        bad = None
    elif on_host and _extension.AVAILABLE:
        from seqfast import _C

        il_min, il_max, tl_min, tl_max, tl_sum, bad = _C.ctc_target_stats(tg, il, tl, padded, C, blank)
    elif on_host and tg.numel() <= _HOST_CHECK_MAX:
        il_min, il_max, tl_min, tl_max, tl_sum, bad = _ctc_stats_on_host(tg, il, tl, padded, C, blank)
    else:
        il_min, il_max, tl_min, tl_max, tl_sum, bad = _ctc_stats_on_device(tg, il, tl, padded, C, blank)
    _check_ctc_lengths(il, tl, (il_min, il_max, tl_min, tl_max, tl_sum), T, S, padded)
    if bad is not None:
        where = bad() if callable(bad) else bad
        value = int(tg[where])
        raise ArgumentError(f"targets must hold labels in [0, {C}) other than blank={blank}; got {value} at "
                            f"position {where if padded else where[0]}")
    return tl_min, tl_max


def _check_ctc_lengths(il: torch.Tensor, tl: torch.Tensor, stats: tuple[int, int, int, int, int], T: int, S: int,
                       padded: bool) -> None:
    """The length checks of :func:`check_ctc_values`, from (min, max) of input_lengths and (min, max, sum) of
    target_lengths; the lengths themselves only name the offending index."""
    il_min, il_max, tl_min, tl_max, tl_sum = stats
    if il_min < 0:
        raise ArgumentError(f"input_lengths must be >= 0, got {il_min} at index {int(il.argmin())}")
    if il_max > T:
        raise ArgumentError(f"input_lengths must be <= T = {T}, got {il_max} at index {int(il.argmax())}")
    if tl_min < 0:
        raise ArgumentError(f"target_lengths must be >= 0, got {tl_min} at index {int(tl.argmin())}")
    if padded and tl_max > S:
        raise ArgumentError(f"target_lengths must be <= S = {S} (targets' padded width), got {tl_max} "
                            f"at index {int(tl.argmax())}")
    if not padded and tl_sum != S:
        raise ArgumentError(f"sum(target_lengths) = {tl_sum} must equal len(targets) = {S} for concatenated "
                            "targets")


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device`` without blocking the host where the copy can avoid it.

    A host-to-CUDA copy with ``non_blocking=False`` (``t.to(device)``, ``torch.tensor(values, device=...)``)
    synchronises the stream: torch issues it as an asynchronous copy followed by ``cudaStreamSynchronize``,
    so the host waits for all queued work. From pinned memory with ``non_blocking=True`` the copy is queued
    on the stream like a kernel, and torch's caching host allocator keeps the pinned buffer alive until the
    copy has run; pinning costs one host memcpy of the (small) tensor.
    """
    if t.device == device:
        return t
    if t.device.type == "cpu" and device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


# Values on the CPU are checked in one C++ pass (_C.ctc_target_stats, ~10 us); without the extension, up to this
# many target entries are read into Python, and more by a dozen tiny tensor ops (~0.1 ms).
_HOST_CHECK_MAX = 512


def _ctc_stats_on_host(tg, il, tl, padded, C, blank):
    """(min, max of input_lengths; min, max, sum of target_lengths; position of the first bad label or None)."""
    il_h, tl_h = il.tolist(), tl.tolist()
    bad = None
    if padded:
        for n, (row, length) in enumerate(zip(tg.tolist(), tl_h)):
            for s, label in enumerate(row[:max(length, 0)]):
                if label < 0 or label >= C or label == blank:
                    bad = (n, s)
                    break
            if bad is not None:
                break
    else:
        for i, label in enumerate(tg.tolist()):
            if label < 0 or label >= C or label == blank:
                bad = (i,)
                break
    return min(il_h), max(il_h), min(tl_h), max(tl_h), sum(tl_h), bad


def _ctc_stats_on_device(tg, il, tl, padded, C, blank):
    """:func:`_ctc_stats_on_host` computed on the device, with one device-to-host copy."""
    # Label validity where it counts (padding may hold anything).
    if padded:
        counted = torch.arange(tg.shape[1], device=tg.device)[None, :] < tl[:, None]
    else:
        counted = torch.ones_like(tg, dtype=torch.bool)
    bad_label = ((tg < 0) | (tg >= C) | (tg == blank)) & counted
    stats = torch.stack([il.min(), il.max(), tl.min(), tl.max(), tl.sum(), bad_label.sum()]).tolist()  # one sync
    return (*stats[:5], (lambda: tuple(bad_label.nonzero()[0].tolist())) if stats[5] else None)


def assert_ctc_values(tg: torch.Tensor, il: torch.Tensor, tl: torch.Tensor, T: int, C: int, blank: int,
                      padded: bool) -> None:
    """:func:`check_ctc_values` as device asserts (no host sync), for ``torch.compile``; also run by the ctc op's
    batching rule when a compiled function vmaps over it."""
    S = tg.shape[1] if padded else tg.shape[0]
    torch._assert_async(((il >= 0) & (il <= T)).all(), "input_lengths must be in [0, T]")
    torch._assert_async((tl >= 0).all(), "target_lengths must be >= 0")
    if padded:
        torch._assert_async((tl <= S).all(), "target_lengths must be <= S (targets' padded width)")
        counted = torch.arange(S, device=tg.device)[None, :] < tl[:, None]
    else:
        torch._assert_async(tl.sum() == S, "sum(target_lengths) must equal len(targets) for concatenated targets")
        counted = torch.ones_like(tg, dtype=torch.bool)
    bad = ((tg < 0) | (tg >= C) | (tg == blank)) & counted
    torch._assert_async(~bad.any(), "targets must hold labels in [0, C) other than blank")


def _ctc_traced(lp, tg, il, tl, batched, padded, T, C, S, blank) -> CTCArguments:
    """The checks of :func:`ctc_arguments` as device asserts (no host sync, no data-dependent shape), for
    ``torch.compile``. Padded targets keep their width S; concatenated ones are padded to the longest
    target, whose length depends on the data (a graph break, as the values must be read)."""
    assert_ctc_values(tg, il, tl, T, C, blank, padded)
    if not padded:
        tl_max = int(tl.max()) if tl.numel() else 0
        starts = torch.cumsum(tl, 0) - tl
        cols = torch.arange(tl_max, device=lp.device)
        idx = (starts[:, None] + cols[None, :]).clamp_max(max(S - 1, 0))
        tg = torch.where(cols[None, :] < tl[:, None], tg[idx], blank) if S else tg.new_zeros((tl.shape[0], tl_max))
    return CTCArguments(lp.contiguous(), tg.contiguous(), il, tl, batched)


# Devices whose tensors hold no values to check (tests stand meta in for a device with data by emptying this).
_SHAPE_ONLY_DEVICES = ("meta",)


def _ctc_meta(lp, tg, il, tl, batched, padded, T, N, S, blank) -> CTCArguments:
    """Values on the meta device (shape inference, as model summaries and FLOP counters run it): the labels cannot
    be read, lengths on the host are checked as torch checks them there, and the outputs' shapes depend on N only.
    Padded targets keep their width; concatenated ones are padded to the longest target, which needs
    target_lengths on the host (a list or a CPU tensor: torch takes lists there too)."""
    if lp.device.type != "meta":
        raise ArgumentError(f"targets and lengths on the meta device need log_probs there too, got {lp.device}")
    if il.device.type == tl.device.type == "cpu" and il.numel():
        stats = (int(il.min()), int(il.max()), int(tl.min()), int(tl.max()), int(tl.sum()))
        _check_ctc_lengths(il, tl, stats, T, S, padded)
    if not padded:
        if tl.device.type == "meta":
            raise ArgumentError("concatenated targets with meta log_probs need target_lengths on the host (a list or "
                                "a CPU tensor): the longest target sets the padded width")
        tl_max = int(tl.max()) if tl.numel() else 0
        tg = torch.full((N, tl_max), blank, dtype=torch.int64, device="meta")
    return CTCArguments(lp.contiguous(), tg.to("meta").contiguous(), il.to("meta"), tl.to("meta"), batched)


# --------------------------------------------------------------------------------------------------------------
# CTC decoding and forced alignment

# Appended to batch-size errors of 3-D input: the likeliest cause is torchaudio's batch-first layout.
LAYOUT_HINT = ("log_probs is (T, N, C) as for ctc_loss; for torchaudio's (N, T, C) pass log_probs.transpose(0, 1)")


class CTCGreedyArguments(NamedTuple):
    log_probs: torch.Tensor  # (T, N, C), any strides
    input_lengths: torch.Tensor  # (N,) int64 on log_probs' device
    batched: bool


def _input_lengths_within(il: torch.Tensor, T: int) -> None:
    """input_lengths (N,) in [0, T]: refused otherwise, naming the first offending index (one sync on a device)."""
    if not il.numel():
        return
    lo, hi = (il.min().item(), il.max().item()) if il.device.type == "cpu" else \
        torch.stack([il.min(), il.max()]).tolist()
    if lo < 0:
        raise ArgumentError(f"input_lengths must be >= 0, got {lo} at index {int(il.argmin())}")
    if hi > T:
        raise ArgumentError(f"input_lengths must be <= T = {T}, got {hi} at index {int(il.argmax())}")


def _decoder_log_probs(log_probs: torch.Tensor) -> torch.Tensor:
    _floating("log_probs", log_probs)
    if log_probs.dim() not in (2, 3):
        raise ArgumentError(f"log_probs must be (T, N, C) or unbatched (T, C), got shape {tuple(log_probs.shape)}")
    return log_probs if log_probs.dim() == 3 else log_probs.unsqueeze(1)


def ctc_greedy_arguments(log_probs: torch.Tensor, input_lengths: IntLengths, blank: int) -> CTCGreedyArguments:
    """Validate ``ctc_greedy_decode``'s arguments (lengths in every form ``ctc_loss`` takes; N = 0 and T = 0
    allowed). ``log_probs`` keeps its strides: the kernels read any layout."""
    lp = _decoder_log_probs(log_probs)
    batched = log_probs.dim() == 3
    T, N, C = lp.shape
    _blank(blank, C)
    try:
        il = _lengths("input_lengths", input_lengths, N)
    except ArgumentError as exc:
        raise ArgumentError(f"{exc}; {LAYOUT_HINT}" if batched and "entr" in str(exc) else str(exc)) from None
    if torch.compiler.is_compiling():
        il = il.to(lp.device)
        torch._assert_async(((il >= 0) & (il <= T)).all(), "input_lengths must be in [0, T]")
        return CTCGreedyArguments(lp, il, batched)
    _input_lengths_within(il, T)
    return CTCGreedyArguments(lp, to_device(il, lp.device), batched)


def ctc_align_arguments(
    log_probs: torch.Tensor,
    targets: torch.Tensor,
    input_lengths: IntLengths,
    target_lengths: IntLengths,
    blank: int,
) -> CTCArguments:
    """Validate ``ctc_forced_align``'s arguments: ``ctc_loss``'s checks and forms (N = 0 and T = 0 allowed), and
    every target must fit its frames (one per label plus a blank between equal neighbours), as torchaudio
    refuses what cannot be aligned. ``log_probs`` keeps its strides."""
    lp = _decoder_log_probs(log_probs)
    try:
        args = ctc_arguments(lp if log_probs.dim() == 3 else log_probs, targets, input_lengths, target_lengths, blank,
                             allow_empty=True, keep_strides=True)
    except ArgumentError as exc:
        text = str(exc)
        if log_probs.dim() == 3 and ("entr" in text or "batch size" in text):
            text = f"{text}; {LAYOUT_HINT}"
        raise ArgumentError(text) from None
    tg, il, tl = args.targets, args.input_lengths, args.target_lengths
    S = tg.shape[1]
    repeats = ((tg[:, 1:] == tg[:, :-1]) & (torch.arange(1, max(S, 1), device=tg.device)[None, :] < tl[:, None])
               ).sum(1) if S > 1 else torch.zeros_like(tl)
    short = tl + repeats > il
    if torch.compiler.is_compiling():
        torch._assert_async(~short.any(), "a target needs more frames than its input_lengths")
    elif bool(short.any()):
        n = int(short.nonzero()[0, 0])
        raise ArgumentError(
            f"targets[{n}] cannot be aligned: its {int(tl[n])} labels with {int(repeats[n])} repeat(s) (a blank "
            f"must separate equal labels) need {int(tl[n] + repeats[n])} frames, but input_lengths[{n}] = {int(il[n])}")
    return args._replace(log_probs=lp)


# --------------------------------------------------------------------------------------------------------------
# Attention


class SDPAArguments(NamedTuple):
    query: torch.Tensor  # (B, Hq, Lq, D), stride 1 on the last dim
    key: torch.Tensor  # (B, Hk, Lk, D), Hq % Hk == 0
    value: torch.Tensor  # (B, Hk, Lk, Dv)
    attn_mask: torch.Tensor | None  # (B, Hq, Lq, Lk) view, bool or query's dtype
    scale: float
    out_shape: tuple[int, ...] | None  # None: the op's output already has it


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _broadcast(shapes: tuple[tuple[int, ...], ...], what: str, query, key, value) -> tuple[int, ...]:
    """numpy's broadcasting of the leading dims (torch.broadcast_shapes costs more than a small attention)."""
    first = shapes[0]
    if all(s == first for s in shapes):
        return tuple(first)
    out = [1] * max(len(s) for s in shapes)
    for s in shapes:
        for i, n in enumerate(s, len(out) - len(s)):
            if n != 1:
                if out[i] != 1 and out[i] != n:
                    raise ArgumentError(f"query, key and value {what} must broadcast, got shapes "
                                        f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
                out[i] = n
    return tuple(out)


def _refuse_headless_keys(Hq: int, Hk: int) -> None:
    """Key/value with no heads against a query with some: torch returns zeros of the query's shape there (each head
    attends to nothing), which no head grouping explains; refused. No heads on either side is an empty call."""
    if Hk == 0 and Hq != 0:
        raise ArgumentError(f"key and value have no heads but the query has {Hq}: refused (torch returns zeros)")


def _fold(t: torch.Tensor, batch: tuple[int, ...], heads: int, B: int) -> torch.Tensor:
    """(..., h, L, E) -> (B, heads, L, E), broadcasting the batch dims (and h == 1 to ``heads``)."""
    if t.dim() != 4 or t.shape[0] != B or t.shape[1] != heads:
        t = t.expand(*batch, heads, t.shape[-2], t.shape[-1]).reshape(B, heads, t.shape[-2], t.shape[-1])
    return _last_dim_contiguous(t)


def sdpa_arguments(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
) -> SDPAArguments:
    """Validate ``scaled_dot_product_attention``'s arguments as torch does and fold the batch dims into one.

    Batch dims broadcast against each other (and so does a key/value head dim of 1); under autocast the
    floating inputs (not float64) are cast to autocast's dtype first, as torch casts them.
    """
    # The common case in few operations (on tiny inputs the checks would cost more than the kernel): 4-D
    # tensors of one dtype, device and batch, no mask, no autocast. Everything it accepts passes the
    # general checks below unchanged; ``out_shape`` None means the output needs no reshape.
    if type(query) is torch.Tensor and type(key) is torch.Tensor and type(value) is torch.Tensor:
        qs, ks, vs, dtype = query.shape, key.shape, value.shape, query.dtype
        if (attn_mask is None and len(qs) == 4 and len(ks) == 4 and len(vs) == 4 and dtype in FLOAT_DTYPES
                and key.dtype == dtype and value.dtype == dtype and qs[0] == ks[0] == vs[0] and qs[1] == ks[1] == vs[1]
                and qs[3] == ks[3] and ks[2] == vs[2] and qs[3] > 0 and 0.0 <= dropout_p <= 1.0
                and query.stride(3) == 1 and key.stride(3) == 1 and value.stride(3) == 1
                and not torch._C._is_any_autocast_enabled() and query.device == key.device == value.device):
            return SDPAArguments(query, key, value, None, 1.0 / math.sqrt(qs[3]) if scale is None else float(scale),
                                 None)
    _floating("query", query)
    _floating("key", key)
    _floating("value", value)
    device = query.device
    if key.device != device or value.device != device:
        raise ArgumentError(f"query, key and value must be on one device, got {device}, {key.device}, "
                            f"{value.device}")
    cast = _autocast_dtype(device)
    if cast is not None:
        query, key, value = (t.to(cast) if t.dtype != torch.float64 else t for t in (query, key, value))
        if attn_mask is not None and attn_mask.is_floating_point() and attn_mask.dtype != torch.float64:
            attn_mask = attn_mask.to(cast)
    if not (query.dtype == key.dtype == value.dtype):
        raise ArgumentError(f"query, key and value must share a dtype, got {query.dtype}, {key.dtype}, "
                            f"{value.dtype}")
    qs, ks, vs = query.shape, key.shape, value.shape
    if len(qs) < 2 or len(ks) < 2 or len(vs) < 2:
        raise ArgumentError(f"query, key and value must have at least 2 dims (..., L, E), got shapes {tuple(qs)}, "
                            f"{tuple(ks)}, {tuple(vs)}")
    if qs[-1] != ks[-1]:
        raise ArgumentError(f"query and key must share the last dim (E), got {qs[-1]} and {ks[-1]}")
    if ks[-2] != vs[-2]:
        raise ArgumentError(f"key and value must share the sequence length, got {ks[-2]} and {vs[-2]}")
    if not 0.0 <= dropout_p <= 1.0:
        raise ArgumentError(f"dropout_p must be in [0, 1], got {dropout_p}")
    Lq, Lk, D = qs[-2], ks[-2], qs[-1]

    if enable_gqa and len(qs) >= 3 and len(ks) >= 3 and len(vs) >= 3:
        Hq, Hk = qs[-3], ks[-3]
        if vs[-3] != Hk:
            raise ArgumentError(f"key and value must have the same number of heads, got {Hk} and {vs[-3]}")
        _refuse_headless_keys(Hq, Hk)
        if Hk and Hq % Hk:
            raise ArgumentError(f"enable_gqa needs query heads ({Hq}) to be a multiple of key/value heads ({Hk})")
        batch = _broadcast((qs[:-3], ks[:-3], vs[:-3]), "batch dims", query, key, value)
        lead = (*batch, Hq)
    else:
        if len(qs) >= 3:
            _refuse_headless_keys(qs[-3], min(ks[-3] if len(ks) >= 3 else 1, vs[-3] if len(vs) >= 3 else 1))
        lead = _broadcast((qs[:-2], ks[:-2], vs[:-2]), "batch and head dims (pass enable_gqa=True for grouped "
                          "heads)", query, key, value)
        batch, Hq = (lead[:-1], lead[-1]) if lead else ((), 1)
        # Key/value heads of 1 broadcast over the query heads are grouped attention with one group.
        kh, vh = (ks[-3] if len(ks) >= 3 else 1), (vs[-3] if len(vs) >= 3 else 1)
        Hk = 1 if kh == vh == 1 else Hq
    B = math.prod(batch)
    q4 = _fold(query, batch, Hq, B)
    k4 = _fold(key, batch, Hk, B)
    v4 = _fold(value, batch, Hk, B)

    mask = None
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise ArgumentError(f"attn_mask must be a tensor or None, got {type(attn_mask)}")
        if attn_mask.dtype != torch.bool and attn_mask.dtype != query.dtype:
            if attn_mask.dtype != torch.float32:  # torch takes bool, float32 or query's dtype
                raise ArgumentError(f"attn_mask must be bool, float32 or of query's dtype {query.dtype}, got "
                                    f"{attn_mask.dtype}")
            attn_mask = attn_mask.to(query.dtype)
        full = (*lead, Lq, Lk)
        try:
            mask = attn_mask.to(device).expand(full).reshape(B, Hq, Lq, Lk)
        except RuntimeError as exc:
            raise ArgumentError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to {full}") from exc
    if D == 0:
        scale = 1.0  # every score is 0 whatever the scale (torch gives the mean of the values)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    return SDPAArguments(q4, k4, v4, mask, scale, (*lead, Lq, vs[-1]))


class VarlenArguments(NamedTuple):
    query: torch.Tensor  # (total_q, Hq, D)
    key: torch.Tensor  # (total_k, Hk, D)
    value: torch.Tensor  # (total_k, Hk, Dv)
    cu_seqlens_q: torch.Tensor  # (B+1,) int64
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    scale: float


def varlen_arguments(q, k, v, cu_q, cu_k, max_q, max_k, scale) -> VarlenArguments:
    """Validate ``varlen_attention``'s arguments (one host sync on CUDA for the prefix sums)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dtype not in FLOAT_DTYPES or t.dim() != 3:
            raise ArgumentError(f"{name} must be a 3-D (total, heads, E) floating tensor, got "
                                f"{getattr(t, 'dtype', type(t))} {tuple(getattr(t, 'shape', ()))}")
    cast = _autocast_dtype(q.device)
    if cast is not None:
        q, k, v = (t.to(cast) if t.dtype != torch.float64 else t for t in (q, k, v))
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ArgumentError("q, k and v must share dtype and device")
    if q.shape[2] != k.shape[2] or k.shape[:2] != v.shape[:2] or k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ArgumentError(f"incompatible shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    for name, cu in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        if not isinstance(cu, torch.Tensor) or cu.dtype not in (torch.int32, torch.int64) or cu.dim() != 1:
            raise ArgumentError(f"{name} must be a 1-D int32/int64 tensor")
    # The attention path's one host sync (none when the prefix sums are CPU tensors): they decide the launch
    # (the sequence count) and are checked against the tensors' rows and max_seqlen, as a bad one would read
    # out of bounds. Both travel in one copy.
    if cu_q.device == cu_k.device:
        both = torch.cat((cu_q.to(torch.int64), cu_k.to(torch.int64))).tolist()
        hosts = (both[:len(cu_q)], both[len(cu_q):])
    else:
        hosts = (cu_q.tolist(), cu_k.tolist())
    # non_blocking: torch adds no stream synchronisation to the copy of CPU prefix sums.
    cus = [cu.to(device=q.device, dtype=torch.int64, non_blocking=True).contiguous() for cu in (cu_q, cu_k)]
    for name, host, total, mx in (("cu_seqlens_q", hosts[0], q.shape[0], max_q),
                                  ("cu_seqlens_k", hosts[1], k.shape[0], max_k)):
        lengths = [b - a for a, b in zip(host, host[1:])]
        if not host or host[0] != 0 or host[-1] != total or min(lengths, default=0) < 0:
            raise ArgumentError(f"{name} must rise from 0 to {total} (rows of its tensor), got {host}")
        if max(lengths, default=0) > mx:
            raise ArgumentError(f"{name} has a sequence of {max(lengths)} > the max_seqlen given ({mx})")
    if len(cus[0]) != len(cus[1]):
        raise ArgumentError("cu_seqlens_q and cu_seqlens_k must describe the same number of sequences")
    if q.shape[2] == 0:
        scale = 1.0
    scale = 1.0 / math.sqrt(q.shape[2]) if scale is None else float(scale)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    return VarlenArguments(q, k, v, cus[0], cus[1], int(max_q), int(max_k), scale)


# --------------------------------------------------------------------------------------------------------------
# CTC beam search


class BeamSearchArguments(NamedTuple):
    log_probs: torch.Tensor  # (T, N, C) float32/float64 on the CPU
    input_lengths: torch.Tensor  # (N,) int64 on the CPU, in [0, T]
    batched: bool
    top_k_tokens: int  # 0: off
    token_min_logp: float  # -inf: off
    beam_prune_logp: float  # -inf: off
    lm_tables: list[torch.Tensor]
    hotword_tables: list[torch.Tensor]
    lexicon_tables: list[torch.Tensor]
    word_delimiter: int  # -1 without a lexicon
    blank_skip_logp: float  # +inf: off


def _int_at_least(name: str, value: object, least: int) -> int:
    if isinstance(value, bool) or isinstance(value, float):
        raise ArgumentError(f"{name} must be an int >= {least}, got {value!r}")
    v = _index(name, value)
    if v < least:
        raise ArgumentError(f"{name} must be an int >= {least}, got {v}")
    return v


def _real(name: str, value: object, finite: bool = True, at_least: float | None = None,
          at_most: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ArgumentError(f"{name} must be a real number, got {value!r}")
    v = float(value)
    if math.isnan(v) or (finite and math.isinf(v)):
        raise ArgumentError(f"{name} must be a {'finite ' if finite else ''}number, got {v}")
    if at_least is not None and v < at_least:
        raise ArgumentError(f"{name} must be >= {at_least}, got {v}")
    if at_most is not None and v > at_most:
        raise ArgumentError(f"{name} must be <= {at_most}, got {v}")
    return v


def _token_sequences(name: str, value: object, C: int, blank: int) -> list[list[int]]:
    """A list of non-empty token sequences (hot-words, lexicon words): tokens in [0, C), not blank."""
    if value is None:
        return []
    if isinstance(value, (str, torch.Tensor)) or not isinstance(value, Sequence):
        raise ArgumentError(f"{name} must be a list of token sequences, got {type(value).__name__}")
    words = []
    for i, word in enumerate(value):
        if isinstance(word, torch.Tensor):
            word = word.tolist()
        if isinstance(word, str) or not isinstance(word, Sequence) or len(word) == 0:
            raise ArgumentError(f"{name}[{i}] must be a non-empty sequence of tokens, got {word!r}")
        tokens = [_index(f"{name}[{i}]", c) for c in word]
        bad = [c for c in tokens if not 0 <= c < C or c == blank]
        if bad:
            raise ArgumentError(f"{name}[{i}] must hold tokens in [0, {C}) other than blank={blank}, got {bad[0]}")
        words.append(tokens)
    return words


def _to_host(log_probs: torch.Tensor, lengths: object) -> tuple[torch.Tensor, object]:
    """log_probs (and device-held lengths) on the CPU, with one wait for the device: the beam search runs on
    the CPU (it is sequential per sample)."""
    if log_probs.device.type == "cpu" and not (isinstance(lengths, torch.Tensor) and lengths.device.type != "cpu"):
        return log_probs, lengths
    lp = log_probs.to("cpu", non_blocking=True)
    if isinstance(lengths, torch.Tensor):
        lengths = lengths.to("cpu", non_blocking=True)
    if torch.accelerator.is_available():
        torch.accelerator.synchronize()
    return lp, lengths


def ctc_beam_search_arguments(
    log_probs: torch.Tensor,
    input_lengths: IntLengths | None,
    beam_size: int,
    blank: int,
    top_k_tokens: int | None,
    token_min_logp: float | None,
    beam_prune_logp: float | None,
    lm: object,
    lm_weight: float,
    insertion_bonus: float,
    hotwords: Sequence[Sequence[int]] | None,
    hotword_bonus: float,
    lexicon: Sequence[Sequence[int]] | None = None,
    word_delimiter: int | None = None,
    blank_skip_logp: float | None = None,
) -> BeamSearchArguments:
    """Validate :func:`seqfast.ctc_beam_search`'s arguments and bring them to the op's form (on the CPU;
    float16/bfloat16 read as float32). ``log_probs`` may not hold NaN or +inf (there is no torch result to
    follow, and no ranking of NaN scores): refused, as are lengths outside [0, T]."""
    lp = _decoder_log_probs(log_probs)
    batched = log_probs.dim() == 3
    C = lp.shape[-1]
    _blank(blank, C)
    beam_size = _int_at_least("beam_size", beam_size, 1)
    top_k = 0 if top_k_tokens is None else _int_at_least("top_k_tokens", top_k_tokens, 1)
    min_logp = -math.inf if token_min_logp is None else _real("token_min_logp", token_min_logp)
    prune = -math.inf if beam_prune_logp is None else _real("beam_prune_logp", beam_prune_logp, at_most=0.0)
    lm_weight = _real("lm_weight", lm_weight, at_least=0.0)
    insertion_bonus = _real("insertion_bonus", insertion_bonus)
    hotword_bonus = _real("hotword_bonus", hotword_bonus, at_least=0.0)
    blank_skip = math.inf if blank_skip_logp is None else _real("blank_skip_logp", blank_skip_logp, at_most=0.0)
    lm_tables: list[torch.Tensor] = []
    if lm is not None:
        from seqfast.ngram_lm import CharNGramLM

        if isinstance(lm, CharNGramLM):
            if lm.num_classes != C:
                raise ArgumentError(f"lm has {lm.num_classes} classes but log_probs has C = {C}")
            lm_tables = lm.tables()
        elif not callable(lm):
            raise ArgumentError(f"lm must be a seqfast.CharNGramLM, a scorer(prefix, token) -> log-prob or None, got "
                                f"{type(lm).__name__}")
    from seqfast.ngram_lm import hotword_tables as trie_tables

    words = _token_sequences("hotwords", hotwords, C, blank)
    hotword_tables = trie_tables(words, C, blank) if words else []
    lexicon_words = _token_sequences("lexicon", lexicon, C, blank)
    lexicon_tables: list[torch.Tensor] = []
    delimiter = -1
    if lexicon is not None:
        if not lexicon_words:
            raise ArgumentError("lexicon must hold at least one word (or be None)")
        if isinstance(word_delimiter, bool) or not isinstance(word_delimiter, int) or not 0 <= word_delimiter < C \
                or word_delimiter == blank:
            raise ArgumentError(f"word_delimiter must be a token in [0, {C}) other than blank={blank} when a lexicon "
                                f"is given, got {word_delimiter!r}")
        for i, word in enumerate(lexicon_words):
            if word_delimiter in word:
                raise ArgumentError(f"lexicon[{i}] holds the word delimiter {word_delimiter}")
        lexicon_tables, delimiter = trie_tables(lexicon_words, C, blank), word_delimiter
    elif word_delimiter is not None:
        raise ArgumentError("word_delimiter is only used with a lexicon; got a word_delimiter without one")

    lp, lengths = _to_host(lp, input_lengths)
    T, N, _ = lp.shape
    if lengths is None:
        il = torch.full((N,), T, dtype=torch.int64)
    else:
        il = _lengths("input_lengths", lengths, N)
        _input_lengths_within(il, T)
    if lp.dtype in (torch.float16, torch.bfloat16):
        lp = lp.float()
    # One reduction: the max is NaN where any entry is, +inf where one is and none is NaN.
    if lp.numel() and not float(lp.max()) < math.inf:
        raise ArgumentError("log_probs must not hold NaN or +inf (the beam search cannot rank them)")
    return BeamSearchArguments(lp, il.contiguous(), batched, top_k, min_logp, prune, lm_tables, hotword_tables,
                               lexicon_tables, delimiter, blank_skip)
