// The CUDA backend against the CPU backend, op by op (label `gpu`: every test
// skips, saying why, without a CUDA build or device).
//
// Parity rules (docs/cuda.md):
//   * ReduceScores, PoolScores, SelectTokens and MergeAndGather equal the CPU
//     backend bit for bit: they sum in the same order with the same shared
//     functions (merge.cu is compiled without fused multiply-adds), and the
//     selection's sort keys order exactly as the CPU's comparison.
//   * AttentionStats sums probabilities in a different order and uses the
//     device's expf/logf: scores within 2e-5 relative (+1e-6 of the row count
//     absolute), entropies within 1e-4 relative.
//   * Kept positions after the statistics can then differ only where two
//     candidates' scores are within that tolerance of the selection
//     threshold (tested in tests/service/pipeline_cuda_test.cc).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <limits>
#include <numeric>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "kernels/cuda/device.h"
#include "tests/kernels/test_util.h"

namespace medakv {
namespace {

using test::HostTensor;
using test::Rng;

constexpr int64_t kHeadDims[] = {64, 80, 96, 128, 256};
constexpr int64_t kTokenCounts[] = {1, 7, 33, 769};

class CudaParityTest : public ::testing::TestWithParam<std::tuple<DType, Layout>> {
 protected:
  void SetUp() override {
    if (!cuda::Compiled()) GTEST_SKIP() << "built without CUDA (nvcc not found at configure time)";
    if (cuda::DeviceCount() == 0) GTEST_SKIP() << "no CUDA device visible (cudaGetDeviceCount reports 0)";
    auto b = MakeCudaBackend();
    ASSERT_TRUE(b.ok()) << b.status();
    gpu_ = std::move(*b);
    cpu_ = MakeCpuBackend();
  }
  DType dtype() const { return std::get<0>(GetParam()); }
  Layout layout() const { return std::get<1>(GetParam()); }

