// Fuzz target: the validation of Compress and PutCache headers and of
// policies (service/server/convert.h), on the wire bytes of a request.
//
// The input is parsed as a CompressRequest, a PutCacheRequest and a
// CompressCacheRequest (the same bytes; every parse that succeeds is used:
// all three carry a header or a policy in field 1 or 2). Seeds: protoc
// --encode of tests/fuzz/corpus/fuzz_header/*.textproto (README.md).
//
// Invariants, beyond "never crashes":
//   - SpecFromHeader answers OK, INVALID_ARGUMENT naming a header field
//     ("header..."), or RESOURCE_EXHAUSTED (over the byte limit, or sizes that
//     overflow int64); the same header under no limit, 8 GiB and 1 MiB gives
//     the same spec or the same error, except RESOURCE_EXHAUSTED under a
//     limit that TotalBytes exceeds.
//   - An accepted spec passes ValidateSpec; its modality has exactly as many
//     visual tokens as the VISUAL spans cover (no overlap slipped through);
//     CacheAssembler::Create accepts it and expects TotalBytes; ToProto then
//     SpecFromHeader gives the same spec back, also through the wire format.
//   - OptionsFromProto answers OK or INVALID_ARGUMENT naming "policy"; an
//     accepted policy passes ValidateOptions, is the oneof's policy, and
//     every field the request set arrives unchanged.
//   - ResponseChunkBytes accepts exactly 0 and [1 KiB, 64 MiB]; ChunkRanges
//     tiles a tensor in order.
//   - ValidateCacheId (PutCacheHeader.cache_id) accepts exactly 1-256 bytes
//     of [A-Za-z0-9._:/-].
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/strings/ascii.h"
#include "fuzz_util.h"
#include "google/protobuf/stubs/logging.h"
#include "medakv/v1/medakv.pb.h"
#include "service/compress/options.h"
#include "service/server/assembler.h"
#include "service/server/convert.h"
#include "service/store/cache_store.h"

namespace medakv {
namespace {

namespace v1 = ::medakv::v1;

constexpr int64_t kSmallLimit = int64_t{1} << 20;
constexpr int64_t kServerLimit = int64_t{8} << 30;  // --max_request_bytes's default

bool SameSpans(const std::vector<ModalitySpan>& a, const std::vector<ModalitySpan>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i].start != b[i].start || a[i].length != b[i].length || a[i].modality != b[i].modality) return false;
  }
  return true;
}

bool SameSpec(const CacheSpec& a, const CacheSpec& b) {
  return a.layers == b.layers && a.kv_heads == b.kv_heads && a.q_heads == b.q_heads && a.head_dim == b.head_dim &&
         a.tokens == b.tokens && a.dtype == b.dtype && a.layout == b.layout &&
         SameSpans(a.visual_spans, b.visual_spans) &&
         a.stats == b.stats && a.q_tokens == b.q_tokens && a.has_query_positions == b.has_query_positions &&
         a.has_query_outside_lse == b.has_query_outside_lse && a.score_heads == b.score_heads;
}

std::string Describe(const CacheSpec& s) {
  return absl::StrCat("layers=", s.layers, " kv_heads=", s.kv_heads, " q_heads=", s.q_heads, " head_dim=", s.head_dim,
                      " tokens=", s.tokens, " dtype=", static_cast<int>(s.dtype), " layout=",
                      static_cast<int>(s.layout), " visual_spans=", s.visual_spans.size(), " stats=",
                      SpecStatsName(s.stats), " q_tokens=", s.q_tokens, " positions=", s.has_query_positions,
                      " outside_lse=", s.has_query_outside_lse, " score_heads=", s.score_heads);
}

void CheckSpecResult(const absl::StatusOr<CacheSpec>& spec) {
  if (!spec.ok()) {
    MEDAKV_FUZZ_CHECK_CODE(spec.status(), absl::StatusCode::kInvalidArgument, absl::StatusCode::kResourceExhausted);
    if (spec.status().code() == absl::StatusCode::kInvalidArgument) {
      MEDAKV_FUZZ_CHECK(absl::StartsWith(spec.status().message(), "header."),
                        "the error does not name a header field: ", spec.status().ToString());
    }
  }
}

