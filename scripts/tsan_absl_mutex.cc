// Makes absl::Mutex, absl::CondVar and absl::Status's reference count visible
// to ThreadSanitizer when Abseil itself is not built with TSan (Debian's
// libabsl is not): without this, TSan sees no happens-before edge from an
// absl::Mutex and reports every access that the mutex protects as a race.
//
// scripts/sanitize.sh tsan builds this file into a small shared library and
// LD_PRELOADs it into the tests. Its definitions of the absl::Mutex and
// absl::CondVar members and of Status::UnrefNonInlined interpose on Abseil's
// for every caller (the project, gRPC, Abseil itself), call the real function
// (found with dlsym(RTLD_NEXT)) and tell TSan what happened:
//   * after a lock (or a LockWhen, or a successful TryLock): acquire(mutex);
//   * before an unlock: release(mutex);
//   * around Mutex::Await* and CondVar::Wait*, which drop and retake the
//     mutex: release before, acquire after;
//   * conditions (Await, LockWhen) are evaluated inside Abseil with the mutex
//     held, by the waiter or by another thread in its Unlock: each
//     evaluation is wrapped in acquire/release;
//   * absl::Status's out-of-line Unref: acquire and release on the shared
//     representation (see the end of this file).
// Reader locks are treated like writer locks (no false report from them, but
// a race between two threads that both hold the lock for reading is missed).
// The library itself is not instrumented; __tsan_acquire/__tsan_release are
// resolved at run time from the test's TSan runtime.
#include <dlfcn.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

extern "C" void __tsan_acquire(void* addr);
extern "C" void __tsan_release(void* addr);

namespace {

// The address of a non-virtual member function (Itanium C++ ABI: the first
// word of the member pointer).
template <typename M>
void* AddressOf(M member) {
  void* p;
  static_assert(sizeof(member) >= sizeof(p));
  std::memcpy(&p, &member, sizeof(p));
  return p;
}

// The next definition of the symbol that `ours` is this library's definition
// of: its mangled name comes from dladdr, so no Abseil version is spelled here.
template <typename F, typename M>
F Next(M ours) {
  Dl_info info;
  if (dladdr(AddressOf(ours), &info) == 0 || info.dli_sname == nullptr) {
    std::fprintf(stderr, "tsan_absl_mutex: dladdr failed\n");
    std::abort();
  }
  void* next = dlsym(RTLD_NEXT, info.dli_sname);
  if (next == nullptr) {
    std::fprintf(stderr, "tsan_absl_mutex: %s not found after the preload\n", info.dli_sname);
    std::abort();
  }
  return reinterpret_cast<F>(next);
}

void Acquire(const void* mu) { __tsan_acquire(const_cast<void*>(mu)); }
void Release(const void* mu) { __tsan_release(const_cast<void*>(mu)); }

// A condition is evaluated with the mutex held, but inside Abseil and by any
// thread: the waiter, or another thread in its Unlock. The evaluation is
// therefore wrapped in acquire/release so that its reads are ordered with the
// writes of the other holders of the mutex.
struct Guarded {
  const absl::Condition* cond;
  const absl::Mutex* mu;
};

bool EvalGuarded(Guarded* g) {
  Acquire(g->mu);
  const bool r = g->cond->Eval();
  Release(g->mu);
  return r;
}

using Plain = void (*)(absl::Mutex*);
using Try = bool (*)(absl::Mutex*);
using When = void (*)(absl::Mutex*, const absl::Condition&);
using WhenTimeout = bool (*)(absl::Mutex*, const absl::Condition&, absl::Duration);
using WhenDeadline = bool (*)(absl::Mutex*, const absl::Condition&, absl::Time);
using CvWait = void (*)(absl::CondVar*, absl::Mutex*);
using CvWaitTimeout = bool (*)(absl::CondVar*, absl::Mutex*, absl::Duration);
using CvWaitDeadline = bool (*)(absl::CondVar*, absl::Mutex*, absl::Time);
using StatusUnref = void (*)(uintptr_t);

}  // namespace

