"""Backend selection: which implementation runs a seqfast op.

``auto`` lets the torch dispatcher route by device (C++ kernels for CPU tensors,
Triton kernels for CUDA tensors). ``triton``, ``cpp`` and ``reference`` force one
implementation whatever the device; they are chosen with the ``SEQFAST_BACKEND``
environment variable (read on every call) or the :func:`backend` context manager,
which wins over the variable.

Forcing works through a ``TorchDispatchMode`` that intercepts seqfast ops below
autograd, so the same autograd formulas run for every backend. The backend chosen
at forward time is saved by each op's autograd context and reused in backward.

The forced backend lives in a ``threading.local`` (per thread, like a context variable) because
``torch.compile`` traces and guards on it, where it cannot trace ``ContextVar.get``. Inside a compiled
function ``SEQFAST_BACKEND`` is read when the function is compiled; a forced non-``auto`` backend runs
outside the graph (a graph break), as the dispatch mode that forces it cannot be traced.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from seqfast import _extension

BACKENDS = ("auto", "triton", "cpp", "reference")

_state = threading.local()  # .forced: the innermost backend() context's name, absent or None outside any
# (op name without namespace, backend) -> implementation with the op's schema.
_IMPLS: dict[tuple[str, str], Callable[..., Any]] = {}
# op name -> (setup_context, backward): the op's autograd formula in torch.library.register_autograd's form,
# run in Python when a backend is forced or a torch.func gradient transform is active (the dispatcher's own
# autograd kernel is C++, csrc/autograd.cpp, which functorch refuses).
_FORMULAS: dict[str, tuple[Callable[..., Any], Callable[..., Any]]] = {}


def _op_name(op: Any) -> str:
    """``seqfast::name`` -> ``name``, the key of _IMPLS and _FORMULAS."""
    return op._schema.name.split("::", 1)[1]


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}: unknown seqfast backend {name!r}; expected one of {BACKENDS}")
    return name


# os.environ's underlying dict, read directly on the hot path: os.environ.get encodes and decodes every call.
_ENVIRON_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey("SEQFAST_BACKEND") if hasattr(os.environ, "encodekey") else None
_AUTO = os.environ.encodevalue("auto") if hasattr(os.environ, "encodevalue") else "auto"
_AUTO_VALUES = (_AUTO, _AUTO[:0])  # "auto" or empty, as current() reads them


def current() -> str:
    """The backend in force: the innermost :func:`backend` context, else ``$SEQFAST_BACKEND``, else ``auto``."""
    forced = getattr(_state, "forced", None)
    if forced is not None:
        return forced
    if _ENVIRON_DATA is not None and not torch.compiler.is_compiling():
        if _ENVIRON_DATA.get(_ENV_KEY, _AUTO) in _AUTO_VALUES:
            return "auto"
    return _check_name(os.environ.get("SEQFAST_BACKEND", "auto").strip().lower() or "auto", "SEQFAST_BACKEND")


def is_plain_auto() -> bool:
    """True when nothing forces a backend (no context, no SEQFAST_BACKEND), no compiler is tracing and no
    torch.func gradient transform is active: the eager common case, where a call may take the extension's direct
    route."""
    return (getattr(_state, "forced", None) is None and _ENVIRON_DATA is not None
            and _ENVIRON_DATA.get(_ENV_KEY, _AUTO) in _AUTO_VALUES and not torch.compiler.is_compiling()
            and torch._C._functorch.peek_interpreter_stack() is None)


_GRAD_TRANSFORMS = (torch._C._functorch.TransformType.Grad, torch._C._functorch.TransformType.Jvp)


def functorch_transforms() -> tuple[bool, bool]:
    """(a torch.func gradient transform (grad, vjp, jacrev, jvp, ...) is active, torch.vmap is active); both False
    outside torch.func, at the cost of one call."""
    if torch._C._functorch.peek_interpreter_stack() is None:
        return False, False
    keys = [i.key() for i in torch._C._functorch.get_interpreter_stack()]
    return any(k in _GRAD_TRANSFORMS for k in keys), torch._C._functorch.TransformType.Vmap in keys


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Force a backend for the seqfast calls made inside the block.

    >>> with seqfast.backend("reference"):
    ...     loss = seqfast.ctc_loss(log_probs, targets, input_lengths, target_lengths)
    """
    outer = getattr(_state, "forced", None)
    _state.forced = _check_name(name, "seqfast.backend")
    try:
        yield
    finally:
        _state.forced = outer


