"""The public functions: torch's signatures, validated once, computed by the seqfast ops."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch.nested._internal.nested_tensor import NestedTensor as JaggedTensor  # torch.nested's jagged layout

if TYPE_CHECKING:
    from torch.nn.attention.bias import CausalBias

from seqfast import _amx, _backend, _extension
from seqfast.ngram_lm import CharNGramLM
from seqfast.ops import attention as attention_ops
from seqfast.ops import ctc_beam_search as beam_ops
from seqfast.ops import ctc_decode as decode_ops
from seqfast.ops import ctc_loss as ctc_ops
from seqfast.validation import (
    ArgumentError,
    IntLengths,
    ctc_align_arguments,
    ctc_arguments,
    ctc_beam_search_arguments,
    ctc_greedy_arguments,
    flag,
    int_like,
    real,
    reduction_argument,
    sdpa_arguments,
    varlen_arguments,
)


def _ctc(log_probs, targets, input_lengths, target_lengths, blank, reduction, zero_infinity, from_logits, name):
    zero_infinity = flag("ctc_loss_from_logits" if from_logits else "ctc_loss", "zero_infinity", zero_infinity)
    reduction = reduction_argument(reduction)
    blank = int_like(blank)  # numpy and 0-d tensor integers, as torch's int arguments take them
    args = ctc_arguments(log_probs, targets, input_lengths, target_lengths, blank, name)
    # Without a gradient to come, the kernels need not store log_alpha (the loss is the same bits).
    # (Under torch.vmap a tensor does not say whether it requires grad, through a torch.func transform or
    # torch.autograd outside: kept there whenever grad mode is on.)
    keep_alpha = torch.is_grad_enabled() and (args.log_probs.requires_grad or any(_backend.functorch_transforms()))
    # On the CPU float32 path the forward keeps every K-th alpha row only, and backward recomputes the rest.
    alpha_every = ctc_ops.choose_alpha_every(args.log_probs, args.targets, keep_alpha)
    nll, _ = _backend.dispatch(
        None, ctc_ops.FORWARD, args.log_probs, args.targets, args.input_lengths, args.target_lengths,
        blank, zero_infinity, from_logits, keep_alpha, alpha_every,
    )
    if zero_infinity:
        nll = torch.where(torch.isposinf(nll), torch.zeros_like(nll), nll)  # as torch: +inf only, NaN stays
    if reduction == "mean":
        # Integer lengths promote to nll's dtype. The eager call knows their minimum: clamping lengths that are all
        # >= 1 would change no divisor, and costs a tensor op (a tenth of a small call's overhead).
        tl = args.target_lengths
        loss = (nll / (tl if (args.min_target_length or 0) >= 1 else tl.clamp_min(1))).mean()
    elif reduction == "sum":
        loss = nll.sum()
    else:
        loss = nll if args.batched else nll[0]
    out_dtype = args.log_probs.dtype  # float32 under autocast, as torch's ctc_loss
    return loss if loss.dtype == out_dtype else loss.to(out_dtype)


def ctc_loss(
    log_probs: torch.Tensor,
    targets: torch.Tensor,
    input_lengths: IntLengths,
    target_lengths: IntLengths,
    blank: int = 0,
    reduction: str = "mean",
    zero_infinity: bool = False,
) -> torch.Tensor:
    """Connectionist Temporal Classification loss, a drop-in for ``torch.nn.functional.ctc_loss``.

    Args:
        log_probs: (T, N, C) or unbatched (T, C) log-probabilities (log_softmax over C); float16,
            bfloat16 (computed in float32; torch refuses these), float32 or float64.
        targets: (N, S) padded or 1-D concatenated (sum(target_lengths),) labels, int32/int64,
            in [0, C) and != blank; unbatched: (S,).
        input_lengths, target_lengths: (N,) tensors, tuples or lists of ints (0-d / int unbatched).
        blank: the blank label, in [0, C).
        reduction: ``"none"`` (per-sample), ``"sum"``, or ``"mean"`` (loss / max(target_length, 1),
            averaged over the batch).
        zero_infinity: replace infinite losses (no alignment fits) and their gradients by 0.

    Returns:
        The loss in ``log_probs``' dtype: (N,) or () for ``"none"``, else a scalar.

    Gradient: torch's convention, ``grad_out * (exp(log_probs) - posterior)`` over t < input_length
    (0 after): the gradient w.r.t. the logits of a preceding log_softmax, so gradients through
    ``log_softmax`` equal torch's. Infinite losses give NaN gradients unless ``zero_infinity``.
    """
    return _ctc(log_probs, targets, input_lengths, target_lengths, blank, reduction, zero_infinity, False,
                "log_probs")


def ctc_loss_from_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    input_lengths: IntLengths,
    target_lengths: IntLengths,
    blank: int = 0,
    reduction: str = "mean",
    zero_infinity: bool = False,
) -> torch.Tensor:
    """CTC loss of ``log_softmax(logits, -1)`` with the log_softmax fused into the kernels.

    Equals ``ctc_loss(logits.log_softmax(-1), ...)`` without materialising the (T, N, C)
    log-probabilities or their gradient: backward gives ``softmax - posterior`` w.r.t. ``logits``
    directly. ``logits``: (T, N, C) or (T, C), float16 / bfloat16 / float32 / float64; other
    arguments as :func:`ctc_loss`.
    """
    return _ctc(logits, targets, input_lengths, target_lengths, blank, reduction, zero_infinity, True, "logits")


def ctc_greedy_decode(
    log_probs: torch.Tensor,
    input_lengths: IntLengths,
    blank: int = 0,
    return_frames: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Best-path CTC decoding: per frame the most probable class, runs merged, blanks dropped.

    Args:
        log_probs: (T, N, C) or unbatched (T, C), as for :func:`ctc_loss` (any strides); float16, bfloat16,
            float32 or float64. The argmax is ``torch.argmax``'s: the first maximum, or the first NaN.
        input_lengths: (N,) frames per sample (tensor, list or int, as :func:`ctc_loss` takes).
        blank: the blank class.
        return_frames: also return the first frame of each token's run.

    Returns:
        ``(tokens, lengths)``, or ``(tokens, lengths, frames)``: ``tokens`` (N, T) int64 with sample n's labels
        in ``tokens[n, :lengths[n]]`` and ``blank`` after them; ``lengths`` (N,) int64; ``frames`` (N, T)
        int64, -1 after the tokens. Unbatched input gives (T,), 0-d and (T,).
    """
    blank = int_like(blank)
    args = ctc_greedy_arguments(log_probs, input_lengths, blank)
    tokens, lengths, frames = _backend.dispatch(None, decode_ops.GREEDY, args.log_probs, args.input_lengths, blank)
    if not args.batched:
        tokens, lengths, frames = tokens[0], lengths[0], frames[0]
    return (tokens, lengths, frames) if return_frames else (tokens, lengths)


