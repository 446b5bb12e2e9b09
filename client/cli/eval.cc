#include "client/cli/eval.h"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <limits>
#include <map>
#include <optional>
#include <string>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "kernels/common/status.h"
#include "kernels/common/tensor_util.h"
#include "kernels/cpu/parallel.h"

namespace medakv {
namespace {

// Keys per tile of the online softmax, and query rows that share a pass over
// the keys (a key row is read once per block, from L1).
constexpr int64_t kKeyTile = 64;
constexpr int64_t kRowBlock = 16;

double Seconds(std::chrono::steady_clock::time_point since) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - since).count();
}

double ResolveScale(double scale, int64_t head_dim) {
  return scale > 0.0 ? scale : 1.0 / std::sqrt(static_cast<double>(head_dim));
}

// Rows [first, first + count) of head `head` of a view as dense fp32 [count, D].
void RowsToFloat(const TensorView& v, int64_t head, int64_t first, int64_t count, float* out) {
  for (int64_t j = 0; j < count; ++j) {
    RowToFloat(v.dtype, v.Row(head, first + j), out + j * v.head_dim, v.head_dim);
  }
}

// Attention outputs of `rows` query rows q [rows, d] over n keys k [n, d] and
// values v [n, d], all keys visible: out [rows, d] = softmax(scale q k^T) v.
// Online softmax over key tiles in double; fp32 dot products.
void Attend(const float* q, int64_t rows, const float* k, const float* v, int64_t n, int64_t d, double scale,
            double* out) {
  std::vector<double> logits(kRowBlock * kKeyTile);
  double m[kRowBlock], l[kRowBlock];
  for (int64_t r0 = 0; r0 < rows; r0 += kRowBlock) {
    const int64_t rb = std::min(kRowBlock, rows - r0);
    double* acc = out + r0 * d;
    std::fill(acc, acc + rb * d, 0.0);
    std::fill(m, m + rb, -std::numeric_limits<double>::infinity());
    std::fill(l, l + rb, 0.0);
    for (int64_t j0 = 0; j0 < n; j0 += kKeyTile) {
      const int64_t jb = std::min(kKeyTile, n - j0);
      for (int64_t jj = 0; jj < jb; ++jj) {
        const float* kj = k + (j0 + jj) * d;
        for (int64_t r = 0; r < rb; ++r) {
          const float* qr = q + (r0 + r) * d;
          float s = 0.f;
#pragma omp simd reduction(+ : s)
          for (int64_t x = 0; x < d; ++x) s += qr[x] * kj[x];
          logits[r * kKeyTile + jj] = scale * static_cast<double>(s);
        }
      }
      for (int64_t r = 0; r < rb; ++r) {
        double* s = logits.data() + r * kKeyTile;
        double tile_max = s[0];
        for (int64_t jj = 1; jj < jb; ++jj) tile_max = std::max(tile_max, s[jj]);
        const double new_m = std::max(m[r], tile_max);
        const double c = std::exp(m[r] - new_m);  // 0 on the first tile (m = -inf)
        double* a = acc + r * d;
        if (c != 1.0) {
          l[r] *= c;
          for (int64_t x = 0; x < d; ++x) a[x] *= c;
        }
        for (int64_t jj = 0; jj < jb; ++jj) {
          const double p = std::exp(s[jj] - new_m);
          l[r] += p;
          const float* vj = v + (j0 + jj) * d;
          for (int64_t x = 0; x < d; ++x) a[x] += p * static_cast<double>(vj[x]);
        }
        m[r] = new_m;
      }
    }
    for (int64_t r = 0; r < rb; ++r) {
      double* a = acc + r * d;
      const double inv = 1.0 / l[r];
      for (int64_t x = 0; x < d; ++x) a[x] *= inv;
    }
  }
}

// Outputs of the query rows of kv head g's group: query [q_heads, rows, d],
// key/value [kv_heads, n, d]. out: [group * rows, d], row (hh * rows + i) for
// query head g * group + hh. Only the head's first `keys` rows are attended
// (-1: all of them; a compressed head padded to its layer's width holds fewer).
void GroupOutputs(const TensorView& query, const TensorView& key, const TensorView& value, int64_t g, double scale,
                  double* out, int64_t keys = -1) {
  const int64_t d = key.head_dim, n = keys >= 0 ? keys : key.tokens, rows = query.tokens;
  const int64_t group = query.heads / key.heads;
  std::vector<float> q(group * rows * d), k(n * d), v(n * d);
  for (int64_t hh = 0; hh < group; ++hh) RowsToFloat(query, g * group + hh, 0, rows, q.data() + hh * rows * d);
  RowsToFloat(key, g, 0, n, k.data());
  RowsToFloat(value, g, 0, n, v.data());
  Attend(q.data(), group * rows, k.data(), v.data(), n, d, scale, out);
}

