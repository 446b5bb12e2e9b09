#include "service/server/shared_memory.h"

#include <fcntl.h>
#include <setjmp.h>  // sigjmp_buf (POSIX)
#include <signal.h>  // sigaction, siginfo_t (POSIX)
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <utility>

#include "absl/base/call_once.h"
#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "kernels/common/status.h"

namespace medakv::server {
namespace {

constexpr size_t kMaxRegionNameBytes = 256;
constexpr size_t kMaxShmNameBytes = 255;  // NAME_MAX

// ---- faults of a mapping whose object shrank -------------------------------------

struct FaultGuard {
  sigjmp_buf jump;
  uintptr_t lo = 0, hi = 0;
};

thread_local FaultGuard* t_guard = nullptr;
struct sigaction g_previous_sigbus;
absl::once_flag g_install_once;

void OnSigbus(int sig, siginfo_t* info, void* context) {
  FaultGuard* guard = t_guard;
  const auto address = reinterpret_cast<uintptr_t>(info->si_addr);
  if (guard != nullptr && address >= guard->lo && address < guard->hi) siglongjmp(guard->jump, 1);
  // Not a guarded copy: what would have happened without this handler.
  if ((g_previous_sigbus.sa_flags & SA_SIGINFO) != 0) {
    g_previous_sigbus.sa_sigaction(sig, info, context);
  } else if (g_previous_sigbus.sa_handler != SIG_DFL && g_previous_sigbus.sa_handler != SIG_IGN) {
    g_previous_sigbus.sa_handler(sig);
  } else {
    // Returning re-runs the faulting access, which now ends the process as it would have.
    signal(SIGBUS, SIG_DFL);
  }
}

void InstallSigbusHandler() {
  struct sigaction action {};
  action.sa_sigaction = OnSigbus;
  action.sa_flags = SA_SIGINFO;
  sigemptyset(&action.sa_mask);
  sigaction(SIGBUS, &action, &g_previous_sigbus);
}

// ---- names -------------------------------------------------------------------------

bool RegionNameChar(char c) {
  return absl::ascii_isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == ':' || c == '/' ||
         c == '-';
}

absl::Status ValidateRegionName(absl::string_view name, absl::string_view field) {
  if (name.empty() || name.size() > kMaxRegionNameBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, " must be 1-", kMaxRegionNameBytes, " bytes, got ", name.size()));
  }
  for (size_t i = 0; i < name.size(); ++i) {
    if (!RegionNameChar(name[i])) {
      return absl::InvalidArgumentError(absl::StrCat(field, " '", absl::CEscape(name), "': byte ", i,
                                                     " is outside [A-Za-z0-9._:/-]"));
    }
  }
  return absl::OkStatus();
}

absl::Status ValidateShmName(absl::string_view name) {
  if (name.size() < 2 || name.size() > kMaxShmNameBytes || name[0] != '/' ||
      name.find('/', 1) != absl::string_view::npos || name.find('\0') != absl::string_view::npos || name == "/." ||
      name == "/..") {
    return absl::InvalidArgumentError(
        absl::StrCat("shm_name '", absl::CEscape(name), "' must be a POSIX shared-memory name: '/' and 1-",
                     kMaxShmNameBytes - 1, " bytes without '/' (for example /medakv-client-123)"));
  }
  return absl::OkStatus();
}


// The address of an IPv4 or IPv6 peer ("ipv4:127.0.0.1:5", "ipv6:[::1]:5",
// "ipv6:%5B::1%5D:5"), without the port.
absl::string_view PeerHost(absl::string_view peer) {
  absl::string_view rest = peer.substr(peer.find(':') + 1);
  if (absl::ConsumePrefix(&rest, "[") || absl::ConsumePrefix(&rest, "%5B") || absl::ConsumePrefix(&rest, "%5b")) {
    size_t end = rest.find(']');
    if (end == absl::string_view::npos) end = rest.find('%');
    return rest.substr(0, end);
  }
  return rest.substr(0, rest.rfind(':'));
}

