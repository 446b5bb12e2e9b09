#include <cmath>

#include "absl/strings/str_cat.h"
#include "kernels/common/status.h"
#include "kernels/cpu/ops.h"
#include "kernels/ops/validate.h"

namespace medakv::cpu {

absl::Status ReduceScores(const float* scores, int64_t score_heads, int64_t kv_heads, int64_t tokens,
                          float* out) {
  MEDAKV_RETURN_IF_ERROR(ValidateReduceScores(scores, score_heads, kv_heads, tokens, out));
  const int64_t group = score_heads / kv_heads;
  for (int64_t i = 0; i < score_heads * tokens; ++i) {
    if (!std::isfinite(scores[i])) {
      return absl::InvalidArgumentError(absl::StrCat("scores: value at head ", i / tokens, ", token ",
                                                     i % tokens, " is not finite (", scores[i], ")"));
    }
  }
  for (int64_t g = 0; g < kv_heads; ++g) {
    float* dst = out + g * tokens;
    for (int64_t t = 0; t < tokens; ++t) dst[t] = 0.f;
    for (int64_t h = g * group; h < (g + 1) * group; ++h) {
      const float* src = scores + h * tokens;
      for (int64_t t = 0; t < tokens; ++t) dst[t] += src[t];
    }
  }
  return absl::OkStatus();
}

}  // namespace medakv::cpu
