#include "service/server/metrics.h"

#include <dirent.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <iterator>
#include <limits>
#include <sstream>
#include <string>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"
#include "prometheus/labels.h"

namespace medakv::server {
namespace {

using prometheus::Counter;
using prometheus::Gauge;
using prometheus::Histogram;
using prometheus::Labels;

// 100 us to 60 s, about three buckets a decade: the stages of a small cache
// on a GPU take well under a millisecond, a long context on the CPU backend
// tens of seconds; --queue_timeout is 30 s by default.
const Histogram::BucketBoundaries& LatencyBuckets() {
  static const Histogram::BucketBoundaries b{0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                             0.25,   0.5,     1,      2.5,   5,      10,    20,   30,    60};
  return b;
}

// Kept tokens over input tokens: rho is typically 0.05 - 0.5.
const Histogram::BucketBoundaries& RatioBuckets() {
  static const Histogram::BucketBoundaries b{0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3,
                                             0.4,  0.5,  0.6,  0.7, 0.8,  0.9, 1};
  return b;
}

// A layer's budget over its tokens: coarse, as there is one histogram per
// layer (the heatmap uses _sum / _count, the mean).
const Histogram::BucketBoundaries& LayerBudgetBuckets() {
  static const Histogram::BucketBoundaries b{0.02, 0.05, 0.1, 0.2, 0.4, 0.7, 1};
  return b;
}

int64_t NowNanos() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// ---- process metrics (Linux /proc) ----------------------------------------------------------

// The whole of a (small) file; false when it cannot be read.
bool ReadFile(const std::string& path, std::string* out) {
  std::ifstream f(path);
  if (!f) return false;
  std::ostringstream s;
  s << f.rdbuf();
  if (f.bad()) return false;
  *out = s.str();
  return true;
}

// A metric family of one unlabelled sample.
prometheus::MetricFamily OneSample(const char* name, const char* help, prometheus::MetricType type, double value) {
  prometheus::MetricFamily f;
  f.name = name;
  f.help = help;
  f.type = type;
  prometheus::ClientMetric m;
  if (type == prometheus::MetricType::Counter) {
    m.counter.value = value;
  } else {
    m.gauge.value = value;
  }
  f.metric.push_back(std::move(m));
  return f;
}

// The fields of /proc/self/stat after the command name (which may hold
// spaces and parentheses: it ends at the last ')'): [0] is field 3 (state).
bool StatFields(const std::string& proc_root, std::vector<std::string>* fields) {
  std::string text;
  if (!ReadFile(proc_root + "/self/stat", &text)) return false;
  const size_t close = text.rfind(')');
  if (close == std::string::npos) return false;
  *fields = absl::StrSplit(absl::string_view(text).substr(close + 1), ' ', absl::SkipWhitespace());
  return fields->size() >= 22;
}

// The boot time (unix seconds): the "btime" line of /proc/stat.
bool BootTime(const std::string& proc_root, double* seconds) {
  std::string text;
  if (!ReadFile(proc_root + "/stat", &text)) return false;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    if (absl::ConsumePrefix(&line, "btime ")) return absl::SimpleAtod(absl::StripAsciiWhitespace(line), seconds);
  }
  return false;
}

// Open file descriptors: the entries of /proc/self/fd but the one listing it.
bool OpenFds(const std::string& proc_root, double* count) {
  DIR* dir = opendir((proc_root + "/self/fd").c_str());
  if (dir == nullptr) return false;
  const std::string own = std::to_string(dirfd(dir));
  int64_t n = 0;
  while (const dirent* e = readdir(dir)) {
    const absl::string_view name = e->d_name;
    if (name == "." || name == ".." || name == own) continue;
    ++n;
  }
  closedir(dir);
  *count = static_cast<double>(n);
  return true;
}

// The soft limit on open files ("Max open files" in /proc/self/limits;
// "unlimited": +Inf).
bool MaxFds(const std::string& proc_root, double* limit) {
  std::string text;
  if (!ReadFile(proc_root + "/self/limits", &text)) return false;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    if (!absl::ConsumePrefix(&line, "Max open files")) continue;
    const std::vector<absl::string_view> cols = absl::StrSplit(line, ' ', absl::SkipWhitespace());
    if (cols.empty()) return false;
    if (cols[0] == "unlimited") {
      *limit = std::numeric_limits<double>::infinity();
      return true;
    }
    return absl::SimpleAtod(cols[0], limit);
  }
  return false;
}

