// look_m (LOOK-M, EMNLP 2024 Findings): uniform budgets; text prior
// KEEP_ALL_TEXT (the paper's Eq. 8 and its code keep the union of text and
// top tokens), accumulated attention, recent half, PIVOTAL merge
// (DefaultOptions; AVERAGE and WEIGHTED selectable with --merge).
#include "service/compress/policy.h"

namespace medakv {

PolicyPlan LookMPlan() { return {.budget = BudgetRule::kUniform, .scorer = Scorer::kAccumulated}; }

}  // namespace medakv
