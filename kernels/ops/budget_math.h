// Arithmetic of the layer budget rule (docs/algorithm.md, MEDA step 2).
#pragma once

#include <cmath>
#include <cstdint>

#include "kernels/common/host_device.h"

namespace medakv {

// The project's rounding: half up, round(x) = floor(x + 0.5).
MEDAKV_HOST_DEVICE int64_t RoundHalfUp(double x) {
  return static_cast<int64_t>(floor(x + 0.5));
}

MEDAKV_HOST_DEVICE double Clip(double x, double lo, double hi) {
  return x < lo ? lo : (x > hi ? hi : x);
}

// Smallest and largest per-layer token budget of the exact-total rule:
// lo = max(1, ceil(alpha_min T)), hi = min(T, floor(alpha_max T)), and hi >= lo.
MEDAKV_HOST_DEVICE int64_t BudgetLow(double alpha_min, int64_t tokens) {
  const int64_t lo = static_cast<int64_t>(ceil(alpha_min * static_cast<double>(tokens)));
  return lo < 1 ? 1 : (lo > tokens ? tokens : lo);
}
MEDAKV_HOST_DEVICE int64_t BudgetHigh(double alpha_max, int64_t tokens, int64_t lo) {
  int64_t hi = static_cast<int64_t>(floor(alpha_max * static_cast<double>(tokens)));
  if (hi > tokens) hi = tokens;
  return hi < lo ? lo : hi;
}

}  // namespace medakv
