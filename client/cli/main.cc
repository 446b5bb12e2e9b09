// medakv: the command-line tool. `medakv compress` runs a policy on a cache
// file on medakv servers (`--server`, else $MEDAKV_SERVER) or, without
// them or with --local, with the CPU backend; `medakv synth` writes a
// synthetic cache file; `medakv eval` measures the fidelity of policies
// (docs/evaluation.md). put, get, compress-cache, delete, ls, stats, health
// and bench talk to servers through medakv::Client (remote_commands.h,
// docs/client.md). Errors, command-line errors included, print one line
// "medakv: error: ..." on stderr and exit non-zero; --version prints the
// version.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <new>
#include <optional>
#include <string>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "absl/time/time.h"
#include "client/cli/cache_file.h"
#include "client/cli/eval.h"
#include "client/cli/policy_flags.h"
#include "client/cli/progress.h"
#include "client/cli/remote_commands.h"
#include "client/cli/synth.h"
#include "client/cli/tune_command.h"
#include "client/cli/version.h"
#include "client/cpp/client.h"
#include "kernels/common/status.h"
#include "kernels/common/tensor_util.h"

namespace medakv {
namespace {

constexpr int kExitError = 1;

struct CompressFlags {
  std::string input, output;
  std::string layout = "hnd";
  bool json = false;
  bool verbose = false;
  bool no_progress = false;
  PolicyFlags policy;
  std::string preset;  // --preset: the server's preset (needs a server)
  ServerFlags server;  // --server or $MEDAKV_SERVER: compress there; its other flags are refused without
  bool local = false;  // --local: here, whatever $MEDAKV_SERVER says
};

struct SynthFlags {
  SynthOptions options;
  std::string output;
  std::string dtype = "float16";
  std::string layout = "hnd";
  std::vector<std::string> visual;
};

struct EvalFlags {
  std::string input;
  bool synth = false;
  bool synth_future = false;  // with --synth: the generator's rows after the prompt are the future
  SynthFlags synth_flags;  // with --synth: the generated cache (its output and layout unused)
  std::string layout = "hnd";
  int64_t holdout = 16;
  std::string policies = "full,streaming_llm,h2o,snapkv,pyramidkv,look_m,meda,amber";
  std::string rhos = "0.05,0.1,0.2,0.5";
  std::string csv, layers_csv;
  bool json = false;
  bool verbose = false;
  PolicyFlags policy;
  const CLI::Option* rho = nullptr;  // --rho, added by PolicyFlags; eval takes --rhos instead
  std::vector<const CLI::Option*> synth_only;  // the synth flags, refused without --synth
};

// The result of one compression and where it ran.
struct Compressed {
  CompressResult result;
  std::string backend;                         // the backend that compressed
  std::optional<v1::CompressSummary> summary;  // with --server: the server's
  double round_trip_s = 0;                     // with --server: the Compress call, client side
  std::string server;                          // with --server: the replica that compressed
  bool shared_memory = false;                  // with --server: the tensors went through shared memory
};

absl::StatusOr<Compressed> CompressOnServer(const CompressFlags& f, Client& client, const CacheInput& in,
                                            const CompressOptions& options, CallOptions call) {
  ProgressBar bar("compress", !f.no_progress && !f.json);
  call.progress = bar.Callback();
  const auto t0 = std::chrono::steady_clock::now();
  absl::StatusOr<RemoteResult> got = client.Compress(in, options, call);
  bar.Finish();
  if (!got.ok()) return CliError(got.status());
  Compressed c;
  c.round_trip_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  c.result = std::move(got->result);
  c.backend = got->summary.backend();
  c.summary = std::move(got->summary);
  c.server = got->target;
  c.shared_memory = got->shared_memory;
  return c;
}

absl::Status RunCompress(CompressFlags& f) {
  // Remote when --server is given or $MEDAKV_SERVER is set, unless --local.
  if (f.local && f.server.server_given()) return absl::InvalidArgumentError("--local and --server: give one of them");
  const bool remote = !f.local && f.server.Given();
  std::unique_ptr<Client> client;
  CallOptions call;
  CompressOptions options;
  if (remote) {
    MEDAKV_ASSIGN_OR_RETURN(client, f.server.MakeClient());
    MEDAKV_ASSIGN_OR_RETURN(options, RemotePolicy(f.policy, f.preset, &call));
  } else {
    const char* why = f.local ? " (not with --local)" : "";
    for (const CLI::Option* opt : f.server.options) {
      if (opt->count() > 0) {
        return absl::InvalidArgumentError(absl::StrCat(opt->get_name(), " needs --server (or $", kServerEnv, ")", why));
      }
    }
    if (!f.preset.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("--preset needs --server (or $", kServerEnv, "; presets live on the server)", why));
    }
    // Here: --policy, amber when not given, at rho 0.2 unless --rho.
    MEDAKV_ASSIGN_OR_RETURN(options, f.policy.Resolve());
  }
  MEDAKV_ASSIGN_OR_RETURN(const Layout layout, ParseLayout(f.layout));
  const auto t0 = std::chrono::steady_clock::now();
  MEDAKV_ASSIGN_OR_RETURN(safetensors::File file, safetensors::File::Open(f.input));
  absl::StatusOr<std::unique_ptr<LoadedCache>> loaded = LoadCache(std::move(file), layout);
  if (!loaded.ok()) return absl::Status(loaded.status().code(), absl::StrCat(f.input, ": ", loaded.status().message()));
  const CacheInput& in = (*loaded)->input;
  Compressed c;
  std::string preset;  // the server's preset that ran: --preset, or "default" for a request that named no policy
  if (remote) {
    MEDAKV_ASSIGN_OR_RETURN(c, CompressOnServer(f, *client, in, options, call));
    if (!call.preset.empty() || call.server_default) {
      // The options that the server chose (a preset's, or its default), for the file and the report.
      MEDAKV_ASSIGN_OR_RETURN(options, RanOptions(c.summary->policy()));
      preset = c.summary->policy().preset();
    }
  } else {
    const std::unique_ptr<Backend> backend = MakeCpuBackend();
    MEDAKV_ASSIGN_OR_RETURN(c.result, Compress(in, options, *backend));
    c.backend = std::string(backend->Name());
  }
  const CompressResult& result = c.result;
  const CompressOptions& o = options;
  // The same metadata on both paths, so that a file compressed on a server
  // equals the local one byte for byte when the backends agree.
  const std::vector<std::pair<std::string, std::string>> metadata = {
      {"format", "medakv.compressed.v1"},
      {"layout", LayoutName(in.layout)},
      {"tokens", absl::StrCat(in.tokens)},
      {"policy", PolicyName(o.policy)},
      {"rho", absl::StrCat(o.budget.rho)},
      {"tau", absl::StrCat(o.budget.tau)},
      {"alpha_min", absl::StrCat(o.budget.alpha_min)},
      {"alpha_max", absl::StrCat(o.budget.alpha_max)},
      {"exact_total", o.budget.exact_total ? "true" : "false"},
      {"recent_fraction", absl::StrCat(o.recent_fraction)},
      {"entropy_heads", EntropyHeadsName(o.entropy_heads)},
      {"entropy_source", EntropySourceName(o.entropy_source)},
      {"text_prior", TextPriorName(o.text_prior)},
      {"merge", MergeModeName(o.merge)},
      {"merge_threshold", MergeThresholdName(o.merge_threshold)},
      {"shared_selection", o.shared_selection ? "true" : "false"},
      {"sinks", absl::StrCat(o.sinks)},
      {"window", absl::StrCat(o.window)},
      {"pool_kernel", absl::StrCat(o.pool_kernel)},
      {"pyramid_beta", absl::StrCat(o.pyramid_beta)},
      {"backend", c.backend},
  };
  std::vector<std::pair<std::string, std::string>> file_metadata = metadata;
  if (!preset.empty()) file_metadata.emplace_back("preset", preset);
  const auto t_write = std::chrono::steady_clock::now();
  MEDAKV_RETURN_IF_ERROR(WriteCompressed(result, in, file_metadata, f.output));
  const double write_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_write).count();
  const double total_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  const int64_t bytes_per_token = 2 * in.kv_heads * in.head_dim * DTypeSize(in.dtype);
  const int64_t bytes_in = result.tokens_in * bytes_per_token, bytes_out = result.tokens_kept * bytes_per_token;
  const v1::StageTimes* server_times = c.summary ? &c.summary->times() : nullptr;
  if (f.json) {
    nlohmann::json j;
    j["input"] = f.input;
    j["output"] = f.output;
    j["policy"] = PolicyName(o.policy);
    if (!preset.empty()) j["preset"] = preset;
    j["rho"] = o.budget.rho;
    j["backend"] = c.backend;
    if (remote) {
      j["server"] = c.server;
      j["shared_memory"] = c.shared_memory;
    }
    j["layers"] = in.layers.size();
    j["tokens"] = in.tokens;
    j["tokens_in"] = result.tokens_in;
    j["tokens_kept"] = result.tokens_kept;
    j["kv_bytes_in"] = bytes_in;
    j["kv_bytes_out"] = bytes_out;
    j["seconds"] = {{"statistics", result.seconds.statistics},
                    {"allocate", result.seconds.allocate},
                    {"select_merge", result.seconds.select_merge},
                    {"write", write_s},
                    {"total", total_s}};
    if (server_times != nullptr) {
      j["seconds"]["receive"] = server_times->receive_seconds();
      j["seconds"]["send"] = server_times->send_seconds();
      j["seconds"]["round_trip"] = c.round_trip_s;
    }
    nlohmann::json per_layer = nlohmann::json::array();
    for (const LayerResult& r : result.layers) {
      per_layer.push_back({{"entropy", r.entropy}, {"alpha", r.alpha}, {"budget", r.budget}});
    }
    j["per_layer"] = per_layer;
    std::cout << j.dump(2) << "\n";
    return absl::OkStatus();
  }
  std::cout << absl::StrFormat(
      "%s: %d layers x %d tokens, policy %s%s: kept %d of %d tokens (%.1f%%), KV %.1f MiB -> %.1f MiB%s\n", f.output,
      in.layers.size(), in.tokens, PolicyName(o.policy),
      preset.empty() ? "" : absl::StrCat(" (preset ", preset, ")"), result.tokens_kept, result.tokens_in,
      100.0 * static_cast<double>(result.tokens_kept) / static_cast<double>(result.tokens_in),
      static_cast<double>(bytes_in) / (1 << 20), static_cast<double>(bytes_out) / (1 << 20),
      remote ? absl::StrFormat(" on server %s (%s)", c.server, c.backend) : "");
  if (server_times != nullptr) {
    std::cout << absl::StrFormat(
        "time: server: receive %.3f s, statistics %.3f s, allocate %.3f s, select+merge %.3f s, send %.3f s; "
        "round trip %.3f s, write %.3f s, total %.3f s\n",
        server_times->receive_seconds(), result.seconds.statistics, result.seconds.allocate,
        result.seconds.select_merge, server_times->send_seconds(), c.round_trip_s, write_s, total_s);
  } else {
    std::cout << absl::StrFormat(
        "time: statistics %.3f s, allocate %.3f s, select+merge %.3f s, write %.3f s, total %.3f s\n",
        result.seconds.statistics, result.seconds.allocate, result.seconds.select_merge, write_s, total_s);
  }
  if (f.verbose) {
    std::cout << "layer  entropy    alpha  budget\n";
    for (size_t l = 0; l < result.layers.size(); ++l) {
      const LayerResult& r = result.layers[l];
      std::cout << absl::StrFormat("%5d  %7.4f  %7.4f  %6d\n", l, r.entropy, r.alpha, r.budget);
    }
  }
  return absl::OkStatus();
}

