"""Resource report of every Triton kernel config: registers, spills, shared memory, tensor-core instructions.

Compiles each config ahead of time for each GPU architecture (no GPU needed: Triton's compiler and the
ptxas / cuobjdump shipped in the triton wheel do it all on the host), then reads the cubin:

- ``registers``: ``cuobjdump -res-usage`` REG (per thread);
- ``spill_bytes``: bytes spilled to local memory as ptxas reports it (``-v``: the larger of spill stores
  and spill loads), or cuobjdump's LOCAL + STACK bytes where ptxas gives no figure (spilled registers
  live in the stack frame); ``local_bytes`` and ``stack_bytes`` are cuobjdump's LOCAL and STACK;
- ``shared_bytes``: the kernel's shared memory, from Triton's metadata;
- ``mma_instructions``: tensor-core instructions in the SASS (HMMA, HGMMA, IMMA, IGMMA, QGMMA), by opcode in
  ``mma_by_opcode``;
- ``ex2_inputs``: the instructions that compute ``MUFU.EX2``'s operands, by opcode (see ``ex2_inputs``).

Discovery: every ``kernels/*.py`` module that defines ``report_configs()``, which returns dicts with keys
``kernel`` (name), ``fn`` (the ``triton.jit`` function), ``signature`` ({arg: Triton type such as ``"*fp32"``,
``"i32"``, or ``"constexpr"``}), ``constexprs`` ({arg: value}), ``num_warps``, ``num_stages`` and ``config``
(a label); optionally ``attrs`` (ASTSource attributes; default: every pointer 16-byte aligned, as Triton
specialises them at launch) and ``options`` (more compiler options). Kernels must be compiled, not
interpreted: the command line switches ``TRITON_INTERPRET`` off. A config with ``archs`` (e.g. ``["sm_90"]``: an
entry of a per-architecture config table) is compiled only for those of the requested architectures.

Usage::

    python benchmarks/kernel_report.py [--arch sm_80,sm_90] [--json PATH] [--jsonl PATH]
                                       [--module NAME_OR_FILE ...] [--allow-spills] [--filter REGEX]

``--jsonl`` appends each row as soon as it is compiled (a full sweep takes tens of minutes on a small host:
an interrupted run keeps what it finished).

Exits non-zero when a config fails to compile or spills (``--allow-spills``: spills only warn). As a
library: ``report(modules_or_configs, archs) -> list[dict]``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

# Triton 3.9 warns once per process unless fp fusion is chosen explicitly; its default (on) is kept.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ARCHS = ("sm_80", "sm_90")
MMA_OPCODES = ("HMMA", "HGMMA", "IMMA", "IGMMA", "QGMMA")
CONFIG_KEYS = ("kernel", "fn", "signature", "constexprs", "num_warps", "num_stages", "config")
# One SASS instruction: /*0a30*/  [@P0 | @!UP1]  OPCODE.MODIFIERS  operands ; (opcode, modifiers, operands).
_SASS_INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)(\.[\w.]*)?\s+([^;]*);")
_RES_USAGE = re.compile(r"Function\s+(\S+):\s*\n\s*(.*)")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_arch(arch: str | int) -> int:
    """``"sm_80"``, ``"sm_90a"``, ``"90"`` or ``90`` -> compute capability 80 / 90."""
    m = re.fullmatch(r"(?:sm_)?(\d+)a?", str(arch).strip().lower())
    if not m:
        raise ValueError(f"unknown GPU architecture {arch!r}; expected e.g. sm_80 or sm_90")
    return int(m.group(1))


def _nvidia_tool(name: str) -> str:
    import triton

    path = Path(triton.__file__).resolve().parent / "backends" / "nvidia" / "bin" / name
    if not path.is_file():
        raise FileNotFoundError(f"{name} not found at {path}: this triton wheel ships no NVIDIA tools")
    return str(path)


def _ptxas(capability: int) -> str:
    from triton.backends.nvidia.compiler import get_ptxas  # the ptxas Triton itself uses for this arch

    return get_ptxas(capability).path


def parse_res_usage(text: str) -> dict[str, int]:
    """``cuobjdump -res-usage`` -> {"REG": .., "STACK": .., "SHARED": .., "LOCAL": .., ...} of the kernel."""
    m = _RES_USAGE.search(text)
    if not m:
        raise ValueError(f"no function in cuobjdump -res-usage output:\n{text}")
    fields = {}
    for item in m.group(2).split():
        key, _, value = item.partition(":")
        if value.isdigit():
            fields[key] = int(value)
    return fields


def count_mma(sass: str) -> Counter:
    """Tensor-core instructions in ``cuobjdump -sass`` output, by opcode."""
    return Counter(m.group(1) for m in _SASS_INSTRUCTION.finditer(sass) if m.group(1) in MMA_OPCODES)


def ex2_inputs(sass: str, window: int = 600) -> Counter:
    """For each ``MUFU.EX2``, the opcode of the nearest earlier instruction (within ``window``) that writes its
    operand register; ``"?"`` where none is found in straight-line order.

    Why: a softmax's ``exp2(s - m)`` is exact at the row's maximum only if ``s`` is the rounded score that ``m``
    was taken from. An ``FFMA`` there means the compiler contracted the scaling multiply into the subtraction, so
    the maximum's own exponent becomes the product's rounding error, which overflows exp2 at huge scales."""
    code = [(m.group(1), m.group(2) or "", [a.strip() for a in m.group(3).split(",")])
            for m in _SASS_INSTRUCTION.finditer(sass)]
    counts: Counter = Counter()
    for i, (opcode, modifiers, operands) in enumerate(code):
        if opcode != "MUFU" or not modifiers.startswith(".EX2") or len(operands) < 2:
            continue
        source = operands[1].lstrip("-|").split(".")[0]
        for j in range(i - 1, max(i - 1 - window, -1), -1):
            if code[j][2] and code[j][2][0] == source:
                counts[code[j][0]] += 1
                break
        else:
            counts["?"] += 1
    return counts


def _ptxas_spills(ptx: str, capability: int, workdir: Path) -> tuple[int, int, int] | None:
    """(stack frame, spill stores, spill loads) bytes from ``ptxas -v``, or None when it says nothing."""
    target = re.search(r"^\s*\.target\s+(sm_\w+)", ptx, re.MULTILINE)
    gpu = target.group(1) if target else f"sm_{capability}"
    src, out = workdir / "kernel.ptx", workdir / "ptxas.cubin"
    src.write_text(ptx)
    # --regAllocOptLevel=2 as Triton passes it, so the allocation matches the cubin Triton built.
    proc = subprocess.run([_ptxas(capability), "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}", str(src),
                           "-o", str(out)], capture_output=True, text=True)
    if proc.returncode != 0:
        return None
    m = _PTXAS_SPILL.search(proc.stderr + proc.stdout)
    return tuple(int(g) for g in m.groups()) if m else None


def triton_interprets() -> bool:
    """Whether triton was imported with its interpreter on: its own library functions (``tl.cdiv``, the
    reductions' combine functions) were then decorated as interpreted functions, and nothing that calls them
    can be compiled in this process."""
    from triton.language import standard
    from triton.runtime.jit import JITFunction

    return not isinstance(standard.cdiv, JITFunction)


def _jit_function(fn: Any, kernel: str):
    from triton.runtime.jit import JITFunction

    while not isinstance(fn, JITFunction) and type(fn).__name__ in ("Autotuner", "Heuristics"):
        fn = fn.fn  # triton.autotune / triton.heuristics wrap the jit function
    if isinstance(fn, JITFunction):
        return fn
    raise TypeError(
        f"{kernel}: fn is {type(fn).__name__}, not a compiled triton.jit function; kernels decorated under "
        "TRITON_INTERPRET=1 cannot be compiled: run the report in a process without it "
        "(python benchmarks/kernel_report.py switches it off)"
    )


def aligned_pointers(fn: Any, signature: dict[str, str]) -> dict[tuple[int], list[list[Any]]]:
    """Triton's launch-time specialisation of 16-byte aligned pointers (torch's allocations are), as ASTSource
    ``attrs``: without it the kernel compiles for arbitrary alignment, with narrower loads than it runs with."""
    return {(fn.arg_names.index(name),): [["tt.divisibility", 16]]
            for name, ty in signature.items() if ty.startswith("*")}


def compile_config(cfg: dict[str, Any], arch: str | int, ptxas_spills: bool = True) -> dict[str, Any]:
    """Compile one config for one architecture and read its resources; errors land in ``row["error"]``.

    ``ptxas_spills=False`` skips the second ``ptxas -v`` run (a third to half of a large kernel's time): the
    spill figure is then cuobjdump's LOCAL + STACK, never below the spill bytes (0 means no spills)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    capability = parse_arch(arch)
    row: dict[str, Any] = {
        "kernel": cfg["kernel"], "config": cfg["config"], "arch": f"sm_{capability}",
        "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"],
        "registers": None, "spill_bytes": None, "shared_bytes": None, "mma_instructions": None,
        "local_bytes": None, "stack_bytes": None, "mma_by_opcode": {}, "ex2_inputs": {}, "error": None,
    }
    try:
        fn = _jit_function(cfg["fn"], cfg["kernel"])
        options = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"], "enable_fp_fusion": True}
        options.update(cfg.get("options", {}))
        src = ASTSource(fn=fn, signature=dict(cfg["signature"]), constexprs=dict(cfg["constexprs"]),
                        attrs=cfg["attrs"] if "attrs" in cfg else aligned_pointers(fn, cfg["signature"]))
        compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32), options=options)
        with tempfile.TemporaryDirectory(prefix="seqfast-report-") as tmp:
            workdir = Path(tmp)
            cubin = workdir / "kernel.cubin"
            cubin.write_bytes(compiled.asm["cubin"])
            cuobjdump = _nvidia_tool("cuobjdump")
            usage = parse_res_usage(subprocess.run([cuobjdump, "-res-usage", str(cubin)], capture_output=True,
                                                   text=True, check=True).stdout)
            sass = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True,
                                  check=True).stdout
            spills = _ptxas_spills(compiled.asm["ptx"], capability, workdir) if ptxas_spills else None
    except Exception as exc:  # a failed config is a row of the report, not the end of it
        row["error"] = f"{type(exc).__name__}: {exc}".strip()
        return row
    mma = count_mma(sass)
    row.update(
        ex2_inputs=dict(sorted(ex2_inputs(sass).items())),
        registers=usage.get("REG", 0),
        local_bytes=usage.get("LOCAL", 0),
        stack_bytes=usage.get("STACK", 0),
        spill_bytes=max(spills[1], spills[2]) if spills else usage.get("LOCAL", 0) + usage.get("STACK", 0),
        shared_bytes=int(compiled.metadata.shared),
        mma_instructions=sum(mma.values()),
        mma_by_opcode=dict(sorted(mma.items())),
    )
    return row


