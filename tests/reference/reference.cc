#include "tests/reference/reference.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#include "kernels/common/dtype.h"
#include "kernels/common/tensor.h"
#include "kernels/ops/options.h"

namespace medakv::reference {

double ReadElement(const TensorView& view, int64_t head, int64_t token, int64_t d) {
  const char* row = static_cast<const char*>(view.Row(head, token));
  switch (view.dtype) {
    case DType::kFloat16: {
      uint16_t bits;
      std::memcpy(&bits, row + 2 * d, sizeof(bits));
      return HalfBitsToFloat(bits);
    }
    case DType::kBFloat16: {
      uint16_t bits;
      std::memcpy(&bits, row + 2 * d, sizeof(bits));
      return BFloat16BitsToFloat(bits);
    }
    case DType::kFloat32: {
      float f;
      std::memcpy(&f, row + 4 * d, sizeof(f));
      return f;
    }
  }
  return std::numeric_limits<double>::quiet_NaN();
}

std::vector<double> ReadHnd(const TensorView& view) {
  std::vector<double> out(static_cast<size_t>(view.heads * view.tokens * view.head_dim));
  size_t n = 0;
  for (int64_t h = 0; h < view.heads; ++h) {
    for (int64_t t = 0; t < view.tokens; ++t) {
      for (int64_t d = 0; d < view.head_dim; ++d) out[n++] = ReadElement(view, h, t, d);
    }
  }
  return out;
}

std::vector<int32_t> DefaultPositions(int64_t q_tokens, int64_t tokens) {
  std::vector<int32_t> p(static_cast<size_t>(q_tokens));
  for (int64_t i = 0; i < q_tokens; ++i) p[i] = static_cast<int32_t>(tokens - q_tokens + i);
  return p;
}

int64_t RoundHalfUp(double x) { return static_cast<int64_t>(std::floor(x + 0.5)); }

double Entropy(const std::vector<double>& p) {
  double h = 0.0;
  for (double x : p) {
    if (x > 0.0) h -= x * std::log(x);
  }
  return h;
}

namespace {

// softmax over the given logits (double, max-subtracted).
std::vector<double> Softmax(const std::vector<double>& logits) {
  std::vector<double> p(logits.size());
  if (logits.empty()) return p;
  const double mx = *std::max_element(logits.begin(), logits.end());
  double sum = 0.0;
  for (size_t j = 0; j < logits.size(); ++j) {
    p[j] = std::exp(logits[j] - mx);
    sum += p[j];
  }
  for (double& x : p) x /= sum;
  return p;
}

}  // namespace

// The last key a query row at position p sees: p itself, or the cache's
// last token for a probe row after the cache (p >= tokens); its modality is
// that token's.
static int64_t Seen(int64_t p, int64_t tokens) { return p < tokens ? p : tokens - 1; }

RefStats RefAttentionStats(const TensorView& query, const std::vector<int32_t>& positions,
                           const TensorView& key, const std::vector<uint8_t>& modality,
                           double scale, EntropyHeads entropy_heads,
                           EntropySource entropy_source, int64_t score_rows_begin,
                           ScoreAggregation aggregation, const std::vector<float>& outside_lse) {
  const int64_t q_heads = query.heads;
  const int64_t q_tokens = query.tokens;
  const int64_t head_dim = query.head_dim;
  const int64_t kv_heads = key.heads;
  const int64_t tokens = key.tokens;
  const int64_t group = q_heads / kv_heads;  // query head h belongs to kv head h / group
  const std::vector<int32_t> pos =
      positions.empty() ? DefaultPositions(q_tokens, tokens) : positions;

  const std::vector<double> q = ReadHnd(query);  // [q_heads, q_tokens, head_dim]
  const std::vector<double> k = ReadHnd(key);    // [kv_heads, tokens, head_dim]

  // The full logit matrix [q_heads, q_tokens, tokens]; only j <= p_i is used.
  std::vector<double> logit(static_cast<size_t>(q_heads * q_tokens * tokens), 0.0);
  auto logit_at = [&](int64_t h, int64_t i, int64_t j) -> double& {
    return logit[static_cast<size_t>((h * q_tokens + i) * tokens + j)];
  };
  for (int64_t h = 0; h < q_heads; ++h) {
    const int64_t hk = h / group;
    for (int64_t i = 0; i < q_tokens; ++i) {
      for (int64_t j = 0; j <= Seen(pos[i], tokens); ++j) {
        double dot = 0.0;
        for (int64_t d = 0; d < head_dim; ++d) {
          dot += q[(h * q_tokens + i) * head_dim + d] * k[(hk * tokens + j) * head_dim + d];
        }
        logit_at(h, i, j) = scale * dot;
      }
    }
  }

  // Ordinary causal attention A[h, i, j] over the visible keys j <= p_i.
  RefStats out;
  out.scores.assign(static_cast<size_t>(kv_heads * tokens), 0.0);
  double causal_entropy_sum = 0.0;  // sum over rows of the mean over heads
  for (int64_t i = 0; i < q_tokens; ++i) {
    double row_entropy = 0.0;
    for (int64_t h = 0; h < q_heads; ++h) {
      std::vector<double> row(static_cast<size_t>(Seen(pos[i], tokens) + 1));
      for (int64_t j = 0; j <= Seen(pos[i], tokens); ++j) row[j] = logit_at(h, i, j);
      const std::vector<double> p = Softmax(row);
      row_entropy += Entropy(p);
      if (i >= score_rows_begin) {
        // The scores' softmax: the same logits over a denominator that also
        // holds the row's mass outside the cache.
        double denom = 0.0;
        for (double x : row) denom += std::exp(x);
        if (!outside_lse.empty()) denom += std::exp(static_cast<double>(outside_lse[h * q_tokens + i]));
        for (int64_t j = 0; j <= Seen(pos[i], tokens); ++j) {
          const double pj = outside_lse.empty() ? p[j] : std::exp(row[j]) / denom;
          double& s = out.scores[(h / group) * tokens + j];
          s = aggregation == ScoreAggregation::kMax ? std::max(s, pj) : s + pj;
        }
      }
    }
    causal_entropy_sum += row_entropy / static_cast<double>(q_heads);
  }

  bool has_visual = false;
  for (uint8_t m : modality) has_visual = has_visual || m == 1;

  if (!has_visual || entropy_source == EntropySource::kCausal) {
    out.causal = true;
    out.entropy = q_tokens > 0 ? causal_entropy_sum / static_cast<double>(q_tokens) : 0.0;
    return out;
  }

  // Cross-modal: each row attends over the visible keys of the other modality.
  double sum_half[2] = {0.0, 0.0};  // indexed by the row's modality: 0 text (TV), 1 visual (VT)
  int64_t rows_half[2] = {0, 0};
  for (int64_t i = 0; i < q_tokens; ++i) {
    const uint8_t row_modality = modality[Seen(pos[i], tokens)];
    std::vector<int64_t> cross;  // visible keys of the other modality
    for (int64_t j = 0; j <= Seen(pos[i], tokens); ++j) {
      if (modality[j] != row_modality) cross.push_back(j);
    }
    if (cross.empty()) continue;  // skipped row
    std::vector<double> mean_p(cross.size(), 0.0);
    double mean_h = 0.0;
    for (int64_t h = 0; h < q_heads; ++h) {
      std::vector<double> row(cross.size());
      for (size_t c = 0; c < cross.size(); ++c) row[c] = logit_at(h, i, cross[c]);
      const std::vector<double> p = Softmax(row);
      for (size_t c = 0; c < cross.size(); ++c) mean_p[c] += p[c] / static_cast<double>(q_heads);
      mean_h += Entropy(p) / static_cast<double>(q_heads);
    }
    const double h_row =
        entropy_heads == EntropyHeads::kMeanAttention ? Entropy(mean_p) : mean_h;
    sum_half[row_modality] += h_row;
    ++rows_half[row_modality];
  }
  out.entropy_tv = rows_half[0] > 0 ? sum_half[0] / static_cast<double>(rows_half[0]) : 0.0;
  out.entropy_vt = rows_half[1] > 0 ? sum_half[1] / static_cast<double>(rows_half[1]) : 0.0;
  out.entropy = out.entropy_tv + out.entropy_vt;
  out.causal = false;
  return out;
}

std::vector<int64_t> RefGlobalHeadBudgets(const std::vector<std::vector<double>>& scores, int64_t kv_heads,
                                          int64_t tokens, double rho, int64_t forced) {
  const int64_t layers = static_cast<int64_t>(scores.size()), heads = layers * kv_heads;
  struct Slot {
    double score;
    int64_t head, token;
  };
  std::vector<Slot> slots;
  for (int64_t l = 0; l < layers; ++l) {
    for (int64_t h = 0; h < kv_heads; ++h) {
      for (int64_t t = forced; t < tokens; ++t) slots.push_back({scores[l][h * tokens + t], l * kv_heads + h, t});
    }
  }
  std::stable_sort(slots.begin(), slots.end(), [](const Slot& a, const Slot& b) { return a.score > b.score; });
  const int64_t total = std::clamp<int64_t>(static_cast<int64_t>(std::floor(rho * heads * tokens + 0.5)),
                                            heads * forced, heads * tokens);
  std::vector<int64_t> count(heads, forced);
  for (int64_t i = 0; i < total - heads * forced; ++i) ++count[slots[i].head];
  return count;
}

std::vector<double> RefVisibleMean(const std::vector<double>& scores, const std::vector<int32_t>& positions,
                                   int64_t kv_heads, int64_t tokens, int64_t group) {
  std::vector<double> out(scores.size(), 0.0);
  for (int64_t t = 0; t < tokens; ++t) {
    int64_t rows = 0;
    for (int32_t p : positions) rows += p >= t ? 1 : 0;
    for (int64_t h = 0; h < kv_heads; ++h) {
      out[h * tokens + t] = rows == 0 ? 0.0 : scores[h * tokens + t] / static_cast<double>(group * rows);
    }
  }
  return out;
}

std::vector<int64_t> RefMassBudgets(const std::vector<std::vector<double>>& scores, int64_t kv_heads,
                                    int64_t tokens, double rho, double alpha_min, double alpha_max) {
  const int64_t layers = static_cast<int64_t>(scores.size());
  const int64_t lo = std::clamp<int64_t>(static_cast<int64_t>(std::ceil(alpha_min * tokens)), 1, tokens);
  const int64_t hi = std::max<int64_t>(lo, std::min<int64_t>(tokens, static_cast<int64_t>(std::floor(alpha_max * tokens))));
  const int64_t n = std::clamp<int64_t>(RoundHalfUp(rho * layers * tokens), layers * lo, layers * hi);
  // gain[l][k]: mean over heads of the head's (k+1)-th largest score over its sum.
  std::vector<std::vector<double>> gain(layers, std::vector<double>(tokens, 0.0));
  for (int64_t l = 0; l < layers; ++l) {
    for (int64_t h = 0; h < kv_heads; ++h) {
      std::vector<double> s(scores[l].begin() + h * tokens, scores[l].begin() + (h + 1) * tokens);
      const double sum = std::accumulate(s.begin(), s.end(), 0.0);
      if (sum <= 0.0) continue;
      std::sort(s.begin(), s.end(), [](double a, double b) { return a > b; });
      for (int64_t k = 0; k < tokens; ++k) gain[l][k] += s[k] / sum / static_cast<double>(kv_heads);
    }
  }
  std::vector<int64_t> budget(layers, lo);
  for (int64_t given = layers * lo; given < n; ++given) {
    int64_t best = -1;
    for (int64_t l = 0; l < layers; ++l) {
      if (budget[l] >= hi) continue;
      if (best < 0 || gain[l][budget[l]] > gain[best][budget[best]] ||
          (gain[l][budget[l]] == gain[best][budget[best]] && budget[l] < budget[best])) {
        best = l;
      }
    }
    ++budget[best];
  }
  return budget;
}

std::vector<int64_t> RefDepthBudgets(int64_t layers, int64_t tokens, double rho, double ratio) {
  const int64_t c = std::clamp<int64_t>(RoundHalfUp(rho * tokens), 1, tokens);
  std::vector<double> w(layers, 1.0);
  if (layers > 1) {
    for (int64_t l = 0; l < layers; ++l) {
      w[l] = ratio + (1.0 / ratio - ratio) * l / static_cast<double>(layers - 1);
    }
  }
  const double sum = std::accumulate(w.begin(), w.end(), 0.0);
  std::vector<double> x(layers);
  std::vector<int64_t> budget(layers);
  int64_t total = 0;
  for (int64_t l = 0; l < layers; ++l) {
    x[l] = std::clamp(static_cast<double>(layers * c) * w[l] / sum, 1.0, static_cast<double>(tokens));
    budget[l] = static_cast<int64_t>(std::floor(x[l]));
    total += budget[l];
  }
  // The fractional parts decide the order once; a layer at T is passed over.
  std::vector<int64_t> order(layers);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return x[a] - std::floor(x[a]) > x[b] - std::floor(x[b]); });
  for (bool progress = true; total < layers * c && progress;) {
    progress = false;
    for (int64_t l : order) {
      if (total == layers * c) break;
      if (budget[l] < tokens) {
        ++budget[l];
        ++total;
        progress = true;
      }
    }
  }
  return budget;
}

