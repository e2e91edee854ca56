"""Registers, spills and shared memory of every compiled kernel variant that ran (``registers``).

Each worker, as it ends, records the variants held in its Triton JIT caches (``compiled_variants`` records,
see ``gpu_validate.py``); this group merges them, one record per distinct variant. When no earlier group left
any (all crashed, or a dry run, where the interpreter compiles nothing), it launches a few kernels itself.
"""

from __future__ import annotations

from gpu.runtime import Context, inventory, read_records

VARIANTS_RECORD = "compiled_variants"


def seqfast_kernel_modules() -> list:
    """The kernel modules this process has imported (no import here: only what ran)."""
    import sys

    return [m for name, m in sorted(sys.modules.items())
            if m is not None and (name.startswith("seqfast.kernels.") or name == "gpu.fake_tunable")]


def record_variants(ctx: Context) -> None:
    """Record this worker's compiled variants (called as a worker ends; nothing when there are none)."""
    variants = inventory(seqfast_kernel_modules())
    if variants:
        ctx.record(VARIANTS_RECORD, "ok", {"variants": variants})


def _launch_some(ctx: Context) -> None:
    import torch

    import seqfast

    for D in (64, 128):
        q, k, v = (torch.randn(1, 4, 256, D, device=ctx.device, dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        seqfast.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
    x = torch.randn(50, 4, 20, device=ctx.device).log_softmax(2).requires_grad_()
    seqfast.ctc_loss(x, torch.randint(1, 20, (4, 10), device=ctx.device), [50] * 4, [10] * 4).backward()
    ctx.synchronize()


def registers(ctx: Context) -> None:
    seen: dict[tuple, dict] = {}
    for rec in read_records(ctx.out_dir):
        if rec.get("name") != VARIANTS_RECORD:
            continue
        for v in rec.get("metrics", {}).get("variants", []):
            key = (v.get("kernel"), v.get("hash"), v.get("constexprs"))
            entry = seen.setdefault(key, dict(v, seen_in=[]))
            if rec["group"] not in entry["seen_in"]:
                entry["seen_in"].append(rec["group"])
    source = "earlier groups' JIT caches"
    if not seen and not ctx.dry_run:
        _launch_some(ctx)
        for v in inventory(seqfast_kernel_modules()):
            seen[(v.get("kernel"), v.get("hash"), v.get("constexprs"))] = dict(v, seen_in=["registers"])
        source = "this group's own launches (no earlier group recorded any)"
    if not seen:
        ctx.record("compiled variants", "skip",
                   error="no compiled kernels: the dry run runs Triton's interpreter, which compiles nothing")
        return
    for entry in sorted(seen.values(), key=lambda e: (str(e.get("kernel")), str(e.get("constexprs")))):
        metrics = {k: entry.get(k) for k in ("regs", "spills", "shared", "warps", "stages", "maxnreg",
                                             "constexprs", "hash")}
        metrics["seen_in"] = ",".join(entry["seen_in"])
        spills = entry.get("spills")
        # Triton's n_spills is the kernel's local memory (CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES) / 4.
        metrics["local_bytes"] = spills * 4 if isinstance(spills, int) else None
        status = "fail" if isinstance(spills, int) and spills > 0 else "ok"
        note = f"{spills} spilled (Triton n_spills: local memory, 4-byte words)" if status == "fail" else None
        ctx.record(f"{entry.get('kernel')} {entry.get('hash')}", status, metrics, error=note)
    ctx.record("variants counted", "ok", {"distinct_variants": len(seen), "source": source})