  std::unique_ptr<Backend> cpu_, gpu_;
};

std::vector<float> RandomScores(int64_t n, uint64_t seed, bool ties) {
  Rng rng(seed);
  std::vector<float> s(n);
  for (float& x : s) {
    x = static_cast<float>(rng.Uniform());
    if (ties) x = std::floor(x * 8.f) / 8.f;  // many exact ties
  }
  return s;
}

// Random strictly ascending kept positions per head.
std::vector<int32_t> RandomKept(int64_t heads, int64_t tokens, int64_t budget, uint64_t seed) {
  Rng rng(seed);
  std::vector<int32_t> kept;
  for (int64_t h = 0; h < heads; ++h) {
    std::vector<int32_t> all(tokens);
    std::iota(all.begin(), all.end(), 0);
    for (int64_t i = 0; i < budget; ++i) std::swap(all[i], all[rng.Int(i, tokens - 1)]);
    std::sort(all.begin(), all.begin() + budget);
    kept.insert(kept.end(), all.begin(), all.begin() + budget);
  }
  return kept;
}

TEST_P(CudaParityTest, ReduceAndPoolScoresAreBitExact) {
  for (int64_t tokens : kTokenCounts) {
    for (int64_t group : {1, 3}) {
      SCOPED_TRACE(absl::StrCat("tokens ", tokens, " group ", group));
      const int64_t kv = 3;
      const std::vector<float> in = RandomScores(kv * group * tokens, tokens + group, false);
      std::vector<float> a(kv * tokens), b(kv * tokens, -1.f);
      ASSERT_TRUE(cpu_->ReduceScores(in.data(), kv * group, kv, tokens, a.data()).ok());
      ASSERT_TRUE(gpu_->ReduceScores(in.data(), kv * group, kv, tokens, b.data()).ok());
      ASSERT_EQ(0, std::memcmp(a.data(), b.data(), a.size() * 4));
      for (int64_t kernel : {1, 5, 7}) {
        for (int64_t length : {int64_t{0}, tokens / 2, tokens}) {
          std::vector<float> pa(kv * tokens), pb(kv * tokens, -1.f);
          ASSERT_TRUE(cpu_->PoolScores(a.data(), kv, tokens, length, kernel, pa.data()).ok());
          ASSERT_TRUE(gpu_->PoolScores(a.data(), kv, tokens, length, kernel, pb.data()).ok());
          ASSERT_EQ(0, std::memcmp(pa.data(), pb.data(), pa.size() * 4)) << "kernel " << kernel << " length " << length;
        }
      }
    }
  }
}

TEST_P(CudaParityTest, SelectTokensEqualsCpu) {
  for (int64_t tokens : {int64_t{1}, int64_t{7}, int64_t{33}, int64_t{769}, int64_t{4099}}) {
    for (test::VisualPattern pattern : {test::VisualPattern::kNone, test::VisualPattern::kInterleaved}) {
      const std::vector<uint8_t> mod = test::MakeModality(pattern, tokens);
      for (TextPrior prior : {TextPrior::kAdditive, TextPrior::kKeepAllText, TextPrior::kNone}) {
        for (bool shared : {false, true}) {
          for (bool ties : {false, true}) {
            const int64_t kv = 3;
            const std::vector<float> scores = RandomScores(kv * tokens, tokens * 7 + ties, ties);
            for (int64_t budget : {int64_t{1}, std::max<int64_t>(1, tokens / 5), tokens}) {
              SCOPED_TRACE(absl::StrCat("tokens ", tokens, " pattern ", test::VisualPatternTag(pattern), " prior ",
                                        static_cast<int>(prior), " shared ", shared, " ties ", ties, " budget ",
                                        budget));
              SelectArgs a;
              a.scores = scores.data();
              a.modality = mod.data();
              a.kv_heads = kv;
              a.tokens = tokens;
              a.budget = budget;
              a.recent_fraction = 0.25;
              a.sinks = tokens > 10 ? 2 : 0;
              a.text_prior = prior;
              a.shared_selection = shared;
              std::vector<int32_t> ka(kv * budget), kb(kv * budget, -7);
              ASSERT_TRUE(cpu_->SelectTokens(a, ka.data()).ok());
              const absl::Status st = gpu_->SelectTokens(a, kb.data());
              ASSERT_TRUE(st.ok()) << st;
              ASSERT_EQ(ka, kb);
            }
          }
        }
      }
    }
  }
}

TEST_P(CudaParityTest, MergeAndGatherAreBitExact) {
  for (int64_t d : kHeadDims) {
    for (int64_t tokens : kTokenCounts) {
      const int64_t kv = 2;
      HostTensor key = test::RandomTensor(dtype(), layout(), kv, tokens, d, 100 + d + tokens);
      HostTensor value = test::RandomTensor(dtype(), layout(), kv, tokens, d, 200 + d + tokens);
      if (tokens > 7) {  // duplicate keys: exact cosine ties between kept targets
        for (int64_t x = 0; x < d; ++x) key.SetBits(0, 3, x, key.Bits(0, 5, x));
      }
      for (int64_t budget : {int64_t{1}, std::max<int64_t>(1, tokens / 3), tokens}) {
        const std::vector<int32_t> kept = RandomKept(kv, tokens, budget, tokens * 3 + budget);
        for (MergeMode mode : {MergeMode::kAverage, MergeMode::kPivotal, MergeMode::kWeighted, MergeMode::kNone}) {
          for (MergeThreshold th : {MergeThreshold::kNone, MergeThreshold::kMean}) {
            SCOPED_TRACE(absl::StrCat("head_dim ", d, " tokens ", tokens, " budget ", budget, " mode ",
                                      static_cast<int>(mode), " threshold ", static_cast<int>(th)));
            MergeArgs a;
            a.key = key.view();
            a.value = value.view();
            a.kept = kept.data();
            a.budget = budget;
            a.mode = mode;
            a.threshold = th;
            HostTensor ok_a(dtype(), layout(), kv, budget, d), ov_a(dtype(), layout(), kv, budget, d);
            HostTensor ok_b(dtype(), layout(), kv, budget, d), ov_b(dtype(), layout(), kv, budget, d);
            ok_b.Fill(0xAB);
            ov_b.Fill(0xAB);
            ASSERT_TRUE(cpu_->MergeAndGather(a, ok_a.mutable_view(), ov_a.mutable_view()).ok());
            const absl::Status st = gpu_->MergeAndGather(a, ok_b.mutable_view(), ov_b.mutable_view());
            ASSERT_TRUE(st.ok()) << st;
            ASSERT_EQ(ok_a.storage, ok_b.storage) << "keys differ";
            ASSERT_EQ(ov_a.storage, ov_b.storage) << "values differ";
          }
        }
      }
    }
  }
}

void ExpectStatsClose(const Backend& cpu, const Backend& gpu, const AttentionStatsArgs& a, int64_t kv, int64_t tokens) {
  std::vector<float> sa(kv * tokens), sb(kv * tokens, -1.f);
  AttentionStatsOutput oa, ob;
  oa.scores = sa.data();
  ob.scores = sb.data();
  ASSERT_TRUE(cpu.AttentionStats(a, &oa).ok());
  const absl::Status st = gpu.AttentionStats(a, &ob);
  ASSERT_TRUE(st.ok()) << st;
  EXPECT_EQ(oa.causal, ob.causal);
  const double rows = static_cast<double>(a.query.tokens * (a.query.heads / kv));
  for (size_t i = 0; i < sa.size(); ++i) {
    ASSERT_TRUE(test::Near(sb[i], sa[i], 2e-5, 1e-6 * rows)) << "score " << i;
  }
  EXPECT_TRUE(test::Near(ob.entropy, oa.entropy, 1e-4, 1e-5));
  EXPECT_TRUE(test::Near(ob.entropy_tv, oa.entropy_tv, 1e-4, 1e-5));
  EXPECT_TRUE(test::Near(ob.entropy_vt, oa.entropy_vt, 1e-4, 1e-5));
}

TEST_P(CudaParityTest, AttentionStatsMatchCpu) {
  for (int64_t d : kHeadDims) {
    for (int64_t tokens : kTokenCounts) {
      for (test::VisualPattern pattern :
           {test::VisualPattern::kNone, test::VisualPattern::kMiddle, test::VisualPattern::kInterleaved}) {
        const int64_t kv = 2, group = 3, q_heads = kv * group;
        const int64_t rows = std::min<int64_t>(tokens, 37);
        HostTensor key = test::RandomTensor(dtype(), layout(), kv, tokens, d, 300 + d + tokens, 0.7);
        HostTensor query = test::RandomTensor(dtype(), layout(), q_heads, rows, d, 400 + d + tokens);
        std::vector<int32_t> pos(rows);
        std::iota(pos.begin(), pos.end(), static_cast<int32_t>(tokens - rows));
        const std::vector<uint8_t> mod = test::MakeModality(pattern, tokens);
        for (EntropyHeads eh : {EntropyHeads::kMeanAttention, EntropyHeads::kMeanEntropy}) {
          for (EntropySource es : {EntropySource::kCrossModal, EntropySource::kCausal}) {
            for (int64_t srb : {int64_t{0}, rows / 2}) {
              SCOPED_TRACE(absl::StrCat("head_dim ", d, " tokens ", tokens, " pattern ",
                                        test::VisualPatternTag(pattern), " heads ", static_cast<int>(eh), " source ",
                                        static_cast<int>(es), " score_rows_begin ", srb));
              AttentionStatsArgs a;
              a.query = query.view();
              a.key = key.view();
              a.query_positions = pos.data();
              a.modality = mod.data();
              a.scale = 1.f / std::sqrt(static_cast<float>(d));
              a.entropy_heads = eh;
              a.entropy_source = es;
              a.score_rows_begin = srb;
              ExpectStatsClose(*cpu_, *gpu_, a, kv, tokens);
              a.aggregation = ScoreAggregation::kMax;
              ExpectStatsClose(*cpu_, *gpu_, a, kv, tokens);
              // Rows that give attention outside the cache (a probe pass's own tokens); some give none.
              std::vector<float> outside(q_heads * rows);
              for (size_t i = 0; i < outside.size(); ++i) {
                outside[i] = i % 7 == 0 ? -std::numeric_limits<float>::infinity()
                                        : static_cast<float>(i % 11) * 0.5f - 1.f;
              }
              a.outside_lse = outside.data();
              ExpectStatsClose(*cpu_, *gpu_, a, kv, tokens);
              a.aggregation = ScoreAggregation::kSum;
              ExpectStatsClose(*cpu_, *gpu_, a, kv, tokens);
            }
          }
        }
      }
    }
  }
}

TEST_P(CudaParityTest, LongContext32k) {
  const int64_t tokens = 32768, kv = 2, group = 4, d = 128, rows = 64, budget = 6553;
  HostTensor key = test::RandomTensor(dtype(), layout(), kv, tokens, d, 501, 0.7);
  HostTensor value = test::RandomTensor(dtype(), layout(), kv, tokens, d, 502);
  HostTensor query = test::RandomTensor(dtype(), layout(), kv * group, rows, d, 503);
  std::vector<int32_t> pos(rows);
  std::iota(pos.begin(), pos.end(), static_cast<int32_t>(tokens - rows));
  const std::vector<uint8_t> mod = test::MakeModality(test::VisualPattern::kMiddle, tokens);
  AttentionStatsArgs a;
  a.query = query.view();
  a.key = key.view();
  a.query_positions = pos.data();
  a.modality = mod.data();
  a.scale = 1.f / std::sqrt(static_cast<float>(d));
  ExpectStatsClose(*cpu_, *gpu_, a, kv, tokens);

  const std::vector<float> scores = RandomScores(kv * tokens, 9, true);
  SelectArgs s;
  s.scores = scores.data();
  s.modality = mod.data();
  s.kv_heads = kv;
  s.tokens = tokens;
  s.budget = budget;
  std::vector<int32_t> ka(kv * budget), kb(kv * budget);
  ASSERT_TRUE(cpu_->SelectTokens(s, ka.data()).ok());
  ASSERT_TRUE(gpu_->SelectTokens(s, kb.data()).ok());
  ASSERT_EQ(ka, kb);

  MergeArgs m;
  m.key = key.view();
  m.value = value.view();
  m.kept = ka.data();
  m.budget = budget;
  HostTensor ok_a(dtype(), layout(), kv, budget, d), ov_a(dtype(), layout(), kv, budget, d);
  HostTensor ok_b(dtype(), layout(), kv, budget, d), ov_b(dtype(), layout(), kv, budget, d);
  ASSERT_TRUE(cpu_->MergeAndGather(m, ok_a.mutable_view(), ov_a.mutable_view()).ok());
  ASSERT_TRUE(gpu_->MergeAndGather(m, ok_b.mutable_view(), ov_b.mutable_view()).ok());
  EXPECT_EQ(ok_a.storage, ok_b.storage);
  EXPECT_EQ(ov_a.storage, ov_b.storage);
}

TEST_P(CudaParityTest, BadArgumentsAreInvalidArgumentBeforeTheDevice) {
  const int64_t tokens = 16, kv = 1;
  HostTensor key = test::RandomTensor(dtype(), layout(), kv, tokens, 32, 1);
  HostTensor query = test::RandomTensor(dtype(), layout(), kv, 4, 32, 2);
  std::vector<int32_t> pos = {12, 13, 14, 15};
  std::vector<uint8_t> mod(tokens, 0);
  std::vector<float> scores(kv * tokens);
  AttentionStatsArgs a;
  a.query = query.view();
  a.key = key.view();
  a.query_positions = pos.data();
  a.modality = mod.data();
  a.scale = 0.1f;
  AttentionStatsOutput out;
  out.scores = scores.data();
  absl::Status st = gpu_->AttentionStats(a, &out);  // head_dim 32: no kernel
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  EXPECT_NE(st.message().find("head_dim 32"), std::string::npos) << st;

  HostTensor key64 = test::RandomTensor(dtype(), layout(), kv, tokens, 64, 1);
  HostTensor query64 = test::RandomTensor(dtype(), layout(), kv, 4, 64, 2);
  a.key = key64.view();
  a.query = query64.view();
  pos[2] = 99;  // outside [0, tokens)
  st = gpu_->AttentionStats(a, &out);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  EXPECT_NE(st.message().find("query position 2"), std::string::npos) << st;

  std::vector<int32_t> kept = {3, 2};  // not ascending
  MergeArgs m;
  m.key = key64.view();
  m.value = key64.view();
  m.kept = kept.data();
  m.budget = 2;
  HostTensor ok(dtype(), layout(), kv, 2, 64), ov(dtype(), layout(), kv, 2, 64);
  st = gpu_->MergeAndGather(m, ok.mutable_view(), ov.mutable_view());
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;

  scores[5] = NAN;
  std::vector<float> reduced(kv * tokens);
  st = gpu_->ReduceScores(scores.data(), kv, kv, tokens, reduced.data());
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  // The device still works after the rejected calls.
  scores[5] = 0.f;
  EXPECT_TRUE(gpu_->ReduceScores(scores.data(), kv, kv, tokens, reduced.data()).ok());
}

INSTANTIATE_TEST_SUITE_P(AllDTypesAndLayouts, CudaParityTest,
                         ::testing::Combine(::testing::ValuesIn(test::kAllDTypes),
                                            ::testing::ValuesIn(test::kAllLayouts)),
                         [](const auto& info) {
                           return test::DTypeTag(std::get<0>(info.param)) + test::LayoutTag(std::get<1>(info.param));
                         });

TEST(CudaBackendSelectionTest, BackendChoiceFollowsTheDevice) {
  std::string why;
  auto b = MakeBackend("auto", &why);
  ASSERT_TRUE(b.ok()) << b.status();
  if (cuda::Compiled() && cuda::DeviceCount() > 0) {
    EXPECT_EQ((*b)->Name(), "cuda") << why;
    auto c = MakeBackend("cuda", &why);
    ASSERT_TRUE(c.ok()) << c.status();
    EXPECT_EQ((*c)->Name(), "cuda");
  } else {
    EXPECT_EQ((*b)->Name(), "cpu") << why;
    auto c = MakeBackend("cuda", &why);
    EXPECT_EQ(c.status().code(), absl::StatusCode::kFailedPrecondition) << c.status();
    // Without CUDA compiled in: FAILED_PRECONDITION; compiled but no device:
    // the CUDA error, as a status.
    const absl::Status direct = MakeCudaBackend().status();
    EXPECT_FALSE(direct.ok());
    if (!cuda::Compiled()) {
      EXPECT_EQ(direct.code(), absl::StatusCode::kFailedPrecondition) << direct;
    }
  }
}

}  // namespace
}  // namespace medakv
