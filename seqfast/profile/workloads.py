"""The workloads ``python -m seqfast.profile`` knows by name, and a user's callable as ``module:function``.

Each is a training step (forward and backward) built twice, the same work on the same data: once with
torch's ops, once with seqfast's (its functions, its modules through :func:`seqfast.patch`, or torch's
functions routed by :func:`seqfast.patch_functional`).
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import seqfast
from seqfast import patching

Step = Callable[[], Any]


@dataclass
class Workload:
    """Two step functions doing the same work, and what to say about them."""

    name: str
    description: str
    device: str
    torch_step: Step
    seqfast_step: Step
    calls: patching.FunctionalReport | None = None  # calls routed by patch_functional in the seqfast steps
    seqfast_steps: int = 0
    cleanup: Callable[[], None] | None = None
    extra_notes: list[str] = field(default_factory=list)
    model: torch.nn.Module | None = None  # the model both steps run, where they share one (Hugging Face)
    batch: dict[str, Any] | None = None  # its inputs (keyword arguments, labels included)

    def notes(self) -> list[str]:
        notes = list(self.extra_notes)
        if self.calls is not None and self.seqfast_steps:
            per = self.seqfast_steps
            served = ", ".join(f"{n} {c / per:g}" for n, c in sorted(self.calls.served.items())) or "none"
            notes.append(f"calls per step served by seqfast.patch_functional: {served}; fell through to torch: "
                         f"{self.calls.total_fell_through / per:g}")
            notes += [f"fell through: {c / per:g} x {n}: {r}" for (n, r), c in self.calls.fell_through.items()]
        return notes

    def close(self) -> None:
        if self.cleanup is not None:
            self.cleanup()


# name -> (default shape, one-line description of the step)
WORKLOADS: dict[str, tuple[dict[str, int], str]] = {
    "sdpa": ({"B": 2, "H": 8, "L": 512, "D": 64, "causal": 0},
             "scaled_dot_product_attention forward+backward: F.scaled_dot_product_attention vs seqfast's"),
    "ctc": ({"T": 500, "N": 16, "C": 32, "S": 100},
            "log_softmax + ctc_loss forward+backward: F.ctc_loss vs seqfast.ctc_loss"),
    "mha": ({"B": 4, "L": 256, "E": 256, "H": 8},
            "torch.nn.MultiheadAttention self-attention forward+backward, vs the same module under seqfast.patch"),
    "encoder": ({"B": 4, "L": 256, "E": 256, "H": 8, "layers": 2, "ff": 1024},
                "torch.nn.TransformerEncoder training step (forward+backward), vs the same model under "
                "seqfast.patch"),
    "bert": ({"B": 4, "L": 128, "hidden": 256, "layers": 4, "heads": 4},
             "Hugging Face BertForMaskedLM (sdpa attention, random weights) training step, vs the same model "
             "under seqfast.patch_functional"),
    "gpt2": ({"B": 4, "L": 128, "hidden": 256, "layers": 4, "heads": 4},
             "Hugging Face GPT2LMHeadModel (sdpa attention, random weights) training step, vs the same model "
             "under seqfast.patch_functional"),
    "translation": ({"B": 64, "Ls": 24, "Lt": 11, "d_model": 128, "heads": 4, "layers": 2, "ff": 256},
                    "the seed's Transformer (examples/translation, date normalisation; --small sizes) training step "
                    "with torch's layers vs seqfast's, same weights (needs the seqfast checkout's examples/)"),
    "recogniser": ({"B": 16, "frames": 400, "S": 30, "d_model": 144, "heads": 4, "layers": 4, "ff": 576},
                   "the seed's CTC speech recogniser (examples/speech, conv subsampling + Transformer encoder + "
                   "CTC from logits) training step with torch's layers and F.ctc_loss vs seqfast's, same weights "
                   "(needs the seqfast checkout's examples/)"),
    "wav2vec2": ({"B": 2, "samples": 16000, "hidden": 256, "layers": 4, "heads": 4, "vocab": 32, "S": 60},
                 "Hugging Face Wav2Vec2ForCTC (sdpa attention, CTC loss, random weights) training step, vs the "
                 "same model under seqfast.patch_functional"),
}


def _shape_label(shape: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


def _merge_shape(name: str, given: dict[str, Any]) -> dict[str, int]:
    default = WORKLOADS[name][0]
    unknown = set(given) - set(default)
    if unknown:
        raise ValueError(f"workload {name!r} has no shape key {sorted(unknown)}; its keys: {list(default)}")
    return {**default, **{k: int(v) for k, v in given.items()}}


def _backward(out: torch.Tensor) -> None:
    out.backward(torch.ones_like(out) if out.dim() else None)


def _sdpa(s, device, dtype):
    q, k, v = (torch.randn(s["B"], s["H"], s["L"], s["D"], device=device, dtype=dtype, requires_grad=True)
               for _ in range(3))
    causal = bool(s["causal"])

    def step(attend):
        def run():
            _backward(attend(q, k, v, is_causal=causal))
        return run

    return step(patching.TORCH_SDPA), step(seqfast.scaled_dot_product_attention), None


def _ctc(s, device, dtype):
    T, N, C, S = s["T"], s["N"], s["C"], s["S"]
    logits = torch.randn(T, N, C, device=device, dtype=dtype, requires_grad=True)
    targets = torch.randint(1, C, (N, S), device=device)
    input_lengths = torch.full((N,), T, device=device)
    target_lengths = torch.randint(max(1, S // 2), S + 1, (N,), device=device)

    def step(loss):
        def run():
            loss(logits.log_softmax(2), targets, input_lengths, target_lengths).backward()
        return run

    return step(patching.TORCH_CTC_LOSS), step(seqfast.ctc_loss), None


def _twin_models(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The model and a copy with the same weights whose modules seqfast.patch swapped."""
    other = copy.deepcopy(model)
    seqfast.patch(other)
    return model, other