std::vector<int32_t> RefRecentSearch(const std::vector<double>& scores, const std::vector<double>& recent,
                                     const std::vector<uint8_t>& modality, int64_t kv_heads, int64_t tokens,
                                     int64_t budget, const std::vector<double>& fractions,
                                     TextPrior text_prior, bool shared) {
  std::vector<int32_t> best(kv_heads * budget, -1);
  std::vector<double> best_held(kv_heads, -1.0);
  for (double f : fractions) {
    const std::vector<int32_t> kept =
        RefSelect(scores, modality, kv_heads, tokens, budget, f, text_prior, shared);
    std::vector<double> held(kv_heads, 0.0);
    for (int64_t h = 0; h < kv_heads; ++h) {
      for (int64_t k = 0; k < budget; ++k) held[h] += recent[h * tokens + kept[h * budget + k]];
    }
    if (shared) std::fill(held.begin(), held.end(), std::accumulate(held.begin(), held.end(), 0.0));
    for (int64_t h = 0; h < kv_heads; ++h) {
      if (held[h] > best_held[h]) {
        best_held[h] = held[h];
        std::copy(kept.begin() + h * budget, kept.begin() + (h + 1) * budget, best.begin() + h * budget);
      }
    }
  }
  return best;
}

RefBudgetResult RefBudgets(const std::vector<double>& entropies, int64_t tokens, double rho,
                           double tau, double alpha_min, double alpha_max, bool exact_total) {
  const int64_t layers = static_cast<int64_t>(entropies.size());
  const double big_l = static_cast<double>(layers);
  const double big_t = static_cast<double>(tokens);

  // w_l = softmax_l(E_l / tau).
  std::vector<double> scaled(entropies.size());
  for (size_t l = 0; l < entropies.size(); ++l) scaled[l] = entropies[l] / tau;
  const std::vector<double> w = Softmax(scaled);

  RefBudgetResult out;
  out.alpha.resize(entropies.size());
  out.budget.resize(entropies.size());
  for (int64_t l = 0; l < layers; ++l) {
    out.alpha[l] = std::clamp(w[l] * big_l * rho, alpha_min, alpha_max);
  }

  if (!exact_total) {
    for (int64_t l = 0; l < layers; ++l) {
      const auto b = static_cast<int64_t>(std::floor(out.alpha[l] * big_t));
      out.budget[l] = std::clamp<int64_t>(b, 1, tokens);
    }
    return out;
  }

  // lo, hi and the target n.
  int64_t lo = std::max<int64_t>(1, static_cast<int64_t>(std::ceil(alpha_min * big_t)));
  lo = std::min(lo, tokens);
  int64_t hi = std::min(tokens, static_cast<int64_t>(std::floor(alpha_max * big_t)));
  hi = std::max(hi, lo);  // alpha_max * T below lo: every layer gets lo
  const int64_t n = std::clamp(RoundHalfUp(rho * big_l * big_t), layers * lo, layers * hi);

  // Solve sum_l clip(lambda * a_l, lo, hi) = n with a_l = w_l * T. The total
  // is piecewise linear and nondecreasing in lambda, with breakpoints lo / a_l
  // and hi / a_l; find the segment where it reaches n and solve on it.
  const double dlo = static_cast<double>(lo);
  const double dhi = static_cast<double>(hi);
  std::vector<double> a(entropies.size());
  for (int64_t l = 0; l < layers; ++l) a[l] = w[l] * big_t;
  auto total = [&](double lambda) {
    double s = 0.0;
    for (int64_t l = 0; l < layers; ++l) s += std::clamp(lambda * a[l], dlo, dhi);
    return s;
  };
  std::vector<double> x(entropies.size(), dlo);
  if (n == layers * hi) {
    std::fill(x.begin(), x.end(), dhi);
  } else if (n > layers * lo) {
    std::vector<double> breaks;
    for (int64_t l = 0; l < layers; ++l) {
      if (a[l] > 0.0) {
        breaks.push_back(dlo / a[l]);
        breaks.push_back(dhi / a[l]);
      }
    }
    std::sort(breaks.begin(), breaks.end());
    double prev = 0.0;
    double end = std::numeric_limits<double>::infinity();
    for (double b : breaks) {
      if (total(b) >= static_cast<double>(n)) {
        end = b;
        break;
      }
      prev = b;
    }
    // On (prev, end) each layer is below lo, inside, or above hi throughout.
    double fixed = 0.0;
    double slope = 0.0;
    for (int64_t l = 0; l < layers; ++l) {
      if (a[l] <= 0.0 || dlo / a[l] >= end) {
        fixed += dlo;
      } else if (dhi / a[l] <= prev) {
        fixed += dhi;
      } else {
        slope += a[l];
      }
    }
    const double lambda = slope > 0.0 ? (static_cast<double>(n) - fixed) / slope : end;
    for (int64_t l = 0; l < layers; ++l) x[l] = std::clamp(lambda * a[l], dlo, dhi);
  }

  // Floor each term, then one token each to the largest fractional parts
  // (ties: the lower layer), never above hi.
  int64_t sum = 0;
  std::vector<double> frac(entropies.size());
  for (int64_t l = 0; l < layers; ++l) {
    out.budget[l] = static_cast<int64_t>(std::floor(x[l]));
    frac[l] = x[l] - std::floor(x[l]);
    sum += out.budget[l];
  }
  std::vector<int64_t> order(entropies.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t p, int64_t q) { return frac[p] > frac[q]; });
  int64_t missing = n - sum;
  for (int64_t l : order) {
    if (missing <= 0) break;
    if (out.budget[l] < hi) {
      ++out.budget[l];
      --missing;
    }
  }
  return out;
}

