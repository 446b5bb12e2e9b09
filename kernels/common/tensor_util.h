// Host-only helpers around the dtype and tensor views: names, parsing,
// validation and row conversion for the CPU backend.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kernels/common/dtype.h"
#include "kernels/common/tensor.h"

namespace medakv {

const char* DTypeName(DType dtype);  // "float16", "bfloat16", "float32"
const char* LayoutName(Layout layout);  // "HND", "NHD"
// Accepts float16|fp16|f16|half, bfloat16|bf16, float32|fp32|f32|float (any case).
absl::StatusOr<DType> ParseDType(absl::string_view name);
// Accepts hnd|nhd (any case).
absl::StatusOr<Layout> ParseLayout(absl::string_view name);

// Checks that a view is usable: non-null data unless empty, non-negative sizes,
// and the expected shape. `name` is used in the message, e.g. "layer 3 key".
[[nodiscard]] absl::Status CheckView(const TensorView& view, absl::string_view name,
                                     int64_t heads, int64_t tokens, int64_t head_dim);

// Checks that every element of `view` is finite (not NaN, not infinite);
// otherwise INVALID_ARGUMENT naming the first one in memory order: "<name>:
// the value at head H, token T, dim D is not finite (nan)". One pass over the
// bytes, reading only the exponent bits.
[[nodiscard]] absl::Status CheckFinite(const TensorView& view, absl::string_view name);

// Calls f(tag) with tag a value of the storage type of `dtype` (Half,
// BFloat16 or float); a dtype outside the enum is an InvalidArgument.
template <typename F>
absl::Status DispatchDType(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat16:
      f(Half{});
      return absl::OkStatus();
    case DType::kBFloat16:
      f(BFloat16{});
      return absl::OkStatus();
    case DType::kFloat32:
      f(float{});
      return absl::OkStatus();
  }
  return absl::InvalidArgumentError("unsupported dtype " +
                                    std::to_string(static_cast<int>(dtype)));
}

// Converts `count` elements of storage type T to fp32.
template <typename T>
inline void ConvertToFloat(const void* src, float* dst, int64_t count) {
  const T* s = static_cast<const T*>(src);
  for (int64_t i = 0; i < count; ++i) dst[i] = ToFloat(s[i]);
}
template <typename T>
inline void ConvertFromFloat(const float* src, void* dst, int64_t count) {
  T* d = static_cast<T*>(dst);
  for (int64_t i = 0; i < count; ++i) d[i] = FromFloat<T>(src[i]);
}

// Runtime-dtype versions of the above.
void RowToFloat(DType dtype, const void* src, float* dst, int64_t count);
void RowFromFloat(DType dtype, const float* src, void* dst, int64_t count);

}  // namespace medakv
