// Layer budget allocation (ALGORITHM.md, MEDA step 2). Tiny, host-only; the
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

// rho in (0, 1], tau finite > 0, 0 <= alpha_min <= alpha_max, alpha_max in (0, 1].
[[nodiscard]] absl::Status ValidateBudgetOptions(const BudgetOptions& options);

// Entropy-guided budgets for `entropy.size()` layers of `tokens` tokens each.
[[nodiscard]] absl::StatusOr<LayerBudgets> AllocateEntropyBudgets(absl::Span<const float> entropy,
                                                                  int64_t tokens,
                                                                  const BudgetOptions& options);

// Target total of the exact rule: round(rho * L * T).
int64_t TargetTotal(double rho, int64_t layers, int64_t tokens);

}  // namespace medakv
