// Whole compressions on the CUDA backend against the CPU backend (label
// `gpu`; skips without a CUDA build or device), every policy:
//   * precomputed statistics: the result equals the CPU's bit for bit (the
//     reduction, selection and merge are exact on the device);
//   * queries: the statistics differ in rounding (docs/cuda.md), so budgets
//     may move by one token where a MEDA entropy sits on a rounding edge and
//     kept positions may differ where two scores tie within the tolerance;
//     at least 99% of positions agree, and every layer whose positions all
//     agree has the CPU's keys and values bit for bit.
#include <algorithm>
#include <iterator>
#include <memory>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "kernels/cuda/device.h"
#include "service/compress/options.h"
#include "service/compress/pipeline.h"
#include "tests/service/test_cache.h"

namespace medakv {
namespace {

constexpr PolicyKind kPolicies[] = {PolicyKind::kFull,  PolicyKind::kMeda,      PolicyKind::kStreamingLlm,
                                    PolicyKind::kH2O,   PolicyKind::kSnapKV,    PolicyKind::kPyramidKV,
                                    PolicyKind::kLookM, PolicyKind::kAmber};

class PipelineCudaTest : public ::testing::TestWithParam<std::tuple<DType, Layout>> {
 protected:
  void SetUp() override {
    if (!cuda::Compiled()) GTEST_SKIP() << "built without CUDA (nvcc not found at configure time)";
    if (cuda::DeviceCount() == 0) GTEST_SKIP() << "no CUDA device visible (cudaGetDeviceCount reports 0)";
    auto b = MakeCudaBackend();
    ASSERT_TRUE(b.ok()) << b.status();
    gpu_ = std::move(*b);
    cpu_ = MakeCpuBackend();
  }
  test::CacheParams Params(bool precomputed) const {
    test::CacheParams p;
    p.dtype = std::get<0>(GetParam());
    p.layout = std::get<1>(GetParam());
    p.layers = 4;
    p.kv_heads = 2;
    p.group = 4;
    p.tokens = 1000;
    p.head_dim = 128;
    p.q_tokens = 48;
    p.precomputed = precomputed;
    return p;
  }
  std::unique_ptr<Backend> cpu_, gpu_;
};

TEST_P(PipelineCudaTest, PrecomputedStatisticsGiveTheCpuResultBitForBit) {
  test::TestCache cache = test::MakeTestCache(Params(true));
  for (PolicyKind policy : kPolicies) {
    for (double rho : {0.1, 0.5}) {
      SCOPED_TRACE(testing::Message() << "policy " << static_cast<int>(policy) << " rho " << rho);
      CompressOptions o = DefaultOptions(policy);
      o.budget.rho = rho;
      auto want = Compress(cache.input, o, *cpu_);
      ASSERT_TRUE(want.ok()) << want.status();
      auto got = Compress(cache.input, o, *gpu_);
      ASSERT_TRUE(got.ok()) << got.status();
      test::ExpectSameResult(*got, *want);
    }
  }
}

TEST_P(PipelineCudaTest, QueriesAgreeUpToScoreTies) {
  test::TestCache cache = test::MakeTestCache(Params(false));
  for (PolicyKind policy : kPolicies) {
    for (double rho : {0.1, 0.5}) {
      SCOPED_TRACE(testing::Message() << "policy " << static_cast<int>(policy) << " rho " << rho);
      CompressOptions o = DefaultOptions(policy);
      o.budget.rho = rho;
      auto want = Compress(cache.input, o, *cpu_);
      ASSERT_TRUE(want.ok()) << want.status();
      auto got = Compress(cache.input, o, *gpu_);
      ASSERT_TRUE(got.ok()) << got.status();
      ASSERT_EQ(got->layers.size(), want->layers.size());
      int64_t total = 0, agree = 0;
      for (size_t l = 0; l < want->layers.size(); ++l) {
        const LayerResult& a = want->layers[l];
        const LayerResult& b = got->layers[l];
        EXPECT_NEAR(b.entropy, a.entropy, 1e-4 * std::max(1.f, std::abs(a.entropy))) << "layer " << l;
        EXPECT_LE(std::abs(b.budget - a.budget), policy == PolicyKind::kMeda ? 1 : 0) << "layer " << l;
        if (a.budget != b.budget) continue;
        for (int64_t h = 0; h < 2; ++h) {
          std::vector<int32_t> pa(a.positions.begin() + h * a.budget, a.positions.begin() + (h + 1) * a.budget);
          std::vector<int32_t> pb(b.positions.begin() + h * b.budget, b.positions.begin() + (h + 1) * b.budget);
          std::vector<int32_t> common;
          std::set_intersection(pa.begin(), pa.end(), pb.begin(), pb.end(), std::back_inserter(common));
          total += a.budget;
          agree += static_cast<int64_t>(common.size());
        }
        // Where every head kept the same tokens (the MEAN threshold couples
        // the heads of a layer), the merged tensors are the CPU's.
        if (a.positions == b.positions) {
          EXPECT_TRUE(a.key == b.key) << "layer " << l << " keys differ";
          EXPECT_TRUE(a.value == b.value) << "layer " << l << " values differ";
        }
      }
      EXPECT_GE(static_cast<double>(agree), 0.99 * static_cast<double>(total)) << agree << " of " << total;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(AllDTypesAndLayouts, PipelineCudaTest,
                         ::testing::Combine(::testing::ValuesIn(test::kAllDTypes),
                                            ::testing::ValuesIn(test::kAllLayouts)),
                         [](const auto& info) {
                           return test::DTypeTag(std::get<0>(info.param)) + test::LayoutTag(std::get<1>(info.param));
                         });

}  // namespace
}  // namespace medakv
