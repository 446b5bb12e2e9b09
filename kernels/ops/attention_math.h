// Arithmetic of the attention-statistics op, shared by the CPU backend and
// the CUDA kernels: dot products, online log-sum-exp, entropy terms.
#pragma once

#include <cmath>
#include <cstdint>

#include "kernels/common/host_device.h"

namespace medakv {

// The fixed tree that combines eight partial sums acc[u] (u = index mod 8):
// ((acc0 + acc4) + (acc1 + acc5)) + ((acc2 + acc6) + (acc3 + acc7)).
MEDAKV_HOST_DEVICE float SumOfEightPartials(const float* acc) {
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

// a . b over n fp32 values, with eight partial sums (vectorisable, and the
// summation order is fixed so results do not depend on the caller).
MEDAKV_HOST_DEVICE float DotF32(const float* a, const float* b, int64_t n) {
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t d = 0;
  for (; d + 8 <= n; d += 8) {
    for (int u = 0; u < 8; ++u) acc[u] += a[d + u] * b[d + u];
  }
  for (; d < n; ++d) acc[d & 7] += a[d] * b[d];
  return SumOfEightPartials(acc);
}

// Log-sum-exp and entropy of softmax(x) in one pass over a row:
// sum = sum_j e^{x_j - max}, sum_dx = sum_j e^{x_j - max} (x_j - max), so
// lse = max + log(sum) and H = log(sum) - sum_dx / sum (no large offsets).
struct OnlineSoftmaxEntropy {
  float max = -INFINITY;
  float sum = 0.f;
  float sum_dx = 0.f;

  MEDAKV_HOST_DEVICE void Add(float x) {
    if (!(x > -INFINITY)) return;  // -inf (and NaN) carry no mass
    if (x > max) {
      if (sum > 0.f) {
        const float s = expf(max - x);
        sum_dx = s * (sum_dx + (max - x) * sum);
        sum = s * sum;
      }
      max = x;
      sum += 1.f;
    } else {
      const float e = expf(x - max);
      sum += e;
      sum_dx += e * (x - max);
    }
  }
  // Combines the state of another part of the same row (split over keys):
  // the result equals adding the other part's logits, up to rounding. The
  // CUDA statistics kernel splits long rows and merges in a fixed order.
  MEDAKV_HOST_DEVICE void Merge(const OnlineSoftmaxEntropy& o) {
    if (!(o.sum > 0.f)) return;
    if (!(sum > 0.f)) {
      *this = o;
      return;
    }
    const float m = o.max > max ? o.max : max;
    const float sa = expf(max - m), sb = expf(o.max - m);
    sum_dx = sa * (sum_dx + (max - m) * sum) + sb * (o.sum_dx + (o.max - m) * o.sum);
    sum = sa * sum + sb * o.sum;
    max = m;
  }
  MEDAKV_HOST_DEVICE bool Empty() const { return sum == 0.f; }
  MEDAKV_HOST_DEVICE float Lse() const { return sum > 0.f ? max + logf(sum) : -INFINITY; }
  MEDAKV_HOST_DEVICE float Entropy() const {
    if (!(sum > 0.f)) return 0.f;
    const float h = logf(sum) - sum_dx / sum;
    return h > 0.f ? h : 0.f;
  }
};

// log(e^a + e^b), exact for -inf operands (the statistics add the mass a
// probe row gives keys outside the cache to its softmax over the cache).
MEDAKV_HOST_DEVICE float LogAddExp(float a, float b) {
  if (!(a > -INFINITY)) return b;
  if (!(b > -INFINITY)) return a;
  const float m = a > b ? a : b;
  return m + log1pf(expf(-fabsf(a - b)));
}

// Probability of a logit given its row's log-sum-exp.
MEDAKV_HOST_DEVICE float SoftmaxProb(float logit, float lse) { return expf(logit - lse); }

// -p log p, with 0 log 0 = 0.
MEDAKV_HOST_DEVICE float EntropyTerm(float p) { return p > 0.f ? -p * logf(p) : 0.f; }

// Whether a key of modality `key` counts for a query of modality `query` in
// the cross-modal entropy (the other modality).
MEDAKV_HOST_DEVICE bool CrossModal(uint8_t query, uint8_t key) { return query != key; }

}  // namespace medakv
