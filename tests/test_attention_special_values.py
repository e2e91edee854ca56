"""NaN and inf through ``seqfast.scaled_dot_product_attention``, against torch's CPU sdpa in the same run.

Each case puts one non-finite value in q, k, v or a float mask, or passes a non-finite scale, and
compares the output and the gradients of q, k, v (and the float mask) with torch's: NaN positions
equal, inf positions and signs equal, finite values close. Backends: cpp under each ISA, reference,
triton (interpreter, float32, tiny shapes).

Where torch's own result is an artefact of its kernels rather than of the formula, the cases keep
clear of it; each exception is tested on its own at the end:

- torch's flash kernel (no mask) takes a row's max in a scalar tail with ``std::max``, which drops
  NaN: a row shorter than one vector (16 float32 / 8 float64 keys) can give 0 where a longer row
  gives NaN. The shapes here have at least 16 keys.
- Under a causal mask torch's kernels multiply whole tiles, so a NaN or inf also reaches, through
  0 * NaN, rows and keys the mask hides; seqfast skips those products. The causal cases here put the
  value where no hidden product meets a NaN (q in the last row, which sees every key; a NaN in key 0,
  which every row sees, so every row is NaN; Lq = Lk); test_causal_hidden_products covers the rest.
- torch's float32 flash kernel (no mask) exponentiates with ``exp_u20``, which turns NaN into a huge
  number in its vector lanes: for a row with a +inf score its lse is +inf or NaN depending on the
  key's lane, and accordingly one or all of that row's dV contributions turn NaN. seqfast follows
  torch's float64 kernel (exact exp) and its math path: NaN. Those gradients are compared with torch
  run in float64 on the same values.
- torch's flash kernel with ``is_causal`` and a scale <= 0 scales its -inf causal fill (-inf * -s =
  +inf, -inf * 0 = NaN) and returns NaN rows; seqfast is compared with torch's math path there.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from conftest import KERNEL_DEVICE
from torch.nn.attention import SDPBackend, sdpa_kernel

import seqfast

# numpy, under Triton's interpreter, warns about the NaN and inf arithmetic these cases are made of.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

NAN, INF = float("nan"), float("inf")
NAMES = ("out", "dq", "dk", "dv", "dmask")


@dataclass(frozen=True)
class Case:
    where: str | None = None  # "q", "k", "v", "mask" (one element) or None
    value: float = 0.0
    mask: str | None = None  # None, "bool", "float"
    causal: bool = False
    scale: float | None = None
    empty_row: bool = False  # mask row 2 hides every key

    def __str__(self):
        parts = [f"{self.where}={self.value}"] if self.where else []
        parts += [f"scale={self.scale}"] if self.scale is not None else []
        parts += [f"{self.mask}_mask"] if self.mask else []
        parts += ["empty_row"] if self.empty_row else []
        parts += ["causal"] if self.causal else []
        return "-".join(parts)

    @property
    def plus_inf_scores(self) -> bool:
        """Some score is +inf (an inf in q or k, or an infinite scale): see torch's exp_u20 above."""
        inf_qk = self.where in ("q", "k") and abs(self.value) == INF
        return inf_qk or (self.scale is not None and abs(self.scale) == INF)


def _cases():
    for mask in (None, "bool", "float"):
        for where in ("q", "k", "v"):
            for value in (NAN, INF, -INF):
                yield Case(where, value, mask)
        for scale in (NAN, INF, -INF):
            yield Case(scale=scale, mask=mask)
    for value in (NAN, INF, -INF):
        yield Case("mask", value, "float")
        yield Case("q", value, causal=True)
    yield Case("k", NAN, causal=True)
    yield Case("v", NAN, causal=True)
    for scale in (NAN, INF):  # -inf: see test_causal_with_nonpositive_scale
        yield Case(scale=scale, causal=True)
    for mask in ("bool", "float"):
        yield Case(mask=mask, empty_row=True)
        yield Case("v", NAN, mask, empty_row=True)  # 0 * NaN in P V: NaN, as torch


CASES = list(_cases())
HALF_CASES = [Case("q", NAN), Case("k", NAN), Case("v", NAN), Case("mask", NAN, "float"), Case(scale=NAN),
              Case("k", NAN, causal=True)]


@contextlib.contextmanager
def isa(name: str | None):
    if name is None:
        yield
        return
    from seqfast import _C

    old = _C.set_cpu_isa(name)
    try:
        if _C.cpu_isa() != name:
            pytest.skip(f"this CPU has no {name}")
        yield
    finally:
        _C.set_cpu_isa(old)


BACKENDS = [
    pytest.param("cpp", "avx512", id="cpp-avx512"),
    pytest.param("cpp", "avx2", id="cpp-avx2"),
    pytest.param("cpp", "baseline", id="cpp-baseline"),
    pytest.param("reference", None, id="reference"),
    pytest.param("triton", None, id="triton", marks=pytest.mark.interpreter),
]


