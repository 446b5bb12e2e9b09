#include "kernels/common/tensor_util.h"

#include <algorithm>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "kernels/common/cpu_features.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MEDAKV_F16C 1
#include <immintrin.h>
#endif

namespace medakv {
namespace {

#if MEDAKV_F16C
// fp16 <-> fp32 with the F16C instructions, 8 at a time; the same values as
// HalfBitsToFloat and FloatToHalfBits (round to nearest even), except that a
// signalling NaN comes back quiet (dtype_test checks every fp16 pattern).
__attribute__((target("avx,f16c"))) void HalfToFloatF16c(const void* src, float* dst, int64_t count) {
  const uint16_t* s = static_cast<const uint16_t*>(src);
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
  }
  for (; i < count; ++i) dst[i] = HalfBitsToFloat(s[i]);
}

__attribute__((target("avx,f16c"))) void FloatToHalfF16c(const float* src, void* dst, int64_t count) {
  uint16_t* d = static_cast<uint16_t*>(dst);
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  for (; i < count; ++i) d[i] = FloatToHalfBits(src[i]);
}
#endif

}  // namespace

const char* DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kFloat16:
      return "float16";
    case DType::kBFloat16:
      return "bfloat16";
    case DType::kFloat32:
      return "float32";
  }
  return "unknown";
}

const char* LayoutName(Layout layout) {
  switch (layout) {
    case Layout::kHND:
      return "HND";
    case Layout::kNHD:
      return "NHD";
  }
  return "unknown";
}

absl::StatusOr<DType> ParseDType(absl::string_view name) {
  const std::string n = absl::AsciiStrToLower(name);
  if (n == "float16" || n == "fp16" || n == "f16" || n == "half") return DType::kFloat16;
  if (n == "bfloat16" || n == "bf16") return DType::kBFloat16;
  if (n == "float32" || n == "fp32" || n == "f32" || n == "float") return DType::kFloat32;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown dtype '", name, "' (expected float16, bfloat16 or float32)"));
}

absl::StatusOr<Layout> ParseLayout(absl::string_view name) {
  const std::string n = absl::AsciiStrToLower(name);
  if (n == "hnd") return Layout::kHND;
  if (n == "nhd") return Layout::kNHD;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown layout '", name, "' (expected HND or NHD)"));
}

absl::Status CheckView(const TensorView& view, absl::string_view name, int64_t heads,
                       int64_t tokens, int64_t head_dim) {
  if (view.heads != heads || view.tokens != tokens || view.head_dim != head_dim) {
    return absl::InvalidArgumentError(absl::StrCat(
        name, ": shape [heads=", view.heads, ", tokens=", view.tokens, ", head_dim=",
        view.head_dim, "] does not match the expected [", heads, ", ", tokens, ", ", head_dim,
        "]"));
  }
  if (view.layout != Layout::kHND && view.layout != Layout::kNHD) {
    return absl::InvalidArgumentError(absl::StrCat(name, ": unknown layout"));
  }
  if (view.dtype != DType::kFloat16 && view.dtype != DType::kBFloat16 &&
      view.dtype != DType::kFloat32) {
    return absl::InvalidArgumentError(absl::StrCat(name, ": unknown dtype"));
  }
  if (view.NumElements() > 0 && view.data == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(name, ": no data"));
  }
  return absl::OkStatus();
}

namespace {

// The index of the first of `n` elements whose exponent bits (`mask`) are
// all ones (NaN or infinity), or -1. Blocks are first tested as a whole (a
// loop the compiler vectorises), then searched only where one holds a hit.
template <typename Bits>
int64_t FirstExponentAllOnes(const Bits* p, int64_t n, Bits mask) {
  constexpr int64_t kBlock = 4096;
  for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
    const int64_t b1 = std::min(n, b0 + kBlock);
    bool any = false;
    for (int64_t i = b0; i < b1; ++i) any |= (p[i] & mask) == mask;
    if (!any) continue;
    for (int64_t i = b0; i < b1; ++i) {
      if ((p[i] & mask) == mask) return i;
    }
  }
  return -1;
}

}  // namespace

absl::Status CheckFinite(const TensorView& view, absl::string_view name) {
  const int64_t n = view.NumElements();
  if (n <= 0) return absl::OkStatus();
  int64_t at = -1;
  switch (view.dtype) {
    case DType::kFloat16:
      at = FirstExponentAllOnes(static_cast<const uint16_t*>(view.data), n, uint16_t{0x7C00});
      break;
    case DType::kBFloat16:
      at = FirstExponentAllOnes(static_cast<const uint16_t*>(view.data), n, uint16_t{0x7F80});
      break;
    case DType::kFloat32:
      at = FirstExponentAllOnes(static_cast<const uint32_t*>(view.data), n, uint32_t{0x7F800000});
      break;
  }
  if (at < 0) return absl::OkStatus();
  const int64_t row = at / view.head_dim, dim = at % view.head_dim;
  const int64_t head = view.layout == Layout::kHND ? row / view.tokens : row % view.heads;
  const int64_t token = view.layout == Layout::kHND ? row % view.tokens : row / view.heads;
  float value = 0.f;
  RowToFloat(view.dtype, static_cast<const char*>(view.data) + at * DTypeSize(view.dtype), &value, 1);
  return absl::InvalidArgumentError(absl::StrCat(name, ": the value at head ", head, ", token ", token, ", dim ", dim,
                                                 " is not finite (", value, ")"));
}

void RowToFloat(DType dtype, const void* src, float* dst, int64_t count) {
  switch (dtype) {
    case DType::kFloat16:
#if MEDAKV_F16C
      if (CpuHasF16c()) return HalfToFloatF16c(src, dst, count);
#endif
      return ConvertToFloat<Half>(src, dst, count);
    case DType::kBFloat16:
      return ConvertToFloat<BFloat16>(src, dst, count);
    case DType::kFloat32:
      return ConvertToFloat<float>(src, dst, count);
  }
}

void RowFromFloat(DType dtype, const float* src, void* dst, int64_t count) {
  switch (dtype) {
    case DType::kFloat16:
#if MEDAKV_F16C
      if (CpuHasF16c()) return FloatToHalfF16c(src, dst, count);
#endif
      return ConvertFromFloat<Half>(src, dst, count);
    case DType::kBFloat16:
      return ConvertFromFloat<BFloat16>(src, dst, count);
    case DType::kFloat32:
      return ConvertFromFloat<float>(src, dst, count);
  }
}

}  // namespace medakv
