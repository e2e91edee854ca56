"""The machine and software (``facts``), and which of torch's SDPA backends run which dtype and head dim."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

from gpu.runtime import Case, Context

_SMI_FIELDS = ("name", "driver_version", "clocks.sm", "clocks.max.sm", "clocks.mem", "clocks.max.mem",
               "power.limit", "power.draw", "temperature.gpu", "memory.total", "memory.used", "pstate",
               "compute_mode", "mig.mode.current")


def _run(cmd: list[str], timeout: float = 10.0) -> str | None:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def software(c: Case) -> None:
    import torch
    import triton

    import seqfast

    root = Path(__file__).resolve().parents[2]
    c.metrics.update(
        python=platform.python_version(), torch=torch.__version__, triton=triton.__version__,
        cuda_runtime=torch.version.cuda, cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available()
        else None, seqfast=seqfast.__version__, seqfast_extension=seqfast.EXTENSION_AVAILABLE,
        git_commit=_run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"]),
        git_dirty=bool(_run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"])),
        cpu=_cpu_model(), cpu_count=os.cpu_count(), triton_interpret=os.environ.get("TRITON_INTERPRET"),
    )


def device(c: Case, ctx: Context) -> None:
    import torch

    if ctx.dry_run:
        c.skip("dry run: no GPU")
        return
    props = torch.cuda.get_device_properties(0)
    for name in dir(props):
        if name.startswith("_"):
            continue
        value = getattr(props, name, None)
        if isinstance(value, (int, float, str, bool)):
            c.metrics[name] = value
    c.metrics["compute_capability"] = "{}.{}".format(*torch.cuda.get_device_capability(0))
    c.metrics["total_memory_gib"] = round(props.total_memory / 2**30, 1)
    for fields in (_SMI_FIELDS, _SMI_FIELDS[:6]):  # an older driver may refuse a field: then the basic ones
        smi = _run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader"])
        if smi:
            first = smi.splitlines()[0].split(", ")
            c.metrics.update({f"smi_{k}": v for k, v in zip(fields, first)})
            break
    else:
        c.metrics["smi"] = "nvidia-smi not available"
    free, total = torch.cuda.mem_get_info()
    c.metrics["free_memory_gib"] = round(free / 2**30, 1)


def sdpa_backends(c: Case, ctx: Context, dtype_name: str, D: int) -> None:
    """For one dtype and head dim: which torch SDPA backend runs a causal fwd+bwd (B2 H4 L512)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dtype = getattr(torch, dtype_name)
    for label, name in (("flash", "FLASH_ATTENTION"), ("cudnn", "CUDNN_ATTENTION"),
                        ("efficient", "EFFICIENT_ATTENTION"), ("math", "MATH")):
        backend = getattr(SDPBackend, name, None)
        if backend is None:
            c.metrics[label] = "absent in this torch"
            continue
        if ctx.dry_run and label in ("cudnn", "efficient"):
            c.metrics[label] = "skip: needs CUDA"
            continue
        q, k, v = (torch.randn(2, 4, 512, D, device=ctx.device, dtype=dtype, requires_grad=True) for _ in range(3))
        try:
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
            ctx.synchronize()
            c.metrics[label] = "runs"
        except Exception as exc:  # noqa: BLE001 (a backend that refuses the case is the fact recorded)
            c.metrics[label] = "no: " + (str(exc).strip().splitlines() or [repr(exc)])[0][:150]


def facts(ctx: Context) -> None:
    ctx.run("software", software, min_seconds=1.0)
    ctx.run("device", lambda c: device(c, ctx), min_seconds=1.0)
    for dtype_name in ("float16", "bfloat16"):
        for D in (64, 128):
            ctx.run(f"torch SDPA backends {dtype_name} D{D} causal fwd+bwd",
                    lambda c, t=dtype_name, d=D: sdpa_backends(c, ctx, t, d), min_seconds=1.0)