def inputs(case: Case, L: int, D: int = 24, H: int = 2):
    """q, k, v, grad_out (1, H, L, D) and the mask for ``case``, float64 (cast by ``run``). Without a
    causal mask the value sits in key L - 10, in the second key tile of the C++ kernels when L > 128."""
    gen = torch.Generator().manual_seed(0)
    q, k, v, g = (torch.randn(1, H, L, D, generator=gen, dtype=torch.float64) for _ in range(4))
    mask = None
    if case.mask == "bool":
        mask = torch.rand(1, H, L, L, generator=gen) > 0.3
        mask[..., 0] = True
    elif case.mask == "float":
        mask = torch.randn(1, H, L, L, generator=gen, dtype=torch.float64)
    if case.empty_row:
        mask[0, 0, 2] = False if case.mask == "bool" else -INF
    key = 0 if case.causal else L - 10
    row = L - 1 if case.causal else 2
    if case.where == "q":
        q[0, 0, row, 3] = case.value
    elif case.where in ("k", "v"):
        {"k": k, "v": v}[case.where][0, 0, key, 3] = case.value
    elif case.where == "mask":
        mask[0, 0, 2, key] = case.value
    return q, k, v, g, mask


def run(fn, q, k, v, g, mask, causal, scale, dtype, device="cpu"):
    """fn's output and gradients of q, k, v (and a float mask) on copies cast to ``dtype`` on ``device``, returned
    on the CPU."""
    leaves = [t.to(device, dtype).requires_grad_() for t in (q, k, v)]
    m = None if mask is None else mask.to(device)
    if mask is not None and mask.is_floating_point():
        m = m.to(dtype).requires_grad_()
        leaves.append(m)
    out = fn(*leaves[:3], attn_mask=m, is_causal=causal, scale=scale)
    grads = torch.autograd.grad(out, leaves, g.to(device, dtype))
    return [t.cpu() for t in (out.detach(), *grads)]


def seqfast_run(backend, isa_name, *args):
    """seqfast's results on ``backend``: the Triton kernels on the GPU where there is one, else interpreted."""
    with isa(isa_name), seqfast.backend(backend):
        return run(seqfast.scaled_dot_product_attention, *args, device=KERNEL_DEVICE if backend == "triton" else "cpu")


def assert_same_special_values(got, want, tol, names=NAMES):
    for name, a, b in zip(names, got, want):
        assert a.shape == b.shape, name
        a, b = a.double(), b.double()
        nan_a, nan_b = torch.isnan(a), torch.isnan(b)
        assert torch.equal(nan_a, nan_b), (
            f"{name}: NaN at {int((nan_a & ~nan_b).sum())} places torch has none, "
            f"missing at {int((nan_b & ~nan_a).sum())} of torch's {int(nan_b.sum())}")
        inf_a, inf_b = torch.isinf(a), torch.isinf(b)
        assert torch.equal(inf_a, inf_b) and torch.equal(a[inf_a], b[inf_b]), f"{name}: inf positions or signs differ"
        fin = torch.isfinite(b)
        if fin.any():
            err = (a[fin] - b[fin]).abs().max().item()
            assert err <= tol * max(1.0, b[fin].abs().max().item()), f"{name}: max error {err:.3g}"


TOL = {torch.float32: 1e-4, torch.float64: 1e-9}


# The Triton kernels take float16 / bfloat16 / float32.
BACKEND_DTYPES = [
    pytest.param(*p.values, dtype, id=f"{p.id}-{name}", marks=p.marks)
    for p in BACKENDS
    for dtype, name in ((torch.float32, "fp32"), (torch.float64, "fp64"))
    if not (p.values[0] == "triton" and dtype == torch.float64)
]


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("backend, isa_name, dtype", BACKEND_DTYPES)
def test_special_values_match_torch(backend, isa_name, dtype, case):
    # The interpreter is slow: 20 keys (still more than one torch vector) for Triton.
    q, k, v, g, mask = inputs(case, L=20 if backend == "triton" else 150)
    args = (q, k, v, g, mask, case.causal, case.scale)
    got = seqfast_run(backend, isa_name, *args, dtype)
    want = run(F.scaled_dot_product_attention, *args, dtype)
    if dtype == torch.float32 and mask is None and case.plus_inf_scores:
        # torch's float32 exp_u20 (module docstring): its float64 kernel gives the gradients' NaN.
        want = want[:1] + run(F.scaled_dot_product_attention, *args, torch.float64)[1:]
    assert_same_special_values(got, want, TOL[dtype])


@pytest.mark.parametrize("case", HALF_CASES, ids=str)
@pytest.mark.parametrize("backend, dtype", [  # numpy, under Triton's interpreter, has no bfloat16
    pytest.param("cpp", torch.bfloat16, id="cpp-bf16"),
    pytest.param("cpp", torch.float16, id="cpp-fp16"),
    pytest.param("triton", torch.float16, id="triton-fp16", marks=pytest.mark.interpreter),
])
def test_special_values_half_precision(backend, dtype, case):
    """The float16 / bfloat16 paths (computed in float32): NaN and inf positions as torch's."""
    q, k, v, g, mask = inputs(case, L=20 if backend == "triton" else 150)
    args = (q, k, v, g, mask, case.causal, case.scale, dtype)
    got = seqfast_run(backend, None, *args)
    want = run(F.scaled_dot_product_attention, *args)
    assert_same_special_values(got, want, tol=INF)  # positions only; values: test_attention*.py


