#include "client/cpp/remote.h"

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "service/server/convert.h"

namespace medakv {
namespace {

v1::TextPrior TextPriorProto(TextPrior p) {
  switch (p) {
    case TextPrior::kAdditive:
      return v1::TEXT_PRIOR_ADDITIVE;
    case TextPrior::kKeepAllText:
      return v1::TEXT_PRIOR_KEEP_ALL_TEXT;
    case TextPrior::kNone:
      return v1::TEXT_PRIOR_NONE;
  }
  return v1::TEXT_PRIOR_UNSPECIFIED;
}

v1::MergeMode MergeProto(MergeMode m) {
  switch (m) {
    case MergeMode::kAverage:
      return v1::MERGE_MODE_AVERAGE;
    case MergeMode::kPivotal:
      return v1::MERGE_MODE_PIVOTAL;
    case MergeMode::kWeighted:
      return v1::MERGE_MODE_WEIGHTED;
    case MergeMode::kNone:
      return v1::MERGE_MODE_NONE;
  }
  return v1::MERGE_MODE_UNSPECIFIED;
}

void FillSelect(const CompressOptions& o, v1::SelectOptions* s) {
  s->set_recent_fraction(o.recent_fraction);
  s->set_text_prior(TextPriorProto(o.text_prior));
  s->set_shared_selection(o.shared_selection);
  s->set_merge(MergeProto(o.merge));
  s->set_merge_threshold(o.merge_threshold == MergeThreshold::kMean ? v1::MERGE_THRESHOLD_MEAN
                                                                    : v1::MERGE_THRESHOLD_NONE);
  s->set_scale(o.scale);
}

grpc::Status Unavailable(const char* what) { return grpc::Status(grpc::StatusCode::UNAVAILABLE, what); }

absl::Status FromGrpc(const grpc::Status& s) {
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
}

}  // namespace

v1::Policy PolicyToProto(const CompressOptions& o) {
  v1::Policy p;
  p.set_rho(o.budget.rho);
  switch (o.policy) {
    case PolicyKind::kFull:
      p.mutable_full();
      break;
    case PolicyKind::kMeda: {
      v1::MedaPolicy* m = p.mutable_meda();
      m->set_tau(o.budget.tau);
      m->set_alpha_min(o.budget.alpha_min);
      m->set_alpha_max(o.budget.alpha_max);
      m->set_exact_total(o.budget.exact_total);
      m->set_entropy_heads(o.entropy_heads == EntropyHeads::kMeanEntropy ? v1::ENTROPY_HEADS_MEAN_ENTROPY
                                                                         : v1::ENTROPY_HEADS_MEAN_ATTENTION);
      m->set_entropy_source(o.entropy_source == EntropySource::kCausal ? v1::ENTROPY_SOURCE_CAUSAL
                                                                       : v1::ENTROPY_SOURCE_CROSS_MODAL);
      FillSelect(o, m->mutable_select());
      break;
    }
    case PolicyKind::kStreamingLlm:
      p.mutable_streaming_llm()->set_sinks(o.sinks);
      break;
    case PolicyKind::kH2O:
      FillSelect(o, p.mutable_h2o()->mutable_select());
      break;
    case PolicyKind::kSnapKV: {
      v1::SnapKVPolicy* s = p.mutable_snapkv();
      s->set_window(o.window);
      s->set_pool_kernel(o.pool_kernel);
      FillSelect(o, s->mutable_select());
      break;
    }
    case PolicyKind::kPyramidKV: {
      v1::PyramidKVPolicy* s = p.mutable_pyramidkv();
      s->set_window(o.window);
      s->set_pool_kernel(o.pool_kernel);
      s->set_beta(o.pyramid_beta);
      FillSelect(o, s->mutable_select());
      break;
    }
    case PolicyKind::kLookM:
      FillSelect(o, p.mutable_look_m()->mutable_select());
      break;
  }
  return p;
}

absl::StatusOr<RemoteResult> CompressRemote(v1::Medakv::StubInterface& stub, const CacheInput& in,
                                            const CompressOptions& options, const RemoteOptions& remote) {
  if (remote.chunk_bytes <= 0) return absl::InvalidArgumentError("chunk_bytes must be > 0");
  if (absl::Status s = ValidateCacheInput(in); !s.ok()) return s;
  grpc::ClientContext context;
  if (remote.timeout != absl::InfiniteDuration()) {
    context.set_deadline(std::chrono::system_clock::now() +
                         std::chrono::milliseconds(absl::ToInt64Milliseconds(remote.timeout)));
  }
  std::unique_ptr<grpc::ClientReaderWriterInterface<v1::CompressRequest, v1::CompressResponse>> stream =
      stub.Compress(&context);

  // Header.
  CacheSpec spec;
  spec.layers = static_cast<int64_t>(in.layers.size());
  spec.kv_heads = in.kv_heads;
  spec.q_heads = in.q_heads;
  spec.head_dim = in.head_dim;
  spec.tokens = in.tokens;
  spec.dtype = in.dtype;
  spec.layout = in.layout;
  spec.modality = in.modality;
  const bool queries = in.stats == StatsForm::kQueries;
  spec.stats = queries ? SpecStats::kQueries : SpecStats::kPrecomputed;
  if (queries) {
    spec.q_tokens = in.layers[0].query.tokens;
    spec.has_query_positions = !in.layers[0].query_positions.empty();
    for (const LayerInput& l : in.layers) {
      if (l.query.tokens != spec.q_tokens || l.query_positions.empty() == spec.has_query_positions) {
        return absl::InvalidArgumentError("the Compress API needs the same q_tokens (and positions) in every layer");
      }
    }
  } else {
    spec.score_heads = in.layers[0].score_heads;
  }
  v1::CompressRequest request;
  ToProto(spec, request.mutable_header());
  *request.mutable_header()->mutable_policy() = PolicyToProto(options);
  request.mutable_header()->set_max_response_chunk_bytes(remote.response_chunk_bytes);
  bool ok = stream->Write(request);

  auto send = [&](int32_t layer, v1::TensorKind kind, int64_t offset, const uint8_t* data, int64_t n) {
    request.Clear();
    v1::TensorChunk* c = request.mutable_chunk();
    c->set_layer(layer);
    c->set_tensor(kind);
    c->set_offset(offset);
    c->set_data(data, static_cast<size_t>(n));
    return stream->Write(request);
  };
  for (size_t l = 0; l < in.layers.size() && ok; ++l) {
    const LayerInput& layer = in.layers[l];
    const int32_t li = static_cast<int32_t>(l);
    ok = SendTensor(li, v1::TENSOR_KIND_KEY, layer.key.data, layer.key.NumBytes(), remote.chunk_bytes, send) &&
         SendTensor(li, v1::TENSOR_KIND_VALUE, layer.value.data, layer.value.NumBytes(), remote.chunk_bytes, send);
    if (ok && queries) {
      ok = SendTensor(li, v1::TENSOR_KIND_QUERY, layer.query.data, layer.query.NumBytes(), remote.chunk_bytes, send);
      if (ok && spec.has_query_positions) {
        ok = SendTensor(li, v1::TENSOR_KIND_QUERY_POSITIONS, layer.query_positions.data(),
                        static_cast<int64_t>(layer.query_positions.size() * sizeof(int32_t)), remote.chunk_bytes, send);
      }
    } else if (ok) {
      ok = SendTensor(li, v1::TENSOR_KIND_SCORES, layer.scores, layer.score_heads * in.tokens * 4, remote.chunk_bytes,
                      send) &&
           SendTensor(li, v1::TENSOR_KIND_ENTROPY, &layer.entropy, 4, remote.chunk_bytes, send);
    }
  }
  if (ok) stream->WritesDone();

  // Results: per layer an info, then key, value and positions chunks in order.
  RemoteResult out;
  out.result.layers.resize(in.layers.size());
  v1::CompressResponse response;
  bool summary = false;
  const int64_t row_bytes = in.head_dim * DTypeSize(in.dtype);
  while (stream->Read(&response)) {
    if (response.has_layer()) {
      const v1::LayerInfo& info = response.layer();
      if (info.layer() < 0 || info.layer() >= static_cast<int32_t>(in.layers.size()) || info.budget() < 1 ||
          info.budget() > in.tokens) {
        context.TryCancel();
        return absl::InternalError(absl::StrCat("server sent an invalid layer info: ", info.ShortDebugString()));
      }
      LayerResult& r = out.result.layers[info.layer()];
      r.budget = info.budget();
      r.entropy = info.entropy();
      r.alpha = info.alpha();
      r.key.resize(in.kv_heads * r.budget * row_bytes);
      r.value.resize(r.key.size());
      r.positions.resize(in.kv_heads * r.budget);
    } else if (response.has_chunk()) {
      const v1::TensorChunk& c = response.chunk();
      if (c.layer() < 0 || c.layer() >= static_cast<int32_t>(in.layers.size())) {
        context.TryCancel();
        return absl::InternalError("server sent a chunk of an unknown layer");
      }
      LayerResult& r = out.result.layers[c.layer()];
      uint8_t* base = c.tensor() == v1::TENSOR_KIND_KEY     ? r.key.data()
                      : c.tensor() == v1::TENSOR_KIND_VALUE ? r.value.data()
                      : c.tensor() == v1::TENSOR_KIND_POSITIONS ? reinterpret_cast<uint8_t*>(r.positions.data())
                                                                : nullptr;
      const int64_t size = c.tensor() == v1::TENSOR_KIND_POSITIONS ? static_cast<int64_t>(r.positions.size() * 4)
                                                                   : static_cast<int64_t>(r.key.size());
      if (base == nullptr || c.offset() < 0 || c.offset() + static_cast<int64_t>(c.data().size()) > size) {
        context.TryCancel();
        return absl::InternalError(absl::StrCat("server sent an invalid chunk (layer ", c.layer(), ", tensor ",
                                                c.tensor(), ", offset ", c.offset(), ")"));
      }
      std::memcpy(base + c.offset(), c.data().data(), c.data().size());
    } else if (response.has_summary()) {
      out.summary = response.summary();
      out.result.tokens_in = out.summary.tokens_in();
      out.result.tokens_kept = out.summary.tokens_kept();
      out.result.seconds = {out.summary.times().statistics_seconds(), out.summary.times().allocate_seconds(),
                            out.summary.times().select_merge_seconds()};
      summary = true;
    }
  }
  const grpc::Status status = stream->Finish();
  if (!status.ok()) return FromGrpc(status);
  if (!ok) return FromGrpc(Unavailable("the stream closed before the request was sent"));
  if (!summary) return absl::InternalError("the server ended the stream without a summary");
  return out;
}

}  // namespace medakv
