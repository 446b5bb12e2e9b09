// medakv::Client against real medakv-server processes on loopback ports
// (tests/client/server_process.h): every call, shared memory and its
// fallback, deadlines, retries of the idempotent calls only, and sharding
// over three replicas, one of which is killed. The placement function and
// the target parsing are also checked on their own.
#include "client/cpp/client.h"

#include <arpa/inet.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <map>
#include <numeric>
#include <set>
#include <thread>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "kernels/backend.h"
#include "kernels/common/tensor_util.h"
#include "medakv/v1/medakv.grpc.pb.h"
#include "tests/client/client_test_util.h"
#include "tests/client/server_process.h"
#include "tests/service/test_cache.h"

namespace medakv {
namespace {

using test::CacheParams;
using test::ExpectSameResult;
using test::LocalCompress;
using test::MakeTestCache;
using test::Meda;
using test::NewClient;
using test::Options;
using test::ServerProcess;
using test::StartServer;
using test::TestCache;

#define ASSERT_OK(expr)                          \
  do {                                           \
    const absl::Status _s = (expr);              \
    ASSERT_TRUE(_s.ok()) << #expr << ": " << _s; \
  } while (false)

void ExpectStatusAt(const char* file, int line, const absl::Status& s, absl::StatusCode code,
                    const std::string& fragment) {
  SCOPED_TRACE(::testing::Message() << "called from " << file << ":" << line);
  EXPECT_EQ(s.code(), code) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), fragment)) << "'" << fragment << "' not in: " << s.message();
}
#define ExpectStatus(s, code, fragment) ExpectStatusAt(__FILE__, __LINE__, s, code, fragment)

// A loopback port with nothing listening (bound, then closed).
int ClosedPort() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  socklen_t len = sizeof(a);
  if (bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0 ||
      getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
    close(fd);
    return 1;
  }
  close(fd);
  return ntohs(a.sin_port);
}

// A fetched (uncompressed) cache holds the uploaded keys and values, and the
// positions 0..T-1 for every head.
void ExpectStoredAsSent(const FetchedCache& got, const CacheInput& in, int32_t begin, int32_t end) {
  ASSERT_EQ(got.layer_begin, begin);
  ASSERT_EQ(static_cast<int32_t>(got.layers.size()), end - begin);
  for (int32_t l = begin; l < end; ++l) {
    const LayerResult& r = got.layers[l - begin];
    const LayerInput& want = in.layers[l];
    EXPECT_EQ(r.budget, in.tokens) << "layer " << l;
    ASSERT_EQ(static_cast<int64_t>(r.key.size()), want.key.NumBytes()) << "layer " << l;
    EXPECT_EQ(std::memcmp(r.key.data(), want.key.data, r.key.size()), 0) << "layer " << l << " keys differ";
    ASSERT_EQ(static_cast<int64_t>(r.value.size()), want.value.NumBytes()) << "layer " << l;
    EXPECT_EQ(std::memcmp(r.value.data(), want.value.data, r.value.size()), 0) << "layer " << l << " values differ";
    ASSERT_EQ(static_cast<int64_t>(r.positions.size()), in.kv_heads * in.tokens);
    for (int64_t h = 0; h < in.kv_heads; ++h) {
      for (int64_t t = 0; t < in.tokens; ++t) ASSERT_EQ(r.positions[h * in.tokens + t], t) << "layer " << l;
    }
  }
}

// ---- placement and targets ----------------------------------------------------------

TEST(RendezvousTest, ScoresAreTheDocumentedFunction) {
  // The values of docs/client.md, computed there by an independent Python
  // implementation: other clients must place ids exactly alike.
  EXPECT_EQ(RendezvousScore("", ""), 0xb9034ad37056f5fbULL);
  EXPECT_EQ(RendezvousScore("127.0.0.1:50051", "prompt-1"), 0x686f6f3a617efd59ULL);
  EXPECT_EQ(RendezvousScore("medakv-0.medakv:50051", "prompt-1"), 0x54b2ab864703d45dULL);
  EXPECT_EQ(RendezvousScore("medakv-1.medakv:50051", "prompt-1"), 0x0b4fcb27e6a36c75ULL);
  EXPECT_EQ(RendezvousScore("medakv-2.medakv:50051", "prompt-1"), 0x86a29158306d0eb7ULL);
  const std::vector<std::string> targets = {"medakv-0.medakv:50051", "medakv-1.medakv:50051", "medakv-2.medakv:50051"};
  EXPECT_EQ(RendezvousPick(targets, "prompt-1"), 2u);
  EXPECT_EQ(RendezvousPick(targets, "prompt-2"), 1u);
  EXPECT_EQ(RendezvousPick(targets, "a"), 0u);
  // The separator byte: ("ab", "c") and ("a", "bc") are different inputs.
  EXPECT_NE(RendezvousScore("ab", "c"), RendezvousScore("a", "bc"));
}

TEST(RendezvousTest, PlacementIsBalancedOrderFreeAndMovesOnlyWhatItMust) {
  const std::vector<std::string> three = {"10.0.0.1:50051", "10.0.0.2:50051", "10.0.0.3:50051"};
  const std::vector<std::string> reversed(three.rbegin(), three.rend());
  const std::vector<std::string> two = {three[0], three[2]};  // 10.0.0.2 gone
  std::vector<std::string> four = three;
  four.push_back("10.0.0.4:50051");
  std::map<std::string, int> count;
  int moved_by_adding = 0;
  constexpr int kIds = 3000;
  for (int i = 0; i < kIds; ++i) {
    const std::string id = absl::StrCat("prompt-", i);
    const std::string& on = three[RendezvousPick(three, id)];
    ++count[on];
    EXPECT_EQ(reversed[RendezvousPick(reversed, id)], on) << id;  // the order of the list does not matter
    const std::string& on_two = two[RendezvousPick(two, id)];
    if (on != three[1]) {
      EXPECT_EQ(on_two, on) << id << ": only the removed replica's ids move";
    }
    const std::string& on_four = four[RendezvousPick(four, id)];
    if (on_four != on) {
      EXPECT_EQ(on_four, four[3]) << id << ": ids move only to the added replica";
      ++moved_by_adding;
    }
  }
  for (const std::string& t : three) {
    EXPECT_GT(count[t], kIds / 3 - 150) << t;
    EXPECT_LT(count[t], kIds / 3 + 150) << t;
  }
  EXPECT_GT(moved_by_adding, kIds / 4 - 150);
  EXPECT_LT(moved_by_adding, kIds / 4 + 150);
}

TEST(TargetTest, LocalTargets) {
  for (const char* t : {"127.0.0.1:50051", "localhost:1", "LOCALHOST:1", "127.1.2.3:9", "[::1]:50051",
                        "ipv4:127.0.0.1:5", "ipv4:127.0.0.1:5,127.0.0.2:6", "ipv6:[::1]:5", "dns:///localhost:5",
                        "dns://8.8.8.8/127.0.0.1:5", "unix:/tmp/medakv.sock", "unix:///tmp/medakv.sock",
                        "unix-abstract:medakv", "localhost", "[::ffff:127.0.0.1]:80"}) {
    EXPECT_TRUE(IsLocalTarget(t)) << t;
  }
  for (const char* t : {"10.0.0.1:50051", "medakv-0.medakv:50051", "example.com:443", "[2001:db8::1]:50051",
                        "ipv4:127.0.0.1:5,10.0.0.1:6", "dns:///medakv:50051", "128.0.0.1:1", "",
                        "ipv4:", "notlocalhost:1", "dns://8.8.8.8"}) {
    EXPECT_FALSE(IsLocalTarget(t)) << t;
  }
}