// Whether head g of two views holds the same tokens, bit for bit.
bool SameHead(const TensorView& a, const TensorView& b, int64_t g) {
  if (a.tokens != b.tokens || a.dtype != b.dtype || a.head_dim != b.head_dim) return false;
  const size_t row_bytes = static_cast<size_t>(a.head_dim * DTypeSize(a.dtype));
  for (int64_t j = 0; j < a.tokens; ++j) {
    if (std::memcmp(a.Row(g, j), b.Row(g, j), row_bytes) != 0) return false;
  }
  return true;
}

// Adds the terms of `count` output rows: ||o' - o|| / ||o||.
void AddTerms(const double* ref, const double* out, int64_t count, int64_t d, LayerError* e) {
  for (int64_t r = 0; r < count; ++r) {
    double diff = 0.0, norm = 0.0;
    for (int64_t x = 0; x < d; ++x) {
      const double o = ref[r * d + x], delta = out[r * d + x] - o;
      diff += delta * delta;
      norm += o * o;
    }
    if (norm == 0.0) {
      ++e->skipped;
      continue;
    }
    e->sum += std::sqrt(diff) / std::sqrt(norm);
    ++e->terms;
  }
}

void Accumulate(const LayerError& from, LayerError* to) {
  to->sum += from.sum;
  to->terms += from.terms;
  to->skipped += from.skipped;
}

absl::Status CheckErrorArgs(const TensorView& query, const TensorView& key, const TensorView& value,
                            const TensorView& ck, const TensorView& cv) {
  if (key.heads <= 0 || key.head_dim <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("key: kv_heads and head_dim must be > 0, got ", key.heads, " and ", key.head_dim));
  }
  if (key.tokens <= 0) return absl::InvalidArgumentError("key: the uncompressed layer has no token");
  MEDAKV_RETURN_IF_ERROR(CheckView(key, "key", key.heads, key.tokens, key.head_dim));
  MEDAKV_RETURN_IF_ERROR(CheckView(value, "value", key.heads, key.tokens, key.head_dim));
  if (query.heads <= 0 || query.heads % key.heads != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("query: q_heads (", query.heads, ") must be a positive multiple of kv_heads (", key.heads, ")"));
  }
  MEDAKV_RETURN_IF_ERROR(CheckView(query, "query", query.heads, query.tokens, key.head_dim));
  if (ck.tokens <= 0) return absl::InvalidArgumentError("compressed key: the compressed layer has no token");
  MEDAKV_RETURN_IF_ERROR(CheckView(ck, "compressed key", key.heads, ck.tokens, key.head_dim));
  MEDAKV_RETURN_IF_ERROR(CheckView(cv, "compressed value", key.heads, ck.tokens, key.head_dim));
  return absl::OkStatus();
}

// Reference outputs of one layer's held-out rows over the full cache:
// [q_heads * rows * d], query head h's rows at (h * rows) * d.
using LayerOutputs = std::vector<double>;

std::string RunName(const CompressOptions& o) {
  return absl::StrCat("policy ", PolicyName(o.policy), ", rho ", o.budget.rho);
}

absl::Status PrecomputedError() {
  return absl::InvalidArgumentError(
      "the cache holds precomputed scores and entropy, not query rows; evaluation needs a cache with queries");
}

}  // namespace

