// A naive double-precision implementation of docs/algorithm.md (the
// compression ops of MEDA and the baselines), written for clarity and as an
// independent second reading of the contract. Plain loops; whole attention
// matrices are materialised; nothing here is meant to be fast.
//
// It uses only kernels/common (dtype conversions and tensor views) and the
// enumerations of kernels/ops/options.h, never the math headers, so that the
// tests compare two separate readings of the text.
//
// Every input element is read exactly (fp16/bf16/fp32 -> fp32 is exact) and
// all arithmetic is in double.
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/common/tensor.h"
#include "kernels/ops/options.h"

namespace medakv::reference {

// The value of element (head, token, d) of a view, as a double.
double ReadElement(const TensorView& view, int64_t head, int64_t token, int64_t d);

// All elements of a view in HND order [heads, tokens, head_dim], as doubles.
std::vector<double> ReadHnd(const TensorView& view);

// The last `q_tokens` positions of a cache of `tokens` tokens:
// tokens - q_tokens, ..., tokens - 1 (the default query positions).
std::vector<int32_t> DefaultPositions(int64_t q_tokens, int64_t tokens);

// Round half up: floor(x + 0.5) (docs/algorithm.md, "Rounding").
int64_t RoundHalfUp(double x);

// Entropy -sum p log p of a probability vector (0 log 0 = 0).
double Entropy(const std::vector<double>& p);

struct RefStats {
  std::vector<double> scores;  // [kv_heads, tokens]
  double entropy = 0.0;        // E_l
  double entropy_tv = 0.0;     // text rows over visual keys (0 when causal or no such row)
  double entropy_vt = 0.0;     // visual rows over text keys (0 when causal or no such row)
  bool causal = false;         // E_l computed as CAUSAL
};

// MEDA step 1 and the "Score s_t" bullet of step 3.
// query: [q_heads, q_tokens, head_dim]; positions: [q_tokens] (empty = the
// last q_tokens positions); key: [kv_heads, tokens, head_dim];
// modality: [tokens], 0 text, 1 visual. The modality of query row i is the
// modality of the token at its position. Only rows i >= score_rows_begin add
// to the scores (their sum, or with kMax their maximum, over those rows and
// the kv head's query heads); every row counts for the entropy.
// outside_lse: [q_heads, q_tokens] (empty: none), each row's log-sum-exp over
// keys outside the cache; a score's softmax denominator is then
// sum_j e^{logit_j} + e^{outside_lse} (the entropy's is not).
RefStats RefAttentionStats(const TensorView& query, const std::vector<int32_t>& positions,
                           const TensorView& key, const std::vector<uint8_t>& modality,
                           double scale, EntropyHeads entropy_heads,
                           EntropySource entropy_source, int64_t score_rows_begin,
                           ScoreAggregation aggregation = ScoreAggregation::kSum,
                           const std::vector<float>& outside_lse = {});

struct RefBudgetResult {
  std::vector<double> alpha;    // [layers] clamp(softmax(E / tau) * L * rho, alpha_min, alpha_max)
  std::vector<int64_t> budget;  // [layers] B_l
};

// MEDA step 2. With exact_total, the water-fill exactly as docs/algorithm.md
// writes it (lambda found analytically on the piecewise-linear total).
// Without it, B_l = clamp(floor(alpha_l * T), 1, T): a layer never gets 0
// tokens (the project's documented choice). Arguments are assumed valid.
RefBudgetResult RefBudgets(const std::vector<double>& entropies, int64_t tokens, double rho,
                           double tau, double alpha_min, double alpha_max, bool exact_total);

// amber's visible-mean scores (docs/amber.md): scores [kv_heads, tokens]
// (the accumulated attention, summed over the rows and the group's `group`
// heads) divided by group * (the number of rows whose position is >= t);
// 0 where no row sees t. positions: every query row's position.
std::vector<double> RefVisibleMean(const std::vector<double>& scores, const std::vector<int32_t>& positions,
                                   int64_t kv_heads, int64_t tokens, int64_t group);

// amber's mass budgets (docs/amber.md), as a sequential greedy: every layer
// starts at lo = max(1, ceil(alpha_min T)); then, one token at a time until
// the total is clamp(round(rho L T), L lo, L hi), the layer whose next token
// (its b-th largest normalised score, averaged over heads) is the largest
// gets it (ties: the layer with fewer tokens so far, then the lower layer),
// never above hi = min(T, floor(alpha_max T)).
// scores[l]: [kv_heads, tokens] >= 0.
std::vector<int64_t> RefMassBudgets(const std::vector<std::vector<double>>& scores, int64_t kv_heads,
                                    int64_t tokens, double rho, double alpha_min, double alpha_max);

// amber's global budgets (docs/amber.md): every (layer, head) keeps its first
// `forced` tokens; of the other slots (layer, head, token >= forced), sorted by
// score (largest first; equal scores in (layer, head, token) order), the
// first round(rho L H T) - L H forced are kept too. Returns the count per
// (layer, head), layer-major.
std::vector<int64_t> RefGlobalHeadBudgets(const std::vector<std::vector<double>>& scores, int64_t kv_heads,
                                          int64_t tokens, double rho, int64_t forced);

// amber's depth budgets (docs/amber.md): C = clamp(round(rho T), 1, T);
// weights w_l = r + (1/r - r) l / (L - 1) (all 1 when L = 1); shares
// x_l = L C w_l / sum(w), clipped to [1, T]; then, one token at a time, the
// layer with the largest remaining fraction (x_l minus what it has; ties: the
// lower layer) below T gets the next token, from floor(x_l) up to L C.
std::vector<int64_t> RefDepthBudgets(int64_t layers, int64_t tokens, double rho, double ratio);

// amber's recent search (docs/amber.md): for each fraction f in
// `fractions`, RefSelect with recent_fraction f; per head, the first f
// whose kept tokens have the largest sum of `recent` ([kv_heads, tokens]);
// with `shared`, the sum over heads decides for all heads.
std::vector<int32_t> RefRecentSearch(const std::vector<double>& scores, const std::vector<double>& recent,
                                     const std::vector<uint8_t>& modality, int64_t kv_heads, int64_t tokens,
                                     int64_t budget, const std::vector<double>& fractions,
                                     TextPrior text_prior, bool shared);

// MEDA step 3. scores: [kv_heads, tokens]; modality: [tokens].
// Returns kept positions [kv_heads, budget], ascending per head. With
// `shared`, the raw scores are summed over heads, the prior is applied to the
// sum, and every head gets the same set.
std::vector<int32_t> RefSelect(const std::vector<double>& scores,
                               const std::vector<uint8_t>& modality, int64_t kv_heads,
                               int64_t tokens, int64_t budget, double recent_fraction,
                               TextPrior text_prior, bool shared);

struct RefMerged {
  std::vector<double> keys;    // [kv_heads, budget, head_dim] (HND)
  std::vector<double> values;  // [kv_heads, budget, head_dim] (HND)
};

// MEDA step 4 and the LOOK-M merge rules. kept: [kv_heads, budget],
// ascending per head.
RefMerged RefMerge(const TensorView& key, const TensorView& value,
                   const std::vector<int32_t>& kept, int64_t budget, MergeMode mode,
                   MergeThreshold threshold);

}  // namespace medakv::reference
