#include "client/cpp/client.h"

#include <arpa/inet.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/support/client_interceptor.h>
#include <netinet/in.h>

#include <algorithm>
#include <chrono>
#include <tuple>
#include <cmath>
#include <limits>
#include <map>
#include <random>
#include <thread>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "kernels/common/status.h"
#include "kernels/common/tensor_util.h"
#include "service/server/config_file.h"
#include "service/server/convert.h"

namespace medakv {
namespace client_internal {

// A registered region (the lease refers to the region: declared after it, it
// is destroyed first).
struct PooledRegion {
  std::unique_ptr<SharedMemoryRegion> region;
  std::unique_ptr<SharedMemoryLease> lease;
  int64_t size() const { return region->size(); }
};

struct Replica {
  std::string target;
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<v1::Medakv::Stub> stub;
  std::unique_ptr<grpc::health::v1::Health::Stub> health;
  bool shm = false;  // shared memory may be tried with this target (mode and address)
  bool needs_shm_prefix = false;  // with a token: ask the server for the tenant's object-name prefix first

  // Idle registered regions (destroyed before the stub they were registered with).
  absl::Mutex mu;
  std::vector<PooledRegion> idle ABSL_GUARDED_BY(mu);
  int64_t idle_bytes ABSL_GUARDED_BY(mu) = 0;
  // Shared memory is not tried before this time (InfiniteFuture: never
  // again), after a region could not be created or registered.
  absl::Time shm_retry_after ABSL_GUARDED_BY(mu) = absl::InfinitePast();
  std::optional<std::string> shm_prefix ABSL_GUARDED_BY(mu);  // known once asked (needs_shm_prefix)
};

}  // namespace client_internal

namespace {

using client_internal::FromGrpc;
using client_internal::PooledRegion;
using client_internal::Replica;

constexpr int64_t kRegionGranule = int64_t{1} << 20;  // regions are whole MiB
constexpr absl::Duration kShmPause = absl::Seconds(10);
constexpr absl::Duration kRegisterTimeout = absl::Seconds(10);
constexpr absl::Duration kHealthTimeout = absl::Seconds(5);

// ---- errors and deadlines ---------------------------------------------------------

// The replica and the status code in front of the server's message, on one line.
absl::Status WithReplica(const Replica& r, absl::string_view cache_id, const absl::Status& s) {
  if (s.ok()) return s;
  const std::string message = absl::StrReplaceAll(s.message(), {{"\r", " "}, {"\n", " "}});
  std::string where = s.code() == absl::StatusCode::kUnavailable ? absl::StrCat("cannot reach server ", r.target)
                                                                 : absl::StrCat("server ", r.target);
  if (!cache_id.empty() && s.code() == absl::StatusCode::kUnavailable) {
    absl::StrAppend(&where, " (the replica of cache '", cache_id, "')");
  }
  return absl::Status(s.code(), absl::StrCat(where, ": ", absl::StatusCodeToString(s.code()), ": ", message));
}

// The call's deadline: CallOptions::deadline, else ClientOptions::deadline.
absl::StatusOr<absl::Time> CallDeadline(const ClientOptions& o, const CallOptions& call) {
  if (call.deadline.has_value() && *call.deadline <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(absl::StrCat("CallOptions::deadline must be > 0 (InfiniteDuration: none), got ",
                                                   absl::FormatDuration(*call.deadline)));
  }
  const absl::Duration d = call.deadline.value_or(o.deadline);
  return d == absl::InfiniteDuration() ? absl::InfiniteFuture() : absl::Now() + d;
}

// CallOptions::preset and server_default exclude each other.
absl::Status CheckPolicyChoice(const CallOptions& call) {
  if (!call.preset.empty() && call.server_default) {
    return absl::InvalidArgumentError(absl::StrCat("CallOptions: preset '", call.preset,
                                                   "' and server_default both set; set one of them"));
  }
  return absl::OkStatus();
}

void SetDeadline(grpc::ClientContext& context, absl::Time deadline) {
  if (deadline != absl::InfiniteFuture()) context.set_deadline(absl::ToChronoTime(deadline));
}

absl::Duration Jitter(absl::Duration backoff) {
  thread_local std::mt19937_64 rng{std::random_device{}()};
  std::uniform_real_distribution<double> u(0.5, 1.0);
  return backoff * u(rng);
}

// Waits `wait` while letting the channel reconnect. A blocking call that
// failed fast leaves no thread polling the channel's connection attempt (gRPC
// would only notice its outcome with the backup poller, every 5 s): waiting
// for state changes polls it, so the next attempt finds the connection made.
void WaitReconnecting(grpc::Channel& channel, absl::Duration wait) {
  const absl::Time until = absl::Now() + wait;
  while (absl::Now() < until) {
    const grpc_connectivity_state state = channel.GetState(/*try_to_connect=*/true);
    if (!channel.WaitForStateChange(state, absl::ToChronoTime(until))) break;  // the time is up
  }
}

// Runs `attempt` until it succeeds, fails with anything but UNAVAILABLE, or
// the attempts or the deadline run out (RetryPolicy). The last error says how
// many attempts were made.
template <typename Attempt>
absl::Status RetryCall(const ClientOptions& o, absl::string_view method, const Replica& r, absl::Time deadline,
                       Attempt&& attempt) {
  absl::Duration backoff = o.retry.initial_backoff;
  for (int n = 1;; ++n) {
    const absl::Status s = attempt();
    if (s.code() != absl::StatusCode::kUnavailable) return s;
    const absl::Duration wait = Jitter(backoff);
    if (n >= o.retry.max_attempts || absl::Now() + wait >= deadline) {
      return n == 1 ? s : absl::Status(s.code(), absl::StrCat(s.message(), " (", n, " attempts)"));
    }
    if (o.on_retry) o.on_retry(RetryEvent{std::string(method), r.target, n, s, wait});
    WaitReconnecting(*r.channel, wait);
    backoff = std::min(backoff * o.retry.backoff_multiplier, o.retry.max_backoff);
  }
}

// Calls fn(i) for every replica, each on its own thread when there are several.
template <typename Fn>
void ForEachReplica(size_t n, Fn&& fn) {
  if (n == 1) {
    fn(size_t{0});
    return;
  }
  std::vector<std::thread> threads;
  threads.reserve(n);
  for (size_t i = 0; i < n; ++i) threads.emplace_back([&fn, i] { fn(i); });
  for (std::thread& t : threads) t.join();
}

// Adds `authorization: <value>` to every call of a channel: works on
// plaintext channels too, where gRPC refuses call credentials.
class BearerTokenInterceptor final : public grpc::experimental::Interceptor {
 public:
  explicit BearerTokenInterceptor(const std::string* value) : value_(value) {}
  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    if (methods->QueryInterceptionHookPoint(grpc::experimental::InterceptionHookPoints::PRE_SEND_INITIAL_METADATA)) {
      methods->GetSendInitialMetadata()->emplace("authorization", *value_);
    }
    methods->Proceed();
  }

