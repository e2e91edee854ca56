"""Run an existing model on seqfast without editing its code: swap its modules, route torch's functions.

Two tools, both reversible:

- :func:`patch` / :func:`unpatch` change the class of every ``torch.nn.MultiheadAttention``,
  ``torch.nn.TransformerEncoderLayer``, ``torch.nn.TransformerDecoderLayer`` and ``torch.nn.CTCLoss`` of a
  model to seqfast's subclass (and back). Parameters, buffers, hooks, ``training`` and ``state_dict`` are
  untouched: the objects stay the same, only their ``forward`` changes.
- :func:`patch_functional` replaces ``torch.nn.functional.scaled_dot_product_attention`` and
  ``torch.nn.functional.ctc_loss`` for code that calls them directly (Hugging Face ``sdpa`` attention,
  ``torch.nn.MultiheadAttention``'s own path, CTC heads). Each call is served by seqfast when seqfast has a
  kernel for its arguments, and otherwise falls through to torch's own function; every fall-through is
  counted with its reason.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import handle_torch_function, has_torch_function

from seqfast import _backend, _extension
from seqfast import nn as seqfast_nn
from seqfast._torch_math import mark_converted, unmark_converted
from seqfast._torch_math import only_math_allowed as _only_torch_math_allowed
from seqfast.functional import JaggedTensor, _any_nested
from seqfast.functional import ctc_loss as _seqfast_ctc_loss
from seqfast.functional import scaled_dot_product_attention as _seqfast_sdpa
from seqfast.validation import FLOAT_DTYPES, ArgumentError

# torch's own functions, captured once: fall-throughs call these, never the (possibly patched) attributes.
TORCH_SDPA = F.scaled_dot_product_attention
TORCH_CTC_LOSS = F.ctc_loss

# ----------------------------------------------------------------------------------------------------------
# Modules

# Exact torch class -> seqfast subclass. Subclasses of torch's classes are not converted: their own forward
# would be dropped silently.
_MODULE_SWAPS: dict[type, type] = {
    torch.nn.MultiheadAttention: seqfast_nn.MultiheadAttention,
    torch.nn.TransformerEncoderLayer: seqfast_nn.TransformerEncoderLayer,
    torch.nn.TransformerDecoderLayer: seqfast_nn.TransformerDecoderLayer,
    torch.nn.CTCLoss: seqfast_nn.CTCLoss,
}
_SEQFAST_CLASSES = frozenset(_MODULE_SWAPS.values())


@dataclass(frozen=True)
class Swap:
    """One module whose class changed: ``name`` as in ``model.named_modules()`` (``""`` is the model)."""

    name: str
    before: str
    after: str


@dataclass(frozen=True)
class Skip:
    """One module left as it was, and why."""

    name: str
    cls: str
    reason: str


@dataclass
class PatchReport:
    """What :func:`patch` or :func:`unpatch` did to a model.

    ``swapped``: modules whose class changed; ``skipped``: modules seqfast has a counterpart for but did not
    convert, with the reason; ``notes``: hints about attention the module swap cannot reach (e.g. a model
    that calls ``F.scaled_dot_product_attention`` itself, for which :func:`patch_functional` is the tool).
    """

    swapped: list[Swap] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Swapped modules per seqfast class name."""
        return dict(Counter(s.after for s in self.swapped))

    def __str__(self) -> str:
        lines = [f"swapped {len(self.swapped)} module(s)" + (":" if self.swapped else "")]
        lines += [f"  {s.name or '<model>'}: {s.before} -> {s.after}" for s in self.swapped]
        if self.skipped:
            lines.append(f"left {len(self.skipped)} module(s) as they were:")
            lines += [f"  {s.name or '<model>'} ({s.cls}): {s.reason}" for s in self.skipped]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _device_without_kernel(module: torch.nn.Module) -> str | None:
    """The device of ``module``'s tensors when seqfast has no kernel there (else None)."""
    for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
        kind = t.device.type
        if kind == "cuda" or (kind == "cpu" and _extension.AVAILABLE):
            continue
        if kind == "cpu":
            return f"cpu (the C++ extension did not load: {_extension.LOAD_ERROR})"
        return kind
    return None


def _attention_notes(model: torch.nn.Module) -> list[str]:
    """Hints for models whose attention is not a torch module (Hugging Face models configure it)."""
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if impl == "sdpa":
        return ["the model calls torch.nn.functional.scaled_dot_product_attention itself "
                "(attn_implementation='sdpa'): seqfast.patch_functional() routes those calls"]
    if impl is not None:
        return [f"the model's attention is attn_implementation={impl!r}, which seqfast does not reach; "
                "load it with attn_implementation='sdpa' and use seqfast.patch_functional()"]
    return []


