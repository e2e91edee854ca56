"""``python -m seqfast.info [--json]``: what seqfast runs with, to paste into a bug report.

Versions (seqfast, torch and the torch the C++ extension was built against, triton, Python), the CPU
and the vector ISA the kernels use, the settings read from the environment, the extension (its file,
whether it loaded and why not, how it was built) and the GPU side (CUDA devices, whether the Triton
kernels can run). :func:`collect` returns the same as a dict. A missing or broken extension is
reported, not fatal.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import sys
from typing import Any

import torch

import seqfast
from seqfast import _extension, _triton

# Environment settings read at run time, with what applies when they are unset.
SETTINGS = {
    "SEQFAST_BACKEND": "auto",
    "SEQFAST_CPU_ISA": "the widest the CPU has",
    "SEQFAST_CPU_BUFFER_CACHE_MB": "1024",
    "TRITON_INTERPRET": "0",
}

# csrc/build_info.cpp keeps this line in the library file, readable without loading it.
_STAMP = re.compile(rb"seqfast-build-info: seqfast=(\S+) torch=(\S+) type=(\w+)")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _triton_version() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return None
    for dist in ("triton", "pytorch-triton", "pytorch-triton-rocm"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return "unknown version"


def _extension_path() -> str | None:
    module = sys.modules.get("seqfast._C")
    if module is not None:
        return module.__file__
    try:
        spec = importlib.util.find_spec("seqfast._C")
    except (ImportError, ValueError):
        return None
    return spec.origin if spec is not None else None


def _stamp(path: str | None) -> dict[str, str] | None:
    """The build stamp read from the library file: the part of build_info() known without loading it."""
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            match = _STAMP.search(f.read())
    except OSError:
        return None
    if match is None:
        return None
    seqfast_version, torch_version, build_type = (group.decode() for group in match.groups())
    return {"seqfast_version": seqfast_version, "torch_version": torch_version, "build_type": build_type}


def _public(version: str) -> str:
    return version.split("+", 1)[0]


def collect() -> dict[str, Any]:
    """Everything ``python -m seqfast.info`` prints, as a JSON-serialisable dict."""
    ext = importlib.import_module("seqfast._C") if _extension.AVAILABLE else None
    ext_path = _extension_path()
    if ext is not None and hasattr(ext, "build_info"):
        build = dict(ext.build_info())
    else:  # not loaded, or built before build_info existed
        build = _stamp(ext_path)
    isa_supported = getattr(ext, "cpu_isa_supported", None)  # None: not loaded, or an older build
    triton_version = _triton_version()
    cuda_available = torch.cuda.is_available()
    cuda_devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda_available else []

    if triton_version is None:
        triton_usable, triton_note = False, "triton is not installed (pip install triton)"
    elif cuda_available:
        triton_usable, triton_note = True, "on CUDA tensors"
    elif _triton.interpreter_enabled():
        triton_usable, triton_note = True, "through Triton's interpreter on CPU tensors (TRITON_INTERPRET=1; slow)"
    else:
        triton_usable, triton_note = False, "no CUDA GPU; TRITON_INTERPRET=1 runs them on CPU tensors (interpreted)"

    warnings = []
    torch_version = str(torch.__version__)
    built_against = build.get("torch_version") if build else None
    if built_against is not None and _public(built_against) != _public(torch_version):
        warnings.append(f"the extension was built against torch {built_against} but torch {torch_version} is "
                        f"installed; rebuild it ({_extension.BUILD_HINT})")
    if build is not None and build.get("seqfast_version") != seqfast.__version__:
        warnings.append(f"the extension was built for seqfast {build.get('seqfast_version')}, this is seqfast "
                        f"{seqfast.__version__}; rebuild it ({_extension.BUILD_HINT})")
    if not _extension.AVAILABLE:
        warnings.append(f"the C++ extension did not load, CPU calls raise ExtensionNotBuiltError; "
                        f"{_extension.BUILD_HINT}")

    return {
        "seqfast_version": seqfast.__version__,
        "seqfast_path": os.path.dirname(os.path.abspath(seqfast.__file__)),
        "torch_version": torch_version,
        "torch_built_against": built_against,
        "triton_version": triton_version or "not installed",
        "python_version": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_isa": ext.cpu_isa() if ext is not None else None,
        "cpu_isa_supported": isa_supported() if isa_supported is not None else None,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "settings": {name: os.environ.get(name) for name in SETTINGS},
        "extension_loaded": _extension.AVAILABLE,
        "extension_error": _extension.LOAD_ERROR or None,
        "extension_path": ext_path,
        "build_info": build,
        "cuda_available": cuda_available,
        "cuda_version": torch.version.cuda,
        "cuda_devices": cuda_devices,
        "triton_usable": triton_usable,
        "triton_note": triton_note,
        "warnings": warnings,
    }


def format_text(info: dict[str, Any]) -> str:
    """The aligned plain-text form."""
    build = info["build_info"] or {}
    isa = info["cpu_isa"] or "unknown, extension not loaded"
    supported = [f"torch: {info['torch_cpu_capability']}"]
    if info["cpu_isa_supported"] is not None:
        supported.insert(0, f"CPU has {info['cpu_isa_supported']}")
    if info["extension_loaded"]:
        extension = "loaded"
    else:
        extension = f"NOT LOADED: {info['extension_error']}"
    rows = [
        ("seqfast", f"{info['seqfast_version']} ({info['seqfast_path']})"),
        ("torch", info["torch_version"]),
        ("torch built against", info["torch_built_against"] or "unknown"),
        ("triton", info["triton_version"]),
        ("python", info["python_version"]),
        ("platform", info["platform"]),
        ("cpu", f"{info['cpu_model']} ({info['cpu_threads']} torch threads)"),
        ("cpu isa", f"{isa} ({', '.join(supported)})"),
    ]
    rows += [(name, value if value is not None else f"(unset: {SETTINGS[name]})")
             for name, value in info["settings"].items()]
    rows += [
        ("extension", extension),
        ("extension path", info["extension_path"] or "not found (not built?)"),
    ]
    if "compiler" in build:
        rows += [
            ("build", f"{build['build_type']}, seqfast {build['seqfast_version']}, torch {build['torch_version']} "
                      f"(headers {build['torch_headers']}), python {build['python']}"),
            ("build compiler", f"{build['compiler']} ({build['cxx']}), C++ {build['cplusplus']}, "
                               f"OpenMP {build['openmp']}"),
            ("build cxxflags", build["cxxflags"]),
            ("build ldflags", build["ldflags"]),
        ]
    elif build:
        rows.append(("build", f"{build['build_type']}, seqfast {build['seqfast_version']}, "
                              f"torch {build['torch_version']} (read from the file)"))
    else:
        rows.append(("build", "unknown"))
    if info["cuda_available"]:
        cuda = f"{info['cuda_version']}: " + ", ".join(info["cuda_devices"])
    else:
        cuda = "not available" + (f" (torch built with CUDA {info['cuda_version']})" if info["cuda_version"] else "")
    rows += [
        ("cuda", cuda),
        ("triton kernels", f"{'usable' if info['triton_usable'] else 'not usable'}: {info['triton_note']}"),
    ]
    width = max(len(label) for label, _ in rows) + 2
    lines = [f"{label:<{width}}{value}" for label, value in rows]
    lines += [f"WARNING: {warning}" for warning in info["warnings"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m seqfast.info", description="What seqfast runs with: versions, CPU, settings, extension, GPU."
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of aligned text")
    args = parser.parse_args(argv)
    info = collect()
    print(json.dumps(info, indent=2) if args.json else format_text(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
