#include "client/cli/remote_commands.h"

#include <grpcpp/security/credentials.h>

#include <chrono>
#include <cstdlib>
#include <iostream>
#include <nlohmann/json.hpp>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "client/cli/cache_file.h"
#include "client/cli/progress.h"
#include "kernels/common/status.h"
#include "kernels/common/tensor_util.h"
#include "service/server/config_file.h"
#include "service/server/convert.h"
#include "service/server/presets.h"

namespace medakv {
namespace {

constexpr int kExitError = 1;

double Since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Decimal megabytes per second, as network throughput is usually quoted.
double MBps(int64_t bytes, double seconds) { return seconds > 0 ? static_cast<double>(bytes) / 1e6 / seconds : 0.0; }

int PrintError(const absl::Status& s) {
  std::cerr << "medakv: error: " << s.message() << "\n";
  return kExitError;
}

nlohmann::json ErrorJson(const std::string& target, const absl::Status& s) {
  return {{"server", target}, {"code", absl::StatusCodeToString(s.code())}, {"message", std::string(s.message())}};
}

std::string DTypeOf(const v1::CacheShape& shape) {
  absl::StatusOr<DType> d = DTypeFromProto(shape.dtype());
  return d.ok() ? DTypeName(*d) : "unknown";
}

// Tokens kept over all layers of a stored cache.
int64_t KeptTokens(const v1::CacheInfo& info) {
  int64_t kept = 0;
  for (int64_t t : info.layer_tokens()) kept += t;
  return kept;
}

nlohmann::json InfoJson(const v1::CacheInfo& info) {
  const v1::CacheShape& s = info.shape();
  nlohmann::json j;
  j["cache_id"] = info.cache_id();
  j["layers"] = s.layers();
  j["kv_heads"] = s.kv_heads();
  j["q_heads"] = s.q_heads();
  j["head_dim"] = s.head_dim();
  j["tokens"] = s.tokens();
  j["dtype"] = DTypeOf(s);
  j["layout"] = s.layout() == v1::LAYOUT_NHD ? "nhd" : "hnd";
  j["bytes"] = info.bytes();
  j["layer_tokens"] = std::vector<int64_t>(info.layer_tokens().begin(), info.layer_tokens().end());
  j["compressed"] = info.compressed();
  j["policy"] = info.policy();
  j["tier"] = info.tier();
  j["created_unix_ms"] = info.created_unix_ms();
  j["expires_unix_ms"] = info.expires_unix_ms();
  return j;
}

std::string Expires(int64_t unix_ms) {
  if (unix_ms == 0) return "never";
  const int64_t left = unix_ms - absl::ToUnixMillis(absl::Now());
  return left <= 0 ? "expired" : absl::StrCat("in ", (left + 999) / 1000, " s");
}

absl::StatusOr<std::pair<int32_t, int32_t>> ParseLayerRange(const std::string& s) {
  if (s.empty()) return std::pair<int32_t, int32_t>{0, 0};
  const std::vector<std::string> parts = absl::StrSplit(s, ':');
  int32_t begin = 0, end = 0;
  if (parts.size() != 2 || !absl::SimpleAtoi(parts[0], &begin) || !absl::SimpleAtoi(parts[1], &end) || begin < 0 ||
      end <= begin) {
    return absl::InvalidArgumentError(
        absl::StrCat("--layers '", s, "': expected BEGIN:END with 0 <= BEGIN < END (layers [BEGIN, END))"));
  }
  return std::pair<int32_t, int32_t>{begin, end};
}

// --tier: auto, host or device (any case), as PutCacheHeader.tier.
absl::StatusOr<v1::CacheTier> ParseTier(const std::string& s) {
  const std::string t = absl::AsciiStrToLower(s);
  if (t == "auto") return v1::CACHE_TIER_AUTO;
  if (t == "host") return v1::CACHE_TIER_HOST;
  if (t == "device") return v1::CACHE_TIER_DEVICE;
  return absl::InvalidArgumentError(absl::StrCat("--tier: expected auto, host or device, got '", s, "'"));
}

// ---- put ---------------------------------------------------------------------------

int RunPut(RemoteCommands::Put& f) {
  absl::Status status = [&]() -> absl::Status {
    MEDAKV_RETURN_IF_ERROR(CheckCacheId(f.id));
    if (f.ttl < 0) return absl::InvalidArgumentError(absl::StrCat("--ttl must be >= 0 seconds, got ", f.ttl));
    MEDAKV_ASSIGN_OR_RETURN(const v1::CacheTier tier, ParseTier(f.tier));
    MEDAKV_ASSIGN_OR_RETURN(std::unique_ptr<Client> client, f.server.MakeClient());
    MEDAKV_ASSIGN_OR_RETURN(const Layout layout, ParseLayout(f.layout));
    MEDAKV_ASSIGN_OR_RETURN(safetensors::File file, safetensors::File::Open(f.input));
    absl::StatusOr<std::unique_ptr<LoadedCache>> loaded = LoadCache(std::move(file), layout);
    if (!loaded.ok()) {
      return absl::Status(loaded.status().code(), absl::StrCat(f.input, ": ", loaded.status().message()));
    }
    PutOptions put;
    put.ttl_seconds = f.ttl;
    put.overwrite = f.overwrite;
    put.with_statistics = !f.keys_values_only;
    put.tier = tier;
    ProgressBar bar(absl::StrCat("put ", f.id), !f.no_progress);
    CallOptions call;
    call.progress = bar.Callback();
    const auto t0 = std::chrono::steady_clock::now();
    absl::StatusOr<PutResult> r = client->PutCache(f.id, (*loaded)->input, put, call);
    const double seconds = Since(t0);
    bar.Finish();
    if (!r.ok()) return CliError(r.status());
    const v1::CacheInfo& info = r->info;
    if (f.json) {
      nlohmann::json j = InfoJson(info);
      j["server"] = r->target;
      j["bytes_sent"] = r->bytes_sent;
      j["shared_memory"] = r->shared_memory;
      j["seconds"] = seconds;
      std::cout << j.dump(2) << "\n";
    } else {
      std::cout << absl::StrFormat(
          "put '%s' on server %s: %d layers x %d tokens, %s in %.3f s (%.1f MB/s%s), %s tier%s\n", info.cache_id(),
          r->target, info.shape().layers(), info.shape().tokens(), HumanBytes(r->bytes_sent), seconds,
          MBps(r->bytes_sent, seconds), r->shared_memory ? ", shared memory" : "", info.tier(),
          info.expires_unix_ms() != 0 ? absl::StrCat(", expires ", Expires(info.expires_unix_ms())) : "");
    }
    return absl::OkStatus();
  }();
  return status.ok() ? 0 : PrintError(status);
}

// ---- get ---------------------------------------------------------------------------

int RunGet(RemoteCommands::Get& f) {
  absl::Status status = [&]() -> absl::Status {
    MEDAKV_RETURN_IF_ERROR(CheckCacheId(f.id));
    MEDAKV_ASSIGN_OR_RETURN(const auto range, ParseLayerRange(f.layers));
    MEDAKV_ASSIGN_OR_RETURN(std::unique_ptr<Client> client, f.server.MakeClient());
    ProgressBar bar(absl::StrCat("get ", f.id), !f.no_progress);
    CallOptions call;
    call.progress = bar.Callback();
    GetOptions get;
    get.layer_begin = range.first;
    get.layer_end = range.second;
    const auto t0 = std::chrono::steady_clock::now();
    absl::StatusOr<FetchedCache> r = client->GetCache(f.id, get, call);
    const double seconds = Since(t0);
    bar.Finish();
    if (!r.ok()) return CliError(r.status());
    const v1::CacheInfo& info = r->info;
    CacheInput shape;  // what WriteCompressed reads of it
    shape.kv_heads = info.shape().kv_heads();
    shape.head_dim = info.shape().head_dim();
    MEDAKV_ASSIGN_OR_RETURN(shape.dtype, DTypeFromProto(info.shape().dtype(), "info.shape.dtype"));
    MEDAKV_ASSIGN_OR_RETURN(shape.layout, LayoutFromProto(info.shape().layout(), "info.shape.layout"));
    CompressResult result;
    result.layers = std::move(r->layers);
    int64_t kept = 0;
    for (const LayerResult& l : result.layers) kept += l.budget;
    const int64_t layers = static_cast<int64_t>(result.layers.size());
    const std::vector<std::pair<std::string, std::string>> metadata = {
        {"format", "medakv.stored.v1"},
        {"cache_id", info.cache_id()},
        {"layout", LayoutName(shape.layout)},
        {"tokens", absl::StrCat(info.shape().tokens())},
        {"layers", absl::StrCat(info.shape().layers())},
        {"layer_begin", absl::StrCat(r->layer_begin)},
        {"layer_end", absl::StrCat(r->layer_begin + layers)},
        {"compressed", info.compressed() ? "true" : "false"},
        {"policy", info.policy()},
        {"server", r->target},
    };
    MEDAKV_RETURN_IF_ERROR(WriteCompressed(result, shape, metadata, f.output, r->layer_begin));
    if (f.json) {
      nlohmann::json j = InfoJson(info);
      j["server"] = r->target;
      j["output"] = f.output;
      j["layer_begin"] = r->layer_begin;
      j["layer_end"] = r->layer_begin + layers;
      j["tokens_kept"] = kept;
      j["bytes_received"] = r->bytes_received;
      j["shared_memory"] = r->shared_memory;
      j["seconds"] = seconds;
      std::cout << j.dump(2) << "\n";
    } else {
      std::cout << absl::StrFormat(
          "%s: '%s' from server %s: layers [%d, %d) of %d, %d of %d tokens kept%s, %s in %.3f s (%.1f MB/s%s)\n",
          f.output, info.cache_id(), r->target, r->layer_begin, r->layer_begin + layers, info.shape().layers(), kept,
          layers * info.shape().tokens(), info.compressed() ? absl::StrCat(" (", info.policy(), ")") : "",
          HumanBytes(r->bytes_received), seconds, MBps(r->bytes_received, seconds),
          r->shared_memory ? ", shared memory" : "");
    }
    return absl::OkStatus();
  }();
  return status.ok() ? 0 : PrintError(status);
}

// ---- compress-cache -------------------------------------------------------------------

int RunCompressCache(RemoteCommands::CompressCacheCmd& f) {
  absl::Status status = [&]() -> absl::Status {
    MEDAKV_RETURN_IF_ERROR(CheckCacheId(f.id));
    CallOptions call;
    MEDAKV_ASSIGN_OR_RETURN(const CompressOptions options, RemotePolicy(f.policy, f.preset, &call));
    MEDAKV_ASSIGN_OR_RETURN(std::unique_ptr<Client> client, f.server.MakeClient());
    const auto t0 = std::chrono::steady_clock::now();
    absl::StatusOr<v1::CompressCacheResponse> r = client->CompressCache(f.id, options, call);
    const double seconds = Since(t0);
    if (!r.ok()) return CliError(r.status());
    const v1::CacheInfo& info = r->info();
    const v1::CompressSummary& summary = r->summary();
    MEDAKV_ASSIGN_OR_RETURN(const CompressOptions ran, RanOptions(summary.policy()));
    const std::string& preset = summary.policy().preset();
    const std::string& target = client->ReplicaFor(f.id);
    const int64_t tokens_in = summary.tokens_in(), kept = summary.tokens_kept();
    const double percent = tokens_in > 0 ? 100.0 * static_cast<double>(kept) / static_cast<double>(tokens_in) : 0.0;
    const v1::StageTimes& t = summary.times();
    if (f.json) {
      nlohmann::json j = InfoJson(info);
      j["server"] = target;
      j["policy"] = PolicyName(ran.policy);
      if (!preset.empty()) j["preset"] = preset;
      j["rho"] = ran.budget.rho;
      j["backend"] = summary.backend();
      j["tokens_in"] = tokens_in;
      j["tokens_kept"] = kept;
      j["seconds"] = {{"statistics", t.statistics_seconds()},
                      {"allocate", t.allocate_seconds()},
                      {"select_merge", t.select_merge_seconds()},
                      {"round_trip", seconds}};
      nlohmann::json per_layer = nlohmann::json::array();
      for (const v1::LayerInfo& l : r->layers()) {
        per_layer.push_back(
            {{"layer", l.layer()}, {"entropy", l.entropy()}, {"alpha", l.alpha()}, {"budget", l.budget()}});
      }
      j["per_layer"] = per_layer;
      std::cout << j.dump(2) << "\n";
      return absl::OkStatus();
    }
    std::cout << absl::StrFormat(
        "compressed '%s' on server %s (%s): policy %s%s, rho %g: kept %d of %d tokens (%.1f%%), %s stored\n"
        "time: server: statistics %.3f s, allocate %.3f s, select+merge %.3f s; round trip %.3f s\n",
        info.cache_id(), target, summary.backend(), PolicyName(ran.policy),
        preset.empty() ? "" : absl::StrCat(" (preset ", preset, ")"), ran.budget.rho, kept, tokens_in, percent,
        HumanBytes(info.bytes()), t.statistics_seconds(), t.allocate_seconds(), t.select_merge_seconds(), seconds);
    if (f.verbose) {
      std::cout << "layer  entropy    alpha  budget\n";
      for (const v1::LayerInfo& l : r->layers()) {
        std::cout << absl::StrFormat("%5d  %7.4f  %7.4f  %6d\n", l.layer(), l.entropy(), l.alpha(), l.budget());
      }
    }
    return absl::OkStatus();
  }();
  return status.ok() ? 0 : PrintError(status);
}

// ---- delete ---------------------------------------------------------------------------

int RunDelete(RemoteCommands::Delete& f) {
  for (const std::string& id : f.ids) {
    if (absl::Status s = CheckCacheId(id); !s.ok()) return PrintError(s);
  }
  absl::StatusOr<std::unique_ptr<Client>> client = f.server.MakeClient();
  if (!client.ok()) return PrintError(client.status());
  nlohmann::json results = nlohmann::json::array();
  int failed = 0;
  for (const std::string& id : f.ids) {
    absl::StatusOr<int64_t> freed = (*client)->DeleteCache(id);
    const std::string& target = (*client)->ReplicaFor(id);
    if (f.json) {
      nlohmann::json j = {{"cache_id", id}, {"server", target}, {"deleted", freed.ok()}};
      if (freed.ok()) j["bytes_freed"] = *freed;
      if (!freed.ok()) j["error"] = ErrorJson(target, freed.status());
      results.push_back(j);
    }
    if (!freed.ok()) {
      ++failed;
      PrintError(freed.status());
    } else if (!f.json) {
      std::cout << absl::StrFormat("deleted '%s' from server %s (%s freed)\n", id, target, HumanBytes(*freed));
    }
  }
  if (f.json) std::cout << nlohmann::json{{"results", results}}.dump(2) << "\n";
  return failed == 0 ? 0 : kExitError;
}

// ---- ls ------------------------------------------------------------------------------

int RunList(RemoteCommands::List& f) {
  if (f.limit < 0) return PrintError(absl::InvalidArgumentError(absl::StrCat("--limit must be >= 0, got ", f.limit)));
  absl::StatusOr<std::unique_ptr<Client>> client = f.server.MakeClient();
  if (!client.ok()) return PrintError(client.status());
  absl::StatusOr<CacheList> list = (*client)->ListCaches(f.prefix, f.limit);
  if (!list.ok()) return PrintError(list.status());
  if (f.json) {
    nlohmann::json caches = nlohmann::json::array(), errors = nlohmann::json::array();
    for (const ListedCache& c : list->caches) {
      nlohmann::json j = InfoJson(c.info);
      j["server"] = c.target;
      caches.push_back(j);
    }
    for (const ReplicaError& e : list->errors) errors.push_back(ErrorJson(e.target, e.status));
    std::cout << nlohmann::json{{"caches", caches}, {"errors", errors}}.dump(2) << "\n";
  } else {
    size_t id_width = 2, server_width = 6;
    for (const ListedCache& c : list->caches) {
      id_width = std::max(id_width, c.info.cache_id().size());
      server_width = std::max(server_width, c.target.size());
    }
    std::cout << absl::StrFormat("%-*s  %-*s  %6s  %8s  %6s  %-8s  %10s  %-4s  %-10s  %s\n", id_width, "ID",
                                 server_width, "SERVER", "LAYERS", "TOKENS", "KEPT", "DTYPE", "BYTES", "TIER", "POLICY",
                                 "EXPIRES");
    for (const ListedCache& c : list->caches) {
      const v1::CacheShape& s = c.info.shape();
      const int64_t all = int64_t{s.layers()} * s.tokens();
      std::cout << absl::StrFormat(
          "%-*s  %-*s  %6d  %8d  %5.1f%%  %-8s  %10s  %-4s  %-10s  %s\n", id_width, c.info.cache_id(), server_width,
          c.target, s.layers(), s.tokens(),
          all > 0 ? 100.0 * static_cast<double>(KeptTokens(c.info)) / static_cast<double>(all) : 0.0, DTypeOf(s),
          HumanBytes(c.info.bytes()), c.info.tier(), c.info.compressed() ? c.info.policy() : "-",
          Expires(c.info.expires_unix_ms()));
    }
  }
  for (const ReplicaError& e : list->errors) PrintError(e.status);
  return list->errors.empty() ? 0 : kExitError;
}

// ---- stats ----------------------------------------------------------------------------

nlohmann::json StatsJson(const v1::StatsResponse& s) {
  nlohmann::json tiers = nlohmann::json::array();
  for (const v1::TierStats& t : s.tiers()) {
    tiers.push_back({{"tier", t.tier()},
                     {"capacity_bytes", t.capacity_bytes()},
                     {"used_bytes", t.used_bytes()},
                     {"entries", t.entries()},
                     {"evictions", t.evictions()}});
  }
  return {{"tiers", tiers},
          {"inflight_compressions", s.inflight_compressions()},
          {"shared_memory_regions", s.shared_memory_regions()},
          {"backend", s.backend()},
          {"version", s.version()}};
}

int RunStats(RemoteCommands::StatsCmd& f) {
  absl::StatusOr<std::unique_ptr<Client>> client = f.server.MakeClient();
  if (!client.ok()) return PrintError(client.status());
  absl::StatusOr<ClusterStats> stats = (*client)->Stats();
  if (!stats.ok()) return PrintError(stats.status());
  int failed = 0;
  if (f.json) {
    nlohmann::json replicas = nlohmann::json::array(), errors = nlohmann::json::array();
    for (const ReplicaStats& r : stats->replicas) {
      if (!r.stats.ok()) {
        errors.push_back(ErrorJson(r.target, r.stats.status()));
        continue;
      }
      nlohmann::json j = StatsJson(*r.stats);
      j["server"] = r.target;
      replicas.push_back(j);
    }
    std::cout << nlohmann::json{{"replicas", replicas}, {"total", StatsJson(stats->total)}, {"errors", errors}}.dump(2)
              << "\n";
  } else {
    size_t width = 6;
    for (const ReplicaStats& r : stats->replicas) width = std::max(width, r.target.size());
    std::cout << absl::StrFormat("%-*s  %-7s  %-7s  %-6s  %10s  %10s  %7s  %9s  %8s  %11s\n", width, "SERVER",
                                 "BACKEND", "VERSION", "TIER", "USED", "CAPACITY", "ENTRIES", "EVICTIONS", "INFLIGHT",
                                 "SHM_REGIONS");
    auto row = [&](const std::string& name, const v1::StatsResponse& s) {
      bool first = true;
      for (const v1::TierStats& t : s.tiers()) {
        std::cout << absl::StrFormat("%-*s  %-7s  %-7s  %-6s  %10s  %10s  %7d  %9d  %8s  %11s\n", width,
                                     first ? name : "", first ? s.backend() : "", first ? s.version() : "", t.tier(),
                                     HumanBytes(t.used_bytes()), HumanBytes(t.capacity_bytes()), t.entries(),
                                     t.evictions(), first ? absl::StrCat(s.inflight_compressions()) : "",
                                     first ? absl::StrCat(s.shared_memory_regions()) : "");
        first = false;
      }
    };
    for (const ReplicaStats& r : stats->replicas) {
      if (r.stats.ok()) row(r.target, *r.stats);
    }
    if (stats->replicas.size() > 1)
      row(absl::StrCat("total (", stats->answered, " of ", stats->replicas.size(), ")"), stats->total);
  }
  for (const ReplicaStats& r : stats->replicas) {
    if (!r.stats.ok()) {
      ++failed;
      PrintError(r.stats.status());
    }
  }
  return failed == 0 ? 0 : kExitError;
}

// ---- health ---------------------------------------------------------------------------

int RunHealthCmd(RemoteCommands::HealthCmd& f) {
  absl::StatusOr<std::unique_ptr<Client>> client = f.server.MakeClient();
  if (!client.ok()) return PrintError(client.status());
  CallOptions call;
  if (f.server.timeout_opt->count() == 0) call.deadline = absl::Seconds(5);
  const std::vector<ReplicaHealth> health = (*client)->Health(call);
  bool all_serving = true;
  for (const ReplicaHealth& h : health) {
    all_serving = all_serving && h.status.ok() && h.serving == grpc::health::v1::HealthCheckResponse::SERVING;
  }
  auto name = [](const ReplicaHealth& h) {
    return h.status.ok() ? grpc::health::v1::HealthCheckResponse::ServingStatus_Name(h.serving)
                         : std::string("UNREACHABLE");
  };
  if (f.json) {
    nlohmann::json servers = nlohmann::json::array();
    for (const ReplicaHealth& h : health) {
      nlohmann::json j = {{"server", h.target}, {"status", name(h)}, {"seconds", h.seconds}};
      if (!h.status.ok()) j["error"] = ErrorJson(h.target, h.status);
      servers.push_back(j);
    }
    nlohmann::json j = {{"servers", servers}, {"all_serving", all_serving}};
    if (health.size() == 1) {  // the single-server form: server, status, seconds at the top
      j["server"] = health[0].target;
      j["status"] = name(health[0]);
      j["seconds"] = health[0].seconds;
    }
    std::cout << j.dump(2) << "\n";
    return all_serving ? 0 : kExitError;
  }
  if (health.size() == 1) {
    if (!health[0].status.ok()) return PrintError(health[0].status);
    std::cout << name(health[0]) << "\n";
    return all_serving ? 0 : kExitError;
  }
  for (const ReplicaHealth& h : health) {
    std::cout << h.target << ": " << name(h) << "\n";
    if (!h.status.ok()) PrintError(h.status);
  }
  return all_serving ? 0 : kExitError;
}

int RunBenchCmd(RemoteCommands& c) {
  absl::StatusOr<std::unique_ptr<Client>> client = c.bench_server.MakeClient();
  if (!client.ok()) return PrintError(client.status());
  absl::StatusOr<BenchReport> report = RunBench(c.bench, **client);
  if (!report.ok()) return PrintError(report.status());
  PrintBench(c.bench, **client, *report);
  return report->ok > 0 ? 0
                        : PrintError(absl::UnavailableError(
                              absl::StrCat("every request failed; the first: ", report->first_error)));
}

}  // namespace

// ---- ServerFlags ------------------------------------------------------------------------

std::string CheckServerValue(const std::string& value) {
  if (!value.empty() && value[0] == '-') {
    return absl::StrCat("--server needs an address (host:port), got '", value,
                        "', which is an option: write --server HOST:PORT, or set $", kServerEnv);
  }
  return "";
}

void ServerFlags::Add(CLI::App* app, bool with_verbose) {
  // Not CLI11's envname(): every command reads $MEDAKV_SERVER alike
  // (Targets), and `compress --local` must be able to ignore it.
  server_opt = app->add_option_function<std::vector<std::string>>(
      "--server",
      [this](const std::vector<std::string>& values) {
        // CLI11 takes the next argument as the value whatever it looks like:
        // `--server --policy meda` would connect to "--policy".
        for (const std::string& v : values) {
          if (std::string e = CheckServerValue(v); !e.empty()) throw CLI::ValidationError(e);
        }
        servers = values;
      },
      absl::StrCat("medakv server host:port (repeatable, or a comma list: the replicas; default: $", kServerEnv,
                   ")"));
  server_opt->type_name("HOST:PORT");
  timeout_opt = app->add_option("--timeout", timeout, "Deadline of each call in seconds [none]");
  options.push_back(timeout_opt);
  options.push_back(
      app->add_option("--attempts", attempts, "Attempts of the idempotent calls (get, ls, stats) on UNAVAILABLE")
          ->capture_default_str());
  options.push_back(app->add_flag("--no-shm", no_shm,
                                  "Never use the shared-memory data plane (used by default with a server on "
                                  "this host)"));
  options.push_back(
      app->add_option("--chunk-bytes", chunk_bytes, "Bytes per request chunk (under the server's --max_message_bytes)")
          ->capture_default_str());
  if (with_verbose) options.push_back(app->add_flag("-v,--verbose", verbose, "Print retries on stderr"));
  CLI::Option* token_opt =
      app->add_option("--token", token,
                      "Bearer token for servers with --auth_tokens_file (default: $MEDAKV_TOKEN; prefer that or "
                      "--token-file: a command line is visible to other users)");
  options.push_back(token_opt);
  options.push_back(app->add_option("--token-file", token_file, "Read the bearer token from this file")
                        ->excludes(token_opt));
  options.push_back(app->add_flag("--tls", tls, "Connect with TLS (implied by the --tls-* flags)"));
  options.push_back(app->add_option("--tls-ca", tls_ca, "CA certificates (PEM) that verify the server [system roots]"));
  options.push_back(app->add_option("--tls-cert", tls_cert, "Client certificate (PEM), for mutual TLS"));
  options.push_back(app->add_option("--tls-key", tls_key, "Key of --tls-cert (PEM)"));
}

bool ServerFlags::Given() const { return !Targets().empty() || server_given(); }

std::vector<std::string> ServerFlags::Targets() const {
  std::vector<std::string> from = servers;
  if (!server_given()) {
    from.clear();
    if (const char* env = std::getenv(kServerEnv); env != nullptr) from.emplace_back(env);
  }
  std::vector<std::string> out;
  for (const std::string& s : from) {
    for (absl::string_view part : absl::StrSplit(s, ',')) {
      part = absl::StripAsciiWhitespace(part);
      if (!part.empty()) out.emplace_back(part);
    }
  }
  return out;
}

absl::StatusOr<std::unique_ptr<Client>> ServerFlags::MakeClient() const {
  ClientOptions o;
  o.targets = Targets();
  if (o.targets.empty()) {
    if (server_given()) return absl::InvalidArgumentError("--server: expected host:port, got an empty string");
    return absl::InvalidArgumentError(
        absl::StrCat("no server: give --server HOST:PORT (or a comma list), or set $", kServerEnv));
  }
  if (timeout_opt != nullptr && timeout_opt->count() > 0) {
    if (!(timeout > 0 && timeout <= 1e9)) {
      return absl::InvalidArgumentError(absl::StrCat("--timeout must be > 0 seconds, got ", timeout));
    }
    o.deadline = absl::Seconds(timeout);
  }
  if (attempts < 1) return absl::InvalidArgumentError(absl::StrCat("--attempts must be >= 1, got ", attempts));
  o.retry.max_attempts = attempts;
  if (chunk_bytes <= 0) return absl::InvalidArgumentError(absl::StrCat("--chunk-bytes must be > 0, got ", chunk_bytes));
  o.chunk_bytes = chunk_bytes;
  o.shared_memory = no_shm ? SharedMemoryMode::kOff : SharedMemoryMode::kAuto;
  o.token = token;
  if (token.empty() && token_file.empty()) {  // not an envname(): compress without --server would refuse it
    if (const char* env = std::getenv("MEDAKV_TOKEN"); env != nullptr) o.token = env;
  }
  if (!token_file.empty()) {
    MEDAKV_ASSIGN_OR_RETURN(const std::string text, ReadConfigFile(token_file, "--token-file", 64 << 10));
    o.token = std::string(absl::StripAsciiWhitespace(text));
    if (o.token.empty()) return absl::InvalidArgumentError(absl::StrCat("--token-file: ", token_file, " is empty"));
  }
  if (tls || !tls_ca.empty() || !tls_cert.empty() || !tls_key.empty()) {
    absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> credentials = TlsCredentials(tls_ca, tls_cert, tls_key);
    if (!credentials.ok()) {
      return absl::Status(credentials.status().code(), absl::StrCat("--tls: ", credentials.status().message()));
    }
    o.credentials = *std::move(credentials);
  }
  if (verbose) {
    o.on_retry = [](const RetryEvent& e) {
      std::cerr << absl::StrFormat("medakv: %s on %s: attempt %d failed (%s); retrying in %s\n", e.method, e.target,
                                   e.attempt, e.status.message(), absl::FormatDuration(e.backoff));
    };
  }
  absl::StatusOr<std::unique_ptr<Client>> client = Client::Create(std::move(o));
  if (!client.ok()) return absl::Status(client.status().code(), absl::StrCat("--server: ", client.status().message()));
  return client;
}

absl::StatusOr<CompressOptions> RemotePolicy(const PolicyFlags& policy, const std::string& preset,
                                             CallOptions* call) {
  const std::string flag = policy.FirstGiven(/*with_rho=*/false);
  if (!preset.empty()) {
    MEDAKV_RETURN_IF_ERROR(ValidatePresetName(preset));
    if (!flag.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("--preset selects the server's policy and its options; ", flag,
                                                     " cannot be combined with it (only --rho can)"));
    }
    call->preset = preset;
  } else if (flag.empty()) {
    call->server_default = true;  // no policy named: the server's "default" preset, or amber
  }
  MEDAKV_ASSIGN_OR_RETURN(const CompressOptions options, policy.Resolve());
  if ((call->server_default || !call->preset.empty()) && policy.rho_given()) call->preset_rho = policy.rho();
  return options;
}