 private:
  const std::string* value_;  // the factory's, which the channel keeps alive
};

class BearerTokenFactory final : public grpc::experimental::ClientInterceptorFactoryInterface {
 public:
  explicit BearerTokenFactory(std::string value) : value_(std::move(value)) {}
  grpc::experimental::Interceptor* CreateClientInterceptor(grpc::experimental::ClientRpcInfo*) override {
    return new BearerTokenInterceptor(&value_);
  }

 private:
  const std::string value_;
};

// ---- shared-memory regions ------------------------------------------------------------

// Registration errors after which this client stops trying shared memory with
// the replica: it is not on this host (NOT_FOUND: it cannot see our object;
// PERMISSION_DENIED: it does not count us as local), or does not offer it.
bool PermanentShmError(absl::StatusCode code) {
  return code == absl::StatusCode::kNotFound || code == absl::StatusCode::kPermissionDenied ||
         code == absl::StatusCode::kUnimplemented || code == absl::StatusCode::kInvalidArgument ||
         code == absl::StatusCode::kFailedPrecondition;
}

void PauseShm(Replica& r, bool permanent) {
  absl::MutexLock lock(&r.mu);
  r.shm_retry_after = permanent ? absl::InfiniteFuture() : absl::Now() + kShmPause;
}

bool ShmAvailable(Replica& r) {
  if (!r.shm) return false;
  absl::MutexLock lock(&r.mu);
  return absl::Now() >= r.shm_retry_after;
}

// A region lent to one call. Back to the pool when the call succeeded
// (MarkClean); released otherwise, since a server call that failed or was
// cancelled may still read or write the region for a moment.
class RegionLoan {
 public:
  RegionLoan(Replica* replica, PooledRegion region, int64_t pool_bytes)
      : replica_(replica), region_(std::move(region)), pool_bytes_(pool_bytes) {}
  RegionLoan(RegionLoan&& other) noexcept
      : replica_(std::exchange(other.replica_, nullptr)),
        region_(std::move(other.region_)),
        pool_bytes_(other.pool_bytes_),
        clean_(other.clean_) {}
  RegionLoan& operator=(RegionLoan&&) = delete;
  RegionLoan(const RegionLoan&) = delete;
  // Returns the region to the pool, or releases it (when region_ still holds
  // it as a member, after the lock is gone).
  ~RegionLoan() {
    if (replica_ == nullptr || !clean_ || region_.lease->ended()) return;
    Replica& r = *replica_;
    absl::MutexLock lock(&r.mu);
    if (r.idle_bytes + region_.size() > pool_bytes_) return;
    r.idle_bytes += region_.size();
    r.idle.push_back(std::move(region_));
  }

  const SharedMemoryLease* lease() const { return region_.lease.get(); }
  int64_t size() const { return region_.size(); }
  void MarkClean() { clean_ = true; }

