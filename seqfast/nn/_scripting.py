"""TorchScript: seqfast's modules refuse ``torch.jit.script`` with a message instead of a compiler error.

Their forwards validate arguments in Python (types, unions, f-strings) that TorchScript cannot compile, and
TorchScript is deprecated as of torch 2.13 in favour of ``torch.compile`` and ``torch.export``, which trace
seqfast's modules and ops (graph and all). ``torch.jit.script`` calls ``__prepare_scriptable__`` on a module and
each of its submodules before compiling, so a torch container holding a seqfast layer gets the message too.
"""

from __future__ import annotations

from typing import NoReturn


class NotScriptable:
    """Mixin for seqfast's ``torch.nn`` subclasses."""

    def __prepare_scriptable__(self) -> NoReturn:
        name = type(self).__name__
        base = next(c for c in type(self).__mro__[1:] if c.__module__.startswith("torch.nn"))
        raise RuntimeError(
            f"seqfast.nn.{name} cannot be compiled by torch.jit.script (TorchScript cannot compile its Python "
            f"argument checks, and is deprecated in torch 2.13): use torch.compile or torch.export, which trace "
            f"it, or script torch.nn.{base.__name__} (its state_dict loads as is)"
        )
