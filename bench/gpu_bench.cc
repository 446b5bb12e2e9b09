// GPU benchmark of the CUDA backend's device ops: effective
// bandwidth of each op (bytes read + written / time) against the device's own
// copy bandwidth measured in the same run (cudaMemcpyAsync device to
// device of the same bytes), the statistics kernel's FLOP/s, and the
// host <-> device staging bandwidth. Prints a Markdown table.
//
//   build/bench/medakv_gpu_bench [--tokens 32768] [--kv_heads 8] [--group 4]
//       [--head_dim 128] [--rows 64] [--rho 0.2] [--dtype float16] [--reps 10]
//
// Without a CUDA device it says so and exits 0 (CI builds and smoke-runs it).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/status/status.h"
#include "kernels/common/status.h"
#include "kernels/common/tensor_util.h"
#include "kernels/cuda/device.h"
#include "kernels/cuda/ops.h"
#include "kernels/cuda/runtime.h"

ABSL_FLAG(int64_t, tokens, 32768, "Context length T");
ABSL_FLAG(int64_t, kv_heads, 8, "KV heads");
ABSL_FLAG(int64_t, group, 4, "Query heads per KV head");
ABSL_FLAG(int64_t, head_dim, 128, "head_dim");
ABSL_FLAG(int64_t, rows, 64, "Query rows for the statistics");
ABSL_FLAG(double, rho, 0.2, "Kept fraction");
ABSL_FLAG(std::string, dtype, "float16", "float16 | bfloat16 | float32");
ABSL_FLAG(int, reps, 10, "Timed repetitions (median reported)");