std::vector<int32_t> RefSelect(const std::vector<double>& scores,
                               const std::vector<uint8_t>& modality, int64_t kv_heads,
                               int64_t tokens, int64_t budget, double recent_fraction,
                               TextPrior text_prior, bool shared) {
  const int64_t recent = std::clamp<int64_t>(
      RoundHalfUp(recent_fraction * static_cast<double>(budget)), 0, budget);

  // One head's kept set from its scores [tokens].
  auto select_one = [&](std::vector<double> s) {
    if (text_prior == TextPrior::kAdditive) {
      const double mx = *std::max_element(s.begin(), s.end());
      for (int64_t t = 0; t < tokens; ++t) {
        if (modality[t] == 0) s[t] += mx;
      }
    }
    struct Candidate {
      int cls;
      double score;
      int64_t pos;
    };
    std::vector<Candidate> rest;
    for (int64_t t = 0; t < tokens - recent; ++t) {
      const int cls = text_prior == TextPrior::kKeepAllText && modality[t] == 0 ? 1 : 0;
      rest.push_back({cls, s[t], t});
    }
    std::sort(rest.begin(), rest.end(), [](const Candidate& a, const Candidate& b) {
      if (a.cls != b.cls) return a.cls > b.cls;
      if (a.score != b.score) return a.score > b.score;
      return a.pos > b.pos;
    });
    std::vector<int32_t> kept;
    for (int64_t r = 0; r < budget - recent; ++r) kept.push_back(static_cast<int32_t>(rest[r].pos));
    for (int64_t t = tokens - recent; t < tokens; ++t) kept.push_back(static_cast<int32_t>(t));
    std::sort(kept.begin(), kept.end());
    return kept;
  };

  std::vector<int32_t> out;
  out.reserve(static_cast<size_t>(kv_heads * budget));
  if (shared) {
    std::vector<double> sum(static_cast<size_t>(tokens), 0.0);
    for (int64_t h = 0; h < kv_heads; ++h) {
      for (int64_t t = 0; t < tokens; ++t) sum[t] += scores[h * tokens + t];
    }
    const std::vector<int32_t> kept = select_one(sum);
    for (int64_t h = 0; h < kv_heads; ++h) out.insert(out.end(), kept.begin(), kept.end());
  } else {
    for (int64_t h = 0; h < kv_heads; ++h) {
      const std::vector<double> s(scores.begin() + h * tokens, scores.begin() + (h + 1) * tokens);
      const std::vector<int32_t> kept = select_one(s);
      out.insert(out.end(), kept.begin(), kept.end());
    }
  }
  return out;
}

