// Admission control and the compute workers of the server.
//
// A request takes an in-flight slot when its header arrives (before any
// tensor memory is reserved) and holds it until it finishes, so the server's
// memory stays within max_inflight x max_request_bytes. A request that finds
// every slot taken waits, without blocking a gRPC thread, until a slot frees
// or its wait budget runs out (then RESOURCE_EXHAUSTED).
#pragma once

#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace medakv::server {

class Admission {
 public:
  // Called exactly once: OK with a slot held (release it with Release()), or
  // RESOURCE_EXHAUSTED when the wait timed out, or CANCELLED when the waiter
  // was cancelled or the admission shut down. Runs on an arbitrary thread.
  using Callback = std::function<void(absl::Status)>;

  // At most `max_waiting` calls wait at once (< 0: no bound; 0: none wait);
  // one more is refused at once with RESOURCE_EXHAUSTED.
  Admission(int slots, absl::Duration max_wait, int max_waiting = -1);
  ~Admission();  // fails every waiter with CANCELLED
  Admission(const Admission&) = delete;
  Admission& operator=(const Admission&) = delete;

  // A fresh ticket for Acquire and Cancel.
  static uint64_t NewTicket();
  // Grants a slot now (the callback runs before Acquire returns), queues the
  // waiter under `ticket`, or refuses it (RESOURCE_EXHAUSTED, before Acquire
  // returns) when max_waiting calls wait already. The caller must not touch state the callback may
  // have released after Acquire returns.
  void Acquire(uint64_t ticket, Callback done);
  // Withdraws a queued waiter (its callback gets CANCELLED); no-op if granted.
  void Cancel(uint64_t ticket);
  void Release();

  int in_use() const;
  int waiting() const;

 private:
  struct Waiter {
    uint64_t ticket;
    absl::Time deadline;
    Callback done;
  };
  void TimerLoop();

  const int slots_;
  const absl::Duration max_wait_;
  const int max_waiting_;
  mutable absl::Mutex mu_;
  int in_use_ ABSL_GUARDED_BY(mu_) = 0;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::deque<Waiter> waiters_ ABSL_GUARDED_BY(mu_);
  std::thread timer_;
};

// A call's claim on one admission slot: asks for it (asynchronously), can
// withdraw while waiting, and releases a held slot when destroyed (so a
// reactor that owns one releases its slot in OnDone by being deleted).
class SlotClaim {
 public:
  explicit SlotClaim(Admission* admission) : admission_(admission) {}
  ~SlotClaim();
  SlotClaim(const SlotClaim&) = delete;
  SlotClaim& operator=(const SlotClaim&) = delete;

  // `done` gets OK with the slot held, or the reason there is none. It may
  // run before Request returns: the caller must not touch state after it.
  void Request(Admission::Callback done);
  // Withdraws a pending request (its callback gets CANCELLED); no-op otherwise.
  void Cancel();

 private:
  Admission* const admission_;
  absl::Mutex mu_;
  bool waiting_ ABSL_GUARDED_BY(mu_) = false;
  bool held_ ABSL_GUARDED_BY(mu_) = false;
  uint64_t ticket_ = 0;
};

// A fixed set of threads running closures in FIFO order.
class WorkerPool {
 public:
  explicit WorkerPool(int threads);
  ~WorkerPool();  // runs what was queued, then joins
  WorkerPool(const WorkerPool&) = delete;
  WorkerPool& operator=(const WorkerPool&) = delete;

  void Submit(std::function<void()> work);

 private:
  absl::Mutex mu_;
  std::deque<std::function<void()>> queue_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> threads_;
};

}  // namespace medakv::server
