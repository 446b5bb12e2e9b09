// The cache store RPCs: PutCache, CompressCache, GetCache, DeleteCache,
// ListCaches and Stats.
#include <chrono>
#include <numeric>
#include <optional>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "kernels/common/status.h"
#include "service/server/assembler.h"
#include "service/server/convert.h"
#include "service/server/result_stream.h"
#include "service/server/service.h"
#include "service/server/shared_memory.h"

namespace medakv::server {
namespace {

using Clock = std::chrono::steady_clock;

// A ListCaches page ends before its CacheInfo messages pass this (well under
// gRPC's default 4 MiB receive limit of clients).
constexpr int64_t kListPageBytes = int64_t{2} << 20;

double SecondsSince(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

int64_t UnixMs(absl::Time t) { return t == absl::InfiniteFuture() ? 0 : absl::ToUnixMillis(t); }

void ToProto(const CacheSummary& s, v1::CacheInfo* info) {
  info->set_cache_id(s.id);
  v1::CacheShape* shape = info->mutable_shape();
  const CacheDescription& d = s.description;
  shape->set_layers(static_cast<int32_t>(d.layers));
  shape->set_kv_heads(static_cast<int32_t>(d.kv_heads));
  shape->set_q_heads(static_cast<int32_t>(d.q_heads));
  shape->set_head_dim(static_cast<int32_t>(d.head_dim));
  shape->set_tokens(d.tokens);
  shape->set_dtype(DTypeToProto(d.dtype));
  shape->set_layout(LayoutToProto(d.layout));
  for (const ModalitySpan& span : d.modality) {
    v1::ModalitySpan* m = shape->add_modality();
    m->set_start(span.start);
    m->set_length(span.length);
    m->set_modality(span.modality == Modality::kVisual ? v1::MODALITY_VISUAL : v1::MODALITY_TEXT);
  }
  info->set_bytes(s.bytes);
  for (int64_t t : s.layer_tokens) info->add_layer_tokens(t);
  info->set_compressed(s.compressed);
  info->set_policy(s.policy);
  info->set_created_unix_ms(absl::ToUnixMillis(s.created));
  info->set_expires_unix_ms(UnixMs(s.expires));
  info->set_tier(TierName(s.tier));
}

absl::Status WithField(const absl::Status& s, absl::string_view field) {
  return absl::Status(s.code(), absl::StrCat(field, ": ", s.message()));
}

// A stored cache built from a completed upload (tensors copied into the entry).
std::unique_ptr<StoredCache> StoredFromUpload(const CacheAssembler& a, const std::string& tenant,
                                              const std::string& id) {
  const CacheSpec& spec = a.spec();
  auto cache = std::make_unique<StoredCache>();
  cache->tenant = tenant;
  cache->id = id;
  CacheDescription& d = cache->description;
  d.layers = spec.layers;
  d.kv_heads = spec.kv_heads;
  d.q_heads = spec.q_heads;
  d.head_dim = spec.head_dim;
  d.tokens = spec.tokens;
  d.dtype = spec.dtype;
  d.layout = spec.layout;
  d.modality = spec.visual_spans;
  cache->stats = spec.stats == SpecStats::kQueries       ? KeptStats::kQueries
                 : spec.stats == SpecStats::kPrecomputed ? KeptStats::kPrecomputed
                                                         : KeptStats::kNone;
  cache->q_tokens = spec.q_tokens;
  cache->score_heads = spec.score_heads;
  auto bytes = [&](int64_t l, v1::TensorKind k) {
    const absl::string_view t = a.tensor(l, k);
    return std::vector<uint8_t>(t.begin(), t.end());
  };
  cache->layers.resize(spec.layers);
  for (int64_t l = 0; l < spec.layers; ++l) {
    StoredLayer& s = cache->layers[l];
    s.key = bytes(l, v1::TENSOR_KIND_KEY);
    s.value = bytes(l, v1::TENSOR_KIND_VALUE);
    s.tokens = spec.tokens;
    s.positions.resize(spec.kv_heads * spec.tokens);
    for (int64_t h = 0; h < spec.kv_heads; ++h) {
      std::iota(s.positions.begin() + h * spec.tokens, s.positions.begin() + (h + 1) * spec.tokens, 0);
    }
    const LayerInput& in = a.input().layers[l];
    if (spec.stats == SpecStats::kQueries) {
      s.query = bytes(l, v1::TENSOR_KIND_QUERY);
      s.query_positions = in.query_positions;
      s.query_outside_lse = in.query_outside_lse;
    } else if (spec.stats == SpecStats::kPrecomputed) {
      s.scores.assign(in.scores, in.scores + spec.score_heads * spec.tokens);
      s.score_entropy = in.entropy;
    }
  }
  cache->bytes = cache->ComputeBytes();
  return cache;
}

// ---- PutCache -------------------------------------------------------------------

class PutReactor final : public grpc::ServerReadReactor<v1::PutCacheRequest> {
 public:
  PutReactor(ServiceContext* ctx, v1::PutCacheResponse* response, Caller caller)
      : ctx_(ctx),
        call_(ctx->metrics, Method::kPutCache),
        response_(response),
        tenant_(caller.tenant.value_or("")),
        regions_(&ctx->shm, std::move(caller.shm_access), tenant_),
        idle_(ctx->idle.Watch([this] { OnIdle(); })) {
    call_.set_log(&ctx->log, caller.peer, tenant_);
    if (!caller.tenant.ok()) {
      Fail(caller.tenant.status());
      return;
    }
    idle_->SetWaiting(true);
    StartRead(&request_);
  }

  void OnReadDone(bool ok) override {
    idle_->Progress();
    if (!ok) {
      idle_->SetWaiting(false);
      if (cancelled_.load()) return Fail(absl::CancelledError("cancelled during the upload"));
      if (!assembler_) return Fail(absl::InvalidArgumentError("the stream ended before the header"));
      if (absl::Status s = assembler_->Finish(); !s.ok()) return Fail(s);
      if (absl::Status s = GrowTo(final_bytes_); !s.ok()) return Fail(s);
      call_.ObserveStage(Stage::kReceive, SecondsSince(receive_start_));
      ctx_->pool.Submit([this] { Commit(); });
      return;
    }
    if (!assembler_) return OnHeader();
    if (absl::Status s = regions_.AddChunkMessage(request_, &*assembler_); !s.ok()) return Fail(s);
    // Store space is held as the bytes arrive: a header alone evicts nothing.
    if (absl::Status s = GrowTo(std::min(final_bytes_, assembler_->bytes_received())); !s.ok()) return Fail(s);
    call_.ReceivedSoFar(assembler_->bytes_received());
    request_.Clear();
    StartRead(&request_);
  }

  void OnCancel() override { cancelled_.store(true); }
  void OnDone() override {
    ctx_->idle.Release(idle_);  // after this the watchdog does not touch the reactor
    delete this;
  }

 private:
  void OnHeader() {
    if (!request_.has_header()) return Fail(absl::InvalidArgumentError("the first message must be a header"));
    const v1::PutCacheHeader& h = request_.header();
    if (absl::Status s = ValidateCacheId(h.cache_id()); !s.ok()) return Fail(WithField(s, "header.cache_id"));
    if (h.ttl_seconds() < 0) {
      return Fail(absl::InvalidArgumentError(absl::StrCat("header.ttl_seconds must be >= 0, got ", h.ttl_seconds())));
    }
    absl::StatusOr<CacheSpec> spec = SpecFromHeader(h, ctx_->options.max_request_bytes);
    if (!spec.ok()) return Fail(spec.status());
    if (!h.overwrite() && ctx_->store.Contains(tenant_, h.cache_id())) {  // early: before the bytes travel
      return Fail(absl::AlreadyExistsError(
          absl::StrCat("cache '", h.cache_id(), "' exists (set overwrite to replace it)")));
    }
    absl::StatusOr<int64_t> total = TotalBytes(*spec);
    if (!total.ok()) return Fail(total.status());
    // The entry also keeps int32 positions per kv head and token, and its spans.
    const int64_t positions = spec->layers * spec->kv_heads * spec->tokens * 4;
    final_bytes_ = *total + positions + static_cast<int64_t>(spec->visual_spans.size() * sizeof(ModalitySpan));
    absl::StatusOr<Reservation> reservation = ReserveFor(h.tier(), final_bytes_);
    if (!reservation.ok()) return Fail(reservation.status());
    auto_tier_ = h.tier() == v1::CACHE_TIER_AUTO;
    absl::StatusOr<CacheAssembler> assembler = CacheAssembler::Create(*spec);
    if (!assembler.ok()) return Fail(assembler.status());
    id_ = h.cache_id();
    overwrite_ = h.overwrite();
    ttl_ = absl::Seconds(h.ttl_seconds());
    reservation_.emplace(*std::move(reservation));
    assembler_.emplace(*std::move(assembler));
    receive_start_ = Clock::now();
    v1::PutCacheRequest().Swap(&request_);  // frees the header's memory (Clear would keep it)
    StartRead(&request_);
  }

  // An empty reservation in the tier the header asks for (CacheTier in the
  // proto) for an entry of `bytes`, which GrowTo fills as the bytes arrive;
  // RESOURCE_EXHAUSTED at once when the entry cannot fit the tier at all.
  absl::StatusOr<Reservation> ReserveFor(v1::CacheTier tier, int64_t bytes) {
    const bool device = ctx_->store.has_tier(Tier::kDevice);
    auto in = [&](Tier t) -> absl::StatusOr<Reservation> {
      MEDAKV_RETURN_IF_ERROR(ctx_->store.CheckFits(t, bytes));
      return ctx_->store.Reserve(t, 0);
    };
    switch (tier) {
      case v1::CACHE_TIER_AUTO:
        if (device && bytes <= ctx_->store.capacity(Tier::kDevice)) return in(Tier::kDevice);
        return in(Tier::kHost);
      case v1::CACHE_TIER_HOST:
        return in(Tier::kHost);
      case v1::CACHE_TIER_DEVICE:
        if (!device) {
          return absl::FailedPreconditionError(
              "header.tier: CACHE_TIER_DEVICE, but this server has no device tier (it needs the cuda backend and "
              "--device_cache_bytes > 0)");
        }
        return in(Tier::kDevice);
      default:
        return absl::InvalidArgumentError(absl::StrCat("header.tier: unknown value ", static_cast<int>(tier)));
    }
  }

  // Grows the reservation to `bytes`; with CACHE_TIER_AUTO, a device tier
  // that cannot make room hands over to the host tier (the bytes are on the
  // host until the commit).
  absl::Status GrowTo(int64_t bytes) {
    absl::Status s = ctx_->store.Grow(*reservation_, bytes);
    if (s.ok() || !auto_tier_ || reservation_->tier() != Tier::kDevice ||
        s.code() != absl::StatusCode::kResourceExhausted || bytes > ctx_->store.capacity(Tier::kHost)) {
      return s;
    }
    absl::StatusOr<Reservation> host = ctx_->store.Reserve(Tier::kHost, bytes);
    if (!host.ok()) return host.status();
    reservation_.emplace(*std::move(host));  // the device bytes go back
    return absl::OkStatus();
  }

  // The idle watchdog's `expire`: the client stalled during the upload (a
  // read is pending). The reactor is alive while this runs.
  void OnIdle() { End(grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED, ctx_->idle.Message("receiving the cache"))); }

  void Commit() {
    std::unique_ptr<StoredCache> cache = StoredFromUpload(*assembler_, tenant_, id_);
    assembler_.reset();
    if (reservation_->tier() == Tier::kDevice) {
      absl::StatusOr<std::unique_ptr<StoredCache>> moved = MoveToDevice(std::move(cache), *ctx_->device_memory);
      if (!moved.ok()) return Fail(moved.status());
      cache = *std::move(moved);
    }
    absl::StatusOr<CacheSummary> summary = ctx_->store.Commit(std::move(*reservation_), std::move(cache), overwrite_, ttl_);
    reservation_.reset();
    if (!summary.ok()) return Fail(summary.status());
    ToProto(*summary, response_->mutable_info());
    End(grpc::Status::OK);
  }

  void Fail(const absl::Status& s) {
    assembler_.reset();
    reservation_.reset();  // releases the bytes
    End(ToGrpc(s));
  }

  // Records the request, then finishes the call (which may delete the
  // reactor); once only, whoever ends it (a gRPC thread, the worker, the
  // idle watchdog).
  void End(const grpc::Status& status) {
    if (ended_.exchange(true)) return;
    call_.End(static_cast<absl::StatusCode>(status.error_code()), status.error_message());
    Finish(status);
  }

  ServiceContext* ctx_;
  CallMetrics call_;
  v1::PutCacheResponse* response_;
  v1::PutCacheRequest request_;
  std::atomic<bool> cancelled_{false};
  const std::string tenant_;
  CallRegions regions_;  // held until the call ends
  std::optional<CacheAssembler> assembler_;
  std::optional<Reservation> reservation_;
  int64_t final_bytes_ = 0;  // the entry's bytes, reserved once all arrived
  bool auto_tier_ = false;
  std::atomic<bool> ended_{false};
  const std::shared_ptr<IdleWatch> idle_;
  std::string id_;
  bool overwrite_ = false;
  absl::Duration ttl_;
  Clock::time_point receive_start_;
};

// ---- CompressCache ------------------------------------------------------------------

class CompressCacheReactor final : public grpc::ServerUnaryReactor {
 public:
  CompressCacheReactor(ServiceContext* ctx, const v1::CompressCacheRequest* request,
                       v1::CompressCacheResponse* response, absl::StatusOr<std::string> tenant, std::string peer)
      : ctx_(ctx), call_(ctx->metrics, Method::kCompressCache), request_(request), response_(response) {
    call_.set_log(&ctx->log, std::move(peer), tenant.value_or(""));
    if (!tenant.ok()) {
      Fail(tenant.status());
      return;
    }
    tenant_ = *std::move(tenant);
    if (absl::Status s = ValidateCacheId(request->cache_id()); !s.ok()) {
      Fail(WithField(s, "cache_id"));
      return;
    }
    absl::StatusOr<ResolvedPolicy> policy = ctx_->presets->Resolve(request->policy());
    if (!policy.ok()) {
      Fail(policy.status());
      return;
    }
    options_ = policy->options;
    preset_ = policy->preset;
    call_.set_policy(options_.policy);
    call_.set_preset(preset_);
    queue_start_ = Clock::now();
    // OnSlot may run (and finish the call) before Request returns: nothing after it.
    slot_.Request([this](absl::Status s) { OnSlot(std::move(s)); });
  }