def _check_config(cfg: Any, origin: str) -> dict[str, Any]:
    if not isinstance(cfg, dict) or any(k not in cfg for k in CONFIG_KEYS):
        missing = [k for k in CONFIG_KEYS if not isinstance(cfg, dict) or k not in cfg]
        raise ValueError(f"{origin}: report config lacks keys {missing}: {cfg!r}")
    return cfg


def configs_of(items: ModuleType | dict | Iterable[ModuleType | dict]) -> list[dict[str, Any]]:
    """Flatten modules (their ``report_configs()``) and config dicts into a list of configs."""
    if isinstance(items, (ModuleType, dict)):
        items = [items]
    configs = []
    for item in items:
        if isinstance(item, ModuleType):
            if not hasattr(item, "report_configs"):
                raise ValueError(f"module {item.__name__} defines no report_configs()")
            configs += [_check_config(c, f"{item.__name__}.report_configs()") for c in item.report_configs()]
        else:
            configs.append(_check_config(item, "config"))
    return configs


def report(modules_or_configs: ModuleType | dict | Iterable[ModuleType | dict],
           archs: Sequence[str | int] = DEFAULT_ARCHS,
           on_row: Callable[[dict[str, Any]], None] | None = None, ptxas_spills: bool = True,
           skip: Callable[[dict[str, Any], str], bool] | None = None) -> list[dict[str, Any]]:
    """One row per (config, arch): kernel, config, arch, registers, spill_bytes, shared_bytes,
    mma_instructions (plus num_warps, num_stages, local_bytes, stack_bytes, mma_by_opcode, ex2_inputs, error).
    ``on_row`` is called with each row as soon as it is compiled; ``skip(cfg, arch)``: leave that pair out;
    ``ptxas_spills``: see :func:`compile_config`.

    Needs a process where triton was imported without ``TRITON_INTERPRET=1`` (see :func:`triton_interprets`).
    """
    if triton_interprets():
        raise RuntimeError(
            "triton was imported with TRITON_INTERPRET=1, so its kernels cannot be compiled in this process: "
            "run the report in a process without it (python benchmarks/kernel_report.py switches it off)"
        )
    rows = []
    for cfg in configs_of(modules_or_configs):
        for arch in archs:
            if targets(cfg, arch) and not (skip and skip(cfg, f"sm_{parse_arch(arch)}")):
                rows.append(compile_config(cfg, arch, ptxas_spills))
                if on_row is not None:
                    on_row(rows[-1])
    return rows


