// The cache store: a thread-safe in-memory map from client-chosen ids to KV
// caches, with a byte budget per tier (host memory and, on GPU backends, the
// device), least-recently-used eviction and per-entry expiry (docs/design.md, "The
// cache store"; the PutCache, CompressCache, GetCache, DeleteCache, ListCaches
// and Stats calls of proto/medakv/v1/medakv.proto sit on top of it).
//
// Entries. A StoredCache is immutable once committed: readers hold a
// std::shared_ptr<const StoredCache> and may keep streaming it after it was
// evicted, deleted, overwritten or replaced by its compressed form.
//
// Byte accounting is exact at all times. For each tier,
//   used_bytes = bytes reserved by uploads in progress
//              + bytes of every StoredCache object alive (in the map, or
//                removed from it but still held by a reader).
// A cache's bytes are charged when it is committed from a reservation and
// released by the shared_ptr's deleter when the last reference drops. The
// counters live in an accounting object shared by the store, its reservations
// and the deleters, guarded by its own mutex (a leaf lock), so a deleter never
// takes the store's mutex and works even after the store is destroyed.
//
// Writes go in two steps so that an upload's memory is accounted before its
// bytes arrive:
//   MEDAKV_ASSIGN_OR_RETURN(Reservation r, store.Reserve(Tier::kHost, bytes));
//   ... receive the tensors into a StoredCache ...
//   MEDAKV_ASSIGN_OR_RETURN(CacheSummary info, store.Commit(std::move(r), std::move(cache), overwrite, ttl));
// Reserve makes room by dropping expired entries, then evicting the least
// recently used entries of the tier that nobody references (an entry whose
// shared_ptr use_count() is 1 under the store mutex is referenced only by the
// map; new references are only made under the mutex). It evicts nothing unless
// that makes enough room, never evicts a referenced entry, and answers
// RESOURCE_EXHAUSTED with the numbers when the request exceeds the tier's
// capacity or when referenced entries and other reservations leave too little.
// A Reservation destroyed without a commit releases its bytes, so a cancelled
// upload frees everything.
//
// Compression in place (CompressCache) reads an entry, compresses it without
// any lock held, then swaps the result in with Replace, a compare-and-swap on
// the entry's identity: ABORTED when the entry was overwritten or replaced
// meanwhile, NOT_FOUND when it was deleted or expired. The new object's bytes
// are reserved internally (evicting other unreferenced entries if needed); the
// old object's bytes count as room when the caller moves its last reference in.
//
// Tenants. Every entry belongs to a tenant (StoredCache::tenant; "" when the
// server has no authentication): ids are unique per tenant, and every lookup
// names the tenant, so one tenant's Get, Contains, List and Delete never see
// another's entries (the same id under two tenants is two entries). Eviction
// and the byte budgets are shared by all tenants. The one-argument forms are
// the "" tenant's.
//
// Tiers (docs/store.md). A host-tier entry keeps its buffers in its
// StoredLayer vectors; a device-tier entry is in device form (MoveToDevice:
// the buffers in device memory, StoredCache::device). Commit, Put and Replace
// take only the form of the tier (FAILED_PRECONDITION otherwise); HostCopy
// reads either form. The store itself never copies between tiers.
//
// Expired entries are invisible and are reclaimed at the start of every call
// that takes the store mutex (no background thread). Big buffers are never
// copied and never freed with the store mutex held: removed entries are
// dropped after it is released.
#pragma once

#include <cstdint>
#include <functional>
#include <list>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "kernels/common/device_memory.h"
#include "kernels/common/dtype.h"
#include "kernels/common/tensor.h"
#include "service/compress/pipeline.h"