  void OnCancel() override {
    cancelled_.store(true);
    slot_.Cancel();
  }

  void OnDone() override {
    delete this;
  }

 private:
  void OnSlot(absl::Status s) {
    call_.QueueWait(SecondsSince(queue_start_));
    if (!s.ok()) return Fail(s);
    ctx_->pool.Submit([this] { Compute(); });
  }

  void Compute() {
    absl::StatusOr<std::shared_ptr<const StoredCache>> entry = ctx_->store.Get(tenant_, request_->cache_id());
    if (!entry.ok()) return Fail(entry.status());
    if (absl::Status s = CheckCompressible(**entry); !s.ok()) return Fail(s);
    const StoredCache& stored = **entry;
    if (stored.q_tokens > stored.description.tokens ||
        (!stored.layers.empty() && !stored.layers[0].query_outside_lse.empty())) {
      // Stored with probe rows: a request that names no policy gets that setting's default.
      absl::StatusOr<ResolvedPolicy> policy = ctx_->presets->Resolve(request_->policy(), /*reconstruction=*/true);
      if (!policy.ok()) return Fail(policy.status());
      options_ = policy->options;
      preset_ = policy->preset;
      call_.set_policy(options_.policy);
      call_.set_preset(preset_);
    }
    // A device entry is compressed from a host copy (the backend's ops take
    // host memory) and its result goes back to the device.
    std::unique_ptr<StoredCache> host_copy;
    if ((*entry)->on_device()) {
      absl::StatusOr<std::unique_ptr<StoredCache>> copy = HostCopy(**entry);
      if (!copy.ok()) return Fail(copy.status());
      host_copy = *std::move(copy);
    }
    absl::StatusOr<CacheInput> input = CompressionInput(host_copy != nullptr ? *host_copy : **entry);
    if (!input.ok()) return Fail(input.status());
    absl::StatusOr<CompressResult> result = medakv::Compress(*input, options_, *ctx_->backend, &cancelled_);
    if (!result.ok()) return Fail(result.status());
    call_.ObserveStage(Stage::kStatistics, result->seconds.statistics);
    call_.ObserveStage(Stage::kAllocate, result->seconds.allocate);
    call_.ObserveStage(Stage::kSelectMerge, result->seconds.select_merge);
    call_.Compression(options_.policy, *result, (*entry)->description.tokens);
    v1::CompressSummary* summary = response_->mutable_summary();
    summary->set_tokens_in(result->tokens_in);
    summary->set_tokens_kept(result->tokens_kept);
    summary->mutable_times()->set_statistics_seconds(result->seconds.statistics);
    summary->mutable_times()->set_allocate_seconds(result->seconds.allocate);
    summary->mutable_times()->set_select_merge_seconds(result->seconds.select_merge);
    summary->set_backend(ctx_->backend_name);
    *summary->mutable_policy() = PolicyToProto(options_);
    summary->mutable_policy()->set_preset(preset_);
    for (size_t l = 0; l < result->layers.size(); ++l) {
      medakv::ToProto(static_cast<int32_t>(l), result->layers[l], response_->add_layers());
    }
    host_copy.reset();
    std::unique_ptr<StoredCache> next = MakeCompressedCache(**entry, *std::move(result), PolicyName(options_.policy));
    if ((*entry)->on_device()) {
      absl::StatusOr<std::unique_ptr<StoredCache>> moved = MoveToDevice(std::move(next), *ctx_->device_memory);
      if (!moved.ok()) return Fail(moved.status());
      next = *std::move(moved);
    }
    const int64_t bytes_in = (*entry)->bytes;
    absl::StatusOr<CacheSummary> replaced = ctx_->store.Replace(*std::move(entry), std::move(next));
    if (!replaced.ok()) return Fail(replaced.status());
    summary->set_bytes_in(bytes_in);
    summary->set_bytes_out(replaced->bytes);
    ToProto(*replaced, response_->mutable_info());
    End(grpc::Status::OK);
  }

