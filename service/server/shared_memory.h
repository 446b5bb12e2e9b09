// The server side of the shared-memory data plane (docs/shared_memory.md):
// POSIX shared-memory objects mapped by name, the server's registry of them,
// copies that survive a client shrinking its object, and the regions one call
// uses. Linux (shm_open, mmap).
//
// Lifetime: the registry holds a shared_ptr to each registered region and
// every call that resolves a ref holds one too, until the call ends; the
// mapping goes away with the last holder. Unregistering a region therefore
// never pulls memory from under a call that already uses it.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "medakv/v1/medakv.pb.h"
#include "service/server/assembler.h"

namespace medakv::server {

// A POSIX shared-memory object mapped read-write (MAP_SHARED) from its start.
// Unmapped on destruction.
class MappedRegion {
 public:
  // shm_open(shm_name, O_RDWR), fstat, mmap(size). Errors name the fields of
  // RegisterSharedMemoryRequest: INVALID_ARGUMENT for a shm_name that is not
  // "/name" (one leading '/', no other, at most 255 bytes, not "/." or
  // "/.."), size <= 0, an object that is not a regular file or is smaller
  // than `size`; NOT_FOUND when no object has that name; PERMISSION_DENIED
  // when the server may not open it read-write; RESOURCE_EXHAUSTED when the
  // mapping fails for lack of memory; INTERNAL otherwise.
  [[nodiscard]] static absl::StatusOr<std::shared_ptr<MappedRegion>> Map(std::string region, std::string shm_name,
                                                                         int64_t size);
  ~MappedRegion();
  MappedRegion(const MappedRegion&) = delete;
  MappedRegion& operator=(const MappedRegion&) = delete;

  const std::string& name() const { return name_; }
  const std::string& shm_name() const { return shm_name_; }
  int64_t size() const { return size_; }

  // Copy bytes [offset, offset + n) of the region out of it / into it. The
  // range must lie inside the region (the caller checked the ref). If the
  // memory faults (the client truncated the object after registering it):
  // FAILED_PRECONDITION and the copy is partial.
  [[nodiscard]] absl::Status Read(int64_t offset, int64_t n, void* dst) const;
  [[nodiscard]] absl::Status Write(int64_t offset, const void* src, int64_t n) const;

 private:
  MappedRegion(std::string name, std::string shm_name, int64_t size, void* base);

  const std::string name_;
  const std::string shm_name_;
  const int64_t size_;
  void* const base_;
};

// Copies n bytes, catching the SIGBUS of a mapping whose object shrank when
// the faulting address lies in [guard, guard + guard_bytes): then false, and
// the copy is partial. Installs a process-wide SIGBUS handler on first use
// that passes every other fault on to the handler that was there before.
[[nodiscard]] bool GuardedCopy(void* dst, const void* src, size_t n, const void* guard, size_t guard_bytes);

// Whether a gRPC peer string (ServerContext::peer()) is on this node:
// loopback IPv4 (127.0.0.0/8) or IPv6 (::1, ::ffff:127.x.y.z), a Unix socket,
// or the in-process transport (whose peer gRPC 1.51 reports as "unknown").
bool IsLocalPeer(absl::string_view peer);

// The prefix that a tenant's shared-memory object names must have when the
// server authenticates callers: "/medakv:TENANT:" (tenants cannot contain ':',
// so no tenant's prefix is another's). Without it a tenant could have the
// server open another tenant's object (the server may open what its own user
// can) and read it through a call. Empty for the "" tenant: any name.
std::string TenantShmPrefix(absl::string_view tenant);

// The regions registered with one server, by tenant and client-chosen name:
// a tenant sees only its own regions (another tenant's name is NOT_FOUND, and
// two tenants may use the same name). The "" tenant is the server without
// authentication.
class SharedMemoryRegistry {
 public:
  // Called once, outside the registry's lock, when Unregister (OK) or
  // Shutdown (UNAVAILABLE) ends a registration; never by Remove.
  using Revoke = std::function<void(const absl::Status&)>;

  // At most `max_regions` regions and `max_bytes` bytes (the sum of their
  // sizes) registered at once.
  SharedMemoryRegistry(int64_t max_bytes, int max_regions);
  SharedMemoryRegistry(const SharedMemoryRegistry&) = delete;
  SharedMemoryRegistry& operator=(const SharedMemoryRegistry&) = delete;

