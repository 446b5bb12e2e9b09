// A policy is a composition of the ops: a budget rule across layers, a
// scorer inside a layer, a selector (text prior, sinks, recent tokens, top-k)
// and a merger. Each policy is one small file in policies/ that returns its
// plan; the options (CompressOptions) fill in the parameters.
#pragma once

#include "service/compress/options.h"

namespace medakv {

enum class BudgetRule : uint8_t {
  kFull,     // B_l = T
  kUniform,  // B_l = round(rho T)
  kPyramid,  // PyramidKV's arithmetic sequence, largest in layer 0
  kEntropy,  // MEDA's softmax of the cross-modal entropy (exact total by default)
  kMass,     // amber: the split of the exact total that keeps the most normalised score mass
  kDepth,    // amber: a linear ramp over depth (depth_ratio), exact total L round(rho T)
  kGlobal,   // amber: per-head budgets from the highest scores across every layer and head (GlobalHeadBudgets)
};

enum class Scorer : uint8_t {
  kNone,          // no statistics (StreamingLLM)
  kAccumulated,   // causal attention summed over every query row and the group's heads (H2O)
  kWindowPooled,  // mean attention of the last `window` rows, average-pooled over positions (SnapKV)
};

enum class RecentRule : uint8_t {
  kFraction,  // M = round(recent_fraction B)
  kWindow,    // M = the observation window's tokens (SnapKV: the window is always kept)
  kRest,      // every token after the sinks (StreamingLLM)
  kSearch,    // per kv head, the fraction of kRecentSearchFractions whose selection keeps the most
              // attention of the last recent_search_rows query rows (amber)
};

struct PolicyPlan {
  BudgetRule budget = BudgetRule::kUniform;
  Scorer scorer = Scorer::kAccumulated;
  RecentRule recent = RecentRule::kFraction;
  bool use_sinks = false;  // keep the first options.sinks tokens
};

// The plan of options.policy; the other parameters come from the options
// (amber's budget rule is its layer_budget option, its recent rule kSearch
// when recent_search_rows > 0).
PolicyPlan PlanFor(const CompressOptions& options);

// One per file in policies/.
PolicyPlan FullPlan();
PolicyPlan MedaPlan();
PolicyPlan StreamingLlmPlan();
PolicyPlan H2OPlan();
PolicyPlan SnapKVPlan();
PolicyPlan PyramidKVPlan();
PolicyPlan LookMPlan();
PolicyPlan AmberPlan(LayerBudget layer_budget, int64_t recent_search_rows);

}  // namespace medakv
