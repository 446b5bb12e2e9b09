// The CUDA backend behind the Backend interface (host pointers in and out):
// every op validates its arguments on the host with the CPU backend's checks
// (contents included), uploads through pinned staging, runs the device op
// (kernels/cuda/ops.h) and downloads the result. Calls may come from many
// threads at once: each takes its own stream (with its staging buffers) from
// a pool, so concurrent requests overlap on the device.
#include <memory>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/backend.h"
#include "kernels/common/status.h"
#include "kernels/cuda/ops.h"
#include "kernels/cuda/runtime.h"
#include "kernels/cuda/stream_pool.h"
#include "kernels/ops/validate.h"

namespace medakv {
namespace {

using cuda::DeviceBuffer;
using cuda::Stream;
using cuda::StreamPool;

// A device copy of a host array.
absl::StatusOr<DeviceBuffer> UploadArray(const void* host, size_t bytes, Stream& s) {
  MEDAKV_ASSIGN_OR_RETURN(DeviceBuffer b, DeviceBuffer::Allocate(bytes, s));
  if (bytes > 0) MEDAKV_RETURN_IF_ERROR(s.Upload(b.data(), host, bytes));
  return b;
}

absl::StatusOr<DeviceBuffer> UploadView(const TensorView& v, Stream& s, TensorView* device_view) {
  MEDAKV_ASSIGN_OR_RETURN(DeviceBuffer b, UploadArray(v.data, static_cast<size_t>(v.NumBytes()), s));
  *device_view = v;
  device_view->data = b.data();
  return b;
}

class CudaBackend final : public Backend {
 public:
  std::string_view Name() const override { return "cuda"; }
  // Two layers in flight: the next one's upload overlaps the current one's kernels.
  int ConcurrentLayers() const override { return 2; }

  absl::Status AttentionStats(const AttentionStatsArgs& a, AttentionStatsOutput* out) const override {
    MEDAKV_RETURN_IF_ERROR(ValidateAttentionStats(a, out));
    if (IsSet(a.cancelled)) return absl::CancelledError("attention statistics cancelled");
    if (!cuda::SupportedHeadDim(a.key.head_dim)) {
      return absl::InvalidArgumentError(absl::StrCat("attention stats: head_dim ", a.key.head_dim,
                                                     " has no CUDA kernel (supported: ", cuda::kSupportedHeadDims,
                                                     "); run with --backend=cpu"));
    }
    MEDAKV_ASSIGN_OR_RETURN(StreamPool::Lease lease, pool_.Acquire());
    Stream& s = *lease;
    AttentionStatsArgs d = a;
    MEDAKV_ASSIGN_OR_RETURN(DeviceBuffer q, UploadView(a.query, s, &d.query));
    MEDAKV_ASSIGN_OR_RETURN(DeviceBuffer k, UploadView(a.key, s, &d.key));
    MEDAKV_ASSIGN_OR_RETURN(DeviceBuffer pos,
                            UploadArray(a.query_positions, sizeof(int32_t) * a.query.tokens, s));
    MEDAKV_ASSIGN_OR_RETURN(DeviceBuffer mod, UploadArray(a.modality, a.key.tokens, s));
    DeviceBuffer outside;
    if (a.outside_lse != nullptr) {
      MEDAKV_ASSIGN_OR_RETURN(outside,
                              UploadArray(a.outside_lse, sizeof(float) * a.query.heads * a.query.tokens, s));
      d.outside_lse = outside.as<float>();
    }
    const size_t score_bytes = sizeof(float) * a.key.heads * a.key.tokens;
    MEDAKV_ASSIGN_OR_RETURN(DeviceBuffer scores, DeviceBuffer::Allocate(score_bytes, s));
    d.query_positions = pos.as<int32_t>();
    d.modality = mod.as<uint8_t>();
    AttentionStatsOutput dout;
    dout.scores = scores.as<float>();
    MEDAKV_RETURN_IF_ERROR(cuda::AttentionStats(d, &dout, s));
    MEDAKV_RETURN_IF_ERROR(s.Download(out->scores, scores.data(), score_bytes));
    out->entropy = dout.entropy;
    out->entropy_tv = dout.entropy_tv;
    out->entropy_vt = dout.entropy_vt;
    out->causal = dout.causal;
    return absl::OkStatus();
  }

  absl::Status ReduceScores(const float* scores, int64_t score_heads, int64_t kv_heads, int64_t tokens,
                            float* out) const override {
    MEDAKV_RETURN_IF_ERROR(ValidateReduceScores(scores, score_heads, kv_heads, tokens, out));
    MEDAKV_ASSIGN_OR_RETURN(StreamPool::Lease lease, pool_.Acquire());
    Stream& s = *lease;
    MEDAKV_ASSIGN_OR_RETURN(DeviceBuffer in, UploadArray(scores, sizeof(float) * score_heads * tokens, s));
    MEDAKV_ASSIGN_OR_RETURN(DeviceBuffer res, DeviceBuffer::Allocate(sizeof(float) * kv_heads * tokens, s));
    MEDAKV_RETURN_IF_ERROR(cuda::ReduceScores(in.as<float>(), score_heads, kv_heads, tokens, res.as<float>(), s));
    return s.Download(out, res.data(), res.size());
  }

