// medakv: the command-line tool. `medakv compress` runs a policy on a cache
// file with the CPU backend; `medakv synth` writes a synthetic cache file.
// Errors print one line "medakv: error: ..." on stderr and exit non-zero.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <new>
#include <string>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "client/cli/cache_file.h"
#include "client/cli/policy_flags.h"
#include "client/cli/synth.h"
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
  PolicyFlags policy;
};

struct SynthFlags {
  SynthOptions options;
  std::string output;
  std::string dtype = "float16";
  std::string layout = "hnd";
  std::vector<std::string> visual;
};

absl::Status RunCompress(CompressFlags& f) {
  MEDAKV_ASSIGN_OR_RETURN(const CompressOptions options, f.policy.Resolve());
  MEDAKV_ASSIGN_OR_RETURN(const Layout layout, ParseLayout(f.layout));
  const auto t0 = std::chrono::steady_clock::now();
  MEDAKV_ASSIGN_OR_RETURN(safetensors::File file, safetensors::File::Open(f.input));
  absl::StatusOr<std::unique_ptr<LoadedCache>> loaded = LoadCache(std::move(file), layout);
  if (!loaded.ok()) return absl::Status(loaded.status().code(), absl::StrCat(f.input, ": ", loaded.status().message()));
  const CacheInput& in = (*loaded)->input;
  const std::unique_ptr<Backend> backend = MakeCpuBackend();
  MEDAKV_ASSIGN_OR_RETURN(const CompressResult result, Compress(in, options, *backend));
  const CompressOptions& o = options;
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
      {"backend", std::string(backend->Name())},
  };
  const auto t_write = std::chrono::steady_clock::now();
  MEDAKV_RETURN_IF_ERROR(WriteCompressed(result, in, metadata, f.output));
  const double write_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_write).count();
  const double total_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  const int64_t bytes_per_token = 2 * in.kv_heads * in.head_dim * DTypeSize(in.dtype);
  const int64_t bytes_in = result.tokens_in * bytes_per_token, bytes_out = result.tokens_kept * bytes_per_token;
  if (f.json) {
    nlohmann::json j;
    j["input"] = f.input;
    j["output"] = f.output;
    j["policy"] = PolicyName(o.policy);
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
    nlohmann::json per_layer = nlohmann::json::array();
    for (const LayerResult& r : result.layers) {
      per_layer.push_back({{"entropy", r.entropy}, {"alpha", r.alpha}, {"budget", r.budget}});
    }
    j["per_layer"] = per_layer;
    std::cout << j.dump(2) << "\n";
    return absl::OkStatus();
  }
  std::cout << absl::StrFormat(
      "%s: %d layers x %d tokens, policy %s: kept %d of %d tokens (%.1f%%), KV %.1f MiB -> %.1f MiB\n"
      "time: statistics %.3f s, allocate %.3f s, select+merge %.3f s, write %.3f s, total %.3f s\n",
      f.output, in.layers.size(), in.tokens, PolicyName(o.policy), result.tokens_kept, result.tokens_in,
      100.0 * static_cast<double>(result.tokens_kept) / static_cast<double>(result.tokens_in),
      static_cast<double>(bytes_in) / (1 << 20), static_cast<double>(bytes_out) / (1 << 20), result.seconds.statistics,
      result.seconds.allocate, result.seconds.select_merge, write_s, total_s);
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

void AddCompressCommand(CLI::App& app, CompressFlags& f) {
  CLI::App* c = app.add_subcommand("compress", "Compress a cache file with a policy (CPU backend)");
  c->add_option("input", f.input, "Input cache (.safetensors)")->required();
  c->add_option("-o,--output", f.output, "Output file (.safetensors)")->required();
  c->add_option("--layout", f.layout, "Dims order of the file's tensors: hnd or nhd")->capture_default_str();
  f.policy.Add(c);
  c->add_flag("--json", f.json, "Print the summary as JSON");
  c->add_flag("-v,--verbose", f.verbose, "Print entropy, alpha and budget per layer");
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

int Main(int argc, char** argv) {
  CLI::App app{"medakv: KV cache compression (MEDA and baselines)"};
  app.require_subcommand(1);
  CompressFlags compress;
  SynthFlags synth;
  AddCompressCommand(app, compress);
  AddSynthCommand(app, synth);
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
