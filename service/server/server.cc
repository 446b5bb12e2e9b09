#include "service/server/server.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>

#include <chrono>
#include <exception>

#include "absl/strings/str_cat.h"
#include "kernels/common/status.h"
#include "prometheus/exposer.h"
#include "service/server/config_file.h"
#include "service/server/metrics.h"
#include "service/server/service.h"

namespace medakv::server {
namespace {

// The metrics endpoint's civetweb workers, and its timeout on every read and write.
constexpr int kMetricsThreads = 8;
constexpr int kMetricsRequestTimeoutMs = 5000;

absl::Status ValidateServerOptions(const ServerOptions& o) {
  if (o.listen.empty()) return absl::InvalidArgumentError("--listen must not be empty");
  if (o.host_cache_bytes < 0 || o.device_cache_bytes < 0) {
    return absl::InvalidArgumentError("--host_cache_bytes and --device_cache_bytes must be >= 0");
  }
  if (o.max_request_bytes <= 0) return absl::InvalidArgumentError("--max_request_bytes must be > 0");
  if (o.chunk_bytes <= 0) return absl::InvalidArgumentError("--chunk_bytes must be > 0");
  if (o.max_message_bytes < (int64_t{64} << 10) || o.max_message_bytes > (int64_t{1} << 30)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--max_message_bytes must be in [64 KiB, 1 GiB], got ", o.max_message_bytes));
  }
  if (o.max_inflight < 1) return absl::InvalidArgumentError("--max_inflight must be >= 1");
  if (o.max_queued < 0) return absl::InvalidArgumentError("--max_queued must be >= 0");
  if (o.idle_timeout < absl::ZeroDuration()) return absl::InvalidArgumentError("--idle_timeout must be >= 0");
  if (o.threads < 0) return absl::InvalidArgumentError("--threads must be >= 0");
  if (o.queue_timeout < absl::ZeroDuration() || o.shutdown_grace < absl::ZeroDuration()) {
    return absl::InvalidArgumentError("--queue_timeout and --shutdown_grace must be >= 0");
  }
  if (o.tls_cert.empty() != o.tls_key.empty()) {
    return absl::InvalidArgumentError("--tls_cert and --tls_key go together (the certificate chain and its key)");
  }
  if (!o.tls_client_ca.empty() && o.tls_cert.empty()) {
    return absl::InvalidArgumentError("--tls_client_ca needs --tls_cert and --tls_key (mutual TLS is TLS)");
  }
  if (o.max_shm_regions < 0 || o.max_shm_bytes < 0) {
    return absl::InvalidArgumentError("--max_shm_regions and --max_shm_bytes must be >= 0 (0: no shared memory)");
  }
  return absl::OkStatus();
}

// The memory of the store's device tier (null: no device tier), given the
// backend in use. A device tier asked of the CPU backend is an error when
// that backend was asked for, and is noted in `why` when auto chose it.
absl::StatusOr<std::shared_ptr<DeviceMemory>> DeviceTierMemory(const ServerOptions& o, const std::string& backend,
                                                               std::string* why) {
  if (o.device_cache_bytes == 0) return nullptr;
  std::shared_ptr<DeviceMemory> memory = o.device_memory;
  if (memory == nullptr && backend == "cuda") {
    MEDAKV_ASSIGN_OR_RETURN(memory, MakeCudaDeviceMemory());
  }
  if (memory != nullptr) {
    absl::StrAppend(why, "; device tier of ", o.device_cache_bytes, " bytes on ", std::string(memory->Name()), " memory");
    return memory;
  }
  if (o.backend == "auto") {
    absl::StrAppend(why, "; no device tier (--device_cache_bytes=", o.device_cache_bytes,
                    " needs the cuda backend)");
    return nullptr;
  }
  return absl::FailedPreconditionError(absl::StrCat("--device_cache_bytes=", o.device_cache_bytes,
                                                    " needs the cuda backend (--backend=", o.backend,
                                                    "); set it to 0 or use --backend=cuda|auto"));
}

// Plaintext, or TLS (mutual with tls_client_ca) with the token processor
// when authentication is on.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeCredentials(const ServerOptions& o,
                                                                         const Authenticator* auth) {
  if (o.tls_cert.empty()) return grpc::InsecureServerCredentials();
  grpc::SslServerCredentialsOptions ssl;
  grpc::SslServerCredentialsOptions::PemKeyCertPair pair;
  MEDAKV_ASSIGN_OR_RETURN(pair.cert_chain, ReadPemFile(o.tls_cert, "--tls_cert"));
  MEDAKV_ASSIGN_OR_RETURN(pair.private_key, ReadPemFile(o.tls_key, "--tls_key"));
  ssl.pem_key_cert_pairs.push_back(std::move(pair));
  if (!o.tls_client_ca.empty()) {
    MEDAKV_ASSIGN_OR_RETURN(ssl.pem_root_certs, ReadPemFile(o.tls_client_ca, "--tls_client_ca"));
    ssl.client_certificate_request = GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY;
  }
  std::shared_ptr<grpc::ServerCredentials> creds = grpc::SslServerCredentials(ssl);
  if (creds == nullptr) return absl::InvalidArgumentError("cannot make TLS credentials from --tls_cert/--tls_key");
  if (auth->enabled()) creds->SetAuthMetadataProcessor(std::make_shared<TokenAuthProcessor>(auth));
  return creds;
}

}  // namespace

