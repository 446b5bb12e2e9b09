// The subcommands of the `medakv` tool that talk to medakv servers through
// medakv::Client: put, get, delete, ls, stats, health and bench (bench.h), and
// the server flags that they and `compress --server` share.
#pragma once

#include <CLI/CLI.hpp>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "client/cli/bench.h"
#include "client/cpp/client.h"

namespace medakv {

// --server (repeatable, or a comma list; MEDAKV_SERVER when not given),
// --timeout, --attempts, --no-shm, --chunk-bytes, -v, and security:
// --token ($MEDAKV_TOKEN) or --token-file, --tls, --tls-ca, --tls-cert,
// --tls-key.
struct ServerFlags {
  std::vector<std::string> servers;
  std::string token, token_file;
  bool tls = false;
  std::string tls_ca, tls_cert, tls_key;
  double timeout = 0;  // seconds; only when given
  int attempts = 4;
  bool no_shm = false;
  int64_t chunk_bytes = int64_t{4} << 20;
  bool verbose = false;  // retries on stderr
  CLI::Option* server_opt = nullptr;
  CLI::Option* timeout_opt = nullptr;
  std::vector<CLI::Option*> options;  // every flag but --server (compress refuses them without --server)

  // `required`: --server must be given (or MEDAKV_SERVER set). `with_verbose`:
  // add -v (compress has its own).
  void Add(CLI::App* app, bool required, bool with_verbose = true);
  // The servers as a list (comma lists split, blanks dropped).
  std::vector<std::string> Targets() const;
  // Checks the flags (errors name them) and makes the client.
  absl::StatusOr<std::unique_ptr<Client>> MakeClient() const;
};

// A client error with the CLI's hint when a chunk is over the server's
// message limit.
absl::Status CliError(const absl::Status& s);

struct RemoteCommands {
  struct Put {
    ServerFlags server;
    std::string input, id, layout = "hnd", tier = "auto";
    int64_t ttl = 0;
    bool overwrite = false, keys_values_only = false, json = false, no_progress = false;
  } put;
  struct Get {
    ServerFlags server;
    std::string id, output, layers;
    bool json = false, no_progress = false;
  } get;
  struct Delete {
    ServerFlags server;
    std::vector<std::string> ids;
    bool json = false;
  } del;
  struct List {
    ServerFlags server;
    std::string prefix;
    int32_t limit = 0;
    bool json = false;
  } ls;
  struct StatsCmd {
    ServerFlags server;
    bool json = false;
  } stats;
  struct HealthCmd {
    ServerFlags server;
    bool json = false;
  } health;
  BenchFlags bench;
  ServerFlags bench_server;
};

void AddRemoteCommands(CLI::App& app, RemoteCommands& c);

// Runs the remote subcommand that was parsed: its exit status (0 on success;
// errors are printed as "medakv: error: ..." lines). nullopt when none was.
std::optional<int> RunRemoteCommand(const CLI::App& app, RemoteCommands& c);

}  // namespace medakv
