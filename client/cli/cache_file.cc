#include "client/cli/cache_file.h"

#include <cstring>
#include <map>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "kernels/common/status.h"
#include "kernels/common/tensor_util.h"

namespace medakv {
namespace {

using safetensors::ElementType;
using safetensors::TensorInfo;

std::string ShapeString(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) absl::StrAppend(&s, i ? ", " : "", shape[i]);
  return s + "]";
}

absl::StatusOr<DType> KvDType(const TensorInfo& t) {
  switch (t.type) {
    case ElementType::kF16:
      return DType::kFloat16;
    case ElementType::kBF16:
      return DType::kBFloat16;
    case ElementType::kF32:
      return DType::kFloat32;
    default:
      return absl::InvalidArgumentError(absl::StrCat("tensor ", t.name, ": dtype ", safetensors::ElementTypeName(t.type),
                                                     " (expected F16, BF16 or F32)"));
  }
}

absl::Status Expect(const TensorInfo& t, ElementType type, const std::vector<int64_t>& shape) {
  if (t.type != type) {
    return absl::InvalidArgumentError(absl::StrCat("tensor ", t.name, ": dtype ", safetensors::ElementTypeName(t.type),
                                                   " (expected ", safetensors::ElementTypeName(type), ")"));
  }
  if (t.shape != shape) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor ", t.name, ": shape ", ShapeString(t.shape), " (expected ", ShapeString(shape), ")"));
  }
  return absl::OkStatus();
}

// Dims of a rank-3 KV or query tensor as (heads, tokens, head_dim).
absl::Status Dims3(const TensorInfo& t, Layout layout, int64_t* heads, int64_t* tokens, int64_t* head_dim) {
  if (t.shape.size() != 3) {
    return absl::InvalidArgumentError(absl::StrCat("tensor ", t.name, ": rank ", t.shape.size(), " shape ",
                                                   ShapeString(t.shape), " (expected 3 dims, ",
                                                   layout == Layout::kHND ? "[heads, tokens, head_dim])"
                                                                          : "[tokens, heads, head_dim])"));
  }
  *heads = layout == Layout::kHND ? t.shape[0] : t.shape[1];
  *tokens = layout == Layout::kHND ? t.shape[1] : t.shape[0];
  *head_dim = t.shape[2];
  return absl::OkStatus();
}

std::vector<int64_t> Shape3(Layout layout, int64_t heads, int64_t tokens, int64_t head_dim) {
  return layout == Layout::kHND ? std::vector<int64_t>{heads, tokens, head_dim}
                                : std::vector<int64_t>{tokens, heads, head_dim};
}

// A pointer to the tensor's bytes aligned for its element type.
const void* AlignedData(const TensorInfo& t, int element_size, LoadedCache* cache) {
  if (reinterpret_cast<uintptr_t>(t.data) % element_size == 0) return t.data;
  auto copy = std::make_unique<uint8_t[]>(t.size_bytes);
  std::memcpy(copy.get(), t.data, t.size_bytes);
  cache->aligned.push_back(std::move(copy));
  return cache->aligned.back().get();
}

const TensorInfo* Find(const safetensors::File& f, int64_t layer, absl::string_view what) {
  return f.Find(absl::StrCat("layer.", layer, ".", what));
}

}  // namespace

