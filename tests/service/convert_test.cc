// The server's request validation and proto <-> domain conversion: every
// malformed policy and header field is rejected with its code and a message
// naming the field; well-formed ones convert to the expected domain values.
#include "service/server/convert.h"

#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "tests/kernels/test_util.h"

namespace medakv {
namespace {

namespace v1 = ::medakv::v1;

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

#define EXPECT_STATUS(expr, code_, fragment)                                  \
  do {                                                                        \
    const absl::Status st_ = (expr);                                          \
    EXPECT_EQ(st_.code(), (code_)) << st_;                                    \
    EXPECT_NE(std::string(st_.message()).find(fragment), std::string::npos)   \
        << "message: '" << st_.message() << "' lacks '" << (fragment) << "'"; \
  } while (false)

#define EXPECT_INVALID(expr, fragment) EXPECT_STATUS(expr, absl::StatusCode::kInvalidArgument, fragment)

void ExpectOptionsEq(const CompressOptions& a, const CompressOptions& b) {
  EXPECT_EQ(a.policy, b.policy);
  EXPECT_EQ(a.budget.rho, b.budget.rho);
  EXPECT_EQ(a.budget.tau, b.budget.tau);
  EXPECT_EQ(a.budget.alpha_min, b.budget.alpha_min);
  EXPECT_EQ(a.budget.alpha_max, b.budget.alpha_max);
  EXPECT_EQ(a.budget.exact_total, b.budget.exact_total);
  EXPECT_EQ(a.entropy_heads, b.entropy_heads);
  EXPECT_EQ(a.entropy_source, b.entropy_source);
  EXPECT_EQ(a.scale, b.scale);
  EXPECT_EQ(a.recent_fraction, b.recent_fraction);
  EXPECT_EQ(a.text_prior, b.text_prior);
  EXPECT_EQ(a.shared_selection, b.shared_selection);
  EXPECT_EQ(a.merge, b.merge);
  EXPECT_EQ(a.merge_threshold, b.merge_threshold);
  EXPECT_EQ(a.sinks, b.sinks);
  EXPECT_EQ(a.window, b.window);
  EXPECT_EQ(a.pool_kernel, b.pool_kernel);
  EXPECT_EQ(a.pyramid_beta, b.pyramid_beta);
  EXPECT_EQ(a.score_norm, b.score_norm);
  EXPECT_EQ(a.layer_budget, b.layer_budget);
  EXPECT_EQ(a.depth_ratio, b.depth_ratio);
  EXPECT_EQ(a.recent_search_rows, b.recent_search_rows);
}

// ---- policy --------------------------------------------------------------------

// A Policy whose oneof is set to `kind` with no field.
v1::Policy PolicyOf(PolicyKind kind) {
  v1::Policy p;
  switch (kind) {
    case PolicyKind::kFull:
      p.mutable_full();
      break;
    case PolicyKind::kMeda:
      p.mutable_meda();
      break;
    case PolicyKind::kStreamingLlm:
      p.mutable_streaming_llm();
      break;
    case PolicyKind::kH2O:
      p.mutable_h2o();
      break;
    case PolicyKind::kSnapKV:
      p.mutable_snapkv();
      break;
    case PolicyKind::kPyramidKV:
      p.mutable_pyramidkv();
      break;
    case PolicyKind::kLookM:
      p.mutable_look_m();
      break;
    case PolicyKind::kAmber:
      p.mutable_amber();
      break;
  }
  return p;
}

// The select options of the policies that have them, with their field path.
struct SelectCase {
  PolicyKind kind;
  const char* path;
  std::function<v1::SelectOptions*(v1::Policy*)> select;
};
std::vector<SelectCase> SelectCases() {
  return {
      {PolicyKind::kMeda, "policy.meda.select", [](v1::Policy* p) { return p->mutable_meda()->mutable_select(); }},
      {PolicyKind::kH2O, "policy.h2o.select", [](v1::Policy* p) { return p->mutable_h2o()->mutable_select(); }},
      {PolicyKind::kSnapKV, "policy.snapkv.select",
       [](v1::Policy* p) { return p->mutable_snapkv()->mutable_select(); }},
      {PolicyKind::kPyramidKV, "policy.pyramidkv.select",
       [](v1::Policy* p) { return p->mutable_pyramidkv()->mutable_select(); }},
      {PolicyKind::kLookM, "policy.look_m.select", [](v1::Policy* p) { return p->mutable_look_m()->mutable_select(); }},
      {PolicyKind::kAmber, "policy.amber.select", [](v1::Policy* p) { return p->mutable_amber()->mutable_select(); }},
  };
}

const PolicyKind kAllPolicies[] = {PolicyKind::kFull, PolicyKind::kMeda,   PolicyKind::kStreamingLlm,
                                   PolicyKind::kH2O,  PolicyKind::kSnapKV, PolicyKind::kPyramidKV,
                                   PolicyKind::kLookM, PolicyKind::kAmber};

TEST(OptionsFromProto, UnsetOneofIsAmberWithDefaults) {
  absl::StatusOr<CompressOptions> o = OptionsFromProto(v1::Policy());
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->policy, PolicyKind::kAmber);
  ExpectOptionsEq(*o, DefaultOptions(PolicyKind::kAmber));
  EXPECT_EQ(o->budget.rho, 0.2);
}

TEST(OptionsFromProto, UnsetOneofStillTakesRho) {
  v1::Policy p;
  p.set_rho(0.5);
  absl::StatusOr<CompressOptions> o = OptionsFromProto(p);
  ASSERT_TRUE(o.ok()) << o.status();
  CompressOptions want = DefaultOptions(PolicyKind::kAmber);
  want.budget.rho = 0.5;
  ExpectOptionsEq(*o, want);
}

TEST(OptionsFromProto, EveryPolicyWithNoFieldIsItsDefaults) {
  for (PolicyKind kind : kAllPolicies) {
    SCOPED_TRACE(PolicyName(kind));
    absl::StatusOr<CompressOptions> o = OptionsFromProto(PolicyOf(kind));
    ASSERT_TRUE(o.ok()) << o.status();
    ExpectOptionsEq(*o, DefaultOptions(kind));
  }
}

TEST(OptionsFromProto, LookMDefaultsSurviveUnspecifiedEnums) {
  v1::Policy p = PolicyOf(PolicyKind::kLookM);
  p.mutable_look_m()->mutable_select()->set_text_prior(v1::TEXT_PRIOR_UNSPECIFIED);
  p.mutable_look_m()->mutable_select()->set_merge(v1::MERGE_MODE_UNSPECIFIED);
  absl::StatusOr<CompressOptions> o = OptionsFromProto(p);
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->text_prior, TextPrior::kKeepAllText);
  EXPECT_EQ(o->merge, MergeMode::kPivotal);
}

TEST(OptionsFromProto, RhoOnEveryPolicy) {
  for (PolicyKind kind : kAllPolicies) {
    SCOPED_TRACE(PolicyName(kind));
    v1::Policy p = PolicyOf(kind);
    p.set_rho(0.35);
    absl::StatusOr<CompressOptions> o = OptionsFromProto(p);
    ASSERT_TRUE(o.ok()) << o.status();
    CompressOptions want = DefaultOptions(kind);
    want.budget.rho = 0.35;
    ExpectOptionsEq(*o, want);
    p.set_rho(1.0);
    ASSERT_TRUE(OptionsFromProto(p).ok());
  }
}

TEST(OptionsFromProto, RhoOutOfRange) {
  for (PolicyKind kind : kAllPolicies) {
    for (double rho : {-0.1, 1.0000001, 2.0, kNaN, kInf, -kInf}) {
      SCOPED_TRACE(absl::StrCat(PolicyName(kind), " rho ", rho));
      v1::Policy p = PolicyOf(kind);
      p.set_rho(rho);
      EXPECT_INVALID(OptionsFromProto(p).status(), "policy.rho must be in (0, 1]");
    }
  }
}

TEST(OptionsFromProto, MedaEveryField) {
  v1::Policy p;
  p.set_rho(0.3);
  v1::MedaPolicy* m = p.mutable_meda();
  m->set_tau(0.5);
  m->set_alpha_min(0.05);
  m->set_alpha_max(0.9);
  m->set_exact_total(false);
  m->set_entropy_heads(v1::ENTROPY_HEADS_MEAN_ENTROPY);
  m->set_entropy_source(v1::ENTROPY_SOURCE_CAUSAL);
  v1::SelectOptions* s = m->mutable_select();
  s->set_recent_fraction(0.75);
  s->set_text_prior(v1::TEXT_PRIOR_KEEP_ALL_TEXT);
  s->set_shared_selection(true);
  s->set_merge(v1::MERGE_MODE_WEIGHTED);
  s->set_merge_threshold(v1::MERGE_THRESHOLD_MEAN);
  s->set_scale(0.125f);
  absl::StatusOr<CompressOptions> o = OptionsFromProto(p);
  ASSERT_TRUE(o.ok()) << o.status();
  CompressOptions want = DefaultOptions(PolicyKind::kMeda);
  want.budget = {.rho = 0.3, .tau = 0.5, .alpha_min = 0.05, .alpha_max = 0.9, .exact_total = false};
  want.entropy_heads = EntropyHeads::kMeanEntropy;
  want.entropy_source = EntropySource::kCausal;
  want.recent_fraction = 0.75;
  want.text_prior = TextPrior::kKeepAllText;
  want.shared_selection = true;
  want.merge = MergeMode::kWeighted;
  want.merge_threshold = MergeThreshold::kMean;
  want.scale = 0.125f;
  ExpectOptionsEq(*o, want);
}

