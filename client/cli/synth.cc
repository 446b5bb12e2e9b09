#include "client/cli/synth.h"

#include <cmath>
#include <random>

#include "absl/strings/str_cat.h"
#include "client/io/safetensors.h"
#include "kernels/common/status.h"
#include "kernels/common/tensor_util.h"
#include "kernels/cpu/ops.h"
#include "kernels/cpu/parallel.h"

namespace medakv {
namespace {

constexpr int kVisualClusters = 16;

struct LayerData {
  std::vector<uint8_t> key, value, query;
  std::vector<float> scores;
  float entropy = 0.f;
};

// Fills one layer; deterministic in (seed, layer) whatever the thread count.
void MakeLayer(const SynthOptions& o, const std::vector<uint8_t>& modality, int64_t l, LayerData* out) {
  std::mt19937_64 rng(o.seed * 1000003 + static_cast<uint64_t>(l));
  std::normal_distribution<float> normal(0.f, 1.f);
  std::uniform_real_distribution<float> uniform(0.f, 1.f);
  const int64_t d = o.head_dim, t = o.tokens, kvh = o.kv_heads, group = o.q_heads / o.kv_heads;
  const int64_t kv_elems = kvh * t * d;
  std::vector<float> key(kv_elems), value(kv_elems), query(o.q_heads * o.q_tokens * d);
  std::vector<float> dir(kvh * d), centres(kvh * kVisualClusters * d);
  for (float& x : dir) x = normal(rng) / std::sqrt(static_cast<float>(d)) * 4.f;
  for (float& x : centres) x = normal(rng);
  // Keys and values, HND [kv_heads, tokens, d] in fp32 first.
  for (int64_t h = 0; h < kvh; ++h) {
    for (int64_t j = 0; j < t; ++j) {
      float* k = key.data() + (h * t + j) * d;
      float* v = value.data() + (h * t + j) * d;
      const bool visual = modality[j] != 0;
      const float heavy = uniform(rng) < 0.05f ? 2.5f : 0.f;
      const float* c = centres.data() + (h * kVisualClusters + (j * 7) % kVisualClusters) * d;
      for (int64_t x = 0; x < d; ++x) {
        const float noise = normal(rng);
        k[x] = (visual ? c[x] + 0.35f * noise : noise) + heavy * dir[h * d + x];
        v[x] = normal(rng);
      }
    }
  }
  for (int64_t h = 0; h < o.q_heads; ++h) {
    const float* u = dir.data() + (h / group) * d;
    for (int64_t i = 0; i < o.q_tokens; ++i) {
      float* q = query.data() + (h * o.q_tokens + i) * d;
      for (int64_t x = 0; x < d; ++x) q[x] = normal(rng) + u[x];
    }
  }
  // Store in the requested dtype and layout.
  auto store = [&](const std::vector<float>& src, int64_t heads, int64_t tokens, std::vector<uint8_t>* dst) {
    dst->resize(static_cast<size_t>(heads * tokens * d) * DTypeSize(o.dtype));
    const MutableTensorView view{dst->data(), o.dtype, o.layout, heads, tokens, d};
    for (int64_t h = 0; h < heads; ++h) {
      for (int64_t j = 0; j < tokens; ++j) RowFromFloat(o.dtype, src.data() + (h * tokens + j) * d, view.Row(h, j), d);
    }
  };
  store(key, kvh, t, &out->key);
  store(value, kvh, t, &out->value);
  store(query, o.q_heads, o.q_tokens, &out->query);
}

absl::Status Validate(const SynthOptions& o) {
  const std::pair<const char*, int64_t> dims[] = {{"layers", o.layers},     {"kv-heads", o.kv_heads},
                                                  {"q-heads", o.q_heads},   {"tokens", o.tokens},
                                                  {"head-dim", o.head_dim}, {"q-tokens", o.q_tokens}};
  for (const auto& [name, v] : dims) {
    if (v <= 0) return absl::InvalidArgumentError(absl::StrCat("--", name, " must be > 0, got ", v));
  }
  if (o.q_heads % o.kv_heads != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--q-heads (", o.q_heads, ") must be a multiple of --kv-heads (", o.kv_heads, ")"));
  }
  if (o.q_tokens > o.tokens) {
    return absl::InvalidArgumentError(absl::StrCat("--q-tokens (", o.q_tokens, ") exceeds --tokens (", o.tokens, ")"));
  }
  if (o.tokens > INT32_MAX) return absl::InvalidArgumentError("--tokens exceeds int32 positions");
  return absl::OkStatus();
}

safetensors::ElementType ElementTypeOf(DType d) {
  return d == DType::kFloat16 ? safetensors::ElementType::kF16
         : d == DType::kBFloat16 ? safetensors::ElementType::kBF16
                                  : safetensors::ElementType::kF32;
}

}  // namespace

absl::Status WriteSynthCache(const SynthOptions& o, const std::string& path) {
  MEDAKV_RETURN_IF_ERROR(Validate(o));
  std::vector<ModalitySpan> spans = o.visual;
  if (spans.empty() && !o.text_only) spans.push_back({o.tokens / 10, o.tokens * 7 / 10 - o.tokens / 10, Modality::kVisual});
  if (o.text_only) spans.clear();
  MEDAKV_ASSIGN_OR_RETURN(std::vector<uint8_t> modality, ModalityFromSpans(o.tokens, spans));

  std::vector<LayerData> layers(o.layers);
  cpu::ParallelFor(o.layers, [&](int64_t l) { MakeLayer(o, modality, l, &layers[l]); });

  std::vector<int32_t> positions(o.q_tokens);
  for (int64_t i = 0; i < o.q_tokens; ++i) positions[i] = static_cast<int32_t>(o.tokens - o.q_tokens + i);
  if (o.precomputed) {
    for (int64_t l = 0; l < o.layers; ++l) {
      AttentionStatsArgs args;
      args.query = TensorView{layers[l].query.data(), o.dtype, o.layout, o.q_heads, o.q_tokens, o.head_dim};
      args.key = TensorView{layers[l].key.data(), o.dtype, o.layout, o.kv_heads, o.tokens, o.head_dim};
      args.query_positions = positions.data();
      args.modality = modality.data();
      args.scale = 1.f / std::sqrt(static_cast<float>(o.head_dim));
      layers[l].scores.resize(o.kv_heads * o.tokens);
      AttentionStatsOutput out;
      out.scores = layers[l].scores.data();
      MEDAKV_RETURN_IF_ERROR(cpu::AttentionStats(args, &out));
      layers[l].entropy = out.entropy;
    }
  }

  safetensors::Writer w;
  const auto type = ElementTypeOf(o.dtype);
  auto shape3 = [&](int64_t heads, int64_t tokens) {
    return o.layout == Layout::kHND ? std::vector<int64_t>{heads, tokens, o.head_dim}
                                    : std::vector<int64_t>{tokens, heads, o.head_dim};
  };
  auto bytes = [](const auto& v) {
    return absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(v.data()), v.size() * sizeof(v[0]));
  };
  for (int64_t l = 0; l < o.layers; ++l) {
    const std::string p = absl::StrCat("layer.", l, ".");
    MEDAKV_RETURN_IF_ERROR(w.Add(p + "key", type, shape3(o.kv_heads, o.tokens), layers[l].key));
    MEDAKV_RETURN_IF_ERROR(w.Add(p + "value", type, shape3(o.kv_heads, o.tokens), layers[l].value));
    if (o.precomputed) {
      MEDAKV_RETURN_IF_ERROR(w.Add(p + "scores", safetensors::ElementType::kF32, {o.kv_heads, o.tokens},
                                   bytes(layers[l].scores)));
      MEDAKV_RETURN_IF_ERROR(w.Add(p + "entropy", safetensors::ElementType::kF32, {1},
                                   absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(&layers[l].entropy), 4)));
    } else {
      MEDAKV_RETURN_IF_ERROR(w.Add(p + "query", type, shape3(o.q_heads, o.q_tokens), layers[l].query));
      MEDAKV_RETURN_IF_ERROR(w.Add(p + "query_positions", safetensors::ElementType::kI32, {o.q_tokens}, bytes(positions)));
    }
  }
  MEDAKV_RETURN_IF_ERROR(w.Add("modality", safetensors::ElementType::kU8, {o.tokens}, modality));
  w.SetMetadata("format", "medakv.cache.v1");
  w.SetMetadata("layout", LayoutName(o.layout));
  w.SetMetadata("generator", absl::StrCat("medakv synth seed=", o.seed));
  return w.WriteFile(path);
}

}  // namespace medakv
