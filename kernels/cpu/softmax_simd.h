// The exponentials of the CPU statistics' softmax, eight at a time.
//
// ExpPoly is e^x from a fixed polynomial (Cody-Waite range reduction and
// Cephes' degree-6 polynomial for e^r, no fused multiply-add), within 2 ulp
// of the exact value (0.94 measured) wherever e^x is a normal float; 0 below
// that range (no subnormals), +inf above it, NaN for NaN.
// The AVX2 path (chosen at run time) and the portable path compute the same
// operations in the same order, and the sums below keep eight partial sums
// combined by a fixed tree: the results are the same bits on every x86-64
// CPU, with or without AVX2, and at any thread count.
#pragma once

#include <cstdint>

namespace medakv::cpu {

float ExpPoly(float x);

// Which entries of a row take part: all, or those whose modality differs
// from `other_than` (the cross-modal keys of a query of that modality).
struct KeySubset {
  const uint8_t* modality = nullptr;  // nullptr: every entry
  uint8_t other_than = 0;
  bool Has(int64_t j) const { return modality == nullptr || modality[j] != other_than; }
};

// The largest x[j] > -inf over the subset, or -inf when there is none.
float MaxOf(const float* x, int64_t n, KeySubset subset);

// Over the subset, with e_j = ExpPoly(x[j] - m) (entries that are -inf or NaN
// count 0): *sum = sum e_j, *sum_dx = sum e_j (x[j] - m).
void SumExp(const float* x, int64_t n, float m, KeySubset subset, float* sum, float* sum_dx);

// out[j] = ExpPoly(x[j] - shift), j < n (x and out may be the same array).
void ExpShifted(const float* x, int64_t n, float shift, float* out);

// acc[j] += ExpPoly(x[j] - shift) for j < n in the subset.
void AddExpShifted(const float* x, int64_t n, float shift, KeySubset subset, float* acc);

// Whether the functions above take the AVX2 path on this CPU.
bool SoftmaxUsesAvx2();

}  // namespace medakv::cpu
