// The fidelity evaluation (`medakv eval`): the attention-output error against
// hand-computed and naive double-precision values, the held-out split, and
// Evaluate's properties (full and rho = 1 are exact, kept fractions, errors
// of a deliberately bad compression, argument checks), plus the list parsers
// and the CSV/verdict output.
#include "client/cli/eval.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "absl/strings/str_cat.h"
#include "tests/kernels/test_util.h"
#include "tests/service/test_cache.h"
#include "tests/reference/reference.h"

namespace medakv {
namespace {

using test::HostTensor;
using test::MakeTensor;
using test::RandomTensor;

// A random query-form cache; keeps the tensors alive for the views.
using test::TestCache;

TestCache MakeCache(DType dtype, Layout layout, int64_t layers, int64_t kv_heads, int64_t group, int64_t tokens,
                    int64_t head_dim, int64_t q_tokens, uint64_t seed,
                    test::VisualPattern pattern = test::VisualPattern::kMiddle) {
  return test::MakeTestCache({.dtype = dtype, .layout = layout, .layers = layers, .kv_heads = kv_heads, .group = group,
                              .tokens = tokens, .head_dim = head_dim, .q_tokens = q_tokens, .pattern = pattern,
                              .seed = seed});
}

CompressOptions RunOptions(PolicyKind policy, double rho) {
  CompressOptions o = DefaultOptions(policy);
  o.budget.rho = rho;
  return o;
}

void ExpectError(const absl::Status& s, const std::string& fragment) {
  ASSERT_FALSE(s.ok()) << "expected an error mentioning '" << fragment << "'";
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(std::string(s.message()).find(fragment), std::string::npos) << s.message();
}

// ---- AttentionOutputError -----------------------------------------------------

// One query head, one kv head, head_dim 2, two tokens, scale 1:
// q = (ln 3, 0), k0 = (1, 0), k1 = (0, 1) -> softmax = (3/4, 1/4);
// v0 = (1, 0), v1 = (0, 1) -> o = (3/4, 1/4), ||o|| = sqrt(10)/4.
TEST(AttentionOutputErrorTest, HandComputedTwoTokens) {
  const HostTensor q = MakeTensor(DType::kFloat32, Layout::kHND, 1, 1, 2, {std::log(3.0), 0.0});
  const HostTensor k = MakeTensor(DType::kFloat32, Layout::kHND, 1, 2, 2, {1, 0, 0, 1});
  const HostTensor v = MakeTensor(DType::kFloat32, Layout::kHND, 1, 2, 2, {1, 0, 0, 1});
  // Keep only token 0: o' = v0 = (1, 0); ||o' - o|| = sqrt(2)/4 -> error 1/sqrt(5).
  const HostTensor k0 = MakeTensor(DType::kFloat32, Layout::kHND, 1, 1, 2, {1, 0});
  const HostTensor v0 = MakeTensor(DType::kFloat32, Layout::kHND, 1, 1, 2, {1, 0});
  absl::StatusOr<double> e = AttentionOutputError(q.view(), k.view(), v.view(), k0.view(), v0.view(), 1.0);
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_NEAR(*e, 1.0 / std::sqrt(5.0), 1e-7);
  // Keep only token 1: o' = (0, 1); ||o' - o|| = sqrt(18)/4 -> error 3/sqrt(5).
  const HostTensor k1 = MakeTensor(DType::kFloat32, Layout::kHND, 1, 1, 2, {0, 1});
  const HostTensor v1 = MakeTensor(DType::kFloat32, Layout::kHND, 1, 1, 2, {0, 1});
  e = AttentionOutputError(q.view(), k.view(), v.view(), k1.view(), v1.view(), 1.0);
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_NEAR(*e, 3.0 / std::sqrt(5.0), 1e-7);
  // One merged token whose value is exactly o: error 0 (a single token gets probability 1).
  const HostTensor vm = MakeTensor(DType::kFloat32, Layout::kHND, 1, 1, 2, {0.75, 0.25});
  e = AttentionOutputError(q.view(), k.view(), v.view(), k0.view(), vm.view(), 1.0);
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_NEAR(*e, 0.0, 1e-7);
  // The same tokens in another order: the same output.
  const HostTensor ks = MakeTensor(DType::kFloat32, Layout::kHND, 1, 2, 2, {0, 1, 1, 0});
  const HostTensor vs = MakeTensor(DType::kFloat32, Layout::kHND, 1, 2, 2, {0, 1, 1, 0});
  e = AttentionOutputError(q.view(), k.view(), v.view(), ks.view(), vs.view(), 1.0);
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_NEAR(*e, 0.0, 1e-7);
}

// The default scale is 1/sqrt(head_dim): q scaled by sqrt(2) gives the same example.
TEST(AttentionOutputErrorTest, DefaultScaleIsInverseSqrtHeadDim) {
  const HostTensor q = MakeTensor(DType::kFloat32, Layout::kHND, 1, 1, 2, {std::sqrt(2.0) * std::log(3.0), 0.0});
  const HostTensor k = MakeTensor(DType::kFloat32, Layout::kHND, 1, 2, 2, {1, 0, 0, 1});
  const HostTensor v = MakeTensor(DType::kFloat32, Layout::kHND, 1, 2, 2, {1, 0, 0, 1});
  const HostTensor k0 = MakeTensor(DType::kFloat32, Layout::kHND, 1, 1, 2, {1, 0});
  const HostTensor v0 = MakeTensor(DType::kFloat32, Layout::kHND, 1, 1, 2, {1, 0});
  absl::StatusOr<double> e = AttentionOutputError(q.view(), k.view(), v.view(), k0.view(), v0.view());
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_NEAR(*e, 1.0 / std::sqrt(5.0), 1e-6);
}

TEST(AttentionOutputErrorTest, ZeroOutputTermsAreSkipped) {
  const HostTensor q = RandomTensor(DType::kFloat32, Layout::kHND, 2, 3, 4, 1);
  const HostTensor k = RandomTensor(DType::kFloat32, Layout::kHND, 1, 5, 4, 2);
  const HostTensor v = MakeTensor(DType::kFloat32, Layout::kHND, 1, 5, 4, std::vector<double>(20, 0.0));
  const HostTensor ck = RandomTensor(DType::kFloat32, Layout::kHND, 1, 2, 4, 3);
  const HostTensor cv = RandomTensor(DType::kFloat32, Layout::kHND, 1, 2, 4, 4);
  absl::StatusOr<LayerError> e = AttentionOutputErrorTerms(q.view(), k.view(), v.view(), ck.view(), cv.view());
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ(e->terms, 0);
  EXPECT_EQ(e->skipped, 6);  // 3 rows x 2 heads
  EXPECT_EQ(e->Mean(), 0.0);
}

// softmax(s q K^T) V in double, straight from the definition.
std::vector<double> NaiveOutput(const TensorView& q, int64_t h, int64_t i, const TensorView& k, const TensorView& v,
                                int64_t g, double scale) {
  const int64_t d = k.head_dim;
  std::vector<double> logits(k.tokens);
  double m = -INFINITY;
  for (int64_t j = 0; j < k.tokens; ++j) {
    double s = 0.0;
    for (int64_t x = 0; x < d; ++x) s += reference::ReadElement(q, h, i, x) * reference::ReadElement(k, g, j, x);
    logits[j] = scale * s;
    m = std::max(m, logits[j]);
  }
  double sum = 0.0;
  for (double& s : logits) sum += (s = std::exp(s - m));
  std::vector<double> o(d, 0.0);
  for (int64_t j = 0; j < k.tokens; ++j) {
    for (int64_t x = 0; x < d; ++x) o[x] += logits[j] / sum * reference::ReadElement(v, g, j, x);
  }
  return o;
}

class ErrorVsNaiveTest : public ::testing::TestWithParam<std::tuple<DType, Layout>> {};

TEST_P(ErrorVsNaiveTest, MatchesDoublePrecisionDefinition) {
  const auto [dtype, layout] = GetParam();
  // 2 kv heads, GQA group 3, 5 rows, 150 tokens (several key tiles), head_dim 24,
  // a compressed layer of 37 tokens in the other layout.
  const int64_t kv = 2, group = 3, rows = 5, t = 150, d = 24, b = 37;
  const Layout other = layout == Layout::kHND ? Layout::kNHD : Layout::kHND;
  const HostTensor q = RandomTensor(dtype, layout, kv * group, rows, d, 10, 1.5);
  const HostTensor k = RandomTensor(dtype, layout, kv, t, d, 11);
  const HostTensor v = RandomTensor(dtype, layout, kv, t, d, 12);
  const HostTensor ck = RandomTensor(dtype, other, kv, b, d, 13);
  const HostTensor cv = RandomTensor(dtype, other, kv, b, d, 14);
  const double scale = 0.3;
  double sum = 0.0;
  for (int64_t h = 0; h < kv * group; ++h) {
    for (int64_t i = 0; i < rows; ++i) {
      const std::vector<double> o = NaiveOutput(q.view(), h, i, k.view(), v.view(), h / group, scale);
      const std::vector<double> o2 = NaiveOutput(q.view(), h, i, ck.view(), cv.view(), h / group, scale);
      double diff = 0.0, norm = 0.0;
      for (int64_t x = 0; x < d; ++x) {
        diff += (o2[x] - o[x]) * (o2[x] - o[x]);
        norm += o[x] * o[x];
      }
      sum += std::sqrt(diff / norm);
    }
  }
  const double expected = sum / static_cast<double>(kv * group * rows);
  absl::StatusOr<LayerError> e = AttentionOutputErrorTerms(q.view(), k.view(), v.view(), ck.view(), cv.view(), scale);
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ(e->terms, kv * group * rows);
  EXPECT_TRUE(test::Near(e->Mean(), expected, 1e-5, 1e-7));
}

INSTANTIATE_TEST_SUITE_P(All, ErrorVsNaiveTest,
                         ::testing::Combine(::testing::ValuesIn(test::kAllDTypes),
                                            ::testing::ValuesIn(test::kAllLayouts)),
                         [](const auto& info) {
                           return test::DTypeTag(std::get<0>(info.param)) + test::LayoutTag(std::get<1>(info.param));
                         });

TEST(AttentionOutputErrorTest, RejectsInconsistentShapes) {
  const HostTensor q = RandomTensor(DType::kFloat32, Layout::kHND, 4, 2, 8, 1);
  const HostTensor k = RandomTensor(DType::kFloat32, Layout::kHND, 2, 6, 8, 2);
  const HostTensor v = RandomTensor(DType::kFloat32, Layout::kHND, 2, 6, 8, 3);
  const HostTensor ck = RandomTensor(DType::kFloat32, Layout::kHND, 2, 3, 8, 4);
  const HostTensor q3 = RandomTensor(DType::kFloat32, Layout::kHND, 3, 2, 8, 5);
  const HostTensor qd = RandomTensor(DType::kFloat32, Layout::kHND, 4, 2, 4, 6);
  const HostTensor v5 = RandomTensor(DType::kFloat32, Layout::kHND, 2, 5, 8, 7);
  const HostTensor ck1 = RandomTensor(DType::kFloat32, Layout::kHND, 1, 3, 8, 8);
  ExpectError(AttentionOutputError(q3.view(), k.view(), v.view(), ck.view(), ck.view()).status(),
              "multiple of kv_heads");
  ExpectError(AttentionOutputError(qd.view(), k.view(), v.view(), ck.view(), ck.view()).status(), "query: shape");
  ExpectError(AttentionOutputError(q.view(), k.view(), v5.view(), ck.view(), ck.view()).status(), "value: shape");
  ExpectError(AttentionOutputError(q.view(), k.view(), v.view(), ck1.view(), ck.view()).status(),
              "compressed key: shape");
  TensorView empty = ck.view();
  empty.tokens = 0;
  ExpectError(AttentionOutputError(q.view(), k.view(), v.view(), empty, empty).status(), "no token");
  ExpectError(AttentionOutputError(q.view(), k.view(), v.view(), ck.view(), ck.view(), NAN).status(), "scale");
}

// Heavy hitters: keys aligned with the queries' direction get most of the
// attention. Keeping the highest-attention tokens must beat keeping the
// oldest ones by a wide margin.
TEST(AttentionOutputErrorTest, OldestTokensAreWorseThanTopAttention) {
  const int64_t kv = 2, group = 2, rows = 8, t = 256, d = 32, budget = 32;
  test::Rng rng(42);
  std::vector<double> dir(kv * d);
  for (double& x : dir) x = rng.Normal() * 3.0 / std::sqrt(static_cast<double>(d));
  std::vector<double> keys(kv * t * d), values(kv * t * d), queries(kv * group * rows * d);
  for (int64_t g = 0; g < kv; ++g) {
    for (int64_t j = 0; j < t; ++j) {
      const double heavy = rng.Uniform() < 0.08 ? 2.0 : 0.0;
      for (int64_t x = 0; x < d; ++x) {
        keys[(g * t + j) * d + x] = rng.Normal() + heavy * dir[g * d + x];
        values[(g * t + j) * d + x] = rng.Normal();
      }
    }
  }
  for (int64_t h = 0; h < kv * group; ++h) {
    for (int64_t i = 0; i < rows; ++i) {
      for (int64_t x = 0; x < d; ++x) queries[(h * rows + i) * d + x] = rng.Normal() + dir[(h / group) * d + x];
    }
  }
  const HostTensor q = MakeTensor(DType::kFloat16, Layout::kHND, kv * group, rows, d, queries);
  const HostTensor k = MakeTensor(DType::kFloat16, Layout::kHND, kv, t, d, keys);
  const HostTensor v = MakeTensor(DType::kFloat16, Layout::kHND, kv, t, d, values);
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));

