// Each policy's defining behaviour on hand-made inputs (docs/algorithm.md,
// "Baselines"): what it keeps, its budgets, and its merge.
#include <gtest/gtest.h>

#include <cmath>
#include <numeric>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/cpu/budget.h"
#include "kernels/cpu/ops.h"
#include "service/compress/pipeline.h"
#include "service/compress/policy.h"
#include "tests/kernels/test_util.h"
#include "tests/reference/reference.h"

namespace medakv {
namespace {

using test::HostTensor;

// One layer-set of keys/values with precomputed scores given per kv head.
struct Precomputed {
  std::vector<HostTensor> keys, values;
  std::vector<std::vector<float>> scores;
  CacheInput input;
};

Precomputed MakePrecomputed(int64_t layers, int64_t kv_heads, int64_t tokens, int64_t head_dim,
                            const std::vector<std::vector<float>>& scores, std::vector<uint8_t> modality = {}) {
  Precomputed p;
  p.scores = scores;
  p.input.kv_heads = kv_heads;
  p.input.q_heads = kv_heads;
  p.input.head_dim = head_dim;
  p.input.tokens = tokens;
  p.input.dtype = DType::kFloat32;
  p.input.layout = Layout::kHND;
  p.input.stats = StatsForm::kPrecomputed;
  p.input.modality = std::move(modality);
  for (int64_t l = 0; l < layers; ++l) {
    p.keys.push_back(test::RandomTensor(DType::kFloat32, Layout::kHND, kv_heads, tokens, head_dim, 10 + l));
    p.values.push_back(test::RandomTensor(DType::kFloat32, Layout::kHND, kv_heads, tokens, head_dim, 20 + l));
  }
  for (int64_t l = 0; l < layers; ++l) {
    LayerInput layer;
    layer.key = p.keys[l].view();
    layer.value = p.values[l].view();
    layer.scores = p.scores[l].data();
    layer.score_heads = kv_heads;
    layer.entropy = 1.f;
    p.input.layers.push_back(layer);
  }
  return p;
}

CompressResult RunPolicy(const CacheInput& in, CompressOptions o) {
  absl::StatusOr<CompressResult> r = Compress(in, o, *MakeCpuBackend());
  EXPECT_TRUE(r.ok()) << r.status();
  return r.ok() ? *std::move(r) : CompressResult{};
}

std::vector<int32_t> Range(int32_t begin, int32_t end) {
  std::vector<int32_t> v(end - begin);
  std::iota(v.begin(), v.end(), begin);
  return v;
}

std::vector<int32_t> Concat(std::vector<int32_t> a, const std::vector<int32_t>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

TEST(PolicyNamesTest, EveryPolicyParsesAndHasItsDefaults) {
  const std::pair<const char*, PolicyKind> names[] = {
      {"full", PolicyKind::kFull},   {"meda", PolicyKind::kMeda},           {"streaming_llm", PolicyKind::kStreamingLlm},
      {"h2o", PolicyKind::kH2O},     {"snapkv", PolicyKind::kSnapKV},       {"pyramidkv", PolicyKind::kPyramidKV},
      {"look_m", PolicyKind::kLookM}, {"Streaming-LLM", PolicyKind::kStreamingLlm}};
  for (const auto& [name, kind] : names) {
    absl::StatusOr<PolicyKind> p = ParsePolicy(name);
    ASSERT_TRUE(p.ok()) << name;
    EXPECT_EQ(*p, kind) << name;
    EXPECT_TRUE(ValidateOptions(DefaultOptions(kind)).ok()) << name;
  }
  EXPECT_FALSE(ParsePolicy("snap").ok());
  EXPECT_EQ(DefaultOptions(PolicyKind::kLookM).text_prior, TextPrior::kKeepAllText);
  EXPECT_EQ(DefaultOptions(PolicyKind::kLookM).merge, MergeMode::kPivotal);
  EXPECT_EQ(DefaultOptions(PolicyKind::kMeda).merge, MergeMode::kAverage);
  EXPECT_EQ(DefaultOptions(PolicyKind::kMeda).text_prior, TextPrior::kAdditive);
  for (PolicyKind k : {PolicyKind::kStreamingLlm, PolicyKind::kH2O, PolicyKind::kSnapKV, PolicyKind::kPyramidKV}) {
    EXPECT_EQ(DefaultOptions(k).merge, MergeMode::kNone);
    EXPECT_EQ(DefaultOptions(k).text_prior, TextPrior::kNone);
  }
  EXPECT_EQ(DefaultOptions(PolicyKind::kStreamingLlm).sinks, 4);
  EXPECT_EQ(DefaultOptions(PolicyKind::kSnapKV).window, 64);
  EXPECT_EQ(DefaultOptions(PolicyKind::kSnapKV).pool_kernel, 5);
  EXPECT_EQ(DefaultOptions(PolicyKind::kPyramidKV).pyramid_beta, 20);
}

TEST(StreamingLlmTest, KeepsSinksAndMostRecent) {
  const int64_t tokens = 50;
  // Scores that would pick the middle if anything looked at them.
  std::vector<float> s(2 * tokens, 0.f);
  for (int64_t t = 20; t < 30; ++t) s[t] = s[tokens + t] = 100.f;
  Precomputed p = MakePrecomputed(2, 2, tokens, 4, {s, s});
  CompressOptions o = DefaultOptions(PolicyKind::kStreamingLlm);
  o.budget.rho = 0.3;  // B = 15: 4 sinks + 11 recent
  const CompressResult r = RunPolicy(p.input, o);
  const std::vector<int32_t> want = Concat(Range(0, 4), Range(39, 50));
  for (const LayerResult& l : r.layers) {
    ASSERT_EQ(l.budget, 15);
    EXPECT_EQ(std::vector<int32_t>(l.positions.begin(), l.positions.begin() + 15), want);
    EXPECT_EQ(std::vector<int32_t>(l.positions.begin() + 15, l.positions.end()), want);
    // No merge: the kept rows are the input rows, bit for bit.
    EXPECT_EQ(l.key.size(), 2u * 15 * 4 * 4);
  }
  // Budget below the sinks: the first B tokens.
  o.budget.rho = 0.04;  // B = 2
  o.sinks = 4;
  const CompressResult small = RunPolicy(p.input, o);
  EXPECT_EQ(std::vector<int32_t>(small.layers[0].positions.begin(), small.layers[0].positions.begin() + 2),
            Range(0, 2));
  // sinks = 0 is a sliding window.
  o.budget.rho = 0.1;
  o.sinks = 0;
  const CompressResult window = RunPolicy(p.input, o);
  EXPECT_EQ(std::vector<int32_t>(window.layers[0].positions.begin(), window.layers[0].positions.begin() + 5),
            Range(45, 50));
}

TEST(H2OTest, HeavyHittersAndRecentHalves) {
  const int64_t tokens = 12;
  // Head 0 prefers 1 and 5, head 1 prefers 0 and 7 (the recent 9..11 are kept anyway).
  std::vector<float> s = {0, 9, 1, 1, 1, 8, 1, 1, 1, 0, 0, 0,  //
                          7, 1, 1, 1, 1, 1, 1, 9, 1, 0, 0, 0};
  Precomputed p = MakePrecomputed(1, 2, tokens, 4, {s});
  CompressOptions o = DefaultOptions(PolicyKind::kH2O);
  o.budget.rho = 4.0 / 12.0;  // B = 4: 2 heavy + 2 recent
  const CompressResult r = RunPolicy(p.input, o);
  ASSERT_EQ(r.layers[0].budget, 4);
  EXPECT_EQ(r.layers[0].positions, (std::vector<int32_t>{1, 5, 10, 11, 0, 7, 10, 11}));
  // Text prior off by default: a visual heavy hitter wins over text.
  std::vector<uint8_t> modality(tokens, 0);
  modality[5] = 1;
  Precomputed pv = MakePrecomputed(1, 2, tokens, 4, {s}, modality);
  EXPECT_EQ(RunPolicy(pv.input, o).layers[0].positions, r.layers[0].positions);
}

TEST(LookMTest, KeepsAllTextAndMergesPivotally) {
  // 1 kv head, 6 tokens, head_dim 2: text at 0, 1 and 5, visual 2..4. B = 4,
  // recent half = {4, 5}; KEEP_ALL_TEXT puts 0 and 1 above the visual 2 and 3
  // even though their scores are lower. Evicted 2 and 3 merge PIVOTALLY.
  CacheInput in;
  in.kv_heads = 1;
  in.q_heads = 1;
  in.head_dim = 2;
  in.tokens = 6;
  in.dtype = DType::kFloat32;
  in.stats = StatsForm::kPrecomputed;
  in.modality = {0, 0, 1, 1, 1, 0};
  const std::vector<double> keys = {1, 0, 0, 1, 2, 0.1, 0, 3, 1, 1, 0.5, 0.5};
  const std::vector<double> values = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12};
  HostTensor k = test::MakeTensor(DType::kFloat32, Layout::kHND, 1, 6, 2, keys);
  HostTensor v = test::MakeTensor(DType::kFloat32, Layout::kHND, 1, 6, 2, values);
  std::vector<float> scores = {0.1f, 0.2f, 5.f, 6.f, 1.f, 1.f};
  in.layers.push_back(LayerInput{k.view(), v.view(), {}, {}, scores.data(), 1, 1.f});
  CompressOptions o = DefaultOptions(PolicyKind::kLookM);
  o.budget.rho = 4.0 / 6.0;
  const CompressResult r = RunPolicy(in, o);
  ASSERT_EQ(r.layers[0].positions, (std::vector<int32_t>{0, 1, 4, 5}));
  // Evicted 2 (key [2, 0.1]) is most similar to kept 0 ([1, 0]); evicted 3
  // ([0, 3]) to kept 1 ([0, 1]). PIVOTAL: k_j <- (k_j + (k_e + k_j) / 2) / 2.
  HostTensor ok(DType::kFloat32, Layout::kHND, 1, 4, 2), ov(DType::kFloat32, Layout::kHND, 1, 4, 2);
  std::memcpy(ok.data(), r.layers[0].key.data(), r.layers[0].key.size());
  std::memcpy(ov.data(), r.layers[0].value.data(), r.layers[0].value.size());
  const std::vector<double> want_k = {(1 + (2 + 1) / 2.0) / 2, (0 + (0.1 + 0) / 2.0) / 2,  // kept 0 + evicted 2
                                      (0 + (0 + 0) / 2.0) / 2,  (1 + (3 + 1) / 2.0) / 2,    // kept 1 + evicted 3
                                      1, 1, 0.5, 0.5};
  const std::vector<double> want_v = {(1 + (5 + 1) / 2.0) / 2, (2 + (6 + 2) / 2.0) / 2,
                                      (3 + (7 + 3) / 2.0) / 2, (4 + (8 + 4) / 2.0) / 2,
                                      9, 10, 11, 12};
  EXPECT_TRUE(test::AllNear(test::ReadBack(ok), want_k, 1e-6, 1e-6));
  EXPECT_TRUE(test::AllNear(test::ReadBack(ov), want_v, 1e-6, 1e-6));
}

TEST(PyramidKVTest, BudgetsDecreaseAndSumToUniformTotal) {
  // L = 4, T = 1000, rho = 0.2, w = 64: C = 200, min = 136 / 20 = 6.8,
  // max = 272 - 6.8 = 265.2; layer l keeps 64 + 265.2 - l * 258.4 / 3:
  // 329.2, 243.07, 156.93, 70.8 -> rounded to the total 800.
  absl::StatusOr<std::vector<int64_t>> b = PyramidBudgets(4, 1000, 0.2, 64, 20);
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(*b, (std::vector<int64_t>{329, 243, 157, 71}));
  // Properties over many shapes.
  for (int64_t layers : {2, 5, 32}) {
    for (int64_t tokens : {100, 769, 4096}) {
      for (double rho : {0.05, 0.1, 0.2, 0.5, 0.9}) {
        absl::StatusOr<std::vector<int64_t>> p = PyramidBudgets(layers, tokens, rho, 64, 20);
        ASSERT_TRUE(p.ok());
        const int64_t uniform = UniformBudget(rho, tokens);
        EXPECT_EQ(std::accumulate(p->begin(), p->end(), int64_t{0}), uniform * layers)
            << layers << " " << tokens << " " << rho;
        for (size_t l = 1; l < p->size(); ++l) EXPECT_LE((*p)[l], (*p)[l - 1]) << "non-increasing";
        for (int64_t x : *p) {
          EXPECT_GE(x, 1);
          EXPECT_LE(x, tokens);
        }
        if (uniform > 64) {
          EXPECT_GT(p->front(), p->back()) << layers << " " << tokens << " " << rho;
        }
      }
    }
  }
  // C <= w: uniform.
  EXPECT_EQ(*PyramidBudgets(3, 300, 0.2, 64, 20), (std::vector<int64_t>{60, 60, 60}));
  // max clipped at T - w: T = 200, rho = 0.9, w = 10: C = 180, min = 8.5,
  // max = 331.5 > 190 -> max = 190, min = 2 * 170 - 190 = 150.
  EXPECT_EQ(*PyramidBudgets(2, 200, 0.9, 10, 20), (std::vector<int64_t>{200, 160}));
  EXPECT_FALSE(PyramidBudgets(2, 200, 0.0, 10, 20).ok());
  EXPECT_FALSE(PyramidBudgets(2, 200, 0.5, 10, 0.0).ok());
}

// SnapKV's scores from queries: naive window attention, mean, zero-padded pool.
TEST(SnapKVTest, PooledWindowScoresMatchNaiveComputation) {
  const int64_t kv_heads = 2, group = 2, tokens = 90, head_dim = 8, q_tokens = 20, window = 6;
  HostTensor key = test::RandomTensor(DType::kFloat32, Layout::kHND, kv_heads, tokens, head_dim, 1);
  HostTensor value = test::RandomTensor(DType::kFloat32, Layout::kHND, kv_heads, tokens, head_dim, 2);
  HostTensor query = test::RandomTensor(DType::kFloat32, Layout::kHND, kv_heads * group, q_tokens, head_dim, 3, 1.5);
  CacheInput in;
  in.kv_heads = kv_heads;
  in.q_heads = kv_heads * group;
  in.head_dim = head_dim;
  in.tokens = tokens;
  in.dtype = DType::kFloat32;
  in.modality.assign(tokens, 0);
  in.layers.push_back(LayerInput{key.view(), value.view(), query.view(), {}, nullptr, 0, 0.f});
  CompressOptions o = DefaultOptions(PolicyKind::kSnapKV);
  o.window = window;
  o.budget.rho = 0.3;  // B = 27: the 6 window tokens + the top 21 pooled
  const CompressResult r = RunPolicy(in, o);
  ASSERT_EQ(r.layers[0].budget, 27);

  const reference::RefStats rs = reference::RefAttentionStats(
      query.view(), reference::DefaultPositions(q_tokens, tokens), key.view(), in.modality,
      1.0 / std::sqrt(static_cast<double>(head_dim)), EntropyHeads::kMeanAttention, EntropySource::kCausal,
      q_tokens - window);
  const int64_t prefix = tokens - window;
  for (int64_t h = 0; h < kv_heads; ++h) {
    std::vector<std::pair<double, int32_t>> ranked;
    for (int64_t t = 0; t < prefix; ++t) {
      double sum = 0.0;
      for (int64_t u = t - 2; u <= t + 2; ++u) {
        if (u >= 0 && u < prefix) sum += rs.scores[h * tokens + u] / (window * group);
      }
      ranked.push_back({sum / 5.0, static_cast<int32_t>(t)});
    }
    std::sort(ranked.begin(), ranked.end(), [](const auto& a, const auto& b) {
      return a.first != b.first ? a.first > b.first : a.second > b.second;
    });
    std::vector<int32_t> want;
    for (int i = 0; i < 21; ++i) want.push_back(ranked[i].second);
    std::sort(want.begin(), want.end());
    for (int32_t t = static_cast<int32_t>(prefix); t < tokens; ++t) want.push_back(t);
    EXPECT_EQ(std::vector<int32_t>(r.layers[0].positions.begin() + h * 27, r.layers[0].positions.begin() + (h + 1) * 27),
              want)
        << "head " << h;
  }
  // A budget smaller than the window keeps the most recent B tokens.
  o.budget.rho = 4.0 / 90.0;
  const CompressResult small = RunPolicy(in, o);
  ASSERT_EQ(small.layers[0].budget, 4);
  EXPECT_EQ(std::vector<int32_t>(small.layers[0].positions.begin(), small.layers[0].positions.begin() + 4),
            Range(86, 90));
}

TEST(PoolScoresTest, ZeroPaddedMeanAndWindowCopied) {
  const std::vector<float> in = {1, 2, 3, 4, 5, 6, 7, 8};
  std::vector<float> out(8);
  ASSERT_TRUE(cpu::PoolScores(in.data(), 1, 8, 6, 5, out.data()).ok());
  // t = 0: (1 + 2 + 3) / 5; t = 2: (1+2+3+4+5)/5; t = 5: (4 + 5 + 6) / 5 (7 is in the window).
  const std::vector<float> want = {6.f / 5, 10.f / 5, 15.f / 5, 20.f / 5, 18.f / 5, 15.f / 5, 7, 8};
  for (int i = 0; i < 8; ++i) EXPECT_FLOAT_EQ(out[i], want[i]) << i;
  ASSERT_TRUE(cpu::PoolScores(in.data(), 1, 8, 8, 1, out.data()).ok());
  EXPECT_EQ(out, in);
  EXPECT_FALSE(cpu::PoolScores(in.data(), 1, 8, 8, 4, out.data()).ok());
  EXPECT_FALSE(cpu::PoolScores(in.data(), 1, 8, 9, 5, out.data()).ok());
  EXPECT_FALSE(cpu::PoolScores(in.data(), 1, 8, 8, 5, const_cast<float*>(in.data())).ok());
}

TEST(PyramidKVTest, PipelineUsesPyramidBudgets) {
  const int64_t layers = 4, tokens = 300;
  std::vector<std::vector<float>> scores(layers, std::vector<float>(tokens, 1.f));
  Precomputed p = MakePrecomputed(layers, 1, tokens, 4, scores);
  CompressOptions o = DefaultOptions(PolicyKind::kPyramidKV);
  o.window = 16;
  o.budget.rho = 0.25;
  const CompressResult r = RunPolicy(p.input, o);
  const std::vector<int64_t> want = *PyramidBudgets(layers, tokens, 0.25, 16, 20);
  for (int64_t l = 0; l < layers; ++l) {
    EXPECT_EQ(r.layers[l].budget, want[l]);
    EXPECT_DOUBLE_EQ(r.layers[l].alpha, static_cast<double>(want[l]) / tokens);
    // The window's 16 tokens are kept.
    const std::vector<int32_t>& pos = r.layers[l].positions;
    EXPECT_EQ(std::vector<int32_t>(pos.end() - 16, pos.end()), Range(284, 300));
  }
  EXPECT_EQ(r.tokens_kept, layers * 75);
}

TEST(PoliciesTest, EveryPolicyRunsOnEveryFormAndKeepsItsTotal) {
  const int64_t tokens = 128;
  const auto modality = test::MakeModality(test::VisualPattern::kMiddle, tokens);
  std::vector<HostTensor> keys, values, queries;
  CacheInput in;
  in.kv_heads = 2;
  in.q_heads = 4;
  in.head_dim = 8;
  in.tokens = tokens;
  in.dtype = DType::kFloat16;
  in.modality = modality;
  for (int l = 0; l < 3; ++l) {
    keys.push_back(test::RandomTensor(DType::kFloat16, Layout::kNHD, 2, tokens, 8, 40 + l));
    values.push_back(test::RandomTensor(DType::kFloat16, Layout::kNHD, 2, tokens, 8, 50 + l));
    queries.push_back(test::RandomTensor(DType::kFloat16, Layout::kNHD, 4, 16, 8, 60 + l));
  }
  in.layout = Layout::kNHD;
  for (int l = 0; l < 3; ++l) in.layers.push_back(LayerInput{keys[l].view(), values[l].view(), queries[l].view()});
  for (PolicyKind k : {PolicyKind::kFull, PolicyKind::kMeda, PolicyKind::kStreamingLlm, PolicyKind::kH2O,
                       PolicyKind::kSnapKV, PolicyKind::kPyramidKV, PolicyKind::kLookM}) {
    CompressOptions o = DefaultOptions(k);
    o.budget.rho = 0.25;
    const CompressResult r = RunPolicy(in, o);
    ASSERT_EQ(r.layers.size(), 3u) << PolicyName(k);
    EXPECT_EQ(r.tokens_kept, k == PolicyKind::kFull ? 3 * tokens : 3 * 32) << PolicyName(k);
    for (const LayerResult& l : r.layers) {
      for (int64_t h = 0; h < 2; ++h) {
        for (int64_t b = 1; b < l.budget; ++b) ASSERT_LT(l.positions[h * l.budget + b - 1], l.positions[h * l.budget + b]);
      }
    }
  }
}

}  // namespace
}  // namespace medakv