  void Fail(const absl::Status& s) { End(ToGrpc(s)); }

  // Records the request, then finishes the call (which may delete the reactor).
  void End(const grpc::Status& status) {
    call_.End(static_cast<absl::StatusCode>(status.error_code()), status.error_message());
    Finish(status);
  }

  ServiceContext* ctx_;
  CallMetrics call_;
  const v1::CompressCacheRequest* request_;
  v1::CompressCacheResponse* response_;
  std::string tenant_;
  CompressOptions options_;
  std::string preset_;  // the preset that gave options_ (empty: none)
  std::atomic<bool> cancelled_{false};
  SlotClaim slot_{&ctx_->admission};  // released when the reactor is deleted
  Clock::time_point queue_start_;
};

// ---- GetCache -------------------------------------------------------------------------

class GetReactor final : public grpc::ServerWriteReactor<v1::GetCacheResponse> {
 public:
  GetReactor(ServiceContext* ctx, grpc::CallbackServerContext* context, const v1::GetCacheRequest* request,
             Caller caller)
      : ctx_(ctx),
        context_(context),
        call_(ctx->metrics, Method::kGetCache),
        regions_(&ctx->shm, std::move(caller.shm_access), caller.tenant.value_or("")),
        idle_(ctx->idle.Watch([this] { OnIdle(); })) {
    call_.set_log(&ctx->log, caller.peer, caller.tenant.value_or(""));
    if (!caller.tenant.ok()) {
      End(ToGrpc(caller.tenant.status()));
      return;
    }
    const MappedRegion* output = nullptr;
    if (request->has_output()) {  // before the lookup, which counts as a use of the entry
      absl::StatusOr<const MappedRegion*> region = regions_.Check(request->output(), "output");
      if (!region.ok()) {
        End(ToGrpc(region.status()));
        return;
      }
      output = *region;
    }
    absl::StatusOr<std::shared_ptr<const StoredCache>> entry = ctx_->store.Get(*caller.tenant, request->cache_id());
    if (!entry.ok()) {
      End(ToGrpc(entry.status()));
      return;
    }
    entry_ = *std::move(entry);  // holding it keeps it from eviction until the download ends
    const int32_t layers = static_cast<int32_t>(entry_->layers.size());
    const int32_t begin = request->layer_begin();
    const int32_t end = request->layer_end() == 0 ? layers : request->layer_end();
    if (begin < 0 || begin >= end || end > layers) {
      End(ToGrpc(absl::InvalidArgumentError(absl::StrCat("layer range [", request->layer_begin(), ", ",
                                                            request->layer_end(), ") is not within [0, ", layers,
                                                            ") (layer_end 0 means every layer)"))));
      return;
    }
    absl::StatusOr<int64_t> chunk = ResponseChunkSize(request->max_response_chunk_bytes(), ctx_->options);
    if (!chunk.ok()) {
      End(ToGrpc(WithField(chunk.status(), "max_response_chunk_bytes")));
      return;
    }
    // A device entry's layers are read from host copies: into a shared-memory
    // output all at once, else one layer at a time as the stream reaches it
    // (OnWriteDone), so that the host holds one layer of it at most.
    const StoredCache* source = entry_.get();
    int32_t last = end;
    if (entry_->on_device()) {
      if (output == nullptr) last = begin + 1;
      absl::StatusOr<std::unique_ptr<StoredCache>> copy = HostCopy(*entry_, begin, last);
      if (!copy.ok()) {
        End(ToGrpc(copy.status()));
        return;
      }
      host_copy_ = *std::move(copy);
      source = host_copy_.get();
    }
    next_layer_ = last;
    end_layer_ = end;
    std::vector<LayerSlices> slices;
    for (int32_t l = begin; l < last; ++l) slices.push_back(Slices(*source, l));
    if (output != nullptr) {
      // A memcpy on this gRPC thread, as the byte path copies into messages here.
      if (absl::Status s = WriteResults(slices, *output, request->output(), "output"); !s.ok()) {
        End(ToGrpc(s));
        return;
      }
    }
    stream_.emplace(std::move(slices), *chunk);
    if (output != nullptr) stream_->UseSharedMemory(request->output().region(), request->output().offset());
    ToProto(Summarize(*entry_), response_.mutable_info());
    send_start_ = Clock::now();
    idle_->SetWaiting(true);
    StartWrite(&response_);
  }

