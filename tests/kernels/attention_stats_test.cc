// cpu::AttentionStats (docs/algorithm.md, MEDA step 1 and the score of step 3)
// against the naive double-precision reference, plus hand-computed cases and
// argument validation.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "kernels/common/tensor.h"
#include "kernels/cpu/ops.h"
#include "kernels/ops/op_args.h"
#include "tests/kernels/test_util.h"
#include "tests/reference/reference.h"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace medakv {
namespace {

using test::HostTensor;
using test::VisualPattern;

// fp32 accumulation against double: scores are sums of up to Tq*g
// probabilities; entropies are means of row entropies.
constexpr double kScoreRel = 2e-4;
constexpr double kScoreAbs = 2e-5;
constexpr double kEntropyRel = 2e-4;
constexpr double kEntropyAbs = 5e-5;

struct StatsCase {
  int64_t tokens = 7;
  int64_t q_tokens = 7;
  int64_t head_dim = 16;
  int64_t kv_heads = 2;
  int64_t group = 1;  // q_heads = group * kv_heads
  DType dtype = DType::kFloat32;
  Layout q_layout = Layout::kHND;
  Layout k_layout = Layout::kHND;
  VisualPattern pattern = VisualPattern::kMiddle;
  EntropyHeads heads = EntropyHeads::kMeanAttention;
  EntropySource source = EntropySource::kCrossModal;
  bool custom_positions = false;  // random, unsorted, with repeats; else the last Tq
  int64_t score_rows_begin = 0;
  ScoreAggregation aggregation = ScoreAggregation::kSum;
  bool outside = false;  // rows carry an outside_lse (some -inf)
  double q_stddev = 1.7;  // larger: more peaked rows
  uint64_t seed = 1;
};

std::string CaseName(const StatsCase& c) {
  return absl::StrCat(
      "T", c.tokens, "_Tq", c.q_tokens, "_D", c.head_dim, "_Kv", c.kv_heads, "G", c.group, "_",
      test::DTypeTag(c.dtype), "_q", test::LayoutTag(c.q_layout), "_k",
      test::LayoutTag(c.k_layout), "_", test::VisualPatternTag(c.pattern), "_",
      c.heads == EntropyHeads::kMeanAttention ? "MeanAttention" : "MeanEntropy", "_",
      c.source == EntropySource::kCrossModal ? "CrossModal" : "Causal", "_",
      c.custom_positions ? "CustomPos" : "LastPos", "_From", c.score_rows_begin,
      c.aggregation == ScoreAggregation::kMax ? "_Max" : "", c.outside ? "_Outside" : "",
      c.q_stddev > 2.0 ? "_Peaked" : "");
}

int64_t RowsFor(int64_t tokens) { return tokens <= 7 ? tokens : 24; }

std::vector<StatsCase> SweepCases() {
  std::vector<StatsCase> cases;
  const VisualPattern patterns[] = {VisualPattern::kMiddle, VisualPattern::kStart,
                                    VisualPattern::kInterleaved, VisualPattern::kNone};
  // Every T, dtype, pair of layouts and GQA group; the options cycle.
  int64_t n = 0;
  for (int64_t tokens : {1, 7, 769}) {
    for (DType dtype : test::kAllDTypes) {
      for (Layout ql : test::kAllLayouts) {
        for (Layout kl : test::kAllLayouts) {
          for (int64_t group : {1, 4, 8}) {
            StatsCase c;
            c.tokens = tokens;
            c.q_tokens = RowsFor(tokens);
            c.head_dim = n % 2 == 0 ? 16 : 20;
            c.kv_heads = n % 3 == 0 ? 1 : 2;
            c.group = group;
            c.dtype = dtype;
            c.q_layout = ql;
            c.k_layout = kl;
            c.pattern = patterns[n % 4];
            c.heads = (n / 4) % 2 == 0 ? EntropyHeads::kMeanAttention : EntropyHeads::kMeanEntropy;
            c.source = (n / 8) % 3 == 2 ? EntropySource::kCausal : EntropySource::kCrossModal;
            c.custom_positions = (n / 3) % 2 == 1;
            c.score_rows_begin = (n / 5) % 2 == 1 ? c.q_tokens / 2 : 0;
            c.aggregation = (n / 7) % 2 == 1 ? ScoreAggregation::kMax : ScoreAggregation::kSum;
            c.outside = (n / 11) % 2 == 1;
            c.seed = 1000 + n;
            cases.push_back(c);
            ++n;
          }
        }
      }
    }
  }
  // Every combination of the options at T = 7 and 769 (fp32, mixed layouts).
  for (int64_t tokens : {7, 769}) {
    for (VisualPattern pattern : {VisualPattern::kMiddle, VisualPattern::kStart,
                                  VisualPattern::kInterleaved, VisualPattern::kNone,
                                  VisualPattern::kAllVisual}) {
      for (EntropyHeads heads : {EntropyHeads::kMeanAttention, EntropyHeads::kMeanEntropy}) {
        for (EntropySource source : {EntropySource::kCrossModal, EntropySource::kCausal}) {
          for (bool custom : {false, true}) {
            StatsCase c;
            c.tokens = tokens;
            c.q_tokens = RowsFor(tokens);
            c.head_dim = 24;
            c.kv_heads = 2;
            c.group = 4;
            c.q_layout = Layout::kNHD;
            c.k_layout = Layout::kHND;
            c.pattern = pattern;
            c.heads = heads;
            c.source = source;
            c.custom_positions = custom;
            c.score_rows_begin = custom ? 2 : 0;
            c.aggregation = n % 2 == 1 ? ScoreAggregation::kMax : ScoreAggregation::kSum;
            c.outside = n % 3 == 1;
            c.seed = 5000 + n;
            cases.push_back(c);
            ++n;
          }
        }
      }
    }
  }
  // Peaked attention (logits with a standard deviation of about 8).
  for (int64_t tokens : {7, 769}) {
    for (DType dtype : test::kAllDTypes) {
      for (EntropyHeads heads : {EntropyHeads::kMeanAttention, EntropyHeads::kMeanEntropy}) {
        StatsCase c;
        c.tokens = tokens;
        c.q_tokens = RowsFor(tokens);
        c.group = 2;
        c.dtype = dtype;
        c.pattern = VisualPattern::kInterleaved;
        c.heads = heads;
        c.q_stddev = 8.0;
        c.outside = heads == EntropyHeads::kMeanEntropy;
        c.seed = 9000 + n;
        cases.push_back(c);
        ++n;
      }
    }
  }
  return cases;
}

struct StatsRun {
  HostTensor query, key;
  std::vector<int32_t> positions;
  std::vector<uint8_t> modality;
  std::vector<float> outside_lse;  // [q_heads, q_tokens] or empty
  float scale = 0.f;
};

StatsRun MakeRun(const StatsCase& c) {
  StatsRun r;
  const int64_t q_heads = c.kv_heads * c.group;
  // Queries a little larger than keys so that some rows are peaked.
  r.query = test::RandomTensor(c.dtype, c.q_layout, q_heads, c.q_tokens, c.head_dim, c.seed, c.q_stddev);
  r.key = test::RandomTensor(c.dtype, c.k_layout, c.kv_heads, c.tokens, c.head_dim, c.seed + 7);
  r.modality = test::MakeModality(c.pattern, c.tokens);
  if (c.custom_positions) {
    test::Rng rng(c.seed + 13);
    r.positions.resize(c.q_tokens);
    for (int32_t& p : r.positions) p = static_cast<int32_t>(rng.Int(0, c.tokens - 1));
    r.positions[0] = static_cast<int32_t>(c.tokens - 1);
  } else {
    r.positions = reference::DefaultPositions(c.q_tokens, c.tokens);
  }
  r.scale = 1.f / std::sqrt(static_cast<float>(c.head_dim));
  if (c.outside) {
    // From no mass outside (-inf) to several times the cache's own.
    test::Rng rng(c.seed + 29);
    r.outside_lse.resize(q_heads * c.q_tokens);
    for (float& x : r.outside_lse) {
      x = rng.Int(0, 4) == 0 ? -std::numeric_limits<float>::infinity()
                             : static_cast<float>(rng.Int(-40, 80)) / 10.f;
    }
  }
  return r;
}

AttentionStatsArgs ArgsOf(const StatsRun& r, const StatsCase& c) {
  AttentionStatsArgs a;
  a.query = r.query.view();
  a.query_positions = r.positions.data();
  a.key = r.key.view();
  a.modality = r.modality.data();
  a.scale = r.scale;
  a.entropy_heads = c.heads;
  a.entropy_source = c.source;
  a.score_rows_begin = c.score_rows_begin;
  a.aggregation = c.aggregation;
  a.outside_lse = r.outside_lse.empty() ? nullptr : r.outside_lse.data();
  return a;
}

class AttentionStatsSweepTest : public ::testing::TestWithParam<StatsCase> {};

TEST_P(AttentionStatsSweepTest, MatchesReference) {
  const StatsCase& c = GetParam();
  const StatsRun r = MakeRun(c);
  std::vector<float> scores(c.kv_heads * c.tokens, std::numeric_limits<float>::quiet_NaN());
  AttentionStatsOutput out;
  out.scores = scores.data();
  out.entropy = out.entropy_tv = out.entropy_vt = -1.f;
  ASSERT_TRUE(cpu::AttentionStats(ArgsOf(r, c), &out).ok());

  const reference::RefStats ref =
      reference::RefAttentionStats(r.query.view(), r.positions, r.key.view(), r.modality, r.scale,
                                   c.heads, c.source, c.score_rows_begin, c.aggregation, r.outside_lse);
  EXPECT_EQ(out.causal, ref.causal);
  EXPECT_TRUE(test::Near(out.entropy, ref.entropy, kEntropyRel, kEntropyAbs)) << "entropy";
  EXPECT_TRUE(test::Near(out.entropy_tv, ref.entropy_tv, kEntropyRel, kEntropyAbs)) << "entropy_tv";
  EXPECT_TRUE(test::Near(out.entropy_vt, ref.entropy_vt, kEntropyRel, kEntropyAbs)) << "entropy_vt";
  const std::vector<double> got(scores.begin(), scores.end());
  EXPECT_TRUE(test::AllNear(got, ref.scores, kScoreRel, kScoreAbs)) << "scores";

  // Independent of the reference: each scored row adds one unit of
  // probability per query head to its kv head; with kMax every score is a
  // probability, and each scored row's most attended key scores at least
  // 1 / (the keys it sees).
  const double per_head = static_cast<double>((c.q_tokens - c.score_rows_begin) * c.group);
  for (int64_t h = 0; h < c.kv_heads; ++h) {
    const auto first = got.begin() + h * c.tokens, last = got.begin() + (h + 1) * c.tokens;
    if (c.outside) {
      // Mass outside the cache: each row gives the cache's keys at most one unit.
      EXPECT_LE(std::accumulate(first, last, 0.0), per_head * (1.0 + 1e-5)) << "kv head " << h;
      EXPECT_GE(*std::min_element(first, last), 0.0) << "kv head " << h;
    } else if (c.aggregation == ScoreAggregation::kSum) {
      EXPECT_TRUE(test::Near(std::accumulate(first, last, 0.0), per_head, 1e-4, 1e-5)) << "kv head " << h;
    } else if (c.score_rows_begin < c.q_tokens) {
      EXPECT_LE(*std::max_element(first, last), 1.0 + 1e-6) << "kv head " << h;
      EXPECT_GE(*std::max_element(first, last), 1.0 / static_cast<double>(c.tokens) - 1e-6) << "kv head " << h;
      EXPECT_GE(*std::min_element(first, last), 0.0) << "kv head " << h;
    }
  }
  // The reference's own sanity: text-only caches fall back to CAUSAL.
  if (c.pattern == VisualPattern::kNone) {
    EXPECT_TRUE(ref.causal);
  }
}

INSTANTIATE_TEST_SUITE_P(Sweep, AttentionStatsSweepTest, ::testing::ValuesIn(SweepCases()),
                         [](const ::testing::TestParamInfo<StatsCase>& info) {
                           return CaseName(info.param);
                         });

// ---- hand-computed cases -------------------------------------------------------

struct Small {
  HostTensor query, key;
  std::vector<int32_t> positions;
  std::vector<uint8_t> modality;
  std::vector<float> scores;
  AttentionStatsOutput out;

