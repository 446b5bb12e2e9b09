#include "kernels/cpu/budget.h"

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <functional>
#include <limits>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "kernels/ops/budget_math.h"

namespace medakv {
namespace {

absl::Status ValidateInputs(absl::Span<const float> entropy, int64_t tokens) {
  if (entropy.empty()) return absl::InvalidArgumentError("budgets: no layers");
  if (tokens <= 0) return absl::InvalidArgumentError(absl::StrCat("budgets: tokens must be > 0, got ", tokens));
  for (size_t l = 0; l < entropy.size(); ++l) {
    if (!std::isfinite(entropy[l])) {
      return absl::InvalidArgumentError(absl::StrCat("entropy of layer ", l, " is not finite (", entropy[l], ")"));
    }
  }
  return absl::OkStatus();
}

// softmax(E / tau) in double, max-subtracted.
std::vector<double> SoftmaxWeights(absl::Span<const float> entropy, double tau) {
  std::vector<double> w(entropy.size());
  double max_e = -INFINITY;
  for (float e : entropy) max_e = std::max(max_e, static_cast<double>(e) / tau);
  double sum = 0.0;
  for (size_t l = 0; l < w.size(); ++l) {
    w[l] = std::exp(static_cast<double>(entropy[l]) / tau - max_e);
    sum += w[l];
  }
  for (double& x : w) x /= sum;
  return w;
}

// sum_l clip(lambda w_l T, lo, hi).
double FilledTotal(const std::vector<double>& w, double lambda, double tokens, double lo, double hi) {
  double total = 0.0;
  for (double wl : w) total += Clip(lambda * wl * tokens, lo, hi);
  return total;
}

}  // namespace

absl::Status ValidateBudgetOptions(const BudgetOptions& o) {
  if (!(o.rho > 0.0 && o.rho <= 1.0)) {
    return absl::InvalidArgumentError(absl::StrCat("rho must be in (0, 1], got ", o.rho));
  }
  if (!(o.tau >= kMinTau && o.tau <= kMaxTau)) {
    return absl::InvalidArgumentError(absl::StrCat("tau must be in [", kMinTau, ", ", kMaxTau, "], got ", o.tau));
  }
  if (!(o.alpha_min >= 0.0 && o.alpha_min <= 1.0)) {
    return absl::InvalidArgumentError(absl::StrCat("alpha_min must be in [0, 1], got ", o.alpha_min));
  }
  if (!(o.alpha_max > 0.0 && o.alpha_max <= 1.0)) {
    return absl::InvalidArgumentError(absl::StrCat("alpha_max must be in (0, 1], got ", o.alpha_max));
  }
  if (o.alpha_min > o.alpha_max) {
    return absl::InvalidArgumentError(absl::StrCat("alpha_min (", o.alpha_min,
                                                   ") must not exceed alpha_max (", o.alpha_max, ")"));
  }
  return absl::OkStatus();
}

std::vector<int64_t> RoundSharesToTotal(const std::vector<double>& share, int64_t total, int64_t lo, int64_t hi) {
  // Floor, then hand out the tokens still missing one each to the largest
  // fractional parts (ties: the lower layer), never above hi; an overshoot
  // (only from rounding in the caller's shares) is taken back from the
  // smallest fractions, never below lo.
  const int64_t layers = static_cast<int64_t>(share.size());
  std::vector<int64_t> budget(layers);
  std::vector<double> frac(layers);
  int64_t sum = 0;
  for (int64_t l = 0; l < layers; ++l) {
    const double s = Clip(share[l], static_cast<double>(lo), static_cast<double>(hi));
    budget[l] = static_cast<int64_t>(std::floor(s));
    frac[l] = s - static_cast<double>(budget[l]);
    sum += budget[l];
  }
  std::vector<int64_t> order(layers);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return frac[a] > frac[b]; });
  while (sum < total) {
    bool gave = false;
    for (int64_t l : order) {
      if (sum == total) break;
      if (budget[l] < hi) {
        ++budget[l];
        ++sum;
        gave = true;
      }
    }
    if (!gave) break;
  }
  while (sum > total) {
    bool took = false;
    for (auto it = order.rbegin(); it != order.rend() && sum > total; ++it) {
      if (budget[*it] > lo) {
        --budget[*it];
        --sum;
        took = true;
      }
    }
    if (!took) break;
  }
  return budget;
}

