// fp16 / bf16 conversions (kernels/common/dtype.h) against GCC's _Float16 and
// a double-arithmetic round-to-nearest-even reference, and the tensor view
// offsets (kernels/common/tensor.h).
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/common/cpu_features.h"
#include "kernels/common/dtype.h"
#include "kernels/common/tensor.h"
#include "kernels/common/tensor_util.h"
#include "tests/kernels/test_util.h"

namespace medakv {
namespace {

static_assert(sizeof(_Float16) == 2, "GCC's _Float16 is IEEE binary16");

uint16_t Float16Bits(_Float16 h) {
  uint16_t b;
  std::memcpy(&b, &h, sizeof(b));
  return b;
}
_Float16 Float16FromBits(uint16_t b) {
  _Float16 h;
  std::memcpy(&h, &b, sizeof(b));
  return h;
}
// The compiler's fp32 -> fp16 conversion (round to nearest even).
uint16_t CompilerHalfBits(float f) {
  volatile float v = f;  // keep the conversion at run time
  return Float16Bits(static_cast<_Float16>(v));
}
bool HalfIsNan(uint16_t h) { return (h & 0x7c00u) == 0x7c00u && (h & 0x3ffu) != 0; }
bool BFloat16IsNan(uint16_t b) { return (b & 0x7f80u) == 0x7f80u && (b & 0x7fu) != 0; }

// Floats covering every sign and exponent and mantissa prefix: all 2^16
// upper halves, each with low halves that hit the fp16 and bf16 rounding
// boundaries, plus random low halves.
std::vector<float> ManyFloats() {
  const uint32_t lows[] = {0x0000u, 0x0001u, 0x0fffu, 0x1000u, 0x1001u, 0x1fffu, 0x2000u,
                           0x3000u, 0x7fffu, 0x8000u, 0x8001u, 0xefffu, 0xf000u, 0xffffu};
  test::Rng rng(0xd7e5);
  std::vector<float> out;
  out.reserve(65536u * 16u);
  for (uint32_t hi = 0; hi < 65536u; ++hi) {
    for (uint32_t lo : lows) out.push_back(BitsToFloat((hi << 16) | lo));
    out.push_back(BitsToFloat((hi << 16) | static_cast<uint32_t>(rng.Bits() & 0xffffu)));
    out.push_back(BitsToFloat((hi << 16) | static_cast<uint32_t>(rng.Bits() & 0xffffu)));
  }
  return out;
}

// Halfway points between adjacent finite halves (exact in fp32), the floats
// just around them, and the point halfway from 65504 to 65536 (the overflow
// threshold), for both signs.
std::vector<float> HalfwayFloats() {
  std::vector<float> out;
  for (uint32_t h = 0; h < 0x7bffu; ++h) {
    const float a = HalfBitsToFloat(static_cast<uint16_t>(h));
    const float b = HalfBitsToFloat(static_cast<uint16_t>(h + 1));
    const float mid = a + (b - a) * 0.5f;  // exact: fp16 needs 11 bits, the midpoint 12
    for (float f : {mid, std::nextafter(mid, 0.f), std::nextafter(mid, INFINITY)}) {
      out.push_back(f);
      out.push_back(-f);
    }
  }
  for (float f : {65519.f, 65520.f, std::nextafter(65520.f, 0.f), std::nextafter(65520.f, INFINITY)}) {
    out.push_back(f);
    out.push_back(-f);
  }
  return out;
}

TEST(HalfToFloatTest, AllBitPatternsMatchCompiler) {
  int64_t mismatches = 0;
  for (uint32_t h = 0; h < 65536u; ++h) {
    const auto bits = static_cast<uint16_t>(h);
    const float expected = static_cast<float>(Float16FromBits(bits));
    const float got = HalfBitsToFloat(bits);
    if (std::isnan(expected)) {
      EXPECT_TRUE(std::isnan(got)) << "half 0x" << std::hex << h;
      EXPECT_EQ(std::signbit(got), std::signbit(expected)) << "half 0x" << std::hex << h;
      // The payload moves up unchanged (the conversion is exact).
      EXPECT_EQ(FloatToBits(got) & 0x7fffffu, static_cast<uint32_t>(h & 0x3ffu) << 13)
          << "half 0x" << std::hex << h;
      continue;
    }
    if (FloatToBits(got) != FloatToBits(expected)) {
      if (++mismatches <= 10) {
        ADD_FAILURE() << "half 0x" << std::hex << h << ": got " << got << " expected "
                      << expected;
      }
    }
  }
  EXPECT_EQ(mismatches, 0);
}

void ExpectHalfMatchesCompiler(const std::vector<float>& inputs) {
  int64_t mismatches = 0;
  for (float f : inputs) {
    const uint16_t got = FloatToHalfBits(f);
    if (std::isnan(f)) {
      if (!HalfIsNan(got) || ((got & 0x8000u) != 0) != std::signbit(f) || !(got & 0x200u)) {
        if (++mismatches <= 10) {
          ADD_FAILURE() << "NaN 0x" << std::hex << FloatToBits(f) << " -> 0x" << got
                        << " (expected a quiet NaN with the same sign)";
        }
      }
      continue;
    }
    const uint16_t expected = CompilerHalfBits(f);
    if (got != expected && ++mismatches <= 10) {
      ADD_FAILURE() << "float " << f << " (0x" << std::hex << FloatToBits(f) << "): got 0x" << got
                    << " expected 0x" << expected;
    }
  }
  EXPECT_EQ(mismatches, 0);
}

TEST(FloatToHalfTest, ManyFloatsMatchCompiler) { ExpectHalfMatchesCompiler(ManyFloats()); }

TEST(FloatToHalfTest, HalfwayCasesMatchCompiler) { ExpectHalfMatchesCompiler(HalfwayFloats()); }

TEST(FloatToHalfTest, SpecialValues) {
  EXPECT_EQ(FloatToHalfBits(0.f), 0x0000u);
  EXPECT_EQ(FloatToHalfBits(-0.f), 0x8000u);
  EXPECT_EQ(FloatToHalfBits(INFINITY), 0x7c00u);
  EXPECT_EQ(FloatToHalfBits(-INFINITY), 0xfc00u);
  EXPECT_EQ(FloatToHalfBits(1.f), 0x3c00u);
  EXPECT_EQ(FloatToHalfBits(65504.f), 0x7bffu);    // the largest half
  EXPECT_EQ(FloatToHalfBits(65519.f), 0x7bffu);    // below the halfway point to 2^16
  EXPECT_EQ(FloatToHalfBits(std::nextafter(65520.f, 0.f)), 0x7bffu);
  EXPECT_EQ(FloatToHalfBits(65520.f), 0x7c00u);    // halfway, ties to even: infinity
  EXPECT_EQ(FloatToHalfBits(-65520.f), 0xfc00u);
  EXPECT_EQ(FloatToHalfBits(1e30f), 0x7c00u);
  EXPECT_EQ(FloatToHalfBits(0x1.0p-24f), 0x0001u);  // the smallest subnormal
  EXPECT_EQ(FloatToHalfBits(0x1.0p-25f), 0x0000u);  // halfway to it: ties to even (0)
  EXPECT_EQ(FloatToHalfBits(std::nextafter(0x1.0p-25f, 1.f)), 0x0001u);
  EXPECT_EQ(FloatToHalfBits(0x1.8p-24f), 0x0002u);  // 1.5 ulp: ties to even (2)
  EXPECT_EQ(FloatToHalfBits(0x1.0p-14f), 0x0400u);  // the smallest normal
  EXPECT_EQ(FloatToHalfBits(0x1.ffcp-15f), 0x0400u);  // largest subnormal + 1/2 ulp: carries
  EXPECT_EQ(FloatToHalfBits(0x1.ff8p-15f), 0x03ffu);  // the largest subnormal
  EXPECT_EQ(FloatToHalfBits(1.f + 0x1.0p-11f), 0x3c00u);  // tie, even mantissa stays
  EXPECT_EQ(FloatToHalfBits(1.f + 0x1.8p-10f), 0x3c02u);  // tie, odd mantissa rounds up
  EXPECT_EQ(FloatToHalfBits(1e-10f), 0x0000u);
  EXPECT_EQ(FloatToHalfBits(-1e-10f), 0x8000u);
  const float nans[] = {std::numeric_limits<float>::quiet_NaN(),
                        -std::numeric_limits<float>::quiet_NaN(),
                        std::numeric_limits<float>::signaling_NaN(), BitsToFloat(0x7f800001u),
                        BitsToFloat(0xff800001u), BitsToFloat(0x7fffffffu)};
  for (float n : nans) {
    const uint16_t h = FloatToHalfBits(n);
    EXPECT_TRUE(HalfIsNan(h)) << std::hex << FloatToBits(n) << " -> " << h;
    EXPECT_EQ((h & 0x8000u) != 0, std::signbit(n)) << std::hex << FloatToBits(n);
    EXPECT_TRUE(std::isnan(HalfBitsToFloat(h)));
  }
}

// Round to nearest even, computed with double arithmetic on the two
// neighbouring bf16 values (2^128 standing in for the one past the largest).
uint16_t ReferenceBFloat16(float f) {
  const uint32_t bits = FloatToBits(f);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t lo_mag = (bits & 0x7fffffffu) >> 16;  // truncation
  if (lo_mag == 0x7f80u) return static_cast<uint16_t>(sign | lo_mag);  // infinity
  const uint32_t hi_mag = lo_mag + 1;
  const double a = std::fabs(static_cast<double>(f));
  const double lo = BitsToFloat(lo_mag << 16);
  const double hi = hi_mag == 0x7f80u ? std::ldexp(1.0, 128) : BitsToFloat(hi_mag << 16);
  uint32_t mag;
  if (a - lo < hi - a) {
    mag = lo_mag;
  } else if (a - lo > hi - a) {
    mag = hi_mag;
  } else {
    mag = (lo_mag & 1u) ? hi_mag : lo_mag;
  }
  return static_cast<uint16_t>(sign | mag);
}

TEST(FloatToBFloat16Test, ManyFloatsMatchDoubleReference) {
  int64_t mismatches = 0;
  for (float f : ManyFloats()) {
    const uint16_t got = FloatToBFloat16Bits(f);
    if (std::isnan(f)) {
      if (!BFloat16IsNan(got) || ((got & 0x8000u) != 0) != std::signbit(f)) {
        if (++mismatches <= 10) {
          ADD_FAILURE() << "NaN 0x" << std::hex << FloatToBits(f) << " -> 0x" << got;
        }
      }
      continue;
    }
    const uint16_t expected = ReferenceBFloat16(f);
    if (got != expected && ++mismatches <= 10) {
      ADD_FAILURE() << "float " << f << " (0x" << std::hex << FloatToBits(f) << "): got 0x" << got
                    << " expected 0x" << expected;
    }
  }
  EXPECT_EQ(mismatches, 0);
}

TEST(FloatToBFloat16Test, SpecialValues) {
  EXPECT_EQ(FloatToBFloat16Bits(0.f), 0x0000u);
  EXPECT_EQ(FloatToBFloat16Bits(-0.f), 0x8000u);
  EXPECT_EQ(FloatToBFloat16Bits(1.f), 0x3f80u);
  EXPECT_EQ(FloatToBFloat16Bits(INFINITY), 0x7f80u);
  EXPECT_EQ(FloatToBFloat16Bits(-INFINITY), 0xff80u);
  EXPECT_EQ(FloatToBFloat16Bits(BitsToFloat(0x3f808000u)), 0x3f80u);  // tie, even stays
  EXPECT_EQ(FloatToBFloat16Bits(BitsToFloat(0x3f818000u)), 0x3f82u);  // tie, odd rounds up
  EXPECT_EQ(FloatToBFloat16Bits(BitsToFloat(0x3f808001u)), 0x3f81u);
  EXPECT_EQ(FloatToBFloat16Bits(std::numeric_limits<float>::max()), 0x7f80u);  // overflows
  EXPECT_EQ(FloatToBFloat16Bits(BitsToFloat(0x7f7f7fffu)), 0x7f7fu);
  // NaNs whose payload sits only in the low 16 bits must not become infinity.
  for (uint32_t bits : {0x7f800001u, 0xff800001u, 0x7fc00000u, 0xffc00000u, 0x7f80ffffu}) {
    const uint16_t b = FloatToBFloat16Bits(BitsToFloat(bits));
    EXPECT_TRUE(BFloat16IsNan(b)) << std::hex << bits << " -> " << b;
    EXPECT_EQ((b & 0x8000u) != 0, (bits & 0x80000000u) != 0) << std::hex << bits;
  }
}

TEST(BFloat16ToFloatTest, AllBitPatternsAreTheUpperHalf) {
  for (uint32_t b = 0; b < 65536u; ++b) {
    const float f = BFloat16BitsToFloat(static_cast<uint16_t>(b));
    EXPECT_EQ(FloatToBits(f), b << 16) << std::hex << b;
  }
}

TEST(RoundTripTest, EveryHalfPattern) {
  for (uint32_t h = 0; h < 65536u; ++h) {
    const auto bits = static_cast<uint16_t>(h);
    const uint16_t back = FloatToHalfBits(HalfBitsToFloat(bits));
    if (HalfIsNan(bits)) {
      EXPECT_TRUE(HalfIsNan(back)) << std::hex << h << " -> " << back;
      EXPECT_EQ(back & 0x8000u, h & 0x8000u) << std::hex << h;
    } else {
      EXPECT_EQ(back, bits) << std::hex << h;
    }
  }
}

TEST(RoundTripTest, EveryBFloat16Pattern) {
  for (uint32_t b = 0; b < 65536u; ++b) {
    const auto bits = static_cast<uint16_t>(b);
    const uint16_t back = FloatToBFloat16Bits(BFloat16BitsToFloat(bits));
    if (BFloat16IsNan(bits)) {
      EXPECT_TRUE(BFloat16IsNan(back)) << std::hex << b << " -> " << back;
      EXPECT_EQ(back & 0x8000u, b & 0x8000u) << std::hex << b;
    } else {
      EXPECT_EQ(back, bits) << std::hex << b;
    }
  }
}

TEST(StorageTypeTest, ToFloatAndFromFloatMatchTheBitFunctions) {
  const float values[] = {0.f, -1.5f, 3.14159f, 65504.f, 1e-6f, -7e5f};
  for (float f : values) {
    EXPECT_EQ(FromFloat<Half>(f).bits, FloatToHalfBits(f));
    EXPECT_EQ(FromFloat<BFloat16>(f).bits, FloatToBFloat16Bits(f));
    EXPECT_EQ(FloatToBits(FromFloat<float>(f)), FloatToBits(f));
    EXPECT_EQ(FloatToBits(ToFloat(Half{FloatToHalfBits(f)})),
              FloatToBits(HalfBitsToFloat(FloatToHalfBits(f))));
    EXPECT_EQ(FloatToBits(ToFloat(BFloat16{FloatToBFloat16Bits(f)})),
              FloatToBits(BFloat16BitsToFloat(FloatToBFloat16Bits(f))));
  }
  EXPECT_EQ(DTypeSize(DType::kFloat16), 2);
  EXPECT_EQ(DTypeSize(DType::kBFloat16), 2);
  EXPECT_EQ(DTypeSize(DType::kFloat32), 4);
}

TEST(StorageTypeTest, RowConversionsRoundTrip) {
  const std::vector<float> src = {0.f, -2.f, 0.333333f, 1000.5f, -1e-5f, 7.f};
  for (DType dtype : test::kAllDTypes) {
    std::vector<uint32_t> buffer(src.size());
    RowFromFloat(dtype, src.data(), buffer.data(), static_cast<int64_t>(src.size()));
    std::vector<float> back(src.size());
    RowToFloat(dtype, buffer.data(), back.data(), static_cast<int64_t>(src.size()));
    for (size_t i = 0; i < src.size(); ++i) {
      EXPECT_EQ(back[i], static_cast<float>(test::RoundToDType(dtype, src[i])))
          << DTypeName(dtype) << " " << src[i];
    }
  }
}

// RowToFloat and RowFromFloat take the F16C instructions where the CPU has
// them: every fp16 pattern, and the float sets above (halfway cases, every
// exponent), must convert as the bit functions do, in rows of odd lengths
// (vector body and scalar tail). A NaN must stay a NaN of the same sign (the
// hardware quiets a signalling one).
TEST(RowConversionTest, HalfRowsMatchTheBitFunctions) {
  std::printf("fp16 rows converted with: %s\n", CpuHasF16c() ? "F16C" : "software");
  std::vector<uint16_t> all(65536);
  for (uint32_t h = 0; h < 65536; ++h) all[h] = static_cast<uint16_t>(h);
  for (int64_t offset : {0, 3}) {
    const int64_t count = static_cast<int64_t>(all.size()) - offset;
    std::vector<float> out(count);
    RowToFloat(DType::kFloat16, all.data() + offset, out.data(), count);
    for (int64_t i = 0; i < count; ++i) {
      const uint16_t h = all[offset + i];
      const float want = HalfBitsToFloat(h);
      if (std::isnan(want)) {
        ASSERT_TRUE(std::isnan(out[i])) << h;
        ASSERT_EQ(std::signbit(out[i]), std::signbit(want)) << h;
      } else {
        ASSERT_EQ(FloatToBits(out[i]), FloatToBits(want)) << h;
      }
    }
  }
  std::vector<float> floats = ManyFloats();
  const std::vector<float> halfway = HalfwayFloats();
  floats.insert(floats.end(), halfway.begin(), halfway.end());
  for (float f : {0.f, -0.f, INFINITY, -INFINITY, NAN, -NAN, 65504.f, 65520.f, 65519.99f, 1e-8f, -6e-8f}) {
    floats.push_back(f);
  }
  for (int64_t length : {static_cast<int64_t>(floats.size()), int64_t{7}, int64_t{9}}) {
    std::vector<uint16_t> out(length);
    RowFromFloat(DType::kFloat16, floats.data(), out.data(), length);
    for (int64_t i = 0; i < length; ++i) {
      ASSERT_EQ(out[i], FloatToHalfBits(floats[i])) << floats[i] << " (bits " << FloatToBits(floats[i]) << ")";
    }
  }
}

TEST(TensorViewTest, RowOffsetsOfBothLayouts) {
  constexpr int64_t kHeads = 3, kTokens = 5, kDim = 4;
  for (int64_t h = 0; h < kHeads; ++h) {
    for (int64_t t = 0; t < kTokens; ++t) {
      EXPECT_EQ(RowIndex(Layout::kHND, kHeads, kTokens, kDim, h, t), (h * kTokens + t) * kDim);
      EXPECT_EQ(RowIndex(Layout::kNHD, kHeads, kTokens, kDim, h, t), (t * kHeads + h) * kDim);
    }
  }
  EXPECT_EQ(RowIndex(Layout::kHND, kHeads, kTokens, kDim, 2, 3), 52);
  EXPECT_EQ(RowIndex(Layout::kNHD, kHeads, kTokens, kDim, 2, 3), 44);

  std::vector<uint16_t> storage(kHeads * kTokens * kDim);
  const TensorView hnd{storage.data(), DType::kFloat16, Layout::kHND, kHeads, kTokens, kDim};
  const TensorView nhd{storage.data(), DType::kBFloat16, Layout::kNHD, kHeads, kTokens, kDim};
  EXPECT_EQ(hnd.NumElements(), 60);
  EXPECT_EQ(hnd.NumBytes(), 120);
  EXPECT_EQ(hnd.RowOffset(2, 3), 52);
  EXPECT_EQ(nhd.RowOffset(2, 3), 44);
  EXPECT_EQ(static_cast<const char*>(hnd.Row(2, 3)),
            reinterpret_cast<const char*>(storage.data()) + 104);
  EXPECT_EQ(static_cast<const char*>(nhd.Row(2, 3)),
            reinterpret_cast<const char*>(storage.data()) + 88);

  std::vector<float> fstorage(kHeads * kTokens * kDim);
  MutableTensorView f32{fstorage.data(), DType::kFloat32, Layout::kNHD, kHeads, kTokens, kDim};
  EXPECT_EQ(f32.NumBytes(), 240);
  EXPECT_EQ(static_cast<float*>(f32.Row(1, 4)), fstorage.data() + (4 * kHeads + 1) * kDim);
  const TensorView c = AsConst(f32);
  EXPECT_EQ(c.data, f32.data);
  EXPECT_EQ(c.layout, Layout::kNHD);
  EXPECT_EQ(c.Row(1, 4), static_cast<const void*>(f32.Row(1, 4)));
}

// The same logical tensor stored HND and NHD holds each (head, token) row at
// the offsets above: a transposition of rows, nothing else.
TEST(TensorViewTest, HndAndNhdHoldTheSameRows) {
  constexpr int64_t kHeads = 2, kTokens = 7, kDim = 3;
  const std::vector<double> values = test::RandomNormal(kHeads * kTokens * kDim, 11);
  for (DType dtype : test::kAllDTypes) {
    const test::HostTensor a =
        test::MakeTensor(dtype, Layout::kHND, kHeads, kTokens, kDim, values);
    const test::HostTensor b =
        test::MakeTensor(dtype, Layout::kNHD, kHeads, kTokens, kDim, values);
    const int size = DTypeSize(dtype);
    for (int64_t h = 0; h < kHeads; ++h) {
      for (int64_t t = 0; t < kTokens; ++t) {
        const char* ra = static_cast<const char*>(a.data()) + ((h * kTokens + t) * kDim) * size;
        const char* rb = static_cast<const char*>(b.data()) + ((t * kHeads + h) * kDim) * size;
        EXPECT_EQ(std::memcmp(ra, rb, kDim * size), 0) << DTypeName(dtype) << " " << h << " " << t;
      }
    }
  }
}

}  // namespace
}  // namespace medakv
