"""When a call that seqfast would serve should run torch's own code instead: the caller chose torch's math kernel.

``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)`` and the ``torch.backends.cuda.enable_*_sdp`` flags are how a
torch user asks for torch's math attention (its double backward and forward AD, its float32 upcast) or for no
kernel at all (torch's error). Where seqfast stands in for torch without the caller having named it, through
:func:`seqfast.patch_functional` or the modules :func:`seqfast.patch` converted, that choice is honoured: the
call runs torch's own function or ``forward``. Code that calls seqfast by name is served by seqfast whatever the
flags say.
"""

from __future__ import annotations

import torch

# A module that seqfast.patch() converted holds the torch class it had under this instance attribute: unpatch()
# restores it, and its forward defers to it while only torch's math kernel is allowed. On the instance (not in a
# registry) so that copy.deepcopy and pickling (an EMA copy, a checkpoint of the whole model) keep it.
_CONVERTED_FROM = "_seqfast_converted_from"


def mark_converted(module: torch.nn.Module, torch_class: type) -> None:
    module.__dict__[_CONVERTED_FROM] = torch_class


def converted_from(module: torch.nn.Module) -> type | None:
    """The torch class :func:`seqfast.patch` converted ``module`` from, or None."""
    return module.__dict__.get(_CONVERTED_FROM)


def unmark_converted(module: torch.nn.Module) -> type | None:
    return module.__dict__.pop(_CONVERTED_FROM, None)


def only_math_allowed(device_type: str) -> bool:
    """Whether torch's backend flags leave none of its fused attention kernels on ``device_type``, the ones whose
    place seqfast's take. On the CPU torch's only fused kernel is flash, switched by the same flag. Not to be
    called while compiling (dynamo does not trace the flags' getters)."""
    flags = torch.backends.cuda
    if device_type == "cpu":
        return not flags.flash_sdp_enabled()
    return not (flags.flash_sdp_enabled() or flags.mem_efficient_sdp_enabled() or flags.cudnn_sdp_enabled())


def torch_class_chosen(module: torch.nn.Module, x: torch.Tensor) -> type | None:
    """The torch class whose ``forward`` a module converted by :func:`seqfast.patch` should run for input ``x``:
    its original class while torch's flags allow only the math kernel on ``x``'s device, else None (seqfast's
    own ``forward``). Modules built as seqfast's classes are never deferred."""
    if torch.compiler.is_compiling() or not isinstance(x, torch.Tensor):
        return None
    old = converted_from(module)
    if old is None or not only_math_allowed(x.device.type):
        return None
    return old
