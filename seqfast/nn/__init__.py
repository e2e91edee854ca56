"""Modules built on seqfast's kernels, with torch.nn's constructors and forward signatures."""

from seqfast.nn.ctc_loss import CTCLoss

__all__ = ["CTCLoss"]
