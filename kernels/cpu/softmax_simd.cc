// ExpPoly and the softmax sums, portable and AVX2, bit-identical (see the header).
#include "kernels/cpu/softmax_simd.h"

#include <cmath>
#include <cstring>

#include "kernels/common/cpu_features.h"
#include "kernels/ops/attention_math.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MEDAKV_SOFTMAX_AVX2 1
#include <immintrin.h>
#endif

namespace medakv::cpu {
namespace {

constexpr float kHi = 88.72283172607421875f;  // the largest x with e^x <= FLT_MAX; above: +inf
constexpr float kLo = -87.33654022216796875f;  // the smallest x with e^x >= FLT_MIN; below: 0
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f;  // ln 2 = kLn2Hi + kLn2Lo, kLn2Hi exact in 9 bits
constexpr float kLn2Lo = -2.12194440e-4f;
constexpr float kP0 = 1.9875691500e-4f, kP1 = 1.3981999507e-3f, kP2 = 8.3334519073e-3f,
                kP3 = 4.1665795894e-2f, kP4 = 1.6666665459e-1f, kP5 = 5.0000001201e-1f;

float FromBits(int32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// The in-range computation; x in [kLo, kHi].
inline float ExpInRange(float x) {
  const float n = std::nearbyint(x * kLog2e);
  const float r = (x - n * kLn2Hi) - n * kLn2Lo;
  float y = kP0;
  y = y * r + kP1;
  y = y * r + kP2;
  y = y * r + kP3;
  y = y * r + kP4;
  y = y * r + kP5;
  y = (y * (r * r) + r) + 1.f;
  // 2^n as 2^n1 * 2^n2 with both halves normal (n is in [-126, 128]).
  const int32_t ni = static_cast<int32_t>(n);
  const int32_t n1 = ni >> 1, n2 = ni - n1;
  return (y * FromBits((n1 + 127) << 23)) * FromBits((n2 + 127) << 23);
}

inline bool Valid(float x) { return x > -INFINITY; }  // false for -inf and NaN

}  // namespace

float ExpPoly(float x) {
  if (x != x) return x;
  if (x > kHi) return INFINITY;
  if (x < kLo) return 0.f;
  return ExpInRange(x);
}

namespace {

// Portable versions: lane j mod 8 of eight partial sums, as the AVX2 path.
float MaxOfScalar(const float* x, int64_t n, KeySubset subset) {
  float m = -INFINITY;
  for (int64_t j = 0; j < n; ++j) {
    if (subset.Has(j) && Valid(x[j]) && x[j] > m) m = x[j];
  }
  return m;
}

void SumExpScalar(const float* x, int64_t n, float m, KeySubset subset, float* sum, float* sum_dx) {
  float s[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f}, sd[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int64_t j = 0; j < n; ++j) {
    if (!subset.Has(j) || !Valid(x[j])) continue;
    const float dx = x[j] - m;
    const float e = ExpPoly(dx);
    s[j & 7] += e;
    sd[j & 7] += e * dx;
  }
  *sum = SumOfEightPartials(s);
  *sum_dx = SumOfEightPartials(sd);
}

void ExpShiftedScalar(const float* x, int64_t n, float shift, float* out) {
  for (int64_t j = 0; j < n; ++j) out[j] = ExpPoly(x[j] - shift);
}

void AddExpShiftedScalar(const float* x, int64_t n, float shift, KeySubset subset, float* acc) {
  for (int64_t j = 0; j < n; ++j) {
    if (subset.Has(j)) acc[j] += ExpPoly(x[j] - shift);
  }
}

#if MEDAKV_SOFTMAX_AVX2
#define MEDAKV_AVX2 __attribute__((target("avx2")))

// ExpPoly of eight lanes: the same operations as ExpPoly, lane by lane.
MEDAKV_AVX2 inline __m256 Exp8(__m256 x) {
  const __m256 hi = _mm256_set1_ps(kHi), lo = _mm256_set1_ps(kLo);
  const __m256 xc = _mm256_min_ps(_mm256_max_ps(x, lo), hi);  // NaN lanes are replaced below
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 r = _mm256_sub_ps(_mm256_sub_ps(xc, _mm256_mul_ps(n, _mm256_set1_ps(kLn2Hi))),
                                 _mm256_mul_ps(n, _mm256_set1_ps(kLn2Lo)));
  __m256 y = _mm256_set1_ps(kP0);
  y = _mm256_add_ps(_mm256_mul_ps(y, r), _mm256_set1_ps(kP1));
  y = _mm256_add_ps(_mm256_mul_ps(y, r), _mm256_set1_ps(kP2));
  y = _mm256_add_ps(_mm256_mul_ps(y, r), _mm256_set1_ps(kP3));
  y = _mm256_add_ps(_mm256_mul_ps(y, r), _mm256_set1_ps(kP4));
  y = _mm256_add_ps(_mm256_mul_ps(y, r), _mm256_set1_ps(kP5));
  y = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(y, _mm256_mul_ps(r, r)), r), _mm256_set1_ps(1.f));
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i n1 = _mm256_srai_epi32(ni, 1), n2 = _mm256_sub_epi32(ni, n1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
  const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
  __m256 res = _mm256_mul_ps(_mm256_mul_ps(y, s1), s2);
  res = _mm256_blendv_ps(res, _mm256_set1_ps(INFINITY), _mm256_cmp_ps(x, hi, _CMP_GT_OQ));
  res = _mm256_blendv_ps(res, _mm256_setzero_ps(), _mm256_cmp_ps(x, lo, _CMP_LT_OQ));
  return _mm256_blendv_ps(res, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}

// Lanes [0, count) set; count in [0, 8].
MEDAKV_AVX2 inline __m256 FirstLanes(int64_t count) {
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(count)), idx));
}

