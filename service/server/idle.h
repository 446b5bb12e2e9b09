// Idle timeouts (--idle_timeout). A call that waits on its client (for the
// next message of an upload, or for the client to read a message written to
// it) and sees no progress for the timeout is ended by the watchdog, so that
// a client that stalls gives back its compute slot, its store reservation,
// its pinned entries and its memory. Calls waiting on the server (for a slot,
// or for their compression) do not time out here: --queue_timeout and the
// call's deadline bound those.
//
// Each call owns an IdleWatch (Watch), reports progress on it, and releases
// it in OnDone (Release) before it deletes itself. The watchdog runs a call's
// `expire` on its own thread at most once, and never after Release returns
// (Release waits while `expire` runs on another thread; gRPC may also run
// OnDone inline inside `expire`, and Release then returns at once), so the
// call and its gRPC context are alive while `expire` runs.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace medakv::server {

class IdleWatchdog;

// One call's progress, shared by the call and the watchdog.
class IdleWatch {
 public:
  // A message arrived or went out: the idle clock restarts.
  void Progress();
  // Whether the call now waits on its client (a read or a write pending);
  // only such calls time out. Restarts the idle clock.
  void SetWaiting(bool waiting);
  // The watchdog ended the call: its status is DEADLINE_EXCEEDED.
  bool expired() const { return expired_.load(); }

 private:
  friend class IdleWatchdog;
  std::atomic<int64_t> since_ns_{0};  // steady-clock nanoseconds of the last progress
  std::atomic<bool> waiting_{false};
  std::atomic<bool> expired_{false};
  absl::Mutex mu_;
  std::function<void()> expire_ ABSL_GUARDED_BY(mu_);  // empty once run or released
  bool expiring_ ABSL_GUARDED_BY(mu_) = false;         // `expire_` runs now, on `expiring_on_`
  std::thread::id expiring_on_ ABSL_GUARDED_BY(mu_);
};

class IdleWatchdog {
 public:
  // A timeout that is not positive and finite: no thread, nothing expires.
  explicit IdleWatchdog(absl::Duration timeout);
  ~IdleWatchdog();
  IdleWatchdog(const IdleWatchdog&) = delete;
  IdleWatchdog& operator=(const IdleWatchdog&) = delete;

  absl::Duration timeout() const { return timeout_; }
  bool enabled() const { return thread_.joinable(); }

  // Watches a call; `expire` ends it (see the file comment).
  std::shared_ptr<IdleWatch> Watch(std::function<void()> expire);
  // The call is done: see the file comment.
  void Release(const std::shared_ptr<IdleWatch>& watch);
  // The message a call ended by the watchdog finishes with.
  std::string Message(const char* what) const;

 private:
  void Loop();
  void Expire(const std::shared_ptr<IdleWatch>& watch);

  const absl::Duration timeout_;
  absl::Mutex mu_;
  std::vector<std::shared_ptr<IdleWatch>> watches_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

}  // namespace medakv::server