def targets(cfg: dict[str, Any], arch: str | int) -> bool:
    """Whether ``cfg`` is compiled for ``arch``: every arch, or only those its ``archs`` key names."""
    return "archs" not in cfg or parse_arch(arch) in {parse_arch(a) for a in cfg["archs"]}


def discover_modules() -> list[ModuleType]:
    """Every ``seqfast.kernels.<name>`` (``kernels/*.py``) that defines ``report_configs``."""
    sys.path.insert(0, str(ROOT))
    from seqfast._triton import _kernels_package

    package = _kernels_package()
    modules = []
    for path in sorted(Path(package.__path__[0]).glob("*.py")):
        if path.stem == "__init__":
            continue
        module = importlib.import_module(f"{package.__name__}.{path.stem}")
        if hasattr(module, "report_configs"):
            modules.append(module)
    return modules


def load_module(spec: str) -> ModuleType:
    """A module named on the command line: a ``.py`` file path or a dotted import name."""
    if spec.endswith(".py"):
        path = Path(spec).resolve()
        module_spec = importlib.util.spec_from_file_location(f"_report_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_spec.name] = module
        module_spec.loader.exec_module(module)
        return module
    return importlib.import_module(spec)


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


def format_table(rows: list[dict[str, Any]]) -> str:
    headers = ["kernel", "config", "arch", "warps", "stages", "regs", "spill B", "stack B", "local B", "smem B",
               "mma"]
    keys = ["kernel", "config", "arch", "num_warps", "num_stages", "registers", "spill_bytes", "stack_bytes",
            "local_bytes", "shared_bytes", "mma_instructions"]
    body = [[_cell(r[k]) for k in keys] for r in rows]
    widths = [max([len(h)] + [len(b[i]) for b in body]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)), "  ".join("-" * w for w in widths)]
    for r, b in zip(rows, body):
        line = "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(b, widths)))
        if r["error"]:
            # Triton's compilation errors end with the reason, after the source excerpt.
            reason = [x for x in r["error"].splitlines() if x.strip()][-1]
            line += f"  FAILED: {reason[:200]}"
        elif r["spill_bytes"]:
            line += "  SPILLS"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Compile every Triton kernel config and report its resources.")
    parser.add_argument("--arch", default=",".join(DEFAULT_ARCHS), help="comma-separated, e.g. sm_80,sm_90")
    parser.add_argument("--json", default=None, help="write the rows as JSON here")
    parser.add_argument("--jsonl", default=None, help="append each row here (one JSON object a line) as it is done")
    parser.add_argument("--module", action="append", default=[],
                        help="report this module (file.py or dotted name) instead of kernels/; repeatable")
    parser.add_argument("--resume", action="store_true",
                        help="with --jsonl: skip the (config, arch) pairs that file already holds")
    parser.add_argument("--no-ptxas-v", action="store_true",
                        help="spill bytes from cuobjdump's LOCAL + STACK (an upper bound) instead of a second "
                             "ptxas -v run per config: faster")
    parser.add_argument("--allow-spills", action="store_true", help="spills warn instead of failing")
    parser.add_argument("--filter", default=None,
                        help="only configs whose 'kernel config' matches this regex (re.search), e.g. 'dkdv.*sm90:'")
    args = parser.parse_args(argv)
    archs = [a for a in args.arch.split(",") if a.strip()]
    for a in archs:
        parse_arch(a)
    # Compiled, not interpreted: must hold before triton is first imported (by the kernel modules).
    os.environ["TRITON_INTERPRET"] = "0"

    modules = [load_module(m) for m in args.module] if args.module else discover_modules()
    configs = configs_of(modules)
    if args.filter:
        configs = [c for c in configs if re.search(args.filter, f"{c['kernel']} {c['config']}")]
    if not configs:
        print("kernel_report: no kernel configs: no kernels/*.py module defines report_configs()", file=sys.stderr)
        return 1
    print(f"kernel_report: {len(configs)} config(s) x {len(archs)} arch(s): {', '.join(archs)}", flush=True)
    on_row = None
    if args.jsonl:
        Path(args.jsonl).parent.mkdir(parents=True, exist_ok=True)

        def on_row(row: dict[str, Any]) -> None:
            with open(args.jsonl, "a") as f:
                f.write(json.dumps(row) + "\n")

    done: set[tuple[str, str, str]] = set()
    if args.resume and args.jsonl and Path(args.jsonl).exists():
        for line in Path(args.jsonl).read_text().splitlines():
            try:
                r = json.loads(line)
                done.add((r["kernel"], r["config"], r["arch"]))
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line

    rows = report(configs, archs, on_row, ptxas_spills=not args.no_ptxas_v,
                  skip=lambda cfg, arch: (cfg["kernel"], cfg["config"], arch) in done)
    print(format_table(rows))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
        print(f"json: {args.json}")
    failed = [r for r in rows if r["error"]]
    spilled = [r for r in rows if not r["error"] and r["spill_bytes"]]
    for r in failed:
        print(f"FAILED {r['kernel']} [{r['config']}] {r['arch']}:\n{r['error']}", file=sys.stderr)
    for r in spilled:
        print(f"{'warning' if args.allow_spills else 'error'}: {r['kernel']} [{r['config']}] {r['arch']} spills "
              f"{r['spill_bytes']} bytes", file=sys.stderr)
    return 1 if failed or (spilled and not args.allow_spills) else 0


if __name__ == "__main__":
    sys.exit(main())
