"""seqfast's Triton kernels, one file per op (installed as ``seqfast.kernels``).

Each module exposes plain-Python launchers with the schema of the seqfast ops they implement
(``seqfast/ops/``); they run CUDA tensors natively and CPU tensors under ``TRITON_INTERPRET=1``.
"""