absl::StatusOr<HoldoutSplit> SplitHoldout(const CacheInput& input, int64_t holdout) {
  if (input.stats != StatsForm::kQueries) return PrecomputedError();
  MEDAKV_RETURN_IF_ERROR(ValidateCacheInput(input));
  if (holdout < 1) return absl::InvalidArgumentError(absl::StrCat("holdout must be >= 1 query row, got ", holdout));
  for (size_t l = 0; l < input.layers.size(); ++l) {
    const int64_t q_tokens = input.layers[l].query.tokens;
    if (holdout >= q_tokens) {
      return absl::InvalidArgumentError(absl::StrCat("holdout ", holdout, " leaves layer ", l,
                                                     " no observed query row (it has ", q_tokens,
                                                     " query rows; holdout must be at most ", q_tokens - 1, ")"));
    }
  }
  HoldoutSplit split;
  split.observed = input;  // keys, values, modality: the caller's views
  const int64_t layers = static_cast<int64_t>(input.layers.size());
  split.observed_bytes.resize(layers);
  split.held_out_bytes.resize(layers);
  split.held_out.resize(layers);
  const int64_t d = input.head_dim, row_bytes = d * DTypeSize(input.dtype);
  for (int64_t l = 0; l < layers; ++l) {
    const LayerInput& src = input.layers[l];
    const TensorView& q = src.query;
    const int64_t q_tokens = q.tokens, observed = q_tokens - holdout;
    split.observed_bytes[l].resize(static_cast<size_t>(q.heads * observed * row_bytes));
    split.held_out_bytes[l].resize(static_cast<size_t>(q.heads * holdout * row_bytes));
    const MutableTensorView obs{split.observed_bytes[l].data(), q.dtype, q.layout, q.heads, observed, d};
    const MutableTensorView held{split.held_out_bytes[l].data(), q.dtype, q.layout, q.heads, holdout, d};
    for (int64_t h = 0; h < q.heads; ++h) {
      for (int64_t i = 0; i < observed; ++i) std::memcpy(obs.Row(h, i), q.Row(h, i), row_bytes);
      for (int64_t i = 0; i < holdout; ++i) std::memcpy(held.Row(h, i), q.Row(h, observed + i), row_bytes);
    }
    LayerInput& dst = split.observed.layers[l];
    dst.query = AsConst(obs);
    dst.query_positions.resize(observed);
    for (int64_t i = 0; i < observed; ++i) {
      dst.query_positions[i] =
          src.query_positions.empty() ? static_cast<int32_t>(input.tokens - q_tokens + i) : src.query_positions[i];
    }
    if (!src.query_outside_lse.empty()) {  // the observed rows' own
      dst.query_outside_lse.resize(static_cast<size_t>(q.heads * observed));
      for (int64_t h = 0; h < q.heads; ++h) {
        std::copy_n(src.query_outside_lse.begin() + h * q_tokens, observed,
                    dst.query_outside_lse.begin() + h * observed);
      }
    }
    split.held_out[l] = AsConst(held);
  }
  return split;
}

absl::StatusOr<LayerError> AttentionOutputErrorTerms(const TensorView& query, const TensorView& key,
                                                     const TensorView& value, const TensorView& compressed_key,
                                                     const TensorView& compressed_value, double scale) {
  MEDAKV_RETURN_IF_ERROR(CheckErrorArgs(query, key, value, compressed_key, compressed_value));
  if (!std::isfinite(scale)) return absl::InvalidArgumentError(absl::StrCat("scale must be finite, got ", scale));
  const double s = ResolveScale(scale, key.head_dim);
  const int64_t kv_heads = key.heads, group = query.heads / kv_heads, rows = query.tokens, d = key.head_dim;
  std::vector<LayerError> per_head(kv_heads);
  cpu::ParallelFor(kv_heads, [&](int64_t g) {
    std::vector<double> ref(group * rows * d), out(group * rows * d);
    GroupOutputs(query, key, value, g, s, ref.data());
    GroupOutputs(query, compressed_key, compressed_value, g, s, out.data());
    AddTerms(ref.data(), out.data(), group * rows, d, &per_head[g]);
  });
  LayerError total;
  for (const LayerError& e : per_head) Accumulate(e, &total);
  return total;
}

absl::StatusOr<double> AttentionOutputError(const TensorView& query, const TensorView& key, const TensorView& value,
                                            const TensorView& compressed_key, const TensorView& compressed_value,
                                            double scale) {
  MEDAKV_ASSIGN_OR_RETURN(const LayerError e,
                          AttentionOutputErrorTerms(query, key, value, compressed_key, compressed_value, scale));
  return e.Mean();
}

