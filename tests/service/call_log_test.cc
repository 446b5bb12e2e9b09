// The operator's log (service/server/call_log.h): which calls get a line,
// what a line holds in text and JSON, and the rate limit with its count of
// suppressed lines.
#include "service/server/call_log.h"

#include <gtest/gtest.h>

#include <cstdio>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_split.h"

namespace medakv::server {
namespace {

// Captures what a CallLog writes.
class Captured {
 public:
  Captured() : file_(std::tmpfile()) {}
  ~Captured() { std::fclose(file_); }
  std::FILE* file() { return file_; }
  std::vector<std::string> Lines() {
    std::fflush(file_);
    std::rewind(file_);
    std::string all;
    char buf[4096];
    size_t n;
    while ((n = std::fread(buf, 1, sizeof(buf), file_)) > 0) all.append(buf, n);
    std::fseek(file_, 0, SEEK_END);
    std::vector<std::string> lines = absl::StrSplit(all, '\n', absl::SkipEmpty());
    return lines;
  }

 private:
  std::FILE* file_;
};

CallRecord Failed(const char* message = "header.shape.tokens must be > 0") {
  return CallRecord{"Compress", absl::StatusCode::kInvalidArgument, message, "ipv4:127.0.0.1:4242", "alice",
                    1234, 0, 0.012};
}

TEST(CallLogTest, FailedAndSlowCallsGetALineOthersDoNot) {
  Captured out;
  CallLog log(CallLogOptions{LogFormat::kText, absl::Seconds(2), 100}, out.file());
  log.Record(CallRecord{"GetCache", absl::StatusCode::kOk, "", "ipv4:127.0.0.1:1", "", 0, 100, 0.5});  // fast OK
  EXPECT_TRUE(out.Lines().empty());
  log.Record(Failed());
  log.Record(CallRecord{"GetCache", absl::StatusCode::kOk, "", "ipv6:[::1]:7", "", 10, 2000, 2.5});  // slow OK
  const std::vector<std::string> lines = out.Lines();
  ASSERT_EQ(lines.size(), 2u);
  EXPECT_EQ(lines[0],
            "medakv-server: Compress failed: INVALID_ARGUMENT: header.shape.tokens must be > 0 (peer "
            "ipv4:127.0.0.1:4242, tenant alice, 1234 bytes in, 0 out, 0.012 s)");
  EXPECT_EQ(lines[1], "medakv-server: GetCache slow: OK (peer ipv6:[::1]:7, 10 bytes in, 2000 out, 2.500 s)");
  EXPECT_EQ(log.written(), 2);
}

TEST(CallLogTest, NoSlowLinesWhenTheThresholdIsZero) {
  Captured out;
  CallLog log(CallLogOptions{LogFormat::kText, absl::ZeroDuration(), 100}, out.file());
  log.Record(CallRecord{"GetCache", absl::StatusCode::kOk, "", "p", "", 0, 0, 3600.0});
  EXPECT_TRUE(out.Lines().empty());
}

TEST(CallLogTest, JsonLinesParseAndCarryEveryField) {
  Captured out;
  CallLog log(CallLogOptions{LogFormat::kJson, absl::Seconds(10), 100}, out.file());
  log.Record(Failed("a \"quoted\"\nmessage with \x01 control and \xff bad UTF-8"));
  log.Event("info", "start", "starting", {{"flag_listen", "127.0.0.1:0"}});
  const std::vector<std::string> lines = out.Lines();
  ASSERT_EQ(lines.size(), 2u);
  const nlohmann::json call = nlohmann::json::parse(lines[0]);
  EXPECT_EQ(call["event"], "call_failed");
  EXPECT_EQ(call["level"], "warning");
  EXPECT_EQ(call["method"], "Compress");
  EXPECT_EQ(call["code"], "INVALID_ARGUMENT");
  EXPECT_TRUE(absl::StartsWith(call["message"].get<std::string>(), "a \"quoted\"\nmessage with \x01 control"));
  EXPECT_EQ(call["peer"], "ipv4:127.0.0.1:4242");
  EXPECT_EQ(call["tenant"], "alice");
  EXPECT_EQ(call["bytes_in"], 1234);
  EXPECT_EQ(call["bytes_out"], 0);
  EXPECT_DOUBLE_EQ(call["seconds"].get<double>(), 0.012);
  EXPECT_TRUE(call.contains("time"));
  EXPECT_FALSE(call.contains("suppressed"));
  const nlohmann::json start = nlohmann::json::parse(lines[1]);
  EXPECT_EQ(start["event"], "start");
  EXPECT_EQ(start["message"], "starting");
  EXPECT_EQ(start["flag_listen"], "127.0.0.1:0");
}

// A burst beyond the bucket is dropped and counted; the next line written
// says how many were; the bucket refills with time.
TEST(CallLogTest, BurstsAreRateLimitedAndCounted) {
  Captured out;
  CallLog log(CallLogOptions{LogFormat::kJson, absl::Seconds(10), 5}, out.file());
  for (int i = 0; i < 50; ++i) log.Record(Failed());
  std::vector<std::string> lines = out.Lines();
  EXPECT_GE(lines.size(), 5u);
  EXPECT_LE(lines.size(), 6u);  // 5 in the bucket, perhaps one refilled meanwhile
  const int64_t dropped = 50 - static_cast<int64_t>(lines.size());
  EXPECT_EQ(log.suppressed_total(), dropped);
  absl::SleepFor(absl::Milliseconds(400));  // 2 tokens at 5 a second
  log.Record(Failed());
  lines = out.Lines();
  const nlohmann::json last = nlohmann::json::parse(lines.back());
  EXPECT_EQ(last["suppressed"], dropped);
  log.Record(Failed());
  EXPECT_FALSE(nlohmann::json::parse(out.Lines().back()).contains("suppressed"));
}

TEST(CallLogTest, ParseLogFormat) {
  LogFormat f = LogFormat::kText;
  EXPECT_TRUE(ParseLogFormat("json", &f).ok());
  EXPECT_EQ(f, LogFormat::kJson);
  EXPECT_TRUE(ParseLogFormat("text", &f).ok());
  EXPECT_EQ(f, LogFormat::kText);
  const absl::Status bad = ParseLogFormat("yaml", &f);
  EXPECT_EQ(bad.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(bad.message(), "--log_format must be text or json, got 'yaml'");
}

}  // namespace
}  // namespace medakv::server
