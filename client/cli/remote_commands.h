// The subcommands of the `medakv` tool that talk to medakv servers through
// medakv::Client: put, get, compress-cache, delete, ls, stats, health and
// bench (bench.h), and the server flags that they and `compress` share.
#pragma once

#include <CLI/CLI.hpp>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "client/cli/bench.h"
#include "client/cli/policy_flags.h"
#include "client/cpp/client.h"

namespace medakv {

// The environment variable that names the servers when --server is not given.
inline constexpr char kServerEnv[] = "MEDAKV_SERVER";

// --server (repeatable, or a comma list; $MEDAKV_SERVER when not given: the
// same rule for every command that talks to servers), --timeout, --attempts,
// --no-shm, --chunk-bytes, -v, and security: --token ($MEDAKV_TOKEN) or
// --token-file, --tls, --tls-ca, --tls-cert, --tls-key.
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

  // `with_verbose`: add -v (compress has its own). A value of --server that
  // starts with '-' is refused at parse time ("--server needs an address"):
  // `--server --policy meda` forgot the address.
  void Add(CLI::App* app, bool with_verbose = true);
  // Whether --server was given on the command line.
  bool server_given() const { return server_opt != nullptr && server_opt->count() > 0; }
  // Whether servers are named: --server, else a non-empty $MEDAKV_SERVER.
  bool Given() const;
  // The servers as a list (comma lists split, blanks dropped): --server's,
  // else $MEDAKV_SERVER's.
  std::vector<std::string> Targets() const;
  // Checks the flags (errors name them) and makes the client; an error when
  // no server is named.
  absl::StatusOr<std::unique_ptr<Client>> MakeClient() const;
};

// --server's check: a value that starts with '-' is an option, not an
// address; the message ("--server needs an address ..."), empty when fine.
std::string CheckServerValue(const std::string& value);

// The policy of a request to a server (compress, compress-cache), from the
// policy flags and --preset; sets `call`'s preset fields:
//   - --preset NAME: the server's preset (--rho replaces its rho; no other
//     policy flag may be given with it);
//   - neither --policy nor an option flag (--rho aside): no policy at all
//     (CallOptions::server_default): the server's preset named "default",
//     or amber at rho 0.2 when it has none; --rho replaces the rho;
//   - else the flags' options (--policy, amber when not given).
// The options returned are checked and, with a preset or the server's
// default, only a placeholder: what ran is in the summary (RanOptions).
absl::StatusOr<CompressOptions> RemotePolicy(const PolicyFlags& policy, const std::string& preset,
                                             CallOptions* call);

// The options a server ran, from a summary's policy (its preset cleared).
absl::StatusOr<CompressOptions> RanOptions(const v1::Policy& ran);

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
  struct CompressCacheCmd {
    ServerFlags server;
    std::string id;
    PolicyFlags policy;
    std::string preset;
    bool json = false, verbose = false;
  } compress_cache;
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
