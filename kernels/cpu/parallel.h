// Parallel loops of the CPU backend (OpenMP when built with it, serial
// otherwise). Work is split so that results never depend on the thread
// count: each index writes only its own outputs.
#pragma once

#include <cstdint>

namespace medakv::cpu {

// Calls f(i) for i in [0, n), in parallel, with dynamic scheduling.
template <typename F>
void ParallelFor(int64_t n, F&& f) {
#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic, 1) if (n > 1)
  for (int64_t i = 0; i < n; ++i) f(i);
#else
  for (int64_t i = 0; i < n; ++i) f(i);
#endif
}

}  // namespace medakv::cpu