  // Accumulated attention of the rows per kv head (naive, double).
  auto gather = [&](const std::vector<std::vector<int64_t>>& kept, HostTensor* ck, HostTensor* cv) {
    *ck = HostTensor(DType::kFloat16, Layout::kHND, kv, budget, d);
    *cv = HostTensor(DType::kFloat16, Layout::kHND, kv, budget, d);
    for (int64_t g = 0; g < kv; ++g) {
      for (int64_t b = 0; b < budget; ++b) {
        for (int64_t x = 0; x < d; ++x) {
          ck->Set(g, b, x, k.Get(g, kept[g][b], x));
          cv->Set(g, b, x, v.Get(g, kept[g][b], x));
        }
      }
    }
  };
  std::vector<std::vector<int64_t>> oldest(kv), top(kv);
  for (int64_t g = 0; g < kv; ++g) {
    std::vector<double> score(t, 0.0);
    for (int64_t h = g * group; h < (g + 1) * group; ++h) {
      for (int64_t i = 0; i < rows; ++i) {
        std::vector<double> logit(t);
        double m = -INFINITY, sum = 0.0;
        for (int64_t j = 0; j < t; ++j) {
          double s = 0.0;
          for (int64_t x = 0; x < d; ++x) s += q.Get(h, i, x) * k.Get(g, j, x);
          logit[j] = scale * s;
          m = std::max(m, logit[j]);
        }
        for (double& s : logit) sum += (s = std::exp(s - m));
        for (int64_t j = 0; j < t; ++j) score[j] += logit[j] / sum;
      }
    }
    std::vector<int64_t> order(t);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return score[a] > score[b]; });
    top[g].assign(order.begin(), order.begin() + budget);
    std::sort(top[g].begin(), top[g].end());
    for (int64_t b = 0; b < budget; ++b) oldest[g].push_back(b);
  }
  HostTensor ck_old, cv_old, ck_top, cv_top;
  gather(oldest, &ck_old, &cv_old);
  gather(top, &ck_top, &cv_top);
  absl::StatusOr<double> e_old = AttentionOutputError(q.view(), k.view(), v.view(), ck_old.view(), cv_old.view());
  absl::StatusOr<double> e_top = AttentionOutputError(q.view(), k.view(), v.view(), ck_top.view(), cv_top.view());
  ASSERT_TRUE(e_old.ok()) << e_old.status();
  ASSERT_TRUE(e_top.ok()) << e_top.status();
  EXPECT_GT(*e_top, 0.0);
  EXPECT_LT(2.0 * *e_top, *e_old) << "top attention " << *e_top << ", oldest " << *e_old;
}

