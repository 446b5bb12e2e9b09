#include "service/server/admission.h"

#include <atomic>
#include <utility>

#include "absl/strings/str_cat.h"

namespace medakv::server {

Admission::Admission(int slots, absl::Duration max_wait, int max_waiting)
    : slots_(slots < 1 ? 1 : slots),
      max_wait_(max_wait),
      max_waiting_(max_waiting),
      timer_([this] { TimerLoop(); }) {}

Admission::~Admission() {
  std::deque<Waiter> orphans;
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
    orphans.swap(waiters_);
  }
  timer_.join();
  for (Waiter& w : orphans) w.done(absl::CancelledError("server shutting down"));
}

uint64_t Admission::NewTicket() {
  static std::atomic<uint64_t> next{1};
  return next.fetch_add(1);
}

void Admission::Acquire(uint64_t ticket, Callback done) {
  absl::Status status = absl::CancelledError("server shutting down");
  {
    absl::MutexLock lock(&mu_);
    if (!stopping_) {
      if (in_use_ < slots_ && waiters_.empty()) {
        ++in_use_;
        status = absl::OkStatus();
      } else if (max_waiting_ >= 0 && static_cast<int>(waiters_.size()) >= max_waiting_) {
        status = absl::ResourceExhaustedError(
            absl::StrCat("server busy: all ", slots_, " slots (--max_inflight) are in use and ", waiters_.size(),
                         " calls wait for one already (--max_queued); retry later"));
      } else {
        waiters_.push_back(Waiter{ticket, absl::Now() + max_wait_, std::move(done)});
        return;
      }
    }
  }
  done(std::move(status));
}

void Admission::Cancel(uint64_t ticket) {
  Callback done;
  {
    absl::MutexLock lock(&mu_);
    for (auto it = waiters_.begin(); it != waiters_.end(); ++it) {
      if (it->ticket == ticket) {
        done = std::move(it->done);
        waiters_.erase(it);
        break;
      }
    }
  }
  if (done) done(absl::CancelledError("cancelled while waiting for a compression slot"));
}

void Admission::Release() {
  Callback next;
  {
    absl::MutexLock lock(&mu_);
    if (!waiters_.empty()) {
      next = std::move(waiters_.front().done);  // the slot passes straight to the next waiter
      waiters_.pop_front();
    } else if (in_use_ > 0) {
      --in_use_;
    }
  }
  if (next) next(absl::OkStatus());
}

int Admission::in_use() const {
  absl::MutexLock lock(&mu_);
  return in_use_;
}

int Admission::waiting() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int>(waiters_.size());
}

void Admission::TimerLoop() {
  for (;;) {
    std::vector<Callback> expired;
    {
      absl::MutexLock lock(&mu_);
      const absl::Time wake = waiters_.empty() ? absl::Now() + absl::Milliseconds(200) : waiters_.front().deadline;
      mu_.AwaitWithDeadline(absl::Condition(
                                +[](bool* stopping) { return *stopping; }, &stopping_),
                            wake);
      if (stopping_) return;
      const absl::Time now = absl::Now();
      while (!waiters_.empty() && waiters_.front().deadline <= now) {
        expired.push_back(std::move(waiters_.front().done));
        waiters_.pop_front();
      }
    }
    for (Callback& done : expired) {
      done(absl::ResourceExhaustedError(absl::StrCat("every compression slot (", slots_, ", --max_inflight) stayed busy for ",
                                                     absl::FormatDuration(max_wait_), " (--queue_timeout)")));
    }
  }
}

SlotClaim::~SlotClaim() {
  bool held;
  {
    absl::MutexLock lock(&mu_);
    held = held_;
  }
  if (held) admission_->Release();
}

void SlotClaim::Request(Admission::Callback done) {
  {
    absl::MutexLock lock(&mu_);
    waiting_ = true;
    ticket_ = Admission::NewTicket();
  }
  admission_->Acquire(ticket_, [this, done = std::move(done)](absl::Status s) {
    {
      absl::MutexLock lock(&mu_);
      waiting_ = false;
      held_ = s.ok();
    }
    done(std::move(s));
  });
}

void SlotClaim::Cancel() {
  bool waiting;
  {
    absl::MutexLock lock(&mu_);
    waiting = waiting_;
  }
  if (waiting) admission_->Cancel(ticket_);
}

WorkerPool::WorkerPool(int threads) {
  for (int i = 0; i < (threads < 1 ? 1 : threads); ++i) {
    threads_.emplace_back([this] {
      for (;;) {
        std::function<void()> work;
        {
          absl::MutexLock lock(&mu_);
          mu_.Await(absl::Condition(
              +[](WorkerPool* p) ABSL_EXCLUSIVE_LOCKS_REQUIRED(p->mu_) { return p->stopping_ || !p->queue_.empty(); },
              this));
          if (queue_.empty()) return;  // stopping and drained
          work = std::move(queue_.front());
          queue_.pop_front();
        }
        work();
      }
    });
  }
}

WorkerPool::~WorkerPool() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  for (std::thread& t : threads_) t.join();
}

void WorkerPool::Submit(std::function<void()> work) {
  absl::MutexLock lock(&mu_);
  queue_.push_back(std::move(work));
}

}  // namespace medakv::server
