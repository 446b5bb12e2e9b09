// medakv-server: the gRPC KV cache compression service.
#include <csignal>
#include <cstdlib>
#include <iostream>
#include <thread>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/match.h"
#include "absl/flags/usage.h"
#include "absl/time/time.h"
#include "service/server/server.h"

ABSL_FLAG(std::string, listen, "0.0.0.0:50051", "gRPC address host:port (port 0: any free port)");
ABSL_FLAG(std::string, metrics_listen, "0.0.0.0:9464",
          "Prometheus /metrics address host:port (port 0: any free port; empty: no metrics endpoint)");
ABSL_FLAG(std::string, backend, "auto", "auto | cpu | cuda (auto: CUDA when a device answers)");
ABSL_FLAG(int64_t, host_cache_bytes, int64_t{8} << 30, "Byte budget of the host tier of the cache store");
ABSL_FLAG(int64_t, device_cache_bytes, 0, "Byte budget of the store's device tier in GPU memory (needs the CUDA backend; 0: no device tier)");
ABSL_FLAG(int64_t, max_request_bytes, int64_t{8} << 30, "Largest cache (all tensors) one request may send");
ABSL_FLAG(int64_t, chunk_bytes, int64_t{4} << 20, "Size of response chunks");
ABSL_FLAG(int64_t, max_message_bytes, int64_t{16} << 20, "Largest gRPC message accepted");
ABSL_FLAG(int, max_inflight, 4, "Compressions and uploads holding memory at once; more wait for --queue_timeout");
ABSL_FLAG(absl::Duration, queue_timeout, absl::Seconds(30), "How long a request waits for a slot");
ABSL_FLAG(int, threads, 0, "Compute worker threads (0: --max_inflight)");
ABSL_FLAG(absl::Duration, shutdown_grace, absl::Seconds(25), "On SIGTERM, how long in-flight calls may finish");
ABSL_FLAG(int, max_shm_regions, 64, "Shared-memory regions registered at once (0: no shared-memory data plane)");
ABSL_FLAG(int64_t, max_shm_bytes, int64_t{64} << 30, "Sum of the sizes of the shared-memory regions registered at once");
ABSL_FLAG(std::string, policy_presets, "",
          "Named policies: a PolicyPresets file in protobuf text format (docs/presets.md; `medakv tune` writes "
          "one); requests select one by name, and one named \"default\" serves requests that name no policy");
ABSL_FLAG(std::string, tls_cert, "", "TLS: the server's certificate chain (PEM); with --tls_key. Empty: plaintext");
ABSL_FLAG(std::string, tls_key, "", "TLS: the private key of --tls_cert (PEM)");
ABSL_FLAG(std::string, tls_client_ca, "",
          "Mutual TLS: clients must present a certificate signed by this CA (PEM); needs --tls_cert");
ABSL_FLAG(std::string, auth_tokens_file, "",
          "Bearer tokens: one `TOKEN TENANT` pair per line (SECURITY.md); calls without a valid token are "
          "UNAUTHENTICATED and each tenant sees only its own caches. SIGHUP reloads it. Empty: no authentication");
ABSL_FLAG(bool, shm_allow_remote, false,
          "Let callers that are not on this node (not loopback, a Unix socket or in-process) use shared memory");

namespace {

volatile std::sig_atomic_t g_signal = 0;
volatile std::sig_atomic_t g_reload = 0;
void OnSignal(int sig) { g_signal = sig; }
void OnHangup(int) { g_reload = 1; }

}  // namespace