// "START:LEN" -> a visual span.
absl::StatusOr<ModalitySpan> ParseSpan(const std::string& s) {
  const std::vector<std::string> parts = absl::StrSplit(s, ':');
  ModalitySpan span;
  if (parts.size() != 2 || !absl::SimpleAtoi(parts[0], &span.start) || !absl::SimpleAtoi(parts[1], &span.length)) {
    return absl::InvalidArgumentError(absl::StrCat("--visual '", s, "': expected START:LENGTH"));
  }
  return span;
}

absl::Status RunSynth(SynthFlags& f) {
  MEDAKV_ASSIGN_OR_RETURN(f.options.dtype, ParseDType(f.dtype));
  MEDAKV_ASSIGN_OR_RETURN(f.options.layout, ParseLayout(f.layout));
  for (const std::string& v : f.visual) {
    MEDAKV_ASSIGN_OR_RETURN(ModalitySpan span, ParseSpan(v));
    f.options.visual.push_back(span);
  }
  MEDAKV_RETURN_IF_ERROR(WriteSynthCache(f.options, f.output));
  std::cout << absl::StrFormat("%s: %d layers, %d kv heads, %d q heads, %d tokens, head_dim %d, %s %s\n", f.output,
                               f.options.layers, f.options.kv_heads, f.options.q_heads, f.options.tokens,
                               f.options.head_dim, DTypeName(f.options.dtype), LayoutName(f.options.layout));
  return absl::OkStatus();
}

