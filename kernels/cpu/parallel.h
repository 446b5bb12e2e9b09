// Parallel loops of the CPU backend (OpenMP when built with it, serial
// otherwise). Work is split so that results never depend on the thread
// count: each index writes only its own outputs.
#pragma once

#include <cstdint>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace medakv::cpu {

// Threads a ParallelFor may use, and the calling thread's index among them
// (for per-thread scratch buffers).
inline int MaxThreads() {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}
inline int ThreadIndex() {
#if defined(_OPENMP)
  return omp_get_thread_num();
#else
  return 0;
#endif
}

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

// Calls body(i) for i in [0, n) in parallel, and after each, on the same
// thread, in_order(i) in ascending i: in_order(i) starts only once
// in_order(i - 1) has returned (OpenMP's ordered construct). For reductions
// whose order must not depend on the threads.
template <typename Body, typename InOrder>
void ParallelForOrdered(int64_t n, Body&& body, InOrder&& in_order) {
#if defined(_OPENMP)
#pragma omp parallel for ordered schedule(dynamic, 1) if (n > 1)
  for (int64_t i = 0; i < n; ++i) {
    body(i);
#pragma omp ordered
    in_order(i);
  }
#else
  for (int64_t i = 0; i < n; ++i) {
    body(i);
    in_order(i);
  }
#endif
}

}  // namespace medakv::cpu
