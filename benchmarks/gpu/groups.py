"""The validation groups in priority order, with each one's share of the time budget.

``share`` (``dry_share`` in a dry run): the most of the whole budget the group may take (the parent also keeps
a few seconds back for every later group, so a slow group cannot starve the rest); ``shards``: workers run at
once on the GPU, each taking every n-th case (for compile-bound correctness groups: Triton compiles in each
process in parallel).
Imports here are stdlib only: the parent reads this table before deciding how to start workers.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Group:
    name: str
    target: str  # "module:function" under the gpu package
    share: float
    shards: int = 1
    dry_share: float = 0.0  # the share in a dry run (interpreter costs differ: opcheck is relatively slow)

    def function(self) -> Callable:
        module, fn = self.target.split(":")
        return getattr(importlib.import_module(f"gpu.{module}"), fn)


GROUPS = (
    Group("facts", "facts:facts", 0.06, dry_share=0.06),
    Group("attention_correctness", "attention_checks:attention_correctness", 0.26, shards=3, dry_share=0.2),
    Group("ctc_correctness", "ctc_checks:ctc_correctness", 0.10, shards=2, dry_share=0.10),
    Group("ctc_decoding", "ctc_decode_checks:ctc_decoding", 0.04, dry_share=0.05),
    Group("opcheck", "opchecks:opcheck", 0.07, dry_share=0.15),
    Group("determinism", "attention_checks:determinism", 0.08, dry_share=0.07),
    Group("big_tensor", "attention_checks:big_tensor", 0.07, dry_share=0.03),
    Group("attention_timing", "timing:attention_timing", 0.18, dry_share=0.10),
    Group("ctc_timing", "timing:ctc_timing", 0.05, dry_share=0.10),
    Group("profile_split", "timing:profile_split", 0.05, dry_share=0.06),
    Group("registers", "registers:registers", 0.03, dry_share=0.03),
    Group("sweep", "sweep:sweep", 1.0, dry_share=1.0),
)
BY_NAME = {g.name: g for g in GROUPS}
