"""Attention: ``seqfast.scaled_dot_product_attention`` vs ``F.scaled_dot_product_attention``, float32,
(B, H, L, D) = (2, 8, L, D) for L in {512, 1024, 2048, 4096}, D in {64, 128}, causal and not, forward and
forward+backward; decoding steps (``attention_decode``: one query row, or a chunk of 16, against a cache of L
keys, forward);
plus a ``torch.mm`` 2048x2048 float32 case, the machine's matmul rate to compare attention's GFLOP/s with.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _harness import FWD, PROVIDERS, attention_cases, bench_device, decode_shapes, matmul_shape, measure

import seqfast


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    size = metafunc.config.getoption("--bench-size")
    device = bench_device(metafunc.config)
    if metafunc.function.__name__ == "test_attention":
        cases = attention_cases(size, device)
        metafunc.parametrize(("shape", "direction"), cases, ids=[f"{s.label}-{d}" for s, d in cases])
        metafunc.parametrize("provider", PROVIDERS)
    elif metafunc.function.__name__ == "test_attention_decode":
        shapes = decode_shapes(size)
        metafunc.parametrize("shape", shapes, ids=[s.label for s in shapes])
        metafunc.parametrize("provider", PROVIDERS)
    elif metafunc.function.__name__ == "test_matmul_rate":
        shape = matmul_shape(size)
        metafunc.parametrize("shape", [shape], ids=[shape.label])


def test_attention(benchmark, shape, direction, provider, device, size):
    q, k, v = (torch.randn(shape.B, shape.H, shape.L, shape.D, device=device) for _ in range(3))
    attend = seqfast.scaled_dot_product_attention if provider == "seqfast" else F.scaled_dot_product_attention

    if direction == FWD:
        def fn():
            with torch.no_grad():
                return attend(q, k, v, is_causal=shape.causal)
    else:
        for t in (q, k, v):
            t.requires_grad_(True)
        grad_out = torch.randn_like(q)

        def fn():
            attend(q, k, v, is_causal=shape.causal).backward(grad_out)
            # Dropped after the call, not before the next: the memory probe then counts the gradients as
            # the call's own allocation instead of netting them against the previous call's.
            q.grad = k.grad = v.grad = None

    measure(benchmark, fn, op="attention", shape=shape, direction=direction, provider=provider, device=device,
            size=size)


def test_attention_decode(benchmark, shape, provider, device, size):
    q = torch.randn(shape.B, shape.H, shape.Lq, shape.D, device=device)
    k, v = (torch.randn(shape.B, shape.H, shape.L, shape.D, device=device) for _ in range(2))
    attend = seqfast.scaled_dot_product_attention if provider == "seqfast" else F.scaled_dot_product_attention

    def fn():
        with torch.no_grad():
            return attend(q, k, v)

    measure(benchmark, fn, op="attention_decode", shape=shape, direction=FWD, provider=provider, device=device,
            size=size)


def test_matmul_rate(benchmark, shape, device, size):
    a = torch.randn(shape.n, shape.n, device=device)
    b = torch.randn(shape.n, shape.n, device=device)
    measure(benchmark, lambda: torch.mm(a, b), op="matmul", shape=shape, direction=FWD, provider="torch",
            device=device, size=size)
