// Security (SECURITY.md): bearer tokens and tenants, TLS and mutual TLS with
// certificates generated here by the openssl tool, tenant isolation of the
// cache store and of shared-memory regions, and no tenant data in the metrics.
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <prometheus/text_serializer.h>
#include <fcntl.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <atomic>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "client/cpp/client.h"
#include "client/cpp/remote.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "medakv/v1/medakv.grpc.pb.h"
#include "service/server/auth.h"
#include "service/server/metrics.h"
#include "service/server/server.h"
#include "service/server/shared_memory.h"
#include "service/store/cache_store.h"
#include "tests/service/grpc_test_util.h"
#include "tests/service/test_cache.h"

namespace medakv {
namespace {

using server::Authenticator;
using server::BearerToken;
using server::MedakvServer;
using server::ServerOptions;
using server::TokenTable;
using test::TestCache;

constexpr char kAliceToken[] = "alice-token-0123456789abcdef";
constexpr char kAliceToken2[] = "alice-rotated-token-fedcba9876543210";
constexpr char kBobToken[] = "bob-token-0123456789abcdef0123";

void ExpectAbsl(const absl::Status& s, absl::StatusCode code, const std::string& fragment) {
  EXPECT_EQ(s.code(), code) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), fragment)) << "'" << fragment << "' not in: " << s;
}

// A temporary directory, removed at the end.
class TempDir {
 public:
  TempDir() {
    char path[] = "/tmp/medakv-security-test-XXXXXX";
    const char* made = mkdtemp(path);
    EXPECT_NE(made, nullptr);
    path_ = made != nullptr ? made : "/tmp";
  }
  ~TempDir() { std::filesystem::remove_all(path_); }
  std::string Write(const std::string& name, const std::string& text) const {
    const std::string p = Path(name);
    std::ofstream(p) << text;
    return p;
  }
  std::string Path(const std::string& name) const { return absl::StrCat(path_, "/", name); }

 private:
  std::string path_;
};

// ---- the tokens file ---------------------------------------------------------------------

TEST(TokenTableTest, ParsesPairsCommentsAndBlankLines) {
  absl::StatusOr<std::shared_ptr<const TokenTable>> t = TokenTable::Parse(
      absl::StrCat("# tokens\n\n", kAliceToken, " alice\n  ", kAliceToken2, "\talice  \n", kBobToken, " bob\n"),
      "tokens");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ((*t)->size(), 3u);
  EXPECT_EQ((*t)->tenants(), 2u);
  ASSERT_NE((*t)->Find(kAliceToken), nullptr);
  EXPECT_EQ(*(*t)->Find(kAliceToken), "alice");
  EXPECT_EQ(*(*t)->Find(kAliceToken2), "alice");
  EXPECT_EQ(*(*t)->Find(kBobToken), "bob");
  // Nothing but an exact match: prefixes, extensions, case and other tokens fail.
  const std::string alice = kAliceToken;
  for (const std::string& wrong : {alice.substr(0, alice.size() - 1), alice + "x", std::string("ALICE-TOKEN-0123456789ABCDEF"),
                                   std::string(""), std::string("alice")}) {
    EXPECT_EQ((*t)->Find(wrong), nullptr) << wrong;
  }
}

TEST(TokenTableTest, ErrorsNameTheLineAndNeverTheToken) {
  const std::string ok = absl::StrCat(kAliceToken, " alice\n");
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"", "no token"},
      {"# only a comment\n\n", "no token"},
      {ok + "justonefield0123456789\n", "tokens:2: expected `TOKEN TENANT`, got 1 field"},
      {ok + "a-token-0123456789abc alice extra\n", "tokens:2: expected `TOKEN TENANT`, got 3 fields"},
      {"short alice\n", "tokens:1: the token must be 16-512 bytes, got 5"},
      {std::string("a-token-01234567\x01 alice\n"), "tokens:1: the token must be printable ASCII"},
      {"a-token-0123456789abc ali/ce\n", "tokens:1: tenant \"ali/ce\": byte 3 is outside [A-Za-z0-9._-]"},
      {"a-token-0123456789abc al:ice\n", "tokens:1: tenant \"al:ice\": byte 2 is outside"},
      {absl::StrCat("a-token-0123456789abc ", std::string(65, 't'), "\n"), "must be at most 64 bytes, got 65"},
      {ok + "# again\n" + ok, "tokens:3: the token appears twice"},
  };
  for (const auto& [text, message] : cases) {
    absl::StatusOr<std::shared_ptr<const TokenTable>> t = TokenTable::Parse(text, "tokens");
    ASSERT_FALSE(t.ok()) << text;
    EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument) << text;
    EXPECT_TRUE(absl::StrContains(t.status().message(), message)) << t.status() << " wanted " << message;
    EXPECT_FALSE(absl::StrContains(t.status().message(), "0123456789")) << "a token in " << t.status();
  }
}

