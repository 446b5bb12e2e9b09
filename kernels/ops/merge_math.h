// Arithmetic of merging evicted tokens into kept ones (docs/algorithm.md, MEDA
// step 4, and LOOK-M's PIVOTAL and WEIGHTED rules).
#pragma once

#include <cmath>
#include <cstdint>

#include "kernels/common/host_device.h"
#include "kernels/ops/options.h"

namespace medakv {

// cos(a, b) from a.b and the two norms; 0 when either vector is zero.
MEDAKV_HOST_DEVICE float CosineFromDot(float dot, float norm_a, float norm_b) {
  const float denom = norm_a * norm_b;
  return denom > 0.f ? dot / denom : 0.f;
}

// Whether similarity `cand` at kept index `j_cand` beats the best so far
// (`best` at `j_best`): larger wins, ties go to the lower kept index, NaN never wins.
MEDAKV_HOST_DEVICE bool BetterTarget(float cand, int64_t j_cand, float best, int64_t j_best) {
  if (cand != cand) return false;
  if (best != best) return true;
  return cand > best || (cand == best && j_cand < j_best);
}

// What one evicted element x_e adds to the accumulator of its target x_j.
MEDAKV_HOST_DEVICE float MergeContribution(MergeMode mode, float cos, float x_e, float x_j) {
  switch (mode) {
    case MergeMode::kPivotal:
      return 0.5f * (x_e + x_j);
    case MergeMode::kWeighted:
      return cos * x_e;
    case MergeMode::kAverage:
    case MergeMode::kNone:
    default:
      return x_e;
  }
}

// x_j <- (x_j + sum of contributions) / (1 + n_j).
MEDAKV_HOST_DEVICE float MergeFinalize(float x_j, float contribution_sum, int64_t merged_count) {
  return (x_j + contribution_sum) / (1.f + static_cast<float>(merged_count));
}

}  // namespace medakv