absl::StatusOr<std::unique_ptr<LoadedCache>> LoadCache(safetensors::File file, Layout layout) {
  auto cache = std::make_unique<LoadedCache>(std::move(file));
  const safetensors::File& f = cache->file;
  CacheInput& in = cache->input;
  in.layout = layout;

  // Which layers exist, and no unknown tensor.
  int64_t max_layer = -1;
  for (const TensorInfo& t : f.tensors()) {
    if (t.name == "modality") continue;
    const std::vector<std::string> parts = absl::StrSplit(t.name, '.');
    int64_t l = 0;
    static const char* kKnown[] = {"key", "value", "query", "query_positions", "query_outside_lse", "scores",
                                   "entropy"};
    // The index in canonical form: "layer.00.key" or "layer.+0.key" would be
    // accepted here and then never looked up (silently ignored).
    const bool known = parts.size() == 3 && parts[0] == "layer" && absl::SimpleAtoi(parts[1], &l) && l >= 0 &&
                       parts[1] == absl::StrCat(l) &&
                       std::find_if(std::begin(kKnown), std::end(kKnown),
                                    [&](const char* k) { return parts[2] == k; }) != std::end(kKnown);
    if (!known) {
      return absl::InvalidArgumentError(absl::StrCat(
          "unexpected tensor '", t.name,
          "' (expected layer.{l}.key|value|query|query_positions|query_outside_lse|scores|entropy and modality)"));
    }
    max_layer = std::max(max_layer, l);
  }
  if (max_layer < 0) return absl::InvalidArgumentError("no layer.0.key tensor: not a medakv cache file");
  // Every layer has at least two tensors (key, value), so a layer index at
  // or past the tensor count names a layer that cannot be complete; the loop
  // below stops with an error at the first incomplete layer, at or before
  // that count. Bounding `layers` by it keeps a file that merely names
  // layer.99999999.* from sizing the per-layer vectors, and INT64_MAX from
  // overflowing (tests/fuzz/corpus/fuzz_safetensors/crash-*-layer-index*).
  const int64_t layers = std::min(max_layer, static_cast<int64_t>(f.tensors().size())) + 1;

  const TensorInfo* key0 = Find(f, 0, "key");
  if (key0 == nullptr) return absl::InvalidArgumentError("missing tensor layer.0.key");
  MEDAKV_ASSIGN_OR_RETURN(in.dtype, KvDType(*key0));
  MEDAKV_RETURN_IF_ERROR(Dims3(*key0, layout, &in.kv_heads, &in.tokens, &in.head_dim));
  if (in.kv_heads <= 0 || in.tokens <= 0 || in.head_dim <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("tensor layer.0.key: shape ", ShapeString(key0->shape),
                                                   " has an empty dimension"));
  }
  const bool queries = Find(f, 0, "query") != nullptr;
  if (!queries && Find(f, 0, "scores") == nullptr) {
    return absl::InvalidArgumentError("layer 0 has neither layer.0.query nor layer.0.scores");
  }
  in.stats = queries ? StatsForm::kQueries : StatsForm::kPrecomputed;
  const int esize = DTypeSize(in.dtype);
  const std::vector<int64_t> kv_shape = Shape3(layout, in.kv_heads, in.tokens, in.head_dim);
  const ElementType kv_type = key0->type;

  in.layers.resize(layers);
  cache->scores.resize(layers);
  for (int64_t l = 0; l < layers; ++l) {
    LayerInput& layer = in.layers[l];
    for (const char* what : {"key", "value"}) {
      const TensorInfo* t = Find(f, l, what);
      if (t == nullptr) return absl::InvalidArgumentError(absl::StrCat("missing tensor layer.", l, ".", what));
      MEDAKV_RETURN_IF_ERROR(Expect(*t, kv_type, kv_shape));
      TensorView& v = std::string(what) == "key" ? layer.key : layer.value;
      v = TensorView{AlignedData(*t, esize, cache.get()), in.dtype, layout, in.kv_heads, in.tokens, in.head_dim};
    }
    const TensorInfo* q = Find(f, l, "query");
    const TensorInfo* s = Find(f, l, "scores");
    if (queries) {
      if (q == nullptr && s != nullptr) {
        return absl::InvalidArgumentError(
            absl::StrCat("layer ", l, " has precomputed scores but layer 0 has queries; give one form"));
      }
      if (q == nullptr) {
        return absl::InvalidArgumentError(absl::StrCat("missing tensor layer.", l, ".query (layer 0 has queries)"));
      }
      if (s != nullptr || Find(f, l, "entropy") != nullptr) {
        return absl::InvalidArgumentError(
            absl::StrCat("layer ", l, " has both queries and precomputed scores/entropy; give one form"));
      }
      int64_t q_heads = 0, q_tokens = 0, q_dim = 0;
      MEDAKV_RETURN_IF_ERROR(Dims3(*q, layout, &q_heads, &q_tokens, &q_dim));
      if (l == 0) in.q_heads = q_heads;
      // More rows than tokens: probes after the cache (their positions are then needed; ValidateCacheInput).
      if (q->type != kv_type || q_heads != in.q_heads || q_dim != in.head_dim || q_tokens <= 0 ||
          q_tokens > QueryPositionLimit(in.tokens)) {
        return absl::InvalidArgumentError(absl::StrCat(
            "tensor ", q->name, ": ", safetensors::ElementTypeName(q->type), " ", ShapeString(q->shape),
            " (expected ", safetensors::ElementTypeName(kv_type), " ",
            layout == Layout::kHND ? "[q_heads, q_tokens, head_dim]" : "[q_tokens, q_heads, head_dim]",
            " with q_heads=", in.q_heads, ", head_dim=", in.head_dim, ", 1 <= q_tokens <= 2 x tokens + 65536 = ",
            QueryPositionLimit(in.tokens), ")"));
      }
      layer.query = TensorView{AlignedData(*q, esize, cache.get()), in.dtype, layout, q_heads, q_tokens, q_dim};
      if (const TensorInfo* p = Find(f, l, "query_positions")) {
        MEDAKV_RETURN_IF_ERROR(Expect(*p, ElementType::kI32, {q_tokens}));
        layer.query_positions.resize(q_tokens);
        std::memcpy(layer.query_positions.data(), p->data, p->size_bytes);
      }
      if (const TensorInfo* o = Find(f, l, "query_outside_lse")) {
        MEDAKV_RETURN_IF_ERROR(Expect(*o, ElementType::kF32, {q_heads, q_tokens}));
        layer.query_outside_lse.resize(q_heads * q_tokens);
        std::memcpy(layer.query_outside_lse.data(), o->data, o->size_bytes);
      }
    } else {
      if (q != nullptr) {
        return absl::InvalidArgumentError(
            absl::StrCat("layer ", l, " has queries but layer 0 has precomputed scores; give one form"));
      }
      for (const char* what : {"query_positions", "query_outside_lse"}) {  // would be ignored
        if (Find(f, l, what) != nullptr) {
          return absl::InvalidArgumentError(absl::StrCat("tensor layer.", l, ".", what,
                                                         " in a file with precomputed scores (it belongs to the "
                                                         "query rows, which come only with queries)"));
        }
      }
      if (s == nullptr) return absl::InvalidArgumentError(absl::StrCat("missing tensor layer.", l, ".scores"));
      if (s->type != ElementType::kF32 || s->shape.size() != 2 || s->shape[1] != in.tokens || s->shape[0] <= 0 ||
          s->shape[0] % in.kv_heads != 0) {
        return absl::InvalidArgumentError(absl::StrCat("tensor ", s->name, ": ", safetensors::ElementTypeName(s->type),
                                                       " ", ShapeString(s->shape), " (expected F32 [kv_heads=",
                                                       in.kv_heads, " or q_heads, tokens=", in.tokens, "])"));
      }
      layer.score_heads = s->shape[0];
      if (l == 0) in.q_heads = std::max(in.kv_heads, s->shape[0]);
      cache->scores[l].resize(s->NumElements());
      std::memcpy(cache->scores[l].data(), s->data, s->size_bytes);
      layer.scores = cache->scores[l].data();
      const TensorInfo* e = Find(f, l, "entropy");
      if (e == nullptr) return absl::InvalidArgumentError(absl::StrCat("missing tensor layer.", l, ".entropy"));
      if (e->type != ElementType::kF32 || e->NumElements() != 1) {
        return absl::InvalidArgumentError(absl::StrCat("tensor ", e->name, ": ", safetensors::ElementTypeName(e->type),
                                                       " ", ShapeString(e->shape), " (expected F32 [1])"));
      }
      std::memcpy(&layer.entropy, e->data, sizeof(float));
    }
  }
  if (const TensorInfo* m = f.Find("modality")) {
    MEDAKV_RETURN_IF_ERROR(Expect(*m, ElementType::kU8, {in.tokens}));
    in.modality.assign(m->data, m->data + m->size_bytes);
  }
  MEDAKV_RETURN_IF_ERROR(ValidateCacheInput(in));
  return cache;
}