namespace medakv {

enum class Tier : uint8_t { kHost = 0, kDevice = 1 };
inline constexpr int kNumTiers = 2;
const char* TierName(Tier tier);  // "host", "device"

// Ids are chosen by the client: 1-256 bytes of [A-Za-z0-9._:/-].
inline constexpr size_t kMaxCacheIdBytes = 256;
// INVALID_ARGUMENT naming the (escaped) id and what is wrong with it.
[[nodiscard]] absl::Status ValidateCacheId(absl::string_view id);

// Tenants are "" (no authentication) or 1-64 bytes of [A-Za-z0-9._-].
inline constexpr size_t kMaxTenantBytes = 64;
// INVALID_ARGUMENT naming the (escaped) tenant and what is wrong with it.
[[nodiscard]] absl::Status ValidateTenant(absl::string_view tenant);

// Which attention statistics are kept with a cache for a later compression.
enum class KeptStats : uint8_t {
  kNone = 0,         // keys and values only
  kQueries = 1,      // StoredLayer::query (+ query_positions)
  kPrecomputed = 2,  // StoredLayer::scores + score_entropy
};

// The shape of a cache, as uploaded (CacheShape in the proto).
struct CacheDescription {
  int64_t layers = 0;
  int64_t kv_heads = 0;
  int64_t q_heads = 0;  // may be 0 unless queries are kept
  int64_t head_dim = 0;
  int64_t tokens = 0;  // tokens of the uploaded (uncompressed) cache
  DType dtype = DType::kFloat16;
  Layout layout = Layout::kHND;
  std::vector<ModalitySpan> modality;  // tokens outside every span are text
};

struct StoredLayer {
  // [kv_heads, tokens, head_dim] (HND) or [tokens, kv_heads, head_dim] (NHD), in the cache's dtype.
  std::vector<uint8_t> key;
  std::vector<uint8_t> value;
  // [kv_heads, tokens]: the original position of every kept token, ascending
  // per head. May be empty when the layer is uncompressed (tokens ==
  // description.tokens): positions 0..tokens-1 for every head.
  std::vector<int32_t> positions;
  int64_t tokens = 0;    // tokens kept per kv head (B_l once compressed)
  float entropy = 0.f;   // E_l of the compression that produced the layer
  double alpha = 1.0;    // alpha_l
  // Statistics kept for a later compression (StoredCache::stats):
  std::vector<uint8_t> query;            // kQueries: [q_heads, q_tokens, head_dim], dtype and layout of the cache
  std::vector<int32_t> query_positions;  // kQueries: [q_tokens]; empty means the last q_tokens positions
  std::vector<float> query_outside_lse;  // kQueries: [q_heads, q_tokens] or empty (LayerInput's)
  std::vector<float> scores;             // kPrecomputed: [score_heads, tokens]
  float score_entropy = 0.f;             // kPrecomputed: the worker's entropy of the layer
};

// A device-tier layer: its key, value, positions, query and scores back to
// back in one device block, in that order (MoveToDevice, HostCopy).
struct DeviceLayer {
  DeviceBlock block;
  int64_t key_bytes = 0, value_bytes = 0, positions_bytes = 0, query_bytes = 0, scores_bytes = 0;
};

struct StoredCache {
  std::string tenant;  // "" without authentication; never shown to other tenants
  std::string id;
  CacheDescription description;
  KeptStats stats = KeptStats::kNone;
  int64_t q_tokens = 0;     // kQueries: query rows per layer
  int64_t score_heads = 0;  // kPrecomputed: kv_heads or q_heads
  std::vector<StoredLayer> layers;
  // Device form (device tier): one DeviceLayer per layer holding the big
  // buffers, whose StoredLayer vectors key, value, positions, query and
  // scores are then empty (the scalars, query_positions and
  // query_outside_lse stay in `layers`). Host form (host tier): empty.
  std::vector<DeviceLayer> device;
  bool compressed = false;
  std::string policy;  // the policy that compressed it, if any

  // Set by the store when the cache is committed (Replace keeps created and
  // expires of the entry it replaces).
  absl::Time created = absl::InfinitePast();
  absl::Time expires = absl::InfiniteFuture();  // InfiniteFuture: never
  Tier tier = Tier::kHost;
  int64_t bytes = 0;  // ComputeBytes()