bool HasStage(Method m, Stage s) {
  switch (m) {
    case Method::kCompress:
      return true;
    case Method::kCompressCache:
      return s == Stage::kStatistics || s == Stage::kAllocate || s == Stage::kSelectMerge;
    case Method::kPutCache:
      return s == Stage::kReceive;
    case Method::kGetCache:
      return s == Stage::kSend;
    default:
      return false;
  }
}

}  // namespace

std::vector<prometheus::MetricFamily> ProcessMetrics(const std::string& proc_root) {
  using prometheus::MetricType;
  std::vector<prometheus::MetricFamily> out;
  std::vector<std::string> f;
  const long ticks = sysconf(_SC_CLK_TCK);  // NOLINT(runtime/int): sysconf's type
  const long page = sysconf(_SC_PAGESIZE);  // NOLINT(runtime/int)
  if (StatFields(proc_root, &f) && ticks > 0 && page > 0) {
    // utime, stime (fields 14, 15: ticks), starttime (22: ticks since boot),
    // vsize (23: bytes), rss (24: pages).
    double utime, stime, start, vsize, rss;
    if (absl::SimpleAtod(f[11], &utime) && absl::SimpleAtod(f[12], &stime)) {
      out.push_back(OneSample("process_cpu_seconds_total", "Total user and system CPU time spent in seconds",
                              MetricType::Counter, (utime + stime) / static_cast<double>(ticks)));
    }
    if (absl::SimpleAtod(f[21], &rss)) {
      out.push_back(OneSample("process_resident_memory_bytes", "Resident memory size in bytes", MetricType::Gauge,
                              rss * static_cast<double>(page)));
    }
    if (absl::SimpleAtod(f[20], &vsize)) {
      out.push_back(
          OneSample("process_virtual_memory_bytes", "Virtual memory size in bytes", MetricType::Gauge, vsize));
    }
    double boot;
    if (absl::SimpleAtod(f[19], &start) && BootTime(proc_root, &boot)) {
      out.push_back(OneSample("process_start_time_seconds", "Start time of the process since unix epoch in seconds",
                              MetricType::Gauge, boot + start / static_cast<double>(ticks)));
    }
  }
  double fds;
  if (OpenFds(proc_root, &fds)) {
    out.push_back(OneSample("process_open_fds", "Number of open file descriptors", MetricType::Gauge, fds));
  }
  double max_fds;
  if (MaxFds(proc_root, &max_fds)) {
    out.push_back(OneSample("process_max_fds", "Maximum number of open file descriptors", MetricType::Gauge, max_fds));
  }
  return out;
}

const char* MethodName(Method m) {
  switch (m) {
    case Method::kCompress:
      return "Compress";
    case Method::kPutCache:
      return "PutCache";
    case Method::kCompressCache:
      return "CompressCache";
    case Method::kGetCache:
      return "GetCache";
    case Method::kDeleteCache:
      return "DeleteCache";
    case Method::kListCaches:
      return "ListCaches";
    case Method::kStats:
      return "Stats";
    case Method::kRegisterSharedMemory:
      return "RegisterSharedMemory";
    case Method::kUnregisterSharedMemory:
      return "UnregisterSharedMemory";
  }
  return "unknown";
}

const char* StageName(Stage s) {
  switch (s) {
    case Stage::kReceive:
      return "receive";
    case Stage::kStatistics:
      return "statistics";
    case Stage::kAllocate:
      return "allocate";
    case Stage::kSelectMerge:
      return "select_merge";
    case Stage::kSend:
      return "send";
  }
  return "unknown";
}

const char* CodeName(absl::StatusCode code) {
  static constexpr const char* kNames[] = {
      "OK",        "CANCELLED",      "UNKNOWN",           "INVALID_ARGUMENT",   "DEADLINE_EXCEEDED",
      "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
      "ABORTED",   "OUT_OF_RANGE",   "UNIMPLEMENTED",     "INTERNAL",           "UNAVAILABLE",
      "DATA_LOSS", "UNAUTHENTICATED"};
  const int i = static_cast<int>(code);
  if (i < 0 || i >= static_cast<int>(std::size(kNames))) return "UNKNOWN";
  return kNames[i];
}