TEST(TokenTableTest, BearerTokenParsesTheHeader) {
  EXPECT_EQ(*BearerToken("Bearer abc"), "abc");
  EXPECT_EQ(*BearerToken("bearer   abc"), "abc");
  EXPECT_EQ(*BearerToken("BEARER abc"), "abc");
  for (const char* bad : {"", "Bearer", "Bearer ", "Bearer    ", "Basic abc", "Bearerabc", "abc"}) {
    absl::StatusOr<absl::string_view> t = BearerToken(bad);
    ASSERT_FALSE(t.ok()) << bad;
    EXPECT_EQ(t.status().code(), absl::StatusCode::kUnauthenticated) << bad;
  }
}

TEST(TokenTableTest, LoadNamesAMissingFile) {
  absl::StatusOr<std::shared_ptr<const TokenTable>> t = TokenTable::Load("/nonexistent/tokens");
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(absl::StrContains(t.status().message(), "--auth_tokens_file /nonexistent/tokens: cannot open"))
      << t.status();
}

// Lookups on several threads while the tokens file is replaced and reloaded:
// every lookup sees the old table or the new one, never a mix (TSan runs it).
TEST(AuthenticatorTest, ReloadWhileLookingUp) {
  TempDir dir;
  const std::string path = dir.Write("tokens", absl::StrCat(kAliceToken, " alice\n"));
  absl::StatusOr<std::unique_ptr<Authenticator>> auth = Authenticator::Create(path);
  ASSERT_TRUE(auth.ok()) << auth.status();
  ASSERT_TRUE((*auth)->enabled());
  std::atomic<bool> stop{false};
  std::atomic<int64_t> lookups{0}, bad{0};
  std::vector<std::thread> readers;
  for (int t = 0; t < 3; ++t) {
    readers.emplace_back([&] {
      while (!stop.load()) {
        const std::shared_ptr<const TokenTable> tokens = (*auth)->tokens();
        const std::string* a = tokens->Find(kAliceToken);
        const std::string* b = tokens->Find(kBobToken);
        // Old table: alice only. New: alice and bob. Never bob alone, never neither.
        if (a == nullptr || *a != "alice" || (b != nullptr && *b != "bob")) bad.fetch_add(1);
        lookups.fetch_add(1);
      }
    });
  }
  for (int i = 0; i < 50; ++i) {
    dir.Write("tokens", i % 2 == 0 ? absl::StrCat(kAliceToken, " alice\n", kBobToken, " bob\n")
                                   : absl::StrCat(kAliceToken, " alice\n"));
    ASSERT_TRUE((*auth)->Reload().ok());
  }
  stop.store(true);
  for (std::thread& t : readers) t.join();
  EXPECT_GT(lookups.load(), 0);
  EXPECT_EQ(bad.load(), 0);
  EXPECT_EQ((*auth)->tokens()->size(), 1u);
  EXPECT_EQ(Authenticator::Create("").value()->Reload().code(), absl::StatusCode::kFailedPrecondition);
}

// ---- tenants in the store and the registry ------------------------------------------------

std::unique_ptr<StoredCache> TinyCache(const std::string& tenant, const std::string& id, uint8_t fill) {
  auto c = std::make_unique<StoredCache>();
  c->tenant = tenant;
  c->id = id;
  c->description.layers = 1;
  c->description.kv_heads = 1;
  c->description.head_dim = 4;
  c->description.tokens = 2;
  c->description.dtype = DType::kFloat16;
  c->layers.resize(1);
  c->layers[0].tokens = 2;
  c->layers[0].key.assign(16, fill);
  c->layers[0].value.assign(16, fill);
  return c;
}