// Everything an accepted spec must satisfy; `header` is the one it came from.
template <typename Header>
void CheckAcceptedSpec(const CacheSpec& spec, const Header& header, int64_t limit) {
  const absl::Status valid = ValidateSpec(spec, limit, "header.");
  MEDAKV_FUZZ_CHECK(valid.ok(), "accepted spec fails ValidateSpec: ", valid.ToString(), " ", Describe(spec));
  absl::StatusOr<int64_t> total = TotalBytes(spec);
  MEDAKV_FUZZ_CHECK(total.ok() && *total > 0, "accepted spec has no TotalBytes: ", Describe(spec));
  MEDAKV_FUZZ_CHECK(limit <= 0 || *total <= limit, "TotalBytes ", *total, " over the limit ", limit);
  // Outside log-sum-exps belong to query rows: accepted only with them, one float per query head and row.
  MEDAKV_FUZZ_CHECK(!spec.has_query_outside_lse || spec.stats == SpecStats::kQueries,
                    "query_outside_lse accepted without query rows: ", Describe(spec));
  MEDAKV_FUZZ_CHECK(spec.has_query_outside_lse == header.query_outside_lse(), "query_outside_lse changed: ",
                    Describe(spec));
  MEDAKV_FUZZ_CHECK(TensorBytes(spec, v1::TENSOR_KIND_QUERY_OUTSIDE_LSE) ==
                        (spec.has_query_outside_lse ? 4 * spec.q_heads * spec.q_tokens : 0),
                    "query_outside_lse bytes: ", TensorBytes(spec, v1::TENSOR_KIND_QUERY_OUTSIDE_LSE), " for ",
                    Describe(spec));

  // The modality: exactly the VISUAL spans' tokens are visual.
  int64_t visual_spans = 0;
  for (const v1::ModalitySpan& s : header.shape().modality()) {
    if (s.modality() == v1::MODALITY_VISUAL) visual_spans += s.length();
  }
  const std::vector<uint8_t> modality = ModalityVector(spec);
  int64_t visual = 0;
  for (uint8_t m : modality) visual += m;
  MEDAKV_FUZZ_CHECK(modality.empty() || static_cast<int64_t>(modality.size()) == spec.tokens,
                    "modality has ", modality.size(), " entries for ", spec.tokens, " tokens");
  MEDAKV_FUZZ_CHECK(visual == visual_spans, "modality has ", visual, " visual tokens, the spans cover ",
                    visual_spans);

  // The assembler expects exactly TotalBytes (only bookkeeping is allocated:
  // layers <= 4096).
  absl::StatusOr<CacheAssembler> assembler = CacheAssembler::Create(spec);
  MEDAKV_FUZZ_CHECK(assembler.ok(), "CacheAssembler::Create rejects an accepted spec: ", assembler.status().ToString());
  MEDAKV_FUZZ_CHECK(assembler->bytes_expected() == *total, "assembler expects ", assembler->bytes_expected(),
                    " bytes, TotalBytes is ", *total);
  MEDAKV_FUZZ_CHECK(assembler->bytes_allocated() == 0, "Create allocated tensor memory");

  // Round trip through the domain -> proto conversion and the wire format.
  Header again;
  ToProto(spec, &again);
  std::string wire;
  MEDAKV_FUZZ_CHECK(again.SerializeToString(&wire), "cannot serialize the header");
  Header parsed;
  MEDAKV_FUZZ_CHECK(parsed.ParseFromString(wire), "cannot parse the serialized header");
  absl::StatusOr<CacheSpec> back = SpecFromHeader(parsed, limit);
  MEDAKV_FUZZ_CHECK(back.ok(), "the round-tripped header is rejected: ", back.status().ToString());
  MEDAKV_FUZZ_CHECK(SameSpec(*back, spec), "round trip changed the spec: ", Describe(spec), " -> ", Describe(*back));
}

