// Assembles a cache from the TensorChunks of a Compress or PutCache stream.
//
// Built from a validated CacheSpec, the assembler knows the byte size of
// every (layer, tensor kind) the spec carries: key and value always; query
// (and query_positions when the header says so) with queries; scores and
// entropy with precomputed statistics; nothing else. Chunks of one tensor
// arrive in order (offset 0 first, each next one where the previous ended);
// tensors of different layers may interleave. A tensor's buffer is
// allocated on its first chunk, so memory grows with what has arrived.
// Buffers are 4-byte aligned; the CacheInput's views point into them and
// stay valid when the assembler is moved (not after it is destroyed).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/functional/function_ref.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "medakv/v1/medakv.pb.h"
#include "service/compress/pipeline.h"
#include "service/server/convert.h"

namespace medakv {

class CacheAssembler {
 public:
  // Checks the spec with ValidateSpec (no byte limit: the caller applied its
  // own when it made the spec from a header) and reserves only bookkeeping.
  [[nodiscard]] static absl::StatusOr<CacheAssembler> Create(CacheSpec spec);

  CacheAssembler(CacheAssembler&&) noexcept = default;
  CacheAssembler& operator=(CacheAssembler&&) noexcept = default;
  CacheAssembler(const CacheAssembler&) = delete;
  CacheAssembler& operator=(const CacheAssembler&) = delete;
  ~CacheAssembler() = default;

  // Copies one chunk into its tensor. INVALID_ARGUMENT for a layer out of
  // range, a tensor kind the spec does not carry, an empty chunk, a chunk of
  // a tensor already complete, an offset other than the bytes already
  // received for that tensor, or data past the tensor's end;
  // RESOURCE_EXHAUSTED when the buffer cannot be allocated;
  // FAILED_PRECONDITION after a successful Finish. A rejected chunk changes
  // nothing.
  // A chunk whose payload is a shared-memory ref (chunk.shm) is
  // INVALID_ARGUMENT here: the server resolves refs (CallRegions) and calls
  // AddFrom.
  [[nodiscard]] absl::Status Add(const medakv::v1::TensorChunk& chunk);
  [[nodiscard]] absl::Status Add(int32_t layer, medakv::v1::TensorKind kind, int64_t offset, absl::string_view data);

  // Writes a chunk's `size` bytes to `dst`; a non-OK status rejects the chunk.
  using CopyFn = absl::FunctionRef<absl::Status(void* dst, int64_t size)>;
  // As Add, for bytes that the caller copies itself (from a shared-memory
  // region): the same checks with `size` as the chunk's length, then `copy`
  // runs once. If it fails, the tensor stays as it was (its buffer may stay
  // allocated) and its status is returned.
  [[nodiscard]] absl::Status AddFrom(int32_t layer, medakv::v1::TensorKind kind, int64_t offset, int64_t size,
                                     CopyFn copy);

  // Every expected tensor complete (else INVALID_ARGUMENT naming the first
  // incomplete one, in layer order, and how many of its bytes arrived), then
  // builds input() and checks it with ValidateCacheInput (query positions in
  // range, entropy finite). With a spec without statistics the input has
  // stats kQueries and empty query views; ValidateCacheInput is not run on
  // it (it requires statistics). Calling it again after success is OK.
  [[nodiscard]] absl::Status Finish();
  bool finished() const { return finished_; }

  // After a successful Finish: views into this object's buffers. Before, an
  // empty CacheInput (no layers).
  const CacheInput& input() const { return input_; }
  const CacheSpec& spec() const { return spec_; }

  // The bytes of one tensor as received so far (empty if none arrived or the
  // spec does not carry it).
  absl::string_view tensor(int64_t layer, medakv::v1::TensorKind kind) const;

  int64_t bytes_received() const { return bytes_received_; }
  int64_t bytes_expected() const { return bytes_expected_; }
  int64_t bytes_allocated() const { return bytes_allocated_; }

 private:
  // Tensor kinds 1..6 (key .. entropy) occupy slots 0..5 of a layer.
  static constexpr int kSlots = 7;  // key .. entropy, query_outside_lse
  struct Tensor {
    std::unique_ptr<uint32_t[]> data;  // 4-byte aligned storage, allocated on the first chunk
    int64_t expected = 0;              // 0: the spec does not carry this tensor
    int64_t received = 0;
  };

  explicit CacheAssembler(CacheSpec spec);
  Tensor* Slot(int64_t layer, medakv::v1::TensorKind kind);
  const Tensor* Slot(int64_t layer, medakv::v1::TensorKind kind) const;

  CacheSpec spec_;
  std::vector<Tensor> tensors_;  // [layers * kSlots]
  CacheInput input_;
  bool finished_ = false;
  int64_t bytes_received_ = 0;
  int64_t bytes_expected_ = 0;
  int64_t bytes_allocated_ = 0;
};

}  // namespace medakv
