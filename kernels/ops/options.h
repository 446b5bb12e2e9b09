// Enumerations shared by the ops, the policies and the API (see docs/algorithm.md).
#pragma once

#include <cstdint>

namespace medakv {

enum class Modality : uint8_t { kText = 0, kVisual = 1 };

// How the query heads of a row are combined for the cross-modal entropy.
enum class EntropyHeads : uint8_t {
  kMeanAttention = 0,  // average the probabilities over heads, then the entropy (paper)
  kMeanEntropy = 1,    // entropy per head, then the mean
};

enum class EntropySource : uint8_t {
  kCrossModal = 0,  // text rows over visible visual keys and vice versa (paper Eqs. 4-6)
  kCausal = 1,      // ordinary causal attention, per head, mean over heads and rows
};

// How the attention a token receives from the scored rows and the query
// heads of its kv head's group becomes its score.
enum class ScoreAggregation : uint8_t {
  kSum = 0,  // the accumulated attention (H2O, MEDA)
  kMax = 1,  // the largest single probability: a token one row needs counts fully
};

enum class TextPrior : uint8_t {
  kAdditive = 0,     // s_t += max s for text tokens (paper Eq. 9)
  kKeepAllText = 1,  // every text token ranks above every visual token
  kNone = 2,
};

enum class MergeMode : uint8_t { kAverage = 0, kPivotal = 1, kWeighted = 2, kNone = 3 };

enum class MergeThreshold : uint8_t {
  kNone = 0,  // merge every evicted token (paper)
  kMean = 1,  // merge only tokens whose head-averaged best similarity >= the mean (reference code)
};

}  // namespace medakv
