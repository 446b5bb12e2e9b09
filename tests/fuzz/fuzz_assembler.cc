// Fuzz target: a Compress or PutCache upload as the server receives it: the
// header through SpecFromHeader (and OptionsFromProto), then every later
// message through CallRegions::AddChunkMessage into a CacheAssembler, then
// Finish (which runs ValidateCacheInput) and, on tiny caches, a compression
// on the CPU backend with the header's policy.
//
// Input: byte 0 picks the form of the rest.
//   bit 0 = 0: a stream: messages of [2-byte little-endian length][bytes],
//              each a serialized CompressRequest (bit 1 = 0) or
//              PutCacheRequest (bit 1 = 1), the header first; what the
//              server reads off the wire.
//   bit 0 = 1: structured: FuzzedDataProvider draws a small valid header and
//              a chunk sequence of random sizes, tensors interleaved, with
//              occasional bad chunks (wrong offset, layer, kind, empty,
//              repeated) and bad values (query positions, entropy); the
//              same driver runs it. Reaches Finish and Compress far more
//              often than mutated wire bytes do.
//
// Invariants: a model of the assembler (bytes per tensor) predicts every
// chunk's outcome, and the assembler never accepts a chunk the model rejects
// (never more bytes than the spec, never out of order); after each chunk the
// received bytes equal the model's; Finish succeeds exactly when every
// tensor is complete and the statistics are valid (positions in range,
// entropy and scores finite), and its CacheInput's views hold exactly the
// bytes sent; a finished assembler rejects more chunks; Compress of a
// finished cache succeeds (it may answer INVALID_ARGUMENT only when keys,
// values or queries hold extreme values that make the statistics
// non-finite) with budgets in [1, tokens] (tokens for `full`), positions
// strictly ascending and in range, and outputs of the right sizes.
#include <fuzzer/FuzzedDataProvider.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "fuzz_util.h"
#include "google/protobuf/stubs/logging.h"
#include "kernels/backend.h"
#include "kernels/common/tensor_util.h"
#include "medakv/v1/medakv.pb.h"
#include "service/compress/options.h"
#include "service/compress/pipeline.h"
#include "service/server/assembler.h"
#include "service/server/convert.h"
#include "service/server/shared_memory.h"

namespace medakv {
namespace {

namespace v1 = ::medakv::v1;
using server::CallRegions;
using server::SharedMemoryRegistry;

// Uploads larger than this are refused by the byte limit (keeps executions
// fast and memory small); compressions run up to kMaxCompressBytes.
constexpr int64_t kMaxRequestBytes = int64_t{256} << 10;
constexpr int64_t kMaxCompressBytes = int64_t{32} << 10;

const Backend& Cpu() {
  static const Backend* backend = MakeCpuBackend().release();
  return *backend;
}

// ---- the model ------------------------------------------------------------------

struct Model {
  const CacheSpec* spec = nullptr;
  std::map<std::pair<int64_t, int>, std::string> received;  // (layer, kind) -> bytes