TEST(ClientOptionsTest, InvalidOptionsNameTheField) {
  auto create_error = [](auto edit) {
    ClientOptions o = Options({"127.0.0.1:1"});
    edit(o);
    return Client::Create(o).status();
  };
  ExpectStatus(create_error([](ClientOptions& o) { o.targets.clear(); }), absl::StatusCode::kInvalidArgument,
               "targets");
  ExpectStatus(create_error([](ClientOptions& o) {
                 o.targets = {"a:1", ""};
               }),
               absl::StatusCode::kInvalidArgument, "targets[1] is empty");
  ExpectStatus(create_error([](ClientOptions& o) {
                 o.targets = {"a:1", "b:1", "a:1"};
               }),
               absl::StatusCode::kInvalidArgument, "targets[2] 'a:1' is listed twice");
  ExpectStatus(create_error([](ClientOptions& o) { o.deadline = absl::ZeroDuration(); }),
               absl::StatusCode::kInvalidArgument, "deadline");
  ExpectStatus(create_error([](ClientOptions& o) { o.retry.max_attempts = 0; }), absl::StatusCode::kInvalidArgument,
               "retry.max_attempts");
  ExpectStatus(create_error([](ClientOptions& o) { o.retry.max_backoff = absl::Milliseconds(1); }),
               absl::StatusCode::kInvalidArgument, "initial_backoff <= max_backoff");
  ExpectStatus(create_error([](ClientOptions& o) { o.retry.backoff_multiplier = 0.5; }),
               absl::StatusCode::kInvalidArgument, "backoff_multiplier");
  ExpectStatus(create_error([](ClientOptions& o) { o.chunk_bytes = 0; }), absl::StatusCode::kInvalidArgument,
               "chunk_bytes");
  ExpectStatus(create_error([](ClientOptions& o) { o.response_chunk_bytes = 10; }), absl::StatusCode::kInvalidArgument,
               "response_chunk_bytes");
  ExpectStatus(create_error([](ClientOptions& o) { o.shared_memory_pool_bytes = -1; }),
               absl::StatusCode::kInvalidArgument, "shared_memory_pool_bytes");
}

TEST(ClientOptionsTest, BadArgumentsFailBeforeTheNetwork) {
  // Nothing listens on port 1: these fail on their arguments, not UNAVAILABLE.
  const std::unique_ptr<Client> client = NewClient(Options({"127.0.0.1:1"}));
  ASSERT_NE(client, nullptr);
  TestCache c = MakeTestCache(CacheParams{});
  ExpectStatus(client->PutCache("", c.input).status(), absl::StatusCode::kInvalidArgument, "1-256 bytes");
  ExpectStatus(client->PutCache("a b", c.input).status(), absl::StatusCode::kInvalidArgument,
               "byte 1 is outside [A-Za-z0-9._:/-]");
  ExpectStatus(client->PutCache(std::string(257, 'a'), c.input).status(), absl::StatusCode::kInvalidArgument,
               "1-256 bytes");
  PutOptions ttl;
  ttl.ttl_seconds = -1;
  ExpectStatus(client->PutCache("x", c.input, ttl).status(), absl::StatusCode::kInvalidArgument, "ttl_seconds");
  PutOptions tier;
  tier.tier = static_cast<v1::CacheTier>(7);
  ExpectStatus(client->PutCache("x", c.input, tier).status(), absl::StatusCode::kInvalidArgument,
               "tier must be CACHE_TIER_AUTO, CACHE_TIER_HOST or CACHE_TIER_DEVICE, got 7");
  CacheInput bad = c.input;
  bad.layers[1].value.tokens = 3;
  ExpectStatus(client->Compress(bad, Meda(0.2)).status(), absl::StatusCode::kInvalidArgument, "layer 1 value");
  PutOptions kv_only;
  kv_only.with_statistics = false;
  ExpectStatus(client->PutCache("x", bad, kv_only).status(), absl::StatusCode::kInvalidArgument, "layer 1 value");
  CompressOptions rho = Meda(1.5);
  ExpectStatus(client->Compress(c.input, rho).status(), absl::StatusCode::kInvalidArgument, "rho");
  ExpectStatus(client->CompressCache("x", rho).status(), absl::StatusCode::kInvalidArgument, "rho");
  GetOptions range;
  range.layer_begin = 2;
  range.layer_end = 1;
  ExpectStatus(client->GetCache("x", range).status(), absl::StatusCode::kInvalidArgument, "layer range");
  ExpectStatus(client->ListCaches("", -1).status(), absl::StatusCode::kInvalidArgument, "limit");
  ExpectStatus(client->DeleteCache("").status(), absl::StatusCode::kInvalidArgument, "cache id");
}

// ---- what PutCache sends --------------------------------------------------------------

// An in-process server whose PutCache keeps every header it receives and
// answers with the id (every other method: UNIMPLEMENTED).
class HeaderRecorder final : public v1::Medakv::Service {
 public:
  grpc::Status PutCache(grpc::ServerContext*, grpc::ServerReader<v1::PutCacheRequest>* reader,
                        v1::PutCacheResponse* response) override {
    v1::PutCacheRequest request;
    while (reader->Read(&request)) {
      if (!request.has_header()) continue;
      response->mutable_info()->set_cache_id(request.header().cache_id());
      absl::MutexLock lock(&mu_);
      headers_.push_back(request.header());
    }
    return grpc::Status::OK;
  }

  std::vector<v1::PutCacheHeader> headers() {
    absl::MutexLock lock(&mu_);
    return headers_;
  }

 private:
  absl::Mutex mu_;
  std::vector<v1::PutCacheHeader> headers_ ABSL_GUARDED_BY(mu_);
};

