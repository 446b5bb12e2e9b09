#include "kernels/backend.h"
#include "kernels/cpu/ops.h"

namespace medakv {
namespace {

class CpuBackend final : public Backend {
 public:
  std::string_view Name() const override { return "cpu"; }
  absl::Status AttentionStats(const AttentionStatsArgs& args, AttentionStatsOutput* out) const override {
    return cpu::AttentionStats(args, out);
  }
  absl::Status ReduceScores(const float* scores, int64_t score_heads, int64_t kv_heads, int64_t tokens,
                            float* out) const override {
    return cpu::ReduceScores(scores, score_heads, kv_heads, tokens, out);
  }
  absl::Status PoolScores(const float* in, int64_t heads, int64_t tokens, int64_t length, int64_t kernel,
                          float* out) const override {
    return cpu::PoolScores(in, heads, tokens, length, kernel, out);
  }
  absl::Status SelectTokens(const SelectArgs& args, int32_t* kept) const override {
    return cpu::SelectTokens(args, kept);
  }
  absl::Status MergeAndGather(const MergeArgs& args, MutableTensorView out_key,
                              MutableTensorView out_value) const override {
    return cpu::MergeAndGather(args, out_key, out_value);
  }
};

}  // namespace

std::unique_ptr<Backend> MakeCpuBackend() { return std::make_unique<CpuBackend>(); }

}  // namespace medakv