def ctc_forced_align(
    log_probs: torch.Tensor,
    targets: torch.Tensor,
    input_lengths: IntLengths,
    target_lengths: IntLengths,
    blank: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CTC forced alignment: the best (Viterbi) frame-level path that collapses to the target, batched.

    torchaudio's ``forced_align`` semantics (equal neighbouring labels need a blank between them) in
    :func:`ctc_loss`'s layout: ``log_probs`` (T, N, C) or unbatched (T, C), any strides (torchaudio's
    batch-first (N, T, C) is ``log_probs.transpose(0, 1)``); ``targets`` (N, S) padded or 1-D concatenated;
    lengths as :func:`ctc_loss` takes them. A target that cannot fit its frames raises
    :class:`~seqfast.ArgumentError`. Ties between equally scored paths: the one ending on the last label rather
    than a trailing blank, then, from the last frame backwards, the one further along the target at each
    frame; NaN log-probs count as -inf there (``seqfast/ops/ctc_decode.py``).

    Returns:
        ``(paths, scores)``, both (N, T) ((T,) unbatched): ``paths`` int64, the class per frame (``blank``
        past ``input_lengths[n]``); ``scores`` in log_probs' dtype, the frame's log-prob on the path (0 past
        the input). A path's total score is ``scores.sum(-1)``.
    """
    blank = int_like(blank)
    args = ctc_align_arguments(log_probs, targets, input_lengths, target_lengths, blank)
    paths, scores = _backend.dispatch(
        None, decode_ops.ALIGN, args.log_probs, args.targets, args.input_lengths, args.target_lengths, blank,
    )
    if not args.batched:
        paths, scores = paths[0], scores[0]
    return paths, scores


with torch.inference_mode(False):  # an import under inference_mode must not make it an inference tensor
    _NO_SEED = torch.zeros((), dtype=torch.int64)  # the seed argument when there is no dropout
# The extension's one-call route for the common eager attention call (csrc/autograd.cpp), when it loaded.
_COMMON_ATTENTION = getattr(_extension.module(), "common_attention", None) if _extension.AVAILABLE else None
# bfloat16 inference on CPUs where torch multiplies on AMX tiles goes to torch's own attention (seqfast/_amx.py).
_TORCH_AMX_BF16 = _amx.torch_multiplies_bf16_on_amx()
_TORCH_SDPA = torch._C._nn.scaled_dot_product_attention


def _dropout_seed(dropout_p: float, device: torch.device | None = None) -> torch.Tensor:
    """The op's dropout seed, a one-element int64 tensor drawn by a tensor op that ``torch.compile`` traces.

    For CUDA queries it is drawn on their device from that device's generator: the Triton kernels load it
    from there, so no value crosses to the host (no sync, and a CUDA graph captures the draw), and
    ``torch.manual_seed`` / ``torch.cuda.manual_seed`` make it reproducible. Elsewhere it is drawn on the CPU
    from the default generator, where the C++ kernels read it.
    """
    if not dropout_p > 0:
        return _NO_SEED
    if device is not None and device.type == "cuda":
        return torch.randint(0, 2**62, (), dtype=torch.int64, device=device)
    return torch.randint(0, 2**62, (), dtype=torch.int64)


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    *,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Fused attention, a drop-in for ``torch.nn.functional.scaled_dot_product_attention``.

    Args:
        query: (..., Hq, Lq, E); key: (..., Hk, Lk, E); value: (..., Hk, Lk, Ev); one floating dtype
            (under autocast, cast to autocast's dtype as torch does). Batch dims broadcast (so do key/value
            heads of 1), as in torch.
        attn_mask: broadcastable to (..., Hq, Lq, Lk); bool (True = attend) or float (float32 or query's
            dtype; added to the scores; gets a gradient when it requires one); or a
            ``torch.nn.attention.bias.CausalBias`` (``causal_upper_left`` / ``causal_lower_right``), run as
            the kernels' causal modes with no mask tensor (lower-right: query i sees keys j <= i + Lk - Lq,
            the alignment of decoding with cached keys and values).
        dropout_p: dropout on the attention weights, in [0, 1], applied whenever > 0 (as torch); the RNG
            is seeded from torch's default generator.
        is_causal: top-left causal mask (query i sees keys j <= i); with ``attn_mask`` too, a key must pass
            both (as torch 2.13).
        scale: defaults to 1 / sqrt(E).
        enable_gqa: allow Hq a multiple of Hk (grouped / multi-query attention).

    Returns:
        (..., Hq, Lq, Ev) in query's dtype, with torch's strides: where torch's fused kernel serves the call
        (4-D inputs of one batch size and head count, or grouped with ``enable_gqa``, unit last-dim strides, no
        dropout, Ev == E), in the query's layout (``torch.empty_like(query)``), so that
        ``out.transpose(1, 2).view(B, L, H * E)`` works for (B, L, H, E)-view queries; else contiguous. Rows
        that see no key are 0, as in torch 2.13.

    On a CPU whose AMX tiles torch uses (seqfast/_amx.py), an eager bfloat16 call that torch runs fused is torch's
    own call where torch is faster: with no gradient to come, and with one where the work is large (head dim at
    least 64 and Lq * Lk * E at least 2^23, causal above 2^26). ``SEQFAST_BF16_ATTENTION=seqfast`` turns this off.
    A 16-bit CPU call with a gradient to come that torch computes unfused runs in float32 and casts back, as
    torch's math path does (gradients as close to float64 as torch's).
    """
    # torch's argument types, strictly: Python's truth value would give is_causal=None or "no" a meaning. The
    # common forms pass on identity tests alone (four calls would cost a tenth of a small call).
    fn = "scaled_dot_product_attention"
    if is_causal is not False and is_causal is not True:
        is_causal = flag(fn, "is_causal", is_causal)
    if enable_gqa is not False and enable_gqa is not True:
        enable_gqa = flag(fn, "enable_gqa", enable_gqa)
    if type(dropout_p) is not float:
        dropout_p = real(fn, "dropout_p", dropout_p)
    if scale is not None and type(scale) is not float:
        scale = real(fn, "scale", scale, optional=True)
    if _any_nested(query, key, value):
        return _nested_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if _any_strided_nested(query, key, value):
        raise ArgumentError("seqfast takes jagged nested tensors (torch.nested, layout=torch.jagged), not the strided "
                            "layout, whose sequences may be ragged in any dim: torch's own function serves those")
    out = _amx_bf16_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if out is not None:
        return out
    bottom_right = False
    if _is_causal_bias(attn_mask):
        is_causal, bottom_right = _causal_bias(attn_mask, query, key, is_causal)
        attn_mask = None
    elif attn_mask is None and not dropout_p and _COMMON_ATTENTION is not None and _backend.is_plain_auto():
        try:
            out = _COMMON_ATTENTION(query, key, value, is_causal, scale)
        except TypeError:  # not tensors: the checks below say what is wrong
            out = None
        if out is not None:
            return out
    return _seeded_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                             _dropout_seed(dropout_p, getattr(query, "device", None)), bottom_right)