// ---- SplitHoldout ---------------------------------------------------------------

class SplitTest : public ::testing::TestWithParam<Layout> {};

TEST_P(SplitTest, CopiesRowsAndKeepsPositions) {
  TestCache c = MakeCache(DType::kFloat16, GetParam(), 2, 2, 2, 40, 8, 10, 5);
  c.input.layers[1].query_positions = {3, 7, 9, 11, 20, 21, 30, 31, 38, 39};
  c.input.layers[1].query_outside_lse.resize(4 * 10);  // [q_heads 4, q_tokens 10]
  std::iota(c.input.layers[1].query_outside_lse.begin(), c.input.layers[1].query_outside_lse.end(), 0.f);
  absl::StatusOr<HoldoutSplit> s = SplitHoldout(c.input, 4);
  ASSERT_TRUE(s.ok()) << s.status();
  ASSERT_EQ(s->observed.layers.size(), 2u);
  ASSERT_EQ(s->held_out.size(), 2u);
  EXPECT_EQ(s->observed.layers[0].query_positions, (std::vector<int32_t>{30, 31, 32, 33, 34, 35}));
  EXPECT_EQ(s->observed.layers[1].query_positions, (std::vector<int32_t>{3, 7, 9, 11, 20, 21}));
  EXPECT_TRUE(s->observed.layers[0].query_outside_lse.empty());
  EXPECT_EQ(s->observed.layers[1].query_outside_lse,  // each head's observed rows
            (std::vector<float>{0, 1, 2, 3, 4, 5, 10, 11, 12, 13, 14, 15, 20, 21, 22, 23, 24, 25, 30, 31, 32, 33, 34,
                                35}));
  for (int l = 0; l < 2; ++l) {
    const LayerInput& o = s->observed.layers[l];
    EXPECT_EQ(o.key.data, c.input.layers[l].key.data);  // keys and values are shared, not copied
    EXPECT_EQ(o.value.data, c.input.layers[l].value.data);
    ASSERT_EQ(o.query.tokens, 6);
    ASSERT_EQ(s->held_out[l].tokens, 4);
    EXPECT_EQ(o.query.layout, GetParam());
    for (int64_t h = 0; h < 4; ++h) {
      for (int64_t x = 0; x < 8; ++x) {
        for (int64_t i = 0; i < 6; ++i) {
          EXPECT_EQ(reference::ReadElement(o.query, h, i, x), c.queries[l].Get(h, i, x));
        }
        for (int64_t i = 0; i < 4; ++i) {
          EXPECT_EQ(reference::ReadElement(s->held_out[l], h, i, x), c.queries[l].Get(h, 6 + i, x));
        }
      }
    }
  }
  EXPECT_TRUE(ValidateCacheInput(s->observed).ok());
}