  // The sum of the sizes of every buffer (keys, values, positions,
  // statistics) and of its modality spans (sizeof(ModalitySpan) each, kept
  // in host memory in either form), the same in either form.
  int64_t ComputeBytes() const;
  bool on_device() const { return !device.empty(); }
};

// Every buffer consistent with the description and the kept statistics;
// INVALID_ARGUMENT naming the layer and the field. In device form only the
// sizes are checked (the contents were checked by MoveToDevice).
[[nodiscard]] absl::Status ValidateStoredCache(const StoredCache& cache);

// The device form of a valid host-form cache: validates it, copies every
// layer's buffers into a block of `memory` and frees the host buffers.
// RESOURCE_EXHAUSTED when the device has no room (nothing is kept then);
// INVALID_ARGUMENT for an invalid cache, FAILED_PRECONDITION for one already
// on a device.
[[nodiscard]] absl::StatusOr<std::unique_ptr<StoredCache>> MoveToDevice(std::unique_ptr<StoredCache> cache,
                                                                        DeviceMemory& memory);

// A host-form copy of `cache` (of either form) with the same metadata, whose
// layers outside [layer_begin, layer_end) are left empty (layer_end 0: every
// layer; a partial copy is for reading those layers, not for storing).
// INVALID_ARGUMENT for a range outside the cache.
[[nodiscard]] absl::StatusOr<std::unique_ptr<StoredCache>> HostCopy(const StoredCache& cache,
                                                                    int64_t layer_begin = 0, int64_t layer_end = 0);

// What ListCaches, PutCache and CompressCache report about an entry
// (CacheInfo in the proto): everything but the buffers.
struct CacheSummary {
  std::string tenant;
  std::string id;
  CacheDescription description;
  KeptStats stats = KeptStats::kNone;
  int64_t bytes = 0;
  std::vector<int64_t> layer_tokens;
  bool compressed = false;
  std::string policy;
  absl::Time created = absl::InfinitePast();
  absl::Time expires = absl::InfiniteFuture();
  Tier tier = Tier::kHost;
};
CacheSummary Summarize(const StoredCache& cache);

// FAILED_PRECONDITION when the cache is already compressed or was stored
// without statistics.
[[nodiscard]] absl::Status CheckCompressible(const StoredCache& cache);

// Views of a stored, uncompressed cache with its kept statistics, ready for
// Compress(). The views point into `cache`: keep the shared_ptr alive while
// the input is used. FAILED_PRECONDITION when CheckCompressible fails or the
// cache is in device form (compress its HostCopy).
[[nodiscard]] absl::StatusOr<CacheInput> CompressionInput(const StoredCache& cache);

// The compressed form of `original` for Replace: same tenant, id and description,
// the result's layers, no statistics, `compressed` set and `policy` named.
std::unique_ptr<StoredCache> MakeCompressedCache(const StoredCache& original, CompressResult result,
                                                 std::string policy);

struct StoreOptions {
  int64_t host_capacity_bytes = 0;
  int64_t device_capacity_bytes = 0;  // 0: no device tier (CPU backend)
  std::function<absl::Time()> clock = [] { return absl::Now(); };  // injectable for tests
};

struct TierStats {
  Tier tier = Tier::kHost;
  int64_t capacity_bytes = 0;
  int64_t used_bytes = 0;      // reserved + stored + held
  int64_t reserved_bytes = 0;  // uploads in progress
  int64_t stored_bytes = 0;    // entries in the map
  int64_t held_bytes = 0;      // removed from the map (evicted, deleted, overwritten, replaced) but still read
  int64_t entries = 0;
  int64_t evicted_lru = 0;  // evicted to make room
  int64_t expired = 0;      // reclaimed after their ttl
  int64_t deleted = 0;      // removed by Delete
  int64_t evictions() const { return evicted_lru + expired; }
};

namespace store_internal {
class Accounting;
}  // namespace store_internal

// Bytes of one tier held for an upload in progress. Move-only; destroying it
// (or Cancel) without a commit releases the bytes. Works after the store that
// made it is destroyed.
class Reservation {
 public:
  Reservation() = default;
  Reservation(Reservation&& other) noexcept;
  Reservation& operator=(Reservation&& other) noexcept;
  Reservation(const Reservation&) = delete;
  Reservation& operator=(const Reservation&) = delete;
  ~Reservation();

  bool valid() const { return accounting_ != nullptr; }
  Tier tier() const { return tier_; }
  int64_t bytes() const { return bytes_; }
  // Releases the bytes now; the reservation becomes invalid.
  void Cancel();