  // Validates the request, maps the object and registers it; returns the
  // lease id that Remove takes. Checks, in order (fields named as in the
  // request): INVALID_ARGUMENT for a region name that is not 1-256 bytes of
  // [A-Za-z0-9._:/-], a bad shm_name or a size <= 0; PERMISSION_DENIED for
  // a tenant's shm_name without TenantShmPrefix(tenant); UNAVAILABLE after
  // Shutdown; ALREADY_EXISTS for a name the tenant uses; RESOURCE_EXHAUSTED over
  // max_regions, or when the size with the regions registered already is
  // over max_bytes; then MappedRegion::Map's errors (the object is opened
  // only for a request that may be registered).
  [[nodiscard]] absl::StatusOr<uint64_t> Register(const v1::RegisterSharedMemoryRequest& request, Revoke revoke,
                                                  absl::string_view tenant = "");
  // Unregisters the tenant's `region` and runs its Revoke with OK. NOT_FOUND
  // if it is not registered.
  [[nodiscard]] absl::Status Unregister(absl::string_view region, absl::string_view tenant = "");
  // Unregisters the tenant's `region` if it is still registered under `lease`
  // (a later registration of the same name is left alone); its Revoke does
  // not run.
  void Remove(absl::string_view region, uint64_t lease, absl::string_view tenant = "");
  // Unregisters every region (Revoke with UNAVAILABLE); Register fails from
  // now on.
  void Shutdown();

  // The tenant's region registered as `region`; NOT_FOUND naming `field`
  // otherwise.
  [[nodiscard]] absl::StatusOr<std::shared_ptr<MappedRegion>> Find(absl::string_view region, absl::string_view field,
                                                                   absl::string_view tenant = "") const;

  int regions() const;
  int64_t registered_bytes() const;

 private:
  struct Entry {
    std::shared_ptr<MappedRegion> region;
    uint64_t lease = 0;
    Revoke revoke;
  };

  // The key of (tenant, region) in entries_: the region alone for the ""
  // tenant, else tenant + '\0' + region.
  static std::string Key(absl::string_view tenant, absl::string_view region);

  const int64_t max_bytes_;
  const int max_regions_;
  mutable absl::Mutex mu_;
  std::map<std::string, Entry, std::less<>> entries_ ABSL_GUARDED_BY(mu_);  // by Key()
  int64_t bytes_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t next_lease_ ABSL_GUARDED_BY(mu_) = 1;
  bool shut_down_ ABSL_GUARDED_BY(mu_) = false;
};

// The regions one call uses: each looked up in the registry on its first use
// and held until this object is destroyed (the call ends), so that a region
// unregistered meanwhile stays mapped for the call. Not thread-safe: a call
// uses it from one thread at a time.
class CallRegions {
 public:
  // `access`: OK when the caller may use shared memory, else the status every
  // ref gets (PERMISSION_DENIED for a remote peer). `tenant`: the caller's;
  // only its regions resolve.
  CallRegions(const SharedMemoryRegistry* registry, absl::Status access, std::string tenant = "")
      : registry_(registry), access_(std::move(access)), tenant_(std::move(tenant)) {}

  // Resolves and checks a ref: the caller's access status; NOT_FOUND when
  // the region is not registered (and this call does not hold it);
  // INVALID_ARGUMENT naming `field` ("chunk.shm.offset must be >= 0, got
  // -1") for offset < 0, length <= 0 or a range past the region's end
  // (overflow-safe).
  [[nodiscard]] absl::StatusOr<const MappedRegion*> Check(const v1::SharedMemoryRef& ref, absl::string_view field);

  // Adds a chunk to `assembler`: its bytes, or the bytes its ref points at
  // (checked with Check, field "chunk.shm"; the assembler's chunk rules apply
  // with shm.length as the chunk's size).
  [[nodiscard]] absl::Status AddChunk(const v1::TensorChunk& chunk, CacheAssembler* assembler);

  // An upload message after the header (CompressRequest or PutCacheRequest):
  // must be a chunk, which is added as by AddChunk.
  template <typename Request>
  [[nodiscard]] absl::Status AddChunkMessage(const Request& request, CacheAssembler* assembler) {
    if (!request.has_chunk()) {
      return absl::InvalidArgumentError(request.has_header() ? "a second header: the header comes once, first"
                                                             : "empty request message");
    }
    return AddChunk(request.chunk(), assembler);
  }

 private:
  const SharedMemoryRegistry* registry_;
  absl::Status access_;
  std::string tenant_;
  std::vector<std::shared_ptr<MappedRegion>> held_;
};

}  // namespace medakv::server
