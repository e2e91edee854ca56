"""How the Triton attention launchers launch (kernels/attention.py): the device made current, the TF32 setting
read, grids within CUDA's limits, the dropout seed read on the device, and the split-KV decode forward.

Through Triton's interpreter on CPU tensors where there is no GPU; what only a GPU shows (the current device,
the seed's device) is checked by recording what the launchers do.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import seqfast
from seqfast import _backend, _triton

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

LAUNCHED = ("_attn_fwd", "_attn_bwd_preprocess", "_attn_bwd_dkdv", "_attn_bwd_dq", "_dropout_mask_kernel",
            "_attn_fwd_split", "_attn_fwd_combine")


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


def test_every_launch_runs_under_the_tensors_device(kernels, guarded, monkeypatch):
    monkeypatch.setattr(kernels, "_DECODE_MIN_LK", 64)
    monkeypatch.setitem(kernels._FORCED, "decode", {"BLOCK_N": 16, "SPLITS": 2})
    kernels.attention_forward(*qkv(1, 2, 1, 1, 80, 16), None, 0.0, 0, 0.25, torch.tensor(0))  # split-KV decode
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


# ------------------------------------------------------------------------------------------- seed, host syncs

_HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")


@pytest.fixture
def host_reads(monkeypatch):
    """Counts the Python-level reads of tensor values (each a device-to-host sync on CUDA tensors) while
    ``host_reads["on"]`` is set."""
    state = {"on": False, "calls": [], "depth": 0}
    for name in _HOST_READS:
        real = getattr(torch.Tensor, name)

        def spy(self, *args, _real=real, _name=name, **kwargs):
            # torch's __torch_function__ modes (a default-device context) call the method again: count once.
            if state["on"] and state["depth"] == 0:
                state["calls"].append(_name)
            state["depth"] += 1
            try:
                return _real(self, *args, **kwargs)
            finally:
                state["depth"] -= 1

        monkeypatch.setattr(torch.Tensor, name, spy)
    return state


def test_sdpa_reads_no_tensor_value_on_the_host(host_reads):
    """Forward and backward with dropout and a float mask: no .item(), int(seed), bool(tensor)..."""
    q, k, v = (t.requires_grad_() for t in qkv(2, 4, 2, 5, 9, 16))
    mask = torch.randn(2, 1, 5, 9, requires_grad=True)
    with seqfast.backend("triton"):
        host_reads["on"] = True
        out = seqfast.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.3, enable_gqa=True)
        out.backward(torch.ones_like(out))
        host_reads["on"] = False
    assert host_reads["calls"] == []
    assert q.grad is not None and mask.grad is not None


def test_varlen_reads_the_prefix_sums_once(host_reads):
    pq, pk, pv, cu_q, cu_k, mq, mk = packed([3, 4], [5, 2], 2, 1, 16)
    pq.requires_grad_()
    with seqfast.backend("triton"):
        host_reads["on"] = True
        out = seqfast.varlen_attention(pq, pk, pv, cu_q, cu_k, mq, mk, causal=True)
        out.backward(torch.ones_like(out))
        host_reads["on"] = False
    assert host_reads["calls"] == ["tolist"]


def test_seed_drawn_on_the_querys_device(monkeypatch):
    from seqfast import functional

    drawn = []
    real = torch.randint

    def spy(*args, **kwargs):
        drawn.append(kwargs.get("device"))
        return real(*args, **{k: v for k, v in kwargs.items() if k != "device"})

    monkeypatch.setattr(torch, "randint", spy)
    functional._dropout_seed(0.5, torch.device("cuda", 1))
    functional._dropout_seed(0.5, torch.device("cpu"))
    functional._dropout_seed(0.5, None)
    assert drawn == [torch.device("cuda", 1), None, None]
    assert functional._dropout_seed(0.0, torch.device("cuda", 1)) is functional._NO_SEED


def test_kernels_never_read_the_seed_on_the_host(kernels, monkeypatch):
    """The seed reaches the kernels as a pointer: a tensor whose value cannot be read still works."""
    seed = torch.tensor(1234, dtype=torch.int64)
    for name in ("item", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, **k: pytest.fail("seed read on the host"))
    q, k, v = qkv(1, 2, 2, 5, 9, 16)
    out, lse = kernels.attention_forward(q, k, v, None, 0.4, 0, 0.25, seed)
    kernels.attention_backward(torch.ones_like(out), q, k, v, None, out, lse, 0.4, 0, 0.25, seed, False)
    kernels.dropout_keep_mask(seed, 1, 2, 5, 9, 0.4, q.device)


@pytest.mark.parametrize("seed", [torch.tensor(99), torch.tensor([2**62 - 7]), 99])
def test_dropout_with_a_seed_tensor_matches_the_keep_mask(kernels, seed):
    from seqfast.reference import attention as reference

    B, H, Lq, Lk, D, p, scale = 1, 2, 6, 21, 16, 0.3, 0.3
    q, k, v = qkv(B, H, H, Lq, Lk, D)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    op_seed = seed if isinstance(seed, torch.Tensor) else torch.tensor(seed)
    with seqfast.backend("triton"):
        out, _ = _backend.dispatch(None, torch.ops.seqfast.attention_forward.default, *leaves, None, p, 0, scale,
                                   op_seed)
        grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
    keep = kernels.dropout_keep_mask(seed, B, H, Lq, Lk, p, q.device)
    assert 0 < keep.float().mean() < 1
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref_out, _ = reference.attention(*ref_leaves, scale=scale, dropout_p=p, dropout_keep_mask=keep)
    ref_grads = torch.autograd.grad(ref_out, ref_leaves, torch.ones_like(ref_out))
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), rg, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------- grid limits


def _dense_run(kernels, q, k, v, mask, seed):
    out, lse = kernels.attention_forward(q, k, v, mask, 0.3, 1, 0.25, seed)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), device="cpu").to(out)
    grads = kernels.attention_backward(grad_out, q, k, v, mask, out, lse, 0.3, 1, 0.25, seed, mask is not None)
    return out, lse, grads


@pytest.mark.parametrize("limit", [1, 2])
def test_batch_past_the_grid_limit_is_split_dense(kernels, guarded, monkeypatch, limit):
    """Batch 5 against a limit of 1 / 2 on grid y / z: the same bits as one launch, dropout and masks included."""
    q, k, v = qkv(5, 2, 1, 6, 11, 16)
    mask = torch.randn(5, 2, 6, 11)
    seed = torch.tensor(77)
    whole = _dense_run(kernels, q, k, v, mask, seed)
    guarded["launches"].clear()
    monkeypatch.setattr(kernels, "_MAX_GRID_YZ", limit)
    split = _dense_run(kernels, q, k, v, mask, seed)
    grids = [grid for _, grid in guarded["launches"]]
    assert len(grids) == 4 * -(-5 // limit) and all(g[1] <= 2 and g[2] <= limit for g in grids)
    assert torch.equal(whole[0], split[0]) and torch.equal(whole[1], split[1])
    for a, b in zip(whole[2], split[2]):
        assert torch.equal(a, b)


def test_sequences_past_the_grid_limit_are_split_varlen(kernels, guarded, monkeypatch):
    pq, pk, pv, cu_q, cu_k, mq, mk = packed([3, 0, 7, 1, 4], [5, 2, 9, 1, 6], 4, 2, 16)

    def run():
        out, lse = kernels.varlen_attention_forward(pq, pk, pv, cu_q, cu_k, mq, mk, 2, 0.25)
        grads = kernels.varlen_attention_backward(torch.ones_like(out), pq, pk, pv, cu_q, cu_k, mq, mk, out, lse,
                                                  2, 0.25)
        return out, lse, *grads

    whole = run()
    guarded["launches"].clear()
    monkeypatch.setattr(kernels, "_MAX_GRID_YZ", 2)
    split = run()
    assert len(guarded["launches"]) == 4 * 3 and all(g[2] <= 2 for _, g in guarded["launches"])
    for a, b in zip(whole, split):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------- split-KV decode


@pytest.fixture
def small_decode(kernels, monkeypatch):
    """The split-KV forward on short keys, with small key tiles and a given number of key ranges."""
    monkeypatch.setattr(kernels, "_DECODE_MIN_LK", 64)

    def force(splits, block_n=16):
        monkeypatch.setitem(kernels._FORCED, "decode", {"BLOCK_N": block_n, "SPLITS": splits})

    force(3)
    return force


def _reference(q, k, v, mask=None, causal=0, scale=0.25):
    from seqfast.reference import attention as reference

    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    return reference.attention(q.double(), k.double(), v.double(), None if mask is None else
                               (mask if mask.dtype == torch.bool else mask.double()), causal=causal, scale=scale)


@pytest.mark.parametrize("Lq, Lk, Hq, Hk, causal, splits", [
    (1, 100, 2, 2, 0, 3),
    (2, 333, 4, 1, 2, 5),  # multi-query, bottom-right causal
    (3, 700, 4, 2, 2, 7),
    (4, 517, 8, 2, 2, 4),
    (1, 129, 2, 1, 0, 32),  # more ranges than key tiles: clipped
])
def test_decode_forward_matches_reference(kernels, small_decode, guarded, Lq, Lk, Hq, Hk, causal, splits):
    small_decode(splits)
    q, k, v = qkv(2, Hq, Hk, Lq, Lk, 64, 48)
    out, lse = kernels.attention_forward(q, k, v, None, 0.0, causal, 0.25, torch.tensor(0))
    assert "_attn_fwd_split" in {name for name, _ in guarded["launches"]}
    assert "_attn_fwd" not in {name for name, _ in guarded["launches"]}
    ref_out, ref_lse = _reference(q, k, v, causal=causal)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_decode_forward_with_masks(kernels, small_decode, kind):
    q, k, v = qkv(2, 4, 2, 3, 200, 32)
    mask = torch.rand(2, 1, 3, 200) > 0.3 if kind == "bool" else torch.randn(1, 4, 3, 200)
    if kind == "bool":
        mask[0, 0, 1] = False  # a row that sees nothing: output 0, lse +inf
    full = mask.expand(2, 4, 3, 200)
    out, lse = kernels.attention_forward(q, k, v, full, 0.0, 0, 0.25, torch.tensor(0))
    ref_out, ref_lse = _reference(q, k, v, full)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=2e-5)
    if kind == "bool":
        assert (out[0, :, 1] == 0).all() and torch.isinf(lse[0, :, 1]).all()


def test_decode_gradients_through_the_normal_backward(kernels, small_decode, guarded):
    q, k, v = qkv(2, 4, 2, 2, 150, 32)
    mask = torch.randn(1, 4, 2, 150)
    grad_out = torch.randn(2, 4, 2, 32)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, mask)]
    with seqfast.backend("triton"):
        out = seqfast.scaled_dot_product_attention(*leaves[:3], attn_mask=leaves[3], enable_gqa=True)
        grads = torch.autograd.grad(out, leaves, grad_out)
    assert {"_attn_fwd_split", "_attn_bwd_dkdv"} <= {name for name, _ in guarded["launches"]}
    assert "_attn_fwd" not in {name for name, _ in guarded["launches"]}
    ref = [t.double().requires_grad_() for t in (q, k, v, mask)]
    with seqfast.backend("reference"):
        ref_out = seqfast.scaled_dot_product_attention(*ref[:3], attn_mask=ref[3], enable_gqa=True)
        ref_grads = torch.autograd.grad(ref_out, ref, grad_out.double())
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=2e-5)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), rg, atol=5e-5, rtol=5e-5)


def test_decode_kernel_top_left_causal(kernels):
    """Top-left causal decoding goes to the normal forward (its rows see Lq keys); the split kernel still
    handles the alignment when launched."""
    q, k, v = qkv(2, 4, 2, 3, 200, 32)
    out, lse = kernels._decode_forward(q, k, v, None, 1, 0.25, (16, 3, 4, 1))
    ref_out, ref_lse = _reference(q, k, v, causal=1)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=2e-5)


def test_decode_is_chosen_only_where_it_serves(kernels, monkeypatch):
    monkeypatch.setattr(kernels, "_sm_count", lambda device: 132)

    def shapes(B, Hq, Hk, Lq, Lk, D=128, dtype=torch.float16):  # the choice reads shapes only: no memory
        return [torch.empty(s, dtype=dtype, device="meta") for s in ((B, Hq, Lq, D), (B, Hk, Lk, D), (B, Hk, Lk, D))]

    q, k, v = shapes(1, 8, 1, 1, 4096)
    block_n, splits, warps, stages = kernels._decode_launch(q, k, v, None, 0.0, 0)
    assert splits > 1 and block_n * splits <= 4096
    assert kernels._decode_launch(q, k, v, torch.ones(1, 8, 1, 4096, dtype=torch.bool), 0.0, 2) is not None
    assert kernels._decode_launch(q, k, v, None, 0.1, 0) is None  # dropout: the normal forward
    assert kernels._decode_launch(q, k, v, None, 0.0, 1) is None  # top-left causal: one key visible
    assert kernels._decode_launch(*shapes(1, 8, 1, 32, 4096), None, 0.0, 0) is None  # not a decode
    assert kernels._decode_launch(*shapes(1, 64, 1, 1, 4096), None, 0.0, 0) is None  # 64 rows in a tile
    assert kernels._decode_launch(*shapes(1, 8, 1, 1, 512), None, 0.0, 0) is None  # short keys
    assert kernels._decode_launch(*shapes(256, 8, 8, 1, 4096), None, 0.0, 0) is None  # the batch fills the GPU
    fp32_wide = shapes(1, 32, 1, 1, 4096, 256, torch.float32)
    assert kernels._decode_launch(*fp32_wide, None, 0.0, 0)[0] == 16  # IEEE fp32 dots: a 16-key tile
    monkeypatch.setattr(kernels, "_PRECISION_OVERRIDE", "tf32")
    assert kernels._decode_launch(*fp32_wide, None, 0.0, 0) is None  # TF32 at 32 rows spills: normal forward


@pytest.mark.parametrize("dtype, precision, masked, stages, maxnreg", [
    (torch.float16, "tf32", True, 2, None), (torch.float32, "ieee", True, 1, None),
    (torch.float32, "tf32", False, 2, 255)])
def test_decode_at_width_256(kernels, monkeypatch, dtype, precision, masked, stages, maxnreg):
    """The split-KV forward's own launch at width 256 with 16 tile rows: 16-key tiles with a bool mask (32 spilled
    56-60 B on sm_90 under triton 3.6; IEEE fp32 in one stage), unmasked tf32 capped at 255 registers, against the
    float64 reference (16-bit: within twice torch's own error); 16-bit masked tiles of 32 rows take the normal
    forward (16 keys still spilled 40 B)."""
    monkeypatch.setattr(kernels, "_DECODE_MIN_LK", 64)
    monkeypatch.setattr(kernels, "_PRECISION_OVERRIDE", precision)
    launches, split = [], kernels._attn_fwd_split

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append(kwargs)
                return split[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(kernels, "_attn_fwd_split", Spy())
    q, k, v = (t.to(dtype) for t in qkv(1, 8, 1, 2, 200, 256))
    mask = torch.rand(1, 8, 2, 200) > 0.3 if masked else None
    out, lse = kernels.attention_forward(q, k, v, mask, 0.0, 0, 0.0625, torch.tensor(0))
    assert [(kw["BLOCK_M"], kw["BLOCK_N"], kw["num_stages"], kw["maxnreg"]) for kw in launches] == [
        (16, 16, stages, maxnreg)]
    ref_out, ref_lse = _reference(q, k, v, mask, scale=0.0625)
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=2e-5)
    else:
        torch_out = torch.nn.functional.scaled_dot_product_attention(q, k, v, mask, scale=0.0625, enable_gqa=True)
        err, torch_err = ((o.double() - ref_out).abs().max().item() for o in (out, torch_out))
        assert err <= 2 * torch_err, (err, torch_err)
        wide = [t.to(dtype) for t in qkv(1, 16, 1, 2, 200, 256)]
        assert kernels._decode_launch(*wide, torch.ones(1, 16, 2, 200, dtype=torch.bool), 0.0, 0) is None
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=2e-5)


def test_decode_batch_past_the_grid_limit(kernels, small_decode, monkeypatch):
    q, k, v = qkv(3, 4, 2, 2, 90, 16)
    mask = torch.randn(3, 4, 2, 90)
    whole = kernels.attention_forward(q, k, v, mask, 0.0, 2, 0.25, torch.tensor(0))
    monkeypatch.setattr(kernels, "_MAX_GRID_YZ", 1)
    split = kernels.attention_forward(q, k, v, mask, 0.0, 2, 0.25, torch.tensor(0))
    assert torch.equal(whole[0], split[0]) and torch.equal(whole[1], split[1])