 private:
  friend class CacheStore;
  Reservation(std::shared_ptr<store_internal::Accounting> accounting, Tier tier, int64_t bytes)
      : accounting_(std::move(accounting)), tier_(tier), bytes_(bytes) {}

  std::shared_ptr<store_internal::Accounting> accounting_;
  Tier tier_ = Tier::kHost;
  int64_t bytes_ = 0;
};

class CacheStore {
 public:
  // Negative capacities count as 0.
  explicit CacheStore(StoreOptions options);
  ~CacheStore();
  CacheStore(const CacheStore&) = delete;
  CacheStore& operator=(const CacheStore&) = delete;

  bool has_tier(Tier tier) const { return capacity(tier) > 0; }
  int64_t capacity(Tier tier) const { return capacity_[static_cast<int>(tier)]; }
  // Exact: reservations plus every live StoredCache of the tier.
  int64_t used_bytes(Tier tier) const;

  // RESOURCE_EXHAUSTED, with the numbers, when an entry of `bytes` exceeds
  // the tier's whole capacity (evicting everything would not make room).
  [[nodiscard]] absl::Status CheckFits(Tier tier, int64_t bytes) const;

  // Holds `bytes` of `tier` for an upload, evicting as described above.
  // INVALID_ARGUMENT for negative bytes; FAILED_PRECONDITION for a tier the
  // store does not have; RESOURCE_EXHAUSTED when room cannot be made.
  [[nodiscard]] absl::StatusOr<Reservation> Reserve(Tier tier, int64_t bytes);

  // Grows a reservation of this store to `bytes` in all (no-op when it holds
  // as much already), evicting as Reserve does: an upload reserves as its
  // bytes arrive, so a header alone evicts nothing. Errors as Reserve's (the
  // reservation keeps what it held); FAILED_PRECONDITION for a reservation
  // that is not this store's or was used.
  [[nodiscard]] absl::Status Grow(Reservation& reservation, int64_t bytes);

  // Stores `cache` under (cache->tenant, cache->id) in the reservation's tier. The reservation
  // is always consumed: on success the unused part (reservation - the cache's
  // ComputeBytes()) is released, on failure all of it. ALREADY_EXISTS when
  // the id is stored (and not expired) and `overwrite` is false; with
  // `overwrite` the old entry is displaced (readers keep it). `ttl` <= 0 means
  // no expiry. INVALID_ARGUMENT for an invalid cache, FAILED_PRECONDITION for
  // a reservation that is smaller than the cache, used, or from another store.
  [[nodiscard]] absl::StatusOr<CacheSummary> Commit(Reservation reservation, std::unique_ptr<StoredCache> cache,
                                                    bool overwrite, absl::Duration ttl);

  // Reserve(tier, cache->ComputeBytes()) then Commit.
  [[nodiscard]] absl::StatusOr<CacheSummary> Put(Tier tier, std::unique_ptr<StoredCache> cache, bool overwrite,
                                                 absl::Duration ttl);

  // The tenant's entry, marked most recently used. NOT_FOUND when absent or
  // expired (also when another tenant has an entry of that id).
  [[nodiscard]] absl::StatusOr<std::shared_ptr<const StoredCache>> Get(absl::string_view tenant, absl::string_view id);
  [[nodiscard]] absl::StatusOr<std::shared_ptr<const StoredCache>> Get(absl::string_view id) { return Get("", id); }

  // Whether the tenant's `id` is stored and not expired; does not touch the
  // LRU order. For a fail-fast ALREADY_EXISTS check before an upload.
  bool Contains(absl::string_view tenant, absl::string_view id);
  bool Contains(absl::string_view id) { return Contains("", id); }

  // Summaries of the tenant's entries whose id starts with `prefix` (and,
  // when `after` is not empty, sorts after it), sorted by id, at most `limit`
  // of them (limit <= 0: all). Does not touch the LRU order.
  std::vector<CacheSummary> List(absl::string_view tenant, absl::string_view prefix, int64_t limit,
                                 absl::string_view after = "");
  std::vector<CacheSummary> List(absl::string_view prefix, int64_t limit) { return List("", prefix, limit); }

