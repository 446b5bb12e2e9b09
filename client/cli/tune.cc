#include "client/cli/tune.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <set>
#include <utility>

#include <sys/stat.h>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "client/cli/cache_file.h"
#include "client/io/safetensors.h"
#include "kernels/common/status.h"
#include "service/server/convert.h"

namespace medakv {
namespace {

std::string Num(double v) { return absl::StrFormat("%g", v); }

// The defaults of `policy` with `change` applied, named after what differs.
TuneCandidate Variant(PolicyKind policy, const std::function<void(CompressOptions&)>& change) {
  CompressOptions o = DefaultOptions(policy);
  change(o);
  return TuneCandidate{CandidateName(o), o};
}

// amber with every combination of the given options; recent fractions only
// where the recent search is off (search_rows 0), since the search replaces them.
void AddAmberVariants(std::vector<TuneCandidate>* c, const std::vector<ScoreNorm>& norms,
                      const std::vector<LayerBudget>& budgets, const std::vector<int64_t>& search_rows,
                      const std::vector<double>& recent, const std::vector<int64_t>& sinks) {
  std::set<std::string> seen;
  for (const TuneCandidate& t : *c) seen.insert(t.name);
  for (ScoreNorm n : norms) {
    for (LayerBudget b : budgets) {
      for (int64_t rows : search_rows) {
        for (double f :
             rows > 0 ? std::vector<double>{DefaultOptions(PolicyKind::kAmber).recent_fraction} : recent) {
          for (int64_t s : sinks) {
            TuneCandidate t = Variant(PolicyKind::kAmber, [=](CompressOptions& o) {
              o.score_norm = n;
              o.layer_budget = b;
              if (b == LayerBudget::kEntropy) o.budget.tau = 5;
              o.recent_search_rows = rows;
              o.recent_fraction = f;
              o.sinks = s;
            });
            if (seen.insert(t.name).second) c->push_back(t);
          }
        }
      }
    }
  }
}

// Every policy at its own defaults (amber included; the others are the baselines).
std::vector<TuneCandidate> Baselines() {
  std::vector<TuneCandidate> c;
  for (PolicyKind p : {PolicyKind::kStreamingLlm, PolicyKind::kH2O, PolicyKind::kSnapKV, PolicyKind::kPyramidKV,
                       PolicyKind::kLookM, PolicyKind::kMeda, PolicyKind::kAmber}) {
    c.push_back(TuneCandidate{PolicyName(p), DefaultOptions(p)});
  }
  return c;
}

std::vector<TuneCandidate> QuickGrid() {
  std::vector<TuneCandidate> c = Baselines();
  for (double f : {0.125, 0.25}) {
    c.push_back(Variant(PolicyKind::kH2O, [f](CompressOptions& o) { o.recent_fraction = f; }));
  }
  for (int64_t w : {16, 32}) {
    c.push_back(Variant(PolicyKind::kSnapKV, [w](CompressOptions& o) { o.window = w; }));
  }
  c.push_back(Variant(PolicyKind::kMeda, [](CompressOptions& o) { o.merge = MergeMode::kNone; }));
  c.push_back(Variant(PolicyKind::kMeda, [](CompressOptions& o) { o.merge_threshold = MergeThreshold::kMean; }));
  for (double tau : {2.0, 5.0, 10.0}) {
    for (MergeMode m : {MergeMode::kAverage, MergeMode::kNone}) {
      c.push_back(Variant(PolicyKind::kMeda, [=](CompressOptions& o) {
        o.budget.tau = tau;
        o.merge = m;
      }));
    }
  }
  c.push_back(Variant(PolicyKind::kMeda, [](CompressOptions& o) {
    o.budget.tau = 5;
    o.merge = MergeMode::kNone;
    o.text_prior = TextPrior::kNone;
  }));
  AddAmberVariants(&c, {ScoreNorm::kSum, ScoreNorm::kVisibleMean},
                   {LayerBudget::kDepth, LayerBudget::kUniform}, {16, 0}, {0.5, 0.375}, {0});
  AddAmberVariants(&c, {ScoreNorm::kSum}, {LayerBudget::kMass, LayerBudget::kEntropy}, {16}, {}, {0, 4});
  // The reconstruction default (ReconstructionOptions: max score, per-head budgets across layers, 4 sinks,
  // no recent window) and its neighbours.
  AddAmberVariants(&c, {ScoreNorm::kMax, ScoreNorm::kSum}, {LayerBudget::kGlobal}, {0}, {0.0}, {4});
  AddAmberVariants(&c, {ScoreNorm::kMax}, {LayerBudget::kDepth, LayerBudget::kMass}, {0}, {0.0}, {4});
  for (double r : {0.6, 0.9}) {
    c.push_back(Variant(PolicyKind::kAmber, [r](CompressOptions& o) { o.depth_ratio = r; }));
  }
  return c;
}

std::vector<TuneCandidate> FullGrid() {
  std::vector<TuneCandidate> c = Baselines();
  std::set<std::string> seen;
  for (const TuneCandidate& b : c) seen.insert(b.name);
  auto add = [&](const TuneCandidate& t) {
    if (seen.insert(t.name).second) c.push_back(t);
  };
  for (double f : {0.0, 0.125, 0.25, 0.5, 0.75}) {
    for (bool shared : {false, true}) {
      add(Variant(PolicyKind::kH2O, [=](CompressOptions& o) {
        o.recent_fraction = f;
        o.shared_selection = shared;
      }));
    }
  }
  for (int64_t w : {8, 16, 32, 64}) {
    for (int64_t k : {1, 5, 9}) {
      add(Variant(PolicyKind::kSnapKV, [=](CompressOptions& o) {
        o.window = w;
        o.pool_kernel = k;
      }));
    }
  }
  for (int64_t s : {1, 4, 16}) {
    add(Variant(PolicyKind::kStreamingLlm, [s](CompressOptions& o) { o.sinks = s; }));
  }
  for (double tau : {1.0, 2.0, 5.0, 10.0, 20.0}) {
    for (MergeMode m : {MergeMode::kAverage, MergeMode::kWeighted, MergeMode::kNone}) {
      for (TextPrior p : {TextPrior::kAdditive, TextPrior::kNone}) {
        for (double f : {0.25, 0.5}) {
          add(Variant(PolicyKind::kMeda, [=](CompressOptions& o) {
            o.budget.tau = tau;
            o.merge = m;
            o.text_prior = p;
            o.recent_fraction = f;
          }));
        }
      }
    }
  }
  for (EntropySource src : {EntropySource::kCrossModal, EntropySource::kCausal}) {
    for (double tau : {2.0, 5.0}) {
      add(Variant(PolicyKind::kMeda, [=](CompressOptions& o) {
        o.entropy_source = src;
        o.entropy_heads = EntropyHeads::kMeanEntropy;
        o.budget.tau = tau;
        o.merge = MergeMode::kNone;
      }));
    }
  }
  AddAmberVariants(&c, {ScoreNorm::kSum, ScoreNorm::kVisibleMean},
                   {LayerBudget::kDepth, LayerBudget::kUniform, LayerBudget::kMass, LayerBudget::kEntropy},
                   {1, 4, 16, 64, 0}, {0.125, 0.25, 0.5, 0.75}, {0, 4, 16});
  // The max score and per-head budgets across layers (what a reconstruction pass runs by default).
  AddAmberVariants(&c, {ScoreNorm::kMax, ScoreNorm::kSum},
                   {LayerBudget::kGlobal, LayerBudget::kDepth, LayerBudget::kMass}, {16, 0}, {0.0, 0.25}, {0, 4, 16});
  for (double r : {0.5, 0.6, 0.7, 0.9, 1.25}) {
    add(Variant(PolicyKind::kAmber, [r](CompressOptions& o) { o.depth_ratio = r; }));
  }
  return c;
}

// The published policies at their own defaults (amber, this project's, is not one).
bool IsBaseline(const TuneCandidate& c) {
  return c.options.policy != PolicyKind::kAmber && c.name == PolicyName(c.options.policy);
}


// The lowest-error baseline row at rho index i (rows of that rho are
// [begin, end)); nullptr when no baseline ran.
const TuneRow* BestBaseline(const TuneReport& report, size_t begin, size_t end) {
  const TuneRow* best = nullptr;
  for (size_t k = begin; k < end; ++k) {
    const TuneRow& r = report.rows[k];
    if (r.baseline && (best == nullptr || r.mean_error < best->mean_error)) best = &r;
  }
  return best;
}

// [begin, end) of the rows at report.rhos[i].
std::pair<size_t, size_t> RhoRange(const TuneReport& report, size_t i) {
  const size_t per_rho = report.rows.size() / report.rhos.size();
  return {i * per_rho, (i + 1) * per_rho};
}

}  // namespace

std::string FutureFileOf(const std::string& cache_path) {
  constexpr absl::string_view kExt = ".safetensors";
  absl::string_view stem = cache_path;
  if (absl::EndsWith(stem, kExt)) stem.remove_suffix(kExt.size());
  return absl::StrCat(stem, ".future.safetensors");
}

absl::StatusOr<LoadedSample> LoadSample(const std::string& cache_path, Layout layout, int64_t holdout) {
  MEDAKV_ASSIGN_OR_RETURN(safetensors::File file, safetensors::File::Open(cache_path));
  absl::StatusOr<std::unique_ptr<LoadedCache>> loaded = LoadCache(std::move(file), layout);
  if (!loaded.ok()) {
    return absl::Status(loaded.status().code(), absl::StrCat(cache_path, ": ", loaded.status().message()));
  }
  std::shared_ptr<LoadedCache> cache = *std::move(loaded);
  const CacheInput& in = cache->input;
  if (in.stats != StatsForm::kQueries) {
    return absl::InvalidArgumentError(
        absl::StrCat(cache_path, ": holds precomputed statistics; tuning needs the queries of the prompt rows"));
  }
  LoadedSample out;
  out.sample.name = cache_path;
  const std::string future_path = FutureFileOf(cache_path);
  struct stat st;
  if (::stat(future_path.c_str(), &st) != 0) {
    MEDAKV_ASSIGN_OR_RETURN(HoldoutSplit split, SplitHoldout(in, holdout));
    auto owned = std::make_shared<std::pair<std::shared_ptr<LoadedCache>, HoldoutSplit>>(cache, std::move(split));
    out.sample.observed = owned->second.observed;
    out.sample.future = owned->second.held_out;
    out.future_source = absl::StrCat("the last ", holdout, " query rows of each layer");
    out.storage = owned;
    return out;
  }
  MEDAKV_ASSIGN_OR_RETURN(safetensors::File future, safetensors::File::Open(future_path));
  struct Owned {
    std::shared_ptr<LoadedCache> cache;
    std::vector<std::vector<uint8_t>> bytes;
  };
  auto owned = std::make_shared<Owned>();
  owned->cache = cache;
  const int64_t layers = static_cast<int64_t>(in.layers.size());
  for (int64_t l = 0; l < layers; ++l) {
    const std::string name = absl::StrCat("layer.", l, ".query");
    const safetensors::TensorInfo* q = future.Find(name);
    const int64_t rows = q == nullptr || q->shape.size() != 3 ? 0 : q->shape[layout == Layout::kHND ? 1 : 0];
    const std::vector<int64_t> want = layout == Layout::kHND ? std::vector<int64_t>{in.q_heads, rows, in.head_dim}
                                                             : std::vector<int64_t>{rows, in.q_heads, in.head_dim};
    if (q == nullptr || rows < 1 || q->shape != want || q->type != ElementTypeOf(in.dtype)) {
      return absl::InvalidArgumentError(absl::StrCat(
          future_path, ": ", name, " missing or not ", safetensors::ElementTypeName(ElementTypeOf(in.dtype)), " ",
          layout == Layout::kHND ? "[q_heads, rows, head_dim]" : "[rows, q_heads, head_dim]", " with q_heads=",
          in.q_heads, ", head_dim=", in.head_dim, ", rows >= 1 (the cache's dtype and layout)"));
    }
    // An aligned copy; its heap buffer stays where it is when `bytes` grows.
    const std::vector<uint8_t>& copy = owned->bytes.emplace_back(
        static_cast<const uint8_t*>(q->data), static_cast<const uint8_t*>(q->data) + q->size_bytes);
    out.sample.future.push_back(TensorView{copy.data(), in.dtype, layout, in.q_heads, rows, in.head_dim});
  }
  out.sample.observed = in;
  out.future_source = future_path;
  out.storage = owned;
  return out;
}

std::string CandidateName(const CompressOptions& o) {
  const CompressOptions d = DefaultOptions(o.policy);
  std::string name = PolicyName(o.policy);
  auto add = [&](bool differs, absl::string_view flag, const std::string& value) {
    if (differs) absl::StrAppend(&name, " ", flag, "=", value);
  };
  add(o.budget.tau != d.budget.tau, "tau", Num(o.budget.tau));
  add(o.budget.alpha_min != d.budget.alpha_min, "alpha-min", Num(o.budget.alpha_min));
  add(o.budget.alpha_max != d.budget.alpha_max, "alpha-max", Num(o.budget.alpha_max));
  add(o.budget.exact_total != d.budget.exact_total, "exact-total", o.budget.exact_total ? "true" : "false");
  add(o.entropy_heads != d.entropy_heads, "entropy-heads", EntropyHeadsName(o.entropy_heads));
  add(o.entropy_source != d.entropy_source, "entropy-source", EntropySourceName(o.entropy_source));
  add(o.scale != d.scale, "scale", Num(o.scale));
  add(o.recent_fraction != d.recent_fraction, "recent-fraction", Num(o.recent_fraction));
  add(o.text_prior != d.text_prior, "text-prior", TextPriorName(o.text_prior));
  add(o.shared_selection != d.shared_selection, "shared-selection", o.shared_selection ? "true" : "false");
  add(o.merge != d.merge, "merge", MergeModeName(o.merge));
  add(o.merge_threshold != d.merge_threshold, "merge-threshold", MergeThresholdName(o.merge_threshold));
  add(o.sinks != d.sinks, "sinks", absl::StrCat(o.sinks));
  add(o.window != d.window, "window", absl::StrCat(o.window));
  add(o.pool_kernel != d.pool_kernel, "pool-kernel", absl::StrCat(o.pool_kernel));
  add(o.pyramid_beta != d.pyramid_beta, "pyramid-beta", Num(o.pyramid_beta));
  add(o.score_norm != d.score_norm, "score-norm", ScoreNormName(o.score_norm));
  add(o.layer_budget != d.layer_budget, "layer-budget", LayerBudgetName(o.layer_budget));
  add(o.depth_ratio != d.depth_ratio, "depth-ratio", Num(o.depth_ratio));
  add(o.recent_search_rows != d.recent_search_rows, "recent-search-rows", absl::StrCat(o.recent_search_rows));
  return name;
}

absl::StatusOr<std::vector<TuneCandidate>> TuneGrid(absl::string_view name) {
  if (name == "baselines") return Baselines();
  if (name == "quick") return QuickGrid();
  if (name == "full") return FullGrid();
  return absl::InvalidArgumentError(
      absl::StrCat("--grid '", name, "': unknown grid (expected baselines, quick or full)"));
}

absl::StatusOr<TuneReport> Tune(const std::vector<TuneSample>& samples, const std::vector<TuneCandidate>& candidates,
                                const std::vector<double>& rhos, const Backend& backend,
                                const TuneProgress& progress) {
  if (samples.empty()) return absl::InvalidArgumentError("tune: no sample cache");
  if (candidates.empty()) return absl::InvalidArgumentError("tune: no candidate policy");
  if (rhos.empty()) return absl::InvalidArgumentError("tune: no rho");
  std::set<std::string> names;
  for (const TuneCandidate& c : candidates) {
    if (!names.insert(c.name).second) {
      return absl::InvalidArgumentError(absl::StrCat("tune: two candidates are named '", c.name, "'"));
    }
  }
  std::vector<double> sorted = rhos;
  std::sort(sorted.begin(), sorted.end());
  sorted.erase(std::unique(sorted.begin(), sorted.end()), sorted.end());
  for (double rho : sorted) {
    if (!(rho > 0.0 && rho <= 1.0)) return absl::InvalidArgumentError(absl::StrCat("tune: rho ", rho, " not in (0, 1]"));
  }
  std::vector<CompressOptions> runs;  // rho-major, then candidates
  for (double rho : sorted) {
    for (const TuneCandidate& c : candidates) {
      CompressOptions o = c.options;
      o.budget.rho = rho;
      if (absl::Status s = ValidateOptions(o); !s.ok()) {
        return absl::Status(s.code(), absl::StrCat("candidate '", c.name, "' at rho ", rho, ": ", s.message()));
      }
      runs.push_back(o);
    }
  }
  TuneReport report;
  report.rhos = sorted;
  for (size_t i = 0; i < runs.size(); ++i) {
    const TuneCandidate& c = candidates[i % candidates.size()];
    TuneRow row;
    row.candidate = c.name;
    row.options = runs[i];
    row.rho = runs[i].budget.rho;
    row.baseline = IsBaseline(c);
    report.rows.push_back(std::move(row));
  }
  const int64_t total = static_cast<int64_t>(runs.size() * samples.size());
  int64_t done = 0;
  for (const TuneSample& sample : samples) {
    report.samples.push_back(sample.name);
    const EvalCallback on_result = [&](const EvalResult&) {
      ++done;
      if (progress) progress(done, total);
    };
    absl::StatusOr<std::vector<EvalResult>> results =
        EvaluateHeldOut(sample.observed, sample.future, runs, backend, on_result);
    if (!results.ok()) {
      return absl::Status(results.status().code(), absl::StrCat(sample.name, ": ", results.status().message()));
    }
    for (size_t i = 0; i < runs.size(); ++i) {
      TuneRow& row = report.rows[i];
      row.sample_error.push_back((*results)[i].mean_rel_error);
      row.kept_fraction += (*results)[i].kept_fraction / static_cast<double>(samples.size());
    }
  }
  for (TuneRow& row : report.rows) {
    double sum = 0.0;
    for (double e : row.sample_error) sum += e;
    row.mean_error = sum / static_cast<double>(row.sample_error.size());
  }
  for (size_t i = 0; i < sorted.size(); ++i) {
    const auto [begin, end] = RhoRange(report, i);
    size_t best = begin;
    for (size_t k = begin + 1; k < end; ++k) {
      if (report.rows[k].mean_error < report.rows[best].mean_error) best = k;
    }
    report.best.push_back(best);
  }
  return report;
}

std::string FormatTuneTable(const TuneReport& report) {
  std::string out;
  size_t width = 9;
  for (const TuneRow& r : report.rows) width = std::max(width, r.candidate.size());
  for (size_t i = 0; i < report.rhos.size(); ++i) {
    const auto [begin, end] = RhoRange(report, i);
    const TuneRow* baseline = BestBaseline(report, begin, end);
    absl::StrAppendFormat(&out, "rho %g (%d sample%s; error = mean attention-output error of the future queries)\n",
                          report.rhos[i], report.samples.size(), report.samples.size() == 1 ? "" : "s");
    absl::StrAppendFormat(&out, "  %4s  %-*s  %7s  %9s  %s\n", "rank", width, "candidate", "kept", "error",
                          "vs best baseline");
    std::vector<size_t> order;
    for (size_t k = begin; k < end; ++k) order.push_back(k);
    std::stable_sort(order.begin(), order.end(),
                     [&](size_t a, size_t b) { return report.rows[a].mean_error < report.rows[b].mean_error; });
    int rank = 0;
    for (size_t k : order) {
      const TuneRow& r = report.rows[k];
      std::string versus = "-";
      if (baseline != nullptr && &r == baseline) {
        versus = absl::StrCat("best baseline (", r.candidate, ")");
      } else if (baseline != nullptr && baseline->mean_error > 0) {
        versus = absl::StrFormat("%+.1f%%", 100.0 * (r.mean_error / baseline->mean_error - 1.0));
      }
      absl::StrAppendFormat(&out, "  %4d  %-*s  %6.2f%%  %9.6f  %s%s\n", ++rank, width, r.candidate,
                            100.0 * r.kept_fraction, r.mean_error, versus, k == report.best[i] ? "  <- best" : "");
    }
    out += "\n";
  }
  return out;
}

std::string TuneCsv(const TuneReport& report) {
  std::string out = "candidate,rho,kept_fraction,mean_rel_error,baseline";
  for (const std::string& s : report.samples) absl::StrAppend(&out, ",", s);
  out += "\n";
  for (const TuneRow& r : report.rows) {
    // Names hold spaces and '=', never commas or quotes.
    absl::StrAppendFormat(&out, "%s,%g,%.10g,%.10g,%d", r.candidate, r.rho, r.kept_fraction, r.mean_error,
                          r.baseline ? 1 : 0);
    for (double e : r.sample_error) absl::StrAppendFormat(&out, ",%.10g", e);
    out += "\n";
  }
  return out;
}

absl::StatusOr<medakv::v1::PolicyPresets> TunePresets(const TuneReport& report, absl::string_view prefix,
                                                      double default_rho) {
  medakv::v1::PolicyPresets presets;
  bool default_found = default_rho <= 0.0;
  for (size_t i = 0; i < report.rhos.size(); ++i) {
    const auto [begin, end] = RhoRange(report, i);
    const TuneRow& best = report.rows[report.best[i]];
    const TuneRow* baseline = BestBaseline(report, begin, end);
    std::string description =
        absl::StrFormat("medakv tune: best of %d candidates at rho %g on %d samples: %s, error %.6f", end - begin,
                        report.rhos[i], report.samples.size(), best.candidate, best.mean_error);
    if (baseline != nullptr) {
      absl::StrAppendFormat(&description, " (best baseline %s: %.6f)", baseline->candidate, baseline->mean_error);
    }
    auto add = [&](const std::string& name) {
      medakv::v1::PolicyPreset* p = presets.add_preset();
      p->set_name(name);
      p->set_description(description);
      *p->mutable_policy() = PolicyToProto(best.options);
    };
    add(absl::StrCat(prefix, "-r", Num(report.rhos[i])));
    if (default_rho > 0.0 && std::abs(report.rhos[i] - default_rho) < 1e-12) {
      add("default");
      default_found = true;
    }
  }
  if (!default_found) {
    return absl::InvalidArgumentError(
        absl::StrCat("--default-rho ", default_rho, " is not one of the tuned rhos (--rhos)"));
  }
  return presets;
}

}  // namespace medakv