int64_t UniformBudget(double rho, int64_t tokens) {
  return std::clamp<int64_t>(RoundHalfUp(rho * static_cast<double>(tokens)), 1, tokens);
}

absl::StatusOr<std::vector<int64_t>> PyramidBudgets(int64_t layers, int64_t tokens, double rho, int64_t window,
                                                    double beta) {
  if (layers <= 0 || tokens <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("pyramid budgets: layers and tokens must be > 0, got ", layers, " and ", tokens));
  }
  if (!(rho > 0.0 && rho <= 1.0)) return absl::InvalidArgumentError(absl::StrCat("rho must be in (0, 1], got ", rho));
  if (window < 0) return absl::InvalidArgumentError(absl::StrCat("window must be >= 0, got ", window));
  if (!(beta >= kMinPyramidBeta && beta <= kMaxPyramidBeta)) {
    return absl::InvalidArgumentError(
        absl::StrCat("pyramid_beta must be in [", kMinPyramidBeta, ", ", kMaxPyramidBeta, "], got ", beta));
  }
  const int64_t uniform = UniformBudget(rho, tokens);
  const int64_t total = uniform * layers;
  const double c = static_cast<double>(uniform), w = static_cast<double>(std::min(window, tokens));
  if (c <= w || layers == 1) return std::vector<int64_t>(layers, uniform);
  double min_b = (c - w) / beta;
  double max_b = 2.0 * (c - w) - min_b;
  if (max_b > static_cast<double>(tokens) - w) {
    max_b = static_cast<double>(tokens) - w;
    min_b = 2.0 * (c - w) - max_b;
  }
  std::vector<double> share(layers);
  for (int64_t l = 0; l < layers; ++l) {
    share[l] = w + max_b - static_cast<double>(l) * (max_b - min_b) / static_cast<double>(layers - 1);
  }
  return RoundSharesToTotal(share, total, 1, tokens);
}

absl::StatusOr<std::vector<int64_t>> DepthBudgets(int64_t layers, int64_t tokens, double rho,
                                                  double depth_ratio) {
  if (layers <= 0 || tokens <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("depth budgets: layers and tokens must be > 0, got ", layers, " and ", tokens));
  }
  if (!(rho > 0.0 && rho <= 1.0)) return absl::InvalidArgumentError(absl::StrCat("rho must be in (0, 1], got ", rho));
  if (!(depth_ratio > 0.0) || !std::isfinite(depth_ratio)) {
    return absl::InvalidArgumentError(absl::StrCat("depth_ratio must be finite and > 0, got ", depth_ratio));
  }
  const int64_t uniform = UniformBudget(rho, tokens);
  if (layers == 1) return std::vector<int64_t>(1, uniform);
  std::vector<double> weight(layers);
  double sum = 0.0;
  for (int64_t l = 0; l < layers; ++l) {
    weight[l] = depth_ratio +
                (1.0 / depth_ratio - depth_ratio) * static_cast<double>(l) / static_cast<double>(layers - 1);
    sum += weight[l];
  }
  const double total = static_cast<double>(uniform * layers);
  std::vector<double> share(layers);
  for (int64_t l = 0; l < layers; ++l) share[l] = total * weight[l] / sum;
  return RoundSharesToTotal(share, uniform * layers, 1, tokens);
}

