// The Prometheus metrics of medakv-server (README.md, "Metrics", lists every
// one with its labels). A Metrics object owns a prometheus::Registry with
// typed families; the handlers record into it through a CallMetrics per call,
// and the server's state (cache store, admission queue, shared memory) is
// sampled at every collection, as are the process_* metrics of the process
// (Linux /proc). MedakvServer serves it on --metrics_listen with
// prometheus-cpp's pull exposer; without one (in-process tests) the values
// are read with Collect().
//
// Cardinality is bounded: every label value comes from a fixed set (method,
// stage, policy, status code, tier, eviction reason) except `layer`, which is
// capped at kMaxBudgetLayers values plus "other". No cache id, no peer.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "prometheus/collectable.h"
#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/metric_family.h"
#include "prometheus/registry.h"
#include "service/compress/options.h"
#include "service/compress/pipeline.h"
#include "service/server/call_log.h"
#include "service/store/cache_store.h"

namespace medakv::server {

// The RPCs of medakv.v1.Medakv: the `method` label.
enum class Method : uint8_t {
  kCompress = 0,
  kPutCache,
  kCompressCache,
  kGetCache,
  kDeleteCache,
  kListCaches,
  kStats,
  kRegisterSharedMemory,
  kUnregisterSharedMemory,
};
inline constexpr int kNumMethods = 9;
const char* MethodName(Method m);  // "Compress", ... (the proto's names)

// The stages of a call: the `stage` label (StageTimes in the proto).
enum class Stage : uint8_t { kReceive = 0, kStatistics, kAllocate, kSelectMerge, kSend };
inline constexpr int kNumStages = 5;
const char* StageName(Stage s);  // "receive", "statistics", "allocate", "select_merge", "send"

// The canonical gRPC code name ("OK", "INVALID_ARGUMENT", ...); "UNKNOWN"
// for a number outside the 17 codes.
const char* CodeName(absl::StatusCode code);

// The `policy` label of calls without one (every method but Compress and
// CompressCache, and compressions rejected before their policy was read).
inline constexpr char kNoPolicy[] = "none";
// The `preset` label of compressions that used no preset (docs/presets.md;
// no preset may be named "none").
inline constexpr char kNoPreset[] = "none";

// Layers 0 .. kMaxBudgetLayers-1 of a compression get their own `layer`
// label on medakv_layer_budget_ratio; deeper layers share "other".
inline constexpr int kMaxBudgetLayers = 128;
// PolicyKind's values (0 .. kNumPolicyKinds-1).
inline constexpr int kNumPolicyKinds = 8;

// The conventional process_* metrics of this process, read from `proc_root`
// (/proc: self/stat, self/fd, self/limits, and stat for the boot time):
// process_cpu_seconds_total, process_resident_memory_bytes,
// process_virtual_memory_bytes, process_start_time_seconds,
// process_open_fds and process_max_fds. A metric whose file cannot be read
// or parsed is left out (no /proc: none). Linux only.
std::vector<prometheus::MetricFamily> ProcessMetrics(const std::string& proc_root = "/proc");

// The server's state, read at every collection.
struct MetricsSample {
  std::vector<TierStats> tiers;  // the configured tiers
  int admission_slots = 0;       // --max_inflight
  int admission_in_use = 0;
  int admission_waiting = 0;
  int shm_regions = 0;
  int64_t shm_bytes = 0;
  // Request memory: the tensor bytes that admitted calls may hold (each its
  // whole request, as announced by its header), the bytes that queued calls
  // hold (their parsed headers), and the bound the README states for the
  // first (--max_inflight x --max_request_bytes).
  int64_t held_inflight_bytes = 0;
  int64_t held_queued_bytes = 0;
  int64_t held_bound_bytes = 0;
};

class Metrics final : public prometheus::Collectable {
 public:
  // `version` and `backend` label medakv_build_info; `presets` are the
  // server's preset names (the `preset` label's values besides "none").
  Metrics(const std::string& version, const std::string& backend, const std::vector<std::string>& presets = {});
  ~Metrics() override;
  Metrics(const Metrics&) = delete;
  Metrics& operator=(const Metrics&) = delete;

  // Called at every collection to refresh the store, admission, request
  // memory and shared memory gauges; an empty function (the default) leaves
  // them as they are.
  // Must outlive its use: reset it before what it reads is destroyed.
  void SetSampler(std::function<MetricsSample()> sampler);

  // Samples the server's state, then collects the registry and the process
  // metrics (ProcessMetrics()). Thread-safe.
  std::vector<prometheus::MetricFamily> Collect() const override;

  // ---- recording (thread-safe; CallMetrics calls the per-call ones) ----
  void CallStarted(Method m);  // in flight until CallDone
  void CallDone(Method m);
  void CallEnded(Method m, const char* policy, absl::StatusCode code, double seconds);
  // A Compress or CompressCache call that ended: by preset (kNoPreset: none).
  void PresetCallEnded(Method m, const std::string& preset, absl::StatusCode code);
  void ObserveStage(Method m, Stage s, double seconds);
  void ObserveQueueWait(Method m, double seconds);
  void AddReceivedBytes(Method m, int64_t bytes);
  void AddSentBytes(Method m, int64_t bytes);
  // A completed compression of `tokens` tokens per layer: tokens in and
  // kept, the kept ratio, and each layer's budget over `tokens` (every policy).
  void ObserveCompression(PolicyKind policy, const CompressResult& result, int64_t tokens);