  void OnWriteDone(bool ok) override {
    idle_->Progress();
    if (!ok) {
      End(idle_->expired() ? grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED, ctx_->idle.Message("sending the cache"))
                           : grpc::Status(grpc::StatusCode::CANCELLED, "the client went away during the download"));
      return;
    }
    response_.Clear();
    bool more = stream_->Next(&response_);
    if (!more && next_layer_ < end_layer_) {
      // The previous layer's bytes are in the messages already: its copy may go.
      absl::StatusOr<std::unique_ptr<StoredCache>> copy = HostCopy(*entry_, next_layer_, next_layer_ + 1);
      if (!copy.ok()) {
        End(ToGrpc(copy.status()));
        return;
      }
      host_copy_ = *std::move(copy);
      stream_->Append(Slices(*host_copy_, next_layer_++));
      more = stream_->Next(&response_);
    }
    if (more) {
      call_.SentSoFar(stream_->bytes_sent());
      StartWrite(&response_);
    } else {
      call_.ObserveStage(Stage::kSend, SecondsSince(send_start_));
      End(grpc::Status::OK);
    }
  }

  void OnDone() override {
    ctx_->idle.Release(idle_);  // after this the watchdog does not touch the reactor
    delete this;
  }

 private:
  // The idle watchdog's `expire`: the client does not read (a write is
  // pending, so the call cannot finish): cancel it; the write then fails
  // and OnWriteDone ends the call. The reactor is alive while this runs.
  void OnIdle() { context_->TryCancel(); }

