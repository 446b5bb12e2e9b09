// A pool of CUDA streams (each with its pinned staging buffers) for callers
// on many threads: Acquire lends one (creating it when none is free), the
// lease gives it back when destroyed. A stream that cannot synchronize on its
// return (a pending error) is dropped rather than lent again. Host code only.
#pragma once

#include <memory>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "kernels/common/status.h"
#include "kernels/cuda/runtime.h"

namespace medakv::cuda {

class StreamPool {
 public:
  class Lease {
   public:
    Lease(StreamPool* pool, std::unique_ptr<Stream> s) : pool_(pool), stream_(std::move(s)) {}
    Lease(Lease&&) = default;
    ~Lease() {
      if (stream_ != nullptr) pool_->Release(std::move(stream_));
    }
    Stream& operator*() const { return *stream_; }

   private:
    StreamPool* pool_;
    std::unique_ptr<Stream> stream_;
  };

  absl::StatusOr<Lease> Acquire() {
    {
      absl::MutexLock lock(&mu_);
      if (!free_.empty()) {
        std::unique_ptr<Stream> s = std::move(free_.back());
        free_.pop_back();
        return Lease(this, std::move(s));
      }
    }
    MEDAKV_ASSIGN_OR_RETURN(std::unique_ptr<Stream> s, Stream::Create());
    return Lease(this, std::move(s));
  }

 private:
  void Release(std::unique_ptr<Stream> s) {
    if (!s->Synchronize().ok()) return;
    absl::MutexLock lock(&mu_);
    free_.push_back(std::move(s));
  }

  absl::Mutex mu_;
  std::vector<std::unique_ptr<Stream>> free_ ABSL_GUARDED_BY(mu_);
};

}  // namespace medakv::cuda
