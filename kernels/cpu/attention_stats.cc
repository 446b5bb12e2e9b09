// Attention statistics of one layer from its queries (docs/algorithm.md, MEDA
// step 1 and the score of step 3), without a Tq x T matrix. Parallel over
// blocks of query rows; each task keeps its rows' logits over the visible
// keys (at most kLogitBytes unless one row needs more) and makes two passes
// over them:
//   pass 1, tiled over keys (DotTile): per (head, row) the causal
//     log-sum-exp and, online, the entropies that need no second look
//     (CAUSAL, MEAN_ENTROPY) and the cross-modal log-sum-exp;
//   pass 2: for MEAN_ATTENTION the head-averaged cross-modal row's entropy
//     terms per key tile (added in tile order), and the probabilities of the
//     scored rows, which are added into the scores in row order (an ordered
//     section), so that every sum has a fixed order whatever the threads
//     (with ScoreAggregation::kMax, their maximum is taken instead).
// Memory: O(layer) for the fp32 copies, the logit buffers (one per thread)
// and O(T/tile x Tq) entropy partials.
#include <algorithm>
#include <cmath>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/common/status.h"
#include "kernels/common/tensor_util.h"
#include "kernels/cpu/dot_tile.h"
#include "kernels/cpu/ops.h"
#include "kernels/cpu/parallel.h"
#include "kernels/cpu/softmax_simd.h"
#include "kernels/ops/attention_math.h"
#include "kernels/ops/validate.h"

namespace medakv::cpu {
namespace {

constexpr int64_t kRowBlock = 4;          // most query rows per task
constexpr int64_t kKeyTile = 128;         // keys per tile (fp32 tile of D=128 is 64 KiB)
constexpr int64_t kLogitBytes = 8 << 20;  // logits a task keeps, unless one row needs more

// A dense fp32 HND [heads, tokens, head_dim] copy of a view, or the view's own
// memory when it already is one.
class F32Hnd {
 public:
  explicit F32Hnd(const TensorView& v) : head_dim_(v.head_dim), tokens_(v.tokens) {
    if (v.dtype == DType::kFloat32 && v.layout == Layout::kHND) {
      data_ = static_cast<const float*>(v.data);
      return;
    }
    copy_.resize(static_cast<size_t>(v.NumElements()));
    ParallelFor(v.heads, [&](int64_t h) {
      for (int64_t t = 0; t < v.tokens; ++t) {
        RowToFloat(v.dtype, v.Row(h, t), copy_.data() + (h * v.tokens + t) * v.head_dim, v.head_dim);
      }
    });
    data_ = copy_.data();
  }
  const float* Row(int64_t head, int64_t token) const { return data_ + (head * tokens_ + token) * head_dim_; }