RefMerged RefMerge(const TensorView& key, const TensorView& value,
                   const std::vector<int32_t>& kept, int64_t budget, MergeMode mode,
                   MergeThreshold threshold) {
  const int64_t heads = key.heads;
  const int64_t tokens = key.tokens;
  const int64_t head_dim = key.head_dim;
  const std::vector<double> k = ReadHnd(key);    // [heads, tokens, head_dim]
  const std::vector<double> v = ReadHnd(value);  // [heads, tokens, head_dim]
  auto kvec = [&](int64_t h, int64_t t) { return &k[(h * tokens + t) * head_dim]; };
  auto vvec = [&](int64_t h, int64_t t) { return &v[(h * tokens + t) * head_dim]; };
  auto cosine = [&](const double* a, const double* b) {
    double dot = 0.0, na = 0.0, nb = 0.0;
    for (int64_t d = 0; d < head_dim; ++d) {
      dot += a[d] * b[d];
      na += a[d] * a[d];
      nb += b[d] * b[d];
    }
    if (na == 0.0 || nb == 0.0) return 0.0;  // a zero vector has cosine 0 with anything
    return dot / (std::sqrt(na) * std::sqrt(nb));
  };

  // For every head and token: evicted or not, its target (index into the
  // head's kept list) and the best cosine.
  std::vector<char> evicted(static_cast<size_t>(heads * tokens), 1);
  std::vector<int64_t> target(static_cast<size_t>(heads * tokens), -1);
  std::vector<double> best(static_cast<size_t>(heads * tokens), 0.0);
  for (int64_t h = 0; h < heads; ++h) {
    const int32_t* kh = &kept[h * budget];
    for (int64_t jj = 0; jj < budget; ++jj) evicted[h * tokens + kh[jj]] = 0;
    for (int64_t e = 0; e < tokens; ++e) {
      if (!evicted[h * tokens + e]) continue;
      int64_t best_j = -1;
      double best_cos = 0.0;
      for (int64_t jj = 0; jj < budget; ++jj) {
        const double c = cosine(kvec(h, e), kvec(h, kh[jj]));
        if (best_j < 0 || c > best_cos) {  // strict: ties keep the lower kept index
          best_j = jj;
          best_cos = c;
        }
      }
      target[h * tokens + e] = best_j;
      best[h * tokens + e] = best_cos;
    }
  }

  // Which evicted tokens merge: all, or (MEAN) those whose best cosine,
  // averaged over the heads that evict them, is at least the mean of those
  // averages over every token evicted somewhere.
  std::vector<char> merge_token(static_cast<size_t>(tokens), 1);
  if (threshold == MergeThreshold::kMean) {
    std::vector<double> avg(static_cast<size_t>(tokens), 0.0);
    std::vector<int64_t> count(static_cast<size_t>(tokens), 0);
    for (int64_t t = 0; t < tokens; ++t) {
      for (int64_t h = 0; h < heads; ++h) {
        if (evicted[h * tokens + t]) {
          avg[t] += best[h * tokens + t];
          ++count[t];
        }
      }
    }
    double mean = 0.0;
    int64_t n = 0;
    for (int64_t t = 0; t < tokens; ++t) {
      if (count[t] > 0) {
        avg[t] /= static_cast<double>(count[t]);
        mean += avg[t];
        ++n;
      }
    }
    if (n > 0) mean /= static_cast<double>(n);
    for (int64_t t = 0; t < tokens; ++t) merge_token[t] = count[t] > 0 && avg[t] >= mean;
  }

  RefMerged out;
  out.keys.assign(static_cast<size_t>(heads * budget * head_dim), 0.0);
  out.values.assign(static_cast<size_t>(heads * budget * head_dim), 0.0);
  for (int64_t h = 0; h < heads; ++h) {
    const int32_t* kh = &kept[h * budget];
    for (int64_t jj = 0; jj < budget; ++jj) {
      const int64_t j = kh[jj];
      const double* kj = kvec(h, j);
      const double* vj = vvec(h, j);
      std::vector<double> sum_k(static_cast<size_t>(head_dim), 0.0);
      std::vector<double> sum_v(static_cast<size_t>(head_dim), 0.0);
      int64_t merged = 0;
      if (mode != MergeMode::kNone) {
        for (int64_t e = 0; e < tokens; ++e) {
          if (!evicted[h * tokens + e] || target[h * tokens + e] != jj || !merge_token[e]) continue;
          ++merged;
          const double c = best[h * tokens + e];
          const double* ke = kvec(h, e);
          const double* ve = vvec(h, e);
          for (int64_t d = 0; d < head_dim; ++d) {
            switch (mode) {
              case MergeMode::kAverage:
                sum_k[d] += ke[d];
                sum_v[d] += ve[d];
                break;
              case MergeMode::kPivotal:
                sum_k[d] += (ke[d] + kj[d]) / 2.0;
                sum_v[d] += (ve[d] + vj[d]) / 2.0;
                break;
              case MergeMode::kWeighted:
                sum_k[d] += c * ke[d];
                sum_v[d] += c * ve[d];
                break;
              case MergeMode::kNone:
                break;
            }
          }
        }
      }
      for (int64_t d = 0; d < head_dim; ++d) {
        const size_t o = static_cast<size_t>((h * budget + jj) * head_dim + d);
        out.keys[o] = (kj[d] + sum_k[d]) / (1.0 + static_cast<double>(merged));
        out.values[o] = (vj[d] + sum_v[d]) / (1.0 + static_cast<double>(merged));
      }
    }
  }
  return out;
}

}  // namespace medakv::reference
