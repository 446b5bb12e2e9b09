// A one-line progress bar on stderr for long uploads and downloads, drawn only
// when stderr is a terminal (never in pipes, logs or tests) and only once a
// transfer has run for half a second.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

#include "client/cpp/remote.h"

namespace medakv {

class ProgressBar {
 public:
  // `label` starts the line ("put cache-1"). `enabled` false: draws nothing;
  // true: draws when stderr is a terminal.
  ProgressBar(std::string label, bool enabled);
  // Clears the line if one was drawn.
  ~ProgressBar();
  ProgressBar(const ProgressBar&) = delete;
  ProgressBar& operator=(const ProgressBar&) = delete;

  // Redraws at most 10 times a second. total < 0: unknown.
  void Update(Transfer direction, int64_t done, int64_t total);
  // The same for a count of things other than bytes: "LABEL 37/120 UNIT".
  void UpdateCount(int64_t done, int64_t total, const std::string& unit);
  // A callback for medakv::CallOptions::progress that updates this bar
  // (nullptr when the bar is disabled).
  ProgressCallback Callback();
  // Clears the line.
  void Finish();

 private:
  // Whether to draw now (enabled, past the first half second, and not within
  // 100 ms of the last draw unless `last`); records the draw.
  bool Due(bool last);
  // Draws `line` and the time since the start.
  void Draw(const std::string& line);

  const std::string label_;
  const bool enabled_;
  const std::chrono::steady_clock::time_point start_;
  std::chrono::steady_clock::time_point last_draw_{};
  bool drawn_ = false;
};

// "1.5 MiB", "2.0 GiB", "512 B".
std::string HumanBytes(int64_t bytes);

}  // namespace medakv
