// Arithmetic of score pooling over positions (SnapKV's avg_pool1d with
// padding kernel/2 and count_include_pad: zero padding, divided by kernel).
#pragma once

#include <cstdint>

#include "kernels/common/host_device.h"

namespace medakv {

// Mean of row[u] for |u - t| <= kernel / 2, with row[u] = 0 outside [0, length).
MEDAKV_HOST_DEVICE float PooledScore(const float* row, int64_t length, int64_t t, int64_t kernel) {
  const int64_t half = kernel / 2;
  const int64_t begin = t - half < 0 ? 0 : t - half;
  const int64_t end = t + half + 1 > length ? length : t + half + 1;
  float sum = 0.f;
  for (int64_t u = begin; u < end; ++u) sum += row[u];
  return sum / static_cast<float>(kernel);
}

}  // namespace medakv
