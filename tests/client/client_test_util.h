// Helpers shared by the tests that run medakv::Client against medakv-server
// processes (client_test.cc, fault_test.cc).
#pragma once

#include <gtest/gtest.h>

#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "client/cpp/client.h"
#include "kernels/backend.h"
#include "service/compress/pipeline.h"
#include "tests/client/server_process.h"

namespace medakv::test {

// A started server, or nullptr after a test failure saying why.
inline std::unique_ptr<ServerProcess> StartServer(const std::vector<std::string>& flags = {}, int port = 0) {
  absl::StatusOr<std::unique_ptr<ServerProcess>> s = ServerProcess::Start(flags, port);
  EXPECT_TRUE(s.ok()) << s.status();
  return s.ok() ? *std::move(s) : nullptr;
}

// Options for tests: short backoffs, a deadline that a hung call would hit.
inline ClientOptions Options(std::vector<std::string> targets) {
  ClientOptions o;
  o.targets = std::move(targets);
  o.deadline = absl::Seconds(60);
  o.retry.initial_backoff = absl::Milliseconds(10);
  o.retry.max_backoff = absl::Milliseconds(100);
  return o;
}

// A client, or nullptr after a test failure saying why.
inline std::unique_ptr<Client> NewClient(ClientOptions o) {
  absl::StatusOr<std::unique_ptr<Client>> c = Client::Create(std::move(o));
  EXPECT_TRUE(c.ok()) << c.status();
  return c.ok() ? *std::move(c) : nullptr;
}

// The library's result on the CPU backend (empty after a test failure).
inline CompressResult LocalCompress(const CacheInput& in, const CompressOptions& o) {
  const std::unique_ptr<Backend> backend = MakeCpuBackend();
  absl::StatusOr<CompressResult> r = Compress(in, o, *backend);
  EXPECT_TRUE(r.ok()) << r.status();
  return r.ok() ? *std::move(r) : CompressResult{};
}

// Polls `done` every 20 ms until it returns true (true) or `bound` passes (false).
inline bool PollUntil(absl::Duration bound, const std::function<bool()>& done) {
  const absl::Time give_up = absl::Now() + bound;
  for (;;) {
    if (done()) return true;
    if (absl::Now() > give_up) return false;
    absl::SleepFor(absl::Milliseconds(20));
  }
}

inline CompressOptions Meda(double rho) {
  CompressOptions o = DefaultOptions(PolicyKind::kMeda);
  o.budget.rho = rho;
  return o;
}

}  // namespace medakv::test
