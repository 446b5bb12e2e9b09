// The idle watchdog (service/server/idle.h): which calls expire and when,
// at most once, never after Release; Release waits for an `expire` running
// on the watchdog's thread, and returns at once when called from inside it
// (gRPC may run OnDone inline). Runs under ThreadSanitizer in CI.
#include "service/server/idle.h"

#include <gtest/gtest.h>

#include <atomic>
#include <memory>
#include <thread>
#include <vector>

#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace medakv::server {
namespace {

bool PollUntil(absl::Duration bound, const std::function<bool()>& done) {
  const absl::Time give_up = absl::Now() + bound;
  while (!done()) {
    if (absl::Now() > give_up) return false;
    absl::SleepFor(absl::Milliseconds(5));
  }
  return true;
}

TEST(IdleWatchdogTest, OnlyCallsWaitingOnTheirClientExpireOnce) {
  IdleWatchdog dog(absl::Milliseconds(50));
  ASSERT_TRUE(dog.enabled());
  std::atomic<int> waiting_expired{0}, busy_expired{0};
  std::shared_ptr<IdleWatch> waiting = dog.Watch([&] { ++waiting_expired; });
  std::shared_ptr<IdleWatch> busy = dog.Watch([&] { ++busy_expired; });
  waiting->SetWaiting(true);
  busy->SetWaiting(false);  // waiting on the server: never expires here
  EXPECT_TRUE(PollUntil(absl::Seconds(5), [&] { return waiting_expired.load() == 1; }));
  EXPECT_TRUE(waiting->expired());
  absl::SleepFor(absl::Milliseconds(200));
  EXPECT_EQ(waiting_expired.load(), 1);  // at most once
  EXPECT_EQ(busy_expired.load(), 0);
  EXPECT_FALSE(busy->expired());
  dog.Release(waiting);
  dog.Release(busy);
}

TEST(IdleWatchdogTest, ProgressKeepsACallAlive) {
  IdleWatchdog dog(absl::Milliseconds(100));
  std::atomic<int> expired{0};
  std::shared_ptr<IdleWatch> w = dog.Watch([&] { ++expired; });
  w->SetWaiting(true);
  for (int i = 0; i < 30; ++i) {  // 600 ms of progress every 20 ms
    absl::SleepFor(absl::Milliseconds(20));
    w->Progress();
  }
  EXPECT_EQ(expired.load(), 0);
  EXPECT_TRUE(PollUntil(absl::Seconds(5), [&] { return expired.load() == 1; }));  // then it stalls
  dog.Release(w);
}

TEST(IdleWatchdogTest, NothingExpiresAfterRelease) {
  IdleWatchdog dog(absl::Milliseconds(20));
  std::atomic<int> expired{0};
  std::shared_ptr<IdleWatch> w = dog.Watch([&] { ++expired; });
  w->SetWaiting(true);
  dog.Release(w);
  absl::SleepFor(absl::Milliseconds(200));
  EXPECT_EQ(expired.load(), 0);
}

// Release from another thread while `expire` runs waits for it to return.
TEST(IdleWatchdogTest, ReleaseWaitsForARunningExpire) {
  IdleWatchdog dog(absl::Milliseconds(20));
  absl::Notification started, may_return;
  std::atomic<bool> returned{false};
  std::shared_ptr<IdleWatch> w = dog.Watch([&] {
    started.Notify();
    may_return.WaitForNotification();
    returned = true;
  });
  w->SetWaiting(true);
  ASSERT_TRUE(started.WaitForNotificationWithTimeout(absl::Seconds(5)));
  std::atomic<bool> released{false};
  std::thread releaser([&] {
    dog.Release(w);
    EXPECT_TRUE(returned.load());  // never while `expire` still runs
    released = true;
  });
  absl::SleepFor(absl::Milliseconds(100));
  EXPECT_FALSE(released.load());
  may_return.Notify();
  releaser.join();
  EXPECT_TRUE(released.load());
}

// gRPC may run OnDone (and so Release) inside `expire`: it returns at once.
TEST(IdleWatchdogTest, ReleaseInsideExpireReturns) {
  IdleWatchdog dog(absl::Milliseconds(20));
  std::atomic<bool> done{false};
  std::shared_ptr<IdleWatch> w;
  w = dog.Watch([&] {
    dog.Release(w);
    done = true;
  });
  w->SetWaiting(true);
  EXPECT_TRUE(PollUntil(absl::Seconds(5), [&] { return done.load(); }));
}

// Many calls watched, progressing, expiring and released from many threads.
TEST(IdleWatchdogTest, ConcurrentCallsKeepTheRules) {
  IdleWatchdog dog(absl::Milliseconds(10));
  std::vector<std::thread> threads;
  std::atomic<int> total_expired{0};
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 50; ++i) {
        std::atomic<int> expired{0};
        std::shared_ptr<IdleWatch> w = dog.Watch([&] { ++expired; });
        w->SetWaiting(true);
        if ((i + t) % 3 == 0) absl::SleepFor(absl::Milliseconds(30));  // long enough to expire
        w->Progress();
        dog.Release(w);
        EXPECT_LE(expired.load(), 1);
        total_expired += expired.load();
      }
    });
  }
  for (std::thread& th : threads) th.join();
  EXPECT_GT(total_expired.load(), 0);
}

TEST(IdleWatchdogTest, ZeroOrInfiniteTimeoutIsOff) {
  for (absl::Duration d : {absl::ZeroDuration(), absl::InfiniteDuration()}) {
    IdleWatchdog dog(d);
    EXPECT_FALSE(dog.enabled());
    std::atomic<int> expired{0};
    std::shared_ptr<IdleWatch> w = dog.Watch([&] { ++expired; });
    w->SetWaiting(true);
    absl::SleepFor(absl::Milliseconds(50));
    EXPECT_EQ(expired.load(), 0);
    dog.Release(w);
  }
}

}  // namespace
}  // namespace medakv::server
