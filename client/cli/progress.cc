#include "client/cli/progress.h"

#include <unistd.h>

#include <cstdio>
#include <utility>

#include "absl/strings/str_format.h"

namespace medakv {

std::string HumanBytes(int64_t bytes) {
  const double b = static_cast<double>(bytes);
  if (bytes < 1024) return absl::StrFormat("%d B", bytes);
  if (bytes < (int64_t{1} << 20)) return absl::StrFormat("%.1f KiB", b / 1024);
  if (bytes < (int64_t{1} << 30)) return absl::StrFormat("%.1f MiB", b / (1 << 20));
  return absl::StrFormat("%.2f GiB", b / (int64_t{1} << 30));
}

ProgressBar::ProgressBar(std::string label, bool enabled)
    : label_(std::move(label)),
      enabled_(enabled && isatty(STDERR_FILENO) == 1),
      start_(std::chrono::steady_clock::now()) {}

ProgressBar::~ProgressBar() { Finish(); }

bool ProgressBar::Due(bool last) {
  if (!enabled_) return false;
  const auto now = std::chrono::steady_clock::now();
  if (now - start_ < std::chrono::milliseconds(500)) return false;
  if (drawn_ && !last && now - last_draw_ < std::chrono::milliseconds(100)) return false;
  last_draw_ = now;
  drawn_ = true;
  return true;
}

void ProgressBar::Draw(const std::string& line) {
  const double seconds = std::chrono::duration<double>(last_draw_ - start_).count();
  absl::FPrintF(stderr, "\r%s  %.1f s\033[K", line, seconds);
  std::fflush(stderr);
}

void ProgressBar::UpdateCount(int64_t done, int64_t total, const std::string& unit) {
  if (!Due(total > 0 && done >= total)) return;
  Draw(absl::StrFormat("%s %d/%d %s", label_, done, total, unit));
}

void ProgressBar::Update(Transfer direction, int64_t done, int64_t total) {
  if (!Due(total > 0 && done >= total)) return;
  const char* dir = direction == Transfer::kUpload ? "up" : "down";
  std::string line;
  if (total > 0) {
    constexpr int kWidth = 30;
    const double f = std::min(1.0, static_cast<double>(done) / static_cast<double>(total));
    const int filled = static_cast<int>(f * kWidth);
    line = absl::StrFormat("%s %s [%s%s] %3.0f%% %s / %s", label_, dir, std::string(filled, '#'),
                           std::string(kWidth - filled, '.'), 100 * f, HumanBytes(done), HumanBytes(total));
  } else {
    line = absl::StrFormat("%s %s %s", label_, dir, HumanBytes(done));
  }
  Draw(line);
}

ProgressCallback ProgressBar::Callback() {
  if (!enabled_) return nullptr;
  return [this](Transfer direction, int64_t done, int64_t total) { Update(direction, done, total); };
}

void ProgressBar::Finish() {
  if (!drawn_) return;
  std::fputs("\r\033[K", stderr);
  std::fflush(stderr);
  drawn_ = false;
}

}  // namespace medakv
