// The operator's log: one line on stderr for every call that fails or is
// slow (method, status code and message, peer, tenant, bytes in and out,
// duration), and one at start-up with every effective flag. Lines are plain
// text ("medakv-server: ...") or, with --log_format=json, one JSON object
// each. Call lines are rate-limited (a token bucket of `max_per_second`
// lines): a line that finds the bucket empty is dropped and counted, and the
// next line written says how many were dropped ("suppressed").
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace medakv::server {

enum class LogFormat : uint8_t { kText = 0, kJson = 1 };

// "text" or "json"; INVALID_ARGUMENT otherwise.
[[nodiscard]] absl::Status ParseLogFormat(absl::string_view s, LogFormat* format);

struct CallLogOptions {
  LogFormat format = LogFormat::kText;
  absl::Duration slow = absl::Seconds(10);  // OK calls at least this long are logged; 0: none
  int max_per_second = 20;                  // call lines per second at most (bursts up to as many)
};

// What one finished call was.
struct CallRecord {
  const char* method = "";
  absl::StatusCode code = absl::StatusCode::kOk;
  std::string message;
  std::string peer;
  std::string tenant;  // empty: none (authentication off) or unknown (it failed)
  int64_t bytes_in = 0;
  int64_t bytes_out = 0;
  double seconds = 0;
};

class CallLog {
 public:
  // `out` is not owned; nullptr: stderr.
  explicit CallLog(CallLogOptions options = {}, std::FILE* out = nullptr);
  CallLog(const CallLog&) = delete;
  CallLog& operator=(const CallLog&) = delete;

  LogFormat format() const { return options_.format; }

  // Writes a line for a call that failed, or that took at least `slow`.
  void Record(const CallRecord& call);
  // Writes a line whatever it says (start-up, shutdown), not rate-limited:
  // `event` names it in JSON ("start", "listening", ...), `text` is the
  // sentence (the text line, and JSON's "message"); `fields` are extra JSON
  // members (name, value as a string).
  void Event(absl::string_view level, absl::string_view event, absl::string_view text,
             const std::vector<std::pair<std::string, std::string>>& fields = {});

  int64_t written() const;
  int64_t suppressed_total() const;

 private:
  bool Take() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Write(const std::string& line) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const CallLogOptions options_;
  std::FILE* const out_;
  mutable absl::Mutex mu_;
  double tokens_ ABSL_GUARDED_BY(mu_);
  absl::Time refilled_ ABSL_GUARDED_BY(mu_);
  int64_t suppressed_ ABSL_GUARDED_BY(mu_) = 0;  // dropped since the last line written
  int64_t suppressed_total_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t written_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace medakv::server
