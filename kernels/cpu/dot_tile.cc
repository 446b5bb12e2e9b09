// DotTile: register-blocked dot products, bit-identical to DotF32.
//
// DotF32 keeps eight partial sums acc[u] (u = element index mod 8), adds
// each rounded product a[k] * b[k] to acc[k mod 8] in ascending k, and
// returns ((acc0 + acc4) + (acc1 + acc5)) + ((acc2 + acc6) + (acc3 + acc7)).
// One 256-bit register holds the eight partial sums of one pair, so a vector
// multiply then a vector add is exactly eight of DotF32's steps; the tail
// (d not a multiple of 8) updates only its lanes, and the final tree is the
// same. The kernel computes a block of kRows x kCols pairs per pass over d.
#include "kernels/cpu/dot_tile.h"

#include <algorithm>

#include "kernels/common/cpu_features.h"
#include "kernels/ops/attention_math.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MEDAKV_DOT_TILE_AVX 1
#include <immintrin.h>
#endif

namespace medakv::cpu {

void DotTileScalar(const float* a, int64_t lda, int64_t m, const float* b, int64_t ldb, int64_t n, int64_t d,
                   float* out, int64_t ldo) {
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) out[i * ldo + j] = DotF32(a + i * lda, b + j * ldb, d);
  }
}

#if MEDAKV_DOT_TILE_AVX
namespace {

// AVX only, not FMA: see the header.
#define MEDAKV_AVX __attribute__((target("avx")))

// ((s0 + s1) + (s2 + s3)) with s = lanes 0-3 + lanes 4-7: DotF32's final tree.
MEDAKV_AVX inline float Combine(__m256 acc) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  const __m128 p = _mm_add_ps(s, _mm_movehdup_ps(s));  // p0 = s0 + s1, p2 = s2 + s3
  return _mm_cvtss_f32(_mm_add_ss(p, _mm_movehl_ps(p, p)));
}

// kRows x kCols pairs: rows a[0..kRows) against rows b[0..kCols).
template <int kRows, int kCols>
MEDAKV_AVX inline void Block(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t d, float* out,
                             int64_t ldo) {
  __m256 acc[kRows][kCols];
  for (int r = 0; r < kRows; ++r) {
    for (int c = 0; c < kCols; ++c) acc[r][c] = _mm256_setzero_ps();
  }
  int64_t k = 0;
  for (; k + 8 <= d; k += 8) {
    __m256 av[kRows];
    for (int r = 0; r < kRows; ++r) av[r] = _mm256_loadu_ps(a + r * lda + k);
    for (int c = 0; c < kCols; ++c) {
      const __m256 bv = _mm256_loadu_ps(b + c * ldb + k);
      for (int r = 0; r < kRows; ++r) acc[r][c] = _mm256_add_ps(acc[r][c], _mm256_mul_ps(av[r], bv));
    }
  }
  if (k < d) {  // lanes [0, d - k) take the tail, the others keep their sums (even a -0)
    alignas(32) int32_t lanes[8];
    for (int u = 0; u < 8; ++u) lanes[u] = u < d - k ? -1 : 0;
    const __m256i mask = _mm256_load_si256(reinterpret_cast<const __m256i*>(lanes));
    const __m256 maskf = _mm256_castsi256_ps(mask);
    __m256 av[kRows];
    for (int r = 0; r < kRows; ++r) av[r] = _mm256_maskload_ps(a + r * lda + k, mask);
    for (int c = 0; c < kCols; ++c) {
      const __m256 bv = _mm256_maskload_ps(b + c * ldb + k, mask);
      for (int r = 0; r < kRows; ++r) {
        acc[r][c] = _mm256_blendv_ps(acc[r][c], _mm256_add_ps(acc[r][c], _mm256_mul_ps(av[r], bv)), maskf);
      }
    }
  }
  for (int r = 0; r < kRows; ++r) {
    for (int c = 0; c < kCols; ++c) out[r * ldo + c] = Combine(acc[r][c]);
  }
}

constexpr int kRows = 2;  // 2 x 4 = 8 accumulators, 6 loads per 8 multiplies and adds
constexpr int kCols = 4;

MEDAKV_AVX void DotTileAvx(const float* a, int64_t lda, int64_t m, const float* b, int64_t ldb, int64_t n,
                           int64_t d, float* out, int64_t ldo) {
  const int64_t n_full = n - n % kCols;
  int64_t i = 0;
  for (; i + kRows <= m; i += kRows) {
    const float* ai = a + i * lda;
    float* oi = out + i * ldo;
    int64_t j = 0;
    for (; j < n_full; j += kCols) Block<kRows, kCols>(ai, lda, b + j * ldb, ldb, d, oi + j, ldo);
    for (; j < n; ++j) Block<kRows, 1>(ai, lda, b + j * ldb, ldb, d, oi + j, ldo);
  }
  for (; i < m; ++i) {
    const float* ai = a + i * lda;
    float* oi = out + i * ldo;
    int64_t j = 0;
    for (; j < n_full; j += kCols) Block<1, kCols>(ai, lda, b + j * ldb, ldb, d, oi + j, ldo);
    for (; j < n; ++j) Block<1, 1>(ai, lda, b + j * ldb, ldb, d, oi + j, ldo);
  }
}

}  // namespace

bool DotTileUsesAvx() { return CpuHasAvx(); }

void DotTile(const float* a, int64_t lda, int64_t m, const float* b, int64_t ldb, int64_t n, int64_t d,
             float* out, int64_t ldo) {
  if (CpuHasAvx()) {
    DotTileAvx(a, lda, m, b, ldb, n, d, out, ldo);
  } else {
    DotTileScalar(a, lda, m, b, ldb, n, d, out, ldo);
  }
}

#else  // not x86-64 with GCC or Clang

bool DotTileUsesAvx() { return false; }

void DotTile(const float* a, int64_t lda, int64_t m, const float* b, int64_t ldb, int64_t n, int64_t d,
             float* out, int64_t ldo) {
  DotTileScalar(a, lda, m, b, ldb, n, d, out, ldo);
}

#endif

}  // namespace medakv::cpu