absl::Status RunEval(EvalFlags& f) {
  if (f.rho != nullptr && f.rho->count() > 0) {
    return absl::InvalidArgumentError("--rho: eval runs every rho of --rhos (default 0.05,0.1,0.2,0.5); use --rhos");
  }
  if (f.synth == !f.input.empty()) {
    return absl::InvalidArgumentError("eval: give either a cache file (medakv eval cache.safetensors) or --synth");
  }
  for (const CLI::Option* opt : f.synth_only) {
    if (!f.synth && opt->count() > 0) {
      return absl::InvalidArgumentError(absl::StrCat(opt->get_name(), " needs --synth"));
    }
  }
  MEDAKV_ASSIGN_OR_RETURN(const std::vector<PolicyKind> policies, ParsePolicyList(f.policies));
  MEDAKV_ASSIGN_OR_RETURN(const std::vector<double> rhos, ParseRhoList(f.rhos));
  std::vector<CompressOptions> runs;
  for (const PolicyKind p : policies) {
    MEDAKV_ASSIGN_OR_RETURN(CompressOptions options, f.policy.Resolve(p));
    for (const double rho : rhos) {
      options.budget.rho = rho;
      runs.push_back(options);
    }
  }
  MEDAKV_ASSIGN_OR_RETURN(const Layout layout, ParseLayout(f.layout));
  std::unique_ptr<LoadedCache> loaded;
  std::unique_ptr<SynthCache> synth;
  const CacheInput* in = nullptr;
  std::string source = f.input;
  if (f.synth) {
    SynthOptions& o = f.synth_flags.options;
    MEDAKV_ASSIGN_OR_RETURN(o.dtype, ParseDType(f.synth_flags.dtype));
    o.layout = layout;
    for (const std::string& v : f.synth_flags.visual) {
      MEDAKV_ASSIGN_OR_RETURN(ModalitySpan span, ParseSpan(v));
      o.visual.push_back(span);
    }
    if (f.synth_future) {
      if (f.holdout < 1) return absl::InvalidArgumentError(absl::StrCat("--holdout must be >= 1, got ", f.holdout));
      o.held_out = f.holdout;
    }
    MEDAKV_ASSIGN_OR_RETURN(SynthCache generated, MakeSynthCache(o));
    synth = std::make_unique<SynthCache>(std::move(generated));
    in = &synth->input;
    source = absl::StrCat("synthetic (seed ", o.seed, o.text_only ? ", text only)" : ")");
  } else {
    MEDAKV_ASSIGN_OR_RETURN(safetensors::File file, safetensors::File::Open(f.input));
    absl::StatusOr<std::unique_ptr<LoadedCache>> l = LoadCache(std::move(file), layout);
    if (!l.ok()) return absl::Status(l.status().code(), absl::StrCat(f.input, ": ", l.status().message()));
    loaded = *std::move(l);
    in = &loaded->input;
  }
  const std::unique_ptr<Backend> backend = MakeCpuBackend();
  EvalCallback progress;
  if (f.verbose) {
    progress = [](const EvalResult& r) {
      std::cerr << absl::StrFormat("%s rho %g: kept %.2f%%, mean rel error %.6f (compress %.2f s, error %.2f s)\n",
                                   PolicyName(r.policy), r.rho, 100.0 * r.kept_fraction, r.mean_rel_error,
                                   r.compress_seconds, r.error_seconds);
    };
  }
  const auto t0 = std::chrono::steady_clock::now();
  absl::StatusOr<std::vector<EvalResult>> evaluated;
  if (f.synth_future) {
    std::vector<TensorView> held_out;
    for (size_t l = 0; l < in->layers.size(); ++l) held_out.push_back(synth->HeldOutQuery(static_cast<int64_t>(l)));
    evaluated = EvaluateHeldOut(*in, held_out, runs, *backend, progress);
  } else {
    evaluated = Evaluate(*in, f.holdout, runs, *backend, progress);
  }
  if (!evaluated.ok()) {
    return absl::Status(evaluated.status().code(), absl::StrCat(source, ": ", evaluated.status().message()));
  }
  const std::vector<EvalResult>& results = *evaluated;
  const double total_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (!f.csv.empty()) MEDAKV_RETURN_IF_ERROR(WriteTextFile(f.csv, EvalCsv(results)));
  if (!f.layers_csv.empty()) MEDAKV_RETURN_IF_ERROR(WriteTextFile(f.layers_csv, EvalLayersCsv(results)));

  const int64_t layers = static_cast<int64_t>(in->layers.size());
  const int64_t q_tokens = in->layers[0].query.tokens;
  if (f.json) {
    nlohmann::json j;
    j["input"] = source;
    j["layers"] = layers;
    j["tokens"] = in->tokens;
    j["kv_heads"] = in->kv_heads;
    j["q_heads"] = in->q_heads;
    j["head_dim"] = in->head_dim;
    j["dtype"] = DTypeName(in->dtype);
    j["holdout"] = f.holdout;
    j["future"] = f.synth_future ? "generated rows after the prompt" : "last query rows of each layer";
    j["seconds"] = total_s;
    nlohmann::json runs_json = nlohmann::json::array();
    for (const EvalResult& r : results) {
      nlohmann::json per_layer = nlohmann::json::array();
      for (size_t l = 0; l < r.layer_error.size(); ++l) {
        per_layer.push_back({{"layer", l},
                             {"budget", r.layer_budget[l]},
                             {"entropy", r.layer_entropy[l]},
                             {"rel_error", r.layer_error[l]}});
      }
      runs_json.push_back({{"policy", PolicyName(r.policy)},
                           {"rho", r.rho},
                           {"kept_fraction", r.kept_fraction},
                           {"tokens_in", r.tokens_in},
                           {"tokens_kept", r.tokens_kept},
                           {"mean_rel_error", r.mean_rel_error},
                           {"error_terms", r.error_terms},
                           {"seconds", {{"compress", r.compress_seconds}, {"error", r.error_seconds}}},
                           {"per_layer", per_layer}});
    }
    j["results"] = runs_json;
    nlohmann::json verdicts = nlohmann::json::array();
    for (const MedaComparison& c : CompareMedaToUniform(results)) {
      verdicts.push_back({{"rho", c.rho},
                          {"meda_error", c.meda_error},
                          {"best_uniform_policy", PolicyName(c.best_uniform)},
                          {"best_uniform_error", c.best_uniform_error},
                          {"meda_beats_uniform", c.meda_beats_uniform}});
    }
    j["meda_vs_uniform"] = verdicts;
    std::cout << j.dump(2) << "\n";
    return absl::OkStatus();
  }
  std::cout << absl::StrFormat(
      "%s: %d layers x %d tokens, %d kv heads, %d query heads, head_dim %d, %s\n"
      "query rows per layer: %d observed (compress), %d held out%s; error: mean over %d rows x %d heads x %d "
      "layers of ||o' - o|| / ||o||\n\n",
      source, layers, in->tokens, in->kv_heads, in->q_heads, in->head_dim, DTypeName(in->dtype),
      f.synth_future ? q_tokens : q_tokens - f.holdout, f.holdout, f.synth_future ? " (after the prompt)" : "",
      f.holdout, in->q_heads, layers);
  std::cout << FormatEvalTable(results);
  if (f.verbose) std::cout << absl::StrFormat("\ntotal %.1f s\n", total_s);
  return absl::OkStatus();
}