static_assert(static_cast<int>(PolicyKind::kAmber) + 1 == kNumPolicyKinds, "kNumPolicyKinds: PolicyKind's values");

Metrics::Metrics(const std::string& version, const std::string& backend, const std::vector<std::string>& presets)
    : registry_(std::make_shared<prometheus::Registry>()),
      requests_(prometheus::BuildCounter()
                    .Name("medakv_requests_total")
                    .Help("Calls that ended, by method, policy (\"none\" when the call has none) and gRPC status code")
                    .Register(*registry_)),
      preset_requests_(prometheus::BuildCounter()
                           .Name("medakv_preset_requests_total")
                           .Help("Compress and CompressCache calls that ended, by method, policy preset "
                                 "(--policy_presets; \"none\": no preset) and gRPC status code")
                           .Register(*registry_)),
      request_duration_(prometheus::BuildHistogram()
                            .Name("medakv_request_duration_seconds")
                            .Help("Duration of calls from their start to their status, by method (for "
                                  "RegisterSharedMemory: the lease)")
                            .Register(*registry_)),
      stage_duration_(prometheus::BuildHistogram()
                          .Name("medakv_stage_duration_seconds")
                          .Help("Duration of the stages of a call, by method and stage (receive, statistics, "
                                "allocate, select_merge, send)")
                          .Register(*registry_)),
      queue_wait_(prometheus::BuildHistogram()
                      .Name("medakv_queue_wait_seconds")
                      .Help("Time compressions waited for an admission slot (--max_inflight), by method")
                      .Register(*registry_)),
      received_bytes_(prometheus::BuildCounter()
                          .Name("medakv_received_bytes_total")
                          .Help("Tensor bytes received (in messages or through shared memory), by method")
                          .Register(*registry_)),
      sent_bytes_(prometheus::BuildCounter()
                      .Name("medakv_sent_bytes_total")
                      .Help("Tensor bytes sent (in messages or through shared memory), by method")
                      .Register(*registry_)),
      inflight_(prometheus::BuildGauge()
                    .Name("medakv_inflight_requests")
                    .Help("Calls in progress, by method")
                    .Register(*registry_)),
      tokens_in_(prometheus::BuildCounter()
                     .Name("medakv_tokens_in_total")
                     .Help("Tokens (layers x tokens) of completed compressions, by policy")
                     .Register(*registry_)),
      tokens_kept_(prometheus::BuildCounter()
                       .Name("medakv_tokens_kept_total")
                       .Help("Tokens kept (the sum of the layer budgets) by completed compressions, by policy")
                       .Register(*registry_)),
      compression_ratio_(prometheus::BuildHistogram()
                             .Name("medakv_compression_ratio")
                             .Help("Kept tokens over input tokens of each completed compression, by policy")
                             .Register(*registry_)),
      layer_budget_(prometheus::BuildHistogram()
                        .Name("medakv_layer_budget_ratio")
                        .Help("Budget of each layer over its tokens (B_l / T) in completed compressions, by policy "
                              "and layer index (layers from 128 on: \"other\")")
                        .Register(*registry_)),
      store_capacity_(prometheus::BuildGauge()
                          .Name("medakv_store_capacity_bytes")
                          .Help("Byte budget of the cache store, by tier")
                          .Register(*registry_)),
      store_used_(prometheus::BuildGauge()
                      .Name("medakv_store_used_bytes")
                      .Help("Bytes of the cache store in use (reserved by uploads, stored, and removed but still "
                            "read), by tier")
                      .Register(*registry_)),
      store_entries_(
          prometheus::BuildGauge().Name("medakv_store_entries").Help("Caches stored, by tier").Register(*registry_)),
      store_evictions_(prometheus::BuildCounter()
                           .Name("medakv_store_evictions_total")
                           .Help("Caches evicted, by tier and reason (lru: to make room; expired: past their ttl)")
                           .Register(*registry_)),
      admission_slots_(prometheus::BuildGauge()
                           .Name("medakv_admission_slots")
                           .Help("Compressions that may hold memory at once (--max_inflight)")
                           .Register(*registry_)),
      admission_used_(prometheus::BuildGauge()
                          .Name("medakv_admission_slots_used")
                          .Help("Admission slots held by compressions")
                          .Register(*registry_)),
      queued_(prometheus::BuildGauge()
                  .Name("medakv_queued_requests")
                  .Help("Compressions waiting for an admission slot")
                  .Register(*registry_)),
      shm_regions_(prometheus::BuildGauge()
                       .Name("medakv_shm_regions")
                       .Help("Shared-memory regions registered")
                       .Register(*registry_)),
      shm_bytes_(prometheus::BuildGauge()
                     .Name("medakv_shm_registered_bytes")
                     .Help("Sum of the sizes of the shared-memory regions registered")
                     .Register(*registry_)),
      request_memory_(prometheus::BuildGauge()
                          .Name("medakv_request_memory_bytes")
                          .Help("Request bytes held by calls, by state (inflight: the tensor bytes admitted "
                                "compressions may hold, each its whole request as its header announced; queued: "
                                "the headers of calls waiting for an admission slot)")
                          .Register(*registry_)),
      request_memory_bound_(prometheus::BuildGauge()
                                .Name("medakv_request_memory_bound_bytes")
                                .Help("Bound on the inflight request bytes: --max_inflight x --max_request_bytes")
                                .Register(*registry_)) {
  prometheus::BuildGauge()
      .Name("medakv_build_info")
      .Help("Always 1: the server's version and the compute backend in use")
      .Register(*registry_)
      .Add({{"version", version}, {"backend", backend}})
      .Set(1);
  for (int i = 0; i < kNumMethods; ++i) {
    const Method m = static_cast<Method>(i);
    const std::string name = MethodName(m);
    inflight_by_method_[i] = &inflight_.Add({{"method", name}});
    duration_by_method_[i] = &request_duration_.Add({{"method", name}}, LatencyBuckets());
    for (int s = 0; s < kNumStages; ++s) {
      stage_by_method_[i][s] =
          HasStage(m, static_cast<Stage>(s))
              ? &stage_duration_.Add({{"method", name}, {"stage", StageName(static_cast<Stage>(s))}}, LatencyBuckets())
              : nullptr;
    }
  }
  // Series that dashboards and alerts read from the start (at 0): rate()
  // sees a series' increases only after its first sample.
  constexpr PolicyKind kPolicies[] = {PolicyKind::kFull, PolicyKind::kMeda,   PolicyKind::kStreamingLlm,
                                      PolicyKind::kH2O,  PolicyKind::kSnapKV, PolicyKind::kPyramidKV,
                                      PolicyKind::kLookM, PolicyKind::kAmber};
  for (int i = 0; i < kNumMethods; ++i) {
    const Method m = static_cast<Method>(i);
    if (m == Method::kCompress || m == Method::kCompressCache) {
      for (PolicyKind p : kPolicies) {
        requests_.Add({{"method", MethodName(m)}, {"policy", PolicyName(p)}, {"code", "OK"}});
      }
    } else {
      requests_.Add({{"method", MethodName(m)}, {"policy", kNoPolicy}, {"code", "OK"}});
    }
  }
  for (Method m : {Method::kCompress, Method::kCompressCache}) {
    preset_requests_.Add({{"method", MethodName(m)}, {"preset", kNoPreset}, {"code", "OK"}});
    for (const std::string& p : presets) {
      preset_requests_.Add({{"method", MethodName(m)}, {"preset", p}, {"code", "OK"}});
    }
  }
  for (PolicyKind p : kPolicies) {
    tokens_in_.Add({{"policy", PolicyName(p)}});
    tokens_kept_.Add({{"policy", PolicyName(p)}});
  }
  for (Method m : {Method::kCompress, Method::kCompressCache}) {
    queue_wait_.Add({{"method", MethodName(m)}}, LatencyBuckets());
  }
  for (Method m : {Method::kCompress, Method::kPutCache}) received_bytes_.Add({{"method", MethodName(m)}});
  for (Method m : {Method::kCompress, Method::kGetCache}) sent_bytes_.Add({{"method", MethodName(m)}});
  admission_slots_.Add({});
  admission_used_.Add({});
  queued_.Add({});
  shm_regions_.Add({});
  shm_bytes_.Add({});
  request_memory_.Add({{"state", "inflight"}});
  request_memory_.Add({{"state", "queued"}});
  request_memory_bound_.Add({});
}

