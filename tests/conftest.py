"""Test-suite set-up shared by every test module.

Without a GPU the Triton kernels run on CPU tensors through Triton's interpreter, which must be
switched on before triton is first imported: hence here, before any test module loads.
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# A torch.compile cache of this run only: graphs cached by an earlier build would keep that build's fake strides and
# hide a wrong fake (torch's cache keys know custom ops by name only).
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="seqfast-tests-inductor-"))

# On CPUs with AMX, seqfast hands bfloat16 inference attention to torch (seqfast/_amx.py): the suite keeps it on
# seqfast's kernels so that their bfloat16 tests test them on every machine; tests/test_attention_amx_route.py
# switches the route on where it tests it.
os.environ.setdefault("SEQFAST_BF16_ATTENTION", "seqfast")

import pytest  # noqa: E402

# Where the Triton kernels run in the tests: compiled on the GPU when there is one, interpreted on CPU
# tensors otherwise. The Triton test files create their tensors under this device (one switch).
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def on_kernel_device():
    """Tensors created without a device inside the test land on :data:`KERNEL_DEVICE`."""
    with torch.device(KERNEL_DEVICE):
        yield KERNEL_DEVICE


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test: small tensor ops on a busy 2-core machine run far faster on one
    (examples/speech/datasets.py measures it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


ROOT = Path(__file__).resolve().parent.parent


def fresh_python(code: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    """``code`` run by a new interpreter from the repository root (what a fresh ``import seqfast`` sees), without
    this run's backend and interpreter switches; with ``check``, fails the test with its stderr if it fails."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SEQFAST_BACKEND")}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert not check or result.returncode == 0, result.stderr
    return result
