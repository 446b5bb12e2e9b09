// Client side of the Compress stream: sends a CacheInput in chunks and
// reassembles the compressed layers, over the socket or through a POSIX
// shared-memory region registered with the server (docs/shared_memory.md).
// The pieces here (tensor chunking, the result reader, regions and leases)
// are also the building blocks of medakv::Client (client/cpp/client.h), the
// library that most callers want: it adds replicas, sharding, retries and
// the automatic use of shared memory.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "medakv/v1/medakv.grpc.pb.h"
#include "service/compress/options.h"
#include "service/compress/pipeline.h"
#include "service/server/convert.h"

namespace medakv {

// PolicyToProto (service/server/convert.h) builds the requests' policies.

// ---- the shared-memory data plane (Linux) ----------------------------------------

// A POSIX shared-memory object that this process creates and maps read-write.
class SharedMemoryRegion {
 public:
  // Creates an object under a fresh name ("<prefix><pid>-<n>-<random>",
  // O_CREAT | O_EXCL, mode 0600), sizes it to `size` bytes (zero-filled),
  // allocates its pages (posix_fallocate: a full /dev/shm is an error here,
  // RESOURCE_EXHAUSTED, rather than a SIGBUS on first write) and maps it.
  // INVALID_ARGUMENT for size <= 0; the errno's code otherwise.
  // `prefix` starts with '/' and has no other (a server with authentication
  // wants its tenant's, "/medakv:TENANT:"; docs/shared_memory.md).
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<SharedMemoryRegion>> Create(int64_t size,
                                                                                 absl::string_view prefix = "/medakv-");
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
// until the lease ends: on destruction or Release() (UnregisterSharedMemory,
// so that the server ends the stream with OK), or when the server ends it
// (shutdown, or an UnregisterSharedMemory from elsewhere).
class SharedMemoryLease {
 public:
  // Registers `region` under `name` and waits (at most `timeout`) for the
  // server's answer; its error otherwise. `stub` and `region` must outlive
  // the lease.
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<SharedMemoryLease>> Register(
      v1::Medakv::StubInterface& stub, const SharedMemoryRegion& region, std::string name,
      absl::Duration timeout = absl::Seconds(30));
  // Ends the lease as Release() does, waiting at most 2 s for the server;
  // cancels the stream when the server does not answer in time or never
  // answered the registration (a cancelled lease is a CANCELLED call in the
  // server's metrics, a released one is OK). Either way the server
  // unregisters the region, and the calls that use it keep it until they
  // end. Waits for the thread.
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

// Which way tensor bytes travel.
enum class Transfer : uint8_t { kUpload = 0, kDownload = 1 };

// Progress of one call: `done` tensor bytes of `total` (-1 while the total is
// not known: the results of Compress) sent or received so far. Called on the
// calling thread, after each chunk.
using ProgressCallback = std::function<void(Transfer direction, int64_t done, int64_t total)>;

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
  ProgressCallback progress;  // optional
  // Set: the request selects this preset of the server (docs/presets.md)
  // instead of sending the options' policy, and `preset_rho` (when > 0)
  // replaces the preset's rho. The options are still checked; the summary's
  // `policy` says what the server ran.
  std::string preset;
  // Set (and no preset): the request names no policy (no kind, no preset):
  // the server runs its "default" preset, or amber at rho 0.2 without one;
  // `preset_rho` (when > 0) is the rho. The options are still checked.
  bool server_default = false;
  double preset_rho = 0.0;
};

// The policy a request sends: PolicyToProto(options); with a preset the
// preset's name and preset_rho; with `server_default` (and no preset) only
// preset_rho, no kind: the server's default.
v1::Policy RequestPolicy(const CompressOptions& options, const std::string& preset, double preset_rho,
                         bool server_default = false);

struct RemoteResult {
  CompressResult result;  // layers as the library returns them
  v1::CompressSummary summary;
  // Filled by medakv::Client: the replica that compressed, and whether the
  // tensors went through shared memory.
  std::string target;
  bool shared_memory = false;
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

// ---- building blocks of the client calls (CompressRemote, medakv::Client) --------

namespace client_internal {

absl::Status FromGrpc(const grpc::Status& s);

// Tensors in a shared-memory region start at 64-byte boundaries.
inline int64_t AlignUp(int64_t n) { return (n + 63) & ~int64_t{63}; }

// One tensor of a request.
struct TensorPiece {
  int32_t layer;
  v1::TensorKind kind;
  const void* data;
  int64_t size;  // bytes
};

// The tensors of a request for `spec` (SpecFromInput(in), or a copy with
// stats kNone for keys and values only), in the order they are sent: per
// layer key, value, then the statistics the spec carries.
std::vector<TensorPiece> RequestTensors(const CacheInput& in, const CacheSpec& spec);

// Where each piece goes in a region when the input travels through shared
// memory (from offset 0, each at a 64-byte boundary); `*end` is the first
// byte after the input (a 64-byte boundary).
std::vector<int64_t> ShmLayout(const std::vector<TensorPiece>& pieces, int64_t* end);

// Writes the chunk messages of every piece to `stream` (a Compress or
// PutCache stream): bytes of at most `chunk_bytes`, or, with `shm`, one ref
// per tensor after copying it into the region at `shm_offsets`. Reports
// progress after each chunk. False when the stream broke (Finish says why).
template <typename Request, typename Stream>
bool WriteTensors(Stream& stream, const std::vector<TensorPiece>& pieces, int64_t chunk_bytes,
                  const SharedMemoryLease* shm, const std::vector<int64_t>& shm_offsets,
                  const ProgressCallback& progress) {
  int64_t total = 0, done = 0;
  for (const TensorPiece& p : pieces) total += p.size;
  Request request;
  auto send = [&](int32_t layer, v1::TensorKind kind, int64_t offset, const uint8_t* data, int64_t n) {
    request.Clear();
    v1::TensorChunk* c = request.mutable_chunk();
    c->set_layer(layer);
    c->set_tensor(kind);
    c->set_offset(offset);
    c->set_data(data, static_cast<size_t>(n));
    if (!stream.Write(request)) return false;
    done += n;
    if (progress) progress(Transfer::kUpload, done, total);
    return true;
  };
  for (size_t i = 0; i < pieces.size(); ++i) {
    const TensorPiece& p = pieces[i];
    if (shm == nullptr) {
      if (!SendTensor(p.layer, p.kind, p.data, p.size, chunk_bytes, send)) return false;
      continue;
    }
    std::memcpy(shm->region().data() + shm_offsets[i], p.data, static_cast<size_t>(p.size));
    request.Clear();
    v1::TensorChunk* c = request.mutable_chunk();
    c->set_layer(p.layer);
    c->set_tensor(p.kind);
    c->set_offset(0);
    v1::SharedMemoryRef* ref = c->mutable_shm();
    ref->set_region(shm->name());
    ref->set_offset(shm_offsets[i]);
    ref->set_length(p.size);
    if (!stream.Write(request)) return false;
    done += p.size;
    if (progress) progress(Transfer::kUpload, done, total);
  }
  return true;
}

// Reassembles the layers of a Compress or GetCache response: per layer a
// LayerInfo, then its key, value and positions as byte chunks or as refs into
// an output area of a registered region. Checks everything the server sends
// against the shapes it announced (INTERNAL otherwise): layers inside
// [first_layer, first_layer + layers), budgets in [1, max_tokens], chunks
// inside their tensor and in order, refs inside the output area, and at the
// end that every layer arrived whole.
class ResultReader {
 public:
  struct Shape {
    int64_t kv_heads = 0;
    int64_t head_dim = 0;
    DType dtype = DType::kFloat16;
    int64_t max_tokens = 0;  // budgets are in [1, max_tokens]
    int32_t first_layer = 0;
    int32_t layers = 0;
  };
  // `shm`: the lease whose region holds the output area [area_offset,
  // area_offset + area_length); nullptr when results come as bytes.
  ResultReader(const Shape& shape, const SharedMemoryLease* shm, int64_t area_offset, int64_t area_length,
               ProgressCallback progress = nullptr);

  [[nodiscard]] absl::Status OnLayer(const v1::LayerInfo& info);
  [[nodiscard]] absl::Status OnChunk(const v1::TensorChunk& chunk);
  // INTERNAL naming the first layer that is missing or incomplete.
  [[nodiscard]] absl::Status CheckComplete() const;
  // The layers, in order (index 0 is first_layer).
  std::vector<LayerResult>& layers() { return layers_; }
  // Tensor bytes received so far.
  int64_t bytes() const { return received_total_; }
  // Sets the total reported to the progress callback (-1: unknown).
  void set_expected_bytes(int64_t total) { expected_total_ = total; }

 private:
  Shape shape_;
  const SharedMemoryLease* shm_;
  int64_t area_offset_, area_length_;
  ProgressCallback progress_;
  std::vector<LayerResult> layers_;
  std::vector<bool> has_info_;
  std::vector<int64_t> received_;  // bytes per layer (key + value + positions)
  int64_t received_total_ = 0;
  int64_t expected_total_ = -1;
};

}  // namespace client_internal

}  // namespace medakv
