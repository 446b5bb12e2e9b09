// Client side of the Compress stream: sends a CacheInput in chunks and
// reassembles the compressed layers. (The full client library, with retries,
// sharding and the shared-memory data plane, is issue 6.)
#pragma once

#include <cstdint>
#include <memory>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "medakv/v1/medakv.grpc.pb.h"
#include "service/compress/options.h"
#include "service/compress/pipeline.h"

namespace medakv {

// The proto Policy that the server turns back into exactly these options
// (every option set explicitly).
v1::Policy PolicyToProto(const CompressOptions& options);

struct RemoteOptions {
  int64_t chunk_bytes = int64_t{4} << 20;  // request chunks
  int64_t response_chunk_bytes = 0;        // asked of the server, [1 KiB, 64 MiB]; 0: the server's default
  absl::Duration timeout = absl::InfiniteDuration();
};

struct RemoteResult {
  CompressResult result;  // layers as the library returns them
  v1::CompressSummary summary;
};

[[nodiscard]] absl::StatusOr<RemoteResult> CompressRemote(v1::Medakv::StubInterface& stub, const CacheInput& input,
                                                          const CompressOptions& options,
                                                          const RemoteOptions& remote = {});

// Appends the chunk messages of one tensor (bytes [data, data + size)) via `send`.
template <typename Send>
bool SendTensor(int32_t layer, v1::TensorKind kind, const void* data, int64_t size, int64_t chunk_bytes, Send&& send) {
  const auto* p = static_cast<const uint8_t*>(data);
  for (int64_t offset = 0; offset < size; offset += chunk_bytes) {
    const int64_t n = std::min(chunk_bytes, size - offset);
    if (!send(layer, kind, offset, p + offset, n)) return false;
  }
  return true;
}

}  // namespace medakv