TEST(PutHeaderTest, TheHeaderCarriesTheTierAndTheOtherPutOptions) {
  HeaderRecorder recorder;
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(&recorder);
  const std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  ASSERT_NE(server, nullptr);
  ASSERT_GT(port, 0);
  ClientOptions o = Options({absl::StrCat("127.0.0.1:", port)});
  o.shared_memory = SharedMemoryMode::kOff;  // the recorder has no RegisterSharedMemory
  const std::unique_ptr<Client> client = NewClient(o);
  ASSERT_NE(client, nullptr);
  TestCache c = MakeTestCache(CacheParams{});

  EXPECT_EQ(PutOptions{}.tier, v1::CACHE_TIER_AUTO);
  ASSERT_OK(client->PutCache("tier-default", c.input).status());
  ASSERT_EQ(recorder.headers().size(), 1u);
  EXPECT_EQ(recorder.headers()[0].tier(), v1::CACHE_TIER_AUTO);
  EXPECT_EQ(recorder.headers()[0].cache_id(), "tier-default");

  for (v1::CacheTier tier : {v1::CACHE_TIER_HOST, v1::CACHE_TIER_DEVICE, v1::CACHE_TIER_AUTO}) {
    SCOPED_TRACE(v1::CacheTier_Name(tier));
    const std::string id = absl::StrCat("tier-", v1::CacheTier_Name(tier));
    PutOptions put;
    put.tier = tier;
    put.ttl_seconds = 60;
    put.overwrite = true;
    absl::StatusOr<PutResult> r = client->PutCache(id, c.input, put);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->info.cache_id(), id);
    const v1::PutCacheHeader h = recorder.headers().back();
    EXPECT_EQ(h.cache_id(), id);
    EXPECT_EQ(h.tier(), tier);
    EXPECT_EQ(h.ttl_seconds(), 60);
    EXPECT_TRUE(h.overwrite());
  }
  EXPECT_EQ(recorder.headers().size(), 4u);

  // A value outside the enum is refused before anything is sent.
  PutOptions bad;
  bad.tier = static_cast<v1::CacheTier>(3);
  ExpectStatus(client->PutCache("tier-bad", c.input, bad).status(), absl::StatusCode::kInvalidArgument,
               "tier must be CACHE_TIER_AUTO, CACHE_TIER_HOST or CACHE_TIER_DEVICE, got 3");
  EXPECT_EQ(recorder.headers().size(), 4u);
  server->Shutdown();
}

// ---- one server ------------------------------------------------------------------------

class OneServerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { server_ = StartServer().release(); }
  static void TearDownTestSuite() {
    delete server_;
    server_ = nullptr;
  }
  void SetUp() override { ASSERT_NE(server_, nullptr) << "medakv-server did not start"; }

  std::unique_ptr<Client> NewClientFor(SharedMemoryMode shm = SharedMemoryMode::kAuto) {
    ClientOptions o = Options({server_->target()});
    o.shared_memory = shm;
    return NewClient(std::move(o));
  }

  static ServerProcess* server_;
};
ServerProcess* OneServerTest::server_ = nullptr;

TEST_F(OneServerTest, CompressEqualsTheLibraryForEveryDtypeLayoutAndStatisticsForm) {
  const std::unique_ptr<Client> shm = NewClientFor(SharedMemoryMode::kAuto);
  const std::unique_ptr<Client> bytes = NewClientFor(SharedMemoryMode::kOff);
  for (DType dtype : {DType::kFloat16, DType::kBFloat16, DType::kFloat32}) {
    for (Layout layout : {Layout::kHND, Layout::kNHD}) {
      for (bool precomputed : {false, true}) {
        CacheParams p;
        p.dtype = dtype;
        p.layout = layout;
        p.precomputed = precomputed;
        p.layers = 3;
        p.tokens = 77;
        TestCache c = MakeTestCache(p);
        const CompressOptions o = Meda(0.3);
        const CompressResult want = LocalCompress(c.input, o);
        for (Client* client : {shm.get(), bytes.get()}) {
          SCOPED_TRACE(absl::StrCat(DTypeName(dtype), " ", LayoutName(layout), precomputed ? " precomputed" : "",
                                    client == shm.get() ? " shm" : " bytes"));
          absl::StatusOr<RemoteResult> got = client->Compress(c.input, o);
          ASSERT_TRUE(got.ok()) << got.status();
          ExpectSameResult(got->result, want);
          EXPECT_EQ(got->target, server_->target());
          EXPECT_EQ(got->shared_memory, client == shm.get());
          EXPECT_EQ(got->summary.backend(), "cpu");
        }
      }
    }
  }
}

TEST_F(OneServerTest, CompressWithOtherPoliciesAndSmallChunks) {
  ClientOptions o = Options({server_->target()});
  o.shared_memory = SharedMemoryMode::kOff;
  o.chunk_bytes = 1000;  // many chunks per tensor
  o.response_chunk_bytes = 1024;
  const std::unique_ptr<Client> client = NewClient(o);
  CacheParams p;
  p.tokens = 300;
  TestCache c = MakeTestCache(p);
  for (PolicyKind kind : {PolicyKind::kSnapKV, PolicyKind::kStreamingLlm, PolicyKind::kFull, PolicyKind::kLookM}) {
    CompressOptions options = DefaultOptions(kind);
    options.budget.rho = 0.25;
    absl::StatusOr<RemoteResult> got = client->Compress(c.input, options);
    ASSERT_TRUE(got.ok()) << got.status();
    ExpectSameResult(got->result, LocalCompress(c.input, options));
  }
}

TEST_F(OneServerTest, PutThenGetReturnsWhatWasSentOverSharedMemoryAndBytes) {
  const std::unique_ptr<Client> shm = NewClientFor(SharedMemoryMode::kAuto);
  const std::unique_ptr<Client> bytes = NewClientFor(SharedMemoryMode::kOff);
  CacheParams p;
  p.layers = 3;
  p.tokens = 129;
  p.dtype = DType::kBFloat16;
  p.layout = Layout::kNHD;
  TestCache c = MakeTestCache(p);
  int n = 0;
  for (Client* put_client : {shm.get(), bytes.get()}) {
    const std::string id = absl::StrCat("roundtrip-", n++);
    absl::StatusOr<PutResult> put = put_client->PutCache(id, c.input);
    ASSERT_TRUE(put.ok()) << put.status();
    EXPECT_EQ(put->shared_memory, put_client == shm.get());
    EXPECT_EQ(put->target, server_->target());
    EXPECT_EQ(put->info.cache_id(), id);
    EXPECT_EQ(put->info.shape().layers(), 3);
    EXPECT_EQ(put->info.shape().tokens(), 129);
    EXPECT_EQ(put->info.shape().layout(), v1::LAYOUT_NHD);
    EXPECT_EQ(put->info.shape().dtype(), v1::DTYPE_BFLOAT16);
    EXPECT_FALSE(put->info.compressed());
    for (Client* get_client : {shm.get(), bytes.get()}) {
      SCOPED_TRACE(absl::StrCat(id, get_client == shm.get() ? " get shm" : " get bytes"));
      absl::StatusOr<FetchedCache> got = get_client->GetCache(id);
      ASSERT_TRUE(got.ok()) << got.status();
      EXPECT_EQ(got->shared_memory, get_client == shm.get());
      EXPECT_EQ(got->info.cache_id(), id);
      ExpectStoredAsSent(*got, c.input, 0, 3);
      EXPECT_EQ(got->bytes_received, 3 * c.input.kv_heads * 129 * (2 * c.input.head_dim * 2 + 4));
      GetOptions range;
      range.layer_begin = 1;
      range.layer_end = 2;
      absl::StatusOr<FetchedCache> part = get_client->GetCache(id, range);
      ASSERT_TRUE(part.ok()) << part.status();
      ExpectStoredAsSent(*part, c.input, 1, 2);
    }
  }
}

