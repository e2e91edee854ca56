"""seqfast.patch / unpatch (module swap) and seqfast.patch_functional (routing torch's functions)."""

import threading

import pytest
import torch
import torch.nn.functional as F

import seqfast
import seqfast.patching as patching

TOL = {"atol": 2e-5, "rtol": 1e-4}


@pytest.fixture(autouse=True)
def _torch_functions_back():
    """A failing test must not leave torch's functions patched for the tests that follow it."""
    yield
    leaked = patching.is_functional_patched()
    with patching._lock:
        patching._active.clear()
        for name, (before, _) in patching._installed.items():
            setattr(F, name, before)
        patching._installed.clear()
    assert not leaked, "a patch_functional was left active"


class SpeechModel(torch.nn.Module):
    """A small CTC recogniser: a Transformer encoder, a cross-attention MHA, a CTCLoss (torch's classes)."""

    def __init__(self, d=32, heads=4, classes=7):
        super().__init__()
        layer = torch.nn.TransformerEncoderLayer(d, heads, 64, dropout=0.0, batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.cross = torch.nn.MultiheadAttention(d, heads, batch_first=True)
        self.head = torch.nn.Linear(d, classes)
        self.loss = torch.nn.CTCLoss(zero_infinity=True)

    def forward(self, x, targets, input_lengths, target_lengths):
        h = self.encoder(x)
        h = h + self.cross(h, x, x, need_weights=False)[0]
        log_probs = self.head(h).log_softmax(-1).transpose(0, 1)
        return self.loss(log_probs, targets, input_lengths, target_lengths), h


def _batch(N=2, T=12, d=32, classes=7, S=4):
    x = torch.randn(N, T, d)
    targets = torch.randint(1, classes, (N, S))
    return x, targets, torch.full((N,), T), torch.full((N,), S)


def _loss_and_grads(model, batch):
    model.zero_grad()
    loss, h = model(*batch)
    (loss + h.square().mean()).backward()
    return loss.detach(), h.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_patch_swaps_every_supported_module_and_reports_it():
    model = SpeechModel()
    report = seqfast.patch(model)
    assert report.counts() == {
        "seqfast.nn.transformer.TransformerEncoderLayer": 2,
        "seqfast.nn.multihead_attention.MultiheadAttention": 3,  # two layers' self_attn and the cross MHA
        "seqfast.nn.ctc_loss.CTCLoss": 1,
    }
    assert {s.name for s in report.swapped} >= {"encoder.layers.0", "encoder.layers.1.self_attn", "cross", "loss"}
    assert not report.skipped
    assert type(model.cross) is seqfast.nn.MultiheadAttention and type(model.loss) is seqfast.nn.CTCLoss
    assert "cross: torch.nn.modules.activation.MultiheadAttention -> " in str(report)


def test_patched_outputs_and_gradients_equal_unpatched():
    model = SpeechModel()
    batch = _batch()
    loss, h, grads = _loss_and_grads(model, batch)
    seqfast.patch(model)
    loss_p, h_p, grads_p = _loss_and_grads(model, batch)
    torch.testing.assert_close(loss_p, loss, **TOL)
    torch.testing.assert_close(h_p, h, **TOL)
    for name, g in grads.items():
        torch.testing.assert_close(grads_p[name], g, **TOL, msg=name)


def test_round_trip_keeps_outputs_parameters_state_dict_and_training_state():
    model = SpeechModel().eval()
    model.encoder.train()  # a mixed training state must survive too
    batch = _batch()
    with torch.no_grad():
        before = model(*batch)
    params = {n: p for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = {n: m.training for n, m in model.named_modules()}
    classes = {n: type(m) for n, m in model.named_modules()}

    swapped = seqfast.patch(model)
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert list(model.state_dict()) == list(state)
    reverted = seqfast.unpatch(model)
    assert [s.name for s in reverted.swapped] == [s.name for s in swapped.swapped]

    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert all(p is params[n] for n, p in model.named_parameters())  # the same tensors: optimizers keep working
    after_state = model.state_dict()
    assert list(after_state) == list(state)
    for k, v in state.items():
        assert torch.equal(after_state[k], v), k
    with torch.no_grad():
        after = model(*batch)
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])
    assert not seqfast.unpatch(model).swapped  # nothing left to revert