 private:
  int64_t head_dim_, tokens_;
  const float* data_ = nullptr;
  std::vector<float> copy_;
};

// Adds a tile of logits x[0, n) (those in `subset`) to a row's online
// softmax state: the tile's maximum first, one rescale, then the sums of
// e^(x - max) eight lanes at a time (softmax_simd.h). The same state as
// adding the logits one by one, up to rounding (the CUDA kernel merges
// tiles the same way, OnlineSoftmaxEntropy::Merge).
void AddTile(OnlineSoftmaxEntropy& st, const float* x, int64_t n, KeySubset subset) {
  const float tile_max = MaxOf(x, n, subset);
  if (!(tile_max > -INFINITY)) return;  // no entry with mass
  if (tile_max > st.max) {
    if (st.sum > 0.f) {
      const float s = ExpPoly(st.max - tile_max);
      st.sum_dx = s * (st.sum_dx + (st.max - tile_max) * st.sum);
      st.sum = s * st.sum;
    }
    st.max = tile_max;
  }
  float sum = 0.f, sum_dx = 0.f;
  SumExp(x, n, st.max, subset, &sum, &sum_dx);
  st.sum += sum;
  st.sum_dx += sum_dx;
}

}  // namespace

absl::Status AttentionStats(const AttentionStatsArgs& a, AttentionStatsOutput* out) {
  MEDAKV_RETURN_IF_ERROR(ValidateAttentionStats(a, out));
  const int64_t kv_heads = a.key.heads, tokens = a.key.tokens, d = a.key.head_dim;
  const int64_t q_heads = a.query.heads, rows = a.query.tokens, group = q_heads / kv_heads;
  const int32_t* pos = a.query_positions;
  const uint8_t* mod = a.modality;

  bool any_visual = false;
  for (int64_t t = 0; t < tokens && !any_visual; ++t) any_visual = mod[t] != 0;
  const bool causal = !any_visual || a.entropy_source == EntropySource::kCausal;
  const bool mean_attention = !causal && a.entropy_heads == EntropyHeads::kMeanAttention;
  const bool max_score = a.aggregation == ScoreAggregation::kMax;

  const F32Hnd keys(a.key);
  const F32Hnd queries(a.query);

  // Rows per task: each task keeps its rows' logits over every visible key
  // (q_heads x rows x T floats), so that the second pass reads them instead of
  // computing every dot product again; at most kLogitBytes unless one row
  // alone needs more.
  const int64_t row_block = std::clamp<int64_t>(
      kLogitBytes / std::max<int64_t>(1, q_heads * tokens * static_cast<int64_t>(sizeof(float))), 1,
      kRowBlock);
  const int64_t row_blocks = (rows + row_block - 1) / row_block;
  const int64_t tiles = (tokens + kKeyTile - 1) / kKeyTile;
  std::vector<double> row_entropy(rows, 0.0);  // CAUSAL / MEAN_ENTROPY: mean over heads
  std::vector<uint8_t> row_valid(rows, 0);     // row has a visible key of the other modality (or causal)
  std::vector<float> partial(mean_attention ? tiles * rows : 0, 0.f);  // MEAN_ATTENTION: per (tile, row)
  std::fill(out->scores, out->scores + kv_heads * tokens, 0.f);
  const float inv_heads = 1.f / static_cast<float>(q_heads);
  std::vector<std::vector<float>> scratch(MaxThreads());  // one logit buffer per thread

  // Each task: its rows' logits, log-sum-exps and online entropies (pass 1),
  // then their probabilities and MEAN_ATTENTION entropy terms (pass 2); the
  // probabilities are added into the scores in row order (the ordered part),
  // so every score is the same sum in the same order whatever the threads.
  // A block's first row, its row count, and the keys its rows see: [0, visible).
  struct BlockRows {
    int64_t r0, nr, visible;
  };
  auto block_rows = [&](int64_t block) {
    const int64_t r0 = block * row_block, r1 = std::min(rows, r0 + row_block);
    int64_t last = 0;
    for (int64_t i = r0; i < r1; ++i) last = std::max<int64_t>(last, pos[i]);
    return BlockRows{r0, r1 - r0, last + 1};
  };
  // Blocks skipped once the caller cancels (their ordered part too).
  std::vector<uint8_t> skipped(row_blocks, 0);
  ParallelForOrdered(
      row_blocks,
      [&](int64_t block) {
        if (IsSet(a.cancelled)) {
          skipped[block] = 1;
          return;
        }
        const BlockRows b = block_rows(block);
        const int64_t r0 = b.r0, nr = b.nr, visible = b.visible;
        std::vector<float>& logits = scratch[ThreadIndex()];
        logits.resize(static_cast<size_t>(q_heads * nr * visible));
        auto row_logits = [&](int64_t h, int64_t r) { return logits.data() + (h * nr + r) * visible; };

        // Pass 1: per (head, row) causal lse; cross-modal lse; per-row entropy where online suffices.
        std::vector<OnlineSoftmaxEntropy> st_causal(q_heads * nr), st_cross(q_heads * nr);
        for (int64_t g = 0; g < kv_heads; ++g) {
          for (int64_t j0 = 0; j0 < visible; j0 += kKeyTile) {
            const int64_t j1 = std::min(visible, j0 + kKeyTile);
            for (int64_t h = g * group; h < (g + 1) * group; ++h) {
              DotTile(queries.Row(h, r0), d, nr, keys.Row(g, j0), d, j1 - j0, d, row_logits(h, 0) + j0,
                      visible);
              for (int64_t r = 0; r < nr; ++r) {
                const int64_t i = r0 + r;
                float* logit = row_logits(h, r);
                const uint8_t mq = mod[pos[i]];
                OnlineSoftmaxEntropy& sc = st_causal[h * nr + r];
                OnlineSoftmaxEntropy& sx = st_cross[h * nr + r];
                const int64_t end = std::min<int64_t>(j1, pos[i] + 1);
                if (end <= j0) continue;
                for (int64_t j = j0; j < end; ++j) logit[j] *= a.scale;
                AddTile(sc, logit + j0, end - j0, KeySubset{});
                if (!causal) AddTile(sx, logit + j0, end - j0, KeySubset{mod + j0, mq});
              }
            }
          }
        }
        for (int64_t r = 0; r < nr; ++r) {
          const int64_t i = r0 + r;
          double sum_h = 0.0;
          bool valid = true;
          for (int64_t h = 0; h < q_heads; ++h) {
            const OnlineSoftmaxEntropy& sc = st_causal[h * nr + r];
            const OnlineSoftmaxEntropy& sx = st_cross[h * nr + r];
            if (causal) {
              sum_h += sc.Entropy();
            } else {
              valid = valid && !sx.Empty();
              sum_h += sx.Entropy();
            }
          }
          row_valid[i] = valid ? 1 : 0;
          row_entropy[i] = sum_h / static_cast<double>(q_heads);
        }

        // Pass 2: MEAN_ATTENTION's head-averaged cross-modal row, per key tile;
        // then each scored row's logits become its probabilities.
        std::vector<float> abar(kKeyTile);
        for (int64_t r = 0; r < nr; ++r) {
          const int64_t i = r0 + r;
          const int64_t end = pos[i] + 1;
          if (mean_attention && row_valid[i]) {
            const uint8_t mq = mod[pos[i]];
            for (int64_t tile = 0; tile * kKeyTile < end; ++tile) {
              const int64_t j0 = tile * kKeyTile, j1 = std::min(end, j0 + kKeyTile);
              std::fill(abar.begin(), abar.end(), 0.f);
              for (int64_t h = 0; h < q_heads; ++h) {
                const float lx = st_cross[h * nr + r].Lse();
                const float* logit = row_logits(h, r);
                AddExpShifted(logit + j0, j1 - j0, lx, KeySubset{mod + j0, mq}, abar.data());
              }
              float e = 0.f;
              for (int64_t j = 0; j < j1 - j0; ++j) e += EntropyTerm(abar[j] * inv_heads);
              partial[tile * rows + i] = e;
            }
          }
          if (i >= a.score_rows_begin) {
            for (int64_t h = 0; h < q_heads; ++h) {
              float lc = st_causal[h * nr + r].Lse();
              if (a.outside_lse != nullptr) lc = LogAddExp(lc, a.outside_lse[h * rows + i]);
              float* logit = row_logits(h, r);
              ExpShifted(logit, end, lc, logit);
            }
          }
        }
      },
      [&](int64_t block) {
        // In block order: the scored rows' probabilities into the scores, row by
        // row, head by head.
        if (skipped[block]) return;
        const BlockRows b = block_rows(block);
        const int64_t r0 = b.r0, nr = b.nr, visible = b.visible;
        const float* probs = scratch[ThreadIndex()].data();
        for (int64_t r = 0; r < nr; ++r) {
          const int64_t i = r0 + r;
          if (i < a.score_rows_begin) continue;
          for (int64_t h = 0; h < q_heads; ++h) {
            const float* p = probs + (h * nr + r) * visible;
            float* s = out->scores + (h / group) * tokens;
            if (max_score) {
              for (int64_t j = 0; j <= pos[i]; ++j) s[j] = std::max(s[j], p[j]);
            } else {
              for (int64_t j = 0; j <= pos[i]; ++j) s[j] += p[j];
            }
          }
        }
      });

  if (std::find(skipped.begin(), skipped.end(), 1) != skipped.end()) {
    return absl::CancelledError("attention statistics cancelled");
  }
  // Reduce the row entropies in a fixed order.
  double sum_tv = 0.0, sum_vt = 0.0, sum_all = 0.0;
  int64_t n_tv = 0, n_vt = 0;
  for (int64_t i = 0; i < rows; ++i) {
    double e = row_entropy[i];
    if (mean_attention) {
      e = 0.0;
      for (int64_t tile = 0; tile < tiles; ++tile) e += partial[tile * rows + i];
    }
    if (causal) {
      sum_all += e;
    } else if (row_valid[i]) {
      if (mod[pos[i]] == 0) {
        sum_tv += e;
        ++n_tv;
      } else {
        sum_vt += e;
        ++n_vt;
      }
    }
  }
  out->causal = causal;
  if (causal) {
    out->entropy_tv = out->entropy_vt = 0.f;
    out->entropy = static_cast<float>(sum_all / static_cast<double>(rows));
  } else {
    out->entropy_tv = n_tv > 0 ? static_cast<float>(sum_tv / n_tv) : 0.f;
    out->entropy_vt = n_vt > 0 ? static_cast<float>(sum_vt / n_vt) : 0.f;
    out->entropy = out->entropy_tv + out->entropy_vt;
  }
  return absl::OkStatus();
}

}  // namespace medakv::cpu
