"""``torch.library.opcheck`` on every seqfast op with device tensors (``opcheck``): schema, fake (meta)
functions, autograd registration and AOT dispatch, with contiguous and with non-contiguous / broadcast inputs.

On CUDA the ops run the Triton kernels; in a CPU dry run they run the C++ kernels (opcheck calls the op through
the dispatcher, which a forced backend cannot reach), or are skipped when the extension is not built.
"""

from __future__ import annotations

from gpu.runtime import Case, Context


def _attention_args(device: str, strided: bool, dtype):
    import torch

    g = torch.Generator().manual_seed(11)
    B, Hq, Hk, L, S, D = 2, 4, 2, 37, 45, 64

    def t(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    if strided:
        q = t(B, L, Hq, D).transpose(1, 2)  # (B, L, H, D) storage
        k = t(1, Hk, S, D).expand(B, Hk, S, D)  # batch stride 0
        v = t(B, S, Hk, D).transpose(1, 2)
        mask = t(L, S).expand(B, Hq, L, S)  # broadcast float mask
    else:
        q, k, v, mask = t(B, Hq, L, D), t(B, Hk, S, D), t(B, Hk, S, D), t(B, Hq, L, S)
    return q, k, v, mask


def _ctc_args(device: str, dtype, from_logits: bool, strided: bool):
    import torch

    g = torch.Generator().manual_seed(12)
    T, N, C, S = 23, 3, 9, 6
    x = torch.randn(T, N, C, generator=g, dtype=torch.float64)
    if not from_logits:
        x = x.log_softmax(-1)
    x = x.to(device=device, dtype=dtype)
    targets = torch.randint(1, C, (N, S), generator=g).to(device)
    if strided:
        il = torch.tensor(T, device=device).expand(N)  # stride-0 lengths
    else:
        il = torch.tensor([T, T - 4, T - 9], device=device)
    tl = torch.tensor([S, S - 2, 3], device=device)
    return x, targets, il, tl


def _opcheck(ctx: Context, op, args) -> None:
    import torch

    # The dry run leaves out the AOT-dispatch test (a trace and compile of its own, ~1 s a call on CPU): it
    # proves this code path, the GPU run checks everything.
    utils = ("test_schema", "test_autograd_registration", "test_faketensor") if ctx.dry_run else None
    if utils is None:
        torch.library.opcheck(op, args)
    else:
        torch.library.opcheck(op, args, test_utils=utils)


def opcheck(ctx: Context) -> None:
    import torch

    import seqfast

    if ctx.dry_run and not seqfast.EXTENSION_AVAILABLE:
        ctx.record("every op", "skip", error="dry run without the C++ extension: the CPU ops cannot run")
        return
    ops = torch.ops.seqfast
    dtype = torch.float32 if ctx.dry_run else torch.bfloat16
    seed = torch.tensor(7)

    for strided in (False, True):
        layout = "strided/broadcast" if strided else "contiguous"

        def attention_forward(c: Case, strided=strided) -> None:
            q, k, v, mask = _attention_args(ctx.device, strided, dtype)
            leaves = [x.detach().requires_grad_() for x in (q, k, v)]
            _opcheck(ctx, ops.attention_forward, (*leaves, mask, 0.0, 1, 0.125, seed))
            if not ctx.dry_run:  # the dry run proves the code path once; the GPU run checks every form
                _opcheck(ctx, ops.attention_forward, (*leaves, None, 0.25, 0, 0.125, seed))
                _opcheck(ctx, ops.attention_forward, (*leaves, mask > 0, 0.0, 2, 0.125, seed))

        def attention_backward(c: Case, strided=strided) -> None:
            q, k, v, mask = _attention_args(ctx.device, strided, dtype)
            out, lse = ops.attention_forward(q, k, v, mask, 0.0, 0, 0.125, seed)
            go = torch.randn_like(out)
            _opcheck(ctx, ops.attention_backward, (go, q, k, v, mask, out, lse, 0.0, 0, 0.125, seed, True))
            out, lse = ops.attention_forward(q, k, v, None, 0.2, 1, 0.125, seed)
            _opcheck(ctx, ops.attention_backward, (go, q, k, v, None, out, lse, 0.2, 1, 0.125, seed, False))

        def varlen(c: Case, strided=strided) -> None:
            g = torch.Generator().manual_seed(13)
            H, D = 4, 64
            cu_q = torch.tensor([0, 5, 5, 22], device=ctx.device)
            cu_k = torch.tensor([0, 9, 12, 40], device=ctx.device)
            if strided:
                vq = torch.randn(H, 22, D, generator=g).to(ctx.device, dtype).transpose(0, 1)
                vk = torch.randn(40, 1, D, generator=g).to(ctx.device, dtype).expand(40, H, D)
            else:
                vq = torch.randn(22, H, D, generator=g).to(ctx.device, dtype)
                vk = torch.randn(40, H, D, generator=g).to(ctx.device, dtype)
            leaves = [vq.detach().requires_grad_(), vk.detach().requires_grad_()]
            args = (leaves[0], leaves[1], leaves[1], cu_q, cu_k, 17, 28, 2, 0.125)
            _opcheck(ctx, ops.varlen_attention_forward, args)
            out, lse = ops.varlen_attention_forward(vq, vk, vk, cu_q, cu_k, 17, 28, 2, 0.125)
            _opcheck(ctx, ops.varlen_attention_backward,
                                  (torch.randn_like(out), vq, vk, vk, cu_q, cu_k, 17, 28, out, lse, 2, 0.125))

        def ctc(c: Case, strided=strided) -> None:
            for ctc_dtype in (torch.float32, torch.float64) if not ctx.dry_run else (torch.float64,):
                for from_logits in (False, True) if not ctx.dry_run else (strided,):
                    x, tg, il, tl = _ctc_args(ctx.device, ctc_dtype, from_logits, strided)
                    args = (x.detach().requires_grad_(), tg, il, tl, 0, False, from_logits, True)
                    _opcheck(ctx, ops.ctc_loss_forward, args)
                    nll, alpha = ops.ctc_loss_forward(x, tg, il, tl, 0, False, from_logits, True)
                    _opcheck(ctx, ops.ctc_loss_forward, (x, tg, il, tl, 0, False, from_logits, False))
                    grad_nll = torch.ones(1, dtype=nll.dtype, device=ctx.device).expand(3) if strided else \
                        torch.ones(3, dtype=nll.dtype, device=ctx.device)
                    _opcheck(ctx, ops.ctc_loss_backward,
                                          (grad_nll, x, tg, il, tl, nll, alpha, 0, False, from_logits))

        ctx.run(f"attention_forward {layout}", attention_forward, min_seconds=3.0)
        ctx.run(f"attention_backward {layout}", attention_backward, min_seconds=3.0)
        ctx.run(f"varlen_attention_forward/backward {layout}", varlen, min_seconds=3.0)
        ctx.run(f"ctc_loss_forward/backward {layout}", ctc, min_seconds=3.0)
    ctx.run("torch.func grad / vmap(grad)", lambda c: functorch_grads(ctx, c), min_seconds=3.0)


def functorch_grads(ctx: Context, c: Case) -> None:
    """torch.func.grad and vmap(grad) (per-sample gradients) through the public functions with the default
    backend (the Triton kernels on CUDA, the C++ ones in a dry run): equal to eager autograd's gradients (the
    same kernels and formula), and near torch's own torch.func result."""
    import torch
    import torch.nn.functional as F

    import seqfast
    from gpu.runtime import max_abs, max_abs_err

    g = torch.Generator().manual_seed(14)
    q, k, v = (torch.randn(3, 4, 37, 64, generator=g).to(ctx.device) for _ in range(3))

    def loss(f):
        return lambda q, k, v: f(q, k, v, is_causal=True).square().sum()

    ours = torch.func.grad(loss(seqfast.scaled_dot_product_attention), argnums=(0, 1, 2))(q, k, v)
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    eager = torch.autograd.grad(loss(seqfast.scaled_dot_product_attention)(*leaves), leaves)
    theirs = torch.func.grad(loss(F.scaled_dot_product_attention), argnums=(0, 1, 2))(q, k, v)
    for name, a, b, t in zip(("dq", "dk", "dv"), ours, eager, theirs):
        c.check(torch.equal(a, b), f"attention {name}: torch.func.grad differs from eager autograd "
                                   f"(max diff {max_abs_err(a, b):.3g})")
        c.check(max_abs_err(a, t) <= 2e-2 * max(max_abs(t), 1e-6), f"attention {name}: torch.func.grad off torch's "
                                                                   f"by {max_abs_err(a, t):.3g}")
    per_sample = [torch.vmap(torch.func.grad(lambda q1, f=f: f(q1, k[0], v[0]).square().sum()))(q)
                  for f in (seqfast.scaled_dot_product_attention, F.scaled_dot_product_attention)]
    c.check(max_abs_err(*per_sample) <= 2e-2 * max(max_abs(per_sample[1]), 1e-6),
            f"attention vmap(grad) off torch's by {max_abs_err(*per_sample):.3g}")
    x, tg, il, tl = _ctc_args(ctx.device, torch.float32, False, False)
    ours = torch.func.grad(lambda x: seqfast.ctc_loss(x, tg, il, tl))(x)
    leaf = x.detach().clone().requires_grad_()
    seqfast.ctc_loss(leaf, tg, il, tl).backward()
    theirs = torch.func.grad(lambda x: F.ctc_loss(x, tg, il, tl))(x)
    c.check(torch.equal(ours, leaf.grad), f"ctc_loss: torch.func.grad differs from eager autograd "
                                          f"(max diff {max_abs_err(ours, leaf.grad):.3g})")
    c.check(max_abs_err(ours, theirs) <= 1e-4, f"ctc_loss: torch.func.grad off torch's by "
                                               f"{max_abs_err(ours, theirs):.3g}")
    # vmap over the CTC loss: its batching rules fold the vmapped dimension into the kernels' batch (torch loops).
    xs = torch.stack([x, x.flip(0)])
    per_sample = [torch.vmap(torch.func.grad(lambda u, f=f: f(u, tg, il, tl)))(xs) for f in (seqfast.ctc_loss,
                                                                                              F.ctc_loss)]
    c.check(max_abs_err(*per_sample) <= 1e-4, f"ctc_loss vmap(grad) off torch's by {max_abs_err(*per_sample):.3g}")
    leaf = x.detach().clone().requires_grad_()
    through = [torch.autograd.grad(torch.vmap(lambda u, f=f: f(u, tg, il, tl))(torch.stack([leaf, leaf * 2])).sum(),
                                   leaf)[0] for f in (seqfast.ctc_loss, F.ctc_loss)]
    c.check(max_abs_err(*through) <= 1e-4, f"ctc_loss: autograd through vmap off torch's by "
                                           f"{max_abs_err(*through):.3g}")
