// Arithmetic of token selection (ALGORITHM.md, MEDA step 3).
#pragma once

#include <cmath>
#include <cstdint>

#include "kernels/common/host_device.h"
#include "kernels/ops/budget_math.h"

namespace medakv {

// M = round(recent_fraction * B), at most B.
MEDAKV_HOST_DEVICE int64_t RecentCount(double recent_fraction, int64_t budget) {
  const int64_t m = RoundHalfUp(recent_fraction * static_cast<double>(budget));
  return m < 0 ? 0 : (m > budget ? budget : m);
}

// A NaN score ranks below everything (never selected ahead of a number).
MEDAKV_HOST_DEVICE float RankableScore(float s) { return s != s ? -INFINITY : s; }

// Strict total order of candidates: higher rank class first (KEEP_ALL_TEXT puts
// text in class 1), then higher score, then the later position.
MEDAKV_HOST_DEVICE bool RanksBefore(int cls_a, float score_a, int64_t pos_a, int cls_b,
                                    float score_b, int64_t pos_b) {
  if (cls_a != cls_b) return cls_a > cls_b;
  if (score_a != score_b) return score_a > score_b;
  return pos_a > pos_b;
}

}  // namespace medakv