@pytest.mark.parametrize("backend, isa_name", BACKENDS)
def test_empty_rows_give_zero_like_torch(backend, isa_name):
    """Rows that see no key: output 0 and zero gradients, as torch 2.13 gives (both its paths)."""
    for mask_kind in ("bool", "float"):
        q, k, v, g, mask = inputs(Case(mask=mask_kind, empty_row=True), L=20)
        got = seqfast_run(backend, isa_name, q, k, v, g, mask, False, None, torch.float32)
        want = run(F.scaled_dot_product_attention, q, k, v, g, mask, False, None, torch.float32)
        for a, b in zip(got[:2], want[:2]):  # out, dq: row 2 of head 0
            assert torch.equal(a[0, 0, 2], torch.zeros_like(a[0, 0, 2])) and torch.equal(b[0, 0, 2], a[0, 0, 2])
        if mask_kind == "float":
            assert torch.equal(got[4][0, 0, 2], torch.zeros_like(got[4][0, 0, 2]))
        assert_same_special_values(got, want, 1e-4)


@pytest.mark.parametrize("backend, isa_name", BACKENDS)
@pytest.mark.parametrize("value", [NAN, INF, -INF], ids=str)
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_causal_hidden_products(backend, isa_name, where, value):
    """A NaN or inf under a causal mask anywhere: seqfast's NaN positions are torch's, less those torch
    gets by multiplying 0 into hidden products (rows that do not see a key, keys a row does not see)."""
    L, j = 40, 25  # row j (q) or key j (k, v)
    q, k, v, g, _ = inputs(Case(), L=L)
    {"q": q, "k": k, "v": v}[where][0, 0, j, 3] = value
    args = (q, k, v, g, None, True, None)
    got = seqfast_run(backend, isa_name, *args, torch.float32 if backend == "triton" else torch.float64)
    want = run(F.scaled_dot_product_attention, *args, torch.float64)  # float64: clear of torch's exp_u20
    for name, a, b in zip(NAMES, got, want):
        assert not (torch.isnan(a) & ~torch.isnan(b)).any(), f"{name}: a NaN torch does not have"
    # Where the mask lets the NaN through, the positions agree: rows >= j (out, dq), keys <= j (dk, dv).
    seen_rows = (slice(None), slice(None), slice(j, None))
    seen_keys = (slice(None), slice(None), slice(0, j + 1))
    for a, b, part in zip(got[:4], want[:4], (seen_rows, seen_rows, seen_keys, seen_keys)):
        assert torch.equal(torch.isnan(a[part]), torch.isnan(b[part]))


@pytest.mark.parametrize("backend, isa_name", BACKENDS)
@pytest.mark.parametrize("scale", [-0.5, 0.0])
def test_causal_with_nonpositive_scale(backend, isa_name, scale):
    """torch's flash kernel scales its -inf causal fill here (module docstring); its math path does not.
    (Not -inf: the math path scales q and k by sqrt(|scale|) each, so inf - inf in q k^T.)"""
    q, k, v, g, _ = inputs(Case(), L=20)
    args = (q, k, v, g, None, True, scale, torch.float32)
    got = seqfast_run(backend, isa_name, *args)
    with sdpa_kernel(SDPBackend.MATH):
        want = run(F.scaled_dot_product_attention, *args)
    assert_same_special_values(got, want, 1e-4)
    assert all(torch.isfinite(t).all() for t in got)


@pytest.mark.parametrize("backend, isa_name", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("scale", [1e10, 1e30])
@pytest.mark.parametrize("mask, causal", [(None, False), ("bool", False), ("float", False), (None, True)])
def test_huge_finite_scale_forward_matches_torch(backend, isa_name, dtype, scale, mask, causal):
    """Scaled scores of 2^31 and beyond: each row's softmax is one-hot, and torch's forward gives exactly the
    value at the row's max. exp2(s * f - max) fused into one FMA would add the product's rounding error (hundreds
    at this size) to the max's own exponent and overflow it; the product is rounded first, as the max was.
    Only the forward: a backward that recomputes the scores (torch's flash kernel too, which returns NaN and
    inf there) rounds them in another order, which at this size moves exponents by whole units."""
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels take float16 / bfloat16 / float32")
    q, k, v, _, m = inputs(Case(mask=mask), L=40)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    m = m.to(dtype) if m is not None and m.is_floating_point() else m
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=causal, scale=scale)
    with isa(isa_name), seqfast.backend(backend):
        got = seqfast.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=causal, scale=scale)
    assert torch.isfinite(want).all()
    torch.testing.assert_close(got, want, rtol=TOL[dtype], atol=TOL[dtype])
