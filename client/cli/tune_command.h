// The `medakv tune` subcommand (client/cli/tune.h; docs/tune.md).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "absl/status/status.h"

namespace medakv {

// The command line of `medakv tune`.
struct TuneFlags {
  std::vector<std::string> inputs;
  std::string layout = "hnd";
  int64_t holdout = 16;
  std::string rhos = "0.05,0.1,0.2";
  std::string grid = "quick";
  std::string candidates;  // a PolicyPresets file instead of --grid
  std::string output;      // the presets file
  std::string prefix = "tuned";
  double default_rho = 0.0;
  std::string csv;
  bool json = false;
  bool no_progress = false;
  CLI::Option* grid_opt = nullptr;
};

void AddTuneCommand(CLI::App& app, TuneFlags& flags);
[[nodiscard]] absl::Status RunTune(TuneFlags& flags);

}  // namespace medakv
