// cpu::DotTile against one DotF32 per pair, bit for bit: every block shape of
// the kernel and its edges (m, n not multiples of the block), head dims with
// and without a tail of fewer than 8 elements, strided rows, and values that
// expose a different rounding or order (NaN, infinities, -0, subnormals,
// cancellation). Also a sanity check against a double-precision dot.
#include "kernels/cpu/dot_tile.h"

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "tests/kernels/test_util.h"

namespace medakv {
namespace {

uint32_t Bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}

// Random rows of `width` floats (row stride `stride` >= width), with special
// values sprinkled in when `specials`.
std::vector<float> Rows(int64_t rows, int64_t width, int64_t stride, uint64_t seed, bool specials) {
  test::Rng rng(seed);
  std::vector<float> x(rows * stride, 12345.f);  // padding must never be read into a result
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t k = 0; k < width; ++k) {
      float v = static_cast<float>(rng.Normal() * std::pow(10.0, rng.Int(-3, 3)));
      if (specials) {
        switch (rng.Int(0, 40)) {
          case 0: v = -0.f; break;
          case 1: v = std::numeric_limits<float>::denorm_min() * static_cast<float>(rng.Int(1, 1000)); break;
          case 2: v = 1e30f; break;  // products overflow to inf, or cancel to NaN
          case 3: v = -1e30f; break;
          case 4: v = std::numeric_limits<float>::quiet_NaN(); break;
          case 5: v = std::numeric_limits<float>::infinity(); break;
          default: break;
        }
      }
      x[r * stride + k] = v;
    }
  }
  return x;
}

void ExpectSameAsScalar(int64_t m, int64_t n, int64_t d, int64_t lda, int64_t ldb, int64_t ldo, uint64_t seed,
                        bool specials) {
  SCOPED_TRACE(absl::StrCat("m=", m, " n=", n, " d=", d, " lda=", lda, " ldb=", ldb, " ldo=", ldo,
                            specials ? " specials" : ""));
  const std::vector<float> a = Rows(m, d, lda, seed, specials), b = Rows(n, d, ldb, seed + 1, specials);
  std::vector<float> tiled(m * ldo, -7.f), scalar(m * ldo, -7.f);
  cpu::DotTile(a.data(), lda, m, b.data(), ldb, n, d, tiled.data(), ldo);
  cpu::DotTileScalar(a.data(), lda, m, b.data(), ldb, n, d, scalar.data(), ldo);
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < ldo; ++j) {
      // Bits, so that -0 != +0; beyond n the sentinel must stay. A NaN's sign
      // and payload depend on which operand x86 propagates, not on the
      // arithmetic, and no consumer reads them: any NaN matches any NaN.
      if (std::isnan(tiled[i * ldo + j]) && std::isnan(scalar[i * ldo + j])) continue;
      ASSERT_EQ(Bits(tiled[i * ldo + j]), Bits(scalar[i * ldo + j])) << "at (" << i << ", " << j << "): "
                                                                    << tiled[i * ldo + j] << " vs "
                                                                    << scalar[i * ldo + j];
    }
  }
}

TEST(DotTileTest, ReportsItsPath) {
  // Not an assertion on the machine; the log says which path the rest tested.
  std::printf("DotTile path on this CPU: %s\n", cpu::DotTileUsesAvx() ? "avx" : "scalar");
  SUCCEED();
}

TEST(DotTileTest, EveryBlockEdgeAndTailIsBitIdenticalToDotF32) {
  uint64_t seed = 1;
  for (int64_t m : {1, 2, 3, 5, 8}) {
    for (int64_t n : {1, 3, 4, 5, 9}) {
      for (int64_t d : {1, 7, 8, 9, 20, 64, 80, 96, 127, 128}) {
        ExpectSameAsScalar(m, n, d, d, d, n, seed++, false);
      }
    }
  }
}

TEST(DotTileTest, SpecialValuesKeepTheirBits) {
  uint64_t seed = 100;
  for (int64_t d : {3, 8, 13, 128}) {
    for (int rep = 0; rep < 20; ++rep) ExpectSameAsScalar(7, 11, d, d, d, 11, seed++, true);
  }
}

TEST(DotTileTest, NegativeZeroSumsStayNegative) {
  // Every product is -0 (or +0 + -0 in the tail lanes): DotF32 gives -0 only
  // where all of a lane's terms are -0, and the tiled tail must not turn the
  // untouched lanes' -0 into +0.
  for (int64_t d : {1, 5, 8, 12}) {
    std::vector<float> a(d, -0.f), b(d, 1.f);
    float tiled = 1.f, scalar = 1.f;
    cpu::DotTile(a.data(), d, 1, b.data(), d, 1, d, &tiled, 1);
    cpu::DotTileScalar(a.data(), d, 1, b.data(), d, 1, d, &scalar, 1);
    EXPECT_EQ(Bits(tiled), Bits(scalar)) << "d=" << d;
  }
}

TEST(DotTileTest, StridedRowsAndOutput) {
  ExpectSameAsScalar(9, 13, 40, 48, 56, 17, 7, false);
  ExpectSameAsScalar(4, 4, 128, 130, 136, 5, 8, true);
}

TEST(DotTileTest, EmptyShapesWriteNothing) {
  std::vector<float> a(16, 1.f), out(4, -7.f);
  cpu::DotTile(a.data(), 4, 0, a.data(), 4, 4, 4, out.data(), 4);
  cpu::DotTile(a.data(), 4, 1, a.data(), 4, 0, 4, out.data(), 4);
  for (float x : out) EXPECT_EQ(x, -7.f);
  cpu::DotTile(a.data(), 4, 1, a.data(), 4, 1, 0, out.data(), 4);  // d = 0: the empty sum
  EXPECT_EQ(Bits(out[0]), Bits(0.f));
}

TEST(DotTileTest, AgreesWithADoubleDot) {
  constexpr int64_t m = 6, n = 10, d = 128;
  const std::vector<float> a = Rows(m, d, d, 42, false), b = Rows(n, d, d, 43, false);
  std::vector<float> out(m * n);
  cpu::DotTile(a.data(), d, m, b.data(), d, n, d, out.data(), n);
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      double exact = 0.0, magnitude = 0.0;
      for (int64_t k = 0; k < d; ++k) {
        exact += static_cast<double>(a[i * d + k]) * b[j * d + k];
        magnitude += std::abs(static_cast<double>(a[i * d + k]) * b[j * d + k]);
      }
      EXPECT_NEAR(out[i * n + j], exact, 1e-6 * magnitude) << i << ", " << j;
    }
  }
}

}  // namespace
}  // namespace medakv
