"""Hugging Face models (built from tiny configs, random weights, no download) under seqfast.patch_functional:
outputs and gradients equal the unpatched model's, and every attention and CTC call is served by seqfast."""

import pytest
import torch

import seqfast

transformers = pytest.importorskip(
    "transformers", reason="the third-party model tests need `transformers` (a test extra; `make test` installs it)"
)

TOL = {"atol": 5e-5, "rtol": 1e-4}
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def bert():
    """BERT-style encoder with a masked-LM head; the batch has padding (a float attention mask)."""
    config = transformers.BertConfig(vocab_size=50, **TINY, **NO_DROPOUT, attn_implementation="sdpa")
    ids = torch.randint(0, 50, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 7:] = 0
    return transformers.BertForMaskedLM(config), {"input_ids": ids, "attention_mask": mask, "labels": ids}


def gpt():
    """GPT-style decoder (causal attention), with a padded row so that the mask is causal and padding."""
    config = transformers.GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=2, n_positions=32, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                                     attn_implementation="sdpa")
    ids = torch.randint(0, 50, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, 9:] = 0
    return transformers.GPT2LMHeadModel(config), {"input_ids": ids, "attention_mask": mask, "labels": ids}


def wav2vec2():
    """Wav2Vec2ForCTC: convolutional front end, Transformer encoder, CTC loss on labels padded with -100."""
    config = transformers.Wav2Vec2Config(
        vocab_size=12, pad_token_id=0, conv_dim=(16, 16), conv_kernel=(10, 3), conv_stride=(5, 2),
        num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2, mask_time_prob=0.0, hidden_dropout=0.0,
        attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0, layerdrop=0.0,
        final_dropout=0.0, ctc_loss_reduction="mean", attn_implementation="sdpa", **TINY,
    )
    labels = torch.randint(1, 12, (2, 9))
    labels[1, 6:] = -100
    return transformers.Wav2Vec2ForCTC(config), {"input_values": torch.randn(2, 1600), "labels": labels}


def _step(model, batch):
    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    return out.loss.detach(), out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                      if p.grad is not None}


@pytest.mark.parametrize("build, expect", [
    (bert, {"scaled_dot_product_attention": 2}),
    (gpt, {"scaled_dot_product_attention": 2}),
    (wav2vec2, {"scaled_dot_product_attention": 2, "ctc_loss": 1}),
], ids=["bert", "gpt2", "wav2vec2_ctc"])
def test_patched_model_equals_unpatched(build, expect):
    model, batch = build()
    model.train()
    loss, logits, grads = _step(model, batch)
    report = seqfast.patch(model)
    assert not report.swapped and "patch_functional" in report.notes[0]  # HF calls the function itself
    with seqfast.patch_functional() as calls:
        loss_p, logits_p, grads_p = _step(model, batch)
    assert dict(calls.served) == expect and calls.total_fell_through == 0, str(calls)
    torch.testing.assert_close(loss_p, loss, **TOL)
    torch.testing.assert_close(logits_p, logits, **TOL)
    assert grads_p.keys() == grads.keys() and grads
    for name, g in grads.items():
        torch.testing.assert_close(grads_p[name], g, **TOL, msg=name)
    # Unpatched again: torch's functions, the very same numbers as before.
    loss_u, logits_u, _ = _step(model, batch)
    assert torch.equal(loss_u, loss) and torch.equal(logits_u, logits)
