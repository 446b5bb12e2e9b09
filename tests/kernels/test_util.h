// Shared helpers of the kernel tests: deterministic random data, host tensors
// of any dtype and layout built from doubles and read back, modality patterns,
// and tolerance checks.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numbers>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "kernels/common/dtype.h"
#include "kernels/common/tensor.h"

namespace medakv::test {

inline constexpr DType kAllDTypes[] = {DType::kFloat16, DType::kBFloat16, DType::kFloat32};
inline constexpr Layout kAllLayouts[] = {Layout::kHND, Layout::kNHD};

inline std::string DTypeTag(DType d) {
  switch (d) {
    case DType::kFloat16:
      return "F16";
    case DType::kBFloat16:
      return "BF16";
    case DType::kFloat32:
      return "F32";
  }
  return "Unknown";
}
inline std::string LayoutTag(Layout l) { return l == Layout::kHND ? "HND" : "NHD"; }

// A seeded generator; the same seed gives the same numbers on every run
// (mt19937_64 is fully specified; the distributions are written out here so
// that they do not depend on the standard library).
class Rng {
 public:
  explicit Rng(uint64_t seed) : engine_(seed) {}
  // Uniform in [0, 1).
  double Uniform() { return static_cast<double>(engine_() >> 11) * 0x1.0p-53; }
  double Uniform(double lo, double hi) { return lo + (hi - lo) * Uniform(); }
  // Uniform integer in [lo, hi].
  int64_t Int(int64_t lo, int64_t hi) {
    return lo + static_cast<int64_t>(engine_() % static_cast<uint64_t>(hi - lo + 1));
  }
  // Standard normal (Box-Muller).
  double Normal() {
    const double u1 = 1.0 - Uniform();  // (0, 1]
    const double u2 = Uniform();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * std::numbers::pi * u2);
  }
  uint64_t Bits() { return engine_(); }

 private:
  std::mt19937_64 engine_;
};

inline std::vector<double> RandomNormal(int64_t n, uint64_t seed, double stddev = 1.0) {
  Rng rng(seed);
  std::vector<double> v(static_cast<size_t>(n));
  for (double& x : v) x = stddev * rng.Normal();
  return v;
}

// The value that storing `x` in `dtype` keeps (round to fp32, then to the dtype).
inline double RoundToDType(DType dtype, double x) {
  const float f = static_cast<float>(x);
  switch (dtype) {
    case DType::kFloat16:
      return HalfBitsToFloat(FloatToHalfBits(f));
    case DType::kBFloat16:
      return BFloat16BitsToFloat(FloatToBFloat16Bits(f));
    case DType::kFloat32:
      return f;
  }
  return NAN;
}

// A dense host tensor of any dtype and layout. The storage is 4-byte aligned.
struct HostTensor {
  std::vector<uint32_t> storage;
  DType dtype = DType::kFloat32;
  Layout layout = Layout::kHND;
  int64_t heads = 0;
  int64_t tokens = 0;
  int64_t head_dim = 0;

  HostTensor() = default;
  HostTensor(DType dt, Layout lay, int64_t h, int64_t t, int64_t d)
      : dtype(dt), layout(lay), heads(h), tokens(t), head_dim(d) {
    const int64_t bytes = h * t * d * DTypeSize(dt);
    storage.assign(static_cast<size_t>((bytes + 3) / 4), 0u);
  }

  int64_t NumBytes() const { return heads * tokens * head_dim * DTypeSize(dtype); }
  void* data() { return storage.empty() ? nullptr : storage.data(); }
  const void* data() const { return storage.empty() ? nullptr : storage.data(); }
  TensorView view() const { return TensorView{data(), dtype, layout, heads, tokens, head_dim}; }
  MutableTensorView mutable_view() {
    return MutableTensorView{data(), dtype, layout, heads, tokens, head_dim};
  }
  // Raw bits of element (head, token, d): 16 bits for fp16/bf16, 32 for fp32.
  uint32_t Bits(int64_t h, int64_t t, int64_t d) const {
    const char* p = static_cast<const char*>(view().Row(h, t)) + d * DTypeSize(dtype);
    if (dtype == DType::kFloat32) {
      uint32_t u;
      std::memcpy(&u, p, 4);
      return u;
    }
    uint16_t u;
    std::memcpy(&u, p, 2);
    return u;
  }
  void SetBits(int64_t h, int64_t t, int64_t d, uint32_t bits) {
    char* p = static_cast<char*>(mutable_view().Row(h, t)) + d * DTypeSize(dtype);
    if (dtype == DType::kFloat32) {
      std::memcpy(p, &bits, 4);
    } else {
      const auto u = static_cast<uint16_t>(bits);
      std::memcpy(p, &u, 2);
    }
  }
  void Set(int64_t h, int64_t t, int64_t d, double x) {
    const float f = static_cast<float>(x);
    switch (dtype) {
      case DType::kFloat16:
        return SetBits(h, t, d, FloatToHalfBits(f));
      case DType::kBFloat16:
        return SetBits(h, t, d, FloatToBFloat16Bits(f));
      case DType::kFloat32:
        return SetBits(h, t, d, FloatToBits(f));
    }
  }
  double Get(int64_t h, int64_t t, int64_t d) const {
    const uint32_t b = Bits(h, t, d);
    switch (dtype) {
      case DType::kFloat16:
        return HalfBitsToFloat(static_cast<uint16_t>(b));
      case DType::kBFloat16:
        return BFloat16BitsToFloat(static_cast<uint16_t>(b));
      case DType::kFloat32:
        return BitsToFloat(b);
    }
    return NAN;
  }
  // Every byte set to `byte` (a sentinel for outputs).
  void Fill(uint8_t byte) {
    if (!storage.empty()) std::memset(storage.data(), byte, storage.size() * 4);
  }
};

