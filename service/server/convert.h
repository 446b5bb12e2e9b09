// The server's adapter between the public API (medakv/v1/medakv.proto) and
// the domain types of the compression pipeline: request validation with
// messages that name the proto field, proto <-> domain conversions, and the
// byte sizes of the tensors a cache header announces.
//
// Every check here runs before the server reserves any memory for a request;
// nothing aborts on any input.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kernels/common/dtype.h"
#include "kernels/common/tensor.h"
#include "medakv/v1/medakv.pb.h"
#include "service/compress/options.h"
#include "service/compress/pipeline.h"

namespace medakv {

// ---- limits ------------------------------------------------------------------

inline constexpr int64_t kMaxLayers = 4096;
inline constexpr int64_t kMaxHeads = 4096;  // kv_heads, q_heads, score_heads
inline constexpr int64_t kMaxHeadDim = 4096;
// The pipeline (ValidateCacheInput) takes at most 2^24 tokens; a header that
// announces more is rejected up front rather than after the upload.
inline constexpr int64_t kMaxTokens = int64_t{1} << 24;
// Modality spans one header may carry (text and visual together).
inline constexpr int64_t kMaxModalitySpans = int64_t{1} << 16;
// Upper bound of the integer policy options (sinks, window, recent_search_rows;
// pool_kernel has its own, kMaxPoolKernel).
inline constexpr int64_t kMaxPolicyInt = INT32_MAX;
// Response chunks when the request leaves max_response_chunk_bytes at 0.
inline constexpr int64_t kDefaultChunkBytes = int64_t{4} << 20;

// ---- policy --------------------------------------------------------------------

// The policy's options: the oneof picks the policy (unset: meda), its
// DefaultOptions, then every field the request set (proto3 `optional` fields
// when present; enums other than *_UNSPECIFIED; rho when not 0). Every field
// is range-checked with its path ("policy.meda.tau must be a finite number
// > 0, got -1"), then ValidateOptions runs (its messages prefixed "policy: ").
// Errors are INVALID_ARGUMENT.
// A policy that names a preset (policy.preset) is INVALID_ARGUMENT here:
// PresetTable::Resolve (service/server/presets.h) resolves those.
[[nodiscard]] absl::StatusOr<CompressOptions> OptionsFromProto(const medakv::v1::Policy& policy);

// The proto Policy that OptionsFromProto turns back into exactly these options
// (every option of the policy set explicitly, rho included; no preset).
medakv::v1::Policy PolicyToProto(const CompressOptions& options);

// ---- cache description ---------------------------------------------------------

// Which statistics a cache carries with its keys and values.
enum class SpecStats : uint8_t {
  kNone = 0,         // keys and values only (stored caches; policies that need no statistics)
  kQueries = 1,      // query [+ query_positions] per layer
  kPrecomputed = 2,  // scores and entropy per layer
};

const char* SpecStatsName(SpecStats s);  // "none", "queries", "precomputed"

// Everything a Compress or PutCache header says about the tensors that follow.
struct CacheSpec {
  int64_t layers = 0;
  int64_t kv_heads = 0;
  int64_t q_heads = 0;  // a multiple of kv_heads; > 0 with kQueries, may be 0 otherwise
  int64_t head_dim = 0;
  int64_t tokens = 0;
  DType dtype = DType::kFloat16;
  Layout layout = Layout::kHND;
  // The visual tokens as spans, ascending and disjoint, at most
  // kMaxModalitySpans; tokens outside them are text. Spans rather than a
  // tokens-sized vector, so that a call waiting for a slot holds little.
  std::vector<ModalitySpan> visual_spans;
  SpecStats stats = SpecStats::kNone;
  int64_t q_tokens = 0;              // kQueries: query rows per layer, in [1, tokens]
  bool has_query_positions = false;  // kQueries: int32 [q_tokens] per layer follows
  bool has_query_outside_lse = false;  // kQueries: float32 [q_heads, q_tokens] per layer follows
  int64_t score_heads = 0;           // kPrecomputed: kv_heads or q_heads
};

// The byte size of one layer's tensor of `kind` (the layouts of medakv.proto):
//   key, value:      kv_heads * tokens * head_dim * dtype size
//   query:           q_heads * q_tokens * head_dim * dtype size    (kQueries)
//   query_positions: 4 * q_tokens                    (kQueries with positions)
//   query_outside_lse: 4 * q_heads * q_tokens     (kQueries with outside lse)
//   scores:          4 * score_heads * tokens                   (kPrecomputed)
//   entropy:         4                                          (kPrecomputed)
// 0 for a kind the spec does not carry (and for POSITIONS, UNSPECIFIED and
// values outside the enum); -1 when the size overflows int64 or a dimension
// is negative.
int64_t TensorBytes(const CacheSpec& spec, medakv::v1::TensorKind kind);

// The tensor kinds one layer of `spec` carries, in the order Finish checks them.
std::vector<medakv::v1::TensorKind> CarriedKinds(const CacheSpec& spec);

// "key", "value", "query", "query_positions", "scores", "entropy", "positions".
const char* TensorKindName(medakv::v1::TensorKind kind);

// Sum over layers and carried tensors, overflow-checked (RESOURCE_EXHAUSTED
// when it does not fit in int64). Assumes the dimensions are non-negative.
[[nodiscard]] absl::StatusOr<int64_t> TotalBytes(const CacheSpec& spec);

// Checks a domain spec: every dimension in range, q_heads a multiple of
// kv_heads, enums known, the statistics' fields consistent with `stats`
// (q_tokens only with kQueries, score_heads only with kPrecomputed), the
// modality vector empty or [tokens] of 0/1, and the total bytes within
// `max_request_bytes` (<= 0: no limit; RESOURCE_EXHAUSTED "request needs N
// bytes, over --max_request_bytes=M"). Messages name fields as the header
// does, prefixed by `prefix` (e.g. "header." gives "header.shape.kv_heads
// must be > 0, got 0"). Allocates nothing.
[[nodiscard]] absl::Status ValidateSpec(const CacheSpec& spec, int64_t max_request_bytes = 0,
                                        absl::string_view prefix = "header.");

// Validates and converts a header's cache description. Every field is
// checked before anything is allocated (the modality vector is built last,
// once the byte limit holds); spans must lie inside [0, tokens), have a
// positive length, a known modality, and not overlap. Errors are
// INVALID_ARGUMENT naming the field ("header.shape.kv_heads must be > 0,
// got 0"), or RESOURCE_EXHAUSTED over the byte limit.
[[nodiscard]] absl::StatusOr<CacheSpec> SpecFromHeader(const medakv::v1::CacheShape& shape, medakv::v1::StatsForm stats,
                                                       int64_t q_tokens, bool query_positions,
                                                       bool query_outside_lse, int32_t score_heads,
                                                       int64_t max_request_bytes);
// The same for whole headers (STATS_FORM_UNSPECIFIED is an error in both).
[[nodiscard]] absl::StatusOr<CacheSpec> SpecFromHeader(const medakv::v1::CompressHeader& header,
                                                       int64_t max_request_bytes);
[[nodiscard]] absl::StatusOr<CacheSpec> SpecFromHeader(const medakv::v1::PutCacheHeader& header,
                                                       int64_t max_request_bytes);

// ---- enums ---------------------------------------------------------------------

// DTYPE_UNSPECIFIED and unknown values are INVALID_ARGUMENT naming `field`.
[[nodiscard]] absl::StatusOr<DType> DTypeFromProto(medakv::v1::DType dtype,
                                                   absl::string_view field = "header.shape.dtype");
medakv::v1::DType DTypeToProto(DType dtype);
// LAYOUT_UNSPECIFIED is HND; unknown values are INVALID_ARGUMENT.
[[nodiscard]] absl::StatusOr<Layout> LayoutFromProto(medakv::v1::Layout layout,
                                                     absl::string_view field = "header.shape.layout");
medakv::v1::Layout LayoutToProto(Layout layout);
// STATS_FORM_UNSPECIFIED and unknown values are INVALID_ARGUMENT.
[[nodiscard]] absl::StatusOr<SpecStats> StatsFromProto(medakv::v1::StatsForm stats,
                                                       absl::string_view field = "header.stats");
medakv::v1::StatsForm StatsToProto(SpecStats stats);

// ---- domain -> proto -------------------------------------------------------------

// Shape, dtype, layout and the modality as spans (one VISUAL span per run of
// visual tokens; text is the default). Clears what `shape` held.
// The spec of a library CacheInput (what a client sends in its header).
// INVALID_ARGUMENT when the layers differ in q_tokens or in whether they carry
// query positions: the wire format has one value for all layers.
[[nodiscard]] absl::StatusOr<CacheSpec> SpecFromInput(const CacheInput& input);

void ToProto(const CacheSpec& spec, medakv::v1::CacheShape* shape);
// The statistics fields of a header (stats, q_tokens, query_positions, score_heads).
void ToProto(const CacheSpec& spec, medakv::v1::CompressHeader* header);
void ToProto(const CacheSpec& spec, medakv::v1::PutCacheHeader* header);
// LayerInfo of layer `layer` (budget, entropy, alpha).
void ToProto(int32_t layer, const LayerResult& result, medakv::v1::LayerInfo* info);

// Visual runs of a modality vector as spans; an empty vector gives none.
std::vector<ModalitySpan> SpansFromModality(const std::vector<uint8_t>& modality);

// The visual spans of a [tokens] modality vector (empty: all text), checked:
// INVALID_ARGUMENT for another size or an entry other than 0 and 1.
[[nodiscard]] absl::StatusOr<std::vector<ModalitySpan>> VisualSpansOf(const std::vector<uint8_t>& modality,
                                                                     int64_t tokens);

// The [tokens] modality vector of a spec (0 text, 1 visual); empty when
// every token is text.
std::vector<uint8_t> ModalityVector(const CacheSpec& spec);

// ---- chunking ------------------------------------------------------------------

// Bounds of a client's max_response_chunk_bytes.
inline constexpr int64_t kMinChunkBytes = int64_t{1} << 10;
inline constexpr int64_t kMaxChunkBytes = int64_t{64} << 20;

// A request's max_response_chunk_bytes: 0 gives kDefaultChunkBytes, anything
// outside [kMinChunkBytes, kMaxChunkBytes] is INVALID_ARGUMENT naming `field`
// (tiny chunks would make a response of millions of messages).
[[nodiscard]] absl::StatusOr<int64_t> ResponseChunkBytes(int64_t requested,
                                                         absl::string_view field = "header.max_response_chunk_bytes");

// (offset, length) pieces that cover [0, total_bytes) in order, each at most
// max_chunk bytes (max_chunk <= 0: kDefaultChunkBytes). Empty when
// total_bytes <= 0. Pass a max_chunk checked by ResponseChunkBytes: the
// vector has total_bytes / max_chunk entries.
std::vector<std::pair<int64_t, int64_t>> ChunkRanges(int64_t total_bytes, int64_t max_chunk);

}  // namespace medakv