Metrics::~Metrics() = default;

void Metrics::SetSampler(std::function<MetricsSample()> sampler) {
  absl::MutexLock lock(&sample_mu_);
  sampler_ = std::move(sampler);
}

std::vector<prometheus::MetricFamily> Metrics::Collect() const {
  Sample();
  std::vector<prometheus::MetricFamily> families = registry_->Collect();
  std::vector<prometheus::MetricFamily> process = ProcessMetrics();
  families.insert(families.end(), std::make_move_iterator(process.begin()), std::make_move_iterator(process.end()));
  return families;
}

void Metrics::Sample() const {
  absl::MutexLock lock(&sample_mu_);
  if (!sampler_) return;
  const MetricsSample s = sampler_();
  for (const TierStats& t : s.tiers) {
    const int i = static_cast<int>(t.tier);
    const Labels tier{{"tier", TierName(t.tier)}};
    store_capacity_.Add(tier).Set(static_cast<double>(t.capacity_bytes));
    store_used_.Add(tier).Set(static_cast<double>(t.used_bytes));
    store_entries_.Add(tier).Set(static_cast<double>(t.entries));
    const int64_t counts[2] = {t.evicted_lru, t.expired};
    const char* reasons[2] = {"lru", "expired"};
    for (int r = 0; r < 2; ++r) {
      Counter& c = store_evictions_.Add({{"tier", TierName(t.tier)}, {"reason", reasons[r]}});
      if (counts[r] > evictions_seen_[i][r]) {
        c.Increment(static_cast<double>(counts[r] - evictions_seen_[i][r]));
        evictions_seen_[i][r] = counts[r];
      }
    }
  }
  admission_slots_.Add({}).Set(s.admission_slots);
  admission_used_.Add({}).Set(s.admission_in_use);
  queued_.Add({}).Set(s.admission_waiting);
  shm_regions_.Add({}).Set(s.shm_regions);
  shm_bytes_.Add({}).Set(static_cast<double>(s.shm_bytes));
  request_memory_.Add({{"state", "inflight"}}).Set(static_cast<double>(s.held_inflight_bytes));
  request_memory_.Add({{"state", "queued"}}).Set(static_cast<double>(s.held_queued_bytes));
  request_memory_bound_.Add({}).Set(static_cast<double>(s.held_bound_bytes));
}

