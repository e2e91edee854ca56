"""When a call that seqfast would serve should run torch's own code instead: the caller chose torch's math kernel.

``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)`` and the ``torch.backends.cuda.enable_*_sdp`` flags are how a
torch user asks for torch's math attention (its double backward and forward AD, its float32 upcast) or for no
kernel at all (torch's error). Where seqfast stands in for torch without the caller having named it, through
:func:`seqfast.patch_functional` or the modules :func:`seqfast.patch` converted, that choice is honoured: the
call runs torch's own function or ``forward``. Code that calls seqfast by name is served by seqfast whatever the
flags say.
"""

from __future__ import annotations

import weakref

import torch

# Modules that seqfast.patch() converted -> the torch class they had (unpatch() restores it; their forward defers
# to it while only torch's math kernel is allowed).
SWAPPED: weakref.WeakKeyDictionary[torch.nn.Module, type] = weakref.WeakKeyDictionary()


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
    old = SWAPPED.get(module)
    if old is None or not only_math_allowed(x.device.type):
        return None
    return old
