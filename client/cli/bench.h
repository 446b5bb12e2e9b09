// `medakv bench`: load on medakv servers through medakv::Client. Workers
// (--concurrency) send the same synthetic cache (the `synth` generator and
// flags) back to back for --duration seconds, each on its own thread, and the
// tool reports requests per second, tensor megabytes per second up and down,
// latency percentiles and errors by status code.
//   --op compress  Compress (nothing stored), with --policy/--rho and the policy flags
//   --op put       PutCache under ids "bench-<pid>-<worker>-<n>" (8 per worker,
//                  overwritten in turn, spread over the replicas), deleted at the end
//   --op get       GetCache of one cache per worker, stored first and deleted at the end
// The first request of each worker (connection set-up, shared-memory
// registration) is a warm-up and is not counted.
#pragma once

#include <CLI/CLI.hpp>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "client/cli/policy_flags.h"
#include "client/cli/synth.h"
#include "client/cpp/client.h"

namespace medakv {

struct BenchFlags {
  std::string op = "compress";
  int concurrency = 4;
  double duration = 10;  // seconds
  SynthOptions synth;
  std::string dtype = "float16";
  std::string layout = "hnd";
  PolicyFlags policy;
  bool json = false;
};

void AddBenchFlags(CLI::App* app, BenchFlags& f);

struct BenchReport {
  std::string op;
  int concurrency = 0;
  double seconds = 0;                                    // wall clock of the timed part
  int64_t ok = 0, failed = 0;                            // requests
  int64_t shared_memory = 0;                             // requests whose tensors went through shared memory
  int64_t up_bytes = 0, down_bytes = 0;                  // tensor bytes of the requests that succeeded
  int64_t request_up_bytes = 0, request_down_bytes = 0;  // per request (the last that succeeded)
  double p50_ms = 0, p90_ms = 0, p99_ms = 0, max_ms = 0, mean_ms = 0;
  std::map<std::string, int64_t> errors;  // by status code name
  std::string first_error;                // the message of the first failure
};

// Nearest-rank percentile (p in (0, 100]) of sorted values; 0 when empty.
double Percentile(const std::vector<double>& sorted, double p);

// Runs the benchmark (flags checked first: INVALID_ARGUMENT naming the flag).
[[nodiscard]] absl::StatusOr<BenchReport> RunBench(const BenchFlags& f, Client& client);

// Prints the report as text or JSON on stdout.
void PrintBench(const BenchFlags& f, const Client& client, const BenchReport& r);

}  // namespace medakv