INSTANTIATE_TEST_SUITE_P(Layouts, SplitTest, ::testing::ValuesIn(test::kAllLayouts),
                         [](const auto& info) { return test::LayoutTag(info.param); });

TEST(SplitHoldoutTest, RejectsBadHoldout) {
  TestCache c = MakeCache(DType::kFloat32, Layout::kHND, 2, 1, 2, 30, 4, 8, 1);
  ExpectError(SplitHoldout(c.input, 0).status(), "holdout must be >= 1");
  ExpectError(SplitHoldout(c.input, -3).status(), "holdout must be >= 1");
  ExpectError(SplitHoldout(c.input, 8).status(), "holdout 8 leaves layer 0 no observed query row");
  ExpectError(SplitHoldout(c.input, 100).status(), "holdout must be at most 7");
  EXPECT_TRUE(SplitHoldout(c.input, 7).ok());
  const std::vector<CompressOptions> runs = {RunOptions(PolicyKind::kMeda, 0.5)};
  ExpectError(Evaluate(c.input, 8, runs, *MakeCpuBackend()).status(), "no observed query row");
}

TEST(SplitHoldoutTest, RejectsPrecomputedCache) {
  TestCache c = MakeCache(DType::kFloat32, Layout::kHND, 1, 1, 2, 30, 4, 8, 1);
  std::vector<float> scores(30, 1.f);
  c.input.stats = StatsForm::kPrecomputed;
  c.input.layers[0].scores = scores.data();
  c.input.layers[0].score_heads = 1;
  ExpectError(SplitHoldout(c.input, 2).status(), "precomputed");
  ExpectError(Evaluate(c.input, 2, {RunOptions(PolicyKind::kFull, 1.0)}, *MakeCpuBackend()).status(), "precomputed");
}

