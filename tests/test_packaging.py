"""Packaging: one version source, the torch pin, release builds without debug info, build info and
``python -m seqfast.info``. Fast: no wheel is built here (the setup.py helpers are tested directly)."""

import importlib.util
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import torch
from conftest import fresh_python
from packaging.requirements import Requirement

import seqfast
from seqfast import _extension, info

ROOT = Path(__file__).resolve().parent.parent


def _load_setup():
    """setup.py as a module: its helpers, without running setup() (which runs only as __main__)."""
    spec = importlib.util.spec_from_file_location("seqfast_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


setup_py = _load_setup()


def _extension_module():
    assert _extension.AVAILABLE, f"the C++ extension did not load ({_extension.LOAD_ERROR}); run `make build`"
    import seqfast._C as ext

    return ext


def test_version_has_one_source():
    assert setup_py.seqfast_version() == seqfast.__version__
    pyproject = (ROOT / "pyproject.toml").read_text()
    project = pyproject.split("[project]", 1)[1].split("\n[", 1)[0]
    assert re.search(r'^dynamic = \[.*"version".*\]', project, re.MULTILINE)
    assert re.search(r'^dynamic = \[.*"dependencies".*\]', project, re.MULTILINE)
    assert not re.search(r"^(version|dependencies) =", project, re.MULTILINE)
    # No other file writes a version down.
    for path in [ROOT / "setup.py", *(ROOT / "seqfast").rglob("*.py")]:
        if path.name != "_version.py":
            assert not re.search(r"^__version__ = ", path.read_text(), re.MULTILINE), path


def test_torch_requirement_pins_the_building_torch():
    requirement = setup_py.torch_requirement(str(torch.__version__))
    assert requirement == f"torch=={torch.__version__.split('+')[0]}"
    spec = Requirement(requirement).specifier
    public = torch.__version__.split("+")[0]
    # PEP 440: a requirement without a local label matches every local build of that release.
    for ok in (str(torch.__version__), public, f"{public}+cpu", f"{public}+cu130"):
        assert spec.contains(ok, prereleases=True), ok
    major, minor, patch = (int(x) for x in public.split(".")[:3])
    for other in (f"{major}.{minor}.{patch + 1}", f"{major}.{minor + 1}.0", f"{public}.post1", f"{public}rc1"):
        assert not spec.contains(other, prereleases=True), other
    assert setup_py.torch_requirement("2.14.0.dev20260101+cu130") == "torch==2.14.0.dev20260101"


def test_debug_env_var_switches_the_build_flags(monkeypatch):
    for value in ("", "0", "false", "off"):
        monkeypatch.setenv("SEQFAST_DEBUG", value)
        assert not setup_py.debug_build()
    monkeypatch.setenv("SEQFAST_DEBUG", "1")
    assert setup_py.debug_build()
    compile_args, link_args = setup_py.build_args(debug=False)
    assert compile_args[-1] == "-g0" and "-Wl,--strip-debug" in link_args
    compile_args, link_args = setup_py.build_args(debug=True)
    assert "-g" in compile_args and "-g0" not in compile_args and "-Wl,--strip-debug" not in link_args


def _expect_debug() -> bool:
    return setup_py.debug_build()  # the test run says which build it expects, with the same variable


def test_build_info_reports_the_build():
    build = _extension_module().build_info()
    assert build["seqfast_version"] == seqfast.__version__
    assert build["torch_version"] == str(torch.__version__)
    assert build["torch_headers"] == torch.__version__.split("+")[0]
    assert build["optimized"] and build["compiler"] != "unknown"
    last_g = [flag for flag in build["cxxflags"].split() if flag.startswith("-g")][-1]
    if _expect_debug():
        assert build["build_type"] == "debug" and last_g != "-g0"
    else:
        assert build["build_type"] == "release", "built with SEQFAST_DEBUG=1? rebuild without it"
        assert last_g == "-g0" and "-Wl,--strip-debug" in build["ldflags"]


def elf_section_names(path) -> list[str]:
    """Section names of a 64-bit little-endian ELF file, from its section headers."""
    data = Path(path).read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, "expected a 64-bit little-endian ELF file"
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def header(i):  # (sh_name, sh_offset)
        name, = struct.unpack_from("<I", data, shoff + i * shentsize)
        offset, = struct.unpack_from("<Q", data, shoff + i * shentsize + 0x18)
        return name, offset

    strtab = header(shstrndx)[1]
    names = []
    for i in range(shnum):
        start = strtab + header(i)[0]
        names.append(data[start:data.index(b"\0", start)].decode())
    return names


def test_extension_has_no_debug_sections():
    path = _extension_module().__file__
    names = elf_section_names(path)
    assert ".text" in names and ".dynsym" in names
    if shutil.which("readelf"):  # the parser agrees with binutils
        out = subprocess.run(["readelf", "-SW", path], capture_output=True, text=True, check=True).stdout
        assert set(re.findall(r"\]\s+(\.\S+)", out)) == {n for n in names if n.startswith(".")}
    debug = [n for n in names if n.startswith((".debug", ".zdebug"))]
    if _expect_debug():
        assert ".debug_info" in debug
    else:
        assert debug == [], f"{path} carries debug sections {debug}; release builds use -g0 and --strip-debug"


def test_build_stamp_is_readable_without_loading():
    ext = _extension_module()
    build = ext.build_info()
    assert info._stamp(ext.__file__) == {k: build[k] for k in ("seqfast_version", "torch_version", "build_type")}


INFO_KEYS = {
    "seqfast_version", "torch_version", "torch_built_against", "triton_version", "python_version", "cpu_model",
    "cpu_isa", "cpu_isa_supported", "settings", "extension_loaded", "extension_error", "extension_path",
    "build_info", "cuda_available", "cuda_devices", "triton_usable", "triton_note", "warnings",
}


def test_info_module_runs_and_prints_json():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SEQFAST_BACKEND")}
    env["SEQFAST_CPU_BUFFER_CACHE_MB"] = "64"
    result = subprocess.run([sys.executable, "-m", "seqfast.info", "--json"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert INFO_KEYS <= data.keys()
    assert data["seqfast_version"] == seqfast.__version__
    assert data["torch_version"] == data["torch_built_against"] == str(torch.__version__)
    assert data["extension_loaded"] and data["extension_error"] is None and data["warnings"] == []
    assert data["cpu_isa"] in _extension.CPU_ISAS and data["cpu_isa_supported"] in _extension.CPU_ISAS
    assert data["settings"] == {"SEQFAST_BACKEND": None, "SEQFAST_CPU_ISA": None,
                                "SEQFAST_CPU_BUFFER_CACHE_MB": "64", "TRITON_INTERPRET": None}
    assert data["build_info"]["build_type"] in ("release", "debug")


def test_info_text_is_aligned(capsys):
    assert info.main([]) == 0
    out = capsys.readouterr().out
    labels = ("seqfast", "torch", "torch built against", "triton", "python", "cpu", "cpu isa", "SEQFAST_BACKEND",
              "SEQFAST_CPU_ISA", "SEQFAST_CPU_BUFFER_CACHE_MB", "extension", "extension path", "build",
              "build cxxflags", "cuda", "triton kernels")
    lines = out.splitlines()
    found = {line[: line.index("  ")] for line in lines if "  " in line}
    assert set(labels) <= found
    columns = {len(line) - len(line[line.index("  "):].lstrip()) for line in lines if not line.startswith("WARN")}
    assert len(columns) == 1, out  # one value column


def test_info_says_when_the_extension_did_not_load(monkeypatch, capsys):
    monkeypatch.setattr(_extension, "AVAILABLE", False)
    monkeypatch.setattr(_extension, "LOAD_ERROR", "ImportError: undefined symbol: _ZN3c10")
    data = info.collect()
    assert not data["extension_loaded"] and data["cpu_isa"] is None
    assert data["extension_error"].startswith("ImportError")
    # What the build recorded is still read from the file.
    assert data["torch_built_against"] == str(torch.__version__)
    assert any("did not load" in w and "make build" in w for w in data["warnings"])
    text = info.format_text(data)
    assert "NOT LOADED: ImportError: undefined symbol" in text and "WARNING:" in text


def test_info_warns_when_torch_differs_from_the_build(monkeypatch):
    monkeypatch.setattr(info, "_stamp", lambda path: {"seqfast_version": seqfast.__version__,
                                                      "torch_version": "2.5.0+cpu", "build_type": "release"})
    monkeypatch.setattr(_extension, "AVAILABLE", False)
    data = info.collect()
    assert data["torch_built_against"] == "2.5.0+cpu"
    assert any("built against torch 2.5.0+cpu" in w for w in data["warnings"])


def test_import_costs_no_more_than_torch():
    """``import seqfast`` loads neither torch._dynamo nor sympy (about 2 s on top of torch's own import), nor
    torch.utils.flop_counter (0.2 s), and nor do the first plain CPU calls: only compiling, forced backends and
    CausalBias masks (whose module torch loads with dynamo) may."""
    code = ("import sys, torch, seqfast\n"
            "q = torch.randn(1, 2, 5, 8)\n"
            "seqfast.scaled_dot_product_attention(q, q, q, is_causal=True)\n"
            "seqfast.nn.MultiheadAttention(8, 2)(q[0], q[0], q[0])\n"
            "lp = torch.randn(6, 2, 5).log_softmax(-1).requires_grad_()\n"
            "seqfast.ctc_loss(lp, torch.tensor([[1, 2], [3, 3]]), [6, 5], [2, 2]).backward()\n"
            "print(sorted(m for m in ('torch._dynamo', 'sympy', 'torch.nn.attention.bias', 'torch.utils.flop_counter')"
            " if m in sys.modules))\n")
    result = fresh_python(code)
    assert result.stdout.split("\n")[-2] == "[]", result.stdout
