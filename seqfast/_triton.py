"""Access to the Triton kernels in ``kernels/``, imported lazily (Triton is optional for CPU use).

On CUDA tensors the kernels compile for the GPU. On CPU tensors they run through
Triton's interpreter, which must be switched on with ``TRITON_INTERPRET=1`` before
Triton is first imported; this is how the GPU kernels are tested without a GPU.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import torch

# A source checkout keeps kernels/ beside the package; an installed wheel maps it to seqfast/kernels.
_TREE_KERNELS = Path(__file__).resolve().parent.parent / "kernels"


def _kernels_package() -> ModuleType:
    if "seqfast.kernels" in sys.modules:
        return sys.modules["seqfast.kernels"]
    if (_TREE_KERNELS / "__init__.py").is_file():
        spec = importlib.util.spec_from_file_location(
            "seqfast.kernels", _TREE_KERNELS / "__init__.py", submodule_search_locations=[str(_TREE_KERNELS)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["seqfast.kernels"] = module
        spec.loader.exec_module(module)
        return module
    return importlib.import_module("seqfast.kernels")


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernels(name: str, *tensors: torch.Tensor) -> ModuleType:
    """Import ``kernels/<name>.py`` after checking the tensors can run there.

    A one-element CPU tensor beside CUDA tensors is a host scalar (the attention ops' dropout seed, which
    the launcher copies over), not data: like torch's 0-dim CPU tensors, it does not make the call a CPU one.
    """
    on_cpu = [t.device.type == "cpu" for t in tensors]
    cpu_data = all(on_cpu) or any(cpu and t.numel() > 1 for cpu, t in zip(on_cpu, tensors))
    if cpu_data and not interpreter_enabled():
        raise RuntimeError(
            "seqfast's Triton kernels on CPU tensors run only in Triton's interpreter: set "
            "TRITON_INTERPRET=1 in the environment before Python starts (before triton is imported)"
        )
    try:
        _kernels_package()
        return importlib.import_module(f"seqfast.kernels.{name}")
    except ImportError as exc:
        raise RuntimeError(f"seqfast's Triton kernels need the `triton` package ({exc})") from exc