absl::StatusOr<LayerBudgets> AllocateMassBudgets(const std::vector<std::vector<float>>& scores, int64_t kv_heads,
                                                 int64_t tokens, const BudgetOptions& o) {
  if (absl::Status s = ValidateBudgetOptions(o); !s.ok()) return s;
  if (scores.empty()) return absl::InvalidArgumentError("budgets: no layers");
  if (tokens <= 0 || kv_heads <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("budgets: tokens and kv_heads must be > 0, got ", tokens, " and ", kv_heads));
  }
  const int64_t layers = static_cast<int64_t>(scores.size());
  const int64_t lo = BudgetLow(o.alpha_min, tokens);
  const int64_t hi = BudgetHigh(o.alpha_max, tokens, lo);
  const int64_t n = std::clamp<int64_t>(TargetTotal(o.rho, layers, tokens), layers * lo, layers * hi);
  // gain[l][k]: the mean over heads of their (k+1)-th largest normalised score.
  std::vector<std::vector<double>> gain(layers, std::vector<double>(tokens, 0.0));
  std::vector<double> sorted(tokens);
  for (int64_t l = 0; l < layers; ++l) {
    if (static_cast<int64_t>(scores[l].size()) != kv_heads * tokens) {
      return absl::InvalidArgumentError(absl::StrCat("budgets: layer ", l, " has ", scores[l].size(),
                                                     " scores, expected kv_heads x tokens = ", kv_heads * tokens));
    }
    for (int64_t h = 0; h < kv_heads; ++h) {
      double total = 0.0;
      for (int64_t t = 0; t < tokens; ++t) {
        const float s = scores[l][h * tokens + t];
        if (!(s >= 0.f) || !std::isfinite(s)) {
          return absl::InvalidArgumentError(
              absl::StrCat("budgets: layer ", l, " head ", h, " token ", t, ": score ", s, " (must be finite, >= 0)"));
        }
        sorted[t] = s;
        total += s;
      }
      if (total <= 0.0) continue;
      std::sort(sorted.begin(), sorted.end(), std::greater<double>());
      for (int64_t k = 0; k < tokens; ++k) gain[l][k] += sorted[k] / total / static_cast<double>(kv_heads);
    }
  }
  // The n - L lo largest gains of tokens lo+1 .. hi (0-based k in [lo, hi)),
  // in the order (gain descending, then k ascending, then layer ascending).
  // Each layer's gains do not increase with k (each head's sorted scores do
  // not, and rounding is monotone), so the chosen slots of a layer are a
  // prefix of its range, and the choice is found by counting, without a list
  // of all L (hi - lo) slots: the threshold gain g (the extra-th largest),
  // every slot above it, then the slots equal to it by k, then by layer.
  const int64_t extra = n - layers * lo;
  // Slots of layer l in [lo, hi) with gain > g (above) or >= g (at_least).
  auto above = [&](int64_t l, double g) {
    return std::partition_point(gain[l].begin() + lo, gain[l].begin() + hi, [g](double x) { return x > g; }) -
           (gain[l].begin() + lo);
  };
  auto at_least = [&](int64_t l, double g) {
    return std::partition_point(gain[l].begin() + lo, gain[l].begin() + hi, [g](double x) { return x >= g; }) -
           (gain[l].begin() + lo);
  };
  auto count_at_least = [&](double g) {
    int64_t c = 0;
    for (int64_t l = 0; l < layers; ++l) c += at_least(l, g);
    return c;
  };
  std::vector<int64_t> take(layers, 0);  // slots chosen per layer, beyond lo
  if (extra >= layers * (hi - lo)) {
    std::fill(take.begin(), take.end(), hi - lo);
  } else if (extra > 0) {
    // The largest g with count_at_least(g) >= extra: gains are >= 0, and the
    // bits of non-negative doubles order like their values.
    uint64_t lo_bits = 0, hi_bits = std::bit_cast<uint64_t>(std::numeric_limits<double>::infinity());
    while (lo_bits < hi_bits) {
      const uint64_t mid = lo_bits + (hi_bits - lo_bits + 1) / 2;
      if (count_at_least(std::bit_cast<double>(mid)) >= extra) {
        lo_bits = mid;
      } else {
        hi_bits = mid - 1;
      }
    }
    const double g = std::bit_cast<double>(lo_bits);
    int64_t taken = 0;
    for (int64_t l = 0; l < layers; ++l) {
      take[l] = above(l, g);
      taken += take[l];
    }
    // The rest among the slots equal to g: layer l's are k in [lo + take[l], lo + at_least(l, g)).
    int64_t rest = extra - taken;
    std::vector<int64_t> equal_end(layers);
    for (int64_t l = 0; l < layers; ++l) equal_end[l] = at_least(l, g);
    // By k ascending: whole columns of k while they fit, then the layers of the next one in order.
    auto equal_before = [&](int64_t k) {  // equal slots with offset < k
      int64_t c = 0;
      for (int64_t l = 0; l < layers; ++l) c += std::max<int64_t>(0, std::min(k, equal_end[l]) - take[l]);
      return c;
    };
    int64_t k_lo = 0, k_hi = hi - lo;  // the largest k with equal_before(k) <= rest
    while (k_lo < k_hi) {
      const int64_t mid = k_lo + (k_hi - k_lo + 1) / 2;
      if (equal_before(mid) <= rest) {
        k_lo = mid;
      } else {
        k_hi = mid - 1;
      }
    }
    rest -= equal_before(k_lo);
    for (int64_t l = 0; l < layers; ++l) {
      const int64_t end = std::max(take[l], std::min(k_lo, equal_end[l]));
      const bool one_more = rest > 0 && take[l] <= k_lo && k_lo < equal_end[l];
      take[l] = end;
      if (one_more) {
        ++take[l];
        --rest;
      }
    }
  }
  LayerBudgets out;
  out.budget.assign(layers, lo);
  for (int64_t l = 0; l < layers; ++l) out.budget[l] += take[l];
  out.alpha.resize(layers);
  for (int64_t l = 0; l < layers; ++l) out.alpha[l] = static_cast<double>(out.budget[l]) / static_cast<double>(tokens);
  return out;
}