template <typename Header>
void FuzzHeader(const Header& header) {
  const absl::StatusOr<CacheSpec> unlimited = SpecFromHeader(header, 0);
  const absl::StatusOr<CacheSpec> server = SpecFromHeader(header, kServerLimit);
  const absl::StatusOr<CacheSpec> small = SpecFromHeader(header, kSmallLimit);
  CheckSpecResult(unlimited);
  CheckSpecResult(server);
  CheckSpecResult(small);
  // A limit only adds RESOURCE_EXHAUSTED for accepted specs over it.
  for (const auto* limited : {&server, &small}) {
    const int64_t limit = limited == &server ? kServerLimit : kSmallLimit;
    if (unlimited.ok()) {
      const int64_t total = *TotalBytes(*unlimited);
      if (total > limit) {
        MEDAKV_FUZZ_CHECK(limited->status().code() == absl::StatusCode::kResourceExhausted,
                          "TotalBytes ", total, " over the limit ", limit, " but: ", limited->status().ToString());
      } else {
        MEDAKV_FUZZ_CHECK(limited->ok() && SameSpec(**limited, *unlimited), "within the limit ", limit,
                          " but: ", limited->status().ToString());
      }
    } else if (absl::StartsWith(unlimited.status().message(), "header.shape.modality[")) {
      // Spans are checked after the byte limit (the modality vector is built
      // only within it): over the limit, RESOURCE_EXHAUSTED comes first.
      MEDAKV_FUZZ_CHECK(limited->status() == unlimited.status() ||
                            limited->status().code() == absl::StatusCode::kResourceExhausted,
                        "a limit changed the error: ", unlimited.status().ToString(), " -> ",
                        limited->status().ToString());
    } else {
      MEDAKV_FUZZ_CHECK(limited->status() == unlimited.status(), "a limit changed the error: ",
                        unlimited.status().ToString(), " -> ", limited->status().ToString());
    }
  }
  if (unlimited.ok()) CheckAcceptedSpec(*unlimited, header, 0);
  if (small.ok()) CheckAcceptedSpec(*small, header, kSmallLimit);
}

// ---- policies ----------------------------------------------------------------

void CheckSelect(const v1::SelectOptions& s, const CompressOptions& o) {
  if (s.has_recent_fraction()) {
    MEDAKV_FUZZ_CHECK(o.recent_fraction == s.recent_fraction(), "recent_fraction not applied");
  }
  if (s.has_shared_selection()) {
    MEDAKV_FUZZ_CHECK(o.shared_selection == s.shared_selection(), "shared_selection not applied");
  }
  if (s.has_scale()) MEDAKV_FUZZ_CHECK(o.scale == s.scale(), "scale not applied");
  if (s.text_prior() == v1::TEXT_PRIOR_NONE) MEDAKV_FUZZ_CHECK(o.text_prior == TextPrior::kNone, "text_prior");
  if (s.text_prior() == v1::TEXT_PRIOR_ADDITIVE) {
    MEDAKV_FUZZ_CHECK(o.text_prior == TextPrior::kAdditive, "text_prior");
  }
  if (s.text_prior() == v1::TEXT_PRIOR_KEEP_ALL_TEXT) {
    MEDAKV_FUZZ_CHECK(o.text_prior == TextPrior::kKeepAllText, "text_prior");
  }
  if (s.merge() == v1::MERGE_MODE_NONE) MEDAKV_FUZZ_CHECK(o.merge == MergeMode::kNone, "merge");
  if (s.merge() == v1::MERGE_MODE_AVERAGE) MEDAKV_FUZZ_CHECK(o.merge == MergeMode::kAverage, "merge");
  if (s.merge() == v1::MERGE_MODE_PIVOTAL) MEDAKV_FUZZ_CHECK(o.merge == MergeMode::kPivotal, "merge");
  if (s.merge() == v1::MERGE_MODE_WEIGHTED) MEDAKV_FUZZ_CHECK(o.merge == MergeMode::kWeighted, "merge");
  if (s.merge_threshold() == v1::MERGE_THRESHOLD_MEAN) {
    MEDAKV_FUZZ_CHECK(o.merge_threshold == MergeThreshold::kMean, "merge_threshold");
  }
  if (s.merge_threshold() == v1::MERGE_THRESHOLD_NONE) {
    MEDAKV_FUZZ_CHECK(o.merge_threshold == MergeThreshold::kNone, "merge_threshold");
  }
}

