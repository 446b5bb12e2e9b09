// medakv::Client: the C++ client library of the medakv service
// (medakv.v1.Medakv, proto/medakv/v1/medakv.proto). docs/client.md is the
// guide; in short:
//
//   medakv::ClientOptions options;
//   options.targets = {"medakv-0.medakv:50051", "medakv-1.medakv:50051"};
//   options.deadline = absl::Seconds(30);
//   absl::StatusOr<std::unique_ptr<medakv::Client>> client = medakv::Client::Create(options);
//   absl::StatusOr<medakv::RemoteResult> small = (*client)->Compress(cache, compress_options);
//   absl::StatusOr<medakv::PutResult> put = (*client)->PutCache("prompt-1234", cache);
//   absl::StatusOr<medakv::FetchedCache> got = (*client)->GetCache("prompt-1234");
//
// - A cache is given as tensor views (CacheInput: any dtype and layout the
//   service accepts); the client chunks it (ClientOptions::chunk_bytes) and
//   reassembles the results.
// - Replicas: `Compress` is stateless and goes to the replicas in turn
//   (skipping one whose connection is failing while another is not). Stored
//   caches are sharded: PutCache, GetCache, CompressCache and DeleteCache go
//   to the replica that rendezvous hashing picks for the cache id
//   (RendezvousPick below; the exact function is in docs/client.md so that
//   every client places ids alike). ListCaches, Stats and Health ask every
//   replica and merge.
// - Shared memory (docs/shared_memory.md): with a loopback or Unix-socket
//   target, the tensors of Compress, PutCache and GetCache travel through
//   POSIX shared-memory regions that the client registers once and reuses;
//   when a region cannot be created or registered the call uses the socket.
// - Deadlines: ClientOptions::deadline, or CallOptions::deadline per call;
//   one deadline covers every attempt of a call.
// - Retries: only the idempotent GetCache, ListCaches and Stats are retried,
//   on UNAVAILABLE, with exponential backoff and jitter (RetryPolicy). Compress,
//   PutCache, CompressCache and DeleteCache are never retried.
// - Errors keep the server's status code; the message names the replica
//   ("cannot reach server 10.0.0.7:50051 (the replica of cache 'x'):
//   UNAVAILABLE: ..." or "server 10.0.0.7:50051: NOT_FOUND: ...").
//
// A Client is thread-safe: any number of calls may run at once.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "client/cpp/remote.h"
#include "grpc/health/v1/health.pb.h"
#include "medakv/v1/medakv.pb.h"
#include "service/compress/options.h"
#include "service/compress/pipeline.h"

namespace grpc {
class ChannelCredentials;
}  // namespace grpc