// ---- Evaluate -------------------------------------------------------------------------

TEST(EvaluateTest, FullPolicyHasZeroError) {
  for (const Layout layout : test::kAllLayouts) {
    TestCache c = MakeCache(DType::kBFloat16, layout, 3, 2, 4, 90, 16, 12, 7);
    absl::StatusOr<std::vector<EvalResult>> r = Evaluate(
        c.input, 4, {RunOptions(PolicyKind::kFull, 0.2), RunOptions(PolicyKind::kFull, 0.05)}, *MakeCpuBackend());
    ASSERT_TRUE(r.ok()) << r.status();
    ASSERT_EQ(r->size(), 2u);
    for (const EvalResult& e : *r) {
      EXPECT_EQ(e.policy, PolicyKind::kFull);
      EXPECT_LT(e.mean_rel_error, 1e-12);
      EXPECT_EQ(e.kept_fraction, 1.0);
      EXPECT_EQ(e.error_terms, 3 * 4 * 8);  // layers x holdout x q_heads
      ASSERT_EQ(e.layer_error.size(), 3u);
      for (double x : e.layer_error) EXPECT_LT(x, 1e-12);
    }
  }
}

TEST(EvaluateTest, EveryPolicyAtRhoOneHasZeroError) {
  TestCache c = MakeCache(DType::kFloat16, Layout::kHND, 3, 2, 2, 80, 16, 12, 21);
  std::vector<CompressOptions> runs;
  for (const PolicyKind p : AllPolicies()) runs.push_back(RunOptions(p, 1.0));
  absl::StatusOr<std::vector<EvalResult>> r = Evaluate(c.input, 3, runs, *MakeCpuBackend());
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->size(), runs.size());
  for (const EvalResult& e : *r) {
    EXPECT_LT(e.mean_rel_error, 1e-12) << PolicyName(e.policy);
    EXPECT_EQ(e.kept_fraction, 1.0) << PolicyName(e.policy);
    EXPECT_EQ(e.error_terms, 3 * 3 * 4) << PolicyName(e.policy);  // layers x holdout x q_heads, none skipped
  }
}