TEST_F(OneServerTest, CompressCacheInPlaceThenGetEqualsTheLibrary) {
  for (SharedMemoryMode mode : {SharedMemoryMode::kAuto, SharedMemoryMode::kOff}) {
    const std::unique_ptr<Client> client = NewClientFor(mode);
    for (bool precomputed : {false, true}) {
      CacheParams p;
      p.precomputed = precomputed;
      p.layers = 4;
      p.tokens = 100;
      TestCache c = MakeTestCache(p);
      const std::string id = absl::StrCat("inplace-", static_cast<int>(mode), "-", precomputed);
      ASSERT_TRUE(client->PutCache(id, c.input).ok());
      const CompressOptions o = Meda(0.25);
      absl::StatusOr<v1::CompressCacheResponse> compressed = client->CompressCache(id, o);
      ASSERT_TRUE(compressed.ok()) << compressed.status();
      const CompressResult want = LocalCompress(c.input, o);
      ASSERT_EQ(compressed->layers_size(), 4);
      EXPECT_TRUE(compressed->info().compressed());
      EXPECT_EQ(compressed->info().policy(), "meda");
      EXPECT_EQ(compressed->summary().tokens_kept(), want.tokens_kept);
      absl::StatusOr<FetchedCache> got = client->GetCache(id);
      ASSERT_TRUE(got.ok()) << got.status();
      CompressResult fetched;
      fetched.layers = got->layers;
      fetched.tokens_in = want.tokens_in;
      fetched.tokens_kept = want.tokens_kept;
      ExpectSameResult(fetched, want);
      // Compressing twice is the server's FAILED_PRECONDITION, named with the server.
      ExpectStatus(client->CompressCache(id, o).status(), absl::StatusCode::kFailedPrecondition,
                   absl::StrCat("server ", server_->target(), ": FAILED_PRECONDITION"));
    }
  }
}

TEST_F(OneServerTest, StoreErrorsKeepTheirCodesAndNameTheServer) {
  const std::unique_ptr<Client> client = NewClientFor();
  TestCache c = MakeTestCache(CacheParams{});
  ASSERT_TRUE(client->PutCache("errors-1", c.input).ok());
  ExpectStatus(client->PutCache("errors-1", c.input).status(), absl::StatusCode::kAlreadyExists,
               absl::StrCat("server ", server_->target(), ": ALREADY_EXISTS: "));
  PutOptions overwrite;
  overwrite.overwrite = true;
  overwrite.ttl_seconds = 3600;
  absl::StatusOr<PutResult> replaced = client->PutCache("errors-1", c.input, overwrite);
  ASSERT_TRUE(replaced.ok()) << replaced.status();
  EXPECT_GT(replaced->info.expires_unix_ms(), 0);
  // Keys and values only: stored smaller, and it cannot be compressed in place.
  PutOptions kv;
  kv.with_statistics = false;
  absl::StatusOr<PutResult> plain = client->PutCache("errors-kv", c.input, kv);
  ASSERT_TRUE(plain.ok()) << plain.status();
  EXPECT_LT(plain->info.bytes(), replaced->info.bytes());
  absl::StatusOr<FetchedCache> got = client->GetCache("errors-kv");
  ASSERT_TRUE(got.ok()) << got.status();
  ExpectStoredAsSent(*got, c.input, 0, static_cast<int32_t>(c.input.layers.size()));
  ExpectStatus(client->CompressCache("errors-kv", Meda(0.2)).status(), absl::StatusCode::kFailedPrecondition,
               "server ");
  ExpectStatus(client->GetCache("errors-none").status(), absl::StatusCode::kNotFound,
               absl::StrCat("server ", server_->target(), ": NOT_FOUND: "));
  GetOptions range;
  range.layer_begin = 5;
  ExpectStatus(client->GetCache("errors-1", range).status(), absl::StatusCode::kInvalidArgument, "layer range");
}

TEST_F(OneServerTest, HostAndAutoTiersLandOnTheHostTierOfACpuServer) {
  // The test server has no device tier: AUTO falls back to the host tier.
  const std::unique_ptr<Client> client = NewClientFor();
  TestCache c = MakeTestCache(CacheParams{});
  for (v1::CacheTier tier : {v1::CACHE_TIER_HOST, v1::CACHE_TIER_AUTO}) {
    SCOPED_TRACE(v1::CacheTier_Name(tier));
    const std::string id = absl::StrCat("tier-", v1::CacheTier_Name(tier));
    PutOptions put;
    put.tier = tier;
    absl::StatusOr<PutResult> r = client->PutCache(id, c.input, put);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->info.tier(), "host");
    absl::StatusOr<FetchedCache> got = client->GetCache(id);
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(got->info.tier(), "host");
    ExpectStoredAsSent(*got, c.input, 0, static_cast<int32_t>(c.input.layers.size()));
    ASSERT_OK(client->DeleteCache(id).status());
  }
}

TEST_F(OneServerTest, DeleteListStatsAndHealth) {
  const std::unique_ptr<Client> client = NewClientFor();
  TestCache c = MakeTestCache(CacheParams{});
  for (const char* id : {"list-b", "list-a", "list-c"}) ASSERT_TRUE(client->PutCache(id, c.input).ok());
  absl::StatusOr<CacheList> list = client->ListCaches("list-");
  ASSERT_TRUE(list.ok()) << list.status();
  EXPECT_TRUE(list->errors.empty());
  ASSERT_EQ(list->caches.size(), 3u);
  EXPECT_EQ(list->caches[0].info.cache_id(), "list-a");
  EXPECT_EQ(list->caches[2].info.cache_id(), "list-c");
  EXPECT_EQ(list->caches[1].target, server_->target());
  absl::StatusOr<CacheList> two = client->ListCaches("list-", 2);
  ASSERT_TRUE(two.ok());
  ASSERT_EQ(two->caches.size(), 2u);
  EXPECT_EQ(two->caches[1].info.cache_id(), "list-b");

  absl::StatusOr<ClusterStats> before = client->Stats();
  ASSERT_TRUE(before.ok()) << before.status();
  EXPECT_EQ(before->answered, 1);
  ASSERT_EQ(before->replicas.size(), 1u);
  ASSERT_TRUE(before->replicas[0].stats.ok());
  ASSERT_EQ(before->total.tiers_size(), 1);
  EXPECT_EQ(before->total.tiers(0).tier(), "host");
  EXPECT_EQ(before->total.tiers(0).entries(), before->replicas[0].stats->tiers(0).entries());
  EXPECT_EQ(before->total.backend(), "cpu");

  absl::StatusOr<int64_t> freed = client->DeleteCache("list-b");
  ASSERT_TRUE(freed.ok()) << freed.status();
  EXPECT_EQ(*freed, list->caches[1].info.bytes());
  ExpectStatus(client->DeleteCache("list-b").status(), absl::StatusCode::kNotFound, "NOT_FOUND");
  ExpectStatus(client->GetCache("list-b").status(), absl::StatusCode::kNotFound, "NOT_FOUND");
  absl::StatusOr<ClusterStats> after = client->Stats();
  ASSERT_TRUE(after.ok());
  EXPECT_EQ(after->total.tiers(0).entries(), before->total.tiers(0).entries() - 1);
  EXPECT_EQ(after->total.tiers(0).used_bytes(), before->total.tiers(0).used_bytes() - *freed);

  const std::vector<ReplicaHealth> health = client->Health();
  ASSERT_EQ(health.size(), 1u);
  EXPECT_TRUE(health[0].status.ok()) << health[0].status;
  EXPECT_EQ(health[0].serving, grpc::health::v1::HealthCheckResponse::SERVING);
  EXPECT_EQ(health[0].target, server_->target());
}

