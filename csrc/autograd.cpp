// Autograd for the seqfast ops, in C++ so that a call stays in C++ from the dispatcher to the kernel and
// back (a Python autograd formula costs more than a whole small attention). The formulas are the
// ones seqfast/ops/*.py documents: save the inputs and outputs, call the backward op through the
// dispatcher (so it runs the kernel of the device: C++ on CPU, Triton on CUDA).
//
// The backward ops have no derivative: they get torch's "not implemented" autograd kernel, so a
// second differentiation through them raises "derivative for seqfast::..._backward is not
// implemented", as torch's fused attention and ctc_loss kernels do, never silent zeros.
//
// A backend forced from Python (seqfast.backend) does not come here for its gradients: it wraps the
// op in a Python autograd function that runs the backward on the same backend (seqfast/_backend.py).
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/extension.h>
#include <torch/library.h>

namespace seqfast {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = c10::optional<Tensor>;

template <typename Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

using AttnFwdSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const OptTensor&, double,
                                              int64_t, double, const Tensor&);
using AttnBwdSig = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                              const Tensor&, const OptTensor&, const Tensor&,
                                                              const Tensor&, double, int64_t, double, const Tensor&,
                                                              bool);
using VarlenFwdSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                const Tensor&, int64_t, int64_t, int64_t, double);
using VarlenBwdSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                        const Tensor&, const Tensor&, int64_t, int64_t,
                                                        const Tensor&, const Tensor&, int64_t, double);
using CtcFwdSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t,
                                             bool, bool, bool, int64_t);
using CtcBwdSig = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                         const Tensor&, int64_t, bool, bool, int64_t);

// Autograd materialises an unused output's gradient as zeros. The CPU kernels read dO with any strides (rows with
// unit column stride in place, others packed into cached scratch), so a CPU gradient goes as it came: a model's
// dO is the (B, L, H, E)-ordered view of the next layer's gradient, and `.sum()`'s an expanded scalar, and a
// contiguous copy of either was a full pass over dO into fresh pages. The Triton kernels want it contiguous.
Tensor grad_or_zeros(const Tensor& grad, const Tensor& like) {
  if (!grad.defined()) return at::zeros_like(like, at::MemoryFormat::Contiguous);
  return grad.is_cpu() ? grad : grad.contiguous();
}

