"""The groups of ``benchmarks/gpu_validate.py``: one-shot GPU validation and timing of seqfast's Triton kernels.

``runtime`` holds what every group shares (records, deadlines, timers, error measures); each other module
holds the groups of one theme; ``groups`` lists them in priority order. Nothing here touches CUDA at import
time: the parent process imports torch and triton once and forks one worker per group, and a CUDA context
must not exist before the fork.
"""