  absl::Status PoolScores(const float* in, int64_t heads, int64_t tokens, int64_t length, int64_t kernel,
                          float* out) const override {
    MEDAKV_RETURN_IF_ERROR(ValidatePoolScores(in, heads, tokens, length, kernel, out));
    MEDAKV_ASSIGN_OR_RETURN(StreamPool::Lease lease, pool_.Acquire());
    Stream& s = *lease;
    MEDAKV_ASSIGN_OR_RETURN(DeviceBuffer din, UploadArray(in, sizeof(float) * heads * tokens, s));
    MEDAKV_ASSIGN_OR_RETURN(DeviceBuffer res, DeviceBuffer::Allocate(din.size(), s));
    MEDAKV_RETURN_IF_ERROR(cuda::PoolScores(din.as<float>(), heads, tokens, length, kernel, res.as<float>(), s));
    return s.Download(out, res.data(), res.size());
  }

  absl::Status SelectTokens(const SelectArgs& a, int32_t* kept) const override {
    MEDAKV_RETURN_IF_ERROR(ValidateSelect(a, kept));
    MEDAKV_ASSIGN_OR_RETURN(StreamPool::Lease lease, pool_.Acquire());
    Stream& s = *lease;
    SelectArgs d = a;
    MEDAKV_ASSIGN_OR_RETURN(DeviceBuffer scores, UploadArray(a.scores, sizeof(float) * a.kv_heads * a.tokens, s));
    MEDAKV_ASSIGN_OR_RETURN(DeviceBuffer mod, UploadArray(a.modality, a.tokens, s));
    MEDAKV_ASSIGN_OR_RETURN(DeviceBuffer res, DeviceBuffer::Allocate(sizeof(int32_t) * a.kv_heads * a.budget, s));
    d.scores = scores.as<float>();
    d.modality = mod.as<uint8_t>();
    MEDAKV_RETURN_IF_ERROR(cuda::SelectTokens(d, res.as<int32_t>(), s));
    return s.Download(kept, res.data(), res.size());
  }

  absl::Status MergeAndGather(const MergeArgs& a, MutableTensorView out_key,
                              MutableTensorView out_value) const override {
    MEDAKV_RETURN_IF_ERROR(ValidateMerge(a, out_key, out_value));
    if (IsSet(a.cancelled)) return absl::CancelledError("merge cancelled");
    const bool merging = a.mode != MergeMode::kNone && a.budget < a.key.tokens;
    if (merging && !cuda::SupportedHeadDim(a.key.head_dim)) {
      return absl::InvalidArgumentError(absl::StrCat("merge: head_dim ", a.key.head_dim,
                                                     " has no CUDA kernel (supported: ", cuda::kSupportedHeadDims,
                                                     "); run with --backend=cpu or merge=none"));
    }
    MEDAKV_ASSIGN_OR_RETURN(StreamPool::Lease lease, pool_.Acquire());
    Stream& s = *lease;
    MergeArgs d = a;
    MEDAKV_ASSIGN_OR_RETURN(DeviceBuffer k, UploadView(a.key, s, &d.key));
    MEDAKV_ASSIGN_OR_RETURN(DeviceBuffer v, UploadView(a.value, s, &d.value));
    MEDAKV_ASSIGN_OR_RETURN(DeviceBuffer kept, UploadArray(a.kept, sizeof(int32_t) * a.key.heads * a.budget, s));
    d.kept = kept.as<int32_t>();
    MEDAKV_ASSIGN_OR_RETURN(DeviceBuffer ok, DeviceBuffer::Allocate(out_key.NumBytes(), s));
    MEDAKV_ASSIGN_OR_RETURN(DeviceBuffer ov, DeviceBuffer::Allocate(out_value.NumBytes(), s));
    MutableTensorView dk = out_key, dv = out_value;
    dk.data = ok.data();
    dv.data = ov.data();
    MEDAKV_RETURN_IF_ERROR(cuda::MergeAndGather(d, dk, dv, s));
    MEDAKV_RETURN_IF_ERROR(s.Download(out_key.data, ok.data(), ok.size()));
    return s.Download(out_value.data, ov.data(), ov.size());
  }

 private:
  mutable StreamPool pool_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Backend>> MakeCudaBackend() {
  // One stream up front: a broken driver or device fails here, at start-up.
  auto backend = std::make_unique<CudaBackend>();
  MEDAKV_ASSIGN_OR_RETURN(std::unique_ptr<Stream> probe, Stream::Create());
  MEDAKV_RETURN_IF_ERROR(probe->Synchronize());
  return backend;
}

}  // namespace medakv