namespace medakv {

namespace client_internal {
struct Replica;  // a target's channel, stubs and shared-memory regions (client.cc)
}  // namespace client_internal

// When the tensors travel through shared memory instead of the socket.
enum class SharedMemoryMode : uint8_t {
  kAuto = 0,    // for targets on this host: loopback addresses, "localhost", Unix sockets
  kOff = 1,     // never
  kAlways = 2,  // try with every target (a node-local server reached through a pod IP and
                // --shm_allow_remote); a target that refuses falls back to the socket
};

// Retries of the idempotent calls (GetCache, ListCaches, Stats) on
// UNAVAILABLE. Attempt n (from 1) that fails waits a random time in
// [b/2, b], b = min(initial_backoff * backoff_multiplier^(n-1), max_backoff),
// before attempt n+1, as long as the call's deadline leaves room for the wait.
struct RetryPolicy {
  int max_attempts = 4;  // >= 1 (1: no retries)
  absl::Duration initial_backoff = absl::Milliseconds(100);
  absl::Duration max_backoff = absl::Seconds(5);
  double backoff_multiplier = 2.0;  // >= 1
};

// What ClientOptions::on_retry receives before each wait.
struct RetryEvent {
  std::string method;      // "GetCache", "ListCaches" or "Stats"
  std::string target;      // the replica
  int attempt = 0;         // the attempt that failed, from 1
  absl::Status status;     // its error (UNAVAILABLE)
  absl::Duration backoff;  // the wait before the next attempt
};

struct ClientOptions {
  // The replicas, in gRPC target syntax ("host:port", "dns:///name:port",
  // "unix:/path"). At least one, no duplicates. The ids are placed by these
  // strings: clients that share caches must list the replicas alike (the
  // order does not matter).
  std::vector<std::string> targets;
  // Deadline of each call, all its attempts included (InfiniteDuration: none).
  absl::Duration deadline = absl::InfiniteDuration();
  RetryPolicy retry;
  SharedMemoryMode shared_memory = SharedMemoryMode::kAuto;
  // Idle shared-memory regions kept registered per replica for later calls
  // (a call takes the smallest idle region that fits, or registers a new
  // one); a region beyond this is released after its call.
  int64_t shared_memory_pool_bytes = int64_t{1} << 30;
  // Request chunk size on the socket: keep it under the server's
  // --max_message_bytes (16 MiB by default).
  int64_t chunk_bytes = int64_t{4} << 20;
  // Result chunk size asked of the server: 0 (its --chunk_bytes) or
  // [1 KiB, 64 MiB].
  int64_t response_chunk_bytes = 0;
  // gRPC load-balancing policy of each target's channel, e.g. "round_robin"
  // for a DNS name that resolves to every pod of a headless Service; empty:
  // gRPC's default (pick_first).
  std::string load_balancing_policy;
  // nullptr: plaintext (grpc::InsecureChannelCredentials()); for TLS see
  // TlsCredentials.
  std::shared_ptr<grpc::ChannelCredentials> credentials;
  // Sent with every call as `authorization: Bearer TOKEN` when not empty
  // (servers with --auth_tokens_file; SECURITY.md): printable ASCII without
  // spaces. Shared-memory objects are then named with the tenant's prefix
  // that the server reports (Stats' shm_name_prefix).
  std::string token;
  // Called before each retry wait, e.g. to log it, on the thread of the
  // attempt (ListCaches and Stats ask each replica from its own thread).
  std::function<void(const RetryEvent&)> on_retry;
};

// TLS channel credentials from PEM files: `ca` verifies the server ("": the
// system's roots); `cert` and `key` (both or neither) are the client's
// certificate for servers that require one (--tls_client_ca). Errors name
// the file.
[[nodiscard]] absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> TlsCredentials(const std::string& ca,
                                                                                       const std::string& cert,
                                                                                       const std::string& key);

struct CallOptions {
  // Replaces ClientOptions::deadline for this call; > 0 (INVALID_ARGUMENT
  // otherwise), InfiniteDuration: none.
  std::optional<absl::Duration> deadline;
  ProgressCallback progress;  // tensor bytes sent or received (remote.h)
  // Compress and CompressCache: select the server's preset of this name
  // instead of the options' policy; preset_rho > 0 replaces its rho
  // (RemoteOptions::preset).
  std::string preset;
  // Compress and CompressCache: name no policy (a Policy with neither a kind
  // nor a preset), so that the server decides: its preset named "default"
  // (--policy_presets, e.g. written by `medakv tune`) when it has one, else
  // amber at rho 0.2. preset_rho > 0 replaces the rho. The options are then
  // only checked; the summary's `policy` says what ran (and `policy.preset`
  // which preset, if any). Not with `preset` (INVALID_ARGUMENT).
  bool server_default = false;
  double preset_rho = 0.0;  // with `preset` or `server_default`: > 0 replaces the rho
};

struct PutOptions {
  int64_t ttl_seconds = 0;  // 0: no expiry
  bool overwrite = false;   // false: ALREADY_EXISTS when the id is stored
  // false: keys and values only (the cache cannot be compressed in place
  // later); true: the statistics of the CacheInput too.
  bool with_statistics = true;
  // Where the server keeps it (PutCacheHeader.tier): AUTO, the device tier
  // when the server has one and the cache fits, else the host tier; HOST;
  // DEVICE, FAILED_PRECONDITION on a server without a device tier and
  // RESOURCE_EXHAUSTED when it cannot fit. PutResult::info.tier() says
  // where it went.
  v1::CacheTier tier = v1::CACHE_TIER_AUTO;
};

struct PutResult {
  v1::CacheInfo info;
  std::string target;          // the replica that stores it
  bool shared_memory = false;  // the tensors went through shared memory
  int64_t bytes_sent = 0;      // tensor bytes
};

struct GetOptions {
  int32_t layer_begin = 0;  // [layer_begin, layer_end); layer_end 0: every layer
  int32_t layer_end = 0;
};

struct FetchedCache {
  v1::CacheInfo info;
  int32_t layer_begin = 0;
  // layers[i] is layer layer_begin + i: key and value [kv_heads, budget,
  // head_dim] in info.shape's dtype and layout, positions [kv_heads, budget]
  // (ascending original positions), entropy and alpha (0 and 1 until the
  // cache is compressed), budget = the tokens the layer keeps.
  std::vector<LayerResult> layers;
  std::string target;
  bool shared_memory = false;
  int64_t bytes_received = 0;  // tensor bytes
};

struct ListedCache {
  v1::CacheInfo info;
  std::string target;  // the replica that holds it
};

struct ReplicaError {
  std::string target;
  absl::Status status;
};

struct CacheList {
  std::vector<ListedCache> caches;   // ordered by id, at most the limit
  std::vector<ReplicaError> errors;  // replicas that did not answer (their caches are missing)
};

struct ReplicaStats {
  std::string target;
  absl::StatusOr<v1::StatsResponse> stats;
};

struct ClusterStats {
  std::vector<ReplicaStats> replicas;  // in the order of ClientOptions::targets
  // The sum over the replicas that answered: tiers by name (capacity, used,
  // entries, evictions), in-flight compressions and shared-memory regions;
  // backend and version when every replica that answered agrees, else
  // "mixed".
  v1::StatsResponse total;
  int answered = 0;
};

struct ReplicaHealth {
  std::string target;
  absl::Status status;  // of the Check call
  grpc::health::v1::HealthCheckResponse::ServingStatus serving = grpc::health::v1::HealthCheckResponse::UNKNOWN;
  double seconds = 0;  // round trip
};

class Client {
 public:
  // Checks the options (INVALID_ARGUMENT naming the field) and creates one
  // channel per target; nothing is connected until the first call.
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<Client>> Create(ClientOptions options);
  // Releases the shared-memory regions (their leases end, the objects are
  // unlinked). Calls must have returned.
  ~Client();
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  const ClientOptions& options() const { return options_; }
  const std::vector<std::string>& targets() const { return options_.targets; }
  // The replica that stores `cache_id`: its index in targets(), and its target.
  size_t ReplicaIndex(absl::string_view cache_id) const;
  const std::string& ReplicaFor(absl::string_view cache_id) const;

