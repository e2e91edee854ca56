// The value checks of a CTC call's host tensors (seqfast/validation.py, ctc_arguments), in one pass: a dozen tiny
// tensor ops cost ~0.1 ms a call, which is several percent of a small batch's loss.
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>

namespace seqfast {

// (min, max of input_lengths; min, max, sum of target_lengths; the first bad label's position or None). targets:
// int64 (N, S) padded (labels counted up to each target length) or (S,) concatenated (all counted); lengths: int64
// (N,), N >= 1. A label is bad outside [0, C) or equal to blank. All on the CPU, any strides.
pybind11::tuple ctc_target_stats(const at::Tensor& targets, const at::Tensor& input_lengths,
                                 const at::Tensor& target_lengths, bool padded, int64_t C, int64_t blank) {
  TORCH_CHECK(targets.device().is_cpu() && input_lengths.device().is_cpu() && target_lengths.device().is_cpu(),
              "ctc_target_stats: CPU tensors only");
  TORCH_CHECK(targets.scalar_type() == at::kLong && input_lengths.scalar_type() == at::kLong &&
              target_lengths.scalar_type() == at::kLong, "ctc_target_stats: int64 tensors only");
  TORCH_CHECK(targets.dim() == (padded ? 2 : 1) && input_lengths.dim() == 1 && target_lengths.dim() == 1 &&
              input_lengths.numel() >= 1 && target_lengths.numel() == input_lengths.numel(),
              "ctc_target_stats: unexpected shapes");
  const auto il = input_lengths.accessor<int64_t, 1>();
  const auto tl = target_lengths.accessor<int64_t, 1>();
  const int64_t N = il.size(0);
  int64_t il_min = il[0], il_max = il[0], tl_min = tl[0], tl_max = tl[0], tl_sum = 0;
  for (int64_t n = 0; n < N; ++n) {
    il_min = std::min(il_min, il[n]);
    il_max = std::max(il_max, il[n]);
    tl_min = std::min(tl_min, tl[n]);
    tl_max = std::max(tl_max, tl[n]);
    tl_sum += tl[n];
  }
  const auto bad = [&](int64_t label) { return label < 0 || label >= C || label == blank; };
  pybind11::object where = pybind11::none();
  if (padded) {
    const auto tg = targets.accessor<int64_t, 2>();
    for (int64_t n = 0; n < tg.size(0) && where.is_none(); ++n) {
      const int64_t len = std::clamp<int64_t>(tl[n], 0, tg.size(1));
      for (int64_t s = 0; s < len; ++s) {
        if (bad(tg[n][s])) {
          where = pybind11::make_tuple(n, s);
          break;
        }
      }
    }
  } else {
    const auto tg = targets.accessor<int64_t, 1>();
    for (int64_t i = 0; i < tg.size(0); ++i) {
      if (bad(tg[i])) {
        where = pybind11::make_tuple(i);
        break;
      }
    }
  }
  return pybind11::make_tuple(il_min, il_max, tl_min, tl_max, tl_sum, where);
}

}  // namespace seqfast
