// Attention statistics of one layer from its queries (ALGORITHM.md, MEDA
// step 1 and the score of step 3), without a Tq x T matrix:
//   pass 1, parallel over blocks of query rows, tiled over keys: per (head,
//     row) the causal log-sum-exp and, online, the entropies that need no
//     second look (CAUSAL, MEAN_ENTROPY) and the cross-modal log-sum-exp;
//   pass 2, parallel over key tiles: probabilities, summed into the scores of
//     the tile (each task owns its columns, so sums are in a fixed order), and
//     for MEAN_ATTENTION the head-averaged cross-modal row's entropy terms,
//     kept per (tile, row) and added in tile order.
// Memory is O(layer) for the fp32 copies plus O(T/tile x Tq) partials.
#include <algorithm>
#include <cmath>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/common/status.h"
#include "kernels/common/tensor_util.h"
#include "kernels/cpu/dot_tile.h"
#include "kernels/cpu/ops.h"
#include "kernels/cpu/parallel.h"
#include "kernels/ops/attention_math.h"
#include "kernels/ops/validate.h"

namespace medakv::cpu {
namespace {

constexpr int64_t kRowBlock = 4;   // query rows per pass-1 task
constexpr int64_t kKeyTile = 128;  // keys per tile (fp32 tile of D=128 is 64 KiB)
constexpr int64_t kRowBlock2 = 8;  // query rows per DotTile call in pass 2

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

  const F32Hnd keys(a.key);
  const F32Hnd queries(a.query);

  // Pass 1: per (head, row) causal lse; cross-modal lse; per-row entropy where online suffices.
  std::vector<float> lse_causal(q_heads * rows), lse_cross(q_heads * rows);
  std::vector<double> row_entropy(rows, 0.0);  // CAUSAL / MEAN_ENTROPY: mean over heads
  std::vector<uint8_t> row_valid(rows, 0);     // row has a visible key of the other modality (or causal)
  const int64_t row_blocks = (rows + kRowBlock - 1) / kRowBlock;
  ParallelFor(row_blocks, [&](int64_t block) {
    const int64_t r0 = block * kRowBlock, r1 = std::min(rows, r0 + kRowBlock), nr = r1 - r0;
    int64_t last = 0;
    for (int64_t i = r0; i < r1; ++i) last = std::max<int64_t>(last, pos[i]);
    std::vector<OnlineSoftmaxEntropy> st_causal(q_heads * nr), st_cross(q_heads * nr);
    std::vector<float> dots(nr * kKeyTile);
    for (int64_t g = 0; g < kv_heads; ++g) {
      for (int64_t j0 = 0; j0 <= last; j0 += kKeyTile) {
        const int64_t j1 = std::min(last + 1, j0 + kKeyTile);
        for (int64_t h = g * group; h < (g + 1) * group; ++h) {
          DotTile(queries.Row(h, r0), d, nr, keys.Row(g, j0), d, j1 - j0, d, dots.data(), kKeyTile);
          for (int64_t r = 0; r < nr; ++r) {
            const int64_t i = r0 + r;
            const float* dot = dots.data() + r * kKeyTile;
            const uint8_t mq = mod[pos[i]];
            OnlineSoftmaxEntropy& sc = st_causal[h * nr + r];
            OnlineSoftmaxEntropy& sx = st_cross[h * nr + r];
            const int64_t end = std::min<int64_t>(j1, pos[i] + 1);
            for (int64_t j = j0; j < end; ++j) {
              const float logit = a.scale * dot[j - j0];
              sc.Add(logit);
              if (!causal && CrossModal(mq, mod[j])) sx.Add(logit);
            }
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
        lse_causal[h * rows + i] = sc.Lse();
        lse_cross[h * rows + i] = sx.Lse();
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
  });

  // Pass 2: scores per key tile; MEAN_ATTENTION entropy partials per (tile, row).
  const int64_t tiles = (tokens + kKeyTile - 1) / kKeyTile;
  std::vector<float> partial(mean_attention ? tiles * rows : 0, 0.f);
  const float inv_heads = 1.f / static_cast<float>(q_heads);
  ParallelFor(tiles, [&](int64_t tile) {
    const int64_t j0 = tile * kKeyTile, j1 = std::min(tokens, j0 + kKeyTile), nj = j1 - j0;
    for (int64_t g = 0; g < kv_heads; ++g)
      std::fill(out->scores + g * tokens + j0, out->scores + g * tokens + j1, 0.f);
    std::vector<float> abar(nj);
    std::vector<float> dots(q_heads * kRowBlock2 * kKeyTile);  // [head, row of block, key of tile]
    for (int64_t i0 = 0; i0 < rows; i0 += kRowBlock2) {
      const int64_t ib = std::min(kRowBlock2, rows - i0);
      bool any = false;
      for (int64_t i = i0; i < i0 + ib && !any; ++i) {
        any = pos[i] >= j0 && (i >= a.score_rows_begin || (mean_attention && row_valid[i]));
      }
      if (!any) continue;
      for (int64_t h = 0; h < q_heads; ++h) {
        DotTile(queries.Row(h, i0), d, ib, keys.Row(h / group, j0), d, nj, d,
                dots.data() + h * kRowBlock2 * kKeyTile, kKeyTile);
      }
      for (int64_t i = i0; i < i0 + ib; ++i) {
        if (pos[i] < j0) continue;
        const bool score_row = i >= a.score_rows_begin;
        const bool entropy_row = mean_attention && row_valid[i];
        if (!score_row && !entropy_row) continue;
        const int64_t end = std::min<int64_t>(j1, pos[i] + 1);
        const uint8_t mq = mod[pos[i]];
        if (entropy_row) std::fill(abar.begin(), abar.end(), 0.f);
        for (int64_t h = 0; h < q_heads; ++h) {
          const int64_t g = h / group;
          const float* dot = dots.data() + (h * kRowBlock2 + (i - i0)) * kKeyTile;
          const float lc = lse_causal[h * rows + i], lx = lse_cross[h * rows + i];
          float* s = out->scores + g * tokens;
          for (int64_t j = j0; j < end; ++j) {
            const float logit = a.scale * dot[j - j0];
            if (score_row) s[j] += SoftmaxProb(logit, lc);
            if (entropy_row && CrossModal(mq, mod[j])) abar[j - j0] += SoftmaxProb(logit, lx);
          }
        }
        if (entropy_row) {
          float e = 0.f;
          for (int64_t j = 0; j < end - j0; ++j) e += EntropyTerm(abar[j] * inv_heads);
          partial[tile * rows + i] = e;
        }
      }
    }
  });

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
