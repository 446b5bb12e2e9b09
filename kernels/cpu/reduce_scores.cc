#include <cmath>

#include "absl/strings/str_cat.h"
#include "kernels/cpu/ops.h"

namespace medakv::cpu {

absl::Status ReduceScores(const float* scores, int64_t score_heads, int64_t kv_heads, int64_t tokens,
                          float* out) {
  if (kv_heads <= 0 || tokens <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("scores: kv_heads and tokens must be > 0, got ", kv_heads, " and ", tokens));
  }
  if (score_heads <= 0 || score_heads % kv_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "scores: heads (", score_heads, ") must be kv_heads (", kv_heads, ") or q_heads, a multiple of it"));
  }
  if (scores == nullptr || out == nullptr) return absl::InvalidArgumentError("scores: no data");
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