grpc::Status ToGrpc(const absl::Status& s) {
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()), std::string(s.message()));
}

void FinishUnary(CallMetrics& call, grpc::ServerUnaryReactor* reactor, const grpc::Status& status) {
  call.End(static_cast<absl::StatusCode>(status.error_code()), status.error_message());
  reactor->Finish(status);
}

ServiceContext::ServiceContext(const ServerOptions& o, std::unique_ptr<Backend> b, std::string name,
                               Metrics* m, std::shared_ptr<const PresetTable> p, std::unique_ptr<Authenticator> a,
                               std::shared_ptr<DeviceMemory> device)
    : options(o),
      backend(std::move(b)),
      backend_name(std::move(name)),
      metrics(m),
      presets(std::move(p)),
      auth(a != nullptr ? std::move(a) : *Authenticator::Create("")),
      device_memory(std::move(device)),
      log(CallLogOptions{o.log_format, o.slow_call_log}),
      idle(o.idle_timeout),
      admission(o.max_inflight, o.queue_timeout, o.max_queued),
      store(StoreOptions{o.host_cache_bytes, device_memory != nullptr ? o.device_cache_bytes : 0}),
      shm(o.max_shm_bytes, o.max_shm_regions),
      pool(o.threads > 0 ? o.threads : o.max_inflight) {}

struct MedakvServer::Impl {
  // Destroyed in reverse order: the exposer (no more collections) before the
  // context that the sampler reads, the context before the metrics it records into.
  std::shared_ptr<Metrics> metrics;  // shared: the exposer holds a weak_ptr
  std::unique_ptr<ServiceContext> ctx;
  std::unique_ptr<MedakvService> service;
  std::unique_ptr<grpc::Server> server;
  std::unique_ptr<prometheus::Exposer> exposer;
  std::string backend_reason;
  bool shut_down = false;

  ~Impl() {
    exposer.reset();  // joins its threads: no collection runs from here on
    if (metrics != nullptr) metrics->SetSampler({});
  }
};

MedakvServer::MedakvServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

MedakvServer::~MedakvServer() {
  Shutdown();
  Wait();
}