// A tensor holding `hnd` ([heads, tokens, head_dim] in HND order), each value
// rounded to the dtype, stored in `layout`.
inline HostTensor MakeTensor(DType dtype, Layout layout, int64_t heads, int64_t tokens,
                             int64_t head_dim, const std::vector<double>& hnd) {
  HostTensor t(dtype, layout, heads, tokens, head_dim);
  size_t n = 0;
  for (int64_t h = 0; h < heads; ++h) {
    for (int64_t k = 0; k < tokens; ++k) {
      for (int64_t d = 0; d < head_dim; ++d) t.Set(h, k, d, hnd[n++]);
    }
  }
  return t;
}

inline HostTensor RandomTensor(DType dtype, Layout layout, int64_t heads, int64_t tokens,
                               int64_t head_dim, uint64_t seed, double stddev = 1.0) {
  return MakeTensor(dtype, layout, heads, tokens, head_dim,
                    RandomNormal(heads * tokens * head_dim, seed, stddev));
}

// All values in HND order.
inline std::vector<double> ReadBack(const HostTensor& t) {
  std::vector<double> out;
  out.reserve(static_cast<size_t>(t.heads * t.tokens * t.head_dim));
  for (int64_t h = 0; h < t.heads; ++h) {
    for (int64_t k = 0; k < t.tokens; ++k) {
      for (int64_t d = 0; d < t.head_dim; ++d) out.push_back(t.Get(h, k, d));
    }
  }
  return out;
}

// Where the visual tokens are.
enum class VisualPattern {
  kNone,         // text only
  kMiddle,       // text, one visual span, text
  kStart,        // a visual span first, then text
  kInterleaved,  // several visual spans between text spans
  kAllVisual,    // every token visual
};

inline std::string VisualPatternTag(VisualPattern p) {
  switch (p) {
    case VisualPattern::kNone:
      return "TextOnly";
    case VisualPattern::kMiddle:
      return "VisualMiddle";
    case VisualPattern::kStart:
      return "VisualStart";
    case VisualPattern::kInterleaved:
      return "Interleaved";
    case VisualPattern::kAllVisual:
      return "AllVisual";
  }
  return "Unknown";
}

struct Span {
  int64_t start;
  int64_t length;
  uint8_t modality;
};

// Modality per token from spans; uncovered tokens are TEXT (0).
inline std::vector<uint8_t> ModalityFromSpans(int64_t tokens, const std::vector<Span>& spans) {
  std::vector<uint8_t> m(static_cast<size_t>(tokens), 0);
  for (const Span& s : spans) {
    for (int64_t t = s.start; t < s.start + s.length && t < tokens; ++t) m[t] = s.modality;
  }
  return m;
}

inline std::vector<uint8_t> MakeModality(VisualPattern pattern, int64_t tokens) {
  switch (pattern) {
    case VisualPattern::kNone:
      return ModalityFromSpans(tokens, {});
    case VisualPattern::kMiddle:
      return ModalityFromSpans(tokens, {{tokens / 4, std::max<int64_t>(1, tokens / 2), 1}});
    case VisualPattern::kStart:
      return ModalityFromSpans(tokens, {{0, std::max<int64_t>(1, (2 * tokens) / 3), 1}});
    case VisualPattern::kInterleaved: {
      std::vector<Span> spans;
      const int64_t period = std::max<int64_t>(2, tokens / 6);
      for (int64_t s = 1; s < tokens; s += period) {
        spans.push_back({s, std::max<int64_t>(1, period / 2), 1});
      }
      return ModalityFromSpans(tokens, spans);
    }
    case VisualPattern::kAllVisual:
      return std::vector<uint8_t>(static_cast<size_t>(tokens), 1);
  }
  return {};
}

// |actual - expected| <= abs_tol + rel_tol * |expected|, NaN never near.
inline ::testing::AssertionResult Near(double actual, double expected, double rel_tol,
                                       double abs_tol) {
  const double err = std::fabs(actual - expected);
  if (err <= abs_tol + rel_tol * std::fabs(expected)) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << "actual " << actual << " vs expected " << expected << " (error " << err
         << ", allowed " << abs_tol + rel_tol * std::fabs(expected) << ")";
}

// Element-wise Near over two vectors; reports the first few mismatches.
inline ::testing::AssertionResult AllNear(const std::vector<double>& actual,
                                          const std::vector<double>& expected, double rel_tol,
                                          double abs_tol) {
  if (actual.size() != expected.size()) {
    return ::testing::AssertionFailure()
           << "size " << actual.size() << " vs expected " << expected.size();
  }
  int64_t bad = 0;
  std::string first;
  for (size_t i = 0; i < actual.size(); ++i) {
    const double err = std::fabs(actual[i] - expected[i]);
    if (!(err <= abs_tol + rel_tol * std::fabs(expected[i]))) {
      if (bad < 5) {
        absl::StrAppend(&first, "\n  [", i, "] actual ", actual[i], " expected ", expected[i],
                        " error ", err);
      }
      ++bad;
    }
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << bad << " of " << actual.size() << " differ:" << first;
}

}  // namespace medakv::test
