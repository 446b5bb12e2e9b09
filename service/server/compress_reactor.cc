// The Compress stream: header -> slot -> chunks -> compute -> results.
#include <chrono>
#include <deque>
#include <optional>
#include <vector>

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
  CompressReactor(ServiceContext* ctx, grpc::CallbackServerContext* context, Caller caller)
      : ctx_(ctx),
        context_(context),
        call_(ctx->metrics, Method::kCompress),
        regions_(&ctx->shm, std::move(caller.shm_access), caller.tenant.value_or("")),
        idle_(ctx->idle.Watch([this] { OnIdle(); })) {
    call_.set_log(&ctx->log, caller.peer, caller.tenant.value_or(""));
    ctx_->inflight.fetch_add(1);
    if (!caller.tenant.ok()) {
      Fail(caller.tenant.status());
      return;
    }
    idle_->SetWaiting(true);
    StartRead(&request_);
  }

  void OnReadDone(bool ok) override {
    idle_->Progress();
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
    idle_->SetWaiting(false);
    if (!ok) cancelled_.store(true);  // stops a compression still running
    Pump([&] {
      writing_ = false;
      if (!ok && !pending_.has_value()) {
        pending_ = grpc::Status(grpc::StatusCode::CANCELLED, "the client went away during the download");
      }
    });
  }

  void OnCancel() override {
    cancelled_.store(true);
    slot_.Cancel();
  }

  void OnDone() override {
    ctx_->idle.Release(idle_);  // after this the watchdog does not touch the reactor
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
    // Probe rows after the cache (a reconstruction pass, a question asked later): rows that attend keys
    // outside the cache, or that outnumber the tokens.
    absl::StatusOr<ResolvedPolicy> policy =
        ctx_->presets->Resolve(h.policy(), spec->has_query_outside_lse || spec->q_tokens > spec->tokens);
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
    // Frees the header's memory (Clear would keep its repeated fields' for
    // reuse): a call waiting for a slot holds only its spec.
    v1::CompressRequest().Swap(&request_);
    queue_start_ = Clock::now();
    idle_->SetWaiting(false);  // waiting for a slot is bounded by --queue_timeout
    held_.Hold(&ctx_->held_queued_bytes, static_cast<int64_t>(sizeof(CacheSpec) + sizeof(CompressReactor) +
                                                             spec_->visual_spans.size() * sizeof(ModalitySpan)));
    // OnSlot may run (and finish the call) before Request returns: nothing after it.
    slot_.Request([this](absl::Status s) { OnSlot(std::move(s)); });
  }

  void OnSlot(absl::Status s) {
    call_.QueueWait(SecondsSince(queue_start_));
    held_.Reset();
    if (!s.ok()) return Fail(s);
    held_.Hold(&ctx_->held_inflight_bytes, TotalBytes(*spec_).value_or(0));
    if (cancelled_.load()) return Fail(absl::CancelledError("cancelled while waiting for a slot"));
    absl::StatusOr<CacheAssembler> assembler = CacheAssembler::Create(*spec_);
    if (!assembler.ok()) return Fail(assembler.status());
    assembler_.emplace(*std::move(assembler));
    receive_start_ = Clock::now();
    idle_->SetWaiting(true);
    StartRead(&request_);
  }

  void ReceiveDone() {
    idle_->SetWaiting(false);
    if (absl::Status s = assembler_->Finish(); !s.ok()) return Fail(s);
    receive_seconds_ = SecondsSince(receive_start_);
    call_.ObserveStage(Stage::kReceive, receive_seconds_);
    ctx_->pool.Submit([this] { Compute(); });
  }

  // Runs on a worker. Without an output area the results are streamed layer
  // by layer as the compression completes them (PushLayer); with one they
  // are written into it once all are known (its size was checked against the
  // results' before anything is written).
  void Compute() {
    const bool streaming = output_region_ == nullptr;
    Pump([&] {
      computing_ = true;
      if (streaming) stream_.emplace(std::vector<LayerSlices>{}, chunk_bytes_);
    });
    const LayerCallback on_layer = [this](int64_t layer, LayerResult& r) { return PushLayer(layer, r); };
    absl::StatusOr<CompressResult> result = medakv::Compress(assembler_->input(), options_, *ctx_->backend,
                                                             &cancelled_, nullptr, streaming ? &on_layer : nullptr);
    bytes_in_ = assembler_->bytes_received();
    assembler_.reset();  // the request's tensors are no longer needed
    absl::Status status = result.status();
    v1::StageTimes times;
    std::vector<LayerSlices> slices;
    if (result.ok()) {
      call_.ObserveStage(Stage::kStatistics, result->seconds.statistics);
      call_.ObserveStage(Stage::kAllocate, result->seconds.allocate);
      call_.ObserveStage(Stage::kSelectMerge, result->seconds.select_merge);
      call_.Compression(options_.policy, *result, spec_->tokens);
      times.set_receive_seconds(receive_seconds_);
      times.set_statistics_seconds(result->seconds.statistics);
      times.set_allocate_seconds(result->seconds.allocate);
      times.set_select_merge_seconds(result->seconds.select_merge);
      if (!streaming) {
        slices = SlicesOf(*result);  // views of the buffers, which moving the result keeps
        status = WriteResults(slices, *output_region_, output_, "header.output");
      }
    }
    // The last use of the reactor by this thread: once computing_ is false the
    // call may finish (and the reactor go) on a gRPC thread.
    Pump([&] {
      computing_ = false;
      if (!status.ok()) {
        if (!pending_.has_value()) pending_ = ToGrpc(status);
        return;
      }
      result_ = *std::move(result);
      summary_times_ = times;
      compute_ok_ = true;
      if (!streaming) {
        stream_.emplace(std::move(slices), chunk_bytes_);
        stream_->UseSharedMemory(output_.region(), output_.offset());
        send_start_ = Clock::now();
      }
    });
  }

  // A layer's result is complete (on the worker): queue it for sending.
  absl::Status PushLayer(int64_t layer, LayerResult& r) {
    if (cancelled_.load()) return absl::CancelledError("cancelled during the compression");
    bool ending = false;
    Pump([&] {
      if (pending_.has_value()) {
        ending = true;
        return;
      }
      if (ready_.empty() && sent_layers_ == 0) send_start_ = Clock::now();
      ready_.push_back(std::move(r));
      stream_->Append(SliceOf(static_cast<int32_t>(layer), ready_.back()));
    });
    return ending ? absl::CancelledError("the call is ending") : absl::OkStatus();
  }

  // Runs `update` under mu_, then starts the next write (a result message,
  // or the summary once the compression is done) unless one is in flight,
  // or finishes the call once nothing is in flight and the worker is done
  // with the reactor: with the pending error, or OK after the summary. Any
  // thread; the caller must not touch the reactor after a Pump that may
  // finish (a worker's Pumps cannot while computing_ is set).
  template <typename Update>
  void Pump(Update&& update) {
    bool write = false;
    std::optional<grpc::Status> finish;
    std::vector<LayerResult> sent;  // freed after the lock
    {
      absl::MutexLock lock(&mu_);
      update();
      if (writing_ || finished_) return;
      if (pending_.has_value()) {
        if (computing_) return;
        finished_ = true;
        finish = pending_;
      } else if (stream_.has_value()) {
        // Layers whose every message went out: their buffers can go.
        while (!ready_.empty() && sent_layers_ < stream_->layers_done()) {
          sent.push_back(std::move(ready_.front()));
          ready_.pop_front();
          ++sent_layers_;
        }
        response_.Clear();
        if (stream_->Next(&response_)) {
          call_.SentSoFar(stream_->bytes_sent());
          write = true;
        } else if (!computing_ && compute_ok_ && !summary_sent_) {
          FillSummary();
          summary_sent_ = true;
          write = true;
        } else if (summary_sent_) {
          finished_ = true;
          finish = grpc::Status::OK;
        }
        writing_ = write;
      }
    }
    if (write) {
      idle_->SetWaiting(true);
      StartWrite(&response_);
    } else if (finish.has_value()) {
      End(*finish);
    }
  }

  void FillSummary() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
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
  }

  // Ends the call with `s` (through Pump, so that the call is finished once
  // whoever fails it: a gRPC thread, the worker or the idle watchdog).
  void Fail(const absl::Status& s) {
    assembler_.reset();
    Pump([&] {
      if (!pending_.has_value()) pending_ = ToGrpc(s);
    });
  }

  // The idle watchdog's `expire` (service/server/idle.h): the client stalled
  // during the upload (the call finishes now) or stopped reading the results
  // (a write is pending and cannot complete: the call is cancelled, and ends
  // once the write fails). The reactor is alive while this runs.
  void OnIdle() {
    bool cancel = false;
    Pump([&] {
      if (!pending_.has_value()) {
        pending_ = grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED,
                                ctx_->idle.Message(writing_ ? "sending the results" : "receiving the request"));
      }
      cancel = writing_;
    });
    if (cancel) {
      cancelled_.store(true);
      context_->TryCancel();
    }
  }

  // Records the request, then finishes the call (which may delete the reactor).
  void End(const grpc::Status& status) {
    call_.End(static_cast<absl::StatusCode>(status.error_code()), status.error_message());
    Finish(status);
  }

  ServiceContext* ctx_;
  grpc::CallbackServerContext* const context_;
  CallMetrics call_;
  v1::CompressRequest request_;
  v1::CompressResponse response_;
  std::atomic<bool> cancelled_{false};
  SlotClaim slot_{&ctx_->admission};  // released when the reactor is deleted
  HeldBytes held_;  // the request's bytes while admitted, its header's while queued
  std::optional<CacheSpec> spec_;
  CompressOptions options_;
  std::string preset_;  // the preset that gave options_ (empty: none)
  int64_t chunk_bytes_ = 0;
  CallRegions regions_;  // held until the call ends
  const std::shared_ptr<IdleWatch> idle_;
  const MappedRegion* output_region_ = nullptr;  // set: results go into output_
  v1::SharedMemoryRef output_;
  std::optional<CacheAssembler> assembler_;
  int64_t bytes_in_ = 0;
  double receive_seconds_ = 0;
  Clock::time_point queue_start_, receive_start_;
  // The results and their sending, shared by the worker (Compute, PushLayer)
  // and gRPC's threads (OnWriteDone).
  absl::Mutex mu_;
  std::optional<ResultStream> stream_ ABSL_GUARDED_BY(mu_);
  std::deque<LayerResult> ready_ ABSL_GUARDED_BY(mu_);  // streamed layers not all sent yet (their buffers)
  size_t sent_layers_ ABSL_GUARDED_BY(mu_) = 0;         // layers sent and freed
  CompressResult result_ ABSL_GUARDED_BY(mu_);          // the summary's figures (and, with an output area, the layers)
  v1::StageTimes summary_times_ ABSL_GUARDED_BY(mu_);
  Clock::time_point send_start_ ABSL_GUARDED_BY(mu_);
  bool computing_ ABSL_GUARDED_BY(mu_) = false;   // the worker may still use the reactor
  bool compute_ok_ ABSL_GUARDED_BY(mu_) = false;  // every layer is known
  bool writing_ ABSL_GUARDED_BY(mu_) = false;     // a StartWrite is in flight
  bool summary_sent_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  std::optional<grpc::Status> pending_ ABSL_GUARDED_BY(mu_);  // the error to finish with (the first)
};

}  // namespace

grpc::ServerBidiReactor<v1::CompressRequest, v1::CompressResponse>* MedakvService::Compress(
    grpc::CallbackServerContext* context) {
  return new CompressReactor(ctx_, context, Identify(*context, *ctx_));
}

}  // namespace medakv::server