TEST(OptionsFromProto, MedaExplicitDefaultsEqualUnset) {
  v1::Policy p;
  v1::MedaPolicy* m = p.mutable_meda();
  m->set_tau(1.0);
  m->set_alpha_min(0.01);
  m->set_alpha_max(1.0);
  m->set_exact_total(true);
  m->set_entropy_heads(v1::ENTROPY_HEADS_MEAN_ATTENTION);
  m->set_entropy_source(v1::ENTROPY_SOURCE_CROSS_MODAL);
  m->mutable_select()->set_text_prior(v1::TEXT_PRIOR_ADDITIVE);
  m->mutable_select()->set_merge(v1::MERGE_MODE_AVERAGE);
  m->mutable_select()->set_merge_threshold(v1::MERGE_THRESHOLD_NONE);
  m->mutable_select()->set_scale(0.f);
  absl::StatusOr<CompressOptions> o = OptionsFromProto(p);
  ASSERT_TRUE(o.ok()) << o.status();
  ExpectOptionsEq(*o, DefaultOptions(PolicyKind::kMeda));
}

TEST(OptionsFromProto, MedaTau) {
  // 5e-324 (the smallest double) made E / tau overflow into budgets of -2^63.
  for (double tau : {0.0, -1.0, kNaN, kInf, 5e-324, 9e-7, 1.1e6}) {
    SCOPED_TRACE(tau);
    v1::Policy p;
    p.mutable_meda()->set_tau(tau);
    EXPECT_INVALID(OptionsFromProto(p).status(), "policy.meda.tau must be in [1e-06, 1e+06], got");
    v1::Policy a;
    a.mutable_amber()->set_tau(tau);
    EXPECT_INVALID(OptionsFromProto(a).status(), "policy.amber.tau must be in [1e-06, 1e+06], got");
  }
  v1::Policy p;
  p.mutable_meda()->set_tau(-1);
  EXPECT_INVALID(OptionsFromProto(p).status(), "policy.meda.tau must be in [1e-06, 1e+06], got -1");
  for (double tau : {1e-6, 1e6}) {
    v1::Policy ok;
    ok.mutable_meda()->set_tau(tau);
    absl::StatusOr<CompressOptions> o = OptionsFromProto(ok);
    ASSERT_TRUE(o.ok()) << o.status();
    EXPECT_EQ(o->budget.tau, tau);
  }
}

TEST(OptionsFromProto, MedaAlphaMin) {
  for (double v : {-0.01, 1.5, kNaN}) {
    SCOPED_TRACE(v);
    v1::Policy p;
    p.mutable_meda()->set_alpha_min(v);
    EXPECT_INVALID(OptionsFromProto(p).status(), "policy.meda.alpha_min must be in [0, 1]");
  }
}

TEST(OptionsFromProto, MedaAlphaMax) {
  for (double v : {0.0, -0.5, 1.01, kNaN}) {
    SCOPED_TRACE(v);
    v1::Policy p;
    p.mutable_meda()->set_alpha_max(v);
    EXPECT_INVALID(OptionsFromProto(p).status(), "policy.meda.alpha_max must be in (0, 1]");
  }
}

TEST(OptionsFromProto, MedaAlphaMinAboveAlphaMax) {
  v1::Policy p;
  p.mutable_meda()->set_alpha_min(0.6);
  p.mutable_meda()->set_alpha_max(0.4);
  EXPECT_INVALID(OptionsFromProto(p).status(),
                 "policy.meda.alpha_min (0.6) must not exceed policy.meda.alpha_max (0.4)");
  // Against the default alpha_min 0.01.
  v1::Policy q;
  q.mutable_meda()->set_alpha_max(0.005);
  EXPECT_INVALID(OptionsFromProto(q).status(), "policy.meda.alpha_min (0.01, the default)");
  // Equal is fine.
  v1::Policy r;
  r.mutable_meda()->set_alpha_min(0.4);
  r.mutable_meda()->set_alpha_max(0.4);
  EXPECT_TRUE(OptionsFromProto(r).ok());
}

TEST(OptionsFromProto, MedaUnknownEnums) {
  v1::Policy p;
  p.mutable_meda()->set_entropy_heads(static_cast<v1::EntropyHeads>(7));
  EXPECT_INVALID(OptionsFromProto(p).status(), "policy.meda.entropy_heads: unknown value 7");
  v1::Policy q;
  q.mutable_meda()->set_entropy_source(static_cast<v1::EntropySource>(-3));
  EXPECT_INVALID(OptionsFromProto(q).status(), "policy.meda.entropy_source: unknown value -3");
}

TEST(OptionsFromProto, SelectFieldsOnEveryPolicyThatHasThem) {
  for (const SelectCase& c : SelectCases()) {
    SCOPED_TRACE(c.path);
    v1::Policy p;
    v1::SelectOptions* s = c.select(&p);
    s->set_recent_fraction(0.25);
    s->set_text_prior(v1::TEXT_PRIOR_ADDITIVE);
    s->set_shared_selection(true);
    s->set_merge(v1::MERGE_MODE_AVERAGE);
    s->set_merge_threshold(v1::MERGE_THRESHOLD_MEAN);
    s->set_scale(2.0f);
    absl::StatusOr<CompressOptions> o = OptionsFromProto(p);
    ASSERT_TRUE(o.ok()) << o.status();
    CompressOptions want = DefaultOptions(c.kind);
    want.recent_fraction = 0.25;
    want.text_prior = TextPrior::kAdditive;
    want.shared_selection = true;
    want.merge = MergeMode::kAverage;
    want.merge_threshold = MergeThreshold::kMean;
    want.scale = 2.0f;
    ExpectOptionsEq(*o, want);
  }
}

TEST(OptionsFromProto, SelectEnumValuesMap) {
  const std::pair<v1::TextPrior, TextPrior> priors[] = {{v1::TEXT_PRIOR_ADDITIVE, TextPrior::kAdditive},
                                                        {v1::TEXT_PRIOR_KEEP_ALL_TEXT, TextPrior::kKeepAllText},
                                                        {v1::TEXT_PRIOR_NONE, TextPrior::kNone}};
  for (const auto& [in, out] : priors) {
    v1::Policy p;
    p.mutable_h2o()->mutable_select()->set_text_prior(in);
    EXPECT_EQ(OptionsFromProto(p)->text_prior, out);
  }
  const std::pair<v1::MergeMode, MergeMode> merges[] = {{v1::MERGE_MODE_AVERAGE, MergeMode::kAverage},
                                                        {v1::MERGE_MODE_PIVOTAL, MergeMode::kPivotal},
                                                        {v1::MERGE_MODE_WEIGHTED, MergeMode::kWeighted},
                                                        {v1::MERGE_MODE_NONE, MergeMode::kNone}};
  for (const auto& [in, out] : merges) {
    v1::Policy p;
    p.mutable_meda()->mutable_select()->set_merge(in);
    EXPECT_EQ(OptionsFromProto(p)->merge, out);
  }
  v1::Policy p;
  p.mutable_meda()->mutable_select()->set_merge_threshold(v1::MERGE_THRESHOLD_NONE);
  p.mutable_meda()->set_entropy_heads(v1::ENTROPY_HEADS_MEAN_ATTENTION);
  p.mutable_meda()->set_entropy_source(v1::ENTROPY_SOURCE_CROSS_MODAL);
  absl::StatusOr<CompressOptions> o = OptionsFromProto(p);
  ASSERT_TRUE(o.ok());
  EXPECT_EQ(o->merge_threshold, MergeThreshold::kNone);
  EXPECT_EQ(o->entropy_heads, EntropyHeads::kMeanAttention);
  EXPECT_EQ(o->entropy_source, EntropySource::kCrossModal);
}

TEST(OptionsFromProto, SelectRecentFractionOutOfRange) {
  for (const SelectCase& c : SelectCases()) {
    for (double v : {-0.1, 1.1, kNaN}) {
      SCOPED_TRACE(absl::StrCat(c.path, " ", v));
      v1::Policy p;
      c.select(&p)->set_recent_fraction(v);
      EXPECT_INVALID(OptionsFromProto(p).status(), absl::StrCat(c.path, ".recent_fraction must be in [0, 1]"));
    }
  }
}

