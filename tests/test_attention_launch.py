"""How the Triton attention launchers launch (kernels/attention.py): the device made current, the TF32 setting
read, grids within CUDA's limits, the dropout seed read on the device, and the split-KV decode forward.

Through Triton's interpreter on CPU tensors where there is no GPU; what only a GPU shows (the current device,
the seed's device) is checked by recording what the launchers do.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from seqfast import _triton

pytestmark = [pytest.mark.interpreter, pytest.mark.usefixtures("on_kernel_device")]


@pytest.fixture
def kernels(on_kernel_device):
    return _triton.kernels("attention", torch.zeros(1, device=on_kernel_device))


def qkv(B, Hq, Hk, Lq, Lk, D, Dv=None):
    return torch.randn(B, Hq, Lq, D), torch.randn(B, Hk, Lk, D), torch.randn(B, Hk, Lk, Dv or D)


def packed(lengths_q, lengths_k, Hq, Hk, D):
    cu_q = torch.tensor([0, *torch.tensor(lengths_q).cumsum(0).tolist()], dtype=torch.int64)
    cu_k = torch.tensor([0, *torch.tensor(lengths_k).cumsum(0).tolist()], dtype=torch.int64)
    q = torch.randn(int(cu_q[-1]), Hq, D)
    k, v = torch.randn(int(cu_k[-1]), Hk, D), torch.randn(int(cu_k[-1]), Hk, D)
    return q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k)


# ------------------------------------------------------------------------------------------- device guard

LAUNCHED = ("_attn_fwd", "_attn_bwd_preprocess", "_attn_bwd_dkdv", "_attn_bwd_dq", "_dropout_mask_kernel")


class _Recorder:
    """Stands in for a Triton kernel: launches only inside the device guard, records each launch's grid."""

    def __init__(self, kernel, state):
        self.kernel, self.state = kernel, state

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            assert self.state["inside"], f"{self.kernel.fn.__name__} launched outside the device guard"
            self.state["launches"].append((self.kernel.fn.__name__, grid))
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.fixture
def guarded(kernels, monkeypatch):
    """Every Triton launch of the module wrapped to assert it runs inside ``_on_device(tensor's device)``."""
    state = {"inside": False, "devices": [], "launches": []}
    real_guard = kernels._on_device

    @contextlib.contextmanager
    def guard(device):
        state["devices"].append(torch.device(device))
        outer, state["inside"] = state["inside"], True
        with real_guard(device):
            yield
        state["inside"] = outer

    monkeypatch.setattr(kernels, "_on_device", guard)
    for name in LAUNCHED:  # the launched kernels only: the interpreter resolves called helpers by name
        monkeypatch.setattr(kernels, name, _Recorder(getattr(kernels, name), state))
    return state


def test_every_launch_runs_under_the_tensors_device(kernels, guarded):
    q, k, v = qkv(2, 2, 1, 5, 9, 16)
    out, lse = kernels.attention_forward(q, k, v, None, 0.2, 1, 0.25, torch.tensor(3))
    kernels.attention_backward(torch.ones_like(out), q, k, v, None, out, lse, 0.2, 1, 0.25, torch.tensor(3), False)
    pq, pk, pv, cu_q, cu_k, mq, mk = packed([3, 4], [5, 2], 2, 1, 16)
    out, lse = kernels.varlen_attention_forward(pq, pk, pv, cu_q, cu_k, mq, mk, 2, 0.25)
    kernels.varlen_attention_backward(torch.ones_like(out), pq, pk, pv, cu_q, cu_k, mq, mk, out, lse, 2, 0.25)
    kernels.dropout_keep_mask(3, 1, 2, 3, 4, 0.5, q.device)
    launched = {name for name, _ in guarded["launches"]}
    assert launched == set(LAUNCHED)
    assert guarded["devices"] and all(d == q.device for d in guarded["devices"])


def test_guard_makes_a_cuda_tensors_device_current(kernels, monkeypatch):
    entered = []

    @contextlib.contextmanager
    def fake_cuda_device(device):
        entered.append(device)
        yield

    monkeypatch.setattr(torch.cuda, "device", fake_cuda_device)
    with kernels._on_device(torch.device("cuda", 1)):
        pass
    assert entered == [torch.device("cuda", 1)]
    with kernels._on_device(torch.device("cpu")):
        pass
    assert len(entered) == 1  # nothing to make current for CPU tensors (the interpreter)


# ------------------------------------------------------------------------------------------- fp32 precision


class _NewMatmulFlags:
    def __init__(self, value):
        self.fp32_precision = value

    @property
    def allow_tf32(self):  # as torch >= 2.9 once the new API has been used
        raise RuntimeError("mix of the legacy and new APIs")


class _OldMatmulFlags:
    def __init__(self, allow_tf32):
        self.allow_tf32 = allow_tf32


@pytest.mark.parametrize("matmul, top, want", [
    ("ieee", "none", "ieee"), ("tf32", "none", "tf32"), ("none", "none", "ieee"), ("none", "tf32", "tf32"),
    ("none", "ieee", "ieee"), ("ieee", "tf32", "ieee"),
])
def test_precision_reads_fp32_precision(kernels, monkeypatch, matmul, top, want):
    monkeypatch.setattr(torch.backends.cuda, "matmul", _NewMatmulFlags(matmul))
    monkeypatch.setattr(torch.backends, "fp32_precision", top, raising=False)
    assert kernels._precision(torch.float32) == want
    assert kernels._precision(torch.float16) == kernels._precision(torch.bfloat16) == "tf32"


@pytest.mark.parametrize("allow, want", [(True, "tf32"), (False, "ieee")])
def test_precision_falls_back_to_allow_tf32(kernels, monkeypatch, allow, want):
    monkeypatch.setattr(torch.backends.cuda, "matmul", _OldMatmulFlags(allow))
    assert kernels._precision(torch.float32) == want


def test_precision_follows_torchs_own_flags(kernels):
    # Set through the legacy flag only: once the new API sets a value in a process, reading allow_tf32 raises.
    matmul = torch.backends.cuda.matmul
    old = matmul.allow_tf32
    try:
        matmul.allow_tf32 = True
        assert kernels._precision(torch.float32) == "tf32"
        matmul.allow_tf32 = False
        assert kernels._precision(torch.float32) == "ieee"
    finally:
        matmul.allow_tf32 = old
