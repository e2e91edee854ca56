"""seqfast: fused attention and CTC loss kernels for sequence models, drop-in for PyTorch.

Triton kernels run CUDA tensors, C++ kernels run CPU tensors, behind torch's signatures:
:func:`scaled_dot_product_attention`, :func:`ctc_loss`, :mod:`seqfast.nn`; CTC decoding:
:func:`ctc_greedy_decode`, :func:`ctc_forced_align` (with :func:`ctc_token_spans`). :func:`patch` and
:func:`patch_functional` run an existing model on seqfast; :mod:`seqfast.profile` compares the two.
"""

# Importing ops defines torch.ops.seqfast.*; _extension loads the C++ kernels registered for CPU.
from seqfast import _extension, nn, ops  # noqa: F401
from seqfast._backend import BACKENDS, backend
from seqfast._version import __version__ as __version__
from seqfast.ctc_spans import TokenSpan, ctc_token_spans
from seqfast.functional import (
    Hypothesis,
    ctc_beam_search,
    ctc_forced_align,
    ctc_greedy_decode,
    ctc_loss,
    ctc_loss_from_logits,
    scaled_dot_product_attention,
    varlen_attention,
    varlen_attn,
)
from seqfast.ngram_lm import CharNGramLM
from seqfast.patching import FunctionalReport, PatchReport, patch, patch_functional, unpatch
from seqfast.validation import ArgumentError

EXTENSION_AVAILABLE = _extension.AVAILABLE

__all__ = [
    "ArgumentError",
    "BACKENDS",
    "CharNGramLM",
    "EXTENSION_AVAILABLE",
    "backend",
    "ctc_forced_align",
    "ctc_greedy_decode",
    "ctc_beam_search",
    "ctc_loss",
    "ctc_loss_from_logits",
    "FunctionalReport",
    "Hypothesis",
    "PatchReport",
    "nn",
    "patch",
    "patch_functional",
    "profile",
    "scaled_dot_product_attention",
    "ctc_token_spans",
    "TokenSpan",
    "unpatch",
    "varlen_attention",
    "varlen_attn",
]


def __getattr__(name: str):
    # seqfast.profile pulls in the profiler and matplotlib: imported on first use, not by `import seqfast`.
    if name == "profile":
        import importlib

        return importlib.import_module("seqfast.profile")
    raise AttributeError(f"module 'seqfast' has no attribute {name!r}")
