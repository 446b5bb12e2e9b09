// The compression pipeline end to end: composition of the ops checked stage
// by stage against the naive reference, properties of the output, and
// rejection of malformed input.
#include "service/compress/pipeline.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <set>
#include <string>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "kernels/common/tensor_util.h"
#include "kernels/cpu/budget.h"
#include "tests/kernels/test_util.h"
#include "tests/service/test_cache.h"
#include "tests/reference/reference.h"

namespace medakv {
namespace {

using test::HostTensor;
using test::RandomTensor;

// A random cache; keeps the tensors alive for the CacheInput's views.
using test::TestCache;

TestCache MakeCache(DType dtype, Layout layout, int64_t layers, int64_t kv_heads, int64_t group, int64_t tokens,
                    int64_t head_dim, int64_t q_tokens, test::VisualPattern pattern, uint64_t seed) {
  return test::MakeTestCache({.dtype = dtype, .layout = layout, .layers = layers, .kv_heads = kv_heads, .group = group,
                              .tokens = tokens, .head_dim = head_dim, .q_tokens = q_tokens, .pattern = pattern,
                              .seed = seed});
}

std::vector<uint8_t> Bytes(const HostTensor& t) {
  const auto* p = reinterpret_cast<const uint8_t*>(t.data());
  return std::vector<uint8_t>(p, p + t.NumBytes());
}

// ---- rho = 1 and FULL return the input unchanged ---------------------------

class IdentityTest : public ::testing::TestWithParam<std::tuple<DType, Layout, bool>> {};

TEST_P(IdentityTest, ReturnsInputUnchanged) {
  const auto [dtype, layout, full_policy] = GetParam();
  TestCache c = MakeCache(dtype, layout, 3, 2, 4, 37, 16, 5, test::VisualPattern::kMiddle, 11);
  CompressOptions o;
  o.budget.rho = 1.0;
  if (full_policy) o.policy = PolicyKind::kFull;
  auto backend = MakeCpuBackend();
  absl::StatusOr<CompressResult> r = Compress(c.input, o, *backend);
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->layers.size(), 3u);
  EXPECT_EQ(r->tokens_kept, r->tokens_in);
  for (int l = 0; l < 3; ++l) {
    const LayerResult& layer = r->layers[l];
    EXPECT_EQ(layer.budget, 37);
    EXPECT_EQ(layer.key, Bytes(c.keys[l])) << "layer " << l;
    EXPECT_EQ(layer.value, Bytes(c.values[l])) << "layer " << l;
    for (int h = 0; h < 2; ++h) {
      for (int t = 0; t < 37; ++t) EXPECT_EQ(layer.positions[h * 37 + t], t);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(AllDTypesLayouts, IdentityTest,
                         ::testing::Combine(::testing::ValuesIn(test::kAllDTypes), ::testing::ValuesIn(test::kAllLayouts),
                                            ::testing::Bool()),
                         [](const auto& info) {
                           return absl::StrCat(test::DTypeTag(std::get<0>(info.param)),
                                               test::LayoutTag(std::get<1>(info.param)),
                                               std::get<2>(info.param) ? "Full" : "MedaRho1");
                         });

// ---- MEDA against the reference, stage by stage -----------------------------

struct PipelineCase {
  DType dtype;
  Layout layout;
  int64_t group;
  int64_t tokens;
  test::VisualPattern pattern;
  MergeMode merge;
  bool shared;
};

class MedaVsReferenceTest : public ::testing::TestWithParam<PipelineCase> {};

TEST_P(MedaVsReferenceTest, EveryStageMatches) {
  const PipelineCase& p = GetParam();
  const int64_t layers = 4, kv_heads = 2, head_dim = 16, q_tokens = std::min<int64_t>(p.tokens, 9);
  TestCache c = MakeCache(p.dtype, p.layout, layers, kv_heads, p.group, p.tokens, head_dim, q_tokens, p.pattern, 7);
  CompressOptions o;
  o.budget.rho = 0.3;
  o.merge = p.merge;
  o.shared_selection = p.shared;
  auto backend = MakeCpuBackend();
  absl::StatusOr<CompressResult> r = Compress(c.input, o, *backend);
  ASSERT_TRUE(r.ok()) << r.status();

  const std::vector<uint8_t>& modality = c.input.modality;
  const double scale = 1.0 / std::sqrt(static_cast<double>(head_dim));
  std::vector<double> entropies;
  for (int64_t l = 0; l < layers; ++l) entropies.push_back(r->layers[l].entropy);
  // Budgets: exactly the reference rule applied to the pipeline's entropies.
  const reference::RefBudgetResult rb = reference::RefBudgets(entropies, p.tokens, 0.3, 1.0, 0.01, 1.0, true);
  int64_t total = 0;
  for (int64_t l = 0; l < layers; ++l) {
    const LayerResult& lr = r->layers[l];
    total += lr.budget;
    EXPECT_EQ(lr.budget, rb.budget[l]) << "layer " << l;
    const reference::RefStats rs = reference::RefAttentionStats(
        c.queries[l].view(), reference::DefaultPositions(q_tokens, p.tokens), c.keys[l].view(), modality, scale,
        o.entropy_heads, o.entropy_source, 0);
    EXPECT_TRUE(test::Near(lr.entropy, rs.entropy, 1e-4, 1e-5)) << "layer " << l;
    // Selection from the reference scores.
    const std::vector<int32_t> kept = reference::RefSelect(rs.scores, modality, kv_heads, p.tokens, lr.budget,
                                                           o.recent_fraction, o.text_prior, p.shared);
    EXPECT_EQ(lr.positions, kept) << "layer " << l;
    // Merge on the pipeline's own kept set.
    const reference::RefMerged rm = reference::RefMerge(c.keys[l].view(), c.values[l].view(), lr.positions,
                                                        lr.budget, p.merge, o.merge_threshold);
    HostTensor out_k(p.dtype, p.layout, kv_heads, lr.budget, head_dim);
    HostTensor out_v(p.dtype, p.layout, kv_heads, lr.budget, head_dim);
    std::memcpy(out_k.data(), lr.key.data(), lr.key.size());
    std::memcpy(out_v.data(), lr.value.data(), lr.value.size());
    const double tol = p.dtype == DType::kFloat32 ? 1e-5 : (p.dtype == DType::kFloat16 ? 2e-3 : 1.6e-2);
    EXPECT_TRUE(test::AllNear(test::ReadBack(out_k), rm.keys, tol, tol)) << "layer " << l;
    EXPECT_TRUE(test::AllNear(test::ReadBack(out_v), rm.values, tol, tol)) << "layer " << l;
  }
  EXPECT_EQ(total, reference::RoundHalfUp(0.3 * layers * p.tokens));
  EXPECT_EQ(r->tokens_kept, total);
}

std::vector<PipelineCase> PipelineCases() {
  std::vector<PipelineCase> cases;
  for (DType dt : test::kAllDTypes) {
    for (Layout lay : test::kAllLayouts) {
      cases.push_back({dt, lay, 4, 97, test::VisualPattern::kMiddle, MergeMode::kAverage, false});
    }
  }
  cases.push_back({DType::kFloat32, Layout::kHND, 1, 7, test::VisualPattern::kMiddle, MergeMode::kAverage, false});
  cases.push_back({DType::kFloat16, Layout::kNHD, 8, 769, test::VisualPattern::kInterleaved, MergeMode::kAverage, false});
  cases.push_back({DType::kFloat32, Layout::kHND, 4, 97, test::VisualPattern::kNone, MergeMode::kPivotal, false});
  cases.push_back({DType::kBFloat16, Layout::kHND, 4, 97, test::VisualPattern::kStart, MergeMode::kWeighted, true});
  cases.push_back({DType::kFloat32, Layout::kNHD, 1, 61, test::VisualPattern::kMiddle, MergeMode::kNone, true});
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Cases, MedaVsReferenceTest, ::testing::ValuesIn(PipelineCases()), [](const auto& info) {
  const PipelineCase& p = info.param;
  return absl::StrCat(test::DTypeTag(p.dtype), test::LayoutTag(p.layout), "G", p.group, "T", p.tokens,
                      test::VisualPatternTag(p.pattern), MergeModeName(p.merge), p.shared ? "Shared" : "PerHead");
});

// ---- properties over many shapes ---------------------------------------------

TEST(PipelinePropertiesTest, BudgetsRecentWindowAndOrder) {
  auto backend = MakeCpuBackend();
  uint64_t seed = 100;
  for (int64_t tokens : {1, 2, 7, 64, 300}) {
    for (double rho : {0.05, 0.2, 0.5, 0.9}) {
      for (double recent : {0.0, 0.5, 1.0}) {
        TestCache c = MakeCache(DType::kFloat16, Layout::kHND, 5, 2, 2, tokens, 8, std::min<int64_t>(tokens, 4),
                                test::VisualPattern::kMiddle, ++seed);
        CompressOptions o;
        o.budget.rho = rho;
        o.recent_fraction = recent;
        absl::StatusOr<CompressResult> r = Compress(c.input, o, *backend);
        ASSERT_TRUE(r.ok()) << r.status();
        const std::string where = absl::StrCat("T=", tokens, " rho=", rho, " recent=", recent);
        const int64_t lo = std::max<int64_t>(1, static_cast<int64_t>(std::ceil(0.01 * tokens)));
        const int64_t want = std::clamp<int64_t>(reference::RoundHalfUp(rho * 5 * tokens), 5 * lo, 5 * tokens);
        EXPECT_EQ(r->tokens_kept, want) << where;
        for (const LayerResult& l : r->layers) {
          ASSERT_GE(l.budget, lo) << where;
          ASSERT_LE(l.budget, tokens) << where;
          const int64_t m = std::min<int64_t>(l.budget, reference::RoundHalfUp(recent * l.budget));
          for (int64_t h = 0; h < 2; ++h) {
            const int32_t* pos = l.positions.data() + h * l.budget;
            for (int64_t b = 1; b < l.budget; ++b) ASSERT_LT(pos[b - 1], pos[b]) << where;
            // The last m kept positions are exactly the m most recent tokens.
            for (int64_t i = 0; i < m; ++i) ASSERT_EQ(pos[l.budget - m + i], tokens - m + i) << where;
          }
        }
      }
    }
  }
}

TEST(PipelinePrecomputedTest, QHeadScoresSumOverGroups) {
  // Precomputed statistics: scores per query head equal, after the group sum,
  // the same scores given per kv head; both give the same kept set.
  const int64_t kv_heads = 2, group = 3, tokens = 50;
  TestCache c = MakeCache(DType::kFloat32, Layout::kHND, 2, kv_heads, group, tokens, 8, 1,
                          test::VisualPattern::kMiddle, 5);
  test::Rng rng(9);
  std::vector<std::vector<float>> q_scores(2, std::vector<float>(kv_heads * group * tokens));
  std::vector<std::vector<float>> kv_scores(2, std::vector<float>(kv_heads * tokens, 0.f));
  for (int l = 0; l < 2; ++l) {
    for (int64_t h = 0; h < kv_heads * group; ++h) {
      for (int64_t t = 0; t < tokens; ++t) {
        // Multiples of 1/8 sum exactly in any order.
        const float s = static_cast<float>(rng.Int(0, 64)) / 8.f;
        q_scores[l][h * tokens + t] = s;
        kv_scores[l][(h / group) * tokens + t] += s;
      }
    }
  }
  auto run = [&](bool per_q_head) {
    CacheInput in = c.input;
    in.stats = StatsForm::kPrecomputed;
    for (int l = 0; l < 2; ++l) {
      in.layers[l].query = TensorView{};
      in.layers[l].scores = per_q_head ? q_scores[l].data() : kv_scores[l].data();
      in.layers[l].score_heads = per_q_head ? kv_heads * group : kv_heads;
      in.layers[l].entropy = 1.0f + static_cast<float>(l);
    }
    CompressOptions o;
    o.budget.rho = 0.4;
    return Compress(in, o, *MakeCpuBackend());
  };
  absl::StatusOr<CompressResult> a = run(true), b = run(false);
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(b.ok()) << b.status();
  for (int l = 0; l < 2; ++l) {
    EXPECT_EQ(a->layers[l].positions, b->layers[l].positions);
    EXPECT_EQ(a->layers[l].entropy, 1.0f + static_cast<float>(l));
    std::vector<double> scores(kv_scores[l].begin(), kv_scores[l].end());
    EXPECT_EQ(a->layers[l].positions, reference::RefSelect(scores, c.input.modality, kv_heads, tokens,
                                                           a->layers[l].budget, 0.5, TextPrior::kAdditive, false));
  }
  // The layer with the higher entropy gets the larger budget.
  EXPECT_GT(a->layers[1].budget, a->layers[0].budget);
}

// ---- malformed input ------------------------------------------------------------

void ExpectInvalid(const CacheInput& in, const CompressOptions& o, const std::string& fragment) {
  absl::StatusOr<CompressResult> r = Compress(in, o, *MakeCpuBackend());
  ASSERT_FALSE(r.ok()) << "expected an error mentioning '" << fragment << "'";
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
  EXPECT_NE(std::string(r.status().message()).find(fragment), std::string::npos) << r.status();
}

TEST(PipelineValidationTest, RejectsMalformedInput) {
  TestCache c = MakeCache(DType::kFloat16, Layout::kHND, 2, 2, 2, 20, 8, 4, test::VisualPattern::kMiddle, 3);
  const CompressOptions o;
  {
    CacheInput in = c.input;
    in.layers.clear();
    ExpectInvalid(in, o, "no layer");
  }
  {
    CacheInput in = c.input;
    in.q_heads = 3;
    ExpectInvalid(in, o, "q_heads");
  }
  {
    CacheInput in = c.input;
    in.modality[4] = 2;
    ExpectInvalid(in, o, "modality[4]");
  }
  {
    CacheInput in = c.input;
    in.modality.resize(19);
    ExpectInvalid(in, o, "modality");
  }
  {
    CacheInput in = c.input;
    in.layers[1].value.tokens = 19;
    ExpectInvalid(in, o, "layer 1 value");
  }
  {
    CacheInput in = c.input;
    in.layers[1].key.dtype = DType::kFloat32;
    ExpectInvalid(in, o, "layer 1 key");
  }
  {
    CacheInput in = c.input;
    in.layers[0].key.layout = Layout::kNHD;
    ExpectInvalid(in, o, "layout");
  }
  {
    CacheInput in = c.input;
    in.layers[0].query_positions = {0, 1, 2, 2 * 20 + 65536};  // tokens 20: probes stand before 2 x 20 + 65536
    ExpectInvalid(in, o, "query_positions[3] is 65576, outside [0, 2 x tokens + 65536 = 65576)");
    in.layers[0].query_positions = {0, 1, 2, -1};
    ExpectInvalid(in, o, "query_positions[3] is -1");
  }
  {
    CacheInput in = c.input;
    in.layers[0].query_positions = {0, 1};
    ExpectInvalid(in, o, "query_positions");
  }
  {
    CacheInput in = c.input;  // q_heads 4 x q_tokens 4
    in.layers[1].query_outside_lse.assign(15, 0.f);
    ExpectInvalid(in, o, "layer 1 query_outside_lse: 15 entries, expected q_heads x q_tokens = 16");
    in.layers[1].query_outside_lse.assign(16, -std::numeric_limits<float>::infinity());
    in.layers[1].query_outside_lse[6] = std::numeric_limits<float>::quiet_NaN();
    ExpectInvalid(in, o, "layer 1 query_outside_lse[1, 2] is nan (expected finite or -inf)");
    in.layers[1].query_outside_lse[6] = std::numeric_limits<float>::infinity();
    ExpectInvalid(in, o, "query_outside_lse[1, 2] is inf");
  }
  {
    CacheInput in = c.input;
    in.layers[0].key.data = nullptr;
    ExpectInvalid(in, o, "no data");
  }
  {
    CacheInput in = c.input;
    in.stats = StatsForm::kPrecomputed;
    ExpectInvalid(in, o, "scores: missing");
  }
  {
    CacheInput in = c.input;
    in.tokens = 0;
    ExpectInvalid(in, o, "tokens");
  }
}

// Keys and queries that are finite but whose products overflow float32, as a
// fuzzer wrote them (tests/fuzz/corpus/fuzz_safetensors/crash-statistics-overflow,
// bf16): MEDA's cross-modal entropy comes out -inf, and the request is refused
// with INVALID_ARGUMENT naming the layer instead of failing in the budgets.
TEST(PipelineValidationTest, RejectsStatisticsThatOverflow) {
  TestCache c = MakeCache(DType::kBFloat16, Layout::kHND, 1, 1, 2, 8, 2, 2, test::VisualPattern::kMiddle, 3);
  const uint16_t key[] = {0x2e7b, 0x7571, 0x7265, 0x5f79, 0x6f70, 0x6973, 0x6974, 0x6e6f,
                          0x3d73, 0x3e16, 0xbdfe, 0xbef4, 0xbd38, 0xd5d5, 0x7ad5, 0x6cd5};
  const uint16_t query[] = {0x228a, 0x6873, 0x7061, 0x2265, 0xbe90, 0xc00b, 0xbe90, 0xc00b};
  std::memcpy(c.keys[0].storage.data(), key, sizeof(key));
  std::memcpy(c.queries[0].storage.data(), query, sizeof(query));
  c.input.layers[0].query_positions = {6, 7};
  c.input.modality.assign({0, 0, 0, 0, 0, 0, 1, 0});
  ExpectInvalid(c.input, DefaultOptions(PolicyKind::kMeda),
                "layer 0: the attention statistics are not finite (entropy -inf)");
  absl::StatusOr<CompressResult> full = Compress(c.input, DefaultOptions(PolicyKind::kFull), *MakeCpuBackend());
  EXPECT_TRUE(full.ok()) << full.status();  // no statistics: nothing overflows
}

// A NaN or infinity anywhere in the keys, values or queries is refused with
// its place, for every dtype and layout, by every policy (full too), and by
// ComputeStatistics; the same cache without it compresses.
TEST(PipelineValidationTest, RejectsNonFiniteTensors) {
  const float kBad[] = {NAN, INFINITY, -INFINITY};
  for (DType dtype : {DType::kFloat16, DType::kBFloat16, DType::kFloat32}) {
    for (Layout layout : {Layout::kHND, Layout::kNHD}) {
      for (int which = 0; which < 3; ++which) {
        for (float bad : kBad) {
          const char* name = which == 0 ? "key" : which == 1 ? "value" : "query";
          SCOPED_TRACE(absl::StrCat(DTypeName(dtype), " ", LayoutName(layout), " ", name, " ", bad));
          // 2 layers, 3 kv heads (q_heads 6), 11 tokens, head_dim 5, 4 query rows.
          TestCache c = MakeCache(dtype, layout, 2, 3, 2, 11, 5, 4, test::VisualPattern::kMiddle, 5);
          HostTensor& t = which == 0 ? c.keys[1] : which == 1 ? c.values[1] : c.queries[1];
          const int64_t head = which == 2 ? 4 : 2, token = 3, dim = 4;
          const int64_t at = t.view().RowOffset(head, token) + dim;  // RowOffset counts elements
          RowFromFloat(dtype, &bad, static_cast<char*>(t.data()) + at * DTypeSize(dtype), 1);
          const std::string want = absl::StrCat("layer 1 ", name, ": the value at head ", head, ", token 3, dim 4 is not finite (",
                                                std::isnan(bad) ? "nan" : bad > 0 ? "inf" : "-inf", ")");
          for (PolicyKind p : {PolicyKind::kFull, PolicyKind::kMeda, PolicyKind::kSnapKV, PolicyKind::kAmber}) {
            ExpectInvalid(c.input, DefaultOptions(p), want);
          }
          absl::StatusOr<Statistics> st = ComputeStatistics(c.input, DefaultOptions(PolicyKind::kMeda), *MakeCpuBackend());
          ASSERT_FALSE(st.ok());
          EXPECT_EQ(st.status().code(), absl::StatusCode::kInvalidArgument);
          EXPECT_NE(std::string(st.status().message()).find(want), std::string::npos) << st.status();
          const float fine = 0.5f;
          RowFromFloat(dtype, &fine, static_cast<char*>(t.data()) + at * DTypeSize(dtype), 1);
          EXPECT_TRUE(Compress(c.input, DefaultOptions(PolicyKind::kMeda), *MakeCpuBackend()).ok());
        }
      }
    }
  }
}

TEST(PipelineValidationTest, RejectsBadOptions) {
  TestCache c = MakeCache(DType::kFloat32, Layout::kHND, 2, 1, 1, 10, 4, 2, test::VisualPattern::kNone, 4);
  const std::pair<std::function<void(CompressOptions&)>, std::string> cases[] = {
      {[](CompressOptions& o) { o.budget.rho = 0.0; }, "rho"},
      {[](CompressOptions& o) { o.budget.rho = 1.5; }, "rho"},
      {[](CompressOptions& o) { o.budget.rho = NAN; }, "rho"},
      {[](CompressOptions& o) { o.budget.tau = 0.0; }, "tau"},
      {[](CompressOptions& o) { o.budget.tau = 5e-324; }, "tau must be in [1e-06, 1e+06], got 4.94066e-324"},
      {[](CompressOptions& o) { o.scale = 3e38f; }, "scale must be in [0, 10000]"},
      {[](CompressOptions& o) { o.pool_kernel = 2147483647; }, "pool_kernel must be odd and in [1, 1023]"},
      {[](CompressOptions& o) { o.pyramid_beta = 5e-324; }, "pyramid_beta must be in [0.001, 1e+06]"},
      {[](CompressOptions& o) { o.budget.alpha_min = 0.5; o.budget.alpha_max = 0.2; }, "alpha_min"},
      {[](CompressOptions& o) { o.recent_fraction = -0.1; }, "recent_fraction"},
      {[](CompressOptions& o) { o.scale = -1.f; }, "scale"},
      {[](CompressOptions& o) { o.merge = static_cast<MergeMode>(9); }, "merge"},
      {[](CompressOptions& o) { o.policy = static_cast<PolicyKind>(9); }, "policy"},
  };
  for (const auto& [mutate, fragment] : cases) {
    CompressOptions o;
    mutate(o);
    ExpectInvalid(c.input, o, fragment);
  }
}

TEST(ModalityFromSpansTest, ExpandsAndRejects) {
  absl::StatusOr<std::vector<uint8_t>> m = ModalityFromSpans(6, {{1, 2, Modality::kVisual}, {5, 1, Modality::kVisual}});
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(*m, (std::vector<uint8_t>{0, 1, 1, 0, 0, 1}));
  EXPECT_FALSE(ModalityFromSpans(6, {{4, 3, Modality::kVisual}}).ok());
  EXPECT_FALSE(ModalityFromSpans(6, {{-1, 1, Modality::kVisual}}).ok());
}

}  // namespace
}  // namespace medakv

namespace medakv {
namespace {

// ---- amber (docs/amber.md) against the reference ------------------------------

struct AmberCase {
  DType dtype;
  Layout layout;
  ScoreNorm norm;
  LayerBudget budget;
  bool explicit_positions;  // query rows at scattered positions instead of the last q_tokens
  int64_t recent_rows = kAmberRecentSearchRows;  // the recent search's rows; 0: recent_fraction
  int64_t probes = 0;  // the last rows stand after the cache (positions T, T + 5, ...)
  bool outside = false;  // the rows carry query_outside_lse
};

// Random query_outside_lse of every layer: [q_heads, q_tokens] each, from
// -inf (no mass outside) to several times a row's mass in the cache.
std::vector<std::vector<float>> SetOutsideLse(TestCache& c, uint64_t seed) {
  test::Rng rng(seed);
  std::vector<std::vector<float>> all;
  for (LayerInput& l : c.input.layers) {
    std::vector<float> v(static_cast<size_t>(c.input.q_heads * l.query.tokens));
    for (float& x : v) {
      x = rng.Int(0, 5) == 0 ? -std::numeric_limits<float>::infinity() : static_cast<float>(rng.Int(-30, 60)) / 10.f;
    }
    l.query_outside_lse = v;
    all.push_back(std::move(v));
  }
  return all;
}

// Amber's score s_t of layer l by the reference (docs/amber.md, step 2): the
// accumulated attention over every row (or its maximum), or its visible mean.
std::vector<double> RefAmberScores(const TestCache& c, int64_t l, const std::vector<int32_t>& positions,
                                   const CompressOptions& o, ScoreNorm norm, double scale,
                                   const std::vector<float>& outside = {}) {
  const int64_t kv_heads = c.input.kv_heads, tokens = c.input.tokens, group = c.input.q_heads / kv_heads;
  const std::vector<double> sum =
      reference::RefAttentionStats(c.queries[l].view(), positions, c.keys[l].view(), c.input.modality, scale,
                                   o.entropy_heads, o.entropy_source, 0,
                                   norm == ScoreNorm::kMax ? ScoreAggregation::kMax : ScoreAggregation::kSum,
                                   outside)
          .scores;
  return norm == ScoreNorm::kVisibleMean ? reference::RefVisibleMean(sum, positions, kv_heads, tokens, group) : sum;
}

class AmberVsReferenceTest : public ::testing::TestWithParam<AmberCase> {};

TEST_P(AmberVsReferenceTest, ScoresBudgetsAndSelectionMatch) {
  const AmberCase& p = GetParam();
  const int64_t layers = 4, kv_heads = 2, group = 3, tokens = 97, head_dim = 16, q_tokens = 12;
  TestCache c = MakeCache(p.dtype, p.layout, layers, kv_heads, group, tokens, head_dim, q_tokens,
                          test::VisualPattern::kMiddle, 31);
  std::vector<int32_t> positions = reference::DefaultPositions(q_tokens, tokens);
  if (p.explicit_positions) {
    for (int64_t i = 0; i < q_tokens; ++i) positions[i] = static_cast<int32_t>(7 * i + 3);  // 3 .. 80
  }
  for (int64_t k = 0; k < p.probes; ++k) positions[q_tokens - p.probes + k] = static_cast<int32_t>(tokens + 5 * k);
  if (p.explicit_positions || p.probes > 0) {
    for (LayerInput& l : c.input.layers) l.query_positions = positions;
  }
  CompressOptions o = DefaultOptions(PolicyKind::kAmber);
  o.budget.rho = 0.3;
  o.score_norm = p.norm;
  o.layer_budget = p.budget;
  o.recent_search_rows = p.recent_rows;
  const std::vector<std::vector<float>> outside =
      p.outside ? SetOutsideLse(c, 37) : std::vector<std::vector<float>>(layers);
  auto backend = MakeCpuBackend();
  absl::StatusOr<CompressResult> r = Compress(c.input, o, *backend);
  ASSERT_TRUE(r.ok()) << r.status();
  const double scale = 1.0 / std::sqrt(static_cast<double>(head_dim));
  std::vector<std::vector<double>> scores(layers), recent(layers);
  for (int64_t l = 0; l < layers; ++l) {
    // The recent search's statistics (a sum whatever the score): the last min(recent_rows, q_tokens) rows alone.
    recent[l] = reference::RefAttentionStats(c.queries[l].view(), positions, c.keys[l].view(),
                                             c.input.modality, scale, o.entropy_heads, o.entropy_source,
                                             q_tokens - std::min(p.recent_rows, q_tokens), ScoreAggregation::kSum,
                                             outside[l])
                    .scores;
    scores[l] = RefAmberScores(c, l, positions, o, p.norm, scale, outside[l]);
  }
  std::vector<int64_t> want_budget(layers, reference::RoundHalfUp(0.3 * tokens));
  if (p.budget == LayerBudget::kMass) {
    want_budget = reference::RefMassBudgets(scores, kv_heads, tokens, 0.3, o.budget.alpha_min, o.budget.alpha_max);
  }
  if (p.budget == LayerBudget::kDepth) {
    want_budget = reference::RefDepthBudgets(layers, tokens, 0.3, o.depth_ratio);
  }
  const std::vector<double> fractions(std::begin(kRecentSearchFractions), std::end(kRecentSearchFractions));
  int64_t total = 0;
  for (int64_t l = 0; l < layers; ++l) {
    const LayerResult& lr = r->layers[l];
    EXPECT_EQ(lr.budget, want_budget[l]) << "layer " << l;
    total += lr.budget;
    const std::vector<int32_t> kept =
        p.recent_rows > 0 ? reference::RefRecentSearch(scores[l], recent[l], c.input.modality, kv_heads,
                                                       tokens, lr.budget, fractions, TextPrior::kNone, false)
                          : reference::RefSelect(scores[l], c.input.modality, kv_heads, tokens, lr.budget,
                                                 o.recent_fraction, TextPrior::kNone, false);
    EXPECT_EQ(lr.positions, kept) << "layer " << l;
    // No merge: the kept rows as they were.
    for (int64_t h = 0; h < kv_heads; ++h) {
      for (int64_t j = 0; j < lr.budget; ++j) {
        const TensorView& key = c.input.layers[l].key;
        const TensorView out{lr.key.data(), p.dtype, p.layout, kv_heads, lr.budget, head_dim};
        ASSERT_EQ(std::memcmp(out.Row(h, j), key.Row(h, lr.positions[h * lr.budget + j]),
                              head_dim * DTypeSize(p.dtype)),
                  0)
            << "layer " << l << " head " << h << " row " << j;
      }
    }
  }
  EXPECT_EQ(total, reference::RoundHalfUp(0.3 * layers * tokens));
}

std::vector<AmberCase> AmberCases() {
  std::vector<AmberCase> cases;
  // amber's defaults (sum scores, depth budgets, recent search on 16 rows: more than
  // the 12 query rows, so every row) in every dtype and layout.
  for (DType dt : test::kAllDTypes) {
    for (Layout lay : test::kAllLayouts) {
      cases.push_back({dt, lay, ScoreNorm::kSum, LayerBudget::kDepth, false});
    }
  }
  cases.push_back({DType::kFloat16, Layout::kNHD, ScoreNorm::kSum, LayerBudget::kDepth, true, 5});
  cases.push_back({DType::kFloat32, Layout::kHND, ScoreNorm::kSum, LayerBudget::kDepth, false, 1});
  cases.push_back({DType::kFloat32, Layout::kHND, ScoreNorm::kVisibleMean, LayerBudget::kUniform, false, 4});
  // Probe rows after the cache (a question asked after it): they see every key.
  cases.push_back({DType::kFloat16, Layout::kNHD, ScoreNorm::kSum, LayerBudget::kDepth, false, 4, 5});
  cases.push_back({DType::kBFloat16, Layout::kHND, ScoreNorm::kVisibleMean, LayerBudget::kMass, true, 16, 12});
  cases.push_back({DType::kFloat32, Layout::kHND, ScoreNorm::kSum, LayerBudget::kMass, true, 0, 3});
  cases.push_back({DType::kFloat32, Layout::kHND, ScoreNorm::kVisibleMean, LayerBudget::kUniform, true, 0});
  cases.push_back({DType::kFloat32, Layout::kHND, ScoreNorm::kVisibleMean, LayerBudget::kMass, false, 0});
  cases.push_back({DType::kFloat16, Layout::kNHD, ScoreNorm::kVisibleMean, LayerBudget::kMass, true, 6});
  cases.push_back({DType::kFloat32, Layout::kNHD, ScoreNorm::kSum, LayerBudget::kMass, false, 0});
  cases.push_back({DType::kBFloat16, Layout::kHND, ScoreNorm::kSum, LayerBudget::kUniform, true, 3});
  // The max score, alone and with probe rows after the cache (a reconstruction pass).
  cases.push_back({DType::kFloat32, Layout::kHND, ScoreNorm::kMax, LayerBudget::kMass, false, 0});
  cases.push_back({DType::kBFloat16, Layout::kNHD, ScoreNorm::kMax, LayerBudget::kDepth, true, 16});
  cases.push_back({DType::kFloat16, Layout::kHND, ScoreNorm::kMax, LayerBudget::kMass, false, 4, 8});
  cases.push_back({DType::kFloat32, Layout::kNHD, ScoreNorm::kMax, LayerBudget::kUniform, true, 0, 4});
  // Probe rows with their attention outside the cache (a reconstruction pass's own tokens).
  cases.push_back({DType::kFloat16, Layout::kNHD, ScoreNorm::kMax, LayerBudget::kMass, false, 4, 8, true});
  cases.push_back({DType::kBFloat16, Layout::kHND, ScoreNorm::kSum, LayerBudget::kDepth, true, 16, 12, true});
  cases.push_back({DType::kFloat32, Layout::kHND, ScoreNorm::kVisibleMean, LayerBudget::kUniform, true, 5, 6, true});
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Cases, AmberVsReferenceTest, ::testing::ValuesIn(AmberCases()),
                         [](const auto& info) {
                           const AmberCase& p = info.param;
                           return absl::StrCat(test::DTypeTag(p.dtype), test::LayoutTag(p.layout),
                                               ScoreNormName(p.norm), "_", LayerBudgetName(p.budget),
                                               p.explicit_positions ? "_Positions" : "_Last", "_Recent",
                                               p.recent_rows, "_Probes", p.probes, p.outside ? "_Outside" : "");
                         });

// ---- amber's global budgets: per-head counts, padded layers ---------------------

struct GlobalCase {
  DType dtype;
  Layout layout;
  ScoreNorm norm;
  int64_t sinks;
  double recent_fraction;  // with recent_search_rows 0
  int64_t probes = 0;      // the last rows stand after the cache
  double rho = 0.2;
  bool outside = false;  // the rows carry query_outside_lse
};

class AmberGlobalBudgetTest : public ::testing::TestWithParam<GlobalCase> {};

TEST_P(AmberGlobalBudgetTest, HeadsKeepTheGloballyBestSlotsPaddedToTheLayersLargest) {
  const GlobalCase& p = GetParam();
  const int64_t layers = 5, kv_heads = 3, group = 2, tokens = 83, head_dim = 16, q_tokens = 11;
  TestCache c = MakeCache(p.dtype, p.layout, layers, kv_heads, group, tokens, head_dim, q_tokens,
                          test::VisualPattern::kNone, 71);
  std::vector<int32_t> positions = reference::DefaultPositions(q_tokens, tokens);
  for (int64_t k = 0; k < p.probes; ++k) positions[q_tokens - p.probes + k] = static_cast<int32_t>(tokens + 3 * k);
  if (p.probes > 0) {
    for (LayerInput& l : c.input.layers) l.query_positions = positions;
  }
  CompressOptions o = DefaultOptions(PolicyKind::kAmber);
  o.budget.rho = p.rho;
  o.score_norm = p.norm;
  o.layer_budget = LayerBudget::kGlobal;
  o.recent_search_rows = 0;
  o.recent_fraction = p.recent_fraction;
  o.sinks = p.sinks;
  const std::vector<std::vector<float>> outside =
      p.outside ? SetOutsideLse(c, 73) : std::vector<std::vector<float>>(layers);
  auto backend = MakeCpuBackend();
  absl::StatusOr<CompressResult> r = Compress(c.input, o, *backend);
  ASSERT_TRUE(r.ok()) << r.status();

  const double scale = 1.0 / std::sqrt(static_cast<double>(head_dim));
  std::vector<std::vector<double>> scores(layers);
  for (int64_t l = 0; l < layers; ++l) scores[l] = RefAmberScores(c, l, positions, o, p.norm, scale, outside[l]);
  const int64_t forced = std::max<int64_t>(p.sinks, 1);
  const std::vector<int64_t> want = reference::RefGlobalHeadBudgets(scores, kv_heads, tokens, p.rho, forced);
  EXPECT_EQ(std::accumulate(want.begin(), want.end(), int64_t{0}),
            reference::RoundHalfUp(p.rho * layers * kv_heads * tokens));
  bool uneven = false;
  int64_t padded = 0;
  for (int64_t l = 0; l < layers; ++l) {
    const LayerResult& lr = r->layers[l];
    const int64_t width = *std::max_element(want.begin() + l * kv_heads, want.begin() + (l + 1) * kv_heads);
    ASSERT_EQ(lr.budget, width) << "layer " << l;
    padded += width;
    for (int64_t h = 0; h < kv_heads; ++h) {
      const int64_t n = want[l * kv_heads + h];
      uneven = uneven || n != width;
      // The head's own selection: its first `forced` tokens always (scored above everything), then the
      // reference's recent window and top scores for its budget.
      std::vector<double> head(scores[l].begin() + h * tokens, scores[l].begin() + (h + 1) * tokens);
      for (int64_t t = 0; t < forced; ++t) head[t] = 1e30;
      const std::vector<int32_t> kept =
          reference::RefSelect(head, c.input.modality, 1, tokens, n, p.recent_fraction, TextPrior::kNone, false);
      for (int64_t j = 0; j < width; ++j) {
        const int32_t got = lr.positions[h * width + j];
        const TensorView out_key{lr.key.data(), p.dtype, p.layout, kv_heads, width, head_dim};
        const TensorView out_value{lr.value.data(), p.dtype, p.layout, kv_heads, width, head_dim};
        const size_t row = head_dim * DTypeSize(p.dtype);
        if (j < n) {
          ASSERT_EQ(got, kept[j]) << "layer " << l << " head " << h << " row " << j;
          EXPECT_EQ(std::memcmp(out_key.Row(h, j), c.input.layers[l].key.Row(h, got), row), 0);
          EXPECT_EQ(std::memcmp(out_value.Row(h, j), c.input.layers[l].value.Row(h, got), row), 0);
        } else {
          ASSERT_EQ(got, -1) << "layer " << l << " head " << h << " padded row " << j;
          const std::vector<uint8_t> zero(row, 0);
          EXPECT_EQ(std::memcmp(out_key.Row(h, j), zero.data(), row), 0);
          EXPECT_EQ(std::memcmp(out_value.Row(h, j), zero.data(), row), 0);
        }
      }
    }
    EXPECT_DOUBLE_EQ(lr.alpha, static_cast<double>(std::accumulate(want.begin() + l * kv_heads,
                                                                   want.begin() + (l + 1) * kv_heads, int64_t{0})) /
                                   static_cast<double>(kv_heads * tokens));
  }
  EXPECT_TRUE(uneven) << "every head kept the same number: the case does not test per-head budgets";
  EXPECT_EQ(r->tokens_kept, padded);  // rows held, padding included
}

INSTANTIATE_TEST_SUITE_P(
    Cases, AmberGlobalBudgetTest,
    ::testing::Values(GlobalCase{DType::kFloat32, Layout::kHND, ScoreNorm::kMax, 0, 0.0},
                      GlobalCase{DType::kFloat16, Layout::kNHD, ScoreNorm::kMax, 4, 0.0, 0, 0.1},
                      GlobalCase{DType::kBFloat16, Layout::kHND, ScoreNorm::kSum, 2, 0.25},
                      GlobalCase{DType::kFloat32, Layout::kNHD, ScoreNorm::kMax, 1, 0.0, 6, 0.5},
                      GlobalCase{DType::kFloat16, Layout::kHND, ScoreNorm::kVisibleMean, 0, 0.125, 4},
                      GlobalCase{DType::kBFloat16, Layout::kNHD, ScoreNorm::kMax, 4, 0.0, 9, 0.1, true},
                      GlobalCase{DType::kFloat32, Layout::kHND, ScoreNorm::kSum, 0, 0.0, 3, 0.25, true}),
    [](const auto& info) {
      const GlobalCase& p = info.param;
      return absl::StrCat(test::DTypeTag(p.dtype), test::LayoutTag(p.layout), ScoreNormName(p.norm), "_Sinks",
                          p.sinks, "_Probes", p.probes, "_Rho", static_cast<int>(p.rho * 100),
                          p.outside ? "_Outside" : "");
    });

TEST(AmberGlobalBudgetTest, RecentSearchAndOptionChecks) {
  // The recent search runs per head on its own budget; the counts are the global ones.
  TestCache c = MakeCache(DType::kFloat32, Layout::kHND, 4, 2, 2, 64, 8, 20, test::VisualPattern::kNone, 72);
  CompressOptions o = DefaultOptions(PolicyKind::kAmber);
  o.layer_budget = LayerBudget::kGlobal;
  o.score_norm = ScoreNorm::kMax;
  o.budget.rho = 0.3;
  auto backend = MakeCpuBackend();
  absl::StatusOr<CompressResult> r = Compress(c.input, o, *backend);
  ASSERT_TRUE(r.ok()) << r.status();
  int64_t entries = 0;
  for (const LayerResult& l : r->layers) {
    for (int64_t h = 0; h < 2; ++h) {
      int64_t n = 0;
      for (int64_t j = 0; j < l.budget; ++j) {
        const int32_t pos = l.positions[h * l.budget + j];
        if (pos < 0) {
          for (int64_t k = j; k < l.budget; ++k) EXPECT_EQ(l.positions[h * l.budget + k], -1) << "padding at the end";
          break;
        }
        EXPECT_TRUE(j == 0 ? pos == 0 : pos > l.positions[h * l.budget + j - 1]) << "first token, then ascending";
        ++n;
      }
      entries += n;
    }
  }
  EXPECT_EQ(entries, reference::RoundHalfUp(0.3 * 4 * 2 * 64));
  // Heads of different lengths cannot be merged or share a selection.
  o.merge = MergeMode::kAverage;
  absl::Status s = Compress(c.input, o, *backend).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("merge must be none, got average"), absl::string_view::npos) << s;
  o.merge = MergeMode::kNone;
  o.shared_selection = true;
  s = Compress(c.input, o, *backend).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("shared_selection must be false"), absl::string_view::npos) << s;
}

TEST(AmberTest, SinksPrecomputedScoresAndEntropyBudgets) {
  auto backend = MakeCpuBackend();
  TestCache c = MakeCache(DType::kFloat16, Layout::kHND, 3, 2, 2, 60, 16, 8, test::VisualPattern::kMiddle, 5);
  CompressOptions o = DefaultOptions(PolicyKind::kAmber);
  o.budget.rho = 0.1;
  o.sinks = 3;
  absl::StatusOr<CompressResult> r = Compress(c.input, o, *backend);
  ASSERT_TRUE(r.ok()) << r.status();
  for (const LayerResult& l : r->layers) {
    for (int64_t h = 0; h < 2; ++h) {
      for (int32_t t = 0; t < 3; ++t) EXPECT_EQ(l.positions[h * l.budget + t], t) << "sink " << t;
    }
  }
  // Precomputed scores are taken as given: visible_mean and sum agree.
  TestCache pre = test::MakeTestCache({.layers = 3, .tokens = 60, .precomputed = true, .seed = 6});
  CompressOptions sum = DefaultOptions(PolicyKind::kAmber);
  sum.score_norm = ScoreNorm::kSum;
  absl::StatusOr<CompressResult> a = Compress(pre.input, DefaultOptions(PolicyKind::kAmber), *backend);
  absl::StatusOr<CompressResult> b = Compress(pre.input, sum, *backend);
  ASSERT_TRUE(a.ok() && b.ok());
  test::ExpectSameResult(*a, *b);
  // Entropy budgets are MEDA's rule on the layers' entropies.
  CompressOptions ent = DefaultOptions(PolicyKind::kAmber);
  ent.layer_budget = LayerBudget::kEntropy;
  ent.budget.tau = 2;
  ent.budget.rho = 0.3;
  r = Compress(c.input, ent, *backend);
  ASSERT_TRUE(r.ok()) << r.status();
  std::vector<float> entropy;
  for (const LayerResult& l : r->layers) entropy.push_back(l.entropy);
  absl::StatusOr<LayerBudgets> want = AllocateEntropyBudgets(entropy, 60, ent.budget);
  ASSERT_TRUE(want.ok());
  for (size_t l = 0; l < 3; ++l) EXPECT_EQ(r->layers[l].budget, want->budget[l]) << "layer " << l;
}

// The recent search keeps, per head, at least as much of the last rows'
// attention as any one of its fractions would; with a shared selection every
// head keeps the same tokens; precomputed statistics (no rows) fall back to
// recent_fraction.
TEST(AmberTest, RecentSearchHoldsTheMostOfTheLastRowsAttention) {
  auto backend = MakeCpuBackend();
  const int64_t layers = 3, kv_heads = 2, group = 2, tokens = 150, head_dim = 16, q_tokens = 40, rows = 6;
  TestCache c = MakeCache(DType::kFloat32, Layout::kHND, layers, kv_heads, group, tokens, head_dim, q_tokens,
                          test::VisualPattern::kMiddle, 77);
  // Random rows attend about evenly; give the last rows a purpose: kv head 0's
  // look at the most recent tokens, kv head 1's at tokens 5 .. 24, so that the
  // two heads want different recent windows.
  for (int64_t l = 0; l < layers; ++l) {
    const float* k = static_cast<const float*>(c.keys[l].data());
    float* q = static_cast<float*>(c.queries[l].data());
    for (int64_t h = 0; h < kv_heads; ++h) {
      std::vector<float> target(head_dim, 0.f);
      const int64_t first = h == 0 ? tokens - 20 : 5;
      for (int64_t t = first; t < first + 20; ++t) {
        for (int64_t d = 0; d < head_dim; ++d) target[d] += 0.4f * k[(h * tokens + t) * head_dim + d];
      }
      for (int64_t qh = h * group; qh < (h + 1) * group; ++qh) {
        for (int64_t r = q_tokens - rows; r < q_tokens; ++r) {
          std::copy(target.begin(), target.end(), q + (qh * q_tokens + r) * head_dim);
        }
      }
    }
  }
  CompressOptions o = DefaultOptions(PolicyKind::kAmber);
  o.budget.rho = 0.2;
  o.recent_search_rows = rows;
  absl::StatusOr<Statistics> st = ComputeStatistics(c.input, o, *backend);
  ASSERT_TRUE(st.ok()) << st.status();
  absl::StatusOr<CompressResult> searched = Compress(c.input, o, *backend, nullptr, &*st);
  ASSERT_TRUE(searched.ok()) << searched.status();
  auto held = [&](const LayerResult& lr, int64_t l, int64_t h) {
    double sum = 0.0;
    for (int64_t k = 0; k < lr.budget; ++k) {
      sum += st->recent_scores[l][h * tokens + lr.positions[h * lr.budget + k]];
    }
    return sum;
  };
  std::set<double> chosen;  // the searched sets differ from the fixed ones somewhere
  for (double f : kRecentSearchFractions) {
    CompressOptions fixed = o;
    fixed.recent_search_rows = 0;
    fixed.recent_fraction = f;
    absl::StatusOr<CompressResult> r = Compress(c.input, fixed, *backend);
    ASSERT_TRUE(r.ok()) << r.status();
    for (int64_t l = 0; l < layers; ++l) {
      ASSERT_EQ(r->layers[l].budget, searched->layers[l].budget);
      for (int64_t h = 0; h < kv_heads; ++h) {
        EXPECT_GE(held(searched->layers[l], l, h), held(r->layers[l], l, h))
            << "layer " << l << " head " << h;
        if (std::equal(r->layers[l].positions.begin() + h * r->layers[l].budget,
                       r->layers[l].positions.begin() + (h + 1) * r->layers[l].budget,
                       searched->layers[l].positions.begin() + h * r->layers[l].budget)) {
          chosen.insert(f);
        }
      }
    }
  }
  EXPECT_GE(chosen.size(), 2u) << "every head chose the same fraction: the test shows nothing";
  // Shared selection: one fraction for every head, as the reference.
  o.shared_selection = true;
  absl::StatusOr<CompressResult> shared = Compress(c.input, o, *backend);
  ASSERT_TRUE(shared.ok()) << shared.status();
  const double scale = 1.0 / std::sqrt(static_cast<double>(head_dim));
  const std::vector<int32_t> positions = reference::DefaultPositions(q_tokens, tokens);
  const std::vector<double> fractions(std::begin(kRecentSearchFractions), std::end(kRecentSearchFractions));
  for (int64_t l = 0; l < layers; ++l) {
    const reference::RefStats all =
        reference::RefAttentionStats(c.queries[l].view(), positions, c.keys[l].view(), c.input.modality,
                                     scale, o.entropy_heads, EntropySource::kCausal, 0);
    const reference::RefStats last =
        reference::RefAttentionStats(c.queries[l].view(), positions, c.keys[l].view(), c.input.modality,
                                     scale, o.entropy_heads, EntropySource::kCausal, q_tokens - rows);
    const LayerResult& lr = shared->layers[l];
    EXPECT_EQ(lr.positions, reference::RefRecentSearch(all.scores, last.scores, c.input.modality, kv_heads,
                                                       tokens, lr.budget, fractions, TextPrior::kNone, true))
        << "layer " << l;
  }
  // Precomputed statistics: no rows to search on, recent_fraction applies.
  TestCache pre = test::MakeTestCache({.layers = 3, .tokens = 60, .precomputed = true, .seed = 8});
  CompressOptions off = DefaultOptions(PolicyKind::kAmber);
  off.recent_search_rows = 0;
  absl::StatusOr<CompressResult> a = Compress(pre.input, DefaultOptions(PolicyKind::kAmber), *backend);
  absl::StatusOr<CompressResult> b = Compress(pre.input, off, *backend);
  ASSERT_TRUE(a.ok() && b.ok()) << a.status() << " " << b.status();
  test::ExpectSameResult(*a, *b);
}

// snapkv and pyramidkv read only their window's rows: a request that carries
// every query row and one that carries only the last `window` give the same
// result bit for bit (kept tokens, keys, values and the reported entropy),
// in every dtype and layout; the statistics ran on the window alone.
TEST(WindowRowsTest, OnlyTheWindowsRowsAreComputed) {
  for (DType dtype : {DType::kFloat16, DType::kBFloat16, DType::kFloat32}) {
    for (Layout layout : {Layout::kHND, Layout::kNHD}) {
      SCOPED_TRACE(absl::StrCat(DTypeName(dtype), " ", LayoutName(layout)));
      const int64_t layers = 3, kv_heads = 2, group = 2, tokens = 57, head_dim = 8, window = 5;
      TestCache all = MakeCache(dtype, layout, layers, kv_heads, group, tokens, head_dim, tokens,
                                test::VisualPattern::kMiddle, 21);
      // The same cache with only the last `window` query rows (positions T - window .. T - 1).
      TestCache last = all;
      for (int64_t l = 0; l < layers; ++l) {
        HostTensor tail(dtype, layout, kv_heads * group, window, head_dim);
        for (int64_t h = 0; h < kv_heads * group; ++h) {
          for (int64_t r = 0; r < window; ++r) {
            std::memcpy(tail.mutable_view().Row(h, r), all.queries[l].view().Row(h, tokens - window + r),
                        static_cast<size_t>(head_dim) * DTypeSize(dtype));
          }
        }
        last.queries[l] = std::move(tail);
        last.input.layers[l].key = last.keys[l].view();
        last.input.layers[l].value = last.values[l].view();
        last.input.layers[l].query = last.queries[l].view();
      }
      for (PolicyKind p : {PolicyKind::kSnapKV, PolicyKind::kPyramidKV}) {
        CompressOptions o = DefaultOptions(p);
        o.window = window;
        o.pool_kernel = 3;
        o.budget.rho = 0.4;
        absl::StatusOr<CompressResult> a = Compress(all.input, o, *MakeCpuBackend());
        absl::StatusOr<CompressResult> b = Compress(last.input, o, *MakeCpuBackend());
        ASSERT_TRUE(a.ok() && b.ok()) << a.status() << " " << b.status();
        test::ExpectSameResult(*a, *b);
        for (int64_t l = 0; l < layers; ++l) EXPECT_EQ(a->layers[l].entropy, b->layers[l].entropy) << l;
      }
    }
  }
}

// Probe rows after the cache (positions T and beyond) see every key and count
// with the modality of the cache's last token: the statistics equal the
// reference's for every entropy source, dtype and layout; a request with
// more rows than tokens is fine with positions and refused without.
TEST(ProbeRowsTest, StatisticsMatchTheReference) {
  for (DType dtype : {DType::kFloat16, DType::kBFloat16, DType::kFloat32}) {
    for (Layout layout : {Layout::kHND, Layout::kNHD}) {
      for (EntropySource source : {EntropySource::kCrossModal, EntropySource::kCausal}) {
        SCOPED_TRACE(absl::StrCat(DTypeName(dtype), " ", LayoutName(layout), " ", EntropySourceName(source)));
        const int64_t layers = 2, kv_heads = 2, group = 2, tokens = 23, head_dim = 8, q_tokens = 31;
        TestCache c = MakeCache(dtype, layout, layers, kv_heads, group, tokens, head_dim, q_tokens,
                                test::VisualPattern::kMiddle, 41);
        std::vector<int32_t> positions(q_tokens);
        for (int64_t i = 0; i < q_tokens; ++i) {
          positions[i] = static_cast<int32_t>(i < 10 ? 2 * i : tokens + 3 * (i - 10));  // 10 in the cache, 21 after
        }
        for (LayerInput& l : c.input.layers) l.query_positions = positions;
        CompressOptions o = DefaultOptions(PolicyKind::kMeda);
        o.entropy_source = source;
        absl::StatusOr<Statistics> st = ComputeStatistics(c.input, o, *MakeCpuBackend());
        ASSERT_TRUE(st.ok()) << st.status();
        const double scale = 1.0 / std::sqrt(static_cast<double>(head_dim));
        for (int64_t l = 0; l < layers; ++l) {
          const reference::RefStats rs = reference::RefAttentionStats(
              c.queries[l].view(), positions, c.keys[l].view(), c.input.modality, scale, o.entropy_heads, source, 0);
          EXPECT_TRUE(test::Near(st->entropy[l], rs.entropy, 1e-4, 1e-5)) << "layer " << l;
          for (int64_t i = 0; i < kv_heads * tokens; ++i) {
            ASSERT_TRUE(test::Near(st->scores[l][i], rs.scores[i], 1e-4, 1e-5)) << "layer " << l << " score " << i;
          }
        }
        absl::StatusOr<CompressResult> r = Compress(c.input, o, *MakeCpuBackend());
        ASSERT_TRUE(r.ok()) << r.status();
        CacheInput defaults = c.input;
        for (LayerInput& l : defaults.layers) l.query_positions.clear();
        ExpectInvalid(defaults, o, "rows after the cache (probes) need query_positions");
      }
    }
  }
}

// ---- the statistics stage alone, and statistics shared between runs ----------

// Options of every policy, some with non-default statistics options.
std::vector<CompressOptions> StatisticsRuns() {
  std::vector<CompressOptions> runs;
  for (PolicyKind p : {PolicyKind::kFull, PolicyKind::kMeda, PolicyKind::kStreamingLlm, PolicyKind::kH2O,
                       PolicyKind::kSnapKV, PolicyKind::kPyramidKV, PolicyKind::kLookM}) {
    CompressOptions o = DefaultOptions(p);
    o.budget.rho = 0.3;
    runs.push_back(o);
  }
  CompressOptions meda = DefaultOptions(PolicyKind::kMeda);
  meda.entropy_source = EntropySource::kCausal;
  meda.entropy_heads = EntropyHeads::kMeanEntropy;
  meda.scale = 0.2f;
  runs.push_back(meda);
  CompressOptions snap = DefaultOptions(PolicyKind::kSnapKV);
  snap.window = 3;
  snap.pool_kernel = 3;
  runs.push_back(snap);
  CompressOptions amber = DefaultOptions(PolicyKind::kAmber);  // recent search on 16 rows, depth budgets
  amber.budget.rho = 0.3;
  runs.push_back(amber);
  amber.recent_search_rows = 3;
  amber.layer_budget = LayerBudget::kUniform;
  amber.score_norm = ScoreNorm::kVisibleMean;
  runs.push_back(amber);
  amber.score_norm = ScoreNorm::kMax;
  amber.layer_budget = LayerBudget::kMass;
  runs.push_back(amber);
  return runs;
}

class SharedStatisticsTest : public ::testing::TestWithParam<std::tuple<DType, Layout, bool>> {};

TEST_P(SharedStatisticsTest, GivenStatisticsGiveTheSameResult) {
  const auto [dtype, layout, precomputed] = GetParam();
  TestCache c = test::MakeTestCache({.dtype = dtype, .layout = layout, .layers = 3, .kv_heads = 2, .group = 3,
                                     .tokens = 41, .head_dim = 16, .q_tokens = 7, .pattern = test::VisualPattern::kMiddle,
                                     .precomputed = precomputed, .seed = 5});
  auto backend = MakeCpuBackend();
  for (const CompressOptions& o : StatisticsRuns()) {
    const std::string what = absl::StrCat(PolicyName(o.policy), " ", StatisticsKeyFor(o).ToString());
    absl::StatusOr<CompressResult> plain = Compress(c.input, o, *backend);
    ASSERT_TRUE(plain.ok()) << what << ": " << plain.status();
    absl::StatusOr<Statistics> st = ComputeStatistics(c.input, o, *backend);
    ASSERT_TRUE(st.ok()) << what << ": " << st.status();
    EXPECT_EQ(st->key, StatisticsKeyFor(o)) << what;
    // Every rho and budget option reuses the same statistics.
    for (double rho : {0.05, 0.3, 0.77, 1.0}) {
      CompressOptions r = o;
      r.budget.rho = rho;
      if (o.policy == PolicyKind::kMeda) r.budget.tau = rho * 4;
      absl::StatusOr<CompressResult> want = Compress(c.input, r, *backend);
      absl::StatusOr<CompressResult> got = Compress(c.input, r, *backend, nullptr, &*st);
      ASSERT_TRUE(want.ok() && got.ok()) << what << " rho " << rho << ": " << want.status() << " " << got.status();
      {
        SCOPED_TRACE(absl::StrCat(what, " rho ", rho));
        test::ExpectSameResult(*got, *want);
      }
      EXPECT_EQ(got->seconds.statistics, 0.0) << what;
    }
    absl::StatusOr<CompressResult> same = Compress(c.input, o, *backend, nullptr, &*st);
    ASSERT_TRUE(same.ok()) << what << ": " << same.status();
    {
      SCOPED_TRACE(what);
      test::ExpectSameResult(*same, *plain);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(AllDTypesLayouts, SharedStatisticsTest,
                         ::testing::Combine(::testing::Values(DType::kFloat16, DType::kBFloat16, DType::kFloat32),
                                            ::testing::Values(Layout::kHND, Layout::kNHD), ::testing::Bool()));

TEST(StatisticsKeyTest, SharedOnlyWhereTheStageReadsTheSame) {
  const CompressOptions meda = DefaultOptions(PolicyKind::kMeda);
  const CompressOptions h2o = DefaultOptions(PolicyKind::kH2O);
  const CompressOptions look_m = DefaultOptions(PolicyKind::kLookM);
  const CompressOptions snap = DefaultOptions(PolicyKind::kSnapKV);
  const CompressOptions pyramid = DefaultOptions(PolicyKind::kPyramidKV);
  // No statistics at all.
  EXPECT_FALSE(StatisticsKeyFor(DefaultOptions(PolicyKind::kFull)).computed);
  EXPECT_FALSE(StatisticsKeyFor(DefaultOptions(PolicyKind::kStreamingLlm)).computed);
  EXPECT_EQ(StatisticsKeyFor(DefaultOptions(PolicyKind::kFull)).ToString(), "none");
  // Same scorer, and only MEDA's budgets read the cross-modal entropy.
  EXPECT_EQ(StatisticsKeyFor(h2o), StatisticsKeyFor(look_m));
  EXPECT_NE(StatisticsKeyFor(h2o), StatisticsKeyFor(meda));
  CompressOptions h2o_cross = h2o;
  h2o_cross.entropy_source = EntropySource::kCrossModal;
  EXPECT_EQ(StatisticsKeyFor(h2o), StatisticsKeyFor(h2o_cross));
  // SnapKV and PyramidKV share theirs at the same window and kernel.
  EXPECT_EQ(StatisticsKeyFor(snap), StatisticsKeyFor(pyramid));
  CompressOptions snap_window = snap;
  snap_window.window = 32;
  EXPECT_NE(StatisticsKeyFor(snap), StatisticsKeyFor(snap_window));
  // The window does not matter to the accumulated scorer.
  CompressOptions h2o_window = h2o;
  h2o_window.window = 32;
  EXPECT_EQ(StatisticsKeyFor(h2o), StatisticsKeyFor(h2o_window));
  // Budget, selection and merge options never matter; the scale always does.
  CompressOptions meda2 = meda;
  meda2.budget.rho = 0.7;
  meda2.budget.tau = 3;
  meda2.merge = MergeMode::kNone;
  meda2.text_prior = TextPrior::kNone;
  meda2.recent_fraction = 0.1;
  EXPECT_EQ(StatisticsKeyFor(meda), StatisticsKeyFor(meda2));
  meda2.scale = 0.5f;
  EXPECT_NE(StatisticsKeyFor(meda), StatisticsKeyFor(meda2));
  EXPECT_EQ(StatisticsKeyFor(meda).ToString(),
            "scorer=accumulated entropy=cross_modal/mean_attention scale=0");
  // amber's recent search reads its rows; without the search amber reads what H2O reads.
  CompressOptions amber = DefaultOptions(PolicyKind::kAmber);
  EXPECT_EQ(StatisticsKeyFor(amber).recent_rows, kAmberRecentSearchRows);
  EXPECT_NE(StatisticsKeyFor(amber), StatisticsKeyFor(h2o));
  EXPECT_EQ(StatisticsKeyFor(amber).ToString(),
            "scorer=accumulated entropy=causal/mean_attention scale=0 recent_rows=16");
  CompressOptions amber8 = amber;
  amber8.recent_search_rows = 8;
  EXPECT_NE(StatisticsKeyFor(amber), StatisticsKeyFor(amber8));
  amber8.depth_ratio = 0.5;
  amber8.layer_budget = LayerBudget::kUniform;
  amber8.recent_search_rows = 16;
  EXPECT_EQ(StatisticsKeyFor(amber), StatisticsKeyFor(amber8));
  amber8.recent_search_rows = 0;
  EXPECT_EQ(StatisticsKeyFor(amber8), StatisticsKeyFor(h2o));
  // The max score is other statistics; visible_mean is a view of the sum.
  amber8.score_norm = ScoreNorm::kVisibleMean;
  EXPECT_EQ(StatisticsKeyFor(amber8), StatisticsKeyFor(h2o));
  amber8.score_norm = ScoreNorm::kMax;
  EXPECT_NE(StatisticsKeyFor(amber8), StatisticsKeyFor(h2o));
  EXPECT_EQ(StatisticsKeyFor(amber8).ToString(), "scorer=accumulated entropy=causal/mean_attention scale=0 aggregation=max");
}

TEST(SharedStatisticsErrorsTest, RejectsStatisticsOfOtherOptionsOrShapes) {
  TestCache c = MakeCache(DType::kFloat16, Layout::kHND, 3, 2, 2, 40, 8, 4, test::VisualPattern::kMiddle, 21);
  auto backend = MakeCpuBackend();
  const CompressOptions meda = DefaultOptions(PolicyKind::kMeda);
  absl::StatusOr<Statistics> st = ComputeStatistics(c.input, meda, *backend);
  ASSERT_TRUE(st.ok()) << st.status();
  // Another key.
  absl::StatusOr<CompressResult> r = Compress(c.input, DefaultOptions(PolicyKind::kH2O), *backend, nullptr, &*st);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(r.status().message()).find("computed for other options"), std::string::npos) << r.status();
  // Another shape.
  TestCache other = MakeCache(DType::kFloat16, Layout::kHND, 3, 2, 2, 39, 8, 4, test::VisualPattern::kMiddle, 21);
  r = Compress(other.input, meda, *backend, nullptr, &*st);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(r.status().message()).find("the cache has 3 x 2 x 39"), std::string::npos) << r.status();
  // A layer's scores cut short.
  Statistics cut = *st;
  cut.scores[1].pop_back();
  r = Compress(c.input, meda, *backend, nullptr, &cut);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(r.status().message()).find("layer 1"), std::string::npos) << r.status();
  // amber's recent-search scores cut short, or for too few layers.
  const CompressOptions amber = DefaultOptions(PolicyKind::kAmber);
  absl::StatusOr<Statistics> ast = ComputeStatistics(c.input, amber, *backend);
  ASSERT_TRUE(ast.ok()) << ast.status();
  ASSERT_EQ(ast->recent_scores.size(), 3u);
  Statistics recent_cut = *ast;
  recent_cut.recent_scores[2].pop_back();
  r = Compress(c.input, amber, *backend, nullptr, &recent_cut);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(r.status().message()).find("layer 2 has 79 recent scores, expected 80"),
            std::string::npos)
      << r.status();
  recent_cut.recent_scores.pop_back();
  r = Compress(c.input, amber, *backend, nullptr, &recent_cut);
  EXPECT_NE(std::string(r.status().message()).find("recent scores for 2 layers, expected 3"),
            std::string::npos)
      << r.status();
  // ComputeStatistics validates like Compress.
  CompressOptions bad = meda;
  bad.budget.rho = 2;
  EXPECT_EQ(ComputeStatistics(c.input, bad, *backend).status().code(), absl::StatusCode::kInvalidArgument);
  std::atomic<bool> cancelled{true};
  EXPECT_EQ(ComputeStatistics(c.input, meda, *backend, &cancelled).status().code(), absl::StatusCode::kCancelled);
}

TEST(PipelineCancelTest, CancelledFlagStopsTheCall) {
  TestCache c = MakeCache(DType::kFloat16, Layout::kHND, 3, 2, 2, 40, 8, 4, test::VisualPattern::kMiddle, 21);
  std::atomic<bool> cancelled{true};
  absl::StatusOr<CompressResult> r = Compress(c.input, CompressOptions{}, *MakeCpuBackend(), &cancelled);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kCancelled);
  cancelled = false;
  EXPECT_TRUE(Compress(c.input, CompressOptions{}, *MakeCpuBackend(), &cancelled).ok());
}


