// The synthetic cache generator (client/cli/synth.h, docs/synthetic.md): each
// structure of the model is checked on the generated CacheInput with the naive
// double-precision reference (tests/reference), then determinism, dtypes and
// layouts, the file round trip and option validation.
#include "client/cli/synth.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "client/cli/cache_file.h"
#include "client/io/safetensors.h"
#include "kernels/common/tensor_util.h"
#include "tests/reference/reference.h"

namespace medakv {
namespace {

// 8 layers, GQA 4:1, 512 tokens: text [0, 51) (sinks [0, 4)), one image
// [51, 358), text [358, 512); 32 query rows at the end. fp32 so that the
// reference reads the generator's values exactly.
SynthOptions StructureOptions() {
  SynthOptions o;
  o.layers = 8;
  o.kv_heads = 2;
  o.q_heads = 8;
  o.tokens = 512;
  o.head_dim = 64;
  o.q_tokens = 32;
  o.dtype = DType::kFloat32;
  o.seed = 7;
  return o;
}

double Scale(const CacheInput& in) { return 1.0 / std::sqrt(static_cast<double>(in.head_dim)); }

reference::RefStats Stats(const CacheInput& in, const LayerInput& layer) {
  return reference::RefAttentionStats(layer.query, layer.query_positions, layer.key, in.modality, Scale(in),
                                      EntropyHeads::kMeanAttention, EntropySource::kCrossModal, 0);
}

// One cache and its reference statistics, shared by the structure tests.
struct Analysed {
  SynthCache cache;
  std::vector<reference::RefStats> stats;  // [layers]
};

const Analysed& Structure() {
  static const Analysed* const analysed = [] {
    auto* a = new Analysed;
    absl::StatusOr<SynthCache> cache = MakeSynthCache(StructureOptions());
    EXPECT_TRUE(cache.ok()) << cache.status();
    if (!cache.ok()) return a;
    a->cache = *std::move(cache);
    for (const LayerInput& layer : a->cache.input.layers) a->stats.push_back(Stats(a->cache.input, layer));
    return a;
  }();
  return *analysed;
}

std::vector<int64_t> AllLayers(const SynthCache& c) {
  std::vector<int64_t> layers(c.layers.size());
  for (size_t l = 0; l < layers.size(); ++l) layers[l] = static_cast<int64_t>(l);
  return layers;
}

// The layers whose logit gain is at least 1 (the peaked ones).
std::vector<int64_t> PeakedLayers(const SynthCache& c) {
  std::vector<int64_t> layers;
  for (size_t l = 0; l < c.layers.size(); ++l) {
    if (c.layers[l].gain >= 1.0) layers.push_back(static_cast<int64_t>(l));
  }
  return layers;
}

// Mean accumulated attention per token over the tokens `pick` selects,
// summed over the given layers and all kv heads.
double MeanScore(const Analysed& a, const std::function<bool(int64_t)>& pick, const std::vector<int64_t>& layers) {
  const CacheInput& in = a.cache.input;
  double sum = 0.0;
  int64_t count = 0;
  for (int64_t j = 0; j < in.tokens; ++j) {
    if (!pick(j)) continue;
    ++count;
    for (int64_t l : layers) {
      for (int64_t h = 0; h < in.kv_heads; ++h) sum += a.stats[l].scores[h * in.tokens + j];
    }
  }
  EXPECT_GT(count, 0);
  return sum / static_cast<double>(std::max<int64_t>(count, 1));
}

bool IsRole(const SynthCache& c, int64_t j, TokenRole role) { return c.role[j] == static_cast<uint8_t>(role); }

// Cosine of rows a and b of a [rows, d] matrix.
double Cosine(const std::vector<double>& m, int64_t d, int64_t a, int64_t b) {
  double ab = 0.0, aa = 0.0, bb = 0.0;
  for (int64_t x = 0; x < d; ++x) {
    ab += m[a * d + x] * m[b * d + x];
    aa += m[a * d + x] * m[a * d + x];
    bb += m[b * d + x] * m[b * d + x];
  }
  return ab / std::sqrt(aa * bb);
}

// Mean cosine of pairs (i, j), i < j, both with cluster >= 0, split by whether
// they share the cluster; every `stride`-th token only, to stay fast.
std::pair<double, double> ClusterCosines(const SynthCache& c, const TensorView& view, int64_t stride) {
  const std::vector<double> m = reference::ReadHnd(view);  // [heads, tokens, head_dim]
  const int64_t t = view.tokens, d = view.head_dim;
  double same = 0.0, other = 0.0;
  int64_t n_same = 0, n_other = 0;
  for (int64_t h = 0; h < view.heads; ++h) {
    for (int64_t i = 0; i < t; i += stride) {
      for (int64_t j = i + 1; j < t && c.cluster[i] >= 0; j += stride) {
        if (c.cluster[j] < 0) continue;
        const double cos = Cosine(m, d, h * t + i, h * t + j);
        if (c.cluster[i] == c.cluster[j]) {
          same += cos, ++n_same;
        } else {
          other += cos, ++n_other;
        }
      }
    }
  }
  EXPECT_GT(n_same, 100);
  EXPECT_GT(n_other, 100);
  return {same / static_cast<double>(n_same), other / static_cast<double>(n_other)};
}

// ---- Structures.

TEST(SynthStructureTest, SinksTakeFarMoreAttentionPerTokenThanAverage) {
  const Analysed& a = Structure();
  auto sink = [&](int64_t j) { return IsRole(a.cache, j, TokenRole::kSink); };
  auto any = [](int64_t) { return true; };
  ASSERT_EQ(std::count_if(a.cache.role.begin(), a.cache.role.end(),
                          [](uint8_t r) { return r == static_cast<uint8_t>(TokenRole::kSink); }),
            4);
  EXPECT_GT(MeanScore(a, sink, AllLayers(a.cache)), 8.0 * MeanScore(a, any, AllLayers(a.cache)));
  const std::vector<int64_t> peaked = PeakedLayers(a.cache);
  ASSERT_GE(peaked.size(), 2u);
  EXPECT_GT(MeanScore(a, sink, peaked), 10.0 * MeanScore(a, any, peaked));
}

TEST(SynthStructureTest, HeavyHittersTakeMoreAttentionThanOtherText) {
  const Analysed& a = Structure();
  const int64_t t = a.cache.input.tokens, first_query = t - 32;
  auto heavy = [&](int64_t j) { return IsRole(a.cache, j, TokenRole::kHeavy); };
  const int64_t heavy_count = std::count_if(a.cache.role.begin(), a.cache.role.end(),
                                            [](uint8_t r) { return r == static_cast<uint8_t>(TokenRole::kHeavy); });
  EXPECT_EQ(heavy_count, 6);  // round(3% of the 201 text tokens that are not sinks)
  // Against the plain text tokens within 16 positions of a heavy hitter (the
  // same recency), all before the query rows.
  auto near_heavy = [&](int64_t j) {
    if (j >= first_query || !IsRole(a.cache, j, TokenRole::kText)) return false;
    for (int64_t k = std::max<int64_t>(0, j - 16); k <= std::min(t - 1, j + 16); ++k) {
      if (heavy(k)) return true;
    }
    return false;
  };
  auto early_heavy = [&](int64_t j) { return j < first_query && heavy(j); };
  const double h = MeanScore(a, early_heavy, AllLayers(a.cache));
  EXPECT_GT(h, 4.0 * MeanScore(a, near_heavy, AllLayers(a.cache)));
}

TEST(SynthStructureTest, RecentTextTakesMoreAttentionThanMidContextText) {
  const Analysed& a = Structure();
  const int64_t first_query = a.cache.input.tokens - 32;
  auto text = [&](int64_t j) { return IsRole(a.cache, j, TokenRole::kText); };
  // The 32 tokens just before the query rows; the text between the image's
  // end (358) and 100 tokens before the query rows; the text before the image.
  auto recent = [&](int64_t j) { return j >= first_query - 32 && j < first_query && text(j); };
  auto mid = [&](int64_t j) { return j >= 358 && j < first_query - 100 && text(j); };
  auto early = [&](int64_t j) { return j < 51 && text(j); };
  EXPECT_GT(MeanScore(a, recent, AllLayers(a.cache)), 1.3 * MeanScore(a, mid, AllLayers(a.cache)));
  EXPECT_GT(MeanScore(a, mid, AllLayers(a.cache)), MeanScore(a, early, AllLayers(a.cache)));
  const std::vector<int64_t> peaked = PeakedLayers(a.cache);
  EXPECT_GT(MeanScore(a, recent, peaked), 2.5 * MeanScore(a, mid, peaked));
}

TEST(SynthStructureTest, VisualKeysOfARegionAreNearDuplicates) {
  const Analysed& a = Structure();
  for (const LayerInput& layer : a.cache.input.layers) {
    const auto [same, other] = ClusterCosines(a.cache, layer.key, 4);
    EXPECT_GT(same, 0.8);
    EXPECT_LT(other, 0.3);
  }
}

TEST(SynthStructureTest, VisualValuesFollowTheKeysRegion) {
  const Analysed& a = Structure();
  for (const LayerInput& layer : a.cache.input.layers) {
    const auto [same, other] = ClusterCosines(a.cache, layer.value, 4);
    EXPECT_GT(same, 0.7);
    EXPECT_LT(other, 0.2);
  }
}

TEST(SynthStructureTest, TextQueriesReadTheQuestionRegionOfTheImage) {
  const Analysed& a = Structure();
  ASSERT_EQ(a.cache.target_clusters.size(), 1u);
  const int32_t target = a.cache.target_clusters[0];
  auto in_target = [&](int64_t j) { return a.cache.cluster[j] == target; };
  auto other = [&](int64_t j) { return a.cache.cluster[j] >= 0 && a.cache.cluster[j] != target; };
  EXPECT_GT(MeanScore(a, in_target, AllLayers(a.cache)), 2.0 * MeanScore(a, other, AllLayers(a.cache)));
  EXPECT_GT(MeanScore(a, in_target, PeakedLayers(a.cache)), 4.0 * MeanScore(a, other, PeakedLayers(a.cache)));
}

TEST(SynthStructureTest, VisualSinksDrawTheTextRowsVisualAttention) {
  const Analysed& a = Structure();
  auto visual_sink = [&](int64_t j) { return IsRole(a.cache, j, TokenRole::kVisualSink); };
  auto region = [&](int64_t j) { return a.cache.cluster[j] >= 0; };
  EXPECT_EQ(std::count_if(a.cache.role.begin(), a.cache.role.end(),
                          [](uint8_t r) { return r == static_cast<uint8_t>(TokenRole::kVisualSink); }),
            3);  // round(1% of 307)
  EXPECT_GT(MeanScore(a, visual_sink, PeakedLayers(a.cache)), 20.0 * MeanScore(a, region, PeakedLayers(a.cache)));
}

TEST(SynthStructureTest, LayerEntropiesRangeFromFlatToPeaked) {
  const Analysed& a = Structure();
  const int64_t layers = static_cast<int64_t>(a.stats.size());
  std::vector<double> e, g;
  for (int64_t l = 0; l < layers; ++l) {
    EXPECT_FALSE(a.stats[l].causal);
    e.push_back(a.stats[l].entropy);
    g.push_back(a.cache.layers[l].gain);
  }
  const double lo = *std::min_element(e.begin(), e.end()), hi = *std::max_element(e.begin(), e.end());
  EXPECT_GT(hi - lo, 1.0);
  // The flattest layer is close to uniform over the 307 visual keys.
  const int64_t flattest = std::min_element(g.begin(), g.end()) - g.begin();
  EXPECT_GT(e[flattest], std::log(307.0) - 0.3);
  // Entropy falls as the gain rises (Pearson correlation).
  double me = 0.0, mg = 0.0;
  for (int64_t l = 0; l < layers; ++l) me += e[l] / layers, mg += g[l] / layers;
  double cov = 0.0, ve = 0.0, vg = 0.0;
  for (int64_t l = 0; l < layers; ++l) {
    cov += (e[l] - me) * (g[l] - mg);
    ve += (e[l] - me) * (e[l] - me);
    vg += (g[l] - mg) * (g[l] - mg);
  }
  EXPECT_LT(cov / std::sqrt(ve * vg), -0.8);
  EXPECT_GE(*std::min_element(g.begin(), g.end()), 0.1);
  EXPECT_LE(*std::max_element(g.begin(), g.end()), 1.25);
}

TEST(SynthStructureTest, QueryHeadsShareTheirKvHeadsStructure) {
  // The query heads of a GQA group share their kv head's directions: their
  // rows point the same way, unlike rows of heads of another group.
  const Analysed& a = Structure();
  const CacheInput& in = a.cache.input;
  const int64_t d = in.head_dim, group = in.q_heads / in.kv_heads;
  for (int64_t l : PeakedLayers(a.cache)) {
    const LayerInput& layer = in.layers[l];
    const std::vector<double> q = reference::ReadHnd(layer.query);  // [q_heads, 32, d]
    double same = 0.0, other = 0.0;
    int64_t n_same = 0, n_other = 0;
    for (int64_t h1 = 0; h1 < in.q_heads; ++h1) {
      for (int64_t h2 = h1 + 1; h2 < in.q_heads; ++h2) {
        for (int64_t i = 0; i < 32; ++i) {
          const double c = Cosine(q, d, h1 * 32 + i, h2 * 32 + i);
          if (h1 / group == h2 / group) {
            same += c, ++n_same;
          } else {
            other += c, ++n_other;
          }
        }
      }
    }
    EXPECT_GT(same / n_same, 0.5) << "layer " << l;
    EXPECT_GT(same / n_same, other / n_other + 0.3) << "layer " << l;
  }
}

TEST(SynthStructureTest, LogitsStayInARealisticRange) {
  const Analysed& a = Structure();
  const CacheInput& in = a.cache.input;
  const int64_t d = in.head_dim, t = in.tokens, group = in.q_heads / in.kv_heads;
  std::vector<double> max_logit;
  for (const LayerInput& layer : in.layers) {
    const std::vector<double> q = reference::ReadHnd(layer.query), k = reference::ReadHnd(layer.key);
    double m = 0.0;
    for (int64_t h = 0; h < in.q_heads; ++h) {
      for (int64_t i = 0; i < 32; ++i) {
        for (int64_t j = 0; j <= layer.query_positions[i]; ++j) {
          double dot = 0.0;
          for (int64_t x = 0; x < d; ++x) dot += q[(h * 32 + i) * d + x] * k[((h / group) * t + j) * d + x];
          m = std::max(m, std::abs(dot) * Scale(in));
        }
      }
    }
    max_logit.push_back(m);
    for (double x : q) EXPECT_LT(std::abs(x), 64.0);
    for (double x : k) EXPECT_LT(std::abs(x), 64.0);
  }
  for (int64_t l = 0; l < static_cast<int64_t>(max_logit.size()); ++l) {
    EXPECT_LT(max_logit[l], 16.0) << "layer " << l;
    if (a.cache.layers[l].gain >= 1.2) {
      EXPECT_GT(max_logit[l], 8.0) << "layer " << l;
    }
    if (a.cache.layers[l].gain <= 0.2) {
      EXPECT_LT(max_logit[l], 4.0) << "layer " << l;
    }
  }
}

TEST(SynthStructureTest, VisualQueryRowsReadTheirOwnRegion) {
  // A prompt that ends inside an image: the query rows are visual.
  SynthOptions o = StructureOptions();
  o.layers = 4;
  o.tokens = 256;
  o.q_tokens = 16;
  o.visual = {{128, 128, Modality::kVisual}};
  absl::StatusOr<SynthCache> c = MakeSynthCache(o);
  ASSERT_TRUE(c.ok()) << c.status();
  const CacheInput& in = c->input;
  const int64_t d = in.head_dim, t = in.tokens, group = in.q_heads / in.kv_heads;
  double same = 0.0, other = 0.0;
  int64_t n_same = 0, n_other = 0;
  for (int64_t l : PeakedLayers(*c)) {
    const std::vector<double> q = reference::ReadHnd(in.layers[l].query), k = reference::ReadHnd(in.layers[l].key);
    const reference::RefStats s = Stats(in, in.layers[l]);
    EXPECT_FALSE(s.causal);
    EXPECT_GT(s.entropy_vt, 0.0);
    EXPECT_EQ(s.entropy_tv, 0.0);
    for (int64_t h = 0; h < in.q_heads; ++h) {
      for (int64_t i = 0; i < 16; ++i) {
        const int64_t pos = t - 16 + i;
        const int32_t own = c->cluster[pos];
        if (own < 0) continue;  // a visual sink
        // Logits to the visual keys more than 16 tokens away (no recency).
        for (int64_t j = 128; j < pos - 16; ++j) {
          double dot = 0.0;
          for (int64_t x = 0; x < d; ++x) dot += q[(h * 16 + i) * d + x] * k[((h / group) * t + j) * d + x];
          (c->cluster[j] == own ? same : other) += dot * Scale(in);
          ++(c->cluster[j] == own ? n_same : n_other);
        }
      }
    }
  }
  ASSERT_GT(n_same, 0);
  ASSERT_GT(n_other, 0);
  EXPECT_GT(same / n_same, other / n_other + 2.0);
}

TEST(SynthStructureTest, TextOnlyLayersStillDiffer) {
  SynthOptions o = StructureOptions();
  o.text_only = true;
  absl::StatusOr<SynthCache> c = MakeSynthCache(o);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(c->target_clusters.empty());
  for (int64_t j = 0; j < o.tokens; ++j) {
    EXPECT_EQ(c->input.modality[j], 0);
    EXPECT_EQ(c->cluster[j], -1);
    EXPECT_NE(c->role[j], static_cast<uint8_t>(TokenRole::kVisual));
  }
  double lo = INFINITY, hi = -INFINITY;
  for (const LayerInput& layer : c->input.layers) {
    const reference::RefStats s = Stats(c->input, layer);
    EXPECT_TRUE(s.causal);
    lo = std::min(lo, s.entropy);
    hi = std::max(hi, s.entropy);
  }
  EXPECT_GT(hi - lo, 1.0);
}

// ---- Shapes, spans and positions.

TEST(SynthTest, DefaultsPutOneImageAt10To70PercentAndQueriesAtTheEnd) {
  SynthOptions o;
  o.layers = 2;
  o.tokens = 200;
  o.q_tokens = 20;
  o.held_out = 5;
  absl::StatusOr<SynthCache> c = MakeSynthCache(o);
  ASSERT_TRUE(c.ok()) << c.status();
  const CacheInput& in = c->input;
  EXPECT_EQ(in.stats, StatsForm::kQueries);
  EXPECT_EQ(in.dtype, DType::kFloat16);
  EXPECT_EQ(in.layout, Layout::kHND);
  ASSERT_EQ(in.layers.size(), 2u);
  for (int64_t j = 0; j < 200; ++j) {
    EXPECT_EQ(in.modality[j], (j >= 20 && j < 140) ? 1 : 0) << j;
    EXPECT_EQ(c->image[j], (j >= 20 && j < 140) ? 0 : -1) << j;
  }
  for (int64_t i = 0; i < 20; ++i) EXPECT_EQ(c->query_positions[i], 180 + i);
  for (int64_t i = 0; i < 5; ++i) EXPECT_EQ(c->held_out_positions[i], 200 + i);
  for (const LayerInput& layer : in.layers) {
    EXPECT_EQ(layer.query_positions, c->query_positions);
    EXPECT_EQ(layer.query.heads, 8);
    EXPECT_EQ(layer.query.tokens, 20);
    EXPECT_EQ(layer.key.tokens, 200);
  }
  EXPECT_EQ(c->HeldOutQuery(1).tokens, 5);
  EXPECT_TRUE(ValidateCacheInput(in).ok());
}

TEST(SynthTest, EveryImageGetsItsOwnRegionsAndOneTarget) {
  SynthOptions o = StructureOptions();
  o.layers = 1;
  o.tokens = 300;
  o.visual = {{150, 100, Modality::kVisual}, {10, 100, Modality::kVisual}};  // any order
  o.image_clusters = 5;
  absl::StatusOr<SynthCache> c = MakeSynthCache(o);
  ASSERT_TRUE(c.ok()) << c.status();
  for (int64_t j = 0; j < 300; ++j) {
    const int32_t want_image = (j >= 10 && j < 110) ? 0 : (j >= 150 && j < 250) ? 1 : -1;
    EXPECT_EQ(c->image[j], want_image) << j;
    if (want_image < 0 || IsRole(*c, j, TokenRole::kVisualSink)) {
      EXPECT_EQ(c->cluster[j], -1);
    } else {
      EXPECT_GE(c->cluster[j], 5 * want_image);
      EXPECT_LT(c->cluster[j], 5 * want_image + 5);
    }
  }
  // One visual sink per image: max(1, round(1% of 100)).
  EXPECT_EQ(std::count(c->role.begin(), c->role.begin() + 110, static_cast<uint8_t>(TokenRole::kVisualSink)), 1);
  EXPECT_EQ(std::count(c->role.begin() + 110, c->role.end(), static_cast<uint8_t>(TokenRole::kVisualSink)), 1);
  ASSERT_EQ(c->target_clusters.size(), 2u);
  std::vector<int32_t> targets = c->target_clusters;
  std::sort(targets.begin(), targets.end());
  EXPECT_LT(targets[0], 5);
  EXPECT_GE(targets[1], 5);
}

TEST(SynthTest, TinyShapesWork) {
  for (int64_t d : {1, 2, 3, 4, 8}) {
    for (int64_t t : {1, 3, 9}) {
      SynthOptions o;
      o.layers = 2;
      o.head_dim = d;
      o.tokens = t;
      o.q_tokens = t;
      o.held_out = 2;
      o.dtype = DType::kFloat32;
      o.visual = {{t - 1, 1, Modality::kVisual}};
      absl::StatusOr<SynthCache> c = MakeSynthCache(o);
      ASSERT_TRUE(c.ok()) << c.status();
      for (const SynthLayer& layer : c->layers) {
        for (const auto* buf : {&layer.key, &layer.value, &layer.query, &layer.held_out_query}) {
          const auto* f = reinterpret_cast<const float*>(buf->data());
          for (size_t i = 0; i < buf->size() / 4; ++i) ASSERT_TRUE(std::isfinite(f[i])) << d << " " << t;
        }
      }
    }
  }
}

// ---- Determinism, dtypes and layouts, the file.

bool SameBytes(const SynthCache& a, const SynthCache& b) {
  if (a.layers.size() != b.layers.size()) return false;
  for (size_t l = 0; l < a.layers.size(); ++l) {
    const SynthLayer &x = a.layers[l], &y = b.layers[l];
    if (x.key != y.key || x.value != y.value || x.query != y.query || x.scores != y.scores) return false;
  }
  return true;
}

TEST(SynthTest, SameSeedSameBytesOtherSeedOtherBytes) {
  SynthOptions o = StructureOptions();
  o.layers = 3;
  o.tokens = 128;
  o.dtype = DType::kFloat16;
  absl::StatusOr<SynthCache> a = MakeSynthCache(o), b = MakeSynthCache(o);
  o.seed = 8;
  absl::StatusOr<SynthCache> c = MakeSynthCache(o);
  ASSERT_TRUE(a.ok() && b.ok() && c.ok());
  EXPECT_TRUE(SameBytes(*a, *b));
  EXPECT_EQ(a->role, b->role);
  EXPECT_EQ(a->cluster, b->cluster);
  for (size_t l = 0; l < a->layers.size(); ++l) {
    EXPECT_NE(a->layers[l].key, c->layers[l].key);
    EXPECT_NE(a->layers[l].value, c->layers[l].value);
    EXPECT_NE(a->layers[l].query, c->layers[l].query);
  }
  // Layers come from their own streams: no two layers are alike.
  EXPECT_NE(a->layers[0].key, a->layers[1].key);
}

TEST(SynthTest, HeldOutRowsChangeNothingElse) {
  SynthOptions o = StructureOptions();
  o.layers = 2;
  o.tokens = 128;
  absl::StatusOr<SynthCache> a = MakeSynthCache(o);
  o.held_out = 8;
  absl::StatusOr<SynthCache> b = MakeSynthCache(o);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_TRUE(SameBytes(*a, *b));
  for (const SynthLayer& layer : a->layers) EXPECT_TRUE(layer.held_out_query.empty());
  for (const SynthLayer& layer : b->layers) EXPECT_EQ(layer.held_out_query.size(), 8u * 8 * 64 * 4);
  // Held-out rows are text rows of the same heads: they attend to the sinks
  // like the observed text rows do.
  const CacheInput& in = b->input;
  const int64_t l = std::max_element(b->layers.begin(), b->layers.end(),
                                     [](const SynthLayer& x, const SynthLayer& y) { return x.gain < y.gain; }) -
                    b->layers.begin();
  // They come after the prompt and see every key: position T - 1 for the reference.
  const std::vector<int32_t> sees_all(b->held_out_positions.size(), static_cast<int32_t>(in.tokens - 1));
  const reference::RefStats s =
      reference::RefAttentionStats(b->HeldOutQuery(l), sees_all, in.layers[l].key, in.modality, Scale(in),
                                   EntropyHeads::kMeanAttention, EntropySource::kCrossModal, 0);
  double sink = 0.0, total = 0.0;
  for (int64_t h = 0; h < in.kv_heads; ++h) {
    for (int64_t j = 0; j < in.tokens; ++j) (j < 4 ? sink : total) += s.scores[h * in.tokens + j];
  }
  EXPECT_GT(sink / 4.0, 10.0 * (total / static_cast<double>(in.tokens - 4)));
}

// Checks that `got` holds the values of `want` (fp32, HND) rounded to its dtype.
void ExpectRounded(const TensorView& want, const TensorView& got, const std::string& what) {
  ASSERT_EQ(want.heads, got.heads);
  ASSERT_EQ(want.tokens, got.tokens);
  ASSERT_EQ(want.head_dim, got.head_dim);
  const double rel = got.dtype == DType::kFloat16 ? 0x1.0p-11 : got.dtype == DType::kBFloat16 ? 0x1.0p-8 : 0.0;
  const double abs = got.dtype == DType::kFloat16 ? 0x1.0p-25 : 0.0;
  int64_t bad = 0;
  for (int64_t h = 0; h < want.heads; ++h) {
    for (int64_t t = 0; t < want.tokens; ++t) {
      for (int64_t x = 0; x < want.head_dim; ++x) {
        const double w = reference::ReadElement(want, h, t, x), g = reference::ReadElement(got, h, t, x);
        if (std::abs(w - g) > rel * std::abs(w) + abs && bad++ < 5) {
          ADD_FAILURE() << what << " (" << h << ", " << t << ", " << x << "): " << g << " vs fp32 " << w;
        }
      }
    }
  }
}

TEST(SynthTest, EveryDtypeAndLayoutHoldsTheSameValues) {
  SynthOptions o = StructureOptions();
  o.layers = 2;
  o.tokens = 96;
  o.head_dim = 32;
  o.q_tokens = 8;
  o.held_out = 3;
  absl::StatusOr<SynthCache> ref = MakeSynthCache(o);
  ASSERT_TRUE(ref.ok()) << ref.status();
  for (DType dtype : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
    for (Layout layout : {Layout::kHND, Layout::kNHD}) {
      o.dtype = dtype;
      o.layout = layout;
      absl::StatusOr<SynthCache> c = MakeSynthCache(o);
      ASSERT_TRUE(c.ok()) << c.status();
      const std::string name = absl::StrCat(DTypeName(dtype), " ", LayoutName(layout));
      EXPECT_EQ(c->input.dtype, dtype);
      EXPECT_EQ(c->input.layout, layout);
      for (int64_t l = 0; l < o.layers; ++l) {
        const LayerInput &want = ref->input.layers[l], &got = c->input.layers[l];
        EXPECT_EQ(got.key.layout, layout);
        EXPECT_EQ(got.key.NumBytes(), static_cast<int64_t>(c->layers[l].key.size()));
        ExpectRounded(want.key, got.key, name + " key");
        ExpectRounded(want.value, got.value, name + " value");
        ExpectRounded(want.query, got.query, name + " query");
        ExpectRounded(ref->HeldOutQuery(l), c->HeldOutQuery(l), name + " held-out query");
      }
    }
  }
}

TEST(SynthTest, PrecomputedStatisticsMatchTheReference) {
  SynthOptions o = StructureOptions();
  o.layers = 3;
  o.tokens = 128;
  o.q_tokens = 16;
  o.dtype = DType::kFloat16;
  o.layout = Layout::kNHD;
  absl::StatusOr<SynthCache> queries = MakeSynthCache(o);
  o.precomputed = true;
  absl::StatusOr<SynthCache> pre = MakeSynthCache(o);
  ASSERT_TRUE(queries.ok() && pre.ok());
  const CacheInput& in = pre->input;
  EXPECT_EQ(in.stats, StatsForm::kPrecomputed);
  EXPECT_TRUE(ValidateCacheInput(in).ok());
  for (int64_t l = 0; l < o.layers; ++l) {
    EXPECT_EQ(pre->layers[l].key, queries->layers[l].key);
    EXPECT_EQ(pre->layers[l].query, queries->layers[l].query);
    const LayerInput& layer = in.layers[l];
    ASSERT_EQ(layer.score_heads, o.kv_heads);
    const reference::RefStats s = Stats(queries->input, queries->input.layers[l]);
    EXPECT_NEAR(layer.entropy, s.entropy, 1e-3);
    for (int64_t i = 0; i < o.kv_heads * o.tokens; ++i) {
      EXPECT_NEAR(layer.scores[i], s.scores[i], 1e-3 + 1e-4 * s.scores[i]);
    }
  }
}

TEST(SynthTest, FileHoldsTheInMemoryCache) {
  for (bool precomputed : {false, true}) {
    SynthOptions o = StructureOptions();
    o.layers = 2;
    o.tokens = 64;
    o.q_tokens = 8;
    o.dtype = DType::kBFloat16;
    o.layout = Layout::kNHD;
    o.precomputed = precomputed;
    const std::string path = ::testing::TempDir() + "/medakv_synth_test_" + (precomputed ? "pre" : "q");
    ASSERT_TRUE(WriteSynthCache(o, path).ok());
    absl::StatusOr<SynthCache> mem = MakeSynthCache(o);
    ASSERT_TRUE(mem.ok());
    absl::StatusOr<safetensors::File> file = safetensors::File::Open(path);
    ASSERT_TRUE(file.ok()) << file.status();
    EXPECT_EQ(file->metadata().at("generator"), "medakv synth v2 seed=7");
    absl::StatusOr<std::unique_ptr<LoadedCache>> loaded = LoadCache(*std::move(file), Layout::kNHD);
    ASSERT_TRUE(loaded.ok()) << loaded.status();
    const CacheInput &got = (*loaded)->input, &want = mem->input;
    EXPECT_EQ(got.stats, want.stats);
    EXPECT_EQ(got.modality, want.modality);
    for (int64_t l = 0; l < o.layers; ++l) {
      const LayerInput &g = got.layers[l], &w = want.layers[l];
      EXPECT_EQ(std::memcmp(g.key.data, w.key.data, w.key.NumBytes()), 0);
      EXPECT_EQ(std::memcmp(g.value.data, w.value.data, w.value.NumBytes()), 0);
      if (precomputed) {
        EXPECT_EQ(g.entropy, w.entropy);
        EXPECT_EQ(std::memcmp(g.scores, w.scores, o.kv_heads * o.tokens * sizeof(float)), 0);
      } else {
        EXPECT_EQ(std::memcmp(g.query.data, w.query.data, w.query.NumBytes()), 0);
        EXPECT_EQ(g.query_positions, w.query_positions);
      }
    }
    std::filesystem::remove(path);
  }
}

TEST(SynthTest, RejectsInvalidOptionsNamingTheFlag) {
  const std::vector<std::pair<std::function<void(SynthOptions&)>, std::string>> cases = {
      {[](SynthOptions& o) { o.layers = 0; }, "--layers"},
      {[](SynthOptions& o) { o.kv_heads = -1; }, "--kv-heads"},
      {[](SynthOptions& o) { o.q_heads = 3; }, "--q-heads (3) must be a multiple of --kv-heads (2)"},
      {[](SynthOptions& o) { o.tokens = 0; }, "--tokens"},
      {[](SynthOptions& o) { o.head_dim = 0; }, "--head-dim"},
      {[](SynthOptions& o) { o.q_tokens = 2000; }, "--q-tokens (2000) exceeds --tokens (1024)"},
      {[](SynthOptions& o) { o.dtype = static_cast<DType>(9); }, "--dtype"},
      {[](SynthOptions& o) { o.layout = static_cast<Layout>(9); }, "--layout"},
      {[](SynthOptions& o) { o.visual = {{1000, 100, Modality::kVisual}}; }, "--visual 1000:100"},
      {[](SynthOptions& o) { o.visual = {{-1, 10, Modality::kVisual}}; }, "--visual -1:10"},
      {[](SynthOptions& o) { o.visual = {{5, 0, Modality::kVisual}}; }, "--visual 5:0"},
      {[](SynthOptions& o) { o.visual = {{5, 10, Modality::kText}}; }, "--visual"},
      {[](SynthOptions& o) { o.visual = {{50, 10, Modality::kVisual}, {0, 51, Modality::kVisual}}; },
       "--visual 0:51 and 50:10 overlap"},
      {[](SynthOptions& o) {
         o.text_only = true;
         o.visual = {{0, 10, Modality::kVisual}};
       },
       "--text-only conflicts with --visual"},
      {[](SynthOptions& o) { o.sinks = -1; }, "--sinks"},
      {[](SynthOptions& o) { o.heavy_fraction = 1.5; }, "--heavy-fraction"},
      {[](SynthOptions& o) { o.heavy_fraction = NAN; }, "--heavy-fraction"},
      {[](SynthOptions& o) { o.image_clusters = 0; }, "--image-clusters"},
      {[](SynthOptions& o) { o.visual_head_fraction = -0.1; }, "--visual-head-fraction"},
      {[](SynthOptions& o) { o.sharpness_min = -1; }, "--sharpness-min"},
      {[](SynthOptions& o) { o.sharpness_max = 0.05; }, "--sharpness-max"},
      {[](SynthOptions& o) { o.sharpness_max = 11; }, "--sharpness-max"},
      {[](SynthOptions& o) { o.held_out = -2; }, "--held-out"},
      {[](SynthOptions& o) {
         o.tokens = int64_t{1} << 24;
         o.head_dim = int64_t{1} << 20;
         o.q_tokens = 1;
       },
       "GiB"},
  };
  const std::string path = ::testing::TempDir() + "/medakv_synth_test_bad";
  for (const auto& [mutate, fragment] : cases) {
    SynthOptions o;
    mutate(o);
    const absl::Status s = WriteSynthCache(o, path);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << fragment;
    EXPECT_NE(std::string(s.message()).find(fragment), std::string::npos) << s.message() << " lacks " << fragment;
    EXPECT_EQ(MakeSynthCache(o).status(), s);
    EXPECT_FALSE(std::filesystem::exists(path)) << fragment;
  }
  // Sinks beyond the cache are capped, not rejected (tiny caches keep working).
  SynthOptions o;
  o.tokens = 2;
  o.q_tokens = 2;
  o.sinks = 4;
  EXPECT_TRUE(MakeSynthCache(o).ok());
}

}  // namespace
}  // namespace medakv
