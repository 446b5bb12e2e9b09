#include "kernels/ops/validate.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "kernels/common/status.h"
#include "kernels/common/tensor_util.h"
#include "kernels/ops/select_math.h"

namespace medakv {

absl::Status ValidateAttentionStats(const AttentionStatsArgs& a, const AttentionStatsOutput* out, bool check_data) {
  const TensorView& k = a.key;
  const TensorView& q = a.query;
  if (k.heads <= 0 || k.tokens <= 0 || k.head_dim <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("attention stats: key shape must be positive, got [",
                                                   k.heads, ", ", k.tokens, ", ", k.head_dim, "]"));
  }
  if (q.heads <= 0 || q.heads % k.heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat("attention stats: q_heads (", q.heads,
                                                   ") must be a positive multiple of kv_heads (", k.heads, ")"));
  }
  if (q.tokens <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("attention stats: query needs at least one row, got ", q.tokens));
  }
  if (q.head_dim != k.head_dim) {
    return absl::InvalidArgumentError(absl::StrCat("attention stats: query head_dim (", q.head_dim,
                                                   ") must equal key head_dim (", k.head_dim, ")"));
  }
  MEDAKV_RETURN_IF_ERROR(CheckView(k, "attention stats: key", k.heads, k.tokens, k.head_dim));
  MEDAKV_RETURN_IF_ERROR(CheckView(q, "attention stats: query", q.heads, q.tokens, q.head_dim));
  if (!(a.scale > 0.f) || !std::isfinite(a.scale)) {
    return absl::InvalidArgumentError(absl::StrCat("attention stats: scale must be finite and > 0, got ", a.scale));
  }
  if (a.entropy_heads != EntropyHeads::kMeanAttention && a.entropy_heads != EntropyHeads::kMeanEntropy) {
    return absl::InvalidArgumentError("attention stats: unknown entropy_heads");
  }
  if (a.entropy_source != EntropySource::kCrossModal && a.entropy_source != EntropySource::kCausal) {
    return absl::InvalidArgumentError("attention stats: unknown entropy_source");
  }
  if (a.aggregation != ScoreAggregation::kSum && a.aggregation != ScoreAggregation::kMax) {
    return absl::InvalidArgumentError("attention stats: unknown score aggregation");
  }
  if (a.score_rows_begin < 0 || a.score_rows_begin > q.tokens) {
    return absl::InvalidArgumentError(absl::StrCat("attention stats: score_rows_begin must be in [0, ", q.tokens,
                                                   "], got ", a.score_rows_begin));
  }
  if (a.query_positions == nullptr || a.modality == nullptr || out == nullptr || out->scores == nullptr) {
    return absl::InvalidArgumentError("attention stats: positions, modality and scores must be non-null");
  }
  for (int64_t i = 0; check_data && i < q.tokens; ++i) {
    if (a.query_positions[i] < 0 || a.query_positions[i] >= k.tokens) {
      return absl::InvalidArgumentError(absl::StrCat("attention stats: query position ", i, " is ",
                                                     a.query_positions[i], ", outside [0, ", k.tokens, ")"));
    }
  }
  for (int64_t i = 0; check_data && a.outside_lse != nullptr && i < q.heads * q.tokens; ++i) {
    const float x = a.outside_lse[i];
    if (std::isnan(x) || x == INFINITY) {
      return absl::InvalidArgumentError(absl::StrCat("attention stats: outside_lse of query head ", i / q.tokens,
                                                     ", row ", i % q.tokens, " is ", x,
                                                     " (expected finite or -inf)"));
    }
  }
  return absl::OkStatus();
}

absl::Status ValidateReduceScores(const float* scores, int64_t score_heads, int64_t kv_heads, int64_t tokens,
                                  const float* out, bool check_data) {
  if (kv_heads <= 0 || tokens <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("scores: kv_heads and tokens must be > 0, got ", kv_heads, " and ", tokens));
  }
  if (score_heads <= 0 || score_heads % kv_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "scores: heads (", score_heads, ") must be kv_heads (", kv_heads, ") or q_heads, a multiple of it"));
  }
  if (scores == nullptr || out == nullptr) return absl::InvalidArgumentError("scores: no data");
  for (int64_t i = 0; check_data && i < score_heads * tokens; ++i) {
    if (!std::isfinite(scores[i])) {
      return absl::InvalidArgumentError(absl::StrCat("scores: value at head ", i / tokens, ", token ",
                                                     i % tokens, " is not finite (", scores[i], ")"));
    }
  }
  return absl::OkStatus();
}

