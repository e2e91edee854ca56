"""Plain-PyTorch float64 implementations of every seqfast op: slow, short, obviously right.

They are the yardstick of the tests and the ``reference`` backend.
"""

from seqfast.reference import attention, ctc_beam_search, ctc_decode, ctc_loss

__all__ = ["attention", "ctc_beam_search", "ctc_decode", "ctc_loss"]
