"""seqfast: fused attention and CTC loss kernels for sequence models, drop-in for PyTorch.

Triton kernels run CUDA tensors, C++ kernels run CPU tensors, behind torch's signatures:
:func:`scaled_dot_product_attention`, :func:`ctc_loss`, :mod:`seqfast.nn`.
"""

# Importing ops defines torch.ops.seqfast.*; _extension loads the C++ kernels registered for CPU.
from seqfast import _extension, nn, ops  # noqa: F401
from seqfast._backend import BACKENDS, backend
from seqfast._version import __version__ as __version__
from seqfast.functional import (
    ctc_loss,
    ctc_loss_from_logits,
    scaled_dot_product_attention,
    varlen_attention,
)
from seqfast.validation import ArgumentError

EXTENSION_AVAILABLE = _extension.AVAILABLE

__all__ = [
    "ArgumentError",
    "BACKENDS",
    "EXTENSION_AVAILABLE",
    "backend",
    "ctc_loss",
    "ctc_loss_from_logits",
    "nn",
    "scaled_dot_product_attention",
    "varlen_attention",
]