// on_layer sees every layer once, in order, complete: what it takes equals
// the result without it, bit for bit; an error it returns ends the call.
TEST(PipelineLayerCallbackTest, LayersInOrderEqualToTheWholeResult) {
  for (PolicyKind policy : {PolicyKind::kMeda, PolicyKind::kSnapKV, PolicyKind::kFull}) {
    SCOPED_TRACE(PolicyName(policy));
    TestCache c = test::MakeTestCache({.layers = 4, .tokens = 90, .seed = 17});
    CompressOptions o = DefaultOptions(policy);
    o.budget.rho = 0.25;
    const std::unique_ptr<Backend> cpu = MakeCpuBackend();
    absl::StatusOr<CompressResult> want = Compress(c.input, o, *cpu);
    ASSERT_TRUE(want.ok()) << want.status();
    std::vector<int64_t> order;
    CompressResult taken;
    const LayerCallback take = [&](int64_t layer, LayerResult& r) {
      order.push_back(layer);
      taken.layers.push_back(std::move(r));
      return absl::OkStatus();
    };
    absl::StatusOr<CompressResult> got = Compress(c.input, o, *cpu, nullptr, nullptr, &take);
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(order, (std::vector<int64_t>{0, 1, 2, 3}));
    ASSERT_EQ(got->layers.size(), 4u);
    for (size_t l = 0; l < 4; ++l) {
      EXPECT_EQ(got->layers[l].budget, want->layers[l].budget) << "the metadata stays";
      EXPECT_TRUE(got->layers[l].key.empty()) << "the buffers were taken";
    }
    taken.tokens_in = want->tokens_in;
    taken.tokens_kept = want->tokens_kept;
    test::ExpectSameResult(taken, *want);
    EXPECT_EQ(got->tokens_kept, want->tokens_kept);

    int calls = 0;
    const LayerCallback stop = [&](int64_t layer, LayerResult&) {
      ++calls;
      return layer == 1 ? absl::CancelledError("enough") : absl::OkStatus();
    };
    absl::StatusOr<CompressResult> stopped = Compress(c.input, o, *cpu, nullptr, nullptr, &stop);
    EXPECT_EQ(stopped.status().code(), absl::StatusCode::kCancelled);
    EXPECT_EQ(calls, 2);
  }
}

