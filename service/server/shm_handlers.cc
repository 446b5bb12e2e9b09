// The shared-memory RPCs: RegisterSharedMemory (a lease stream) and
// UnregisterSharedMemory.
#include <memory>
#include <optional>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "service/server/service.h"
#include "service/server/shared_memory.h"

namespace medakv::server {
namespace {

using LeaseResponse = v1::RegisterSharedMemoryResponse;

// The end of a lease stream, shared by the reactor and the registry's revoke
// callback, which may run on any thread and outlive the reactor: Finish is
// called exactly once, and never while the one write is in flight (then the
// status waits for OnWriteDone). The reactor pointer is used only before
// Finish, so it is alive whenever it is used.
class LeaseEnd {
 public:
  // `call` belongs to the reactor: the status is recorded there just before Finish.
  LeaseEnd(grpc::ServerWriteReactor<LeaseResponse>* reactor, CallMetrics* call) : reactor_(reactor), call_(call) {}

  // Ends the stream with `status` (the first status wins).
  void End(const grpc::Status& status) {
    {
      absl::MutexLock lock(&mu_);
      if (finished_ || pending_.has_value()) return;
      if (writing_) {
        pending_ = status;
        return;
      }
      finished_ = true;
    }
    call_->End(static_cast<absl::StatusCode>(status.error_code()), status.error_message());
    reactor_->Finish(status);  // may run OnDone (and delete the reactor) at once
  }

  // The response was written (ok) or could not be (the client went away).
  void WriteDone(bool ok) {
    std::optional<grpc::Status> status;
    {
      absl::MutexLock lock(&mu_);
      writing_ = false;
      if (!ok && !pending_.has_value()) {
        pending_ = grpc::Status(grpc::StatusCode::CANCELLED, "the client went away");
      }
      if (pending_.has_value() && !finished_) {
        finished_ = true;
        status = pending_;
      }
    }
    if (status.has_value()) {
      call_->End(static_cast<absl::StatusCode>(status->error_code()), status->error_message());
      reactor_->Finish(*status);
    }
  }

 private:
  grpc::ServerWriteReactor<LeaseResponse>* const reactor_;
  CallMetrics* const call_;
  absl::Mutex mu_;
  bool writing_ = true;  // the response is written first thing
  bool finished_ = false;
  std::optional<grpc::Status> pending_;
};

class LeaseReactor final : public grpc::ServerWriteReactor<LeaseResponse> {
 public:
  LeaseReactor(ServiceContext* ctx, const v1::RegisterSharedMemoryRequest& request, Caller caller)
      : ctx_(ctx),
        call_(ctx->metrics, Method::kRegisterSharedMemory),
        region_(request.region()),
        tenant_(caller.tenant.value_or("")),
        end_(std::make_shared<LeaseEnd>(this, &call_)) {
    call_.set_log(&ctx->log, caller.peer, tenant_);
    const absl::Status refused = !caller.tenant.ok() ? caller.tenant.status() : caller.shm_access;
    if (!refused.ok()) {
      End(ToGrpc(refused));
      return;
    }
    std::weak_ptr<LeaseEnd> end = end_;
    absl::StatusOr<uint64_t> lease = ctx_->shm.Register(
        request,
        [end](const absl::Status& s) {
          if (std::shared_ptr<LeaseEnd> e = end.lock()) e->End(ToGrpc(s));
        },
        tenant_);
    if (!lease.ok()) {
      End(ToGrpc(lease.status()));
      return;
    }
    lease_ = *lease;
    response_.set_region(request.region());
    response_.set_shm_name(request.shm_name());
    response_.set_size(request.size());
    StartWrite(&response_);
  }

  void OnWriteDone(bool ok) override {
    if (!ok) ctx_->shm.Remove(region_, lease_, tenant_);
    end_->WriteDone(ok);  // may finish the call: nothing after it
  }

  // The client cancelled, its connection dropped or the deadline passed.
  void OnCancel() override {
    if (lease_ != 0) ctx_->shm.Remove(region_, lease_, tenant_);
    end_->End(grpc::Status(grpc::StatusCode::CANCELLED, "the lease was cancelled"));
  }

  void OnDone() override {
    if (lease_ != 0) ctx_->shm.Remove(region_, lease_, tenant_);  // no-op unless still registered
    delete this;
  }

 private:
  // Before the first write: records the status, then finishes the call.
  void End(const grpc::Status& status) {
    call_.End(static_cast<absl::StatusCode>(status.error_code()), status.error_message());
    Finish(status);
  }

  ServiceContext* ctx_;
  CallMetrics call_;
  const std::string region_;
  const std::string tenant_;
  uint64_t lease_ = 0;  // 0: not registered
  // Owned here; the registry's revoke callback holds a weak_ptr and keeps it
  // alive while it runs, even if the reactor is deleted meanwhile.
  std::shared_ptr<LeaseEnd> end_;
  LeaseResponse response_;
};

}  // namespace

Caller Identify(const grpc::CallbackServerContext& context, const ServiceContext& ctx) {
  return Caller{CallerTenant(context, *ctx.auth), SharedMemoryAccess(context, ctx.options), context.peer()};
}

absl::Status SharedMemoryAccess(const grpc::CallbackServerContext& context, const ServerOptions& options) {
  if (options.shm_allow_remote) return absl::OkStatus();
  const std::string peer = context.peer();
  if (IsLocalPeer(peer)) return absl::OkStatus();
  return absl::PermissionDeniedError(absl::StrCat("shared memory is only for clients on the server's node; the peer ",
                                                  peer, " is not (see --shm_allow_remote)"));
}

grpc::ServerWriteReactor<v1::RegisterSharedMemoryResponse>* MedakvService::RegisterSharedMemory(
    grpc::CallbackServerContext* context, const v1::RegisterSharedMemoryRequest* request) {
  return new LeaseReactor(ctx_, *request, Identify(*context, *ctx_));
}

grpc::ServerUnaryReactor* MedakvService::UnregisterSharedMemory(grpc::CallbackServerContext* context,
                                                                const v1::UnregisterSharedMemoryRequest* request,
                                                                v1::UnregisterSharedMemoryResponse* response) {
  CallMetrics call(ctx_->metrics, Method::kUnregisterSharedMemory);
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  const Caller caller = Identify(*context, *ctx_);
  call.set_log(&ctx_->log, caller.peer, caller.tenant.value_or(""));
  const absl::Status refused = !caller.tenant.ok() ? caller.tenant.status() : caller.shm_access;
  FinishUnary(call, reactor,
              ToGrpc(refused.ok() ? ctx_->shm.Unregister(request->region(), *caller.tenant) : refused));
  return reactor;
}

}  // namespace medakv::server