  // Removes the tenant's entry. Returns its bytes: freed now, or when the last
  // reader still holding it drops it. NOT_FOUND when absent or expired.
  [[nodiscard]] absl::StatusOr<int64_t> Delete(absl::string_view tenant, absl::string_view id);
  [[nodiscard]] absl::StatusOr<int64_t> Delete(absl::string_view id) { return Delete("", id); }

  // Replaces the entry of `expected` with `next` if it is still the object
  // `expected` (compare-and-swap). `next` takes the entry's tenant, tier,
  // created and expires times; its id must be empty (then set) or equal. Move your last
  // reference into `expected`: when nobody else holds the old object, its bytes
  // count as room for `next`. ABORTED when the entry changed meanwhile,
  // NOT_FOUND when it was deleted or expired, RESOURCE_EXHAUSTED when room
  // for `next` cannot be made, INVALID_ARGUMENT for an invalid `next`.
  [[nodiscard]] absl::StatusOr<CacheSummary> Replace(std::shared_ptr<const StoredCache> expected,
                                                     std::unique_ptr<StoredCache> next);

  // Per configured tier (host, then device if it has a capacity).
  std::vector<TierStats> Stats();

  // Reclaims expired entries now; returns how many.
  int64_t Sweep();

 private:
  struct Entry {
    std::shared_ptr<const StoredCache> cache;
    std::list<std::string>::iterator lru;  // in lru_[tier]
  };
  // The map's key of (tenant, id): the id alone for the "" tenant, else
  // tenant + '\0' + id (neither ids nor tenants contain a NUL, so keys of
  // different pairs differ).
  static std::string Key(absl::string_view tenant, absl::string_view id);
  static std::string Key(const StoredCache& cache) { return Key(cache.tenant, cache.id); }
  using EntryMap = std::map<std::string, Entry, std::less<>>;
  // Removed entries, dropped after the store mutex is released.
  using Graveyard = std::vector<std::shared_ptr<const StoredCache>>;

  static int Index(Tier tier) { return static_cast<int>(tier); }
  absl::Status CheckTier(Tier tier) const;

  // Removes expired entries; returns how many.
  int64_t SweepLocked(absl::Time now, Graveyard* graveyard) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Unlinks the entry from the map, the LRU list and the expiry index, and
  // moves it to `graveyard`; when nobody else holds it, its bytes count as
  // room from now on (they are released when the graveyard drops it).
  void RemoveLocked(EntryMap::iterator it, Graveyard* graveyard) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void InsertLocked(std::shared_ptr<const StoredCache> cache) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void TouchLocked(EntryMap::iterator it) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Ensures `bytes` fit in `tier` counting `extra_room` as free, evicting
  // unreferenced entries from the least recently used end; evicts nothing and
  // returns RESOURCE_EXHAUSTED when that cannot make enough room.
  absl::Status MakeRoomLocked(Tier tier, int64_t bytes, int64_t extra_room, Graveyard* graveyard)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // A shared_ptr whose deleter releases the bytes of `cache` (already charged).
  std::shared_ptr<const StoredCache> Own(std::unique_ptr<StoredCache> cache);

  const int64_t capacity_[kNumTiers];
  const std::function<absl::Time()> clock_;
  const std::shared_ptr<store_internal::Accounting> accounting_;

  mutable absl::Mutex mu_;
  EntryMap entries_ ABSL_GUARDED_BY(mu_);                         // by Key()
  std::list<std::string> lru_[kNumTiers] ABSL_GUARDED_BY(mu_);  // keys; front: most recently used
  std::set<std::pair<absl::Time, std::string>> expiry_ ABSL_GUARDED_BY(mu_);  // (expires, key)
  int64_t stored_bytes_[kNumTiers] ABSL_GUARDED_BY(mu_) = {0, 0};
  int64_t evicted_lru_[kNumTiers] ABSL_GUARDED_BY(mu_) = {0, 0};
  int64_t expired_[kNumTiers] ABSL_GUARDED_BY(mu_) = {0, 0};
  int64_t deleted_[kNumTiers] ABSL_GUARDED_BY(mu_) = {0, 0};
};

}  // namespace medakv
