#include "service/server/call_log.h"

#include <algorithm>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"

namespace medakv::server {
namespace {

std::string Timestamp(absl::Time t) { return absl::FormatTime("%Y-%m-%dT%H:%M:%E3SZ", t, absl::UTCTimeZone()); }

}  // namespace

absl::Status ParseLogFormat(absl::string_view s, LogFormat* format) {
  if (s == "text") {
    *format = LogFormat::kText;
  } else if (s == "json") {
    *format = LogFormat::kJson;
  } else {
    return absl::InvalidArgumentError(absl::StrCat("--log_format must be text or json, got '", s, "'"));
  }
  return absl::OkStatus();
}

CallLog::CallLog(CallLogOptions options, std::FILE* out)
    : options_(options),
      out_(out != nullptr ? out : stderr),
      tokens_(static_cast<double>(std::max(options.max_per_second, 1))),
      refilled_(absl::Now()) {}

bool CallLog::Take() {
  const double rate = static_cast<double>(std::max(options_.max_per_second, 1));
  const absl::Time now = absl::Now();
  tokens_ = std::min(rate, tokens_ + absl::ToDoubleSeconds(now - refilled_) * rate);
  refilled_ = now;
  if (tokens_ < 1.0) return false;
  tokens_ -= 1.0;
  return true;
}

void CallLog::Write(const std::string& line) {
  const std::string out = absl::StrCat(line, "\n");  // one write: lines of other writers do not split it
  std::fwrite(out.data(), 1, out.size(), out_);
  std::fflush(out_);
  ++written_;
}

void CallLog::Record(const CallRecord& c) {
  const bool failed = c.code != absl::StatusCode::kOk;
  const bool slow =
      options_.slow > absl::ZeroDuration() && c.seconds >= absl::ToDoubleSeconds(options_.slow);
  if (!failed && !slow) return;
  absl::MutexLock lock(&mu_);
  if (!Take()) {
    ++suppressed_;
    ++suppressed_total_;
    return;
  }
  const std::string code = absl::StatusCodeToString(c.code);
  std::string line;
  if (options_.format == LogFormat::kJson) {
    nlohmann::json j;
    j["time"] = Timestamp(absl::Now());
    j["level"] = failed ? "warning" : "info";
    j["event"] = failed ? "call_failed" : "call_slow";
    j["method"] = c.method;
    j["code"] = code;
    if (!c.message.empty()) j["message"] = c.message;
    j["peer"] = c.peer;
    if (!c.tenant.empty()) j["tenant"] = c.tenant;
    j["bytes_in"] = c.bytes_in;
    j["bytes_out"] = c.bytes_out;
    j["seconds"] = c.seconds;
    if (suppressed_ > 0) j["suppressed"] = suppressed_;
    line = j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  } else {
    line = absl::StrFormat("medakv-server: %s %s: %s%s%s (peer %s%s, %d bytes in, %d out, %.3f s)", c.method,
                           failed ? "failed" : "slow", code, c.message.empty() ? "" : ": ", c.message, c.peer,
                           c.tenant.empty() ? "" : absl::StrCat(", tenant ", c.tenant), c.bytes_in, c.bytes_out,
                           c.seconds);
    if (suppressed_ > 0) absl::StrAppend(&line, " [", suppressed_, " earlier call lines suppressed]");
  }
  suppressed_ = 0;
  Write(line);
}

void CallLog::Event(absl::string_view level, absl::string_view event, absl::string_view text,
                    const std::vector<std::pair<std::string, std::string>>& fields) {
  std::string line;
  if (options_.format == LogFormat::kJson) {
    nlohmann::json j;
    j["time"] = Timestamp(absl::Now());
    j["level"] = std::string(level);
    j["event"] = std::string(event);
    j["message"] = std::string(text);
    for (const auto& [name, value] : fields) j[name] = value;
    line = j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  } else {
    line = absl::StrCat("medakv-server: ", text);
  }
  absl::MutexLock lock(&mu_);
  Write(line);
}

int64_t CallLog::written() const {
  absl::MutexLock lock(&mu_);
  return written_;
}

int64_t CallLog::suppressed_total() const {
  absl::MutexLock lock(&mu_);
  return suppressed_total_;
}

}  // namespace medakv::server