  // Records the request, then finishes the call (which may delete the
  // reactor). No write is in flight: the entry is let go first, so that once
  // the client sees the end it no longer pins the entry (or its device
  // memory).
  void End(const grpc::Status& status) {
    idle_->SetWaiting(false);
    stream_.reset();
    host_copy_.reset();
    entry_.reset();
    call_.End(static_cast<absl::StatusCode>(status.error_code()), status.error_message());
    Finish(status);
  }

  ServiceContext* ctx_;
  grpc::CallbackServerContext* const context_;
  CallMetrics call_;
  CallRegions regions_;  // held until the call ends
  const std::shared_ptr<IdleWatch> idle_;
  std::shared_ptr<const StoredCache> entry_;
  static LayerSlices Slices(const StoredCache& cache, int32_t l) {
    const StoredLayer& s = cache.layers[l];
    return LayerSlices{l, s.tokens, s.entropy, s.alpha, s.key, s.value,
                       absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(s.positions.data()),
                                                 s.positions.size() * 4)};
  }

  std::unique_ptr<StoredCache> host_copy_;  // a device entry's layers (one, or all for shared memory), on the host
  int32_t next_layer_ = 0, end_layer_ = 0;  // the layers still to copy from the device
  std::optional<ResultStream> stream_;
  v1::GetCacheResponse response_;
  Clock::time_point send_start_;
};

}  // namespace

