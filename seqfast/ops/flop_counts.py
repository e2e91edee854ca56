"""FLOP formulas of the attention ops for ``torch.utils.flop_counter.FlopCounterMode``.

torch counts its CUDA attention kernels (flash, efficient, cuDNN) with ``sdpa_flop_count`` and
``sdpa_backward_flop_count``, and its varlen / nested calls per sequence; an op it has no formula for counts 0,
so a model on seqfast would show too few FLOPs (and too low a model FLOP utilisation). seqfast's ops count with
the same functions on the same shapes: on CUDA a seqfast model counts what the torch model counts. (torch's CPU
attention, ``_scaled_dot_product_flash_attention_for_cpu``, has no formula and counts 0; seqfast's counts the
work on every device.) Causal masks are not discounted, as in torch's formulas. ctc_loss counts 0, as torch's.

Importing ``torch.utils.flop_counter`` costs about 0.2 s (it loads triton), which ``import seqfast`` should not: the
formulas are registered when that module is first imported (``install``), or at once if it already is.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from types import ModuleType

import torch

_MODULE = "torch.utils.flop_counter"


def _sequence_lengths(cu_seqlens: torch.Tensor, max_len: int) -> list[int]:
    """Per-sequence lengths from prefix sums; every sequence at the longest where the values cannot be read (fake
    tensors under torch.compile, meta), as torch's own varlen formula assumes."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    if isinstance(cu_seqlens, (FakeTensor, FunctionalTensor)) or cu_seqlens.device.type == "meta":
        return [max_len] * (cu_seqlens.shape[0] - 1)
    return cu_seqlens.diff().tolist()


def _varlen_shapes(query, key, value, cu_q, cu_k, max_q: int, max_k: int):
    """(query, key, value) shapes per sequence, (1, H, L_b, D), of packed (total, H, D) inputs."""
    _, hq, d = query.shape
    _, hk, _ = key.shape
    dv = value.shape[2]
    for lq, lk in zip(_sequence_lengths(cu_q, max_q), _sequence_lengths(cu_k, max_k), strict=True):
        yield (1, hq, lq, d), (1, hk, lk, d), (1, hk, lk, dv)


def _as_query_heads(query, key, value):
    """Key and value shapes with the query's head count: grouped heads cost what repeated ones would (torch's own
    formulas count b * h_q products), and torch's formulas before grouped-head support assert equal heads."""
    (b, hq, _, _), (_, _, lk, d), dv = query, key, value[3]
    return query, (b, hq, lk, d), (b, hq, lk, dv)


def _register(flop_counter: ModuleType) -> None:
    ops = torch.ops.seqfast
    if ops.attention_forward in flop_counter.flop_registry:
        return
    register = flop_counter.register_flop_formula

    def count(query, key, value) -> int:
        return flop_counter.sdpa_flop_count(*_as_query_heads(query, key, value))

    def count_backward(grad_out, query, key, value) -> int:
        return flop_counter.sdpa_backward_flop_count(grad_out, *_as_query_heads(query, key, value))

    @register(ops.attention_forward)
    def attention_forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return count(query, key, value)

    @register(ops.attention_backward)
    def attention_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        return count_backward(grad_out, query, key, value)

    @register(ops.varlen_attention_forward, get_raw=True)
    def varlen_forward(query, key, value, cu_q, cu_k, max_q, max_k, *args, out_val=None, **kwargs) -> int:
        return sum(count(q, k, v) for q, k, v in _varlen_shapes(query, key, value, cu_q, cu_k, max_q, max_k))

    @register(ops.varlen_attention_backward, get_raw=True)
    def varlen_backward(grad_out, query, key, value, cu_q, cu_k, max_q, max_k, *args, out_val=None, **kwargs) -> int:
        return sum(count_backward(q[:3] + (value.shape[2],), q, k, v)
                   for q, k, v in _varlen_shapes(query, key, value, cu_q, cu_k, max_q, max_k))


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when torch.utils.flop_counter is about to be imported, it takes the spec the other
    finders give and registers the formulas right after the module has run."""

    def find_spec(self, name, path, target=None):
        if name != _MODULE:
            return None
        sys.meta_path.remove(self)  # once; and the lookup below must not come back here
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run(module)
            _register(module)

        spec.loader.exec_module = exec_module  # this module's loader only (an instance attribute)
        return spec


def install() -> None:
    """Register the formulas now if torch.utils.flop_counter is loaded, else when it is first imported."""
    module = sys.modules.get(_MODULE)
    if module is not None:
        _register(module)
    elif not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())