 private:
  void Sample() const;
  prometheus::Histogram& LayerBudget(PolicyKind policy, int64_t layer);

  std::shared_ptr<prometheus::Registry> registry_;

  prometheus::Family<prometheus::Counter>& requests_;
  prometheus::Family<prometheus::Counter>& preset_requests_;
  prometheus::Family<prometheus::Histogram>& request_duration_;
  prometheus::Family<prometheus::Histogram>& stage_duration_;
  prometheus::Family<prometheus::Histogram>& queue_wait_;
  prometheus::Family<prometheus::Counter>& received_bytes_;
  prometheus::Family<prometheus::Counter>& sent_bytes_;
  prometheus::Family<prometheus::Gauge>& inflight_;
  prometheus::Family<prometheus::Counter>& tokens_in_;
  prometheus::Family<prometheus::Counter>& tokens_kept_;
  prometheus::Family<prometheus::Histogram>& compression_ratio_;
  prometheus::Family<prometheus::Histogram>& layer_budget_;
  prometheus::Family<prometheus::Gauge>& store_capacity_;
  prometheus::Family<prometheus::Gauge>& store_used_;
  prometheus::Family<prometheus::Gauge>& store_entries_;
  prometheus::Family<prometheus::Counter>& store_evictions_;
  prometheus::Family<prometheus::Gauge>& admission_slots_;
  prometheus::Family<prometheus::Gauge>& admission_used_;
  prometheus::Family<prometheus::Gauge>& queued_;
  prometheus::Family<prometheus::Gauge>& shm_regions_;
  prometheus::Family<prometheus::Gauge>& shm_bytes_;
  prometheus::Family<prometheus::Gauge>& request_memory_;
  prometheus::Family<prometheus::Gauge>& request_memory_bound_;

  // Series created once: per method (in flight, durations, bytes) and per
  // method and stage.
  prometheus::Gauge* inflight_by_method_[kNumMethods];
  prometheus::Histogram* duration_by_method_[kNumMethods];
  prometheus::Histogram* stage_by_method_[kNumMethods][kNumStages];

  absl::Mutex layers_mu_;
  // [policy][layer], created on first use.
  std::vector<prometheus::Histogram*> layer_budget_by_layer_[kNumPolicyKinds] ABSL_GUARDED_BY(layers_mu_);

  mutable absl::Mutex sample_mu_;
  std::function<MetricsSample()> sampler_ ABSL_GUARDED_BY(sample_mu_);
  // The store's eviction counts at the last sample ([tier][lru, expired]):
  // the counters grow by the difference.
  mutable int64_t evictions_seen_[kNumTiers][2] ABSL_GUARDED_BY(sample_mu_) = {};
};

// One call's metrics. Counts the call in flight from construction to
// destruction (a reactor owns one and is deleted in OnDone), then once, at
// End (just before the reactor calls Finish), the request with its code and
// its duration since construction. With a null Metrics it records nothing.
// A call uses it from one thread at a time.
class CallMetrics {
 public:
  CallMetrics(Metrics* metrics, Method method);
  ~CallMetrics();
  CallMetrics(const CallMetrics&) = delete;
  CallMetrics& operator=(const CallMetrics&) = delete;

  void set_policy(PolicyKind policy) { policy_ = PolicyName(policy); }
  // The preset the call's policy came from (empty: none). Compress and
  // CompressCache calls are also counted by preset when they end.
  void set_preset(const std::string& preset) { preset_ = preset.empty() ? kNoPreset : preset; }
  void ObserveStage(Stage stage, double seconds);
  void QueueWait(double seconds);
  // The call's payload so far (cumulative bytes, as the assembler and the
  // result stream count them): the counters grow by what is new.
  void ReceivedSoFar(int64_t bytes);
  void SentSoFar(int64_t bytes);
  void Compression(PolicyKind policy, const CompressResult& result, int64_t tokens);
  // Where End also writes the call's log line (call_log.h), and who called.
  void set_log(CallLog* log, std::string peer, std::string tenant) {
    log_ = log;
    peer_ = std::move(peer);
    tenant_ = std::move(tenant);
  }
  // Records the request (and logs it, when it failed or was slow); later
  // calls are ignored.
  void End(absl::StatusCode code, absl::string_view message = {});

  Method method() const { return method_; }
  double seconds() const;  // since the call started
  int64_t received() const { return received_; }
  int64_t sent() const { return sent_; }

 private:
  Metrics* const metrics_;
  const Method method_;
  const char* policy_ = kNoPolicy;
  std::string preset_ = kNoPreset;
  const int64_t start_ns_;  // steady clock
  int64_t received_ = 0;
  int64_t sent_ = 0;
  bool ended_ = false;
  CallLog* log_ = nullptr;
  std::string peer_, tenant_;
};

}  // namespace medakv::server