TEST(EvaluateTest, KeptFractionIsTokensKeptOverTokensIn) {
  TestCache c = MakeCache(DType::kFloat16, Layout::kNHD, 4, 2, 2, 120, 16, 20, 33);
  std::vector<CompressOptions> runs;
  for (const PolicyKind p : AllPolicies()) {
    for (const double rho : {0.1, 0.37}) runs.push_back(RunOptions(p, rho));
  }
  int calls = 0;
  absl::StatusOr<std::vector<EvalResult>> r =
      Evaluate(c.input, 6, runs, *MakeCpuBackend(), [&](const EvalResult&) { ++calls; });
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->size(), runs.size());
  EXPECT_EQ(calls, static_cast<int>(runs.size()));
  for (size_t i = 0; i < r->size(); ++i) {
    const EvalResult& e = (*r)[i];
    SCOPED_TRACE(absl::StrCat(PolicyName(e.policy), " rho ", e.rho));
    EXPECT_EQ(e.policy, runs[i].policy);
    EXPECT_EQ(e.rho, runs[i].budget.rho);
    EXPECT_EQ(e.tokens_in, 4 * 120);
    EXPECT_EQ(e.kept_fraction, static_cast<double>(e.tokens_kept) / static_cast<double>(e.tokens_in));
    ASSERT_EQ(e.layer_budget.size(), 4u);
    ASSERT_EQ(e.layer_error.size(), 4u);
    ASSERT_EQ(e.layer_entropy.size(), 4u);
    EXPECT_EQ(std::accumulate(e.layer_budget.begin(), e.layer_budget.end(), int64_t{0}), e.tokens_kept);
    EXPECT_TRUE(std::isfinite(e.mean_rel_error));
    if (e.policy == PolicyKind::kFull) {
      EXPECT_EQ(e.kept_fraction, 1.0);
    } else {
      EXPECT_LT(e.kept_fraction, 0.5);
      EXPECT_GT(e.mean_rel_error, 0.0);
    }
    // The overall mean is the mean of the layer means (every layer has the same number of terms).
    const double mean_of_layers =
        std::accumulate(e.layer_error.begin(), e.layer_error.end(), 0.0) / static_cast<double>(e.layer_error.size());
    EXPECT_NEAR(e.mean_rel_error, mean_of_layers, 1e-12);
  }
}

// Evaluate == compress the observed rows, then AttentionOutputErrorTerms per
// layer with the held-out rows (here with a non-default logit scale).
TEST(EvaluateTest, MatchesCompressThenLayerError) {
  TestCache c = MakeCache(DType::kFloat32, Layout::kHND, 3, 2, 3, 100, 8, 16, 55);
  CompressOptions o = RunOptions(PolicyKind::kMeda, 0.25);
  o.scale = 0.2f;
  const auto backend = MakeCpuBackend();
  absl::StatusOr<std::vector<EvalResult>> r = Evaluate(c.input, 5, {o}, *backend);
  ASSERT_TRUE(r.ok()) << r.status();
  absl::StatusOr<HoldoutSplit> split = SplitHoldout(c.input, 5);
  ASSERT_TRUE(split.ok()) << split.status();
  absl::StatusOr<CompressResult> compressed = Compress(split->observed, o, *backend);
  ASSERT_TRUE(compressed.ok()) << compressed.status();
  for (int64_t l = 0; l < 3; ++l) {
    const LayerResult& lr = compressed->layers[l];
    EXPECT_EQ((*r)[0].layer_budget[l], lr.budget);
    EXPECT_EQ((*r)[0].layer_entropy[l], lr.entropy);
    const TensorView ck{lr.key.data(), DType::kFloat32, Layout::kHND, 2, lr.budget, 8};
    const TensorView cv{lr.value.data(), DType::kFloat32, Layout::kHND, 2, lr.budget, 8};
    absl::StatusOr<LayerError> e =
        AttentionOutputErrorTerms(split->held_out[l], c.input.layers[l].key, c.input.layers[l].value, ck, cv, o.scale);
    ASSERT_TRUE(e.ok()) << e.status();
    EXPECT_NEAR((*r)[0].layer_error[l], e->Mean(), 1e-12);
  }
}