 private:
  Replica* replica_;
  PooledRegion region_;
  int64_t pool_bytes_;
  bool clean_ = false;
};

// The prefix of this client's shared-memory object names on `r`: the
// default, or with a token the tenant's prefix that the server reports.
absl::StatusOr<std::string> ShmPrefix(Replica& r, absl::Duration timeout) {
  constexpr char kDefault[] = "/medakv-";
  if (!r.needs_shm_prefix) return std::string(kDefault);
  {
    absl::MutexLock lock(&r.mu);
    if (r.shm_prefix.has_value()) return *r.shm_prefix;
  }
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
  v1::StatsResponse stats;
  const grpc::Status s = r.stub->Stats(&context, v1::StatsRequest(), &stats);
  if (!s.ok()) return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
  std::string prefix = stats.shm_name_prefix().empty() ? kDefault : stats.shm_name_prefix();
  absl::MutexLock lock(&r.mu);
  r.shm_prefix = prefix;
  return prefix;
}

// A registered region of at least `bytes` for one call on `r`: the smallest
// idle one that fits, or a new one (whole MiB). nullopt, and the call uses
// the socket, when shared memory is off for `r`, the call needs more than the
// pool holds, or the region cannot be created or registered.
std::optional<RegionLoan> BorrowRegion(Replica& r, const ClientOptions& o, int64_t bytes, absl::Time deadline) {
  if (!r.shm || bytes <= 0 || bytes > o.shared_memory_pool_bytes) return std::nullopt;
  std::vector<PooledRegion> ended;  // released after the lock
  {
    absl::MutexLock lock(&r.mu);
    if (absl::Now() < r.shm_retry_after) return std::nullopt;
    // Leases that ended (the server restarted, or dropped the region) go.
    for (PooledRegion& p : r.idle) {
      if (p.lease->ended()) {
        r.idle_bytes -= p.size();
        ended.push_back(std::move(p));
      }
    }
    std::erase_if(r.idle, [](const PooledRegion& p) { return p.lease == nullptr; });
    auto best = r.idle.end();
    for (auto it = r.idle.begin(); it != r.idle.end(); ++it) {
      if (it->size() >= bytes && (best == r.idle.end() || it->size() < best->size())) best = it;
    }
    if (best != r.idle.end()) {
      PooledRegion region = std::move(*best);
      r.idle.erase(best);
      r.idle_bytes -= region.size();
      return RegionLoan(&r, std::move(region), o.shared_memory_pool_bytes);
    }
  }
  const int64_t size = (bytes + kRegionGranule - 1) / kRegionGranule * kRegionGranule;
  const absl::Duration timeout = std::min(deadline - absl::Now(), kRegisterTimeout);
  if (timeout <= absl::ZeroDuration()) return std::nullopt;
  absl::StatusOr<std::string> prefix = ShmPrefix(r, timeout);
  if (!prefix.ok()) {  // the call itself will meet the same error, if it lasts
    PauseShm(r, /*permanent=*/false);
    return std::nullopt;
  }
  absl::StatusOr<std::unique_ptr<SharedMemoryRegion>> region = SharedMemoryRegion::Create(size, *prefix);
  if (!region.ok()) {  // /dev/shm full, or no POSIX shared memory here
    PauseShm(r, /*permanent=*/false);
    return std::nullopt;
  }
  absl::StatusOr<std::unique_ptr<SharedMemoryLease>> lease =
      SharedMemoryLease::Register(*r.stub, **region, (*region)->shm_name().substr(1), timeout);
  if (!lease.ok()) {
    PauseShm(r, PermanentShmError(lease.status().code()));
    return std::nullopt;
  }
  return RegionLoan(&r, PooledRegion{*std::move(region), *std::move(lease)}, o.shared_memory_pool_bytes);
}

// ---- requests -----------------------------------------------------------------------

bool IdChar(char c) {
  return absl::ascii_isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == ':' || c == '/' || c == '-';
}

// The spec of a keys-and-values-only upload, checked as the server would,
// and every view checked against it.
absl::StatusOr<CacheSpec> KeysValuesSpec(const CacheInput& in) {
  if (in.layers.empty()) return absl::InvalidArgumentError("layers: the cache has no layer");
  CacheSpec spec;
  spec.layers = static_cast<int64_t>(in.layers.size());
  spec.kv_heads = in.kv_heads;
  spec.q_heads = in.q_heads > 0 && in.kv_heads > 0 && in.q_heads % in.kv_heads == 0 ? in.q_heads : 0;
  spec.head_dim = in.head_dim;
  spec.tokens = in.tokens;
  spec.dtype = in.dtype;
  spec.layout = in.layout;
  MEDAKV_ASSIGN_OR_RETURN(spec.visual_spans, VisualSpansOf(in.modality, in.tokens));
  spec.stats = SpecStats::kNone;
  MEDAKV_RETURN_IF_ERROR(ValidateSpec(spec, /*max_request_bytes=*/0, /*prefix=*/""));
  for (size_t l = 0; l < in.layers.size(); ++l) {
    for (const auto& [name, v] : {std::pair{"key", &in.layers[l].key}, std::pair{"value", &in.layers[l].value}}) {
      if (v->data == nullptr || v->dtype != in.dtype || v->layout != in.layout || v->heads != in.kv_heads ||
          v->tokens != in.tokens || v->head_dim != in.head_dim) {
        return absl::InvalidArgumentError(absl::StrCat("layer ", l, " ", name, ": expected ", DTypeName(in.dtype), " ",
                                                       LayoutName(in.layout), " with ", in.kv_heads, " heads, ",
                                                       in.tokens, " tokens and head_dim ", in.head_dim,
                                                       v->data == nullptr ? " (the view has no data)" : ""));
      }
    }
  }
  return spec;
}

// The most the results of compressing (or fetching) a cache of `spec` take:
// every token's key, value and position.
int64_t ResultBytesBound(const CacheSpec& spec) {
  return spec.layers * spec.kv_heads * spec.tokens * (2 * spec.head_dim * DTypeSize(spec.dtype) + 4);
}

// Whether a status is the server's answer to an output area too small.
bool OutputAreaTooSmall(const absl::Status& s) {
  return s.code() == absl::StatusCode::kResourceExhausted && absl::StartsWith(s.message(), "output");
}

// ---- targets ----------------------------------------------------------------------

bool LoopbackHost(absl::string_view host) {
  if (absl::ConsumePrefix(&host, "[")) {
    if (!absl::ConsumeSuffix(&host, "]")) return false;
  }
  const std::string h = absl::AsciiStrToLower(host);
  if (h == "localhost" || absl::EndsWith(h, ".localhost")) return true;
  in_addr v4{};
  if (inet_pton(AF_INET, h.c_str(), &v4) == 1) return (ntohl(v4.s_addr) >> 24) == 127;
  in6_addr v6{};
  if (inet_pton(AF_INET6, h.c_str(), &v6) == 1) {
    if (IN6_IS_ADDR_LOOPBACK(&v6)) return true;
    return IN6_IS_ADDR_V4MAPPED(&v6) && v6.s6_addr[12] == 127;
  }
  return false;
}

// "host:port", "[v6]:port", "host" -> host.
absl::string_view HostOf(absl::string_view hostport) {
  if (absl::StartsWith(hostport, "[")) {
    const size_t close = hostport.find(']');
    return close == absl::string_view::npos ? hostport : hostport.substr(0, close + 1);
  }
  const size_t colon = hostport.rfind(':');
  if (colon == absl::string_view::npos || hostport.find(':') != colon) return hostport;  // no port, or bare IPv6
  return hostport.substr(0, colon);
}

}  // namespace