absl::StatusOr<CompressOptions> RanOptions(const v1::Policy& ran) {
  v1::Policy p = ran;
  p.clear_preset();
  absl::StatusOr<CompressOptions> o = OptionsFromProto(p);
  if (!o.ok()) {
    return absl::InternalError(absl::StrCat("the server's summary names a policy this tool cannot read (",
                                            o.status().message(), "); is the server newer?"));
  }
  return o;
}

absl::Status CliError(const absl::Status& s) {
  if (s.code() == absl::StatusCode::kResourceExhausted && absl::StrContains(s.message(), "larger than max")) {
    return absl::Status(s.code(),
                        absl::StrCat(s.message(), " (--chunk-bytes must stay under the server's --max_message_bytes)"));
  }
  return s;
}

// ---- registration ---------------------------------------------------------------------------

void AddRemoteCommands(CLI::App& app, RemoteCommands& c) {
  {
    CLI::App* s = app.add_subcommand("put", "Store a cache file on a medakv server under an id (PutCache)");
    RemoteCommands::Put& f = c.put;
    s->add_option("input", f.input, "Cache file (.safetensors, the compress input format)")->required();
    s->add_option("--id", f.id, "Cache id: 1-256 bytes of [A-Za-z0-9._:/-]")->required();
    f.server.Add(s);
    s->add_option("--layout", f.layout, "Dims order of the file's tensors: hnd or nhd")->capture_default_str();
    s->add_option("--ttl", f.ttl, "Expire after this many seconds (0: never)")->capture_default_str();
    s->add_flag("--overwrite", f.overwrite, "Replace a cache stored under the id (else ALREADY_EXISTS)");
    s->add_option("--tier", f.tier,
                  "Where the server keeps it: auto (its device tier when it has one and the cache fits, else host), "
                  "host, or device (FAILED_PRECONDITION without a device tier, RESOURCE_EXHAUSTED when it cannot fit)")
        ->capture_default_str();
    s->add_flag("--keys-values-only", f.keys_values_only,
                "Store keys and values without the statistics (no later in-place compression)");
    s->add_flag("--json", f.json, "Print the result as JSON");
    s->add_flag("--no-progress", f.no_progress, "No progress bar (drawn only when stderr is a terminal)");
  }
  {
    CLI::App* s = app.add_subcommand("get", "Download a stored cache into a file (GetCache)");
    RemoteCommands::Get& f = c.get;
    s->add_option("id", f.id, "Cache id")->required();
    s->add_option("-o,--output", f.output, "Output file (.safetensors, the compress output format)")->required();
    f.server.Add(s);
    s->add_option("--layers", f.layers, "Only layers [BEGIN, END), as BEGIN:END");
    s->add_flag("--json", f.json, "Print the result as JSON");
    s->add_flag("--no-progress", f.no_progress, "No progress bar (drawn only when stderr is a terminal)");
  }
  {
    CLI::App* s = app.add_subcommand(
        "compress-cache",
        "Compress a stored cache in place on its server (CompressCache), with the statistics it was stored with "
        "(put without --keys-values-only); `get` then downloads the kept tokens");
    RemoteCommands::CompressCacheCmd& f = c.compress_cache;
    s->add_option("id", f.id, "Cache id (as given to put)")->required();
    f.server.Add(s, /*with_verbose=*/false);
    f.policy.Add(s);
    s->get_option("--policy")
        ->description(
            "full | meda | streaming_llm | h2o | snapkv | pyramidkv | look_m | amber. Not given (nor any "
            "policy flag but --rho): the request names no policy, and the server runs its preset \"default\" "
            "(--policy_presets), or amber at rho 0.2 when it has none")
        ->default_str("");
    s->add_option("--preset", f.preset,
                  "The server's policy preset NAME (--policy_presets; docs/presets.md) instead of --policy and its "
                  "options (--rho replaces the preset's rho)");
    s->add_flag("--json", f.json, "Print the result as JSON");
    s->add_flag("-v,--verbose", f.verbose, "Print entropy, alpha and budget per layer");
  }
  {
    CLI::App* s = app.add_subcommand("delete", "Delete stored caches (DeleteCache)");
    s->add_option("ids", c.del.ids, "Cache ids")->required();
    c.del.server.Add(s);
    s->add_flag("--json", c.del.json, "Print the results as JSON");
  }
  {
    CLI::App* s = app.add_subcommand("ls", "List the stored caches of every server, by id (ListCaches)");
    c.ls.server.Add(s);
    s->add_option("--prefix", c.ls.prefix, "Only ids that start with this");
    s->add_option("--limit", c.ls.limit, "At most this many (0: 1000)")->capture_default_str();
    s->add_flag("--json", c.ls.json, "Print the list as JSON");
  }
  {
    CLI::App* s = app.add_subcommand("stats", "Store usage of every server and their total (Stats)");
    c.stats.server.Add(s);
    s->add_flag("--json", c.stats.json, "Print the stats as JSON");
  }
  {
    CLI::App* s = app.add_subcommand(
        "health",
        "Ask medakv servers whether they serve: prints SERVING or NOT_SERVING (per server with several); "
        "exit 0 only when every one is SERVING");
    c.health.server.Add(s);
    c.health.server.timeout = 5;
    c.health.server.timeout_opt->capture_default_str();
    s->add_flag("--json", c.health.json, "Print the answers as JSON");
  }
  {
    CLI::App* s = app.add_subcommand(
        "bench",
        "Load medakv servers with synthetic caches at a concurrency for a duration: requests/s, MB/s, "
        "latency percentiles, errors by code");
    c.bench_server.Add(s);
    AddBenchFlags(s, c.bench);
  }
}

std::optional<int> RunRemoteCommand(const CLI::App& app, RemoteCommands& c) {
  if (app.got_subcommand("put")) return RunPut(c.put);
  if (app.got_subcommand("get")) return RunGet(c.get);
  if (app.got_subcommand("compress-cache")) return RunCompressCache(c.compress_cache);
  if (app.got_subcommand("delete")) return RunDelete(c.del);
  if (app.got_subcommand("ls")) return RunList(c.ls);
  if (app.got_subcommand("stats")) return RunStats(c.stats);
  if (app.got_subcommand("health")) return RunHealthCmd(c.health);
  if (app.got_subcommand("bench")) return RunBenchCmd(c);
  return std::nullopt;
}

}  // namespace medakv
