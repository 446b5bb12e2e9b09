// Fuzz target: the shared-memory data plane's checks (service/server/
// shared_memory.h): registrations against the registry's limits, refs
// (region, offset, length) resolved by CallRegions against real POSIX
// shared-memory objects of fuzzed sizes, reads and writes through them,
// chunks added to an assembler from them, regions unregistered while a call
// holds them, and objects truncated below their registered size.
//
// Input: FuzzedDataProvider: the registry's limits, one or two objects and
// their registrations, then a sequence of operations (README.md). Offsets
// and lengths are drawn arbitrary, near the region's bounds, or near the
// int64 limits.
//
// Invariants: a model predicts the code of every Register, Unregister, Check
// and AddChunk exactly (access status, NOT_FOUND, INVALID_ARGUMENT for
// offset < 0, length <= 0 or a range past the end, overflow-safe); an
// accepted ref lies inside its region; a read returns the object's bytes
// (zeros past a truncation, inside the last page) or, past the truncated
// object's last page, FAILED_PRECONDITION instead of a crash; a write lands
// where the ref says and nowhere else; a chunk from a ref puts exactly the
// region's bytes into the assembler.
#include <fcntl.h>
#include <fuzzer/FuzzedDataProvider.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "fuzz_util.h"
#include "medakv/v1/medakv.pb.h"
#include "service/server/assembler.h"
#include "service/server/convert.h"
#include "service/server/shared_memory.h"

namespace medakv {
namespace {

namespace v1 = ::medakv::v1;
using server::CallRegions;
using server::MappedRegion;
using server::SharedMemoryRegistry;

constexpr int64_t kPage = 4096;

// MEDAKV_FUZZ_TRACE=1 prints every operation and its outcome (to see what
// an input does, e.g. a seed: README.md).
bool Tracing() {
  static const bool on = std::getenv("MEDAKV_FUZZ_TRACE") != nullptr;
  return on;
}
template <typename... Args>
void Trace(const Args&... args) {
  if (Tracing()) std::fprintf(stderr, "fuzz_shm: %s\n", absl::StrCat(args...).c_str());
}
constexpr int64_t kMaxObjectBytes = int64_t{1} << 16;

// A POSIX shared-memory object this process created (unlinked as soon as it
// is registered) and its own mapping of it.
struct Object {
  std::string shm_name;
  int fd = -1;
  uint8_t* data = nullptr;
  int64_t size = 0;       // mapped here
  int64_t file_size = 0;  // after truncations

  ~Object() {
    if (data != nullptr) munmap(data, static_cast<size_t>(size));
    if (fd >= 0) close(fd);
    if (!shm_name.empty()) shm_unlink(shm_name.c_str());
  }
  // Whether byte i can be touched (inside the object's last page).
  bool Mapped(int64_t end) const { return end <= (file_size + kPage - 1) / kPage * kPage; }
};

std::unique_ptr<Object> NewObject(int64_t size) {
  static std::atomic<uint64_t> counter{0};
  auto o = std::make_unique<Object>();
  o->shm_name = absl::StrCat("/medakv-fuzz-", getpid(), "-", counter.fetch_add(1));
  o->fd = shm_open(o->shm_name.c_str(), O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0600);
  MEDAKV_FUZZ_CHECK(o->fd >= 0, "shm_open ", o->shm_name, ": ", std::strerror(errno));
  MEDAKV_FUZZ_CHECK(ftruncate(o->fd, size) == 0, "ftruncate: ", std::strerror(errno));
  void* p = mmap(nullptr, static_cast<size_t>(size), PROT_READ | PROT_WRITE, MAP_SHARED, o->fd, 0);
  MEDAKV_FUZZ_CHECK(p != MAP_FAILED, "mmap: ", std::strerror(errno));
  o->data = static_cast<uint8_t*>(p);
  o->size = o->file_size = size;
  for (int64_t i = 0; i < size; ++i) o->data[i] = static_cast<uint8_t>(i * 131 + 7 + (i >> 8));
  return o;
}

bool ValidRegionName(const std::string& name) {
  if (name.empty() || name.size() > 256) return false;
  for (char c : name) {
    if (!absl::ascii_isalnum(static_cast<unsigned char>(c)) && c != '.' && c != '_' && c != ':' && c != '/' &&
        c != '-') {
      return false;
    }
  }
  return true;
}

// The model of the registry and of one call's held regions.
struct Model {
  struct Registered {
    Object* object;
    int64_t size;
  };
  int64_t max_bytes = 0;
  int max_regions = 0;
  std::map<std::string, Registered> registry;
  std::map<std::string, Registered> held;  // by the call, first use on
  absl::Status access;