// ---- placement ----------------------------------------------------------------------

uint64_t RendezvousScore(absl::string_view target, absl::string_view cache_id) {
  constexpr uint64_t kOffset = 0xcbf29ce484222325ULL, kPrime = 0x100000001b3ULL;
  uint64_t h = kOffset;
  auto add = [&h](unsigned char byte) {
    h ^= byte;
    h *= kPrime;
  };
  for (const char c : target) add(static_cast<unsigned char>(c));
  add(0);
  for (const char c : cache_id) add(static_cast<unsigned char>(c));
  // MurmurHash3 fmix64: every input bit reaches every output bit.
  h ^= h >> 33;
  h *= 0xff51afd7ed558ccdULL;
  h ^= h >> 33;
  h *= 0xc4ceb9fe1a85ec53ULL;
  h ^= h >> 33;
  return h;
}

size_t RendezvousPick(const std::vector<std::string>& targets, absl::string_view cache_id) {
  size_t best = 0;
  uint64_t best_score = 0;
  for (size_t i = 0; i < targets.size(); ++i) {
    const uint64_t score = RendezvousScore(targets[i], cache_id);
    if (i == 0 || score > best_score || (score == best_score && targets[i] < targets[best])) {
      best = i;
      best_score = score;
    }
  }
  return best;
}

bool IsLocalTarget(absl::string_view target) {
  if (absl::StartsWith(target, "unix:") || absl::StartsWith(target, "unix-abstract:")) return true;
  if (absl::ConsumePrefix(&target, "ipv4:") || absl::ConsumePrefix(&target, "ipv6:")) {
    if (target.empty()) return false;
    for (absl::string_view address : absl::StrSplit(target, ',')) {
      if (!LoopbackHost(HostOf(address))) return false;
    }
    return true;
  }
  if (absl::ConsumePrefix(&target, "dns:")) {
    if (absl::ConsumePrefix(&target, "//")) {  // dns://[authority]/host:port
      const size_t slash = target.find('/');
      if (slash == absl::string_view::npos) return false;
      target.remove_prefix(slash + 1);
    }
  }
  return !target.empty() && LoopbackHost(HostOf(target));
}

absl::Status CheckCacheId(absl::string_view id) {
  if (id.empty() || id.size() > 256) {
    return absl::InvalidArgumentError(absl::StrCat("cache id '", id, "' must be 1-256 bytes, got ", id.size()));
  }
  for (size_t i = 0; i < id.size(); ++i) {
    if (!IdChar(id[i])) {
      return absl::InvalidArgumentError(absl::StrCat("cache id '", id, "': byte ", i, " is outside [A-Za-z0-9._:/-]"));
    }
  }
  return absl::OkStatus();
}

// ---- Client -----------------------------------------------------------------------------

Client::Client(ClientOptions options) : options_(std::move(options)) {}

absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> TlsCredentials(const std::string& ca,
                                                                         const std::string& cert,
                                                                         const std::string& key) {
  if (cert.empty() != key.empty()) {
    return absl::InvalidArgumentError("the client certificate and its key go together (give both or neither)");
  }
  grpc::SslCredentialsOptions ssl;
  for (const auto& [path, what, out] : {std::tuple{&ca, "CA certificates file", &ssl.pem_root_certs},
                                        std::tuple{&cert, "client certificate file", &ssl.pem_cert_chain},
                                        std::tuple{&key, "client key file", &ssl.pem_private_key}}) {
    if (path->empty()) continue;
    MEDAKV_ASSIGN_OR_RETURN(*out, ReadPemFile(*path, what));
  }
  return grpc::SslCredentials(ssl);
}

Client::~Client() = default;