TEST_F(OneServerTest, DeadlinesApplyPerCall) {
  // 8 layers x 2048 tokens x 4 kv heads x 64, f32: 33.6 MB of keys and values,
  // and statistics over 8 x 64 query rows: no call finishes within 1 ms.
  CacheParams p;
  p.dtype = DType::kFloat32;
  p.layers = 8;
  p.tokens = 2048;
  p.kv_heads = 4;
  p.head_dim = 64;
  p.q_tokens = 64;
  TestCache c = MakeTestCache(p);
  const std::unique_ptr<Client> client = NewClientFor(SharedMemoryMode::kOff);
  CallOptions short_deadline;
  short_deadline.deadline = absl::Milliseconds(1);
  ExpectStatus(client->Compress(c.input, Meda(0.2), short_deadline).status(), absl::StatusCode::kDeadlineExceeded,
               absl::StrCat("server ", server_->target(), ": DEADLINE_EXCEEDED"));
  ExpectStatus(client->PutCache("deadline-1", c.input, {}, short_deadline).status(),
               absl::StatusCode::kDeadlineExceeded, "DEADLINE_EXCEEDED");
  // A deadline that is not positive is a mistake of the caller.
  CallOptions zero;
  zero.deadline = absl::ZeroDuration();
  ExpectStatus(client->Stats(zero).status(), absl::StatusCode::kInvalidArgument, "CallOptions::deadline must be > 0");
  ExpectStatus(client->GetCache("deadline-1", {}, zero).status(), absl::StatusCode::kInvalidArgument, "deadline");
  ExpectStatus(client->Health(zero)[0].status, absl::StatusCode::kInvalidArgument, "deadline");
  // The client's deadline applies when the call sets none; the call's wins.
  ClientOptions o = Options({server_->target()});
  o.deadline = absl::Milliseconds(1);
  o.shared_memory = SharedMemoryMode::kOff;
  const std::unique_ptr<Client> hasty = NewClient(o);
  ExpectStatus(hasty->PutCache("deadline-2", c.input).status(), absl::StatusCode::kDeadlineExceeded,
               "DEADLINE_EXCEEDED");
  CallOptions generous;
  generous.deadline = absl::Seconds(60);
  EXPECT_TRUE(hasty->PutCache("deadline-2", c.input, {}, generous).ok());
  absl::StatusOr<FetchedCache> got = hasty->GetCache("deadline-2", {}, generous);
  ASSERT_TRUE(got.ok()) << got.status();
  ExpectStoredAsSent(*got, c.input, 0, 8);
  ASSERT_TRUE(hasty->DeleteCache("deadline-2", generous).ok());
}

TEST_F(OneServerTest, ProgressReportsEveryByteInOrder) {
  for (SharedMemoryMode mode : {SharedMemoryMode::kAuto, SharedMemoryMode::kOff}) {
    ClientOptions o = Options({server_->target()});
    o.shared_memory = mode;
    o.chunk_bytes = 4096;
    o.response_chunk_bytes = 4096;
    const std::unique_ptr<Client> client = NewClient(o);
    CacheParams p;
    p.tokens = 500;
    TestCache c = MakeTestCache(p);
    struct Seen {
      int64_t calls = 0, last = 0, total = 0;
      bool monotonic = true;
    };
    std::map<Transfer, Seen> seen;
    CallOptions call;
    call.progress = [&](Transfer d, int64_t done, int64_t total) {
      Seen& s = seen[d];
      s.monotonic = s.monotonic && done > s.last;
      s.last = done;
      s.total = total;
      ++s.calls;
    };
    const std::string id = absl::StrCat("progress-", static_cast<int>(mode));
    absl::StatusOr<PutResult> put = client->PutCache(id, c.input, {}, call);
    ASSERT_TRUE(put.ok()) << put.status();
    EXPECT_TRUE(seen[Transfer::kUpload].monotonic);
    EXPECT_EQ(seen[Transfer::kUpload].last, put->bytes_sent);
    EXPECT_EQ(seen[Transfer::kUpload].total, put->bytes_sent);
    if (mode == SharedMemoryMode::kOff) {
      EXPECT_GE(seen[Transfer::kUpload].calls, put->bytes_sent / 4096);
    }
    absl::StatusOr<FetchedCache> got = client->GetCache(id, {}, call);
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_TRUE(seen[Transfer::kDownload].monotonic);
    EXPECT_EQ(seen[Transfer::kDownload].last, got->bytes_received);
    EXPECT_EQ(seen[Transfer::kDownload].total, got->bytes_received);
    seen.clear();
    absl::StatusOr<RemoteResult> compressed = client->Compress(c.input, Meda(0.2), call);
    ASSERT_TRUE(compressed.ok()) << compressed.status();
    EXPECT_EQ(seen[Transfer::kUpload].last, seen[Transfer::kUpload].total);
    EXPECT_EQ(seen[Transfer::kDownload].total, -1);  // not known before the results arrive
    EXPECT_GT(seen[Transfer::kDownload].last, 0);
  }
}

TEST_F(OneServerTest, ConcurrentCallsFromOneClient) {
  const std::unique_ptr<Client> client = NewClientFor();
  CacheParams p;
  p.tokens = 200;
  TestCache c = MakeTestCache(p);
  const CompressResult want = LocalCompress(c.input, Meda(0.2));
  std::vector<std::thread> threads;
  std::vector<absl::Status> statuses(6);
  for (int t = 0; t < 6; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 3 && statuses[t].ok(); ++i) {
        absl::StatusOr<RemoteResult> got = client->Compress(c.input, Meda(0.2));
        if (!got.ok()) {
          statuses[t] = got.status();
        } else if (got->result.tokens_kept != want.tokens_kept || got->result.layers[1].key != want.layers[1].key) {
          statuses[t] = absl::InternalError("a result differs");
        }
        const std::string id = absl::StrCat("concurrent-", t, "-", i);
        if (absl::StatusOr<PutResult> put = client->PutCache(id, c.input); !put.ok()) statuses[t] = put.status();
        absl::StatusOr<FetchedCache> got_back = client->GetCache(id);
        if (!got_back.ok()) statuses[t] = got_back.status();
      }
    });
  }
  for (std::thread& t : threads) t.join();
  for (const absl::Status& s : statuses) EXPECT_TRUE(s.ok()) << s;
}

// ---- shared memory ---------------------------------------------------------------------

int64_t RegisteredRegions(Client& client) {
  absl::StatusOr<ClusterStats> s = client.Stats();
  EXPECT_TRUE(s.ok()) << s.status();
  return s.ok() ? s->total.shared_memory_regions() : -1;
}

