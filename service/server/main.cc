// medakv-server: the gRPC KV cache compression service.
#include <algorithm>
#include <csignal>
#include <cstdlib>
#include <iostream>
#include <thread>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/reflection.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/match.h"
#include "absl/flags/usage.h"
#include "absl/time/time.h"
#include "absl/strings/str_cat.h"
#include "service/server/call_log.h"
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
ABSL_FLAG(absl::Duration, idle_timeout, absl::Seconds(30),
          "A call that waits on its client this long without progress (an upload whose next message does not "
          "come, a download the client does not read) ends with DEADLINE_EXCEEDED and frees what it held; 0: "
          "never");
ABSL_FLAG(std::string, log_format, "text",
          "text | json: one line per event on stderr (start-up with every flag, failed and slow calls, shutdown)");
ABSL_FLAG(absl::Duration, slow_call_log, absl::Seconds(10),
          "Log calls that succeed but take at least this long (failed calls are always logged, at most 20 lines "
          "a second); 0: none");
ABSL_FLAG(int, max_queued, 64,
          "Calls that may wait for a slot at once (0: none wait); one more gets RESOURCE_EXHAUSTED at once. A "
          "waiting call holds its header only");
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
  usage.version_string = [] { return std::string("medakv-server ") + MEDAKV_VERSION + "\n"; };  // --version
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
  o.max_queued = absl::GetFlag(FLAGS_max_queued);
  o.idle_timeout = absl::GetFlag(FLAGS_idle_timeout);
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

  medakv::server::LogFormat format = medakv::server::LogFormat::kText;
  if (absl::Status f = medakv::server::ParseLogFormat(absl::GetFlag(FLAGS_log_format), &format); !f.ok()) {
    std::cerr << "medakv-server: error: " << f.message() << std::endl;
    return 1;
  }
  o.log_format = format;
  o.slow_call_log = absl::GetFlag(FLAGS_slow_call_log);
  medakv::server::CallLog log(medakv::server::CallLogOptions{format});
  {
    // Every effective flag of the server, one line.
    std::vector<std::pair<std::string, std::string>> flags;
    for (const auto& [name, flag] : absl::GetAllFlags()) {
      if (absl::StrContains(flag->Filename(), "service/server/")) flags.emplace_back(name, flag->CurrentValue());
    }
    std::sort(flags.begin(), flags.end());
    std::string text = absl::StrCat("version ", MEDAKV_VERSION, ", starting with");
    for (const auto& [name, value] : flags) absl::StrAppend(&text, " --", name, "=", value);
    std::vector<std::pair<std::string, std::string>> fields = {{"version", MEDAKV_VERSION}};
    for (const auto& [name, value] : flags) fields.emplace_back(absl::StrCat("flag_", name), value);
    log.Event("info", "start", text, fields);
  }

  std::signal(SIGTERM, OnSignal);
  std::signal(SIGINT, OnSignal);
  std::signal(SIGHUP, OnHangup);
  auto server = medakv::server::MedakvServer::Start(o);
  if (!server.ok()) {
    log.Event("error", "error", absl::StrCat("error: ", server.status().message()));
    return 1;
  }
  if ((*server)->metrics_port() != 0) {
    log.Event("info", "metrics", absl::StrCat("metrics on port ", (*server)->metrics_port(), " (/metrics)"));
  }
  if ((*server)->presets() != 0) {
    log.Event("info", "presets", absl::StrCat((*server)->presets(), " policy presets from ", o.policy_presets));
  }
  if ((*server)->tokens() != 0) {
    log.Event("info", "tokens",
              absl::StrCat((*server)->tokens(), " bearer tokens from ", o.auth_tokens_file, " (SIGHUP reloads them)"));
    if (!(*server)->tls()) {
      log.Event("warning", "plaintext_tokens",
                "warning: bearer tokens travel in plaintext without --tls_cert; use TLS unless the network is "
                "trusted (SECURITY.md)");
    }
  }
  log.Event("info", "listening",
            absl::StrCat("listening on port ", (*server)->port(), (*server)->tls() ? " (TLS" : " (plaintext",
                         o.tls_client_ca.empty() ? "" : ", client certificates required", "; ",
                         (*server)->backend_reason(), ")"),
            {{"port", std::to_string((*server)->port())}});
  while (g_signal == 0) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    if (g_reload != 0) {
      g_reload = 0;
      const absl::Status s = (*server)->ReloadTokens();
      if (s.ok()) {
        log.Event("info", "tokens_reloaded", absl::StrCat("SIGHUP: ", (*server)->tokens(), " bearer tokens reloaded"));
      } else {
        log.Event("warning", "tokens_not_reloaded",
                  absl::StrCat("SIGHUP: tokens not reloaded, the previous ones stay: ", s.message()));
      }
    }
  }
  log.Event("info", "stopping",
            absl::StrCat("signal ", g_signal, ", shutting down (grace ", absl::FormatDuration(o.shutdown_grace), ")"));
  (*server)->Shutdown();
  (*server)->Wait();
  log.Event("info", "stopped", "stopped");
  return 0;
}