absl::Status ValidatePoolScores(const float* in, int64_t heads, int64_t tokens, int64_t length, int64_t kernel,
                                const float* out) {
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
  return absl::OkStatus();
}

absl::Status ValidateSelect(const SelectArgs& a, const int32_t* kept) {
  if (a.kv_heads <= 0 || a.tokens <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("select: kv_heads and tokens must be > 0, got ", a.kv_heads, " and ", a.tokens));
  }
  if (a.tokens > INT32_MAX) {
    return absl::InvalidArgumentError(absl::StrCat("select: tokens (", a.tokens, ") exceed int32 positions"));
  }
  if (a.budget < 1 || a.budget > a.tokens) {
    return absl::InvalidArgumentError(
        absl::StrCat("select: budget must be in [1, tokens=", a.tokens, "], got ", a.budget));
  }
  if (!(a.recent_fraction >= 0.0 && a.recent_fraction <= 1.0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("recent_fraction must be in [0, 1], got ", a.recent_fraction));
  }
  if (a.sinks < 0) return absl::InvalidArgumentError(absl::StrCat("select: sinks must be >= 0, got ", a.sinks));
  if (a.text_prior != TextPrior::kAdditive && a.text_prior != TextPrior::kKeepAllText &&
      a.text_prior != TextPrior::kNone) {
    return absl::InvalidArgumentError("select: unknown text_prior");
  }
  if (a.scores == nullptr || a.modality == nullptr || kept == nullptr) {
    return absl::InvalidArgumentError("select: scores, modality and output must be non-null");
  }
  return absl::OkStatus();
}

SelectCounts SelectWindowCounts(const SelectArgs& a) {
  SelectCounts c;
  c.sinks = std::min(a.sinks, a.budget);
  c.recent = std::min(a.recent_tokens >= 0 ? a.recent_tokens : RecentCount(a.recent_fraction, a.budget),
                      a.budget - c.sinks);
  return c;
}

absl::Status ValidateMerge(const MergeArgs& a, const MutableTensorView& ok, const MutableTensorView& ov,
                           bool check_data) {
  const int64_t h = a.key.heads, t = a.key.tokens, d = a.key.head_dim;
  if (h <= 0 || t <= 0 || d <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("merge: key shape must be positive, got [", h, ", ", t, ", ", d, "]"));
  }
  MEDAKV_RETURN_IF_ERROR(CheckView(a.key, "merge: key", h, t, d));
  MEDAKV_RETURN_IF_ERROR(CheckView(a.value, "merge: value", h, t, d));
  if (a.value.dtype != a.key.dtype || a.value.layout != a.key.layout) {
    return absl::InvalidArgumentError("merge: value must have the key's dtype and layout");
  }
  if (a.budget < 1 || a.budget > t) {
    return absl::InvalidArgumentError(absl::StrCat("merge: budget must be in [1, ", t, "], got ", a.budget));
  }
  if (a.mode != MergeMode::kAverage && a.mode != MergeMode::kPivotal && a.mode != MergeMode::kWeighted &&
      a.mode != MergeMode::kNone) {
    return absl::InvalidArgumentError("merge: unknown merge mode");
  }
  if (a.threshold != MergeThreshold::kNone && a.threshold != MergeThreshold::kMean) {
    return absl::InvalidArgumentError("merge: unknown merge threshold");
  }
  if (a.kept == nullptr) return absl::InvalidArgumentError("merge: kept positions are null");
  for (int64_t head = 0; check_data && head < h; ++head) {
    const int32_t* k = a.kept + head * a.budget;
    for (int64_t b = 0; b < a.budget; ++b) {
      if (k[b] < 0 || k[b] >= t || (b > 0 && k[b] <= k[b - 1])) {
        return absl::InvalidArgumentError(absl::StrCat(
            "merge: kept positions of head ", head, " must be strictly ascending in [0, ", t,
            "), found ", k[b], " at index ", b));
      }
    }
  }
  MEDAKV_RETURN_IF_ERROR(CheckView(AsConst(ok), "merge: output key", h, a.budget, d));
  MEDAKV_RETURN_IF_ERROR(CheckView(AsConst(ov), "merge: output value", h, a.budget, d));
  if (ok.dtype != a.key.dtype || ok.layout != a.key.layout || ov.dtype != a.key.dtype ||
      ov.layout != a.key.layout) {
    return absl::InvalidArgumentError("merge: outputs must have the input dtype and layout");
  }
  return absl::OkStatus();
}

}  // namespace medakv