bool IsLoopbackV4(absl::string_view host) {
  std::vector<absl::string_view> parts = absl::StrSplit(host, '.');
  int first = 0;
  return parts.size() == 4 && absl::SimpleAtoi(parts[0], &first) && first == 127;
}

}  // namespace

bool GuardedCopy(void* dst, const void* src, size_t n, const void* guard, size_t guard_bytes) {
  absl::call_once(g_install_once, InstallSigbusHandler);
  FaultGuard fault;
  fault.lo = reinterpret_cast<uintptr_t>(guard);
  fault.hi = fault.lo + guard_bytes;
  if (sigsetjmp(fault.jump, /*savemask=*/1) != 0) {
    t_guard = nullptr;
    return false;
  }
  t_guard = &fault;
  std::atomic_signal_fence(std::memory_order_seq_cst);
  std::memcpy(dst, src, n);
  std::atomic_signal_fence(std::memory_order_seq_cst);
  t_guard = nullptr;
  return true;
}

bool IsLocalPeer(absl::string_view peer) {
  // gRPC 1.51's in-process transport has no peer address: "unknown" (every
  // TCP and Unix-socket connection has one).
  if (absl::StartsWith(peer, "unix:") || absl::StartsWith(peer, "unix-abstract:") || peer == "unknown" ||
      peer == "inproc" || absl::StartsWith(peer, "inproc:")) {
    return true;
  }
  if (absl::StartsWith(peer, "ipv4:")) return IsLoopbackV4(PeerHost(peer));
  if (absl::StartsWith(peer, "ipv6:")) {
    absl::string_view host = PeerHost(peer);
    if (host == "::1" || host == "0:0:0:0:0:0:0:1") return true;
    return (absl::ConsumePrefix(&host, "::ffff:") || absl::ConsumePrefix(&host, "::FFFF:")) && IsLoopbackV4(host);
  }
  return false;
}

// ---- MappedRegion ------------------------------------------------------------------

MappedRegion::MappedRegion(std::string name, std::string shm_name, int64_t size, void* base)
    : name_(std::move(name)), shm_name_(std::move(shm_name)), size_(size), base_(base) {}

MappedRegion::~MappedRegion() { munmap(base_, static_cast<size_t>(size_)); }