absl::StatusOr<std::vector<int64_t>> GlobalHeadBudgets(const std::vector<std::vector<float>>& scores,
                                                       int64_t kv_heads, int64_t tokens, double rho, int64_t forced) {
  if (scores.empty()) return absl::InvalidArgumentError("budgets: no layers");
  if (tokens <= 0 || kv_heads <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("budgets: tokens and kv_heads must be > 0, got ", tokens, " and ", kv_heads));
  }
  if (forced < 1 || forced > tokens) {
    return absl::InvalidArgumentError(absl::StrCat("budgets: forced tokens must be in [1, ", tokens, "], got ", forced));
  }
  if (!(rho > 0.0 && rho <= 1.0)) return absl::InvalidArgumentError(absl::StrCat("rho must be in (0, 1], got ", rho));
  const int64_t layers = static_cast<int64_t>(scores.size()), heads = layers * kv_heads;
  for (int64_t l = 0; l < layers; ++l) {
    if (static_cast<int64_t>(scores[l].size()) != kv_heads * tokens) {
      return absl::InvalidArgumentError(absl::StrCat("budgets: layer ", l, " has ", scores[l].size(),
                                                     " scores, expected ", kv_heads * tokens));
    }
    for (float s : scores[l]) {
      if (!(s >= 0.f) || !std::isfinite(s)) {
        return absl::InvalidArgumentError(absl::StrCat("budgets: layer ", l, " has a score of ", s));
      }
    }
  }
  const int64_t total = std::clamp(RoundHalfUp(rho * static_cast<double>(heads) * static_cast<double>(tokens)),
                                   heads * forced, heads * tokens);
  std::vector<int64_t> count(heads, forced);
  int64_t need = total - heads * forced;
  if (need == 0) return count;
  // The need-th largest score's bit pattern (non-negative floats order as
  // their bits), a byte at a time: each pass counts the slots that agree with
  // the bytes found so far by their next byte.
  auto for_each_slot = [&](auto&& fn) {
    for (int64_t l = 0; l < layers; ++l) {
      for (int64_t h = 0; h < kv_heads; ++h) {
        const float* s = scores[l].data() + h * tokens;
        for (int64_t t = forced; t < tokens; ++t) {
          fn(l * kv_heads + h, s[t] == 0.f ? 0u : std::bit_cast<uint32_t>(s[t]));  // -0 as +0
        }
      }
    }
  };
  uint32_t prefix = 0, mask = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    std::array<int64_t, 256> hist{};
    for_each_slot([&](int64_t, uint32_t bits) {
      if ((bits & mask) == prefix) ++hist[(bits >> shift) & 0xffu];
    });
    int64_t above = 0;
    for (int b = 255; b >= 0; --b) {
      if (above + hist[b] >= need) {
        prefix |= static_cast<uint32_t>(b) << shift;
        mask |= 0xffu << shift;
        need -= above;
        break;
      }
      above += hist[b];
    }
  }
  // Every slot above the threshold, and `need` of those at it in slot order.
  for_each_slot([&](int64_t head, uint32_t bits) {
    if (bits > prefix || (bits == prefix && need > 0 && need--)) ++count[head];
  });
  return count;
}