TEST(TenantStoreTest, TenantsSeeOnlyTheirOwnEntries) {
  CacheStore store(StoreOptions{1 << 20, 0});
  ASSERT_TRUE(store.Put(Tier::kHost, TinyCache("alice", "x", 1), false, absl::ZeroDuration()).ok());
  ASSERT_TRUE(store.Put(Tier::kHost, TinyCache("alice", "only-alice", 2), false, absl::ZeroDuration()).ok());
  ASSERT_TRUE(store.Put(Tier::kHost, TinyCache("bob", "x", 3), false, absl::ZeroDuration()).ok()) << "same id, other tenant";
  ASSERT_TRUE(store.Put(Tier::kHost, TinyCache("", "x", 4), false, absl::ZeroDuration()).ok());
  EXPECT_EQ((*store.Get("alice", "x"))->layers[0].key[0], 1);
  EXPECT_EQ((*store.Get("bob", "x"))->layers[0].key[0], 3);
  EXPECT_EQ((*store.Get("x"))->layers[0].key[0], 4);
  EXPECT_EQ(store.Get("bob", "only-alice").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(store.Get("only-alice").status().code(), absl::StatusCode::kNotFound);
  EXPECT_FALSE(store.Contains("bob", "only-alice"));
  EXPECT_EQ(store.Delete("bob", "only-alice").status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(store.Contains("alice", "only-alice"));
  auto ids = [&](absl::string_view tenant) {
    std::vector<std::string> out;
    for (const CacheSummary& s : store.List(tenant, "", 0)) {
      EXPECT_EQ(s.tenant, tenant);
      out.push_back(s.id);
    }
    return out;
  };
  EXPECT_EQ(ids("alice"), (std::vector<std::string>{"only-alice", "x"}));
  EXPECT_EQ(ids("bob"), (std::vector<std::string>{"x"}));
  EXPECT_EQ(ids(""), (std::vector<std::string>{"x"}));
  EXPECT_EQ(ids("ali"), (std::vector<std::string>{})) << "a tenant that is a prefix of another sees nothing of it";
  // Replace keeps the tenant; bob's entry is untouched.
  std::shared_ptr<const StoredCache> alice_x = *store.Get("alice", "x");
  std::unique_ptr<StoredCache> next = TinyCache("", "", 9);
  absl::StatusOr<CacheSummary> replaced = store.Replace(std::move(alice_x), std::move(next));
  ASSERT_TRUE(replaced.ok()) << replaced.status();
  EXPECT_EQ(replaced->tenant, "alice");
  EXPECT_EQ((*store.Get("alice", "x"))->layers[0].key[0], 9);
  EXPECT_EQ((*store.Get("bob", "x"))->layers[0].key[0], 3);
  ASSERT_TRUE(store.Delete("bob", "x").ok());
  EXPECT_TRUE(store.Contains("alice", "x"));
  EXPECT_TRUE(store.Contains("x"));
  // Invalid tenants are refused.
  EXPECT_EQ(store.Put(Tier::kHost, TinyCache("a:b", "y", 1), false, absl::ZeroDuration()).status().code(),
            absl::StatusCode::kInvalidArgument);
  const absl::string_view nul("a\0b", 3);
  EXPECT_EQ(store.Get(nul, "y").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(store.Delete(nul, "y").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_FALSE(store.Contains(nul, "y"));
  EXPECT_TRUE(store.List(nul, "", 0).empty());
}

// ---- a server with tokens ----------------------------------------------------------------

// Server options with the security flags set (the rest default).
ServerOptions Secured(const std::string& tokens, const std::string& cert = "", const std::string& key = "",
                      const std::string& client_ca = "") {
  ServerOptions o;
  o.auth_tokens_file = tokens;
  o.tls_cert = cert;
  o.tls_key = key;
  o.tls_client_ca = client_ca;
  return o;
}

std::string TokensFile(const TempDir& dir, const std::string& name = "tokens") {
  return dir.Write(name, absl::StrCat("# tenant tokens\n", kAliceToken, " alice\n", kBobToken, " bob\n"));
}

// The PEM files of a test PKI: a CA that signs the server's certificate
// (for 127.0.0.1 and localhost), a client CA that signs a client
// certificate, and a rogue CA with a client certificate of its own.
struct Pki {
  std::string ca, server_cert, server_key, client_ca, client_cert, client_key, rogue_ca, rogue_cert, rogue_key;
};

// Runs a shell command; false (and the output, in the failure) when it fails.
bool Run(const std::string& command) {
  const int rc = std::system(absl::StrCat(command, " >/dev/null 2>&1").c_str());
  EXPECT_EQ(rc, 0) << command;
  return rc == 0;
}

bool MakePki(const TempDir& dir, Pki* pki) {
  const std::string d = dir.Path("");
  const std::string ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
  auto ca = [&](const std::string& name) {
    return Run(absl::StrCat("openssl req -x509 ", ec, " -days 2 -subj /CN=", name, " -keyout ", d, name,
                            ".key -out ", d, name, ".pem"));
  };
  auto leaf = [&](const std::string& name, const std::string& issuer, const std::string& ext) {
    dir.Write(name + ".ext", ext);
    return Run(absl::StrCat("openssl req ", ec, " -subj /CN=", name, " -keyout ", d, name, ".key -out ", d, name,
                            ".csr")) &&
           Run(absl::StrCat("openssl x509 -req -days 2 -in ", d, name, ".csr -CA ", d, issuer, ".pem -CAkey ", d,
                            issuer, ".key -CAcreateserial -out ", d, name, ".pem -extfile ", d, name, ".ext"));
  };
  if (!ca("ca") || !ca("client-ca") || !ca("rogue-ca")) return false;
  if (!leaf("server", "ca", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")) return false;
  if (!leaf("client", "client-ca", "extendedKeyUsage=clientAuth\n")) return false;
  if (!leaf("rogue", "rogue-ca", "extendedKeyUsage=clientAuth\n")) return false;
  *pki = Pki{d + "ca.pem",        d + "server.pem", d + "server.key", d + "client-ca.pem", d + "client.pem",
             d + "client.key",    d + "rogue-ca.pem", d + "rogue.pem", d + "rogue.key"};
  return true;
}

class SecurityTest : public ::testing::Test {
 protected:
  void Start(ServerOptions o) {
    o.listen = "127.0.0.1:0";
    o.backend = "cpu";
    absl::StatusOr<std::unique_ptr<MedakvServer>> s = MedakvServer::Start(o);
    ASSERT_TRUE(s.ok()) << s.status();
    server_ = *std::move(s);
  }
  std::string Target() const { return absl::StrCat("127.0.0.1:", server_->port()); }

  // A client of the running server: plaintext, or the given credentials.
  std::unique_ptr<Client> NewClient(const std::string& token,
                                    std::shared_ptr<grpc::ChannelCredentials> credentials = nullptr,
                                    SharedMemoryMode shm = SharedMemoryMode::kOff) {
    ClientOptions o;
    o.targets = {Target()};
    o.token = token;
    o.credentials = std::move(credentials);
    o.shared_memory = shm;
    o.retry.max_attempts = 1;
    o.deadline = absl::Seconds(30);
    absl::StatusOr<std::unique_ptr<Client>> c = Client::Create(std::move(o));
    EXPECT_TRUE(c.ok()) << c.status();
    return c.ok() ? *std::move(c) : nullptr;
  }
  std::unique_ptr<v1::Medakv::Stub> RawStub(std::shared_ptr<grpc::ChannelCredentials> credentials = nullptr) {
    return v1::Medakv::NewStub(
        grpc::CreateChannel(Target(), credentials != nullptr ? credentials : grpc::InsecureChannelCredentials()));
  }
  // Stats through a raw stub with an optional authorization value.
  grpc::Status RawStats(v1::Medakv::Stub& stub, const std::string& authorization, v1::StatsResponse* r = nullptr) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(20));
    if (!authorization.empty()) ctx.AddMetadata("authorization", authorization);
    v1::StatsResponse unused;
    return stub.Stats(&ctx, v1::StatsRequest(), r != nullptr ? r : &unused);
  }
  std::string MetricsText() const {
    return prometheus::TextSerializer().Serialize(server_->metrics().Collect());
  }

  TempDir dir_;
  std::unique_ptr<MedakvServer> server_;
};

TEST_F(SecurityTest, EveryMedakvCallNeedsAValidToken) {
  Start(Secured(TokensFile(dir_)));
  EXPECT_EQ(server_->tokens(), 2u);
  EXPECT_FALSE(server_->tls());
  TestCache c = test::MakeTestCache({});
  for (const std::string& token : {std::string(""), std::string("wrong-token-0123456789abcdef")}) {
    SCOPED_TRACE(token.empty() ? "no token" : "wrong token");
    std::unique_ptr<Client> client = NewClient(token);
    ExpectAbsl(client->PutCache("x", c.input).status(), absl::StatusCode::kUnauthenticated,
                 token.empty() ? "no bearer token" : "the bearer token is not valid");
    ExpectAbsl(client->GetCache("x").status(), absl::StatusCode::kUnauthenticated, "bearer token");
    ExpectAbsl(client->Compress(c.input, CompressOptions{}).status(), absl::StatusCode::kUnauthenticated,
                 "bearer token");
    ExpectAbsl(client->CompressCache("x", CompressOptions{}).status(), absl::StatusCode::kUnauthenticated,
                 "bearer token");
    ExpectAbsl(client->DeleteCache("x").status(), absl::StatusCode::kUnauthenticated, "bearer token");
    absl::StatusOr<CacheList> list = client->ListCaches();
    ASSERT_TRUE(!list.ok() || !list->errors.empty());
    ExpectAbsl(list.ok() ? list->errors[0].status : list.status(), absl::StatusCode::kUnauthenticated,
                 "bearer token");
    absl::StatusOr<ClusterStats> stats = client->Stats();
    ASSERT_TRUE(!stats.ok() || stats->answered == 0);
    // The message says how to send one, and never echoes it.
    std::unique_ptr<v1::Medakv::Stub> stub = RawStub();
    const grpc::Status s = RawStats(*stub, token.empty() ? "" : absl::StrCat("Bearer ", token));
    EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAUTHENTICATED);
    EXPECT_TRUE(absl::StrContains(s.error_message(), "authorization: Bearer TOKEN")) << s.error_message();
    if (!token.empty()) {
      EXPECT_FALSE(absl::StrContains(s.error_message(), token));
    }
  }
  // The shared-memory calls too.
  {
    std::unique_ptr<v1::Medakv::Stub> stub = RawStub();
    grpc::ClientContext ctx;
    v1::UnregisterSharedMemoryRequest req;
    req.set_region("r");
    v1::UnregisterSharedMemoryResponse resp;
    EXPECT_EQ(stub->UnregisterSharedMemory(&ctx, req, &resp).error_code(), grpc::StatusCode::UNAUTHENTICATED);
    grpc::ClientContext lease_ctx;
    v1::RegisterSharedMemoryRequest reg;
    reg.set_region("r");
    reg.set_shm_name("/medakv:alice:x");
    reg.set_size(4096);
    std::unique_ptr<grpc::ClientReader<v1::RegisterSharedMemoryResponse>> lease =
        stub->RegisterSharedMemory(&lease_ctx, reg);
    v1::RegisterSharedMemoryResponse first;
    EXPECT_FALSE(lease->Read(&first));
    EXPECT_EQ(lease->Finish().error_code(), grpc::StatusCode::UNAUTHENTICATED);
  }
  // Malformed authorization values.
  std::unique_ptr<v1::Medakv::Stub> stub = RawStub();
  for (const std::string& bad : {std::string("Basic YWxpY2U6cHc="), std::string("Bearer"), std::string(kAliceToken),
                                 absl::StrCat("Bearer ", kAliceToken, "x")}) {
    EXPECT_EQ(RawStats(*stub, bad).error_code(), grpc::StatusCode::UNAUTHENTICATED) << bad;
  }
  // A valid token works, and Stats names the caller's tenant and its object prefix.
  v1::StatsResponse r;
  ASSERT_TRUE(RawStats(*stub, absl::StrCat("Bearer ", kBobToken), &r).ok());
  EXPECT_EQ(r.tenant(), "bob");
  EXPECT_EQ(r.shm_name_prefix(), "/medakv:bob:");
  // The health service needs no token (probes).
  grpc::ClientContext hctx;
  grpc::health::v1::HealthCheckResponse health;
  ASSERT_TRUE(grpc::health::v1::Health::NewStub(grpc::CreateChannel(Target(), grpc::InsecureChannelCredentials()))
                  ->Check(&hctx, grpc::health::v1::HealthCheckRequest(), &health)
                  .ok());
  EXPECT_EQ(health.status(), grpc::health::v1::HealthCheckResponse::SERVING);
}

TEST_F(SecurityTest, TenantsCannotReachEachOthersCaches) {
  Start(Secured(TokensFile(dir_)));
  std::unique_ptr<Client> alice = NewClient(kAliceToken);
  std::unique_ptr<Client> bob = NewClient(kBobToken);
  TestCache a = test::MakeTestCache({.seed = 1});
  TestCache b = test::MakeTestCache({.seed = 2});
  ASSERT_TRUE(alice->PutCache("shared-id", a.input).ok());
  ASSERT_TRUE(alice->PutCache("alice-only", a.input).ok());
  ASSERT_TRUE(bob->PutCache("shared-id", b.input).ok()) << "the same id under another tenant is another entry";

  for (const char* id : {"alice-only"}) {
    ExpectAbsl(bob->GetCache(id).status(), absl::StatusCode::kNotFound, "is not stored");
    ExpectAbsl(bob->DeleteCache(id).status(), absl::StatusCode::kNotFound, "is not stored");
    ExpectAbsl(bob->CompressCache(id, CompressOptions{}).status(), absl::StatusCode::kNotFound, "is not stored");
  }
  absl::StatusOr<CacheList> bobs = bob->ListCaches();
  ASSERT_TRUE(bobs.ok());
  ASSERT_EQ(bobs->caches.size(), 1u);
  EXPECT_EQ(bobs->caches[0].info.cache_id(), "shared-id");
  absl::StatusOr<CacheList> alices = alice->ListCaches("alice");
  ASSERT_TRUE(alices.ok());
  ASSERT_EQ(alices->caches.size(), 1u);

  // Each tenant reads back its own bytes under the shared id.
  absl::StatusOr<FetchedCache> ga = alice->GetCache("shared-id");
  absl::StatusOr<FetchedCache> gb = bob->GetCache("shared-id");
  ASSERT_TRUE(ga.ok() && gb.ok());
  for (size_t l = 0; l < a.input.layers.size(); ++l) {
    const TensorView& ka = a.input.layers[l].key;
    const TensorView& kb = b.input.layers[l].key;
    const size_t bytes = static_cast<size_t>(ka.heads * ka.tokens * ka.head_dim * DTypeSize(ka.dtype));
    ASSERT_EQ(ga->layers[l].key.size(), bytes);
    EXPECT_EQ(std::memcmp(ga->layers[l].key.data(), ka.data, bytes), 0);
    EXPECT_EQ(std::memcmp(gb->layers[l].key.data(), kb.data, bytes), 0);
    EXPECT_NE(std::memcmp(ga->layers[l].key.data(), gb->layers[l].key.data(), bytes), 0);
  }
  // Alice's entry survived bob's delete attempt; bob deletes his own only.
  ASSERT_TRUE(bob->DeleteCache("shared-id").ok());
  EXPECT_TRUE(alice->GetCache("shared-id").ok());
  EXPECT_TRUE(alice->GetCache("alice-only").ok());
  EXPECT_TRUE(alice->CompressCache("alice-only", CompressOptions{}).ok());

  // No tenant, token or cache id in the metrics.
  const std::string metrics = MetricsText();
  for (const std::string& secret : {std::string("alice"), std::string("bob"), std::string(kAliceToken),
                                    std::string(kBobToken), std::string("shared-id")}) {
    EXPECT_FALSE(absl::StrContains(metrics, secret)) << secret << " in the metrics";
  }
  EXPECT_TRUE(absl::StrContains(metrics, "medakv_requests_total")) << "the metrics were collected";
}

// A POSIX shared-memory object of `size` bytes under `name`, unlinked at the end.
class ShmObject {
 public:
  ShmObject(std::string name, int64_t size) : name_(std::move(name)) {
    const int fd = shm_open(name_.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
    EXPECT_GE(fd, 0) << name_;
    EXPECT_EQ(ftruncate(fd, size), 0);
    close(fd);
  }
  ~ShmObject() { shm_unlink(name_.c_str()); }
  const std::string& name() const { return name_; }

 private:
  std::string name_;
};

TEST_F(SecurityTest, SharedMemoryRegionsBelongToTheirTenant) {
  Start(Secured(TokensFile(dir_)));
  std::unique_ptr<v1::Medakv::Stub> stub = RawStub();
  const std::string pid = absl::StrCat(getpid());
  ShmObject alices(absl::StrCat("/medakv:alice:test-", pid), 1 << 16);
  ShmObject plain(absl::StrCat("/medakv-test-", pid), 1 << 16);
  auto lease = [&](const std::string& token, const std::string& region, const std::string& shm_name,
                   grpc::ClientContext* ctx, v1::RegisterSharedMemoryResponse* first) {
    ctx->AddMetadata("authorization", absl::StrCat("Bearer ", token));
    v1::RegisterSharedMemoryRequest reg;
    reg.set_region(region);
    reg.set_shm_name(shm_name);
    reg.set_size(1 << 16);
    auto reader = stub->RegisterSharedMemory(ctx, reg);
    const bool registered = reader->Read(first);
    return std::make_pair(registered, std::move(reader));
  };
  // Alice registers her object as "r".
  grpc::ClientContext alice_ctx;
  v1::RegisterSharedMemoryResponse first;
  auto [registered, alice_lease] = lease(kAliceToken, "r", alices.name(), &alice_ctx, &first);
  ASSERT_TRUE(registered);
  // Bob cannot register alice's object, nor one without his prefix.
  for (const std::string& name : {alices.name(), plain.name()}) {
    grpc::ClientContext ctx;
    auto [ok, reader] = lease(kBobToken, "mine", name, &ctx, &first);
    EXPECT_FALSE(ok);
    const grpc::Status s = reader->Finish();
    EXPECT_EQ(s.error_code(), grpc::StatusCode::PERMISSION_DENIED) << s.error_message();
    EXPECT_TRUE(absl::StrContains(s.error_message(), "/medakv:bob:")) << s.error_message();
  }
  // Bob's refs to "r" do not resolve: his upload fails NOT_FOUND.
  {
    grpc::ClientContext ctx;
    ctx.AddMetadata("authorization", absl::StrCat("Bearer ", kBobToken));
    v1::PutCacheResponse resp;
    auto writer = stub->PutCache(&ctx, &resp);
    v1::PutCacheRequest header;
    v1::PutCacheHeader* h = header.mutable_header();
    h->set_cache_id("via-shm");
    v1::CacheShape* shape = h->mutable_shape();
    shape->set_layers(1);
    shape->set_kv_heads(1);
    shape->set_head_dim(8);
    shape->set_tokens(4);
    shape->set_dtype(v1::DTYPE_FLOAT16);
    h->set_stats(v1::STATS_FORM_NONE);
    ASSERT_TRUE(writer->Write(header));
    v1::PutCacheRequest chunk;
    v1::TensorChunk* c = chunk.mutable_chunk();
    c->set_layer(0);
    c->set_tensor(v1::TENSOR_KIND_KEY);
    c->mutable_shm()->set_region("r");
    c->mutable_shm()->set_length(64);
    writer->Write(chunk);
    writer->WritesDone();
    const grpc::Status s = writer->Finish();
    EXPECT_EQ(s.error_code(), grpc::StatusCode::NOT_FOUND) << s.error_message();
  }
  // Bob cannot unregister alice's region; it stays registered.
  {
    grpc::ClientContext ctx;
    ctx.AddMetadata("authorization", absl::StrCat("Bearer ", kBobToken));
    v1::UnregisterSharedMemoryRequest req;
    req.set_region("r");
    v1::UnregisterSharedMemoryResponse resp;
    EXPECT_EQ(stub->UnregisterSharedMemory(&ctx, req, &resp).error_code(), grpc::StatusCode::NOT_FOUND);
    v1::StatsResponse stats;
    ASSERT_TRUE(RawStats(*stub, absl::StrCat("Bearer ", kAliceToken), &stats).ok());
    EXPECT_EQ(stats.shared_memory_regions(), 1);
  }
  // Alice's client uses the data plane with her prefix (the client asks the server for it).
  std::unique_ptr<Client> alice = NewClient(kAliceToken, nullptr, SharedMemoryMode::kAlways);
  TestCache cache = test::MakeTestCache({});
  absl::StatusOr<PutResult> put = alice->PutCache("via-shm", cache.input);
  ASSERT_TRUE(put.ok()) << put.status();
  EXPECT_TRUE(put->shared_memory);
  absl::StatusOr<FetchedCache> got = alice->GetCache("via-shm");
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_TRUE(got->shared_memory);
  alice_ctx.TryCancel();
  alice_lease->Finish();
}

// ---- TLS ---------------------------------------------------------------------------------

class TlsTest : public SecurityTest {
 protected:
  void SetUp() override { ASSERT_TRUE(MakePki(dir_, &pki_)); }
  std::shared_ptr<grpc::ChannelCredentials> Creds(const std::string& ca, const std::string& cert = "",
                                                  const std::string& key = "") {
    absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> c = TlsCredentials(ca, cert, key);
    EXPECT_TRUE(c.ok()) << c.status();
    return c.ok() ? *c : nullptr;
  }
  Pki pki_;
};

TEST_F(TlsTest, TlsServesVerifiedClientsOnly) {
  Start(Secured("", pki_.server_cert, pki_.server_key));
  EXPECT_TRUE(server_->tls());
  std::unique_ptr<v1::Medakv::Stub> good = RawStub(Creds(pki_.ca));
  v1::StatsResponse r;
  const grpc::Status ok = RawStats(*good, "", &r);
  ASSERT_TRUE(ok.ok()) << ok.error_message();
  EXPECT_EQ(r.tenant(), "");
  // A plaintext client, and one that does not trust the server's CA, get no connection.
  std::unique_ptr<v1::Medakv::Stub> plaintext = RawStub();
  EXPECT_EQ(RawStats(*plaintext, "").error_code(), grpc::StatusCode::UNAVAILABLE);
  std::unique_ptr<v1::Medakv::Stub> distrustful = RawStub(Creds(pki_.rogue_ca));
  EXPECT_EQ(RawStats(*distrustful, "").error_code(), grpc::StatusCode::UNAVAILABLE);
  // The client library round-trips a cache over TLS.
  std::unique_ptr<Client> client = NewClient("", Creds(pki_.ca));
  TestCache c = test::MakeTestCache({});
  ASSERT_TRUE(client->PutCache("tls", c.input).ok());
  absl::StatusOr<FetchedCache> got = client->GetCache("tls");
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->layers.size(), c.input.layers.size());
}

TEST_F(TlsTest, MutualTlsNeedsACertificateFromTheClientCa) {
  Start(Secured("", pki_.server_cert, pki_.server_key, pki_.client_ca));
  std::unique_ptr<v1::Medakv::Stub> no_cert = RawStub(Creds(pki_.ca));
  EXPECT_EQ(RawStats(*no_cert, "").error_code(), grpc::StatusCode::UNAVAILABLE);
  std::unique_ptr<v1::Medakv::Stub> rogue = RawStub(Creds(pki_.ca, pki_.rogue_cert, pki_.rogue_key));
  EXPECT_EQ(RawStats(*rogue, "").error_code(), grpc::StatusCode::UNAVAILABLE);
  std::unique_ptr<v1::Medakv::Stub> good = RawStub(Creds(pki_.ca, pki_.client_cert, pki_.client_key));
  const grpc::Status s = RawStats(*good, "");
  EXPECT_TRUE(s.ok()) << s.error_message();
}

TEST_F(TlsTest, TokensOverTlsGoThroughTheAuthProcessor) {
  Start(Secured(TokensFile(dir_), pki_.server_cert, pki_.server_key));
  std::unique_ptr<v1::Medakv::Stub> stub = RawStub(Creds(pki_.ca));
  v1::StatsResponse r;
  ASSERT_TRUE(RawStats(*stub, absl::StrCat("Bearer ", kAliceToken), &r).ok());
  EXPECT_EQ(r.tenant(), "alice");
  const grpc::Status wrong = RawStats(*stub, "Bearer not-a-token-0123456789abc");
  EXPECT_EQ(wrong.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_TRUE(absl::StrContains(wrong.error_message(), "not valid")) << wrong.error_message();
  {
    v1::StatsResponse leak;
    const grpc::Status none = RawStats(*stub, "", &leak);
    EXPECT_EQ(none.error_code(), grpc::StatusCode::UNAUTHENTICATED) << "tenant '" << leak.tenant() << "'";
  }
  // Tenants stay apart over TLS too.
  std::unique_ptr<Client> alice = NewClient(kAliceToken, Creds(pki_.ca));
  std::unique_ptr<Client> bob = NewClient(kBobToken, Creds(pki_.ca));
  TestCache c = test::MakeTestCache({});
  ASSERT_TRUE(alice->PutCache("secret", c.input).ok());
  ExpectAbsl(bob->GetCache("secret").status(), absl::StatusCode::kNotFound, "is not stored");
  EXPECT_TRUE(alice->GetCache("secret").ok());
}

// ---- rotation and start-up errors ----------------------------------------------------------

TEST_F(SecurityTest, ReloadSwapsTokensAndKeepsThemOnABadFile) {
  const std::string path = TokensFile(dir_);
  Start(Secured(path));
  std::unique_ptr<v1::Medakv::Stub> stub = RawStub();
  ASSERT_TRUE(RawStats(*stub, absl::StrCat("Bearer ", kAliceToken)).ok());
  dir_.Write("tokens", absl::StrCat(kAliceToken2, " alice\n"));
  ASSERT_TRUE(server_->ReloadTokens().ok());
  EXPECT_EQ(server_->tokens(), 1u);
  EXPECT_EQ(RawStats(*stub, absl::StrCat("Bearer ", kAliceToken)).error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(RawStats(*stub, absl::StrCat("Bearer ", kBobToken)).error_code(), grpc::StatusCode::UNAUTHENTICATED);
  ASSERT_TRUE(RawStats(*stub, absl::StrCat("Bearer ", kAliceToken2)).ok());
  dir_.Write("tokens", "garbage\n");
  const absl::Status bad = server_->ReloadTokens();
  EXPECT_EQ(bad.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(bad.message(), ":1: expected `TOKEN TENANT`")) << bad;
  EXPECT_TRUE(RawStats(*stub, absl::StrCat("Bearer ", kAliceToken2)).ok()) << "the previous tokens stay";
}

TEST_F(SecurityTest, StartFailsClearlyOnBadSecurityFlags) {
  const std::string pem = dir_.Write("x.pem", "-----BEGIN CERTIFICATE-----\nnot really\n-----END CERTIFICATE-----\n");
  const std::string text = dir_.Write("x.txt", "hello\n");
  const std::vector<std::pair<ServerOptions, std::string>> cases = {
      {Secured("", pem), "--tls_cert and --tls_key go together"},
      {Secured("", "", pem), "--tls_cert and --tls_key go together"},
      {Secured("", "", "", pem), "--tls_client_ca needs --tls_cert"},
      {Secured("", "/nonexistent.pem", pem), "--tls_cert /nonexistent.pem: cannot open"},
      {Secured("", pem, text), "--tls_key " + text + ": not a PEM file"},
      {Secured("/nonexistent/tokens"), "--auth_tokens_file /nonexistent/tokens: cannot open"},
      {Secured(text), text + ":1: expected `TOKEN TENANT`, got 1 field"},
  };
  for (const auto& [options, message] : cases) {
    ServerOptions o = options;
    o.listen = "127.0.0.1:0";
    o.backend = "cpu";
    absl::StatusOr<std::unique_ptr<MedakvServer>> s = MedakvServer::Start(o);
    ASSERT_FALSE(s.ok()) << message;
    EXPECT_TRUE(absl::StrContains(s.status().message(), message)) << s.status() << " wanted " << message;
  }
}

TEST(ClientSecurityOptionsTest, BadTokensAndTlsFilesFailBeforeTheNetwork) {
  ClientOptions o;
  o.targets = {"127.0.0.1:1"};
  o.token = "has space";
  ExpectAbsl(Client::Create(o).status(), absl::StatusCode::kInvalidArgument, "token: byte 3 is not printable");
  ExpectAbsl(TlsCredentials("/nonexistent/ca.pem", "", "").status(), absl::StatusCode::kNotFound,
               "CA certificates file /nonexistent/ca.pem: cannot open");
  ExpectAbsl(TlsCredentials("", "cert.pem", "").status(), absl::StatusCode::kInvalidArgument, "go together");
  TempDir dir;
  ExpectAbsl(TlsCredentials(dir.Write("ca.txt", "not pem"), "", "").status(), absl::StatusCode::kInvalidArgument,
               "not a PEM file");
}

}  // namespace
}  // namespace medakv