  // The request's tensor kinds (the results' POSITIONS is not one).
  static bool RequestKind(int kind) {
    return (kind >= v1::TENSOR_KIND_KEY && kind <= v1::TENSOR_KIND_ENTROPY) ||
           kind == v1::TENSOR_KIND_QUERY_OUTSIDE_LSE;
  }
  int64_t Expected(int64_t layer, int kind) const {
    if (layer < 0 || layer >= spec->layers || !RequestKind(kind)) return 0;
    return TensorBytes(*spec, static_cast<v1::TensorKind>(kind));
  }
  int64_t Received(int64_t layer, int kind) const {
    auto it = received.find({layer, kind});
    return it == received.end() ? 0 : static_cast<int64_t>(it->second.size());
  }
  // The status code AddChunk must return for a data chunk.
  absl::StatusCode Predict(int64_t layer, int kind, int64_t offset, int64_t size) const {
    const int64_t expected = Expected(layer, kind);
    if (expected == 0) return absl::StatusCode::kInvalidArgument;  // layer out of range, kind not carried
    const int64_t got = Received(layer, kind);
    if (got == expected || size <= 0 || offset != got || size > expected - got) {
      return absl::StatusCode::kInvalidArgument;
    }
    return absl::StatusCode::kOk;
  }
  int64_t Total() const {
    int64_t t = 0;
    for (const auto& [key, bytes] : received) t += static_cast<int64_t>(bytes.size());
    return t;
  }
  bool Complete() const {
    for (int64_t l = 0; l < spec->layers; ++l) {
      for (v1::TensorKind kind : CarriedKinds(*spec)) {
        if (Received(l, kind) != Expected(l, kind)) return false;
      }
    }
    return true;
  }
  // Whether every key, value and query element is finite with |x| <= 1000.
  bool Moderate() const {
    std::vector<float> row;
    for (const auto& [key, bytes] : received) {
      if (key.second != v1::TENSOR_KIND_KEY && key.second != v1::TENSOR_KIND_VALUE &&
          key.second != v1::TENSOR_KIND_QUERY) {
        continue;
      }
      row.resize(bytes.size() / DTypeSize(spec->dtype));
      RowToFloat(spec->dtype, bytes.data(), row.data(), static_cast<int64_t>(row.size()));
      for (float x : row) {
        if (!(std::fabs(x) <= 1000.f)) return false;
      }
    }
    return true;
  }
  // Whether ValidateCacheInput accepts the statistics (the rest of the input
  // follows from a valid spec).
  bool StatsValid() const {
    for (int64_t l = 0; l < spec->layers; ++l) {
      if (spec->stats == SpecStats::kQueries && spec->has_query_positions) {
        const std::string& p = received.at({l, v1::TENSOR_KIND_QUERY_POSITIONS});
        for (size_t i = 0; i + 4 <= p.size(); i += 4) {
          int32_t v;
          std::memcpy(&v, p.data() + i, 4);
          if (v < 0 || v >= QueryPositionLimit(spec->tokens)) return false;  // probes may follow the cache
        }
      }
      if (spec->stats == SpecStats::kQueries && spec->has_query_outside_lse) {
        const std::string& o = received.at({l, v1::TENSOR_KIND_QUERY_OUTSIDE_LSE});
        for (size_t i = 0; i + 4 <= o.size(); i += 4) {
          float x;
          std::memcpy(&x, o.data() + i, 4);
          if (std::isnan(x) || x == INFINITY) return false;  // finite or -inf
        }
      }
      if (spec->stats == SpecStats::kPrecomputed) {
        float e;
        std::memcpy(&e, received.at({l, v1::TENSOR_KIND_ENTROPY}).data(), 4);
        if (!std::isfinite(e)) return false;
        const std::string& scores = received.at({l, v1::TENSOR_KIND_SCORES});
        for (size_t i = 0; i + 4 <= scores.size(); i += 4) {
          std::memcpy(&e, scores.data() + i, 4);
          if (!std::isfinite(e)) return false;
        }
      }
    }
    return true;
  }
};

void CheckTensorBytes(const CacheAssembler& a, const Model& m, int64_t layer, int kind) {
  const absl::string_view got = a.tensor(layer, static_cast<v1::TensorKind>(kind));
  auto it = m.received.find({layer, kind});
  const absl::string_view want = it == m.received.end() ? absl::string_view() : absl::string_view(it->second);
  MEDAKV_FUZZ_CHECK(got == want, "layer ", layer, " kind ", kind, ": the assembler holds ", got.size(),
                    " bytes, the model ", want.size(), " (or they differ)");
}

// ---- the driver -------------------------------------------------------------------

template <typename Request>
void RunUpload(const std::vector<Request>& messages) {
  if (messages.empty() || !messages[0].has_header()) return;  // the server fails the call
  const auto& header = messages[0].header();
  absl::StatusOr<CacheSpec> spec_or = SpecFromHeader(header, kMaxRequestBytes);
  if (!spec_or.ok()) {
    MEDAKV_FUZZ_CHECK_CODE(spec_or.status(), absl::StatusCode::kInvalidArgument,
                           absl::StatusCode::kResourceExhausted);
    return;
  }
  const CacheSpec spec = *spec_or;
  CompressOptions options = DefaultOptions(PolicyKind::kMeda);
  if constexpr (std::is_same_v<Request, v1::CompressRequest>) {
    absl::StatusOr<CompressOptions> o = OptionsFromProto(header.policy());
    if (!o.ok()) {
      MEDAKV_FUZZ_CHECK_CODE(o.status(), absl::StatusCode::kInvalidArgument);
      return;
    }
    options = *o;
  }
  absl::StatusOr<CacheAssembler> created = CacheAssembler::Create(spec);
  MEDAKV_FUZZ_CHECK(created.ok(), "Create rejects an accepted spec: ", created.status().ToString());
  CacheAssembler assembler = *std::move(created);
  MEDAKV_FUZZ_CHECK(assembler.bytes_expected() == *TotalBytes(spec), "bytes_expected");

  // No region is registered: every shared-memory ref is NOT_FOUND.
  SharedMemoryRegistry registry(/*max_bytes=*/0, /*max_regions=*/0);
  CallRegions regions(&registry, absl::OkStatus());
  Model model;
  model.spec = &spec;

  for (size_t i = 1; i < messages.size(); ++i) {
    const Request& m = messages[i];
    const absl::Status s = regions.AddChunkMessage(m, &assembler);
    if (!m.has_chunk()) {
      MEDAKV_FUZZ_CHECK_CODE(s, absl::StatusCode::kInvalidArgument);
      continue;
    }
    const v1::TensorChunk& c = m.chunk();
    if (c.has_shm()) {
      MEDAKV_FUZZ_CHECK_CODE(s, absl::StatusCode::kNotFound);
      continue;
    }
    const auto size = static_cast<int64_t>(c.data().size());
    const absl::StatusCode want = model.Predict(c.layer(), c.tensor(), c.offset(), size);
    MEDAKV_FUZZ_CHECK(s.code() == want, "chunk layer ", c.layer(), " kind ", static_cast<int>(c.tensor()),
                      " offset ", c.offset(), " size ", size, " (received ", model.Received(c.layer(), c.tensor()),
                      " of ", model.Expected(c.layer(), c.tensor()), "): expected code ", static_cast<int>(want),
                      ", got ", s.ToString());
    if (s.ok()) model.received[{c.layer(), static_cast<int>(c.tensor())}].append(c.data());
    MEDAKV_FUZZ_CHECK(assembler.bytes_received() == model.Total(), "bytes_received ", assembler.bytes_received(),
                      ", the model has ", model.Total());
    MEDAKV_FUZZ_CHECK(assembler.bytes_received() <= assembler.bytes_expected(), "more bytes than the spec");
    if (c.layer() >= 0 && c.layer() < spec.layers && Model::RequestKind(c.tensor())) {
      CheckTensorBytes(assembler, model, c.layer(), c.tensor());
    }
  }
  // Allocation follows what arrived: whole tensors, rounded up to 4 bytes.
  MEDAKV_FUZZ_CHECK(assembler.bytes_allocated() <= assembler.bytes_expected() + 3 * spec.layers * 6,
                    "allocated ", assembler.bytes_allocated(), " for ", assembler.bytes_expected(), " expected");

  const bool complete = model.Complete();
  const bool accept = complete && (spec.stats == SpecStats::kNone || model.StatsValid());
  const absl::Status finish = assembler.Finish();
  MEDAKV_FUZZ_CHECK(finish.ok() == accept, "Finish: ", finish.ToString(), " (complete ", complete, ")");
  if (!finish.ok()) {
    MEDAKV_FUZZ_CHECK_CODE(finish, absl::StatusCode::kInvalidArgument);
    MEDAKV_FUZZ_CHECK(!assembler.finished() && assembler.input().layers.empty(), "a failed Finish left an input");
    return;
  }

  // The assembled input holds exactly the bytes sent.
  const CacheInput& in = assembler.input();
  MEDAKV_FUZZ_CHECK(static_cast<int64_t>(in.layers.size()) == spec.layers, "input layers");
  MEDAKV_FUZZ_CHECK(in.kv_heads == spec.kv_heads && in.q_heads == spec.q_heads && in.head_dim == spec.head_dim &&
                        in.tokens == spec.tokens && in.dtype == spec.dtype && in.layout == spec.layout &&
                        in.modality == ModalityVector(spec),
                    "input dims differ from the spec");
  for (int64_t l = 0; l < spec.layers; ++l) {
    for (v1::TensorKind kind : CarriedKinds(spec)) CheckTensorBytes(assembler, model, l, kind);
    const LayerInput& layer = in.layers[l];
    const auto view_bytes = [&](const TensorView& v) {
      return absl::string_view(static_cast<const char*>(v.data), static_cast<size_t>(v.NumBytes()));
    };
    MEDAKV_FUZZ_CHECK(view_bytes(layer.key) == model.received.at({l, v1::TENSOR_KIND_KEY}), "key view");
    MEDAKV_FUZZ_CHECK(view_bytes(layer.value) == model.received.at({l, v1::TENSOR_KIND_VALUE}), "value view");
    if (spec.stats == SpecStats::kQueries) {
      MEDAKV_FUZZ_CHECK(view_bytes(layer.query) == model.received.at({l, v1::TENSOR_KIND_QUERY}), "query view");
      const std::string positions = spec.has_query_positions
                                        ? model.received.at({l, v1::TENSOR_KIND_QUERY_POSITIONS})
                                        : std::string();
      MEDAKV_FUZZ_CHECK(layer.query_positions.size() * 4 == positions.size() &&
                            (positions.empty() ||
                             std::memcmp(layer.query_positions.data(), positions.data(), positions.size()) == 0),
                        "query positions");
      const std::string outside = spec.has_query_outside_lse
                                      ? model.received.at({l, v1::TENSOR_KIND_QUERY_OUTSIDE_LSE})
                                      : std::string();
      MEDAKV_FUZZ_CHECK(layer.query_outside_lse.size() * 4 == outside.size() &&
                            (outside.empty() ||
                             std::memcmp(layer.query_outside_lse.data(), outside.data(), outside.size()) == 0),
                        "query outside lse");
    } else if (spec.stats == SpecStats::kPrecomputed) {
      const std::string& scores = model.received.at({l, v1::TENSOR_KIND_SCORES});
      MEDAKV_FUZZ_CHECK(layer.score_heads == spec.score_heads &&
                            std::memcmp(layer.scores, scores.data(), scores.size()) == 0,
                        "scores");
      MEDAKV_FUZZ_CHECK(std::memcmp(&layer.entropy, model.received.at({l, v1::TENSOR_KIND_ENTROPY}).data(), 4) == 0,
                        "entropy");
    }
  }
  if (spec.stats != SpecStats::kNone) {
    const absl::Status valid = ValidateCacheInput(in);
    MEDAKV_FUZZ_CHECK(valid.ok(), "the finished input fails ValidateCacheInput: ", valid.ToString());
  }
  MEDAKV_FUZZ_CHECK(assembler.Finish().ok(), "a second Finish fails");
  const absl::Status late = assembler.Add(0, v1::TENSOR_KIND_KEY, 0, "x");
  MEDAKV_FUZZ_CHECK_CODE(late, absl::StatusCode::kFailedPrecondition);

  if (spec.stats == SpecStats::kNone || assembler.bytes_expected() > kMaxCompressBytes) return;
  absl::StatusOr<CompressResult> result = Compress(in, options, Cpu());
  if (!result.ok()) {
    // A NaN or infinity in the keys, values or queries is refused (CheckFiniteInput);
    // finite but extreme ones may make the statistics non-finite, which the
    // compression reports. Moderate values must always compress.
    MEDAKV_FUZZ_CHECK(result.status().code() == absl::StatusCode::kInvalidArgument && !model.Moderate(),
                      "Compress of a validated input with validated options fails: ", result.status().ToString(),
                      " (policy ", PolicyName(options.policy), ")");
    return;
  }
  fuzz::CheckResult(*result, in, options);
}

// ---- stream form ---------------------------------------------------------------

template <typename Request>
void RunStream(const uint8_t* data, size_t size) {
  std::vector<Request> messages;
  size_t pos = 0;
  while (pos + 2 <= size && messages.size() < 4096) {
    const size_t n = data[pos] | (size_t{data[pos + 1]} << 8);
    pos += 2;
    if (n > size - pos) break;
    Request r;
    if (!r.ParseFromArray(data + pos, static_cast<int>(n))) return;  // the server drops the call
    messages.push_back(std::move(r));
    pos += n;
  }
  RunUpload(messages);
}

// ---- structured form -------------------------------------------------------------

struct Piece {
  int64_t layer;
  v1::TensorKind kind;
  int64_t bytes;
  int64_t sent = 0;
};

void FillPolicy(FuzzedDataProvider& p, v1::Policy* policy) {
  static constexpr double kRho[] = {0, 0.05, 0.2, 0.5, 1.0};
  policy->set_rho(kRho[p.ConsumeIntegralInRange<int>(0, 4)]);
  v1::SelectOptions* select = nullptr;
  switch (p.ConsumeIntegralInRange<int>(0, 7)) {
    case 0:
      break;  // unset: meda
    case 1:
      policy->mutable_full();
      break;
    case 2: {
      v1::MedaPolicy* m = policy->mutable_meda();
      if (p.ConsumeBool()) m->set_tau(p.ConsumeFloatingPointInRange<double>(0.01, 10));
      if (p.ConsumeBool()) m->set_exact_total(p.ConsumeBool());
      m->set_entropy_heads(static_cast<v1::EntropyHeads>(p.ConsumeIntegralInRange<int>(0, 2)));
      m->set_entropy_source(static_cast<v1::EntropySource>(p.ConsumeIntegralInRange<int>(0, 2)));
      select = m->mutable_select();
      break;
    }
    case 3:
      if (p.ConsumeBool()) policy->mutable_streaming_llm()->set_sinks(p.ConsumeIntegralInRange<int64_t>(0, 40));
      else policy->mutable_streaming_llm();
      break;
    case 4:
      select = policy->mutable_h2o()->mutable_select();
      break;
    case 5: {
      v1::SnapKVPolicy* s = policy->mutable_snapkv();
      s->set_window(p.ConsumeIntegralInRange<int64_t>(1, 40));
      s->set_pool_kernel(2 * p.ConsumeIntegralInRange<int64_t>(0, 4) + 1);
      select = s->mutable_select();
      break;
    }
    case 6: {
      v1::PyramidKVPolicy* s = policy->mutable_pyramidkv();
      s->set_window(p.ConsumeIntegralInRange<int64_t>(1, 40));
      s->set_pool_kernel(2 * p.ConsumeIntegralInRange<int64_t>(0, 4) + 1);
      s->set_beta(p.ConsumeFloatingPointInRange<double>(0.5, 40));
      select = s->mutable_select();
      break;
    }
    default:
      select = policy->mutable_look_m()->mutable_select();
      break;
  }
  if (select != nullptr && p.ConsumeBool()) {
    select->set_recent_fraction(p.ConsumeProbability<double>());
    select->set_text_prior(static_cast<v1::TextPrior>(p.ConsumeIntegralInRange<int>(0, 3)));
    select->set_shared_selection(p.ConsumeBool());
    select->set_merge(static_cast<v1::MergeMode>(p.ConsumeIntegralInRange<int>(0, 4)));
    select->set_merge_threshold(static_cast<v1::MergeThreshold>(p.ConsumeIntegralInRange<int>(0, 2)));
    if (p.ConsumeBool()) select->set_scale(p.ConsumeFloatingPointInRange<float>(0.f, 4.f));
  }
}

template <typename Request>
void RunStructured(FuzzedDataProvider& p) {
  std::vector<Request> messages(1);
  auto* h = messages[0].mutable_header();
  v1::CacheShape* shape = h->mutable_shape();
  const int kv_heads = p.ConsumeIntegralInRange<int>(1, 2);
  const int64_t tokens = p.ConsumeIntegralInRange<int64_t>(1, 24);
  shape->set_layers(p.ConsumeIntegralInRange<int>(1, 3));
  shape->set_kv_heads(kv_heads);
  shape->set_q_heads(kv_heads * p.ConsumeIntegralInRange<int>(1, 3));
  shape->set_head_dim(p.ConsumeIntegralInRange<int>(1, 8));
  shape->set_tokens(tokens);
  shape->set_dtype(static_cast<v1::DType>(p.ConsumeIntegralInRange<int>(1, 3)));
  shape->set_layout(static_cast<v1::Layout>(p.ConsumeIntegralInRange<int>(0, 2)));
  const int spans = p.ConsumeIntegralInRange<int>(0, 2);
  for (int i = 0; i < spans; ++i) {
    v1::ModalitySpan* s = shape->add_modality();
    s->set_start(p.ConsumeIntegralInRange<int64_t>(0, tokens));
    s->set_length(p.ConsumeIntegralInRange<int64_t>(0, tokens));
    s->set_modality(p.ConsumeIntegralInRange<int>(0, 8) == 0 ? v1::MODALITY_TEXT : v1::MODALITY_VISUAL);
  }
  const int form = p.ConsumeIntegralInRange<int>(0, std::is_same_v<Request, v1::PutCacheRequest> ? 2 : 1);
  if (form == 0) {
    h->set_stats(v1::STATS_FORM_QUERIES);
    h->set_q_tokens(p.ConsumeIntegralInRange<int64_t>(1, 2 * tokens));  // more than tokens: probes
    h->set_query_positions(p.ConsumeBool());
    h->set_query_outside_lse(p.ConsumeIntegralInRange<int>(0, 3) == 0);
  } else if (form == 1) {
    h->set_stats(v1::STATS_FORM_PRECOMPUTED);
    h->set_score_heads(p.ConsumeBool() ? shape->kv_heads() : shape->q_heads());
  } else {
    h->set_stats(v1::STATS_FORM_NONE);
  }
  if constexpr (std::is_same_v<Request, v1::CompressRequest>) {
    FillPolicy(p, h->mutable_policy());
  } else {
    h->set_cache_id("fuzz");
  }

  absl::StatusOr<CacheSpec> spec = SpecFromHeader(*h, kMaxRequestBytes);
  if (!spec.ok()) return RunUpload(messages);  // rejected header (a bad span): nothing more to send

  std::vector<Piece> pieces;
  for (int64_t l = 0; l < spec->layers; ++l) {
    for (v1::TensorKind kind : CarriedKinds(*spec)) pieces.push_back(Piece{l, kind, TensorBytes(*spec, kind)});
  }
  size_t open = pieces.size();
  while (open > 0 && p.remaining_bytes() > 0 && messages.size() < 512) {
    // Pick an unfinished tensor and the size of its next chunk.
    size_t k = p.ConsumeIntegralInRange<size_t>(0, open - 1);
    for (size_t i = 0; i < pieces.size(); ++i) {
      if (pieces[i].sent < pieces[i].bytes && k-- == 0) {
        k = i;
        break;
      }
    }
    Piece& piece = pieces[k];
    const int64_t left = piece.bytes - piece.sent;
    int64_t n = p.ConsumeBool() ? left : p.ConsumeIntegralInRange<int64_t>(1, left);
    std::string bytes;
    if (piece.kind == v1::TENSOR_KIND_QUERY_POSITIONS || piece.kind == v1::TENSOR_KIND_ENTROPY ||
        piece.kind == v1::TENSOR_KIND_QUERY_OUTSIDE_LSE) {
      // Whole tensors of valid values, now and then a bad one.
      n = left;
      for (int64_t i = 0; i < n / 4; ++i) {
        int32_t v;
        if (piece.kind == v1::TENSOR_KIND_ENTROPY) {
          const float e = p.ConsumeIntegralInRange<int>(0, 15) == 0 ? NAN : p.ConsumeFloatingPointInRange<float>(0, 8);
          std::memcpy(&v, &e, 4);
        } else if (piece.kind == v1::TENSOR_KIND_QUERY_OUTSIDE_LSE) {
          const int pick = p.ConsumeIntegralInRange<int>(0, 31);
          const float x = pick == 0   ? NAN
                          : pick == 1 ? INFINITY
                          : pick < 6  ? -INFINITY
                                      : p.ConsumeFloatingPointInRange<float>(-8, 8);
          std::memcpy(&v, &x, 4);
        } else {
          v = p.ConsumeIntegralInRange<int>(0, 15) == 0 ? p.ConsumeIntegral<int32_t>()
                                                        : p.ConsumeIntegralInRange<int32_t>(0, tokens - 1);
        }
        bytes.append(reinterpret_cast<const char*>(&v), 4);
      }
    } else {
      bytes = p.ConsumeBytesAsString(static_cast<size_t>(n));
      bytes.resize(static_cast<size_t>(n), '\x3c');  // past the input's end: 1.0 in fp16's high byte
    }
    bool empty_message = false;
    v1::TensorChunk* c = messages.emplace_back().mutable_chunk();
    c->set_layer(static_cast<int32_t>(piece.layer));
    c->set_tensor(piece.kind);
    c->set_offset(piece.sent);
    // Now and then a chunk the assembler must reject (and that changes nothing).
    switch (p.ConsumeIntegralInRange<int>(0, 40)) {
      case 0:
        c->set_offset(piece.sent + p.ConsumeIntegralInRange<int64_t>(-2, 2));
        break;
      case 1:
        c->set_layer(p.ConsumeIntegralInRange<int32_t>(-1, static_cast<int32_t>(spec->layers)));
        break;
      case 2:
        c->set_tensor(static_cast<v1::TensorKind>(p.ConsumeIntegralInRange<int>(0, 8)));
        break;
      case 3:
        bytes.clear();
        break;
      case 4:
        bytes.push_back('\0');  // one byte past the end if it was the last chunk
        break;
      case 5:
        empty_message = true;  // after this chunk: a message with neither header nor chunk
        break;
      case 6:
        c->mutable_shm()->set_region("fuzz");
        break;
      default:
        break;
    }
    if (!c->has_shm()) c->set_data(std::move(bytes));
    // Only what the model will accept advances the piece.
    if (!c->has_shm() && c->layer() == piece.layer && c->tensor() == piece.kind && c->offset() == piece.sent &&
        !c->data().empty() && static_cast<int64_t>(c->data().size()) <= left) {
      piece.sent += static_cast<int64_t>(c->data().size());
      if (piece.sent == piece.bytes) --open;
    }
    if (empty_message) messages.emplace_back();
  }
  RunUpload(messages);
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
  if (size < 1 || size > (size_t{1} << 20)) return -1;
  const uint8_t mode = data[0];
  const bool put = (mode & 2) != 0;
  if ((mode & 1) == 0) {
    if (put) {
      medakv::RunStream<v1::PutCacheRequest>(data + 1, size - 1);
    } else {
      medakv::RunStream<v1::CompressRequest>(data + 1, size - 1);
    }
  } else {
    FuzzedDataProvider p(data + 1, size - 1);
    if (put) {
      medakv::RunStructured<v1::PutCacheRequest>(p);
    } else {
      medakv::RunStructured<v1::CompressRequest>(p);
    }
  }
  return 0;
}
