// The compute backend of the compression ops, chosen at run time
// (--backend=auto|cpu|cuda). The CPU backend is always built.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/ops/op_args.h"

namespace medakv {

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string_view Name() const = 0;
  // How many layers the pipeline may run through the statistics ops at once.
  // 1 (the CPU backend: its ops use every core already); more where calls
  // on different threads overlap, so that one layer's copy to the device
  // runs while another's kernels do (the CUDA backend: a stream per call).
  virtual int ConcurrentLayers() const { return 1; }

  [[nodiscard]] virtual absl::Status AttentionStats(const AttentionStatsArgs& args,
                                                    AttentionStatsOutput* out) const = 0;
  [[nodiscard]] virtual absl::Status ReduceScores(const float* scores,  // [score_heads, tokens]
                                                  int64_t score_heads, int64_t kv_heads, int64_t tokens,
                                                  float* out /* [kv_heads, tokens] */) const = 0;
  [[nodiscard]] virtual absl::Status PoolScores(const float* in,  // [heads, tokens]
                                                int64_t heads, int64_t tokens, int64_t length, int64_t kernel,
                                                float* out /* [heads, tokens] */) const = 0;
  [[nodiscard]] virtual absl::Status SelectTokens(const SelectArgs& args,
                                                  int32_t* kept /* [kv_heads, budget] */) const = 0;
  [[nodiscard]] virtual absl::Status MergeAndGather(const MergeArgs& args, MutableTensorView out_key,
                                                    MutableTensorView out_value) const = 0;
};

// The CPU backend (multi-threaded with OpenMP where built with it).
std::unique_ptr<Backend> MakeCpuBackend();

// The CUDA backend on the current device (kernels/cuda). FAILED_PRECONDITION
// when this binary was built without CUDA; a CUDA error when the device
// cannot be used.
[[nodiscard]] absl::StatusOr<std::unique_ptr<Backend>> MakeCudaBackend();

// --backend=auto|cpu|cuda. auto takes CUDA only when a device answers (and
// the CUDA backend is built); cuda without a device is FAILED_PRECONDITION.
// `why`, when given, receives a line for the log saying what was chosen.
[[nodiscard]] absl::StatusOr<std::unique_ptr<Backend>> MakeBackend(std::string_view name,
                                                                   std::string* why = nullptr);

}  // namespace medakv
