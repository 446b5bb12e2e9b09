// The medakv cache file format over safetensors (see README "File format").
//
// Input tensors, per layer l (dims in the file's layout, HND shown):
//   layer.{l}.key, layer.{l}.value   [kv_heads, tokens, head_dim]   F16 | BF16 | F32
//   either layer.{l}.query           [q_heads, q_tokens, head_dim]  same dtype
//          layer.{l}.query_positions [q_tokens] I32 (optional; default the last q_tokens)
//          layer.{l}.query_outside_lse [q_heads, q_tokens] F32 (optional; each
//                                    row's log-sum-exp outside the cache)
//   or     layer.{l}.scores          [kv_heads or q_heads, tokens] F32
//          layer.{l}.entropy         [1] F32
//   modality                         [tokens] U8, 0 text 1 visual (optional: all text)
// With NHD the key/value dims are [tokens, kv_heads, head_dim] and the query
// dims [q_tokens, q_heads, head_dim].
// Output tensors, per layer: layer.{l}.key / .value [kv_heads, kept, head_dim]
// (input dtype and layout), layer.{l}.positions I32 [kv_heads, kept],
// layer.{l}.entropy F32 [1], layer.{l}.alpha F32 [1], layer.{l}.budget I32 [1].
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "client/io/safetensors.h"
#include "service/compress/pipeline.h"

namespace medakv {

// The safetensors element type of a key/value/query dtype (F16, BF16, F32).
safetensors::ElementType ElementTypeOf(DType dtype);

// A CacheInput whose views point into an open file (or into aligned copies
// of tensors whose bytes are not aligned to their element size).
struct LoadedCache {
  explicit LoadedCache(safetensors::File f) : file(std::move(f)) {}
  safetensors::File file;
  CacheInput input;
  std::vector<std::vector<float>> scores;              // [layers][score_heads * tokens]
  std::vector<std::unique_ptr<uint8_t[]>> aligned;     // copies of unaligned tensors
};

// Reads and checks every tensor; errors name the tensor and what was expected.
[[nodiscard]] absl::StatusOr<std::unique_ptr<LoadedCache>> LoadCache(safetensors::File file, Layout layout);

// Writes the compressed cache; `metadata` goes into __metadata__. Only the
// shape fields of `input` are used (kv_heads, head_dim, dtype, layout).
// result.layers[i] is written as layer.{first_layer + i}.
[[nodiscard]] absl::Status WriteCompressed(const CompressResult& result, const CacheInput& input,
                                           const std::vector<std::pair<std::string, std::string>>& metadata,
                                           const std::string& path, int64_t first_layer = 0);

}  // namespace medakv
