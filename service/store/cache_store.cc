#include "service/store/cache_store.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "kernels/common/status.h"
#include "kernels/common/tensor_util.h"

namespace medakv {
namespace store_internal {

// The byte counters of every tier, shared by the store, its reservations and
// the deleters of its entries. `mu` is a leaf lock: nothing is called while it
// is held, so a deleter may run anywhere (with or without the store mutex).
class Accounting {
 public:
  struct Counters {
    int64_t used = 0;      // reserved + every live object
    int64_t reserved = 0;  // reservations not yet committed
    int64_t doomed = 0;    // live objects removed from the map that nobody holds: freed right away
  };

  Counters Get(Tier tier) const {
    absl::MutexLock lock(&mu_);
    return tiers_[static_cast<int>(tier)];
  }
  void Reserve(Tier tier, int64_t bytes) {
    absl::MutexLock lock(&mu_);
    Counters& c = tiers_[static_cast<int>(tier)];
    c.used += bytes;
    c.reserved += bytes;
  }
  void CancelReservation(Tier tier, int64_t bytes) {
    absl::MutexLock lock(&mu_);
    Counters& c = tiers_[static_cast<int>(tier)];
    c.used -= bytes;
    c.reserved -= bytes;
  }
  // A reservation of `reserved` bytes becomes an object of `bytes` <= reserved.
  void CommitReservation(Tier tier, int64_t reserved, int64_t bytes) {
    absl::MutexLock lock(&mu_);
    Counters& c = tiers_[static_cast<int>(tier)];
    c.reserved -= reserved;
    c.used -= reserved - bytes;
  }
  void ChargeObject(Tier tier, int64_t bytes) {
    absl::MutexLock lock(&mu_);
    tiers_[static_cast<int>(tier)].used += bytes;
  }
  void Doom(Tier tier, int64_t bytes) {
    absl::MutexLock lock(&mu_);
    tiers_[static_cast<int>(tier)].doomed += bytes;
  }
  void ReleaseObject(Tier tier, int64_t bytes, bool doomed) {
    absl::MutexLock lock(&mu_);
    Counters& c = tiers_[static_cast<int>(tier)];
    c.used -= bytes;
    if (doomed) c.doomed -= bytes;
  }

 private:
  mutable absl::Mutex mu_;
  Counters tiers_[kNumTiers] ABSL_GUARDED_BY(mu_);
};

}  // namespace store_internal

namespace {

using store_internal::Accounting;

// Largest size of one dimension; keeps every product below 2^62 bytes.
constexpr int64_t kMaxDim = int64_t{1} << 24;

// Releases the bytes of a committed cache when its last reference drops.
// `doomed` is set (under the store mutex, through std::get_deleter) only when
// the store removes an entry that nobody else references: the thread that
// removed it holds the last reference and runs this deleter itself.
struct CacheDeleter {
  std::shared_ptr<Accounting> accounting;
  Tier tier = Tier::kHost;
  int64_t bytes = 0;
  bool doomed = false;