void Metrics::CallStarted(Method m) { inflight_by_method_[static_cast<int>(m)]->Increment(); }
void Metrics::CallDone(Method m) { inflight_by_method_[static_cast<int>(m)]->Decrement(); }

void Metrics::CallEnded(Method m, const char* policy, absl::StatusCode code, double seconds) {
  requests_.Add({{"method", MethodName(m)}, {"policy", policy}, {"code", CodeName(code)}}).Increment();
  duration_by_method_[static_cast<int>(m)]->Observe(seconds);
}

void Metrics::PresetCallEnded(Method m, const std::string& preset, absl::StatusCode code) {
  preset_requests_.Add({{"method", MethodName(m)}, {"preset", preset}, {"code", CodeName(code)}}).Increment();
}

void Metrics::ObserveStage(Method m, Stage s, double seconds) {
  Histogram* h = stage_by_method_[static_cast<int>(m)][static_cast<int>(s)];
  if (h == nullptr) {  // a stage this method does not have (see HasStage): a series of its own
    h = &stage_duration_.Add({{"method", MethodName(m)}, {"stage", StageName(s)}}, LatencyBuckets());
  }
  h->Observe(seconds);
}

void Metrics::ObserveQueueWait(Method m, double seconds) {
  queue_wait_.Add({{"method", MethodName(m)}}, LatencyBuckets()).Observe(seconds);
}

void Metrics::AddReceivedBytes(Method m, int64_t bytes) {
  if (bytes > 0) received_bytes_.Add({{"method", MethodName(m)}}).Increment(static_cast<double>(bytes));
}