def test_copies_of_a_patched_model_stay_patched_and_unpatch():
    """copy.deepcopy and pickling (an EMA copy, a whole-model checkpoint) keep what patch did: the copy computes as
    the original, and unpatch reverts the copy's modules as it reverts the original's."""
    import copy
    import io

    model = SpeechModel()
    classes = {n: type(m) for n, m in model.named_modules()}
    swapped = [s.name for s in seqfast.patch(model).swapped]
    batch = _batch()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for twin in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        with torch.no_grad():
            assert all(torch.equal(a, b) for a, b in zip(twin(*batch), model(*batch)))
        assert [s.name for s in seqfast.unpatch(twin).swapped] == swapped
        assert {n: type(m) for n, m in twin.named_modules()} == classes
        assert all("_seqfast_converted_from" not in vars(m) for m in twin.modules())
    assert [s.name for s in seqfast.unpatch(model).swapped] == swapped


def test_unpatch_leaves_modules_built_as_seqfast_alone():
    model = torch.nn.Sequential(seqfast.nn.CTCLoss(), torch.nn.CTCLoss())
    assert [s.name for s in seqfast.patch(model).swapped] == ["1"]
    assert [s.name for s in seqfast.unpatch(model).swapped] == ["1"]
    assert type(model[0]) is seqfast.nn.CTCLoss and type(model[1]) is torch.nn.CTCLoss


def test_subclasses_are_skipped_with_the_reason():
    class MyAttention(torch.nn.MultiheadAttention):
        pass

    model = torch.nn.ModuleDict({"mine": MyAttention(8, 2), "plain": torch.nn.MultiheadAttention(8, 2)})
    report = seqfast.patch(model)
    assert [s.name for s in report.swapped] == ["plain"]
    assert [s.name for s in report.skipped] == ["mine"]
    assert "subclass of torch.nn.modules.activation.MultiheadAttention" in report.skipped[0].reason
    assert type(model["mine"]) is MyAttention


def test_modules_on_a_device_without_kernel_are_skipped():
    model = torch.nn.MultiheadAttention(8, 2, device="meta")
    report = seqfast.patch(model)
    assert not report.swapped and "meta" in report.skipped[0].reason
    assert type(model) is torch.nn.MultiheadAttention


# ----------------------------------------------------------------------------------------------------------
# patch_functional


class DirectCalls(torch.nn.Module):
    """A model that calls the functions itself, as Hugging Face models do."""

    def __init__(self, d=16, heads=2, classes=5):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.out = torch.nn.Linear(d, classes)

    def forward(self, x, mask, targets, lengths, target_lengths):
        N, T, d = x.shape
        q, k, v = self.qkv(x).view(N, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        a = a + F.scaled_dot_product_attention(q, k[:, :1], v[:, :1], is_causal=True, scale=0.3, enable_gqa=True)
        log_probs = self.out(a.transpose(1, 2).reshape(N, T, d)).log_softmax(-1).transpose(0, 1)
        return F.ctc_loss(log_probs, targets, lengths, target_lengths, reduction="sum")


def _direct_inputs(N=2, T=10):
    x = torch.randn(N, T, 16, requires_grad=True)
    mask = torch.rand(N, 1, T, T) > 0.2
    mask[..., 0] = True
    return x, mask, torch.randint(1, 5, (N, 3)), [T, T - 2], [3, 2]


def test_patch_functional_routes_and_matches_torch():
    model, inputs = DirectCalls(), _direct_inputs()
    ref = model(*inputs)
    ref_grads = torch.autograd.grad(ref, [inputs[0], *model.parameters()])
    with seqfast.patch_functional() as report:
        assert F.scaled_dot_product_attention is not patching.TORCH_SDPA
        out = model(*inputs)
        grads = torch.autograd.grad(out, [inputs[0], *model.parameters()])
    assert F.scaled_dot_product_attention is patching.TORCH_SDPA and F.ctc_loss is patching.TORCH_CTC_LOSS
    assert report.served == {"scaled_dot_product_attention": 2, "ctc_loss": 1}
    assert report.total_fell_through == 0
    torch.testing.assert_close(out, ref, **TOL)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, **TOL)