  void operator()(const StoredCache* cache) const {
    delete cache;  // free the memory first, then report it free
    accounting->ReleaseObject(tier, bytes, doomed);
  }
};

std::string QuoteId(absl::string_view id) {
  constexpr size_t kShown = 64;
  std::string quoted = absl::StrCat("\"", absl::CHexEscape(id.substr(0, kShown)), "\"");
  if (id.size() > kShown) absl::StrAppend(&quoted, "...");
  return quoted;
}

bool IdChar(char c) {
  return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' || c == '_' ||
         c == ':' || c == '/' || c == '-';
}

absl::Status CheckSize(absl::string_view prefix, absl::string_view name, int64_t got, int64_t expected) {
  if (got == expected) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat(prefix, name, ": ", got, " bytes, expected ", expected));
}

absl::Status CheckPositions(absl::string_view prefix, absl::string_view name, const std::vector<int32_t>& p,
                            int64_t tokens) {
  for (size_t i = 0; i < p.size(); ++i) {
    if (p[i] < 0 || p[i] >= tokens) {
      return absl::InvalidArgumentError(
          absl::StrCat(prefix, name, "[", i, "] is ", p[i], ", outside [0, ", tokens, ")"));
    }
  }
  return absl::OkStatus();
}

// Kept positions [kv_heads, width]: each head's rows in [0, tokens), then
// only padding (-1) where the head keeps fewer than `width` (per-head
// budgets); at least one kept row per head.
absl::Status CheckKeptPositions(absl::string_view prefix, const std::vector<int32_t>& p, int64_t kv_heads,
                                int64_t width, int64_t tokens) {
  for (int64_t h = 0; h < kv_heads; ++h) {
    bool padding = false;
    for (int64_t j = 0; j < width; ++j) {
      const int64_t i = h * width + j;
      const int32_t v = p[i];
      if (v == -1 && j > 0) {
        padding = true;
        continue;
      }
      if (padding || v < 0 || v >= tokens) {
        return absl::InvalidArgumentError(absl::StrCat(prefix, "positions[", i, "] is ", v, ", outside [0, ", tokens,
                                                       ") (-1 pads a head's rows after its first kept one)"));
      }
    }
  }
  return absl::OkStatus();
}

template <typename T>
int64_t ByteSize(const std::vector<T>& v) {
  return static_cast<int64_t>(v.size() * sizeof(T));
}

// The sizes of a layer's big buffers, in either form.
struct LayerBytes {
  int64_t key = 0, value = 0, positions = 0, query = 0, scores = 0;
};

LayerBytes BytesOf(const StoredCache& cache, size_t l) {
  if (cache.on_device()) {
    const DeviceLayer& d = cache.device[l];
    return {d.key_bytes, d.value_bytes, d.positions_bytes, d.query_bytes, d.scores_bytes};
  }
  const StoredLayer& h = cache.layers[l];
  return {ByteSize(h.key), ByteSize(h.value), ByteSize(h.positions), ByteSize(h.query), ByteSize(h.scores)};
}

// A host-form layer's big buffers as bytes, in the order they lie in its
// device block (DeviceLayer: key, value, positions, query, scores).
std::array<std::pair<uint8_t*, int64_t>, 5> InBlockOrder(StoredLayer& h) {
  return {{{h.key.data(), ByteSize(h.key)},
           {h.value.data(), ByteSize(h.value)},
           {reinterpret_cast<uint8_t*>(h.positions.data()), ByteSize(h.positions)},
           {h.query.data(), ByteSize(h.query)},
           {reinterpret_cast<uint8_t*>(h.scores.data()), ByteSize(h.scores)}}};
}

// A device-tier entry keeps its buffers on the device, a host-tier one on the host.
absl::Status CheckForm(const StoredCache& cache, Tier tier) {
  if (cache.on_device() == (tier == Tier::kDevice)) return absl::OkStatus();
  return absl::FailedPreconditionError(absl::StrCat("cache ", QuoteId(cache.id), " is in ",
                                                    cache.on_device() ? "device" : "host", " form, not fit for the ",
                                                    TierName(tier), " tier (MoveToDevice, HostCopy)"));
}

// The cache's metadata (everything but the layers' buffers).
std::unique_ptr<StoredCache> MetadataCopy(const StoredCache& cache) {
  auto copy = std::make_unique<StoredCache>();
  copy->tenant = cache.tenant;
  copy->id = cache.id;
  copy->description = cache.description;
  copy->stats = cache.stats;
  copy->q_tokens = cache.q_tokens;
  copy->score_heads = cache.score_heads;
  copy->compressed = cache.compressed;
  copy->policy = cache.policy;
  copy->created = cache.created;
  copy->expires = cache.expires;
  copy->tier = cache.tier;
  copy->bytes = cache.bytes;
  copy->layers.resize(cache.layers.size());
  for (size_t l = 0; l < cache.layers.size(); ++l) {
    const StoredLayer& from = cache.layers[l];
    StoredLayer& to = copy->layers[l];
    to.tokens = from.tokens;
    to.entropy = from.entropy;
    to.alpha = from.alpha;
    to.query_positions = from.query_positions;
    to.query_outside_lse = from.query_outside_lse;
    to.score_entropy = from.score_entropy;
  }
  return copy;
}

}  // namespace

const char* TierName(Tier tier) {
  switch (tier) {
    case Tier::kHost:
      return "host";
    case Tier::kDevice:
      return "device";
  }
  return "unknown";
}

absl::Status ValidateCacheId(absl::string_view id) {
  if (id.empty() || id.size() > kMaxCacheIdBytes) {
    return absl::InvalidArgumentError(absl::StrCat("cache id ", QuoteId(id), " must be 1-", kMaxCacheIdBytes,
                                                   " bytes, got ", id.size()));
  }
  for (size_t i = 0; i < id.size(); ++i) {
    if (!IdChar(id[i])) {
      return absl::InvalidArgumentError(absl::StrCat("cache id ", QuoteId(id), ": byte ", i,
                                                     " is outside [A-Za-z0-9._:/-]"));
    }
  }
  return absl::OkStatus();
}

absl::Status ValidateTenant(absl::string_view tenant) {
  if (tenant.size() > kMaxTenantBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("tenant ", QuoteId(tenant), " must be at most ", kMaxTenantBytes, " bytes, got ", tenant.size()));
  }
  for (size_t i = 0; i < tenant.size(); ++i) {
    const char c = tenant[i];
    if (!absl::ascii_isalnum(static_cast<unsigned char>(c)) && c != '.' && c != '_' && c != '-') {
      return absl::InvalidArgumentError(
          absl::StrCat("tenant ", QuoteId(tenant), ": byte ", i, " is outside [A-Za-z0-9._-]"));
    }
  }
  return absl::OkStatus();
}

static_assert(sizeof(ModalitySpan) == 24, "CacheInfo.bytes documents 24 bytes per modality span");

int64_t StoredCache::ComputeBytes() const {
  int64_t bytes = static_cast<int64_t>(description.modality.size() * sizeof(ModalitySpan));
  for (size_t l = 0; l < layers.size(); ++l) {
    const bool missing = on_device() && l >= device.size();  // malformed: ValidateStoredCache says so
    const LayerBytes b = missing ? LayerBytes{} : BytesOf(*this, l);
    bytes += b.key + b.value + b.positions + b.query + b.scores + ByteSize(layers[l].query_positions) +
             ByteSize(layers[l].query_outside_lse);
  }
  return bytes;
}