  // Compresses a cache; nothing is stored. The result equals the library's
  // Compress bit for bit. `target` and `shared_memory` say where and how.
  [[nodiscard]] absl::StatusOr<RemoteResult> Compress(const CacheInput& cache, const CompressOptions& options,
                                                      const CallOptions& call = {});

  // Stores a cache under `cache_id` (1-256 bytes of [A-Za-z0-9._:/-]) on its replica.
  [[nodiscard]] absl::StatusOr<PutResult> PutCache(absl::string_view cache_id, const CacheInput& cache,
                                                   const PutOptions& put = {}, const CallOptions& call = {});

  // Compresses a stored cache in place with the statistics it was stored with.
  [[nodiscard]] absl::StatusOr<v1::CompressCacheResponse> CompressCache(absl::string_view cache_id,
                                                                        const CompressOptions& options,
                                                                        const CallOptions& call = {});

  // Downloads a stored cache (or a range of its layers). Retried.
  [[nodiscard]] absl::StatusOr<FetchedCache> GetCache(absl::string_view cache_id, const GetOptions& get = {},
                                                      const CallOptions& call = {});

  // Deletes a stored cache; the bytes freed.
  [[nodiscard]] absl::StatusOr<int64_t> DeleteCache(absl::string_view cache_id, const CallOptions& call = {});

  // The stored caches whose ids start with `prefix`, from every replica at
  // once (following each replica's pages), merged by id; at most `limit`
  // (0: 1000). An error only when no replica answered; the replicas that did
  // not are in CacheList::errors. Retried per page.
  [[nodiscard]] absl::StatusOr<CacheList> ListCaches(absl::string_view prefix = "", int32_t limit = 0,
                                                     const CallOptions& call = {});

  // Stats of every replica and their sum. An error only when no replica
  // answered. Retried per replica.
  [[nodiscard]] absl::StatusOr<ClusterStats> Stats(const CallOptions& call = {});

  // grpc.health.v1.Health/Check of every replica (the whole server), at once,
  // without retries; the deadline is 5 s unless the call or the client sets one.
  std::vector<ReplicaHealth> Health(const CallOptions& call = {});

 private:
  explicit Client(ClientOptions options);
  client_internal::Replica& PickForCompress();

  const ClientOptions options_;
  std::vector<std::unique_ptr<client_internal::Replica>> replicas_;  // one per target, in order
  std::atomic<uint64_t> next_compress_{0};
};

// ---- placement and targets (docs/client.md) --------------------------------------

// The rendezvous (highest random weight) score of `cache_id` on `target`:
// FNV-1a 64 over the bytes of target, one 0x00 byte and the bytes of
// cache_id, then MurmurHash3's 64-bit finalizer. Stable across processes,
// machines and languages.
uint64_t RendezvousScore(absl::string_view target, absl::string_view cache_id);

// The index of the target with the highest score for `cache_id` (ties: the
// bytewise smaller target). `targets` must not be empty.
size_t RendezvousPick(const std::vector<std::string>& targets, absl::string_view cache_id);

// Whether a gRPC target names this host: "unix:" and "unix-abstract:"
// targets, "localhost", 127.0.0.0/8 and ::1 (also as "ipv4:", "ipv6:" and
// "dns:" targets; every address of an "ipv4:"/"ipv6:" list).
bool IsLocalTarget(absl::string_view target);

// A cache id as the service accepts it: 1-256 bytes of [A-Za-z0-9._:/-]
// (INVALID_ARGUMENT otherwise).
[[nodiscard]] absl::Status CheckCacheId(absl::string_view cache_id);

}  // namespace medakv
