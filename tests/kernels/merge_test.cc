// cpu::MergeAndGather (docs/algorithm.md, MEDA step 4 and LOOK-M's merge rules)
// against the naive reference, hand-computed merges, bit-exact gathers and
// argument validation.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "kernels/cpu/ops.h"
#include "kernels/ops/op_args.h"
#include "tests/kernels/test_util.h"
#include "tests/reference/reference.h"

namespace medakv {
namespace {

using test::HostTensor;

std::string ModeTag(MergeMode m) {
  switch (m) {
    case MergeMode::kAverage:
      return "Average";
    case MergeMode::kPivotal:
      return "Pivotal";
    case MergeMode::kWeighted:
      return "Weighted";
    case MergeMode::kNone:
      return "NoMerge";
  }
  return "Unknown";
}

struct MergeRun {
  HostTensor out_key, out_value;
  absl::Status status;
};

MergeRun Merge(const HostTensor& key, const HostTensor& value, const std::vector<int32_t>& kept,
               int64_t budget, MergeMode mode, MergeThreshold threshold) {
  MergeRun r;
  r.out_key = HostTensor(key.dtype, key.layout, key.heads, budget, key.head_dim);
  r.out_value = HostTensor(key.dtype, key.layout, key.heads, budget, key.head_dim);
  r.out_key.Fill(0xA5);  // sentinel: every output byte must be written
  r.out_value.Fill(0xA5);
  MergeArgs a;
  a.key = key.view();
  a.value = value.view();
  a.kept = kept.data();
  a.budget = budget;
  a.mode = mode;
  a.threshold = threshold;
  r.status = cpu::MergeAndGather(a, r.out_key.mutable_view(), r.out_value.mutable_view());
  return r;
}

// Relative tolerance of one stored value: about one unit in the last place
// of the dtype (fp32 arithmetic, then one rounding to the dtype).
double DTypeRel(DType d) {
  switch (d) {
    case DType::kFloat16:
      return 0x1.0p-10;
    case DType::kBFloat16:
      return 0x1.0p-7;
    case DType::kFloat32:
      return 1e-5;
  }
  return 0.0;
}

// Kept positions per head from random scores (each head its own set).
std::vector<int32_t> RandomKept(int64_t heads, int64_t tokens, int64_t budget, uint64_t seed) {
  test::Rng rng(seed);
  std::vector<double> scores(heads * tokens);
  for (double& s : scores) s = rng.Uniform();
  return reference::RefSelect(scores, std::vector<uint8_t>(tokens, 1), heads, tokens, budget, 0.25,
                              TextPrior::kNone, false);
}

struct MergeCase {
  int64_t tokens;
  DType dtype;
  Layout layout;
  MergeMode mode;
  MergeThreshold threshold;
  bool ties = false;  // keys from a small set with exact cosines: many exact ties
};

std::string MergeName(const MergeCase& c) {
  return absl::StrCat("T", c.tokens, "_", test::DTypeTag(c.dtype), "_", test::LayoutTag(c.layout), "_",
                      ModeTag(c.mode), "_",
                      c.threshold == MergeThreshold::kMean ? "MeanThreshold" : "NoThreshold",
                      c.ties ? "_TiedKeys" : "");
}

std::vector<MergeCase> MergeCases() {
  std::vector<MergeCase> out;
  for (int64_t tokens : {1, 7, 769}) {
    for (DType dtype : test::kAllDTypes) {
      for (Layout layout : test::kAllLayouts) {
        for (MergeMode mode : {MergeMode::kAverage, MergeMode::kPivotal, MergeMode::kWeighted, MergeMode::kNone}) {
          for (MergeThreshold th : {MergeThreshold::kNone, MergeThreshold::kMean}) {
            out.push_back({tokens, dtype, layout, mode, th, false});
            if (tokens > 1 && layout == Layout::kHND) out.push_back({tokens, dtype, layout, mode, th, true});
          }
        }
      }
    }
  }
  return out;
}

// Keys whose squared norm is 0, 1 or 4 (zero, a signed unit axis, or all
// entries +-1), so that every cosine is a small dyadic number, exact in fp32
// and fp64: argmax ties and the MEAN filter are decided identically.
std::vector<double> TiedKeys(int64_t heads, int64_t tokens, int64_t dim, uint64_t seed) {
  test::Rng rng(seed);
  std::vector<double> k(heads * tokens * dim, 0.0);
  for (int64_t row = 0; row < heads * tokens; ++row) {
    double* x = &k[row * dim];
    const int64_t kind = rng.Int(0, 9);
    if (kind == 0) continue;  // zero vector
    if (kind <= 5) {
      x[rng.Int(0, dim - 1)] = rng.Int(0, 1) ? 1.0 : -1.0;
    } else {
      for (int64_t d = 0; d < dim; ++d) x[d] = rng.Int(0, 1) ? 1.0 : -1.0;
    }
  }
  return k;
}

class MergeSweepTest : public ::testing::TestWithParam<MergeCase> {};

TEST_P(MergeSweepTest, MatchesReference) {
  const MergeCase& c = GetParam();
  constexpr int64_t kHeads = 3;
  const int64_t dim = c.ties ? 4 : (c.tokens == 769 ? 20 : 8);
  const uint64_t seed = static_cast<uint64_t>(c.tokens * 17 + static_cast<int>(c.dtype) * 5 +
                                              static_cast<int>(c.layout) * 3 + static_cast<int>(c.mode));
  const HostTensor key =
      c.ties ? test::MakeTensor(c.dtype, c.layout, kHeads, c.tokens, dim, TiedKeys(kHeads, c.tokens, dim, seed))
             : test::RandomTensor(c.dtype, c.layout, kHeads, c.tokens, dim, seed);
  const HostTensor value = test::RandomTensor(c.dtype, c.layout, kHeads, c.tokens, dim, seed + 1, 2.0);
  for (int64_t budget : {int64_t{1}, std::max<int64_t>(1, c.tokens / 3), c.tokens}) {
    SCOPED_TRACE(absl::StrCat("budget ", budget));
    const std::vector<int32_t> kept = RandomKept(kHeads, c.tokens, budget, seed + budget);
    const MergeRun r = Merge(key, value, kept, budget, c.mode, c.threshold);
    ASSERT_TRUE(r.status.ok()) << r.status;
    EXPECT_EQ(r.out_key.dtype, c.dtype);
    EXPECT_EQ(r.out_key.layout, c.layout);

    const reference::RefMerged ref =
        reference::RefMerge(key.view(), value.view(), kept, budget, c.mode, c.threshold);
    const double rel = DTypeRel(c.dtype);
    EXPECT_TRUE(test::AllNear(test::ReadBack(r.out_key), ref.keys, rel, 1e-5)) << "keys";
    EXPECT_TRUE(test::AllNear(test::ReadBack(r.out_value), ref.values, rel, 1e-5)) << "values";

    // NONE (and B = T) is a bit-exact gather of the kept rows.
    if (c.mode == MergeMode::kNone || budget == c.tokens) {
      for (int64_t h = 0; h < kHeads; ++h) {
        for (int64_t b = 0; b < budget; ++b) {
          for (int64_t d = 0; d < dim; ++d) {
            ASSERT_EQ(r.out_key.Bits(h, b, d), key.Bits(h, kept[h * budget + b], d));
            ASSERT_EQ(r.out_value.Bits(h, b, d), value.Bits(h, kept[h * budget + b], d));
          }
        }
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Sweep, MergeSweepTest, ::testing::ValuesIn(MergeCases()),
                         [](const ::testing::TestParamInfo<MergeCase>& info) {
                           return MergeName(info.param);
                         });

// ---- hand cases --------------------------------------------------------------------

// One head, fp32 HND, from rows of 2-vectors.
HostTensor Rows(const std::vector<std::vector<double>>& rows, DType dtype = DType::kFloat32,
                Layout layout = Layout::kHND) {
  std::vector<double> flat;
  for (const auto& r : rows) flat.insert(flat.end(), r.begin(), r.end());
  return test::MakeTensor(dtype, layout, 1, static_cast<int64_t>(rows.size()),
                          static_cast<int64_t>(rows[0].size()), flat);
}

TEST(MergeHandTest, EvictedTokenGoesToTheMostSimilarKeptOne) {
  // Kept k0 = (1, 0) and k2 = (0, 1); evicted k1 = (2, 0.1) is closer to k0.
  for (DType dtype : test::kAllDTypes) {
    for (Layout layout : test::kAllLayouts) {
      SCOPED_TRACE(test::DTypeTag(dtype) + test::LayoutTag(layout));
      const HostTensor key = Rows({{1, 0}, {2, 0.1}, {0, 1}}, dtype, layout);
      const HostTensor value = Rows({{10, 20}, {30, 40}, {5, 6}}, dtype, layout);
      const MergeRun r = Merge(key, value, {0, 2}, 2, MergeMode::kAverage, MergeThreshold::kNone);
      ASSERT_TRUE(r.status.ok()) << r.status;
      // ((1 + 2) / 2, (0 + 0.1) / 2): halving is exact, so the result is the
      // stored value of 0.1 halved, rounded once to the dtype.
      const double point_one = test::RoundToDType(dtype, 0.1);
      EXPECT_EQ(r.out_key.Get(0, 0, 0), 1.5);
      EXPECT_EQ(r.out_key.Get(0, 0, 1), test::RoundToDType(dtype, point_one / 2));
      EXPECT_EQ(r.out_key.Get(0, 1, 0), 0.0);
      EXPECT_EQ(r.out_key.Get(0, 1, 1), 1.0);
      EXPECT_EQ(r.out_value.Get(0, 0, 0), 20.0);  // values follow the key's assignment
      EXPECT_EQ(r.out_value.Get(0, 0, 1), 30.0);
      EXPECT_EQ(r.out_value.Get(0, 1, 0), 5.0);
      EXPECT_EQ(r.out_value.Get(0, 1, 1), 6.0);
    }
  }
}

TEST(MergeHandTest, PivotalAndWeightedRules) {
  const HostTensor key = Rows({{1, 0}, {2, 0.1}, {0, 1}});
  const HostTensor value = Rows({{10, 20}, {30, 40}, {5, 6}});
  const double e1 = static_cast<float>(0.1);
  // PIVOTAL: (k_j + (k_e + k_j) / 2) / 2.
  const MergeRun p = Merge(key, value, {0, 2}, 2, MergeMode::kPivotal, MergeThreshold::kNone);
  ASSERT_TRUE(p.status.ok());
  EXPECT_NEAR(p.out_key.Get(0, 0, 0), (1 + (2 + 1) / 2.0) / 2, 1e-7);
  EXPECT_NEAR(p.out_key.Get(0, 0, 1), (0 + (e1 + 0) / 2) / 2, 1e-7);
  EXPECT_NEAR(p.out_value.Get(0, 0, 0), (10 + (30 + 10) / 2.0) / 2, 1e-6);
  EXPECT_NEAR(p.out_value.Get(0, 0, 1), (20 + (40 + 20) / 2.0) / 2, 1e-6);
  // WEIGHTED: (k_j + cos(k_e, k_j) k_e) / 2, values with the key cosine.
  const double cos = 2.0 / std::sqrt(4.0 + e1 * e1);
  const MergeRun w = Merge(key, value, {0, 2}, 2, MergeMode::kWeighted, MergeThreshold::kNone);
  ASSERT_TRUE(w.status.ok());
  EXPECT_NEAR(w.out_key.Get(0, 0, 0), (1 + cos * 2) / 2, 1e-6);
  EXPECT_NEAR(w.out_key.Get(0, 0, 1), (0 + cos * e1) / 2, 1e-7);
  EXPECT_NEAR(w.out_value.Get(0, 0, 0), (10 + cos * 30) / 2, 1e-5);
  EXPECT_NEAR(w.out_value.Get(0, 0, 1), (20 + cos * 40) / 2, 1e-5);
  // The untouched kept token is unchanged in every mode.
  for (const MergeRun* r : {&p, &w}) {
    EXPECT_EQ(r->out_key.Get(0, 1, 1), 1.0);
    EXPECT_EQ(r->out_value.Get(0, 1, 0), 5.0);
  }
}

TEST(MergeHandTest, SeveralEvictedTokensAverageIntoOne) {
  // k0 kept; k1 = (3, 0) and k2 = (5, 0) both go to it: (1 + 3 + 5) / 3 = 3.
  const HostTensor key = Rows({{1, 0}, {3, 0}, {5, 0}, {0, 1}});
  const HostTensor value = Rows({{1, 1}, {2, 2}, {6, 6}, {7, 7}});
  const MergeRun r = Merge(key, value, {0, 3}, 2, MergeMode::kAverage, MergeThreshold::kNone);
  ASSERT_TRUE(r.status.ok());
  EXPECT_EQ(r.out_key.Get(0, 0, 0), 3.0);
  EXPECT_EQ(r.out_key.Get(0, 0, 1), 0.0);
  EXPECT_EQ(r.out_value.Get(0, 0, 0), 3.0);
  EXPECT_EQ(r.out_value.Get(0, 1, 0), 7.0);
}

TEST(MergeHandTest, TieGoesToTheLowerKeptIndex) {
  // Kept (1, 0) at 0 and (0, 1) at 2; evicted (1, 1) at 1 has cosine 1/sqrt 2
  // with both: it goes to kept index 0.
  const HostTensor key = Rows({{1, 0}, {1, 1}, {0, 1}});
  const HostTensor value = Rows({{0, 0}, {4, 4}, {8, 8}});
  const MergeRun r = Merge(key, value, {0, 2}, 2, MergeMode::kAverage, MergeThreshold::kNone);
  ASSERT_TRUE(r.status.ok());
  EXPECT_EQ(r.out_key.Get(0, 0, 0), 1.0);
  EXPECT_EQ(r.out_key.Get(0, 0, 1), 0.5);
  EXPECT_EQ(r.out_value.Get(0, 0, 0), 2.0);
  EXPECT_EQ(r.out_value.Get(0, 1, 0), 8.0);
  // Same with the evicted token before both kept ones.
  const HostTensor key2 = Rows({{1, 1}, {1, 0}, {0, 1}});
  const MergeRun r2 = Merge(key2, value, {1, 2}, 2, MergeMode::kAverage, MergeThreshold::kNone);
  ASSERT_TRUE(r2.status.ok());
  EXPECT_EQ(r2.out_key.Get(0, 0, 1), 0.5);
  EXPECT_EQ(r2.out_key.Get(0, 1, 0), 0.0);
  EXPECT_EQ(r2.out_value.Get(0, 0, 0), 2.0);  // (4 + 0) / 2
}

TEST(MergeHandTest, ZeroVectorsHaveCosineZero) {
  // Kept k0 = 0 (zero) and k1 = (1, 0). Evicted (-1, 0): cosine 0 with the
  // zero key beats -1. Evicted zero vector: cosine 0 with both, tie: index 0.
  const HostTensor key = Rows({{0, 0}, {1, 0}, {-1, 0}, {0, 0}});
  const HostTensor value = Rows({{3, 0}, {1, 1}, {6, 0}, {0, 3}});
  const MergeRun r = Merge(key, value, {0, 1}, 2, MergeMode::kAverage, MergeThreshold::kNone);
  ASSERT_TRUE(r.status.ok());
  EXPECT_FLOAT_EQ(static_cast<float>(r.out_key.Get(0, 0, 0)), -1.f / 3.f);
  EXPECT_EQ(r.out_key.Get(0, 0, 1), 0.0);
  EXPECT_EQ(r.out_value.Get(0, 0, 0), 3.0);  // (3 + 6 + 0) / 3
  EXPECT_EQ(r.out_value.Get(0, 0, 1), 1.0);  // (0 + 0 + 3) / 3
  EXPECT_EQ(r.out_key.Get(0, 1, 0), 1.0);
  EXPECT_FALSE(std::isnan(r.out_key.Get(0, 0, 0)));
  // WEIGHTED with cosine 0: the evicted tokens count but add nothing.
  const MergeRun w = Merge(key, value, {0, 1}, 2, MergeMode::kWeighted, MergeThreshold::kNone);
  ASSERT_TRUE(w.status.ok());
  EXPECT_EQ(w.out_key.Get(0, 0, 0), 0.0);
  EXPECT_EQ(w.out_value.Get(0, 0, 0), 1.0);  // (3 + 0 + 0) / 3
}

TEST(MergeHandTest, MeanThresholdMergesOnlyTheSimilarTokens) {
  // Kept k0 = (1, 0). Evicted (1, 0.01) (cosine ~1) and (0, 1) (cosine 0);
  // the mean is ~0.5, so only the first merges.
  const HostTensor key = Rows({{1, 0}, {1, 0.01}, {0, 1}});
  const HostTensor value = Rows({{2, 2}, {4, 4}, {100, 100}});
  const MergeRun r = Merge(key, value, {0}, 1, MergeMode::kAverage, MergeThreshold::kMean);
  ASSERT_TRUE(r.status.ok());
  EXPECT_EQ(r.out_key.Get(0, 0, 0), 1.0);
  EXPECT_NEAR(r.out_key.Get(0, 0, 1), 0.005, 1e-9);
  EXPECT_EQ(r.out_value.Get(0, 0, 0), 3.0);
  // Without the threshold both merge.
  const MergeRun all = Merge(key, value, {0}, 1, MergeMode::kAverage, MergeThreshold::kNone);
  EXPECT_NEAR(all.out_value.Get(0, 0, 0), (2 + 4 + 100) / 3.0, 1e-5);
}

TEST(MergeHandTest, MeanThresholdIsSharedByTheHeads) {
  // Two heads keep different tokens: head 0 keeps 0 and 3, head 1 keeps 0
  // and 1. Best cosines: token 1 (evicted in head 0 only): 1. Token 2: 0 in
  // head 0, 1 in head 1, average 0.5. Token 3 (head 1 only): -1/sqrt 2. The
  // mean of the averages is ~0.26, so tokens 1 and 2 merge, in every head
  // that evicts them (token 2 also in head 0, where its own cosine 0 is below
  // the mean; a per-head filter would not merge it there), and token 3 does not.
  const std::vector<double> k = {1, 0, 1, 0, 0, -1, 1, 1,     // head 0, tokens 0..3
                                 1, 0, 0, 1, 1, 0, -1, -1};  // head 1
  std::vector<double> v(16);
  for (int i = 0; i < 16; ++i) v[i] = i;
  const HostTensor key = test::MakeTensor(DType::kFloat32, Layout::kNHD, 2, 4, 2, k);
  const HostTensor value = test::MakeTensor(DType::kFloat32, Layout::kNHD, 2, 4, 2, v);
  const std::vector<int32_t> kept = {0, 3, 0, 1};
  const MergeRun r = Merge(key, value, kept, 2, MergeMode::kAverage, MergeThreshold::kMean);
  ASSERT_TRUE(r.status.ok());
  // Head 0: tokens 1 and 2 go to kept 0 (token 2: cosine 0 vs -1/sqrt 2).
  EXPECT_FLOAT_EQ(static_cast<float>(r.out_key.Get(0, 0, 0)), 2.f / 3.f);
  EXPECT_FLOAT_EQ(static_cast<float>(r.out_key.Get(0, 0, 1)), -1.f / 3.f);
  EXPECT_EQ(r.out_value.Get(0, 0, 0), 2.0);  // (0 + 2 + 4) / 3
  EXPECT_EQ(r.out_value.Get(0, 0, 1), 3.0);
  EXPECT_EQ(r.out_value.Get(0, 1, 0), 6.0);  // kept 3 untouched
  // Head 1: token 2 goes to kept 0; token 3 is not merged.
  EXPECT_EQ(r.out_key.Get(1, 0, 0), 1.0);
  EXPECT_EQ(r.out_value.Get(1, 0, 0), 10.0);  // (8 + 12) / 2
  EXPECT_EQ(r.out_value.Get(1, 0, 1), 11.0);
  EXPECT_EQ(r.out_value.Get(1, 1, 0), 10.0);  // kept 1 untouched
  EXPECT_EQ(r.out_value.Get(1, 1, 1), 11.0);
  const reference::RefMerged ref =
      reference::RefMerge(key.view(), value.view(), kept, 2, MergeMode::kAverage, MergeThreshold::kMean);
  EXPECT_TRUE(test::AllNear(test::ReadBack(r.out_key), ref.keys, 1e-6, 1e-7));
  EXPECT_TRUE(test::AllNear(test::ReadBack(r.out_value), ref.values, 1e-6, 1e-7));
}

// B = T: nothing is evicted, the output is the input bit for bit, NaN
// payloads included, for every dtype, layout and mode.
TEST(MergeGatherTest, FullBudgetReturnsTheInputBitForBit) {
  constexpr int64_t kHeads = 2, kTokens = 7, kDim = 5;
  for (DType dtype : test::kAllDTypes) {
    for (Layout layout : test::kAllLayouts) {
      for (MergeMode mode : {MergeMode::kAverage, MergeMode::kPivotal, MergeMode::kWeighted, MergeMode::kNone}) {
        SCOPED_TRACE(test::DTypeTag(dtype) + test::LayoutTag(layout) + ModeTag(mode));
        HostTensor key = test::RandomTensor(dtype, layout, kHeads, kTokens, kDim, 3);
        HostTensor value = test::RandomTensor(dtype, layout, kHeads, kTokens, kDim, 4);
        const uint32_t nan = dtype == DType::kFloat32 ? 0x7f800123u
                             : dtype == DType::kFloat16 ? 0x7d23u  // signalling, payload 0x123
                                                        : 0xff81u;
        key.SetBits(0, 2, 1, nan);
        value.SetBits(1, 6, 4, nan);
        key.SetBits(1, 0, 0, dtype == DType::kFloat32 ? 0x80000000u : 0x8000u);  // -0
        std::vector<int32_t> kept;
        for (int64_t h = 0; h < kHeads; ++h) {
          for (int32_t t = 0; t < kTokens; ++t) kept.push_back(t);
        }
        const MergeRun r = Merge(key, value, kept, kTokens, mode, MergeThreshold::kMean);
        ASSERT_TRUE(r.status.ok()) << r.status;
        ASSERT_EQ(r.out_key.NumBytes(), key.NumBytes());
        EXPECT_EQ(std::memcmp(r.out_key.data(), key.data(), key.NumBytes()), 0);
        EXPECT_EQ(std::memcmp(r.out_value.data(), value.data(), value.NumBytes()), 0);
      }
    }
  }
}

TEST(MergeGatherTest, NoneIsABitExactGatherEvenWithNaN) {
  constexpr int64_t kHeads = 2, kTokens = 9, kDim = 3;
  for (DType dtype : test::kAllDTypes) {
    for (Layout layout : test::kAllLayouts) {
      HostTensor key = test::RandomTensor(dtype, layout, kHeads, kTokens, kDim, 5);
      HostTensor value = test::RandomTensor(dtype, layout, kHeads, kTokens, kDim, 6);
      const uint32_t nan = dtype == DType::kFloat32 ? 0xffc00042u : 0x7e01u;
      key.SetBits(1, 4, 2, nan);
      value.SetBits(0, 8, 0, nan);
      const std::vector<int32_t> kept = {0, 3, 8, 1, 4, 5};
      const MergeRun r = Merge(key, value, kept, 3, MergeMode::kNone, MergeThreshold::kNone);
      ASSERT_TRUE(r.status.ok()) << r.status;
      for (int64_t h = 0; h < kHeads; ++h) {
        for (int64_t b = 0; b < 3; ++b) {
          for (int64_t d = 0; d < kDim; ++d) {
            EXPECT_EQ(r.out_key.Bits(h, b, d), key.Bits(h, kept[h * 3 + b], d));
            EXPECT_EQ(r.out_value.Bits(h, b, d), value.Bits(h, kept[h * 3 + b], d));
          }
        }
      }
    }
  }
}

// ---- invalid arguments -------------------------------------------------------------

class MergeInvalidTest : public ::testing::Test {
 protected:
  MergeInvalidTest()
      : key_(test::RandomTensor(DType::kFloat16, Layout::kNHD, 2, 6, 4, 1)),
        value_(test::RandomTensor(DType::kFloat16, Layout::kNHD, 2, 6, 4, 2)),
        out_key_(DType::kFloat16, Layout::kNHD, 2, 3, 4),
        out_value_(DType::kFloat16, Layout::kNHD, 2, 3, 4),
        kept_{0, 2, 5, 1, 3, 4} {
    args_.key = key_.view();
    args_.value = value_.view();
    args_.kept = kept_.data();
    args_.budget = 3;
  }
  absl::StatusCode Run() {
    return cpu::MergeAndGather(args_, out_key_.mutable_view(), out_value_.mutable_view()).code();
  }

  HostTensor key_, value_, out_key_, out_value_;
  std::vector<int32_t> kept_;
  MergeArgs args_;
};

TEST_F(MergeInvalidTest, ValidArgumentsAreAccepted) { EXPECT_EQ(Run(), absl::StatusCode::kOk); }

TEST_F(MergeInvalidTest, KeptPositions) {
  kept_[1] = 0;  // not ascending
  EXPECT_EQ(Run(), absl::StatusCode::kInvalidArgument);
  kept_[1] = 5;  // duplicate
  EXPECT_EQ(Run(), absl::StatusCode::kInvalidArgument);
  kept_ = {0, 2, 6, 1, 3, 4};  // out of range
  args_.kept = kept_.data();
  EXPECT_EQ(Run(), absl::StatusCode::kInvalidArgument);
  kept_ = {-1, 2, 5, 1, 3, 4};
  args_.kept = kept_.data();
  EXPECT_EQ(Run(), absl::StatusCode::kInvalidArgument);
  args_.kept = nullptr;
  EXPECT_EQ(Run(), absl::StatusCode::kInvalidArgument);
}

TEST_F(MergeInvalidTest, Budget) {
  args_.budget = 0;
  EXPECT_EQ(Run(), absl::StatusCode::kInvalidArgument);
  args_.budget = 7;
  EXPECT_EQ(Run(), absl::StatusCode::kInvalidArgument);
}

TEST_F(MergeInvalidTest, OutputMustMatchTheInputDTypeLayoutAndShape) {
  HostTensor wrong_dtype(DType::kBFloat16, Layout::kNHD, 2, 3, 4);
  EXPECT_EQ(cpu::MergeAndGather(args_, wrong_dtype.mutable_view(), out_value_.mutable_view()).code(),
            absl::StatusCode::kInvalidArgument);
  HostTensor wrong_layout(DType::kFloat16, Layout::kHND, 2, 3, 4);
  EXPECT_EQ(cpu::MergeAndGather(args_, out_key_.mutable_view(), wrong_layout.mutable_view()).code(),
            absl::StatusCode::kInvalidArgument);
  HostTensor wrong_tokens(DType::kFloat16, Layout::kNHD, 2, 4, 4);
  EXPECT_EQ(cpu::MergeAndGather(args_, wrong_tokens.mutable_view(), out_value_.mutable_view()).code(),
            absl::StatusCode::kInvalidArgument);
  MutableTensorView null_out = out_key_.mutable_view();
  null_out.data = nullptr;
  EXPECT_EQ(cpu::MergeAndGather(args_, null_out, out_value_.mutable_view()).code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(MergeInvalidTest, ValueMustMatchTheKey) {
  const HostTensor v32 = test::RandomTensor(DType::kFloat32, Layout::kNHD, 2, 6, 4, 2);
  args_.value = v32.view();
  EXPECT_EQ(Run(), absl::StatusCode::kInvalidArgument);
  const HostTensor short_value = test::RandomTensor(DType::kFloat16, Layout::kNHD, 2, 5, 4, 2);
  args_.value = short_value.view();
  EXPECT_EQ(Run(), absl::StatusCode::kInvalidArgument);
  args_.value = value_.view();
  args_.key.data = nullptr;
  EXPECT_EQ(Run(), absl::StatusCode::kInvalidArgument);
  args_.key = key_.view();
  args_.mode = static_cast<MergeMode>(9);
  EXPECT_EQ(Run(), absl::StatusCode::kInvalidArgument);
  args_.mode = MergeMode::kAverage;
  args_.threshold = static_cast<MergeThreshold>(9);
  EXPECT_EQ(Run(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace medakv