TEST(OptionsFromProto, SelectScaleOutOfRange) {
  for (const SelectCase& c : SelectCases()) {
    // 3e38 made every logit infinite.
    for (float v : {-1.f, std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(), 3e38f,
                    1.001e4f}) {
      SCOPED_TRACE(absl::StrCat(c.path, " ", v));
      v1::Policy p;
      c.select(&p)->set_scale(v);
      EXPECT_INVALID(OptionsFromProto(p).status(), absl::StrCat(c.path, ".scale must be in [0, 10000]"));
    }
    v1::Policy ok;
    c.select(&ok)->set_scale(1e4f);
    EXPECT_TRUE(OptionsFromProto(ok).ok());
  }
}

TEST(OptionsFromProto, SelectUnknownEnums) {
  for (const SelectCase& c : SelectCases()) {
    SCOPED_TRACE(c.path);
    v1::Policy a;
    c.select(&a)->set_text_prior(static_cast<v1::TextPrior>(4));
    EXPECT_INVALID(OptionsFromProto(a).status(), absl::StrCat(c.path, ".text_prior: unknown value 4"));
    v1::Policy b;
    c.select(&b)->set_merge(static_cast<v1::MergeMode>(99));
    EXPECT_INVALID(OptionsFromProto(b).status(), absl::StrCat(c.path, ".merge: unknown value 99"));
    v1::Policy d;
    c.select(&d)->set_merge_threshold(static_cast<v1::MergeThreshold>(3));
    EXPECT_INVALID(OptionsFromProto(d).status(), absl::StrCat(c.path, ".merge_threshold: unknown value 3"));
  }
}

TEST(OptionsFromProto, StreamingLlmSinks) {
  v1::Policy p;
  p.mutable_streaming_llm()->set_sinks(0);
  absl::StatusOr<CompressOptions> o = OptionsFromProto(p);
  ASSERT_TRUE(o.ok()) << o.status();
  CompressOptions want = DefaultOptions(PolicyKind::kStreamingLlm);
  want.sinks = 0;
  ExpectOptionsEq(*o, want);
  p.mutable_streaming_llm()->set_sinks(-1);
  EXPECT_INVALID(OptionsFromProto(p).status(), "policy.streaming_llm.sinks must be >= 0, got -1");
  p.mutable_streaming_llm()->set_sinks(int64_t{1} << 40);
  EXPECT_INVALID(OptionsFromProto(p).status(), "policy.streaming_llm.sinks must be <= 2147483647");
}

TEST(OptionsFromProto, SnapKVEveryField) {
  v1::Policy p;
  p.set_rho(0.1);
  p.mutable_snapkv()->set_window(32);
  p.mutable_snapkv()->set_pool_kernel(7);
  p.mutable_snapkv()->mutable_select()->set_merge(v1::MERGE_MODE_PIVOTAL);
  absl::StatusOr<CompressOptions> o = OptionsFromProto(p);
  ASSERT_TRUE(o.ok()) << o.status();
  CompressOptions want = DefaultOptions(PolicyKind::kSnapKV);
  want.budget.rho = 0.1;
  want.window = 32;
  want.pool_kernel = 7;
  want.merge = MergeMode::kPivotal;
  ExpectOptionsEq(*o, want);
}

TEST(OptionsFromProto, PyramidKVEveryField) {
  v1::Policy p;
  p.mutable_pyramidkv()->set_window(8);
  p.mutable_pyramidkv()->set_pool_kernel(1);
  p.mutable_pyramidkv()->set_beta(5.5);
  p.mutable_pyramidkv()->mutable_select()->set_recent_fraction(0.0);
  absl::StatusOr<CompressOptions> o = OptionsFromProto(p);
  ASSERT_TRUE(o.ok()) << o.status();
  CompressOptions want = DefaultOptions(PolicyKind::kPyramidKV);
  want.window = 8;
  want.pool_kernel = 1;
  want.pyramid_beta = 5.5;
  want.recent_fraction = 0.0;
  ExpectOptionsEq(*o, want);
}

TEST(OptionsFromProto, WindowAndPoolKernelOutOfRange) {
  struct Case {
    const char* path;
    std::function<void(v1::Policy*, int64_t)> window, kernel;
  };
  const Case cases[] = {
      {"policy.snapkv", [](v1::Policy* p, int64_t v) { p->mutable_snapkv()->set_window(v); },
       [](v1::Policy* p, int64_t v) { p->mutable_snapkv()->set_pool_kernel(v); }},
      {"policy.pyramidkv", [](v1::Policy* p, int64_t v) { p->mutable_pyramidkv()->set_window(v); },
       [](v1::Policy* p, int64_t v) { p->mutable_pyramidkv()->set_pool_kernel(v); }},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.path);
    for (int64_t w : {int64_t{0}, int64_t{-4}}) {
      v1::Policy p;
      c.window(&p, w);
      EXPECT_INVALID(OptionsFromProto(p).status(), absl::StrCat(c.path, ".window must be > 0, got ", w));
    }
    v1::Policy big;
    c.window(&big, int64_t{1} << 33);
    EXPECT_INVALID(OptionsFromProto(big).status(), absl::StrCat(c.path, ".window must be <= 2147483647"));
    // 2^31 - 1 made pooling quadratic in the tokens (a minute for 2^18 tokens).
    for (int64_t k : {int64_t{0}, int64_t{-1}, int64_t{4}, int64_t{1025}, int64_t{2147483647}, int64_t{1} << 40}) {
      v1::Policy p;
      c.kernel(&p, k);
      EXPECT_INVALID(OptionsFromProto(p).status(),
                     absl::StrCat(c.path, ".pool_kernel must be odd and in [1, 1023], got ", k));
    }
    v1::Policy widest;
    c.kernel(&widest, 1023);
    EXPECT_TRUE(OptionsFromProto(widest).ok());
  }
}

TEST(OptionsFromProto, AmberEveryField) {
  v1::Policy p = PolicyOf(PolicyKind::kAmber);
  v1::AmberPolicy* a = p.mutable_amber();
  a->set_score_norm(v1::SCORE_NORM_VISIBLE_MEAN);
  a->set_layer_budget(v1::LAYER_BUDGET_ENTROPY);
  a->set_sinks(3);
  a->set_recent_search_rows(0);
  a->set_depth_ratio(0.5);
  a->set_tau(4);
  a->set_alpha_min(0.02);
  a->set_alpha_max(0.8);
  a->set_entropy_heads(v1::ENTROPY_HEADS_MEAN_ENTROPY);
  a->set_entropy_source(v1::ENTROPY_SOURCE_CAUSAL);
  a->mutable_select()->set_recent_fraction(0.25);
  a->mutable_select()->set_merge(v1::MERGE_MODE_WEIGHTED);
  absl::StatusOr<CompressOptions> o = OptionsFromProto(p);
  ASSERT_TRUE(o.ok()) << o.status();
  CompressOptions want = DefaultOptions(PolicyKind::kAmber);
  want.score_norm = ScoreNorm::kVisibleMean;
  want.layer_budget = LayerBudget::kEntropy;
  want.sinks = 3;
  want.recent_search_rows = 0;
  want.depth_ratio = 0.5;
  want.budget.tau = 4;
  want.budget.alpha_min = 0.02;
  want.budget.alpha_max = 0.8;
  want.entropy_heads = EntropyHeads::kMeanEntropy;
  want.entropy_source = EntropySource::kCausal;
  want.recent_fraction = 0.25;
  want.merge = MergeMode::kWeighted;
  ExpectOptionsEq(*o, want);
  // Defaults: summed scores, depth budgets (0.8), the recent search on 16 rows
  // (recent_fraction 0.5 where it cannot run), no sinks, no prior, no merge.
  const CompressOptions d = DefaultOptions(PolicyKind::kAmber);
  EXPECT_EQ(d.score_norm, ScoreNorm::kSum);
  EXPECT_EQ(d.layer_budget, LayerBudget::kDepth);
  EXPECT_EQ(d.depth_ratio, 0.8);
  EXPECT_EQ(d.recent_search_rows, 16);
  EXPECT_EQ(d.sinks, 0);
  EXPECT_EQ(d.recent_fraction, 0.5);
  EXPECT_EQ(d.text_prior, TextPrior::kNone);
  EXPECT_EQ(d.merge, MergeMode::kNone);
  for (auto [b, want_b] : {std::pair{v1::LAYER_BUDGET_UNIFORM, LayerBudget::kUniform},
                           std::pair{v1::LAYER_BUDGET_MASS, LayerBudget::kMass},
                           std::pair{v1::LAYER_BUDGET_DEPTH, LayerBudget::kDepth}}) {
    a->set_layer_budget(b);
    o = OptionsFromProto(p);
    ASSERT_TRUE(o.ok()) << o.status();
    EXPECT_EQ(o->layer_budget, want_b);
  }
  // Global budgets keep different numbers per head: no merge.
  a->set_layer_budget(v1::LAYER_BUDGET_GLOBAL);
  EXPECT_INVALID(OptionsFromProto(p).status(), "policy: layer_budget global keeps a different number of tokens per "
                                               "kv head: merge must be none, got weighted");
  a->mutable_select()->set_merge(v1::MERGE_MODE_NONE);
  o = OptionsFromProto(p);
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->layer_budget, LayerBudget::kGlobal);
  EXPECT_EQ(PolicyToProto(*o).amber().layer_budget(), v1::LAYER_BUDGET_GLOBAL);
  for (auto [n, want_n] : {std::pair{v1::SCORE_NORM_SUM, ScoreNorm::kSum},
                           std::pair{v1::SCORE_NORM_VISIBLE_MEAN, ScoreNorm::kVisibleMean},
                           std::pair{v1::SCORE_NORM_MAX, ScoreNorm::kMax}}) {
    a->set_score_norm(n);
    o = OptionsFromProto(p);
    ASSERT_TRUE(o.ok()) << o.status();
    EXPECT_EQ(o->score_norm, want_n);
    EXPECT_EQ(PolicyToProto(*o).amber().score_norm(), n);  // and back
    EXPECT_EQ(*ParseScoreNorm(ScoreNormName(want_n)), want_n);
  }
  // Unset fields keep the defaults; the reverse conversion gives them back.
  p = PolicyOf(PolicyKind::kAmber);
  o = OptionsFromProto(p);
  ASSERT_TRUE(o.ok()) << o.status();
  ExpectOptionsEq(*o, d);
}

TEST(OptionsFromProto, AmberErrorsNameAmbersFields) {
  auto with = [](const std::function<void(v1::AmberPolicy*)>& f) {
    v1::Policy p = PolicyOf(PolicyKind::kAmber);
    f(p.mutable_amber());
    return OptionsFromProto(p).status();
  };
  EXPECT_INVALID(with([](v1::AmberPolicy* a) { a->set_score_norm(static_cast<v1::ScoreNorm>(9)); }),
                 "policy.amber.score_norm: unknown value 9");
  EXPECT_INVALID(with([](v1::AmberPolicy* a) { a->set_layer_budget(static_cast<v1::LayerBudget>(7)); }),
                 "policy.amber.layer_budget: unknown value 7");
  EXPECT_INVALID(with([](v1::AmberPolicy* a) { a->set_sinks(-1); }), "policy.amber.sinks must be >= 0");
  EXPECT_INVALID(with([](v1::AmberPolicy* a) { a->set_tau(0); }), "policy.amber.tau must be in [1e-06, 1e+06], got 0");
  EXPECT_INVALID(with([](v1::AmberPolicy* a) { a->set_alpha_min(0.5); a->set_alpha_max(0.25); }),
                 "policy.amber.alpha_min (0.5) must not exceed policy.amber.alpha_max (0.25)");
  EXPECT_INVALID(with([](v1::AmberPolicy* a) { a->mutable_select()->set_recent_fraction(2); }),
                 "policy.amber.select.recent_fraction must be in [0, 1]");
  EXPECT_INVALID(with([](v1::AmberPolicy* a) { a->set_entropy_source(static_cast<v1::EntropySource>(5)); }),
                 "policy.amber.entropy_source: unknown value 5");
  EXPECT_INVALID(with([](v1::AmberPolicy* a) { a->set_recent_search_rows(-2); }),
                 "policy.amber.recent_search_rows must be >= 0, got -2");
  EXPECT_INVALID(with([](v1::AmberPolicy* a) { a->set_depth_ratio(0); }),
                 "policy.amber.depth_ratio must be in [0.01, 100], got 0");
  EXPECT_INVALID(with([](v1::AmberPolicy* a) { a->set_depth_ratio(101); }),
                 "policy.amber.depth_ratio must be in [0.01, 100], got 101");
  EXPECT_INVALID(with([](v1::AmberPolicy* a) { a->set_depth_ratio(std::nan("")); }),
                 "policy.amber.depth_ratio must be in [0.01, 100], got nan");
}

TEST(OptionsFromProto, PyramidKVBeta) {
  // 5e-324 made the smallest budget infinite and the budgets -2^63.
  for (double v : {0.0, -2.0, kNaN, kInf, 5e-324, 9e-4, 2e6}) {
    SCOPED_TRACE(v);
    v1::Policy p;
    p.mutable_pyramidkv()->set_beta(v);
    EXPECT_INVALID(OptionsFromProto(p).status(), "policy.pyramidkv.beta must be in [0.001, 1e+06], got");
  }
}

TEST(OptionsFromProto, EveryResultPassesValidateOptions) {
  for (PolicyKind kind : kAllPolicies) {
    absl::StatusOr<CompressOptions> o = OptionsFromProto(PolicyOf(kind));
    ASSERT_TRUE(o.ok());
    EXPECT_TRUE(ValidateOptions(*o).ok());
  }
}

// ---- headers -------------------------------------------------------------------

// A valid header: 2 layers, 2 kv heads, 4 query heads, head_dim 8, 16 tokens.
v1::CompressHeader QueriesHeader() {
  v1::CompressHeader h;
  v1::CacheShape* s = h.mutable_shape();
  s->set_layers(2);
  s->set_kv_heads(2);
  s->set_q_heads(4);
  s->set_head_dim(8);
  s->set_tokens(16);
  s->set_dtype(v1::DTYPE_FLOAT16);
  s->set_layout(v1::LAYOUT_NHD);
  h.set_stats(v1::STATS_FORM_QUERIES);
  h.set_q_tokens(4);
  h.set_query_positions(true);
  return h;
}

v1::CompressHeader PrecomputedHeader() {
  v1::CompressHeader h = QueriesHeader();
  h.set_stats(v1::STATS_FORM_PRECOMPUTED);
  h.set_q_tokens(0);
  h.set_query_positions(false);
  h.set_score_heads(2);
  return h;
}

v1::CompressHeader NoneHeader() {
  v1::CompressHeader h = QueriesHeader();
  h.set_stats(v1::STATS_FORM_NONE);
  h.set_q_tokens(0);
  h.set_query_positions(false);
  return h;
}

absl::Status Parse(const v1::CompressHeader& h, int64_t max_bytes = 0) { return SpecFromHeader(h, max_bytes).status(); }

TEST(SpecFromHeader, QueriesHappyPath) {
  v1::CompressHeader h = QueriesHeader();
  v1::ModalitySpan* span = h.mutable_shape()->add_modality();
  span->set_start(3);
  span->set_length(5);
  span->set_modality(v1::MODALITY_VISUAL);
  absl::StatusOr<CacheSpec> spec = SpecFromHeader(h, 0);
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->layers, 2);
  EXPECT_EQ(spec->kv_heads, 2);
  EXPECT_EQ(spec->q_heads, 4);
  EXPECT_EQ(spec->head_dim, 8);
  EXPECT_EQ(spec->tokens, 16);
  EXPECT_EQ(spec->dtype, DType::kFloat16);
  EXPECT_EQ(spec->layout, Layout::kNHD);
  EXPECT_EQ(spec->stats, SpecStats::kQueries);
  EXPECT_EQ(spec->q_tokens, 4);
  EXPECT_TRUE(spec->has_query_positions);
  EXPECT_EQ(spec->score_heads, 0);
  const std::vector<uint8_t> want = {0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0};
  EXPECT_EQ(ModalityVector(*spec), want);
  ASSERT_EQ(spec->visual_spans.size(), 1u);  // spans, not a tokens-sized vector
  EXPECT_EQ(spec->visual_spans[0].start, 3);
  EXPECT_EQ(spec->visual_spans[0].length, 5);
  // key + value + query + positions per layer.
  const int64_t layer = 2 * (2 * 16 * 8 * 2) + 4 * 4 * 8 * 2 + 4 * 4;
  EXPECT_EQ(TensorBytes(*spec, v1::TENSOR_KIND_KEY), 2 * 16 * 8 * 2);
  EXPECT_EQ(TensorBytes(*spec, v1::TENSOR_KIND_QUERY), 4 * 4 * 8 * 2);
  EXPECT_EQ(TensorBytes(*spec, v1::TENSOR_KIND_QUERY_POSITIONS), 16);
  EXPECT_EQ(TensorBytes(*spec, v1::TENSOR_KIND_SCORES), 0);
  EXPECT_EQ(TensorBytes(*spec, v1::TENSOR_KIND_POSITIONS), 0);
  EXPECT_EQ(*TotalBytes(*spec), 2 * layer);
}

