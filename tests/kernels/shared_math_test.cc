// The host-device arithmetic that only the CUDA kernels combine in these
// ways (split-row softmax states, radix sort keys of the selection), checked
// on the host against the CPU backend's own formulation.
#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/ops/attention_math.h"
#include "kernels/ops/merge_math.h"
#include "kernels/ops/pool_math.h"
#include "kernels/ops/select_math.h"

namespace medakv {
namespace {

OnlineSoftmaxEntropy Fold(const std::vector<float>& x, size_t begin, size_t end) {
  OnlineSoftmaxEntropy s;
  for (size_t i = begin; i < end; ++i) s.Add(x[i]);
  return s;
}

// Exact (double) log-sum-exp and entropy of softmax over the finite logits.
void Exact(const std::vector<float>& x, double* lse, double* entropy) {
  double m = -INFINITY;
  for (float v : x) m = std::max<double>(m, v);
  double sum = 0.0;
  for (float v : x) sum += std::exp(static_cast<double>(v) - m);
  *lse = m + std::log(sum);
  double h = 0.0;
  for (float v : x) {
    const double p = std::exp(static_cast<double>(v) - *lse);
    if (p > 0.0) h -= p * std::log(p);
  }
  *entropy = h;
}

TEST(OnlineSoftmaxMergeTest, SplitRowsMergeToTheWholeRow) {
  std::mt19937 rng(7);
  std::normal_distribution<float> logit(0.f, 4.f);
  for (int trial = 0; trial < 200; ++trial) {
    const size_t n = 1 + rng() % 300;
    std::vector<float> x(n);
    for (float& v : x) v = logit(rng);
    // Split into up to 6 parts at random points, merged left to right.
    std::vector<size_t> cuts = {0, n};
    const int parts = 1 + static_cast<int>(rng() % 6);
    for (int p = 1; p < parts; ++p) cuts.push_back(rng() % (n + 1));
    std::sort(cuts.begin(), cuts.end());
    OnlineSoftmaxEntropy merged;
    for (size_t c = 0; c + 1 < cuts.size(); ++c) merged.Merge(Fold(x, cuts[c], cuts[c + 1]));
    const OnlineSoftmaxEntropy whole = Fold(x, 0, n);
    double lse, h;
    Exact(x, &lse, &h);
    EXPECT_EQ(merged.max, whole.max);
    EXPECT_NEAR(merged.Lse(), lse, 1e-4 * std::max(1.0, std::abs(lse))) << "trial " << trial;
    EXPECT_NEAR(merged.Entropy(), h, 2e-4 * std::max(1.0, h)) << "trial " << trial;
    EXPECT_NEAR(merged.Entropy(), whole.Entropy(), 2e-4 * std::max(1.0, h));
  }
}

TEST(OnlineSoftmaxMergeTest, EmptyPartsCarryNoMass) {
  OnlineSoftmaxEntropy a, empty;
  a.Add(1.f);
  a.Add(2.f);
  const OnlineSoftmaxEntropy before = a;
  a.Merge(empty);
  EXPECT_EQ(a.max, before.max);
  EXPECT_EQ(a.sum, before.sum);
  EXPECT_EQ(a.sum_dx, before.sum_dx);
  OnlineSoftmaxEntropy b;
  b.Merge(before);
  EXPECT_EQ(b.max, before.max);
  EXPECT_EQ(b.sum, before.sum);
  OnlineSoftmaxEntropy c;
  c.Merge(empty);
  EXPECT_TRUE(c.Empty());
  EXPECT_EQ(c.Lse(), -INFINITY);
  // -inf logits (masked) add nothing, merged or not.
  OnlineSoftmaxEntropy d;
  d.Add(-INFINITY);
  EXPECT_TRUE(d.Empty());
  d.Merge(before);
  EXPECT_EQ(d.sum, before.sum);
}

TEST(OnlineSoftmaxMergeTest, UniformRowHasLogNEntropy) {
  OnlineSoftmaxEntropy a, b;
  for (int i = 0; i < 5; ++i) a.Add(3.f);
  for (int i = 0; i < 11; ++i) b.Add(3.f);
  a.Merge(b);
  EXPECT_NEAR(a.Entropy(), std::log(16.0), 1e-6);
  EXPECT_NEAR(a.Lse(), 3.0 + std::log(16.0), 1e-6);
}

TEST(SelectSortKeyTest, DescendingKeyOrderIsRanksBefore) {
  const float special[] = {0.f, -0.f, INFINITY, -INFINITY, 1.f, -1.f, 1e-30f, -1e-30f,
                           std::numeric_limits<float>::denorm_min(), 3.5f, 3.5f};
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> uni(-5.f, 5.f);
  struct Cand {
    int cls;
    float score;
    int64_t pos;
  };
  std::vector<Cand> c;
  for (int i = 0; i < 2000; ++i) {
    float s = (rng() % 3 == 0) ? special[rng() % (sizeof(special) / sizeof(float))]
                               : static_cast<float>(static_cast<int>(uni(rng) * 4)) / 4.f;  // many ties
    const float nan = std::numeric_limits<float>::quiet_NaN();
    if (rng() % 50 == 0) s = nan;
    c.push_back({static_cast<int>(rng() % 2), RankableScore(s), static_cast<int64_t>(rng() % 100000)});
  }
  c.push_back({0, 0.f, 0x7fffffff});
  for (size_t i = 0; i < c.size(); ++i) {
    for (size_t j = 0; j < c.size(); j += 7) {
      const bool before = RanksBefore(c[i].cls, c[i].score, c[i].pos, c[j].cls, c[j].score, c[j].pos);
      const uint64_t ki = SelectSortKey(c[i].cls, c[i].score, c[i].pos);
      const uint64_t kj = SelectSortKey(c[j].cls, c[j].score, c[j].pos);
      ASSERT_EQ(before, ki > kj) << i << " vs " << j << ": " << c[i].score << " " << c[j].score;
    }
    EXPECT_EQ(SortKeyPosition(SelectSortKey(c[i].cls, c[i].score, c[i].pos)), c[i].pos);
  }
}

TEST(SelectSortKeyTest, OrderedBitsFollowFloatOrder) {
  std::vector<float> v = {-INFINITY, -1e30f, -2.f, -1.f, -1e-38f, 0.f, 1e-45f, 1e-38f, 1.f, 2.f, 1e30f, INFINITY};
  for (size_t i = 0; i + 1 < v.size(); ++i) EXPECT_LT(OrderedFloatBits(v[i]), OrderedFloatBits(v[i + 1])) << i;
  EXPECT_EQ(OrderedFloatBits(-0.f), OrderedFloatBits(0.f));
}

TEST(MergeMathTest, BetterTargetIsATotalOrderWithNaNLast) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  EXPECT_TRUE(BetterTarget(0.5f, 3, nan, 0));
  EXPECT_FALSE(BetterTarget(nan, 0, 0.5f, 3));
  EXPECT_TRUE(BetterTarget(0.5f, 1, 0.5f, 2));
  EXPECT_FALSE(BetterTarget(0.5f, 2, 0.5f, 1));
  EXPECT_TRUE(BetterTarget(0.6f, 9, 0.5f, 1));
  // Any reduction order of BetterTarget finds the same winner (what the CUDA
  // kernel's warp reduction relies on).
  std::mt19937 rng(3);
  for (int trial = 0; trial < 100; ++trial) {
    std::vector<float> cos(1 + rng() % 64);
    for (float& x : cos) x = rng() % 5 == 0 ? nan : static_cast<float>(rng() % 4) / 4.f;
    float best = nan;
    int64_t bj = 0;
    for (size_t j = 0; j < cos.size(); ++j) {
      if (BetterTarget(cos[j], j, best, bj)) best = cos[j], bj = j;
    }
    float rbest = nan;
    int64_t rbj = 0;
    for (size_t j = cos.size(); j-- > 0;) {
      if (BetterTarget(cos[j], j, rbest, rbj)) rbest = cos[j], rbj = j;
    }
    if (best == best) {
      EXPECT_EQ(bj, rbj);
    } else {
      EXPECT_NE(rbest, rbest);
    }
  }
}

TEST(PoolMathTest, PooledScoreIsTheZeroPaddedMean) {
  const float row[] = {1.f, 2.f, 3.f, 4.f, 5.f};
  EXPECT_FLOAT_EQ(PooledScore(row, 5, 0, 3), (0.f + 1.f + 2.f) / 3.f);
  EXPECT_FLOAT_EQ(PooledScore(row, 5, 2, 3), (2.f + 3.f + 4.f) / 3.f);
  EXPECT_FLOAT_EQ(PooledScore(row, 5, 4, 5), (3.f + 4.f + 5.f) / 5.f);
  EXPECT_FLOAT_EQ(PooledScore(row, 3, 2, 3), (2.f + 3.f) / 3.f);  // length cuts the window
}

}  // namespace
}  // namespace medakv
