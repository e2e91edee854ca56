"""Op definitions: each op's schema, fake (meta) function, autograd formula and kernels.

Importing this package defines ``torch.ops.seqfast.*``. The CPU kernels are registered
by the C++ extension (``csrc/``), the CUDA kernels launch the Triton kernels
(``kernels/``), and ``seqfast.reference`` implements every op for the forced
``reference`` backend.
"""

from seqfast.ops import attention, ctc_beam_search, ctc_decode, ctc_loss

__all__ = ["attention", "ctc_beam_search", "ctc_decode", "ctc_loss"]