def _any_nested(*tensors) -> bool:
    """Whether any is a jagged nested tensor (an isinstance test: reading ``is_nested`` off a tensor subclass would
    call its ``__torch_function__``)."""
    return any(isinstance(t, JaggedTensor) for t in tensors)


def _any_strided_nested(*tensors) -> bool:
    """Whether any is a nested tensor of the strided layout (``torch.nested.nested_tensor``'s default): a plain
    ``torch.Tensor`` whose ``is_nested`` is set. Subclasses are not asked (see ``_any_nested``)."""
    return any(type(t) is torch.Tensor and t.is_nested for t in tensors)


def _nested_attention(query, key, value, attn_mask, dropout_p: float, is_causal: bool, scale, enable_gqa: bool):
    """Attention over jagged nested tensors (``torch.nested``, ``layout=torch.jagged``), (B, H, j, E) with the
    ragged dim after the heads, as torch's attention takes them: seqfast's varlen kernels on their packed values,
    a nested (B, Hq, j, Ev) result with the query's offsets, its gradients flowing to the nested inputs. torch
    takes such calls without a mask or a causal mask only (it refuses both); seqfast refuses dropout too."""
    if not all(isinstance(t, JaggedTensor) for t in (query, key, value)):
        raise ArgumentError("query, key and value must all be jagged nested tensors (torch.nested, "
                            "layout=torch.jagged) or none of them")
    if any(t.dim() != 4 or t._ragged_idx != 2 for t in (query, key, value)):
        raise ArgumentError("nested query, key and value must be (B, H, j, E): the ragged dim after the heads")
    if attn_mask is not None or is_causal:
        raise ArgumentError("nested tensors take no attn_mask and no causal mask (torch refuses them too)")
    if dropout_p > 0:
        raise ArgumentError("seqfast has no dropout for nested tensors (torch's own function has)")
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (B, j, H, E): values() packed (total, H, E)
    off_q, off_k = q.offsets(), k.offsets()
    if off_q.shape != off_k.shape or not (v.offsets() is off_k or torch.equal(v.offsets(), off_k)):
        raise ArgumentError("nested key and value must have the same lengths, and as many sequences as the query")
    max_q, max_k = (int(o.diff().max()) if o.numel() > 1 else 0 for o in (off_q, off_k))
    # varlen_attn checks the heads as torch does (equal, or grouped with enable_gqa).
    out = varlen_attn(q.values(), k.values(), v.values(), off_q, off_k, max_q, max_k, scale=scale,
                      enable_gqa=enable_gqa)
    return torch.nested.nested_tensor_from_jagged(out, off_q).transpose(1, 2)


