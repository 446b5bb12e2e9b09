#include "client/cli/tune_command.h"

#include <chrono>
#include <iostream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "client/cli/progress.h"
#include "client/cli/tune.h"
#include "kernels/common/status.h"
#include "kernels/common/tensor_util.h"
#include "service/server/convert.h"
#include "service/server/presets.h"

namespace medakv {


namespace {

absl::StatusOr<std::vector<TuneCandidate>> Candidates(const TuneFlags& f) {
  if (f.candidates.empty()) return TuneGrid(f.grid);
  if (f.grid_opt->count() > 0) return absl::InvalidArgumentError("--candidates and --grid: give one of them");
  MEDAKV_ASSIGN_OR_RETURN(std::shared_ptr<const PresetTable> table, PresetTable::Load(f.candidates));
  if (table->empty()) return absl::InvalidArgumentError(absl::StrCat("--candidates ", f.candidates, ": no preset"));
  std::vector<TuneCandidate> out;
  for (const PresetTable::Preset& p : table->presets()) out.push_back(TuneCandidate{p.name, p.options});
  return out;
}

}  // namespace

void AddTuneCommand(CLI::App& app, TuneFlags& f) {
  CLI::App* t = app.add_subcommand(
      "tune", "Fit a policy to your model: sweep policies and parameters on sample caches with future queries, "
              "rank them by attention-output error, write the best per rho as server presets");
  t->add_option("caches", f.inputs,
                "Sample caches (.safetensors with the queries of the prompt rows); the future queries come from "
                "X.future.safetensors beside X.safetensors, else the last --holdout query rows")
      ->required();
  t->add_option("--layout", f.layout, "Dims order of the files' tensors: hnd or nhd")->capture_default_str();
  t->add_option("--holdout", f.holdout, "Query rows held out as the future when a cache has no future file")
      ->capture_default_str();
  t->add_option("--rhos", f.rhos, "Comma list of rho values in (0, 1]")->capture_default_str();
  f.grid_opt = t->add_option("--grid", f.grid, "Candidates: baselines | quick | full")->capture_default_str();
  t->add_option("--candidates", f.candidates,
                "Candidates from a presets file (docs/presets.md; each preset's rho is replaced by --rhos)");
  t->add_option("-o,--output", f.output, "Write the best candidate per rho as a presets file (--policy_presets)");
  t->add_option("--prefix", f.prefix, "Preset names: PREFIX-r<rho>")->capture_default_str();
  t->add_option("--default-rho", f.default_rho,
                "Also write the best at this rho (one of --rhos) as the preset \"default\"");
  t->add_option("--csv", f.csv, "Write candidate,rho,kept_fraction,mean_rel_error,baseline,<per sample> to FILE");
  t->add_flag("--json", f.json, "Print the results as JSON");
  t->add_flag("--no-progress", f.no_progress, "No progress line (drawn only when stderr is a terminal)");
}

absl::Status RunTune(TuneFlags& f) {
  MEDAKV_ASSIGN_OR_RETURN(const std::vector<double> rhos, ParseRhoList(f.rhos));
  MEDAKV_ASSIGN_OR_RETURN(const Layout layout, ParseLayout(f.layout));
  MEDAKV_ASSIGN_OR_RETURN(const std::vector<TuneCandidate> candidates, Candidates(f));
  if (!f.prefix.empty()) {
    absl::Status s = ValidatePresetName(absl::StrCat(f.prefix, "-r0.1"));
    if (!s.ok()) return absl::InvalidArgumentError(absl::StrCat("--prefix '", f.prefix, "': ", s.message()));
  }
  if (f.default_rho != 0.0 && f.output.empty()) return absl::InvalidArgumentError("--default-rho needs -o");
  std::vector<LoadedSample> loaded;
  std::vector<TuneSample> samples;
  for (const std::string& path : f.inputs) {
    MEDAKV_ASSIGN_OR_RETURN(LoadedSample s, LoadSample(path, layout, f.holdout));
    samples.push_back(s.sample);
    loaded.push_back(std::move(s));
  }
  const std::unique_ptr<Backend> backend = MakeCpuBackend();
  ProgressBar counter("tune", !f.no_progress && !f.json);
  const auto t0 = std::chrono::steady_clock::now();
  absl::StatusOr<TuneReport> report =
      Tune(samples, candidates, rhos, *backend,
           [&](int64_t done, int64_t total) { counter.UpdateCount(done, total, "runs"); });
  counter.Finish();
  if (!report.ok()) return report.status();
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (!f.csv.empty()) MEDAKV_RETURN_IF_ERROR(WriteTextFile(f.csv, TuneCsv(*report)));
  if (!f.output.empty()) {
    MEDAKV_ASSIGN_OR_RETURN(const medakv::v1::PolicyPresets presets, TunePresets(*report, f.prefix, f.default_rho));
    std::string header = absl::StrFormat("Written by medakv tune (%d candidates, rhos %s) on:\n", candidates.size(),
                                         f.rhos);
    for (const LoadedSample& s : loaded) absl::StrAppend(&header, "  ", s.sample.name, " (future: ", s.future_source, ")\n");
    absl::StrAppend(&header, "Load it with: medakv-server --policy_presets=FILE (docs/presets.md)\n");
    const std::string text = PresetsToText(presets, header);
    // Check that the server will take it before writing it.
    MEDAKV_RETURN_IF_ERROR(PresetTable::Parse(text, f.output).status());
    MEDAKV_RETURN_IF_ERROR(WriteTextFile(f.output, text));
  }
  if (f.json) {
    nlohmann::json j;
    j["samples"] = nlohmann::json::array();
    for (const LoadedSample& s : loaded) j["samples"].push_back({{"cache", s.sample.name}, {"future", s.future_source}});
    j["rhos"] = report->rhos;
    j["seconds"] = seconds;
    j["runs"] = nlohmann::json::array();
    for (const TuneRow& r : report->rows) {
      j["runs"].push_back({{"candidate", r.candidate},
                           {"policy", PolicyName(r.options.policy)},
                           {"rho", r.rho},
                           {"kept_fraction", r.kept_fraction},
                           {"mean_rel_error", r.mean_error},
                           {"sample_error", r.sample_error},
                           {"baseline", r.baseline}});
    }
    j["best"] = nlohmann::json::array();
    for (size_t i = 0; i < report->rhos.size(); ++i) {
      const TuneRow& b = report->rows[report->best[i]];
      j["best"].push_back({{"rho", report->rhos[i]}, {"candidate", b.candidate}, {"mean_rel_error", b.mean_error}});
    }
    if (!f.output.empty()) j["presets"] = f.output;
    std::cout << j.dump(2) << "\n";
    return absl::OkStatus();
  }
  std::cout << absl::StrFormat("medakv tune: %d candidates x %d rhos on %d samples, %.1f s\n", candidates.size(),
                               report->rhos.size(), samples.size(), seconds);
  for (const LoadedSample& s : loaded) std::cout << "  " << s.sample.name << " (future: " << s.future_source << ")\n";
  std::cout << "\n" << FormatTuneTable(*report);
  for (size_t i = 0; i < report->rhos.size(); ++i) {
    const TuneRow& b = report->rows[report->best[i]];
    std::cout << absl::StrFormat("best at rho %g: %s (error %.6f)\n", report->rhos[i], b.candidate, b.mean_error);
  }
  if (!f.output.empty()) std::cout << "presets written to " << f.output << "\n";
  return absl::OkStatus();
}

}  // namespace medakv
