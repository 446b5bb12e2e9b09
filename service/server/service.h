// The gRPC service: the Compress stream and the cache store RPCs, on the
// callback API. Compute runs on the WorkerPool, never on gRPC's threads.
#pragma once

#include <atomic>
#include <memory>
#include <string>

#include "kernels/backend.h"
#include "kernels/common/device_memory.h"
#include "service/server/auth.h"
#include "medakv/v1/medakv.grpc.pb.h"
#include "service/server/admission.h"
#include "service/server/call_log.h"
#include "service/server/idle.h"
#include "service/server/metrics.h"
#include "service/server/presets.h"
#include "service/server/server.h"
#include "service/server/shared_memory.h"
#include "service/store/cache_store.h"

namespace medakv::server {

struct ServiceContext {
  // `metrics` may be null (nothing is recorded); it must outlive the context.
  // `auth` null: authentication off.
  ServiceContext(const ServerOptions& o, std::unique_ptr<Backend> b, std::string backend_name, Metrics* metrics,
                 std::shared_ptr<const PresetTable> presets = std::make_shared<PresetTable>(),
                 std::unique_ptr<Authenticator> auth = nullptr, std::shared_ptr<DeviceMemory> device = nullptr);

  const ServerOptions options;
  const std::unique_ptr<Backend> backend;
  const std::string backend_name;
  Metrics* const metrics;
  const std::shared_ptr<const PresetTable> presets;  // never null; empty without --policy_presets
  const std::unique_ptr<Authenticator> auth;         // never null; disabled without --auth_tokens_file
  // The device tier's memory; null without a device tier (the store then has
  // none whatever --device_cache_bytes says).
  const std::shared_ptr<DeviceMemory> device_memory;
  CallLog log;        // failed and slow calls, start-up (--log_format, --slow_call_log)
  IdleWatchdog idle;  // ends calls whose client stalls (--idle_timeout)
  Admission admission;
  CacheStore store;
  SharedMemoryRegistry shm;
  std::atomic<int> inflight{0};
  // Request memory (the medakv_request_memory_bytes gauges): the tensor
  // bytes that admitted compressions may hold, and what queued ones hold.
  std::atomic<int64_t> held_inflight_bytes{0};
  std::atomic<int64_t> held_queued_bytes{0};
  WorkerPool pool;  // last: its threads stop first
};

class MedakvService final : public medakv::v1::Medakv::CallbackService {
 public:
  explicit MedakvService(ServiceContext* ctx) : ctx_(ctx) {}

  grpc::ServerBidiReactor<v1::CompressRequest, v1::CompressResponse>* Compress(
      grpc::CallbackServerContext* context) override;
  grpc::ServerReadReactor<v1::PutCacheRequest>* PutCache(grpc::CallbackServerContext* context,
                                                          v1::PutCacheResponse* response) override;
  grpc::ServerUnaryReactor* CompressCache(grpc::CallbackServerContext* context,
                                          const v1::CompressCacheRequest* request,
                                          v1::CompressCacheResponse* response) override;
  grpc::ServerWriteReactor<v1::GetCacheResponse>* GetCache(grpc::CallbackServerContext* context,
                                                           const v1::GetCacheRequest* request) override;
  grpc::ServerUnaryReactor* DeleteCache(grpc::CallbackServerContext* context, const v1::DeleteCacheRequest* request,
                                        v1::DeleteCacheResponse* response) override;
  grpc::ServerUnaryReactor* ListCaches(grpc::CallbackServerContext* context, const v1::ListCachesRequest* request,
                                       v1::ListCachesResponse* response) override;
  grpc::ServerUnaryReactor* Stats(grpc::CallbackServerContext* context, const v1::StatsRequest* request,
                                  v1::StatsResponse* response) override;
  grpc::ServerWriteReactor<v1::RegisterSharedMemoryResponse>* RegisterSharedMemory(
      grpc::CallbackServerContext* context, const v1::RegisterSharedMemoryRequest* request) override;
  grpc::ServerUnaryReactor* UnregisterSharedMemory(grpc::CallbackServerContext* context,
                                                   const v1::UnregisterSharedMemoryRequest* request,
                                                   v1::UnregisterSharedMemoryResponse* response) override;

 private:
  ServiceContext* ctx_;
};

// absl::Status -> grpc::Status (the canonical codes share their numbers).
grpc::Status ToGrpc(const absl::Status& s);

// Records the call's status in its metrics, then finishes it: for unary calls
// answered on the gRPC thread (DefaultReactor).
void FinishUnary(CallMetrics& call, grpc::ServerUnaryReactor* reactor, const grpc::Status& status);

// Who is calling: the tenant (CallerTenant: UNAUTHENTICATED without a valid
// token when the server authenticates) and whether it may use shared memory.
// A call's share of a ServiceContext byte counter, given back when it is
// reset or destroyed.
class HeldBytes {
 public:
  HeldBytes() = default;
  ~HeldBytes() { Reset(); }
  HeldBytes(const HeldBytes&) = delete;
  HeldBytes& operator=(const HeldBytes&) = delete;
  void Hold(std::atomic<int64_t>* counter, int64_t bytes) {
    Reset();
    counter_ = counter;
    bytes_ = bytes;
    counter_->fetch_add(bytes_);
  }
  void Reset() {
    if (counter_ != nullptr) counter_->fetch_sub(bytes_);
    counter_ = nullptr;
    bytes_ = 0;
  }

 private:
  std::atomic<int64_t>* counter_ = nullptr;
  int64_t bytes_ = 0;
};

struct Caller {
  absl::StatusOr<std::string> tenant;
  absl::Status shm_access;
  std::string peer;  // gRPC's peer string, for the log
};
Caller Identify(const grpc::CallbackServerContext& context, const ServiceContext& ctx);

// Whether the caller may use the shared-memory data plane: OK for a peer on
// this node (IsLocalPeer) or with --shm_allow_remote, else PERMISSION_DENIED.
absl::Status SharedMemoryAccess(const grpc::CallbackServerContext& context, const ServerOptions& options);

}  // namespace medakv::server