absl::StatusOr<std::unique_ptr<Client>> Client::Create(ClientOptions o) {
  if (o.targets.empty()) return absl::InvalidArgumentError("targets: give at least one server (host:port)");
  for (size_t i = 0; i < o.targets.size(); ++i) {
    if (o.targets[i].empty()) return absl::InvalidArgumentError(absl::StrCat("targets[", i, "] is empty"));
    for (size_t j = 0; j < i; ++j) {
      if (o.targets[j] == o.targets[i]) {
        return absl::InvalidArgumentError(absl::StrCat("targets[", i, "] '", o.targets[i], "' is listed twice"));
      }
    }
  }
  if (o.deadline <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(
        absl::StrCat("deadline must be > 0 (InfiniteDuration: none), got ", absl::FormatDuration(o.deadline)));
  }
  const RetryPolicy& r = o.retry;
  if (r.max_attempts < 1) {
    return absl::InvalidArgumentError(absl::StrCat("retry.max_attempts must be >= 1, got ", r.max_attempts));
  }
  if (r.initial_backoff <= absl::ZeroDuration() || r.max_backoff < r.initial_backoff ||
      r.max_backoff == absl::InfiniteDuration()) {
    return absl::InvalidArgumentError(absl::StrCat("retry: need 0 < initial_backoff <= max_backoff < infinity, got ",
                                                   absl::FormatDuration(r.initial_backoff), " and ",
                                                   absl::FormatDuration(r.max_backoff)));
  }
  if (!(r.backoff_multiplier >= 1.0 && std::isfinite(r.backoff_multiplier))) {
    return absl::InvalidArgumentError(
        absl::StrCat("retry.backoff_multiplier must be a finite number >= 1, got ", r.backoff_multiplier));
  }
  if (o.chunk_bytes <= 0)
    return absl::InvalidArgumentError(absl::StrCat("chunk_bytes must be > 0, got ", o.chunk_bytes));
  MEDAKV_RETURN_IF_ERROR(ResponseChunkBytes(o.response_chunk_bytes, "response_chunk_bytes").status());
  if (o.shared_memory_pool_bytes < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("shared_memory_pool_bytes must be >= 0, got ", o.shared_memory_pool_bytes));
  }
  if (o.shared_memory != SharedMemoryMode::kAuto && o.shared_memory != SharedMemoryMode::kOff &&
      o.shared_memory != SharedMemoryMode::kAlways) {
    return absl::InvalidArgumentError("shared_memory: expected kAuto, kOff or kAlways");
  }

  for (size_t i = 0; i < o.token.size(); ++i) {
    const char c = o.token[i];
    if (c <= ' ' || c >= 0x7f) {
      return absl::InvalidArgumentError(
          absl::StrCat("token: byte ", i, " is not printable ASCII (spaces and control characters are not allowed)"));
    }
  }

  std::unique_ptr<Client> client(new Client(std::move(o)));
  const ClientOptions& opts = client->options_;
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(-1);  // the server's --max_message_bytes is the limit that applies
  args.SetMaxSendMessageSize(-1);
  if (!opts.load_balancing_policy.empty()) args.SetLoadBalancingPolicyName(opts.load_balancing_policy);
  // Reconnect on the retry policy's time scale (gRPC's default waits 1 s, then up to 2 min).
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS,
              static_cast<int>(std::max<int64_t>(1, absl::ToInt64Milliseconds(opts.retry.initial_backoff))));
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS,
              static_cast<int>(std::clamp<int64_t>(absl::ToInt64Milliseconds(opts.retry.max_backoff), 1, INT32_MAX)));
  const std::shared_ptr<grpc::ChannelCredentials> credentials =
      opts.credentials != nullptr ? opts.credentials : grpc::InsecureChannelCredentials();
  for (const std::string& target : opts.targets) {
    auto r = std::make_unique<Replica>();
    r->target = target;
    if (opts.token.empty()) {
      r->channel = grpc::CreateCustomChannel(target, credentials, args);
    } else {
      std::vector<std::unique_ptr<grpc::experimental::ClientInterceptorFactoryInterface>> factories;
      factories.push_back(std::make_unique<BearerTokenFactory>(absl::StrCat("Bearer ", opts.token)));
      r->channel = grpc::experimental::CreateCustomChannelWithInterceptors(target, credentials, args,
                                                                           std::move(factories));
      r->needs_shm_prefix = true;
    }
    r->stub = v1::Medakv::NewStub(r->channel);
    r->health = grpc::health::v1::Health::NewStub(r->channel);
    r->shm = opts.shared_memory == SharedMemoryMode::kAlways ||
             (opts.shared_memory == SharedMemoryMode::kAuto && IsLocalTarget(target));
    client->replicas_.push_back(std::move(r));
  }
  return client;
}

size_t Client::ReplicaIndex(absl::string_view cache_id) const { return RendezvousPick(options_.targets, cache_id); }

const std::string& Client::ReplicaFor(absl::string_view cache_id) const {
  return options_.targets[ReplicaIndex(cache_id)];
}

Replica& Client::PickForCompress() {
  const size_t n = replicas_.size();
  const size_t start = static_cast<size_t>(next_compress_.fetch_add(1, std::memory_order_relaxed) % n);
  if (n == 1) return *replicas_[0];
  for (size_t i = 0; i < n; ++i) {  // skip a replica whose connection is failing, while another is not
    Replica& r = *replicas_[(start + i) % n];
    if (r.channel->GetState(/*try_to_connect=*/true) != GRPC_CHANNEL_TRANSIENT_FAILURE) return r;
  }
  return *replicas_[start];
}

// ---- Compress -------------------------------------------------------------------------

absl::StatusOr<RemoteResult> Client::Compress(const CacheInput& in, const CompressOptions& options,
                                              const CallOptions& call) {
  MEDAKV_RETURN_IF_ERROR(ValidateCacheInput(in));
  MEDAKV_RETURN_IF_ERROR(ValidateOptions(options));
  MEDAKV_RETURN_IF_ERROR(CheckPolicyChoice(call));
  MEDAKV_ASSIGN_OR_RETURN(const CacheSpec spec, SpecFromInput(in));
  MEDAKV_ASSIGN_OR_RETURN(const absl::Time deadline, CallDeadline(options_, call));
  Replica& r = PickForCompress();
  RemoteOptions remote;
  remote.chunk_bytes = options_.chunk_bytes;
  remote.response_chunk_bytes = options_.response_chunk_bytes;
  remote.progress = call.progress;
  remote.preset = call.preset;
  remote.server_default = call.server_default;
  remote.preset_rho = call.preset_rho;
  int64_t input_end = 0;
  (void)client_internal::ShmLayout(client_internal::RequestTensors(in, spec), &input_end);
  std::optional<RegionLoan> loan =
      ShmAvailable(r) ? BorrowRegion(r, options_, input_end + ResultBytesBound(spec), deadline) : std::nullopt;
  if (loan) remote.shared_memory = loan->lease();
  if (deadline != absl::InfiniteFuture()) remote.timeout = std::max(deadline - absl::Now(), absl::ZeroDuration());
  absl::StatusOr<RemoteResult> got = CompressRemote(*r.stub, in, options, remote);
  if (!got.ok()) return WithReplica(r, "", got.status());
  if (loan) loan->MarkClean();
  got->target = r.target;
  got->shared_memory = loan.has_value();
  return got;
}