void FuzzPolicy(const v1::Policy& policy) {
  const absl::StatusOr<CompressOptions> options = OptionsFromProto(policy);
  if (!options.ok()) {
    MEDAKV_FUZZ_CHECK_CODE(options.status(), absl::StatusCode::kInvalidArgument);
    MEDAKV_FUZZ_CHECK(absl::StartsWith(options.status().message(), "policy"),
                      "the error does not name a policy field: ", options.status().ToString());
    return;
  }
  const CompressOptions& o = *options;
  const absl::Status valid = ValidateOptions(o);
  MEDAKV_FUZZ_CHECK(valid.ok(), "accepted options fail ValidateOptions: ", valid.ToString());
  MEDAKV_FUZZ_CHECK(policy.rho() == 0.0 || o.budget.rho == policy.rho(), "rho not applied");
  MEDAKV_FUZZ_CHECK(o.budget.rho > 0.0 && o.budget.rho <= 1.0, "rho ", o.budget.rho);
  switch (policy.kind_case()) {
    case v1::Policy::KIND_NOT_SET:
      MEDAKV_FUZZ_CHECK(o.policy == PolicyKind::kAmber, "unset oneof is not amber");
      break;
    case v1::Policy::kFull:
      MEDAKV_FUZZ_CHECK(o.policy == PolicyKind::kFull, "policy kind");
      break;
    case v1::Policy::kMeda: {
      const v1::MedaPolicy& m = policy.meda();
      MEDAKV_FUZZ_CHECK(o.policy == PolicyKind::kMeda, "policy kind");
      if (m.has_tau()) MEDAKV_FUZZ_CHECK(o.budget.tau == m.tau(), "tau not applied");
      if (m.has_alpha_min()) MEDAKV_FUZZ_CHECK(o.budget.alpha_min == m.alpha_min(), "alpha_min not applied");
      if (m.has_alpha_max()) MEDAKV_FUZZ_CHECK(o.budget.alpha_max == m.alpha_max(), "alpha_max not applied");
      if (m.has_exact_total()) MEDAKV_FUZZ_CHECK(o.budget.exact_total == m.exact_total(), "exact_total");
      MEDAKV_FUZZ_CHECK(o.budget.alpha_min <= o.budget.alpha_max, "alpha_min > alpha_max accepted");
      MEDAKV_FUZZ_CHECK(std::isfinite(o.budget.tau) && o.budget.tau > 0, "tau ", o.budget.tau);
      CheckSelect(m.select(), o);
      break;
    }
    case v1::Policy::kStreamingLlm:
      MEDAKV_FUZZ_CHECK(o.policy == PolicyKind::kStreamingLlm, "policy kind");
      if (policy.streaming_llm().has_sinks()) {
        MEDAKV_FUZZ_CHECK(o.sinks == policy.streaming_llm().sinks(), "sinks not applied");
      }
      MEDAKV_FUZZ_CHECK(o.sinks >= 0, "sinks ", o.sinks);
      break;
    case v1::Policy::kH2O:
      MEDAKV_FUZZ_CHECK(o.policy == PolicyKind::kH2O, "policy kind");
      CheckSelect(policy.h2o().select(), o);
      break;
    case v1::Policy::kSnapkv: {
      const v1::SnapKVPolicy& p = policy.snapkv();
      MEDAKV_FUZZ_CHECK(o.policy == PolicyKind::kSnapKV, "policy kind");
      if (p.has_window()) MEDAKV_FUZZ_CHECK(o.window == p.window(), "window not applied");
      if (p.has_pool_kernel()) MEDAKV_FUZZ_CHECK(o.pool_kernel == p.pool_kernel(), "pool_kernel not applied");
      CheckSelect(p.select(), o);
      break;
    }
    case v1::Policy::kPyramidkv: {
      const v1::PyramidKVPolicy& p = policy.pyramidkv();
      MEDAKV_FUZZ_CHECK(o.policy == PolicyKind::kPyramidKV, "policy kind");
      if (p.has_window()) MEDAKV_FUZZ_CHECK(o.window == p.window(), "window not applied");
      if (p.has_pool_kernel()) MEDAKV_FUZZ_CHECK(o.pool_kernel == p.pool_kernel(), "pool_kernel not applied");
      if (p.has_beta()) MEDAKV_FUZZ_CHECK(o.pyramid_beta == p.beta(), "beta not applied");
      CheckSelect(p.select(), o);
      break;
    }
    case v1::Policy::kLookM:
      MEDAKV_FUZZ_CHECK(o.policy == PolicyKind::kLookM, "policy kind");
      CheckSelect(policy.look_m().select(), o);
      break;
    case v1::Policy::kAmber: {
      const v1::AmberPolicy& a = policy.amber();
      MEDAKV_FUZZ_CHECK(o.policy == PolicyKind::kAmber, "policy kind");
      if (a.has_tau()) MEDAKV_FUZZ_CHECK(o.budget.tau == a.tau(), "tau not applied");
      if (a.has_alpha_min()) MEDAKV_FUZZ_CHECK(o.budget.alpha_min == a.alpha_min(), "alpha_min not applied");
      if (a.has_alpha_max()) MEDAKV_FUZZ_CHECK(o.budget.alpha_max == a.alpha_max(), "alpha_max not applied");
      if (a.has_sinks()) MEDAKV_FUZZ_CHECK(o.sinks == a.sinks(), "sinks not applied");
      if (a.score_norm() == v1::SCORE_NORM_SUM) MEDAKV_FUZZ_CHECK(o.score_norm == ScoreNorm::kSum, "score_norm");
      if (a.score_norm() == v1::SCORE_NORM_MAX) MEDAKV_FUZZ_CHECK(o.score_norm == ScoreNorm::kMax, "score_norm");
      if (a.score_norm() == v1::SCORE_NORM_VISIBLE_MEAN) {
        MEDAKV_FUZZ_CHECK(o.score_norm == ScoreNorm::kVisibleMean, "score_norm");
      }
      if (a.layer_budget() == v1::LAYER_BUDGET_MASS) {
        MEDAKV_FUZZ_CHECK(o.layer_budget == LayerBudget::kMass, "layer_budget");
      }
      if (a.layer_budget() == v1::LAYER_BUDGET_DEPTH) {
        MEDAKV_FUZZ_CHECK(o.layer_budget == LayerBudget::kDepth, "layer_budget");
      }
      if (a.has_recent_search_rows()) {
        MEDAKV_FUZZ_CHECK(o.recent_search_rows == a.recent_search_rows(), "recent_search_rows not applied");
      }
      if (a.has_depth_ratio()) MEDAKV_FUZZ_CHECK(o.depth_ratio == a.depth_ratio(), "depth_ratio not applied");
      MEDAKV_FUZZ_CHECK(o.budget.alpha_min <= o.budget.alpha_max, "alpha_min > alpha_max accepted");
      MEDAKV_FUZZ_CHECK(o.sinks >= 0, "sinks ", o.sinks);
      MEDAKV_FUZZ_CHECK(o.recent_search_rows >= 0, "recent_search_rows ", o.recent_search_rows);
      MEDAKV_FUZZ_CHECK(o.depth_ratio >= kMinDepthRatio && o.depth_ratio <= 1.0 / kMinDepthRatio,
                        "depth_ratio ", o.depth_ratio);
      CheckSelect(a.select(), o);
      break;
    }
  }
  if (o.policy == PolicyKind::kSnapKV || o.policy == PolicyKind::kPyramidKV) {
    MEDAKV_FUZZ_CHECK(o.window >= 1 && o.pool_kernel >= 1 && o.pool_kernel % 2 == 1, "window ", o.window,
                      " pool_kernel ", o.pool_kernel);
  }
}