def patch(model: torch.nn.Module) -> PatchReport:
    """Run ``model``'s torch attention, Transformer layers and CTC loss modules on seqfast, in place.

    Every submodule (``model`` included) of exactly ``torch.nn.MultiheadAttention``,
    ``torch.nn.TransformerEncoderLayer``, ``torch.nn.TransformerDecoderLayer`` or ``torch.nn.CTCLoss``
    becomes the seqfast subclass of the same name. Only the class changes (and an attribute records the torch
    class, so that copies and pickles of the model can be unpatched too): parameters and buffers (the
    same tensor objects, so an optimizer built before keeps working), hooks, ``training`` and
    ``state_dict`` stay as they were. Left alone, and listed in the report's ``skipped``: subclasses of
    those classes (their ``forward`` may differ), and modules whose tensors are on a device seqfast has no
    kernel for.

    While torch's flags allow only its math attention kernel (``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)``,
    ``torch.backends.cuda.enable_*_sdp(False)``), the converted attention modules and encoder layers run torch's
    own ``forward``: the caller asked for torch's math kernel (its double backward, its bits), as
    :func:`patch_functional` honours it too.

    Returns a :class:`PatchReport`; :func:`unpatch` undoes exactly the swaps it lists.
    """
    report = PatchReport()
    for name, module in model.named_modules():
        cls = type(module)
        new = _MODULE_SWAPS.get(cls)
        if new is None:
            if cls in _SEQFAST_CLASSES:
                continue  # already seqfast's
            base = next((old for old in _MODULE_SWAPS if isinstance(module, old)), None)
            if base is not None:
                report.skipped.append(Skip(name, _qualname(cls), f"a subclass of {_qualname(base)}: its own "
                                           "forward may differ, so it is not converted"))
            continue
        device = _device_without_kernel(module)
        if device is not None:
            report.skipped.append(Skip(name, _qualname(cls), f"its tensors are on {device}, where seqfast has "
                                       "no kernel"))
            continue
        module.__class__ = new
        mark_converted(module, cls)
        report.swapped.append(Swap(name, _qualname(cls), _qualname(new)))
    report.notes.extend(_attention_notes(model))
    return report


def unpatch(model: torch.nn.Module) -> PatchReport:
    """Undo :func:`patch` on ``model`` in place: each module it swapped gets its torch class back.

    Modules built as seqfast's classes directly are left alone (``seqfast.nn.restore_attention`` converts
    those). Returns a :class:`PatchReport` listing the modules reverted.
    """
    report = PatchReport()
    for name, module in model.named_modules():
        old = unmark_converted(module)
        if old is None:
            continue
        before = type(module)
        module.__class__ = old
        report.swapped.append(Swap(name, _qualname(before), _qualname(old)))
    return report


# ----------------------------------------------------------------------------------------------------------
# Functions


@dataclass
class FunctionalReport:
    """Calls seen by one :func:`patch_functional` while it was active.

    ``served[name]``: calls of ``name`` (``"scaled_dot_product_attention"`` or ``"ctc_loss"``) computed by
    seqfast; ``fell_through[(name, reason)]``: calls handed to torch's own function, by reason. Calls that
    torch itself rejected (its error was raised) count as fall-throughs with reason
    ``"invalid arguments (torch's error raised)"``. Calls traced by ``torch.compile`` are not counted.
    """

    served: Counter = field(default_factory=Counter)
    fell_through: Counter = field(default_factory=Counter)

    @property
    def total_fell_through(self) -> int:
        return sum(self.fell_through.values())

    def __str__(self) -> str:
        names = sorted({*self.served, *(n for n, _ in self.fell_through)})
        if not names:
            return "no patched calls"
        lines = []
        for n in names:
            fell = {r: c for (m, r), c in self.fell_through.items() if m == n}
            lines.append(f"{n}: {self.served[n]} served by seqfast, {sum(fell.values())} fell through to torch")
            lines += [f"  {c} x {r}" for r, c in sorted(fell.items(), key=lambda kv: -kv[1])]
        return "\n".join(lines)


_REJECTED = "invalid arguments (torch's error raised)"
_lock = threading.Lock()
_active: list[FunctionalReport] = []  # the reports of every open patch, each counts every call
_installed: dict[str, tuple[Any, int]] = {}  # attribute -> (what was there before, active patches of it)


def _count(name: str, reason: str | None) -> None:
    if torch.compiler.is_compiling():
        return
    with _lock:
        for report in _active:
            if reason is None:
                report.served[name] += 1
            else:
                report.fell_through[(name, reason)] += 1