// ---- layers in flight at once (Backend::ConcurrentLayers) -----------------------------

// The CPU backend, declaring `concurrency` layers at once. Every
// AttentionStats call waits (up to 5 s) until `concurrency` calls are in
// flight or no more can come, so a pipeline that ran the layers one at a
// time would never see two at once. It can fail the calls of chosen layers
// (recognised by their key's data pointer).
class ConcurrentCpuBackend final : public Backend {
 public:
  ConcurrentCpuBackend(int concurrency, int64_t calls) : concurrency_(concurrency), remaining_(calls) {}
  std::string_view Name() const override { return "concurrent-cpu"; }
  int ConcurrentLayers() const override { return concurrency_; }
  absl::Status AttentionStats(const AttentionStatsArgs& args, AttentionStatsOutput* out) const override {
    {
      absl::MutexLock lock(&mu_);
      ++in_flight_;
      --remaining_;
      max_in_flight_ = std::max(max_in_flight_, in_flight_);
      auto ready = [this] { return in_flight_ >= concurrency_ || remaining_ <= 0 || released_; };
      mu_.AwaitWithTimeout(absl::Condition(&ready), absl::Seconds(5));
      released_ = released_ || in_flight_ >= concurrency_;
    }
    absl::Status s = failing_.count(args.key.data) != 0 ? absl::InternalError("injected failure")
                                                        : cpu_->AttentionStats(args, out);
    absl::MutexLock lock(&mu_);
    --in_flight_;
    return s;
  }
  absl::Status ReduceScores(const float* scores, int64_t sh, int64_t kvh, int64_t t, float* out) const override {
    return cpu_->ReduceScores(scores, sh, kvh, t, out);
  }
  absl::Status PoolScores(const float* in, int64_t h, int64_t t, int64_t len, int64_t k, float* out) const override {
    return cpu_->PoolScores(in, h, t, len, k, out);
  }
  absl::Status SelectTokens(const SelectArgs& args, int32_t* kept) const override {
    return cpu_->SelectTokens(args, kept);
  }
  absl::Status MergeAndGather(const MergeArgs& args, MutableTensorView k, MutableTensorView v) const override {
    return cpu_->MergeAndGather(args, k, v);
  }
  void Fail(const void* key) { failing_.insert(key); }
  int max_in_flight() const {
    absl::MutexLock lock(&mu_);
    return max_in_flight_;
  }

