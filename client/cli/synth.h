// `medakv synth`: a synthetic multimodal cache with the structure that makes
// compression policies differ: heavy-hitter keys that queries align with,
// visual tokens clustered around a few centres (so that merging has near
// duplicates to absorb), and text around them.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "kernels/common/tensor.h"
#include "service/compress/pipeline.h"

namespace medakv {

struct SynthOptions {
  int64_t layers = 4;
  int64_t kv_heads = 2;
  int64_t q_heads = 8;
  int64_t tokens = 1024;
  int64_t head_dim = 64;
  int64_t q_tokens = 64;
  DType dtype = DType::kFloat16;
  Layout layout = Layout::kHND;
  std::vector<ModalitySpan> visual;  // empty: one image over tokens [10%, 70%)
  bool text_only = false;
  bool precomputed = false;  // write scores and entropy (computed here) instead of queries
  uint64_t seed = 0;
};

[[nodiscard]] absl::Status WriteSynthCache(const SynthOptions& options, const std::string& path);

}  // namespace medakv
