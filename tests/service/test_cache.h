// Random caches for the pipeline, server, shared-memory and evaluation tests:
// per layer random keys (spread growing with the layer, so entropies and MEDA
// budgets differ), values, queries, and precomputed scores and entropies.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "service/compress/pipeline.h"
#include "tests/kernels/test_util.h"

namespace medakv::test {

struct CacheParams {
  DType dtype = DType::kFloat16;
  Layout layout = Layout::kHND;
  int64_t layers = 2;
  int64_t kv_heads = 2;
  int64_t group = 2;  // q_heads = group * kv_heads
  int64_t tokens = 64;
  int64_t head_dim = 16;
  int64_t q_tokens = 8;
  VisualPattern pattern = VisualPattern::kMiddle;
  bool precomputed = false;   // scores (uniform in [0, 1)) and entropy 1 + l/2 instead of queries
  double spread_step = 0.4;   // keys of layer l have standard deviation 0.5 + spread_step * l
  uint64_t seed = 1;
};

// Owns the tensors that `input`'s views point into (moving it keeps them valid).
struct TestCache {
  std::vector<HostTensor> keys, values, queries;
  std::vector<std::vector<float>> scores;
  CacheInput input;
};

inline TestCache MakeTestCache(const CacheParams& p) {
  TestCache c;
  CacheInput& in = c.input;
  in.kv_heads = p.kv_heads;
  in.q_heads = p.kv_heads * p.group;
  in.head_dim = p.head_dim;
  in.tokens = p.tokens;
  in.dtype = p.dtype;
  in.layout = p.layout;
  in.modality = MakeModality(p.pattern, p.tokens);
  in.stats = p.precomputed ? StatsForm::kPrecomputed : StatsForm::kQueries;
  Rng rng(p.seed);
  for (int64_t l = 0; l < p.layers; ++l) {
    const uint64_t s = p.seed + 3 * static_cast<uint64_t>(l);
    const double spread = 0.5 + p.spread_step * static_cast<double>(l);
    c.keys.push_back(RandomTensor(p.dtype, p.layout, p.kv_heads, p.tokens, p.head_dim, s, spread));
    c.values.push_back(RandomTensor(p.dtype, p.layout, p.kv_heads, p.tokens, p.head_dim, s + 1));
    c.queries.push_back(RandomTensor(p.dtype, p.layout, in.q_heads, p.q_tokens, p.head_dim, s + 2));
    std::vector<float> scores(p.kv_heads * p.tokens);
    for (float& x : scores) x = static_cast<float>(rng.Uniform());
    c.scores.push_back(std::move(scores));
  }
  for (int64_t l = 0; l < p.layers; ++l) {
    LayerInput layer;
    layer.key = c.keys[l].view();
    layer.value = c.values[l].view();
    if (p.precomputed) {
      layer.scores = c.scores[l].data();
      layer.score_heads = p.kv_heads;
      layer.entropy = 1.f + 0.5f * static_cast<float>(l);
    } else {
      layer.query = c.queries[l].view();
    }
    in.layers.push_back(layer);
  }
  return c;
}

// Two compression results are the same bit for bit.
inline void ExpectSameResult(const CompressResult& got, const CompressResult& want) {
  ASSERT_EQ(got.layers.size(), want.layers.size());
  EXPECT_EQ(got.tokens_in, want.tokens_in);
  EXPECT_EQ(got.tokens_kept, want.tokens_kept);
  for (size_t l = 0; l < want.layers.size(); ++l) {
    EXPECT_EQ(got.layers[l].budget, want.layers[l].budget) << "layer " << l;
    EXPECT_EQ(got.layers[l].entropy, want.layers[l].entropy) << "layer " << l;
    EXPECT_EQ(got.layers[l].alpha, want.layers[l].alpha) << "layer " << l;
    EXPECT_EQ(got.layers[l].positions, want.layers[l].positions) << "layer " << l;
    EXPECT_TRUE(got.layers[l].key == want.layers[l].key) << "layer " << l << " keys differ";
    EXPECT_TRUE(got.layers[l].value == want.layers[l].value) << "layer " << l << " values differ";
  }
}

}  // namespace medakv::test