void AddCompressCommand(CLI::App& app, CompressFlags& f) {
  CLI::App* c = app.add_subcommand(
      "compress",
      "Compress a cache file with a policy: on medakv servers when --server is given or $MEDAKV_SERVER is set, "
      "else here with the CPU backend (--local: here in any case)");
  c->add_option("input", f.input, "Input cache (.safetensors)")->required();
  c->add_option("-o,--output", f.output, "Output file (.safetensors)")->required();
  c->add_option("--layout", f.layout, "Dims order of the file's tensors: hnd or nhd")->capture_default_str();
  f.policy.Add(c);
  c->get_option("--policy")
      ->description(
          "full | meda | streaming_llm | h2o | snapkv | pyramidkv | look_m | amber. Not given: here, amber (at "
          "rho 0.2 unless --rho); on a server, when no policy flag but --rho is given either, the request names "
          "no policy and the server runs its preset \"default\" (--policy_presets, e.g. from `medakv tune`), or "
          "amber at rho 0.2 when it has none")
      ->default_str("");
  c->add_option("--preset", f.preset,
                "Server: the server's policy preset NAME (--policy_presets; docs/presets.md) instead of --policy "
                "and its options (--rho replaces the preset's rho)");
  c->add_flag("--json", f.json, "Print the summary as JSON");
  c->add_flag("-v,--verbose", f.verbose, "Print entropy, alpha and budget per layer");
  f.server.Add(c, /*with_verbose=*/false);
  f.server.server_opt->description(
      "Compress on medakv servers host:port (gRPC; repeatable or a comma list: the replicas, used in turn; "
      "default: $MEDAKV_SERVER; with neither, compress runs here)");
  for (CLI::Option* opt : f.server.options) {
    opt->description(absl::StrCat("Server: ", opt->get_description()));
  }
  c->add_flag("--local", f.local,
              "Compress here with the CPU backend even when $MEDAKV_SERVER is set (not with --server)");
  c->add_flag("--no-progress", f.no_progress, "Server: no progress bar (drawn only when stderr is a terminal)");
}

