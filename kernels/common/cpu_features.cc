#include "kernels/common/cpu_features.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#include <cstdint>
#endif

namespace medakv {

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
namespace {

struct Features {
  bool avx = false;
  bool f16c = false;
  bool avx2 = false;
};

// CPUID leaf 1, and XGETBV for whether the OS saves the YMM registers.
Features Detect() {
  Features f;
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (__get_cpuid(1, &eax, &ebx, &ecx, &edx) == 0) return f;
  const bool osxsave = (ecx & bit_OSXSAVE) != 0;
  if (!osxsave || (ecx & bit_AVX) == 0) return f;
  uint32_t xcr0_lo = 0, xcr0_hi = 0;
  __asm__("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  if ((xcr0_lo & 0x6u) != 0x6u) return f;  // XMM and YMM state
  f.avx = true;
  f.f16c = (ecx & bit_F16C) != 0;
  unsigned eax7 = 0, ebx7 = 0, ecx7 = 0, edx7 = 0;
  if (__get_cpuid_count(7, 0, &eax7, &ebx7, &ecx7, &edx7) != 0) f.avx2 = (ebx7 & bit_AVX2) != 0;
  return f;
}

const Features& Get() {
  static const Features features = Detect();
  return features;
}

}  // namespace

bool CpuHasAvx() { return Get().avx; }
bool CpuHasF16c() { return Get().f16c; }
bool CpuHasAvx2() { return Get().avx2; }
#else
bool CpuHasAvx() { return false; }
bool CpuHasF16c() { return false; }
bool CpuHasAvx2() { return false; }
#endif

}  // namespace medakv
