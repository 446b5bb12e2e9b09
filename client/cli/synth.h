// `medakv synth`: a synthetic multimodal KV cache with the structure that
// makes compression policies differ (docs/synthetic.md has the model, its
// formulas and constants):
//   - attention sinks: the first `sinks` tokens, which every query attends to,
//     and a few visual sinks inside each image;
//   - a recency bias: every key has a component along a direction the
//     queries share, growing (logarithmically) towards the end of the prompt;
//   - images (the `visual` spans) whose keys are near duplicates around a few
//     centres per image, with values correlated with the keys' centre;
//   - heavy-hitter text tokens that the queries align with;
//   - visual query heads that read one region of each image (cross-modal);
//   - layers whose logit gain varies from nearly uniform to very peaked, and
//     kv heads that differ inside a layer;
//   - GQA: the query heads of a group share their kv head's directions.
// Everything is seeded: the same options give the same bytes, whatever the
// thread count (one random stream per layer).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/common/tensor.h"
#include "service/compress/pipeline.h"

namespace medakv {

struct SynthOptions {
  int64_t layers = 4;
  int64_t kv_heads = 2;
  int64_t q_heads = 8;
  int64_t tokens = 1024;
  int64_t head_dim = 64;
  int64_t q_tokens = 64;  // query rows: the last q_tokens positions
  DType dtype = DType::kFloat16;
  Layout layout = Layout::kHND;
  std::vector<ModalitySpan> visual;  // one image per span; empty: one image over tokens [10%, 70%)
  bool text_only = false;
  bool precomputed = false;  // scores and entropy (computed here) instead of queries
  uint64_t seed = 0;

  // Structure (docs/synthetic.md); flag names in the error messages.
  int64_t sinks = 4;                   // --sinks: attention-sink tokens at positions [0, sinks)
  double heavy_fraction = 0.03;        // --heavy-fraction: share of the other text tokens that are heavy hitters
  int64_t image_clusters = 8;          // --image-clusters: key/value centres per image (at most its length)
  double visual_sink_fraction = 0.01;  // --visual-sink-fraction: share of an image's tokens that are visual sinks
  double visual_head_fraction = 0.5;   // --visual-head-fraction: share of a layer's query heads that read images
  double sharpness_min = 0.1;          // --sharpness-min: logit gain of the flattest layer
  double sharpness_max = 1.25;         // --sharpness-max: logit gain of the most peaked layer
  int64_t held_out = 0;  // --held-out: query rows after the prompt, for evaluation (in memory, never in the file)
};

enum class TokenRole : uint8_t {
  kText = 0,
  kSink = 1,        // the first `sinks` tokens, whatever their modality
  kHeavy = 2,       // heavy-hitter text token
  kVisual = 3,      // visual token of a region (cluster)
  kVisualSink = 4,  // visual token that every query attends to, carrying little (no region)
};

struct SynthLayer {
  std::vector<uint8_t> key;    // [kv_heads, tokens, head_dim], options' dtype and layout
  std::vector<uint8_t> value;  // [kv_heads, tokens, head_dim]
  // [q_heads, q_tokens, head_dim] at query_positions; generated in both forms
  // (with `precomputed` the statistics come from these rows).
  std::vector<uint8_t> query;
  std::vector<uint8_t> held_out_query;  // [q_heads, held_out, head_dim] at held_out_positions
  std::vector<float> scores;            // [kv_heads, tokens], only with `precomputed`
  float entropy = 0.f;                  // E_l, only with `precomputed`
  double gain = 0.0;                    // the layer's logit gain (sharpness), in [sharpness_min, sharpness_max]
};

// A generated cache: owned buffers and a CacheInput whose views point into
// them. Move-only: moving keeps the views valid (vector buffers move).
struct SynthCache {
  SynthCache() = default;
  SynthCache(SynthCache&&) = default;
  SynthCache& operator=(SynthCache&&) = default;
  SynthCache(const SynthCache&) = delete;
  SynthCache& operator=(const SynthCache&) = delete;

  std::vector<SynthLayer> layers;
  std::vector<int32_t> query_positions;     // [q_tokens]: tokens - q_tokens, ..., tokens - 1
  std::vector<int32_t> held_out_positions;  // [held_out]: tokens, ..., tokens + held_out - 1 (text rows)
  // Ground truth, for tests and evaluation.
  std::vector<uint8_t> role;             // [tokens] TokenRole
  std::vector<int32_t> image;            // [tokens] index of the token's visual span (by start), -1 for text
  std::vector<int32_t> cluster;          // [tokens] global visual cluster id, -1 for text and (visual) sinks
  std::vector<int32_t> target_clusters;  // clusters that visual query heads read (one per image, at most 4)
  CacheInput input;                      // views into `layers`; queries or precomputed statistics

  // Views of a layer's query rows and held-out rows (options' dtype and layout).
  TensorView Query(int64_t layer) const;
  TensorView HeldOutQuery(int64_t layer) const;
};

// Checks the options; InvalidArgument naming the flag (e.g. "--q-heads").
[[nodiscard]] absl::Status ValidateSynthOptions(const SynthOptions& options);

// Builds the cache in memory.
[[nodiscard]] absl::StatusOr<SynthCache> MakeSynthCache(const SynthOptions& options);

// Builds the cache and writes it in the medakv cache file format (README).
[[nodiscard]] absl::Status WriteSynthCache(const SynthOptions& options, const std::string& path);

}  // namespace medakv