TEST(SpecFromHeader, PrecomputedAndNoneHappyPaths) {
  absl::StatusOr<CacheSpec> p = SpecFromHeader(PrecomputedHeader(), 0);
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->stats, SpecStats::kPrecomputed);
  EXPECT_EQ(p->score_heads, 2);
  EXPECT_TRUE(p->visual_spans.empty());
  EXPECT_TRUE(ModalityVector(*p).empty());
  EXPECT_EQ(TensorBytes(*p, v1::TENSOR_KIND_SCORES), 2 * 16 * 4);
  EXPECT_EQ(TensorBytes(*p, v1::TENSOR_KIND_ENTROPY), 4);
  EXPECT_EQ(TensorBytes(*p, v1::TENSOR_KIND_QUERY), 0);
  EXPECT_EQ(*TotalBytes(*p), 2 * (2 * 2 * 16 * 8 * 2 + 2 * 16 * 4 + 4));

  v1::CompressHeader q = PrecomputedHeader();
  q.set_score_heads(4);  // q_heads
  EXPECT_TRUE(Parse(q).ok());
  q.mutable_shape()->set_q_heads(0);  // allowed with precomputed statistics
  q.set_score_heads(2);
  EXPECT_TRUE(Parse(q).ok());

  absl::StatusOr<CacheSpec> n = SpecFromHeader(NoneHeader(), 0);
  ASSERT_TRUE(n.ok()) << n.status();
  EXPECT_EQ(n->stats, SpecStats::kNone);
  EXPECT_EQ(CarriedKinds(*n), (std::vector<v1::TensorKind>{v1::TENSOR_KIND_KEY, v1::TENSOR_KIND_VALUE}));
  EXPECT_EQ(*TotalBytes(*n), 2 * 2 * (2 * 16 * 8 * 2));
  v1::CompressHeader n0 = NoneHeader();
  n0.mutable_shape()->set_q_heads(0);
  EXPECT_TRUE(Parse(n0).ok());
}

TEST(SpecFromHeader, QueryOutsideLse) {
  v1::CompressHeader h = QueriesHeader();
  h.set_query_outside_lse(true);
  absl::StatusOr<CacheSpec> spec = SpecFromHeader(h, 0);
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_TRUE(spec->has_query_outside_lse);
  EXPECT_EQ(TensorBytes(*spec, v1::TENSOR_KIND_QUERY_OUTSIDE_LSE), 4 * 4 * 4);  // q_heads x q_tokens floats
  EXPECT_EQ(CarriedKinds(*spec),
            (std::vector<v1::TensorKind>{v1::TENSOR_KIND_KEY, v1::TENSOR_KIND_VALUE, v1::TENSOR_KIND_QUERY,
                                         v1::TENSOR_KIND_QUERY_POSITIONS, v1::TENSOR_KIND_QUERY_OUTSIDE_LSE}));
  EXPECT_EQ(*TotalBytes(*spec), 2 * (2 * (2 * 16 * 8 * 2) + 4 * 4 * 8 * 2 + 4 * 4 + 4 * 4 * 4));
  EXPECT_STREQ(TensorKindName(v1::TENSOR_KIND_QUERY_OUTSIDE_LSE), "query_outside_lse");
  // Round trip through both headers.
  v1::CompressHeader back;
  ToProto(*spec, &back);
  EXPECT_TRUE(back.query_outside_lse());
  v1::PutCacheHeader put;
  ToProto(*spec, &put);
  EXPECT_TRUE(put.query_outside_lse());
  EXPECT_TRUE(SpecFromHeader(put, 0)->has_query_outside_lse);
  // Only with query rows.
  v1::CompressHeader p = PrecomputedHeader();
  p.set_query_outside_lse(true);
  EXPECT_INVALID(Parse(p), "header.query_outside_lse must be false with STATS_FORM_PRECOMPUTED");
  v1::CompressHeader n = NoneHeader();
  n.set_query_outside_lse(true);
  EXPECT_INVALID(Parse(n), "header.query_outside_lse must be false with STATS_FORM_NONE");
  p.set_query_outside_lse(false);
  EXPECT_EQ(TensorBytes(*SpecFromHeader(p, 0), v1::TENSOR_KIND_QUERY_OUTSIDE_LSE), 0);
}

TEST(SpecFromHeader, PutCacheHeaderOverload) {
  v1::PutCacheHeader put;
  *put.mutable_shape() = QueriesHeader().shape();
  put.set_stats(v1::STATS_FORM_QUERIES);
  put.set_q_tokens(16);
  absl::StatusOr<CacheSpec> spec = SpecFromHeader(put, 0);
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->q_tokens, 16);
  EXPECT_FALSE(spec->has_query_positions);
  put.set_q_tokens(17);
  EXPECT_INVALID(SpecFromHeader(put, 0).status(),
                 "header.q_tokens (17) > header.shape.tokens (16): rows after the cache (probes) need query_positions");
  put.set_query_positions(true);
  EXPECT_TRUE(SpecFromHeader(put, 0).ok());
}

TEST(SpecFromHeader, Layers) {
  for (int32_t v : {0, -1}) {
    v1::CompressHeader h = QueriesHeader();
    h.mutable_shape()->set_layers(v);
    EXPECT_INVALID(Parse(h), absl::StrCat("header.shape.layers must be > 0, got ", v));
  }
  v1::CompressHeader h = QueriesHeader();
  h.mutable_shape()->set_layers(4097);
  EXPECT_INVALID(Parse(h), "header.shape.layers must be <= 4096, got 4097");
  h.mutable_shape()->set_layers(4096);
  EXPECT_TRUE(Parse(h).ok());
}

TEST(SpecFromHeader, KvHeads) {
  v1::CompressHeader h = QueriesHeader();
  h.mutable_shape()->set_kv_heads(0);
  EXPECT_INVALID(Parse(h), "header.shape.kv_heads must be > 0, got 0");
  h.mutable_shape()->set_kv_heads(-2);
  EXPECT_INVALID(Parse(h), "header.shape.kv_heads must be > 0, got -2");
  h.mutable_shape()->set_kv_heads(4098);
  EXPECT_INVALID(Parse(h), "header.shape.kv_heads must be <= 4096, got 4098");
}

TEST(SpecFromHeader, QHeads) {
  v1::CompressHeader h = QueriesHeader();
  h.mutable_shape()->set_q_heads(0);
  EXPECT_INVALID(Parse(h), "header.shape.q_heads must be > 0, got 0");
  h.mutable_shape()->set_q_heads(-4);
  EXPECT_INVALID(Parse(h), "header.shape.q_heads must be > 0, got -4");
  h.mutable_shape()->set_q_heads(5);
  EXPECT_INVALID(Parse(h), "header.shape.q_heads (5) must be a multiple of header.shape.kv_heads (2)");
  h.mutable_shape()->set_q_heads(4098);
  EXPECT_INVALID(Parse(h), "header.shape.q_heads must be <= 4096, got 4098");
  v1::CompressHeader p = PrecomputedHeader();
  p.mutable_shape()->set_q_heads(-2);
  EXPECT_INVALID(Parse(p), "header.shape.q_heads must be >= 0, got -2");
  p.mutable_shape()->set_q_heads(3);
  EXPECT_INVALID(Parse(p), "header.shape.q_heads (3) must be a multiple of header.shape.kv_heads (2)");
}

TEST(SpecFromHeader, HeadDim) {
  v1::CompressHeader h = QueriesHeader();
  h.mutable_shape()->set_head_dim(0);
  EXPECT_INVALID(Parse(h), "header.shape.head_dim must be > 0, got 0");
  h.mutable_shape()->set_head_dim(4097);
  EXPECT_INVALID(Parse(h), "header.shape.head_dim must be <= 4096, got 4097");
}

TEST(SpecFromHeader, Tokens) {
  v1::CompressHeader h = QueriesHeader();
  h.mutable_shape()->set_tokens(0);
  EXPECT_INVALID(Parse(h), "header.shape.tokens must be > 0, got 0");
  h.mutable_shape()->set_tokens(-7);
  EXPECT_INVALID(Parse(h), "header.shape.tokens must be > 0, got -7");
  h.mutable_shape()->set_tokens(kMaxTokens + 1);
  EXPECT_INVALID(Parse(h), absl::StrCat("header.shape.tokens must be <= ", kMaxTokens));
  h.mutable_shape()->set_tokens(int64_t{1} << 40);
  EXPECT_INVALID(Parse(h), "header.shape.tokens must be <=");
}

TEST(SpecFromHeader, DType) {
  v1::CompressHeader h = QueriesHeader();
  h.mutable_shape()->set_dtype(v1::DTYPE_UNSPECIFIED);
  EXPECT_INVALID(Parse(h), "header.shape.dtype must be specified");
  h.mutable_shape()->set_dtype(static_cast<v1::DType>(9));
  EXPECT_INVALID(Parse(h), "header.shape.dtype: unknown value 9");
  h.mutable_shape()->set_dtype(static_cast<v1::DType>(-1));
  EXPECT_INVALID(Parse(h), "header.shape.dtype: unknown value -1");
  for (auto [in, out] : {std::pair{v1::DTYPE_FLOAT16, DType::kFloat16}, std::pair{v1::DTYPE_BFLOAT16, DType::kBFloat16},
                         std::pair{v1::DTYPE_FLOAT32, DType::kFloat32}}) {
    h.mutable_shape()->set_dtype(in);
    absl::StatusOr<CacheSpec> spec = SpecFromHeader(h, 0);
    ASSERT_TRUE(spec.ok());
    EXPECT_EQ(spec->dtype, out);
  }
}

