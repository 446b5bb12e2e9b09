// Many dot products at once: the inner loop of the attention statistics
// (queries against a tile of keys) and of merging (evicted against kept keys).
//
// Every result is bit for bit the shared DotF32 (kernels/ops/attention_math.h)
// of the same two rows: the same eight partial sums, each a rounded product
// added in the same order, combined by the same tree. Only the loop order
// changes: a register-blocked kernel that reads each row once per block of
// rows instead of once per pair, with 256-bit vectors when the CPU has AVX
// (chosen at run time; the build stays portable). No fused multiply-add, on
// purpose: it would round differently from DotF32.
#pragma once

#include <cstdint>

namespace medakv::cpu {

// out[i * ldo + j] = DotF32(a + i * lda, b + j * ldb, d) for i < m, j < n.
void DotTile(const float* a, int64_t lda, int64_t m, const float* b, int64_t ldb, int64_t n, int64_t d,
             float* out, int64_t ldo);

// The same with one DotF32 call per pair: the path without AVX, and the
// reference that DotTile's tests compare with bit for bit.
void DotTileScalar(const float* a, int64_t lda, int64_t m, const float* b, int64_t ldb, int64_t n, int64_t d,
                   float* out, int64_t ldo);

// Whether DotTile takes the AVX path on this CPU (for benchmarks and tests).
bool DotTileUsesAvx();

}  // namespace medakv::cpu