absl::StatusOr<std::vector<EvalResult>> EvaluateHeldOut(const CacheInput& observed,
                                                        const std::vector<TensorView>& held_out,
                                                        const std::vector<CompressOptions>& runs,
                                                        const Backend& backend, const EvalCallback& on_result) {
  for (const CompressOptions& o : runs) {
    if (absl::Status s = ValidateOptions(o); !s.ok()) {
      return absl::Status(s.code(), absl::StrCat(RunName(o), ": ", s.message()));
    }
  }
  if (observed.stats != StatsForm::kQueries) return PrecomputedError();
  MEDAKV_RETURN_IF_ERROR(ValidateCacheInput(observed));
  const int64_t layers = static_cast<int64_t>(observed.layers.size());
  if (static_cast<int64_t>(held_out.size()) != layers) {
    return absl::InvalidArgumentError(
        absl::StrCat("held-out queries: ", held_out.size(), " layers for a cache of ", layers));
  }
  const int64_t kv_heads = observed.kv_heads, q_heads = observed.q_heads, group = q_heads / kv_heads;
  const int64_t d = observed.head_dim;
  for (int64_t l = 0; l < layers; ++l) {
    const std::string name = absl::StrCat("layer ", l, " held-out queries");
    if (held_out[l].tokens < 1) return absl::InvalidArgumentError(name + ": no row");
    MEDAKV_RETURN_IF_ERROR(CheckView(held_out[l], name, q_heads, held_out[l].tokens, d));
  }
  // Doubles per (layer, kv head) block of outputs.
  auto group_size = [&](int64_t l) { return group * held_out[l].tokens * d; };

  // Reference outputs over the full cache, once per distinct logit scale.
  std::map<double, std::vector<LayerOutputs>> references;
  for (const CompressOptions& options : runs) {
    const double scale = ResolveScale(options.scale, d);
    if (references.count(scale) > 0) continue;
    std::vector<LayerOutputs> ref(layers);
    for (int64_t l = 0; l < layers; ++l) ref[l].resize(kv_heads * group_size(l));
    cpu::ParallelFor(layers * kv_heads, [&](int64_t task) {
      const int64_t l = task / kv_heads, g = task % kv_heads;
      const LayerInput& layer = observed.layers[l];
      GroupOutputs(held_out[l], layer.key, layer.value, g, scale, ref[l].data() + g * group_size(l));
    });
    references.emplace(scale, std::move(ref));
  }

  // Runs whose options read the same statistics (StatisticsKeyFor: e.g. one
  // policy at several rho) share one statistics stage; a key's statistics
  // are dropped after its last run.
  std::vector<StatisticsKey> keys;
  std::vector<size_t> last_use;
  for (size_t i = 0; i < runs.size(); ++i) {
    const StatisticsKey key = StatisticsKeyFor(runs[i]);
    const auto it = std::find(keys.begin(), keys.end(), key);
    if (it == keys.end()) {
      keys.push_back(key);
      last_use.push_back(i);
    } else {
      last_use[it - keys.begin()] = i;
    }
  }
  std::vector<std::optional<Statistics>> statistics(keys.size());

  std::vector<EvalResult> results;
  results.reserve(runs.size());
  for (size_t i = 0; i < runs.size(); ++i) {
    const CompressOptions& options = runs[i];
    EvalResult r;
    r.policy = options.policy;
    r.rho = options.budget.rho;
    r.options = options;
    auto t0 = std::chrono::steady_clock::now();
    const size_t k = std::find(keys.begin(), keys.end(), StatisticsKeyFor(options)) - keys.begin();
    if (!statistics[k].has_value()) {
      absl::StatusOr<Statistics> st = ComputeStatistics(observed, options, backend);
      if (!st.ok()) return absl::Status(st.status().code(), absl::StrCat(RunName(options), ": ", st.status().message()));
      statistics[k] = *std::move(st);
    }
    absl::StatusOr<CompressResult> compressed = Compress(observed, options, backend, nullptr, &*statistics[k]);
    if (last_use[k] == i) statistics[k].reset();
    if (!compressed.ok()) {
      return absl::Status(compressed.status().code(),
                          absl::StrCat(RunName(options), ": ", compressed.status().message()));
    }
    r.compress_seconds = Seconds(t0);
    t0 = std::chrono::steady_clock::now();
    const double scale = ResolveScale(options.scale, d);
    const std::vector<LayerOutputs>& ref = references.at(scale);
    std::vector<LayerError> task_error(layers * kv_heads);
    cpu::ParallelFor(layers * kv_heads, [&](int64_t task) {
      const int64_t l = task / kv_heads, g = task % kv_heads;
      const LayerResult& c = compressed->layers[l];
      const TensorView ck{c.key.data(), observed.dtype, observed.layout, kv_heads, c.budget, d};
      const TensorView cv{c.value.data(), observed.dtype, observed.layout, kv_heads, c.budget, d};
      const double* reference_out = ref[l].data() + g * group_size(l);
      if (SameHead(ck, observed.layers[l].key, g) && SameHead(cv, observed.layers[l].value, g)) {
        // Kept as is (policy full, rho = 1): the outputs would be the reference bit for bit.
        AddTerms(reference_out, reference_out, group * held_out[l].tokens, d, &task_error[task]);
        return;
      }
      std::vector<double> out(group_size(l));
      // Rows at position -1 pad a head that keeps fewer tokens than its layer's widest (amber's global budgets).
      const auto head = c.positions.begin() + g * c.budget;
      const int64_t kept = std::find(head, head + c.budget, -1) - head;
      GroupOutputs(held_out[l], ck, cv, g, scale, out.data(), kept);
      AddTerms(reference_out, out.data(), group * held_out[l].tokens, d, &task_error[task]);
    });
    LayerError total;
    for (int64_t l = 0; l < layers; ++l) {
      LayerError layer;
      for (int64_t g = 0; g < kv_heads; ++g) Accumulate(task_error[l * kv_heads + g], &layer);
      Accumulate(layer, &total);
      r.layer_error.push_back(layer.Mean());
      r.layer_budget.push_back(compressed->layers[l].budget);
      r.layer_entropy.push_back(compressed->layers[l].entropy);
    }
    r.mean_rel_error = total.Mean();
    r.error_terms = total.terms;
    r.tokens_in = compressed->tokens_in;
    r.tokens_kept = compressed->tokens_kept;
    r.kept_fraction = static_cast<double>(r.tokens_kept) / static_cast<double>(r.tokens_in);
    r.error_seconds = Seconds(t0);
    if (on_result) on_result(r);
    results.push_back(std::move(r));
  }
  return results;
}

