#include "service/compress/policy.h"

namespace medakv {

PolicyPlan PlanFor(PolicyKind policy) {
  switch (policy) {
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
  }
  return FullPlan();  // unreachable: ValidateOptions rejects unknown policies
}

}  // namespace medakv
