"""Timings: attention against torch's SDPA backends (``attention_timing``), CTC against torch's CUDA kernel
(``ctc_timing``), and the per-kernel split of one step under the profiler (``profile_split``).

Medians from ``triton.testing.do_bench`` (CUDA events, L2 flushed between calls); cases run in priority order
until the group's time is up. Attention FLOPs: 4 B H Lq Lk D forward (half of it causal, for Lq = Lk), 3.5x
that for forward+backward (five matmuls against two); the peak quoted is the H200's datasheet dense
bfloat16 / float16 tensor-core rate, 989 TFLOP/s (SXM), a label, not a measurement.
"""

from __future__ import annotations

from dataclasses import dataclass

from gpu.runtime import Case, Context

H200_PEAK_TFLOPS = 989.0  # datasheet: H200 SXM dense BF16/FP16 tensor core (1979 with sparsity)
FWD, FWD_BWD = "fwd", "fwd+bwd"


@dataclass(frozen=True)
class AttnShape:
    dtype: str
    B: int
    Hq: int
    Hk: int
    Lq: int
    Lk: int
    D: int
    causal: bool
    direction: str
    tag: str = ""

    @property
    def label(self) -> str:
        heads = f"H{self.Hq}" if self.Hq == self.Hk else f"Hq{self.Hq} Hk{self.Hk}"
        lens = f"L{self.Lq}" if self.Lq == self.Lk else f"Lq{self.Lq} Lk{self.Lk}"
        return (f"{self.tag}{self.dtype} B{self.B} {heads} {lens} D{self.D} {'causal' if self.causal else 'dense'} "
                f"{self.direction}")

    def flops(self) -> float:
        f = 4.0 * self.B * self.Hq * self.Lq * self.Lk * self.D
        if self.causal and self.Lq == self.Lk:
            f /= 2
        return f * (3.5 if self.direction == FWD_BWD else 1.0)