TEST(SharedMemoryTest, RegionsAreReusedAndReleasedWithTheClient) {
  const std::unique_ptr<ServerProcess> server = StartServer();
  ASSERT_NE(server, nullptr);
  const std::unique_ptr<Client> observer = NewClient([&] {
    ClientOptions o = Options({server->target()});
    o.shared_memory = SharedMemoryMode::kOff;
    return o;
  }());
  TestCache c = MakeTestCache(CacheParams{});
  {
    const std::unique_ptr<Client> client = NewClient(Options({server->target()}));
    for (int i = 0; i < 4; ++i) {
      absl::StatusOr<RemoteResult> got = client->Compress(c.input, Meda(0.2));
      ASSERT_TRUE(got.ok()) << got.status();
      EXPECT_TRUE(got->shared_memory);
    }
    ASSERT_TRUE(client->PutCache("shm-reuse", c.input).ok());
    ASSERT_TRUE(client->GetCache("shm-reuse").ok());
    EXPECT_EQ(RegisteredRegions(*observer), 1) << "one region, reused by every call";
  }
  // The client is gone: its lease ended and the server unregisters the
  // region (asynchronously; bounded wait).
  int64_t regions = -1;
  for (int i = 0; i < 500 && regions != 0; ++i) {
    regions = RegisteredRegions(*observer);
    if (regions != 0) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_EQ(regions, 0);
}

// The sum of the samples of `name` whose labels include `labels`, in a
// Prometheus text (0 when there is none).
double MetricSum(const std::string& text, const std::string& name,
                 const std::vector<std::pair<std::string, std::string>>& labels) {
  double sum = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    if (!absl::ConsumePrefix(&line, name) || !absl::ConsumePrefix(&line, "{")) continue;
    const size_t close = line.find('}');
    if (close == absl::string_view::npos) continue;
    const absl::string_view have = line.substr(0, close);
    bool match = true;
    for (const auto& [k, v] : labels) match = match && absl::StrContains(have, absl::StrCat(k, "=\"", v, "\""));
    double value = 0;
    if (match && absl::SimpleAtod(absl::StripAsciiWhitespace(line.substr(close + 1)), &value)) sum += value;
  }
  return sum;
}

// A client that goes away ends its leases cleanly (UnregisterSharedMemory):
// the server counts them as OK calls, not CANCELLED ones.
TEST(SharedMemoryTest, LeasesEndWithOkNotCancelled) {
  const std::unique_ptr<ServerProcess> server = StartServer();
  ASSERT_NE(server, nullptr);
  ASSERT_GT(server->metrics_port(), 0);
  TestCache c = MakeTestCache(CacheParams{});
  {
    const std::unique_ptr<Client> client = NewClient(Options({server->target()}));
    absl::StatusOr<RemoteResult> got = client->Compress(c.input, Meda(0.2));
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_TRUE(got->shared_memory);
    absl::StatusOr<PutResult> put = client->PutCache("lease-end", c.input);
    ASSERT_TRUE(put.ok()) << put.status();
    EXPECT_TRUE(put->shared_memory);
    ASSERT_TRUE(client->GetCache("lease-end").ok());
  }
  // The destructor waited for the server to end the lease; the metrics see
  // it at once (bounded wait all the same).
  std::string text;
  for (int i = 0; i < 200; ++i) {
    text = server->Metrics();
    if (!text.empty() &&
        MetricSum(text, "medakv_inflight_requests", {{"method", "RegisterSharedMemory"}}) == 0) {
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ASSERT_NE(text, "") << "no /metrics on port " << server->metrics_port();
  EXPECT_EQ(MetricSum(text, "medakv_requests_total", {{"code", "CANCELLED"}}), 0) << text;
  EXPECT_EQ(MetricSum(text, "medakv_requests_total", {{"method", "RegisterSharedMemory"}, {"code", "OK"}}), 1)
      << "one region, reused by every call, and its lease ended with OK";
  EXPECT_EQ(MetricSum(text, "medakv_requests_total", {{"method", "UnregisterSharedMemory"}, {"code", "OK"}}), 1);
  EXPECT_EQ(MetricSum(text, "medakv_shm_regions", {}), 0);
}

// CallOptions::server_default: the request names no policy, so the server's
// "default" preset runs (rho replaceable), or amber at 0.2 without one.
TEST(PresetTest, ServerDefaultNamesNoPolicy) {
  char path[] = "/tmp/medakv-client-test-presets-XXXXXX";
  const int fd = mkstemp(path);
  ASSERT_GE(fd, 0);
  const std::string text = "preset { name: \"default\" policy { rho: 0.3 h2o { } } }\n";
  ASSERT_EQ(write(fd, text.data(), text.size()), static_cast<ssize_t>(text.size()));
  close(fd);
  const std::unique_ptr<ServerProcess> with_default = StartServer({absl::StrCat("--policy_presets=", path)});
  const std::unique_ptr<ServerProcess> plain = StartServer();
  unlink(path);
  ASSERT_NE(with_default, nullptr);
  ASSERT_NE(plain, nullptr);
  TestCache c = MakeTestCache(CacheParams{});
  CompressOptions h2o = DefaultOptions(PolicyKind::kH2O);
  h2o.budget.rho = 0.3;

  const std::unique_ptr<Client> client = NewClient(Options({with_default->target()}));
  CallOptions call;
  call.server_default = true;
  absl::StatusOr<RemoteResult> got = client->Compress(c.input, Meda(0.2), call);  // the options are not sent
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->summary.policy().preset(), "default");
  EXPECT_TRUE(got->summary.policy().has_h2o());
  EXPECT_DOUBLE_EQ(got->summary.policy().rho(), 0.3);
  ExpectSameResult(got->result, LocalCompress(c.input, h2o));
  call.preset_rho = 0.5;
  got = client->Compress(c.input, Meda(0.2), call);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->summary.policy().preset(), "default");
  EXPECT_DOUBLE_EQ(got->summary.policy().rho(), 0.5);
  // CompressCache alike.
  ASSERT_TRUE(client->PutCache("default-preset", c.input).ok());
  call.preset_rho = 0;
  absl::StatusOr<v1::CompressCacheResponse> in_place = client->CompressCache("default-preset", Meda(0.2), call);
  ASSERT_TRUE(in_place.ok()) << in_place.status();
  EXPECT_EQ(in_place->summary().policy().preset(), "default");
  EXPECT_EQ(in_place->info().policy(), "h2o");
  // Not with a preset.
  call.preset = "default";
  ExpectStatus(client->Compress(c.input, Meda(0.2), call).status(), absl::StatusCode::kInvalidArgument,
               "server_default");

  // Without a default preset: amber at 0.2, the result of naming it.
  const std::unique_ptr<Client> plain_client = NewClient(Options({plain->target()}));
  CallOptions none;
  none.server_default = true;
  got = plain_client->Compress(c.input, Meda(0.2), none);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->summary.policy().preset(), "");
  EXPECT_TRUE(got->summary.policy().has_amber());
  EXPECT_DOUBLE_EQ(got->summary.policy().rho(), 0.2);
  ExpectSameResult(got->result, LocalCompress(c.input, DefaultOptions(PolicyKind::kAmber)));
}

