#include "client/cli/bench.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <iostream>
#include <nlohmann/json.hpp>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "client/cli/cache_file.h"
#include "kernels/common/status.h"
#include "kernels/common/tensor_util.h"

namespace medakv {
namespace {

using Clock = std::chrono::steady_clock;

constexpr int kIdsPerWorker = 8;  // --op put: ids each worker overwrites in turn

// Tensor bytes of the request and of a full result.
int64_t UploadBytes(const CacheInput& in) {
  int64_t bytes = 0;
  for (const LayerInput& l : in.layers) {
    bytes += l.key.NumBytes() + l.value.NumBytes();
    if (in.stats == StatsForm::kQueries) {
      bytes += l.query.NumBytes() + static_cast<int64_t>(l.query_positions.size() * sizeof(int32_t));
    } else {
      bytes += l.score_heads * in.tokens * 4 + 4;
    }
  }
  return bytes;
}

int64_t ResultBytes(const std::vector<LayerResult>& layers) {
  int64_t bytes = 0;
  for (const LayerResult& l : layers) {
    bytes += static_cast<int64_t>(l.key.size() + l.value.size() + l.positions.size() * sizeof(int32_t));
  }
  return bytes;
}

std::string BenchId(int worker, int n) { return absl::StrCat("bench-", getpid(), "-", worker, "-", n); }

// What one request did.
struct Outcome {
  absl::Status status;
  int64_t up = 0, down = 0;
  bool shared_memory = false;
};

}  // namespace

void AddBenchFlags(CLI::App* app, BenchFlags& f) {
  app->add_option("--op", f.op, "compress | put | get")->capture_default_str();
  app->add_option("--concurrency", f.concurrency, "Workers sending requests at once")->capture_default_str();
  app->add_option("--duration", f.duration, "Seconds of timed requests")->capture_default_str();
  SynthOptions& o = f.synth;
  app->add_option("--layers", o.layers, "Layers of the synthetic cache")->capture_default_str();
  app->add_option("--kv-heads", o.kv_heads, "KV heads")->capture_default_str();
  app->add_option("--q-heads", o.q_heads, "Query heads (a multiple of kv heads)")->capture_default_str();
  app->add_option("--tokens", o.tokens, "Tokens in the cache")->capture_default_str();
  app->add_option("--head-dim", o.head_dim, "Head size")->capture_default_str();
  app->add_option("--q-tokens", o.q_tokens, "Query rows (the last positions)")->capture_default_str();
  app->add_option("--dtype", f.dtype, "float16 | bfloat16 | float32")->capture_default_str();
  app->add_option("--layout", f.layout, "hnd | nhd")->capture_default_str();
  app->add_flag("--precomputed", o.precomputed, "Send scores and entropy instead of queries");
  app->add_option("--seed", o.seed, "Random seed of the cache")->capture_default_str();
  f.policy.Add(app);
  app->add_flag("--json", f.json, "Print the report as JSON");
}

double Percentile(const std::vector<double>& sorted, double p) {
  if (sorted.empty()) return 0.0;
  const double rank = std::ceil(p / 100.0 * static_cast<double>(sorted.size()));
  const size_t index = static_cast<size_t>(std::clamp(rank, 1.0, static_cast<double>(sorted.size()))) - 1;
  return sorted[index];
}

absl::StatusOr<BenchReport> RunBench(const BenchFlags& f, Client& client) {
  if (f.op != "compress" && f.op != "put" && f.op != "get") {
    return absl::InvalidArgumentError(absl::StrCat("--op: expected compress, put or get, got '", f.op, "'"));
  }
  if (f.concurrency < 1 || f.concurrency > 1024) {
    return absl::InvalidArgumentError(absl::StrCat("--concurrency must be in [1, 1024], got ", f.concurrency));
  }
  if (!(f.duration > 0 && f.duration <= 86400)) {
    return absl::InvalidArgumentError(absl::StrCat("--duration must be in (0, 86400] seconds, got ", f.duration));
  }
  MEDAKV_ASSIGN_OR_RETURN(const CompressOptions options, f.policy.Resolve());
  SynthOptions so = f.synth;
  MEDAKV_ASSIGN_OR_RETURN(so.dtype, ParseDType(f.dtype));
  MEDAKV_ASSIGN_OR_RETURN(so.layout, ParseLayout(f.layout));
  MEDAKV_ASSIGN_OR_RETURN(const SynthCache cache, MakeSynthCache(so));
  const CacheInput& in = cache.input;

  // --op get: one stored cache per worker.
  std::vector<std::string> stored;
  auto cleanup = [&] {
    for (const std::string& id : stored) (void)client.DeleteCache(id);
  };
  if (f.op == "get") {
    PutOptions put;
    put.overwrite = true;
    for (int w = 0; w < f.concurrency; ++w) {
      const std::string id = BenchId(w, 0);
      absl::StatusOr<PutResult> r = client.PutCache(id, in, put);
      if (!r.ok()) {
        cleanup();
        return absl::Status(r.status().code(), absl::StrCat("storing the caches to get: ", r.status().message()));
      }
      stored.push_back(id);
    }
  }

  auto request = [&](int worker, int n) -> Outcome {
    Outcome o;
    if (f.op == "compress") {
      absl::StatusOr<RemoteResult> r = client.Compress(in, options);
      o.status = r.status();
      if (r.ok()) {
        o.up = UploadBytes(in);
        o.down = ResultBytes(r->result.layers);
        o.shared_memory = r->shared_memory;
      }
    } else if (f.op == "put") {
      PutOptions put;
      put.overwrite = true;
      absl::StatusOr<PutResult> r = client.PutCache(BenchId(worker, n % kIdsPerWorker), in, put);
      o.status = r.status();
      if (r.ok()) {
        o.up = r->bytes_sent;
        o.shared_memory = r->shared_memory;
      }
    } else {
      absl::StatusOr<FetchedCache> r = client.GetCache(BenchId(worker, 0));
      o.status = r.status();
      if (r.ok()) {
        o.down = r->bytes_received;
        o.shared_memory = r->shared_memory;
      }
    }
    return o;
  };

  struct WorkerStats {
    std::vector<double> latencies_ms;
    int64_t ok = 0, failed = 0, shm = 0, up = 0, down = 0, last_up = 0, last_down = 0;
    std::map<std::string, int64_t> errors;
    std::string first_error;
    int puts = 0;  // --op put: requests made (ids used: min(puts, kIdsPerWorker))
  };
  std::vector<WorkerStats> workers(f.concurrency);
  std::atomic<int> warmed{0};
  absl::Mutex mu;
  absl::CondVar all_warm;
  Clock::time_point start, stop;
  bool started = false;  // guarded by mu
  auto worker = [&](int w) {
    WorkerStats& s = workers[w];
    (void)request(w, s.puts++);  // warm-up: connection, shared-memory registration
    {
      absl::MutexLock lock(&mu);
      if (warmed.fetch_add(1) + 1 == f.concurrency) {
        start = Clock::now();
        stop = start + std::chrono::microseconds(static_cast<int64_t>(f.duration * 1e6));
        started = true;
        all_warm.SignalAll();
      }
      while (!started) all_warm.Wait(&mu);
    }
    while (Clock::now() < stop) {
      const auto t0 = Clock::now();
      const Outcome o = request(w, s.puts++);
      const double ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
      if (o.status.ok()) {
        ++s.ok;
        s.latencies_ms.push_back(ms);
        s.up += o.up;
        s.down += o.down;
        s.last_up = o.up;
        s.last_down = o.down;
        if (o.shared_memory) ++s.shm;
      } else {
        ++s.failed;
        ++s.errors[absl::StatusCodeToString(o.status.code())];
        if (s.first_error.empty()) s.first_error = std::string(o.status.message());
      }
    }
  };
  std::vector<std::thread> threads;
  for (int w = 0; w < f.concurrency; ++w) threads.emplace_back(worker, w);
  for (std::thread& t : threads) t.join();
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();

  if (f.op == "put") {
    for (int w = 0; w < f.concurrency; ++w) {
      for (int n = 0; n < std::min(workers[w].puts, kIdsPerWorker); ++n) stored.push_back(BenchId(w, n));
    }
  }
  cleanup();

  BenchReport r;
  r.op = f.op;
  r.concurrency = f.concurrency;
  r.seconds = seconds;
  std::vector<double> all;
  for (const WorkerStats& s : workers) {
    r.ok += s.ok;
    r.failed += s.failed;
    r.shared_memory += s.shm;
    r.up_bytes += s.up;
    r.down_bytes += s.down;
    if (s.ok > 0) {
      r.request_up_bytes = s.last_up;
      r.request_down_bytes = s.last_down;
    }
    for (const auto& [code, n] : s.errors) r.errors[code] += n;
    if (r.first_error.empty()) r.first_error = s.first_error;
    all.insert(all.end(), s.latencies_ms.begin(), s.latencies_ms.end());
  }
  std::sort(all.begin(), all.end());
  r.p50_ms = Percentile(all, 50);
  r.p90_ms = Percentile(all, 90);
  r.p99_ms = Percentile(all, 99);
  r.max_ms = all.empty() ? 0 : all.back();
  double sum = 0;
  for (double x : all) sum += x;
  r.mean_ms = all.empty() ? 0 : sum / static_cast<double>(all.size());
  return r;
}

void PrintBench(const BenchFlags& f, const Client& client, const BenchReport& r) {
  const SynthOptions& o = f.synth;
  const double rps = r.seconds > 0 ? static_cast<double>(r.ok) / r.seconds : 0;
  const double up = r.seconds > 0 ? static_cast<double>(r.up_bytes) / 1e6 / r.seconds : 0;
  const double down = r.seconds > 0 ? static_cast<double>(r.down_bytes) / 1e6 / r.seconds : 0;
  const absl::StatusOr<CompressOptions> options = f.policy.Resolve();
  const std::string policy = options.ok() ? PolicyName(options->policy) : "?";
  const double rho = options.ok() ? options->budget.rho : 0;
  if (f.json) {
    nlohmann::json j;
    j["op"] = r.op;
    j["servers"] = client.targets();
    j["concurrency"] = r.concurrency;
    j["duration_s"] = f.duration;
    j["elapsed_s"] = r.seconds;
    j["cache"] = {{"layers", o.layers}, {"kv_heads", o.kv_heads}, {"q_heads", o.q_heads},
                  {"tokens", o.tokens}, {"head_dim", o.head_dim}, {"q_tokens", o.q_tokens},
                  {"dtype", f.dtype},   {"layout", f.layout},     {"precomputed", o.precomputed}};
    if (r.op == "compress") {
      j["policy"] = policy;
      j["rho"] = rho;
    }
    j["requests_ok"] = r.ok;
    j["requests_failed"] = r.failed;
    j["requests_shared_memory"] = r.shared_memory;
    j["requests_per_s"] = rps;
    j["request_up_bytes"] = r.request_up_bytes;
    j["request_down_bytes"] = r.request_down_bytes;
    j["up_mb_per_s"] = up;
    j["down_mb_per_s"] = down;
    j["latency_ms"] = {{"p50", r.p50_ms}, {"p90", r.p90_ms}, {"p99", r.p99_ms}, {"max", r.max_ms}, {"mean", r.mean_ms}};
    j["errors"] = r.errors;
    if (!r.first_error.empty()) j["first_error"] = r.first_error;
    std::cout << j.dump(2) << "\n";
    return;
  }
  std::cout << absl::StrFormat("medakv bench: %s on %s, %d workers, %.1f s\n", r.op,
                               absl::StrJoin(client.targets(), ","), r.concurrency, r.seconds);
  std::cout << absl::StrFormat(
      "cache: %d layers x %d tokens, %d kv heads, head_dim %d, %s %s, %s", o.layers, o.tokens, o.kv_heads, o.head_dim,
      f.dtype, f.layout,
      o.precomputed ? "precomputed scores" : absl::StrFormat("%d query heads x %d rows", o.q_heads, o.q_tokens));
  if (r.op == "compress") std::cout << absl::StrFormat("; policy %s, rho %g", policy, rho);
  std::cout << "\n";
  std::cout << absl::StrFormat("requests: %d ok, %d failed, %.1f req/s; shared memory: %d of %d\n", r.ok, r.failed, rps,
                               r.shared_memory, r.ok);
  std::cout << absl::StrFormat(
      "tensors per request: up %.2f MB, down %.2f MB; throughput: up %.1f MB/s, down %.1f MB/s\n",
      static_cast<double>(r.request_up_bytes) / 1e6, static_cast<double>(r.request_down_bytes) / 1e6, up, down);
  std::cout << absl::StrFormat("latency ms: p50 %.2f  p90 %.2f  p99 %.2f  max %.2f  mean %.2f\n", r.p50_ms, r.p90_ms,
                               r.p99_ms, r.max_ms, r.mean_ms);
  if (r.errors.empty()) {
    std::cout << "errors: none\n";
  } else {
    std::vector<std::string> parts;
    for (const auto& [code, n] : r.errors) parts.push_back(absl::StrCat(code, " ", n));
    std::cout << "errors: " << absl::StrJoin(parts, ", ") << "; first: " << r.first_error << "\n";
  }
}

}  // namespace medakv
