// The softmax exponentials (kernels/cpu/softmax_simd.h): ExpPoly against the
// exact e^x (double), its edges and special values; the vector paths against
// ExpPoly and the documented eight-lane sums, bit for bit, over odd lengths,
// subsets and entries that carry no mass.
#include "kernels/cpu/softmax_simd.h"

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <vector>

#include "gtest/gtest.h"
#include "tests/kernels/test_util.h"

namespace medakv {
namespace {

using cpu::KeySubset;

uint32_t Bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}

// Distance in units in the last place between a float and the exact value.
double Ulps(float got, double exact) {
  const float near = static_cast<float>(exact);
  const double ulp = std::nextafter(std::fabs(near), INFINITY) - std::fabs(near);
  return std::fabs(static_cast<double>(got) - exact) / ulp;
}

TEST(ExpPolyTest, WithinTwoUlpOfTheExactValue) {
  std::printf("softmax exponentials: %s\n", cpu::SoftmaxUsesAvx2() ? "avx2" : "portable");
  test::Rng rng(7);
  double worst = 0.0;
  for (int k = 0; k < 200000; ++k) {
    const float x = static_cast<float>(rng.Uniform(-87.3, 88.7));
    const double u = Ulps(cpu::ExpPoly(x), std::exp(static_cast<double>(x)));
    worst = std::max(worst, u);
    ASSERT_LE(u, 2.0) << "x = " << x;
  }
  // Near 0 (the softmax's usual range), densely.
  for (float x = -2.f; x <= 2.f; x += 1.f / 4096) {
    ASSERT_LE(Ulps(cpu::ExpPoly(x), std::exp(static_cast<double>(x))), 2.0) << "x = " << x;
  }
  std::printf("worst error: %.2f ulp\n", worst);
}

TEST(ExpPolyTest, EdgesAndSpecialValues) {
  EXPECT_EQ(cpu::ExpPoly(0.f), 1.f);
  EXPECT_EQ(cpu::ExpPoly(-0.f), 1.f);
  EXPECT_EQ(cpu::ExpPoly(-INFINITY), 0.f);
  EXPECT_EQ(cpu::ExpPoly(INFINITY), INFINITY);
  EXPECT_TRUE(std::isnan(cpu::ExpPoly(std::numeric_limits<float>::quiet_NaN())));
  EXPECT_EQ(cpu::ExpPoly(-88.f), 0.f);   // below the normal range: flushed
  EXPECT_EQ(cpu::ExpPoly(89.f), INFINITY);
  // The last finite and the first flushed inputs.
  const float top = 88.72283172607421875f;
  EXPECT_TRUE(std::isfinite(cpu::ExpPoly(top)));
  EXPECT_LE(Ulps(cpu::ExpPoly(top), std::exp(static_cast<double>(top))), 2.0);
  EXPECT_EQ(cpu::ExpPoly(std::nextafter(top, INFINITY)), INFINITY);
  const float bottom = -87.33654022216796875f;
  EXPECT_GE(cpu::ExpPoly(bottom), std::numeric_limits<float>::min());
  EXPECT_EQ(cpu::ExpPoly(std::nextafter(bottom, -INFINITY)), 0.f);
  // Monotonic over a dense sweep.
  float prev = 0.f;
  for (float x = -87.f; x < 88.f; x += 0.01f) {
    const float y = cpu::ExpPoly(x);
    ASSERT_GE(y, prev) << x;
    prev = y;
  }
}

// Logits with every kind of entry: ordinary, -inf (no mass), NaN (no mass),
// very negative (underflow), ties with the maximum.
std::vector<float> Logits(int64_t n, uint64_t seed) {
  test::Rng rng(seed);
  std::vector<float> x(n);
  for (float& v : x) {
    switch (rng.Int(0, 19)) {
      case 0: v = -INFINITY; break;
      case 1: v = std::numeric_limits<float>::quiet_NaN(); break;
      case 2: v = -200.f; break;
      case 3: v = 3.f; break;
      default: v = static_cast<float>(rng.Normal() * 4.0); break;
    }
  }
  return x;
}

std::vector<uint8_t> Modality(int64_t n, uint64_t seed) {
  test::Rng rng(seed);
  std::vector<uint8_t> m(n);
  for (uint8_t& v : m) v = static_cast<uint8_t>(rng.Int(0, 1));
  return m;
}

float Tree(const float* a) { return ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7])); }