// ---- PutCache --------------------------------------------------------------------------

absl::StatusOr<PutResult> Client::PutCache(absl::string_view cache_id, const CacheInput& in, const PutOptions& put,
                                           const CallOptions& call) {
  MEDAKV_RETURN_IF_ERROR(CheckCacheId(cache_id));
  if (put.ttl_seconds < 0) {
    return absl::InvalidArgumentError(absl::StrCat("ttl_seconds must be >= 0, got ", put.ttl_seconds));
  }
  if (!v1::CacheTier_IsValid(put.tier)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "tier must be CACHE_TIER_AUTO, CACHE_TIER_HOST or CACHE_TIER_DEVICE, got ", static_cast<int>(put.tier)));
  }
  CacheSpec spec;
  if (put.with_statistics) {
    MEDAKV_RETURN_IF_ERROR(ValidateCacheInput(in));
    MEDAKV_ASSIGN_OR_RETURN(spec, SpecFromInput(in));
  } else {
    MEDAKV_ASSIGN_OR_RETURN(spec, KeysValuesSpec(in));
  }
  const std::vector<client_internal::TensorPiece> pieces = client_internal::RequestTensors(in, spec);
  MEDAKV_ASSIGN_OR_RETURN(const absl::Time deadline, CallDeadline(options_, call));
  Replica& r = *replicas_[ReplicaIndex(cache_id)];

  int64_t shm_end = 0;
  const std::vector<int64_t> shm_offsets = client_internal::ShmLayout(pieces, &shm_end);
  std::optional<RegionLoan> loan = ShmAvailable(r) ? BorrowRegion(r, options_, shm_end, deadline) : std::nullopt;

  grpc::ClientContext context;
  SetDeadline(context, deadline);
  v1::PutCacheResponse response;
  std::unique_ptr<grpc::ClientWriter<v1::PutCacheRequest>> writer = r.stub->PutCache(&context, &response);
  v1::PutCacheRequest header;
  v1::PutCacheHeader* h = header.mutable_header();
  h->set_cache_id(std::string(cache_id));
  ToProto(spec, h);
  h->set_ttl_seconds(put.ttl_seconds);
  h->set_overwrite(put.overwrite);
  h->set_tier(put.tier);
  const bool sent = writer->Write(header) && client_internal::WriteTensors<v1::PutCacheRequest>(
                                                 *writer, pieces, options_.chunk_bytes, loan ? loan->lease() : nullptr,
                                                 shm_offsets, call.progress);
  if (sent) writer->WritesDone();
  const grpc::Status status = writer->Finish();
  if (!status.ok()) return WithReplica(r, cache_id, FromGrpc(status));
  if (!sent) return WithReplica(r, cache_id, absl::UnavailableError("the stream closed before the cache was sent"));
  if (loan) loan->MarkClean();
  PutResult out;
  out.info = std::move(*response.mutable_info());
  out.target = r.target;
  out.shared_memory = loan.has_value();
  for (const client_internal::TensorPiece& p : pieces) out.bytes_sent += p.size;
  return out;
}

// ---- CompressCache, DeleteCache ---------------------------------------------------------

absl::StatusOr<v1::CompressCacheResponse> Client::CompressCache(absl::string_view cache_id,
                                                                const CompressOptions& options,
                                                                const CallOptions& call) {
  MEDAKV_RETURN_IF_ERROR(CheckCacheId(cache_id));
  MEDAKV_RETURN_IF_ERROR(ValidateOptions(options));
  MEDAKV_RETURN_IF_ERROR(CheckPolicyChoice(call));
  Replica& r = *replicas_[ReplicaIndex(cache_id)];
  MEDAKV_ASSIGN_OR_RETURN(const absl::Time deadline, CallDeadline(options_, call));
  grpc::ClientContext context;
  SetDeadline(context, deadline);
  v1::CompressCacheRequest request;
  request.set_cache_id(std::string(cache_id));
  *request.mutable_policy() = RequestPolicy(options, call.preset, call.preset_rho, call.server_default);
  v1::CompressCacheResponse response;
  const grpc::Status status = r.stub->CompressCache(&context, request, &response);
  if (!status.ok()) return WithReplica(r, cache_id, FromGrpc(status));
  return response;
}

absl::StatusOr<int64_t> Client::DeleteCache(absl::string_view cache_id, const CallOptions& call) {
  MEDAKV_RETURN_IF_ERROR(CheckCacheId(cache_id));
  Replica& r = *replicas_[ReplicaIndex(cache_id)];
  MEDAKV_ASSIGN_OR_RETURN(const absl::Time deadline, CallDeadline(options_, call));
  grpc::ClientContext context;
  SetDeadline(context, deadline);
  v1::DeleteCacheRequest request;
  request.set_cache_id(std::string(cache_id));
  v1::DeleteCacheResponse response;
  const grpc::Status status = r.stub->DeleteCache(&context, request, &response);
  if (!status.ok()) return WithReplica(r, cache_id, FromGrpc(status));
  return response.bytes_freed();
}

// ---- GetCache ------------------------------------------------------------------------------