// Future rows given explicitly (as `eval --synth-future` does): the policy
// sees every query row of the cache, the error uses the given rows.
TEST(EvaluateTest, HeldOutRowsGiven) {
  TestCache c = MakeCache(DType::kFloat16, Layout::kNHD, 2, 2, 2, 70, 8, 10, 77);
  const std::vector<HostTensor> future = {RandomTensor(DType::kFloat32, Layout::kHND, 4, 3, 8, 90),
                                          RandomTensor(DType::kFloat32, Layout::kHND, 4, 5, 8, 91)};
  const std::vector<TensorView> held_out = {future[0].view(), future[1].view()};
  const CompressOptions o = RunOptions(PolicyKind::kH2O, 0.3);
  const auto backend = MakeCpuBackend();
  absl::StatusOr<std::vector<EvalResult>> r = EvaluateHeldOut(c.input, held_out, {o}, *backend);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ((*r)[0].error_terms, 4 * 3 + 4 * 5);
  absl::StatusOr<CompressResult> compressed = Compress(c.input, o, *backend);
  ASSERT_TRUE(compressed.ok()) << compressed.status();
  for (int64_t l = 0; l < 2; ++l) {
    const LayerResult& lr = compressed->layers[l];
    const TensorView ck{lr.key.data(), DType::kFloat16, Layout::kNHD, 2, lr.budget, 8};
    const TensorView cv{lr.value.data(), DType::kFloat16, Layout::kNHD, 2, lr.budget, 8};
    absl::StatusOr<double> e =
        AttentionOutputError(held_out[l], c.input.layers[l].key, c.input.layers[l].value, ck, cv);
    ASSERT_TRUE(e.ok()) << e.status();
    EXPECT_NEAR((*r)[0].layer_error[l], *e, 1e-12);
  }
  ExpectError(EvaluateHeldOut(c.input, {held_out[0]}, {o}, *backend).status(), "1 layers for a cache of 2");
  const HostTensor wrong_heads = RandomTensor(DType::kFloat32, Layout::kHND, 2, 3, 8, 92);
  ExpectError(EvaluateHeldOut(c.input, {held_out[0], wrong_heads.view()}, {o}, *backend).status(),
              "layer 1 held-out queries: shape");
  TensorView empty = held_out[1];
  empty.tokens = 0;
  ExpectError(EvaluateHeldOut(c.input, {held_out[0], empty}, {o}, *backend).status(),
              "layer 1 held-out queries: no row");
}

TEST(EvaluateTest, InvalidOptionsNameTheRun) {
  TestCache c = MakeCache(DType::kFloat32, Layout::kHND, 1, 1, 1, 20, 4, 6, 1);
  CompressOptions bad = RunOptions(PolicyKind::kH2O, 0.0);
  ExpectError(Evaluate(c.input, 2, {RunOptions(PolicyKind::kFull, 0.5), bad}, *MakeCpuBackend()).status(),
              "policy h2o, rho 0: ");
}

// ---- Lists, verdicts, files ---------------------------------------------------------------

TEST(EvalListsTest, ParsePolicies) {
  absl::StatusOr<std::vector<PolicyKind>> p = ParsePolicyList("full,streaming_llm,h2o,snapkv,pyramidkv,look_m,meda,amber");
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(*p, AllPolicies());
  p = ParsePolicyList("meda, H2O,meda,look-m");
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(*p, (std::vector<PolicyKind>{PolicyKind::kMeda, PolicyKind::kH2O, PolicyKind::kLookM}));
  ExpectError(ParsePolicyList("meda,foo").status(), "unknown policy 'foo'");
  ExpectError(ParsePolicyList("meda,,h2o").status(), "empty policy name");
  ExpectError(ParsePolicyList("").status(), "empty policy name");
}

