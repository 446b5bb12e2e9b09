// One prompt's cache through a policy: statistics per layer, budgets across
// layers, then selection, merging and compaction per layer (ALGORITHM.md).
#pragma once

#include <atomic>
#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/backend.h"
#include "kernels/common/tensor.h"
#include "service/compress/options.h"

namespace medakv {

enum class StatsForm : uint8_t {
  kQueries = 0,      // the worker sends queries; the service computes statistics
  kPrecomputed = 1,  // the worker sends accumulated attention and the entropy
};

struct LayerInput {
  TensorView key;    // [kv_heads, tokens, head_dim]
  TensorView value;  // [kv_heads, tokens, head_dim]
  // kQueries:
  TensorView query;                      // [q_heads, q_tokens, head_dim], same dtype and layout as key
  std::vector<int32_t> query_positions;  // [q_tokens]; empty means the last q_tokens positions
  // kPrecomputed:
  const float* scores = nullptr;  // [score_heads, tokens], score_heads = kv_heads or q_heads
  int64_t score_heads = 0;
  float entropy = 0.f;
};

struct CacheInput {
  int64_t kv_heads = 0;
  int64_t q_heads = 0;
  int64_t head_dim = 0;
  int64_t tokens = 0;
  DType dtype = DType::kFloat16;
  Layout layout = Layout::kHND;
  std::vector<uint8_t> modality;  // [tokens], 0 text, 1 visual; empty means all text
  StatsForm stats = StatsForm::kQueries;
  std::vector<LayerInput> layers;  // one per layer
};

struct LayerResult {
  std::vector<uint8_t> key;        // [kv_heads, budget, head_dim] in the input dtype and layout
  std::vector<uint8_t> value;      // [kv_heads, budget, head_dim]
  std::vector<int32_t> positions;  // [kv_heads, budget], ascending per head
  float entropy = 0.f;             // E_l
  double alpha = 1.0;              // alpha_l
  int64_t budget = 0;              // B_l
};

struct StageSeconds {
  double statistics = 0.0;
  double allocate = 0.0;
  double select_merge = 0.0;
};

struct CompressResult {
  std::vector<LayerResult> layers;
  StageSeconds seconds;
  int64_t tokens_in = 0;    // layers x tokens
  int64_t tokens_kept = 0;  // sum of budgets
};

// Rejects any inconsistent input with InvalidArgument naming the field,
// before any output memory is reserved.
[[nodiscard]] absl::Status ValidateCacheInput(const CacheInput& input);

// `cancelled`, when given, is polled between layers: once it reads true the
// call returns CANCELLED and frees what it allocated.
[[nodiscard]] absl::StatusOr<CompressResult> Compress(const CacheInput& input, const CompressOptions& options,
                                                      const Backend& backend,
                                                      const std::atomic<bool>* cancelled = nullptr);

// Expands (start, length) spans of visual tokens into a modality vector.
struct ModalitySpan {
  int64_t start = 0;
  int64_t length = 0;
  Modality modality = Modality::kVisual;
};
[[nodiscard]] absl::StatusOr<std::vector<uint8_t>> ModalityFromSpans(int64_t tokens,
                                                                     const std::vector<ModalitySpan>& spans);

}  // namespace medakv
