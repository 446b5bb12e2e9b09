#include "service/server/convert.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "kernels/common/status.h"

namespace medakv {
namespace {

namespace v1 = ::medakv::v1;

absl::Status Invalid(absl::string_view message) { return absl::InvalidArgumentError(message); }

// ---- integer fields ----------------------------------------------------------

// `path` in [lo, hi], with the message naming the bound that failed.
absl::Status CheckInt(absl::string_view path, int64_t v, int64_t lo, int64_t hi) {
  if (v < lo) {
    return lo == 1 ? Invalid(absl::StrCat(path, " must be > 0, got ", v))
                   : Invalid(absl::StrCat(path, " must be >= ", lo, ", got ", v));
  }
  if (v > hi) return Invalid(absl::StrCat(path, " must be <= ", hi, ", got ", v));
  return absl::OkStatus();
}

// a * b and a + b, false on overflow.
bool Mul(int64_t a, int64_t b, int64_t* out) { return !__builtin_mul_overflow(a, b, out); }
bool Add(int64_t a, int64_t b, int64_t* out) { return !__builtin_add_overflow(a, b, out); }

// Product of non-negative factors; -1 on overflow or a negative factor.
int64_t Product(std::initializer_list<int64_t> factors) {
  int64_t p = 1;
  for (int64_t f : factors) {
    if (f < 0 || !Mul(p, f, &p)) return -1;
  }
  return p;
}

bool KnownDType(DType d) { return d == DType::kFloat16 || d == DType::kBFloat16 || d == DType::kFloat32; }
bool KnownLayout(Layout l) { return l == Layout::kHND || l == Layout::kNHD; }
bool KnownStats(SpecStats s) {
  return s == SpecStats::kNone || s == SpecStats::kQueries || s == SpecStats::kPrecomputed;
}

const char* StatsProtoName(SpecStats s) {
  switch (s) {
    case SpecStats::kNone:
      return "STATS_FORM_NONE";
    case SpecStats::kQueries:
      return "STATS_FORM_QUERIES";
    case SpecStats::kPrecomputed:
      return "STATS_FORM_PRECOMPUTED";
  }
  return "an unknown form";
}

// ---- policy fields -------------------------------------------------------------

absl::Status UnknownEnum(absl::string_view path, int value) {
  return Invalid(absl::StrCat(path, ": unknown value ", value));
}

absl::Status ApplyRange(absl::string_view path, double v, double lo, double hi, double* out) {
  if (!(v >= lo && v <= hi)) return Invalid(absl::StrCat(path, " must be in [", lo, ", ", hi, "], got ", v));
  *out = v;
  return absl::OkStatus();
}

absl::Status ApplyFraction(absl::string_view path, double v, double* out) { return ApplyRange(path, v, 0.0, 1.0, out); }

absl::Status ApplySelect(const v1::SelectOptions& s, absl::string_view path, CompressOptions* o) {
  if (s.has_recent_fraction()) {
    MEDAKV_RETURN_IF_ERROR(
        ApplyFraction(absl::StrCat(path, ".recent_fraction"), s.recent_fraction(), &o->recent_fraction));
  }
  switch (s.text_prior()) {
    case v1::TEXT_PRIOR_UNSPECIFIED:
      break;
    case v1::TEXT_PRIOR_ADDITIVE:
      o->text_prior = TextPrior::kAdditive;
      break;
    case v1::TEXT_PRIOR_KEEP_ALL_TEXT:
      o->text_prior = TextPrior::kKeepAllText;
      break;
    case v1::TEXT_PRIOR_NONE:
      o->text_prior = TextPrior::kNone;
      break;
    default:
      return UnknownEnum(absl::StrCat(path, ".text_prior"), s.text_prior());
  }
  if (s.has_shared_selection()) o->shared_selection = s.shared_selection();
  switch (s.merge()) {
    case v1::MERGE_MODE_UNSPECIFIED:
      break;
    case v1::MERGE_MODE_AVERAGE:
      o->merge = MergeMode::kAverage;
      break;
    case v1::MERGE_MODE_PIVOTAL:
      o->merge = MergeMode::kPivotal;
      break;
    case v1::MERGE_MODE_WEIGHTED:
      o->merge = MergeMode::kWeighted;
      break;
    case v1::MERGE_MODE_NONE:
      o->merge = MergeMode::kNone;
      break;
    default:
      return UnknownEnum(absl::StrCat(path, ".merge"), s.merge());
  }
  switch (s.merge_threshold()) {
    case v1::MERGE_THRESHOLD_UNSPECIFIED:
      break;
    case v1::MERGE_THRESHOLD_NONE:
      o->merge_threshold = MergeThreshold::kNone;
      break;
    case v1::MERGE_THRESHOLD_MEAN:
      o->merge_threshold = MergeThreshold::kMean;
      break;
    default:
      return UnknownEnum(absl::StrCat(path, ".merge_threshold"), s.merge_threshold());
  }
  if (s.has_scale()) {
    const float scale = s.scale();
    if (!(scale >= 0.f && scale <= kMaxScale)) {
      return Invalid(absl::StrCat(path, ".scale must be in [0, ", kMaxScale, "] (0: 1/sqrt(head_dim)), got ", scale));
    }
    o->scale = scale;
  }
  return absl::OkStatus();
}

absl::Status ApplyWindow(absl::string_view path, bool has_window, int64_t window, bool has_kernel, int64_t kernel,
                         CompressOptions* o) {
  if (has_window) {
    MEDAKV_RETURN_IF_ERROR(CheckInt(absl::StrCat(path, ".window"), window, 1, kMaxPolicyInt));
    o->window = window;
  }
  if (has_kernel) {
    if (kernel < 1 || kernel > kMaxPoolKernel || kernel % 2 == 0) {
      return Invalid(absl::StrCat(path, ".pool_kernel must be odd and in [1, ", kMaxPoolKernel, "], got ", kernel));
    }
    o->pool_kernel = kernel;
  }
  return absl::OkStatus();
}

// The budget and entropy fields that meda and amber share (tau, alpha_min,
// alpha_max, entropy_heads, entropy_source, select), checked with `path`
// ("policy.meda") in the messages.
template <typename PolicyProto>
absl::Status ApplyBudgetAndEntropy(const PolicyProto& m, absl::string_view path, CompressOptions* o) {
  BudgetOptions& b = o->budget;
  if (m.has_tau()) {
    MEDAKV_RETURN_IF_ERROR(ApplyRange(absl::StrCat(path, ".tau"), m.tau(), kMinTau, kMaxTau, &b.tau));
  }
  if (m.has_alpha_min()) {
    MEDAKV_RETURN_IF_ERROR(ApplyFraction(absl::StrCat(path, ".alpha_min"), m.alpha_min(), &b.alpha_min));
  }
  if (m.has_alpha_max()) {
    const double v = m.alpha_max();
    if (!(v > 0.0 && v <= 1.0)) return Invalid(absl::StrCat(path, ".alpha_max must be in (0, 1], got ", v));
    b.alpha_max = v;
  }
  if (b.alpha_min > b.alpha_max) {
    return Invalid(absl::StrCat(path, ".alpha_min (", b.alpha_min, m.has_alpha_min() ? "" : ", the default",
                                ") must not exceed ", path, ".alpha_max (", b.alpha_max,
                                m.has_alpha_max() ? "" : ", the default", ")"));
  }
  switch (m.entropy_heads()) {
    case v1::ENTROPY_HEADS_UNSPECIFIED:
      break;
    case v1::ENTROPY_HEADS_MEAN_ATTENTION:
      o->entropy_heads = EntropyHeads::kMeanAttention;
      break;
    case v1::ENTROPY_HEADS_MEAN_ENTROPY:
      o->entropy_heads = EntropyHeads::kMeanEntropy;
      break;
    default:
      return UnknownEnum(absl::StrCat(path, ".entropy_heads"), m.entropy_heads());
  }
  switch (m.entropy_source()) {
    case v1::ENTROPY_SOURCE_UNSPECIFIED:
      break;
    case v1::ENTROPY_SOURCE_CROSS_MODAL:
      o->entropy_source = EntropySource::kCrossModal;
      break;
    case v1::ENTROPY_SOURCE_CAUSAL:
      o->entropy_source = EntropySource::kCausal;
      break;
    default:
      return UnknownEnum(absl::StrCat(path, ".entropy_source"), m.entropy_source());
  }
  return ApplySelect(m.select(), absl::StrCat(path, ".select"), o);
}

absl::Status ApplyMeda(const v1::MedaPolicy& m, CompressOptions* o) {
  if (m.has_exact_total()) o->budget.exact_total = m.exact_total();
  return ApplyBudgetAndEntropy(m, "policy.meda", o);
}

absl::Status ApplyAmber(const v1::AmberPolicy& a, CompressOptions* o) {
  switch (a.score_norm()) {
    case v1::SCORE_NORM_UNSPECIFIED:
      break;
    case v1::SCORE_NORM_SUM:
      o->score_norm = ScoreNorm::kSum;
      break;
    case v1::SCORE_NORM_VISIBLE_MEAN:
      o->score_norm = ScoreNorm::kVisibleMean;
      break;
    case v1::SCORE_NORM_MAX:
      o->score_norm = ScoreNorm::kMax;
      break;
    default:
      return UnknownEnum("policy.amber.score_norm", a.score_norm());
  }
  switch (a.layer_budget()) {
    case v1::LAYER_BUDGET_UNSPECIFIED:
      break;
    case v1::LAYER_BUDGET_UNIFORM:
      o->layer_budget = LayerBudget::kUniform;
      break;
    case v1::LAYER_BUDGET_MASS:
      o->layer_budget = LayerBudget::kMass;
      break;
    case v1::LAYER_BUDGET_ENTROPY:
      o->layer_budget = LayerBudget::kEntropy;
      break;
    case v1::LAYER_BUDGET_DEPTH:
      o->layer_budget = LayerBudget::kDepth;
      break;
    case v1::LAYER_BUDGET_GLOBAL:
      o->layer_budget = LayerBudget::kGlobal;
      break;
    default:
      return UnknownEnum("policy.amber.layer_budget", a.layer_budget());
  }
  if (a.has_sinks()) {
    MEDAKV_RETURN_IF_ERROR(CheckInt("policy.amber.sinks", a.sinks(), 0, kMaxPolicyInt));
    o->sinks = a.sinks();
  }
  if (a.has_recent_search_rows()) {
    MEDAKV_RETURN_IF_ERROR(
        CheckInt("policy.amber.recent_search_rows", a.recent_search_rows(), 0, kMaxPolicyInt));
    o->recent_search_rows = a.recent_search_rows();
  }
  if (a.has_depth_ratio()) {
    MEDAKV_RETURN_IF_ERROR(ApplyRange("policy.amber.depth_ratio", a.depth_ratio(), kMinDepthRatio,
                                      1.0 / kMinDepthRatio, &o->depth_ratio));
  }
  return ApplyBudgetAndEntropy(a, "policy.amber", o);
}

// ---- spans -----------------------------------------------------------------------

absl::Status CheckSpans(const google::protobuf::RepeatedPtrField<v1::ModalitySpan>& spans, int64_t tokens) {
  if (spans.size() > kMaxModalitySpans) {
    return Invalid(absl::StrCat("header.shape.modality: ", spans.size(), " spans, at most ", kMaxModalitySpans));
  }
  for (int i = 0; i < spans.size(); ++i) {
    const v1::ModalitySpan& s = spans.Get(i);
    const std::string path = absl::StrCat("header.shape.modality[", i, "]");
    if (s.start() < 0 || s.start() >= tokens) {
      return Invalid(absl::StrCat(path, ".start must be in [0, header.shape.tokens=", tokens, "), got ", s.start()));
    }
    if (s.length() <= 0) return Invalid(absl::StrCat(path, ".length must be > 0, got ", s.length()));
    if (s.length() > tokens - s.start()) {
      return Invalid(absl::StrCat(path, " (start ", s.start(), ", length ", s.length(),
                                  ") runs past header.shape.tokens=", tokens));
    }
    if (s.modality() != v1::MODALITY_TEXT && s.modality() != v1::MODALITY_VISUAL) {
      return Invalid(absl::StrCat(path, ".modality: unknown value ", s.modality(),
                                  " (expected MODALITY_TEXT or MODALITY_VISUAL)"));
    }
  }
  // Overlaps: sort by start, compare neighbours.
  std::vector<int> order(spans.size());
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int a, int b) {
    return spans.Get(a).start() != spans.Get(b).start() ? spans.Get(a).start() < spans.Get(b).start() : a < b;
  });
  for (size_t k = 1; k < order.size(); ++k) {
    const v1::ModalitySpan& prev = spans.Get(order[k - 1]);
    const v1::ModalitySpan& cur = spans.Get(order[k]);
    if (cur.start() < prev.start() + prev.length()) {
      const int a = std::min(order[k - 1], order[k]), b = std::max(order[k - 1], order[k]);
      return Invalid(absl::StrCat("header.shape.modality[", b, "] (start ", spans.Get(b).start(), ", length ",
                                  spans.Get(b).length(), ") overlaps header.shape.modality[", a, "] (start ",
                                  spans.Get(a).start(), ", length ", spans.Get(a).length(),
                                  "); spans must not overlap"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

// ---- policy ------------------------------------------------------------------------

absl::StatusOr<CompressOptions> OptionsFromProto(const v1::Policy& policy) {
  if (!policy.preset().empty()) {
    return Invalid(absl::StrCat("policy.preset '", policy.preset(), "': this path takes no preset"));
  }
  // No kind: amber, this project's policy (docs/amber.md), which keeps the
  // model's own next token best on real caches (bench/FIDELITY.md).
  PolicyKind kind = PolicyKind::kAmber;
  switch (policy.kind_case()) {
    case v1::Policy::KIND_NOT_SET:
      kind = PolicyKind::kAmber;
      break;
    case v1::Policy::kMeda:
      kind = PolicyKind::kMeda;
      break;
    case v1::Policy::kFull:
      kind = PolicyKind::kFull;
      break;
    case v1::Policy::kStreamingLlm:
      kind = PolicyKind::kStreamingLlm;
      break;
    case v1::Policy::kH2O:
      kind = PolicyKind::kH2O;
      break;
    case v1::Policy::kSnapkv:
      kind = PolicyKind::kSnapKV;
      break;
    case v1::Policy::kPyramidkv:
      kind = PolicyKind::kPyramidKV;
      break;
    case v1::Policy::kLookM:
      kind = PolicyKind::kLookM;
      break;
    case v1::Policy::kAmber:
      kind = PolicyKind::kAmber;
      break;
  }
  CompressOptions o = DefaultOptions(kind);
  if (policy.rho() != 0.0) {
    const double rho = policy.rho();
    if (!(rho > 0.0 && rho <= 1.0)) {
      return Invalid(absl::StrCat("policy.rho must be in (0, 1] (0: the default ", o.budget.rho, "), got ", rho));
    }
    o.budget.rho = rho;
  }
  switch (policy.kind_case()) {
    case v1::Policy::KIND_NOT_SET:
    case v1::Policy::kFull:
      break;
    case v1::Policy::kMeda:
      MEDAKV_RETURN_IF_ERROR(ApplyMeda(policy.meda(), &o));
      break;
    case v1::Policy::kStreamingLlm: {
      const v1::StreamingLlmPolicy& p = policy.streaming_llm();
      if (p.has_sinks()) {
        MEDAKV_RETURN_IF_ERROR(CheckInt("policy.streaming_llm.sinks", p.sinks(), 0, kMaxPolicyInt));
        o.sinks = p.sinks();
      }
      break;
    }
    case v1::Policy::kH2O:
      MEDAKV_RETURN_IF_ERROR(ApplySelect(policy.h2o().select(), "policy.h2o.select", &o));
      break;
    case v1::Policy::kSnapkv: {
      const v1::SnapKVPolicy& p = policy.snapkv();
      MEDAKV_RETURN_IF_ERROR(
          ApplyWindow("policy.snapkv", p.has_window(), p.window(), p.has_pool_kernel(), p.pool_kernel(), &o));
      MEDAKV_RETURN_IF_ERROR(ApplySelect(p.select(), "policy.snapkv.select", &o));
      break;
    }
    case v1::Policy::kPyramidkv: {
      const v1::PyramidKVPolicy& p = policy.pyramidkv();
      MEDAKV_RETURN_IF_ERROR(
          ApplyWindow("policy.pyramidkv", p.has_window(), p.window(), p.has_pool_kernel(), p.pool_kernel(), &o));
      if (p.has_beta()) {
        MEDAKV_RETURN_IF_ERROR(
            ApplyRange("policy.pyramidkv.beta", p.beta(), kMinPyramidBeta, kMaxPyramidBeta, &o.pyramid_beta));
      }
      MEDAKV_RETURN_IF_ERROR(ApplySelect(p.select(), "policy.pyramidkv.select", &o));
      break;
    }
    case v1::Policy::kLookM:
      MEDAKV_RETURN_IF_ERROR(ApplySelect(policy.look_m().select(), "policy.look_m.select", &o));
      break;
    case v1::Policy::kAmber:
      MEDAKV_RETURN_IF_ERROR(ApplyAmber(policy.amber(), &o));
      break;
  }
  if (absl::Status s = ValidateOptions(o); !s.ok()) {
    return absl::Status(s.code(), absl::StrCat("policy: ", s.message()));
  }
  return o;
}

namespace {

v1::TextPrior TextPriorToProto(TextPrior p) {
  switch (p) {
    case TextPrior::kAdditive:
      return v1::TEXT_PRIOR_ADDITIVE;
    case TextPrior::kKeepAllText:
      return v1::TEXT_PRIOR_KEEP_ALL_TEXT;
    case TextPrior::kNone:
      return v1::TEXT_PRIOR_NONE;
  }
  return v1::TEXT_PRIOR_UNSPECIFIED;
}

v1::MergeMode MergeModeToProto(MergeMode m) {
  switch (m) {
    case MergeMode::kAverage:
      return v1::MERGE_MODE_AVERAGE;
    case MergeMode::kPivotal:
      return v1::MERGE_MODE_PIVOTAL;
    case MergeMode::kWeighted:
      return v1::MERGE_MODE_WEIGHTED;
    case MergeMode::kNone:
      return v1::MERGE_MODE_NONE;
  }
  return v1::MERGE_MODE_UNSPECIFIED;
}

void SelectToProto(const CompressOptions& o, v1::SelectOptions* s) {
  s->set_recent_fraction(o.recent_fraction);
  s->set_text_prior(TextPriorToProto(o.text_prior));
  s->set_shared_selection(o.shared_selection);
  s->set_merge(MergeModeToProto(o.merge));
  s->set_merge_threshold(o.merge_threshold == MergeThreshold::kMean ? v1::MERGE_THRESHOLD_MEAN
                                                                    : v1::MERGE_THRESHOLD_NONE);
  s->set_scale(o.scale);
}

// ApplyBudgetAndEntropy's fields, every one set.
template <typename PolicyProto>
void BudgetAndEntropyToProto(const CompressOptions& o, PolicyProto* m) {
  m->set_tau(o.budget.tau);
  m->set_alpha_min(o.budget.alpha_min);
  m->set_alpha_max(o.budget.alpha_max);
  m->set_entropy_heads(o.entropy_heads == EntropyHeads::kMeanEntropy ? v1::ENTROPY_HEADS_MEAN_ENTROPY
                                                                     : v1::ENTROPY_HEADS_MEAN_ATTENTION);
  m->set_entropy_source(o.entropy_source == EntropySource::kCausal ? v1::ENTROPY_SOURCE_CAUSAL
                                                                   : v1::ENTROPY_SOURCE_CROSS_MODAL);
  SelectToProto(o, m->mutable_select());
}

}  // namespace

v1::Policy PolicyToProto(const CompressOptions& o) {
  v1::Policy p;
  p.set_rho(o.budget.rho);
  switch (o.policy) {
    case PolicyKind::kFull:
      p.mutable_full();
      break;
    case PolicyKind::kMeda: {
      v1::MedaPolicy* m = p.mutable_meda();
      m->set_exact_total(o.budget.exact_total);
      BudgetAndEntropyToProto(o, m);
      break;
    }
    case PolicyKind::kStreamingLlm:
      p.mutable_streaming_llm()->set_sinks(o.sinks);
      break;
    case PolicyKind::kH2O:
      SelectToProto(o, p.mutable_h2o()->mutable_select());
      break;
    case PolicyKind::kSnapKV: {
      v1::SnapKVPolicy* m = p.mutable_snapkv();
      m->set_window(o.window);
      m->set_pool_kernel(o.pool_kernel);
      SelectToProto(o, m->mutable_select());
      break;
    }
    case PolicyKind::kPyramidKV: {
      v1::PyramidKVPolicy* m = p.mutable_pyramidkv();
      m->set_window(o.window);
      m->set_pool_kernel(o.pool_kernel);
      m->set_beta(o.pyramid_beta);
      SelectToProto(o, m->mutable_select());
      break;
    }
    case PolicyKind::kLookM:
      SelectToProto(o, p.mutable_look_m()->mutable_select());
      break;
    case PolicyKind::kAmber: {
      v1::AmberPolicy* a = p.mutable_amber();
      a->set_score_norm(o.score_norm == ScoreNorm::kVisibleMean ? v1::SCORE_NORM_VISIBLE_MEAN
                        : o.score_norm == ScoreNorm::kMax       ? v1::SCORE_NORM_MAX
                                                                : v1::SCORE_NORM_SUM);
      a->set_layer_budget(o.layer_budget == LayerBudget::kMass      ? v1::LAYER_BUDGET_MASS
                          : o.layer_budget == LayerBudget::kEntropy ? v1::LAYER_BUDGET_ENTROPY
                          : o.layer_budget == LayerBudget::kDepth   ? v1::LAYER_BUDGET_DEPTH
                          : o.layer_budget == LayerBudget::kGlobal  ? v1::LAYER_BUDGET_GLOBAL
                                                                    : v1::LAYER_BUDGET_UNIFORM);
      a->set_sinks(o.sinks);
      a->set_recent_search_rows(o.recent_search_rows);
      a->set_depth_ratio(o.depth_ratio);
      BudgetAndEntropyToProto(o, a);
      break;
    }
  }
  return p;
}

// ---- cache description --------------------------------------------------------------

const char* SpecStatsName(SpecStats s) {
  switch (s) {
    case SpecStats::kNone:
      return "none";
    case SpecStats::kQueries:
      return "queries";
    case SpecStats::kPrecomputed:
      return "precomputed";
  }
  return "unknown";
}

const char* TensorKindName(v1::TensorKind kind) {
  switch (kind) {
    case v1::TENSOR_KIND_KEY:
      return "key";
    case v1::TENSOR_KIND_VALUE:
      return "value";
    case v1::TENSOR_KIND_QUERY:
      return "query";
    case v1::TENSOR_KIND_QUERY_POSITIONS:
      return "query_positions";
    case v1::TENSOR_KIND_QUERY_OUTSIDE_LSE:
      return "query_outside_lse";
    case v1::TENSOR_KIND_SCORES:
      return "scores";
    case v1::TENSOR_KIND_ENTROPY:
      return "entropy";
    case v1::TENSOR_KIND_POSITIONS:
      return "positions";
    default:
      return "unknown";
  }
}

int64_t TensorBytes(const CacheSpec& spec, v1::TensorKind kind) {
  const int64_t esize = KnownDType(spec.dtype) ? DTypeSize(spec.dtype) : -1;
  switch (kind) {
    case v1::TENSOR_KIND_KEY:
    case v1::TENSOR_KIND_VALUE:
      return Product({spec.kv_heads, spec.tokens, spec.head_dim, esize});
    case v1::TENSOR_KIND_QUERY:
      return spec.stats == SpecStats::kQueries ? Product({spec.q_heads, spec.q_tokens, spec.head_dim, esize}) : 0;
    case v1::TENSOR_KIND_QUERY_POSITIONS:
      return spec.stats == SpecStats::kQueries && spec.has_query_positions ? Product({spec.q_tokens, 4}) : 0;
    case v1::TENSOR_KIND_QUERY_OUTSIDE_LSE:
      return spec.stats == SpecStats::kQueries && spec.has_query_outside_lse
                 ? Product({spec.q_heads, spec.q_tokens, 4})
                 : 0;
    case v1::TENSOR_KIND_SCORES:
      return spec.stats == SpecStats::kPrecomputed ? Product({spec.score_heads, spec.tokens, 4}) : 0;
    case v1::TENSOR_KIND_ENTROPY:
      return spec.stats == SpecStats::kPrecomputed ? 4 : 0;
    default:
      return 0;
  }
}

std::vector<v1::TensorKind> CarriedKinds(const CacheSpec& spec) {
  std::vector<v1::TensorKind> kinds = {v1::TENSOR_KIND_KEY, v1::TENSOR_KIND_VALUE};
  if (spec.stats == SpecStats::kQueries) {
    kinds.push_back(v1::TENSOR_KIND_QUERY);
    if (spec.has_query_positions) kinds.push_back(v1::TENSOR_KIND_QUERY_POSITIONS);
    if (spec.has_query_outside_lse) kinds.push_back(v1::TENSOR_KIND_QUERY_OUTSIDE_LSE);
  } else if (spec.stats == SpecStats::kPrecomputed) {
    kinds.push_back(v1::TENSOR_KIND_SCORES);
    kinds.push_back(v1::TENSOR_KIND_ENTROPY);
  }
  return kinds;
}

absl::StatusOr<int64_t> TotalBytes(const CacheSpec& spec) {
  int64_t layer = 0;
  bool ok = true;
  for (v1::TensorKind kind : CarriedKinds(spec)) {
    const int64_t b = TensorBytes(spec, kind);
    ok = ok && b >= 0 && Add(layer, b, &layer);
  }
  int64_t total = 0;
  ok = ok && spec.layers >= 0 && Mul(layer, spec.layers, &total);
  if (!ok) {
    return absl::ResourceExhaustedError(
        absl::StrCat("request needs more than ", INT64_MAX, " bytes (the tensor sizes overflow int64)"));
  }
  return total;
}

absl::Status ValidateSpec(const CacheSpec& spec, int64_t max_request_bytes, absl::string_view prefix) {
  const std::string shape = absl::StrCat(prefix, "shape.");
  MEDAKV_RETURN_IF_ERROR(CheckInt(absl::StrCat(shape, "layers"), spec.layers, 1, kMaxLayers));
  MEDAKV_RETURN_IF_ERROR(CheckInt(absl::StrCat(shape, "kv_heads"), spec.kv_heads, 1, kMaxHeads));
  if (!KnownStats(spec.stats)) {
    return Invalid(absl::StrCat(prefix, "stats: unknown value ", static_cast<int>(spec.stats)));
  }
  const bool queries = spec.stats == SpecStats::kQueries;
  MEDAKV_RETURN_IF_ERROR(CheckInt(absl::StrCat(shape, "q_heads"), spec.q_heads, queries ? 1 : 0, kMaxHeads));
  if (spec.q_heads % spec.kv_heads != 0) {
    return Invalid(absl::StrCat(shape, "q_heads (", spec.q_heads, ") must be a multiple of ", shape, "kv_heads (",
                                spec.kv_heads, ")"));
  }
  MEDAKV_RETURN_IF_ERROR(CheckInt(absl::StrCat(shape, "head_dim"), spec.head_dim, 1, kMaxHeadDim));
  MEDAKV_RETURN_IF_ERROR(CheckInt(absl::StrCat(shape, "tokens"), spec.tokens, 1, kMaxTokens));
  if (!KnownDType(spec.dtype)) {
    return Invalid(absl::StrCat(shape, "dtype: unknown value ", static_cast<int>(spec.dtype)));
  }
  if (!KnownLayout(spec.layout)) {
    return Invalid(absl::StrCat(shape, "layout: unknown value ", static_cast<int>(spec.layout)));
  }
  if (queries) {
    const int64_t limit = QueryPositionLimit(spec.tokens);
    if (spec.q_tokens < 1 || spec.q_tokens > limit) {
      return Invalid(absl::StrCat(prefix, "q_tokens must be in [1, 2 x ", shape, "tokens + 65536 = ", limit,
                                  "] with STATS_FORM_QUERIES, got ", spec.q_tokens));
    }
    if (spec.q_tokens > spec.tokens && !spec.has_query_positions) {
      return Invalid(absl::StrCat(prefix, "q_tokens (", spec.q_tokens, ") > ", shape, "tokens (", spec.tokens,
                                  "): rows after the cache (probes) need query_positions"));
    }
  } else {
    if (spec.q_tokens != 0) {
      return Invalid(absl::StrCat(prefix, "q_tokens must be 0 with ", StatsProtoName(spec.stats), " (it counts the ",
                                  "query rows of STATS_FORM_QUERIES), got ", spec.q_tokens));
    }
    if (spec.has_query_positions) {
      return Invalid(absl::StrCat(prefix, "query_positions must be false with ", StatsProtoName(spec.stats),
                                  " (query positions come only with STATS_FORM_QUERIES)"));
    }
    if (spec.has_query_outside_lse) {
      return Invalid(absl::StrCat(prefix, "query_outside_lse must be false with ", StatsProtoName(spec.stats),
                                  " (it belongs to the query rows of STATS_FORM_QUERIES)"));
    }
  }
  if (spec.stats == SpecStats::kPrecomputed) {
    if (spec.score_heads != spec.kv_heads && (spec.q_heads == 0 || spec.score_heads != spec.q_heads)) {
      return Invalid(absl::StrCat(prefix, "score_heads must be ", shape, "kv_heads (", spec.kv_heads, ")",
                                  spec.q_heads > 0 ? absl::StrCat(" or ", shape, "q_heads (", spec.q_heads, ")") : "",
                                  " with STATS_FORM_PRECOMPUTED, got ", spec.score_heads));
    }
  } else if (spec.score_heads != 0) {
    return Invalid(absl::StrCat(prefix, "score_heads must be 0 with ", StatsProtoName(spec.stats),
                                " (it counts the score rows of STATS_FORM_PRECOMPUTED), got ", spec.score_heads));
  }
  if (static_cast<int64_t>(spec.visual_spans.size()) > kMaxModalitySpans) {
    return Invalid(absl::StrCat(shape, "modality: ", spec.visual_spans.size(), " visual spans, at most ",
                                kMaxModalitySpans));
  }
  int64_t end = 0;  // of the previous span
  for (size_t i = 0; i < spec.visual_spans.size(); ++i) {
    const ModalitySpan& v = spec.visual_spans[i];
    if (v.start < end || v.length <= 0 || v.length > spec.tokens - v.start || v.modality != Modality::kVisual) {
      return Invalid(absl::StrCat(shape, "modality: visual span ", i, " (start ", v.start, ", length ", v.length,
                                  ") is not a visual span within [0, ", shape, "tokens=", spec.tokens,
                                  ") after the previous one"));
    }
    end = v.start + v.length;
  }
  MEDAKV_ASSIGN_OR_RETURN(const int64_t total, TotalBytes(spec));
  if (max_request_bytes > 0 && total > max_request_bytes) {
    return absl::ResourceExhaustedError(
        absl::StrCat("request needs ", total, " bytes, over --max_request_bytes=", max_request_bytes));
  }
  return absl::OkStatus();
}

absl::StatusOr<CacheSpec> SpecFromHeader(const v1::CacheShape& shape, v1::StatsForm stats, int64_t q_tokens,
                                         bool query_positions, bool query_outside_lse, int32_t score_heads,
                                         int64_t max_request_bytes) {
  CacheSpec spec;
  MEDAKV_ASSIGN_OR_RETURN(spec.stats, StatsFromProto(stats, "header.stats"));
  spec.layers = shape.layers();
  spec.kv_heads = shape.kv_heads();
  spec.q_heads = shape.q_heads();
  spec.head_dim = shape.head_dim();
  spec.tokens = shape.tokens();
  MEDAKV_ASSIGN_OR_RETURN(spec.dtype, DTypeFromProto(shape.dtype(), "header.shape.dtype"));
  MEDAKV_ASSIGN_OR_RETURN(spec.layout, LayoutFromProto(shape.layout(), "header.shape.layout"));
  spec.q_tokens = q_tokens;
  spec.has_query_positions = query_positions;
  spec.has_query_outside_lse = query_outside_lse;
  spec.score_heads = score_heads;
  MEDAKV_RETURN_IF_ERROR(ValidateSpec(spec, max_request_bytes, "header."));
  MEDAKV_RETURN_IF_ERROR(CheckSpans(shape.modality(), spec.tokens));
  // The spans are disjoint and within the tokens: keep the visual ones,
  // ascending, adjacent ones joined.
  std::vector<ModalitySpan> visual;
  for (const v1::ModalitySpan& s : shape.modality()) {
    if (s.modality() == v1::MODALITY_VISUAL) visual.push_back({s.start(), s.length(), Modality::kVisual});
  }
  std::sort(visual.begin(), visual.end(), [](const ModalitySpan& a, const ModalitySpan& b) { return a.start < b.start; });
  for (const ModalitySpan& v : visual) {
    if (!spec.visual_spans.empty() && spec.visual_spans.back().start + spec.visual_spans.back().length == v.start) {
      spec.visual_spans.back().length += v.length;
    } else {
      spec.visual_spans.push_back(v);
    }
  }
  return spec;
}

absl::StatusOr<CacheSpec> SpecFromHeader(const v1::CompressHeader& header, int64_t max_request_bytes) {
  return SpecFromHeader(header.shape(), header.stats(), header.q_tokens(), header.query_positions(),
                        header.query_outside_lse(), header.score_heads(), max_request_bytes);
}

absl::StatusOr<CacheSpec> SpecFromHeader(const v1::PutCacheHeader& header, int64_t max_request_bytes) {
  return SpecFromHeader(header.shape(), header.stats(), header.q_tokens(), header.query_positions(),
                        header.query_outside_lse(), header.score_heads(), max_request_bytes);
}

// ---- enums -------------------------------------------------------------------------

absl::StatusOr<DType> DTypeFromProto(v1::DType dtype, absl::string_view field) {
  switch (dtype) {
    case v1::DTYPE_FLOAT16:
      return DType::kFloat16;
    case v1::DTYPE_BFLOAT16:
      return DType::kBFloat16;
    case v1::DTYPE_FLOAT32:
      return DType::kFloat32;
    case v1::DTYPE_UNSPECIFIED:
      return Invalid(absl::StrCat(field, " must be specified (DTYPE_FLOAT16, DTYPE_BFLOAT16 or DTYPE_FLOAT32)"));
    default:
      return Invalid(absl::StrCat(field, ": unknown value ", static_cast<int>(dtype),
                                  " (expected DTYPE_FLOAT16, DTYPE_BFLOAT16 or DTYPE_FLOAT32)"));
  }
}

v1::DType DTypeToProto(DType dtype) {
  switch (dtype) {
    case DType::kFloat16:
      return v1::DTYPE_FLOAT16;
    case DType::kBFloat16:
      return v1::DTYPE_BFLOAT16;
    case DType::kFloat32:
      return v1::DTYPE_FLOAT32;
  }
  return v1::DTYPE_UNSPECIFIED;
}

absl::StatusOr<Layout> LayoutFromProto(v1::Layout layout, absl::string_view field) {
  switch (layout) {
    case v1::LAYOUT_UNSPECIFIED:
    case v1::LAYOUT_HND:
      return Layout::kHND;
    case v1::LAYOUT_NHD:
      return Layout::kNHD;
    default:
      return Invalid(
          absl::StrCat(field, ": unknown value ", static_cast<int>(layout), " (expected LAYOUT_HND or LAYOUT_NHD)"));
  }
}

v1::Layout LayoutToProto(Layout layout) {
  switch (layout) {
    case Layout::kHND:
      return v1::LAYOUT_HND;
    case Layout::kNHD:
      return v1::LAYOUT_NHD;
  }
  return v1::LAYOUT_UNSPECIFIED;
}

absl::StatusOr<SpecStats> StatsFromProto(v1::StatsForm stats, absl::string_view field) {
  switch (stats) {
    case v1::STATS_FORM_NONE:
      return SpecStats::kNone;
    case v1::STATS_FORM_QUERIES:
      return SpecStats::kQueries;
    case v1::STATS_FORM_PRECOMPUTED:
      return SpecStats::kPrecomputed;
    case v1::STATS_FORM_UNSPECIFIED:
      return Invalid(
          absl::StrCat(field, " must be specified (STATS_FORM_QUERIES, STATS_FORM_PRECOMPUTED or STATS_FORM_NONE)"));
    default:
      return Invalid(absl::StrCat(field, ": unknown value ", static_cast<int>(stats),
                                  " (expected STATS_FORM_QUERIES, STATS_FORM_PRECOMPUTED or STATS_FORM_NONE)"));
  }
}

v1::StatsForm StatsToProto(SpecStats stats) {
  switch (stats) {
    case SpecStats::kNone:
      return v1::STATS_FORM_NONE;
    case SpecStats::kQueries:
      return v1::STATS_FORM_QUERIES;
    case SpecStats::kPrecomputed:
      return v1::STATS_FORM_PRECOMPUTED;
  }
  return v1::STATS_FORM_UNSPECIFIED;
}

// ---- domain -> proto -----------------------------------------------------------------

absl::StatusOr<CacheSpec> SpecFromInput(const CacheInput& in) {
  CacheSpec spec;
  spec.layers = static_cast<int64_t>(in.layers.size());
  spec.kv_heads = in.kv_heads;
  spec.q_heads = in.q_heads;
  spec.head_dim = in.head_dim;
  spec.tokens = in.tokens;
  spec.dtype = in.dtype;
  spec.layout = in.layout;
  MEDAKV_ASSIGN_OR_RETURN(spec.visual_spans, VisualSpansOf(in.modality, in.tokens));
  const bool queries = in.stats == StatsForm::kQueries;
  spec.stats = queries ? SpecStats::kQueries : SpecStats::kPrecomputed;
  if (in.layers.empty()) return spec;
  if (queries) {
    spec.q_tokens = in.layers[0].query.tokens;
    spec.has_query_positions = !in.layers[0].query_positions.empty();
    spec.has_query_outside_lse = !in.layers[0].query_outside_lse.empty();
    for (const LayerInput& l : in.layers) {
      if (l.query.tokens != spec.q_tokens || l.query_positions.empty() == spec.has_query_positions ||
          l.query_outside_lse.empty() == spec.has_query_outside_lse) {
        return absl::InvalidArgumentError(
            "the Compress API needs the same q_tokens (and positions, and outside lse) in every layer");
      }
    }
  } else {
    spec.score_heads = in.layers[0].score_heads;
  }
  return spec;
}

std::vector<ModalitySpan> SpansFromModality(const std::vector<uint8_t>& modality) {
  std::vector<ModalitySpan> spans;
  const int64_t n = static_cast<int64_t>(modality.size());
  for (int64_t t = 0; t < n;) {
    if (modality[t] == 0) {
      ++t;
      continue;
    }
    int64_t end = t;
    while (end < n && modality[end] != 0) ++end;
    spans.push_back(ModalitySpan{t, end - t, Modality::kVisual});
    t = end;
  }
  return spans;
}

absl::StatusOr<std::vector<ModalitySpan>> VisualSpansOf(const std::vector<uint8_t>& modality, int64_t tokens) {
  if (!modality.empty()) {
    if (static_cast<int64_t>(modality.size()) != tokens) {
      return Invalid(absl::StrCat("modality: ", modality.size(), " entries for ", tokens, " tokens"));
    }
    for (size_t t = 0; t < modality.size(); ++t) {
      if (modality[t] > 1) {
        return Invalid(absl::StrCat("modality: token ", t, " has modality ", int{modality[t]},
                                    " (expected 0 for text or 1 for visual)"));
      }
    }
  }
  return SpansFromModality(modality);
}

std::vector<uint8_t> ModalityVector(const CacheSpec& spec) {
  std::vector<uint8_t> modality;
  if (spec.visual_spans.empty()) return modality;
  modality.assign(static_cast<size_t>(spec.tokens), static_cast<uint8_t>(Modality::kText));
  for (const ModalitySpan& s : spec.visual_spans) {
    std::fill(modality.begin() + s.start, modality.begin() + s.start + s.length,
              static_cast<uint8_t>(Modality::kVisual));
  }
  return modality;
}

void ToProto(const CacheSpec& spec, v1::CacheShape* shape) {
  shape->Clear();
  shape->set_layers(static_cast<int32_t>(spec.layers));
  shape->set_kv_heads(static_cast<int32_t>(spec.kv_heads));
  shape->set_q_heads(static_cast<int32_t>(spec.q_heads));
  shape->set_head_dim(static_cast<int32_t>(spec.head_dim));
  shape->set_tokens(spec.tokens);
  shape->set_dtype(DTypeToProto(spec.dtype));
  shape->set_layout(LayoutToProto(spec.layout));
  for (const ModalitySpan& s : spec.visual_spans) {
    v1::ModalitySpan* out = shape->add_modality();
    out->set_start(s.start);
    out->set_length(s.length);
    out->set_modality(v1::MODALITY_VISUAL);
  }
}

void ToProto(const CacheSpec& spec, v1::CompressHeader* header) {
  ToProto(spec, header->mutable_shape());
  header->set_stats(StatsToProto(spec.stats));
  header->set_q_tokens(spec.q_tokens);
  header->set_query_positions(spec.has_query_positions);
  header->set_query_outside_lse(spec.has_query_outside_lse);
  header->set_score_heads(static_cast<int32_t>(spec.score_heads));
}

void ToProto(const CacheSpec& spec, v1::PutCacheHeader* header) {
  ToProto(spec, header->mutable_shape());
  header->set_stats(StatsToProto(spec.stats));
  header->set_q_tokens(spec.q_tokens);
  header->set_query_positions(spec.has_query_positions);
  header->set_query_outside_lse(spec.has_query_outside_lse);
  header->set_score_heads(static_cast<int32_t>(spec.score_heads));
}

void ToProto(int32_t layer, const LayerResult& result, v1::LayerInfo* info) {
  info->set_layer(layer);
  info->set_budget(result.budget);
  info->set_entropy(result.entropy);
  info->set_alpha(result.alpha);
}

// ---- chunking ------------------------------------------------------------------------

absl::StatusOr<int64_t> ResponseChunkBytes(int64_t requested, absl::string_view field) {
  if (requested == 0) return kDefaultChunkBytes;
  if (requested < kMinChunkBytes || requested > kMaxChunkBytes) {
    return Invalid(absl::StrCat(field, " must be 0 (", kDefaultChunkBytes, ") or in [", kMinChunkBytes, ", ",
                                kMaxChunkBytes, "], got ", requested));
  }
  return requested;
}

std::vector<std::pair<int64_t, int64_t>> ChunkRanges(int64_t total_bytes, int64_t max_chunk) {
  if (max_chunk <= 0) max_chunk = kDefaultChunkBytes;
  std::vector<std::pair<int64_t, int64_t>> ranges;
  if (total_bytes <= 0) return ranges;
  ranges.reserve(static_cast<size_t>(total_bytes / max_chunk + 1));
  for (int64_t offset = 0; offset < total_bytes;) {
    const int64_t length = std::min(max_chunk, total_bytes - offset);
    ranges.emplace_back(offset, length);
    offset += length;
  }
  return ranges;
}

}  // namespace medakv
