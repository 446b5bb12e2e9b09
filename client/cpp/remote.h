// Client side of the Compress stream: sends a CacheInput in chunks and
// reassembles the compressed layers, over the socket or through a POSIX
// shared-memory region registered with the server (docs/shared_memory.md).
// (The full client library, with retries and sharding, is issue 6.)
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "medakv/v1/medakv.grpc.pb.h"
#include "service/compress/options.h"
#include "service/compress/pipeline.h"

namespace medakv {

// The proto Policy that the server turns back into exactly these options
// (every option set explicitly).
v1::Policy PolicyToProto(const CompressOptions& options);

// ---- the shared-memory data plane (Linux) ----------------------------------------

// A POSIX shared-memory object that this process creates and maps read-write.
class SharedMemoryRegion {
 public:
  // Creates an object under a fresh name ("/medakv-<pid>-<n>-<random>",
  // O_CREAT | O_EXCL, mode 0600), sizes it to `size` bytes (zero-filled) and
  // maps it. INVALID_ARGUMENT for size <= 0; the errno's code otherwise.
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<SharedMemoryRegion>> Create(int64_t size);
  // Unmaps and unlinks the name (a server's mapping stays valid until the
  // server drops it).
  ~SharedMemoryRegion();
  SharedMemoryRegion(const SharedMemoryRegion&) = delete;
  SharedMemoryRegion& operator=(const SharedMemoryRegion&) = delete;

  const std::string& shm_name() const { return shm_name_; }
  uint8_t* data() const { return data_; }
  int64_t size() const { return size_; }

 private:
  SharedMemoryRegion(std::string shm_name, uint8_t* data, int64_t size);
  const std::string shm_name_;
  uint8_t* const data_;
  const int64_t size_;
};

// A region registered with one server: the RegisterSharedMemory lease stream,
// held open by a background thread. The server keeps the region registered
// until the lease ends: on destruction (the stream is cancelled), Release(),
// or when the server ends it (shutdown, or an UnregisterSharedMemory from
// elsewhere).
class SharedMemoryLease {
 public:
  // Registers `region` under `name` and waits (at most `timeout`) for the
  // server's answer; its error otherwise. `stub` and `region` must outlive
  // the lease.
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<SharedMemoryLease>> Register(
      v1::Medakv::StubInterface& stub, const SharedMemoryRegion& region, std::string name,
      absl::Duration timeout = absl::Seconds(30));
  // Cancels the stream (the server unregisters the region once the calls
  // that use it end) and waits for the thread.
  ~SharedMemoryLease();
  SharedMemoryLease(const SharedMemoryLease&) = delete;
  SharedMemoryLease& operator=(const SharedMemoryLease&) = delete;

  const std::string& name() const { return name_; }
  const SharedMemoryRegion& region() const { return region_; }

  // Unregisters the region now (UnregisterSharedMemory) and waits for the
  // stream to end. NOT_FOUND if the server no longer has it.
  [[nodiscard]] absl::Status Release();
  // Whether the stream has ended (the region is no longer registered), and
  // the status it ended with (OK after Release).
  bool ended() const { return ended_.HasBeenNotified(); }
  absl::Status end_status() const;

 private:
  SharedMemoryLease(v1::Medakv::StubInterface& stub, const SharedMemoryRegion& region, std::string name);
  void Run(std::unique_ptr<grpc::ClientReaderInterface<v1::RegisterSharedMemoryResponse>> reader);

  v1::Medakv::StubInterface& stub_;
  const SharedMemoryRegion& region_;
  const std::string name_;
  grpc::ClientContext context_;
  absl::Notification registered_;  // the first response arrived or the stream ended
  absl::Notification ended_;
  mutable absl::Mutex mu_;
  absl::Status status_ ABSL_GUARDED_BY(mu_);  // the stream's final status once ended_
  std::thread thread_;
};

struct RemoteOptions {
  int64_t chunk_bytes = int64_t{4} << 20;  // request chunks
  int64_t response_chunk_bytes = 0;        // asked of the server, [1 KiB, 64 MiB]; 0: the server's default
  absl::Duration timeout = absl::InfiniteDuration();
  // A region registered with the server that `stub` reaches: the tensors
  // travel through it instead of the socket. The input is copied into the
  // region from offset 0 (each tensor 64-byte aligned, one ref per tensor);
  // the results are written by the server after it (from the next 64-byte
  // boundary to the region's end; the whole region when the input goes over
  // the socket) and copied out. RESOURCE_EXHAUSTED when the
  // input does not fit, or (from the server) when the results do not. One
  // call at a time per region.
  const SharedMemoryLease* shared_memory = nullptr;
  bool shm_input = true;   // with shared_memory: send the tensors as refs
  bool shm_output = true;  // with shared_memory: receive the results through the region
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