def _mha(s, device, dtype):
    mha = torch.nn.MultiheadAttention(s["E"], s["H"], batch_first=True, device=device, dtype=dtype)
    x = torch.randn(s["B"], s["L"], s["E"], device=device, dtype=dtype, requires_grad=True)
    theirs, ours = _twin_models(mha)

    def step(m):
        def run():
            _backward(m(x, x, x, need_weights=False)[0])
        return run

    return step(theirs), step(ours), None


def _encoder(s, device, dtype):
    layer = torch.nn.TransformerEncoderLayer(s["E"], s["H"], s["ff"], dropout=0.0, batch_first=True, device=device,
                                             dtype=dtype)
    model = torch.nn.TransformerEncoder(layer, s["layers"], enable_nested_tensor=False)
    x = torch.randn(s["B"], s["L"], s["E"], device=device, dtype=dtype)
    theirs, ours = _twin_models(model)

    def step(m):
        def run():
            _backward(m(x).square().mean())
        return run

    return step(theirs), step(ours), None


def _examples(module: str):
    """A module of the checkout's ``examples/`` package (the seed models live there, not in the wheel)."""
    import sys

    root = Path(seqfast.__file__).resolve().parent.parent
    if not (root / "examples" / "__init__.py").is_file():
        raise RuntimeError(f"the seed-model workloads need the seqfast source checkout's examples/ (not found "
                           f"beside {Path(seqfast.__file__).parent})")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module(module)