  // query values [q_heads, rows, dim] and key values [kv_heads, tokens, dim], HND.
  Small(int64_t q_heads, int64_t kv_heads, int64_t dim, const std::vector<double>& q,
        const std::vector<double>& k, std::vector<int32_t> pos, std::vector<uint8_t> mod)
      : positions(std::move(pos)), modality(std::move(mod)) {
    const int64_t rows = static_cast<int64_t>(positions.size());
    const int64_t tokens = static_cast<int64_t>(modality.size());
    query = test::MakeTensor(DType::kFloat32, Layout::kHND, q_heads, rows, dim, q);
    key = test::MakeTensor(DType::kFloat32, Layout::kHND, kv_heads, tokens, dim, k);
    scores.assign(kv_heads * tokens, -1.f);
    out.scores = scores.data();
  }
  AttentionStatsArgs Args(EntropyHeads heads = EntropyHeads::kMeanAttention,
                          EntropySource source = EntropySource::kCrossModal) const {
    AttentionStatsArgs a;
    a.query = query.view();
    a.query_positions = positions.data();
    a.key = key.view();
    a.modality = modality.data();
    a.scale = 1.f;
    a.entropy_heads = heads;
    a.entropy_source = source;
    return a;
  }
  absl::Status Run(EntropyHeads heads = EntropyHeads::kMeanAttention,
                   EntropySource source = EntropySource::kCrossModal) {
    return cpu::AttentionStats(Args(heads, source), &out);
  }
};

// Zero queries: every row attends uniformly over what it sees.
TEST(AttentionStatsHandTest, UniformAttentionOverNKeysHasEntropyLogN) {
  constexpr int64_t kTokens = 5;
  Small s(1, 1, 2, std::vector<double>(kTokens * 2, 0.0),
          test::RandomNormal(kTokens * 2, 3), {0, 1, 2, 3, 4}, std::vector<uint8_t>(kTokens, 0));
  ASSERT_TRUE(s.Run().ok());
  EXPECT_TRUE(s.out.causal);  // text only
  // Row i sees i + 1 keys: entropy log(i + 1); the layer's is the mean.
  const double expected = (std::log(1.0) + std::log(2.0) + std::log(3.0) + std::log(4.0) + std::log(5.0)) / 5;
  EXPECT_NEAR(s.out.entropy, expected, 1e-6);
  EXPECT_EQ(s.out.entropy_tv, 0.f);
  EXPECT_EQ(s.out.entropy_vt, 0.f);
  // Token t gets 1/(i+1) from every row i >= t.
  for (int64_t t = 0; t < kTokens; ++t) {
    double sum = 0.0;
    for (int64_t i = t; i < kTokens; ++i) sum += 1.0 / static_cast<double>(i + 1);
    EXPECT_NEAR(s.scores[t], sum, 1e-6) << t;
  }
  // One row at the last position: exactly log 5.
  Small last(1, 1, 2, {0.0, 0.0}, test::RandomNormal(kTokens * 2, 4), {4},
             std::vector<uint8_t>(kTokens, 0));
  ASSERT_TRUE(last.Run().ok());
  EXPECT_NEAR(last.out.entropy, std::log(5.0), 1e-6);
  for (float v : last.scores) EXPECT_NEAR(v, 0.2, 1e-7);
}

TEST(AttentionStatsHandTest, UniformCrossModal) {
  // T T V V V T, every row, zero queries. Rows 0 and 1 (text) see no visual
  // key: skipped. Visual rows 2..4 see the 2 text keys: log 2 each. Text row
  // 5 sees the 3 visual keys: log 3.
  const std::vector<uint8_t> mod = {0, 0, 1, 1, 1, 0};
  Small s(2, 1, 3, std::vector<double>(2 * 6 * 3, 0.0), test::RandomNormal(6 * 3, 5),
          {0, 1, 2, 3, 4, 5}, mod);
  for (EntropyHeads heads : {EntropyHeads::kMeanAttention, EntropyHeads::kMeanEntropy}) {
    ASSERT_TRUE(s.Run(heads).ok());
    EXPECT_FALSE(s.out.causal);
    EXPECT_NEAR(s.out.entropy_tv, std::log(3.0), 1e-6);
    EXPECT_NEAR(s.out.entropy_vt, std::log(2.0), 1e-6);
    EXPECT_NEAR(s.out.entropy, std::log(3.0) + std::log(2.0), 1e-6);
  }
  // CAUSAL on the same input: mean over rows of log(i + 1), halves zero.
  ASSERT_TRUE(s.Run(EntropyHeads::kMeanAttention, EntropySource::kCausal).ok());
  EXPECT_TRUE(s.out.causal);
  double expected = 0.0;
  for (int i = 1; i <= 6; ++i) expected += std::log(static_cast<double>(i)) / 6.0;
  EXPECT_NEAR(s.out.entropy, expected, 1e-6);
  EXPECT_EQ(s.out.entropy_tv, 0.f);
  EXPECT_EQ(s.out.entropy_vt, 0.f);
}

TEST(AttentionStatsHandTest, TwoKeysWithKnownLogits) {
  // One row at position 1, logits (1, 0): p = (sigma(1), 1 - sigma(1)).
  Small s(1, 1, 1, {1.0}, {1.0, 0.0}, {1}, {0, 0});
  ASSERT_TRUE(s.Run().ok());
  const double p = 1.0 / (1.0 + std::exp(-1.0));
  EXPECT_NEAR(s.out.entropy, -p * std::log(p) - (1 - p) * std::log(1 - p), 1e-6);
  EXPECT_NEAR(s.scores[0], p, 1e-6);
  EXPECT_NEAR(s.scores[1], 1 - p, 1e-6);

  // The scale multiplies the logits: scale 3 gives logits (3, 0).
  AttentionStatsArgs a = s.Args();
  a.scale = 3.f;
  ASSERT_TRUE(cpu::AttentionStats(a, &s.out).ok());
  const double p3 = 1.0 / (1.0 + std::exp(-3.0));
  EXPECT_NEAR(s.scores[0], p3, 1e-6);
  EXPECT_NEAR(s.out.entropy, -p3 * std::log(p3) - (1 - p3) * std::log(1 - p3), 1e-6);

  // GQA: two query heads (+1 and -1) on one kv head: the scores add up.
  Small g(2, 1, 1, {1.0, -1.0}, {1.0, 0.0}, {1}, {0, 0});
  ASSERT_TRUE(g.Run().ok());
  EXPECT_NEAR(g.scores[0], p + (1 - p), 1e-6);
  EXPECT_NEAR(g.scores[1], (1 - p) + p, 1e-6);
}

TEST(AttentionStatsHandTest, OutsideMassShrinksScoresNotEntropy) {
  // Two rows, zero queries: row 0 sees key 0, row 1 keys 0 and 1 (logits 0).
  // Row 0 gives as much again outside the cache (outside_lse = log 1 = 0),
  // row 1 three times its cache mass of 2 (log 6); the entropy ignores it.
  Small s(1, 1, 2, std::vector<double>(2 * 2, 0.0), {0.3, -0.2, 1.0, 0.5}, {0, 1}, {0, 0});
  const std::vector<float> outside = {0.f, static_cast<float>(std::log(6.0))};
  AttentionStatsArgs a = s.Args(EntropyHeads::kMeanAttention, EntropySource::kCausal);
  a.outside_lse = outside.data();
  ASSERT_TRUE(cpu::AttentionStats(a, &s.out).ok());
  EXPECT_NEAR(s.scores[0], 0.5 + 0.125, 1e-6);
  EXPECT_NEAR(s.scores[1], 0.125, 1e-6);
  EXPECT_NEAR(s.out.entropy, std::log(2.0) / 2, 1e-6);
  // -inf adds nothing; with kMax each score is the largest row probability.
  const std::vector<float> none = {-std::numeric_limits<float>::infinity(), static_cast<float>(std::log(2.0))};
  a.outside_lse = none.data();
  a.aggregation = ScoreAggregation::kMax;
  ASSERT_TRUE(cpu::AttentionStats(a, &s.out).ok());
  EXPECT_NEAR(s.scores[0], 1.0, 1e-6);
  EXPECT_NEAR(s.scores[1], 0.25, 1e-6);
}

TEST(AttentionStatsHandTest, MeanAttentionVersusMeanEntropy) {
  // V V T; the text row (position 2) sees visual keys k0 = +1 and k1 = -1.
  // Head 0 (q = +2) puts sigma(4) on k0, head 1 (q = -2) on k1: the mean
  // distribution is uniform (log 2), the mean of the entropies is H(sigma(4)).
  Small s(2, 1, 1, {2.0, -2.0}, {1.0, -1.0, 0.0}, {2}, {1, 1, 0});
  ASSERT_TRUE(s.Run(EntropyHeads::kMeanAttention).ok());
  EXPECT_NEAR(s.out.entropy_tv, std::log(2.0), 1e-6);
  EXPECT_EQ(s.out.entropy_vt, 0.f);  // no visual row: that half contributes 0
  EXPECT_NEAR(s.out.entropy, std::log(2.0), 1e-6);
  ASSERT_TRUE(s.Run(EntropyHeads::kMeanEntropy).ok());
  const double p = 1.0 / (1.0 + std::exp(-4.0));
  const double h = -p * std::log(p) - (1 - p) * std::log(1 - p);
  EXPECT_NEAR(s.out.entropy_tv, h, 1e-6);
  EXPECT_NEAR(s.out.entropy, h, 1e-6);
}

TEST(AttentionStatsHandTest, RowWithoutOtherModalityIsSkipped) {
  // T V V T, zero queries. Row 0 (text) sees no visual key: skipped, not a 0.
  // Rows 1, 2 (visual) see only text key 0: entropy 0. Row 3 (text) sees
  // visual keys 1, 2: log 2. So E_TV = log 2 (not log 2 / 2), E_VT = 0.
  Small s(1, 1, 2, std::vector<double>(4 * 2, 0.0), test::RandomNormal(4 * 2, 9), {0, 1, 2, 3},
          {0, 1, 1, 0});
  ASSERT_TRUE(s.Run().ok());
  EXPECT_FALSE(s.out.causal);
  EXPECT_NEAR(s.out.entropy_tv, std::log(2.0), 1e-6);
  EXPECT_NEAR(s.out.entropy_vt, 0.0, 1e-6);
  EXPECT_NEAR(s.out.entropy, std::log(2.0), 1e-6);
  // Scores still use every visible key, whatever the modality.
  EXPECT_NEAR(s.scores[0], 1.0 + 0.5 + 1.0 / 3 + 0.25, 1e-6);
  EXPECT_NEAR(s.scores[3], 0.25, 1e-6);

  // Only skipped rows: both halves are 0, and E_l is 0 (still CROSS_MODAL).
  Small none(1, 1, 2, {0.0, 0.0}, test::RandomNormal(4 * 2, 9), {0}, {0, 1, 1, 0});
  ASSERT_TRUE(none.Run().ok());
  EXPECT_FALSE(none.out.causal);
  EXPECT_EQ(none.out.entropy, 0.f);
  EXPECT_EQ(none.out.entropy_tv, 0.f);
  EXPECT_EQ(none.out.entropy_vt, 0.f);
}

TEST(AttentionStatsHandTest, ScoreRowsBeginLimitsScoresButNotEntropy) {
  // Zero queries, text only, rows at positions 3 and 1; only row 1 (position 1) scores.
  Small s(1, 1, 2, std::vector<double>(2 * 2, 0.0), test::RandomNormal(4 * 2, 2), {3, 1},
          {0, 0, 0, 0});
  AttentionStatsArgs a = s.Args();
  a.score_rows_begin = 1;
  ASSERT_TRUE(cpu::AttentionStats(a, &s.out).ok());
  EXPECT_NEAR(s.scores[0], 0.5, 1e-6);
  EXPECT_NEAR(s.scores[1], 0.5, 1e-6);
  EXPECT_NEAR(s.scores[2], 0.0, 1e-7);
  EXPECT_NEAR(s.scores[3], 0.0, 1e-7);
  EXPECT_NEAR(s.out.entropy, (std::log(4.0) + std::log(2.0)) / 2, 1e-6);
  // score_rows_begin == Tq: no row scores, all zeros.
  a.score_rows_begin = 2;
  ASSERT_TRUE(cpu::AttentionStats(a, &s.out).ok());
  for (float v : s.scores) EXPECT_EQ(v, 0.f);
}

// ---- malformed arguments -------------------------------------------------------

class AttentionStatsInvalidTest : public ::testing::Test {
 protected:
  AttentionStatsInvalidTest()
      : query_(test::RandomTensor(DType::kFloat32, Layout::kHND, 4, 3, 8, 1)),
        key_(test::RandomTensor(DType::kFloat32, Layout::kHND, 2, 6, 8, 2)),
        positions_{3, 4, 5},
        modality_(test::MakeModality(VisualPattern::kMiddle, 6)),
        scores_(2 * 6) {
    args_.query = query_.view();
    args_.query_positions = positions_.data();
    args_.key = key_.view();
    args_.modality = modality_.data();
    args_.scale = 0.5f;
    out_.scores = scores_.data();
  }
  absl::Status Run() { return cpu::AttentionStats(args_, &out_); }

