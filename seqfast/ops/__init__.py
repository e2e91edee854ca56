"""Op definitions: each op's schema, fake (meta) function, autograd formula and kernels.

Importing this package defines ``torch.ops.seqfast.*``. The CPU kernels are registered
by the C++ extension (``csrc/``), the CUDA kernels launch the Triton kernels
(``kernels/``), and ``seqfast.reference`` implements every op for the forced
``reference`` backend.
"""

import torch

from seqfast.ops import attention, ctc_beam_search, ctc_decode, ctc_loss, flop_counts

__all__ = ["CONTRACT", "attention", "ctc_beam_search", "ctc_decode", "ctc_loss"]

# The version of the ops' contract (schemas, and the shapes and strides their fakes give). torch.compile's on-disk
# caches know a custom op by its name only: a graph compiled against an older contract would come back from the
# cache with that contract's output strides, and fail inductor's stride asserts (or read memory wrongly). The
# version joins torch's cache key tag, so a seqfast that changes a contract compiles afresh. Bump it with any
# change to a schema or a fake.
CONTRACT = "seqfast-ops-3"  # 2: attention_forward's output takes the query's layout; 3: the backward's gradient layout


def _tag_compile_caches() -> None:
    config = torch.compiler.config
    if CONTRACT not in config.cache_key_tag.split("+"):
        config.cache_key_tag = f"{config.cache_key_tag}+{CONTRACT}" if config.cache_key_tag else CONTRACT


_tag_compile_caches()
flop_counts.install()
