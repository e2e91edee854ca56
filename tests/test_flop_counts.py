"""torch.utils.flop_counter counts seqfast's attention as torch counts its own CUDA attention kernels (torch's
formulas, the same shapes); the formulas are registered whichever of seqfast and flop_counter is imported first."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import fresh_python
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

import seqfast


def _counts(fn) -> dict[str, int]:
    with FlopCounterMode(display=False) as counter:
        fn()
    return {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}


SHAPES = {  # (B, Hq, Hk, Lq, Lk, D, Dv)
    "self": (2, 4, 4, 33, 33, 16, 16),
    "cross": (3, 2, 2, 7, 19, 8, 8),
    "grouped": (2, 6, 2, 11, 13, 16, 16),
    "value dim": (1, 3, 3, 9, 5, 8, 24),
}


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", list(SHAPES))
def test_attention_counts_as_torchs_formulas(name, causal):
    B, Hq, Hk, Lq, Lk, D, Dv = SHAPES[name]
    q = torch.randn(B, Hq, Lq, D, requires_grad=True)
    k = torch.randn(B, Hk, Lk, D, requires_grad=True)
    v = torch.randn(B, Hk, Lk, Dv, requires_grad=True)
    gqa = Hq != Hk
    counts = _counts(lambda: seqfast.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                                  enable_gqa=gqa).sum().backward())
    assert counts == {"seqfast.attention_forward": sdpa_flop_count(q.shape, k.shape, v.shape),
                      "seqfast.attention_backward": sdpa_backward_flop_count((B, Hq, Lq, Dv), q.shape, k.shape,
                                                                             v.shape)}
    # torch's math path on the CPU counts its two products: the forward's formula, measured in the same run.
    with sdpa_kernel(SDPBackend.MATH):
        theirs = _counts(lambda: F.scaled_dot_product_attention(q.detach(), k.detach(), v.detach(),
                                                                is_causal=causal, enable_gqa=gqa))
    assert sum(theirs.values()) == counts["seqfast.attention_forward"]


def test_varlen_counts_per_sequence():
    lengths_q, lengths_k, H, D = [5, 1, 12], [7, 3, 2], 2, 8
    cu_q = torch.tensor([0, *torch.tensor(lengths_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lengths_k).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(sum(lengths_q), H, D, requires_grad=True)
    k = torch.randn(sum(lengths_k), H, D, requires_grad=True)
    v = torch.randn(sum(lengths_k), H, D, requires_grad=True)
    counts = _counts(lambda: seqfast.varlen_attn(q, k, v, cu_q, cu_k, 12, 7).sum().backward())
    shapes = [((1, H, a, D), (1, H, b, D), (1, H, b, D)) for a, b in zip(lengths_q, lengths_k)]
    assert counts == {"seqfast.varlen_attention_forward": sum(sdpa_flop_count(*s) for s in shapes),
                      "seqfast.varlen_attention_backward": sum(sdpa_backward_flop_count(s[0], *s) for s in shapes)}


def test_module_counts_its_projections_and_attention():
    torch.manual_seed(0)
    module = seqfast.nn.MultiheadAttention(16, 4, batch_first=True)
    x = torch.randn(2, 9, 16)
    counts = _counts(lambda: module(x, x, x, need_weights=False))
    assert counts.pop("seqfast.attention_forward") == sdpa_flop_count((2, 4, 9, 4), (2, 4, 9, 4), (2, 4, 9, 4))
    linear = 2 * 2 * 9 * 16 * 16  # (N L, E) @ (E, E)
    assert sum(counts.values()) == 4 * linear  # in-projection of q, k, v and the out-projection


@pytest.mark.parametrize("order", ["seqfast first", "flop_counter first"])
def test_formulas_registered_whatever_the_import_order(order):
    first, second = ("seqfast", "torch.utils.flop_counter")[:: 1 if order == "seqfast first" else -1]
    code = (f"import sys, torch, {first}, {second}\n"
            "import seqfast\n"
            "from torch.utils.flop_counter import FlopCounterMode\n"
            "q = torch.randn(1, 2, 8, 4)\n"
            "with FlopCounterMode(display=False) as c:\n"
            "    seqfast.scaled_dot_product_attention(q, q, q)\n"
            "print(c.get_total_flops())\n")
    assert int(fresh_python(code).stdout.split()[-1]) == 2 * 2 * (2 * 8 * 8 * 4)



def test_grouped_heads_count_with_formulas_that_assert_equal_heads():
    """torch's formulas before grouped-head support assert equal heads (the GPU machine's torch may be one):
    seqfast hands them key and value shapes with the query's heads, which cost the same count. In a fresh process,
    so that seqfast registers its formulas over such strict ones."""
    code = ("import torch\n"
            "import torch.utils.flop_counter as fc\n"
            "def strict(formula):\n"
            "    def checked(*shapes):\n"
            "        assert len({s[1] for s in shapes}) == 1, 'heads differ'\n"
            "        return formula(*shapes)\n"
            "    return checked\n"
            "loose = fc.sdpa_flop_count, fc.sdpa_backward_flop_count\n"
            "fc.sdpa_flop_count, fc.sdpa_backward_flop_count = map(strict, loose)\n"
            "import seqfast\n"
            "q = torch.randn(2, 6, 11, 16, requires_grad=True)\n"
            "k, v = (torch.randn(2, 2, 13, 16, requires_grad=True) for _ in 'kv')\n"
            "with fc.FlopCounterMode(display=False) as c:\n"
            "    seqfast.scaled_dot_product_attention(q, k, v, enable_gqa=True).sum().backward()\n"
            "print(c.get_total_flops(), loose[0](q.shape, k.shape, v.shape) + loose[1](q.shape, q.shape, k.shape,"
            " v.shape))\n")
    counted, expected = fresh_python(code).stdout.split()[-2:]
    assert counted == expected
