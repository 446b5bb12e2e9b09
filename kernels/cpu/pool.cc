#include "absl/strings/str_cat.h"
#include "kernels/cpu/ops.h"
#include "kernels/cpu/parallel.h"
#include "kernels/common/status.h"
#include "kernels/ops/pool_math.h"
#include "kernels/ops/validate.h"

namespace medakv::cpu {

absl::Status PoolScores(const float* in, int64_t heads, int64_t tokens, int64_t length, int64_t kernel,
                        float* out) {
  MEDAKV_RETURN_IF_ERROR(ValidatePoolScores(in, heads, tokens, length, kernel, out));
  ParallelFor(heads, [&](int64_t h) {
    const float* row = in + h * tokens;
    float* dst = out + h * tokens;
    for (int64_t t = 0; t < length; ++t) dst[t] = PooledScore(row, length, t, kernel);
    for (int64_t t = length; t < tokens; ++t) dst[t] = row[t];
  });
  return absl::OkStatus();
}

}  // namespace medakv::cpu