 private:
  const std::unique_ptr<Backend> cpu_ = MakeCpuBackend();
  const int concurrency_;
  std::set<const void*> failing_;
  mutable absl::Mutex mu_;
  mutable int in_flight_ ABSL_GUARDED_BY(mu_) = 0;
  mutable int max_in_flight_ ABSL_GUARDED_BY(mu_) = 0;
  mutable int64_t remaining_ ABSL_GUARDED_BY(mu_);
  mutable bool released_ ABSL_GUARDED_BY(mu_) = false;  // once `concurrency` met, nobody waits again
};

TEST(ConcurrentLayersTest, LayersInFlightAtOnceGiveTheSameResult) {
  for (PolicyKind policy : {PolicyKind::kMeda, PolicyKind::kAmber, PolicyKind::kSnapKV}) {
    for (DType dtype : {DType::kFloat16, DType::kBFloat16, DType::kFloat32}) {
      SCOPED_TRACE(absl::StrCat(PolicyName(policy), " dtype ", static_cast<int>(dtype)));
      TestCache c = test::MakeTestCache({.dtype = dtype, .layout = Layout::kNHD, .layers = 5, .kv_heads = 2,
                                         .group = 2, .tokens = 77, .head_dim = 16, .q_tokens = 20, .seed = 23});
      CompressOptions o = DefaultOptions(policy);
      o.budget.rho = 0.3;
      absl::StatusOr<CompressResult> want = Compress(c.input, o, *MakeCpuBackend());
      ASSERT_TRUE(want.ok()) << want.status();
      // Amber's recent search calls AttentionStats twice per layer.
      const int64_t calls = policy == PolicyKind::kAmber ? 10 : 5;
      ConcurrentCpuBackend concurrent(3, calls);
      absl::StatusOr<CompressResult> got = Compress(c.input, o, concurrent);
      ASSERT_TRUE(got.ok()) << got.status();
      test::ExpectSameResult(*got, *want);
      EXPECT_GE(concurrent.max_in_flight(), 2) << "the layers ran one at a time";
      EXPECT_LE(concurrent.max_in_flight(), 3);
    }
  }
}

TEST(ConcurrentLayersTest, TheLowestFailedLayerIsReportedAndCancellationHolds) {
  TestCache c = test::MakeTestCache({.layers = 6, .tokens = 50, .seed = 29});
  const CompressOptions o = DefaultOptions(PolicyKind::kMeda);
  ConcurrentCpuBackend concurrent(2, 6);
  concurrent.Fail(c.input.layers[4].key.data);
  concurrent.Fail(c.input.layers[2].key.data);
  absl::Status s = Compress(c.input, o, concurrent).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInternal);
  EXPECT_NE(s.message().find("layer 2: injected failure"), std::string::npos) << s;
  // The sequential path reports the same.
  ConcurrentCpuBackend sequential(1, 6);
  sequential.Fail(c.input.layers[4].key.data);
  sequential.Fail(c.input.layers[2].key.data);
  EXPECT_EQ(Compress(c.input, o, sequential).status(), s);
  ConcurrentCpuBackend cancelled_backend(2, 6);
  std::atomic<bool> cancelled{true};
  EXPECT_EQ(Compress(c.input, o, cancelled_backend, &cancelled).status().code(), absl::StatusCode::kCancelled);
}

}  // namespace
}  // namespace medakv