def test_patch_functional_reaches_torch_multihead_attention():
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=True)  # training mode: torch's non-fast path calls F.sdpa
    x = torch.randn(2, 6, 16)
    ref = mha(x, x, x, need_weights=False)[0]
    with seqfast.patch_functional() as report:
        out = mha(x, x, x, need_weights=False)[0]
    assert report.served["scaled_dot_product_attention"] == 1
    torch.testing.assert_close(out, ref, **TOL)


def test_unsupported_calls_fall_through_counted_and_equal_to_torch():
    class Unsupported(torch.nn.Module):
        def forward(self, q, k, v, log_probs, targets):
            # key and value of different lengths: seqfast refuses, torch's CPU kernel computes something.
            a = F.scaled_dot_product_attention(q, k, v)
            # float16 CTC: seqfast could compute it, torch refuses it, so torch decides.
            try:
                F.ctc_loss(log_probs.half(), targets, [8], [2])
            except NotImplementedError:
                pass
            return a, F.ctc_loss(log_probs, targets, [8], [2])

    q, k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 5, 8)
    lp, tg = torch.randn(8, 1, 5).log_softmax(-1), torch.tensor([[1, 2]])
    ref = Unsupported()(q, k, v, lp, tg)
    with seqfast.patch_functional() as report:
        out = Unsupported()(q, k, v, lp, tg)
    assert torch.equal(out[0], ref[0])  # computed by torch's own function
    torch.testing.assert_close(out[1], ref[1], **TOL)  # served by seqfast
    assert report.served == {"ctc_loss": 1}
    assert report.total_fell_through == 2
    reasons = dict(report.fell_through)
    assert reasons[("ctc_loss", "invalid arguments (torch's error raised)")] == 1
    (name, reason), = [key for key in reasons if key[0] == "scaled_dot_product_attention"]
    assert reason.startswith("seqfast refused: key and value must share the sequence length")
    assert "2 fell through to torch" not in str(report) and "1 fell through to torch" in str(report)


def test_torchs_math_kernel_when_the_caller_chose_it():
    """Under ``sdpa_kernel(SDPBackend.MATH)`` (or the backend flags with no fused kernel left) the patched call is
    torch's own: its bits, and its double backward, which seqfast's fused kernels (as torch's) do not have. With a
    fused kernel allowed seqfast serves; with none at all torch's error is raised."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(2, 2, 5, 8, dtype=torch.float64, requires_grad=True)

    def second_order():
        out = F.scaled_dot_product_attention(q, q.sin(), q.cos(), is_causal=True)
        (g,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
        return out, torch.autograd.grad(g.sum(), q)[0]

    with sdpa_kernel(SDPBackend.MATH):
        ref = second_order()
        with seqfast.patch_functional() as report:
            got = second_order()
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    assert report.served == {} and report.total_fell_through == 1
    with seqfast.patch_functional() as report:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]):
            F.scaled_dot_product_attention(q, q, q)
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]), pytest.raises(RuntimeError, match="No viable backend"):
            F.scaled_dot_product_attention(q, q, q)  # the CPU has no efficient kernel: torch refuses
    assert report.served == {"scaled_dot_product_attention": 1} and report.total_fell_through == 1


def test_converted_modules_run_torchs_forward_when_the_caller_chose_torchs_math_kernel():
    """A model converted by ``seqfast.patch`` under ``sdpa_kernel(SDPBackend.MATH)`` computes what the unconverted
    model computes there: torch's bits, its double backward (seqfast's fused kernels, as torch's, have none) and,
    in eval mode, its inference path. Outside the context the converted modules are seqfast's (the double
    backward refused), and a module built as seqfast's class stays seqfast's under the context too."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def build():
        torch.manual_seed(0)
        encoder = torch.nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
        return torch.nn.Sequential(encoder, torch.nn.Linear(16, 3))

    x = torch.randn(2, 7, 16, requires_grad=True)

    def second_order(model):
        out = model(x).square().sum()
        (g,) = torch.autograd.grad(out, x, create_graph=True)
        return out, g, torch.autograd.grad(g.square().sum(), x)[0]

    ref, converted = build(), build()
    assert len(seqfast.patch(converted).swapped) == 2  # the layer and its self_attn
    with sdpa_kernel(SDPBackend.MATH):
        expected, got = second_order(ref), second_order(converted)
        assert all(torch.equal(a, b) for a, b in zip(expected, got))
        ref.eval(), converted.eval()
        with torch.no_grad():
            assert torch.equal(converted(x), ref(x))
        converted.train()
    with pytest.raises(RuntimeError, match="derivative for seqfast::attention_backward is not implemented"):
        second_order(converted)

    mha = seqfast.nn.MultiheadAttention(16, 4, batch_first=True)
    with sdpa_kernel(SDPBackend.MATH):
        out, _ = mha(x, x, x, need_weights=False)
        with pytest.raises(RuntimeError, match="derivative for seqfast::attention_backward is not implemented"):
            (g,) = torch.autograd.grad(out.sum(), x, create_graph=True)
            torch.autograd.grad(g.sum(), x)


