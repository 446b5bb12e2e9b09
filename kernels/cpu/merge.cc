// Merging evicted tokens into kept ones and compaction into the output
// layout (docs/algorithm.md, MEDA step 4; LOOK-M's PIVOTAL and WEIGHTED rules).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/common/status.h"
#include "kernels/common/tensor_util.h"
#include "kernels/cpu/dot_tile.h"
#include "kernels/cpu/ops.h"
#include "kernels/cpu/parallel.h"
#include "kernels/ops/attention_math.h"
#include "kernels/ops/merge_math.h"
#include "kernels/ops/validate.h"

namespace medakv::cpu {
namespace {

constexpr int64_t kEvictedBlock = 128;  // evicted tokens per parallel task
constexpr int64_t kKeptChunk = 256;     // kept keys per DotTile call (128 KiB of fp32 at d = 128)

// Copies the kept rows of one head unchanged (bit-exact).
void GatherHead(const TensorView& in, const int32_t* kept, int64_t budget, int64_t head,
                const MutableTensorView& out) {
  const size_t row_bytes = static_cast<size_t>(in.head_dim) * DTypeSize(in.dtype);
  for (int64_t b = 0; b < budget; ++b) std::memcpy(out.Row(head, b), in.Row(head, kept[b]), row_bytes);
}

struct HeadAssignment {
  std::vector<int32_t> evicted;  // ascending positions not kept
  std::vector<int32_t> target;   // [evicted] index into kept
  std::vector<float> cosine;     // [evicted] best cosine
  std::vector<uint8_t> merge;    // [evicted] whether to merge (threshold)
};

}  // namespace

absl::Status MergeAndGather(const MergeArgs& a, MutableTensorView out_key, MutableTensorView out_value) {
  MEDAKV_RETURN_IF_ERROR(ValidateMerge(a, out_key, out_value));
  const int64_t heads = a.key.heads, tokens = a.key.tokens, d = a.key.head_dim, budget = a.budget;
  if (a.mode == MergeMode::kNone || budget == tokens) {
    ParallelFor(heads, [&](int64_t h) {
      GatherHead(a.key, a.kept + h * budget, budget, h, out_key);
      GatherHead(a.value, a.kept + h * budget, budget, h, out_value);
    });
    return absl::OkStatus();
  }

  // Phase 1: evicted lists, then the best kept target of every evicted token.
  std::vector<HeadAssignment> assign(heads);
  std::vector<std::vector<float>> kept_keys(heads);   // [budget, d] fp32
  std::vector<std::vector<float>> kept_norms(heads);  // [budget]
  ParallelFor(heads, [&](int64_t h) {
    const int32_t* kept = a.kept + h * budget;
    HeadAssignment& as = assign[h];
    as.evicted.reserve(tokens - budget);
    for (int64_t t = 0, b = 0; t < tokens; ++t) {
      if (b < budget && kept[b] == t) {
        ++b;
      } else {
        as.evicted.push_back(static_cast<int32_t>(t));
      }
    }
    as.target.assign(as.evicted.size(), 0);
    as.cosine.assign(as.evicted.size(), 0.f);
    as.merge.assign(as.evicted.size(), 1);
    kept_keys[h].resize(budget * d);
    kept_norms[h].resize(budget);
    for (int64_t b = 0; b < budget; ++b) {
      float* row = kept_keys[h].data() + b * d;
      RowToFloat(a.key.dtype, a.key.Row(h, kept[b]), row, d);
      kept_norms[h][b] = std::sqrt(DotF32(row, row, d));
    }
  });
  const int64_t blocks_per_head = (tokens - budget + kEvictedBlock - 1) / kEvictedBlock;
  std::atomic<bool> stopped{false};  // the caller cancelled: the remaining tasks return at once
  ParallelFor(heads * blocks_per_head, [&](int64_t task) {
    if (stopped.load(std::memory_order_relaxed) || IsSet(a.cancelled)) {
      stopped.store(true, std::memory_order_relaxed);
      return;
    }
    const int64_t h = task / blocks_per_head;
    HeadAssignment& as = assign[h];
    const int64_t begin = (task % blocks_per_head) * kEvictedBlock;
    const int64_t end = std::min<int64_t>(begin + kEvictedBlock, static_cast<int64_t>(as.evicted.size()));
    const int64_t ne = end - begin;
    std::vector<float> ke(ne * d), norm(ne), dots(ne * kKeptChunk), best(ne, NAN);
    std::vector<int64_t> best_j(ne, 0);
    for (int64_t i = 0; i < ne; ++i) {
      float* row = ke.data() + i * d;
      RowToFloat(a.key.dtype, a.key.Row(h, as.evicted[begin + i]), row, d);
      norm[i] = std::sqrt(DotF32(row, row, d));
    }
    // Kept keys in chunks, ascending, so each row's argmax sees j in order.
    const float* kk = kept_keys[h].data();
    const float* kn = kept_norms[h].data();
    for (int64_t j0 = 0; j0 < budget; j0 += kKeptChunk) {
      if (IsSet(a.cancelled)) {
        stopped.store(true, std::memory_order_relaxed);
        return;
      }
      const int64_t nj = std::min(kKeptChunk, budget - j0);
      DotTile(ke.data(), d, ne, kk + j0 * d, d, nj, d, dots.data(), kKeptChunk);
      for (int64_t i = 0; i < ne; ++i) {
        const float* dot = dots.data() + i * kKeptChunk;
        for (int64_t j = 0; j < nj; ++j) {
          const float c = CosineFromDot(dot[j], norm[i], kn[j0 + j]);
          if (BetterTarget(c, j0 + j, best[i], best_j[i])) {
            best[i] = c;
            best_j[i] = j0 + j;
          }
        }
      }
    }
    for (int64_t i = 0; i < ne; ++i) {
      as.target[begin + i] = static_cast<int32_t>(best_j[i]);
      as.cosine[begin + i] = best[i] != best[i] ? 0.f : best[i];
    }
  });

  if (stopped.load()) return absl::CancelledError("merge cancelled");

  // Phase 2 (MEAN threshold): one filter for all heads of the layer.
  if (a.threshold == MergeThreshold::kMean) {
    std::vector<double> sum(tokens, 0.0);
    std::vector<int32_t> count(tokens, 0);
    for (int64_t h = 0; h < heads; ++h) {
      for (size_t i = 0; i < assign[h].evicted.size(); ++i) {
        sum[assign[h].evicted[i]] += assign[h].cosine[i];
        ++count[assign[h].evicted[i]];
      }
    }
    double total = 0.0;
    int64_t n = 0;
    for (int64_t t = 0; t < tokens; ++t) {
      if (count[t] > 0) {
        sum[t] /= count[t];
        total += sum[t];
        ++n;
      }
    }
    const double mean = n > 0 ? total / static_cast<double>(n) : 0.0;
    for (int64_t h = 0; h < heads; ++h) {
      for (size_t i = 0; i < assign[h].evicted.size(); ++i) {
        assign[h].merge[i] = sum[assign[h].evicted[i]] >= mean ? 1 : 0;
      }
    }
  }

  // Phase 3: accumulate in ascending evicted order, finalise, write.
  ParallelFor(heads, [&](int64_t h) {
    const int32_t* kept = a.kept + h * budget;
    const HeadAssignment& as = assign[h];
    std::vector<float> sum_k(budget * d, 0.f), sum_v(budget * d, 0.f);
    std::vector<int64_t> count(budget, 0);
    std::vector<float> ke(d), ve(d), vj(d);
    const std::vector<float>& kk = kept_keys[h];
    for (size_t i = 0; i < as.evicted.size(); ++i) {
      if (!as.merge[i]) continue;
      const int64_t j = as.target[i];
      RowToFloat(a.key.dtype, a.key.Row(h, as.evicted[i]), ke.data(), d);
      RowToFloat(a.value.dtype, a.value.Row(h, as.evicted[i]), ve.data(), d);
      RowToFloat(a.value.dtype, a.value.Row(h, kept[j]), vj.data(), d);
      float* sk = sum_k.data() + j * d;
      float* sv = sum_v.data() + j * d;
      for (int64_t x = 0; x < d; ++x) {
        sk[x] += MergeContribution(a.mode, as.cosine[i], ke[x], kk[j * d + x]);
        sv[x] += MergeContribution(a.mode, as.cosine[i], ve[x], vj[x]);
      }
      ++count[j];
    }
    const size_t row_bytes = static_cast<size_t>(d) * DTypeSize(a.key.dtype);
    std::vector<float> row(d);
    for (int64_t j = 0; j < budget; ++j) {
      if (count[j] == 0) {
        std::memcpy(out_key.Row(h, j), a.key.Row(h, kept[j]), row_bytes);
        std::memcpy(out_value.Row(h, j), a.value.Row(h, kept[j]), row_bytes);
        continue;
      }
      for (int64_t x = 0; x < d; ++x) row[x] = MergeFinalize(kk[j * d + x], sum_k[j * d + x], count[j]);
      RowFromFloat(a.key.dtype, row.data(), out_key.Row(h, j), d);
      RowToFloat(a.value.dtype, a.value.Row(h, kept[j]), vj.data(), d);
      for (int64_t x = 0; x < d; ++x) row[x] = MergeFinalize(vj[x], sum_v[j * d + x], count[j]);
      RowFromFloat(a.value.dtype, row.data(), out_value.Row(h, j), d);
    }
  });
  return absl::OkStatus();
}

}  // namespace medakv::cpu
