// Layer budget allocation (docs/algorithm.md, MEDA step 2). Tiny, host-only; the
// CUDA backend calls it too, on entropies reduced on the device.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace medakv {

struct BudgetOptions {
  double rho = 0.2;  // fraction of the cache to keep, (0, 1]
  double tau = 1.0;  // softmax temperature, > 0
  double alpha_min = 0.01;
  double alpha_max = 1.0;
  bool exact_total = true;
};

struct LayerBudgets {
  std::vector<double> alpha;    // [layers] softmax(E/tau) * L * rho, clamped (the paper's alpha_l)
  std::vector<int64_t> budget;  // [layers] B_l in tokens
};

// The range of tau: beyond it the softmax of E / tau is already one-hot
// (below) or uniform (above) for any entropy a layer can have, and outside
// it E / tau may overflow.
inline constexpr double kMinTau = 1e-6;
inline constexpr double kMaxTau = 1e6;

// rho in (0, 1], tau in [kMinTau, kMaxTau], 0 <= alpha_min <= alpha_max,
// alpha_max in (0, 1].
[[nodiscard]] absl::Status ValidateBudgetOptions(const BudgetOptions& options);

// Entropy-guided budgets for `entropy.size()` layers of `tokens` tokens each.
[[nodiscard]] absl::StatusOr<LayerBudgets> AllocateEntropyBudgets(absl::Span<const float> entropy,
                                                                  int64_t tokens,
                                                                  const BudgetOptions& options);

// Budgets that keep the most score mass (amber's layer_budget mass,
// docs/amber.md). scores[l] is layer l's [kv_heads, tokens] non-negative
// scores. Each head's scores are normalised to sum 1 (a head whose scores
// sum to 0 counts as all zeros) and sorted from the largest; the gain of a
// layer's k-th token is the mean over its heads of their k-th normalised
// score. Every layer gets lo = max(1, ceil(alpha_min T)) tokens, and the
// rest of the exact total n = round(rho L T) (clamped to [L lo, L hi], hi =
// min(T, floor(alpha_max T))) goes to the largest gains of the tokens
// lo+1 .. hi of each layer (equal gains: the smaller rank k first, then the
// lower layer, so that equal layers get equal shares). As a layer's gains
// never grow with k, this split keeps the most mean normalised mass for the
// total. alpha_l = B_l / T. tau and exact_total are not used. INVALID_ARGUMENT
// for no layer, tokens <= 0, a scores vector of another size, or a negative
// or non-finite score.
[[nodiscard]] absl::StatusOr<LayerBudgets> AllocateMassBudgets(const std::vector<std::vector<float>>& scores,
                                                               int64_t kv_heads, int64_t tokens,
                                                               const BudgetOptions& options);

// Per-head budgets ranked across every layer and head (amber's layer_budget
// global, docs/amber.md). scores[l] is layer l's [kv_heads, tokens]
// non-negative scores. Every head keeps its first `forced` tokens (1 <=
// forced <= tokens); the rest of the total n = round(rho L H T) (at least
// L H forced) goes to the slots (layer, head, token >= forced) with the
// largest scores, equal scores taken in (layer, head, token) order. Returns
// [layers * kv_heads] counts (layer-major), each in [forced, tokens], summing
// to n. O(L H T) time with four counting passes over the scores (no copy).
// INVALID_ARGUMENT for no layer, tokens <= 0, kv_heads <= 0, forced outside
// [1, tokens], rho outside (0, 1], a scores vector of another size, or a
// negative or non-finite score.
[[nodiscard]] absl::StatusOr<std::vector<int64_t>> GlobalHeadBudgets(const std::vector<std::vector<float>>& scores,
                                                                     int64_t kv_heads, int64_t tokens, double rho,
                                                                     int64_t forced);

// Target total of the exact rule: round(rho * L * T).
int64_t TargetTotal(double rho, int64_t layers, int64_t tokens);

// The uniform budget of the baselines: round(rho * T) within [1, T].
int64_t UniformBudget(double rho, int64_t tokens);

// PyramidKV's budgets (its public implementation): with C the uniform budget
// and w the observation window, min = (C - w) / beta, max = 2 (C - w) - min
// (if max > T - w: max = T - w, min = 2 (C - w) - max); layer l keeps
// w + max - l (max - min) / (L - 1), rounded so that the total is exactly
// L * C (each within [1, T]). Uniform when C <= w or L = 1. beta in
// [kMinPyramidBeta, kMaxPyramidBeta] (below, min would overflow; above, the
// first layer's budget no longer changes).
inline constexpr double kMinPyramidBeta = 1e-3;
inline constexpr double kMaxPyramidBeta = 1e6;
[[nodiscard]] absl::StatusOr<std::vector<int64_t>> PyramidBudgets(int64_t layers, int64_t tokens, double rho,
                                                                  int64_t window, double beta);

// amber's depth budgets (docs/amber.md): with C the uniform budget
// round(rho T) (within [1, T]) and r = depth_ratio, layer l's weight is
// w_l = r + (1/r - r) l / (L - 1) (r in layer 0, 1/r in the last; 1 when
// L = 1), and its share C L w_l / sum(w), rounded so that the total is
// exactly L C (each within [1, T]). r = 1 is the uniform budget; r < 1 gives
// deeper layers more. INVALID_ARGUMENT for layers or tokens <= 0, rho outside
// (0, 1] or r not finite and > 0.
[[nodiscard]] absl::StatusOr<std::vector<int64_t>> DepthBudgets(int64_t layers, int64_t tokens, double rho,
                                                                double depth_ratio);

// Integer budgets from real shares: each share clipped to [lo, hi] and
// floored, then the tokens missing to `total` go one each to the largest
// fractional parts (ties: the lower layer), never above hi.
std::vector<int64_t> RoundSharesToTotal(const std::vector<double>& share, int64_t total, int64_t lo, int64_t hi);

}  // namespace medakv