TEST(SpecFromHeader, Layout) {
  v1::CompressHeader h = QueriesHeader();
  h.mutable_shape()->set_layout(v1::LAYOUT_UNSPECIFIED);
  absl::StatusOr<CacheSpec> spec = SpecFromHeader(h, 0);
  ASSERT_TRUE(spec.ok());
  EXPECT_EQ(spec->layout, Layout::kHND);
  h.mutable_shape()->set_layout(v1::LAYOUT_HND);
  EXPECT_EQ(SpecFromHeader(h, 0)->layout, Layout::kHND);
  h.mutable_shape()->set_layout(static_cast<v1::Layout>(3));
  EXPECT_INVALID(Parse(h), "header.shape.layout: unknown value 3");
}

TEST(SpecFromHeader, StatsForm) {
  v1::CompressHeader h = QueriesHeader();
  h.set_stats(v1::STATS_FORM_UNSPECIFIED);
  EXPECT_INVALID(Parse(h), "header.stats must be specified");
  h.set_stats(static_cast<v1::StatsForm>(8));
  EXPECT_INVALID(Parse(h), "header.stats: unknown value 8");
}

TEST(SpecFromHeader, QTokens) {
  v1::CompressHeader h = QueriesHeader();
  for (int64_t v : {int64_t{0}, int64_t{-1}, int64_t{2 * 16 + 65536 + 1}, int64_t{1} << 50}) {
    h.set_q_tokens(v);
    EXPECT_INVALID(Parse(h), absl::StrCat("header.q_tokens must be in [1, 2 x header.shape.tokens + 65536 = 65568] "
                                          "with STATS_FORM_QUERIES, got ",
                                          v));
  }
  h.set_q_tokens(17);  // probe rows after the cache, with their positions
  EXPECT_TRUE(Parse(h).ok());
  h.set_q_tokens(16);
  EXPECT_TRUE(Parse(h).ok());
  v1::CompressHeader p = PrecomputedHeader();
  p.set_q_tokens(3);
  EXPECT_INVALID(Parse(p), "header.q_tokens must be 0 with STATS_FORM_PRECOMPUTED");
  v1::CompressHeader n = NoneHeader();
  n.set_q_tokens(3);
  EXPECT_INVALID(Parse(n), "header.q_tokens must be 0 with STATS_FORM_NONE");
}

TEST(SpecFromHeader, QueryPositionsOnlyWithQueries) {
  v1::CompressHeader p = PrecomputedHeader();
  p.set_query_positions(true);
  EXPECT_INVALID(Parse(p), "header.query_positions must be false with STATS_FORM_PRECOMPUTED");
  v1::CompressHeader n = NoneHeader();
  n.set_query_positions(true);
  EXPECT_INVALID(Parse(n), "header.query_positions must be false with STATS_FORM_NONE");
}

TEST(SpecFromHeader, ScoreHeads) {
  v1::CompressHeader p = PrecomputedHeader();
  for (int32_t v : {0, 3, -2, 8}) {
    p.set_score_heads(v);
    EXPECT_INVALID(Parse(p), absl::StrCat("header.score_heads must be header.shape.kv_heads (2) or "
                                          "header.shape.q_heads (4) with STATS_FORM_PRECOMPUTED, got ",
                                          v));
  }
  p.mutable_shape()->set_q_heads(0);
  p.set_score_heads(0);  // equal to q_heads, but q_heads 0 means none
  EXPECT_INVALID(Parse(p), "header.score_heads must be header.shape.kv_heads (2) with STATS_FORM_PRECOMPUTED, got 0");
  v1::CompressHeader q = QueriesHeader();
  q.set_score_heads(2);
  EXPECT_INVALID(Parse(q), "header.score_heads must be 0 with STATS_FORM_QUERIES");
  v1::CompressHeader n = NoneHeader();
  n.set_score_heads(2);
  EXPECT_INVALID(Parse(n), "header.score_heads must be 0 with STATS_FORM_NONE");
}

v1::CompressHeader WithSpans(std::initializer_list<std::tuple<int64_t, int64_t, int>> spans) {
  v1::CompressHeader h = QueriesHeader();
  for (const auto& [start, length, modality] : spans) {
    v1::ModalitySpan* s = h.mutable_shape()->add_modality();
    s->set_start(start);
    s->set_length(length);
    s->set_modality(static_cast<v1::Modality>(modality));
  }
  return h;
}

TEST(SpecFromHeader, SpanStart) {
  EXPECT_INVALID(Parse(WithSpans({{-1, 2, 1}})),
                 "header.shape.modality[0].start must be in [0, header.shape.tokens=16), got -1");
  EXPECT_INVALID(Parse(WithSpans({{0, 2, 1}, {16, 1, 1}})),
                 "header.shape.modality[1].start must be in [0, header.shape.tokens=16), got 16");
}

TEST(SpecFromHeader, SpanLength) {
  EXPECT_INVALID(Parse(WithSpans({{2, 0, 1}})), "header.shape.modality[0].length must be > 0, got 0");
  EXPECT_INVALID(Parse(WithSpans({{2, -3, 1}})), "header.shape.modality[0].length must be > 0, got -3");
  EXPECT_INVALID(Parse(WithSpans({{10, 7, 1}})),
                 "header.shape.modality[0] (start 10, length 7) runs past header.shape.tokens=16");
  // start + length overflows int64: still rejected, not wrapped.
  EXPECT_INVALID(Parse(WithSpans({{5, std::numeric_limits<int64_t>::max(), 1}})),
                 "header.shape.modality[0] (start 5, length 9223372036854775807) runs past");
}

TEST(SpecFromHeader, SpanModality) {
  EXPECT_INVALID(Parse(WithSpans({{0, 1, 1}, {2, 3, 2}})), "header.shape.modality[1].modality: unknown value 2");
  EXPECT_INVALID(Parse(WithSpans({{2, 3, -1}})), "header.shape.modality[0].modality: unknown value -1");
}

TEST(SpecFromHeader, SpanOverlap) {
  EXPECT_INVALID(Parse(WithSpans({{0, 4, 1}, {8, 4, 1}, {3, 2, 1}})),
                 "header.shape.modality[2] (start 3, length 2) overlaps header.shape.modality[0] (start 0, length 4)");
  // Same start, text over visual.
  EXPECT_INVALID(Parse(WithSpans({{5, 1, 1}, {5, 3, 0}})),
                 "header.shape.modality[1] (start 5, length 3) overlaps "
                 "header.shape.modality[0]");
  // One inside another.
  EXPECT_INVALID(Parse(WithSpans({{0, 10, 0}, {4, 2, 1}})), "overlaps");
}

// A header may carry at most kMaxModalitySpans spans (text ones count too):
// 700k spans once made ListCaches fail and a queued call hold a vector.
TEST(SpecFromHeader, SpanCount) {
  v1::CompressHeader h = QueriesHeader();
  h.mutable_shape()->set_tokens(int64_t{1} << 20);
  for (int64_t i = 0; i <= kMaxModalitySpans; ++i) {
    v1::ModalitySpan* s = h.mutable_shape()->add_modality();
    s->set_start(2 * i);
    s->set_length(1);
    s->set_modality(i % 2 == 0 ? v1::MODALITY_VISUAL : v1::MODALITY_TEXT);
  }
  EXPECT_INVALID(Parse(h), "header.shape.modality: 65537 spans, at most 65536");
  h.mutable_shape()->mutable_modality()->RemoveLast();
  absl::StatusOr<CacheSpec> spec = SpecFromHeader(h, 0);
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->visual_spans.size(), static_cast<size_t>(kMaxModalitySpans / 2));
}

TEST(SpecFromHeader, SpansAdjacentUnsortedAndText) {
  absl::StatusOr<CacheSpec> spec = SpecFromHeader(WithSpans({{12, 4, 1}, {4, 4, 1}, {8, 4, 0}, {0, 1, 1}}), 0);
  ASSERT_TRUE(spec.ok()) << spec.status();
  const std::vector<uint8_t> want = {1, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1};
  EXPECT_EQ(ModalityVector(*spec), want);
  EXPECT_EQ(spec->visual_spans.size(), 3u);
  // Text spans only: all text, no vector needed.
  absl::StatusOr<CacheSpec> text = SpecFromHeader(WithSpans({{0, 16, 0}}), 0);
  ASSERT_TRUE(text.ok());
  EXPECT_TRUE(text->visual_spans.empty());
}

