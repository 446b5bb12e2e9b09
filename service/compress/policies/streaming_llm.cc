// streaming_llm (StreamingLLM, Xiao et al. 2024): uniform budgets; the first
// `sinks` tokens (default 4) and the most recent B - sinks tokens; no scores.
#include "service/compress/policy.h"

namespace medakv {

PolicyPlan StreamingLlmPlan() {
  return {.budget = BudgetRule::kUniform, .scorer = Scorer::kNone, .recent = RecentRule::kRest, .use_sinks = true};
}

}  // namespace medakv
