"""Backend selection, the op registrations and the missing-extension path."""

import pytest
import torch
import torch.nn.functional as F
from conftest import fresh_python

import seqfast
from seqfast import _backend, _extension


def _ctc_inputs(dtype=torch.float64):
    T, N, C = 7, 2, 5
    lp = torch.randn(T, N, C, dtype=dtype).log_softmax(-1).requires_grad_()
    return lp, torch.tensor([[1, 2, 2], [3, 4, 0]]), torch.tensor([7, 5]), torch.tensor([3, 2])


def test_ops_are_defined():
    for name in ("ctc_loss_forward", "ctc_loss_backward", "attention_forward", "attention_backward",
                 "varlen_attention_forward", "varlen_attention_backward"):
        assert hasattr(torch.ops.seqfast, name)


def test_current_reads_env_on_every_call(monkeypatch):
    monkeypatch.setenv("SEQFAST_BACKEND", "reference")
    assert _backend.current() == "reference"
    monkeypatch.setenv("SEQFAST_BACKEND", "cpp")
    assert _backend.current() == "cpp"
    monkeypatch.delenv("SEQFAST_BACKEND")
    assert _backend.current() == "auto"


def test_context_manager_wins_over_env_and_nests(monkeypatch):
    monkeypatch.setenv("SEQFAST_BACKEND", "cpp")
    with seqfast.backend("reference"):
        assert _backend.current() == "reference"
        with seqfast.backend("auto"):
            assert _backend.current() == "auto"
        assert _backend.current() == "reference"
    assert _backend.current() == "cpp"


def test_unknown_backend_is_an_error(monkeypatch):
    with pytest.raises(ValueError, match="unknown seqfast backend 'cuda'"):
        with seqfast.backend("cuda"):
            pass
    monkeypatch.setenv("SEQFAST_BACKEND", "fast")
    with pytest.raises(ValueError, match="SEQFAST_BACKEND"):
        _backend.current()


def test_reference_backend_runs_the_public_api_end_to_end(monkeypatch):
    lp, targets, il, tl = _ctc_inputs()
    monkeypatch.setenv("SEQFAST_BACKEND", "reference")
    loss = seqfast.ctc_loss(lp, targets, il, tl)
    expected = F.ctc_loss(lp, targets, il, tl)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    (g,) = torch.autograd.grad(loss, lp)
    (ge,) = torch.autograd.grad(expected, lp)
    torch.testing.assert_close(g, ge, rtol=1e-9, atol=1e-12)
    q, k, v = (torch.randn(2, 3, 5, 4, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(seqfast.scaled_dot_product_attention(q, k, v, is_causal=True),
                               F.scaled_dot_product_attention(q, k, v, is_causal=True), rtol=1e-12, atol=1e-12)


def test_backward_runs_on_the_backend_of_its_forward(monkeypatch):
    calls = []
    original = _backend._IMPLS[("ctc_loss_backward", "reference")]

    def spy(*args):
        calls.append(_backend.current())
        return original(*args)

    monkeypatch.setitem(_backend._IMPLS, ("ctc_loss_backward", "reference"), spy)
    lp, targets, il, tl = _ctc_inputs()
    with seqfast.backend("reference"):
        loss = seqfast.ctc_loss(lp, targets, il, tl)
    loss.backward()  # outside the context: must still be the reference backward
    assert len(calls) == 1


def test_missing_kernel_explains_how_to_build():
    with pytest.raises(_extension.ExtensionNotBuiltError, match="make build"):
        _extension.missing_kernel("ctc_loss_forward")()


def test_import_survives_a_broken_extension_and_cpu_calls_say_why():
    code = (
        "import sys; sys.modules['seqfast._C'] = None\n"
        "import torch, seqfast\n"
        "assert not seqfast.EXTENSION_AVAILABLE\n"
        "lp = torch.randn(4, 1, 3).log_softmax(-1)\n"
        "try:\n"
        "    seqfast.ctc_loss(lp, torch.tensor([[1]]), [4], [1])\n"
        "except seqfast._extension.ExtensionNotBuiltError as e:\n"
        "    print('ERR', e)\n"
    )
    result = fresh_python(code, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert "ERR seqfast::ctc_loss_forward on CPU needs the C++ extension" in result.stdout
    assert "make build" in result.stdout


def test_triton_backend_on_cpu_needs_the_interpreter():
    code = (
        "import torch, seqfast\n"
        "lp = torch.randn(4, 1, 3).log_softmax(-1)\n"
        "with seqfast.backend('triton'):\n"
        "    seqfast.ctc_loss(lp, torch.tensor([[1]]), [4], [1])\n"
    )
    result = fresh_python(code, timeout=300, check=False)
    assert result.returncode != 0
    assert "TRITON_INTERPRET=1" in result.stderr


def test_triton_guard_lets_a_host_seed_ride_with_device_tensors(monkeypatch):
    """The attention ops pass a 0-dim CPU seed (``_NO_SEED``) beside CUDA tensors: that is a CUDA call, which
    the guard once refused on the GPU ("Triton kernels on CPU tensors"). Meta tensors stand in for CUDA ones."""
    from seqfast import _triton
    from seqfast.functional import _NO_SEED

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    query = torch.empty(2, 4, 8, 16, device="meta")
    assert _NO_SEED.device.type == "cpu" and _NO_SEED.dim() == 0
    _triton.kernels("attention", query, query, query, _NO_SEED)  # no error
    _triton.kernels("attention", query, torch.tensor([7]))  # a one-element host seed is copied over
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _triton.kernels("attention", query, torch.zeros(2, 3))  # host data is a CPU call
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _triton.kernels("attention", torch.zeros(()), _NO_SEED)  # only host tensors: a CPU call