// Lanes whose entry is in the subset (eight modality bytes from j).
MEDAKV_AVX2 inline __m256 SubsetLanes(KeySubset subset, int64_t j, int64_t count) {
  __m256 lanes = FirstLanes(count);
  if (subset.modality == nullptr) return lanes;
  alignas(16) uint8_t bytes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  std::memcpy(bytes, subset.modality + j, static_cast<size_t>(count));
  const __m256i mod = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes)));
  const __m256i same = _mm256_cmpeq_epi32(mod, _mm256_set1_epi32(subset.other_than));
  return _mm256_andnot_ps(_mm256_castsi256_ps(same), lanes);
}

MEDAKV_AVX2 inline __m256 Load(const float* x, int64_t count) {
  if (count == 8) return _mm256_loadu_ps(x);
  return _mm256_maskload_ps(x, _mm256_castps_si256(FirstLanes(count)));
}

MEDAKV_AVX2 float MaxOfAvx2(const float* x, int64_t n, KeySubset subset) {
  __m256 m = _mm256_set1_ps(-INFINITY);
  for (int64_t j = 0; j < n; j += 8) {
    const int64_t count = n - j < 8 ? n - j : 8;
    const __m256 v = Load(x + j, count);
    // Lanes in the subset with v > -inf (false for NaN): max; others keep m.
    const __m256 take = _mm256_and_ps(SubsetLanes(subset, j, count), _mm256_cmp_ps(v, m, _CMP_GT_OQ));
    m = _mm256_blendv_ps(m, v, take);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, m);
  float best = -INFINITY;
  for (float v : lanes) best = v > best ? v : best;
  return best;
}

MEDAKV_AVX2 void SumExpAvx2(const float* x, int64_t n, float m, KeySubset subset, float* sum, float* sum_dx) {
  __m256 s = _mm256_setzero_ps(), sd = _mm256_setzero_ps();
  const __m256 mv = _mm256_set1_ps(m), neg_inf = _mm256_set1_ps(-INFINITY);
  for (int64_t j = 0; j < n; j += 8) {
    const int64_t count = n - j < 8 ? n - j : 8;
    const __m256 v = Load(x + j, count);
    const __m256 use = _mm256_and_ps(SubsetLanes(subset, j, count), _mm256_cmp_ps(v, neg_inf, _CMP_GT_OQ));
    const __m256 dx = _mm256_sub_ps(v, mv);
    const __m256 e = Exp8(dx);
    // Unused lanes keep their sums exactly (a blend, not an added zero).
    s = _mm256_blendv_ps(s, _mm256_add_ps(s, e), use);
    sd = _mm256_blendv_ps(sd, _mm256_add_ps(sd, _mm256_mul_ps(e, dx)), use);
  }
  alignas(32) float a[8], b[8];
  _mm256_store_ps(a, s);
  _mm256_store_ps(b, sd);
  *sum = SumOfEightPartials(a);
  *sum_dx = SumOfEightPartials(b);
}

MEDAKV_AVX2 void ExpShiftedAvx2(const float* x, int64_t n, float shift, float* out) {
  const __m256 sv = _mm256_set1_ps(shift);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) _mm256_storeu_ps(out + j, Exp8(_mm256_sub_ps(_mm256_loadu_ps(x + j), sv)));
  for (; j < n; ++j) out[j] = ExpPoly(x[j] - shift);
}

MEDAKV_AVX2 void AddExpShiftedAvx2(const float* x, int64_t n, float shift, KeySubset subset, float* acc) {
  const __m256 sv = _mm256_set1_ps(shift);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 a = _mm256_loadu_ps(acc + j);
    const __m256 sum = _mm256_add_ps(a, Exp8(_mm256_sub_ps(_mm256_loadu_ps(x + j), sv)));
    _mm256_storeu_ps(acc + j, _mm256_blendv_ps(a, sum, SubsetLanes(subset, j, 8)));
  }
  for (; j < n; ++j) {
    if (subset.Has(j)) acc[j] += ExpPoly(x[j] - shift);
  }
}
#endif

}  // namespace

bool SoftmaxUsesAvx2() {
#if MEDAKV_SOFTMAX_AVX2
  return CpuHasAvx2();
#else
  return false;
#endif
}

float MaxOf(const float* x, int64_t n, KeySubset subset) {
#if MEDAKV_SOFTMAX_AVX2
  if (CpuHasAvx2()) return MaxOfAvx2(x, n, subset);
#endif
  return MaxOfScalar(x, n, subset);
}

void SumExp(const float* x, int64_t n, float m, KeySubset subset, float* sum, float* sum_dx) {
#if MEDAKV_SOFTMAX_AVX2
  if (CpuHasAvx2()) return SumExpAvx2(x, n, m, subset, sum, sum_dx);
#endif
  SumExpScalar(x, n, m, subset, sum, sum_dx);
}

void ExpShifted(const float* x, int64_t n, float shift, float* out) {
#if MEDAKV_SOFTMAX_AVX2
  if (CpuHasAvx2()) return ExpShiftedAvx2(x, n, shift, out);
#endif
  ExpShiftedScalar(x, n, shift, out);
}

void AddExpShifted(const float* x, int64_t n, float shift, KeySubset subset, float* acc) {
#if MEDAKV_SOFTMAX_AVX2
  if (CpuHasAvx2()) return AddExpShiftedAvx2(x, n, shift, subset, acc);
#endif
  AddExpShiftedScalar(x, n, shift, subset, acc);
}

}  // namespace medakv::cpu