TEST(EvalListsTest, ParseRhos) {
  absl::StatusOr<std::vector<double>> r = ParseRhoList("0.5,0.05, 0.1,0.5,1");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(*r, (std::vector<double>{0.05, 0.1, 0.5, 1.0}));
  ExpectError(ParseRhoList("0.1,0").status(), "'0' is not a number in (0, 1]");
  ExpectError(ParseRhoList("1.5").status(), "'1.5'");
  ExpectError(ParseRhoList("0.1,x").status(), "'x'");
  ExpectError(ParseRhoList("nan").status(), "'nan'");
}

EvalResult Result(PolicyKind p, double rho, double error, std::vector<double> layers = {}) {
  EvalResult r;
  r.policy = p;
  r.rho = rho;
  r.mean_rel_error = error;
  r.kept_fraction = p == PolicyKind::kFull ? 1.0 : rho;
  r.layer_error = std::move(layers);
  r.layer_budget.assign(r.layer_error.size(), 7);
  r.layer_entropy.assign(r.layer_error.size(), 1.5f);
  return r;
}

TEST(EvalReportTest, MedaAgainstBestUniformBaseline) {
  const std::vector<EvalResult> results = {
      Result(PolicyKind::kFull, 0.1, 0.0),   Result(PolicyKind::kH2O, 0.1, 0.3),
      Result(PolicyKind::kSnapKV, 0.1, 0.2), Result(PolicyKind::kPyramidKV, 0.1, 0.01),  // not uniform
      Result(PolicyKind::kMeda, 0.1, 0.25),  Result(PolicyKind::kH2O, 0.2, 0.2),
      Result(PolicyKind::kMeda, 0.2, 0.1),   Result(PolicyKind::kMeda, 0.5, 0.1),  // no baseline at 0.5
  };
  const std::vector<MedaComparison> v = CompareMedaToUniform(results);
  ASSERT_EQ(v.size(), 2u);
  EXPECT_EQ(v[0].rho, 0.1);
  EXPECT_EQ(v[0].best_uniform, PolicyKind::kSnapKV);
  EXPECT_EQ(v[0].best_uniform_error, 0.2);
  EXPECT_FALSE(v[0].meda_beats_uniform);
  EXPECT_EQ(v[1].rho, 0.2);
  EXPECT_TRUE(v[1].meda_beats_uniform);
  const std::string table = FormatEvalTable(results);
  EXPECT_NE(table.find("rho 0.1: meda 0.250000 does NOT beat the uniform-budget baseline snapkv (0.200000)"),
            std::string::npos)
      << table;
  EXPECT_NE(table.find("rho 0.2: meda 0.100000 beats every uniform-budget baseline (best: h2o 0.200000)"),
            std::string::npos)
      << table;
  // Inside a rho, the lowest error first.
  EXPECT_LT(table.find("pyramidkv"), table.find("snapkv"));
  EXPECT_LT(table.find("snapkv"), table.find("meda"));
}

TEST(EvalReportTest, CsvRows) {
  const std::vector<EvalResult> results = {Result(PolicyKind::kMeda, 0.05, 0.125, {0.1, 0.15}),
                                           Result(PolicyKind::kLookM, 0.5, 0.25, {0.25})};
  EXPECT_EQ(EvalCsv(results),
            "policy,rho,kept_fraction,mean_rel_error\n"
            "meda,0.05,0.05,0.125\n"
            "look_m,0.5,0.5,0.25\n");
  EXPECT_EQ(EvalLayersCsv(results),
            "policy,rho,layer,budget,entropy,rel_error\n"
            "meda,0.05,0,7,1.5,0.1\n"
            "meda,0.05,1,7,1.5,0.15\n"
            "look_m,0.5,0,7,1.5,0.25\n");
}

TEST(EvalReportTest, WriteTextFile) {
  const std::string dir = ::testing::TempDir() + "/medakv_eval_test";
  std::filesystem::create_directories(dir);
  const std::string path = dir + "/out.csv";
  ASSERT_TRUE(WriteTextFile(path, "a,b\n1,2\n").ok());
  std::ifstream f(path);
  std::stringstream ss;
  ss << f.rdbuf();
  EXPECT_EQ(ss.str(), "a,b\n1,2\n");
  const absl::Status bad = WriteTextFile(dir + "/missing/out.csv", "x");
  EXPECT_FALSE(bad.ok());
  EXPECT_NE(std::string(bad.message()).find("missing/out.csv"), std::string::npos) << bad.message();
  EXPECT_FALSE(std::filesystem::exists(dir + "/missing"));
}

}  // namespace
}  // namespace medakv