absl::StatusOr<std::vector<EvalResult>> Evaluate(const CacheInput& input, int64_t holdout,
                                                 const std::vector<CompressOptions>& runs, const Backend& backend,
                                                 const EvalCallback& on_result) {
  for (const CompressOptions& o : runs) {
    if (absl::Status s = ValidateOptions(o); !s.ok()) {
      return absl::Status(s.code(), absl::StrCat(RunName(o), ": ", s.message()));
    }
  }
  MEDAKV_ASSIGN_OR_RETURN(const HoldoutSplit split, SplitHoldout(input, holdout));
  return EvaluateHeldOut(split.observed, split.held_out, runs, backend, on_result);
}

std::vector<PolicyKind> AllPolicies() {
  return {PolicyKind::kFull,      PolicyKind::kStreamingLlm, PolicyKind::kH2O, PolicyKind::kSnapKV,
          PolicyKind::kPyramidKV, PolicyKind::kLookM,        PolicyKind::kMeda,  PolicyKind::kAmber};
}

absl::StatusOr<std::vector<PolicyKind>> ParsePolicyList(absl::string_view list) {
  std::vector<PolicyKind> policies;
  for (absl::string_view name : absl::StrSplit(list, ',')) {
    name = absl::StripAsciiWhitespace(name);
    if (name.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("--policies '", list, "': empty policy name"));
    }
    absl::StatusOr<PolicyKind> p = ParsePolicy(name);
    if (!p.ok()) return absl::InvalidArgumentError(absl::StrCat("--policies: ", p.status().message()));
    if (std::find(policies.begin(), policies.end(), *p) == policies.end()) policies.push_back(*p);
  }
  return policies;
}

absl::StatusOr<std::vector<double>> ParseRhoList(absl::string_view list) {
  std::vector<double> rhos;
  for (absl::string_view item : absl::StrSplit(list, ',')) {
    item = absl::StripAsciiWhitespace(item);
    double rho = 0.0;
    if (!absl::SimpleAtod(item, &rho) || !(rho > 0.0 && rho <= 1.0)) {
      return absl::InvalidArgumentError(absl::StrCat("--rhos '", list, "': '", item, "' is not a number in (0, 1]"));
    }
    rhos.push_back(rho);
  }
  std::sort(rhos.begin(), rhos.end());
  rhos.erase(std::unique(rhos.begin(), rhos.end()), rhos.end());
  return rhos;
}

bool IsUniformBaseline(PolicyKind policy) {
  return policy == PolicyKind::kStreamingLlm || policy == PolicyKind::kH2O || policy == PolicyKind::kSnapKV ||
         policy == PolicyKind::kLookM;
}

