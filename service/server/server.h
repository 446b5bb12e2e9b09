// The medakv server: options, start-up and shutdown.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "service/server/call_log.h"

namespace grpc {
class Server;
class Channel;
}  // namespace grpc

namespace medakv {
class DeviceMemory;
}  // namespace medakv

namespace medakv::server {

class Metrics;

struct ServerOptions {
  std::string listen = "0.0.0.0:50051";  // host:port; port 0 picks a free port
  std::string backend = "auto";          // auto | cpu | cuda
  int64_t host_cache_bytes = int64_t{8} << 30;
  // The device tier of the cache store (docs/store.md): its byte budget on
  // the CUDA device. 0: no device tier. With the CPU backend there is none:
  // a positive value is a start-up error with --backend=cpu and is ignored
  // (the start-up log says so) with --backend=auto.
  int64_t device_cache_bytes = 0;
  // Not a flag: the memory of the device tier, for tests
  // (MakeEmulatedDeviceMemory()) on any backend. Null: the CUDA device's.
  std::shared_ptr<DeviceMemory> device_memory;
  int64_t max_request_bytes = int64_t{8} << 30;
  int64_t chunk_bytes = int64_t{4} << 20;  // response chunks (requests: any size up to max_message_bytes)
  int64_t max_message_bytes = int64_t{16} << 20;
  int max_inflight = 4;                       // compressions and uploads holding memory at once
  absl::Duration queue_timeout = absl::Seconds(30);  // wait for a slot, then RESOURCE_EXHAUSTED
  // A call that waits on its client (upload or download) this long without
  // progress ends with DEADLINE_EXCEEDED; 0 or infinite: never.
  absl::Duration idle_timeout = absl::Seconds(30);
  int max_queued = 64;
  // The operator's log (call_log.h): text or JSON lines; OK calls at least
  // slow_call_log long are logged too (0: none).
  LogFormat log_format = LogFormat::kText;
  absl::Duration slow_call_log = absl::Seconds(10);  // calls waiting for a slot at once (0: none wait); one more: RESOURCE_EXHAUSTED
  int threads = 0;                            // compute workers; 0: max_inflight
  absl::Duration shutdown_grace = absl::Seconds(25);
  // The shared-memory data plane (docs/shared_memory.md): regions registered
  // at once, the sum of their sizes, and whether callers that are not on
  // this node (not loopback, a Unix socket or in-process) may use it.
  int max_shm_regions = 64;
  int64_t max_shm_bytes = int64_t{64} << 30;
  bool shm_allow_remote = false;
  // Prometheus /metrics (host:port; port 0 picks a free port). Empty: no
  // metrics endpoint (the values are still recorded: MedakvServer::metrics()).
  std::string metrics_listen;
  // Named policies (docs/presets.md): the path of a PolicyPresets file in
  // protobuf text format, read at start-up (a file that cannot be read or
  // checked stops the start, naming the line). Empty: no presets.
  std::string policy_presets;
  // Security (SECURITY.md). TLS: PEM files of the server's certificate chain
  // and private key (both or neither); with tls_client_ca too, clients must
  // present a certificate signed by that CA (mutual TLS). Empty: plaintext.
  std::string tls_cert;
  std::string tls_key;
  std::string tls_client_ca;
  // Bearer tokens: a file of `TOKEN TENANT` lines (service/server/auth.h).
  // Empty: no authentication, one tenant.
  std::string auth_tokens_file;
};

class MedakvServer {
 public:
  // Validates the options, picks the backend, binds and starts serving.
  static absl::StatusOr<std::unique_ptr<MedakvServer>> Start(const ServerOptions& options);
  ~MedakvServer();

  int port() const { return port_; }             // the bound port (useful with port 0)
  int metrics_port() const { return metrics_port_; }  // the /metrics port; 0 without metrics_listen
  const Metrics& metrics() const;                // the server's metrics (Collect() reads them)
  const std::string& backend() const;            // the backend in use
  const std::string& backend_reason() const;     // why (for the start-up log)
  size_t presets() const;                        // presets loaded from policy_presets
  size_t tokens() const;                         // bearer tokens in use; 0 without auth_tokens_file
  bool tls() const;                              // whether the port speaks TLS
  // Reads auth_tokens_file again (SIGHUP); on error the tokens in use stay.
  [[nodiscard]] absl::Status ReloadTokens();
  std::shared_ptr<grpc::Channel> InProcessChannel();  // for tests

  // Ends every shared-memory lease (UNAVAILABLE), stops accepting calls,
  // lets in-flight calls finish within the grace, then cancels what remains.
  // Idempotent.
  void Shutdown();
  void Wait();

 private:
  struct Impl;
  explicit MedakvServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
  int port_ = 0;
  int metrics_port_ = 0;
};

}  // namespace medakv::server