namespace {

// One attempt: with `try_shm`, the stored size first (ListCaches of the id,
// which bounds the output), then GetCache into a region of that size.
absl::StatusOr<FetchedCache> GetOnce(Replica& r, const ClientOptions& o, absl::string_view cache_id,
                                     const GetOptions& get, const CallOptions& call, absl::Time deadline,
                                     bool try_shm) {
  int64_t stored_bytes = 0;  // 0: use the socket
  if (try_shm && ShmAvailable(r)) {
    grpc::ClientContext context;
    SetDeadline(context, deadline);
    v1::ListCachesRequest request;
    request.set_prefix(std::string(cache_id));
    request.set_limit(1);
    v1::ListCachesResponse response;
    const grpc::Status status = r.stub->ListCaches(&context, request, &response);
    if (!status.ok()) return FromGrpc(status);
    if (response.caches_size() == 1 && response.caches(0).cache_id() == cache_id) {
      stored_bytes = response.caches(0).bytes();
    }  // else GetCache says NOT_FOUND
  }
  std::optional<RegionLoan> loan = stored_bytes > 0 ? BorrowRegion(r, o, stored_bytes, deadline) : std::nullopt;
  grpc::ClientContext context;
  SetDeadline(context, deadline);
  v1::GetCacheRequest request;
  request.set_cache_id(std::string(cache_id));
  request.set_layer_begin(get.layer_begin);
  request.set_layer_end(get.layer_end);
  request.set_max_response_chunk_bytes(o.response_chunk_bytes);
  if (loan) {
    v1::SharedMemoryRef* out = request.mutable_output();
    out->set_region(loan->lease()->name());
    out->set_offset(0);
    out->set_length(loan->size());
  }
  std::unique_ptr<grpc::ClientReader<v1::GetCacheResponse>> stream = r.stub->GetCache(&context, request);
  FetchedCache out;
  std::optional<client_internal::ResultReader> reader;
  v1::GetCacheResponse response;
  while (stream->Read(&response)) {
    absl::Status s = absl::OkStatus();
    if (response.has_info()) {
      const v1::CacheShape& shape = response.info().shape();
      const int32_t layers = shape.layers();
      const int32_t begin = get.layer_begin, end = get.layer_end == 0 ? layers : get.layer_end;
      absl::StatusOr<DType> dtype = DTypeFromProto(shape.dtype(), "info.shape.dtype");
      if (reader) {
        s = absl::InternalError("the server sent the cache's info twice");
      } else if (!dtype.ok()) {
        s = absl::InternalError(dtype.status().message());
      } else if (begin < 0 || begin >= end || end > layers || shape.kv_heads() <= 0 || shape.head_dim() <= 0 ||
                 response.info().layer_tokens_size() != layers) {
        s = absl::InternalError(absl::StrCat("the server sent an inconsistent cache info: ",
                                             response.info().ShortDebugString().substr(0, 300)));
      } else {
        out.info = response.info();
        out.layer_begin = begin;
        client_internal::ResultReader::Shape rs;
        rs.kv_heads = shape.kv_heads();
        rs.head_dim = shape.head_dim();
        rs.dtype = *dtype;
        rs.max_tokens = shape.tokens();
        rs.first_layer = begin;
        rs.layers = end - begin;
        reader.emplace(rs, loan ? loan->lease() : nullptr, 0, loan ? loan->size() : 0, call.progress);
        int64_t expected = 0;
        for (int32_t l = begin; l < end; ++l) {
          expected += out.info.layer_tokens(l) * rs.kv_heads * (2 * rs.head_dim * DTypeSize(rs.dtype) + 4);
        }
        reader->set_expected_bytes(expected);
      }
    } else if (!reader) {
      s = absl::InternalError("the server sent layers before the cache's info");
    } else if (response.has_layer()) {
      s = reader->OnLayer(response.layer());
    } else if (response.has_chunk()) {
      s = reader->OnChunk(response.chunk());
    }
    if (!s.ok()) {
      context.TryCancel();
      while (stream->Read(&response)) {
      }
      (void)stream->Finish();
      return s;
    }
  }
  const grpc::Status status = stream->Finish();
  if (!status.ok()) return FromGrpc(status);
  if (!reader) return absl::InternalError("the server ended GetCache without the cache's info");
  MEDAKV_RETURN_IF_ERROR(reader->CheckComplete());
  out.layers = std::move(reader->layers());
  out.bytes_received = reader->bytes();
  out.shared_memory = loan.has_value();
  if (loan) loan->MarkClean();
  return out;
}

}  // namespace

absl::StatusOr<FetchedCache> Client::GetCache(absl::string_view cache_id, const GetOptions& get,
                                              const CallOptions& call) {
  MEDAKV_RETURN_IF_ERROR(CheckCacheId(cache_id));
  if (get.layer_begin < 0 || get.layer_end < 0 || (get.layer_end != 0 && get.layer_end <= get.layer_begin)) {
    return absl::InvalidArgumentError(absl::StrCat("layer range [", get.layer_begin, ", ", get.layer_end,
                                                   "): need 0 <= layer_begin < layer_end (layer_end 0: every layer)"));
  }
  Replica& r = *replicas_[ReplicaIndex(cache_id)];
  MEDAKV_ASSIGN_OR_RETURN(const absl::Time deadline, CallDeadline(options_, call));
  absl::StatusOr<FetchedCache> out;
  const absl::Status s = RetryCall(options_, "GetCache", r, deadline, [&] {
    out = GetOnce(r, options_, cache_id, get, call, deadline, /*try_shm=*/true);
    // The cache grew between the size check and the download (overwritten): use the socket.
    if (OutputAreaTooSmall(out.status())) out = GetOnce(r, options_, cache_id, get, call, deadline, false);
    return out.status();
  });
  if (!s.ok()) return WithReplica(r, cache_id, s);
  out->target = r.target;
  return out;
}

// ---- ListCaches, Stats, Health ----------------------------------------------------------------