TEST(SpecFromHeader, MaxRequestBytes) {
  absl::StatusOr<CacheSpec> spec = SpecFromHeader(QueriesHeader(), 0);
  ASSERT_TRUE(spec.ok());
  const int64_t total = *TotalBytes(*spec);
  EXPECT_TRUE(Parse(QueriesHeader(), total).ok());
  EXPECT_STATUS(Parse(QueriesHeader(), total - 1), absl::StatusCode::kResourceExhausted,
                absl::StrCat("request needs ", total, " bytes, over --max_request_bytes=", total - 1));
}

TEST(SpecFromHeader, HugeButValidShapeIsOverTheLimit) {
  v1::CompressHeader h = QueriesHeader();
  h.mutable_shape()->set_layers(4096);
  h.mutable_shape()->set_kv_heads(64);
  h.mutable_shape()->set_q_heads(64);
  h.mutable_shape()->set_head_dim(128);
  h.mutable_shape()->set_tokens(1 << 20);
  h.set_q_tokens(1 << 20);
  const int64_t tensor = int64_t{64} * (1 << 20) * 128 * 2;  // key, value and query alike
  const int64_t total = 4096 * (3 * tensor + 4 * (1 << 20));
  EXPECT_STATUS(Parse(h, int64_t{64} << 30), absl::StatusCode::kResourceExhausted,
                absl::StrCat("request needs ", total, " bytes, over --max_request_bytes=", int64_t{64} << 30));
  EXPECT_TRUE(Parse(h, 0).ok());  // no limit
}

TEST(SpecFromHeader, TensorSizesOverflowInt64) {
  v1::CompressHeader h = QueriesHeader();
  h.mutable_shape()->set_layers(4096);
  h.mutable_shape()->set_kv_heads(4096);
  h.mutable_shape()->set_q_heads(4096);
  h.mutable_shape()->set_head_dim(4096);
  h.mutable_shape()->set_tokens(kMaxTokens);
  h.mutable_shape()->set_dtype(v1::DTYPE_FLOAT32);
  h.set_q_tokens(kMaxTokens);
  // 3 * 2^50 bytes per layer, times 2^12 layers: past 2^63.
  EXPECT_STATUS(Parse(h, 0), absl::StatusCode::kResourceExhausted, "overflow");
  EXPECT_STATUS(Parse(h, int64_t{1} << 40), absl::StatusCode::kResourceExhausted, "overflow");
}

TEST(SpecFromHeader, FieldsAreCheckedBeforeSpans) {
  // A bad dimension is reported even when a span is also bad (and no
  // modality vector of 2^40 tokens is built).
  v1::CompressHeader h = WithSpans({{0, int64_t{1} << 40, 1}});
  h.mutable_shape()->set_tokens(int64_t{1} << 40);
  EXPECT_INVALID(Parse(h), "header.shape.tokens must be <=");
  // A span is checked before the vector is built, after the byte limit.
  v1::CompressHeader g = WithSpans({{0, 4, 1}});
  EXPECT_STATUS(Parse(g, 10), absl::StatusCode::kResourceExhausted, "request needs");
}

// Random headers (fields drawn from edge values) never crash; whatever is
// accepted is consistent and within the byte limit.
TEST(SpecFromHeader, RandomHeadersAreRejectedOrConsistent) {
  test::Rng rng(2024);
  const int64_t edges[] = {0,
                           1,
                           2,
                           3,
                           4,
                           7,
                           16,
                           -1,
                           -2,
                           4096,
                           4097,
                           INT32_MAX,
                           INT32_MIN,
                           kMaxTokens,
                           kMaxTokens + 1,
                           std::numeric_limits<int64_t>::max(),
                           std::numeric_limits<int64_t>::min()};
  auto pick = [&]() -> int64_t {
    return rng.Int(0, 3) == 0 ? rng.Int(-3, 40) : edges[rng.Int(0, std::size(edges) - 1)];
  };
  int accepted = 0;
  for (int i = 0; i < 20000; ++i) {
    v1::CompressHeader h = rng.Int(0, 1) == 0 ? QueriesHeader() : PrecomputedHeader();
    v1::CacheShape* s = h.mutable_shape();
    switch (rng.Int(0, 12)) {
      case 0:
        s->set_layers(static_cast<int32_t>(pick()));
        break;
      case 1:
        s->set_kv_heads(static_cast<int32_t>(pick()));
        break;
      case 2:
        s->set_q_heads(static_cast<int32_t>(pick()));
        break;
      case 3:
        s->set_head_dim(static_cast<int32_t>(pick()));
        break;
      case 4:
        s->set_tokens(pick());
        break;
      case 5:
        s->set_dtype(static_cast<v1::DType>(rng.Int(-1, 4)));
        break;
      case 6:
        s->set_layout(static_cast<v1::Layout>(rng.Int(-1, 3)));
        break;
      case 7:
        h.set_stats(static_cast<v1::StatsForm>(rng.Int(-1, 4)));
        break;
      case 8:
        h.set_q_tokens(pick());
        break;
      case 9:
        h.set_score_heads(static_cast<int32_t>(pick()));
        break;
      case 10:
        h.set_query_positions(rng.Int(0, 1) == 1);
        break;
      default:
        for (int k = rng.Int(1, 4); k > 0; --k) {
          v1::ModalitySpan* span = s->add_modality();
          span->set_start(pick());
          span->set_length(pick());
          span->set_modality(static_cast<v1::Modality>(rng.Int(-1, 2)));
        }
    }
    const int64_t limit = rng.Int(0, 1) == 0 ? 0 : rng.Int(1, 1 << 16);
    absl::StatusOr<CacheSpec> spec = SpecFromHeader(h, limit == 0 ? (1 << 20) : limit);
    if (!spec.ok()) {
      EXPECT_TRUE(spec.status().code() == absl::StatusCode::kInvalidArgument ||
                  spec.status().code() == absl::StatusCode::kResourceExhausted)
          << spec.status();
      EXPECT_EQ(std::string(spec.status().message()).rfind("header.", 0) == 0 ||
                    std::string(spec.status().message()).rfind("request needs", 0) == 0,
                true)
          << spec.status();
      continue;
    }
    ++accepted;
    EXPECT_TRUE(ValidateSpec(*spec).ok());
    EXPECT_LE(*TotalBytes(*spec), limit == 0 ? (1 << 20) : limit);
    const std::vector<uint8_t> modality = ModalityVector(*spec);
    EXPECT_TRUE(modality.empty() || static_cast<int64_t>(modality.size()) == spec->tokens);
    v1::CompressHeader back;
    ToProto(*spec, &back);
    absl::StatusOr<CacheSpec> again = SpecFromHeader(back, 0);
    ASSERT_TRUE(again.ok()) << again.status();
    EXPECT_EQ(ModalityVector(*again), modality);
  }
  EXPECT_GT(accepted, 1000);
}

// ---- domain spec -------------------------------------------------------------

CacheSpec ValidSpec() { return *SpecFromHeader(QueriesHeader(), 0); }

TEST(ValidateSpec, DomainEnumsAndModality) {
  EXPECT_TRUE(ValidateSpec(ValidSpec()).ok());
  CacheSpec a = ValidSpec();
  a.dtype = static_cast<DType>(7);
  EXPECT_INVALID(ValidateSpec(a), "header.shape.dtype: unknown value 7");
  EXPECT_EQ(TensorBytes(a, v1::TENSOR_KIND_KEY), -1);
  CacheSpec b = ValidSpec();
  b.layout = static_cast<Layout>(5);
  EXPECT_INVALID(ValidateSpec(b), "header.shape.layout: unknown value 5");
  CacheSpec c = ValidSpec();
  c.stats = static_cast<SpecStats>(9);
  EXPECT_INVALID(ValidateSpec(c, 0, "spec."), "spec.stats: unknown value 9");
  CacheSpec d = ValidSpec();
  d.visual_spans = {{4, 13, Modality::kVisual}};
  EXPECT_INVALID(ValidateSpec(d), "header.shape.modality: visual span 0 (start 4, length 13) is not a visual span "
                                  "within [0, header.shape.tokens=16)");
  d.visual_spans = {{4, 4, Modality::kVisual}, {6, 2, Modality::kVisual}};
  EXPECT_INVALID(ValidateSpec(d), "visual span 1 (start 6, length 2)");
  d.visual_spans = {{4, 4, Modality::kText}};
  EXPECT_INVALID(ValidateSpec(d), "visual span 0 (start 4, length 4)");
  d.visual_spans.assign(kMaxModalitySpans + 1, ModalitySpan{0, 1, Modality::kVisual});
  EXPECT_INVALID(ValidateSpec(d), "header.shape.modality: 65537 visual spans, at most 65536");
  CacheSpec e = ValidSpec();
  e.kv_heads = -1;
  EXPECT_INVALID(ValidateSpec(e, 0, ""), "shape.kv_heads must be > 0, got -1");
}

