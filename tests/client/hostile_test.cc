// Hostile and careless clients against a real medakv-server process
// (tests/client/server_process.h) with short limits: each test runs the
// attack, then asserts what an honest client sees (success, within a bound)
// or what the server holds (its slots, its memory, its exit time).
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <iostream>
#include <map>
#include <fstream>
#include <functional>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/strip.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "client/cpp/client.h"
#include "kernels/common/tensor_util.h"
#include "medakv/v1/medakv.grpc.pb.h"
#include "service/compress/options.h"
#include "tests/client/client_test_util.h"
#include "tests/client/server_process.h"
#include "tests/service/test_cache.h"

namespace medakv {
namespace {

using test::CacheParams;
using test::MakeTestCache;
using test::PollUntil;
using test::ServerProcess;
using test::StartServer;
using test::TestCache;

using Clock = std::chrono::steady_clock;

// Resident memory is measured only without AddressSanitizer (its shadow
// memory and the quarantine of freed blocks would swamp what is measured).
#if defined(__SANITIZE_ADDRESS__)
constexpr bool kMeasureMemory = false;
#else
constexpr bool kMeasureMemory = true;
#endif

double SecondsSince(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// A small cache an honest worker sends: 2 layers, 64 tokens.
TestCache HonestCache() {
  return MakeTestCache({.dtype = DType::kFloat16, .layers = 2, .kv_heads = 2, .group = 2, .tokens = 64,
                        .head_dim = 16, .q_tokens = 8, .seed = 3});
}

// One layer whose statistics cost tokens^2 (every token is a query row),
// head_dim 1: 3 x 128 KiB on the wire for 2^32 (row, key) pairs, tens of
// seconds of one layer's work.
TestCache QuadraticCache() {
  return MakeTestCache({.dtype = DType::kFloat16, .layers = 1, .kv_heads = 1, .group = 1, .tokens = 1 << 16,
                        .head_dim = 1, .q_tokens = 1 << 16, .pattern = test::VisualPattern::kNone, .seed = 5});
}

// A raw stub, for requests the client library would refuse to send.
std::unique_ptr<v1::Medakv::Stub> RawStub(const std::string& target) {
  return v1::Medakv::NewStub(grpc::CreateChannel(target, grpc::InsecureChannelCredentials()));
}

// The header of a Compress stream: one layer, one head, head_dim 1, `tokens`
// tokens, one query row; with `visual`, one visual span over every token.
v1::CompressRequest Header(int64_t tokens, bool visual) {
  v1::CompressRequest req;
  v1::CompressHeader* h = req.mutable_header();
  v1::CacheShape* shape = h->mutable_shape();
  shape->set_layers(1);
  shape->set_kv_heads(1);
  shape->set_q_heads(1);
  shape->set_head_dim(1);
  shape->set_tokens(tokens);
  shape->set_dtype(v1::DTYPE_FLOAT16);
  if (visual) {
    v1::ModalitySpan* span = shape->add_modality();
    span->set_start(0);
    span->set_length(tokens);
    span->set_modality(v1::MODALITY_VISUAL);
  }
  h->set_stats(v1::STATS_FORM_QUERIES);
  h->set_q_tokens(1);
  h->mutable_policy()->set_rho(0.5);
  return req;
}

// A Compress stream that sent its header and then nothing; cancelled when destroyed.
struct OpenStream {
  grpc::ClientContext ctx;
  std::unique_ptr<grpc::ClientReaderWriter<v1::CompressRequest, v1::CompressResponse>> stream;
  ~OpenStream() { ctx.TryCancel(); }
};

// Adds $MEDAKV_TOKEN as the call's bearer token, when set (the soak's
// server may require one).
void Authorize(grpc::ClientContext& ctx) {
  if (const char* token = std::getenv("MEDAKV_TOKEN")) ctx.AddMetadata("authorization", absl::StrCat("Bearer ", token));
}

std::unique_ptr<OpenStream> Open(v1::Medakv::Stub& stub, const v1::CompressRequest& header) {
  auto s = std::make_unique<OpenStream>();
  Authorize(s->ctx);
  s->ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
  s->stream = stub.Compress(&s->ctx);
  EXPECT_TRUE(s->stream->Write(header));
  return s;
}

// Sends `request` as a whole Compress stream (its header, then the end)
// and returns how the server ended the call.
grpc::Status SendHeaderOnly(v1::Medakv::Stub& stub, const v1::CompressRequest& request) {
  grpc::ClientContext ctx;
  Authorize(ctx);
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  auto stream = stub.Compress(&ctx);
  EXPECT_TRUE(stream->Write(request));
  stream->WritesDone();
  v1::CompressResponse resp;
  while (stream->Read(&resp)) {
  }
  return stream->Finish();
}

int64_t Inflight(Client& client) {
  absl::StatusOr<ClusterStats> s = client.Stats();
  return s.ok() ? s->total.inflight_compressions() : -1;
}

// ---- bounded work: deadlines and cancellation reach inside a layer --------------------------

// A request whose single layer takes tens of seconds, sent with a 1 s
// deadline, gives its slot back within a second or two of the deadline (the
// statistics poll the cancellation between blocks of rows), so the honest
// request queued behind it on the only slot succeeds.
TEST(HostileTest, DeadlineStopsTheWorkInsideALayer) {
  std::unique_ptr<ServerProcess> server = StartServer({"--max_inflight=1", "--threads=1", "--queue_timeout=60s"});
  ASSERT_NE(server, nullptr);
  std::unique_ptr<Client> attacker = test::NewClient(test::Options({server->target()}));
  std::unique_ptr<Client> honest = test::NewClient(test::Options({server->target()}));
  ASSERT_NE(attacker, nullptr);
  ASSERT_NE(honest, nullptr);
  const TestCache quadratic = QuadraticCache();
  CompressOptions h2o = DefaultOptions(PolicyKind::kH2O);
  CallOptions short_deadline;
  short_deadline.deadline = absl::Seconds(1);
  absl::StatusOr<RemoteResult> a = attacker->Compress(quadratic.input, h2o, short_deadline);
  ASSERT_FALSE(a.ok());
  EXPECT_EQ(a.status().code(), absl::StatusCode::kDeadlineExceeded) << a.status();
  // The honest request needs the slot the attacker held.
  const TestCache small = HonestCache();
  const Clock::time_point start = Clock::now();
  absl::StatusOr<RemoteResult> r = honest->Compress(small.input, DefaultOptions(PolicyKind::kAmber));
  ASSERT_TRUE(r.ok()) << r.status();
  const double waited = SecondsSince(start);
  EXPECT_LT(waited, 5.0) << "the honest request waited " << waited
                         << " s for the slot of a request whose 1 s deadline had passed";
  EXPECT_TRUE(PollUntil(absl::Seconds(5), [&] { return Inflight(*honest) == 0; }));
}

// SIGTERM with a 1 s grace stops a server in the middle of such a layer
// within a few seconds.
TEST(HostileTest, ShutdownStopsTheWorkInsideALayer) {
  std::unique_ptr<ServerProcess> server = StartServer({"--max_inflight=1", "--threads=1", "--shutdown_grace=1s"});
  ASSERT_NE(server, nullptr);
  std::unique_ptr<Client> attacker = test::NewClient(test::Options({server->target()}));
  ASSERT_NE(attacker, nullptr);
  const TestCache quadratic = QuadraticCache();
  std::thread call([&] {
    absl::StatusOr<RemoteResult> a = attacker->Compress(quadratic.input, DefaultOptions(PolicyKind::kH2O));
    EXPECT_FALSE(a.ok());
  });
  // Wait until the compression runs (the upload is 384 KiB).
  EXPECT_TRUE(PollUntil(absl::Seconds(10), [&] { return Inflight(*attacker) == 1; }));
  absl::SleepFor(absl::Milliseconds(500));
  const Clock::time_point start = Clock::now();
  server->Terminate();
  const double took = SecondsSince(start);
  call.join();
  EXPECT_LT(took, 5.0) << "SIGTERM with --shutdown_grace=1s took " << took << " s";
}

// Options that would make the work quadratic are refused up front, naming
// the field (a pool kernel of 2^31 - 1 once held a slot for a minute).
TEST(HostileTest, QuadraticOptionsAreRefused) {
  std::unique_ptr<ServerProcess> server = StartServer();
  ASSERT_NE(server, nullptr);
  std::unique_ptr<v1::Medakv::Stub> stub = RawStub(server->target());
  v1::CompressRequest req = Header(int64_t{1} << 18, false);  // one layer of 2^18 tokens, head_dim 1
  req.mutable_header()->mutable_policy()->mutable_snapkv()->set_pool_kernel(2147483647);
  const grpc::Status s = SendHeaderOnly(*stub, req);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
  EXPECT_TRUE(absl::StrContains(s.error_message(), "policy.snapkv.pool_kernel must be odd and in [1, 1023]"))
      << s.error_message();
  // The operator sees the refused call in the server's log: method, code, message, peer.
  EXPECT_TRUE(PollUntil(absl::Seconds(5), [&] {
    return absl::StrContains(server->Log(), "medakv-server: Compress failed: INVALID_ARGUMENT: "
                                            "policy.snapkv.pool_kernel must be odd and in [1, 1023]");
  })) << server->Log();
  EXPECT_TRUE(absl::StrContains(server->Log(), "(peer ipv4:127.0.0.1:")) << server->Log();
}

// ---- queued calls: cheap, and bounded in number ----------------------------------------------

// A memory figure of /proc/PID/status ("VmRSS:", the resident memory now;
// "VmHWM:", its peak) in bytes, or -1.
int64_t StatusBytes(pid_t pid, absl::string_view field) {
  std::ifstream in(absl::StrCat("/proc/", pid, "/status"));
  std::string line;
  while (std::getline(in, line)) {
    int64_t kib = 0;
    if (absl::StartsWith(line, field) &&
        absl::SimpleAtoi(absl::StripAsciiWhitespace(absl::StripSuffix(line.substr(field.size()), "kB")), &kib)) {
      return kib * 1024;
    }
  }
  return -1;
}
int64_t ResidentBytes(pid_t pid) { return StatusBytes(pid, "VmRSS:"); }

// While one stream holds the only slot, 8 calls whose 45-byte headers
// announce a visual span of 2^24 tokens wait for it: each holds its spans,
// not a tokens-sized vector (they once took the server from 19 to 532 MiB),
// and the ninth and later are refused at once (--max_queued=8). Once the
// holder goes, an honest request succeeds.
TEST(HostileTest, QueuedCallsAreCheapAndBounded) {
  std::unique_ptr<ServerProcess> server =
      StartServer({"--max_inflight=1", "--max_queued=8", "--queue_timeout=60s", "--idle_timeout=120s"});
  ASSERT_NE(server, nullptr);
  std::unique_ptr<v1::Medakv::Stub> stub = RawStub(server->target());
  std::unique_ptr<Client> honest = test::NewClient(test::Options({server->target()}));
  ASSERT_NE(honest, nullptr);
  std::unique_ptr<OpenStream> holder = Open(*stub, Header(64, false));
  ASSERT_TRUE(PollUntil(absl::Seconds(10), [&] { return Inflight(*honest) == 1; }));
  absl::SleepFor(absl::Milliseconds(200));
  const int64_t before = ResidentBytes(server->pid());
  ASSERT_GT(before, 0);
  std::vector<std::unique_ptr<OpenStream>> queued;
  for (int i = 0; i < 8; ++i) queued.push_back(Open(*stub, Header(int64_t{1} << 24, true)));
  ASSERT_TRUE(PollUntil(absl::Seconds(10), [&] { return Inflight(*honest) == 9; }));
  // The ninth and later: RESOURCE_EXHAUSTED without waiting.
  for (int i = 0; i < 4; ++i) {
    const Clock::time_point start = Clock::now();
    std::unique_ptr<OpenStream> extra = Open(*stub, Header(int64_t{1} << 24, true));
    v1::CompressResponse resp;
    EXPECT_FALSE(extra->stream->Read(&resp));
    const grpc::Status st = extra->stream->Finish();
    EXPECT_EQ(st.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << st.error_message();
    EXPECT_TRUE(absl::StrContains(st.error_message(), "--max_queued")) << st.error_message();
    EXPECT_LT(SecondsSince(start), 5.0);
  }
  const int64_t after = ResidentBytes(server->pid());
  if (kMeasureMemory) {
    EXPECT_LT(after - before, int64_t{24} << 20)
        << "8 queued calls took the server from " << before << " to " << after << " bytes";
  }
  holder.reset();
  queued.clear();
  const TestCache small = HonestCache();
  absl::StatusOr<RemoteResult> r = honest->Compress(small.input, DefaultOptions(PolicyKind::kAmber));
  EXPECT_TRUE(r.ok()) << r.status();
}

// Degenerate options and non-finite tensors get INVALID_ARGUMENT naming the
// field or the place, from the server itself (the raw stub skips the
// client's own checks); they once gave internal errors ("budget ...
// -9223372036854775789", "kept positions ... found 0 at index 1").
TEST(HostileTest, DegenerateOptionsAndNonFiniteTensorsAreRefused) {
  std::unique_ptr<ServerProcess> server = StartServer();
  ASSERT_NE(server, nullptr);
  std::unique_ptr<v1::Medakv::Stub> stub = RawStub(server->target());
  auto refused = [&](const std::function<void(v1::Policy*)>& policy) {
    v1::CompressRequest req = Header(64, false);
    policy(req.mutable_header()->mutable_policy());
    return SendHeaderOnly(*stub, req);
  };
  const std::pair<std::function<void(v1::Policy*)>, std::string> cases[] = {
      {[](v1::Policy* p) { p->mutable_meda()->set_tau(5e-324); }, "policy.meda.tau must be in [1e-06, 1e+06]"},
      {[](v1::Policy* p) { p->mutable_pyramidkv()->set_beta(5e-324); }, "policy.pyramidkv.beta must be in"},
      {[](v1::Policy* p) { p->mutable_amber()->mutable_select()->set_scale(3e38f); },
       "policy.amber.select.scale must be in [0, 10000]"},
  };
  for (const auto& [policy, message] : cases) {
    const grpc::Status st = refused(policy);
    EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << st.error_message();
    EXPECT_TRUE(absl::StrContains(st.error_message(), message)) << st.error_message();
  }
  // A NaN in the keys and an infinity in the queries, through the client (it does not scan tensors).
  std::unique_ptr<Client> client = test::NewClient(test::Options({server->target()}));
  ASSERT_NE(client, nullptr);
  for (int which : {0, 1}) {
    TestCache c = HonestCache();
    test::HostTensor& t = which == 0 ? c.keys[1] : c.queries[0];
    const float bad = which == 0 ? NAN : -INFINITY;
    const int64_t at = t.view().RowOffset(1, 2) + 3;  // head 1, token 2, dim 3
    RowFromFloat(t.dtype, &bad, static_cast<char*>(t.data()) + at * DTypeSize(t.dtype), 1);
    absl::StatusOr<RemoteResult> r = client->Compress(c.input, DefaultOptions(PolicyKind::kAmber));
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
    const std::string want = which == 0 ? "layer 1 key: the value at head 1, token 2, dim 3 is not finite (nan)"
                                        : "layer 0 query: the value at head 1, token 2, dim 3 is not finite (-inf)";
    EXPECT_TRUE(absl::StrContains(r.status().message(), want)) << r.status();
  }
}

// ---- idle timeouts: a stalled client gives back what it holds ---------------------------------

// Bytes the host tier holds (entries and reservations), or -1.
int64_t HostUsed(Client& client) {
  absl::StatusOr<ClusterStats> s = client.Stats();
  if (!s.ok()) return -1;
  for (const v1::TierStats& t : s->total.tiers()) {
    if (t.tier() == "host") return t.used_bytes();
  }
  return -1;
}

// A cache of about `mib` MiB: 1 layer, 8 kv heads, head_dim 128, float16.
TestCache CacheOfMiB(int64_t mib, uint64_t seed) {
  return MakeTestCache({.dtype = DType::kFloat16, .layers = 1, .kv_heads = 8, .group = 1,
                        .tokens = mib * 1024 * 1024 / (2 * 8 * 128 * 2), .head_dim = 128, .q_tokens = 4,
                        .pattern = test::VisualPattern::kNone, .seed = seed});
}

// Streams that send a header (or nothing) and then stall hold the only slot
// for --idle_timeout at most: they end with DEADLINE_EXCEEDED, and the
// honest request behind them gets the slot.
TEST(HostileTest, StalledUploadsEndAfterTheIdleTimeout) {
  std::unique_ptr<ServerProcess> server =
      StartServer({"--max_inflight=1", "--idle_timeout=1s", "--queue_timeout=60s"});
  ASSERT_NE(server, nullptr);
  std::unique_ptr<v1::Medakv::Stub> stub = RawStub(server->target());
  std::unique_ptr<Client> honest = test::NewClient(test::Options({server->target()}));
  ASSERT_NE(honest, nullptr);
  // No header at all: the stream opens and waits.
  auto silent = std::make_unique<OpenStream>();
  silent->ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  silent->stream = stub->Compress(&silent->ctx);
  // A header, then nothing: it takes the slot.
  std::unique_ptr<OpenStream> holder = Open(*stub, Header(64, false));
  const Clock::time_point start = Clock::now();
  const TestCache small = HonestCache();
  absl::StatusOr<RemoteResult> r = honest->Compress(small.input, DefaultOptions(PolicyKind::kAmber));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_LT(SecondsSince(start), 5.0) << "the honest request waited for a stalled upload's slot";
  for (OpenStream* s : {holder.get(), silent.get()}) {
    v1::CompressResponse resp;
    EXPECT_FALSE(s->stream->Read(&resp));
    const grpc::Status st = s->stream->Finish();
    EXPECT_EQ(st.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << st.error_message();
    EXPECT_TRUE(absl::StrContains(st.error_message(), "--idle_timeout")) << st.error_message();
  }
}

// A PutCache header that claims most of the store evicts nothing: space is
// held as bytes arrive. The stalled upload ends after the idle timeout and
// holds nothing afterwards; the other tenant's entries are all there.
TEST(HostileTest, PutCacheHeaderAloneEvictsNothing) {
  std::unique_ptr<ServerProcess> server =
      StartServer({"--idle_timeout=1s", absl::StrCat("--host_cache_bytes=", int64_t{48} << 20)});
  ASSERT_NE(server, nullptr);
  std::unique_ptr<Client> honest = test::NewClient(test::Options({server->target()}));
  ASSERT_NE(honest, nullptr);
  const TestCache entry = CacheOfMiB(8, 1);
  for (int i = 0; i < 3; ++i) {
    absl::StatusOr<PutResult> put = honest->PutCache(absl::StrCat("honest-", i), entry.input);
    ASSERT_TRUE(put.ok()) << put.status();
  }
  const int64_t used = HostUsed(*honest);
  ASSERT_GT(used, 0);
  std::unique_ptr<v1::Medakv::Stub> stub = RawStub(server->target());
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  v1::PutCacheResponse response;
  std::unique_ptr<grpc::ClientWriter<v1::PutCacheRequest>> writer = stub->PutCache(&ctx, &response);
  v1::PutCacheRequest req;
  v1::PutCacheHeader* h = req.mutable_header();
  h->set_cache_id("greedy");
  v1::CacheShape* shape = h->mutable_shape();
  shape->set_layers(1);
  shape->set_kv_heads(8);
  shape->set_head_dim(128);
  shape->set_tokens(10000);  // keys and values: 2 x 8 x 10000 x 128 x 2 bytes, 39 MiB of the store's 48
  shape->set_dtype(v1::DTYPE_FLOAT16);
  h->set_stats(v1::STATS_FORM_NONE);
  ASSERT_TRUE(writer->Write(req));
  absl::SleepFor(absl::Milliseconds(300));
  absl::StatusOr<CacheList> list = honest->ListCaches("honest-");
  ASSERT_TRUE(list.ok()) << list.status();
  EXPECT_EQ(list->caches.size(), 3u) << "a header alone evicted entries";
  EXPECT_EQ(HostUsed(*honest), used) << "a header alone reserved store space";
  const grpc::Status st = writer->Finish();  // waits for the server to end the call
  EXPECT_EQ(st.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << st.error_message();
  EXPECT_TRUE(absl::StrContains(st.error_message(), "--idle_timeout")) << st.error_message();
  EXPECT_TRUE(PollUntil(absl::Seconds(5), [&] { return HostUsed(*honest) == used; }));
  list = honest->ListCaches("honest-");
  ASSERT_TRUE(list.ok()) << list.status();
  EXPECT_EQ(list->caches.size(), 3u);
}

// A reader that never reads pins its entry only until the idle timeout:
// then an upload that needs the entry's space evicts it.
TEST(HostileTest, StalledReaderUnpinsItsEntry) {
  std::unique_ptr<ServerProcess> server =
      StartServer({"--idle_timeout=1s", absl::StrCat("--host_cache_bytes=", int64_t{48} << 20)});
  ASSERT_NE(server, nullptr);
  std::unique_ptr<Client> honest = test::NewClient(test::Options({server->target()}));
  ASSERT_NE(honest, nullptr);
  const TestCache big = CacheOfMiB(30, 2);
  ASSERT_TRUE(honest->PutCache("first", big.input).ok());
  std::unique_ptr<v1::Medakv::Stub> stub = RawStub(server->target());
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  v1::GetCacheRequest get;
  get.set_cache_id("first");
  std::unique_ptr<grpc::ClientReader<v1::GetCacheResponse>> reader = stub->GetCache(&ctx, get);
  absl::SleepFor(absl::Milliseconds(300));  // the download starts; nobody reads
  // While it is pinned, the second entry cannot make room (it needs first's space).
  const TestCache second = CacheOfMiB(30, 3);
  const Clock::time_point start = Clock::now();
  absl::StatusOr<PutResult> put;
  EXPECT_TRUE(PollUntil(absl::Seconds(8), [&] {
    put = honest->PutCache("second", second.input);
    return put.ok();
  })) << put.status();
  EXPECT_LT(SecondsSince(start), 5.0);
  ctx.TryCancel();
}

// ---- ListCaches pages ------------------------------------------------------------------------

// One layer, one kv head, head_dim 1, `tokens` tokens, every other one
// visual: tokens / 2 modality spans on 4 bytes of keys and values per token.
TestCache SpanfulCache(int64_t tokens, uint64_t seed) {
  TestCache c = MakeTestCache({.dtype = DType::kFloat16, .layers = 1, .kv_heads = 1, .group = 1, .tokens = tokens,
                               .head_dim = 1, .q_tokens = 1, .pattern = test::VisualPattern::kNone, .seed = seed});
  c.input.modality.assign(static_cast<size_t>(tokens), 0);
  for (size_t t = 0; t < c.input.modality.size(); t += 2) c.input.modality[t] = 1;
  return c;
}

// Entries with 60000 modality spans each (CacheInfo ~0.5 MB): ListCaches
// pages them under 2 MiB a page, the client follows the pages, and a token
// that no page gave is INVALID_ARGUMENT. (Three entries of 700k spans once
// made ListCaches fail with "Sent message larger than max".)
TEST(HostileTest, ListCachesPagesEntriesWithManySpans) {
  std::unique_ptr<ServerProcess> server = StartServer();
  ASSERT_NE(server, nullptr);
  std::unique_ptr<Client> client = test::NewClient(test::Options({server->target()}));
  ASSERT_NE(client, nullptr);
  const TestCache many = SpanfulCache(120000, 9);  // 60000 visual runs
  PutOptions keys_only;
  keys_only.with_statistics = false;
  std::vector<std::string> ids;
  for (int i = 0; i < 6; ++i) {
    ids.push_back(absl::StrCat("spans/", i));
    absl::StatusOr<PutResult> put = client->PutCache(ids.back(), many.input, keys_only);
    ASSERT_TRUE(put.ok()) << put.status();
  }
  absl::StatusOr<CacheList> all = client->ListCaches("spans/");
  ASSERT_TRUE(all.ok()) << all.status();
  ASSERT_EQ(all->caches.size(), ids.size());
  for (size_t i = 0; i < ids.size(); ++i) {
    EXPECT_EQ(all->caches[i].info.cache_id(), ids[i]);
    EXPECT_EQ(all->caches[i].info.shape().modality_size(), 60000);
  }
  absl::StatusOr<CacheList> four = client->ListCaches("spans/", 4);
  ASSERT_TRUE(four.ok()) << four.status();
  EXPECT_EQ(four->caches.size(), 4u);
  // The pages themselves.
  std::unique_ptr<v1::Medakv::Stub> stub = RawStub(server->target());
  std::vector<std::string> seen;
  std::string token;
  int pages = 0;
  do {
    grpc::ClientContext ctx;
    v1::ListCachesRequest req;
    req.set_prefix("spans/");
    req.set_page_token(token);
    v1::ListCachesResponse resp;
    const grpc::Status st = stub->ListCaches(&ctx, req, &resp);
    ASSERT_TRUE(st.ok()) << st.error_message();
    ASSERT_GT(resp.caches_size(), 0);
    EXPECT_LE(resp.ByteSizeLong(), (size_t{2} << 20) + 600000);
    for (const v1::CacheInfo& c : resp.caches()) seen.push_back(c.cache_id());
    token = resp.next_page_token();
    if (!token.empty()) {
      EXPECT_EQ(token, resp.caches(resp.caches_size() - 1).cache_id());
    }
    ++pages;
  } while (!token.empty() && pages < 10);
  EXPECT_EQ(seen, ids);
  EXPECT_GE(pages, 2);
  grpc::ClientContext ctx;
  v1::ListCachesRequest bad;
  bad.set_page_token("not a token\n");
  v1::ListCachesResponse resp;
  const grpc::Status st = stub->ListCaches(&ctx, bad, &resp);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_TRUE(absl::StrContains(st.error_message(), "page_token")) << st.error_message();
}

// Modality spans count against the store's budget: a 64 MiB store filled
// with entries of 65536 spans each (1.5 MiB of spans, 1 MiB of tensors)
// holds 25 of them, not the 64 that their tensors alone would let in, and
// the server's memory stays within a few times the budget (spans outside
// the budget once let a full 64 MiB store take 425 MiB).
TEST(HostileTest, ModalitySpansCountAgainstTheStoreBudget) {
  std::unique_ptr<ServerProcess> server = StartServer({absl::StrCat("--host_cache_bytes=", int64_t{64} << 20)});
  ASSERT_NE(server, nullptr);
  std::unique_ptr<Client> client = test::NewClient(test::Options({server->target()}));
  ASSERT_NE(client, nullptr);
  const TestCache many = SpanfulCache(131072, 11);  // 65536 visual runs
  PutOptions keys_only;
  keys_only.with_statistics = false;
  const int64_t before = ResidentBytes(server->pid());
  int64_t entry_bytes = 0;
  for (int i = 0; i < 120; ++i) {
    absl::StatusOr<PutResult> put = client->PutCache(absl::StrCat("spanful/", i), many.input, keys_only);
    ASSERT_TRUE(put.ok()) << put.status();
    entry_bytes = put->info.bytes();
  }
  // keys, values, positions (4 bytes each per token) and 24 bytes per span.
  EXPECT_EQ(entry_bytes, 131072 * (2 + 2 + 4) + 65536 * 24);
  const int64_t used = HostUsed(*client);
  EXPECT_LE(used, int64_t{64} << 20);
  absl::StatusOr<CacheList> listed = client->ListCaches("spanful/");
  ASSERT_TRUE(listed.ok()) << listed.status();
  EXPECT_EQ(static_cast<int64_t>(listed->caches.size()), (int64_t{64} << 20) / entry_bytes);
  const int64_t after = ResidentBytes(server->pid());
  // Live: the 64 MiB store; the rest is what the allocator keeps of the
  // evicted entries and the uploads' buffers (about 100 MiB here).
  if (kMeasureMemory) {
    EXPECT_LT(after - before, int64_t{256} << 20) << "a full 64 MiB store took the server from " << before << " to "
                                                  << after << " bytes";
  }
}

// ---- peak memory of one compression --------------------------------------------------------

// amber with layer_budget mass on a cache of head_dim 1 (4 bytes of keys and
// values per token, so the per-token working memory dominates): the server's
// peak stays within the README's bound (request + output + 8 bytes per layer,
// kv head and token for the scores + 8 per layer and token for the mass
// budgets + 8 MiB per CPU thread); listing every (layer, token) slot once
// took it 24 bytes per slot further (11x the request instead of 6.6x here).
TEST(HostileTest, MassBudgetsPeakWithinTheStatedBound) {
  if (!kMeasureMemory) GTEST_SKIP() << "memory is not measured under AddressSanitizer";
  std::unique_ptr<ServerProcess> server = StartServer({"--max_inflight=1"});
  ASSERT_NE(server, nullptr);
  ClientOptions o = test::Options({server->target()});
  o.shared_memory = SharedMemoryMode::kOff;  // the server's own memory only
  std::unique_ptr<Client> client = test::NewClient(o);
  ASSERT_NE(client, nullptr);
  const int64_t layers = 16, tokens = 131072;
  const TestCache tiny = MakeTestCache({.dtype = DType::kFloat16, .layers = layers, .kv_heads = 1, .group = 1,
                                        .tokens = tokens, .head_dim = 1, .q_tokens = 64,
                                        .pattern = test::VisualPattern::kNone, .seed = 13});
  const int64_t request = layers * (2 * tokens * 2 + 64 * 2);
  CompressOptions mass = DefaultOptions(PolicyKind::kAmber);
  mass.layer_budget = LayerBudget::kMass;
  const int64_t before = StatusBytes(server->pid(), "VmHWM:");
  absl::StatusOr<RemoteResult> r = client->Compress(tiny.input, mass);
  ASSERT_TRUE(r.ok()) << r.status();
  const int64_t growth = StatusBytes(server->pid(), "VmHWM:") - before;
  // request + output (0.2 x keys and values) + scores and recent-search scores + mass gains
  // + 8 MiB of logits per CPU thread, with room for gRPC's buffers (a copy of the request in messages).
  const int64_t threads = std::max<int64_t>(1, std::thread::hardware_concurrency());
  const int64_t bound =
      2 * request + request / 5 + 8 * layers * tokens + 8 * layers * tokens + threads * (int64_t{8} << 20);
  EXPECT_LT(growth, bound) << "peak growth " << growth << " bytes for a request of " << request << " bytes ("
                           << static_cast<double>(growth) / static_cast<double>(request) << "x)";
}

// ---- the attack loop of scripts/soak.sh --attacks ---------------------------------------------

// Not a test on its own: with MEDAKV_HOSTILE_ATTACK="TARGET,SECONDS" it runs
// the attacks above against TARGET for SECONDS, a few at a time, so that
// scripts/soak.sh can run honest load beside them: a one-layer quadratic
// request with a 1 s deadline, two header-only uploads left to the idle
// timeout, eight queued 45-byte headers announcing 2^24 visual tokens
// (withdrawn after 2 s), a PutCache header claiming 1 GiB, and a GetCache
// nobody reads. Prints how many of each ran and what they ended with.
TEST(HostileTest, AttackLoop) {
  const char* env = std::getenv("MEDAKV_HOSTILE_ATTACK");
  if (env == nullptr) GTEST_SKIP() << "set MEDAKV_HOSTILE_ATTACK=TARGET,SECONDS (scripts/soak.sh --attacks)";
  const std::vector<std::string> parts = absl::StrSplit(env, ',');
  int seconds = 0;
  ASSERT_EQ(parts.size(), 2u);
  ASSERT_TRUE(absl::SimpleAtoi(parts[1], &seconds));
  const std::string target = parts[0];
  const absl::Time end = absl::Now() + absl::Seconds(seconds);
  std::atomic<int64_t> counts[5] = {};
  absl::Mutex mu;
  std::map<std::string, int64_t> endings;
  auto ended = [&](const std::string& what, grpc::StatusCode code) {
    absl::MutexLock lock(&mu);
    ++endings[absl::StrCat(what, " ", absl::StatusCodeToString(static_cast<absl::StatusCode>(code)))];
  };
  ClientOptions options = test::Options({target});
  if (const char* token = std::getenv("MEDAKV_TOKEN")) options.token = token;
  std::unique_ptr<Client> client = test::NewClient(options);
  ASSERT_NE(client, nullptr);
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(-1);  // GetCache's 4 MiB chunks
  std::shared_ptr<grpc::Channel> channel =
      grpc::CreateCustomChannel(target, grpc::InsecureChannelCredentials(), args);
  std::unique_ptr<v1::Medakv::Stub> stub = v1::Medakv::NewStub(channel);
  const TestCache quadratic = QuadraticCache();
  const TestCache big = CacheOfMiB(16, 4);
  ASSERT_TRUE(client->PutCache("attack/pinned", big.input, PutOptions{.overwrite = true}).ok());
  std::vector<std::thread> threads;
  threads.emplace_back([&] {  // 1: quadratic work under a short deadline
    CallOptions call;
    call.deadline = absl::Seconds(1);
    while (absl::Now() < end) {
      absl::StatusOr<RemoteResult> r = client->Compress(quadratic.input, DefaultOptions(PolicyKind::kH2O), call);
      ended("quadratic", static_cast<grpc::StatusCode>(r.status().code()));
      ++counts[0];
    }
  });
  threads.emplace_back([&] {  // 3: header-only uploads, two at a time, ended by the idle timeout
    while (absl::Now() < end) {
      std::vector<std::unique_ptr<OpenStream>> open;
      for (int i = 0; i < 2; ++i) open.push_back(Open(*stub, Header(64, false)));
      for (auto& s : open) {
        v1::CompressResponse resp;
        while (s->stream->Read(&resp)) {
        }
        ended("stalled upload", s->stream->Finish().error_code());
        ++counts[1];
      }
    }
  });
  threads.emplace_back([&] {  // 2: queued headers announcing 2^24 visual tokens, withdrawn after 2 s
    while (absl::Now() < end) {
      std::vector<std::unique_ptr<OpenStream>> open;
      for (int i = 0; i < 8; ++i) open.push_back(Open(*stub, Header(int64_t{1} << 24, true)));
      absl::SleepFor(absl::Seconds(2));
      counts[2] += static_cast<int64_t>(open.size());
      open.clear();  // TryCancel
    }
  });
  threads.emplace_back([&] {  // 3: a PutCache header claiming 1 GiB, then nothing
    while (absl::Now() < end) {
      grpc::ClientContext ctx;
      Authorize(ctx);
      ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
      v1::PutCacheResponse response;
      std::unique_ptr<grpc::ClientWriter<v1::PutCacheRequest>> writer = stub->PutCache(&ctx, &response);
      v1::PutCacheRequest req;
      v1::PutCacheHeader* h = req.mutable_header();
      h->set_cache_id("attack/greedy");
      h->set_overwrite(true);
      v1::CacheShape* shape = h->mutable_shape();
      shape->set_layers(32);
      shape->set_kv_heads(8);
      shape->set_head_dim(128);
      shape->set_tokens(8192);
      shape->set_dtype(v1::DTYPE_FLOAT16);
      h->set_stats(v1::STATS_FORM_NONE);
      writer->Write(req);
      ended("greedy put", writer->Finish().error_code());
      ++counts[3];
    }
  });
  threads.emplace_back([&] {  // 3: a reader that never reads
    while (absl::Now() < end) {
      grpc::ClientContext ctx;
      Authorize(ctx);
      ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
      v1::GetCacheRequest get;
      get.set_cache_id("attack/pinned");
      std::unique_ptr<grpc::ClientReader<v1::GetCacheResponse>> reader = stub->GetCache(&ctx, get);
      // Read nothing for longer than the soak's idle timeout (5 s): the
      // server gives up on the call; draining then sees its end.
      absl::SleepFor(absl::Seconds(8));
      v1::GetCacheResponse resp;
      while (reader->Read(&resp)) {
      }
      ended("stalled reader", reader->Finish().error_code());
      ++counts[4];
    }
  });
  for (std::thread& t : threads) t.join();
  std::cout << "attacks: " << counts[0] << " quadratic, " << counts[1] << " stalled uploads, " << counts[2]
            << " queued headers, " << counts[3] << " greedy puts, " << counts[4] << " stalled readers" << std::endl;
  for (const auto& [what, n] : endings) std::cout << "  " << what << ": " << n << std::endl;
}

}  // namespace
}  // namespace medakv