grpc::ServerReadReactor<v1::PutCacheRequest>* MedakvService::PutCache(grpc::CallbackServerContext* context,
                                                                       v1::PutCacheResponse* response) {
  return new PutReactor(ctx_, response, Identify(*context, *ctx_));
}

grpc::ServerUnaryReactor* MedakvService::CompressCache(grpc::CallbackServerContext* context,
                                                       const v1::CompressCacheRequest* request,
                                                       v1::CompressCacheResponse* response) {
  return new CompressCacheReactor(ctx_, request, response, CallerTenant(*context, *ctx_->auth), context->peer());
}

grpc::ServerWriteReactor<v1::GetCacheResponse>* MedakvService::GetCache(grpc::CallbackServerContext* context,
                                                                        const v1::GetCacheRequest* request) {
  return new GetReactor(ctx_, context, request, Identify(*context, *ctx_));
}

grpc::ServerUnaryReactor* MedakvService::DeleteCache(grpc::CallbackServerContext* context,
                                                     const v1::DeleteCacheRequest* request,
                                                     v1::DeleteCacheResponse* response) {
  CallMetrics call(ctx_->metrics, Method::kDeleteCache);
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  const absl::StatusOr<std::string> tenant = CallerTenant(*context, *ctx_->auth);
  call.set_log(&ctx_->log, context->peer(), tenant.value_or(""));
  if (!tenant.ok()) {
    FinishUnary(call, reactor, ToGrpc(tenant.status()));
    return reactor;
  }
  absl::StatusOr<int64_t> freed = ctx_->store.Delete(*tenant, request->cache_id());
  if (freed.ok()) response->set_bytes_freed(*freed);
  FinishUnary(call, reactor, ToGrpc(freed.status()));
  return reactor;
}

grpc::ServerUnaryReactor* MedakvService::ListCaches(grpc::CallbackServerContext* context,
                                                    const v1::ListCachesRequest* request,
                                                    v1::ListCachesResponse* response) {
  CallMetrics call(ctx_->metrics, Method::kListCaches);
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  const absl::StatusOr<std::string> tenant = CallerTenant(*context, *ctx_->auth);
  call.set_log(&ctx_->log, context->peer(), tenant.value_or(""));
  if (!tenant.ok()) {
    FinishUnary(call, reactor, ToGrpc(tenant.status()));
    return reactor;
  }
  if (request->limit() < 0) {
    FinishUnary(call, reactor,
                ToGrpc(absl::InvalidArgumentError(absl::StrCat("limit must be >= 0, got ", request->limit()))));
    return reactor;
  }
  if (!request->page_token().empty()) {
    if (absl::Status s = ValidateCacheId(request->page_token()); !s.ok()) {
      FinishUnary(call, reactor,
                  ToGrpc(absl::InvalidArgumentError(absl::StrCat(
                      "page_token: not a token from a previous page's next_page_token (", s.message(), ")"))));
      return reactor;
    }
  }
  // One more than the page, to know whether another follows; a page also
  // ends before its CacheInfo messages pass kListPageBytes.
  const int64_t limit = request->limit() == 0 ? 1000 : request->limit();
  const std::vector<CacheSummary> entries =
      ctx_->store.List(*tenant, request->prefix(), limit + 1, request->page_token());
  int64_t bytes = 0;
  for (const CacheSummary& s : entries) {
    if (response->caches_size() == limit) {
      response->set_next_page_token(response->caches(response->caches_size() - 1).cache_id());
      break;
    }
    v1::CacheInfo info;
    ToProto(s, &info);
    const int64_t size = static_cast<int64_t>(info.ByteSizeLong());
    if (response->caches_size() > 0 && bytes + size > kListPageBytes) {
      response->set_next_page_token(response->caches(response->caches_size() - 1).cache_id());
      break;
    }
    bytes += size;
    *response->add_caches() = std::move(info);
  }
  FinishUnary(call, reactor, grpc::Status::OK);
  return reactor;
}