struct Attention : public torch::autograd::Function<Attention> {
  static variable_list forward(AutogradContext* ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                               const OptTensor& mask, double dropout_p, int64_t causal, double scale,
                               const Tensor& seed) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto fwd = op<AttnFwdSig>("seqfast::attention_forward");
    auto [out, lse] = fwd.call(q, k, v, mask, dropout_p, causal, scale, seed);
    const bool has_mask = mask.has_value() && mask->defined();
    ctx->save_for_backward({q, k, v, has_mask ? *mask : Tensor(), out, lse, seed});
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["has_mask"] = has_mask;
    ctx->saved_data["mask_grad"] = has_mask && mask->is_floating_point() && mask->requires_grad();
    ctx->mark_non_differentiable({lse});
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto bwd = op<AttnBwdSig>("seqfast::attention_backward");
    const auto s = ctx->get_saved_variables();
    const bool mask_grad = ctx->saved_data["mask_grad"].toBool();
    const OptTensor mask = ctx->saved_data["has_mask"].toBool() ? OptTensor(s[3]) : c10::nullopt;
    auto [dq, dk, dv, dmask] = bwd.call(grad_or_zeros(grads[0], s[4]), s[0], s[1], s[2], mask, s[4], s[5],
                                        ctx->saved_data["dropout_p"].toDouble(), ctx->saved_data["causal"].toInt(),
                                        ctx->saved_data["scale"].toDouble(), s[6], mask_grad);
    return {dq, dk, dv, mask_grad ? dmask : Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

struct VarlenAttention : public torch::autograd::Function<VarlenAttention> {
  static variable_list forward(AutogradContext* ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                               const Tensor& cu_q, const Tensor& cu_k, int64_t max_q, int64_t max_k, int64_t causal,
                               double scale) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto fwd = op<VarlenFwdSig>("seqfast::varlen_attention_forward");
    auto [out, lse] = fwd.call(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale);
    ctx->save_for_backward({q, k, v, cu_q, cu_k, out, lse});
    ctx->saved_data["max_q"] = max_q;
    ctx->saved_data["max_k"] = max_k;
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["scale"] = scale;
    ctx->mark_non_differentiable({lse});
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto bwd = op<VarlenBwdSig>("seqfast::varlen_attention_backward");
    const auto s = ctx->get_saved_variables();
    auto [dq, dk, dv] = bwd.call(grad_or_zeros(grads[0], s[5]), s[0], s[1], s[2], s[3], s[4],
                                 ctx->saved_data["max_q"].toInt(), ctx->saved_data["max_k"].toInt(), s[5], s[6],
                                 ctx->saved_data["causal"].toInt(), ctx->saved_data["scale"].toDouble());
    return {dq, dk, dv, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

struct CtcLoss : public torch::autograd::Function<CtcLoss> {
  static variable_list forward(AutogradContext* ctx, const Tensor& log_probs, const Tensor& targets,
                               const Tensor& input_lengths, const Tensor& target_lengths, int64_t blank,
                               bool zero_infinity, bool from_logits, bool keep_alpha, int64_t alpha_every) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto fwd = op<CtcFwdSig>("seqfast::ctc_loss_forward");
    auto [nll, log_alpha] = fwd.call(log_probs, targets, input_lengths, target_lengths, blank, zero_infinity,
                                     from_logits, keep_alpha, alpha_every);
    ctx->save_for_backward({log_probs, targets, input_lengths, target_lengths, nll, log_alpha});
    ctx->saved_data["blank"] = blank;
    ctx->saved_data["zero_infinity"] = zero_infinity;
    ctx->saved_data["from_logits"] = from_logits;
    ctx->saved_data["keep_alpha"] = keep_alpha;
    ctx->saved_data["alpha_every"] = alpha_every;
    ctx->mark_non_differentiable({log_alpha});
    // log_alpha never carries a gradient: without this autograd would build a zero (N, T, 2S+1) tensor.
    ctx->set_materialize_grads(false);
    return {nll, log_alpha};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list none(9);
    if (!grads[0].defined()) return none;  // only log_alpha was used: it carries no gradient
    TORCH_CHECK(ctx->saved_data["keep_alpha"].toBool(),
                "seqfast::ctc_loss_forward ran with keep_alpha=False: its loss has no gradient");
    static auto bwd = op<CtcBwdSig>("seqfast::ctc_loss_backward");
    const auto s = ctx->get_saved_variables();
    none[0] = bwd.call(grads[0].contiguous(), s[0], s[1], s[2], s[3], s[4], s[5], ctx->saved_data["blank"].toInt(),
                       ctx->saved_data["zero_infinity"].toBool(), ctx->saved_data["from_logits"].toBool(),
                       ctx->saved_data["alpha_every"].toInt());
    return none;
  }
};

std::tuple<Tensor, Tensor> pair(const variable_list& r) { return {r[0], r[1]}; }

// Whether autograd will record this call; when not, the op runs without building a node (no saved state).
bool records(std::initializer_list<const Tensor*> inputs) {
  if (!at::GradMode::is_enabled()) return false;
  for (const Tensor* t : inputs) {
    if (t->defined() && t->requires_grad()) return true;
  }
  return false;
}

// Forward-mode AD (torch.autograd.forward_ad): the ops have no forward formula, and neither have torch's fused
// attention and ctc_loss kernels. A dual input is refused as torch refuses it (NotImplementedError), never given an
// output without a tangent. Checked whether or not the call records a node: a dual input need not require grad.
// (torch.func.jvp does not come here: seqfast/_backend.py's functorch path raises torch's own error for it.)
void refuse_forward_ad(const char* op_name, std::initializer_list<const Tensor*> inputs) {
  for (const Tensor* t : inputs) {
    TORCH_CHECK_NOT_IMPLEMENTED(!(t->defined() && t->_fw_grad(/*level=*/0).defined()),
                                "Trying to use forward AD with ", op_name,
                                " that does not support it (torch's fused kernels have no forward-mode AD either); "
                                "use reverse mode (backward, torch.autograd.grad, torch.func.vjp / jacrev)");
  }
}

std::tuple<Tensor, Tensor> attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& mask,
                                             double dropout_p, int64_t causal, double scale, const Tensor& seed) {
  const Tensor none;
  refuse_forward_ad("seqfast::attention_forward", {&q, &k, &v, mask.has_value() ? &*mask : &none});
  if (!records({&q, &k, &v, mask.has_value() ? &*mask : &none})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto fwd = op<AttnFwdSig>("seqfast::attention_forward");
    return fwd.call(q, k, v, mask, dropout_p, causal, scale, seed);
  }
  return pair(Attention::apply(q, k, v, mask, dropout_p, causal, scale, seed));
}

std::tuple<Tensor, Tensor> varlen_attention_forward(const Tensor& q, const Tensor& k, const Tensor& v,
                                                    const Tensor& cu_q, const Tensor& cu_k, int64_t max_q,
                                                    int64_t max_k, int64_t causal, double scale) {
  refuse_forward_ad("seqfast::varlen_attention_forward", {&q, &k, &v});
  if (!records({&q, &k, &v})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto fwd = op<VarlenFwdSig>("seqfast::varlen_attention_forward");
    return fwd.call(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale);
  }
  return pair(VarlenAttention::apply(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale));
}

std::tuple<Tensor, Tensor> ctc_loss_forward(const Tensor& log_probs, const Tensor& targets,
                                            const Tensor& input_lengths, const Tensor& target_lengths, int64_t blank,
                                            bool zero_infinity, bool from_logits, bool keep_alpha,
                                            int64_t alpha_every) {
  refuse_forward_ad("seqfast::ctc_loss_forward", {&log_probs});
  if (!records({&log_probs})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto fwd = op<CtcFwdSig>("seqfast::ctc_loss_forward");
    return fwd.call(log_probs, targets, input_lengths, target_lengths, blank, zero_infinity, from_logits,
                    keep_alpha, alpha_every);
  }
  return pair(CtcLoss::apply(log_probs, targets, input_lengths, target_lengths, blank, zero_infinity, from_logits,
                             keep_alpha, alpha_every));
}

// The seed argument of calls without dropout. Made when the module loads (bind_autograd), not by the first call:
// under torch.jit.trace a first call would record its creation and later calls a constant, and the trace's check
// fails. Made outside inference mode whatever mode the import runs in: an inference tensor cannot be saved for
// backward, so an import under torch.inference_mode() would otherwise break every later training call.
const Tensor& no_seed() {
  static const Tensor seed = [] {
    c10::InferenceMode normal(false);
    return at::zeros({}, at::kLong);
  }();
  return seed;
}

// seqfast.scaled_dot_product_attention's common case (4-D tensors of one floating dtype, device, batch and head
// count, no mask, no dropout, no autocast) checked and run in one call from Python: on small inputs the
// Python checks alone cost as much as torch's whole call. It accepts only calls that the full checks in
// seqfast/validation.py accept unchanged (tests/test_dropin.py compares both); for anything else it returns
// None and the Python path validates, casts, broadcasts and explains.
c10::optional<Tensor> common_attention(const Tensor& q, const Tensor& k, const Tensor& v, bool is_causal,
                                       c10::optional<double> scale) {
  if (!q.defined() || !k.defined() || !v.defined() || q.dim() != 4 || k.dim() != 4 || v.dim() != 4) {
    return c10::nullopt;
  }
  const auto dtype = q.scalar_type();
  if (!(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16) ||
      k.scalar_type() != dtype || v.scalar_type() != dtype) {
    return c10::nullopt;
  }
  if (k.device() != q.device() || v.device() != q.device()) return c10::nullopt;
  if (k.size(0) != q.size(0) || v.size(0) != q.size(0) || k.size(1) != q.size(1) || v.size(1) != q.size(1) ||
      k.size(3) != q.size(3) || v.size(2) != k.size(2) || q.size(3) == 0) {
    return c10::nullopt;
  }
  // Where torch would not run fused (Dv != D, an empty sequence, flash switched off), its output and gradient
  // layouts differ: the Python path gives those.
  if (v.size(3) != q.size(3) || q.size(2) == 0 || k.size(2) == 0 ||
      (q.is_cpu() && !at::globalContext().userEnabledFlashSDP())) {
    return c10::nullopt;
  }
  if (q.stride(3) != 1 || k.stride(3) != 1 || v.stride(3) != 1) return c10::nullopt;
  // Autocast knows CPU and CUDA only (it throws for the meta device); the Python path takes the others.
  if (!q.is_cpu() && !q.is_cuda()) return c10::nullopt;
  if (at::autocast::is_autocast_enabled(q.device().type())) return c10::nullopt;
  const double s = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(q.size(3)));
  return std::get<0>(attention_forward(q, k, v, c10::nullopt, 0.0, is_causal ? 1 : 0, s, no_seed()));
}

}  // namespace

