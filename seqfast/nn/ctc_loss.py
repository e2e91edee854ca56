"""``seqfast.nn.CTCLoss``: ``torch.nn.CTCLoss`` computed by seqfast's kernels."""

from __future__ import annotations

import torch

from seqfast.functional import ctc_loss
from seqfast.nn._scripting import NotScriptable
from seqfast.validation import IntLengths, reduction_argument


class CTCLoss(NotScriptable, torch.nn.CTCLoss):
    """:class:`torch.nn.CTCLoss` (a subclass: same constructor, attributes and ``isinstance``) whose forward
    is :func:`seqfast.ctc_loss`."""

    def __init__(self, blank: int = 0, reduction: str = "mean", zero_infinity: bool = False):
        super().__init__(blank, reduction_argument(reduction), zero_infinity)

    def forward(
        self,
        log_probs: torch.Tensor,
        targets: torch.Tensor,
        input_lengths: IntLengths,
        target_lengths: IntLengths,
    ) -> torch.Tensor:
        return ctc_loss(log_probs, targets, input_lengths, target_lengths, self.blank, self.reduction,
                        self.zero_infinity)

    def extra_repr(self) -> str:
        return f"blank={self.blank}, reduction={self.reduction!r}, zero_infinity={self.zero_infinity}"
