#include "service/server/result_stream.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"

#include "service/server/convert.h"

namespace medakv::server {

LayerSlices SliceOf(int32_t layer, const LayerResult& r) {
  return LayerSlices{layer, r.budget, r.entropy, r.alpha, r.key, r.value,
                     absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(r.positions.data()),
                                               r.positions.size() * sizeof(int32_t))};
}

std::vector<LayerSlices> SlicesOf(const CompressResult& result) {
  std::vector<LayerSlices> out;
  out.reserve(result.layers.size());
  for (size_t l = 0; l < result.layers.size(); ++l) out.push_back(SliceOf(static_cast<int32_t>(l), result.layers[l]));
  return out;
}

absl::StatusOr<int64_t> ResponseChunkSize(int64_t requested, const ServerOptions& options) {
  constexpr int64_t kEnvelope = 4096;  // message fields around the bytes
  int64_t want = options.chunk_bytes;
  if (requested != 0) {
    absl::StatusOr<int64_t> checked = medakv::ResponseChunkBytes(requested);
    if (!checked.ok()) return checked.status();
    want = *checked;
  }
  return std::clamp<int64_t>(want, 1, std::max<int64_t>(1, options.max_message_bytes - kEnvelope));
}

absl::StatusOr<int64_t> ResultBytes(const std::vector<LayerSlices>& layers) {
  int64_t total = 0;
  for (const LayerSlices& l : layers) {
    for (absl::Span<const uint8_t> t : {l.key, l.value, l.positions}) {
      if (__builtin_add_overflow(total, static_cast<int64_t>(t.size()), &total)) {
        return absl::ResourceExhaustedError("the results' size overflows int64");
      }
    }
  }
  return total;
}

absl::Status WriteResults(const std::vector<LayerSlices>& layers, const MappedRegion& region,
                          const v1::SharedMemoryRef& area, absl::string_view field) {
  absl::StatusOr<int64_t> needed = ResultBytes(layers);
  if (!needed.ok()) return needed.status();
  if (*needed > area.length()) {
    return absl::ResourceExhaustedError(absl::StrCat(field, ": the results need ", *needed,
                                                     " bytes, the output area has ", area.length(), " (", field,
                                                     ".length)"));
  }
  int64_t offset = area.offset();
  for (const LayerSlices& l : layers) {
    for (absl::Span<const uint8_t> t : {l.key, l.value, l.positions}) {
      if (t.empty()) continue;
      if (absl::Status s = region.Write(offset, t.data(), static_cast<int64_t>(t.size())); !s.ok()) return s;
      offset += static_cast<int64_t>(t.size());
    }
  }
  return absl::OkStatus();
}

ResultStream::ResultStream(std::vector<LayerSlices> layers, int64_t chunk_bytes)
    : layers_(std::move(layers)), chunk_bytes_(std::max<int64_t>(1, chunk_bytes)) {}

void ResultStream::UseSharedMemory(std::string region, int64_t offset) {
  shm_ = true;
  shm_region_ = std::move(region);
  shm_offset_ = offset;
}

absl::Span<const uint8_t> ResultStream::Tensor() const {
  const LayerSlices& l = layers_[layer_];
  return phase_ == 1 ? l.key : phase_ == 2 ? l.value : l.positions;
}

void ResultStream::Advance() {
  offset_ = 0;
  for (;;) {
    if (++phase_ > 3) {
      phase_ = 0;
      ++layer_;
      return;  // the next layer starts with its info
    }
    if (!Tensor().empty()) return;
  }
}

void ResultStream::FillChunk(v1::TensorChunk* chunk) {
  const absl::Span<const uint8_t> t = Tensor();
  const int64_t n = shm_ ? static_cast<int64_t>(t.size())
                         : std::min<int64_t>(chunk_bytes_, static_cast<int64_t>(t.size()) - offset_);
  chunk->set_layer(layers_[layer_].layer);
  chunk->set_tensor(phase_ == 1 ? v1::TENSOR_KIND_KEY : phase_ == 2 ? v1::TENSOR_KIND_VALUE : v1::TENSOR_KIND_POSITIONS);
  chunk->set_offset(offset_);
  if (shm_) {
    v1::SharedMemoryRef* ref = chunk->mutable_shm();
    ref->set_region(shm_region_);
    ref->set_offset(shm_offset_);
    ref->set_length(n);
    shm_offset_ += n;
  } else {
    chunk->set_data(t.data() + offset_, static_cast<size_t>(n));
  }
  offset_ += n;
  bytes_sent_ += n;
  if (offset_ >= static_cast<int64_t>(t.size())) Advance();
}

}  // namespace medakv::server
