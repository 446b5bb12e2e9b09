#include "client/cli/policy_flags.h"

#include "kernels/common/status.h"

namespace medakv {

CLI::Option* PolicyFlags::Opt(CLI::App* app, const std::string& name, auto& value, const std::string& help) {
  return app->add_option(name, value, help);
}

void PolicyFlags::Add(CLI::App* app, bool with_policy) {
  if (with_policy) {
    policy_opt_ =
        app->add_option("--policy", policy_, "full | meda | streaming_llm | h2o | snapkv | pyramidkv | look_m | amber")
            ->capture_default_str();
  }
  const CompressOptions d;
  rho_ = Opt(app, "--rho", v_.budget.rho, "Fraction of the cache to keep, (0, 1] [0.2]");
  tau_ = Opt(app, "--tau", v_.budget.tau, "meda: temperature of the entropy softmax [1]");
  alpha_min_ = Opt(app, "--alpha-min", v_.budget.alpha_min, "meda: lower clamp of alpha_l [0.01]");
  alpha_max_ = Opt(app, "--alpha-max", v_.budget.alpha_max, "meda: upper clamp of alpha_l [1.0]");
  exact_total_ = app->add_flag("--exact-total{true}", v_.budget.exact_total,
                               "meda: budgets sum to round(rho*L*T) exactly; =false: clamp and floor [true]");
  recent_ =
      Opt(app, "--recent-fraction", v_.recent_fraction, "Share of B_l kept as the most recent tokens [0.5]");
  entropy_heads_opt_ = Opt(app, "--entropy-heads", entropy_heads_, "meda: mean_attention | mean_entropy");
  entropy_source_opt_ = Opt(app, "--entropy-source", entropy_source_, "meda: cross_modal | causal");
  text_prior_opt_ = Opt(app, "--text-prior", text_prior_, "additive | keep_all_text | none (policy's default)");
  merge_opt_ = Opt(app, "--merge", merge_, "average | pivotal | weighted | none (policy's default)");
  merge_threshold_opt_ = Opt(app, "--merge-threshold", merge_threshold_, "none | mean [none]");
  shared_ = app->add_flag("--shared-selection{true}", v_.shared_selection, "One kept set for all heads of a layer");
  scale_ = Opt(app, "--scale", v_.scale, "Logit scale (0: 1/sqrt(head_dim)) [0]");
  sinks_ = Opt(app, "--sinks", v_.sinks, "streaming_llm, amber: attention sinks kept [4; amber 0]");
  window_ = Opt(app, "--window", v_.window, "snapkv, pyramidkv: observation window in query rows [64]");
  pool_kernel_ = Opt(app, "--pool-kernel", v_.pool_kernel, "snapkv, pyramidkv: average pooling kernel [5]");
  beta_ = Opt(app, "--pyramid-beta", v_.pyramid_beta, "pyramidkv: min budget = (C - w) / beta [20]");
  score_norm_opt_ = Opt(app, "--score-norm", score_norm_, "amber: sum | visible_mean | max [sum]");
  layer_budget_opt_ =
      Opt(app, "--layer-budget", layer_budget_, "amber: uniform | mass | entropy | depth | global [depth]");
  depth_ratio_ = Opt(app, "--depth-ratio", v_.depth_ratio,
                     "amber, --layer-budget depth: first layer's weight, the last's is its inverse [0.8]");
  recent_search_rows_ =
      Opt(app, "--recent-search-rows", v_.recent_search_rows,
          "amber: search each head's recent window on the attention of these last query rows; "
          "0: --recent-fraction [16]");
}

std::string PolicyFlags::FirstGiven(bool with_rho) const {
  for (const CLI::Option* opt : {policy_opt_,
                                 rho_,
                                 tau_,
                                 alpha_min_,
                                 alpha_max_,
                                 exact_total_,
                                 recent_,
                                 entropy_heads_opt_,
                                 entropy_source_opt_,
                                 text_prior_opt_,
                                 merge_opt_,
                                 merge_threshold_opt_,
                                 shared_,
                                 scale_,
                                 sinks_,
                                 window_,
                                 pool_kernel_,
                                 beta_,
                                 score_norm_opt_,
                                 layer_budget_opt_,
                                 depth_ratio_,
                                 recent_search_rows_}) {
    if (opt == nullptr || opt->count() == 0 || (opt == rho_ && !with_rho)) continue;
    return opt->get_name();
  }
  return "";
}

absl::StatusOr<CompressOptions> PolicyFlags::Resolve() const {
  MEDAKV_ASSIGN_OR_RETURN(const PolicyKind policy, ParsePolicy(policy_));
  return Resolve(policy);
}

absl::StatusOr<CompressOptions> PolicyFlags::Resolve(PolicyKind policy) const {
  CompressOptions o = DefaultOptions(policy);
  auto given = [](const CLI::Option* opt) { return opt != nullptr && opt->count() > 0; };
  if (given(rho_)) o.budget.rho = v_.budget.rho;
  if (given(tau_)) o.budget.tau = v_.budget.tau;
  if (given(alpha_min_)) o.budget.alpha_min = v_.budget.alpha_min;
  if (given(alpha_max_)) o.budget.alpha_max = v_.budget.alpha_max;
  if (given(exact_total_)) o.budget.exact_total = v_.budget.exact_total;
  if (given(recent_)) o.recent_fraction = v_.recent_fraction;
  if (given(shared_)) o.shared_selection = v_.shared_selection;
  if (given(scale_)) o.scale = v_.scale;
  if (given(sinks_)) o.sinks = v_.sinks;
  if (given(window_)) o.window = v_.window;
  if (given(pool_kernel_)) o.pool_kernel = v_.pool_kernel;
  if (given(beta_)) o.pyramid_beta = v_.pyramid_beta;
  if (given(depth_ratio_)) o.depth_ratio = v_.depth_ratio;
  if (given(recent_search_rows_)) o.recent_search_rows = v_.recent_search_rows;
  if (given(entropy_heads_opt_)) {
    MEDAKV_ASSIGN_OR_RETURN(o.entropy_heads, ParseEntropyHeads(entropy_heads_));
  }
  if (given(entropy_source_opt_)) {
    MEDAKV_ASSIGN_OR_RETURN(o.entropy_source, ParseEntropySource(entropy_source_));
  }
  if (given(text_prior_opt_)) {
    MEDAKV_ASSIGN_OR_RETURN(o.text_prior, ParseTextPrior(text_prior_));
  }
  if (given(merge_opt_)) {
    MEDAKV_ASSIGN_OR_RETURN(o.merge, ParseMergeMode(merge_));
  }
  if (given(merge_threshold_opt_)) {
    MEDAKV_ASSIGN_OR_RETURN(o.merge_threshold, ParseMergeThreshold(merge_threshold_));
  }
  if (given(score_norm_opt_)) {
    MEDAKV_ASSIGN_OR_RETURN(o.score_norm, ParseScoreNorm(score_norm_));
  }
  if (given(layer_budget_opt_)) {
    MEDAKV_ASSIGN_OR_RETURN(o.layer_budget, ParseLayerBudget(layer_budget_));
  }
  MEDAKV_RETURN_IF_ERROR(ValidateOptions(o));
  return o;
}

}  // namespace medakv
