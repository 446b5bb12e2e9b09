#include "service/compress/policy.h"

namespace medakv {

PolicyPlan PlanFor(const CompressOptions& options) {
  switch (options.policy) {
    case PolicyKind::kFull:
      return FullPlan();
    case PolicyKind::kMeda:
      return MedaPlan();
    case PolicyKind::kStreamingLlm:
      return StreamingLlmPlan();
    case PolicyKind::kH2O:
      return H2OPlan();
    case PolicyKind::kSnapKV:
      return SnapKVPlan();
    case PolicyKind::kPyramidKV:
      return PyramidKVPlan();
    case PolicyKind::kLookM:
      return LookMPlan();
    case PolicyKind::kAmber:
      return AmberPlan(options.layer_budget, options.recent_search_rows);
  }
  return FullPlan();  // unreachable: ValidateOptions rejects unknown policies
}

}  // namespace medakv
