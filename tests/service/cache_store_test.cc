#include "service/store/cache_store.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "gtest/gtest.h"

namespace medakv {
namespace {

// A clock the test moves by hand.
class FakeClock {
 public:
  absl::Time Now() const {
    absl::MutexLock lock(&mu_);
    return now_;
  }
  void Advance(absl::Duration d) {
    absl::MutexLock lock(&mu_);
    now_ += d;
  }
  std::function<absl::Time()> AsFunction() {
    return [this] { return Now(); };
  }

 private:
  mutable absl::Mutex mu_;
  absl::Time now_ = absl::FromUnixSeconds(1'700'000'000);
};

uint64_t Mix(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdULL;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ULL;
  x ^= x >> 33;
  return x;
}

uint64_t Seed(const std::string& id, int64_t version, int layer, int kind) {
  uint64_t h = 1469598103934665603ULL;
  for (char c : id) h = (h ^ static_cast<uint8_t>(c)) * 1099511628211ULL;
  return Mix(h ^ Mix(static_cast<uint64_t>(version) * 31 + static_cast<uint64_t>(layer) * 7 + kind));
}

uint8_t PatternByte(uint64_t seed, size_t i) { return static_cast<uint8_t>(Mix(seed + i) >> 17); }

// A cache whose every byte is derived from (id, version): keys, values and
// queries; positions are 0..tokens-1 per head (or empty when `positions` is false).
std::unique_ptr<StoredCache> PatternCache(const std::string& id, int64_t version, int64_t layers, int64_t kv_heads,
                                          int64_t head_dim, int64_t tokens, bool queries = false,
                                          bool positions = true) {
  auto c = std::make_unique<StoredCache>();
  c->id = id;
  c->description.layers = layers;
  c->description.kv_heads = kv_heads;
  c->description.q_heads = 2 * kv_heads;
  c->description.head_dim = head_dim;
  c->description.tokens = tokens;
  c->description.dtype = DType::kFloat16;
  c->policy = absl::StrCat(version);  // the version, for Verify
  if (queries) {
    c->stats = KeptStats::kQueries;
    c->q_tokens = 1;
  }
  const size_t kv_bytes = static_cast<size_t>(kv_heads * tokens * head_dim * 2);
  for (int64_t l = 0; l < layers; ++l) {
    StoredLayer layer;
    layer.tokens = tokens;
    layer.key.resize(kv_bytes);
    layer.value.resize(kv_bytes);
    const uint64_t ks = Seed(id, version, l, 0), vs = Seed(id, version, l, 1);
    for (size_t i = 0; i < kv_bytes; ++i) {
      layer.key[i] = PatternByte(ks, i);
      layer.value[i] = PatternByte(vs, i);
    }
    if (positions) {
      for (int64_t h = 0; h < kv_heads; ++h) {
        for (int64_t t = 0; t < tokens; ++t) layer.positions.push_back(static_cast<int32_t>(t));
      }
    }
    if (queries) {
      layer.query.resize(static_cast<size_t>(2 * kv_heads * head_dim * 2));
      const uint64_t qs = Seed(id, version, l, 2);
      for (size_t i = 0; i < layer.query.size(); ++i) layer.query[i] = PatternByte(qs, i);
    }
    c->layers.push_back(std::move(layer));
  }
  return c;
}

// Every byte as PatternCache wrote it for the version the cache names.
::testing::AssertionResult Intact(const StoredCache& c) {
  int64_t version = 0;
  if (!absl::SimpleAtoi(c.policy, &version)) return ::testing::AssertionFailure() << "no version in " << c.policy;
  if (static_cast<int64_t>(c.layers.size()) != c.description.layers) {
    return ::testing::AssertionFailure() << c.id << ": " << c.layers.size() << " layers";
  }
  for (size_t l = 0; l < c.layers.size(); ++l) {
    const StoredLayer& layer = c.layers[l];
    const size_t kv_bytes = static_cast<size_t>(c.description.kv_heads * layer.tokens * c.description.head_dim * 2);
    if (layer.key.size() != kv_bytes || layer.value.size() != kv_bytes) {
      return ::testing::AssertionFailure() << c.id << " layer " << l << ": wrong size";
    }
    const uint64_t ks = Seed(c.id, version, static_cast<int>(l), 0), vs = Seed(c.id, version, static_cast<int>(l), 1);
    for (size_t i = 0; i < kv_bytes; ++i) {
      if (layer.key[i] != PatternByte(ks, i) || layer.value[i] != PatternByte(vs, i)) {
        return ::testing::AssertionFailure() << c.id << " v" << version << " layer " << l << " byte " << i;
      }
    }
  }
  if (c.bytes != c.ComputeBytes()) return ::testing::AssertionFailure() << c.id << ": bytes " << c.bytes;
  return ::testing::AssertionSuccess();
}

int64_t SizeOf(int64_t layers, int64_t kv_heads, int64_t head_dim, int64_t tokens) {
  return layers * (2 * kv_heads * tokens * head_dim * 2 + kv_heads * tokens * 4);
}

TierStats HostStats(CacheStore& store) {
  const std::vector<TierStats> stats = store.Stats();
  EXPECT_FALSE(stats.empty());
  return stats.empty() ? TierStats{} : stats[0];
}

// used == reserved + stored + held, and stored == the bytes of the listed entries.
void ExpectConsistent(CacheStore& store, int64_t expected_used, int64_t expected_held = 0) {
  const TierStats s = HostStats(store);
  int64_t listed = 0;
  for (const CacheSummary& c : store.List("", 0)) listed += c.bytes;
  EXPECT_EQ(s.used_bytes, expected_used);
  EXPECT_EQ(store.used_bytes(Tier::kHost), expected_used);
  EXPECT_EQ(s.stored_bytes, listed);
  EXPECT_EQ(s.used_bytes, s.reserved_bytes + s.stored_bytes + s.held_bytes);
  EXPECT_EQ(s.held_bytes, expected_held);
  EXPECT_LE(s.used_bytes - s.held_bytes, s.capacity_bytes);
}

StoreOptions Options(int64_t host, FakeClock* clock = nullptr) {
  StoreOptions o;
  o.host_capacity_bytes = host;
  if (clock != nullptr) o.clock = clock->AsFunction();
  return o;
}

constexpr absl::Duration kNoTtl = absl::ZeroDuration();

// ---- ids ----------------------------------------------------------------------------

TEST(CacheIdTest, AcceptsTheDocumentedAlphabet) {
  EXPECT_TRUE(ValidateCacheId("a").ok());
  EXPECT_TRUE(ValidateCacheId("AZaz09._:/-").ok());
  EXPECT_TRUE(ValidateCacheId("sha256:0f3a/prefix-1.2_x").ok());
  EXPECT_TRUE(ValidateCacheId(std::string(256, 'x')).ok());
}

TEST(CacheIdTest, RejectsEmptyLongAndOtherBytes) {
  for (const std::string& id : {std::string(), std::string(257, 'x'), std::string("a b"), std::string("a\nb"),
                                std::string("caf\xc3\xa9"), std::string("a*"), std::string("x\0y", 3)}) {
    const absl::Status s = ValidateCacheId(id);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << id;
    EXPECT_TRUE(absl::StrContains(s.message(), "cache id")) << s.message();
  }
  EXPECT_TRUE(absl::StrContains(ValidateCacheId("bad id").message(), "\"bad id\""));
  EXPECT_TRUE(absl::StrContains(ValidateCacheId("a\nb").message(), "byte 1"));
}

TEST(CacheStoreTest, InvalidIdsAreRejectedByEveryCall) {
  CacheStore store(Options(1 << 20));
  EXPECT_EQ(store.Get("a b").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(store.Delete("").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(store.Put(Tier::kHost, PatternCache("a*b", 1, 1, 1, 4, 4), false, kNoTtl).status().code(),
            absl::StatusCode::kInvalidArgument);
  ExpectConsistent(store, 0);
}

// ---- round trips --------------------------------------------------------------------

TEST(CacheStoreTest, PutGetListDeleteRoundTripPreservesEveryByte) {
  FakeClock clock;
  CacheStore store(Options(1 << 20, &clock));
  std::mt19937 rng(7);
  std::uniform_int_distribution<int> byte(0, 255);

  // Queries kept, NHD bfloat16, modality spans, compressed-looking positions.
  auto a = std::make_unique<StoredCache>();
  a->id = "model/a:1";
  a->description = {.layers = 2, .kv_heads = 2, .q_heads = 4, .head_dim = 8, .tokens = 16,
                    .dtype = DType::kBFloat16, .layout = Layout::kNHD,
                    .modality = {ModalitySpan{2, 5, Modality::kVisual}}};
  a->stats = KeptStats::kQueries;
  a->q_tokens = 3;
  for (int l = 0; l < 2; ++l) {
    StoredLayer layer;
    layer.tokens = 16;
    layer.key.resize(2 * 16 * 8 * 2);
    layer.value.resize(2 * 16 * 8 * 2);
    layer.query.resize(4 * 3 * 8 * 2);
    for (auto* v : {&layer.key, &layer.value, &layer.query}) {
      for (auto& b : *v) b = static_cast<uint8_t>(byte(rng));
    }
    for (int h = 0; h < 2; ++h) {
      for (int t = 0; t < 16; ++t) layer.positions.push_back(t);
    }
    layer.query_positions = {13, 14, 15};
    layer.entropy = 0.25f * l;
    layer.alpha = 0.5;
    a->layers.push_back(std::move(layer));
  }
  // Precomputed scores kept, float32, no positions (identity).
  auto b = std::make_unique<StoredCache>();
  b->id = "model/b";
  b->description = {.layers = 1, .kv_heads = 1, .q_heads = 0, .head_dim = 4, .tokens = 5,
                    .dtype = DType::kFloat32, .layout = Layout::kHND, .modality = {}};
  b->stats = KeptStats::kPrecomputed;
  b->score_heads = 1;
  {
    StoredLayer layer;
    layer.tokens = 5;
    layer.key.resize(1 * 5 * 4 * 4);
    layer.value.resize(1 * 5 * 4 * 4);
    for (auto* v : {&layer.key, &layer.value}) {
      for (auto& x : *v) x = static_cast<uint8_t>(byte(rng));
    }
    layer.scores = {0.1f, 0.2f, 0.3f, 0.15f, 0.25f};
    layer.score_entropy = 1.5f;
    b->layers.push_back(std::move(layer));
  }
  const std::unique_ptr<StoredCache> a_copy_ptr = *HostCopy(*a), b_copy_ptr = *HostCopy(*b);
  const StoredCache &a_copy = *a_copy_ptr, &b_copy = *b_copy_ptr;
  const int64_t a_bytes = a->ComputeBytes(), b_bytes = b->ComputeBytes();
  // k, v, positions, query, query positions per layer; 24 bytes for the one modality span.
  EXPECT_EQ(a_bytes, 2 * (2 * 512 + 2 * 16 * 4 + 4 * 3 * 8 * 2 + 3 * 4) + 24);
  EXPECT_EQ(b_bytes, 80 + 80 + 20);

  auto put_a = store.Put(Tier::kHost, std::move(a), false, kNoTtl);
  ASSERT_TRUE(put_a.ok()) << put_a.status();
  EXPECT_EQ(put_a->id, "model/a:1");
  EXPECT_EQ(put_a->bytes, a_bytes);
  EXPECT_EQ(put_a->layer_tokens, (std::vector<int64_t>{16, 16}));
  EXPECT_EQ(put_a->created, clock.Now());
  EXPECT_EQ(put_a->expires, absl::InfiniteFuture());
  EXPECT_EQ(put_a->tier, Tier::kHost);
  EXPECT_EQ(put_a->stats, KeptStats::kQueries);
  EXPECT_FALSE(put_a->compressed);
  ASSERT_TRUE(store.Put(Tier::kHost, std::move(b), false, absl::Seconds(60)).ok());
  ExpectConsistent(store, a_bytes + b_bytes);

  auto got_a = store.Get("model/a:1");
  ASSERT_TRUE(got_a.ok()) << got_a.status();
  const StoredCache& ga = **got_a;
  EXPECT_EQ(ga.description.layout, Layout::kNHD);
  EXPECT_EQ(ga.description.dtype, DType::kBFloat16);
  ASSERT_EQ(ga.description.modality.size(), 1u);
  EXPECT_EQ(ga.description.modality[0].start, 2);
  EXPECT_EQ(ga.description.modality[0].length, 5);
  EXPECT_EQ(ga.q_tokens, 3);
  ASSERT_EQ(ga.layers.size(), 2u);
  for (int l = 0; l < 2; ++l) {
    EXPECT_EQ(ga.layers[l].key, a_copy.layers[l].key);
    EXPECT_EQ(ga.layers[l].value, a_copy.layers[l].value);
    EXPECT_EQ(ga.layers[l].query, a_copy.layers[l].query);
    EXPECT_EQ(ga.layers[l].positions, a_copy.layers[l].positions);
    EXPECT_EQ(ga.layers[l].query_positions, a_copy.layers[l].query_positions);
    EXPECT_EQ(ga.layers[l].entropy, a_copy.layers[l].entropy);
    EXPECT_EQ(ga.layers[l].alpha, 0.5);
  }
  EXPECT_EQ(ga.bytes, a_bytes);

  auto got_b = store.Get("model/b");
  ASSERT_TRUE(got_b.ok());
  EXPECT_EQ((*got_b)->layers[0].key, b_copy.layers[0].key);
  EXPECT_EQ((*got_b)->layers[0].value, b_copy.layers[0].value);
  EXPECT_EQ((*got_b)->layers[0].scores, b_copy.layers[0].scores);
  EXPECT_EQ((*got_b)->layers[0].score_entropy, 1.5f);
  EXPECT_TRUE((*got_b)->layers[0].positions.empty());
  EXPECT_EQ((*got_b)->expires, clock.Now() + absl::Seconds(60));

  const std::vector<CacheSummary> listed = store.List("model/", 0);
  ASSERT_EQ(listed.size(), 2u);
  EXPECT_EQ(listed[0].id, "model/a:1");
  EXPECT_EQ(listed[1].id, "model/b");
  got_a = absl::NotFoundError("dropped");
  got_b = absl::NotFoundError("dropped");

  auto freed = store.Delete("model/a:1");
  ASSERT_TRUE(freed.ok());
  EXPECT_EQ(*freed, a_bytes);
  EXPECT_EQ(store.Get("model/a:1").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(store.Delete("model/a:1").status().code(), absl::StatusCode::kNotFound);
  ExpectConsistent(store, b_bytes);
  EXPECT_EQ(HostStats(store).deleted, 1);
  EXPECT_EQ(HostStats(store).entries, 1);
}

TEST(CacheStoreTest, ListIsSortedFilteredAndLimited) {
  CacheStore store(Options(1 << 20));
  for (const char* id : {"p/c", "q/a", "p/a", "p", "p/b", "o/z"}) {
    ASSERT_TRUE(store.Put(Tier::kHost, PatternCache(id, 1, 1, 1, 2, 2), false, kNoTtl).ok());
  }
  auto ids = [](const std::vector<CacheSummary>& v) {
    std::vector<std::string> out;
    for (const auto& s : v) out.push_back(s.id);
    return out;
  };
  EXPECT_EQ(ids(store.List("p/", 0)), (std::vector<std::string>{"p/a", "p/b", "p/c"}));
  EXPECT_EQ(ids(store.List("p", 0)), (std::vector<std::string>{"p", "p/a", "p/b", "p/c"}));
  EXPECT_EQ(ids(store.List("p/", 2)), (std::vector<std::string>{"p/a", "p/b"}));
  EXPECT_EQ(ids(store.List("", 0)), (std::vector<std::string>{"o/z", "p", "p/a", "p/b", "p/c", "q/a"}));
  EXPECT_TRUE(store.List("r", 0).empty());
}

// List after an id: the next page of a sorted listing, within the prefix.
TEST(CacheStoreTest, ListAfterAnIdContinuesInIdOrder) {
  CacheStore store(Options(int64_t{1} << 20));
  for (const char* id : {"a/1", "a/2", "a/3", "b/1"}) {
    ASSERT_TRUE(store.Put(Tier::kHost, PatternCache(id, 1, 1, 1, 4, 4), false, kNoTtl).ok());
  }
  auto ids = [](const std::vector<CacheSummary>& list) {
    std::vector<std::string> out;
    for (const CacheSummary& s : list) out.push_back(s.id);
    return out;
  };
  EXPECT_EQ(ids(store.List("a/", 2)), (std::vector<std::string>{"a/1", "a/2"}));
  EXPECT_EQ(ids(store.List("", "a/", 2, "a/2")), (std::vector<std::string>{"a/3"}));
  EXPECT_EQ(ids(store.List("", "a/", 0, "a/3")), std::vector<std::string>{});
  EXPECT_EQ(ids(store.List("", "", 0, "a/3")), (std::vector<std::string>{"b/1"}));
  EXPECT_EQ(ids(store.List("", "b/", 0, "a/2")), (std::vector<std::string>{"b/1"}));  // before the prefix
  EXPECT_EQ(ids(store.List("", "a/", 0, "a/15")), (std::vector<std::string>{"a/2", "a/3"}));  // not stored itself
}

TEST(CacheStoreTest, InvalidCachesAreRejectedBeforeAnythingIsStored) {
  CacheStore store(Options(1 << 20));
  auto bad_key = PatternCache("x", 1, 2, 1, 4, 4);
  bad_key->layers[1].key.pop_back();
  const absl::Status s = store.Put(Tier::kHost, std::move(bad_key), false, kNoTtl).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(s.message(), "layer 1 key")) << s.message();
  auto bad_positions = PatternCache("x", 1, 1, 1, 4, 4);
  bad_positions->layers[0].positions[2] = 4;
  EXPECT_EQ(store.Put(Tier::kHost, std::move(bad_positions), false, kNoTtl).status().code(),
            absl::StatusCode::kInvalidArgument);
  // Padding (-1) may end a head's rows (per-head budgets), after at least one kept row, and nothing else may.
  auto padded = PatternCache("p", 1, 1, 2, 4, 4);
  padded->layers[0].positions = {0, 2, -1, -1, 0, 1, 2, 3};
  EXPECT_TRUE(store.Put(Tier::kHost, std::move(padded), false, kNoTtl).ok());
  for (std::vector<int32_t> bad : {std::vector<int32_t>{-1, -1, -1, -1, 0, 1, 2, 3},
                                   std::vector<int32_t>{0, -1, 2, 3, 0, 1, 2, 3},
                                   std::vector<int32_t>{0, 1, 2, -2, 0, 1, 2, 3}}) {
    auto c = PatternCache("q", 1, 1, 2, 4, 4);
    c->layers[0].positions = bad;
    const absl::Status b = store.Put(Tier::kHost, std::move(c), false, kNoTtl).status();
    EXPECT_EQ(b.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_TRUE(absl::StrContains(b.message(), "layer 0 positions[")) << b.message();
  }
  ASSERT_TRUE(store.Delete("", "p").ok());
  auto wrong_layers = PatternCache("x", 1, 2, 1, 4, 4);
  wrong_layers->description.layers = 3;
  EXPECT_EQ(store.Put(Tier::kHost, std::move(wrong_layers), false, kNoTtl).status().code(),
            absl::StatusCode::kInvalidArgument);
  ExpectConsistent(store, 0);
  EXPECT_EQ(HostStats(store).entries, 0);
}

// ---- writes -------------------------------------------------------------------------

TEST(CacheStoreTest, AlreadyExistsUnlessOverwrite) {
  CacheStore store(Options(1 << 20));
  ASSERT_TRUE(store.Put(Tier::kHost, PatternCache("id", 1, 1, 2, 4, 8), false, kNoTtl).ok());
  EXPECT_TRUE(store.Contains("id"));
  const absl::Status s = store.Put(Tier::kHost, PatternCache("id", 2, 1, 2, 4, 8), false, kNoTtl).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kAlreadyExists);
  EXPECT_TRUE(absl::StrContains(s.message(), "\"id\"")) << s.message();
  EXPECT_EQ((*store.Get("id"))->policy, "1");
  ExpectConsistent(store, SizeOf(1, 2, 4, 8));  // the failed commit released its reservation

  ASSERT_TRUE(store.Put(Tier::kHost, PatternCache("id", 3, 2, 2, 4, 8), true, kNoTtl).ok());
  auto got = store.Get("id");
  ASSERT_TRUE(got.ok());
  EXPECT_EQ((*got)->policy, "3");
  EXPECT_TRUE(Intact(**got));
  got = absl::NotFoundError("dropped");
  ExpectConsistent(store, SizeOf(2, 2, 4, 8));
  EXPECT_EQ(HostStats(store).entries, 1);
}

TEST(CacheStoreTest, ResourceExhaustedWhenOneEntryExceedsTheCapacity) {
  const int64_t size = SizeOf(1, 2, 4, 8);
  CacheStore store(Options(size - 1));
  const absl::Status s = store.Put(Tier::kHost, PatternCache("big", 1, 1, 2, 4, 8), false, kNoTtl).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(absl::StrContains(s.message(), absl::StrCat(size, " bytes"))) << s.message();
  EXPECT_TRUE(absl::StrContains(s.message(), absl::StrCat(size - 1))) << s.message();
  EXPECT_EQ(store.Reserve(Tier::kHost, size).status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(store.Reserve(Tier::kHost, -1).status().code(), absl::StatusCode::kInvalidArgument);
  // No device tier on a CPU store.
  EXPECT_FALSE(store.has_tier(Tier::kDevice));
  EXPECT_EQ(store.Reserve(Tier::kDevice, 1).status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(store.Stats().size(), 1u);
  ExpectConsistent(store, 0);
}

TEST(CacheStoreTest, CancelledReservationReleasesEverything) {
  CacheStore store(Options(1000));
  {
    auto r = store.Reserve(Tier::kHost, 600);
    ASSERT_TRUE(r.ok());
    EXPECT_EQ(r->bytes(), 600);
    ExpectConsistent(store, 600);
    EXPECT_EQ(HostStats(store).reserved_bytes, 600);
    // Another 600 cannot fit while the upload is in progress.
    const absl::Status s = store.Reserve(Tier::kHost, 600).status();
    EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
    EXPECT_TRUE(absl::StrContains(s.message(), "600 reserved")) << s.message();
    Reservation moved = *std::move(r);
    ExpectConsistent(store, 600);
    Reservation assigned;
    assigned = std::move(moved);
    EXPECT_FALSE(moved.valid());
    ExpectConsistent(store, 600);
  }  // cancelled by the destructor
  ExpectConsistent(store, 0);
  auto r = store.Reserve(Tier::kHost, 1000);
  ASSERT_TRUE(r.ok());
  r->Cancel();
  EXPECT_FALSE(r->valid());
  ExpectConsistent(store, 0);
  // A used reservation cannot be committed.
  EXPECT_EQ(store.Commit(std::move(*r), PatternCache("x", 1, 1, 1, 2, 2), false, kNoTtl).status().code(),
            absl::StatusCode::kFailedPrecondition);
  ExpectConsistent(store, 0);
}

TEST(CacheStoreTest, CommitReleasesTheUnusedPartAndRejectsTooSmallReservations) {
  CacheStore store(Options(10000));
  const int64_t size = SizeOf(1, 2, 4, 8);
  auto r = store.Reserve(Tier::kHost, size + 100);
  ASSERT_TRUE(r.ok());
  ExpectConsistent(store, size + 100);
  auto info = store.Commit(std::move(*r), PatternCache("x", 1, 1, 2, 4, 8), false, kNoTtl);
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->bytes, size);
  ExpectConsistent(store, size);

  auto small = store.Reserve(Tier::kHost, size - 1);
  ASSERT_TRUE(small.ok());
  EXPECT_EQ(store.Commit(std::move(*small), PatternCache("y", 1, 1, 2, 4, 8), false, kNoTtl).status().code(),
            absl::StatusCode::kFailedPrecondition);
  ExpectConsistent(store, size);  // the failed commit consumed and released the reservation
  EXPECT_FALSE(store.Contains("y"));

  CacheStore other(Options(10000));
  auto foreign = other.Reserve(Tier::kHost, size);
  ASSERT_TRUE(foreign.ok());
  EXPECT_EQ(store.Commit(std::move(*foreign), PatternCache("y", 1, 1, 2, 4, 8), false, kNoTtl).status().code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(other.used_bytes(Tier::kHost), 0);
}

// ---- eviction -----------------------------------------------------------------------

TEST(CacheStoreTest, EvictsLeastRecentlyUsedAndGetTouches) {
  const int64_t size = SizeOf(1, 1, 4, 4);
  CacheStore store(Options(3 * size));
  for (const char* id : {"a", "b", "c"}) {
    ASSERT_TRUE(store.Put(Tier::kHost, PatternCache(id, 1, 1, 1, 4, 4), false, kNoTtl).ok());
  }
  ASSERT_TRUE(store.Get("a").ok());  // order now (most recent first) a, c, b
  ASSERT_TRUE(store.Put(Tier::kHost, PatternCache("d", 1, 1, 1, 4, 4), false, kNoTtl).ok());
  EXPECT_FALSE(store.Contains("b"));
  EXPECT_TRUE(store.Contains("a"));
  EXPECT_TRUE(store.Contains("c"));
  EXPECT_EQ(HostStats(store).evicted_lru, 1);
  // List and Contains do not touch: c is next.
  EXPECT_EQ(store.List("", 0).size(), 3u);
  ASSERT_TRUE(store.Put(Tier::kHost, PatternCache("e", 1, 1, 1, 4, 4), false, kNoTtl).ok());
  EXPECT_FALSE(store.Contains("c"));
  // Two slots at once: a and d go, in that order of age.
  ASSERT_TRUE(store.Put(Tier::kHost, PatternCache("f", 1, 2, 1, 4, 4), false, kNoTtl).ok());
  EXPECT_FALSE(store.Contains("a"));
  EXPECT_FALSE(store.Contains("d"));
  EXPECT_TRUE(store.Contains("e"));
  EXPECT_TRUE(store.Contains("f"));
  EXPECT_EQ(HostStats(store).evicted_lru, 4);
  EXPECT_EQ(HostStats(store).evictions(), 4);
  ExpectConsistent(store, 3 * size);
}

// A reservation grown step by step evicts only for the bytes it grows by,
// oldest first; a step that cannot fit keeps what it held; the grown
// reservation commits like any other.
TEST(CacheStoreTest, GrowEvictsOnlyForTheBytesItAdds) {
  const int64_t size = SizeOf(1, 1, 4, 4);
  CacheStore store(Options(3 * size));
  for (const char* id : {"a", "b", "c"}) {
    ASSERT_TRUE(store.Put(Tier::kHost, PatternCache(id, 1, 1, 1, 4, 4), false, kNoTtl).ok());
  }
  absl::StatusOr<Reservation> r = store.Reserve(Tier::kHost, 0);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(store.List("", 0).size(), 3u);  // an empty reservation evicts nothing
  ASSERT_TRUE(store.Grow(*r, size / 2).ok());
  EXPECT_FALSE(store.Contains("a"));  // the oldest makes room for half an entry
  EXPECT_TRUE(store.Contains("b"));
  ASSERT_TRUE(store.Grow(*r, size).ok());  // still within a's room
  EXPECT_TRUE(store.Contains("b"));
  ASSERT_TRUE(store.Grow(*r, size / 4).ok());  // a smaller size: no-op
  EXPECT_EQ(r->bytes(), size);
  ExpectConsistent(store, 3 * size);
  // Beyond the capacity: refused, the reservation keeps its bytes.
  absl::Status big = store.Grow(*r, 3 * size + 1);
  EXPECT_EQ(big.code(), absl::StatusCode::kResourceExhausted) << big;
  EXPECT_EQ(r->bytes(), size);
  // A reader pins b: growing to 3 entries would need b's room.
  absl::StatusOr<std::shared_ptr<const StoredCache>> held = store.Get("b");
  ASSERT_TRUE(held.ok());
  absl::Status pinned = store.Grow(*r, 3 * size);
  EXPECT_EQ(pinned.code(), absl::StatusCode::kResourceExhausted) << pinned;
  EXPECT_EQ(r->bytes(), size);
  EXPECT_TRUE(store.Contains("b"));
  held->reset();
  ASSERT_TRUE(store.Grow(*r, 2 * size).ok());  // c goes (b was touched by the Get)
  EXPECT_FALSE(store.Contains("c"));
  EXPECT_TRUE(store.Contains("b"));
  ExpectConsistent(store, 3 * size);
  absl::StatusOr<CacheSummary> put = store.Commit(*std::move(r), PatternCache("d", 1, 2, 1, 4, 4), false, kNoTtl);
  ASSERT_TRUE(put.ok()) << put.status();
  EXPECT_TRUE(Intact(**store.Get("d")));
  ExpectConsistent(store, 3 * size);
  // A used reservation cannot grow.
  Reservation used;
  EXPECT_EQ(store.Grow(used, 1).code(), absl::StatusCode::kFailedPrecondition);
}

TEST(CacheStoreTest, AnEntryHeldByAReaderIsNeverEvicted) {
  const int64_t size = SizeOf(1, 1, 4, 4);
  CacheStore store(Options(2 * size));
  ASSERT_TRUE(store.Put(Tier::kHost, PatternCache("old", 1, 1, 1, 4, 4), false, kNoTtl).ok());
  ASSERT_TRUE(store.Put(Tier::kHost, PatternCache("new", 1, 1, 1, 4, 4), false, kNoTtl).ok());
  auto reader = store.Get("old");  // now "new" is the least recently used
  ASSERT_TRUE(reader.ok());
  auto reader2 = store.Get("new");
  ASSERT_TRUE(reader2.ok());
  // Both held: nothing can go, and nothing is evicted.
  const absl::Status s = store.Put(Tier::kHost, PatternCache("x", 1, 1, 1, 4, 4), false, kNoTtl).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(absl::StrContains(s.message(), "referenced by readers")) << s.message();
  EXPECT_TRUE(store.Contains("old"));
  EXPECT_TRUE(store.Contains("new"));
  // Needs both slots, only "old" (least recently used now) is free: fails without evicting it.
  reader = absl::NotFoundError("dropped");
  EXPECT_EQ(store.Put(Tier::kHost, PatternCache("x", 1, 2, 1, 4, 4), false, kNoTtl).status().code(),
            absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(store.Contains("old"));
  EXPECT_EQ(HostStats(store).evicted_lru, 0);
  // One slot: "old" goes even though "new" is older in the LRU order, since "new" is read.
  ASSERT_TRUE(store.Put(Tier::kHost, PatternCache("x", 1, 1, 1, 4, 4), false, kNoTtl).ok());
  EXPECT_FALSE(store.Contains("old"));
  EXPECT_TRUE(store.Contains("new"));
  EXPECT_TRUE(Intact(**reader2));
  ExpectConsistent(store, 2 * size);
}

TEST(CacheStoreTest, OverwriteWhileReadCountsBothVersionsUntilTheReaderDrops) {
  const int64_t v1 = SizeOf(1, 1, 4, 4), v2 = SizeOf(2, 1, 4, 4);
  CacheStore store(Options(1 << 20));
  ASSERT_TRUE(store.Put(Tier::kHost, PatternCache("k", 1, 1, 1, 4, 4), false, kNoTtl).ok());
  auto reader = store.Get("k");
  ASSERT_TRUE(reader.ok());
  ASSERT_TRUE(store.Put(Tier::kHost, PatternCache("k", 2, 2, 1, 4, 4), true, kNoTtl).ok());
  ExpectConsistent(store, v1 + v2, /*expected_held=*/v1);
  EXPECT_EQ((*reader)->policy, "1");
  EXPECT_TRUE(Intact(**reader));
  EXPECT_EQ((*store.Get("k"))->policy, "2");
  reader = absl::NotFoundError("dropped");
  ExpectConsistent(store, v2);
}

TEST(CacheStoreTest, DeleteWhileReadKeepsTheBytesUntilTheReaderDrops) {
  const int64_t size = SizeOf(1, 2, 4, 8);
  CacheStore store(Options(1 << 20));
  ASSERT_TRUE(store.Put(Tier::kHost, PatternCache("d", 1, 1, 2, 4, 8), false, kNoTtl).ok());
  auto reader = store.Get("d");
  ASSERT_TRUE(reader.ok());
  auto freed = store.Delete("d");
  ASSERT_TRUE(freed.ok());
  EXPECT_EQ(*freed, size);
  EXPECT_EQ(store.Get("d").status().code(), absl::StatusCode::kNotFound);
  ExpectConsistent(store, size, size);
  EXPECT_EQ(HostStats(store).entries, 0);
  EXPECT_TRUE(Intact(**reader));
  std::shared_ptr<const StoredCache> copy = *reader;
  reader = absl::NotFoundError("dropped");
  ExpectConsistent(store, size, size);
  copy.reset();
  ExpectConsistent(store, 0);
}

TEST(CacheStoreTest, ReaderAndReservationMayOutliveTheStore) {
  std::shared_ptr<const StoredCache> kept;
  Reservation reservation;
  {
    CacheStore store(Options(1 << 20));
    ASSERT_TRUE(store.Put(Tier::kHost, PatternCache("k", 1, 1, 1, 4, 4), false, kNoTtl).ok());
    kept = *store.Get("k");
    reservation = *store.Reserve(Tier::kHost, 100);
  }
  EXPECT_TRUE(Intact(*kept));
  kept.reset();
  reservation.Cancel();
}

// ---- ttl ----------------------------------------------------------------------------

TEST(CacheStoreTest, ExpiredEntriesAreInvisibleAndReclaimed) {
  FakeClock clock;
  const int64_t size = SizeOf(1, 1, 4, 4);
  CacheStore store(Options(3 * size, &clock));
  ASSERT_TRUE(store.Put(Tier::kHost, PatternCache("short", 1, 1, 1, 4, 4), false, absl::Seconds(10)).ok());
  ASSERT_TRUE(store.Put(Tier::kHost, PatternCache("long", 1, 1, 1, 4, 4), false, absl::Seconds(100)).ok());
  ASSERT_TRUE(store.Put(Tier::kHost, PatternCache("forever", 1, 1, 1, 4, 4), false, kNoTtl).ok());
  clock.Advance(absl::Seconds(9));
  auto reader = store.Get("short");
  ASSERT_TRUE(reader.ok());
  EXPECT_EQ((*reader)->expires - (*reader)->created, absl::Seconds(10));
  clock.Advance(absl::Seconds(1));  // exactly at expiry
  EXPECT_EQ(store.Get("short").status().code(), absl::StatusCode::kNotFound);
  EXPECT_FALSE(store.Contains("short"));
  EXPECT_EQ(store.List("", 0).size(), 2u);
  EXPECT_EQ(HostStats(store).expired, 1);
  ExpectConsistent(store, 3 * size, size);  // the reader still holds it
  reader = absl::NotFoundError("dropped");
  ExpectConsistent(store, 2 * size);
  // An expired id may be put again without overwrite.
  ASSERT_TRUE(store.Put(Tier::kHost, PatternCache("short", 2, 1, 1, 4, 4), false, absl::Seconds(5)).ok());
  clock.Advance(absl::Seconds(200));
  EXPECT_EQ(store.Sweep(), 2);  // "short" again and "long"
  EXPECT_EQ(HostStats(store).expired, 3);
  EXPECT_EQ(HostStats(store).evicted_lru, 0);
  ExpectConsistent(store, size);
  EXPECT_EQ(store.Delete("long").status().code(), absl::StatusCode::kNotFound);
}

TEST(CacheStoreTest, ReserveReclaimsExpiredEntriesBeforeEvicting) {
  FakeClock clock;
  const int64_t size = SizeOf(1, 1, 4, 4);
  CacheStore store(Options(2 * size, &clock));
  ASSERT_TRUE(store.Put(Tier::kHost, PatternCache("lru", 1, 1, 1, 4, 4), false, kNoTtl).ok());
  ASSERT_TRUE(store.Put(Tier::kHost, PatternCache("ttl", 1, 1, 1, 4, 4), false, absl::Seconds(1)).ok());
  clock.Advance(absl::Seconds(2));
  ASSERT_TRUE(store.Put(Tier::kHost, PatternCache("x", 1, 1, 1, 4, 4), false, kNoTtl).ok());
  EXPECT_TRUE(store.Contains("lru"));
  EXPECT_EQ(HostStats(store).expired, 1);
  EXPECT_EQ(HostStats(store).evicted_lru, 0);
}

// ---- replace ------------------------------------------------------------------------

TEST(CacheStoreTest, ReplaceSwapsOnlyTheExpectedObject) {
  FakeClock clock;
  CacheStore store(Options(1 << 20, &clock));
  ASSERT_TRUE(store.Put(Tier::kHost, PatternCache("r", 1, 2, 2, 4, 8), false, absl::Seconds(60)).ok());
  auto v1 = store.Get("r");
  ASSERT_TRUE(v1.ok());
  const absl::Time created = (*v1)->created;
  clock.Advance(absl::Seconds(1));

  auto next = PatternCache("r", 2, 2, 2, 4, 3);
  next->id.clear();  // filled in by Replace
  next->compressed = true;
  auto info = store.Replace(*v1, std::move(next));
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->id, "r");
  EXPECT_TRUE(info->compressed);
  EXPECT_EQ(info->created, created);
  EXPECT_EQ(info->expires, created + absl::Seconds(60));
  EXPECT_EQ(info->layer_tokens, (std::vector<int64_t>{3, 3}));
  ExpectConsistent(store, SizeOf(2, 2, 4, 8) + SizeOf(2, 2, 4, 3), SizeOf(2, 2, 4, 8));

  // v1 is stale now.
  EXPECT_EQ(store.Replace(*v1, PatternCache("r", 3, 1, 1, 4, 4)).status().code(), absl::StatusCode::kAborted);
  EXPECT_EQ(store.Replace(*v1, PatternCache("other", 3, 1, 1, 4, 4)).status().code(),
            absl::StatusCode::kInvalidArgument);
  v1 = absl::NotFoundError("dropped");
  ExpectConsistent(store, SizeOf(2, 2, 4, 3));
  auto v2 = store.Get("r");
  ASSERT_TRUE(v2.ok());
  EXPECT_TRUE(Intact(**v2));
  EXPECT_EQ((*v2)->policy, "2");

  // Deleted meanwhile.
  ASSERT_TRUE(store.Delete("r").ok());
  EXPECT_EQ(store.Replace(*v2, PatternCache("r", 3, 1, 1, 4, 4)).status().code(), absl::StatusCode::kNotFound);
  v2 = absl::NotFoundError("dropped");
  ExpectConsistent(store, 0);
}

TEST(CacheStoreTest, ReplaceCountsTheOldObjectAsRoomOnlyWhenNobodyElseHoldsIt) {
  const int64_t big = SizeOf(1, 1, 4, 8), small = SizeOf(1, 1, 4, 2);
  CacheStore store(Options(big + small - 1));
  ASSERT_TRUE(store.Put(Tier::kHost, PatternCache("r", 1, 1, 1, 4, 8), false, kNoTtl).ok());
  std::shared_ptr<const StoredCache> current = *store.Get("r");
  std::shared_ptr<const StoredCache> other_reader = current;
  // Another reader holds it: both cannot fit, and nothing is changed.
  EXPECT_EQ(store.Replace(current, PatternCache("r", 2, 1, 1, 4, 2)).status().code(),
            absl::StatusCode::kResourceExhausted);
  EXPECT_EQ((*store.Get("r"))->policy, "1");
  ExpectConsistent(store, big);
  // Only the caller holds it, and moves it in: its bytes are room.
  other_reader.reset();
  ASSERT_TRUE(store.Replace(std::move(current), PatternCache("r", 2, 1, 1, 4, 2)).ok());
  ExpectConsistent(store, small);
  EXPECT_EQ((*store.Get("r"))->policy, "2");
}

TEST(CacheStoreTest, ReplaceMayEvictOthersButNeverAReadEntry) {
  const int64_t size = SizeOf(1, 1, 4, 4);
  CacheStore store(Options(3 * size));
  for (const char* id : {"a", "b", "r"}) {
    ASSERT_TRUE(store.Put(Tier::kHost, PatternCache(id, 1, 1, 1, 4, 4), false, kNoTtl).ok());
  }
  auto held = store.Get("a");
  ASSERT_TRUE(held.ok());
  std::shared_ptr<const StoredCache> current = *store.Get("r");
  std::shared_ptr<const StoredCache> keep = current;  // r's old version stays alive
  ASSERT_TRUE(store.Replace(current, PatternCache("r", 2, 1, 1, 4, 4)).ok());
  EXPECT_TRUE(store.Contains("a"));
  EXPECT_FALSE(store.Contains("b"));
  EXPECT_EQ(HostStats(store).evicted_lru, 1);
  ExpectConsistent(store, 3 * size, size);
}

// ---- the device tier (emulated device memory) -------------------------------------------

std::unique_ptr<StoredCache> OnDevice(std::unique_ptr<StoredCache> cache, DeviceMemory& memory) {
  absl::StatusOr<std::unique_ptr<StoredCache>> moved = MoveToDevice(std::move(cache), memory);
  EXPECT_TRUE(moved.ok()) << moved.status();
  return moved.ok() ? *std::move(moved) : nullptr;
}

TierStats DeviceStats(CacheStore& store) {
  for (const TierStats& t : store.Stats()) {
    if (t.tier == Tier::kDevice) return t;
  }
  ADD_FAILURE() << "no device tier";
  return TierStats{};
}

TEST(DeviceTierTest, MoveToDeviceAndHostCopyKeepEveryByte) {
  std::shared_ptr<EmulatedDeviceMemory> memory = MakeEmulatedDeviceMemory();
  std::unique_ptr<StoredCache> host = PatternCache("d", 3, 3, 2, 4, 5, /*queries=*/true);
  host->layers[1].query_positions = {4};
  host->bytes = host->ComputeBytes();
  const int64_t bytes = host->bytes;
  std::unique_ptr<StoredCache> device = OnDevice(std::move(host), *memory);
  ASSERT_NE(device, nullptr);
  EXPECT_TRUE(device->on_device());
  EXPECT_EQ(device->ComputeBytes(), bytes);
  // Everything but the query positions (host metadata) is in device memory.
  EXPECT_EQ(memory->allocated_bytes(), bytes - 4);
  EXPECT_EQ(memory->allocated_blocks(), 3);
  for (const StoredLayer& l : device->layers) {
    EXPECT_TRUE(l.key.empty() && l.value.empty() && l.positions.empty() && l.query.empty());
  }
  EXPECT_TRUE(ValidateStoredCache(*device).ok());
  EXPECT_EQ(MoveToDevice(std::move(device), *memory).status().code(), absl::StatusCode::kFailedPrecondition);

  device = OnDevice(PatternCache("d", 3, 3, 2, 4, 5, true), *memory);
  ASSERT_NE(device, nullptr);
  absl::StatusOr<std::unique_ptr<StoredCache>> copy = HostCopy(*device);
  ASSERT_TRUE(copy.ok()) << copy.status();
  EXPECT_FALSE((*copy)->on_device());
  (*copy)->bytes = (*copy)->ComputeBytes();
  EXPECT_TRUE(Intact(**copy));
  const std::unique_ptr<StoredCache> reference = PatternCache("d", 3, 3, 2, 4, 5, true);
  for (int l = 0; l < 3; ++l) {
    EXPECT_EQ((*copy)->layers[l].query, reference->layers[l].query) << l;
    EXPECT_EQ((*copy)->layers[l].positions, reference->layers[l].positions) << l;
  }
  // A range: the layers outside it stay empty.
  absl::StatusOr<std::unique_ptr<StoredCache>> part = HostCopy(*device, 1, 2);
  ASSERT_TRUE(part.ok());
  EXPECT_TRUE((*part)->layers[0].key.empty());
  EXPECT_EQ((*part)->layers[1].key, reference->layers[1].key);
  EXPECT_EQ((*part)->layers[1].value, reference->layers[1].value);
  EXPECT_TRUE((*part)->layers[2].value.empty());
  EXPECT_EQ(HostCopy(*device, 2, 4).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(HostCopy(*device, -1, 1).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(HostCopy(*device, 2, 1).status().code(), absl::StatusCode::kInvalidArgument);
  // A device entry is compressed from its host copy.
  EXPECT_EQ(CompressionInput(*device).status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(CompressionInput(**copy).ok());
  device.reset();
  EXPECT_EQ(memory->allocated_bytes(), 0);
}

TEST(DeviceTierTest, MoveToDeviceKeepsNothingWhenTheDeviceIsFull) {
  const int64_t size = SizeOf(3, 1, 4, 8);
  std::shared_ptr<EmulatedDeviceMemory> memory = MakeEmulatedDeviceMemory(size - 1);
  absl::StatusOr<std::unique_ptr<StoredCache>> moved = MoveToDevice(PatternCache("f", 1, 3, 1, 4, 8), *memory);
  EXPECT_EQ(moved.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(moved.status().message().find("layer 2"), std::string::npos) << moved.status();
  EXPECT_EQ(memory->allocated_bytes(), 0);
  // An invalid cache is refused before anything is allocated.
  std::unique_ptr<StoredCache> bad = PatternCache("f", 1, 1, 1, 4, 8);
  bad->layers[0].value.pop_back();
  EXPECT_EQ(MoveToDevice(std::move(bad), *memory).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(memory->allocated_blocks(), 0);
}

TEST(DeviceTierTest, EachTierTakesOnlyItsOwnForm) {
  std::shared_ptr<EmulatedDeviceMemory> memory = MakeEmulatedDeviceMemory();
  StoreOptions o = Options(1 << 20);
  o.device_capacity_bytes = 1 << 20;
  CacheStore store(o);
  absl::Status s = store.Put(Tier::kDevice, PatternCache("h", 1, 1, 1, 4, 4), false, kNoTtl).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(s.message().find("host form"), std::string::npos) << s;
  s = store.Put(Tier::kHost, OnDevice(PatternCache("h", 1, 1, 1, 4, 4), *memory), false, kNoTtl).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  // The reservation is consumed by a failed commit, and nothing is charged.
  absl::StatusOr<Reservation> r = store.Reserve(Tier::kDevice, SizeOf(1, 1, 4, 4));
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(store.Commit(*std::move(r), PatternCache("h", 1, 1, 1, 4, 4), false, kNoTtl).status().code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(store.used_bytes(Tier::kDevice), 0);
  EXPECT_EQ(store.used_bytes(Tier::kHost), 0);

  absl::StatusOr<CacheSummary> info =
      store.Put(Tier::kDevice, OnDevice(PatternCache("d", 1, 2, 1, 4, 4), *memory), false, kNoTtl);
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->tier, Tier::kDevice);
  EXPECT_EQ(info->bytes, SizeOf(2, 1, 4, 4));
  EXPECT_EQ(DeviceStats(store).used_bytes, SizeOf(2, 1, 4, 4));
  EXPECT_EQ(DeviceStats(store).entries, 1);
  EXPECT_EQ(HostStats(store).used_bytes, 0);
  EXPECT_EQ(memory->allocated_bytes(), SizeOf(2, 1, 4, 4));
  // Replace keeps the tier and wants the device form.
  std::shared_ptr<const StoredCache> current = *store.Get("d");
  EXPECT_EQ(store.Replace(current, PatternCache("d", 2, 2, 1, 4, 2)).status().code(),
            absl::StatusCode::kFailedPrecondition);
  absl::StatusOr<CacheSummary> replaced =
      store.Replace(std::move(current), OnDevice(PatternCache("d", 2, 2, 1, 4, 2), *memory));
  ASSERT_TRUE(replaced.ok()) << replaced.status();
  EXPECT_EQ(replaced->tier, Tier::kDevice);
  EXPECT_EQ(DeviceStats(store).used_bytes, SizeOf(2, 1, 4, 2));
  EXPECT_EQ(memory->allocated_bytes(), SizeOf(2, 1, 4, 2));
  absl::StatusOr<std::unique_ptr<StoredCache>> back = HostCopy(**store.Get("d"));
  ASSERT_TRUE(back.ok());
  EXPECT_TRUE(Intact(**back));
  EXPECT_EQ((*back)->policy, "2");
  ASSERT_TRUE(store.Delete("d").ok());
  EXPECT_EQ(memory->allocated_bytes(), 0);
  EXPECT_EQ(DeviceStats(store).used_bytes, 0);
}

TEST(DeviceTierTest, EvictionFreesDeviceMemoryOnlyWhenTheLastReaderDrops) {
  std::shared_ptr<EmulatedDeviceMemory> memory = MakeEmulatedDeviceMemory();
  const int64_t size = SizeOf(1, 1, 4, 4);
  StoreOptions o = Options(10 * size);
  o.device_capacity_bytes = 2 * size;
  CacheStore store(o);
  for (const char* id : {"a", "b"}) {
    ASSERT_TRUE(store.Put(Tier::kDevice, OnDevice(PatternCache(id, 1, 1, 1, 4, 4), *memory), false, kNoTtl).ok());
  }
  std::shared_ptr<const StoredCache> reader = *store.Get("a");  // b is now the least recently used
  ASSERT_TRUE(store.Put(Tier::kDevice, OnDevice(PatternCache("c", 1, 1, 1, 4, 4), *memory), false, kNoTtl).ok());
  EXPECT_FALSE(store.Contains("b"));
  EXPECT_EQ(memory->allocated_bytes(), 2 * size);  // b freed
  // a is held: c cannot evict it, so d does not fit; nothing is evicted for it.
  std::shared_ptr<const StoredCache> reader_c = *store.Get("c");
  EXPECT_EQ(store.Put(Tier::kDevice, OnDevice(PatternCache("d", 1, 1, 1, 4, 4), *memory), false, kNoTtl)
                .status()
                .code(),
            absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(memory->allocated_bytes(), 2 * size);  // d's device copy was dropped with the failed put
  // Deleted while read: the memory stays until the reader drops it.
  ASSERT_TRUE(store.Delete("a").ok());
  EXPECT_EQ(memory->allocated_bytes(), 2 * size);
  EXPECT_EQ(DeviceStats(store).held_bytes, size);
  absl::StatusOr<std::unique_ptr<StoredCache>> copy = HostCopy(*reader);
  ASSERT_TRUE(copy.ok());
  EXPECT_TRUE(Intact(**copy));
  reader.reset();
  EXPECT_EQ(memory->allocated_bytes(), size);
  EXPECT_EQ(DeviceStats(store).used_bytes, size);
  EXPECT_EQ(DeviceStats(store).evicted_lru, 1);
  EXPECT_EQ(HostStats(store).used_bytes, 0);  // the host tier was never touched
}

// ---- compression helpers --------------------------------------------------------------

TEST(CacheStoreTest, CompressionInputViewsTheStoredBuffers) {
  auto c = PatternCache("c", 1, 2, 2, 4, 8, /*queries=*/true);
  c->description.modality = {ModalitySpan{1, 3, Modality::kVisual}};
  ASSERT_TRUE(ValidateStoredCache(*c).ok()) << ValidateStoredCache(*c);
  auto in = CompressionInput(*c);
  ASSERT_TRUE(in.ok()) << in.status();
  EXPECT_TRUE(ValidateCacheInput(*in).ok()) << ValidateCacheInput(*in);
  EXPECT_EQ(in->stats, StatsForm::kQueries);
  EXPECT_EQ(in->modality, (std::vector<uint8_t>{0, 1, 1, 1, 0, 0, 0, 0}));
  EXPECT_EQ(in->layers[1].key.data, c->layers[1].key.data());
  EXPECT_EQ(in->layers[1].query.data, c->layers[1].query.data());
  EXPECT_EQ(in->layers[1].query.heads, 4);
  EXPECT_EQ(in->layers[1].query.tokens, 1);

  auto none = PatternCache("n", 1, 1, 1, 4, 4);
  EXPECT_EQ(CompressionInput(*none).status().code(), absl::StatusCode::kFailedPrecondition);

  CompressResult result;
  for (int l = 0; l < 2; ++l) {
    LayerResult r;
    r.budget = 2;
    r.key.assign(2 * 2 * 4 * 2, 7);
    r.value.assign(2 * 2 * 4 * 2, 9);
    r.positions = {0, 5, 1, 7};
    r.entropy = 0.5f;
    r.alpha = 0.25;
    result.layers.push_back(std::move(r));
  }
  auto compressed = MakeCompressedCache(*c, std::move(result), "meda");
  EXPECT_TRUE(ValidateStoredCache(*compressed).ok()) << ValidateStoredCache(*compressed);
  EXPECT_TRUE(compressed->compressed);
  EXPECT_EQ(compressed->policy, "meda");
  EXPECT_EQ(compressed->stats, KeptStats::kNone);
  EXPECT_EQ(compressed->layers[1].tokens, 2);
  EXPECT_EQ(compressed->layers[1].positions, (std::vector<int32_t>{0, 5, 1, 7}));
  EXPECT_EQ(CompressionInput(*compressed).status().code(), absl::StatusCode::kFailedPrecondition);
}

// ---- concurrency --------------------------------------------------------------------

TEST(CacheStoreTest, ConcurrentPutGetDeleteReplaceKeepTheInvariants) {
  constexpr int kThreads = 16;
  constexpr int kOpsPerThread = 4000;
  constexpr int kIds = 12;
  const int64_t unit = SizeOf(1, 1, 4, 4);
  CacheStore store(Options(8 * unit));
  std::atomic<int64_t> next_version{1};
  std::atomic<int> corrupt{0}, unexpected{0}, puts_ok{0}, gets_ok{0}, replaced{0}, exhausted{0};

  auto worker = [&](int thread) {
    std::mt19937 rng(1000 + thread);
    std::uniform_int_distribution<int> op(0, 99), pick(0, kIds - 1), layers(1, 3), hold(0, 3);
    std::vector<std::shared_ptr<const StoredCache>> held;
    for (int i = 0; i < kOpsPerThread; ++i) {
      const std::string id = absl::StrCat("c", pick(rng));
      const int o = op(rng);
      if (o < 35) {  // put
        auto r = store.Put(Tier::kHost, PatternCache(id, next_version++, layers(rng), 1, 4, 4), op(rng) < 70,
                           kNoTtl);
        if (r.ok()) {
          ++puts_ok;
        } else if (r.status().code() == absl::StatusCode::kResourceExhausted) {
          ++exhausted;
        } else if (r.status().code() != absl::StatusCode::kAlreadyExists) {
          ++unexpected;
        }
      } else if (o < 70) {  // get, sometimes held across later operations
        auto r = store.Get(id);
        if (r.ok()) {
          ++gets_ok;
          if ((*r)->id != id || !Intact(**r)) ++corrupt;
          if (hold(rng) == 0) held.push_back(*std::move(r));
        } else if (r.status().code() != absl::StatusCode::kNotFound) {
          ++unexpected;
        }
      } else if (o < 80) {  // delete
        auto r = store.Delete(id);
        if (!r.ok() && r.status().code() != absl::StatusCode::kNotFound) ++unexpected;
      } else if (o < 92) {  // replace with a smaller or bigger version
        auto r = store.Get(id);
        if (!r.ok()) continue;
        std::shared_ptr<const StoredCache> current = *std::move(r);
        auto next = PatternCache(id, next_version++, layers(rng), 1, 4, 4);
        auto s = store.Replace(std::move(current), std::move(next));
        if (s.ok()) {
          ++replaced;
        } else if (s.status().code() == absl::StatusCode::kResourceExhausted) {
          ++exhausted;
        } else if (s.status().code() != absl::StatusCode::kAborted &&
                   s.status().code() != absl::StatusCode::kNotFound) {
          ++unexpected;
        }
      } else if (o < 96) {  // an upload that is cancelled
        auto r = store.Reserve(Tier::kHost, unit * layers(rng));
        if (!r.ok() && r.status().code() != absl::StatusCode::kResourceExhausted) ++unexpected;
      } else {  // readers finish
        held.clear();
        const TierStats s = HostStats(store);
        if (s.used_bytes < 0 || s.held_bytes < 0 || s.stored_bytes < 0 || s.reserved_bytes < 0 ||
            s.used_bytes != s.reserved_bytes + s.stored_bytes + s.held_bytes) {
          ++unexpected;
        }
      }
      if (held.size() > 2) held.erase(held.begin());
    }
  };
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) threads.emplace_back(worker, t);
  for (std::thread& t : threads) t.join();

  EXPECT_EQ(corrupt.load(), 0);
  EXPECT_EQ(unexpected.load(), 0);
  EXPECT_GT(puts_ok.load(), 0);
  EXPECT_GT(gets_ok.load(), 0);
  EXPECT_GT(replaced.load(), 0);
  const TierStats s = HostStats(store);
  EXPECT_EQ(s.reserved_bytes, 0);
  EXPECT_EQ(s.held_bytes, 0);
  EXPECT_LE(s.used_bytes, s.capacity_bytes);
  int64_t live = 0;
  for (const CacheSummary& c : store.List("", 0)) {
    auto got = store.Get(c.id);
    ASSERT_TRUE(got.ok());
    EXPECT_TRUE(Intact(**got));
    live += (*got)->ComputeBytes();
  }
  EXPECT_EQ(s.used_bytes, live);
  EXPECT_EQ(s.stored_bytes, live);
  for (const CacheSummary& c : store.List("", 0)) ASSERT_TRUE(store.Delete(c.id).ok());
  ExpectConsistent(store, 0);
}

}  // namespace
}  // namespace medakv