def attention_shapes(dry_run: bool) -> list[AttnShape]:
    """Priority order: bf16 training shapes (16k tokens a batch), then decode, GQA, fp16, D=256, small."""
    if dry_run:
        # float16: Triton's interpreter mishandles bfloat16.
        return [AttnShape("fp16", 1, 2, 2, 32, 32, 16, c, d) for c in (False, True) for d in (FWD, FWD_BWD)] + [
            AttnShape("fp16", 4, 4, 2, 1, 48, 16, False, FWD, "decode "),
        ]
    shapes = []

    def training(dtype, D, lengths, directions=(FWD, FWD_BWD)):
        H = 2048 // D  # model width 2048
        for L in lengths:
            for causal in (False, True):
                for d in directions:
                    shapes.append(AttnShape(dtype, max(1, 16384 // L), H, H, L, L, D, causal, d))

    training("bf16", 128, (1024, 4096, 16384))
    training("bf16", 64, (1024, 4096, 16384))
    for Lk in (4096, 16384):
        shapes.append(AttnShape("bf16", 32, 32, 8, 1, Lk, 128, False, FWD, "decode "))
    for d in (FWD, FWD_BWD):
        shapes.append(AttnShape("bf16", 4, 32, 8, 4096, 4096, 128, True, d, "GQA "))
    training("fp16", 128, (2048, 8192))
    training("bf16", 256, (2048, 8192))
    for d in (FWD, FWD_BWD):
        shapes.append(AttnShape("bf16", 1, 8, 8, 128, 128, 64, False, d, "small "))
    shapes.append(AttnShape("bf16", 64, 32, 8, 1, 2048, 128, False, FWD, "decode "))
    training("bf16", 128, (2048, 8192))
    training("fp16", 64, (2048, 8192))
    return shapes


def _providers(ctx: Context) -> list[tuple[str, object]]:
    """(label, sdpa backend or None for seqfast): seqfast, torch flash, torch cuDNN (each where it exists)."""
    from torch.nn.attention import SDPBackend

    providers: list[tuple[str, object]] = [("seqfast", None)]
    for label, name in (("flash", "FLASH_ATTENTION"), ("cudnn", "CUDNN_ATTENTION")):
        backend = getattr(SDPBackend, name, None)
        if backend is not None and not (ctx.dry_run and label == "cudnn"):
            providers.append((label, backend))
    return providers


def _attention_fn(ctx: Context, provider, s: AttnShape):
    """(fn, tensors to clear the grad of) for one provider and shape."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    import seqfast

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[s.dtype]
    need_grad = s.direction == FWD_BWD
    q = torch.randn(s.B, s.Hq, s.Lq, s.D, device=ctx.device, dtype=dtype, requires_grad=need_grad)
    k = torch.randn(s.B, s.Hk, s.Lk, s.D, device=ctx.device, dtype=dtype, requires_grad=need_grad)
    v = torch.randn(s.B, s.Hk, s.Lk, s.D, device=ctx.device, dtype=dtype, requires_grad=need_grad)
    gqa = s.Hq != s.Hk
    go = torch.randn(s.B, s.Hq, s.Lq, s.D, device=ctx.device, dtype=dtype)
    if provider is None:
        backend_ctx = ctx.seqfast_backend

        def call():
            with backend_ctx():
                return seqfast.scaled_dot_product_attention(q, k, v, is_causal=s.causal, enable_gqa=gqa)
    else:
        def call():
            with sdpa_kernel(provider):
                return F.scaled_dot_product_attention(q, k, v, is_causal=s.causal, enable_gqa=gqa)

    if need_grad:
        def fn():
            call().backward(go)
        return fn, [q, k, v]

    def fn_fwd():
        with torch.no_grad():
            return call()
    return fn_fwd, None


def attention_timing(ctx: Context) -> None:
    import torch

    providers = _providers(ctx)
    for shape in attention_shapes(ctx.dry_run):
        def case(c: Case, shape=shape) -> None:
            c.metrics["tflop"] = round(shape.flops() / 1e12, 3)
            best_torch = None
            for label, backend in providers:
                try:
                    fn, grads = _attention_fn(ctx, backend, shape)
                    fn()  # compiles (seqfast) or refuses the shape (torch backends)
                    ctx.synchronize()
                    t = ctx.bench(fn, grad_to_none=grads)
                except Exception as exc:  # noqa: BLE001 (a backend that cannot run this shape is a fact)
                    if label == "seqfast":
                        raise
                    c.metrics[f"{label}_ms"] = None
                    c.metrics[f"{label}_note"] = str(exc).strip().splitlines()[0][:120] if str(exc) else repr(exc)
                    continue
                ms = t["median_ms"]
                c.metrics[f"{label}_ms"] = round(ms, 4)
                c.metrics[f"{label}_tflops"] = round(shape.flops() / (ms * 1e-3) / 1e12, 1)
                if label == "seqfast":
                    c.metrics["seqfast_p20_p80_ms"] = f"{t['p20_ms']:.4f}-{t['p80_ms']:.4f}"
                    c.metrics["seqfast_pct_h200_peak"] = round(100 * shape.flops() / (ms * 1e-3) / 1e12
                                                               / H200_PEAK_TFLOPS, 1)
                elif best_torch is None or ms < best_torch:
                    best_torch = ms
                c.metrics["timer"] = t["timer"]
                torch.cuda.empty_cache() if not ctx.dry_run else None
            if best_torch is not None and c.metrics.get("seqfast_ms"):
                c.metrics["speedup_vs_best_torch"] = round(best_torch / c.metrics["seqfast_ms"], 3)

        ctx.run(shape.label, case, min_seconds=4.0)
    ctx.record("peak used for %", "ok", {"h200_dense_bf16_tflops": H200_PEAK_TFLOPS,
                                         "source": "NVIDIA H200 datasheet (SXM, dense, no sparsity)"})


# --------------------------------------------------------------------------------------------- CTC


CTC_SHAPES = ((500, 16, 32, 100), (1000, 32, 1000, 200), (200, 64, 5000, 50), (4000, 8, 64, 1200),
              (500, 256, 32, 100), (1000, 256, 1000, 200))


def _ctc_fns(ctx: Context, T: int, N: int, C: int, S: int, direction: str, from_logits: bool):
    import torch
    import torch.nn.functional as F

    import seqfast

    x = torch.randn(T, N, C, device=ctx.device)
    if not from_logits:
        x = x.log_softmax(2)
    x.requires_grad_(direction == FWD_BWD)
    targets = torch.randint(1, C, (N, S), device=ctx.device)
    il = torch.full((N,), T, dtype=torch.int64, device=ctx.device)
    tl = torch.full((N,), S, dtype=torch.int64, device=ctx.device)
    sf = seqfast.ctc_loss_from_logits if from_logits else seqfast.ctc_loss

    def seqfast_loss():
        with ctx.seqfast_backend():
            return sf(x, targets, il, tl)

    def torch_loss():
        return F.ctc_loss(x.log_softmax(2) if from_logits else x, targets, il, tl)

    fns = {}
    for label, loss in (("seqfast", seqfast_loss), ("torch", torch_loss)):
        if direction == FWD_BWD:
            fns[label] = (lambda loss=loss: loss().backward())
        else:
            def fwd(loss=loss):
                with torch.no_grad():
                    return loss()
            fns[label] = fwd
    return fns, ([x] if direction == FWD_BWD else None)


def ctc_timing(ctx: Context) -> None:
    shapes = CTC_SHAPES if not ctx.dry_run else ((6, 2, 5, 2),)
    for from_logits in (False, True):
        for T, N, C, S in shapes:
            for direction in (FWD, FWD_BWD):
                name = f"{'from_logits ' if from_logits else ''}T{T} N{N} C{C} S{S} {direction}"

                def case(c: Case, T=T, N=N, C=C, S=S, direction=direction, from_logits=from_logits) -> None:
                    fns, grads = _ctc_fns(ctx, T, N, C, S, direction, from_logits)
                    for label, fn in fns.items():
                        fn()
                        ctx.synchronize()
                        t = ctx.bench(fn, grad_to_none=grads)
                        c.metrics[f"{label}_ms"] = round(t["median_ms"], 4)
                        c.metrics[f"{label}_us_per_step"] = round(t["median_ms"] * 1e3 / T, 3)
                        c.metrics["timer"] = t["timer"]
                    c.metrics["speedup_vs_torch"] = round(c.metrics["torch_ms"] / c.metrics["seqfast_ms"], 3)

                if ctx.dry_run and (direction == FWD) != from_logits:
                    continue  # dry run: log_probs fwd+bwd and from_logits fwd cover the code
                ctx.run(name, case, min_seconds=3.0)
            if from_logits:
                break  # from_logits: the first shape only (the rest is the same recursion)


# --------------------------------------------------------------------------------------------- profiler


def _split(prof, device_events: bool) -> dict:
    """{kernel or op name: microseconds} of the profiled step, largest first, with the share of the total."""
    events = list(prof.key_averages())
    if device_events:
        # The kernels themselves: an op that launches a kernel carries the same device time as its own
        # "self" time, so CPU-side entries would count it twice.
        kernels = [e for e in events if str(getattr(e, "device_type", "")).endswith("CUDA")]
        events = kernels or events
    rows = []
    for evt in events:
        if device_events:
            us = getattr(evt, "self_device_time_total", None)
            if us is None:
                us = getattr(evt, "self_cuda_time_total", 0)
        else:
            us = getattr(evt, "self_cpu_time_total", 0)
        if us and us > 0:
            rows.append((evt.key, float(us), int(getattr(evt, "count", 1))))
    rows.sort(key=lambda r: -r[1])
    total = sum(r[1] for r in rows) or 1.0
    return {"total_us": round(total, 1), "kernels": [
        {"name": name[:90], "us": round(us, 1), "pct": round(100 * us / total, 1), "calls": n}
        for name, us, n in rows[:12]]}


def profile_split(ctx: Context) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    import seqfast

    activities = [ProfilerActivity.CPU] + ([] if ctx.dry_run else [ProfilerActivity.CUDA])

    def attention(c: Case) -> None:
        B, H, L, D = (4, 16, 2048, 128) if not ctx.dry_run else (1, 2, 24, 16)
        dtype = torch.bfloat16 if not ctx.dry_run else torch.float16
        q, k, v = (torch.randn(B, H, L, D, device=ctx.device, dtype=dtype, requires_grad=True) for _ in range(3))

        def step():
            with ctx.seqfast_backend():
                seqfast.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

        step()
        ctx.synchronize()
        with profile(activities=activities) as prof:
            step()
            ctx.synchronize()
        c.metrics.update(shape=f"{str(dtype)[6:]} B{B} H{H} L{L} D{D} causal fwd+bwd", **_split(prof, not ctx.dry_run))

    def ctc(c: Case) -> None:
        T, N, C, S = (1000, 32, 1000, 200) if not ctx.dry_run else (6, 2, 5, 2)
        x = torch.randn(T, N, C, device=ctx.device).log_softmax(2).requires_grad_()
        targets = torch.randint(1, C, (N, S), device=ctx.device)
        il = torch.full((N,), T, device=ctx.device)
        tl = torch.full((N,), S, device=ctx.device)

        def step():
            with ctx.seqfast_backend():
                seqfast.ctc_loss(x, targets, il, tl).backward()

        step()
        ctx.synchronize()
        with profile(activities=activities) as prof:
            step()
            ctx.synchronize()
        c.metrics.update(shape=f"fp32 T{T} N{N} C{C} S{S} fwd+bwd", **_split(prof, not ctx.dry_run))

    ctx.run("attention fwd+bwd", attention, min_seconds=4.0)
    ctx.run("ctc_loss fwd+bwd", ctc, min_seconds=4.0)
