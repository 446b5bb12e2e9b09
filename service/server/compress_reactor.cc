// The Compress stream: header -> slot -> chunks -> compute -> results.
#include <chrono>
#include <optional>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "service/compress/pipeline.h"
#include "service/server/assembler.h"
#include "service/server/convert.h"
#include "service/server/result_stream.h"
#include "service/server/service.h"
#include "service/server/shared_memory.h"

namespace medakv::server {
namespace {

using Clock = std::chrono::steady_clock;

double SecondsSince(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

class CompressReactor final : public grpc::ServerBidiReactor<v1::CompressRequest, v1::CompressResponse> {
 public:
  CompressReactor(ServiceContext* ctx, Caller caller)
      : ctx_(ctx),
        call_(ctx->metrics, Method::kCompress),
        regions_(&ctx->shm, std::move(caller.shm_access), caller.tenant.value_or("")) {
    ctx_->inflight.fetch_add(1);
    if (!caller.tenant.ok()) {
      Fail(caller.tenant.status());
      return;
    }
    StartRead(&request_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {  // the client closed its side (or the call is cancelled)
      if (cancelled_.load()) return Fail(absl::CancelledError("cancelled during the upload"));
      if (!spec_) return Fail(absl::InvalidArgumentError("the stream ended before the header"));
      return ReceiveDone();
    }
    if (!spec_) return OnHeader();
    if (absl::Status s = regions_.AddChunkMessage(request_, &*assembler_); !s.ok()) return Fail(s);
    call_.ReceivedSoFar(assembler_->bytes_received());
    request_.Clear();
    StartRead(&request_);
  }

  void OnWriteDone(bool ok) override {
    if (!ok) return Fail(absl::CancelledError("the client went away during the download"));
    WriteNext();
  }

  void OnCancel() override {
    cancelled_.store(true);
    slot_.Cancel();
  }

  void OnDone() override {
    ctx_->inflight.fetch_sub(1);
    delete this;
  }

 private:
  void OnHeader() {
    if (!request_.has_header()) return Fail(absl::InvalidArgumentError("the first message must be a header"));
    const v1::CompressHeader& h = request_.header();
    absl::StatusOr<CacheSpec> spec = SpecFromHeader(h, ctx_->options.max_request_bytes);
    if (!spec.ok()) return Fail(spec.status());
    if (h.stats() == v1::STATS_FORM_NONE) {
      return Fail(absl::InvalidArgumentError("header.stats: Compress needs queries or precomputed statistics"));
    }
    absl::StatusOr<ResolvedPolicy> policy = ctx_->presets->Resolve(h.policy());
    if (!policy.ok()) return Fail(policy.status());
    call_.set_policy(policy->options.policy);
    call_.set_preset(policy->preset);
    absl::StatusOr<int64_t> chunk = ResponseChunkSize(h.max_response_chunk_bytes(), ctx_->options);
    if (!chunk.ok()) return Fail(chunk.status());
    if (h.has_output()) {  // checked (and the region held) before the upload
      absl::StatusOr<const MappedRegion*> region = regions_.Check(h.output(), "header.output");
      if (!region.ok()) return Fail(region.status());
      output_region_ = *region;
      output_ = h.output();
    }
    chunk_bytes_ = *chunk;
    options_ = policy->options;
    preset_ = policy->preset;
    spec_ = *std::move(spec);
    request_.Clear();
    queue_start_ = Clock::now();
    // OnSlot may run (and finish the call) before Request returns: nothing after it.
    slot_.Request([this](absl::Status s) { OnSlot(std::move(s)); });
  }

  void OnSlot(absl::Status s) {
    call_.QueueWait(SecondsSince(queue_start_));
    if (!s.ok()) return Fail(s);
    if (cancelled_.load()) return Fail(absl::CancelledError("cancelled while waiting for a slot"));
    absl::StatusOr<CacheAssembler> assembler = CacheAssembler::Create(*spec_);
    if (!assembler.ok()) return Fail(assembler.status());
    assembler_.emplace(*std::move(assembler));
    receive_start_ = Clock::now();
    StartRead(&request_);
  }

  void ReceiveDone() {
    if (absl::Status s = assembler_->Finish(); !s.ok()) return Fail(s);
    receive_seconds_ = SecondsSince(receive_start_);
    call_.ObserveStage(Stage::kReceive, receive_seconds_);
    ctx_->pool.Submit([this] { Compute(); });
  }

  void Compute() {
    absl::StatusOr<CompressResult> result =
        medakv::Compress(assembler_->input(), options_, *ctx_->backend, &cancelled_);
    bytes_in_ = assembler_->bytes_received();
    assembler_.reset();  // the request's tensors are no longer needed
    if (!result.ok()) return Fail(result.status());
    call_.ObserveStage(Stage::kStatistics, result->seconds.statistics);
    call_.ObserveStage(Stage::kAllocate, result->seconds.allocate);
    call_.ObserveStage(Stage::kSelectMerge, result->seconds.select_merge);
    call_.Compression(options_.policy, *result, spec_->tokens);
    v1::StageTimes times;
    times.set_receive_seconds(receive_seconds_);
    times.set_statistics_seconds(result->seconds.statistics);
    times.set_allocate_seconds(result->seconds.allocate);
    times.set_select_merge_seconds(result->seconds.select_merge);
    result_ = *std::move(result);
    std::vector<LayerSlices> slices = SlicesOf(result_);
    if (output_region_ != nullptr) {
      if (absl::Status s = WriteResults(slices, *output_region_, output_, "header.output"); !s.ok()) return Fail(s);
    }
    stream_.emplace(std::move(slices), chunk_bytes_);
    if (output_region_ != nullptr) stream_->UseSharedMemory(output_.region(), output_.offset());
    summary_times_ = times;
    send_start_ = Clock::now();
    WriteNext();
  }

  void WriteNext() {
    response_.Clear();
    if (stream_->Next(&response_)) {
      call_.SentSoFar(stream_->bytes_sent());
      StartWrite(&response_);
      return;
    }
    if (summary_sent_) return End(grpc::Status::OK);
    summary_sent_ = true;
    const double send_seconds = SecondsSince(send_start_);
    call_.ObserveStage(Stage::kSend, send_seconds);
    v1::CompressSummary* s = response_.mutable_summary();
    s->set_tokens_in(result_.tokens_in);
    s->set_tokens_kept(result_.tokens_kept);
    s->set_bytes_in(bytes_in_);
    s->set_bytes_out(stream_->bytes_sent());
    *s->mutable_times() = summary_times_;
    s->mutable_times()->set_send_seconds(send_seconds);
    s->set_backend(ctx_->backend_name);
    *s->mutable_policy() = PolicyToProto(options_);
    s->mutable_policy()->set_preset(preset_);
    StartWrite(&response_);
  }

  void Fail(const absl::Status& s) {
    assembler_.reset();
    End(ToGrpc(s));
  }

  // Records the request, then finishes the call (which may delete the reactor).
  void End(const grpc::Status& status) {
    call_.End(static_cast<absl::StatusCode>(status.error_code()));
    Finish(status);
  }

  ServiceContext* ctx_;
  CallMetrics call_;
  v1::CompressRequest request_;
  v1::CompressResponse response_;
  std::atomic<bool> cancelled_{false};
  SlotClaim slot_{&ctx_->admission};  // released when the reactor is deleted
  std::optional<CacheSpec> spec_;
  CompressOptions options_;
  std::string preset_;  // the preset that gave options_ (empty: none)
  int64_t chunk_bytes_ = 0;
  CallRegions regions_;  // held until the call ends
  const MappedRegion* output_region_ = nullptr;  // set: results go into output_
  v1::SharedMemoryRef output_;
  std::optional<CacheAssembler> assembler_;
  CompressResult result_;
  std::optional<ResultStream> stream_;
  v1::StageTimes summary_times_;
  bool summary_sent_ = false;
  int64_t bytes_in_ = 0;
  double receive_seconds_ = 0;
  Clock::time_point queue_start_, receive_start_, send_start_;
};

}  // namespace

grpc::ServerBidiReactor<v1::CompressRequest, v1::CompressResponse>* MedakvService::Compress(
    grpc::CallbackServerContext* context) {
  return new CompressReactor(ctx_, Identify(*context, *ctx_));
}

}  // namespace medakv::server