def test_invalid_arguments_raise_torchs_own_error():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(RuntimeError) as theirs:
        patching.TORCH_SDPA(q, q, q, dropout_p=2.0)
    with seqfast.patch_functional() as report, pytest.raises(RuntimeError) as ours:
        F.scaled_dot_product_attention(q, q, q, dropout_p=2.0)
    assert type(ours.value) is type(theirs.value) and str(ours.value) == str(theirs.value)
    assert report.fell_through == {("scaled_dot_product_attention", "invalid arguments (torch's error raised)"): 1}


@pytest.mark.parametrize("call", ["is_causal=1", "zero_infinity=1", "positional scale"])
def test_argument_types_raise_torchs_type_error(call):
    """Patched functions take torch's argument types and signatures: where torch raises TypeError, so does the
    patched call, with torch's own message."""
    q = torch.randn(1, 2, 4, 8)
    lp, tg = torch.randn(6, 2, 5).log_softmax(-1), torch.tensor([[1, 2], [3, 4]])
    run = {
        "is_causal=1": lambda: F.scaled_dot_product_attention(q, q, q, is_causal=1),
        "zero_infinity=1": lambda: F.ctc_loss(lp, tg, [6, 6], [2, 2], zero_infinity=1),
        "positional scale": lambda: F.scaled_dot_product_attention(q, q, q, None, 0.0, False, 0.5),
    }[call]
    with pytest.raises(TypeError) as theirs:
        run()
    with seqfast.patch_functional(), pytest.raises(TypeError) as ours:
        run()
    assert str(ours.value) == str(theirs.value) or call == "positional scale"


def test_meta_tensors_fall_through():
    q = torch.randn(1, 2, 4, 8, device="meta")
    with seqfast.patch_functional() as report:
        assert F.scaled_dot_product_attention(q, q, q).device.type == "meta"
    assert report.fell_through == {("scaled_dot_product_attention", "device meta"): 1}


def test_nesting_global_form_and_undo_in_any_order():
    outer = seqfast.patch_functional()
    with seqfast.patch_functional(ctc_loss=False) as inner:
        assert patching.is_functional_patched()
        q = torch.randn(1, 1, 3, 4)
        F.scaled_dot_product_attention(q, q, q)
    assert F.scaled_dot_product_attention is not patching.TORCH_SDPA  # the outer patch still holds
    assert inner.served["scaled_dot_product_attention"] == 1
    assert outer.report.served["scaled_dot_product_attention"] == 1
    second = seqfast.patch_functional()
    outer.undo()
    outer.undo()  # idempotent
    assert F.ctc_loss is not patching.TORCH_CTC_LOSS
    second.undo()
    assert F.scaled_dot_product_attention is patching.TORCH_SDPA and F.ctc_loss is patching.TORCH_CTC_LOSS
    assert not patching.is_functional_patched()