absl::Status ValidateStoredCache(const StoredCache& cache) {
  MEDAKV_RETURN_IF_ERROR(ValidateTenant(cache.tenant));
  MEDAKV_RETURN_IF_ERROR(ValidateCacheId(cache.id));
  const CacheDescription& d = cache.description;
  const std::pair<const char*, int64_t> dims[] = {
      {"layers", d.layers}, {"kv_heads", d.kv_heads}, {"head_dim", d.head_dim}, {"tokens", d.tokens}};
  for (const auto& [name, v] : dims) {
    if (v <= 0 || v > kMaxDim) {
      return absl::InvalidArgumentError(absl::StrCat(name, " must be in [1, ", kMaxDim, "], got ", v));
    }
  }
  if (d.q_heads < 0 || d.q_heads > kMaxDim) {
    return absl::InvalidArgumentError(absl::StrCat("q_heads must be in [0, ", kMaxDim, "], got ", d.q_heads));
  }
  if (d.tokens > INT32_MAX) return absl::InvalidArgumentError("tokens: positions are int32");
  if (d.dtype != DType::kFloat16 && d.dtype != DType::kBFloat16 && d.dtype != DType::kFloat32) {
    return absl::InvalidArgumentError("dtype: expected float16, bfloat16 or float32");
  }
  if (d.layout != Layout::kHND && d.layout != Layout::kNHD) {
    return absl::InvalidArgumentError("layout: expected HND or NHD");
  }
  MEDAKV_RETURN_IF_ERROR(ModalityFromSpans(d.tokens, d.modality).status());
  if (static_cast<int64_t>(cache.layers.size()) != d.layers) {
    return absl::InvalidArgumentError(
        absl::StrCat("layers: ", cache.layers.size(), " stored for a description of ", d.layers));
  }
  switch (cache.stats) {
    case KeptStats::kNone:
      break;
    case KeptStats::kQueries:
      if (d.q_heads <= 0 || d.q_heads % d.kv_heads != 0) {
        return absl::InvalidArgumentError(absl::StrCat("q_heads (", d.q_heads,
                                                       ") must be a positive multiple of kv_heads (", d.kv_heads,
                                                       ") when queries are kept"));
      }
      if (cache.q_tokens <= 0 || cache.q_tokens > QueryPositionLimit(d.tokens)) {
        return absl::InvalidArgumentError(absl::StrCat("q_tokens must be in [1, 2 x tokens + 65536 = ",
                                                       QueryPositionLimit(d.tokens), "], got ", cache.q_tokens));
      }
      break;
    case KeptStats::kPrecomputed:
      if (cache.score_heads != d.kv_heads && (d.q_heads <= 0 || cache.score_heads != d.q_heads)) {
        return absl::InvalidArgumentError(absl::StrCat("score_heads (", cache.score_heads,
                                                       ") must be kv_heads (", d.kv_heads, ") or q_heads (",
                                                       d.q_heads, ")"));
      }
      break;
    default:
      return absl::InvalidArgumentError("stats: unknown form");
  }
  const bool device = cache.on_device();
  if (device) {
    if (static_cast<int64_t>(cache.device.size()) != d.layers) {
      return absl::InvalidArgumentError(
          absl::StrCat("device: ", cache.device.size(), " device layers for a description of ", d.layers));
    }
    for (int64_t l = 0; l < d.layers; ++l) {
      const StoredLayer& h = cache.layers[l];
      if (!h.key.empty() || !h.value.empty() || !h.positions.empty() || !h.query.empty() || !h.scores.empty()) {
        return absl::InvalidArgumentError(
            absl::StrCat("layer ", l, ": a cache in device form keeps its buffers on the device only"));
      }
      const DeviceLayer& dl = cache.device[l];
      const int64_t sum = dl.key_bytes + dl.value_bytes + dl.positions_bytes + dl.query_bytes + dl.scores_bytes;
      if (static_cast<int64_t>(dl.block.size()) != sum) {
        return absl::InvalidArgumentError(absl::StrCat("layer ", l, ": device block of ", dl.block.size(),
                                                       " bytes for buffers of ", sum));
      }
    }
  }
  const int64_t dsize = DTypeSize(d.dtype);
  for (int64_t l = 0; l < d.layers; ++l) {
    const StoredLayer& layer = cache.layers[l];
    const LayerBytes b = BytesOf(cache, l);
    const std::string prefix = absl::StrCat("layer ", l, " ");
    if (layer.tokens < 0 || layer.tokens > d.tokens) {
      return absl::InvalidArgumentError(
          absl::StrCat(prefix, "tokens must be in [0, ", d.tokens, "], got ", layer.tokens));
    }
    const int64_t kv_bytes = d.kv_heads * layer.tokens * d.head_dim * dsize;
    MEDAKV_RETURN_IF_ERROR(CheckSize(prefix, "key", b.key, kv_bytes));
    MEDAKV_RETURN_IF_ERROR(CheckSize(prefix, "value", b.value, kv_bytes));
    if (!(b.positions == 0 && layer.tokens == d.tokens)) {
      MEDAKV_RETURN_IF_ERROR(CheckSize(prefix, "positions", b.positions, d.kv_heads * layer.tokens * 4));
      if (!device) {
        MEDAKV_RETURN_IF_ERROR(CheckKeptPositions(prefix, layer.positions, d.kv_heads, layer.tokens, d.tokens));
      }
    }
    if (!std::isfinite(layer.entropy) || !std::isfinite(layer.alpha)) {
      return absl::InvalidArgumentError(absl::StrCat(prefix, "entropy and alpha must be finite"));
    }
    const bool queries = cache.stats == KeptStats::kQueries;
    const bool scores = cache.stats == KeptStats::kPrecomputed;
    MEDAKV_RETURN_IF_ERROR(
        CheckSize(prefix, "query", b.query, queries ? d.q_heads * cache.q_tokens * d.head_dim * dsize : 0));
    if (!layer.query_positions.empty()) {
      MEDAKV_RETURN_IF_ERROR(CheckSize(prefix, "query_positions", ByteSize(layer.query_positions),
                                       queries ? cache.q_tokens * 4 : 0));
      MEDAKV_RETURN_IF_ERROR(
          CheckPositions(prefix, "query_positions", layer.query_positions, QueryPositionLimit(d.tokens)));
    }
    if (!layer.query_outside_lse.empty()) {
      MEDAKV_RETURN_IF_ERROR(CheckSize(prefix, "query_outside_lse", ByteSize(layer.query_outside_lse),
                                       queries ? d.q_heads * cache.q_tokens * 4 : 0));
    }
    MEDAKV_RETURN_IF_ERROR(CheckSize(prefix, "scores", b.scores, scores ? cache.score_heads * d.tokens * 4 : 0));
    if (scores && !std::isfinite(layer.score_entropy)) {
      return absl::InvalidArgumentError(absl::StrCat(prefix, "entropy is not finite (", layer.score_entropy, ")"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<StoredCache>> MoveToDevice(std::unique_ptr<StoredCache> cache,
                                                          DeviceMemory& memory) {
  if (cache->on_device()) {
    return absl::FailedPreconditionError(absl::StrCat("cache ", QuoteId(cache->id), " is already on a device"));
  }
  MEDAKV_RETURN_IF_ERROR(ValidateStoredCache(*cache));
  std::vector<DeviceLayer> device(cache->layers.size());
  for (size_t l = 0; l < cache->layers.size(); ++l) {
    const LayerBytes b = BytesOf(*cache, l);
    DeviceLayer& d = device[l];
    d.key_bytes = b.key;
    d.value_bytes = b.value;
    d.positions_bytes = b.positions;
    d.query_bytes = b.query;
    d.scores_bytes = b.scores;
    const int64_t total = b.key + b.value + b.positions + b.query + b.scores;
    absl::StatusOr<DeviceBlock> block = memory.Allocate(static_cast<size_t>(total));
    if (!block.ok()) {
      return absl::Status(block.status().code(), absl::StrCat("cache ", QuoteId(cache->id), ": layer ", l,
                                                               " on the device: ", block.status().message()));
    }
    d.block = *std::move(block);
    size_t offset = 0;
    for (const auto& [data, bytes] : InBlockOrder(cache->layers[l])) {
      MEDAKV_RETURN_IF_ERROR(memory.CopyToDevice(d.block, offset, data, static_cast<size_t>(bytes)));
      offset += static_cast<size_t>(bytes);
    }
  }
  // Every layer is on the device: only now are the host buffers freed.
  for (StoredLayer& h : cache->layers) {
    std::vector<uint8_t>().swap(h.key);
    std::vector<uint8_t>().swap(h.value);
    std::vector<int32_t>().swap(h.positions);
    std::vector<uint8_t>().swap(h.query);
    std::vector<float>().swap(h.scores);
  }
  cache->device = std::move(device);
  return cache;
}

absl::StatusOr<std::unique_ptr<StoredCache>> HostCopy(const StoredCache& cache, int64_t layer_begin,
                                                      int64_t layer_end) {
  const int64_t layers = static_cast<int64_t>(cache.layers.size());
  if (layer_end == 0) layer_end = layers;
  if (layer_begin < 0 || layer_begin > layer_end || layer_end > layers) {
    return absl::InvalidArgumentError(
        absl::StrCat("layer range [", layer_begin, ", ", layer_end, ") is not within [0, ", layers, ")"));
  }
  std::unique_ptr<StoredCache> copy = MetadataCopy(cache);
  for (int64_t l = layer_begin; l < layer_end; ++l) {
    StoredLayer& to = copy->layers[l];
    if (!cache.on_device()) {
      const StoredLayer& from = cache.layers[l];
      to.key = from.key;
      to.value = from.value;
      to.positions = from.positions;
      to.query = from.query;
      to.scores = from.scores;
      continue;
    }
    const LayerBytes b = BytesOf(cache, l);
    to.key.resize(b.key);
    to.value.resize(b.value);
    to.positions.resize(b.positions / 4);
    to.query.resize(b.query);
    to.scores.resize(b.scores / 4);
    const DeviceLayer& d = cache.device[l];
    DeviceMemory* memory = d.block.memory();
    size_t offset = 0;
    for (const auto& [data, bytes] : InBlockOrder(to)) {
      if (bytes > 0) MEDAKV_RETURN_IF_ERROR(memory->CopyToHost(data, d.block, offset, static_cast<size_t>(bytes)));
      offset += static_cast<size_t>(bytes);
    }
  }
  return copy;
}

CacheSummary Summarize(const StoredCache& cache) {
  CacheSummary s;
  s.tenant = cache.tenant;
  s.id = cache.id;
  s.description = cache.description;
  s.stats = cache.stats;
  s.bytes = cache.bytes;
  s.layer_tokens.reserve(cache.layers.size());
  for (const StoredLayer& l : cache.layers) s.layer_tokens.push_back(l.tokens);
  s.compressed = cache.compressed;
  s.policy = cache.policy;
  s.created = cache.created;
  s.expires = cache.expires;
  s.tier = cache.tier;
  return s;
}

absl::Status CheckCompressible(const StoredCache& cache) {
  if (cache.compressed) {
    return absl::FailedPreconditionError(
        absl::StrCat("cache ", QuoteId(cache.id), " is already compressed (policy ", cache.policy, ")"));
  }
  if (cache.stats == KeptStats::kNone) {
    return absl::FailedPreconditionError(
        absl::StrCat("cache ", QuoteId(cache.id), " was stored without attention statistics"));
  }
  return absl::OkStatus();
}

absl::StatusOr<CacheInput> CompressionInput(const StoredCache& cache) {
  const CacheDescription& d = cache.description;
  MEDAKV_RETURN_IF_ERROR(CheckCompressible(cache));
  if (cache.on_device()) {
    return absl::FailedPreconditionError(
        absl::StrCat("cache ", QuoteId(cache.id), " is in device form: compress a HostCopy of it"));
  }
  CacheInput in;
  in.kv_heads = d.kv_heads;
  in.q_heads = d.q_heads;
  in.head_dim = d.head_dim;
  in.tokens = d.tokens;
  in.dtype = d.dtype;
  in.layout = d.layout;
  if (!d.modality.empty()) {
    MEDAKV_ASSIGN_OR_RETURN(in.modality, ModalityFromSpans(d.tokens, d.modality));
  }
  in.stats = cache.stats == KeptStats::kQueries ? StatsForm::kQueries : StatsForm::kPrecomputed;
  in.layers.reserve(cache.layers.size());
  for (size_t l = 0; l < cache.layers.size(); ++l) {
    const StoredLayer& s = cache.layers[l];
    if (s.tokens != d.tokens) {
      return absl::FailedPreconditionError(absl::StrCat("cache ", QuoteId(cache.id), ": layer ", l, " keeps ",
                                                        s.tokens, " of ", d.tokens, " tokens"));
    }
    LayerInput li;
    li.key = TensorView{s.key.data(), d.dtype, d.layout, d.kv_heads, d.tokens, d.head_dim};
    li.value = TensorView{s.value.data(), d.dtype, d.layout, d.kv_heads, d.tokens, d.head_dim};
    if (cache.stats == KeptStats::kQueries) {
      li.query = TensorView{s.query.data(), d.dtype, d.layout, d.q_heads, cache.q_tokens, d.head_dim};
      li.query_positions = s.query_positions;
      li.query_outside_lse = s.query_outside_lse;
    } else {
      li.scores = s.scores.data();
      li.score_heads = cache.score_heads;
      li.entropy = s.score_entropy;
    }
    in.layers.push_back(std::move(li));
  }
  return in;
}

std::unique_ptr<StoredCache> MakeCompressedCache(const StoredCache& original, CompressResult result,
                                                 std::string policy) {
  auto cache = std::make_unique<StoredCache>();
  cache->tenant = original.tenant;
  cache->id = original.id;
  cache->description = original.description;
  cache->stats = KeptStats::kNone;
  cache->compressed = true;
  cache->policy = std::move(policy);
  cache->layers.reserve(result.layers.size());
  for (LayerResult& r : result.layers) {
    StoredLayer l;
    l.key = std::move(r.key);
    l.value = std::move(r.value);
    l.positions = std::move(r.positions);
    l.tokens = r.budget;
    l.entropy = r.entropy;
    l.alpha = r.alpha;
    cache->layers.push_back(std::move(l));
  }
  return cache;
}

// ---- Reservation -----------------------------------------------------------------

Reservation::Reservation(Reservation&& other) noexcept
    : accounting_(std::move(other.accounting_)), tier_(other.tier_), bytes_(std::exchange(other.bytes_, 0)) {}

Reservation& Reservation::operator=(Reservation&& other) noexcept {
  if (this != &other) {
    Cancel();
    accounting_ = std::move(other.accounting_);
    tier_ = other.tier_;
    bytes_ = std::exchange(other.bytes_, 0);
  }
  return *this;
}

Reservation::~Reservation() { Cancel(); }

void Reservation::Cancel() {
  if (accounting_ != nullptr) accounting_->CancelReservation(tier_, bytes_);
  accounting_.reset();
  bytes_ = 0;
}

// ---- CacheStore ------------------------------------------------------------------

CacheStore::CacheStore(StoreOptions options)
    : capacity_{std::max<int64_t>(options.host_capacity_bytes, 0), std::max<int64_t>(options.device_capacity_bytes, 0)},
      clock_(options.clock ? std::move(options.clock) : std::function<absl::Time()>([] { return absl::Now(); })),
      accounting_(std::make_shared<Accounting>()) {}

CacheStore::~CacheStore() = default;

int64_t CacheStore::used_bytes(Tier tier) const { return accounting_->Get(tier).used; }

absl::Status CacheStore::CheckTier(Tier tier) const {
  if (tier != Tier::kHost && tier != Tier::kDevice) return absl::InvalidArgumentError("unknown tier");
  if (!has_tier(tier)) {
    return absl::FailedPreconditionError(absl::StrCat("the store has no ", TierName(tier), " tier"));
  }
  return absl::OkStatus();
}

absl::Status CacheStore::CheckFits(Tier tier, int64_t bytes) const {
  if (bytes <= capacity(tier)) return absl::OkStatus();
  return absl::ResourceExhaustedError(absl::StrCat("a cache of ", bytes, " bytes exceeds the ", TierName(tier),
                                                   " tier's capacity of ", capacity(tier), " bytes"));
}

absl::StatusOr<Reservation> CacheStore::Reserve(Tier tier, int64_t bytes) {
  MEDAKV_RETURN_IF_ERROR(CheckTier(tier));
  if (bytes < 0) return absl::InvalidArgumentError(absl::StrCat("cannot reserve ", bytes, " bytes"));
  MEDAKV_RETURN_IF_ERROR(CheckFits(tier, bytes));
  Graveyard graveyard;  // destroyed after the lock is released
  absl::MutexLock lock(&mu_);
  SweepLocked(clock_(), &graveyard);
  MEDAKV_RETURN_IF_ERROR(MakeRoomLocked(tier, bytes, 0, &graveyard));
  accounting_->Reserve(tier, bytes);
  return Reservation(accounting_, tier, bytes);
}

absl::Status CacheStore::Grow(Reservation& reservation, int64_t bytes) {
  if (reservation.accounting_ != accounting_) {
    return absl::FailedPreconditionError(reservation.valid() ? "the reservation belongs to another store"
                                                             : "the reservation was already used or cancelled");
  }
  if (bytes <= reservation.bytes_) return absl::OkStatus();
  const Tier tier = reservation.tier_;
  MEDAKV_RETURN_IF_ERROR(CheckFits(tier, bytes));
  const int64_t more = bytes - reservation.bytes_;
  Graveyard graveyard;  // destroyed after the lock is released
  absl::MutexLock lock(&mu_);
  SweepLocked(clock_(), &graveyard);
  MEDAKV_RETURN_IF_ERROR(MakeRoomLocked(tier, more, 0, &graveyard));
  accounting_->Reserve(tier, more);
  reservation.bytes_ = bytes;
  return absl::OkStatus();
}

absl::StatusOr<CacheSummary> CacheStore::Commit(Reservation reservation, std::unique_ptr<StoredCache> cache,
                                                bool overwrite, absl::Duration ttl) {
  if (reservation.accounting_ != accounting_) {
    return absl::FailedPreconditionError(reservation.valid() ? "the reservation belongs to another store"
                                                             : "the reservation was already used or cancelled");
  }
  if (cache == nullptr) return absl::InvalidArgumentError("no cache to commit");
  MEDAKV_RETURN_IF_ERROR(ValidateStoredCache(*cache));
  MEDAKV_RETURN_IF_ERROR(CheckForm(*cache, reservation.tier()));
  const int64_t bytes = cache->ComputeBytes();
  if (bytes > reservation.bytes()) {
    return absl::FailedPreconditionError(absl::StrCat("cache ", QuoteId(cache->id), " has ", bytes,
                                                      " bytes, more than the ", reservation.bytes(), " reserved"));
  }
  Graveyard graveyard;
  absl::MutexLock lock(&mu_);
  const absl::Time now = clock_();
  SweepLocked(now, &graveyard);
  const auto it = entries_.find(Key(*cache));
  if (it != entries_.end() && !overwrite) {
    return absl::AlreadyExistsError(absl::StrCat("cache ", QuoteId(cache->id), " is already stored"));
  }
  cache->created = now;
  cache->expires = ttl > absl::ZeroDuration() ? now + ttl : absl::InfiniteFuture();
  cache->tier = reservation.tier();
  cache->bytes = bytes;
  accounting_->CommitReservation(reservation.tier(), reservation.bytes(), bytes);
  reservation.accounting_.reset();
  reservation.bytes_ = 0;
  std::shared_ptr<const StoredCache> owned = Own(std::move(cache));
  if (it != entries_.end()) RemoveLocked(it, &graveyard);
  CacheSummary summary = Summarize(*owned);
  InsertLocked(std::move(owned));
  return summary;
}

absl::StatusOr<CacheSummary> CacheStore::Put(Tier tier, std::unique_ptr<StoredCache> cache, bool overwrite,
                                             absl::Duration ttl) {
  if (cache == nullptr) return absl::InvalidArgumentError("no cache to put");
  MEDAKV_RETURN_IF_ERROR(ValidateStoredCache(*cache));  // before anything is evicted for it
  MEDAKV_RETURN_IF_ERROR(CheckForm(*cache, tier));
  MEDAKV_ASSIGN_OR_RETURN(Reservation reservation, Reserve(tier, cache->ComputeBytes()));
  return Commit(std::move(reservation), std::move(cache), overwrite, ttl);
}

std::string CacheStore::Key(absl::string_view tenant, absl::string_view id) {
  return tenant.empty() ? std::string(id) : absl::StrCat(tenant, absl::string_view("\0", 1), id);
}

absl::StatusOr<std::shared_ptr<const StoredCache>> CacheStore::Get(absl::string_view tenant, absl::string_view id) {
  MEDAKV_RETURN_IF_ERROR(ValidateCacheId(id));
  MEDAKV_RETURN_IF_ERROR(ValidateTenant(tenant));
  Graveyard graveyard;
  absl::MutexLock lock(&mu_);
  SweepLocked(clock_(), &graveyard);
  const auto it = entries_.find(Key(tenant, id));
  if (it == entries_.end()) return absl::NotFoundError(absl::StrCat("cache ", QuoteId(id), " is not stored"));
  TouchLocked(it);
  return it->second.cache;
}

bool CacheStore::Contains(absl::string_view tenant, absl::string_view id) {
  if (!ValidateCacheId(id).ok() || !ValidateTenant(tenant).ok()) return false;
  Graveyard graveyard;
  absl::MutexLock lock(&mu_);
  SweepLocked(clock_(), &graveyard);
  return entries_.find(Key(tenant, id)) != entries_.end();
}

std::vector<CacheSummary> CacheStore::List(absl::string_view tenant, absl::string_view prefix, int64_t limit,
                                           absl::string_view after) {
  std::vector<CacheSummary> out;
  if (!ValidateTenant(tenant).ok()) return out;
  const std::string key_prefix = Key(tenant, prefix);
  const std::string key_after = after.empty() ? "" : Key(tenant, after);
  Graveyard graveyard;
  absl::MutexLock lock(&mu_);
  SweepLocked(clock_(), &graveyard);
  auto it = entries_.lower_bound(key_prefix);
  if (!key_after.empty() && key_after >= key_prefix) it = entries_.upper_bound(key_after);
  for (; it != entries_.end() && absl::StartsWith(it->first, key_prefix); ++it) {
    if (limit > 0 && static_cast<int64_t>(out.size()) >= limit) break;
    // The "" tenant's prefix is also a prefix of other tenants' keys: skip them.
    if (it->second.cache->tenant != tenant) continue;
    out.push_back(Summarize(*it->second.cache));
  }
  return out;
}

absl::StatusOr<int64_t> CacheStore::Delete(absl::string_view tenant, absl::string_view id) {
  MEDAKV_RETURN_IF_ERROR(ValidateCacheId(id));
  MEDAKV_RETURN_IF_ERROR(ValidateTenant(tenant));
  Graveyard graveyard;
  absl::MutexLock lock(&mu_);
  SweepLocked(clock_(), &graveyard);
  const auto it = entries_.find(Key(tenant, id));
  if (it == entries_.end()) return absl::NotFoundError(absl::StrCat("cache ", QuoteId(id), " is not stored"));
  const int64_t bytes = it->second.cache->bytes;
  ++deleted_[Index(it->second.cache->tier)];
  RemoveLocked(it, &graveyard);
  return bytes;
}

absl::StatusOr<CacheSummary> CacheStore::Replace(std::shared_ptr<const StoredCache> expected,
                                                 std::unique_ptr<StoredCache> next) {
  if (expected == nullptr || next == nullptr) return absl::InvalidArgumentError("Replace needs both caches");
  if (next->id.empty()) next->id = expected->id;
  next->tenant = expected->tenant;
  if (next->id != expected->id) {
    return absl::InvalidArgumentError(
        absl::StrCat("cache ", QuoteId(next->id), " cannot replace cache ", QuoteId(expected->id)));
  }
  MEDAKV_RETURN_IF_ERROR(ValidateStoredCache(*next));
  const Tier tier = expected->tier;
  MEDAKV_RETURN_IF_ERROR(CheckForm(*next, tier));
  const int64_t bytes = next->ComputeBytes();
  MEDAKV_RETURN_IF_ERROR(CheckFits(tier, bytes));
  Graveyard graveyard;
  absl::MutexLock lock(&mu_);
  SweepLocked(clock_(), &graveyard);
  const auto it = entries_.find(Key(*expected));
  if (it == entries_.end()) {
    return absl::NotFoundError(absl::StrCat("cache ", QuoteId(expected->id), " was deleted or expired"));
  }
  if (it->second.cache != expected) {
    return absl::AbortedError(absl::StrCat("cache ", QuoteId(expected->id), " changed since it was read"));
  }
  // Referenced only by the map and `expected`: gone once replaced.
  const int64_t extra_room = it->second.cache.use_count() == 2 ? expected->bytes : 0;
  MEDAKV_RETURN_IF_ERROR(MakeRoomLocked(tier, bytes, extra_room, &graveyard));
  next->created = expected->created;
  next->expires = expected->expires;
  next->tier = tier;
  next->bytes = bytes;
  accounting_->ChargeObject(tier, bytes);
  std::shared_ptr<const StoredCache> owned = Own(std::move(next));
  expected.reset();  // so that RemoveLocked sees whether anyone else holds the old object
  RemoveLocked(it, &graveyard);
  CacheSummary summary = Summarize(*owned);
  InsertLocked(std::move(owned));
  return summary;
}

std::vector<TierStats> CacheStore::Stats() {
  std::vector<TierStats> out;
  Graveyard graveyard;
  absl::MutexLock lock(&mu_);
  SweepLocked(clock_(), &graveyard);
  for (Tier tier : {Tier::kHost, Tier::kDevice}) {
    if (!has_tier(tier)) continue;
    const int t = Index(tier);
    const Accounting::Counters c = accounting_->Get(tier);
    TierStats s;
    s.tier = tier;
    s.capacity_bytes = capacity(tier);
    s.used_bytes = c.used;
    s.reserved_bytes = c.reserved;
    s.stored_bytes = stored_bytes_[t];
    s.held_bytes = c.used - c.reserved - stored_bytes_[t];
    s.entries = static_cast<int64_t>(lru_[t].size());
    s.evicted_lru = evicted_lru_[t];
    s.expired = expired_[t];
    s.deleted = deleted_[t];
    out.push_back(s);
  }
  return out;
}

int64_t CacheStore::Sweep() {
  Graveyard graveyard;
  absl::MutexLock lock(&mu_);
  return SweepLocked(clock_(), &graveyard);
}

// ---- internals -------------------------------------------------------------------

int64_t CacheStore::SweepLocked(absl::Time now, Graveyard* graveyard) {
  int64_t swept = 0;
  while (!expiry_.empty() && expiry_.begin()->first <= now) {
    const auto it = entries_.find(expiry_.begin()->second);
    ++expired_[Index(it->second.cache->tier)];
    RemoveLocked(it, graveyard);  // erases the expiry_ element
    ++swept;
  }
  return swept;
}

void CacheStore::RemoveLocked(EntryMap::iterator it, Graveyard* graveyard) {
  std::shared_ptr<const StoredCache> cache = std::move(it->second.cache);
  const int t = Index(cache->tier);
  lru_[t].erase(it->second.lru);
  if (cache->expires != absl::InfiniteFuture()) expiry_.erase({cache->expires, it->first});
  stored_bytes_[t] -= cache->bytes;
  entries_.erase(it);
  // No reference is made without mu_, so a count of 1 stays 1: this thread
  // drops the last reference when the graveyard goes, after mu_ is released.
  if (cache.use_count() == 1) {
    std::get_deleter<CacheDeleter>(cache)->doomed = true;
    accounting_->Doom(cache->tier, cache->bytes);
  }
  graveyard->push_back(std::move(cache));
}

void CacheStore::InsertLocked(std::shared_ptr<const StoredCache> cache) {
  const int t = Index(cache->tier);
  std::string key = Key(*cache);
  lru_[t].push_front(key);
  if (cache->expires != absl::InfiniteFuture()) expiry_.emplace(cache->expires, key);
  stored_bytes_[t] += cache->bytes;
  entries_.insert_or_assign(std::move(key), Entry{std::move(cache), lru_[t].begin()});
}

void CacheStore::TouchLocked(EntryMap::iterator it) {
  auto& lru = lru_[Index(it->second.cache->tier)];
  lru.splice(lru.begin(), lru, it->second.lru);
}

absl::Status CacheStore::MakeRoomLocked(Tier tier, int64_t bytes, int64_t extra_room, Graveyard* graveyard) {
  const int t = Index(tier);
  const Accounting::Counters c = accounting_->Get(tier);
  // Doomed objects are being freed by the threads that removed them.
  const int64_t free = capacity(tier) - (c.used - c.doomed) + extra_room;
  if (bytes <= free) return absl::OkStatus();
  std::vector<EntryMap::iterator> victims;
  int64_t gain = 0;
  for (auto id = lru_[t].rbegin(); id != lru_[t].rend() && free + gain < bytes; ++id) {
    const auto it = entries_.find(*id);
    if (it->second.cache.use_count() == 1) {
      victims.push_back(it);
      gain += it->second.cache->bytes;
    }
  }
  if (free + gain < bytes) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "cannot make room for ", bytes, " bytes in the ", TierName(tier), " tier: capacity ", capacity(tier),
        ", used ", c.used - c.doomed, " (", c.reserved, " reserved by uploads in progress, ",
        c.used - c.doomed - c.reserved - stored_bytes_[t], " held by readers after removal, ", stored_bytes_[t],
        " stored of which ", stored_bytes_[t] - gain, " referenced by readers)"));
  }
  for (const auto it : victims) {
    ++evicted_lru_[t];
    RemoveLocked(it, graveyard);
  }
  return absl::OkStatus();
}

std::shared_ptr<const StoredCache> CacheStore::Own(std::unique_ptr<StoredCache> cache) {
  const Tier tier = cache->tier;
  const int64_t bytes = cache->bytes;
  return std::shared_ptr<const StoredCache>(cache.release(), CacheDeleter{accounting_, tier, bytes});
}

}  // namespace medakv