int64_t TargetTotal(double rho, int64_t layers, int64_t tokens) {
  return RoundHalfUp(rho * static_cast<double>(layers) * static_cast<double>(tokens));
}

absl::StatusOr<LayerBudgets> AllocateEntropyBudgets(absl::Span<const float> entropy, int64_t tokens,
                                                    const BudgetOptions& o) {
  if (absl::Status s = ValidateBudgetOptions(o); !s.ok()) return s;
  if (absl::Status s = ValidateInputs(entropy, tokens); !s.ok()) return s;
  const int64_t layers = static_cast<int64_t>(entropy.size());
  const std::vector<double> w = SoftmaxWeights(entropy, o.tau);
  LayerBudgets out;
  out.alpha.resize(layers);
  out.budget.resize(layers);
  for (int64_t l = 0; l < layers; ++l) {
    out.alpha[l] = Clip(w[l] * static_cast<double>(layers) * o.rho, o.alpha_min, o.alpha_max);
  }
  if (!o.exact_total) {
    // The reference code's rule: clamp, then floor; never an empty layer.
    for (int64_t l = 0; l < layers; ++l) {
      const auto b = static_cast<int64_t>(std::floor(out.alpha[l] * static_cast<double>(tokens)));
      out.budget[l] = std::clamp<int64_t>(b, 1, tokens);
    }
    return out;
  }

  // Water-fill: find lambda with sum_l clip(lambda w_l T, lo, hi) = n.
  const int64_t lo = BudgetLow(o.alpha_min, tokens);
  const int64_t hi = BudgetHigh(o.alpha_max, tokens, lo);
  const int64_t n = std::clamp<int64_t>(TargetTotal(o.rho, layers, tokens), layers * lo, layers * hi);
  const double t = static_cast<double>(tokens);
  std::vector<double> share(layers);
  if (n == layers * lo || n == layers * hi) {
    std::fill(share.begin(), share.end(), static_cast<double>(n == layers * lo ? lo : hi));
  } else {
    // Bracket: f(0) = L lo <= n; grow the upper end until f >= n.
    double lambda_lo = 0.0, lambda_hi = 1.0;
    while (FilledTotal(w, lambda_hi, t, lo, hi) < static_cast<double>(n) && lambda_hi < 1e300) {
      lambda_hi *= 2.0;
    }
    for (int it = 0; it < 200; ++it) {
      const double mid = 0.5 * (lambda_lo + lambda_hi);
      if (FilledTotal(w, mid, t, lo, hi) < static_cast<double>(n)) {
        lambda_lo = mid;
      } else {
        lambda_hi = mid;
      }
    }
    for (int64_t l = 0; l < layers; ++l) share[l] = Clip(lambda_hi * w[l] * t, lo, hi);
  }

  out.budget = RoundSharesToTotal(share, n, lo, hi);
  return out;
}

}  // namespace medakv
