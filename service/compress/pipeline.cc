#include "service/compress/pipeline.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/common/status.h"
#include "kernels/common/tensor_util.h"
#include "kernels/cpu/budget.h"
#include "service/compress/policy.h"

namespace medakv {
namespace {

// Largest size of one dimension; keeps every product below 2^62 bytes.
constexpr int64_t kMaxDim = int64_t{1} << 24;

double Seconds(std::chrono::steady_clock::time_point since) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - since).count();
}

absl::Status CheckLayerView(const TensorView& v, const CacheInput& in, absl::string_view name, int64_t heads,
                            int64_t tokens) {
  MEDAKV_RETURN_IF_ERROR(CheckView(v, name, heads, tokens, in.head_dim));
  if (v.dtype != in.dtype) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, ": dtype ", DTypeName(v.dtype), " differs from the cache's ", DTypeName(in.dtype)));
  }
  if (v.layout != in.layout) {
    return absl::InvalidArgumentError(absl::StrCat(name, ": layout ", LayoutName(v.layout),
                                                   " differs from the cache's ", LayoutName(in.layout)));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::vector<uint8_t>> ModalityFromSpans(int64_t tokens, const std::vector<ModalitySpan>& spans) {
  std::vector<uint8_t> modality(tokens, static_cast<uint8_t>(Modality::kText));
  for (size_t i = 0; i < spans.size(); ++i) {
    const ModalitySpan& s = spans[i];
    if (s.start < 0 || s.length < 0 || s.start > tokens || s.length > tokens - s.start) {
      return absl::InvalidArgumentError(absl::StrCat("modality span ", i, " (start ", s.start, ", length ",
                                                     s.length, ") is outside [0, ", tokens, ")"));
    }
    if (s.modality != Modality::kText && s.modality != Modality::kVisual) {
      return absl::InvalidArgumentError(absl::StrCat("modality span ", i, ": unknown modality"));
    }
    std::fill(modality.begin() + s.start, modality.begin() + s.start + s.length, static_cast<uint8_t>(s.modality));
  }
  return modality;
}

absl::Status ValidateCacheInput(const CacheInput& in) {
  const int64_t layers = static_cast<int64_t>(in.layers.size());
  if (layers == 0) return absl::InvalidArgumentError("layers: the cache has no layer");
  const std::pair<const char*, int64_t> dims[] = {
      {"kv_heads", in.kv_heads}, {"head_dim", in.head_dim}, {"tokens", in.tokens}, {"layers", layers}};
  for (const auto& [name, v] : dims) {
    if (v <= 0 || v > kMaxDim) {
      return absl::InvalidArgumentError(absl::StrCat(name, " must be in [1, ", kMaxDim, "], got ", v));
    }
  }
  if (in.tokens > INT32_MAX) return absl::InvalidArgumentError("tokens: positions are int32");
  if (in.dtype != DType::kFloat16 && in.dtype != DType::kBFloat16 && in.dtype != DType::kFloat32) {
    return absl::InvalidArgumentError("dtype: expected float16, bfloat16 or float32");
  }
  if (in.layout != Layout::kHND && in.layout != Layout::kNHD) {
    return absl::InvalidArgumentError("layout: expected HND or NHD");
  }
  if (!in.modality.empty()) {
    if (static_cast<int64_t>(in.modality.size()) != in.tokens) {
      return absl::InvalidArgumentError(
          absl::StrCat("modality: ", in.modality.size(), " entries for ", in.tokens, " tokens"));
    }
    for (size_t t = 0; t < in.modality.size(); ++t) {
      if (in.modality[t] > 1) {
        return absl::InvalidArgumentError(absl::StrCat("modality[", t, "] is ", int{in.modality[t]},
                                                       " (expected 0 for text or 1 for visual)"));
      }
    }
  }
  if (in.stats == StatsForm::kQueries) {
    if (in.q_heads <= 0 || in.q_heads > kMaxDim || in.q_heads % in.kv_heads != 0) {
      return absl::InvalidArgumentError(absl::StrCat("q_heads (", in.q_heads,
                                                     ") must be a positive multiple of kv_heads (", in.kv_heads, ")"));
    }
  } else if (in.stats != StatsForm::kPrecomputed) {
    return absl::InvalidArgumentError("statistics: unknown form");
  }
  for (int64_t l = 0; l < layers; ++l) {
    const LayerInput& layer = in.layers[l];
    const std::string prefix = absl::StrCat("layer ", l, " ");
    MEDAKV_RETURN_IF_ERROR(CheckLayerView(layer.key, in, prefix + "key", in.kv_heads, in.tokens));
    MEDAKV_RETURN_IF_ERROR(CheckLayerView(layer.value, in, prefix + "value", in.kv_heads, in.tokens));
    if (in.stats == StatsForm::kQueries) {
      const int64_t q_tokens = layer.query.tokens;
      const int64_t limit = QueryPositionLimit(in.tokens);
      if (q_tokens <= 0 || q_tokens > limit) {
        return absl::InvalidArgumentError(absl::StrCat(prefix, "query: q_tokens must be in [1, 2 x tokens + 65536 = ",
                                                       limit, "], got ", q_tokens));
      }
      MEDAKV_RETURN_IF_ERROR(CheckLayerView(layer.query, in, prefix + "query", in.q_heads, q_tokens));
      if (layer.query_positions.empty() && q_tokens > in.tokens) {
        return absl::InvalidArgumentError(absl::StrCat(
            prefix, "query: ", q_tokens, " rows for ", in.tokens,
            " tokens: rows after the cache (probes) need query_positions (the default is the cache's last rows)"));
      }
      if (!layer.query_positions.empty()) {
        if (static_cast<int64_t>(layer.query_positions.size()) != q_tokens) {
          return absl::InvalidArgumentError(absl::StrCat(prefix, "query_positions: ", layer.query_positions.size(),
                                                         " entries for ", q_tokens, " query rows"));
        }
        for (int64_t i = 0; i < q_tokens; ++i) {
          const int32_t p = layer.query_positions[i];
          if (p < 0 || p >= limit) {
            return absl::InvalidArgumentError(absl::StrCat(prefix, "query_positions[", i, "] is ", p,
                                                           ", outside [0, 2 x tokens + 65536 = ", limit, ")"));
          }
        }
      }
      if (!layer.query_outside_lse.empty()) {
        if (static_cast<int64_t>(layer.query_outside_lse.size()) != in.q_heads * q_tokens) {
          return absl::InvalidArgumentError(absl::StrCat(prefix, "query_outside_lse: ", layer.query_outside_lse.size(),
                                                         " entries, expected q_heads x q_tokens = ",
                                                         in.q_heads * q_tokens));
        }
        for (int64_t i = 0; i < in.q_heads * q_tokens; ++i) {
          const float x = layer.query_outside_lse[i];
          if (std::isnan(x) || x == std::numeric_limits<float>::infinity()) {
            return absl::InvalidArgumentError(absl::StrCat(prefix, "query_outside_lse[", i / q_tokens, ", ",
                                                           i % q_tokens, "] is ", x, " (expected finite or -inf)"));
          }
        }
      }
    } else {
      if (layer.scores == nullptr) return absl::InvalidArgumentError(prefix + "scores: missing");
      if (layer.score_heads != in.kv_heads && (in.q_heads <= 0 || layer.score_heads != in.q_heads)) {
        return absl::InvalidArgumentError(absl::StrCat(prefix, "scores: ", layer.score_heads,
                                                       " heads, expected kv_heads (", in.kv_heads, ")",
                                                       in.q_heads > 0 ? absl::StrCat(" or q_heads (", in.q_heads, ")") : ""));
      }
      if (!std::isfinite(layer.entropy)) {
        return absl::InvalidArgumentError(absl::StrCat(prefix, "entropy is not finite (", layer.entropy, ")"));
      }
      // Before any statistics memory is reserved (the backends' ReduceScores
      // would reject them only during the compression).
      for (int64_t i = 0; i < layer.score_heads * in.tokens; ++i) {
        if (!std::isfinite(layer.scores[i])) {
          return absl::InvalidArgumentError(absl::StrCat(prefix, "scores: value at head ", i / in.tokens, ", token ",
                                                         i % in.tokens, " is not finite (", layer.scores[i], ")"));
        }
      }
    }
  }
  return absl::OkStatus();
}

namespace {

const char* ScorerName(Scorer s) {
  switch (s) {
    case Scorer::kNone:
      return "none";
    case Scorer::kAccumulated:
      return "accumulated";
    case Scorer::kWindowPooled:
      return "window_pooled";
  }
  return "unknown";
}

}  // namespace

std::string StatisticsKey::ToString() const {
  if (!computed) return "none";
  std::string s = absl::StrCat("scorer=", ScorerName(scorer), " entropy=", EntropySourceName(entropy_source), "/",
                               EntropyHeadsName(entropy_heads), " scale=", scale);
  if (scorer == Scorer::kWindowPooled) absl::StrAppend(&s, " window=", window, " pool_kernel=", pool_kernel);
  if (recent_rows > 0) absl::StrAppend(&s, " recent_rows=", recent_rows);
  if (aggregation == ScoreAggregation::kMax) absl::StrAppend(&s, " aggregation=max");
  return s;
}

StatisticsKey StatisticsKeyFor(const CompressOptions& options) {
  const PolicyPlan plan = PlanFor(options);
  StatisticsKey key;
  key.computed = plan.scorer != Scorer::kNone || plan.budget == BudgetRule::kEntropy;
  if (!key.computed) return key;
  key.scorer = plan.scorer;
  // Only MEDA's budgets use the cross-modal entropy; the causal one costs nothing extra.
  key.entropy_source = plan.budget == BudgetRule::kEntropy ? options.entropy_source : EntropySource::kCausal;
  key.entropy_heads = options.entropy_heads;
  key.scale = options.scale;
  if (plan.scorer == Scorer::kWindowPooled) {
    key.window = options.window;
    key.pool_kernel = options.pool_kernel;
  }
  if (plan.recent == RecentRule::kSearch) key.recent_rows = options.recent_search_rows;
  if (plan.scorer == Scorer::kAccumulated && options.score_norm == ScoreNorm::kMax) {
    key.aggregation = ScoreAggregation::kMax;
  }
  return key;
}

namespace {

// The query rows' positions of a layer: its query_positions, else the last q_tokens.
// Each query row's position as the kernels take it: rows after the cache
// (probes) see every key, as a row at the cache's last position does.
std::vector<int32_t> RowPositions(const LayerInput& layer, int64_t tokens) {
  std::vector<int32_t> positions = layer.query_positions;
  if (positions.empty()) {
    positions.resize(layer.query.tokens);
    std::iota(positions.begin(), positions.end(), static_cast<int32_t>(tokens - layer.query.tokens));
  }
  for (int32_t& p : positions) p = std::min<int32_t>(p, static_cast<int32_t>(tokens - 1));
  return positions;
}

// The observation window of a layer, in query rows (precomputed statistics: the option).
int64_t WindowRows(const CacheInput& in, const LayerInput& layer, int64_t window) {
  return in.stats == StatsForm::kQueries ? std::min(window, layer.query.tokens) : window;
}

// The last `rows` query rows of a layer (of every head) as a dense tensor of
// its own, with their positions.
struct QueryRows {
  std::vector<uint8_t> bytes;
  TensorView view;
  std::vector<int32_t> positions;
  std::vector<float> outside_lse;  // [heads, rows] where the layer has one
  const float* Outside() const { return outside_lse.empty() ? nullptr : outside_lse.data(); }
};
QueryRows LastRows(const TensorView& q, const std::vector<int32_t>& positions, const std::vector<float>& outside,
                   int64_t rows) {
  QueryRows out;
  rows = std::min(rows, q.tokens);
  const int64_t first = q.tokens - rows;
  const size_t row_bytes = static_cast<size_t>(q.head_dim) * DTypeSize(q.dtype);
  out.bytes.resize(static_cast<size_t>(q.heads * rows) * row_bytes);
  const MutableTensorView tail{out.bytes.data(), q.dtype, q.layout, q.heads, rows, q.head_dim};
  for (int64_t h = 0; h < q.heads; ++h) {
    for (int64_t r = 0; r < rows; ++r) std::memcpy(tail.Row(h, r), q.Row(h, first + r), row_bytes);
  }
  out.view = AsConst(tail);
  out.positions.assign(positions.begin() + first, positions.end());
  if (!outside.empty()) {
    out.outside_lse.resize(static_cast<size_t>(q.heads * rows));
    for (int64_t h = 0; h < q.heads; ++h) {
      std::copy_n(outside.begin() + h * q.tokens + first, rows, out.outside_lse.begin() + h * rows);
    }
  }
  return out;
}

// Amber's recent search statistics of one layer: the accumulated attention
// of its last min(recent_rows, q_tokens) query rows alone (the same op on a
// dense copy of those rows; `args` is the layer's statistics call).
absl::Status RecentRowScores(const LayerInput& layer, const std::vector<int32_t>& positions,
                             const AttentionStatsArgs& args, int64_t recent_rows, const Backend& backend,
                             std::vector<float>* scores) {
  const QueryRows tail = LastRows(layer.query, positions, layer.query_outside_lse, recent_rows);
  AttentionStatsArgs a = args;
  a.query = tail.view;
  a.query_positions = tail.positions.data();
  a.outside_lse = tail.Outside();
  a.score_rows_begin = 0;
  a.aggregation = ScoreAggregation::kSum;  // the attention a window holds: a sum whatever the scores' aggregation
  scores->resize(static_cast<size_t>(args.key.heads * args.key.tokens));
  AttentionStatsOutput out;
  out.scores = scores->data();
  return backend.AttentionStats(a, &out);
}

// Runs fn(0), ..., fn(layers - 1), `concurrency` at a time (on this thread
// and concurrency - 1 more), stopping early once `stop()` reads true or a
// call fails. Returns the error of the lowest failed layer (CANCELLED when
// stopped), so the result does not depend on the threads' timing.
absl::Status ForEachLayer(int64_t layers, int concurrency, const std::function<bool()>& stop,
                          const std::function<absl::Status(int64_t)>& fn) {
  std::vector<absl::Status> status(layers);
  std::atomic<int64_t> next{0};
  std::atomic<bool> failed{false};
  auto work = [&] {
    for (int64_t l; (l = next.fetch_add(1)) < layers;) {
      if (failed.load() || stop()) {
        status[l] = absl::CancelledError("compression cancelled");
        failed.store(true);
        continue;
      }
      status[l] = fn(l);
      if (!status[l].ok()) failed.store(true);
    }
  };
  const int64_t helpers = std::min<int64_t>(std::max(concurrency, 1), layers) - 1;
  std::vector<std::thread> threads;
  for (int64_t i = 0; i < helpers; ++i) threads.emplace_back(work);
  work();
  for (std::thread& t : threads) t.join();
  // The lowest layer that failed on its own; else the cancellation.
  const absl::Status* cancelled = nullptr;
  for (const absl::Status& s : status) {
    if (s.ok()) continue;
    if (!absl::IsCancelled(s) || s.message() != "compression cancelled") return s;
    if (cancelled == nullptr) cancelled = &s;
  }
  return cancelled != nullptr ? *cancelled : absl::OkStatus();
}

// The statistics stage on a validated input and options.
absl::StatusOr<Statistics> StatisticsStage(const CacheInput& in, const CompressOptions& options,
                                           const Backend& backend, const std::atomic<bool>* cancelled) {
  auto stop = [cancelled] { return cancelled != nullptr && cancelled->load(std::memory_order_relaxed); };
  const auto t0 = std::chrono::steady_clock::now();
  const PolicyPlan plan = PlanFor(options);
  const int64_t layers = static_cast<int64_t>(in.layers.size());
  const int64_t kv_heads = in.kv_heads, tokens = in.tokens;
  const bool queries = in.stats == StatsForm::kQueries;
  Statistics st;
  st.key = StatisticsKeyFor(options);
  st.layers = layers;
  st.kv_heads = kv_heads;
  st.tokens = tokens;
  st.scores.assign(layers, std::vector<float>());
  st.entropy.assign(layers, 0.f);
  if (queries && st.key.recent_rows > 0) st.recent_scores.assign(layers, std::vector<float>());
  if (!st.key.computed) {
    st.seconds = Seconds(t0);
    return st;
  }
  const std::vector<uint8_t> modality =
      in.modality.empty() ? std::vector<uint8_t>(tokens, static_cast<uint8_t>(Modality::kText)) : in.modality;
  const float scale = options.scale > 0.f ? options.scale : 1.f / std::sqrt(static_cast<float>(in.head_dim));
  // One layer's statistics; layers are independent (each writes only its own slots of `st`).
  auto one_layer = [&](int64_t l) -> absl::Status {
    const LayerInput& layer = in.layers[l];
    std::vector<float>& s = st.scores[l];
    s.resize(kv_heads * tokens);
    const int64_t rows = WindowRows(in, layer, options.window);
    if (!queries) {
      MEDAKV_RETURN_IF_ERROR(backend.ReduceScores(layer.scores, layer.score_heads, kv_heads, tokens, s.data()));
      st.entropy[l] = layer.entropy;
    } else {
      const std::vector<int32_t> positions = RowPositions(layer, tokens);
      AttentionStatsArgs args;
      args.query = layer.query;
      args.query_positions = positions.data();
      args.key = layer.key;
      args.modality = modality.data();
      args.scale = scale;
      args.entropy_heads = options.entropy_heads;
      args.entropy_source = st.key.entropy_source;
      args.aggregation = st.key.aggregation;
      args.outside_lse = layer.query_outside_lse.empty() ? nullptr : layer.query_outside_lse.data();
      args.cancelled = cancelled;
      // A windowed scorer reads only its window's rows: the statistics run on
      // those alone (the same scores, in the same order; the reported entropy
      // is theirs).
      QueryRows window;
      if (plan.scorer == Scorer::kWindowPooled && rows < layer.query.tokens) {
        window = LastRows(layer.query, positions, layer.query_outside_lse, rows);
        args.query = window.view;
        args.query_positions = window.positions.data();
        args.outside_lse = window.Outside();
      }
      AttentionStatsOutput out;
      out.scores = s.data();
      absl::Status status = backend.AttentionStats(args, &out);
      if (absl::IsCancelled(status)) return absl::CancelledError("compression cancelled");
      if (!status.ok()) return absl::Status(status.code(), absl::StrCat("layer ", l, ": ", status.message()));
      if (!std::isfinite(out.entropy)) {
        // Finite keys and queries whose dot products overflow float32: no score is meaningful.
        return absl::InvalidArgumentError(absl::StrCat(
            "layer ", l, ": the attention statistics are not finite (entropy ", out.entropy,
            "): the keys or queries hold values whose products overflow float32"));
      }
      st.entropy[l] = out.entropy;
      if (st.key.recent_rows > 0) {
        status = RecentRowScores(layer, positions, args, st.key.recent_rows, backend, &st.recent_scores[l]);
        if (absl::IsCancelled(status)) return absl::CancelledError("compression cancelled");
        if (!status.ok()) {
          return absl::Status(status.code(), absl::StrCat("layer ", l, ": ", status.message()));
        }
      }
      if (plan.scorer == Scorer::kWindowPooled) {
        // Mean over the window's rows and the group's query heads.
        const float inv = 1.f / static_cast<float>(rows * (in.q_heads / kv_heads));
        for (float& x : s) x *= inv;
      }
    }
    if (plan.scorer == Scorer::kWindowPooled) {
      std::vector<float> pooled(s.size());
      MEDAKV_RETURN_IF_ERROR(
          backend.PoolScores(s.data(), kv_heads, tokens, tokens - std::min(rows, tokens), options.pool_kernel,
                             pooled.data()));
      s.swap(pooled);
    }
    return absl::OkStatus();
  };
  MEDAKV_RETURN_IF_ERROR(ForEachLayer(layers, backend.ConcurrentLayers(), stop, one_layer));
  st.seconds = Seconds(t0);
  return st;
}

// Amber's recent search (RecentRule::kSearch): one selection per fraction of
// kRecentSearchFractions (M = round(f B) recent tokens, the rest as `sel`
// says), and per kv head the first fraction whose kept tokens hold the most
// of the last rows' attention `recent` ([kv_heads, tokens], summed in
// ascending position order in double). With a shared selection the heads'
// sums are added and one fraction serves every head.
absl::Status SelectWithRecentSearch(SelectArgs sel, const std::vector<float>& recent, const Backend& backend,
                                    std::vector<int32_t>* positions) {
  const int64_t kv_heads = sel.kv_heads, budget = sel.budget;
  std::vector<int32_t> candidate(positions->size());
  std::vector<double> best(kv_heads, -1.0);
  for (double fraction : kRecentSearchFractions) {
    sel.recent_fraction = fraction;
    sel.recent_tokens = -1;
    MEDAKV_RETURN_IF_ERROR(backend.SelectTokens(sel, candidate.data()));
    std::vector<double> held(kv_heads, 0.0);
    for (int64_t h = 0; h < kv_heads; ++h) {
      const float* w = recent.data() + h * sel.tokens;
      for (int64_t k = 0; k < budget; ++k) held[h] += w[candidate[h * budget + k]];
    }
    if (sel.shared_selection) {
      const double all = std::accumulate(held.begin(), held.end(), 0.0);
      std::fill(held.begin(), held.end(), all);
    }
    for (int64_t h = 0; h < kv_heads; ++h) {
      if (held[h] > best[h]) {
        best[h] = held[h];
        std::copy_n(candidate.begin() + h * budget, budget, positions->begin() + h * budget);
      }
    }
  }
  return absl::OkStatus();
}

// One layer with per-head budgets (BudgetRule::kGlobal): head h keeps
// head_budget[h] tokens, selected on its own as every policy selects (its
// first `forced` tokens, the recent window or its search, the top scores),
// and the result is padded to `width` = the largest head: a padded row has
// position -1 and zero key and value. No merge (ValidateOptions).
absl::Status SelectPerHead(const LayerInput& layer, const std::vector<float>& scores,
                           const std::vector<float>* recent, const CompressOptions& options, const PolicyPlan& plan,
                           const std::vector<uint8_t>& modality, const int64_t* head_budget, int64_t forced,
                           int64_t width, const Backend& backend, LayerResult* r) {
  const int64_t kv_heads = layer.key.heads, tokens = layer.key.tokens, head_dim = layer.key.head_dim;
  std::fill(r->positions.begin(), r->positions.end(), -1);
  std::vector<int32_t> kept;
  for (int64_t h = 0; h < kv_heads; ++h) {
    const int64_t n = head_budget[h];
    kept.resize(n);
    SelectArgs sel;
    sel.scores = scores.data() + h * tokens;
    sel.modality = modality.data();
    sel.kv_heads = 1;
    sel.tokens = tokens;
    sel.budget = n;
    sel.recent_fraction = options.recent_fraction;
    sel.sinks = forced;
    sel.text_prior = options.text_prior;
    if (plan.recent == RecentRule::kSearch && recent != nullptr) {
      const std::vector<float> head_recent(recent->begin() + h * tokens, recent->begin() + (h + 1) * tokens);
      MEDAKV_RETURN_IF_ERROR(SelectWithRecentSearch(sel, head_recent, backend, &kept));
    } else {
      MEDAKV_RETURN_IF_ERROR(backend.SelectTokens(sel, kept.data()));
    }
    std::copy(kept.begin(), kept.end(), r->positions.begin() + h * width);
  }
  const size_t bytes = static_cast<size_t>(kv_heads * width * head_dim) * DTypeSize(layer.key.dtype);
  r->key.assign(bytes, 0);
  r->value.assign(bytes, 0);
  const MutableTensorView out_key{r->key.data(), layer.key.dtype, layer.key.layout, kv_heads, width, head_dim};
  const MutableTensorView out_value{r->value.data(), layer.value.dtype, layer.value.layout, kv_heads, width, head_dim};
  const size_t row = static_cast<size_t>(head_dim) * DTypeSize(layer.key.dtype);
  for (int64_t h = 0; h < kv_heads; ++h) {
    for (int64_t j = 0; j < head_budget[h]; ++j) {
      const int32_t t = r->positions[h * width + j];
      std::memcpy(out_key.Row(h, j), layer.key.Row(h, t), row);
      std::memcpy(out_value.Row(h, j), layer.value.Row(h, t), row);
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status CheckFiniteInput(const CacheInput& in) {
  for (size_t l = 0; l < in.layers.size(); ++l) {
    const LayerInput& layer = in.layers[l];
    MEDAKV_RETURN_IF_ERROR(CheckFinite(layer.key, absl::StrCat("layer ", l, " key")));
    MEDAKV_RETURN_IF_ERROR(CheckFinite(layer.value, absl::StrCat("layer ", l, " value")));
    if (in.stats == StatsForm::kQueries) {
      MEDAKV_RETURN_IF_ERROR(CheckFinite(layer.query, absl::StrCat("layer ", l, " query")));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<Statistics> ComputeStatistics(const CacheInput& in, const CompressOptions& options,
                                             const Backend& backend, const std::atomic<bool>* cancelled) {
  MEDAKV_RETURN_IF_ERROR(ValidateOptions(options));
  MEDAKV_RETURN_IF_ERROR(ValidateCacheInput(in));
  MEDAKV_RETURN_IF_ERROR(CheckFiniteInput(in));
  return StatisticsStage(in, options, backend, cancelled);
}

absl::StatusOr<CompressResult> Compress(const CacheInput& in, const CompressOptions& options,
                                        const Backend& backend, const std::atomic<bool>* cancelled,
                                        const Statistics* statistics, const LayerCallback* on_layer) {
  auto stop = [cancelled] { return cancelled != nullptr && cancelled->load(std::memory_order_relaxed); };
  const absl::Status cancel_status = absl::CancelledError("compression cancelled");
  MEDAKV_RETURN_IF_ERROR(ValidateOptions(options));
  MEDAKV_RETURN_IF_ERROR(ValidateCacheInput(in));
  MEDAKV_RETURN_IF_ERROR(CheckFiniteInput(in));
  const PolicyPlan plan = PlanFor(options);
  const int64_t layers = static_cast<int64_t>(in.layers.size());
  const int64_t kv_heads = in.kv_heads, tokens = in.tokens;
  if (statistics != nullptr) {
    const StatisticsKey key = StatisticsKeyFor(options);
    if (!(statistics->key == key)) {
      return absl::InvalidArgumentError(absl::StrCat("statistics: computed for other options (",
                                                     statistics->key.ToString(), ") than these (", key.ToString(),
                                                     ")"));
    }
    if (statistics->layers != layers || statistics->kv_heads != kv_heads || statistics->tokens != tokens ||
        static_cast<int64_t>(statistics->scores.size()) != layers ||
        static_cast<int64_t>(statistics->entropy.size()) != layers) {
      return absl::InvalidArgumentError(absl::StrCat("statistics: computed for ", statistics->layers, " layers x ",
                                                     statistics->kv_heads, " kv heads x ", statistics->tokens,
                                                     " tokens, the cache has ", layers, " x ", kv_heads, " x ",
                                                     tokens));
    }
    for (int64_t l = 0; l < layers && key.computed; ++l) {
      if (static_cast<int64_t>(statistics->scores[l].size()) != kv_heads * tokens) {
        return absl::InvalidArgumentError(absl::StrCat("statistics: layer ", l, " has ",
                                                       statistics->scores[l].size(), " scores, expected ",
                                                       kv_heads * tokens));
      }
    }
    if (!statistics->recent_scores.empty()) {
      if (static_cast<int64_t>(statistics->recent_scores.size()) != layers) {
        return absl::InvalidArgumentError(absl::StrCat("statistics: recent scores for ",
                                                       statistics->recent_scores.size(), " layers, expected ",
                                                       layers));
      }
      for (int64_t l = 0; l < layers; ++l) {
        if (static_cast<int64_t>(statistics->recent_scores[l].size()) != kv_heads * tokens) {
          return absl::InvalidArgumentError(absl::StrCat("statistics: layer ", l, " has ",
                                                         statistics->recent_scores[l].size(),
                                                         " recent scores, expected ", kv_heads * tokens));
        }
      }
    }
  }
  const std::vector<uint8_t> modality =
      in.modality.empty() ? std::vector<uint8_t>(tokens, static_cast<uint8_t>(Modality::kText)) : in.modality;
  // The observation window, in query rows and in (the most recent) tokens.
  auto window_rows = [&](const LayerInput& layer) { return WindowRows(in, layer, options.window); };
  int64_t window_tokens = tokens;
  for (const LayerInput& layer : in.layers) window_tokens = std::min(window_tokens, window_rows(layer));

  CompressResult result;
  result.layers.resize(layers);
  result.tokens_in = layers * tokens;

  // Stage 1: statistics of every layer (scores for the scorer, entropy for MEDA's budgets).
  std::optional<Statistics> computed;
  if (statistics == nullptr) {
    absl::StatusOr<Statistics> st = StatisticsStage(in, options, backend, cancelled);
    if (!st.ok()) return st.status();
    computed = *std::move(st);
    statistics = &*computed;
    result.seconds.statistics = computed->seconds;
  }
  // amber's visible-mean scores: each token's accumulated attention over the
  // (row, head) pairs that can see it (query statistics only: precomputed
  // scores are used as the worker computed them).
  std::vector<std::vector<float>> normalized;
  const bool visible_mean = options.score_norm == ScoreNorm::kVisibleMean && plan.scorer == Scorer::kAccumulated &&
                            in.stats == StatsForm::kQueries;
  if (visible_mean) {
    normalized = statistics->scores;
    const int64_t group = in.q_heads / kv_heads;
    std::vector<int64_t> seen(tokens + 1);
    for (int64_t l = 0; l < layers; ++l) {
      // seen[t]: the rows at positions >= t.
      std::fill(seen.begin(), seen.end(), 0);
      for (int32_t p : RowPositions(in.layers[l], tokens)) ++seen[p];  // positions within [0, T)
      for (int64_t t = tokens - 1; t > 0; --t) seen[t - 1] += seen[t];
      for (int64_t h = 0; h < kv_heads; ++h) {
        float* s = normalized[l].data() + h * tokens;
        for (int64_t t = 0; t < tokens; ++t) {
          s[t] = seen[t] > 0 ? s[t] / static_cast<float>(group * seen[t]) : 0.f;
        }
      }
    }
  }
  const std::vector<std::vector<float>>& scores = visible_mean ? normalized : statistics->scores;
  const std::vector<float>& entropy = statistics->entropy;

  // Stage 2: budgets across layers.
  auto t0 = std::chrono::steady_clock::now();
  std::vector<int64_t> budget(layers, tokens);
  std::vector<double> alpha(layers, 1.0);
  // Per-head budgets [layers * kv_heads] where heads keep different numbers
  // (BudgetRule::kGlobal); budget[l] is then the layer's largest.
  std::vector<int64_t> head_budget;
  const int64_t forced_head_tokens = std::min<int64_t>(std::max<int64_t>(options.sinks, 1), tokens);
  switch (plan.budget) {
    case BudgetRule::kFull:
      break;
    case BudgetRule::kUniform:
      std::fill(budget.begin(), budget.end(), UniformBudget(options.budget.rho, tokens));
      break;
    case BudgetRule::kPyramid: {
      MEDAKV_ASSIGN_OR_RETURN(budget, PyramidBudgets(layers, tokens, options.budget.rho, window_tokens,
                                                     options.pyramid_beta));
      break;
    }
    case BudgetRule::kEntropy: {
      MEDAKV_ASSIGN_OR_RETURN(LayerBudgets b, AllocateEntropyBudgets(entropy, tokens, options.budget));
      budget = std::move(b.budget);
      alpha = std::move(b.alpha);
      break;
    }
    case BudgetRule::kDepth: {
      MEDAKV_ASSIGN_OR_RETURN(budget, DepthBudgets(layers, tokens, options.budget.rho, options.depth_ratio));
      break;
    }
    case BudgetRule::kMass: {
      MEDAKV_ASSIGN_OR_RETURN(LayerBudgets b, AllocateMassBudgets(scores, kv_heads, tokens, options.budget));
      budget = std::move(b.budget);
      break;
    }
    case BudgetRule::kGlobal: {
      MEDAKV_ASSIGN_OR_RETURN(head_budget, GlobalHeadBudgets(scores, kv_heads, tokens, options.budget.rho,
                                                             forced_head_tokens));
      for (int64_t l = 0; l < layers; ++l) {
        budget[l] = *std::max_element(head_budget.begin() + l * kv_heads, head_budget.begin() + (l + 1) * kv_heads);
      }
      break;
    }
  }
  if (plan.budget == BudgetRule::kGlobal) {
    // alpha_l: the fraction of the layer's (head, token) slots kept.
    for (int64_t l = 0; l < layers; ++l) {
      const int64_t kept = std::accumulate(head_budget.begin() + l * kv_heads,
                                           head_budget.begin() + (l + 1) * kv_heads, int64_t{0});
      alpha[l] = static_cast<double>(kept) / static_cast<double>(kv_heads * tokens);
    }
  } else if (plan.budget != BudgetRule::kEntropy) {
    for (int64_t l = 0; l < layers; ++l) alpha[l] = static_cast<double>(budget[l]) / static_cast<double>(tokens);
  }
  result.seconds.allocate = Seconds(t0);

  // Stage 3: selection, merging and compaction of every layer.
  t0 = std::chrono::steady_clock::now();
  const std::vector<float> no_scores(plan.scorer == Scorer::kNone ? kv_heads * tokens : 0, 0.f);
  for (int64_t l = 0; l < layers; ++l) {
    if (stop()) return cancel_status;
    const LayerInput& layer = in.layers[l];
    LayerResult& r = result.layers[l];
    r.entropy = entropy[l];
    r.alpha = alpha[l];
    r.budget = budget[l];
    result.tokens_kept += budget[l];
    r.positions.resize(kv_heads * budget[l]);
    if (!head_budget.empty()) {
      MEDAKV_RETURN_IF_ERROR(SelectPerHead(layer, scores[l],
                                           statistics->recent_scores.empty() ? nullptr : &statistics->recent_scores[l],
                                           options, plan, modality, head_budget.data() + l * kv_heads,
                                           forced_head_tokens, budget[l], backend, &r));
      if (on_layer != nullptr && *on_layer) MEDAKV_RETURN_IF_ERROR((*on_layer)(l, r));
      continue;
    }
    if (budget[l] == tokens) {
      for (int64_t h = 0; h < kv_heads; ++h) {
        std::iota(r.positions.begin() + h * tokens, r.positions.begin() + (h + 1) * tokens, 0);
      }
    } else {
      SelectArgs sel;
      sel.scores = plan.scorer == Scorer::kNone ? no_scores.data() : scores[l].data();
      sel.modality = modality.data();
      sel.kv_heads = kv_heads;
      sel.tokens = tokens;
      sel.budget = budget[l];
      sel.recent_fraction = options.recent_fraction;
      sel.recent_tokens = plan.recent == RecentRule::kWindow ? std::min(window_rows(layer), tokens)
                          : plan.recent == RecentRule::kRest ? tokens
                                                             : -1;
      sel.sinks = plan.use_sinks ? options.sinks : 0;
      sel.text_prior = options.text_prior;
      sel.shared_selection = options.shared_selection;
      if (plan.recent == RecentRule::kSearch && !statistics->recent_scores.empty()) {
        MEDAKV_RETURN_IF_ERROR(
            SelectWithRecentSearch(sel, statistics->recent_scores[l], backend, &r.positions));
      } else {
        MEDAKV_RETURN_IF_ERROR(backend.SelectTokens(sel, r.positions.data()));
      }
    }
    const size_t bytes = static_cast<size_t>(kv_heads * budget[l] * in.head_dim) * DTypeSize(in.dtype);
    r.key.resize(bytes);
    r.value.resize(bytes);
    MergeArgs merge;
    merge.key = layer.key;
    merge.value = layer.value;
    merge.kept = r.positions.data();
    merge.budget = budget[l];
    merge.mode = options.merge;
    merge.threshold = options.merge_threshold;
    merge.cancelled = cancelled;
    const MutableTensorView out_key{r.key.data(), in.dtype, in.layout, kv_heads, budget[l], in.head_dim};
    const MutableTensorView out_value{r.value.data(), in.dtype, in.layout, kv_heads, budget[l], in.head_dim};
    absl::Status s = backend.MergeAndGather(merge, out_key, out_value);
    if (absl::IsCancelled(s)) return cancel_status;
    if (!s.ok()) return absl::Status(s.code(), absl::StrCat("layer ", l, ": ", s.message()));
    if (on_layer != nullptr && *on_layer) MEDAKV_RETURN_IF_ERROR((*on_layer)(l, r));
  }
  result.seconds.select_merge = Seconds(t0);
  return result;
}

}  // namespace medakv