def register(op_name: str, backend_name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: ``fn`` implements ``seqfast::op_name`` when ``backend_name`` is forced."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        _IMPLS[(op_name, _check_name(backend_name, "register"))] = fn
        return fn

    return deco


class _ForceBackend(TorchDispatchMode):
    def __init__(self, name: str):
        super().__init__()
        self.name = name
        # Dispatch-key state of the caller: implementations run under it, so that the reference
        # backend may use autograd although the op itself was reached below the autograd key.
        self._keys = (torch._C._dispatch_tls_local_include_set(), torch._C._dispatch_tls_local_exclude_set())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace != "seqfast":
            return func(*args, **kwargs)
        op_name = _op_name(func)
        if self.name == "cpp":
            devices = {a.device.type for a in args if isinstance(a, torch.Tensor)}
            if devices - {"cpu"}:
                raise RuntimeError(f"seqfast backend 'cpp' runs CPU tensors only; got {sorted(devices)}")
            return func(*args, **kwargs)  # the dispatcher's CPU kernel is the C++ one
        impl = _IMPLS.get((op_name, self.name))
        if impl is None:
            raise RuntimeError(f"seqfast::{op_name} has no {self.name!r} implementation")
        with torch._C._ForceDispatchKeyGuard(*self._keys):
            return impl(*args, **kwargs)


# op -> the same op with its autograd, callable straight from Python (csrc/autograd.cpp): the eager calls'
# route, which skips the boxed torch.ops call. Compiled code keeps the op, which Dynamo traces.
_EAGER: dict[Callable[..., Any], Callable[..., Any]] = {}


def register_eager(op: Callable[..., Any], fn: Callable[..., Any]) -> None:
    _EAGER[op] = fn


def refuse_forward_ad(op: Callable[..., Any], args: tuple) -> None:
    """A forward-mode AD dual among ``args`` refused, as torch refuses it for its fused kernels. The extension's
    autograd kernels check this themselves (csrc/autograd.cpp); without the extension (CUDA with a torch other
    than the build's) the ops' autograd is torch.library's, which would give a dual input that needs no gradient
    an output without a tangent."""
    if torch.autograd.forward_ad._current_level < 0:
        return
    for a in args:
        if isinstance(a, torch.Tensor) and torch.autograd.forward_ad.unpack_dual(a).tangent is not None:
            raise NotImplementedError(f"Trying to use forward AD with {op} that does not support it (torch's fused "
                                      "kernels have no forward-mode AD either); use reverse mode (backward, "
                                      "torch.autograd.grad, torch.func.vjp / jacrev)")


def dispatch(name: str | None, op: Callable[..., Any], *args: Any) -> Any:
    """Call ``op`` under backend ``name`` (``None`` means :func:`current`)."""
    name = current() if name is None else name
    if not _extension.AVAILABLE:
        refuse_forward_ad(op, args)
    if name == "auto":
        if torch.compiler.is_compiling():
            return op(*args)
        grad_transform, vmapped = functorch_transforms()
        if grad_transform:
            return _functorch_call(op, *args)
        if vmapped:
            # The dispatcher: its vmap layer folds the batch before autograd, so autograd records the kernels' call
            # on the unbatched tensors. The direct C++ entry would run the batching rule below its own autograd
            # node, and a gradient through vmap (torch.autograd.grad outside it) would be lost.
            return op(*args)
        eager = _EAGER.get(op)
        return eager(*args) if eager is not None else op(*args)
    return _dispatch_forced(name, op, *args)


class _FunctorchAutograd(torch.autograd.Function):
    """An op under a torch.func gradient transform (grad, vjp, jacrev, ...), with its Python autograd formula.

    The dispatcher's autograd kernels are C++ functions (csrc/autograd.cpp), which functorch refuses ("cannot use
    C++ torch::autograd::Function with functorch transforms"). This runs the op below autograd on the device's
    kernel, with the same formula; vmap over it runs the formula under vmap (generate_vmap_rule), the op itself by
    its batching rule (the attention ops, seqfast/ops/attention.py). Forward-mode AD (jvp, jacfwd) has no formula:
    torch's error says so."""

    generate_vmap_rule = True

    @staticmethod
    def forward(op, *args):
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        op, *args = inputs
        ctx.formula = _FORMULAS[_op_name(op)]
        ctx.formula[0](ctx, tuple(args), output)

    @staticmethod
    def backward(ctx, *grads):
        return (None, *ctx.formula[1](ctx, *grads))


def _functorch_call(op: Callable[..., Any], *args: Any) -> Any:
    if _op_name(op) not in _FORMULAS:  # no gradient (the decoders)
        return op(*args)
    return _FunctorchAutograd.apply(op, *args)


def register_autograd(op_name: str, setup_context: Callable[..., Any], backward: Callable[..., Any]) -> None:
    """The autograd formula of ``seqfast::op_name`` for forced backends and torch.func (see :data:`_FORMULAS`)."""
    _FORMULAS[op_name] = (setup_context, backward)


class _ForcedAutograd(torch.autograd.Function):
    """Runs an op under a forced backend with its Python autograd formula, so that the backward runs on the
    backend the forward ran on even after the ``backend()`` block has closed."""

    # forward and setup_context apart: the form torch.func's gradient transforms accept.
    @staticmethod
    def forward(name, op, *args):
        with _ForceBackend(name):
            return op(*args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        name, op, *args = inputs
        ctx.formula = _FORMULAS[_op_name(op)]
        ctx.formula[0](ctx, tuple(args), output)
        ctx.backend = name

    @staticmethod
    def backward(ctx, *grads):
        return (None, None, *ctx.formula[1](ctx, *grads))


# torch's lazy form of torch._dynamo.disable: importing torch._dynamo takes about 2 s, paid here on the first
# forced call instead of by every ``import seqfast``.
@torch._compile._disable_dynamo
def _dispatch_forced(name: str, op: Callable[..., Any], *args: Any) -> Any:
    if name in ("reference", "triton") and torch._C._functorch.peek_interpreter_stack() is not None:
        # These run inside a dispatch mode under the caller's dispatch keys (_ForceBackend), which functorch's
        # layers cannot nest: torch fails an internal assert. The default backend reaches the same Triton kernels
        # for CUDA tensors through the dispatcher, and "cpp" calls its kernels directly.
        raise RuntimeError(f"seqfast.backend({name!r}) does not run under torch.func transforms; use "
                           "torch.autograd.grad with it, or the default or 'cpp' backend under torch.func")
    needs_grad = torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
    if needs_grad and _op_name(op) in _FORMULAS:
        return _ForcedAutograd.apply(name, op, *args)
    with _ForceBackend(name):
        return op(*args)