// ---- chunking and ids ---------------------------------------------------------------

void FuzzChunkBytes(int64_t requested, int64_t tensor_bytes) {
  const absl::StatusOr<int64_t> chunk = ResponseChunkBytes(requested);
  const bool in_range = requested == 0 || (requested >= kMinChunkBytes && requested <= kMaxChunkBytes);
  MEDAKV_FUZZ_CHECK(chunk.ok() == in_range, "ResponseChunkBytes(", requested, "): ", chunk.status().ToString());
  if (!chunk.ok()) {
    MEDAKV_FUZZ_CHECK_CODE(chunk.status(), absl::StatusCode::kInvalidArgument);
    return;
  }
  MEDAKV_FUZZ_CHECK(*chunk == (requested == 0 ? kDefaultChunkBytes : requested), "chunk size ", *chunk);
  if (tensor_bytes < 0 || tensor_bytes / *chunk > (int64_t{1} << 16)) return;  // bounded work
  int64_t covered = 0;
  for (const auto& [offset, length] : ChunkRanges(tensor_bytes, *chunk)) {
    MEDAKV_FUZZ_CHECK(offset == covered && length > 0 && length <= *chunk, "range [", offset, ", +", length,
                      ") after ", covered);
    covered += length;
  }
  MEDAKV_FUZZ_CHECK(covered == std::max<int64_t>(tensor_bytes, 0), "ranges cover ", covered, " of ", tensor_bytes);
}

