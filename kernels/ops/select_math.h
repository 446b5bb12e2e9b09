// Arithmetic of token selection (docs/algorithm.md, MEDA step 3).
#pragma once

#include <cmath>
#include <cstdint>

#include "kernels/common/dtype.h"
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

// Unsigned bits of a float whose unsigned order is the float order
// (-inf < ... < -0 = +0 < ... < +inf); -0 is taken as +0 so that the two tie,
// as they do under RanksBefore. NaN must be mapped first (RankableScore).
MEDAKV_HOST_DEVICE uint32_t OrderedFloatBits(float f) {
  if (f == 0.f) f = 0.f;
  const uint32_t u = FloatToBits(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// A 64-bit key whose descending unsigned order is exactly RanksBefore's order
// (class, then score, then position; positions < 2^31), so a radix sort of
// the keys ranks candidates as the CPU backend's comparison does. The
// position is recoverable from the low 31 bits.
MEDAKV_HOST_DEVICE uint64_t SelectSortKey(int cls, float score, int64_t pos) {
  return (static_cast<uint64_t>(cls != 0 ? 1u : 0u) << 63) |
         (static_cast<uint64_t>(OrderedFloatBits(score)) << 31) | static_cast<uint64_t>(pos & 0x7fffffff);
}
MEDAKV_HOST_DEVICE int64_t SortKeyPosition(uint64_t key) { return static_cast<int64_t>(key & 0x7fffffffu); }

}  // namespace medakv