ElementType ElementTypeOf(DType dtype) {
  switch (dtype) {
    case DType::kFloat16:
      return ElementType::kF16;
    case DType::kBFloat16:
      return ElementType::kBF16;
    case DType::kFloat32:
      return ElementType::kF32;
  }
  return ElementType::kF32;
}

absl::Status WriteCompressed(const CompressResult& result, const CacheInput& input,
                             const std::vector<std::pair<std::string, std::string>>& metadata,
                             const std::string& path, int64_t first_layer) {
  safetensors::Writer w;
  const ElementType kv_type = ElementTypeOf(input.dtype);
  const int64_t layers = static_cast<int64_t>(result.layers.size());
  std::vector<float> entropy(layers), alpha(layers);
  std::vector<int32_t> budget(layers);
  auto bytes = [](const auto* p, size_t n) {
    return absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(p), n * sizeof(*p));
  };
  for (int64_t l = 0; l < layers; ++l) {
    const LayerResult& r = result.layers[l];
    const std::string p = absl::StrCat("layer.", first_layer + l, ".");
    entropy[l] = r.entropy;
    alpha[l] = static_cast<float>(r.alpha);
    budget[l] = static_cast<int32_t>(r.budget);
    const std::vector<int64_t> shape = Shape3(input.layout, input.kv_heads, r.budget, input.head_dim);
    MEDAKV_RETURN_IF_ERROR(w.Add(p + "key", kv_type, shape, r.key));
    MEDAKV_RETURN_IF_ERROR(w.Add(p + "value", kv_type, shape, r.value));
    MEDAKV_RETURN_IF_ERROR(w.Add(p + "positions", ElementType::kI32, {input.kv_heads, r.budget},
                                 bytes(r.positions.data(), r.positions.size())));
    MEDAKV_RETURN_IF_ERROR(w.Add(p + "entropy", ElementType::kF32, {1}, bytes(&entropy[l], 1)));
    MEDAKV_RETURN_IF_ERROR(w.Add(p + "alpha", ElementType::kF32, {1}, bytes(&alpha[l], 1)));
    MEDAKV_RETURN_IF_ERROR(w.Add(p + "budget", ElementType::kI32, {1}, bytes(&budget[l], 1)));
  }
  for (const auto& [k, v] : metadata) w.SetMetadata(k, v);
  return w.WriteFile(path);
}

}  // namespace medakv