void FuzzCacheId(const std::string& id) {
  bool valid = !id.empty() && id.size() <= kMaxCacheIdBytes;
  for (char c : id) {
    valid = valid && (absl::ascii_isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == ':' ||
                      c == '/' || c == '-');
  }
  const absl::Status s = ValidateCacheId(id);
  MEDAKV_FUZZ_CHECK(s.ok() == valid, "ValidateCacheId: ", s.ToString());
  if (!s.ok()) MEDAKV_FUZZ_CHECK_CODE(s, absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace medakv

// Protobuf logs every string field with invalid UTF-8 it parses; the
// fuzzer makes many.
extern "C" int LLVMFuzzerInitialize(int* /*argc*/, char*** /*argv*/) {
  google::protobuf::SetLogHandler(nullptr);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  namespace v1 = ::medakv::v1;
  if (size > (size_t{1} << 16)) return -1;  // headers are small; keep executions fast
  v1::CompressRequest compress;
  if (compress.ParseFromArray(data, static_cast<int>(size)) && compress.has_header()) {
    const v1::CompressHeader& h = compress.header();
    medakv::FuzzHeader(h);
    medakv::FuzzPolicy(h.policy());
    const absl::StatusOr<medakv::CacheSpec> spec = medakv::SpecFromHeader(h, 0);
    medakv::FuzzChunkBytes(h.max_response_chunk_bytes(),
                           spec.ok() ? medakv::TensorBytes(*spec, v1::TENSOR_KIND_KEY) : h.shape().tokens());
  }
  v1::PutCacheRequest put;
  if (put.ParseFromArray(data, static_cast<int>(size)) && put.has_header()) {
    medakv::FuzzHeader(put.header());
    medakv::FuzzCacheId(put.header().cache_id());
  }
  v1::CompressCacheRequest compress_cache;
  if (compress_cache.ParseFromArray(data, static_cast<int>(size))) {
    medakv::FuzzPolicy(compress_cache.policy());
    medakv::FuzzCacheId(compress_cache.cache_id());
  }
  return 0;
}
