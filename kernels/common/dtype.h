// Storage dtypes of KV tensors and their exact conversions to and from fp32.
//
// CUDA-free: the same functions run in the CPU backend and in CUDA kernels.
// Conversions to fp16 and bf16 round to nearest, ties to even; NaN stays NaN
// (sign and the high payload bits kept, made quiet), infinities stay infinite,
// fp16 subnormals are produced and read exactly.
#pragma once

#include <cstdint>
#include <cstring>

#include "kernels/common/host_device.h"

namespace medakv {

enum class DType : uint8_t { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2 };

MEDAKV_HOST_DEVICE int DTypeSize(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

// 16-bit storage types; distinct structs so that overloads pick the format.
struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};
static_assert(sizeof(Half) == 2 && sizeof(BFloat16) == 2, "16-bit storage");

MEDAKV_HOST_DEVICE uint32_t FloatToBits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

MEDAKV_HOST_DEVICE float BitsToFloat(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// fp32 -> IEEE binary16, round to nearest even.
MEDAKV_HOST_DEVICE uint16_t FloatToHalfBits(float f) {
  const uint32_t x = FloatToBits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t absx = x & 0x7fffffffu;
  if (absx > 0x7f800000u) {  // NaN: quiet, keep the top 9 payload bits
    return static_cast<uint16_t>(sign | 0x7e00u | ((absx >> 13) & 0x3ffu));
  }
  if (absx >= 0x477ff000u) {  // >= 65520 rounds to infinity (includes inf)
    return static_cast<uint16_t>(sign | 0x7c00u);
  }
  if (absx < 0x38800000u) {  // below 2^-14: a subnormal half or zero
    if (absx <= 0x33000000u) return static_cast<uint16_t>(sign);  // <= 2^-25 ties to 0
    const uint32_t exponent = absx >> 23;
    const uint32_t mantissa = (absx & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - exponent;  // 14..24
    uint32_t m = mantissa >> shift;
    const uint32_t rem = mantissa & ((1u << shift) - 1u);
    const uint32_t halfway = 1u << (shift - 1u);
    if (rem > halfway || (rem == halfway && (m & 1u))) ++m;  // may carry into the normals
    return static_cast<uint16_t>(sign | m);
  }
  uint32_t h = (((absx >> 23) - 112u) << 10) | ((absx >> 13) & 0x3ffu);
  const uint32_t rem = absx & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // carry may reach infinity
  return static_cast<uint16_t>(sign | h);
}

// IEEE binary16 -> fp32, exact.
MEDAKV_HOST_DEVICE float HalfBitsToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exponent = (h >> 10) & 0x1fu;
  uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0x1fu) return BitsToFloat(sign | 0x7f800000u | (mantissa << 13));
  if (exponent == 0) {
    if (mantissa == 0) return BitsToFloat(sign);
    exponent = 113;  // normalise the subnormal
    while ((mantissa & 0x400u) == 0) {
      mantissa <<= 1;
      --exponent;
    }
    return BitsToFloat(sign | (exponent << 23) | ((mantissa & 0x3ffu) << 13));
  }
  return BitsToFloat(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

// fp32 -> bfloat16, round to nearest even.
MEDAKV_HOST_DEVICE uint16_t FloatToBFloat16Bits(float f) {
  const uint32_t x = FloatToBits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);
  const uint32_t rounding_bias = 0x7fffu + ((x >> 16) & 1u);
  return static_cast<uint16_t>((x + rounding_bias) >> 16);
}

MEDAKV_HOST_DEVICE float BFloat16BitsToFloat(uint16_t b) {
  return BitsToFloat(static_cast<uint32_t>(b) << 16);
}

MEDAKV_HOST_DEVICE float ToFloat(float x) { return x; }
MEDAKV_HOST_DEVICE float ToFloat(Half x) { return HalfBitsToFloat(x.bits); }
MEDAKV_HOST_DEVICE float ToFloat(BFloat16 x) { return BFloat16BitsToFloat(x.bits); }

template <typename T>
MEDAKV_HOST_DEVICE T FromFloat(float x);
template <>
MEDAKV_HOST_DEVICE float FromFloat<float>(float x) {
  return x;
}
template <>
MEDAKV_HOST_DEVICE Half FromFloat<Half>(float x) {
  return Half{FloatToHalfBits(x)};
}
template <>
MEDAKV_HOST_DEVICE BFloat16 FromFloat<BFloat16>(float x) {
  return BFloat16{FloatToBFloat16Bits(x)};
}

// Maps a DType to its storage type.
template <DType kDType>
struct StorageOf;
template <>
struct StorageOf<DType::kFloat16> {
  using type = Half;
};
template <>
struct StorageOf<DType::kBFloat16> {
  using type = BFloat16;
};
template <>
struct StorageOf<DType::kFloat32> {
  using type = float;
};

}  // namespace medakv