void Metrics::AddSentBytes(Method m, int64_t bytes) {
  if (bytes > 0) sent_bytes_.Add({{"method", MethodName(m)}}).Increment(static_cast<double>(bytes));
}

Histogram& Metrics::LayerBudget(PolicyKind policy, int64_t layer) {
  const size_t i = layer < kMaxBudgetLayers ? static_cast<size_t>(layer) : kMaxBudgetLayers;
  auto add = [&] {
    const std::string label = i < kMaxBudgetLayers ? std::to_string(i) : "other";
    return &layer_budget_.Add({{"policy", PolicyName(policy)}, {"layer", label}}, LayerBudgetBuckets());
  };
  const int p = static_cast<int>(policy);
  if (p < 0 || p >= kNumPolicyKinds) return *add();  // not a PolicyKind (cannot happen): not cached
  absl::MutexLock lock(&layers_mu_);
  std::vector<Histogram*>& by_layer = layer_budget_by_layer_[p];
  if (by_layer.size() <= i) by_layer.resize(i + 1, nullptr);
  Histogram*& h = by_layer[i];
  if (h == nullptr) h = add();
  return *h;
}

void Metrics::ObserveCompression(PolicyKind policy, const CompressResult& result, int64_t tokens) {
  const Labels labels{{"policy", PolicyName(policy)}};
  tokens_in_.Add(labels).Increment(static_cast<double>(result.tokens_in));
  tokens_kept_.Add(labels).Increment(static_cast<double>(result.tokens_kept));
  if (result.tokens_in > 0) {
    compression_ratio_.Add(labels, RatioBuckets())
        .Observe(static_cast<double>(result.tokens_kept) / static_cast<double>(result.tokens_in));
  }
  if (tokens <= 0) return;
  for (size_t l = 0; l < result.layers.size(); ++l) {
    LayerBudget(policy, static_cast<int64_t>(l))
        .Observe(static_cast<double>(result.layers[l].budget) / static_cast<double>(tokens));
  }
}

// ---- CallMetrics ------------------------------------------------------------------

CallMetrics::CallMetrics(Metrics* metrics, Method method) : metrics_(metrics), method_(method), start_ns_(NowNanos()) {
  if (metrics_ != nullptr) metrics_->CallStarted(method_);
}

double CallMetrics::seconds() const { return static_cast<double>(NowNanos() - start_ns_) * 1e-9; }

CallMetrics::~CallMetrics() {
  if (metrics_ != nullptr) metrics_->CallDone(method_);
}

void CallMetrics::ObserveStage(server::Stage stage, double seconds) {
  if (metrics_ != nullptr) metrics_->ObserveStage(method_, stage, seconds);
}

void CallMetrics::QueueWait(double seconds) {
  if (metrics_ != nullptr) metrics_->ObserveQueueWait(method_, seconds);
}

void CallMetrics::ReceivedSoFar(int64_t bytes) {
  if (bytes <= received_) return;
  if (metrics_ != nullptr) metrics_->AddReceivedBytes(method_, bytes - received_);
  received_ = bytes;
}

void CallMetrics::SentSoFar(int64_t bytes) {
  if (bytes <= sent_) return;
  if (metrics_ != nullptr) metrics_->AddSentBytes(method_, bytes - sent_);
  sent_ = bytes;
}

void CallMetrics::Compression(PolicyKind policy, const CompressResult& result, int64_t tokens) {
  if (metrics_ != nullptr) metrics_->ObserveCompression(policy, result, tokens);
}

void CallMetrics::End(absl::StatusCode code, absl::string_view message) {
  if (ended_) return;
  ended_ = true;
  const double seconds = static_cast<double>(NowNanos() - start_ns_) * 1e-9;
  if (metrics_ != nullptr) {
    metrics_->CallEnded(method_, policy_, code, seconds);
    if (method_ == Method::kCompress || method_ == Method::kCompressCache) {
      metrics_->PresetCallEnded(method_, preset_, code);
    }
  }
  if (log_ != nullptr) {
    log_->Record(CallRecord{MethodName(method_), code, std::string(message), peer_, tenant_, received_, sent_,
                            seconds});
  }
}

}  // namespace medakv::server