  HostTensor query_, key_;
  std::vector<int32_t> positions_;
  std::vector<uint8_t> modality_;
  std::vector<float> scores_;
  AttentionStatsArgs args_;
  AttentionStatsOutput out_;
};

TEST_F(AttentionStatsInvalidTest, ValidArgumentsAreAccepted) { EXPECT_TRUE(Run().ok()); }

TEST_F(AttentionStatsInvalidTest, NullPointers) {
  {
    AttentionStatsArgs saved = args_;
    args_.query.data = nullptr;
    EXPECT_EQ(Run().code(), absl::StatusCode::kInvalidArgument);
    args_ = saved;
  }
  {
    AttentionStatsArgs saved = args_;
    args_.key.data = nullptr;
    EXPECT_EQ(Run().code(), absl::StatusCode::kInvalidArgument);
    args_ = saved;
  }
  {
    AttentionStatsArgs saved = args_;
    args_.query_positions = nullptr;
    EXPECT_EQ(Run().code(), absl::StatusCode::kInvalidArgument);
    args_ = saved;
  }
  {
    AttentionStatsArgs saved = args_;
    args_.modality = nullptr;
    EXPECT_EQ(Run().code(), absl::StatusCode::kInvalidArgument);
    args_ = saved;
  }
  out_.scores = nullptr;
  EXPECT_EQ(Run().code(), absl::StatusCode::kInvalidArgument);
  out_.scores = scores_.data();
  EXPECT_EQ(cpu::AttentionStats(args_, nullptr).code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(AttentionStatsInvalidTest, PositionOutOfRange) {
  positions_[1] = 6;  // == tokens
  EXPECT_EQ(Run().code(), absl::StatusCode::kInvalidArgument);
  positions_[1] = -1;
  EXPECT_EQ(Run().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(AttentionStatsInvalidTest, OutsideLseNanOrPlusInfinity) {
  std::vector<float> outside(4 * 3, 1.f);
  outside[5] = -std::numeric_limits<float>::infinity();
  args_.outside_lse = outside.data();
  EXPECT_TRUE(Run().ok());
  outside[7] = std::numeric_limits<float>::quiet_NaN();
  absl::Status st = Run();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("query head 2, row 1"), std::string::npos) << st;
  outside[7] = std::numeric_limits<float>::infinity();
  EXPECT_EQ(Run().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(AttentionStatsInvalidTest, QueryHeadsNotAMultipleOfKvHeads) {
  const HostTensor q3 = test::RandomTensor(DType::kFloat32, Layout::kHND, 3, 3, 8, 1);
  args_.query = q3.view();
  EXPECT_EQ(Run().code(), absl::StatusCode::kInvalidArgument);
  const HostTensor q1 = test::RandomTensor(DType::kFloat32, Layout::kHND, 1, 3, 8, 1);
  args_.query = q1.view();  // fewer query heads than kv heads
  EXPECT_EQ(Run().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(AttentionStatsInvalidTest, HeadDimMismatch) {
  const HostTensor q = test::RandomTensor(DType::kFloat32, Layout::kHND, 4, 3, 7, 1);
  args_.query = q.view();
  EXPECT_EQ(Run().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(AttentionStatsInvalidTest, NonPositiveOrNonFiniteScale) {
  for (float scale : {0.f, -1.f, std::numeric_limits<float>::quiet_NaN(),
                      std::numeric_limits<float>::infinity()}) {
    args_.scale = scale;
    EXPECT_EQ(Run().code(), absl::StatusCode::kInvalidArgument) << scale;
  }
}

TEST_F(AttentionStatsInvalidTest, ScoreRowsBeginOutOfRange) {
  args_.score_rows_begin = -1;
  EXPECT_EQ(Run().code(), absl::StatusCode::kInvalidArgument);
  args_.score_rows_begin = 4;  // > Tq
  EXPECT_EQ(Run().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(AttentionStatsInvalidTest, UnknownDTypeOrOptions) {
  args_.key.dtype = static_cast<DType>(9);
  EXPECT_EQ(Run().code(), absl::StatusCode::kInvalidArgument);
  args_.key.dtype = DType::kFloat32;
  args_.entropy_heads = static_cast<EntropyHeads>(7);
  EXPECT_EQ(Run().code(), absl::StatusCode::kInvalidArgument);
  args_.entropy_heads = EntropyHeads::kMeanAttention;
  args_.entropy_source = static_cast<EntropySource>(7);
  EXPECT_EQ(Run().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(AttentionStatsInvalidTest, EmptyShapes) {
  args_.key.tokens = 0;
  EXPECT_EQ(Run().code(), absl::StatusCode::kInvalidArgument);
  args_.key = key_.view();
  args_.query.tokens = 0;
  EXPECT_EQ(Run().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace medakv

// ---- the thread count changes nothing --------------------------------------------

#if defined(_OPENMP)
namespace medakv {
namespace {

// The scores are sums over rows added in row order (an ordered section), the
// entropies sums in fixed orders: 1, 2 and 3 threads give the same bits, for
// short rows (several rows per task) and for rows long enough that each task
// holds one or two (the logit buffer's limit), with an observation window.
TEST(AttentionStatsThreadsTest, SameBitsWithAnyThreadCount) {
  struct Shape {
    int64_t q_heads, kv_heads, rows, tokens, dim;
  };
  for (const Shape& sh : {Shape{8, 2, 13, 300, 16}, Shape{64, 8, 5, 40000, 8}}) {
    SCOPED_TRACE(absl::StrCat("q_heads ", sh.q_heads, " rows ", sh.rows, " tokens ", sh.tokens));
    const HostTensor query = test::RandomTensor(DType::kFloat32, Layout::kHND, sh.q_heads, sh.rows, sh.dim, 11, 2.0);
    const HostTensor key = test::RandomTensor(DType::kFloat16, Layout::kNHD, sh.kv_heads, sh.tokens, sh.dim, 12);
    std::vector<int32_t> positions(sh.rows);
    for (int64_t i = 0; i < sh.rows; ++i) positions[i] = static_cast<int32_t>(sh.tokens - 1 - 3 * (sh.rows - 1 - i));
    std::vector<uint8_t> modality(sh.tokens, 0);
    for (int64_t t = sh.tokens / 5; t < sh.tokens / 2; ++t) modality[t] = 1;
    for (int64_t window_begin : {int64_t{0}, sh.rows / 2}) {
      std::vector<std::vector<float>> scores;
      std::vector<float> entropies;
      for (int threads : {1, 2, 3}) {
        omp_set_num_threads(threads);
        AttentionStatsArgs a;
        a.query = query.view();
        a.query_positions = positions.data();
        a.key = key.view();
        a.modality = modality.data();
        a.scale = 0.25f;
        a.score_rows_begin = window_begin;
        std::vector<float> s(sh.kv_heads * sh.tokens, -1.f);
        AttentionStatsOutput out;
        out.scores = s.data();
        ASSERT_TRUE(cpu::AttentionStats(a, &out).ok());
        scores.push_back(std::move(s));
        entropies.push_back(out.entropy);
      }
      omp_set_num_threads(omp_get_num_procs());
      for (size_t k = 1; k < scores.size(); ++k) {
        EXPECT_EQ(0, std::memcmp(scores[0].data(), scores[k].data(), scores[0].size() * sizeof(float)))
            << "threads " << k + 1;
        EXPECT_EQ(entropies[0], entropies[k]) << "threads " << k + 1;
      }
      double total = 0.0;
      for (float v : scores[0]) total += v;
      // Each scored row's probabilities sum to 1 per query head.
      EXPECT_NEAR(total, static_cast<double>((sh.rows - window_begin) * sh.q_heads), 1e-3 * sh.q_heads * sh.rows);
    }
  }
}
}  // namespace
}  // namespace medakv
#endif