void AddSynthCommand(CLI::App& app, SynthFlags& f) {
  CLI::App* s = app.add_subcommand("synth", "Write a synthetic multimodal cache file");
  SynthOptions& o = f.options;
  s->add_option("-o,--output", f.output, "Output file (.safetensors)")->required();
  s->add_option("--layers", o.layers, "Layers")->capture_default_str();
  s->add_option("--kv-heads", o.kv_heads, "KV heads")->capture_default_str();
  s->add_option("--q-heads", o.q_heads, "Query heads (a multiple of kv heads)")->capture_default_str();
  s->add_option("--tokens", o.tokens, "Tokens in the cache")->capture_default_str();
  s->add_option("--head-dim", o.head_dim, "Head size")->capture_default_str();
  s->add_option("--q-tokens", o.q_tokens, "Query rows (the last positions)")->capture_default_str();
  s->add_option("--dtype", f.dtype, "float16 | bfloat16 | float32")->capture_default_str();
  s->add_option("--layout", f.layout, "hnd | nhd")->capture_default_str();
  s->add_option("--visual", f.visual, "Visual span START:LENGTH (repeatable; default one image over 10%-70%)");
  s->add_flag("--text-only", o.text_only, "No visual tokens");
  s->add_flag("--precomputed", o.precomputed, "Write scores and entropy instead of queries");
  s->add_option("--seed", o.seed, "Random seed")->capture_default_str();
}

