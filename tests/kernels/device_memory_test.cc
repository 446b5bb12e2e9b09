// DeviceMemory (kernels/common/device_memory.h): blocks, copies at offsets,
// range checks and running out of room. Built twice: on emulated memory
// (every machine) and, as medakv_cuda_device_memory_test (label gpu), on the
// CUDA device, where it skips without one.
#include "kernels/common/device_memory.h"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#if defined(MEDAKV_CUDA_MEMORY_TEST)
#include "kernels/cuda/device.h"
#endif

namespace medakv {
namespace {

// The memory under test, or null (the test skips) when there is none.
std::shared_ptr<DeviceMemory> Memory() {
#if defined(MEDAKV_CUDA_MEMORY_TEST)
  if (!cuda::Compiled() || cuda::DeviceCount() == 0) return nullptr;
  absl::StatusOr<std::shared_ptr<DeviceMemory>> m = MakeCudaDeviceMemory();
  EXPECT_TRUE(m.ok()) << m.status();
  return m.ok() ? *m : nullptr;
#else
  return MakeEmulatedDeviceMemory();
#endif
}

#define MEMORY_OR_SKIP(m)                                                                   \
  std::shared_ptr<DeviceMemory> m = Memory();                                               \
  if (m == nullptr) GTEST_SKIP() << "no CUDA device (or built without CUDA): nothing to test"

std::vector<uint8_t> Pattern(size_t n, uint32_t seed) {
  std::vector<uint8_t> v(n);
  uint32_t x = seed * 2654435761u + 1;
  for (size_t i = 0; i < n; ++i) {
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    v[i] = static_cast<uint8_t>(x);
  }
  return v;
}

TEST(DeviceMemoryTest, CopiesRoundTripAtEveryOffsetAndSize) {
  MEMORY_OR_SKIP(memory);
  // Odd sizes, and one over the 8 MiB staging chunk of the CUDA copies.
  for (size_t n : {size_t{1}, size_t{7}, size_t{4096 + 3}, (size_t{8} << 20) + 17}) {
    absl::StatusOr<DeviceBlock> block = memory->Allocate(n + 64);
    ASSERT_TRUE(block.ok()) << block.status();
    EXPECT_EQ(block->size(), n + 64);
    EXPECT_EQ(block->memory(), memory.get());
    const std::vector<uint8_t> a = Pattern(n, static_cast<uint32_t>(n));
    const std::vector<uint8_t> b = Pattern(64, 99);
    ASSERT_TRUE(memory->CopyToDevice(*block, 0, b.data(), 64).ok());
    ASSERT_TRUE(memory->CopyToDevice(*block, 64, a.data(), n).ok());
    std::vector<uint8_t> back(n, 0), head(64, 0);
    ASSERT_TRUE(memory->CopyToHost(back.data(), *block, 64, n).ok());
    ASSERT_TRUE(memory->CopyToHost(head.data(), *block, 0, 64).ok());
    EXPECT_EQ(back, a) << n;
    EXPECT_EQ(head, b) << n;
    // The tail from a third of the way in.
    std::vector<uint8_t> part(n - n / 3, 0);
    ASSERT_TRUE(memory->CopyToHost(part.data(), *block, 64 + n / 3, part.size()).ok());
    EXPECT_TRUE(std::equal(part.begin(), part.end(), a.begin() + static_cast<std::ptrdiff_t>(n / 3))) << n;
  }
}

TEST(DeviceMemoryTest, RangesOutsideTheBlockAreRejected) {
  MEMORY_OR_SKIP(memory);
  absl::StatusOr<DeviceBlock> block = memory->Allocate(100);
  ASSERT_TRUE(block.ok());
  std::vector<uint8_t> buf(200);
  EXPECT_EQ(memory->CopyToDevice(*block, 0, buf.data(), 101).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(memory->CopyToDevice(*block, 101, buf.data(), 0).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(memory->CopyToHost(buf.data(), *block, 50, 51).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(memory->CopyToHost(buf.data(), *block, SIZE_MAX, 2).code(), absl::StatusCode::kInvalidArgument);
  const absl::Status s = memory->CopyToHost(buf.data(), *block, 90, SIZE_MAX - 50);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("100 bytes"), std::string::npos) << s.message();
  EXPECT_TRUE(memory->CopyToHost(buf.data(), *block, 100, 0).ok());  // empty, at the end
  // A block of another memory object.
  std::shared_ptr<DeviceMemory> other = MakeEmulatedDeviceMemory();
  absl::StatusOr<DeviceBlock> foreign = other->Allocate(100);
  ASSERT_TRUE(foreign.ok());
  EXPECT_EQ(memory->CopyToHost(buf.data(), *foreign, 0, 10).code(), absl::StatusCode::kInvalidArgument);
}

TEST(DeviceMemoryTest, EmptyBlocksAndMovesFreeExactlyOnce) {
  MEMORY_OR_SKIP(memory);
  absl::StatusOr<DeviceBlock> empty = memory->Allocate(0);
  ASSERT_TRUE(empty.ok());
  EXPECT_EQ(empty->size(), 0u);
  EXPECT_EQ(empty->memory(), nullptr);
  absl::StatusOr<DeviceBlock> a = memory->Allocate(1000);
  ASSERT_TRUE(a.ok());
  DeviceBlock moved = *std::move(a);
  EXPECT_EQ(a->size(), 0u);  // NOLINT(bugprone-use-after-move): the moved-from block is empty
  DeviceBlock target;
  target = std::move(moved);
  EXPECT_EQ(target.size(), 1000u);
  // The block keeps its memory alive after the last other reference goes.
  memory.reset();
  const std::vector<uint8_t> v = Pattern(1000, 5);
  ASSERT_TRUE(target.memory()->CopyToDevice(target, 0, v.data(), v.size()).ok());
  std::vector<uint8_t> back(1000);
  ASSERT_TRUE(target.memory()->CopyToHost(back.data(), target, 0, back.size()).ok());
  EXPECT_EQ(back, v);
  target.Reset();
  EXPECT_EQ(target.size(), 0u);
}

TEST(DeviceMemoryTest, ConcurrentCopiesOfDifferentBlocks) {
  MEMORY_OR_SKIP(memory);
  std::vector<std::thread> threads;
  std::vector<int> ok(8, 0);
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      const std::vector<uint8_t> v = Pattern((size_t{1} << 20) + t, t);
      for (int i = 0; i < 4; ++i) {
        absl::StatusOr<DeviceBlock> b = memory->Allocate(v.size());
        if (!b.ok() || !memory->CopyToDevice(*b, 0, v.data(), v.size()).ok()) return;
        std::vector<uint8_t> back(v.size());
        if (!memory->CopyToHost(back.data(), *b, 0, back.size()).ok() || back != v) return;
      }
      ok[t] = 1;
    });
  }
  for (std::thread& t : threads) t.join();
  for (int t = 0; t < 8; ++t) EXPECT_EQ(ok[t], 1) << "thread " << t;
}

#if !defined(MEDAKV_CUDA_MEMORY_TEST)
TEST(EmulatedDeviceMemoryTest, CountsWhatIsAllocatedAndRefusesPastItsLimit) {
  std::shared_ptr<EmulatedDeviceMemory> memory = MakeEmulatedDeviceMemory(1000);
  EXPECT_EQ(memory->Name(), "emulated");
  absl::StatusOr<DeviceBlock> a = memory->Allocate(600);
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(memory->allocated_bytes(), 600);
  EXPECT_EQ(memory->allocated_blocks(), 1);
  absl::StatusOr<DeviceBlock> b = memory->Allocate(401);
  EXPECT_EQ(b.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(b.status().message().find("600 of 1000"), std::string::npos) << b.status();
  EXPECT_EQ(memory->Allocate(2000).status().code(), absl::StatusCode::kResourceExhausted);
  absl::StatusOr<DeviceBlock> c = memory->Allocate(400);
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(memory->allocated_bytes(), 1000);
  a->Reset();
  EXPECT_EQ(memory->allocated_bytes(), 400);
  c = memory->Allocate(1);  // the old block of c is freed by the assignment
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(memory->allocated_bytes(), 1);
  EXPECT_EQ(memory->allocated_blocks(), 1);
  std::vector<uint8_t> x(1, 7);
  ASSERT_TRUE(memory->CopyToDevice(*c, 0, x.data(), 1).ok());
  EXPECT_EQ(memory->copies(), 1);
}
#endif

}  // namespace
}  // namespace medakv
