"""pytest set-up of the benchmark suite: ``bench_*.py`` collection, size tier and device options.

Run it through ``benchmarks/run.py`` (``make bench``), or directly::

    .venv/bin/python -m pytest benchmarks --bench-size quick --bench-device cpu --benchmark-json out.json
"""

from __future__ import annotations

import os

import pytest
import torch
from _harness import SIZES, bench_device


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("seqfast benchmarks")
    group.addoption("--bench-size", choices=SIZES, default=os.environ.get("SEQFAST_BENCH_SIZE", "default"),
                    help="shape tier: smoke (tiny), quick (smallest real shapes), default, full")
    group.addoption("--bench-device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="device of the benchmarked tensors (auto: cuda when available)")


def pytest_collect_file(file_path, parent):
    # pyproject's python_files would skip bench_*.py; files named on the command line are collected anyway.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture(scope="session")
def device(pytestconfig: pytest.Config) -> str:
    return bench_device(pytestconfig)


@pytest.fixture(scope="session")
def size(pytestconfig: pytest.Config) -> str:
    return pytestconfig.getoption("--bench-size")


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield
