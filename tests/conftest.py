"""Test-suite set-up shared by every test module.

Without a GPU the Triton kernels run on CPU tensors through Triton's interpreter, which must be
switched on before triton is first imported: hence here, before any test module loads.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield
