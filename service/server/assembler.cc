#include "service/server/assembler.h"

#include <bit>
#include <cstring>
#include <new>
#include <utility>

#include "absl/strings/str_cat.h"
#include "kernels/common/status.h"

namespace medakv {
namespace {

namespace v1 = ::medakv::v1;

// Tensors travel as little-endian bytes and are used in place.
static_assert(std::endian::native == std::endian::little, "medakv assumes a little-endian host");

// The request's tensor kinds (not the results' POSITIONS), each with its slot.
bool InSlots(v1::TensorKind kind) {
  return (kind >= v1::TENSOR_KIND_KEY && kind <= v1::TENSOR_KIND_ENTROPY) ||
         kind == v1::TENSOR_KIND_QUERY_OUTSIDE_LSE;
}
int SlotIndex(v1::TensorKind kind) {
  return kind == v1::TENSOR_KIND_QUERY_OUTSIDE_LSE ? 6 : static_cast<int>(kind) - 1;
}

std::string TensorName(int64_t layer, v1::TensorKind kind) {
  return absl::StrCat("layer ", layer, " ", TensorKindName(kind));
}

}  // namespace

CacheAssembler::CacheAssembler(CacheSpec spec) : spec_(std::move(spec)) {}

absl::StatusOr<CacheAssembler> CacheAssembler::Create(CacheSpec spec) {
  MEDAKV_RETURN_IF_ERROR(ValidateSpec(spec, /*max_request_bytes=*/0, ""));
  CacheAssembler a(std::move(spec));
  a.tensors_.resize(static_cast<size_t>(a.spec_.layers * kSlots));
  for (int64_t l = 0; l < a.spec_.layers; ++l) {
    for (v1::TensorKind kind : CarriedKinds(a.spec_)) {
      const int64_t bytes = TensorBytes(a.spec_, kind);
      a.Slot(l, kind)->expected = bytes;
      a.bytes_expected_ += bytes;  // ValidateSpec checked that the total fits
    }
  }
  return a;
}

CacheAssembler::Tensor* CacheAssembler::Slot(int64_t layer, v1::TensorKind kind) {
  return &tensors_[static_cast<size_t>(layer * kSlots + SlotIndex(kind))];
}

const CacheAssembler::Tensor* CacheAssembler::Slot(int64_t layer, v1::TensorKind kind) const {
  return &tensors_[static_cast<size_t>(layer * kSlots + SlotIndex(kind))];
}

absl::string_view CacheAssembler::tensor(int64_t layer, v1::TensorKind kind) const {
  if (layer < 0 || layer >= spec_.layers || !InSlots(kind)) return {};
  const Tensor* t = Slot(layer, kind);
  if (t->data == nullptr) return {};
  return absl::string_view(reinterpret_cast<const char*>(t->data.get()), static_cast<size_t>(t->received));
}

absl::Status CacheAssembler::Add(const v1::TensorChunk& chunk) {
  if (chunk.has_shm()) {
    return absl::InvalidArgumentError(absl::StrCat("chunk of layer ", chunk.layer(), " ",
                                                   TensorKindName(chunk.tensor()),
                                                   ": a shared-memory ref (chunk.shm) where bytes were expected"));
  }
  return Add(chunk.layer(), chunk.tensor(), chunk.offset(), chunk.data());
}

absl::Status CacheAssembler::Add(int32_t layer, v1::TensorKind kind, int64_t offset, absl::string_view data) {
  return AddFrom(layer, kind, offset, static_cast<int64_t>(data.size()), [&](void* dst, int64_t size) {
    std::memcpy(dst, data.data(), static_cast<size_t>(size));
    return absl::OkStatus();
  });
}

absl::Status CacheAssembler::AddFrom(int32_t layer, v1::TensorKind kind, int64_t offset, int64_t size, CopyFn copy) {
  if (finished_) {
    return absl::FailedPreconditionError(
        absl::StrCat("chunk of layer ", layer, " ", TensorKindName(kind), " after the cache was complete"));
  }
  if (layer < 0 || layer >= spec_.layers) {
    return absl::InvalidArgumentError(absl::StrCat("chunk.layer must be in [0, ", spec_.layers, "), got ", layer));
  }
  if (!InSlots(kind) || Slot(layer, kind)->expected == 0) {
    std::string carried;
    for (v1::TensorKind k : CarriedKinds(spec_))
      absl::StrAppend(&carried, carried.empty() ? "" : ", ", TensorKindName(k));
    const std::string what = kind == v1::TENSOR_KIND_UNSPECIFIED ? std::string("TENSOR_KIND_UNSPECIFIED")
                             : v1::TensorKind_IsValid(kind)      ? std::string(TensorKindName(kind))
                                                            : absl::StrCat("unknown value ", static_cast<int>(kind));
    return absl::InvalidArgumentError(absl::StrCat("chunk.tensor of layer ", layer, " is ", what,
                                                   ", which a cache with statistics '", SpecStatsName(spec_.stats),
                                                   "' does not carry (expected one of: ", carried, ")"));
  }
  Tensor* t = Slot(layer, kind);
  const std::string name = TensorName(layer, kind);
  if (t->received == t->expected) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, " was already received (", t->expected, " bytes); each tensor is sent once"));
  }
  if (size <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(name, ": empty chunk at offset ", offset));
  }
  if (offset != t->received) {
    return absl::InvalidArgumentError(absl::StrCat(name, ": chunk at offset ", offset, ", expected offset ",
                                                   t->received, " (the chunks of a tensor arrive in order)"));
  }
  if (size > t->expected - t->received) {
    return absl::InvalidArgumentError(absl::StrCat(name, ": chunk [", offset, ", ", offset + size,
                                                   ") runs past the tensor's end (", t->expected, " bytes)"));
  }
  if (t->data == nullptr) {
    const int64_t words = (t->expected + 3) / 4;
    t->data.reset(new (std::nothrow) uint32_t[static_cast<size_t>(words)]);
    if (t->data == nullptr) {
      return absl::ResourceExhaustedError(absl::StrCat(name, ": cannot allocate ", t->expected, " bytes"));
    }
    bytes_allocated_ += words * 4;
  }
  MEDAKV_RETURN_IF_ERROR(copy(reinterpret_cast<char*>(t->data.get()) + t->received, size));
  t->received += size;
  bytes_received_ += size;
  return absl::OkStatus();
}

absl::Status CacheAssembler::Finish() {
  if (finished_) return absl::OkStatus();
  for (int64_t l = 0; l < spec_.layers; ++l) {
    for (v1::TensorKind kind : CarriedKinds(spec_)) {
      const Tensor* t = Slot(l, kind);
      if (t->received != t->expected) {
        return absl::InvalidArgumentError(absl::StrCat(TensorName(l, kind), " is ",
                                                       t->received == 0 ? "missing" : "incomplete", ": ", t->received,
                                                       " of ", t->expected, " bytes arrived"));
      }
    }
  }
  CacheInput in;
  in.kv_heads = spec_.kv_heads;
  in.q_heads = spec_.q_heads;
  in.head_dim = spec_.head_dim;
  in.tokens = spec_.tokens;
  in.dtype = spec_.dtype;
  in.layout = spec_.layout;
  in.modality = ModalityVector(spec_);
  in.stats = spec_.stats == SpecStats::kPrecomputed ? StatsForm::kPrecomputed : StatsForm::kQueries;
  in.layers.resize(static_cast<size_t>(spec_.layers));
  auto view = [&](int64_t l, v1::TensorKind kind, int64_t heads, int64_t tokens) {
    return TensorView{Slot(l, kind)->data.get(), spec_.dtype, spec_.layout, heads, tokens, spec_.head_dim};
  };
  for (int64_t l = 0; l < spec_.layers; ++l) {
    LayerInput& layer = in.layers[static_cast<size_t>(l)];
    layer.key = view(l, v1::TENSOR_KIND_KEY, spec_.kv_heads, spec_.tokens);
    layer.value = view(l, v1::TENSOR_KIND_VALUE, spec_.kv_heads, spec_.tokens);
    if (spec_.stats == SpecStats::kQueries) {
      layer.query = view(l, v1::TENSOR_KIND_QUERY, spec_.q_heads, spec_.q_tokens);
      if (spec_.has_query_positions) {
        layer.query_positions.resize(static_cast<size_t>(spec_.q_tokens));
        std::memcpy(layer.query_positions.data(), Slot(l, v1::TENSOR_KIND_QUERY_POSITIONS)->data.get(),
                    static_cast<size_t>(spec_.q_tokens) * sizeof(int32_t));
      }
      if (spec_.has_query_outside_lse) {
        layer.query_outside_lse.resize(static_cast<size_t>(spec_.q_heads * spec_.q_tokens));
        std::memcpy(layer.query_outside_lse.data(), Slot(l, v1::TENSOR_KIND_QUERY_OUTSIDE_LSE)->data.get(),
                    layer.query_outside_lse.size() * sizeof(float));
      }
    } else if (spec_.stats == SpecStats::kPrecomputed) {
      layer.scores = reinterpret_cast<const float*>(Slot(l, v1::TENSOR_KIND_SCORES)->data.get());
      layer.score_heads = spec_.score_heads;
      std::memcpy(&layer.entropy, Slot(l, v1::TENSOR_KIND_ENTROPY)->data.get(), sizeof(float));
    }
  }
  if (spec_.stats != SpecStats::kNone) {
    MEDAKV_RETURN_IF_ERROR(ValidateCacheInput(in));
  }
  input_ = std::move(in);
  finished_ = true;
  return absl::OkStatus();
}

}  // namespace medakv
