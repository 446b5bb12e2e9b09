// Command-line flags for a policy and its options, shared by the subcommands
// that compress. A policy starts from its own defaults (DefaultOptions); only
// the flags given on the command line change them.
#pragma once

#include <string>

#include <CLI/CLI.hpp>

#include "absl/status/statusor.h"
#include "service/compress/options.h"

namespace medakv {

class PolicyFlags {
 public:
  // Adds --policy (unless with_policy is false), --rho and every option flag to `app`.
  void Add(CLI::App* app, bool with_policy = true);

  // The options for `policy`: its defaults, then the flags that were given.
  absl::StatusOr<CompressOptions> Resolve(PolicyKind policy) const;
  // The same for the --policy flag.
  absl::StatusOr<CompressOptions> Resolve() const;

  // The name of the first policy flag given on the command line ("--tau"),
  // --policy included, --rho only when `with_rho`; empty when none was.
  std::string FirstGiven(bool with_rho) const;
  // Whether --rho was given, and its value.
  bool rho_given() const { return rho_ != nullptr && rho_->count() > 0; }
  double rho() const { return v_.budget.rho; }

 private:
  CLI::Option* Opt(CLI::App* app, const std::string& name, auto& value, const std::string& help);

  std::string policy_ = "amber";
  CompressOptions v_;  // values as parsed; only given flags are used
  std::string entropy_heads_, entropy_source_, text_prior_, merge_, merge_threshold_, score_norm_,
      layer_budget_;
  CLI::Option *policy_opt_ = nullptr, *rho_ = nullptr, *tau_ = nullptr, *alpha_min_ = nullptr,
              *alpha_max_ = nullptr, *exact_total_ = nullptr, *recent_ = nullptr,
              *entropy_heads_opt_ = nullptr, *entropy_source_opt_ = nullptr, *text_prior_opt_ = nullptr,
              *merge_opt_ = nullptr, *merge_threshold_opt_ = nullptr, *shared_ = nullptr, *scale_ = nullptr,
              *sinks_ = nullptr, *window_ = nullptr, *pool_kernel_ = nullptr, *beta_ = nullptr,
              *score_norm_opt_ = nullptr, *layer_budget_opt_ = nullptr, *depth_ratio_ = nullptr,
              *recent_search_rows_ = nullptr;
};

}  // namespace medakv