// The same autograd kernels called straight from Python (seqfast._C.autograd_*): the eager path of the
// public functions skips torch.ops' boxed call, which alone costs more than a small kernel.
void bind_autograd(pybind11::module& m) {
  no_seed();
  m.def("autograd_attention_forward", &attention_forward, "seqfast::attention_forward with autograd");
  m.def("autograd_varlen_attention_forward", &varlen_attention_forward,
        "seqfast::varlen_attention_forward with autograd");
  m.def("autograd_ctc_loss_forward", &ctc_loss_forward, "seqfast::ctc_loss_forward with autograd");
  m.def("common_attention", &common_attention,
        "scaled_dot_product_attention's common case checked and run in one call; None when not that case");
}

}  // namespace seqfast

TORCH_LIBRARY_IMPL(seqfast, Autograd, m) {
  m.impl("attention_forward", &seqfast::attention_forward);
  m.impl("varlen_attention_forward", &seqfast::varlen_attention_forward);
  m.impl("ctc_loss_forward", &seqfast::ctc_loss_forward);
  m.impl("attention_backward", torch::autograd::autogradNotImplementedFallback());
  m.impl("varlen_attention_backward", torch::autograd::autogradNotImplementedFallback());
  m.impl("ctc_loss_backward", torch::autograd::autogradNotImplementedFallback());
}