TEST(SharedMemoryTest, AServerThatRefusesSharedMemoryGetsBytes) {
  const std::unique_ptr<ServerProcess> server = StartServer({"--max_shm_regions=0"});
  ASSERT_NE(server, nullptr);
  const std::unique_ptr<Client> client = NewClient(Options({server->target()}));
  CacheParams p;
  p.dtype = DType::kFloat32;
  TestCache c = MakeTestCache(p);
  for (int i = 0; i < 2; ++i) {
    absl::StatusOr<RemoteResult> got = client->Compress(c.input, Meda(0.2));
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_FALSE(got->shared_memory);
    ExpectSameResult(got->result, LocalCompress(c.input, Meda(0.2)));
  }
  absl::StatusOr<PutResult> put = client->PutCache("refused", c.input);
  ASSERT_TRUE(put.ok()) << put.status();
  EXPECT_FALSE(put->shared_memory);
  absl::StatusOr<FetchedCache> got = client->GetCache("refused");
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_FALSE(got->shared_memory);
  ExpectStoredAsSent(*got, c.input, 0, static_cast<int32_t>(c.input.layers.size()));
}

TEST(SharedMemoryTest, CallsLargerThanThePoolUseTheSocket) {
  const std::unique_ptr<ServerProcess> server = StartServer();
  ASSERT_NE(server, nullptr);
  ClientOptions o = Options({server->target()});
  o.shared_memory_pool_bytes = 1000;  // smaller than any request below
  const std::unique_ptr<Client> client = NewClient(o);
  TestCache c = MakeTestCache(CacheParams{});
  absl::StatusOr<RemoteResult> got = client->Compress(c.input, Meda(0.2));
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_FALSE(got->shared_memory);
  EXPECT_EQ(RegisteredRegions(*client), 0);
}

// ---- retries -------------------------------------------------------------------------------

TEST(RetryTest, OnlyIdempotentCallsAreRetriedWithBoundedBackoff) {
  const std::string target = absl::StrCat("127.0.0.1:", ClosedPort());
  ClientOptions o = Options({target});
  o.retry.max_attempts = 3;
  std::vector<RetryEvent> events;
  o.on_retry = [&](const RetryEvent& e) { events.push_back(e); };
  const std::unique_ptr<Client> client = NewClient(o);
  TestCache c = MakeTestCache(CacheParams{});

  auto expect_retried = [&](const absl::Status& s, const std::string& method) {
    SCOPED_TRACE(method);
    ExpectStatus(s, absl::StatusCode::kUnavailable, absl::StrCat("cannot reach server ", target));
    EXPECT_TRUE(absl::StrContains(s.message(), "(3 attempts)")) << s;
    ASSERT_EQ(events.size(), 2u);
    for (size_t i = 0; i < events.size(); ++i) {
      EXPECT_EQ(events[i].method, method);
      EXPECT_EQ(events[i].target, target);
      EXPECT_EQ(events[i].attempt, static_cast<int>(i) + 1);
      EXPECT_EQ(events[i].status.code(), absl::StatusCode::kUnavailable);
      EXPECT_GE(events[i].backoff, absl::Milliseconds(5));  // initial / 2
      EXPECT_LE(events[i].backoff, absl::Milliseconds(100));
    }
    // The second wait draws from [10, 20] ms, the first from [5, 10] ms.
    EXPECT_GE(events[1].backoff, absl::Milliseconds(10));
    events.clear();
  };
  expect_retried(client->Stats().status(), "Stats");
  expect_retried(client->ListCaches().status(), "ListCaches");
  expect_retried(client->GetCache("retry-1").status(), "GetCache");

  auto expect_not_retried = [&](const absl::Status& s, const std::string& what) {
    SCOPED_TRACE(what);
    ExpectStatus(s, absl::StatusCode::kUnavailable, absl::StrCat("cannot reach server ", target));
    EXPECT_FALSE(absl::StrContains(s.message(), "attempts")) << s;
    EXPECT_TRUE(events.empty());
    events.clear();
  };
  expect_not_retried(client->Compress(c.input, Meda(0.2)).status(), "Compress");
  expect_not_retried(client->PutCache("retry-1", c.input).status(), "PutCache");
  expect_not_retried(client->CompressCache("retry-1", Meda(0.2)).status(), "CompressCache");
  expect_not_retried(client->DeleteCache("retry-1").status(), "DeleteCache");
  const std::vector<ReplicaHealth> health = client->Health();
  ASSERT_EQ(health.size(), 1u);
  ExpectStatus(health[0].status, absl::StatusCode::kUnavailable, "cannot reach server");
  EXPECT_TRUE(events.empty());
}

TEST(RetryTest, NoRetryWhenTheDeadlineLeavesNoRoomToWait) {
  const std::string target = absl::StrCat("127.0.0.1:", ClosedPort());
  ClientOptions o = Options({target});
  o.retry.max_attempts = 100;
  o.retry.initial_backoff = absl::Seconds(20);
  o.retry.max_backoff = absl::Seconds(20);
  int events = 0;
  o.on_retry = [&](const RetryEvent&) { ++events; };
  const std::unique_ptr<Client> client = NewClient(o);
  CallOptions call;
  call.deadline = absl::Seconds(5);  // shorter than the shortest wait (10 s)
  const auto t0 = absl::Now();
  ExpectStatus(client->Stats(call).status(), absl::StatusCode::kUnavailable, "cannot reach server");
  EXPECT_EQ(events, 0);
  EXPECT_LT(absl::Now() - t0, absl::Seconds(5));
}

TEST(RetryTest, ARetriedCallReachesARestartedServer) {
  std::unique_ptr<ServerProcess> server = StartServer();
  ASSERT_NE(server, nullptr);
  const int port = server->port();
  ClientOptions o = Options({server->target()});
  o.retry.max_attempts = 1000;  // bounded by the deadline
  o.deadline = absl::Seconds(60);
  absl::Notification failed_once;
  std::atomic<int> events{0};
  o.on_retry = [&](const RetryEvent&) {
    if (events.fetch_add(1) == 0) failed_once.Notify();
  };
  const std::unique_ptr<Client> client = NewClient(o);
  TestCache c = MakeTestCache(CacheParams{});
  ASSERT_TRUE(client->PutCache("before-restart", c.input).ok());
  server->Kill();
  absl::StatusOr<ClusterStats> stats;
  std::thread call([&] { stats = client->Stats(); });
  failed_once.WaitForNotification();  // the call failed and waits to retry: bring the server back
  server = StartServer({}, port);
  call.join();
  ASSERT_NE(server, nullptr);
  ASSERT_TRUE(stats.ok()) << stats.status();
  EXPECT_GE(events.load(), 1);
  EXPECT_EQ(stats->total.tiers(0).entries(), 0) << "a fresh server";
  // A non-idempotent call after the restart works on the new connection.
  EXPECT_TRUE(client->PutCache("after-restart", c.input).ok());
}

// ---- sharding over three replicas --------------------------------------------------------------