def _is_causal_bias(mask: object) -> bool:
    """Whether ``mask`` is torch's ``CausalBias``. Its module is looked up, not imported: a CausalBias can only
    exist once ``torch.nn.attention.bias`` is loaded, and importing that module loads torch._dynamo (about 2 s),
    which ``import seqfast`` should not add to a script that never uses it."""
    module = sys.modules.get("torch.nn.attention.bias")
    return module is not None and isinstance(mask, module.CausalBias)


def _causal_bias(bias: CausalBias, query: torch.Tensor, key: torch.Tensor, is_causal: bool) -> tuple[bool, bool]:
    """(is_causal, bottom_right) for a ``CausalBias`` mask, with torch's rules: not with ``is_causal``; upper-left,
    or equal lengths, is ``is_causal`` on the inputs' own lengths; lower-right must match the inputs' lengths
    (torch materialises it as a (Lq, Lk) mask there)."""
    if is_causal:
        raise ArgumentError("CausalBias should not be used with causal=True (as torch)")
    from torch.nn.attention.bias import CausalVariant  # loaded already: the caller made a CausalBias

    if bias.seq_len_q == bias.seq_len_kv or bias.variant == CausalVariant.UPPER_LEFT:
        return True, False
    if bias.variant != CausalVariant.LOWER_RIGHT:
        raise ArgumentError(f"CausalBias.variant must be a CausalVariant, got {bias.variant}")
    lq, lk = query.shape[-2] if query.dim() >= 2 else None, key.shape[-2] if key.dim() >= 2 else None
    if (lq, lk) != (bias.seq_len_q, bias.seq_len_kv):
        raise ArgumentError(f"causal_lower_right({bias.seq_len_q}, {bias.seq_len_kv}) does not match the query and "
                            f"key lengths ({lq}, {lk})")
    return False, True