  int64_t Bytes() const {
    int64_t b = 0;
    for (const auto& [name, r] : registry) b += r.size;
    return b;
  }
  // The region a ref resolves to (nullptr: NOT_FOUND), as CallRegions does:
  // a region the call holds first, then the registry.
  const Registered* Resolve(const std::string& name) const {
    if (auto it = held.find(name); it != held.end()) return &it->second;
    if (auto it = registry.find(name); it != registry.end()) return &it->second;
    return nullptr;
  }
  absl::StatusCode PredictCheck(const v1::SharedMemoryRef& ref) const {
    if (!access.ok()) return access.code();
    const Registered* r = Resolve(ref.region());
    if (r == nullptr) return absl::StatusCode::kNotFound;
    if (ref.offset() < 0 || ref.length() <= 0) return absl::StatusCode::kInvalidArgument;
    // offset + length <= size, without overflow.
    if (static_cast<__int128>(ref.offset()) + ref.length() > r->size) return absl::StatusCode::kInvalidArgument;
    return absl::StatusCode::kOk;
  }
  void AfterCheck(const v1::SharedMemoryRef& ref) {
    if (!access.ok() || held.count(ref.region()) != 0) return;
    if (auto it = registry.find(ref.region()); it != registry.end()) held.emplace(ref.region(), it->second);
  }
};

int64_t DrawInt(FuzzedDataProvider& p, int64_t size) {
  switch (p.ConsumeIntegralInRange<int>(0, 4)) {
    case 0:
      return p.ConsumeIntegral<int64_t>();
    case 1:
      return p.ConsumeIntegralInRange<int64_t>(-2, size + 2);
    case 2:
      return size - p.ConsumeIntegralInRange<int64_t>(-2, 64);
    case 3:
      return std::numeric_limits<int64_t>::max() - p.ConsumeIntegralInRange<int64_t>(0, 2);
    default:
      return std::numeric_limits<int64_t>::min() + p.ConsumeIntegralInRange<int64_t>(0, 2);
  }
}

std::string DrawRegionName(FuzzedDataProvider& p, const std::vector<std::string>& names) {
  if (!names.empty() && p.ConsumeIntegralInRange<int>(0, 7) != 0) {
    return names[p.ConsumeIntegralInRange<size_t>(0, names.size() - 1)];
  }
  return p.ConsumeRandomLengthString(300);
}

void Run(FuzzedDataProvider& p) {
  Model model;
  model.max_regions = p.ConsumeIntegralInRange<int>(0, 3);
  model.max_bytes = p.ConsumeBool() ? 2 * kMaxObjectBytes : p.ConsumeIntegralInRange<int64_t>(0, 2 * kMaxObjectBytes);
  model.access = p.ConsumeIntegralInRange<int>(0, 15) == 0
                     ? absl::PermissionDeniedError("shared memory is for local peers only")
                     : absl::OkStatus();
  SharedMemoryRegistry registry(model.max_bytes, model.max_regions);
  CallRegions call(&registry, model.access);

  std::vector<std::unique_ptr<Object>> objects;
  std::vector<std::string> names;  // region names tried, for later refs

  // An assembler for chunks from refs: one layer of keys and values.
  CacheSpec spec;
  spec.layers = 1;
  spec.kv_heads = 1;
  spec.head_dim = p.ConsumeIntegralInRange<int64_t>(1, 16);
  spec.tokens = p.ConsumeIntegralInRange<int64_t>(1, 64);
  spec.dtype = DType::kFloat32;
  spec.stats = SpecStats::kNone;
  absl::StatusOr<CacheAssembler> created = CacheAssembler::Create(spec);
  MEDAKV_FUZZ_CHECK(created.ok(), created.status().ToString());
  CacheAssembler assembler = *std::move(created);
  const int64_t tensor_bytes = TensorBytes(spec, v1::TENSOR_KIND_KEY);
  std::map<int, std::string> received;  // kind -> bytes

  for (int op = 0; op < 48 && p.remaining_bytes() > 0; ++op) {
    switch (p.ConsumeIntegralInRange<int>(0, 7)) {
      case 0: {  // register a new object (at most 4 per input)
        if (objects.size() >= 4) break;
        const int64_t size = p.ConsumeIntegralInRange<int64_t>(1, kMaxObjectBytes);
        objects.push_back(NewObject(size));
        Object* o = objects.back().get();
        v1::RegisterSharedMemoryRequest r;
        r.set_region(p.ConsumeBool() ? absl::StrCat("r", objects.size()) : DrawRegionName(p, names));
        r.set_shm_name(o->shm_name);
        r.set_size(p.ConsumeBool() ? size : DrawInt(p, size));
        names.push_back(r.region());
        absl::StatusCode want = absl::StatusCode::kOk;
        if (!ValidRegionName(r.region()) || r.size() <= 0) {
          want = absl::StatusCode::kInvalidArgument;
        } else if (model.registry.count(r.region()) != 0) {
          want = absl::StatusCode::kAlreadyExists;
        } else if (static_cast<int>(model.registry.size()) >= model.max_regions ||
                   r.size() > model.max_bytes - model.Bytes()) {
          want = absl::StatusCode::kResourceExhausted;
        } else if (r.size() > o->file_size) {
          want = absl::StatusCode::kInvalidArgument;  // larger than the object
        }
        absl::StatusOr<uint64_t> lease = registry.Register(r, nullptr);
        Trace("Register(", r.region(), ", size ", r.size(), ") of a ", size,
              "-byte object: ", lease.status().ToString());
        MEDAKV_FUZZ_CHECK(lease.status().code() == want, "Register(", r.region(), ", size ", r.size(), " of ",
                          o->file_size, "): expected code ", static_cast<int>(want), ", got ",
                          lease.status().ToString());
        if (lease.ok()) model.registry[r.region()] = Model::Registered{o, r.size()};
        MEDAKV_FUZZ_CHECK(registry.regions() == static_cast<int>(model.registry.size()) &&
                              registry.registered_bytes() == model.Bytes(),
                          "registry holds ", registry.regions(), " regions of ", registry.registered_bytes(),
                          " bytes, the model ", model.registry.size(), " of ", model.Bytes());
        shm_unlink(o->shm_name.c_str());  // the mappings keep it
        o->shm_name.clear();
        break;
      }
      case 1:
      case 2: {  // check a ref, read it and write it
        v1::SharedMemoryRef ref;
        ref.set_region(DrawRegionName(p, names));
        const Model::Registered* target = model.Resolve(ref.region());
        const int64_t size = target != nullptr ? target->size : 64;
        ref.set_offset(DrawInt(p, size));
        ref.set_length(DrawInt(p, size));
        const absl::StatusCode want = model.PredictCheck(ref);
        absl::StatusOr<const MappedRegion*> region = call.Check(ref, "chunk.shm");
        Trace("Check(", ref.region(), ", ", ref.offset(), ", +", ref.length(), "): ", region.status().ToString());
        MEDAKV_FUZZ_CHECK(region.status().code() == want, "Check(", ref.region(), ", ", ref.offset(), ", ",
                          ref.length(), ") of a ", size, "-byte region: expected code ", static_cast<int>(want),
                          ", got ", region.status().ToString());
        model.AfterCheck(ref);
        if (!region.ok()) break;
        const Model::Registered& r = *model.Resolve(ref.region());
        MEDAKV_FUZZ_CHECK((*region)->size() == r.size && (*region)->name() == ref.region(), "resolved region");
        MEDAKV_FUZZ_CHECK(ref.offset() >= 0 && ref.length() > 0 && ref.offset() + ref.length() <= r.size,
                          "accepted a ref outside its region");
        std::string buf(static_cast<size_t>(ref.length()), '\xee');
        const absl::Status read = (*region)->Read(ref.offset(), ref.length(), buf.data());
        const bool mapped = r.object->Mapped(ref.offset() + ref.length());
        Trace("  Read: ", read.ToString());
        MEDAKV_FUZZ_CHECK(read.ok() == mapped, "Read [", ref.offset(), ", +", ref.length(), ") of an object of ",
                          r.object->file_size, " bytes: ", read.ToString());
        if (!read.ok()) {
          MEDAKV_FUZZ_CHECK_CODE(read, absl::StatusCode::kFailedPrecondition);
          break;
        }
        for (int64_t i = 0; i < ref.length(); ++i) {
          const int64_t at = ref.offset() + i;
          const uint8_t want_byte = at < r.object->file_size ? r.object->data[at] : 0;
          MEDAKV_FUZZ_CHECK(static_cast<uint8_t>(buf[i]) == want_byte, "Read byte ", at, " differs");
        }
        // Write a pattern inside the object and see it (and only it) land;
        // then restore. (Past the end of a truncated object a write would
        // stay in the page cache and reappear in later reads.)
        const int64_t n = std::min<int64_t>({ref.length(), 16, r.object->file_size - ref.offset()});
        if (n <= 0) break;
        uint8_t* at = r.object->data + ref.offset();
        const int before = ref.offset() > 0 ? at[-1] : -1;
        const int after = ref.offset() + n < r.object->file_size ? at[n] : -1;
        const std::string old(reinterpret_cast<const char*>(at), static_cast<size_t>(n));
        const std::string pattern(static_cast<size_t>(n), '\x5a');
        const absl::Status write = (*region)->Write(ref.offset(), pattern.data(), n);
        MEDAKV_FUZZ_CHECK(write.ok(), "Write inside the object: ", write.ToString());
        MEDAKV_FUZZ_CHECK(std::memcmp(at, pattern.data(), static_cast<size_t>(n)) == 0, "Write did not land");
        MEDAKV_FUZZ_CHECK(before < 0 || at[-1] == before, "Write touched the byte before");
        MEDAKV_FUZZ_CHECK(after < 0 || at[n] == after, "Write touched the byte after");
        std::memcpy(at, old.data(), old.size());
        break;
      }
      case 3: {  // a chunk whose payload is a ref
        v1::TensorChunk chunk;
        chunk.set_layer(p.ConsumeIntegralInRange<int>(0, 8) == 0 ? 1 : 0);
        const int kind = p.ConsumeIntegralInRange<int>(0, 8) == 0 ? 3 : p.ConsumeIntegralInRange<int>(1, 2);
        chunk.set_tensor(static_cast<v1::TensorKind>(kind));
        const int64_t got = static_cast<int64_t>(received[kind].size());
        chunk.set_offset(p.ConsumeIntegralInRange<int>(0, 8) == 0 ? got + 1 : got);
        v1::SharedMemoryRef* ref = chunk.mutable_shm();
        ref->set_region(DrawRegionName(p, names));
        const Model::Registered* target = model.Resolve(ref->region());
        const int64_t size = target != nullptr ? target->size : 64;
        ref->set_offset(p.ConsumeBool() ? p.ConsumeIntegralInRange<int64_t>(0, size) : DrawInt(p, size));
        ref->set_length(p.ConsumeBool() ? p.ConsumeIntegralInRange<int64_t>(1, tensor_bytes) : DrawInt(p, size));
        absl::StatusCode want = model.PredictCheck(*ref);
        if (want == absl::StatusCode::kOk) {
          const bool carried = chunk.layer() == 0 && (kind == 1 || kind == 2);
          if (assembler.finished() || !carried || got == tensor_bytes || chunk.offset() != got ||
              ref->length() > tensor_bytes - got) {
            want = assembler.finished() ? absl::StatusCode::kFailedPrecondition : absl::StatusCode::kInvalidArgument;
          } else if (!model.Resolve(ref->region())->object->Mapped(ref->offset() + ref->length())) {
            want = absl::StatusCode::kFailedPrecondition;  // the read faults
          }
        }
        const absl::Status s = call.AddChunk(chunk, &assembler);
        Trace("AddChunk(kind ", kind, ", offset ", chunk.offset(), ", ref ", ref->region(), " ", ref->offset(), " +",
              ref->length(), "): ", s.ToString());
        MEDAKV_FUZZ_CHECK(s.code() == want, "AddChunk(kind ", kind, " offset ", chunk.offset(), ", ref ",
                          ref->region(), " ", ref->offset(), " +", ref->length(), "): expected code ",
                          static_cast<int>(want), ", got ", s.ToString());
        model.AfterCheck(*ref);
        if (s.ok()) {
          const Model::Registered& r = *model.Resolve(ref->region());
          for (int64_t i = 0; i < ref->length(); ++i) {
            const int64_t at = ref->offset() + i;
            received[kind].push_back(static_cast<char>(at < r.object->file_size ? r.object->data[at] : 0));
          }
        }
        for (int k : {1, 2}) {
          MEDAKV_FUZZ_CHECK(assembler.tensor(0, static_cast<v1::TensorKind>(k)) == received[k], "tensor ", k,
                            " holds other bytes than the regions had");
        }
        break;
      }
      case 4: {  // unregister (the call keeps what it holds)
        const std::string name = DrawRegionName(p, names);
        const absl::Status s = registry.Unregister(name);
        Trace("Unregister(", name, "): ", s.ToString());
        const bool registered = model.registry.count(name) != 0;
        MEDAKV_FUZZ_CHECK(s.ok() == registered && (s.ok() || s.code() == absl::StatusCode::kNotFound),
                          "Unregister(", name, "): ", s.ToString());
        model.registry.erase(name);
        break;
      }
      case 5: {  // the client truncates (or regrows) its object
        if (objects.empty()) break;
        Object* o = objects[p.ConsumeIntegralInRange<size_t>(0, objects.size() - 1)].get();
        const int64_t size = p.ConsumeIntegralInRange<int64_t>(0, o->size);
        MEDAKV_FUZZ_CHECK(ftruncate(o->fd, size) == 0, "ftruncate: ", std::strerror(errno));
        Trace("Truncate an object of ", o->size, " bytes to ", size);
        if (size > o->file_size) {
          // Regrown: the bytes between come back as zeros; keep the pattern.
          for (int64_t i = o->file_size; i < size; ++i) o->data[i] = 0;
        }
        o->file_size = size;
        break;
      }
      case 6: {  // Finish: only with both tensors complete
        const bool complete = static_cast<int64_t>(received[1].size()) == tensor_bytes &&
                              static_cast<int64_t>(received[2].size()) == tensor_bytes;
        const absl::Status s = assembler.Finish();
        Trace("Finish: ", s.ToString());
        MEDAKV_FUZZ_CHECK(s.ok() == complete, "Finish: ", s.ToString());
        break;
      }
      default: {  // a header's output ref, checked the same way
        v1::CompressHeader h;
        h.mutable_output()->set_region(DrawRegionName(p, names));
        h.mutable_output()->set_offset(DrawInt(p, kMaxObjectBytes));
        h.mutable_output()->set_length(DrawInt(p, kMaxObjectBytes));
        const absl::StatusCode want = model.PredictCheck(h.output());
        absl::StatusOr<const MappedRegion*> region = call.Check(h.output(), "header.output");
        Trace("Check(header.output ", h.output().region(), ", ", h.output().offset(), ", +", h.output().length(),
              "): ", region.status().ToString());
        MEDAKV_FUZZ_CHECK(region.status().code() == want, "Check(header.output): expected code ",
                          static_cast<int>(want), ", got ", region.status().ToString());
        if (region.status().code() == absl::StatusCode::kInvalidArgument) {
          MEDAKV_FUZZ_CHECK(absl::StartsWith(region.status().message(), "header.output."),
                            "the error does not name the field: ", region.status().ToString());
        }
        model.AfterCheck(h.output());
        break;
      }
    }
  }
}

}  // namespace
}  // namespace medakv

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size > 4096) return -1;
  FuzzedDataProvider p(data, size);
  medakv::Run(p);
  return 0;
}