void AddEvalCommand(CLI::App& app, EvalFlags& f) {
  CLI::App* e = app.add_subcommand("eval", "Fidelity of policies: attention-output error on held-out queries");
  e->add_option("input", f.input, "Cache with queries (.safetensors)");
  e->add_flag("--synth", f.synth, "Evaluate a generated cache (the synth flags below)");
  e->add_option("--layout", f.layout, "Dims order of the file's (or the generated) tensors: hnd or nhd")
      ->capture_default_str();
  e->add_option("--holdout", f.holdout, "Last query rows of each layer held out as the future (>= 1)")
      ->capture_default_str();
  e->add_option("--policies", f.policies, "Comma list of policies")->capture_default_str();
  e->add_option("--rhos", f.rhos, "Comma list of rho values in (0, 1]")->capture_default_str();
  f.policy.Add(e, /*with_policy=*/false);
  CLI::Option* rho = e->get_option("--rho");
  rho->group("");  // hidden: eval takes --rhos
  f.rho = rho;
  e->add_option("--csv", f.csv, "Write policy,rho,kept_fraction,mean_rel_error rows to FILE");
  e->add_option("--layers-csv", f.layers_csv, "Write policy,rho,layer,budget,entropy,rel_error rows to FILE");
  e->add_flag("--json", f.json, "Print the results as JSON");
  e->add_flag("-v,--verbose", f.verbose, "Progress on stderr after each run");
  SynthOptions& o = f.synth_flags.options;
  const auto synth_option = [&](const std::string& name, auto& value, const std::string& help) {
    f.synth_only.push_back(e->add_option(name, value, help)->capture_default_str());
  };
  synth_option("--layers", o.layers, "--synth: layers");
  synth_option("--kv-heads", o.kv_heads, "--synth: KV heads");
  synth_option("--q-heads", o.q_heads, "--synth: query heads (a multiple of kv heads)");
  synth_option("--tokens", o.tokens, "--synth: tokens in the cache");
  synth_option("--head-dim", o.head_dim, "--synth: head size");
  synth_option("--q-tokens", o.q_tokens, "--synth: query rows (the last positions), observed + held out");
  synth_option("--dtype", f.synth_flags.dtype, "--synth: float16 | bfloat16 | float32");
  f.synth_only.push_back(
      e->add_option("--visual", f.synth_flags.visual, "--synth: visual span START:LENGTH (repeatable)"));
  f.synth_only.push_back(e->add_flag("--text-only", o.text_only, "--synth: no visual tokens"));
  f.synth_only.push_back(e->add_flag("--synth-future", f.synth_future,
                                     "--synth: the future is --holdout generated query rows after the prompt "
                                     "(text rows at positions T, T+1, ...); the policy sees all --q-tokens rows"));
  synth_option("--seed", o.seed, "--synth: random seed");
}