absl::StatusOr<std::shared_ptr<MappedRegion>> MappedRegion::Map(std::string region, std::string shm_name,
                                                                int64_t size) {
  MEDAKV_RETURN_IF_ERROR(ValidateShmName(shm_name));
  if (size <= 0) return absl::InvalidArgumentError(absl::StrCat("size must be > 0, got ", size));
  const int fd = shm_open(shm_name.c_str(), O_RDWR, 0);
  if (fd < 0) {
    const int err = errno;
    return absl::ErrnoToStatus(err, absl::StrCat("shm_name '", shm_name, "': cannot open the shared-memory object",
                                         err == ENOENT ? " (the client creates it before registering)" : ""));
  }
  struct stat st {};
  if (fstat(fd, &st) != 0) {
    const int err = errno;
    close(fd);
    return absl::ErrnoToStatus(err, absl::StrCat("shm_name '", shm_name, "': fstat"));
  }
  if (!S_ISREG(st.st_mode)) {
    close(fd);
    return absl::InvalidArgumentError(absl::StrCat("shm_name '", shm_name, "' is not a shared-memory object"));
  }
  if (st.st_size < size) {
    close(fd);
    return absl::InvalidArgumentError(absl::StrCat("size ", size, " is larger than the shared-memory object '",
                                                   shm_name, "' (", st.st_size, " bytes)"));
  }
  void* base = mmap(nullptr, static_cast<size_t>(size), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  const int err = errno;
  close(fd);  // the mapping keeps the object
  if (base == MAP_FAILED) return absl::ErrnoToStatus(err, absl::StrCat("shm_name '", shm_name, "': mmap of ", size, " bytes"));
  return std::shared_ptr<MappedRegion>(new MappedRegion(std::move(region), std::move(shm_name), size, base));
}

absl::Status MappedRegion::Read(int64_t offset, int64_t n, void* dst) const {
  const auto* src = static_cast<const uint8_t*>(base_) + offset;
  if (GuardedCopy(dst, src, static_cast<size_t>(n), base_, static_cast<size_t>(size_))) return absl::OkStatus();
  return absl::FailedPreconditionError(
      absl::StrCat("reading bytes [", offset, ", ", offset + n, ") of shared-memory region '", name_,
                   "' faulted: its object '", shm_name_, "' was truncated below the registered size ", size_));
}

absl::Status MappedRegion::Write(int64_t offset, const void* src, int64_t n) const {
  auto* dst = static_cast<uint8_t*>(base_) + offset;
  if (GuardedCopy(dst, src, static_cast<size_t>(n), base_, static_cast<size_t>(size_))) return absl::OkStatus();
  return absl::FailedPreconditionError(
      absl::StrCat("writing bytes [", offset, ", ", offset + n, ") of shared-memory region '", name_,
                   "' faulted: its object '", shm_name_, "' was truncated below the registered size ", size_,
                   " (or its file system is full)"));
}

// ---- SharedMemoryRegistry ---------------------------------------------------------

std::string TenantShmPrefix(absl::string_view tenant) {
  return tenant.empty() ? std::string() : absl::StrCat("/medakv:", tenant, ":");
}

SharedMemoryRegistry::SharedMemoryRegistry(int64_t max_bytes, int max_regions)
    : max_bytes_(max_bytes), max_regions_(max_regions) {}

std::string SharedMemoryRegistry::Key(absl::string_view tenant, absl::string_view region) {
  return tenant.empty() ? std::string(region) : absl::StrCat(tenant, absl::string_view("\0", 1), region);
}

absl::StatusOr<uint64_t> SharedMemoryRegistry::Register(const v1::RegisterSharedMemoryRequest& request,
                                                        Revoke revoke, absl::string_view tenant) {
  MEDAKV_RETURN_IF_ERROR(ValidateRegionName(request.region(), "region"));
  MEDAKV_RETURN_IF_ERROR(ValidateShmName(request.shm_name()));
  if (request.size() <= 0) return absl::InvalidArgumentError(absl::StrCat("size must be > 0, got ", request.size()));
  if (const std::string prefix = TenantShmPrefix(tenant); !absl::StartsWith(request.shm_name(), prefix)) {
    return absl::PermissionDeniedError(absl::StrCat("shm_name '", absl::CEscape(request.shm_name()),
                                                    "': with authentication, a tenant's objects are named ", prefix,
                                                    "... (see docs/shared_memory.md)"));
  }
  const std::string key = Key(tenant, request.region());
  absl::MutexLock lock(&mu_);
  if (shut_down_) return absl::UnavailableError("the server is shutting down");
  if (entries_.contains(key)) {
    return absl::AlreadyExistsError(
        absl::StrCat("region '", request.region(), "' is registered already (region names are unique per tenant)"));
  }
  if (static_cast<int64_t>(entries_.size()) >= max_regions_) {
    return absl::ResourceExhaustedError(
        absl::StrCat("region '", request.region(), "': ", entries_.size(), " regions are registered, the most ",
                     "--max_shm_regions=", max_regions_, " allows"));
  }
  if (request.size() > max_bytes_ - bytes_) {
    return absl::ResourceExhaustedError(absl::StrCat("size ", request.size(), " with the ", bytes_,
                                                     " bytes registered already is over --max_shm_bytes=",
                                                     max_bytes_));
  }
  // Under the lock, so that two registrations of one name cannot both map;
  // shm_open and mmap do not block.
  MEDAKV_ASSIGN_OR_RETURN(std::shared_ptr<MappedRegion> region,
                          MappedRegion::Map(request.region(), request.shm_name(), request.size()));
  const uint64_t lease = next_lease_++;
  bytes_ += region->size();
  entries_.emplace(key, Entry{std::move(region), lease, std::move(revoke)});
  return lease;
}

absl::Status SharedMemoryRegistry::Unregister(absl::string_view region, absl::string_view tenant) {
  Revoke revoke;
  {
    absl::MutexLock lock(&mu_);
    auto it = entries_.find(Key(tenant, region));
    if (it == entries_.end()) {
      return absl::NotFoundError(absl::StrCat("region '", region, "' is not registered"));
    }
    bytes_ -= it->second.region->size();
    revoke = std::move(it->second.revoke);
    entries_.erase(it);
  }
  if (revoke) revoke(absl::OkStatus());
  return absl::OkStatus();
}

void SharedMemoryRegistry::Remove(absl::string_view region, uint64_t lease, absl::string_view tenant) {
  std::shared_ptr<MappedRegion> unmapped_outside_the_lock;
  Revoke dropped;
  absl::MutexLock lock(&mu_);
  auto it = entries_.find(Key(tenant, region));
  if (it == entries_.end() || it->second.lease != lease) return;
  bytes_ -= it->second.region->size();
  unmapped_outside_the_lock = std::move(it->second.region);
  dropped = std::move(it->second.revoke);
  entries_.erase(it);
}

void SharedMemoryRegistry::Shutdown() {
  std::map<std::string, Entry, std::less<>> entries;
  {
    absl::MutexLock lock(&mu_);
    shut_down_ = true;
    entries.swap(entries_);
    bytes_ = 0;
  }
  for (auto& [name, entry] : entries) {
    if (entry.revoke) entry.revoke(absl::UnavailableError("the server is shutting down"));
  }
}

absl::StatusOr<std::shared_ptr<MappedRegion>> SharedMemoryRegistry::Find(absl::string_view region,
                                                                         absl::string_view field,
                                                                         absl::string_view tenant) const {
  absl::MutexLock lock(&mu_);
  auto it = entries_.find(Key(tenant, region));
  if (it == entries_.end()) {
    return absl::NotFoundError(absl::StrCat(field, " '", absl::CEscape(region),
                                            "' is not a registered shared-memory region"));
  }
  return it->second.region;
}

int SharedMemoryRegistry::regions() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int>(entries_.size());
}

