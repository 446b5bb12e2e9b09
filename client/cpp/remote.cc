#include "client/cpp/remote.h"

#include <fcntl.h>
#include <grpcpp/grpcpp.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <random>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/common/status.h"
#include "service/server/convert.h"

namespace medakv {

using client_internal::FromGrpc;

v1::Policy RequestPolicy(const CompressOptions& options, const std::string& preset, double preset_rho,
                         bool server_default) {
  if (preset.empty() && !server_default) return PolicyToProto(options);
  v1::Policy p;
  if (!preset.empty()) p.set_preset(preset);
  p.set_rho(preset_rho);
  return p;
}

// ---- SharedMemoryRegion -------------------------------------------------------------

SharedMemoryRegion::SharedMemoryRegion(std::string shm_name, uint8_t* data, int64_t size)
    : shm_name_(std::move(shm_name)), data_(data), size_(size) {}

SharedMemoryRegion::~SharedMemoryRegion() {
  munmap(data_, static_cast<size_t>(size_));
  shm_unlink(shm_name_.c_str());
}

absl::StatusOr<std::unique_ptr<SharedMemoryRegion>> SharedMemoryRegion::Create(int64_t size, absl::string_view prefix) {
  if (size <= 0) return absl::InvalidArgumentError(absl::StrCat("shared-memory size must be > 0, got ", size));
  if (prefix.empty() || prefix[0] != '/' || prefix.find('/', 1) != absl::string_view::npos) {
    return absl::InvalidArgumentError(absl::StrCat("shared-memory name prefix '", prefix, "' must be '/' then no '/'"));
  }
  static std::atomic<uint64_t> counter{0};
  std::random_device entropy;
  for (int attempt = 0;; ++attempt) {
    const std::string name = absl::StrCat(prefix, getpid(), "-", counter.fetch_add(1), "-",
                                          absl::Hex(static_cast<uint64_t>(entropy()) << 32 | entropy()));
    const int fd = shm_open(name.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
    if (fd < 0) {
      if (errno == EEXIST && attempt < 8) continue;
      return absl::ErrnoToStatus(errno, absl::StrCat("shm_open(", name, ")"));
    }
    if (ftruncate(fd, size) != 0) {
      const int err = errno;
      close(fd);
      shm_unlink(name.c_str());
      return absl::ErrnoToStatus(err, absl::StrCat("ftruncate(", name, ", ", size, ")"));
    }
    // Commit the pages now: tmpfs grows lazily, and a write into a page that
    // /dev/shm has no room for would be a SIGBUS in the middle of a copy.
    if (const int err = posix_fallocate(fd, 0, size); err != 0) {
      close(fd);
      shm_unlink(name.c_str());
      if (err == ENOSPC) {
        return absl::ResourceExhaustedError(
            absl::StrCat("/dev/shm has no room for a ", size, "-byte shared-memory object (", name, ")"));
      }
      return absl::ErrnoToStatus(err, absl::StrCat("posix_fallocate(", name, ", ", size, ")"));
    }
    void* data = mmap(nullptr, static_cast<size_t>(size), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    const int err = errno;
    close(fd);
    if (data == MAP_FAILED) {
      shm_unlink(name.c_str());
      return absl::ErrnoToStatus(err, absl::StrCat("mmap(", name, ", ", size, ")"));
    }
    return std::unique_ptr<SharedMemoryRegion>(new SharedMemoryRegion(name, static_cast<uint8_t*>(data), size));
  }
}

// ---- SharedMemoryLease --------------------------------------------------------------

namespace {
// How long a lease's destructor waits for the server to end the lease.
constexpr absl::Duration kReleaseTimeout = absl::Seconds(2);
}  // namespace

SharedMemoryLease::SharedMemoryLease(v1::Medakv::StubInterface& stub, const SharedMemoryRegion& region,
                                     std::string name)
    : stub_(stub), region_(region), name_(std::move(name)) {}

absl::StatusOr<std::unique_ptr<SharedMemoryLease>> SharedMemoryLease::Register(v1::Medakv::StubInterface& stub,
                                                                              const SharedMemoryRegion& region,
                                                                              std::string name,
                                                                              absl::Duration timeout) {
  std::unique_ptr<SharedMemoryLease> lease(new SharedMemoryLease(stub, region, std::move(name)));
  v1::RegisterSharedMemoryRequest request;
  request.set_region(lease->name_);
  request.set_shm_name(region.shm_name());
  request.set_size(region.size());
  lease->thread_ = std::thread(&SharedMemoryLease::Run, lease.get(),
                               stub.RegisterSharedMemory(&lease->context_, request));
  if (!lease->registered_.WaitForNotificationWithTimeout(timeout)) {
    return absl::DeadlineExceededError(  // the destructor cancels the stream
        absl::StrCat("no answer to RegisterSharedMemory('", lease->name_, "') within ", absl::FormatDuration(timeout)));
  }
  if (absl::Status s = lease->end_status(); !s.ok() || lease->ended()) {
    return s.ok() ? absl::UnavailableError("the lease stream ended at once") : s;
  }
  return lease;
}

void SharedMemoryLease::Run(std::unique_ptr<grpc::ClientReaderInterface<v1::RegisterSharedMemoryResponse>> reader) {
  v1::RegisterSharedMemoryResponse response;
  if (reader->Read(&response)) {
    registered_.Notify();
    while (reader->Read(&response)) {
    }
  }
  const grpc::Status status = reader->Finish();
  {
    absl::MutexLock lock(&mu_);
    status_ = FromGrpc(status);
  }
  ended_.Notify();
  if (!registered_.HasBeenNotified()) registered_.Notify();
}

SharedMemoryLease::~SharedMemoryLease() {
  // A registered lease ends cleanly: UnregisterSharedMemory, and the server
  // finishes the stream with OK. Cancelling the stream would do as well for
  // the region, but the server would count every client that goes away as a
  // CANCELLED call (medakv_requests_total). Cancelled only when the server
  // does not answer in time (or never answered the registration).
  if (registered_.HasBeenNotified() && !ended()) {
    grpc::ClientContext context;
    context.set_deadline(absl::ToChronoTime(absl::Now() + kReleaseTimeout));
    v1::UnregisterSharedMemoryRequest request;
    request.set_region(name_);
    v1::UnregisterSharedMemoryResponse response;
    if (stub_.UnregisterSharedMemory(&context, request, &response).ok()) {
      (void)ended_.WaitForNotificationWithTimeout(kReleaseTimeout);
    }
  }
  if (!ended()) context_.TryCancel();
  if (thread_.joinable()) thread_.join();
}

absl::Status SharedMemoryLease::end_status() const {
  absl::MutexLock lock(&mu_);
  return status_;
}

absl::Status SharedMemoryLease::Release() {
  grpc::ClientContext context;
  v1::UnregisterSharedMemoryRequest request;
  request.set_region(name_);
  v1::UnregisterSharedMemoryResponse response;
  const grpc::Status status = stub_.UnregisterSharedMemory(&context, request, &response);
  if (status.ok()) ended_.WaitForNotification();
  return FromGrpc(status);
}

// ---- building blocks -----------------------------------------------------------------

namespace client_internal {

absl::Status FromGrpc(const grpc::Status& s) {
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
}

std::vector<TensorPiece> RequestTensors(const CacheInput& in, const CacheSpec& spec) {
  std::vector<TensorPiece> pieces;
  for (size_t l = 0; l < in.layers.size(); ++l) {
    const LayerInput& layer = in.layers[l];
    const int32_t li = static_cast<int32_t>(l);
    pieces.push_back({li, v1::TENSOR_KIND_KEY, layer.key.data, layer.key.NumBytes()});
    pieces.push_back({li, v1::TENSOR_KIND_VALUE, layer.value.data, layer.value.NumBytes()});
    if (spec.stats == SpecStats::kQueries) {
      pieces.push_back({li, v1::TENSOR_KIND_QUERY, layer.query.data, layer.query.NumBytes()});
      if (spec.has_query_positions) {
        pieces.push_back({li, v1::TENSOR_KIND_QUERY_POSITIONS, layer.query_positions.data(),
                          static_cast<int64_t>(layer.query_positions.size() * sizeof(int32_t))});
      }
      if (spec.has_query_outside_lse) {
        pieces.push_back({li, v1::TENSOR_KIND_QUERY_OUTSIDE_LSE, layer.query_outside_lse.data(),
                          static_cast<int64_t>(layer.query_outside_lse.size() * sizeof(float))});
      }
    } else if (spec.stats == SpecStats::kPrecomputed) {
      pieces.push_back({li, v1::TENSOR_KIND_SCORES, layer.scores, layer.score_heads * in.tokens * 4});
      pieces.push_back({li, v1::TENSOR_KIND_ENTROPY, &layer.entropy, 4});
    }
  }
  return pieces;
}

std::vector<int64_t> ShmLayout(const std::vector<TensorPiece>& pieces, int64_t* end) {
  std::vector<int64_t> offsets;
  offsets.reserve(pieces.size());
  int64_t at = 0;
  for (const TensorPiece& p : pieces) {
    offsets.push_back(at);
    at = AlignUp(at + p.size);
  }
  *end = at;
  return offsets;
}

ResultReader::ResultReader(const Shape& shape, const SharedMemoryLease* shm, int64_t area_offset,
                           int64_t area_length, ProgressCallback progress)
    : shape_(shape),
      shm_(shm),
      area_offset_(area_offset),
      area_length_(area_length),
      progress_(std::move(progress)),
      layers_(static_cast<size_t>(std::max(shape.layers, 0))),
      has_info_(layers_.size(), false),
      received_(layers_.size() * 3, 0) {}

absl::Status ResultReader::OnLayer(const v1::LayerInfo& info) {
  const int64_t index = int64_t{info.layer()} - shape_.first_layer;
  if (index < 0 || index >= shape_.layers || info.budget() < 1 || info.budget() > shape_.max_tokens) {
    return absl::InternalError(absl::StrCat("the server sent an invalid layer info: ", info.ShortDebugString()));
  }
  if (has_info_[index]) {
    return absl::InternalError(absl::StrCat("the server sent layer ", info.layer(), "'s info twice"));
  }
  has_info_[index] = true;
  LayerResult& r = layers_[index];
  r.budget = info.budget();
  r.entropy = info.entropy();
  r.alpha = info.alpha();
  const int64_t row_bytes = shape_.head_dim * DTypeSize(shape_.dtype);
  r.key.resize(static_cast<size_t>(shape_.kv_heads * r.budget * row_bytes));
  r.value.resize(r.key.size());
  r.positions.resize(static_cast<size_t>(shape_.kv_heads * r.budget));
  return absl::OkStatus();
}

absl::Status ResultReader::OnChunk(const v1::TensorChunk& c) {
  const int64_t index = int64_t{c.layer()} - shape_.first_layer;
  if (index < 0 || index >= shape_.layers || !has_info_[index]) {
    return absl::InternalError(absl::StrCat("the server sent a chunk of layer ", c.layer(),
                                            " before its info or outside the layers asked for"));
  }
  LayerResult& r = layers_[index];
  int slot = 0;
  uint8_t* base = nullptr;
  int64_t size = 0;
  switch (c.tensor()) {
    case v1::TENSOR_KIND_KEY:
      slot = 0, base = r.key.data(), size = static_cast<int64_t>(r.key.size());
      break;
    case v1::TENSOR_KIND_VALUE:
      slot = 1, base = r.value.data(), size = static_cast<int64_t>(r.value.size());
      break;
    case v1::TENSOR_KIND_POSITIONS:
      slot = 2, base = reinterpret_cast<uint8_t*>(r.positions.data());
      size = static_cast<int64_t>(r.positions.size() * sizeof(int32_t));
      break;
    default:
      return absl::InternalError(absl::StrCat("the server sent a chunk of tensor kind ", c.tensor(), " in a result"));
  }
  // The payload: bytes in the message, or a ref into the output area.
  const uint8_t* payload = reinterpret_cast<const uint8_t*>(c.data().data());
  int64_t length = static_cast<int64_t>(c.data().size());
  if (c.has_shm()) {
    const v1::SharedMemoryRef& ref = c.shm();
    const int64_t area_end = area_offset_ + area_length_;
    const bool inside = shm_ != nullptr && ref.region() == shm_->name() && ref.offset() >= area_offset_ &&
                        ref.length() > 0 && ref.offset() <= area_end && ref.length() <= area_end - ref.offset();
    if (!inside) {
      return absl::InternalError(
          absl::StrCat("the server sent a shared-memory ref outside the output area: ", ref.ShortDebugString()));
    }
    payload = shm_->region().data() + ref.offset();
    length = ref.length();
  }
  int64_t& got = received_[index * 3 + slot];
  if (c.offset() != got || length > size - got) {
    return absl::InternalError(absl::StrCat("the server sent an invalid chunk (layer ", c.layer(), ", ",
                                            TensorKindName(c.tensor()), ", offset ", c.offset(), ", ", length,
                                            " bytes; expected offset ", got, " of ", size, ")"));
  }
  std::memcpy(base + c.offset(), payload, static_cast<size_t>(length));
  got += length;
  received_total_ += length;
  if (progress_) progress_(Transfer::kDownload, received_total_, expected_total_);
  return absl::OkStatus();
}

absl::Status ResultReader::CheckComplete() const {
  for (size_t i = 0; i < layers_.size(); ++i) {
    const int64_t layer = shape_.first_layer + static_cast<int64_t>(i);
    if (!has_info_[i]) return absl::InternalError(absl::StrCat("the server's results lack layer ", layer));
    const LayerResult& r = layers_[i];
    const int64_t want[3] = {static_cast<int64_t>(r.key.size()), static_cast<int64_t>(r.value.size()),
                             static_cast<int64_t>(r.positions.size() * sizeof(int32_t))};
    for (int slot = 0; slot < 3; ++slot) {
      if (received_[i * 3 + slot] != want[slot]) {
        return absl::InternalError(absl::StrCat("the server sent ", received_[i * 3 + slot], " of the ", want[slot],
                                                " bytes of layer ", layer, "'s ",
                                                slot == 0 ? "key" : slot == 1 ? "value" : "positions"));
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace client_internal

// ---- CompressRemote -----------------------------------------------------------------

absl::StatusOr<RemoteResult> CompressRemote(v1::Medakv::StubInterface& stub, const CacheInput& in,
                                            const CompressOptions& options, const RemoteOptions& remote) {
  if (remote.chunk_bytes <= 0) return absl::InvalidArgumentError("chunk_bytes must be > 0");
  if (absl::Status s = ValidateCacheInput(in); !s.ok()) return s;

  // Header.
  MEDAKV_ASSIGN_OR_RETURN(const CacheSpec spec, SpecFromInput(in));
  const std::vector<client_internal::TensorPiece> pieces = client_internal::RequestTensors(in, spec);

  // Where the tensors go in the shared-memory region: the input from 0, the
  // output area after it.
  const SharedMemoryLease* shm = remote.shared_memory;
  const bool shm_in = shm != nullptr && remote.shm_input;
  const bool shm_out = shm != nullptr && remote.shm_output;
  std::vector<int64_t> shm_offsets;  // of each piece
  int64_t output_offset = 0, output_length = 0;
  if (shm_in) {
    int64_t end = 0;
    shm_offsets = client_internal::ShmLayout(pieces, &end);
    if (end > shm->region().size()) {
      return absl::ResourceExhaustedError(absl::StrCat("the shared-memory region '", shm->name(), "' has ",
                                                       shm->region().size(), " bytes; the input needs ", end));
    }
    output_offset = end;
  }
  if (shm_out) {
    output_length = shm->region().size() - output_offset;
    if (output_length <= 0) {
      return absl::ResourceExhaustedError(absl::StrCat("the shared-memory region '", shm->name(),
                                                       "' has no room for the results after the input (",
                                                       output_offset, " bytes)"));
    }
  }

  grpc::ClientContext context;
  if (remote.timeout != absl::InfiniteDuration()) {
    context.set_deadline(std::chrono::system_clock::now() +
                         std::chrono::milliseconds(absl::ToInt64Milliseconds(remote.timeout)));
  }
  std::unique_ptr<grpc::ClientReaderWriterInterface<v1::CompressRequest, v1::CompressResponse>> stream =
      stub.Compress(&context);

  v1::CompressRequest request;
  ToProto(spec, request.mutable_header());
  *request.mutable_header()->mutable_policy() =
      RequestPolicy(options, remote.preset, remote.preset_rho, remote.server_default);
  request.mutable_header()->set_max_response_chunk_bytes(remote.response_chunk_bytes);
  if (shm_out) {
    v1::SharedMemoryRef* out = request.mutable_header()->mutable_output();
    out->set_region(shm->name());
    out->set_offset(output_offset);
    out->set_length(output_length);
  }
  bool ok = stream->Write(request) &&
            client_internal::WriteTensors<v1::CompressRequest>(*stream, pieces, remote.chunk_bytes,
                                                               shm_in ? shm : nullptr, shm_offsets, remote.progress);
  if (ok) stream->WritesDone();

  // Results: per layer an info, then key, value and positions chunks in order.
  client_internal::ResultReader::Shape shape;
  shape.kv_heads = in.kv_heads;
  shape.head_dim = in.head_dim;
  shape.dtype = in.dtype;
  shape.max_tokens = in.tokens;
  shape.layers = static_cast<int32_t>(in.layers.size());
  client_internal::ResultReader reader(shape, shm_out ? shm : nullptr, output_offset, output_length,
                                       remote.progress);
  RemoteResult out;
  v1::CompressResponse response;
  bool summary = false;
  while (stream->Read(&response)) {
    absl::Status s = absl::OkStatus();
    if (response.has_layer()) {
      s = reader.OnLayer(response.layer());
    } else if (response.has_chunk()) {
      s = reader.OnChunk(response.chunk());
    } else if (response.has_summary()) {
      out.summary = response.summary();
      out.result.tokens_in = out.summary.tokens_in();
      out.result.tokens_kept = out.summary.tokens_kept();
      out.result.seconds = {out.summary.times().statistics_seconds(), out.summary.times().allocate_seconds(),
                            out.summary.times().select_merge_seconds()};
      summary = true;
    }
    if (!s.ok()) {
      context.TryCancel();
      while (stream->Read(&response)) {
      }
      (void)stream->Finish();
      return s;
    }
  }
  const grpc::Status status = stream->Finish();
  if (!status.ok()) return FromGrpc(status);
  if (!ok) return absl::UnavailableError("the stream closed before the request was sent");
  if (!summary) return absl::InternalError("the server ended the stream without a summary");
  MEDAKV_RETURN_IF_ERROR(reader.CheckComplete());
  out.result.layers = std::move(reader.layers());
  return out;
}

}  // namespace medakv
