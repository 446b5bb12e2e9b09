#include "service/server/idle.h"

#include <algorithm>
#include <chrono>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"

namespace medakv::server {
namespace {

int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

}  // namespace

void IdleWatch::Progress() { since_ns_.store(NowNs(), std::memory_order_relaxed); }

void IdleWatch::SetWaiting(bool waiting) {
  since_ns_.store(NowNs(), std::memory_order_relaxed);
  waiting_.store(waiting);
}

IdleWatchdog::IdleWatchdog(absl::Duration timeout) : timeout_(timeout) {
  if (timeout > absl::ZeroDuration() && timeout < absl::InfiniteDuration()) {
    thread_ = std::thread([this] { Loop(); });
  }
}

IdleWatchdog::~IdleWatchdog() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  if (thread_.joinable()) thread_.join();
}

std::shared_ptr<IdleWatch> IdleWatchdog::Watch(std::function<void()> expire) {
  auto watch = std::make_shared<IdleWatch>();
  watch->Progress();
  if (!enabled()) return watch;
  {
    absl::MutexLock lock(&watch->mu_);
    watch->expire_ = std::move(expire);
  }
  absl::MutexLock lock(&mu_);
  watches_.push_back(watch);
  return watch;
}

void IdleWatchdog::Release(const std::shared_ptr<IdleWatch>& watch) {
  if (watch == nullptr) return;
  {
    absl::MutexLock lock(&mu_);
    const auto it = std::find(watches_.begin(), watches_.end(), watch);
    if (it != watches_.end()) {
      std::swap(*it, watches_.back());
      watches_.pop_back();
    }
  }
  absl::MutexLock lock(&watch->mu_);
  if (watch->expiring_ && watch->expiring_on_ == std::this_thread::get_id()) {
    watch->expire_ = nullptr;  // OnDone inline in `expire`: it is the caller
    return;
  }
  watch->mu_.Await(absl::Condition(+[](IdleWatch* w) { return !w->expiring_; }, watch.get()));
  watch->expire_ = nullptr;
}

std::string IdleWatchdog::Message(const char* what) const {
  return absl::StrCat("no progress for ", absl::FormatDuration(timeout_), " (--idle_timeout) while ", what);
}

void IdleWatchdog::Expire(const std::shared_ptr<IdleWatch>& watch) {
  std::function<void()> expire;
  {
    absl::MutexLock lock(&watch->mu_);
    if (!watch->expire_ || !watch->waiting_.load()) return;
    expire = std::move(watch->expire_);
    watch->expire_ = nullptr;  // at most once
    watch->expiring_ = true;
    watch->expiring_on_ = std::this_thread::get_id();
    watch->expired_.store(true);
  }
  expire();
  absl::MutexLock lock(&watch->mu_);
  watch->expiring_ = false;
}

void IdleWatchdog::Loop() {
  // Checks a few times per timeout (at least every second), so a stalled call
  // ends within about 1.25 timeouts.
  const absl::Duration period = std::clamp(timeout_ / 4, absl::Milliseconds(10), absl::Seconds(1));
  const int64_t timeout_ns = absl::ToInt64Nanoseconds(timeout_);
  std::vector<std::shared_ptr<IdleWatch>> due;
  for (;;) {
    {
      absl::MutexLock lock(&mu_);
      mu_.AwaitWithTimeout(absl::Condition(&stopping_), period);
      if (stopping_) return;
      const int64_t now = NowNs();
      due.clear();
      for (const std::shared_ptr<IdleWatch>& w : watches_) {
        if (w->waiting_.load() && !w->expired_.load() &&
            now - w->since_ns_.load(std::memory_order_relaxed) > timeout_ns) {
          due.push_back(w);
        }
      }
    }
    for (const std::shared_ptr<IdleWatch>& w : due) Expire(w);
    due.clear();
  }
}

}  // namespace medakv::server