int Main(int argc, char** argv) {
  CLI::App app{"medakv: KV cache compression (amber, MEDA and baselines). Commands that talk to servers take "
               "--server HOST:PORT, or $MEDAKV_SERVER when it is not given"};
  app.require_subcommand(1);
  app.set_version_flag("--version", VersionString("medakv"), "Print the version (and the git commit) and exit");
  // Command-line errors as one line, like every other error.
  app.failure_message([](const CLI::App*, const CLI::Error& e) {
    return absl::StrCat("medakv: error: ", e.what(), " (--help lists the flags)\n");
  });
  CompressFlags compress;
  SynthFlags synth;
  AddCompressCommand(app, compress);
  AddSynthCommand(app, synth);
  EvalFlags eval;
  AddEvalCommand(app, eval);
  TuneFlags tune;
  AddTuneCommand(app, tune);
  RemoteCommands remote;
  AddRemoteCommands(app, remote);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  absl::Status status;
  if (app.got_subcommand("compress")) {
    status = RunCompress(compress);
  } else if (app.got_subcommand("synth")) {
    status = RunSynth(synth);
  } else if (app.got_subcommand("eval")) {
    status = RunEval(eval);
  } else if (app.got_subcommand("tune")) {
    status = RunTune(tune);
  } else if (const std::optional<int> code = RunRemoteCommand(app, remote)) {
    return *code;
  }
  if (!status.ok()) {
    std::cerr << "medakv: error: " << status.message() << "\n";
    return kExitError;
  }
  return 0;
}

}  // namespace
}  // namespace medakv

int main(int argc, char** argv) {
  // Idle OpenMP workers sleep between the parallel ops instead of spinning
  // (spinning steals cores from the serial stages); the user's setting wins.
  setenv("OMP_WAIT_POLICY", "passive", /*overwrite=*/0);
  try {
    return medakv::Main(argc, argv);
  } catch (const std::bad_alloc&) {
    std::cerr << "medakv: error: out of memory\n";
  } catch (const std::exception& e) {
    std::cerr << "medakv: error: " << e.what() << "\n";
  }
  return 1;
}
