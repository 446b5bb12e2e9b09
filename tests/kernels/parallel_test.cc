// cpu::ParallelFor and ParallelForOrdered: every index once; the ordered part
// in ascending order, after its own body, on the body's thread.
#include "kernels/cpu/parallel.h"

#include <atomic>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

#include "gtest/gtest.h"

namespace medakv {
namespace {

TEST(ParallelForTest, EveryIndexOnce) {
  for (int64_t n : {0, 1, 2, 7, 100}) {
    std::vector<std::atomic<int>> seen(n);
    cpu::ParallelFor(n, [&](int64_t i) { seen[i].fetch_add(1); });
    for (int64_t i = 0; i < n; ++i) EXPECT_EQ(seen[i].load(), 1) << i;
  }
}

TEST(ParallelForOrderedTest, InOrderPartRunsInAscendingOrderAfterItsBody) {
  for (int64_t n : {0, 1, 2, 5, 64}) {
    std::vector<std::atomic<int>> body_done(n);
    std::vector<std::thread::id> body_thread(n);
    std::vector<int64_t> order;
    std::mutex mu;
    bool all_after_body = true, same_thread = true;
    cpu::ParallelForOrdered(
        n,
        [&](int64_t i) {
          // Uneven work, so that later bodies often finish first.
          volatile double x = 0;
          for (int64_t k = 0; k < (n - i) * 2000; ++k) x = x + 1.0;
          body_thread[i] = std::this_thread::get_id();
          body_done[i].store(1);
        },
        [&](int64_t i) {
          std::lock_guard<std::mutex> lock(mu);
          all_after_body = all_after_body && body_done[i].load() == 1;
          same_thread = same_thread && body_thread[i] == std::this_thread::get_id();
          order.push_back(i);
        });
    ASSERT_EQ(static_cast<int64_t>(order.size()), n);
    for (int64_t i = 0; i < n; ++i) EXPECT_EQ(order[i], i);
    EXPECT_TRUE(all_after_body);
    EXPECT_TRUE(same_thread);
  }
}

TEST(ParallelForOrderedTest, ThreadIndexIsBelowMaxThreads) {
  std::atomic<bool> ok{true};
  cpu::ParallelForOrdered(
      16, [&](int64_t) { ok = ok && cpu::ThreadIndex() >= 0 && cpu::ThreadIndex() < cpu::MaxThreads(); },
      [&](int64_t) { ok = ok && cpu::ThreadIndex() < cpu::MaxThreads(); });
  EXPECT_TRUE(ok.load());
}

}  // namespace
}  // namespace medakv