namespace medakv {
namespace {

using cuda::DeviceBuffer;
using cuda::Stream;

double MedianSeconds(int reps, const std::function<absl::Status()>& f, absl::Status* error) {
  std::vector<double> t;
  for (int r = 0; r <= reps; ++r) {  // the first run warms up (pool, caches)
    const auto t0 = std::chrono::steady_clock::now();
    absl::Status s = f();
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (!s.ok()) {
      *error = s;
      return NAN;
    }
    if (r > 0) t.push_back(dt);
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

absl::Status Run() {
  const int64_t T = absl::GetFlag(FLAGS_tokens), kv = absl::GetFlag(FLAGS_kv_heads);
  const int64_t group = absl::GetFlag(FLAGS_group), D = absl::GetFlag(FLAGS_head_dim);
  const int64_t rows = std::min(absl::GetFlag(FLAGS_rows), T);
  const int reps = absl::GetFlag(FLAGS_reps);
  MEDAKV_ASSIGN_OR_RETURN(DType dtype, ParseDType(absl::GetFlag(FLAGS_dtype)));
  const int64_t budget = std::max<int64_t>(1, static_cast<int64_t>(std::llround(absl::GetFlag(FLAGS_rho) * T)));
  const int64_t es = DTypeSize(dtype);
  const int64_t kv_bytes = kv * T * D * es, q_bytes = kv * group * rows * D * es;

  MEDAKV_ASSIGN_OR_RETURN(std::unique_ptr<Stream> stream, Stream::Create());
  Stream& s = *stream;
  // Host data: random keys, values and queries of the dtype.
  std::mt19937 rng(1);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<uint8_t> host_k(kv_bytes), host_v(kv_bytes), host_q(q_bytes);
  for (auto* buf : {&host_k, &host_v, &host_q}) {
    std::vector<float> f(buf->size() / es);
    for (float& x : f) x = normal(rng);
    RowFromFloat(dtype, f.data(), buf->data(), static_cast<int64_t>(f.size()));
  }
  std::vector<int32_t> pos(rows);
  std::iota(pos.begin(), pos.end(), static_cast<int32_t>(T - rows));
  std::vector<uint8_t> mod(T, 0);
  for (int64_t t = T / 4; t < T / 2; ++t) mod[t] = 1;  // a visual span

  MEDAKV_ASSIGN_OR_RETURN(DeviceBuffer k, DeviceBuffer::Allocate(kv_bytes, s));
  MEDAKV_ASSIGN_OR_RETURN(DeviceBuffer v, DeviceBuffer::Allocate(kv_bytes, s));
  MEDAKV_ASSIGN_OR_RETURN(DeviceBuffer q, DeviceBuffer::Allocate(q_bytes, s));
  MEDAKV_ASSIGN_OR_RETURN(DeviceBuffer copy, DeviceBuffer::Allocate(kv_bytes, s));
  MEDAKV_ASSIGN_OR_RETURN(DeviceBuffer p, DeviceBuffer::Allocate(sizeof(int32_t) * rows, s));
  MEDAKV_ASSIGN_OR_RETURN(DeviceBuffer m, DeviceBuffer::Allocate(T, s));
  MEDAKV_ASSIGN_OR_RETURN(DeviceBuffer scores, DeviceBuffer::Allocate(sizeof(float) * kv * T, s));
  MEDAKV_ASSIGN_OR_RETURN(DeviceBuffer kept, DeviceBuffer::Allocate(sizeof(int32_t) * kv * budget, s));
  MEDAKV_ASSIGN_OR_RETURN(DeviceBuffer ok, DeviceBuffer::Allocate(kv * budget * D * es, s));
  MEDAKV_ASSIGN_OR_RETURN(DeviceBuffer ov, DeviceBuffer::Allocate(kv * budget * D * es, s));
  absl::Status err;
  const double upload = MedianSeconds(reps, [&] { return s.Upload(k.data(), host_k.data(), kv_bytes); }, &err);
  MEDAKV_RETURN_IF_ERROR(err);
  MEDAKV_RETURN_IF_ERROR(s.Upload(v.data(), host_v.data(), kv_bytes));
  MEDAKV_RETURN_IF_ERROR(s.Upload(q.data(), host_q.data(), q_bytes));
  MEDAKV_RETURN_IF_ERROR(s.Upload(p.data(), pos.data(), sizeof(int32_t) * rows));
  MEDAKV_RETURN_IF_ERROR(s.Upload(m.data(), mod.data(), T));
  const double download = MedianSeconds(reps, [&] { return s.Download(host_v.data(), v.data(), kv_bytes); }, &err);
  MEDAKV_RETURN_IF_ERROR(err);
  const double d2d = MedianSeconds(reps, [&] {
    MEDAKV_RETURN_IF_ERROR(s.CopyOnDevice(copy.data(), k.data(), kv_bytes));
    return s.Synchronize();
  }, &err);
  MEDAKV_RETURN_IF_ERROR(err);
  const double copy_bw = 2.0 * kv_bytes / d2d;  // read + write

  const TensorView key{k.data(), dtype, Layout::kHND, kv, T, D};
  const TensorView value{v.data(), dtype, Layout::kHND, kv, T, D};
  const TensorView query{q.data(), dtype, Layout::kHND, kv * group, rows, D};
  AttentionStatsArgs sa;
  sa.query = query;
  sa.key = key;
  sa.query_positions = p.as<int32_t>();
  sa.modality = m.as<uint8_t>();
  sa.scale = 1.f / std::sqrt(static_cast<float>(D));
  AttentionStatsOutput so;
  so.scores = scores.as<float>();
  const double stats = MedianSeconds(reps, [&] { return cuda::AttentionStats(sa, &so, s); }, &err);
  MEDAKV_RETURN_IF_ERROR(err);
  SelectArgs sel;
  sel.scores = scores.as<float>();
  sel.modality = m.as<uint8_t>();
  sel.kv_heads = kv;
  sel.tokens = T;
  sel.budget = budget;
  const double select = MedianSeconds(reps, [&] { return cuda::SelectTokens(sel, kept.as<int32_t>(), s); }, &err);
  MEDAKV_RETURN_IF_ERROR(err);
  MergeArgs ma;
  ma.key = key;
  ma.value = value;
  ma.kept = kept.as<int32_t>();
  ma.budget = budget;
  const MutableTensorView out_k{ok.data(), dtype, Layout::kHND, kv, budget, D};
  const MutableTensorView out_v{ov.data(), dtype, Layout::kHND, kv, budget, D};
  ma.mode = MergeMode::kNone;
  const double gather = MedianSeconds(reps, [&] { return cuda::MergeAndGather(ma, out_k, out_v, s); }, &err);
  MEDAKV_RETURN_IF_ERROR(err);
  ma.mode = MergeMode::kAverage;
  const double merge = MedianSeconds(reps, [&] { return cuda::MergeAndGather(ma, out_k, out_v, s); }, &err);
  MEDAKV_RETURN_IF_ERROR(err);

  // Bytes each op must move at least, and the statistics' multiply-adds:
  // pass 1 and the scores pass each compute every causal logit once (the
  // MEAN_ATTENTION pass a third time).
  const double out_bytes = 2.0 * kv * budget * D * es;
  const double stats_bytes = kv_bytes + q_bytes + 4.0 * kv * T;
  const double logits = static_cast<double>(kv * group) * rows * (T - rows / 2.0);
  const double stats_flops = 3.0 * 2.0 * D * logits;
  const double select_bytes = 4.0 * kv * T + T + 4.0 * kv * budget;
  const double gather_bytes = 2.0 * out_bytes;
  const double merge_bytes = 2.0 * kv_bytes + out_bytes;
  const double merge_flops = 2.0 * D * static_cast<double>(kv) * budget * (T - budget);

  std::printf("CUDA device ops, T=%lld kv_heads=%lld group=%lld head_dim=%lld rows=%lld budget=%lld dtype=%s\n\n",
              static_cast<long long>(T), static_cast<long long>(kv), static_cast<long long>(group),
              static_cast<long long>(D), static_cast<long long>(rows), static_cast<long long>(budget),
              DTypeName(dtype));
  std::printf("| op | time (ms) | bytes moved (MB) | GB/s | of D2D copy | GFLOP/s |\n|---|---|---|---|---|---|\n");
  auto row = [&](const char* name, double sec, double bytes, double flops) {
    std::printf("| %s | %.3f | %.1f | %.1f | %.2f | %s |\n", name, sec * 1e3, bytes / 1e6, bytes / sec / 1e9,
                bytes / sec / copy_bw, flops > 0 ? std::to_string(static_cast<int64_t>(flops / sec / 1e9)).c_str() : "");
  };
  row("D2D copy (limit)", d2d, 2.0 * kv_bytes, 0);
  row("upload H2D (staged)", upload, kv_bytes, 0);
  row("download D2H (staged)", download, kv_bytes, 0);
  row("attention stats", stats, stats_bytes, stats_flops);
  row("select", select, select_bytes, 0);
  row("gather (merge none)", gather, gather_bytes, 0);
  row("merge average", merge, merge_bytes, merge_flops);
  return absl::OkStatus();
}

}  // namespace
}  // namespace medakv

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  if (medakv::cuda::DeviceCount() == 0) {
    std::printf("medakv_gpu_bench: no CUDA device (%s); nothing to measure\n",
                medakv::cuda::Compiled() ? "none visible" : "built without CUDA");
    return 0;
  }
  const absl::Status s = medakv::Run();
  if (!s.ok()) {
    std::fprintf(stderr, "medakv_gpu_bench: %s\n", std::string(s.message()).c_str());
    return 1;
  }
  return 0;
}