std::vector<MedaComparison> CompareMedaToUniform(const std::vector<EvalResult>& results) {
  std::map<double, MedaComparison> by_rho;
  std::map<double, bool> has_meda, has_uniform;
  for (const EvalResult& r : results) {
    MedaComparison& c = by_rho[r.rho];
    c.rho = r.rho;
    if (r.policy == PolicyKind::kMeda && !has_meda[r.rho]) {
      c.meda_error = r.mean_rel_error;
      has_meda[r.rho] = true;
    } else if (IsUniformBaseline(r.policy) && (!has_uniform[r.rho] || r.mean_rel_error < c.best_uniform_error)) {
      c.best_uniform = r.policy;
      c.best_uniform_error = r.mean_rel_error;
      has_uniform[r.rho] = true;
    }
  }
  std::vector<MedaComparison> out;
  for (auto& [rho, c] : by_rho) {
    if (!has_meda[rho] || !has_uniform[rho]) continue;
    c.meda_beats_uniform = c.meda_error < c.best_uniform_error;
    out.push_back(c);
  }
  return out;
}

std::string FormatEvalTable(const std::vector<EvalResult>& results) {
  std::vector<const EvalResult*> rows;
  for (const EvalResult& r : results) rows.push_back(&r);
  std::stable_sort(rows.begin(), rows.end(), [](const EvalResult* a, const EvalResult* b) {
    if (a->rho != b->rho) return a->rho < b->rho;
    return a->mean_rel_error < b->mean_rel_error;
  });
  std::string out = "   rho  policy            kept  mean rel error  worst layer\n";
  for (size_t i = 0; i < rows.size(); ++i) {
    const EvalResult& r = *rows[i];
    const bool first = i == 0 || rows[i - 1]->rho != r.rho;
    if (first && i > 0) out += "\n";
    size_t worst = 0;
    for (size_t l = 1; l < r.layer_error.size(); ++l) {
      if (r.layer_error[l] > r.layer_error[worst]) worst = l;
    }
    const std::string worst_s = r.layer_error.empty() ? "" : absl::StrFormat("%.6f (%d)", r.layer_error[worst], worst);
    out += absl::StrFormat("%6s  %-14s %6.2f%%  %14.6f  %s\n", first ? absl::StrCat(r.rho) : "", PolicyName(r.policy),
                           100.0 * r.kept_fraction, r.mean_rel_error, worst_s);
  }
  const std::vector<MedaComparison> verdicts = CompareMedaToUniform(results);
  if (!verdicts.empty()) out += "\n";
  for (const MedaComparison& c : verdicts) {
    if (c.meda_beats_uniform) {
      out += absl::StrFormat("rho %g: meda %.6f beats every uniform-budget baseline (best: %s %.6f)\n", c.rho,
                             c.meda_error, PolicyName(c.best_uniform), c.best_uniform_error);
    } else {
      out += absl::StrFormat("rho %g: meda %.6f does NOT beat the uniform-budget baseline %s (%.6f)\n", c.rho,
                             c.meda_error, PolicyName(c.best_uniform), c.best_uniform_error);
    }
  }
  return out;
}

std::string EvalCsv(const std::vector<EvalResult>& results) {
  std::string out = "policy,rho,kept_fraction,mean_rel_error\n";
  for (const EvalResult& r : results) {
    out += absl::StrFormat("%s,%g,%.9g,%.9g\n", PolicyName(r.policy), r.rho, r.kept_fraction, r.mean_rel_error);
  }
  return out;
}

std::string EvalLayersCsv(const std::vector<EvalResult>& results) {
  std::string out = "policy,rho,layer,budget,entropy,rel_error\n";
  for (const EvalResult& r : results) {
    for (size_t l = 0; l < r.layer_error.size(); ++l) {
      out += absl::StrFormat("%s,%g,%d,%d,%.9g,%.9g\n", PolicyName(r.policy), r.rho, l, r.layer_budget[l],
                             r.layer_entropy[l], r.layer_error[l]);
    }
  }
  return out;
}

absl::Status WriteTextFile(const std::string& path, absl::string_view contents) {
  const std::string tmp = absl::StrCat(path, ".tmp.", getpid());
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    if (!f) return absl::InvalidArgumentError(absl::StrCat(path, ": cannot create (", std::strerror(errno), ")"));
    f.write(contents.data(), static_cast<std::streamsize>(contents.size()));
    f.close();
    if (!f) {
      std::remove(tmp.c_str());
      return absl::InternalError(absl::StrCat(path, ": write failed"));
    }
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    std::remove(tmp.c_str());
    return absl::InvalidArgumentError(absl::StrCat(path, ": cannot write (", std::strerror(err), ")"));
  }
  return absl::OkStatus();
}

}  // namespace medakv