int main(int argc, char** argv) {
  setenv("OMP_WAIT_POLICY", "passive", /*overwrite=*/0);
  absl::SetProgramUsageMessage("compresses and stores LLM KV caches over gRPC (flags below)");
  // --help lists the server's own flags (absl's default only matches flags
  // defined in a file named like the binary, which would list none).
  absl::FlagsUsageConfig usage;
  usage.contains_help_flags = [](absl::string_view file) {
    return absl::StrContains(file, "service/server/");
  };
  absl::SetFlagsUsageConfig(usage);
  absl::ParseCommandLine(argc, argv);
  medakv::server::ServerOptions o;
  o.listen = absl::GetFlag(FLAGS_listen);
  o.backend = absl::GetFlag(FLAGS_backend);
  o.host_cache_bytes = absl::GetFlag(FLAGS_host_cache_bytes);
  o.device_cache_bytes = absl::GetFlag(FLAGS_device_cache_bytes);
  o.max_request_bytes = absl::GetFlag(FLAGS_max_request_bytes);
  o.chunk_bytes = absl::GetFlag(FLAGS_chunk_bytes);
  o.max_message_bytes = absl::GetFlag(FLAGS_max_message_bytes);
  o.max_inflight = absl::GetFlag(FLAGS_max_inflight);
  o.queue_timeout = absl::GetFlag(FLAGS_queue_timeout);
  o.threads = absl::GetFlag(FLAGS_threads);
  o.shutdown_grace = absl::GetFlag(FLAGS_shutdown_grace);
  o.max_shm_regions = absl::GetFlag(FLAGS_max_shm_regions);
  o.max_shm_bytes = absl::GetFlag(FLAGS_max_shm_bytes);
  o.shm_allow_remote = absl::GetFlag(FLAGS_shm_allow_remote);
  o.metrics_listen = absl::GetFlag(FLAGS_metrics_listen);
  o.policy_presets = absl::GetFlag(FLAGS_policy_presets);
  o.tls_cert = absl::GetFlag(FLAGS_tls_cert);
  o.tls_key = absl::GetFlag(FLAGS_tls_key);
  o.tls_client_ca = absl::GetFlag(FLAGS_tls_client_ca);
  o.auth_tokens_file = absl::GetFlag(FLAGS_auth_tokens_file);

  std::signal(SIGTERM, OnSignal);
  std::signal(SIGINT, OnSignal);
  std::signal(SIGHUP, OnHangup);
  auto server = medakv::server::MedakvServer::Start(o);
  if (!server.ok()) {
    std::cerr << "medakv-server: error: " << server.status().message() << std::endl;
    return 1;
  }
  if ((*server)->metrics_port() != 0) {
    std::cerr << "medakv-server: metrics on port " << (*server)->metrics_port() << " (/metrics)" << std::endl;
  }
  if ((*server)->presets() != 0) {
    std::cerr << "medakv-server: " << (*server)->presets() << " policy presets from " << o.policy_presets
              << std::endl;
  }
  if ((*server)->tokens() != 0) {
    std::cerr << "medakv-server: " << (*server)->tokens() << " bearer tokens from " << o.auth_tokens_file
              << " (SIGHUP reloads them)" << std::endl;
    if (!(*server)->tls()) {
      std::cerr << "medakv-server: warning: bearer tokens travel in plaintext without --tls_cert; use TLS unless "
                   "the network is trusted (SECURITY.md)"
                << std::endl;
    }
  }
  std::cerr << "medakv-server: listening on port " << (*server)->port() << ((*server)->tls() ? " (TLS" : " (plaintext")
            << (o.tls_client_ca.empty() ? "" : ", client certificates required") << "; "
            << (*server)->backend_reason() << ")" << std::endl;
  while (g_signal == 0) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    if (g_reload != 0) {
      g_reload = 0;
      const absl::Status s = (*server)->ReloadTokens();
      if (s.ok()) {
        std::cerr << "medakv-server: SIGHUP: " << (*server)->tokens() << " bearer tokens reloaded" << std::endl;
      } else {
        std::cerr << "medakv-server: SIGHUP: tokens not reloaded, the previous ones stay: " << s.message()
                  << std::endl;
      }
    }
  }
  std::cerr << "medakv-server: signal " << g_signal << ", shutting down (grace "
            << absl::FormatDuration(o.shutdown_grace) << ")" << std::endl;
  (*server)->Shutdown();
  (*server)->Wait();
  std::cerr << "medakv-server: stopped" << std::endl;
  return 0;
}
