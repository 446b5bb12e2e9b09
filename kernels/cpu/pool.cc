#include "absl/strings/str_cat.h"
#include "kernels/cpu/ops.h"
#include "kernels/cpu/parallel.h"
#include "kernels/ops/pool_math.h"

namespace medakv::cpu {

absl::Status PoolScores(const float* in, int64_t heads, int64_t tokens, int64_t length, int64_t kernel,
                        float* out) {
  if (heads <= 0 || tokens <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("pool: heads and tokens must be > 0, got ", heads, " and ", tokens));
  }
  if (length < 0 || length > tokens) {
    return absl::InvalidArgumentError(absl::StrCat("pool: length must be in [0, ", tokens, "], got ", length));
  }
  if (kernel < 1 || kernel % 2 == 0) {
    return absl::InvalidArgumentError(absl::StrCat("pool: kernel must be odd and >= 1, got ", kernel));
  }
  if (in == nullptr || out == nullptr || in == out) {
    return absl::InvalidArgumentError("pool: input and output must be distinct non-null buffers");
  }
  ParallelFor(heads, [&](int64_t h) {
    const float* row = in + h * tokens;
    float* dst = out + h * tokens;
    for (int64_t t = 0; t < length; ++t) dst[t] = PooledScore(row, length, t, kernel);
    for (int64_t t = length; t < tokens; ++t) dst[t] = row[t];
  });
  return absl::OkStatus();
}

}  // namespace medakv::cpu