grpc::ServerUnaryReactor* MedakvService::Stats(grpc::CallbackServerContext* context, const v1::StatsRequest* request,
                                               v1::StatsResponse* response) {
  CallMetrics call(ctx_->metrics, Method::kStats);
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  const absl::StatusOr<std::string> tenant = CallerTenant(*context, *ctx_->auth);
  call.set_log(&ctx_->log, context->peer(), tenant.value_or(""));
  if (!tenant.ok()) {
    FinishUnary(call, reactor, ToGrpc(tenant.status()));
    return reactor;
  }
  response->set_tenant(*tenant);
  response->set_shm_name_prefix(TenantShmPrefix(*tenant));
  for (const TierStats& t : ctx_->store.Stats()) {
    if (!ctx_->store.has_tier(t.tier)) continue;
    v1::TierStats* out = response->add_tiers();
    out->set_tier(TierName(t.tier));
    out->set_capacity_bytes(t.capacity_bytes);
    out->set_used_bytes(t.used_bytes);
    out->set_entries(t.entries);
    out->set_evictions(t.evictions());
  }
  response->set_inflight_compressions(ctx_->inflight.load());
  response->set_shared_memory_regions(ctx_->shm.regions());
  response->set_backend(ctx_->backend_name);
  response->set_version(MEDAKV_VERSION);
  FinishUnary(call, reactor, grpc::Status::OK);
  return reactor;
}

}  // namespace medakv::server