def _translation(s, device, dtype):
    model_mod = _examples("examples.translation.model")
    config = model_mod.ModelConfig(vocab=40, d_model=s["d_model"], heads=s["heads"], encoder_layers=s["layers"],
                                   decoder_layers=s["layers"], d_ff=s["ff"], dropout=0.0)
    ours = model_mod.Seq2SeqTransformer(config, "seqfast").to(device=device, dtype=dtype)
    theirs = model_mod.twin(ours, "torch").to(device=device, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    src = torch.randint(1, 40, (s["B"], s["Ls"]), generator=g).to(device)
    src_padding = torch.zeros(s["B"], s["Ls"], dtype=torch.bool, device=device)
    src_padding[: s["B"] // 2, s["Ls"] * 3 // 4:] = True  # half the batch shorter, as real batches are
    tgt = torch.randint(1, 40, (s["B"], s["Lt"] + 1), generator=g).to(device)

    def step(m):
        def run():
            logits = m(src, src_padding, tgt[:, :-1])
            _backward(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt[:, 1:].reshape(-1)))
        return run

    return step(theirs), step(ours), None


def _recogniser(s, device, dtype):
    rec = _examples("examples.speech.recogniser_model")
    config = rec.ModelConfig(d_model=s["d_model"], num_layers=s["layers"], num_heads=s["heads"],
                             dim_feedforward=s["ff"], dropout=0.0)
    ours = rec.Recogniser(config, "seqfast").to(device=device, dtype=dtype)
    theirs = rec.Recogniser(config, "torch").to(device=device, dtype=dtype)
    theirs.load_state_dict(ours.state_dict())
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(s["B"], s["frames"], config.n_mels, generator=g).to(device=device, dtype=dtype)
    lengths = torch.full((s["B"],), s["frames"], dtype=torch.long)
    lengths[: s["B"] // 2] = s["frames"] * 3 // 4
    targets = torch.randint(1, rec.NUM_CLASSES, (s["B"], s["S"]), generator=g)
    target_lengths = torch.full((s["B"],), s["S"], dtype=torch.long)

    def step(m, backend):
        def run():
            logits, out_lengths = m(feats, lengths.to(device))
            _backward(rec.ctc_loss(backend, logits, targets.to(device), out_lengths, target_lengths.to(device)))
        return run

    return step(theirs, "torch"), step(ours, "seqfast"), None


def _transformers():
    try:
        return importlib.import_module("transformers")
    except ImportError as exc:
        raise RuntimeError("this workload needs the `transformers` package (pip install transformers)") from exc


def _hf_text(s, device, dtype, kind):
    tf = _transformers()
    vocab = 1000
    if kind == "bert":
        config = tf.BertConfig(vocab_size=vocab, hidden_size=s["hidden"], num_hidden_layers=s["layers"],
                               num_attention_heads=s["heads"], intermediate_size=4 * s["hidden"],
                               max_position_embeddings=max(512, s["L"]), hidden_dropout_prob=0.0,
                               attention_probs_dropout_prob=0.0, attn_implementation="sdpa")
        model = tf.BertForMaskedLM(config)
    else:
        config = tf.GPT2Config(vocab_size=vocab, n_embd=s["hidden"], n_layer=s["layers"], n_head=s["heads"],
                               n_positions=max(512, s["L"]), resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                               bos_token_id=0, eos_token_id=0, attn_implementation="sdpa")
        model = tf.GPT2LMHeadModel(config)
    model.to(device=device, dtype=dtype).train()
    ids = torch.randint(0, vocab, (s["B"], s["L"]), device=device)
    mask = torch.ones_like(ids)
    mask[0, s["L"] * 3 // 4:] = 0  # one padded row: the attention gets a mask
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids}
    return model, batch


def _hf_audio(s, device, dtype):
    tf = _transformers()
    config = tf.Wav2Vec2Config(
        vocab_size=s["vocab"], pad_token_id=0, hidden_size=s["hidden"], num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"], intermediate_size=4 * s["hidden"], conv_dim=(64, 64, 64),
        conv_kernel=(10, 3, 3), conv_stride=(5, 2, 2), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
        mask_time_prob=0.0, hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
        layerdrop=0.0, final_dropout=0.0, ctc_loss_reduction="mean", attn_implementation="sdpa",
    )
    model = tf.Wav2Vec2ForCTC(config).to(device=device, dtype=dtype).train()
    labels = torch.randint(1, s["vocab"], (s["B"], s["S"]), device=device)
    labels[0, s["S"] * 2 // 3:] = -100  # padded labels: concatenated targets of different lengths
    return model, {"input_values": torch.randn(s["B"], s["samples"], device=device, dtype=dtype), "labels": labels}


def _routed(w: Workload, step: Step, model: torch.nn.Module | None = None) -> Step:
    """``step`` under :func:`seqfast.patch_functional` (and :func:`seqfast.patch` of ``model`` when given),
    adding the calls it routed to ``w.calls``."""
    w.calls = patching.FunctionalReport()

    def seqfast_step():
        if model is not None:
            seqfast.patch(model)
        try:
            with seqfast.patch_functional() as calls:
                step()
        finally:
            if model is not None:
                seqfast.unpatch(model)
        w.calls.served.update(calls.served)
        w.calls.fell_through.update(calls.fell_through)
        w.seqfast_steps += 1

    return seqfast_step


def load_callable(spec: str) -> Callable[[], Any]:
    """``package.module:function`` or ``path/to/file.py:function`` -> the function."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected a workload name ({', '.join(WORKLOADS)}) or module:function, got {spec!r}")
    if module_name.endswith(".py") or "/" in module_name:
        path = Path(module_name)
        spec_ = importlib.util.spec_from_file_location(path.stem, path)
        if spec_ is None or spec_.loader is None:
            raise ValueError(f"cannot load {path}")
        module = importlib.util.module_from_spec(spec_)
        spec_.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    return getattr(module, attr)


def _user(spec: str, device: str) -> Workload:
    """A user's function: it returns a zero-argument step, or ``(model, step)``. The seqfast side runs the step
    under :func:`seqfast.patch_functional`, with ``model``'s modules swapped by :func:`seqfast.patch`."""
    built = load_callable(spec)()
    model, step = built if isinstance(built, tuple) else (None, built)
    if not callable(step):
        raise TypeError(f"{spec} must return a step function or (model, step), got {type(built).__name__}")
    how = "seqfast.patch_functional" + (" and seqfast.patch(model)" if model is not None else "")
    w = Workload(spec.rpartition(":")[2], f"{spec}: the step as written, vs under {how}", device, step, step)
    w.seqfast_step = _routed(w, step, model)
    return w


def build_workload(name: str, shape: dict[str, Any], *, device: str | None = None,
                   dtype: str = "float32") -> Workload:
    """The named workload (:data:`WORKLOADS`) at ``shape`` (keys override the defaults), or a user's
    ``module:function``."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = getattr(torch, dtype)
    if name not in WORKLOADS:
        if shape:
            raise ValueError("shape options apply to the named workloads only")
        return _user(name, device)
    s = _merge_shape(name, shape)
    desc = f"{WORKLOADS[name][1]}; {_shape_label(s)}, {dtype}"
    label = f"{name}_" + "_".join(f"{k}{v}" for k, v in s.items())
    if name in ("bert", "gpt2", "wav2vec2"):
        model, batch = _hf_audio(s, device, torch_dtype) if name == "wav2vec2" else \
            _hf_text(s, device, torch_dtype, name)
        n_params = sum(p.numel() for p in model.parameters())

        def step():
            model(**batch).loss.backward()

        w = Workload(label, f"{desc}, {n_params / 1e6:.2f} M parameters", device, step, step, model=model,
                     batch=batch)
        w.seqfast_step = _routed(w, step)
        return w
    builder = {"sdpa": _sdpa, "ctc": _ctc, "mha": _mha, "encoder": _encoder, "translation": _translation,
               "recogniser": _recogniser}[name]
    t, q, _ = builder(s, device, torch_dtype)
    return Workload(label, desc, device, t, q)
