// `medakv tune`: fits a policy to a user's model. Every candidate policy (a
// grid of policies and parameters, or a file of them) runs at every rho on
// sample caches of the model with their future queries; the attention-output
// error of those queries (docs/algorithm.md, "How fidelity is judged"; eval.h)
// ranks the candidates, and the best one per rho becomes a preset that
// medakv-server loads (--policy_presets, docs/presets.md). docs/tune.md.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "client/cli/eval.h"
#include "kernels/backend.h"
#include "medakv/v1/medakv.pb.h"
#include "service/compress/options.h"

namespace medakv {

// One candidate: a policy and its options (its rho is replaced by each rho of the sweep).
struct TuneCandidate {
  std::string name;  // as reported and written into the preset's description
  CompressOptions options;
};

// "h2o", "meda tau=5 merge=none": the policy's name, then each option whose
// value differs from the policy's defaults (DefaultOptions), as name=value
// with the command line's names. rho is never part of it.
std::string CandidateName(const CompressOptions& options);

// The built-in grids: "baselines" (every policy at its defaults but full),
// "quick" (the baselines and a few variants of each: 33 candidates)
// and "full" (164). Unknown names are INVALID_ARGUMENT.
[[nodiscard]] absl::StatusOr<std::vector<TuneCandidate>> TuneGrid(absl::string_view name);

// One sample: a query-form cache (what the policies compress from) and its
// future query rows per layer ([q_heads, rows >= 1, head_dim]), as for
// EvaluateHeldOut. The views must outlive Tune.
struct TuneSample {
  std::string name;  // e.g. the file
  CacheInput observed;
  std::vector<TensorView> future;
};

// A sample read from files, owning what its views point into.
struct LoadedSample {
  TuneSample sample;
  std::string future_source;  // the future file, or "the last N query rows"
  std::shared_ptr<void> storage;  // the cache file, the future's bytes or the holdout split
};

// The future of a cache file "x.safetensors": "x.future.safetensors" beside
// it (the real-model format, bench/realmodel: layer.{l}.query per layer, in
// the cache's dtype and layout, any number of rows).
std::string FutureFileOf(const std::string& cache_path);

// Reads a cache file and its future: the future file when it exists
// (FutureFileOf), else the last `holdout` query rows of every layer
// (SplitHoldout). Errors name the file and the tensor.
[[nodiscard]] absl::StatusOr<LoadedSample> LoadSample(const std::string& cache_path, Layout layout, int64_t holdout);

// A candidate at one rho, over every sample.
struct TuneRow {
  std::string candidate;
  CompressOptions options;  // rho set
  double rho = 0.0;
  double mean_error = 0.0;           // mean over the samples of each sample's mean relative error
  double kept_fraction = 0.0;        // mean over the samples
  std::vector<double> sample_error;  // [samples]
  bool baseline = false;             // a policy at its own defaults (the reference points)
};

struct TuneReport {
  std::vector<std::string> samples;
  std::vector<double> rhos;  // ascending
  std::vector<TuneRow> rows;  // grouped by rho (ascending), then in candidate order
  // Index into rows of the best (lowest mean error; ties: the earlier
  // candidate) at rhos[i].
  std::vector<size_t> best;
};

// Called after each (sample, rho, candidate) run: runs done and the total.
using TuneProgress = std::function<void(int64_t done, int64_t total)>;

// Runs every candidate at every rho on every sample (EvaluateHeldOut; runs
// that read the same statistics share them). Candidates must have distinct
// names; rhos must be in (0, 1]. Errors name the sample.
[[nodiscard]] absl::StatusOr<TuneReport> Tune(const std::vector<TuneSample>& samples,
                                              const std::vector<TuneCandidate>& candidates,
                                              const std::vector<double>& rhos, const Backend& backend,
                                              const TuneProgress& progress = nullptr);

// The stdout table: per rho, every candidate from the lowest error, its
// error relative to the best baseline, the best marked.
std::string FormatTuneTable(const TuneReport& report);

// CSV: candidate,rho,kept_fraction,mean_rel_error,baseline,<one column per sample>.
std::string TuneCsv(const TuneReport& report);

// The presets of a report: "<prefix>-r<rho>" for the best candidate at each
// rho (its policy with that rho, a description naming the candidate, its
// error and the best baseline's), and "default" as well for `default_rho`
// when it is > 0 (it must be one of the report's rhos).
[[nodiscard]] absl::StatusOr<medakv::v1::PolicyPresets> TunePresets(const TuneReport& report,
                                                                    absl::string_view prefix, double default_rho);

}  // namespace medakv
