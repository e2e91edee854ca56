"""seqfast.profile: traces, tables and chart of torch vs seqfast on tiny workloads."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import seqfast
from seqfast.profile import compare, group_of, profile_workload
from seqfast.profile.__main__ import main

FAST = {"warmup": 1, "steps": 2, "profiled_steps": 1}


def _trace_names(path):
    data = json.loads(open(path).read())
    events = data["traceEvents"]  # the Chrome trace event format that chrome://tracing and Perfetto read
    assert isinstance(events, list) and events
    for e in events[:50]:
        assert "ph" in e and "name" in e
    return {e["name"] for e in events if e.get("ph") == "X"}


def test_group_of():
    assert group_of("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert group_of("seqfast::attention_backward") == "attention"
    assert group_of("seqfast::ctc_loss_forward") == "ctc"
    assert group_of("aten::ctc_loss") == "ctc"
    assert group_of("aten::addmm") == "matmul" and group_of("sm90_xmma_gemm_f32f32") == "matmul"
    assert group_of("aten::_log_softmax_backward_data") == "softmax"
    assert group_of("aten::add_") == "other"


def test_sdpa_workload_writes_traces_tables_and_chart(tmp_path):
    c = profile_workload("sdpa", {"B": 1, "H": 2, "L": 32, "D": 16}, device="cpu", out_dir=tmp_path, **FAST)
    files = c.files
    assert set(files) == {"torch", "seqfast", "markdown", "json", "png"}
    assert files["torch"].endswith(".torch.trace.json") and files["seqfast"].endswith(".seqfast.trace.json")
    torch_names, seqfast_names = _trace_names(files["torch"]), _trace_names(files["seqfast"])
    # The table's seqfast ops are in the seqfast trace, by the same name; torch's ops in torch's.
    table_ops = [op.name for op in c.top_ops("seqfast") if op.name.startswith("seqfast::")]
    assert {"seqfast::attention_forward", "seqfast::attention_backward"} <= set(table_ops)
    assert set(table_ops) <= seqfast_names
    assert not any(n.startswith("seqfast::") for n in torch_names)
    assert any("scaled_dot_product" in n for n in torch_names)

    groups = {g["group"]: g for g in c.groups()}
    assert list(groups) == ["attention", "ctc", "matmul", "softmax", "other"]
    assert groups["attention"]["torch_s"] > 0 and groups["attention"]["seqfast_s"] > 0
    assert groups["ctc"]["torch_s"] == 0 and groups["ctc"]["ratio"] is None
    assert c.torch.step_s > 0 and c.seqfast.step_s > 0 and c.seqfast.peak_memory_bytes > 0

    data = json.loads(open(files["json"]).read())
    assert data["groups"] == c.groups() and data["seqfast"]["ops"][0]["name"]
    md = open(files["markdown"]).read()
    assert "| step time, median (ms) |" in md and "`seqfast::attention_forward`" in md
    assert open(files["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    text = c.to_text()
    assert "torch/seqfast" in text and "seqfast::attention_backward" in text


def test_cli_ctc(tmp_path, capsys):
    assert main(["ctc", "--shape", "T=20,N=2", "--shape", "C=6,S=4", "--out", str(tmp_path), "--warmup", "1",
                 "--steps", "2", "--profiled-steps", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "ctc, self CPU ms/step" in out and "seqfast::ctc_loss_forward" in out
    name = "ctc_T20_N2_C6_S4"
    assert {p.name for p in tmp_path.iterdir()} == {f"{name}.torch.trace.json", f"{name}.seqfast.trace.json",
                                                    f"{name}.md", f"{name}.json", f"{name}.groups.png"}
    assert "seqfast::ctc_loss_backward" in _trace_names(tmp_path / f"{name}.seqfast.trace.json")
    assert main(["ctc", "--shape", "X=3", "--out", str(tmp_path)]) == 2  # unknown shape key: a clear error
    if not torch.cuda.is_available():
        assert main(["ctc", "--device", "cuda"]) == 2
    assert "no shape key ['X']" in capsys.readouterr().err


def test_user_callable_with_model(tmp_path):
    (tmp_path / "my_model.py").write_text(textwrap.dedent("""
        import torch

        def build():
            model = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
            x = torch.randn(2, 8, 16)

            def step():
                model(x).sum().backward()
            return model, step
    """))
    c = profile_workload(f"{tmp_path / 'my_model.py'}:build", device="cpu", out_dir=tmp_path / "out", **FAST)
    assert "seqfast::attention_forward" in {op.name for op in c.seqfast.ops}
    assert "seqfast::attention_forward" not in {op.name for op in c.torch.ops}
    assert type(torch.nn.TransformerEncoderLayer(16, 2)) is torch.nn.TransformerEncoderLayer


def test_compare_from_python_returns_data():
    q = torch.randn(1, 1, 16, 8, requires_grad=True)
    c = compare(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().backward(),
                lambda: seqfast.scaled_dot_product_attention(q, q, q).sum().backward(), name="tiny", device="cpu",
                **FAST)
    d = c.to_dict()
    assert d["name"] == "tiny" and d["files"] == {} and d["step_ratio"] > 0
    assert {op["name"] for op in d["seqfast"]["ops"]} >= {"seqfast::attention_forward"}


def test_hf_workload_reports_routed_calls(tmp_path):
    pytest.importorskip("transformers", reason="the Hugging Face workloads need `transformers` (a test extra)")
    c = profile_workload("gpt2", {"B": 1, "L": 16, "hidden": 32, "layers": 2, "heads": 2}, device="cpu", **FAST)
    assert any("scaled_dot_product_attention 2" in n and "fell through to torch: 0" in n for n in c.notes)
    assert "seqfast::attention_forward" in {op.name for op in c.seqfast.ops}


def test_import_seqfast_stays_light():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import sys, seqfast; print(sorted(m for m in ('matplotlib', 'seqfast.profile') if m in sys.modules)); "
            "print(seqfast.profile.compare.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root).stdout
    assert out.split() == ["[]", "compare"]


def test_triton_kernel_rows_read_compiled_kernels(monkeypatch):
    """The CUDA kernel rows, from what Triton keeps of its compiled kernels (faked here: no GPU needed)."""
    import types

    from seqfast.profile._triton_rows import kernel_rows

    class Compiled:
        n_regs, n_spills = 128, 0
        metadata = types.SimpleNamespace(num_warps=4, num_stages=3, shared=32768)
        asm = {"sass": "        /*0a30*/                   HMMA.16816.F32 R4, R8, R12, R4 ;\n"
                       "        /*0a40*/              @P0  HMMA.16816.F32 R8, R8, R12, R8 ;\n"
                       "        /*0a50*/                   FFMA R1, R2, R3, R1 ;\n"}

    class Jit:
        __name__ = "_fake_fwd"
        device_caches = {0: ({"key": Compiled()}, {}, None, None, None)}

    module = types.ModuleType("seqfast.kernels.fake")
    module._fake_fwd = Jit()
    monkeypatch.setitem(sys.modules, "seqfast.kernels.fake", module)
    assert kernel_rows({"_fake_fwd", "ampere_sgemm_128x64_nn"}) == [{
        "kernel": "_fake_fwd", "num_warps": 4, "num_stages": 3, "registers": 128, "spills": 0,
        "shared_bytes": 32768, "mma_instructions": 2,
    }]
    assert kernel_rows({"other_kernel"}) == []


def test_cuda_groups_count_gpu_activities_once():
    """On CUDA torch books a kernel's time both on the kernel and as its launching op's self device time."""
    from seqfast.profile._measure import Measurement, OpRow

    ops = [OpRow("aten::mm", "matmul", 1e-5, 2e-3, 1), OpRow("ampere_sgemm_128x64_nn", "matmul", 0.0, 2e-3, 1, True),
           OpRow("seqfast::attention_forward", "attention", 3e-5, 1e-3, 1),
           OpRow("_attn_fwd", "attention", 0.0, 1e-3, 1, True)]
    m = Measurement([1e-2], 0, ops)
    assert m.group_s("cuda")["matmul"] == 2e-3 and m.group_s("cuda")["attention"] == 1e-3
    assert m.group_s("cpu")["matmul"] == 1e-5


@pytest.mark.parametrize("name,shape,ops", [
    ("translation", {"B": 2, "Ls": 9, "Lt": 5, "d_model": 16, "heads": 2, "layers": 1, "ff": 32},
     {"seqfast::attention_forward", "seqfast::attention_backward"}),
    ("recogniser", {"B": 2, "frames": 60, "S": 4, "d_model": 16, "heads": 2, "layers": 1, "ff": 32},
     {"seqfast::attention_forward", "seqfast::ctc_loss_forward", "seqfast::ctc_loss_backward"}),
])
def test_seed_model_workloads(name, shape, ops):
    """The seed models' training steps (examples/) profile side by side, seqfast's ops only on its side."""
    c = profile_workload(name, shape, device="cpu", **FAST)
    seqfast_ops = {op.name for op in c.seqfast.ops}
    assert ops <= seqfast_ops
    assert not any(op.name.startswith("seqfast::") for op in c.torch.ops)
