"""benchmarks/kernel_report.py on kernels of this test's own: ahead-of-time compilation for sm_80 / sm_90
without a GPU, register / spill / shared-memory / tensor-core counts read from the cubin, and the exit
status of the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import kernel_report  # noqa: E402

sys.path.remove(str(ROOT / "benchmarks"))

# fp16 tl.dot: tensor-core code on both archs (HMMA on sm_80, HGMMA / wgmma on sm_90).
# spill_kernel keeps two 8192-element fp32 blocks live in one warp: 512 values a thread, far above 255 registers.
KERNELS = textwrap.dedent('''
    import triton
    import triton.language as tl


    @triton.jit
    def matmul_kernel(a_ptr, b_ptr, c_ptr, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        acc = tl.zeros((BM, BN), tl.float32)
        for k in range(0, K, BK):
            a = tl.load(a_ptr + rm[:, None] * K + (k + rk)[None, :])
            b = tl.load(b_ptr + (k + rk)[:, None] * BN + rn[None, :])
            acc += tl.dot(a, b)
        tl.store(c_ptr + rm[:, None] * BN + rn[None, :], acc)


    @triton.jit
    def spill_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs)
        acc = x
        for i in range(n):
            acc = acc * x + i
        tl.store(y_ptr + offs, acc)


    MATMUL_SIGNATURE = {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp32", "K": "i32",
                        "BM": "constexpr", "BN": "constexpr", "BK": "constexpr"}


    def matmul_config(**constexprs):
        return dict(kernel="matmul", fn=matmul_kernel, signature=MATMUL_SIGNATURE, constexprs=constexprs,
                    num_warps=4, num_stages=2, config="x".join(str(v) for v in constexprs.values()))


    def report_configs():
        return [matmul_config(BM=64, BN=64, BK=32),
                dict(kernel="spill", fn=spill_kernel, constexprs={"BLOCK": 8192}, num_warps=1, num_stages=1,
                     signature={"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"},
                     config="8192")]
''')


# Run as a library in a fresh process: the test suite imported triton with its interpreter on, and such a
# process cannot compile (triton's own library functions were decorated as interpreted ones).
LIBRARY_RUN = textwrap.dedent('''
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import kernel_report as kr
    from triton.runtime.interpreter import InterpretedFunction

    m = kr.load_module(sys.argv[2])
    good = kr.report([m.matmul_config(BM=64, BN=64, BK=32)], ["sm_80", "sm_90"])
    bad = kr.report(m.matmul_config(BM=64, BN=48, BK=32), ["sm_80"])
    cfg = m.matmul_config(BM=64, BN=64, BK=32)
    cfg["fn"] = InterpretedFunction(cfg["fn"].fn)
    interpreted = kr.report(cfg, ["sm_80"])
    print(json.dumps({"good": good, "bad": bad, "interpreted": interpreted, "bad_table": kr.format_table(bad)}))
''')


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_DEFAULT_FP_FUSION")}


@pytest.fixture(scope="module")
def kernels_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("kernels") / "report_kernels.py"
    path.write_text(KERNELS)
    return path


@pytest.fixture(scope="module")
def library_result(kernels_file) -> dict:
    proc = subprocess.run([sys.executable, "-c", LIBRARY_RUN, str(ROOT / "benchmarks"), str(kernels_file)],
                          cwd=ROOT, env=_clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "TRITON_DEFAULT_FP_FUSION" not in proc.stderr  # triton's deprecation warning is silenced
    return json.loads(proc.stdout.splitlines()[-1])


def test_matmul_uses_tensor_cores_without_spilling(library_result):
    rows = library_result["good"]
    assert [r["arch"] for r in rows] == ["sm_80", "sm_90"]
    for row in rows:
        assert row["error"] is None, row["error"]
        assert {"kernel", "config", "arch", "registers", "spill_bytes", "shared_bytes", "mma_instructions"} <= set(row)
        assert row["kernel"] == "matmul" and row["config"] == "64x64x32"
        assert 0 < row["registers"] <= 255
        assert row["spill_bytes"] == 0
        assert row["shared_bytes"] > 0  # the dot operands are staged through shared memory
        assert row["mma_instructions"] > 0
    sm80, sm90 = rows
    assert sm80["mma_by_opcode"].get("HMMA", 0) > 0
    assert sm90["mma_by_opcode"].get("HGMMA", 0) > 0  # Hopper's warpgroup MMA


def test_failed_config_is_reported_not_raised(library_result):
    (row,) = library_result["bad"]
    assert "power of 2" in row["error"] and row["registers"] is None
    assert "FAILED: arange's range must be a power of 2" in library_result["bad_table"]


def test_interpreted_kernel_is_refused_clearly(library_result):
    (row,) = library_result["interpreted"]
    assert "InterpretedFunction" in row["error"] and "TRITON_INTERPRET" in row["error"]


def test_interpreting_process_is_refused_clearly(kernels_file):
    import triton  # noqa: F401  (imported under the suite's TRITON_INTERPRET=1 on a machine without a GPU)

    if not kernel_report.triton_interprets():
        pytest.skip("triton was imported without its interpreter in this process")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernel_report.report([], ["sm_80"])


def test_config_keys_are_checked():
    with pytest.raises(ValueError, match="num_stages"):
        kernel_report.configs_of({"kernel": "k", "fn": None, "signature": {}, "constexprs": {}, "num_warps": 4,
                                  "config": "c"})
    with pytest.raises(ValueError, match="sm_80"):
        kernel_report.parse_arch("ampere")
    assert [kernel_report.parse_arch(a) for a in ("sm_80", "sm_90a", "90", 80)] == [80, 90, 90, 80]


def test_parsers():
    usage = ("\nResource usage:\n Common:\n  GLOBAL:0\n Function k:\n"
             "  REG:40 STACK:16 SHARED:0 LOCAL:8 CONSTANT[0]:400 TEXTURE:0 SURFACE:0 SAMPLER:0\n")
    assert kernel_report.parse_res_usage(usage) == {"REG": 40, "STACK": 16, "SHARED": 0, "LOCAL": 8, "TEXTURE": 0,
                                                     "SURFACE": 0, "SAMPLER": 0, "CONSTANT[0]": 400}
    sass = "\n".join([
        "        /*0100*/                   HMMA.16816.F32 R8, R4, R12, R8 ;",
        "        /*0110*/               @P0 HMMA.16816.F32 R16, R4, R14, R16 ;",
        "        /*0120*/                   HGMMA.64x64x16.F32 R24, gdesc[UR4], R24 ;",
        "        /*0130*/                   FFMA R1, R2, R3, R1 ;",
        "        /*0140*/                   IMMA.16832.S8.S8 R0, R2, R4, R0 ;",
        "                                                                          /* 0x000fe20000001808 */",
    ])
    assert kernel_report.count_mma(sass) == {"HMMA": 2, "HGMMA": 1, "IMMA": 1}


def _cli(kernels_file: Path, *args: str) -> subprocess.CompletedProcess:
    env = _clean_env()
    env["TRITON_INTERPRET"] = "1"  # the command line must switch it off itself
    return subprocess.run([sys.executable, "benchmarks/kernel_report.py", "--module", str(kernels_file), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_command_line_fails_on_spills_unless_allowed(kernels_file, tmp_path):
    out = tmp_path / "report.json"
    proc = _cli(kernels_file, "--arch", "sm_80", "--json", str(out))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "spill [8192] sm_80 spills" in proc.stderr and "SPILLS" in proc.stdout
    assert "TRITON_DEFAULT_FP_FUSION" not in proc.stderr  # triton's deprecation warning is silenced
    rows = {r["kernel"]: r for r in json.loads(out.read_text())}
    assert rows["spill"]["spill_bytes"] > 0 and rows["spill"]["error"] is None
    assert rows["matmul"]["spill_bytes"] == 0 and rows["matmul"]["mma_instructions"] > 0
    assert set(rows["matmul"]) >= {"kernel", "config", "arch", "registers", "spill_bytes", "shared_bytes",
                                   "mma_instructions"}

    allowed = _cli(kernels_file, "--arch", "sm_80", "--allow-spills")
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    assert "warning: spill [8192] sm_80 spills" in allowed.stderr


def test_jsonl_rows_resume_and_cuobjdump_spill_figure(kernels_file, tmp_path):
    rows_file = tmp_path / "rows.jsonl"
    first = _cli(kernels_file, "--arch", "sm_80", "--jsonl", str(rows_file), "--no-ptxas-v", "--allow-spills")
    assert first.returncode == 0, first.stdout + first.stderr
    rows = {r["kernel"]: r for r in map(json.loads, rows_file.read_text().splitlines())}
    assert sorted(rows) == ["matmul", "spill"]
    # Without ptxas -v the figure is cuobjdump's LOCAL + STACK: never 0 where ptxas spills.
    spill = rows["spill"]
    assert spill["spill_bytes"] == spill["local_bytes"] + spill["stack_bytes"] > 0
    assert rows["matmul"]["spill_bytes"] == 0
    # --resume: every (config, arch) of the file is left out, so nothing is compiled, nothing fails.
    again = _cli(kernels_file, "--arch", "sm_80", "--jsonl", str(rows_file), "--resume")
    assert again.returncode == 0 and "SPILLS" not in again.stdout, again.stdout + again.stderr
    assert len(rows_file.read_text().splitlines()) == 2


def test_pointers_are_compiled_as_aligned_by_default():
    class Fn:
        arg_names = ["x_ptr", "n", "y_ptr", "BLOCK"]

    sig = {"x_ptr": "*fp32", "n": "i32", "y_ptr": "*bf16", "BLOCK": "constexpr"}
    assert kernel_report.aligned_pointers(Fn, sig) == {(0,): [["tt.divisibility", 16]],
                                                       (2,): [["tt.divisibility", 16]]}


# The attention module's configs compiled in a fresh process (the interpreter off): the report's rows of the
# entries of `kernel` whose label matches `config`.
ATTENTION_RUN = textwrap.dedent('''
    import json, re, sys
    sys.path.insert(0, sys.argv[1])
    import kernel_report as kr

    attention = kr.load_module(sys.argv[2])
    entries = [e for e in attention.report_configs() if e["kernel"] == sys.argv[3]
               and re.fullmatch(sys.argv[4], e["config"])]
    print(json.dumps(kr.report(entries, ["sm_80", "sm_90"])))
''')


def _attention_report(kernel: str, config: str, timeout: int) -> list[dict]:
    proc = subprocess.run([sys.executable, "-c", ATTENTION_RUN, str(ROOT / "benchmarks"),
                           str(ROOT / "kernels" / "attention.py"), kernel, config],
                          cwd=ROOT, env=_clean_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


# The sm_90 table: the dK/dV kernel's key tile is the M of its three products, so it must come in 64-row wgmma
# slabs. The dense variant is the cheapest to compile (a few seconds per entry).
def test_attention_sm90_dkdv_compiles_to_wgmma_without_spilling():
    rows = _attention_report("_attn_bwd_dkdv", r"sm90:d(64|128)-fp16-dense-.*", 300)
    # One entry per head dim, compiled for sm_90 only (its "archs"), although sm_80 was asked for too.
    assert sorted(r["config"].split("-")[0] for r in rows) == ["sm90:d128", "sm90:d64"]
    for row in rows:
        assert row["error"] is None, row["error"]
        assert row["arch"] == "sm_90" and row["spill_bytes"] == 0, row
        assert row["mma_by_opcode"].get("HGMMA", 0) > 0 and "HMMA" not in row["mma_by_opcode"], row


def test_ex2_inputs_names_the_instruction_that_computes_the_exponent():
    sass = textwrap.dedent('''
        /*0100*/                   FMUL R4, R2, R3 ;
        /*0110*/                   FMNMX R7, R4, R9, !PT ;
        /*0120*/                   FADD R5, R4, -R7 ;
        /*0130*/                   MUFU.EX2 R5, R5 ;
        /*0140*/                   FFMA R6, R2, R3, -R7 ;
        /*0150*/              @P0  MUFU.EX2 R6, R6 ;
        /*0160*/                   MUFU.RCP R8, R6 ;
        /*0170*/                   MUFU.EX2 R10, -R11 ;
    ''')
    assert kernel_report.ex2_inputs(sass) == {"FADD": 1, "FFMA": 1, "?": 1}


# The forward's exp2(s - m) must see the rounded score its row maximum came from: a multiply contracted into the
# subtraction (FFMA) makes the maximum's own exponent the product's rounding error, inf or 0 at scale 1e10 (the
# bug GCC's contraction caused in the C++ kernel). The interpreter cannot show this; the SASS can.
def test_attention_forward_exponents_subtract_a_rounded_score():
    rows = _attention_report("_attn_fwd", r"(sm90:)?d64-(fp32|bf16)-(dense|causal|mask_float)(_ieee)?-.*", 600)
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"} and len(rows) >= 8, [r["config"] for r in rows]
    for row in rows:
        assert row["error"] is None, row["error"]
        assert row["ex2_inputs"] and "FFMA" not in row["ex2_inputs"], row