def test_patch_is_process_wide_and_counts_other_threads():
    q = torch.randn(1, 1, 3, 4)
    with seqfast.patch_functional() as report:
        worker = threading.Thread(target=lambda: F.scaled_dot_product_attention(q, q, q))
        worker.start()
        worker.join()
    assert report.served["scaled_dot_product_attention"] == 1


def test_patched_sdpa_compiles_without_graph_break():
    graphs = []

    def keep_graph(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    q = torch.randn(1, 2, 8, 16)
    with seqfast.patch_functional():
        compiled = torch.compile(lambda t: F.scaled_dot_product_attention(t, t, t, is_causal=True), fullgraph=True,
                                 backend=keep_graph)
        out = compiled(q)
    torch.testing.assert_close(out, patching.TORCH_SDPA(q, q, q, is_causal=True), **TOL)
    assert len(graphs) == 1 and "seqfast.attention_forward" in graphs[0]


def test_causal_bias_masks_give_torchs_result():
    from torch.nn.attention.bias import causal_lower_right, causal_upper_left

    q, k = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 6, 8)
    for bias in (causal_lower_right(4, 6), causal_upper_left(4, 6)):
        ref = patching.TORCH_SDPA(q, k, k, attn_mask=bias)
        with seqfast.patch_functional() as report:
            out = F.scaled_dot_product_attention(q, k, k, attn_mask=bias)
        torch.testing.assert_close(out, ref, **TOL)
        # CausalBias's __torch_function__ sees the patched function and calls it again with plain arguments.
        assert report.served == {"scaled_dot_product_attention": 1} and not report.fell_through


def test_tensor_subclasses_get_their_torch_function_then_torch():
    class Logged(torch.Tensor):
        seen = []

        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            cls.seen.append(func)
            return super().__torch_function__(func, types, args, kwargs or {})

    q = torch.randn(1, 2, 4, 8)
    lq = q.as_subclass(Logged)
    ref = patching.TORCH_SDPA(q, q, q)
    with seqfast.patch_functional() as report:
        out = F.scaled_dot_product_attention(lq, lq, lq)
    assert Logged.seen[0] is patching._patched_sdpa
    assert type(out) is Logged and torch.equal(out.as_subclass(torch.Tensor), ref)
    assert report.fell_through == {("scaled_dot_product_attention", "tensor subclass Logged"): 1}


def test_jagged_nested_tensors_served_or_routed_as_torch():
    """Jagged nested tensors route torch's own function through their __torch_function__, which knows that function
    only: patched, seqfast serves the calls it has kernels for (no mask, not causal, no dropout) and hands the rest
    to torch's function, which they route as before. (Handing them the patched function made torch's dispatch
    fail: "If inputs are nested tensors they must be contiguous".)"""
    torch.manual_seed(0)
    x = torch.nested.as_nested_tensor([torch.randn(5, 2, 8), torch.randn(7, 2, 8)], layout=torch.jagged)
    q = x.transpose(1, 2)
    ref = patching.TORCH_SDPA(q, q, q)
    with seqfast.patch_functional() as report:
        out = F.scaled_dot_product_attention(q, q, q)
        torch.manual_seed(1)
        dropped = F.scaled_dot_product_attention(q, q, q, dropout_p=0.5)
    torch.manual_seed(1)
    ref_dropped = patching.TORCH_SDPA(q, q, q, dropout_p=0.5)
    assert out.is_nested and out.shape == ref.shape
    torch.testing.assert_close(out.values(), ref.values(), **TOL)
    assert torch.equal(dropped.values(), ref_dropped.values())  # torch's own call, the same draw
    assert report.served == {"scaled_dot_product_attention": 1}
    (key,) = report.fell_through
    assert key[1].startswith("seqfast refused: seqfast has no dropout for nested tensors")
