// `medakv eval`: the fidelity of compression policies (docs/algorithm.md, "How
// fidelity is judged"; docs/evaluation.md).
//
// The last `holdout` query rows of every layer are held out as the "future":
// each policy compresses the cache from the observed rows only, and the held-out
// rows then attend over all T tokens of the uncompressed cache (o) and over the
// B_l kept (merged) tokens of the compressed layer (o'), with no causal mask.
// The error of one (layer, held-out row, query head) is ||o' - o|| / ||o||
// (terms with ||o|| = 0 are skipped); a run reports the mean over rows, heads
// and layers, and per layer.
//
// Arithmetic: K, V and Q are read exactly as fp32; q.k dot products are fp32
// over head_dim; the softmax (an online log-sum-exp over key tiles, so memory
// stays O(tile)) and the output accumulation are in double.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kernels/backend.h"
#include "kernels/common/tensor.h"
#include "service/compress/options.h"
#include "service/compress/pipeline.h"

namespace medakv {

// A query-form cache cut into observed and held-out query rows. `observed`
// shares the keys, values and modality of the input (views into the caller's
// buffers) and owns copies of the observed query rows, with their positions
// made explicit (the input's query_positions, or the default last-q_tokens
// positions of the full query tensor). Move-only in effect: the views point
// into the vectors' heap buffers, which a move keeps.
struct HoldoutSplit {
  CacheInput observed;
  std::vector<TensorView> held_out;  // per layer [q_heads, holdout, head_dim], input dtype and layout
  std::vector<std::vector<uint8_t>> observed_bytes;
  std::vector<std::vector<uint8_t>> held_out_bytes;
};

// Splits every layer's query rows: the first q_tokens - holdout are observed,
// the last `holdout` held out. Rejects precomputed caches, holdout < 1 and a
// holdout that leaves a layer no observed row; validates the cache first.
[[nodiscard]] absl::StatusOr<HoldoutSplit> SplitHoldout(const CacheInput& input, int64_t holdout);

// The relative error of one layer (see the file comment): sum and count of the
// (row, query head) terms.
struct LayerError {
  double sum = 0.0;     // sum of ||o' - o|| / ||o|| over the counted terms
  int64_t terms = 0;    // (row, head) pairs with ||o|| > 0
  int64_t skipped = 0;  // pairs with ||o|| = 0
  double Mean() const { return terms > 0 ? sum / static_cast<double>(terms) : 0.0; }
};

// Mean relative attention-output error of one layer. query: [q_heads, rows,
// head_dim]; key, value: [kv_heads, tokens, head_dim] (the uncompressed
// layer); compressed_key, compressed_value: [kv_heads, budget, head_dim] (any
// budget >= 1). All views share head_dim; dtypes and layouts may differ.
// q_heads must be a multiple of kv_heads (query head h reads kv head
// h / (q_heads / kv_heads)). scale <= 0 means 1/sqrt(head_dim).
// Returns the mean over (row, head) terms with ||o|| > 0 (0 when none is).
[[nodiscard]] absl::StatusOr<double> AttentionOutputError(const TensorView& query, const TensorView& key,
                                                          const TensorView& value, const TensorView& compressed_key,
                                                          const TensorView& compressed_value, double scale = 0.0);
// The same with the sum and the counts.
[[nodiscard]] absl::StatusOr<LayerError> AttentionOutputErrorTerms(const TensorView& query, const TensorView& key,
                                                                   const TensorView& value,
                                                                   const TensorView& compressed_key,
                                                                   const TensorView& compressed_value,
                                                                   double scale = 0.0);

// One (policy, options, rho) run.
struct EvalResult {
  PolicyKind policy = PolicyKind::kMeda;
  double rho = 0.0;
  CompressOptions options;            // as run
  int64_t tokens_in = 0;              // layers x tokens
  int64_t tokens_kept = 0;            // sum of budgets
  double kept_fraction = 0.0;         // tokens_kept / tokens_in
  double mean_rel_error = 0.0;        // mean over every counted (layer, row, head) term
  int64_t error_terms = 0;            // counted terms (skipped: ||o|| = 0)
  std::vector<double> layer_error;    // [layers] mean over the layer's terms
  std::vector<int64_t> layer_budget;  // [layers] B_l
  std::vector<float> layer_entropy;   // [layers] E_l (0 for policy full, which computes no statistics)
  double compress_seconds = 0.0;      // the pipeline on the observed rows (runs with the same
                                      // StatisticsKey share one statistics stage, counted in the
                                      // first of them)
  double error_seconds = 0.0;         // the compressed attention outputs and errors (the reference
                                      // outputs, computed once before the runs, are not counted)
};

// Called after each run, e.g. for progress.
using EvalCallback = std::function<void(const EvalResult&)>;

// The evaluation with the future queries given: `observed` is what the policy
// compresses from (a query-form cache), held_out[l] the future query rows of
// layer l ([q_heads, rows >= 1, head_dim], any dtype and layout), which attend
// over all tokens of `observed`'s keys and values and of each compressed layer.
// Used by Evaluate, and by `eval --synth-future` with the generator's rows
// after the prompt.
[[nodiscard]] absl::StatusOr<std::vector<EvalResult>> EvaluateHeldOut(const CacheInput& observed,
                                                                      const std::vector<TensorView>& held_out,
                                                                      const std::vector<CompressOptions>& runs,
                                                                      const Backend& backend,
                                                                      const EvalCallback& on_result = nullptr);

// Runs every entry of `runs` (each with its own policy, rho and options) on the
// observed rows of `input` and measures it on the `holdout` held-out rows. The
// reference outputs over the full cache are computed once per distinct scale.
// Results come in the order of `runs`. A run the pipeline rejects fails the
// whole evaluation, with the policy and rho in the message; every run's
// options are validated before anything is computed. SplitHoldout, then
// EvaluateHeldOut.
[[nodiscard]] absl::StatusOr<std::vector<EvalResult>> Evaluate(const CacheInput& input, int64_t holdout,
                                                               const std::vector<CompressOptions>& runs,
                                                               const Backend& backend,
                                                               const EvalCallback& on_result = nullptr);

// ---- Lists, reports and files (the `medakv eval` command's output) ---------

// Every policy, in the default order of `--policies`.
std::vector<PolicyKind> AllPolicies();
// "full,h2o,meda": names as ParsePolicy takes them; duplicates dropped, the
// order kept. Empty lists and unknown names are InvalidArgument.
[[nodiscard]] absl::StatusOr<std::vector<PolicyKind>> ParsePolicyList(absl::string_view list);
// "0.05,0.1": each in (0, 1]; sorted ascending, duplicates dropped.
[[nodiscard]] absl::StatusOr<std::vector<double>> ParseRhoList(absl::string_view list);

// The uniform-budget baselines of docs/algorithm.md (streaming_llm, h2o, snapkv,
// look_m), which MEDA must beat at the same rho on multimodal inputs.
bool IsUniformBaseline(PolicyKind policy);

// MEDA against the best uniform-budget baseline at one rho (only rhos at
// which MEDA and at least one such baseline ran).
struct MedaComparison {
  double rho = 0.0;
  double meda_error = 0.0;
  PolicyKind best_uniform = PolicyKind::kH2O;
  double best_uniform_error = 0.0;
  bool meda_beats_uniform = false;  // meda_error < best_uniform_error
};
std::vector<MedaComparison> CompareMedaToUniform(const std::vector<EvalResult>& results);

// The stdout table: one line per run, grouped by rho (ascending), the lowest
// error first inside a group, then one verdict line per MedaComparison.
std::string FormatEvalTable(const std::vector<EvalResult>& results);

// CSV, one row per run in the order given: policy,rho,kept_fraction,mean_rel_error.
std::string EvalCsv(const std::vector<EvalResult>& results);
// CSV, one row per (run, layer): policy,rho,layer,budget,entropy,rel_error.
std::string EvalLayersCsv(const std::vector<EvalResult>& results);
// Writes `contents` to "PATH.tmp.<pid>" and renames it to `path`; a failed
// write leaves no file behind. Errors name the path.
[[nodiscard]] absl::Status WriteTextFile(const std::string& path, absl::string_view contents);

}  // namespace medakv