namespace absl {
ABSL_NAMESPACE_BEGIN

void Mutex::Lock() {
  static const auto next = Next<Plain>(&Mutex::Lock);
  next(this);
  Acquire(this);
}

void Mutex::ReaderLock() {
  static const auto next = Next<Plain>(&Mutex::ReaderLock);
  next(this);
  Acquire(this);
}

void Mutex::Unlock() {
  static const auto next = Next<Plain>(&Mutex::Unlock);
  Release(this);
  next(this);
}

void Mutex::ReaderUnlock() {
  static const auto next = Next<Plain>(&Mutex::ReaderUnlock);
  Release(this);
  next(this);
}

bool Mutex::TryLock() {
  static const auto next = Next<Try>(&Mutex::TryLock);
  const bool locked = next(this);
  if (locked) Acquire(this);
  return locked;
}

bool Mutex::ReaderTryLock() {
  static const auto next = Next<Try>(&Mutex::ReaderTryLock);
  const bool locked = next(this);
  if (locked) Acquire(this);
  return locked;
}

void Mutex::LockWhen(const Condition& cond) {
  static const auto next = Next<When>(&Mutex::LockWhen);
  Guarded g{&cond, this};
  next(this, absl::Condition(&EvalGuarded, &g));
  Acquire(this);
}

void Mutex::ReaderLockWhen(const Condition& cond) {
  static const auto next = Next<When>(&Mutex::ReaderLockWhen);
  Guarded g{&cond, this};
  next(this, absl::Condition(&EvalGuarded, &g));
  Acquire(this);
}

// The *WithTimeout/*WithDeadline forms hold the mutex on return whatever
// they return.
bool Mutex::LockWhenWithTimeout(const Condition& cond, Duration timeout) {
  static const auto next = Next<WhenTimeout>(&Mutex::LockWhenWithTimeout);
  Guarded g{&cond, this};
  const bool r = next(this, absl::Condition(&EvalGuarded, &g), timeout);
  Acquire(this);
  return r;
}

bool Mutex::ReaderLockWhenWithTimeout(const Condition& cond, Duration timeout) {
  static const auto next = Next<WhenTimeout>(&Mutex::ReaderLockWhenWithTimeout);
  Guarded g{&cond, this};
  const bool r = next(this, absl::Condition(&EvalGuarded, &g), timeout);
  Acquire(this);
  return r;
}

bool Mutex::LockWhenWithDeadline(const Condition& cond, Time deadline) {
  static const auto next = Next<WhenDeadline>(&Mutex::LockWhenWithDeadline);
  Guarded g{&cond, this};
  const bool r = next(this, absl::Condition(&EvalGuarded, &g), deadline);
  Acquire(this);
  return r;
}

bool Mutex::ReaderLockWhenWithDeadline(const Condition& cond, Time deadline) {
  static const auto next = Next<WhenDeadline>(&Mutex::ReaderLockWhenWithDeadline);
  Guarded g{&cond, this};
  const bool r = next(this, absl::Condition(&EvalGuarded, &g), deadline);
  Acquire(this);
  return r;
}

void Mutex::Await(const Condition& cond) {
  static const auto next = Next<When>(&Mutex::Await);
  Guarded g{&cond, this};
  Release(this);
  next(this, absl::Condition(&EvalGuarded, &g));
  Acquire(this);
}

bool Mutex::AwaitWithTimeout(const Condition& cond, Duration timeout) {
  static const auto next = Next<WhenTimeout>(&Mutex::AwaitWithTimeout);
  Guarded g{&cond, this};
  Release(this);
  const bool r = next(this, absl::Condition(&EvalGuarded, &g), timeout);
  Acquire(this);
  return r;
}

bool Mutex::AwaitWithDeadline(const Condition& cond, Time deadline) {
  static const auto next = Next<WhenDeadline>(&Mutex::AwaitWithDeadline);
  Guarded g{&cond, this};
  Release(this);
  const bool r = next(this, absl::Condition(&EvalGuarded, &g), deadline);
  Acquire(this);
  return r;
}

void CondVar::Wait(Mutex* mu) {
  static const auto next = Next<CvWait>(&CondVar::Wait);
  Release(mu);
  next(this, mu);
  Acquire(mu);
}

bool CondVar::WaitWithTimeout(Mutex* mu, Duration timeout) {
  static const auto next = Next<CvWaitTimeout>(&CondVar::WaitWithTimeout);
  Release(mu);
  const bool r = next(this, mu, timeout);
  Acquire(mu);
  return r;
}

bool CondVar::WaitWithDeadline(Mutex* mu, Time deadline) {
  static const auto next = Next<CvWaitDeadline>(&CondVar::WaitWithDeadline);
  Release(mu);
  const bool r = next(this, mu, deadline);
  Acquire(mu);
  return r;
}

// absl::Status shares its heap representation between copies (a reference
// count); the last Unref deletes it. The decrement is an acq_rel atomic in
// libabsl_status, invisible to TSan, so a Status copied to another thread
// looked like a race between one thread's reads of the message and the other
// thread's delete. Each Unref is an acquire and a release on the rep, as the
// real fetch_sub is.
void Status::UnrefNonInlined(uintptr_t rep) {
  static const auto next = Next<StatusUnref>(&Status::UnrefNonInlined);
  void* const addr = reinterpret_cast<void*>(rep);
  Release(addr);
  Acquire(addr);
  next(rep);
}

ABSL_NAMESPACE_END
}  // namespace absl