TEST(ShardingTest, IdsLandOnTheirReplicaAndADownReplicaFailsOnlyItsIds) {
  std::vector<std::unique_ptr<ServerProcess>> servers;
  std::vector<std::string> targets;
  for (int i = 0; i < 3; ++i) {
    servers.push_back(StartServer());
    ASSERT_NE(servers.back(), nullptr);
    targets.push_back(servers.back()->target());
  }
  std::atomic<int> retries{0};  // ListCaches and Stats retry from their fan-out threads
  ClientOptions o = Options(targets);
  o.retry.max_attempts = 2;
  o.on_retry = [&](const RetryEvent&) { ++retries; };
  const std::unique_ptr<Client> client = NewClient(o);
  // Another client that lists the replicas in another order, over the socket.
  ClientOptions other_options = Options({targets[2], targets[0], targets[1]});
  other_options.shared_memory = SharedMemoryMode::kOff;
  const std::unique_ptr<Client> other = NewClient(other_options);
  ASSERT_NE(client, nullptr);
  ASSERT_NE(other, nullptr);

  TestCache c = MakeTestCache(CacheParams{});
  constexpr int kIds = 48;
  std::map<std::string, std::string> home;  // id -> replica
  for (int i = 0; i < kIds; ++i) {
    const std::string id = absl::StrCat("shard-", i);
    absl::StatusOr<PutResult> put = client->PutCache(id, c.input);
    ASSERT_TRUE(put.ok()) << put.status();
    EXPECT_EQ(put->target, client->ReplicaFor(id));
    EXPECT_EQ(other->ReplicaFor(id), client->ReplicaFor(id)) << id;
    EXPECT_EQ(client->ReplicaFor(id), targets[RendezvousPick(targets, id)]);
    home[id] = put->target;
  }
  // Each server holds exactly the ids placed on it (asked directly).
  for (const std::string& target : targets) {
    ClientOptions single = Options({target});
    single.shared_memory = SharedMemoryMode::kOff;
    absl::StatusOr<CacheList> list = NewClient(single)->ListCaches("shard-");
    ASSERT_TRUE(list.ok()) << list.status();
    std::set<std::string> want, got;
    for (const auto& [id, t] : home) {
      if (t == target) want.insert(id);
    }
    for (const ListedCache& l : list->caches) got.insert(l.info.cache_id());
    EXPECT_EQ(got, want) << target;
    EXPECT_FALSE(want.empty()) << target << " got no id of " << kIds;
  }
  // The same id is found from the other client, whatever the order of its list.
  for (const auto& [id, target] : home) {
    absl::StatusOr<FetchedCache> got = other->GetCache(id);
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(got->target, target);
  }
  absl::StatusOr<CacheList> all = client->ListCaches("shard-");
  ASSERT_TRUE(all.ok()) << all.status();
  ASSERT_EQ(all->caches.size(), static_cast<size_t>(kIds));
  for (size_t i = 0; i < all->caches.size(); ++i) {
    EXPECT_EQ(all->caches[i].target, home[all->caches[i].info.cache_id()]);
    if (i > 0) {
      EXPECT_LT(all->caches[i - 1].info.cache_id(), all->caches[i].info.cache_id());
    }
  }
  absl::StatusOr<ClusterStats> stats = client->Stats();
  ASSERT_TRUE(stats.ok());
  EXPECT_EQ(stats->answered, 3);
  EXPECT_EQ(stats->total.tiers(0).entries(), kIds);
  int64_t used = 0;
  for (const ReplicaStats& r : stats->replicas) used += r.stats->tiers(0).used_bytes();
  EXPECT_EQ(stats->total.tiers(0).used_bytes(), used);

  // Replica 1 goes down.
  const std::string down = targets[1];
  servers[1]->Kill();
  int on_down = 0;
  for (const auto& [id, target] : home) {
    absl::StatusOr<FetchedCache> got = client->GetCache(id);
    if (target == down) {
      ++on_down;
      ExpectStatus(got.status(), absl::StatusCode::kUnavailable,
                   absl::StrCat("cannot reach server ", down, " (the replica of cache '", id, "')"));
    } else {
      ASSERT_TRUE(got.ok()) << id << ": " << got.status();
      ExpectStoredAsSent(*got, c.input, 0, static_cast<int32_t>(c.input.layers.size()));
    }
  }
  EXPECT_GT(on_down, 0);
  EXPECT_EQ(retries.load(), on_down) << "GetCache is retried once (max_attempts 2) on the down replica only";
  retries = 0;
  // New ids: those placed on the down replica fail at once (not retried), the others are stored.
  int put_down = 0, put_up = 0;
  for (int i = 0; i < 30; ++i) {
    const std::string id = absl::StrCat("shard-new-", i);
    absl::StatusOr<PutResult> put = client->PutCache(id, c.input);
    if (client->ReplicaFor(id) == down) {
      ++put_down;
      ExpectStatus(put.status(), absl::StatusCode::kUnavailable, absl::StrCat("cannot reach server ", down));
    } else {
      ++put_up;
      EXPECT_TRUE(put.ok()) << put.status();
    }
  }
  EXPECT_GT(put_down, 0);
  EXPECT_GT(put_up, 0);
  EXPECT_EQ(retries.load(), 0);
  // The fan-out calls answer with the live replicas and name the down one.
  absl::StatusOr<CacheList> partial = client->ListCaches("shard-", 1000);
  ASSERT_TRUE(partial.ok()) << partial.status();
  ASSERT_EQ(partial->errors.size(), 1u);
  EXPECT_EQ(partial->errors[0].target, down);
  ExpectStatus(partial->errors[0].status, absl::StatusCode::kUnavailable, absl::StrCat("cannot reach server ", down));
  EXPECT_EQ(partial->caches.size(), static_cast<size_t>(kIds - on_down + put_up));
  for (const ListedCache& l : partial->caches) EXPECT_NE(l.target, down);
  absl::StatusOr<ClusterStats> partial_stats = client->Stats();
  ASSERT_TRUE(partial_stats.ok()) << partial_stats.status();
  EXPECT_EQ(partial_stats->answered, 2);
  EXPECT_FALSE(partial_stats->replicas[1].stats.ok());
  EXPECT_EQ(partial_stats->total.tiers(0).entries(), kIds - on_down + put_up);
  const std::vector<ReplicaHealth> health = client->Health();
  ASSERT_EQ(health.size(), 3u);
  EXPECT_EQ(health[0].serving, grpc::health::v1::HealthCheckResponse::SERVING);
  EXPECT_FALSE(health[1].status.ok());
  EXPECT_EQ(health[2].serving, grpc::health::v1::HealthCheckResponse::SERVING);
  // Compress is stateless: it goes to the live replicas, skipping the failing one.
  for (int i = 0; i < 6; ++i) {
    absl::StatusOr<RemoteResult> got = client->Compress(c.input, Meda(0.2));
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_NE(got->target, down);
  }
  // Every replica down: the fan-out calls fail with the first replica's error.
  servers[0]->Kill();
  servers[2]->Kill();
  ExpectStatus(client->ListCaches().status(), absl::StatusCode::kUnavailable, "cannot reach server");
  ExpectStatus(client->Stats().status(), absl::StatusCode::kUnavailable, "cannot reach server");
}

}  // namespace
}  // namespace medakv
