// CPU op throughput, each beside the machine's own limit measured in the same
// process: gather against memcpy of the same bytes; the statistics and the
// merge's similarity search against an sgemm of the same shapes from
// OpenBLAS (when the build found it) on the same threads. bench/README.md
// has the table and the command.
//
//   OMP_WAIT_POLICY=passive build/bench/medakv_ops_bench --benchmark_min_time=0.3
#include <benchmark/benchmark.h>

#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "kernels/common/tensor_util.h"
#include "kernels/cpu/dot_tile.h"
#include "kernels/cpu/ops.h"

#if defined(MEDAKV_HAVE_OPENBLAS)
#include <cblas.h>
#endif
#if defined(_OPENMP)
#include <omp.h>
#endif

namespace medakv {
namespace {

constexpr int64_t kHeads = 8, kHeadDim = 128;

struct Layer {
  explicit Layer(int64_t tokens, int64_t q_tokens = 64, int64_t q_heads = 32)
      : tokens(tokens), key(kHeads * tokens * kHeadDim), value(key.size()), query(q_heads * q_tokens * kHeadDim) {
    std::mt19937 rng(1);
    std::normal_distribution<float> n(0.f, 1.f);
    for (auto* v : {&key, &value, &query}) {
      for (Half& x : *v) x = FromFloat<Half>(n(rng));
    }
    positions.resize(q_tokens);
    std::iota(positions.begin(), positions.end(), static_cast<int32_t>(tokens - q_tokens));
    modality.assign(tokens, 0);
    for (int64_t t = tokens / 10; t < tokens * 7 / 10; ++t) modality[t] = 1;
    q = TensorView{query.data(), DType::kFloat16, Layout::kHND, q_heads, q_tokens, kHeadDim};
  }
  TensorView Key() const { return {key.data(), DType::kFloat16, Layout::kHND, kHeads, tokens, kHeadDim}; }
  TensorView Value() const { return {value.data(), DType::kFloat16, Layout::kHND, kHeads, tokens, kHeadDim}; }
  int64_t tokens;
  std::vector<Half> key, value, query;
  std::vector<int32_t> positions;
  std::vector<uint8_t> modality;
  TensorView q;
};

// Kept positions: the recent half and every other older token, per head.
std::vector<int32_t> Kept(int64_t tokens, int64_t budget) {
  std::vector<int32_t> kept;
  for (int64_t h = 0; h < kHeads; ++h) {
    const int64_t recent = budget / 2, old = budget - recent;
    for (int64_t i = 0; i < old; ++i) kept.push_back(static_cast<int32_t>(i * ((tokens - recent) / old)));
    for (int64_t t = tokens - recent; t < tokens; ++t) kept.push_back(static_cast<int32_t>(t));
  }
  return kept;
}

void BM_MemcpyKeptBytes(benchmark::State& state) {
  const int64_t tokens = state.range(0), budget = tokens / 5;
  const size_t bytes = 2 * kHeads * budget * kHeadDim * sizeof(Half);
  std::vector<char> src(bytes * 5), dst(bytes);
  for (auto _ : state) {
    std::memcpy(dst.data(), src.data() + bytes, bytes);
    benchmark::DoNotOptimize(dst.data());
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * bytes));
}

void RunMerge(benchmark::State& state, MergeMode mode) {
  const int64_t tokens = state.range(0), budget = tokens / 5;
  Layer layer(tokens);
  const std::vector<int32_t> kept = Kept(tokens, budget);
  std::vector<Half> ok(kHeads * budget * kHeadDim), ov(ok.size());
  MergeArgs a;
  a.key = layer.Key();
  a.value = layer.Value();
  a.kept = kept.data();
  a.budget = budget;
  a.mode = mode;
  const MutableTensorView k{ok.data(), DType::kFloat16, Layout::kHND, kHeads, budget, kHeadDim};
  const MutableTensorView v{ov.data(), DType::kFloat16, Layout::kHND, kHeads, budget, kHeadDim};
  for (auto _ : state) {
    if (!cpu::MergeAndGather(a, k, v).ok()) state.SkipWithError("merge failed");
    benchmark::DoNotOptimize(ok.data());
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * 2 * ok.size() * sizeof(Half)));
  if (mode != MergeMode::kNone) {
    // The similarity search: every evicted against every kept key, per head.
    const double flops = 2.0 * kHeads * static_cast<double>(tokens - budget) * budget * kHeadDim;
    state.counters["GFLOP/s"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  }
}

void BM_Gather(benchmark::State& state) { RunMerge(state, MergeMode::kNone); }
void BM_MergeAverage(benchmark::State& state) { RunMerge(state, MergeMode::kAverage); }

void RunAttentionStats(benchmark::State& state, bool text_only) {
  const int64_t tokens = state.range(0), q_tokens = state.range(1);
  Layer layer(tokens, q_tokens);
  if (text_only) layer.modality.assign(tokens, 0);
  std::vector<float> scores(kHeads * tokens);
  AttentionStatsArgs a;
  a.query = layer.q;
  a.query_positions = layer.positions.data();
  a.key = layer.Key();
  a.modality = layer.modality.data();
  a.scale = 1.f / std::sqrt(static_cast<float>(kHeadDim));
  AttentionStatsOutput out;
  out.scores = scores.data();
  for (auto _ : state) {
    if (!cpu::AttentionStats(a, &out).ok()) state.SkipWithError("stats failed");
    benchmark::DoNotOptimize(scores.data());
  }
  // One Q.K^T over the visible keys (about T per row for the last rows): the
  // op computes each logit once and makes both softmax passes over it.
  const double flops = 2.0 * static_cast<double>(layer.q.heads * q_tokens * tokens * kHeadDim);
  state.counters["GFLOP/s"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

// A multimodal layer (MEDA's cross-modal entropy on top of the scores), and
// a text-only one (scores and the causal entropy).
void BM_AttentionStats(benchmark::State& state) { RunAttentionStats(state, false); }
void BM_AttentionStatsTextOnly(benchmark::State& state) { RunAttentionStats(state, true); }

void BM_Select(benchmark::State& state) {
  const int64_t tokens = state.range(0), budget = tokens / 5;
  std::vector<float> scores(kHeads * tokens);
  std::mt19937 rng(2);
  std::uniform_real_distribution<float> u(0.f, 1.f);
  for (float& s : scores) s = u(rng);
  std::vector<uint8_t> modality(tokens, 0);
  std::vector<int32_t> kept(kHeads * budget);
  SelectArgs a;
  a.scores = scores.data();
  a.modality = modality.data();
  a.kv_heads = kHeads;
  a.tokens = tokens;
  a.budget = budget;
  for (auto _ : state) {
    if (!cpu::SelectTokens(a, kept.data()).ok()) state.SkipWithError("select failed");
    benchmark::DoNotOptimize(kept.data());
  }
  state.SetItemsProcessed(state.iterations() * kHeads * tokens);
}

// n standard-normal floats from a seed.
std::vector<float> NormalFloats(int64_t n, uint32_t seed) {
  std::vector<float> v(n);
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.f, 1.f);
  for (float& x : v) x = dist(rng);
  return v;
}

// DotTile (the inner loop of both statistics and merge) against one DotF32
// per pair, on a 128 x 256 tile of head_dim 128, one thread.
void RunDotTile(benchmark::State& state, bool tiled) {
  constexpr int64_t m = 128, n = 256, d = kHeadDim;
  const std::vector<float> a = NormalFloats(m * d, 3), b = NormalFloats(n * d, 5);
  std::vector<float> out(m * n);
  for (auto _ : state) {
    if (tiled) {
      cpu::DotTile(a.data(), d, m, b.data(), d, n, d, out.data(), n);
    } else {
      cpu::DotTileScalar(a.data(), d, m, b.data(), d, n, d, out.data(), n);
    }
    benchmark::DoNotOptimize(out.data());
  }
  state.counters["GFLOP/s"] = benchmark::Counter(2.0 * m * n * d * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.SetLabel(tiled && cpu::DotTileUsesAvx() ? "avx" : "scalar");
}
void BM_DotTile(benchmark::State& state) { RunDotTile(state, true); }
void BM_DotTileScalar(benchmark::State& state) { RunDotTile(state, false); }

#if defined(MEDAKV_HAVE_OPENBLAS)
// The limit: OpenBLAS sgemm C[m, n] = A[m, k] B[n, k]^T, `count` times (one
// per kv head), on as many threads as the ops use.
void Sgemm(benchmark::State& state, int64_t count, int64_t m, int64_t n, int64_t k) {
#if defined(_OPENMP)
  openblas_set_num_threads(omp_get_max_threads());
#endif
  const std::vector<float> a = NormalFloats(m * k, 4), b = NormalFloats(n * k, 6);
  std::vector<float> c(m * n);
  for (auto _ : state) {
    for (int64_t i = 0; i < count; ++i) {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(m), static_cast<int>(n),
                  static_cast<int>(k), 1.f, a.data(), static_cast<int>(k), b.data(), static_cast<int>(k), 0.f,
                  c.data(), static_cast<int>(n));
    }
    benchmark::DoNotOptimize(c.data());
  }
  const double flops = 2.0 * static_cast<double>(count) * m * n * k;
  state.counters["GFLOP/s"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

// The statistics' Q K^T per kv head: (4 query heads x rows) x T x 128.
void BM_SgemmStatsShape(benchmark::State& state) {
  Sgemm(state, kHeads, 4 * state.range(1), state.range(0), kHeadDim);
}
// The merge's similarity per head: evicted (4T/5) x kept (T/5) x 128.
void BM_SgemmMergeShape(benchmark::State& state) {
  const int64_t tokens = state.range(0), budget = tokens / 5;
  Sgemm(state, kHeads, tokens - budget, budget, kHeadDim);
}
BENCHMARK(BM_SgemmStatsShape)->Args({1024, 64})->Args({4096, 64})->Args({4096, 128})->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_SgemmMergeShape)->Arg(1024)->Arg(4096)->Arg(16384)->UseRealTime()->Unit(benchmark::kMillisecond);
#endif

BENCHMARK(BM_DotTile)->UseRealTime();
BENCHMARK(BM_DotTileScalar)->UseRealTime();
BENCHMARK(BM_MemcpyKeptBytes)->Arg(1024)->Arg(4096)->Arg(16384)->UseRealTime();
BENCHMARK(BM_Gather)->Arg(1024)->Arg(4096)->Arg(16384)->UseRealTime();
BENCHMARK(BM_MergeAverage)->Arg(1024)->Arg(4096)->Arg(16384)->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_AttentionStats)->Args({1024, 64})->Args({4096, 64})->Args({4096, 128})->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_AttentionStatsTextOnly)->Args({1024, 64})->Args({4096, 64})->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_Select)->Arg(4096)->Arg(32768)->UseRealTime();

}  // namespace
}  // namespace medakv

BENCHMARK_MAIN();