absl::StatusOr<std::unique_ptr<MedakvServer>> MedakvServer::Start(const ServerOptions& options) {
  if (absl::Status s = ValidateServerOptions(options); !s.ok()) return s;
  std::shared_ptr<const PresetTable> presets = std::make_shared<PresetTable>();
  if (!options.policy_presets.empty()) {
    absl::StatusOr<std::shared_ptr<const PresetTable>> loaded = PresetTable::Load(options.policy_presets);
    if (!loaded.ok()) return loaded.status();
    presets = *std::move(loaded);
  }
  absl::StatusOr<std::unique_ptr<Authenticator>> auth = Authenticator::Create(options.auth_tokens_file);
  if (!auth.ok()) return auth.status();
  auto impl = std::make_unique<Impl>();
  absl::StatusOr<std::unique_ptr<Backend>> backend = MakeBackend(options.backend, &impl->backend_reason);
  if (!backend.ok()) return backend.status();
  const std::string name((*backend)->Name());
  absl::StatusOr<std::shared_ptr<DeviceMemory>> device = DeviceTierMemory(options, name, &impl->backend_reason);
  if (!device.ok()) return device.status();
  std::vector<std::string> preset_names;
  for (const PresetTable::Preset& p : presets->presets()) preset_names.push_back(p.name);
  impl->metrics = std::make_shared<Metrics>(MEDAKV_VERSION, name, preset_names);
  impl->ctx = std::make_unique<ServiceContext>(options, *std::move(backend), name, impl->metrics.get(), presets,
                                               *std::move(auth), *std::move(device));
  absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> credentials =
      MakeCredentials(options, impl->ctx->auth.get());
  if (!credentials.ok()) return credentials.status();
  impl->service = std::make_unique<MedakvService>(impl->ctx.get());
  ServiceContext* ctx = impl->ctx.get();
  impl->metrics->SetSampler([ctx] {
    MetricsSample s;
    s.tiers = ctx->store.Stats();
    s.admission_slots = ctx->options.max_inflight;
    s.admission_in_use = ctx->admission.in_use();
    s.admission_waiting = ctx->admission.waiting();
    s.shm_regions = ctx->shm.regions();
    s.shm_bytes = ctx->shm.registered_bytes();
    s.held_inflight_bytes = ctx->held_inflight_bytes.load();
    s.held_queued_bytes = ctx->held_queued_bytes.load();
    s.held_bound_bytes = int64_t{ctx->options.max_inflight} * ctx->options.max_request_bytes;
    return s;
  });
  int metrics_port = 0;
  if (!options.metrics_listen.empty()) {
    // Before the gRPC port: a server that cannot serve its metrics does not start.
    try {
      // civetweb gives each connection a worker until its request is read: enough workers that a few idle
      // or slow connections cannot hold up a scrape, and a short timeout on every read and write, so that
      // none holds one for long.
      impl->exposer = std::make_unique<prometheus::Exposer>(std::vector<std::string>{
          "listening_ports", options.metrics_listen, "num_threads", std::to_string(kMetricsThreads),
          "request_timeout_ms", std::to_string(kMetricsRequestTimeoutMs)});
    } catch (const std::exception& e) {  // civetweb cannot bind: prometheus-cpp throws
      return absl::UnavailableError(absl::StrCat("cannot serve metrics on ", options.metrics_listen,
                                                 " (address in use, or not a valid host:port): ", e.what()));
    }
    impl->exposer->RegisterCollectable(impl->metrics, "/metrics");
    const std::vector<int> ports = impl->exposer->GetListeningPorts();
    if (ports.empty() || ports[0] <= 0) {
      return absl::UnavailableError(absl::StrCat("cannot serve metrics on ", options.metrics_listen));
    }
    metrics_port = ports[0];
  }

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(options.listen, *credentials, &port);
  builder.RegisterService(impl->service.get());
  builder.SetMaxReceiveMessageSize(static_cast<int>(options.max_message_bytes));
  builder.SetMaxSendMessageSize(static_cast<int>(options.max_message_bytes));
  impl->server = builder.BuildAndStart();
  if (impl->server == nullptr || port == 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen on ", options.listen,
                                               " (address in use, or not a valid host:port)"));
  }
  impl->server->GetHealthCheckService()->SetServingStatus(true);
  std::unique_ptr<MedakvServer> server(new MedakvServer(std::move(impl)));
  server->port_ = port;
  server->metrics_port_ = metrics_port;
  return server;
}

const std::string& MedakvServer::backend() const { return impl_->ctx->backend_name; }
const Metrics& MedakvServer::metrics() const { return *impl_->metrics; }
const std::string& MedakvServer::backend_reason() const { return impl_->backend_reason; }
size_t MedakvServer::presets() const { return impl_->ctx->presets->size(); }
size_t MedakvServer::tokens() const {
  const std::shared_ptr<const TokenTable> tokens = impl_->ctx->auth->tokens();
  return tokens == nullptr ? 0 : tokens->size();
}
bool MedakvServer::tls() const { return !impl_->ctx->options.tls_cert.empty(); }
absl::Status MedakvServer::ReloadTokens() { return impl_->ctx->auth->Reload(); }

std::shared_ptr<grpc::Channel> MedakvServer::InProcessChannel() {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(static_cast<int>(impl_->ctx->options.max_message_bytes));
  args.SetMaxSendMessageSize(static_cast<int>(impl_->ctx->options.max_message_bytes));
  return impl_->server->InProcessChannel(args);
}

void MedakvServer::Shutdown() {
  if (impl_->shut_down) return;
  impl_->shut_down = true;
  impl_->server->GetHealthCheckService()->SetServingStatus(false);
  // Leases stay open until released: end them now, not at the grace's end.
  impl_->ctx->shm.Shutdown();
  const auto deadline = std::chrono::system_clock::now() +
                        std::chrono::milliseconds(absl::ToInt64Milliseconds(impl_->ctx->options.shutdown_grace));
  impl_->server->Shutdown(deadline);  // stop accepting; cancel what is left at the deadline
}

void MedakvServer::Wait() { impl_->server->Wait(); }

}  // namespace medakv::server