int64_t SharedMemoryRegistry::registered_bytes() const {
  absl::MutexLock lock(&mu_);
  return bytes_;
}

// ---- CallRegions --------------------------------------------------------------------

absl::StatusOr<const MappedRegion*> CallRegions::Check(const v1::SharedMemoryRef& ref, absl::string_view field) {
  MEDAKV_RETURN_IF_ERROR(access_);
  const MappedRegion* region = nullptr;
  for (const std::shared_ptr<MappedRegion>& held : held_) {
    if (held->name() == ref.region()) region = held.get();
  }
  if (region == nullptr) {
    MEDAKV_ASSIGN_OR_RETURN(std::shared_ptr<MappedRegion> found,
                            registry_->Find(ref.region(), absl::StrCat(field, ".region"), tenant_));
    region = found.get();
    held_.push_back(std::move(found));
  }
  if (ref.offset() < 0) {
    return absl::InvalidArgumentError(absl::StrCat(field, ".offset must be >= 0, got ", ref.offset()));
  }
  if (ref.length() <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(field, ".length must be > 0, got ", ref.length()));
  }
  if (ref.offset() > region->size() || ref.length() > region->size() - ref.offset()) {
    return absl::InvalidArgumentError(absl::StrCat(field, ".offset ", ref.offset(), " + ", field, ".length ",
                                                   ref.length(), " runs past the end of region '", ref.region(),
                                                   "' (", region->size(), " bytes)"));
  }
  return region;
}

absl::Status CallRegions::AddChunk(const v1::TensorChunk& chunk, CacheAssembler* assembler) {
  if (!chunk.has_shm()) return assembler->Add(chunk);
  const v1::SharedMemoryRef& ref = chunk.shm();
  MEDAKV_ASSIGN_OR_RETURN(const MappedRegion* region, Check(ref, "chunk.shm"));
  return assembler->AddFrom(chunk.layer(), chunk.tensor(), chunk.offset(), ref.length(),
                            [&](void* dst, int64_t size) { return region->Read(ref.offset(), size, dst); });
}

}  // namespace medakv::server