def _seeded_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, seed: torch.Tensor,
                      bottom_right: bool = False):
    """:func:`scaled_dot_product_attention` with the dropout seed given (callers that need the keep-mask);
    ``bottom_right``: the lower-right causal alignment (``is_causal`` is then False)."""
    # torch's fusion choice sets the output's and the gradients' layouts; asked only where either can differ (a
    # gradient to come, a non-contiguous output): it costs several microseconds a call.
    tensors = all(isinstance(t, torch.Tensor) for t in (query, key, value))
    fused = None
    if (tensors and torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
            and _op_gives_fused_gradients(query, value, attn_mask, dropout_p)):
        fused = _fused_in_torch(query, key, value, attn_mask, dropout_p, enable_gqa)
        if not fused:
            query, key, value = _with_unfused_gradients(query, key, value)
    args = sdpa_arguments(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    upcast = tensors and args.query.dtype in (torch.float16, torch.bfloat16) and _math_upcasts(args)
    if upcast and fused is None:
        fused = _fused_in_torch(query, key, value, attn_mask, dropout_p, enable_gqa)
    half = args.query.dtype if upcast and not fused else None
    if half is not None:
        mask = args.attn_mask
        args = args._replace(query=args.query.float(), key=args.key.float(), value=args.value.float(),
                             attn_mask=_float_mask(mask) if mask is not None and mask.is_floating_point() else mask)
    if bottom_right:
        causal = attention_ops.CAUSAL_BOTTOM_RIGHT
    else:
        causal = attention_ops.CAUSAL_TOP_LEFT if is_causal else attention_ops.NO_CAUSAL
    # dropout_p = 1 drops every weight: torch's result is 0 (NaN where the attention itself is NaN), as this.
    dropped_all = dropout_p == 1.0
    out, _ = _backend.dispatch(
        None, attention_ops.FORWARD, args.query, args.key, args.value, args.attn_mask,
        0.0 if dropped_all else float(dropout_p), causal, args.scale, _NO_SEED if dropped_all else seed,
    )
    if dropped_all:
        out = out * 0.0
    if half is not None:
        out = out.to(half)
    out = out if args.out_shape is None else out.reshape(args.out_shape)
    if not out.is_contiguous():
        if fused is None:
            fused = tensors and _fused_in_torch(query, key, value, attn_mask, dropout_p, enable_gqa)
        if not fused:
            out = out.contiguous()  # torch's unfused path gives a contiguous result
    return out


def _math_upcasts(args) -> bool:
    """Whether torch's math path, if it takes this 16-bit call (the caller asks ``_fused_in_torch``), works in
    float32 and a gradient is to come: a CPU call, query, key and value upcast and the result cast back (unless
    ``torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True)``). seqfast's 16-bit kernels compute in float32
    too, but their backward, as any FlashAttention-style one, takes rowsum(dO * O) from the 16-bit output: its
    gradients come out up to 3-4x further from float64 than torch's math ones at large scales
    (tests/test_attention.py, ``test_half_gradients_as_precise_as_torch_math``). Where torch runs fused its own
    backward does the same as seqfast's, and seqfast keeps its 16-bit kernels there."""
    if args.query.device.type != "cpu" or not torch.is_grad_enabled():
        return False
    if not (any(t.requires_grad for t in (args.query, args.key, args.value))
            or (args.attn_mask is not None and args.attn_mask.requires_grad)):
        return False
    # Dynamo cannot trace the flag's getter: compiled code takes the default (off).
    return torch.compiler.is_compiling() or not torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed()


def _float_mask(mask: torch.Tensor) -> torch.Tensor:
    """``mask`` in float32, its broadcast (stride-0) dims left broadcast instead of materialised."""
    small = mask
    for d in range(mask.dim()):
        if mask.stride(d) == 0 and mask.shape[d] > 1:
            small = small.narrow(d, 0, 1)
    return small.float().expand(mask.shape)


def _grouped(query: torch.Tensor, key: torch.Tensor) -> bool:
    return query.dim() >= 3 and key.dim() == query.dim() and query.shape[-3] != key.shape[-3]


def _fused_in_torch(query, key, value, attn_mask, dropout_p: float, enable_gqa: bool) -> bool:
    """Whether torch's own attention runs fused here, as its CPU flash kernel's checks decide: 4-D inputs of one
    batch size and head count (or grouped heads with ``enable_gqa``), Dv == D, no empty sequence, unit last-dim
    strides, no dropout; on the CPU also a 2-D or 4-D mask that needs no gradient, flash enabled. There its output
    takes the query's layout and its gradients come (B, L, H, E)-ordered (the op's contract); elsewhere torch
    computes it unfused, with a contiguous output (tests/test_dropin.py holds this against torch's own choice,
    ``torch._fused_sdp_choice``)."""
    if dropout_p > 0 or query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return False
    if not query.shape[0] == key.shape[0] == value.shape[0] or key.shape[1] != value.shape[1]:
        return False
    if query.shape[1] != key.shape[1] and not enable_gqa:
        return False
    if query.shape[3] != value.shape[3] or query.shape[2] == 0 or key.shape[2] == 0:
        return False
    if query.device.type == "cpu":  # CUDA has other fused kernels with other rules, not yet checked on a GPU
        if attn_mask is not None and (not isinstance(attn_mask, torch.Tensor) or attn_mask.dim() not in (2, 4)
                                      or attn_mask.requires_grad):
            return False
        # torch.backends.cuda's flag (and sdpa_kernel) switches CPU flash off too. Dynamo cannot trace the flag's
        # getter: compiled code takes the default (on).
        if not torch.compiler.is_compiling() and not torch.backends.cuda.flash_sdp_enabled():
            return False
    return query.stride(-1) == key.stride(-1) == value.stride(-1) == 1


# Training calls (a gradient to come) go to torch's AMX kernel only above these sizes, Lq * Lk * E, with E >= 64:
# below them seqfast's forward+backward was the faster one (benchmarks/NOTES.md, "bfloat16 training on AMX").
# Causal calls have the higher bar: seqfast computes only the visible half, torch's CPU kernel more of the rest.
AMX_TRAINING_MIN_WORK = 1 << 23
AMX_TRAINING_MIN_WORK_CAUSAL = 1 << 26
AMX_TRAINING_MIN_HEAD_DIM = 64
# Decoding calls, at most this many query rows, stay with seqfast in any grad mode: its row kernels read bfloat16 K
# and V once where they lie, which torch's AMX tiles do not beat (1.08-2.2x torch's time on this path's shapes,
# benchmarks/NOTES.md, "Decoding in bfloat16 against torch's AMX kernel").
AMX_DECODING_MAX_ROWS = 4


def _amx_bf16_attention(query, key, value, attn_mask, dropout_p: float, is_causal: bool, scale, enable_gqa: bool):
    """torch's own attention of the call where _bf16_for_torch sends it there (on CPUs whose AMX tiles torch
    uses), else None: seqfast's kernels are to compute it."""
    if _TORCH_AMX_BF16 and _bf16_for_torch(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa):
        return _TORCH_SDPA(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
    return None


def _bf16_for_torch(query, key, value, attn_mask, dropout_p: float, is_causal: bool, enable_gqa: bool) -> bool:
    """A CPU call in bfloat16 (its inputs', or CPU autocast's of float32 inputs) that torch runs fused, of more than
    ``AMX_DECODING_MAX_ROWS`` query rows, with no gradient to come or, with one, big enough
    (``AMX_TRAINING_MIN_WORK``): on CPUs with AMX torch's own kernel is
    faster there (seqfast/_amx.py), and its numbers, gradients included, are torch's by definition. Only eager
    calls on the ``auto`` backend (``_backend.is_plain_auto``: compiled and torch.func calls keep seqfast's op)."""
    if not (isinstance(query, torch.Tensor) and isinstance(key, torch.Tensor) and isinstance(value, torch.Tensor)):
        return False
    # The dtype first: on an AMX machine every float32 call passes through here.
    if torch.is_autocast_enabled("cpu"):
        eligible = (torch.bfloat16, torch.float32)
        if torch.get_autocast_dtype("cpu") != torch.bfloat16:
            return False
    else:
        eligible = (torch.bfloat16,)
    if not (query.dtype in eligible and key.dtype in eligible and value.dtype in eligible):
        return False
    if query.device.type != "cpu" or not _backend.is_plain_auto():
        return False
    if query.dim() >= 2 and query.shape[-2] <= AMX_DECODING_MAX_ROWS:
        return False
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        if query.dim() != 4 or key.dim() != 4:
            return False  # not fused in torch either
        E = query.shape[-1]
        if E < AMX_TRAINING_MIN_HEAD_DIM:
            return False
        work = query.shape[-2] * key.shape[-2] * E
        if is_causal or _is_causal_bias(attn_mask):
            if work <= AMX_TRAINING_MIN_WORK_CAUSAL:
                return False
        elif work < AMX_TRAINING_MIN_WORK:
            return False
    # A mask that requires grad is not fused on the CPU (_fused_in_torch), so it stays here in any grad mode.
    return _fused_in_torch(query, key, value, attn_mask, dropout_p, enable_gqa)


def _op_gives_fused_gradients(query: torch.Tensor, value: torch.Tensor, attn_mask, dropout_p: float) -> bool:
    """Whether seqfast::attention_backward will give torch's fused gradient layout (its own rule,
    seqfast.reference.attention.fused_gradients, as far as the public arguments show it)."""
    mask_grad = isinstance(attn_mask, torch.Tensor) and attn_mask.requires_grad
    return (not dropout_p and not mask_grad and query.dim() >= 2 and value.dim() >= 2
            and query.shape[-1] == value.shape[-1] and query.shape[-2] > 0 and value.shape[-2] > 0)


def _contiguous_gradient(g: torch.Tensor) -> torch.Tensor:
    return g.contiguous()


def _matmul_key_gradient(g: torch.Tensor) -> torch.Tensor:
    return g.transpose(-1, -2).contiguous().transpose(-1, -2)


def _with_unfused_gradients(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Views of the inputs whose gradients reach them in torch's unfused layouts: dQ and dV contiguous, dK the
    transpose of a contiguous (..., E, Lk) (its matmul's), or contiguous with grouped heads (a sum over the
    group). For the calls torch runs unfused where the op, which sees only the 4-D kernel arguments, gives the
    fused layout (other ranks, 3-D masks, unit-stride-less inputs, flash switched off). Tensor hooks on fresh
    views: they see only this call's gradients, at a few microseconds (an autograd.Function costs ~100).
    Not under torch.compile or torch.func, which keep the op's layout."""
    if torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is not None:
        return query, key, value
    key_hook = _contiguous_gradient if _grouped(query, key) else _matmul_key_gradient
    views = []
    for t, hook in ((query, _contiguous_gradient), (key, key_hook), (value, _contiguous_gradient)):
        if t.requires_grad:
            t = t.view_as(t)
            t.register_hook(hook)
        views.append(t)
    return tuple(views)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention over packed variable-length sequences (no padding).

    Args:
        q: (total_q, Hq, E); k: (total_k, Hk, E); v: (total_k, Hk, Ev); Hq a multiple of Hk.
        cu_seqlens_q, cu_seqlens_k: (B+1,) int32/int64 prefix sums of the sequence lengths,
            starting at 0; sequence b is rows cu[b]:cu[b+1].
        max_seqlen_q, max_seqlen_k: the longest sequence of each (bounds the kernel grid).
        causal: bottom-right aligned per sequence (the last query sees every key), as FlashAttention.
        scale: defaults to 1 / sqrt(E).

    Returns:
        (total_q, Hq, Ev) in q's dtype.
    """
    return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale)[0]


def _varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal: bool, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (total_q, Hq, Ev), lse (Hq, total_q) float32) of the varlen kernels."""
    a = varlen_arguments(q, k, v, cu_q, cu_k, max_q, max_k, scale)
    mode = attention_ops.CAUSAL_BOTTOM_RIGHT if causal else attention_ops.NO_CAUSAL
    return _backend.dispatch(
        None, attention_ops.VARLEN_FORWARD, a.query, a.key, a.value, a.cu_seqlens_q, a.cu_seqlens_k,
        a.max_seqlen_q, a.max_seqlen_k, mode, a.scale,
    )


def varlen_attn(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_q: torch.Tensor,
    cu_seq_k: torch.Tensor | None,
    max_q: int,
    max_k: int,
    *,
    return_aux=None,
    scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    enable_gqa: bool = False,
    seqused_k: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """A drop-in for ``torch.nn.attention.varlen.varlen_attn`` (torch 2.13's signature) on seqfast's varlen
    kernels: CUDA tensors, and CPU tensors, which torch's (flash-only) function refuses.

    Args:
        query: (T_q, Hq, E); key: (T_k, Hk, E); value: (T_k, Hk, Ev); Hk == Hq unless ``enable_gqa``.
        cu_seq_q, cu_seq_k: (N+1,) int32/int64 cumulative sequence positions, from 0.
        max_q, max_k: the longest query / key sequence.
        return_aux: ``torch.nn.attention.varlen.AuxRequest(lse=True)`` also returns the log-sum-exp (T_q, Hq),
            float32 (float64 for float64 inputs; no gradient flows through it).
        window_size: (-1, -1) full attention or (-1, 0) causal, bottom-right aligned per sequence (query i of
            a sequence sees keys j <= i + Lk - Lq), as torch's flash kernels; sliding windows are refused.
        seqused_k, block_table: paged / partly used KV caches, refused. num_splits: accepted and unused.

    Returns:
        (T_q, Hq, Ev) in query's dtype, or (out, lse) with ``return_aux.lse``.
    """
    if cu_seq_k is None or seqused_k is not None or block_table is not None:
        raise ArgumentError("varlen_attn: seqfast takes cu_seq_k and no seqused_k or block_table (no paged or "
                            "partly used KV caches)")
    window = tuple(int(w) for w in window_size)
    if window not in ((-1, -1), (-1, 0)):
        raise ArgumentError(f"varlen_attn: window_size {window} (a sliding window) is not supported; (-1, -1) "
                            "or (-1, 0) (causal)")
    Hq, Hk = query.shape[1], key.shape[1]
    # torch's checks and its ValueError (ArgumentError is one).
    if not enable_gqa and Hq != Hk:
        raise ArgumentError(f"Expect query and key/value to have the same number of heads but got Hq={Hq} and "
                            f"Hkv={Hk}. Try setting enable_gqa=True for GQA.")
    if enable_gqa and (Hk == 0 or Hq % Hk):
        raise ArgumentError(f"Expect number of query heads to be a multiple of kv heads for GQA but got Hq={Hq} "
                            f"and Hkv={Hk}.")
    out, lse = _varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, window == (-1, 0), scale)
    if return_aux is not None and return_aux.lse:
        return out, lse.detach().transpose(0, 1)
    return out


class Hypothesis(NamedTuple):
    """One of :func:`ctc_beam_search`'s n-best labellings."""

    tokens: list[int]
    score: float  # the search's rank: acoustic_score + LM, insertion and hot-word terms (= acoustic_score without)
    frames: list[int] | None  # per token, the frame at which its prefix entered the beam (return_frames)
    acoustic_score: float  # log P_ctc(tokens | log_probs): the sum over the labelling's alignments


def ctc_beam_search(
    log_probs: torch.Tensor,
    input_lengths: IntLengths | None = None,
    beam_size: int = 16,
    blank: int = 0,
    *,
    top_k_tokens: int | None = None,
    token_min_logp: float | None = None,
    beam_prune_logp: float | None = None,
    return_frames: bool = False,
    lm: CharNGramLM | Callable[[tuple[int, ...], int | None], float] | None = None,
    lm_weight: float = 0.5,
    insertion_bonus: float = 0.0,
    hotwords: Sequence[Sequence[int]] | None = None,
    hotword_bonus: float = 2.0,
    lexicon: Sequence[Sequence[int]] | None = None,
    word_delimiter: int | None = None,
    blank_skip_logp: float | None = None,
) -> list[list[Hypothesis]] | list[Hypothesis]:
    """CTC prefix beam search: the n-best labellings of each sample, best first.

    Args:
        log_probs: (T, N, C) or unbatched (T, C) log-probabilities (as for ``ctc_loss``); float16, bfloat16
            (read as float32), float32 or float64, any strides; no NaN or +inf. CUDA input is copied to the
            CPU (one wait for the device): the search is sequential per sample and runs in C++ on the CPU,
            parallel over the batch.
        input_lengths: (N,) lengths in [0, T] as ``ctc_loss`` takes them (0-d / int unbatched); None: T.
        beam_size: prefixes kept per frame (K), and the most hypotheses returned per sample.
        blank: the blank label, in [0, C).
        top_k_tokens, token_min_logp: candidate pruning, off by default: only a frame's ``top_k_tokens`` most
            likely non-blank tokens, and only those with log-prob >= ``token_min_logp``, may extend a prefix
            (blank and repeats of a prefix's last token always count).
        beam_prune_logp: (<= 0) drop prefixes ranked this far below the frame's best; off by default.
        blank_skip_logp: (<= 0) a frame whose blank log-prob is at least this extends no prefix (blank and
            repeats only): fewer candidates on the many blank frames of a trained model; off by default.
        return_frames: fill :attr:`Hypothesis.frames`.
        lm: a :class:`seqfast.CharNGramLM` over the same C tokens, evaluated inside the search;
            ``lm_weight`` (>= 0) scales its log-prob (end of sentence included) and ``insertion_bonus`` is
            added per token. With ``lm_weight=0`` the result does not depend on ``lm``. Or any Python
            ``scorer(prefix, token) -> log-prob`` (``token=None``: end of sentence; it sees the whole prefix, so
            a word-level LM can score a word when its delimiter comes): a slow path, the same search in
            Python (seqfast.reference.ctc_beam_search), one scorer call per distinct (prefix, token).
        hotwords: token sequences (not blank) that earn ``hotword_bonus`` (>= 0) per token while a prefix is
            inside one; a partial match that breaks off loses its bonus, a completed one keeps it.
        lexicon, word_delimiter: a constraint: hypotheses spell only the lexicon's words (token sequences),
            separated by the ``word_delimiter`` token (repeated or leading delimiters allowed); a hypothesis
            ends between words or at a word's end.

    Returns:
        Per sample (batched) a list of up to ``beam_size`` :class:`Hypothesis`, best score first (ties: the
        smaller token sequence); unbatched, the list of the one sample. Without ``lm`` and ``hotwords``,
        ``score`` is log P(tokens): the sum over the labelling's alignments, as ``-ctc_loss`` computes it;
        with ``beam_size`` at least the number of prefixes (and no pruning) the n-best are exact. A zero-length
        sample has one hypothesis, the empty labelling. Results do not depend on the thread count.
    """
    blank = int_like(blank)
    a = ctc_beam_search_arguments(log_probs, input_lengths, beam_size, blank, top_k_tokens, token_min_logp,
                                  beam_prune_logp, lm, lm_weight, insertion_bonus, hotwords, hotword_bonus, lexicon,
                                  word_delimiter, blank_skip_logp)
    if lm is not None and not isinstance(lm, CharNGramLM):
        return _beam_search_with_scorer(a, beam_size, blank, return_frames, lm, lm_weight, insertion_bonus,
                                        hotword_bonus)
    tokens, lengths, scores, acoustic, frames = _backend.dispatch(
        None, beam_ops.SEARCH, a.log_probs, a.input_lengths, blank, beam_size, a.top_k_tokens, a.token_min_logp,
        a.beam_prune_logp, bool(return_frames), a.lm_tables, float(lm_weight), float(insertion_bonus),
        a.hotword_tables, float(hotword_bonus), a.lexicon_tables, a.word_delimiter, a.blank_skip_logp,
    )
    # Cut through numpy views (no copy): a slice and tolist per hypothesis cost far less than tensor indexing.
    tokens_np = tokens.numpy()
    frames_np = frames.numpy() if return_frames else None
    lengths_l, scores_l, acoustic_l = lengths.tolist(), scores.tolist(), acoustic.tolist()
    out = []
    for n, row in enumerate(lengths_l):
        hyps = []
        for k, length in enumerate(row):
            if length < 0:
                break
            hyps.append(Hypothesis(tokens_np[n, k, :length].tolist(), scores_l[n][k],
                                   frames_np[n, k, :length].tolist() if return_frames else None, acoustic_l[n][k]))
        out.append(hyps)
    return out if a.batched else out[0]


def _beam_search_with_scorer(a, beam_size, blank, return_frames, scorer, lm_weight, insertion_bonus, hotword_bonus):
    """:func:`ctc_beam_search` with a Python LM scorer: the reference search, sample by sample."""
    from seqfast.reference.ctc_beam_search import beam_search

    cache: dict[tuple[tuple[int, ...], int | None], float] = {}  # shared by the samples of this call

    def cached(prefix, token):
        key = (prefix, token)
        if key not in cache:
            cache[key] = float(scorer(prefix, token))
        return cache[key]

    out = []
    for n, length in enumerate(a.input_lengths.tolist()):
        hyps = beam_search(a.log_probs[:length, n], beam_size, blank, a.top_k_tokens, a.token_min_logp,
                           a.beam_prune_logp, (), float(lm_weight), float(insertion_bonus), a.hotword_tables,
                           float(hotword_bonus), a.lexicon_tables, a.word_delimiter, cached,
                           a.blank_skip_logp)
        out.append([Hypothesis(list(seq), score, list(frames) if return_frames else None, acoustic)
                    for seq, score, acoustic, frames in hyps])
    return out if a.batched else out[0]
