// Precomputed statistics: worker scores per query head summed over GQA groups.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "kernels/cpu/ops.h"

namespace medakv {
namespace {

TEST(ReduceScoresTest, SumsQueryHeadsOverGroups) {
  // 2 kv heads, group 3, 4 tokens: score(h, t) = h * 10 + t.
  std::vector<float> s(6 * 4);
  for (int h = 0; h < 6; ++h) {
    for (int t = 0; t < 4; ++t) s[h * 4 + t] = static_cast<float>(h * 10 + t);
  }
  std::vector<float> out(2 * 4, -1.f);
  ASSERT_TRUE(cpu::ReduceScores(s.data(), 6, 2, 4, out.data()).ok());
  for (int t = 0; t < 4; ++t) {
    EXPECT_EQ(out[t], (0 + 10 + 20) + 3 * t);
    EXPECT_EQ(out[4 + t], (30 + 40 + 50) + 3 * t);
  }
}

TEST(ReduceScoresTest, KvHeadScoresPassThrough) {
  const std::vector<float> s = {0.5f, 1.5f, 2.5f, 3.5f};
  std::vector<float> out(4);
  ASSERT_TRUE(cpu::ReduceScores(s.data(), 2, 2, 2, out.data()).ok());
  EXPECT_EQ(out, s);
}

TEST(ReduceScoresTest, RejectsBadInput) {
  std::vector<float> s(12, 1.f), out(12);
  EXPECT_EQ(cpu::ReduceScores(s.data(), 5, 2, 2, out.data()).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(cpu::ReduceScores(s.data(), 2, 0, 2, out.data()).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(cpu::ReduceScores(nullptr, 2, 2, 2, out.data()).code(), absl::StatusCode::kInvalidArgument);
  s[5] = NAN;
  absl::Status st = cpu::ReduceScores(s.data(), 4, 2, 3, out.data());
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(st.message()).find("head 1, token 2"), std::string::npos) << st;
  s[5] = INFINITY;
  EXPECT_FALSE(cpu::ReduceScores(s.data(), 4, 2, 3, out.data()).ok());
}

}  // namespace
}  // namespace medakv
