// Views of one layer's K, V or Q over raw bytes.
//
// HND is [heads, tokens, head_dim]; NHD is [tokens, heads, head_dim] (the
// vLLM / FlashAttention order). head_dim is always innermost and contiguous.
#pragma once

#include <cstdint>
#include <type_traits>

#include "kernels/common/dtype.h"
#include "kernels/common/host_device.h"

namespace medakv {

enum class Layout : uint8_t { kHND = 0, kNHD = 1 };

// Element index of (head, token, 0) in a dense tensor of the given layout.
MEDAKV_HOST_DEVICE int64_t RowIndex(Layout layout, int64_t heads, int64_t tokens, int64_t head_dim,
                                    int64_t head, int64_t token) {
  return layout == Layout::kHND ? (head * tokens + token) * head_dim
                                : (token * heads + head) * head_dim;
}

template <typename Ptr>
struct BasicTensorView {
  Ptr data = nullptr;  // [heads, tokens, head_dim] (HND) or [tokens, heads, head_dim] (NHD)
  DType dtype = DType::kFloat32;
  Layout layout = Layout::kHND;
  int64_t heads = 0;
  int64_t tokens = 0;
  int64_t head_dim = 0;

  MEDAKV_HOST_DEVICE int64_t NumElements() const { return heads * tokens * head_dim; }
  MEDAKV_HOST_DEVICE int64_t NumBytes() const { return NumElements() * DTypeSize(dtype); }
  MEDAKV_HOST_DEVICE int64_t RowOffset(int64_t head, int64_t token) const {
    return RowIndex(layout, heads, tokens, head_dim, head, token);
  }
  // Address of the first element of (head, token).
  MEDAKV_HOST_DEVICE Ptr Row(int64_t head, int64_t token) const {
    using Byte = std::conditional_t<std::is_const_v<std::remove_pointer_t<Ptr>>, const char*, char*>;
    return static_cast<Ptr>(static_cast<Byte>(data) +
                                 RowOffset(head, token) * DTypeSize(dtype));
  }
};

using TensorView = BasicTensorView<const void*>;
using MutableTensorView = BasicTensorView<void*>;

MEDAKV_HOST_DEVICE TensorView AsConst(const MutableTensorView& v) {
  return TensorView{v.data, v.dtype, v.layout, v.heads, v.tokens, v.head_dim};
}

}  // namespace medakv
