"""Expected time of the Triton CTC kernels on an H200: a prediction for the first GPU run to check.

No GPU has run these kernels yet; every figure printed here is a model, not a measurement. The model:

- Fully parallel launches (row normalisers, gradient fill, log_alpha's -inf fill) are bandwidth-bound:
  HBM bytes / (datasheet 4.8 TB/s x ``EFFICIENCY``).
- The two recursions are latency-bound while their bytes fit the bandwidth: time steps x state-tile passes
  per step x a per-pass latency (``STEP_US``), one program per sample, all samples' programs resident at
  once (at most N = 256 programs of <= 16 warps here, 132 SMs of 64 warps: 1-2 programs per SM).
- Each launch also pays ``LAUNCH_US``.

Bytes per recursion step and sample: the 32-byte sectors the blank and label gather touches in the row of C
classes (at most S + 1, at most the row), plus the alpha row (forward, written) or the alpha row read and the
blank / label gradient sectors written (backward). Beta and the posteriors stay in L2.

Usage: ``python benchmarks/ctc_gpu_model.py`` (markdown table on stdout).
"""

from __future__ import annotations

import math

HBM_BYTES_PER_US = 4.8e6  # H200 datasheet: HBM3e 4.8 TB/s
EFFICIENCY = 0.8  # share of the datasheet bandwidth a streaming kernel reaches (assumed)
SMS = 132  # H200 datasheet
# Assumed latency of one state-tile pass of a time step. Forward: the L2 read of the previous alpha row, the
# log-add-exp, a store and a CTA barrier, plus (several tiles) the HBM gather of the step's log-probs, which a
# single tile prefetches one step ahead. Backward: the same with the beta row, then the posteriors' round trip
# through L2, the label entries and a second barrier.
STEP_US = {("forward", True): 0.6, ("forward", False): 0.8, ("backward", True): 1.2, ("backward", False): 1.6}
LAUNCH_US = 4.0
WIDEST_TILE = {"forward": 4096, "backward": 2048}  # kernels/ctc_loss.py's widest float32 state tiles
SHAPES = [(500, 16, 32, 100), (1000, 32, 1000, 200), (200, 64, 5000, 50), (4000, 8, 64, 1200)]
E = 4  # float32 bytes


def _passes(kernel: str, W: int) -> int:
    return math.ceil(W / WIDEST_TILE[kernel])


def _serial_us(kernel: str, T: int, W: int) -> float:
    passes = _passes(kernel, W)
    return T * passes * STEP_US[(kernel, passes == 1)]


def model(T: int, N: int, C: int, S: int, from_logits: bool) -> dict[str, float]:
    """Predicted µs of forward and backward (fp32, full input and target lengths) and their parts."""
    W = 2 * S + 1
    bw = HBM_BYTES_PER_US * EFFICIENCY
    gather = min(S + 1, math.ceil(C * E / 32)) * 32
    parallel_fwd = N * T * W * E + (T * N * C * E if from_logits else 0)  # -inf fill of log_alpha, lse pass
    serial_fwd_bytes = T * N * (gather + W * E)
    fwd_serial = max(_serial_us("forward", T, W), serial_fwd_bytes / bw)
    fwd = parallel_fwd / bw + fwd_serial + LAUNCH_US * (3 if from_logits else 2)
    # Gradient fill: read and write every entry (from logits the row is read twice, the second from L2).
    parallel_bwd = 2 * T * N * C * E
    serial_bwd_bytes = T * N * (gather + W * E + (S + 1) * 32)
    bwd_serial = max(_serial_us("backward", T, W), serial_bwd_bytes / bw)
    bwd = parallel_bwd / bw + bwd_serial + 2 * LAUNCH_US
    return {
        "fwd_us": fwd, "bwd_us": bwd, "fwd_serial_us": fwd_serial, "bwd_serial_us": bwd_serial,
        "parallel_mb": (parallel_fwd + parallel_bwd) / 1e6, "serial_mb": (serial_fwd_bytes + serial_bwd_bytes) / 1e6,
        "us_per_step": (fwd_serial + bwd_serial) / T,
        "passes": f"{_passes('forward', W)} + {_passes('backward', W)}",
    }


def main() -> None:
    print("| shape (T, N, C, S) | from logits | serial steps x tile passes (fwd + bwd) | parallel MB | serial MB | "
          "fwd µs | fwd+bwd µs | µs per time step (both sweeps) |")
    print("|---|---|---|---|---|---|---|---|")
    for T, N, C, S in SHAPES + [(T, 256, C, S) for T, _, C, S in SHAPES]:
        for from_logits in (False, True):
            m = model(T, N, C, S, from_logits)
            print(f"| ({T}, {N}, {C}, {S}) | {'yes' if from_logits else 'no'} | {T} x {m['passes']} | "
                  f"{m['parallel_mb']:.1f} | {m['serial_mb']:.1f} | {m['fwd_us']:.0f} | "
                  f"{m['fwd_us'] + m['bwd_us']:.0f} | {m['us_per_step']:.2f} |")


if __name__ == "__main__":
    main()
