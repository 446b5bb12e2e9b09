// The CUDA side of the shared dtype arithmetic: device conversions equal the
// host's bit for bit. Label `gpu`: skips without a CUDA build or device.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "kernels/common/dtype.h"
#include "kernels/cuda/device.h"

namespace medakv {
namespace {

// GTEST_SKIP returns from the enclosing function, so this is a macro.
#define MEDAKV_SKIP_WITHOUT_DEVICE()                                  \
  do {                                                                \
    if (!cuda::Compiled()) GTEST_SKIP() << "built without CUDA";      \
    if (cuda::DeviceCount() == 0) GTEST_SKIP() << "no CUDA device";   \
  } while (false)

TEST(CudaDTypeTest, DeviceCountIsNonNegative) {
  EXPECT_GE(cuda::DeviceCount(), 0);
  if (!cuda::Compiled()) {
    EXPECT_EQ(cuda::DeviceCount(), 0);
    EXPECT_EQ(cuda::ConvertOnDevice(DType::kFloat16, DType::kFloat32, nullptr, nullptr, 1).code(),
              absl::StatusCode::kFailedPrecondition);
  }
}

TEST(CudaDTypeTest, EveryHalfAndBFloat16PatternToFloat) {
  MEDAKV_SKIP_WITHOUT_DEVICE();
  std::vector<uint16_t> bits(65536);
  for (uint32_t i = 0; i < 65536; ++i) bits[i] = static_cast<uint16_t>(i);
  for (DType from : {DType::kFloat16, DType::kBFloat16}) {
    std::vector<float> out(65536);
    ASSERT_TRUE(cuda::ConvertOnDevice(from, DType::kFloat32, bits.data(), out.data(), 65536).ok());
    for (uint32_t i = 0; i < 65536; ++i) {
      const float host = from == DType::kFloat16 ? HalfBitsToFloat(bits[i]) : BFloat16BitsToFloat(bits[i]);
      ASSERT_EQ(FloatToBits(out[i]), FloatToBits(host)) << "pattern " << i;
    }
  }
}

TEST(CudaDTypeTest, FloatToHalfAndBFloat16MatchHost) {
  MEDAKV_SKIP_WITHOUT_DEVICE();
  std::mt19937 rng(1);
  std::vector<float> in(1 << 20);
  for (float& f : in) {
    const uint32_t u = rng();
    std::memcpy(&f, &u, 4);  // every class of float: normals, subnormals, inf, NaN
  }
  for (DType to : {DType::kFloat16, DType::kBFloat16}) {
    std::vector<uint16_t> out(in.size());
    ASSERT_TRUE(cuda::ConvertOnDevice(DType::kFloat32, to, in.data(), out.data(), static_cast<int64_t>(in.size())).ok());
    for (size_t i = 0; i < in.size(); ++i) {
      const uint16_t host = to == DType::kFloat16 ? FloatToHalfBits(in[i]) : FloatToBFloat16Bits(in[i]);
      ASSERT_EQ(out[i], host) << "input bits " << FloatToBits(in[i]);
    }
  }
}

}  // namespace
}  // namespace medakv