def _no_kernel_reason(t: Any, dtypes: tuple[torch.dtype, ...]) -> str | None:
    """Why seqfast cannot serve a call whose main tensor is ``t`` (None when it can)."""
    if not isinstance(t, torch.Tensor):
        return f"not a tensor ({type(t).__name__})"
    if type(t) not in (torch.Tensor, torch.nn.Parameter) and not torch.compiler.is_compiling():
        return f"tensor subclass {type(t).__name__}"
    if t.is_nested:
        return "nested tensor"
    kind = t.device.type
    if kind not in ("cpu", "cuda"):
        return f"device {kind}"
    if kind == "cpu" and not _extension.AVAILABLE and _backend.current() in ("auto", "cpp"):
        return "cpu without the C++ extension"
    if t.dtype not in dtypes:
        return f"dtype {t.dtype}"
    return None


_SDPA = "scaled_dot_product_attention"
_CTC = "ctc_loss"
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _attention_dtypes(t: Any) -> tuple[torch.dtype, ...]:
    """The dtypes seqfast's attention kernels take on ``t``'s device: the Triton ones have no float64."""
    on_cpu = isinstance(t, torch.Tensor) and t.device.type == "cpu"
    return FLOAT_DTYPES if on_cpu else (torch.float16, torch.bfloat16, torch.float32)


def _sdpa_reason(query, key, value, attn_mask) -> str | None:
    """Why seqfast cannot serve this attention call (None when it can)."""
    reason = _no_kernel_reason(query, _attention_dtypes(query))
    # Compiled: dynamo cannot trace the flags' getters, and seqfast's op serves the graph.
    if reason is not None or torch.compiler.is_compiling():
        return reason
    if _only_torch_math_allowed(query.device.type):
        return "torch's fused kernels are switched off (sdpa_kernel / torch.backends.cuda flags)"
    for name, t in (("key", key), ("value", value)):
        if isinstance(t, torch.Tensor) and (type(t) not in _PLAIN or t.is_nested):
            return f"{name} is a {type(t).__name__}"
    if isinstance(attn_mask, torch.Tensor) and type(attn_mask) not in _PLAIN:
        return f"attn_mask is a {type(attn_mask).__name__}"
    return None


def _nested_sdpa_reason(query, key, value) -> str | None:
    """Why seqfast cannot serve an attention call with nested tensors (None when it may: its checks then say)."""
    if not all(isinstance(t, JaggedTensor) for t in (query, key, value)):
        return "nested tensors not all jagged"
    values = query.values()
    return _no_kernel_reason(values, _attention_dtypes(values)) if not torch.compiler.is_compiling() else \
        "nested, compiled"


def _patched_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None,
                  enable_gqa=False):
    # Tensor subclasses first get their __torch_function__, as torch's own functions give it: theirs sees this
    # function as F.scaled_dot_product_attention (torch's CausalBias turns itself into plain calls there). One
    # that defers comes back here with its override disabled, and goes to torch's function below.
    # Jagged nested tensors know torch's own function only (their __torch_function__ routes it): seqfast's
    # function takes them itself, and what it refuses goes to torch's function, which they then route.
    nested = _any_nested(query, key, value)
    if not nested and has_torch_function((query, key, value, attn_mask)):
        return handle_torch_function(_patched_sdpa, (query, key, value, attn_mask), query, key, value,
                                     attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                                     enable_gqa=enable_gqa)
    reason = _nested_sdpa_reason(query, key, value) if nested else _sdpa_reason(query, key, value, attn_mask)
    if reason is None:
        try:
            out = _seqfast_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
        except ArgumentError as exc:
            reason = f"seqfast refused: {exc}"
        else:
            _count(_SDPA, None)
            return out
    try:
        out = TORCH_SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                         scale=scale, enable_gqa=enable_gqa)
    except Exception:
        _count(_SDPA, _REJECTED)
        raise
    _count(_SDPA, reason)
    return out


def _patched_ctc_loss(log_probs, targets, input_lengths, target_lengths, blank=0, reduction="mean",
                      zero_infinity=False):
    if has_torch_function((log_probs, targets, input_lengths, target_lengths)):  # as torch's ctc_loss does
        return handle_torch_function(_patched_ctc_loss, (log_probs, targets, input_lengths, target_lengths),
                                     log_probs, targets, input_lengths, target_lengths, blank=blank,
                                     reduction=reduction, zero_infinity=zero_infinity)
    # float16/bfloat16 go to torch: seqfast would compute them, torch refuses them (outside autocast, where
    # torch's own casting applies), and a patched program must behave as the unpatched one.
    reason = _no_kernel_reason(log_probs, (torch.float32, torch.float64))
    if reason is None:
        try:
            out = _seqfast_ctc_loss(log_probs, targets, input_lengths, target_lengths, blank, reduction,
                                    zero_infinity)
        except ArgumentError as exc:
            reason = f"seqfast refused: {exc}"
        else:
            _count(_CTC, None)
            return out
    try:
        out = TORCH_CTC_LOSS(log_probs, targets, input_lengths, target_lengths, blank, reduction, zero_infinity)
    except Exception:
        _count(_CTC, _REJECTED)
        raise
    _count(_CTC, reason)
    return out


