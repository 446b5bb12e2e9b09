// Streams compressed layers as messages: per layer a LayerInfo, then its key,
// value and positions tensors in chunks of at most `chunk_bytes` each.
// Used by Compress (CompressResponse) and GetCache (GetCacheResponse): both
// messages have `layer` (LayerInfo) and `chunk` (TensorChunk) fields. With a
// shared-memory output area the tensors are written into the region first
// (WriteResults) and the chunks are refs to them.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "medakv/v1/medakv.pb.h"
#include "service/compress/pipeline.h"
#include "service/server/server.h"
#include "service/server/shared_memory.h"

namespace medakv::server {

struct LayerSlices {
  int32_t layer = 0;
  int64_t budget = 0;
  float entropy = 0.f;
  double alpha = 0.0;
  absl::Span<const uint8_t> key, value, positions;  // positions: int32 [kv_heads, budget] as bytes
};

// Views of every layer of a compression result (which must outlive them).
// Views of one layer's result (layer number `layer`), and of every layer.
LayerSlices SliceOf(int32_t layer, const LayerResult& result);
std::vector<LayerSlices> SlicesOf(const CompressResult& result);

// The bytes of every layer's key, value and positions (overflow-checked:
// RESOURCE_EXHAUSTED when the sum does not fit in int64).
[[nodiscard]] absl::StatusOr<int64_t> ResultBytes(const std::vector<LayerSlices>& layers);

// Writes the results into the output area `area` of `region` (the area was
// checked against the region): layer by layer, key, value then positions,
// consecutively from area.offset. RESOURCE_EXHAUSTED naming `field` and the
// size needed when they do not fit in area.length, before anything is
// written; FAILED_PRECONDITION when the region's memory faults.
[[nodiscard]] absl::Status WriteResults(const std::vector<LayerSlices>& layers, const MappedRegion& region,
                                        const v1::SharedMemoryRef& area, absl::string_view field);

// The response chunk size: the client's wish (validated; 0: the server's
// --chunk_bytes), capped so that a message fits under --max_message_bytes.
[[nodiscard]] absl::StatusOr<int64_t> ResponseChunkSize(int64_t requested, const ServerOptions& options);

class ResultStream {
 public:
  ResultStream(std::vector<LayerSlices> layers, int64_t chunk_bytes);

  // The results were written with WriteResults into `region` from `offset`:
  // each tensor becomes one chunk whose payload is a ref to its bytes there.
  void UseSharedMemory(std::string region, int64_t offset);

  // Fills `out` with the next LayerInfo or TensorChunk; false when done.
  template <typename Msg>
  bool Next(Msg* out) {
    if (layer_ >= layers_.size()) return false;
    const LayerSlices& l = layers_[layer_];
    if (phase_ == 0) {
      v1::LayerInfo* info = out->mutable_layer();
      info->set_layer(l.layer);
      info->set_budget(l.budget);
      info->set_entropy(l.entropy);
      info->set_alpha(l.alpha);
      Advance();
      return true;
    }
    FillChunk(out->mutable_chunk());
    return true;
  }

  // Adds a layer after those given (a stream built while layers are computed).
  void Append(LayerSlices layer) { layers_.push_back(layer); }
  // The layers whose every message Next has given.
  size_t layers_done() const { return layer_; }

  int64_t bytes_sent() const { return bytes_sent_; }

 private:
  void FillChunk(v1::TensorChunk* chunk);
  void Advance();  // to the next non-empty tensor (or layer)
  absl::Span<const uint8_t> Tensor() const;

  std::vector<LayerSlices> layers_;
  int64_t chunk_bytes_;
  size_t layer_ = 0;
  int phase_ = 0;  // 0 info, 1 key, 2 value, 3 positions
  int64_t offset_ = 0;
  int64_t bytes_sent_ = 0;
  bool shm_ = false;
  std::string shm_region_;
  int64_t shm_offset_ = 0;  // where the next tensor lies in the region
};

}  // namespace medakv::server