// ---- enums and domain -> proto ------------------------------------------------

TEST(Enums, RoundTrip) {
  for (DType d : {DType::kFloat16, DType::kBFloat16, DType::kFloat32}) {
    EXPECT_EQ(*DTypeFromProto(DTypeToProto(d)), d);
  }
  for (Layout l : {Layout::kHND, Layout::kNHD}) EXPECT_EQ(*LayoutFromProto(LayoutToProto(l)), l);
  for (SpecStats s : {SpecStats::kNone, SpecStats::kQueries, SpecStats::kPrecomputed}) {
    EXPECT_EQ(*StatsFromProto(StatsToProto(s)), s);
  }
  EXPECT_EQ(DTypeToProto(static_cast<DType>(9)), v1::DTYPE_UNSPECIFIED);
  EXPECT_EQ(LayoutToProto(static_cast<Layout>(9)), v1::LAYOUT_UNSPECIFIED);
  EXPECT_EQ(StatsToProto(static_cast<SpecStats>(9)), v1::STATS_FORM_UNSPECIFIED);
  EXPECT_INVALID(DTypeFromProto(v1::DTYPE_UNSPECIFIED, "x.dtype").status(), "x.dtype must be specified");
  EXPECT_STREQ(TensorKindName(v1::TENSOR_KIND_QUERY_POSITIONS), "query_positions");
  EXPECT_STREQ(TensorKindName(static_cast<v1::TensorKind>(77)), "unknown");
  EXPECT_STREQ(SpecStatsName(SpecStats::kPrecomputed), "precomputed");
}

TEST(ToProto, ShapeRoundTrip) {
  v1::CompressHeader h = WithSpans({{0, 2, 1}, {5, 3, 1}, {8, 2, 1}, {15, 1, 1}, {10, 2, 0}});
  h.mutable_shape()->set_dtype(v1::DTYPE_BFLOAT16);
  absl::StatusOr<CacheSpec> spec = SpecFromHeader(h, 0);
  ASSERT_TRUE(spec.ok()) << spec.status();
  v1::CompressHeader back;
  back.mutable_shape()->set_layers(99);  // cleared
  ToProto(*spec, &back);
  EXPECT_EQ(back.shape().layers(), 2);
  EXPECT_EQ(back.shape().dtype(), v1::DTYPE_BFLOAT16);
  EXPECT_EQ(back.shape().layout(), v1::LAYOUT_NHD);
  EXPECT_EQ(back.stats(), v1::STATS_FORM_QUERIES);
  EXPECT_EQ(back.q_tokens(), 4);
  EXPECT_TRUE(back.query_positions());
  // Adjacent visual spans [5, 8) and [8, 10) come back as one run.
  ASSERT_EQ(back.shape().modality_size(), 3);
  EXPECT_EQ(back.shape().modality(1).start(), 5);
  EXPECT_EQ(back.shape().modality(1).length(), 5);
  EXPECT_EQ(back.shape().modality(2).start(), 15);
  EXPECT_EQ(back.shape().modality(2).modality(), v1::MODALITY_VISUAL);
  absl::StatusOr<CacheSpec> again = SpecFromHeader(back, 0);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(ModalityVector(*again), ModalityVector(*spec));
  EXPECT_EQ(again->tokens, spec->tokens);
  EXPECT_EQ(again->q_heads, spec->q_heads);

  v1::PutCacheHeader put;
  CacheSpec p = *SpecFromHeader(PrecomputedHeader(), 0);
  ToProto(p, &put);
  EXPECT_EQ(put.stats(), v1::STATS_FORM_PRECOMPUTED);
  EXPECT_EQ(put.score_heads(), 2);
  EXPECT_EQ(put.shape().modality_size(), 0);
  EXPECT_TRUE(SpecFromHeader(put, 0).ok());
}

TEST(ToProto, SpansFromModality) {
  EXPECT_TRUE(SpansFromModality({}).empty());
  EXPECT_TRUE(SpansFromModality({0, 0, 0}).empty());
  const std::vector<ModalitySpan> spans = SpansFromModality({1, 1, 0, 1, 0, 0, 1, 1, 1});
  ASSERT_EQ(spans.size(), 3u);
  EXPECT_EQ(spans[0].start, 0);
  EXPECT_EQ(spans[0].length, 2);
  EXPECT_EQ(spans[1].start, 3);
  EXPECT_EQ(spans[1].length, 1);
  EXPECT_EQ(spans[2].start, 6);
  EXPECT_EQ(spans[2].length, 3);
}

TEST(ToProto, LayerInfo) {
  LayerResult r;
  r.budget = 17;
  r.entropy = 1.25f;
  r.alpha = 0.375;
  v1::LayerInfo info;
  ToProto(3, r, &info);
  EXPECT_EQ(info.layer(), 3);
  EXPECT_EQ(info.budget(), 17);
  EXPECT_EQ(info.entropy(), 1.25f);
  EXPECT_EQ(info.alpha(), 0.375);
}

// ---- chunking --------------------------------------------------------------------

TEST(ChunkRanges, CoversInOrder) {
  EXPECT_TRUE(ChunkRanges(0, 10).empty());
  EXPECT_TRUE(ChunkRanges(-5, 10).empty());
  using R = std::vector<std::pair<int64_t, int64_t>>;
  EXPECT_EQ(ChunkRanges(10, 3), (R{{0, 3}, {3, 3}, {6, 3}, {9, 1}}));
  EXPECT_EQ(ChunkRanges(9, 3), (R{{0, 3}, {3, 3}, {6, 3}}));
  EXPECT_EQ(ChunkRanges(5, 100), (R{{0, 5}}));
  EXPECT_EQ(ChunkRanges(1, 1), (R{{0, 1}}));
  EXPECT_EQ(ChunkRanges(10, 0), (R{{0, 10}}));  // default 4 MiB
  const R big = ChunkRanges(kDefaultChunkBytes * 2 + 1, -1);
  EXPECT_EQ(big, (R{{0, kDefaultChunkBytes}, {kDefaultChunkBytes, kDefaultChunkBytes}, {2 * kDefaultChunkBytes, 1}}));
}

TEST(ChunkRanges, ResponseChunkBytes) {
  EXPECT_EQ(*ResponseChunkBytes(0), kDefaultChunkBytes);
  EXPECT_EQ(*ResponseChunkBytes(65536), 65536);
  EXPECT_EQ(*ResponseChunkBytes(kMaxChunkBytes), kMaxChunkBytes);
  EXPECT_INVALID(ResponseChunkBytes(-1).status(), "header.max_response_chunk_bytes must be 0");
  EXPECT_INVALID(ResponseChunkBytes(1).status(), "got 1");
  EXPECT_INVALID(ResponseChunkBytes(kMaxChunkBytes + 1, "request.max_response_chunk_bytes").status(),
                 "request.max_response_chunk_bytes must be 0");
}

}  // namespace
}  // namespace medakv

namespace medakv {
namespace {

TEST(SpecFromInputTest, CopiesTheShapeAndRejectsMixedQueryRows) {
  CacheInput in;
  in.kv_heads = 2;
  in.q_heads = 4;
  in.head_dim = 8;
  in.tokens = 16;
  in.dtype = DType::kBFloat16;
  in.layout = Layout::kNHD;
  in.modality.assign(16, 0);
  in.modality[3] = 1;
  LayerInput a, b;
  a.query.tokens = 4;
  b.query.tokens = 4;
  in.layers = {a, b};
  absl::StatusOr<CacheSpec> spec = SpecFromInput(in);
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->layers, 2);
  EXPECT_EQ(spec->q_heads, 4);
  EXPECT_EQ(spec->dtype, DType::kBFloat16);
  EXPECT_EQ(spec->layout, Layout::kNHD);
  EXPECT_EQ(ModalityVector(*spec), in.modality);
  EXPECT_EQ(spec->stats, SpecStats::kQueries);
  EXPECT_EQ(spec->q_tokens, 4);
  EXPECT_FALSE(spec->has_query_positions);
  in.layers[1].query.tokens = 5;
  EXPECT_EQ(SpecFromInput(in).status().code(), absl::StatusCode::kInvalidArgument);
  in.layers[1].query.tokens = 4;
  in.layers[1].query_positions = {12, 13, 14, 15};
  EXPECT_EQ(SpecFromInput(in).status().code(), absl::StatusCode::kInvalidArgument);
  in.stats = StatsForm::kPrecomputed;
  in.layers[0].score_heads = 4;
  spec = SpecFromInput(in);
  ASSERT_TRUE(spec.ok());
  EXPECT_EQ(spec->stats, SpecStats::kPrecomputed);
  EXPECT_EQ(spec->score_heads, 4);
}

}  // namespace
}  // namespace medakv