_patched_sdpa.__doc__ = f"seqfast's routing of torch.nn.functional.{_SDPA} (see seqfast.patch_functional)."
_patched_ctc_loss.__doc__ = f"seqfast's routing of torch.nn.functional.{_CTC} (see seqfast.patch_functional)."
_REPLACEMENTS = {_SDPA: _patched_sdpa, _CTC: _patched_ctc_loss}


class FunctionalPatch:
    """An active :func:`patch_functional`: a context manager, or undone with :meth:`undo`.

    ``report`` (a :class:`FunctionalReport`) counts the calls made while it is active.
    """

    def __init__(self, names: tuple[str, ...]):
        self.names = names
        self.report = FunctionalReport()
        self.active = False

    def _install(self) -> None:
        with _lock:
            for name in self.names:
                if name not in _installed:  # the first active patch of this function installs it
                    _installed[name] = (getattr(F, name), 0)
                    setattr(F, name, _REPLACEMENTS[name])
                before, depth = _installed[name]
                _installed[name] = (before, depth + 1)
            _active.append(self.report)
            self.active = True

    def undo(self) -> None:
        """Stop routing (idempotent). torch's functions come back when the last active patch is undone."""
        with _lock:
            if not self.active:
                return
            self.active = False
            _active.remove(self.report)
            for name in self.names:
                before, depth = _installed[name]
                if depth == 1:
                    setattr(F, name, before)
                    del _installed[name]
                else:
                    _installed[name] = (before, depth - 1)

    def __enter__(self) -> FunctionalReport:
        return self.report

    def __exit__(self, *exc: object) -> None:
        self.undo()


def patch_functional(sdpa: bool = True, ctc_loss: bool = True) -> FunctionalPatch:
    """Route ``torch.nn.functional.scaled_dot_product_attention`` and ``torch.nn.functional.ctc_loss`` to
    seqfast, from this call until it is undone.

    >>> with seqfast.patch_functional() as report:   # context manager: undone on exit
    ...     loss = model(**batch).loss
    >>> print(report)                                 # calls served, and fall-throughs by reason
    >>> p = seqfast.patch_functional()                # global form: until p.undo()

    Each call is served by seqfast when it has a kernel for the arguments: CPU (with the C++ extension) or
    CUDA tensors, a floating dtype (float64 attention on CPU only; CTC float32 / float64, as torch), every
    mask, causal, scale, broadcast and ``enable_gqa`` form torch accepts. Otherwise the call goes to torch's
    own function, unchanged, and is counted in the report with its reason: another device, a tensor
    subclass (after its own ``__torch_function__``, which sees this function as torch's: ``CausalBias`` masks
    become plain calls that seqfast serves) or nested tensor, float16 / bfloat16 CTC, or arguments seqfast
    refuses (then torch's function decides: it computes what it accepts, and raises its own error for what
    it refuses). Attention dropout is served, drawing its keep-mask from seqfast's generator (seeded from
    torch's): the same distribution as torch's dropout, not the same mask.

    The functions are module attributes: code that looks them up at call time (``F.scaled_dot_product_attention``,
    ``torch.nn.functional.ctc_loss``, Hugging Face models, ``torch.nn.MultiheadAttention``'s non-fast
    path, ``torch.nn.CTCLoss``) is routed; a reference taken before (``from torch.nn.functional import
    ctc_loss``) is not. The patch is process-wide, for every thread, as the attributes are. Patches nest:
    torch's functions come back when the last one is undone, in any order; each report counts the calls made
    while it was active, from every thread. Under ``torch.compile`` the routing is traced like the rest of
    the function (calls there are not counted).
    """
    names = tuple(n for n, on in ((_SDPA, sdpa), (_CTC, ctc_loss)) if on)
    handle = FunctionalPatch(names)
    handle._install()
    return handle


def is_functional_patched() -> bool:
    """Whether a :func:`patch_functional` is active now."""
    return any(getattr(F, n) is fn for n, fn in _REPLACEMENTS.items())
