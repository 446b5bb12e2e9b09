#include "kernels/common/tensor_util.h"

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"

namespace medakv {

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

void RowToFloat(DType dtype, const void* src, float* dst, int64_t count) {
  switch (dtype) {
    case DType::kFloat16:
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
      return ConvertFromFloat<Half>(src, dst, count);
    case DType::kBFloat16:
      return ConvertFromFloat<BFloat16>(src, dst, count);
    case DType::kFloat32:
      return ConvertFromFloat<float>(src, dst, count);
  }
}

}  // namespace medakv