TEST(SoftmaxSimdTest, MatchTheDocumentedScalarComputationBitForBit) {
  for (int64_t n : {0, 1, 5, 7, 8, 9, 16, 31, 128, 1000}) {
    for (int subset_kind = 0; subset_kind < 3; ++subset_kind) {
      SCOPED_TRACE(::testing::Message() << "n " << n << " subset " << subset_kind);
      const std::vector<float> x = Logits(n, 100 + n);
      const std::vector<uint8_t> mod = Modality(n, 200 + n);
      KeySubset subset;
      if (subset_kind > 0) subset = KeySubset{mod.data(), static_cast<uint8_t>(subset_kind - 1)};

      float want_max = -INFINITY;
      for (int64_t j = 0; j < n; ++j) {
        if (subset.Has(j) && x[j] > want_max) want_max = x[j];
      }
      EXPECT_EQ(Bits(cpu::MaxOf(x.data(), n, subset)), Bits(want_max));

      const float m = want_max > -INFINITY ? want_max : 0.f;
      float s[8] = {}, sd[8] = {};
      for (int64_t j = 0; j < n; ++j) {
        if (!subset.Has(j) || !(x[j] > -INFINITY)) continue;
        const float dx = x[j] - m, e = cpu::ExpPoly(dx);
        s[j & 7] += e;
        sd[j & 7] += e * dx;
      }
      float sum = -1.f, sum_dx = -1.f;
      cpu::SumExp(x.data(), n, m, subset, &sum, &sum_dx);
      EXPECT_EQ(Bits(sum), Bits(Tree(s)));
      EXPECT_EQ(Bits(sum_dx), Bits(Tree(sd)));

      std::vector<float> out(n, -1.f);
      cpu::ExpShifted(x.data(), n, 1.5f, out.data());
      for (int64_t j = 0; j < n; ++j) {
        const float want = cpu::ExpPoly(x[j] - 1.5f);
        if (std::isnan(want)) {
          ASSERT_TRUE(std::isnan(out[j])) << j;
        } else {
          ASSERT_EQ(Bits(out[j]), Bits(want)) << j << ": x " << x[j];
        }
      }

      std::vector<float> acc(n, 0.25f);
      cpu::AddExpShifted(x.data(), n, -0.5f, subset, acc.data());
      for (int64_t j = 0; j < n; ++j) {
        const float want = subset.Has(j) ? 0.25f + cpu::ExpPoly(x[j] + 0.5f) : 0.25f;
        if (std::isnan(want)) {
          ASSERT_TRUE(std::isnan(acc[j])) << j;
        } else {
          ASSERT_EQ(Bits(acc[j]), Bits(want)) << j;
        }
      }
    }
  }
}

TEST(SoftmaxSimdTest, SumsAgreeWithDoublePrecision) {
  const std::vector<float> x = Logits(777, 9);
  float m = -INFINITY;
  for (float v : x) m = v > m ? v : m;
  double sum = 0.0, sum_dx = 0.0;
  for (float v : x) {
    if (!(v > -INFINITY)) continue;
    const double dx = static_cast<double>(v) - m, e = std::exp(dx);
    sum += e;
    sum_dx += e * dx;
  }
  float got = 0.f, got_dx = 0.f;
  cpu::SumExp(x.data(), static_cast<int64_t>(x.size()), m, KeySubset{}, &got, &got_dx);
  EXPECT_NEAR(got, sum, 1e-5 * sum);
  EXPECT_NEAR(got_dx, sum_dx, 1e-5 * std::fabs(sum_dx) + 1e-6);
}

}  // namespace
}  // namespace medakv