absl::StatusOr<CacheList> Client::ListCaches(absl::string_view prefix, int32_t limit, const CallOptions& call) {
  if (limit < 0) return absl::InvalidArgumentError(absl::StrCat("limit must be >= 0, got ", limit));
  MEDAKV_ASSIGN_OR_RETURN(const absl::Time deadline, CallDeadline(options_, call));
  const size_t n = replicas_.size();
  const int64_t max = limit == 0 ? 1000 : limit;
  // Each replica's caches, page after page, until `max` or its last page.
  std::vector<std::vector<v1::CacheInfo>> listed(n);
  std::vector<absl::Status> statuses(n);
  ForEachReplica(n, [&](size_t i) {
    const Replica& r = *replicas_[i];
    std::string token;
    do {
      v1::ListCachesResponse response;
      statuses[i] = RetryCall(options_, "ListCaches", r, deadline, [&] {
        grpc::ClientContext context;
        SetDeadline(context, deadline);
        v1::ListCachesRequest request;
        request.set_prefix(std::string(prefix));
        request.set_limit(static_cast<int32_t>(max - static_cast<int64_t>(listed[i].size())));
        request.set_page_token(token);
        response.Clear();
        return FromGrpc(r.stub->ListCaches(&context, request, &response));
      });
      if (!statuses[i].ok()) return;
      for (v1::CacheInfo& info : *response.mutable_caches()) listed[i].push_back(std::move(info));
      token = response.next_page_token();
    } while (!token.empty() && static_cast<int64_t>(listed[i].size()) < max);
  });
  CacheList out;
  for (size_t i = 0; i < n; ++i) {
    if (!statuses[i].ok()) {
      out.errors.push_back(ReplicaError{replicas_[i]->target, WithReplica(*replicas_[i], "", statuses[i])});
      continue;
    }
    for (v1::CacheInfo& info : listed[i]) out.caches.push_back(ListedCache{std::move(info), replicas_[i]->target});
  }
  if (out.errors.size() == n) return out.errors.front().status;
  std::sort(out.caches.begin(), out.caches.end(),
            [](const ListedCache& a, const ListedCache& b) { return a.info.cache_id() < b.info.cache_id(); });
  if (out.caches.size() > static_cast<size_t>(max)) out.caches.resize(static_cast<size_t>(max));
  return out;
}

absl::StatusOr<ClusterStats> Client::Stats(const CallOptions& call) {
  MEDAKV_ASSIGN_OR_RETURN(const absl::Time deadline, CallDeadline(options_, call));
  const size_t n = replicas_.size();
  std::vector<v1::StatsResponse> responses(n);
  std::vector<absl::Status> statuses(n);
  ForEachReplica(n, [&](size_t i) {
    const Replica& r = *replicas_[i];
    statuses[i] = RetryCall(options_, "Stats", r, deadline, [&] {
      grpc::ClientContext context;
      SetDeadline(context, deadline);
      responses[i].Clear();
      return FromGrpc(r.stub->Stats(&context, v1::StatsRequest(), &responses[i]));
    });
  });
  ClusterStats out;
  std::map<std::string, v1::TierStats> tiers;  // by name, in name order
  std::vector<std::string> tier_order;
  for (size_t i = 0; i < n; ++i) {
    const Replica& r = *replicas_[i];
    if (!statuses[i].ok()) {
      out.replicas.push_back({r.target, WithReplica(r, "", statuses[i])});
      continue;
    }
    const v1::StatsResponse& s = responses[i];
    v1::StatsResponse& t = out.total;
    for (const v1::TierStats& tier : s.tiers()) {
      auto [it, inserted] = tiers.try_emplace(tier.tier());
      if (inserted) {
        it->second.set_tier(tier.tier());
        tier_order.push_back(tier.tier());
      }
      it->second.set_capacity_bytes(it->second.capacity_bytes() + tier.capacity_bytes());
      it->second.set_used_bytes(it->second.used_bytes() + tier.used_bytes());
      it->second.set_entries(it->second.entries() + tier.entries());
      it->second.set_evictions(it->second.evictions() + tier.evictions());
    }
    t.set_inflight_compressions(t.inflight_compressions() + s.inflight_compressions());
    t.set_shared_memory_regions(t.shared_memory_regions() + s.shared_memory_regions());
    t.set_backend(out.answered == 0 || t.backend() == s.backend() ? s.backend() : "mixed");
    t.set_version(out.answered == 0 || t.version() == s.version() ? s.version() : "mixed");
    ++out.answered;
    out.replicas.push_back({r.target, s});
  }
  for (const std::string& name : tier_order) *out.total.add_tiers() = tiers[name];
  if (out.answered == 0) return out.replicas.front().stats.status();
  return out;
}

std::vector<ReplicaHealth> Client::Health(const CallOptions& call) {
  std::vector<ReplicaHealth> out(replicas_.size());
  if (call.deadline.has_value() && *call.deadline <= absl::ZeroDuration()) {
    for (size_t i = 0; i < out.size(); ++i) {
      out[i].target = replicas_[i]->target;
      out[i].status = CallDeadline(options_, call).status();
    }
    return out;
  }
  absl::Duration timeout = call.deadline.value_or(options_.deadline);
  if (timeout == absl::InfiniteDuration()) timeout = kHealthTimeout;
  const absl::Time deadline = absl::Now() + timeout;
  ForEachReplica(replicas_.size(), [&](size_t i) {
    const Replica& r = *replicas_[i];
    ReplicaHealth& h = out[i];
    h.target = r.target;
    grpc::ClientContext context;
    SetDeadline(context, deadline);
    grpc::health::v1::HealthCheckResponse response;
    const auto t0 = std::chrono::steady_clock::now();
    h.status =
        WithReplica(r, "", FromGrpc(r.health->Check(&context, grpc::health::v1::HealthCheckRequest(), &response)));
    h.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (h.status.ok()) h.serving = response.status();
  });
  return out;
}

}  // namespace medakv
