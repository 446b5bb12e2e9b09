// The gRPC service end to end, in process and over loopback: results equal
// the library's bit for bit, the store keeps every byte, malformed requests
// get their documented status, cancellation releases memory.
#include "service/server/server.h"

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <unistd.h>

#include <atomic>
#include <fstream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "client/cpp/remote.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "kernels/common/device_memory.h"
#include "kernels/cuda/device.h"
#include "medakv/v1/medakv.grpc.pb.h"
#include "service/server/convert.h"
#include "tests/kernels/test_util.h"
#include "tests/service/grpc_test_util.h"
#include "tests/service/test_cache.h"

namespace medakv {
namespace {

using server::MedakvServer;
using server::ServerOptions;
using test::HostTensor;

using test::ExpectSameResult;
using test::ExpectStatus;
using test::SendRaw;
using test::TestCache;
using test::ValidHeader;

TestCache MakeCache(DType dtype, Layout layout, int64_t layers, int64_t kv_heads, int64_t group, int64_t tokens,
                    int64_t head_dim, int64_t q_tokens, bool precomputed, uint64_t seed) {
  return test::MakeTestCache({.dtype = dtype, .layout = layout, .layers = layers, .kv_heads = kv_heads, .group = group,
                              .tokens = tokens, .head_dim = head_dim, .q_tokens = q_tokens, .precomputed = precomputed,
                              .spread_step = 0.3, .seed = seed});
}

class ServerTest : public ::testing::Test {
 protected:
  void StartServer(ServerOptions o = {}) {
    o.listen = "127.0.0.1:0";
    o.backend = "cpu";
    absl::StatusOr<std::unique_ptr<MedakvServer>> s = MedakvServer::Start(o);
    ASSERT_TRUE(s.ok()) << s.status();
    server_ = *std::move(s);
    stub_ = v1::Medakv::NewStub(server_->InProcessChannel());
  }
  std::unique_ptr<v1::Medakv::Stub> TcpStub() {
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(64 << 20);
    return v1::Medakv::NewStub(grpc::CreateCustomChannel(absl::StrCat("127.0.0.1:", server_->port()),
                                                         grpc::InsecureChannelCredentials(), args));
  }
  int64_t HostUsedBytes() {
    grpc::ClientContext ctx;
    v1::StatsResponse r;
    EXPECT_TRUE(stub_->Stats(&ctx, v1::StatsRequest(), &r).ok());
    for (const auto& t : r.tiers()) {
      if (t.tier() == "host") return t.used_bytes();
    }
    return -1;
  }
  std::unique_ptr<MedakvServer> server_;
  std::unique_ptr<v1::Medakv::Stub> stub_;
};

// ---- Compress equals the library ---------------------------------------------------

struct CompressCase {
  DType dtype;
  Layout layout;
  PolicyKind policy;
  bool precomputed;
  int64_t chunk_bytes;
};

class CompressOverGrpcTest : public ServerTest, public ::testing::WithParamInterface<CompressCase> {};

TEST_P(CompressOverGrpcTest, EqualsLibraryBitForBit) {
  const CompressCase& p = GetParam();
  StartServer();
  TestCache c = MakeCache(p.dtype, p.layout, 3, 2, 2, 97, 16, 8, p.precomputed, 5);
  CompressOptions o = DefaultOptions(p.policy);
  o.budget.rho = 0.3;
  absl::StatusOr<CompressResult> want = Compress(c.input, o, *MakeCpuBackend());
  ASSERT_TRUE(want.ok()) << want.status();
  RemoteOptions r;
  r.chunk_bytes = p.chunk_bytes;
  absl::StatusOr<RemoteResult> got = CompressRemote(*stub_, c.input, o, r);
  ASSERT_TRUE(got.ok()) << got.status();
  ExpectSameResult(got->result, *want);
  EXPECT_EQ(got->summary.backend(), "cpu");
  EXPECT_GT(got->summary.bytes_in(), 0);
}

INSTANTIATE_TEST_SUITE_P(
    Cases, CompressOverGrpcTest,
    ::testing::Values(CompressCase{DType::kFloat16, Layout::kHND, PolicyKind::kMeda, false, 1 << 20},
                      CompressCase{DType::kBFloat16, Layout::kNHD, PolicyKind::kMeda, false, 1000},
                      CompressCase{DType::kFloat32, Layout::kHND, PolicyKind::kMeda, true, 777},
                      CompressCase{DType::kFloat16, Layout::kNHD, PolicyKind::kSnapKV, false, 4096},
                      CompressCase{DType::kFloat16, Layout::kHND, PolicyKind::kLookM, false, 1 << 20},
                      CompressCase{DType::kFloat32, Layout::kNHD, PolicyKind::kStreamingLlm, true, 1 << 20},
                      CompressCase{DType::kBFloat16, Layout::kHND, PolicyKind::kPyramidKV, false, 1 << 20},
                      CompressCase{DType::kFloat16, Layout::kHND, PolicyKind::kH2O, true, 1 << 20},
                      CompressCase{DType::kFloat16, Layout::kHND, PolicyKind::kFull, false, 1 << 20}),
    [](const auto& info) {
      const CompressCase& p = info.param;
      return absl::StrCat(test::DTypeTag(p.dtype), test::LayoutTag(p.layout), PolicyName(p.policy),
                          p.precomputed ? "Precomputed" : "Queries", "Chunk", p.chunk_bytes);
    });

TEST_F(ServerTest, CompressOverLoopbackTcp) {
  StartServer();
  TestCache c = MakeCache(DType::kFloat16, Layout::kHND, 4, 2, 4, 300, 32, 16, false, 9);
  const CompressOptions o;
  absl::StatusOr<CompressResult> want = Compress(c.input, o, *MakeCpuBackend());
  ASSERT_TRUE(want.ok());
  auto stub = TcpStub();
  RemoteOptions r;
  r.chunk_bytes = 10000;
  absl::StatusOr<RemoteResult> got = CompressRemote(*stub, c.input, o, r);
  ASSERT_TRUE(got.ok()) << got.status();
  ExpectSameResult(got->result, *want);
}

TEST_F(ServerTest, HealthServiceServes) {
  StartServer();
  auto health = grpc::health::v1::Health::NewStub(server_->InProcessChannel());
  grpc::ClientContext ctx;
  grpc::health::v1::HealthCheckResponse r;
  ASSERT_TRUE(health->Check(&ctx, grpc::health::v1::HealthCheckRequest(), &r).ok());
  EXPECT_EQ(r.status(), grpc::health::v1::HealthCheckResponse::SERVING);
}

TEST_F(ServerTest, StartFailsClearly) {
  ServerOptions o;
  o.backend = "tpu";
  EXPECT_EQ(MedakvServer::Start(o).status().code(), absl::StatusCode::kInvalidArgument);
  o.backend = "cpu";
  o.max_inflight = 0;
  EXPECT_EQ(MedakvServer::Start(o).status().code(), absl::StatusCode::kInvalidArgument);
  o.max_inflight = 1;
  o.listen = "not-an-address";
  EXPECT_EQ(MedakvServer::Start(o).status().code(), absl::StatusCode::kUnavailable);
}

// ---- malformed Compress streams -------------------------------------------------------

v1::CompressRequest Chunk(int32_t layer, v1::TensorKind kind, int64_t offset, int64_t bytes) {
  v1::CompressRequest req;
  v1::TensorChunk* c = req.mutable_chunk();
  c->set_layer(layer);
  c->set_tensor(kind);
  c->set_offset(offset);
  std::vector<float> v(bytes / 4, 0.5f);
  c->set_data(reinterpret_cast<const char*>(v.data()), bytes);
  return req;
}

TEST_F(ServerTest, MalformedCompressStreams) {
  ServerOptions o;
  o.max_request_bytes = 1 << 20;
  StartServer(o);
  const auto key = [](int64_t off, int64_t n) { return Chunk(0, v1::TENSOR_KIND_KEY, off, n); };
  const auto full = [&](v1::TensorKind k, int64_t n) { return Chunk(0, k, 0, n); };
  // A complete valid request: key, value 128 bytes, query 32 bytes.
  std::vector<v1::CompressRequest> valid = {ValidHeader(), full(v1::TENSOR_KIND_KEY, 128),
                                            full(v1::TENSOR_KIND_VALUE, 128), full(v1::TENSOR_KIND_QUERY, 32)};
  EXPECT_TRUE(SendRaw(*stub_, valid).ok());

  ExpectStatus(SendRaw(*stub_, {}), grpc::StatusCode::INVALID_ARGUMENT, "before the header");
  ExpectStatus(SendRaw(*stub_, {key(0, 16)}), grpc::StatusCode::INVALID_ARGUMENT, "first message must be a header");
  ExpectStatus(SendRaw(*stub_, {ValidHeader(), ValidHeader()}), grpc::StatusCode::INVALID_ARGUMENT, "second header");
  {
    auto h = ValidHeader();
    h.mutable_header()->mutable_shape()->set_kv_heads(0);
    ExpectStatus(SendRaw(*stub_, {h}), grpc::StatusCode::INVALID_ARGUMENT, "kv_heads");
  }
  {
    auto h = ValidHeader();
    h.mutable_header()->mutable_shape()->set_dtype(v1::DTYPE_UNSPECIFIED);
    ExpectStatus(SendRaw(*stub_, {h}), grpc::StatusCode::INVALID_ARGUMENT, "dtype");
  }
  {
    auto h = ValidHeader();
    h.mutable_header()->mutable_shape()->set_tokens(1 << 20);
    h.mutable_header()->mutable_shape()->set_head_dim(128);
    ExpectStatus(SendRaw(*stub_, {h}), grpc::StatusCode::RESOURCE_EXHAUSTED, "max_request_bytes");
  }
  {
    auto h = ValidHeader();
    h.mutable_header()->mutable_policy()->set_rho(2.0);
    ExpectStatus(SendRaw(*stub_, {h}), grpc::StatusCode::INVALID_ARGUMENT, "rho");
  }
  {
    auto h = ValidHeader();
    h.mutable_header()->set_stats(v1::STATS_FORM_NONE);
    h.mutable_header()->set_q_tokens(0);
    ExpectStatus(SendRaw(*stub_, {h}), grpc::StatusCode::INVALID_ARGUMENT, "stats");
  }
  ExpectStatus(SendRaw(*stub_, {ValidHeader(), key(16, 16)}), grpc::StatusCode::INVALID_ARGUMENT, "offset");
  ExpectStatus(SendRaw(*stub_, {ValidHeader(), key(0, 132)}), grpc::StatusCode::INVALID_ARGUMENT, "");
  ExpectStatus(SendRaw(*stub_, {ValidHeader(), Chunk(1, v1::TENSOR_KIND_KEY, 0, 16)}),
               grpc::StatusCode::INVALID_ARGUMENT, "layer");
  ExpectStatus(SendRaw(*stub_, {ValidHeader(), full(v1::TENSOR_KIND_SCORES, 32)}), grpc::StatusCode::INVALID_ARGUMENT,
               "");
  ExpectStatus(SendRaw(*stub_, {ValidHeader(), full(v1::TENSOR_KIND_KEY, 128), full(v1::TENSOR_KIND_KEY, 128)}),
               grpc::StatusCode::INVALID_ARGUMENT, "already");
  ExpectStatus(SendRaw(*stub_, {ValidHeader(), full(v1::TENSOR_KIND_KEY, 128), full(v1::TENSOR_KIND_VALUE, 128)}),
               grpc::StatusCode::INVALID_ARGUMENT, "query");
}

// ---- the cache store ------------------------------------------------------------------

// Uploads `c` under `id` (with its statistics) in chunks.
grpc::Status Put(v1::Medakv::Stub& stub, const TestCache& c, const std::string& id, bool overwrite = false,
                 int64_t chunk = 1000, bool cancel_midway = false, v1::CacheTier tier = v1::CACHE_TIER_AUTO,
                 v1::PutCacheResponse* out = nullptr) {
  grpc::ClientContext ctx;
  v1::PutCacheResponse local;
  v1::PutCacheResponse& response = out != nullptr ? *out : local;
  auto writer = stub.PutCache(&ctx, &response);
  v1::PutCacheRequest req;
  v1::PutCacheHeader* h = req.mutable_header();
  h->set_cache_id(id);
  h->set_overwrite(overwrite);
  const CacheSpec spec = *SpecFromInput(c.input);
  ToProto(spec, h);
  h->set_tier(tier);
  bool ok = writer->Write(req);
  auto send = [&](int32_t layer, v1::TensorKind kind, int64_t offset, const uint8_t* data, int64_t n) {
    req.Clear();
    auto* chunk_msg = req.mutable_chunk();
    chunk_msg->set_layer(layer);
    chunk_msg->set_tensor(kind);
    chunk_msg->set_offset(offset);
    chunk_msg->set_data(data, n);
    return writer->Write(req);
  };
  for (size_t l = 0; l < c.input.layers.size() && ok; ++l) {
    const LayerInput& in = c.input.layers[l];
    ok = SendTensor(l, v1::TENSOR_KIND_KEY, in.key.data, in.key.NumBytes(), chunk, send) &&
         SendTensor(l, v1::TENSOR_KIND_VALUE, in.value.data, in.value.NumBytes(), chunk, send);
    if (cancel_midway) {
      ctx.TryCancel();
      break;
    }
    ok = ok && SendTensor(l, v1::TENSOR_KIND_QUERY, in.query.data, in.query.NumBytes(), chunk, send);
  }
  if (ok) writer->WritesDone();
  return writer->Finish();
}

std::vector<v1::GetCacheResponse> Get(v1::Medakv::Stub& stub, const std::string& id, grpc::Status* status,
                                      int32_t begin = 0, int32_t end = 0) {
  grpc::ClientContext ctx;
  v1::GetCacheRequest req;
  req.set_cache_id(id);
  req.set_layer_begin(begin);
  req.set_layer_end(end);
  req.set_max_response_chunk_bytes(2048);
  auto reader = stub.GetCache(&ctx, req);
  std::vector<v1::GetCacheResponse> out;
  v1::GetCacheResponse r;
  while (reader->Read(&r)) out.push_back(r);
  *status = reader->Finish();
  return out;
}

// Reassembles layer l's key, value and positions from a GetCache stream.
struct Downloaded {
  std::string key, value, positions;
  int64_t budget = 0;
};
std::map<int32_t, Downloaded> Reassemble(const std::vector<v1::GetCacheResponse>& msgs) {
  std::map<int32_t, Downloaded> out;
  for (const auto& m : msgs) {
    if (m.has_layer()) out[m.layer().layer()].budget = m.layer().budget();
    if (m.has_chunk()) {
      Downloaded& d = out[m.chunk().layer()];
      std::string& t = m.chunk().tensor() == v1::TENSOR_KIND_KEY     ? d.key
                       : m.chunk().tensor() == v1::TENSOR_KIND_VALUE ? d.value
                                                                     : d.positions;
      EXPECT_EQ(static_cast<int64_t>(t.size()), m.chunk().offset());
      t += m.chunk().data();
    }
  }
  return out;
}

TEST_F(ServerTest, StoreRoundTripCompressInPlaceListStatsDelete) {
  StartServer();
  TestCache c = MakeCache(DType::kBFloat16, Layout::kNHD, 3, 2, 2, 120, 16, 6, false, 31);
  ASSERT_TRUE(Put(*stub_, c, "prompt/abc").ok());
  const int64_t used_after_put = HostUsedBytes();
  EXPECT_GT(used_after_put, 0);
  // Every byte comes back.
  grpc::Status st;
  std::vector<v1::GetCacheResponse> msgs = Get(*stub_, "prompt/abc", &st);
  ASSERT_TRUE(st.ok()) << st.error_message();
  ASSERT_TRUE(msgs[0].has_info());
  EXPECT_EQ(msgs[0].info().shape().tokens(), 120);
  EXPECT_FALSE(msgs[0].info().compressed());
  auto layers = Reassemble(msgs);
  ASSERT_EQ(layers.size(), 3u);
  for (int l = 0; l < 3; ++l) {
    const auto* k = static_cast<const char*>(c.keys[l].data());
    const auto* v = static_cast<const char*>(c.values[l].data());
    EXPECT_EQ(layers[l].key, std::string(k, c.keys[l].NumBytes()));
    EXPECT_EQ(layers[l].value, std::string(v, c.values[l].NumBytes()));
    EXPECT_EQ(layers[l].budget, 120);
  }
  // A layer range.
  EXPECT_EQ(Reassemble(Get(*stub_, "prompt/abc", &st, 1, 2)).size(), 1u);
  Get(*stub_, "prompt/abc", &st, 2, 5);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);

  // Compress in place equals the library on the same cache.
  CompressOptions o = DefaultOptions(PolicyKind::kMeda);
  o.budget.rho = 0.25;
  absl::StatusOr<CompressResult> want = Compress(c.input, o, *MakeCpuBackend());
  ASSERT_TRUE(want.ok());
  {
    grpc::ClientContext ctx;
    v1::CompressCacheRequest req;
    req.set_cache_id("prompt/abc");
    *req.mutable_policy() = PolicyToProto(o);
    v1::CompressCacheResponse resp;
    grpc::Status s = stub_->CompressCache(&ctx, req, &resp);
    ASSERT_TRUE(s.ok()) << s.error_message();
    EXPECT_TRUE(resp.info().compressed());
    EXPECT_EQ(resp.info().policy(), "meda");
    EXPECT_EQ(resp.summary().tokens_kept(), want->tokens_kept);
  }
  layers = Reassemble(Get(*stub_, "prompt/abc", &st));
  ASSERT_TRUE(st.ok());
  for (int l = 0; l < 3; ++l) {
    const LayerResult& w = want->layers[l];
    EXPECT_EQ(layers[l].budget, w.budget);
    EXPECT_EQ(layers[l].key, std::string(w.key.begin(), w.key.end())) << l;
    EXPECT_EQ(layers[l].value, std::string(w.value.begin(), w.value.end())) << l;
    EXPECT_EQ(layers[l].positions,
              std::string(reinterpret_cast<const char*>(w.positions.data()), w.positions.size() * 4));
  }
  EXPECT_LT(HostUsedBytes(), used_after_put);
  // Compressing twice is refused.
  {
    grpc::ClientContext ctx;
    v1::CompressCacheRequest req;
    req.set_cache_id("prompt/abc");
    v1::CompressCacheResponse resp;
    EXPECT_EQ(stub_->CompressCache(&ctx, req, &resp).error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  }
  // List and delete.
  ASSERT_TRUE(Put(*stub_, c, "prompt/def").ok());
  ASSERT_TRUE(Put(*stub_, c, "other").ok());
  {
    grpc::ClientContext ctx;
    v1::ListCachesRequest req;
    req.set_prefix("prompt/");
    v1::ListCachesResponse resp;
    ASSERT_TRUE(stub_->ListCaches(&ctx, req, &resp).ok());
    ASSERT_EQ(resp.caches_size(), 2);
    EXPECT_EQ(resp.caches(0).cache_id(), "prompt/abc");
    EXPECT_EQ(resp.caches(1).cache_id(), "prompt/def");
  }
  for (const char* id : {"prompt/abc", "prompt/def", "other"}) {
    grpc::ClientContext ctx;
    v1::DeleteCacheRequest req;
    req.set_cache_id(id);
    v1::DeleteCacheResponse resp;
    ASSERT_TRUE(stub_->DeleteCache(&ctx, req, &resp).ok());
    EXPECT_GT(resp.bytes_freed(), 0);
  }
  EXPECT_EQ(HostUsedBytes(), 0);
  Get(*stub_, "prompt/abc", &st);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::NOT_FOUND);
}

TEST_F(ServerTest, PutSemantics) {
  ServerOptions o;
  o.host_cache_bytes = 60000;
  StartServer(o);
  TestCache c = MakeCache(DType::kFloat16, Layout::kHND, 2, 2, 2, 100, 16, 4, false, 41);  // ~27 KB stored
  ASSERT_TRUE(Put(*stub_, c, "a").ok());
  ExpectStatus(Put(*stub_, c, "a"), grpc::StatusCode::ALREADY_EXISTS, "overwrite");
  EXPECT_TRUE(Put(*stub_, c, "a", /*overwrite=*/true).ok());
  ExpectStatus(Put(*stub_, c, "bad id!"), grpc::StatusCode::INVALID_ARGUMENT, "cache_id");
  // Too big for the whole tier.
  TestCache big = MakeCache(DType::kFloat32, Layout::kHND, 2, 2, 2, 400, 32, 4, false, 42);
  ExpectStatus(Put(*stub_, big, "big"), grpc::StatusCode::RESOURCE_EXHAUSTED, "");
  // LRU: a second entry evicts the first when both do not fit.
  ASSERT_TRUE(Put(*stub_, c, "b").ok());
  ASSERT_TRUE(Put(*stub_, c, "c").ok());
  grpc::Status st;
  Get(*stub_, "a", &st);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::NOT_FOUND) << "the least recently used entry is evicted";
  Get(*stub_, "c", &st);
  EXPECT_TRUE(st.ok());
}

// ---- the device tier (emulated device memory: the same paths as CUDA's) -----------------

class DeviceTierTest : public ServerTest {
 protected:
  void StartWithDevice(int64_t device_bytes, int64_t host_bytes = int64_t{1} << 30) {
    memory_ = MakeEmulatedDeviceMemory();
    ServerOptions o;
    o.host_cache_bytes = host_bytes;
    o.device_cache_bytes = device_bytes;
    o.device_memory = memory_;
    StartServer(o);
  }
  v1::TierStats Tier(const std::string& name) {
    grpc::ClientContext ctx;
    v1::StatsResponse r;
    EXPECT_TRUE(stub_->Stats(&ctx, v1::StatsRequest(), &r).ok());
    for (const auto& t : r.tiers()) {
      if (t.tier() == name) return t;
    }
    ADD_FAILURE() << "no " << name << " tier in Stats";
    return {};
  }
  // The device memory the tier's entries hold: their bytes less their
  // modality spans, which are host metadata (24 bytes each).
  int64_t DeviceTensorBytes() {
    grpc::ClientContext ctx;
    v1::ListCachesResponse r;
    EXPECT_TRUE(stub_->ListCaches(&ctx, v1::ListCachesRequest(), &r).ok());
    int64_t bytes = 0;
    for (const v1::CacheInfo& c : r.caches()) {
      if (c.tier() == "device") bytes += c.bytes() - 24 * c.shape().modality_size();
    }
    return bytes;
  }
  std::string PutTier(const TestCache& c, const std::string& id, v1::CacheTier tier) {
    v1::PutCacheResponse r;
    const grpc::Status s = Put(*stub_, c, id, false, 1000, false, tier, &r);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return r.info().tier();
  }
  std::shared_ptr<EmulatedDeviceMemory> memory_;
};

TEST_F(DeviceTierTest, PutGetCompressDeleteOnTheDeviceEqualTheHostTier) {
  StartWithDevice(int64_t{1} << 30);
  TestCache c = MakeCache(DType::kFloat16, Layout::kHND, 3, 2, 2, 90, 16, 5, false, 51);
  EXPECT_EQ(PutTier(c, "dev", v1::CACHE_TIER_AUTO), "device");  // auto prefers the device
  EXPECT_EQ(PutTier(c, "host", v1::CACHE_TIER_HOST), "host");
  const v1::TierStats device = Tier("device");
  EXPECT_EQ(device.entries(), 1);
  EXPECT_EQ(device.capacity_bytes(), int64_t{1} << 30);
  EXPECT_EQ(device.used_bytes(), Tier("host").used_bytes());
  // The query positions are host metadata; with the default (last rows) there are none.
  EXPECT_EQ(memory_->allocated_bytes(), DeviceTensorBytes());
  // Both downloads return the uploaded bytes, whole and as a range.
  grpc::Status st;
  for (const char* id : {"dev", "host"}) {
    auto layers = Reassemble(Get(*stub_, id, &st));
    ASSERT_TRUE(st.ok()) << st.error_message();
    ASSERT_EQ(layers.size(), 3u);
    for (int l = 0; l < 3; ++l) {
      EXPECT_EQ(layers[l].key, std::string(static_cast<const char*>(c.keys[l].data()), c.keys[l].NumBytes()));
      EXPECT_EQ(layers[l].value, std::string(static_cast<const char*>(c.values[l].data()), c.values[l].NumBytes()));
    }
  }
  auto range = Reassemble(Get(*stub_, "dev", &st, 1, 3));
  ASSERT_TRUE(st.ok());
  ASSERT_EQ(range.size(), 2u);
  EXPECT_EQ(range[2].value, std::string(static_cast<const char*>(c.values[2].data()), c.values[2].NumBytes()));
  // Compression in place: the same result on both tiers, and the device entry stays on the device.
  CompressOptions o = DefaultOptions(PolicyKind::kMeda);
  o.budget.rho = 0.3;
  for (const char* id : {"dev", "host"}) {
    grpc::ClientContext ctx;
    v1::CompressCacheRequest req;
    req.set_cache_id(id);
    *req.mutable_policy() = PolicyToProto(o);
    v1::CompressCacheResponse resp;
    const grpc::Status s = stub_->CompressCache(&ctx, req, &resp);
    ASSERT_TRUE(s.ok()) << s.error_message();
    EXPECT_EQ(resp.info().tier(), std::string(id) == "dev" ? "device" : "host");
  }
  auto on_device = Reassemble(Get(*stub_, "dev", &st));
  ASSERT_TRUE(st.ok());
  auto on_host = Reassemble(Get(*stub_, "host", &st));
  ASSERT_TRUE(st.ok());
  absl::StatusOr<CompressResult> want = Compress(c.input, o, *MakeCpuBackend());
  ASSERT_TRUE(want.ok());
  for (int l = 0; l < 3; ++l) {
    const LayerResult& w = want->layers[l];
    EXPECT_EQ(on_device[l].budget, w.budget);
    EXPECT_EQ(on_device[l].key, std::string(w.key.begin(), w.key.end())) << l;
    EXPECT_EQ(on_device[l].value, on_host[l].value) << l;
    EXPECT_EQ(on_device[l].positions, on_host[l].positions) << l;
  }
  EXPECT_EQ(Tier("device").used_bytes(), Tier("host").used_bytes());
  EXPECT_EQ(memory_->allocated_bytes(), DeviceTensorBytes());
  // Deleting frees the device memory.
  grpc::ClientContext ctx;
  v1::DeleteCacheRequest del;
  del.set_cache_id("dev");
  v1::DeleteCacheResponse freed;
  ASSERT_TRUE(stub_->DeleteCache(&ctx, del, &freed).ok());
  EXPECT_GT(freed.bytes_freed(), 0);
  EXPECT_EQ(memory_->allocated_bytes(), 0);
  EXPECT_EQ(Tier("device").used_bytes(), 0);
}

TEST_F(DeviceTierTest, AutoFallsBackToTheHostAndDeviceSaysWhyNot) {
  TestCache c = MakeCache(DType::kFloat16, Layout::kHND, 2, 2, 2, 100, 16, 4, false, 52);  // ~27 KB stored
  TestCache big = MakeCache(DType::kFloat32, Layout::kHND, 2, 2, 2, 400, 32, 4, false, 53);
  StartWithDevice(40000);
  EXPECT_EQ(PutTier(c, "a", v1::CACHE_TIER_AUTO), "device");
  EXPECT_EQ(PutTier(big, "big", v1::CACHE_TIER_AUTO), "host");  // larger than the whole device tier
  ExpectStatus(Put(*stub_, big, "big2", false, 1000, false, v1::CACHE_TIER_DEVICE),
               grpc::StatusCode::RESOURCE_EXHAUSTED, "device tier's capacity");
  // A second device entry evicts the first (LRU), as on the host tier.
  EXPECT_EQ(PutTier(c, "b", v1::CACHE_TIER_DEVICE), "device");
  grpc::Status st;
  Get(*stub_, "a", &st);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(Tier("device").evictions(), 1);
  EXPECT_EQ(memory_->allocated_bytes(), DeviceTensorBytes());
  ExpectStatus(Put(*stub_, c, "x", false, 1000, false, static_cast<v1::CacheTier>(7)),
               grpc::StatusCode::INVALID_ARGUMENT, "header.tier");
  EXPECT_EQ(memory_->allocated_bytes(), DeviceTensorBytes());
}

TEST_F(ServerTest, NoDeviceTierWithoutDeviceMemory) {
  // The CPU backend has no device memory: --device_cache_bytes is an error
  // when the CPU backend was asked for, and is ignored (and said) with auto.
  ServerOptions o;
  o.listen = "127.0.0.1:0";
  o.device_cache_bytes = 1 << 20;
  o.backend = "cpu";
  absl::Status s = MedakvServer::Start(o).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(s.message().find("--device_cache_bytes"), std::string::npos) << s;
  if (!cuda::Compiled() || cuda::DeviceCount() == 0) {
    o.backend = "auto";
    absl::StatusOr<std::unique_ptr<MedakvServer>> server = MedakvServer::Start(o);
    ASSERT_TRUE(server.ok()) << server.status();
    EXPECT_NE((*server)->backend_reason().find("no device tier"), std::string::npos) << (*server)->backend_reason();
    auto stub = v1::Medakv::NewStub((*server)->InProcessChannel());
    TestCache c = MakeCache(DType::kFloat16, Layout::kHND, 1, 1, 1, 16, 16, 2, false, 54);
    ExpectStatus(Put(*stub, c, "d", false, 1000, false, v1::CACHE_TIER_DEVICE), grpc::StatusCode::FAILED_PRECONDITION,
                 "no device tier");
    v1::PutCacheResponse r;
    ASSERT_TRUE(Put(*stub, c, "d", false, 1000, false, v1::CACHE_TIER_AUTO, &r).ok());
    EXPECT_EQ(r.info().tier(), "host");
    grpc::ClientContext ctx;
    v1::StatsResponse stats;
    ASSERT_TRUE(stub->Stats(&ctx, v1::StatsRequest(), &stats).ok());
    ASSERT_EQ(stats.tiers_size(), 1);  // no device tier is shown
    EXPECT_EQ(stats.tiers(0).tier(), "host");
  }
}

// Results stream as the layers are done: the first one arrives while most of
// the selection and merging is still ahead (without streaming it would come
// with the last, after all of it), and the result is still the library's.
TEST_F(ServerTest, ResultsStreamLayerByLayerAsTheyAreDone) {
  StartServer();
  TestCache c = MakeCache(DType::kFloat16, Layout::kHND, 8, 2, 2, 2048, 64, 8, false, 61);
  CompressOptions o = DefaultOptions(PolicyKind::kMeda);  // merging: select+merge dominates
  o.budget.rho = 0.2;
  absl::StatusOr<CompressResult> want = Compress(c.input, o, *MakeCpuBackend());
  ASSERT_TRUE(want.ok()) << want.status();
  RemoteOptions r;  // 4 MiB result chunks: the sending itself takes a few ms
  absl::Time first = absl::InfiniteFuture();
  r.progress = [&](Transfer direction, int64_t done, int64_t) {
    if (direction == Transfer::kDownload && done > 0 && first == absl::InfiniteFuture()) first = absl::Now();
  };
  absl::StatusOr<RemoteResult> got = CompressRemote(*stub_, c.input, o, r);
  const absl::Time end = absl::Now();
  ASSERT_TRUE(got.ok()) << got.status();
  ExpectSameResult(got->result, *want);
  const double select_merge = got->summary.times().select_merge_seconds();
  ASSERT_GT(select_merge, 0.0);
  // Layer 0 is done after about 1/8 of select+merge: 7/8 of it (and the
  // sending) is left when its bytes arrive. Half is a margin for load.
  EXPECT_GE(absl::ToDoubleSeconds(end - first), 0.5 * select_merge)
      << "the first result bytes came " << absl::ToDoubleSeconds(end - first) << " s before the end, select+merge took "
      << select_merge << " s";
}

TEST_F(ServerTest, CancelledUploadHoldsNoMemory) {
  StartServer();
  TestCache c = MakeCache(DType::kFloat16, Layout::kHND, 3, 2, 2, 200, 16, 4, false, 51);
  const grpc::Status s = Put(*stub_, c, "cancelled", false, 1000, /*cancel_midway=*/true);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::CANCELLED);
  // The server releases the reservation when the call ends; poll briefly.
  int64_t used = -1;
  for (int i = 0; i < 200 && used != 0; ++i) {
    used = HostUsedBytes();
    if (used != 0) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_EQ(used, 0);
  grpc::Status st;
  Get(*stub_, "cancelled", &st);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::NOT_FOUND);
}

TEST_F(ServerTest, SixteenClientsAtOnce) {
  ServerOptions o;
  o.max_inflight = 3;
  StartServer(o);
  TestCache c = MakeCache(DType::kFloat16, Layout::kHND, 2, 2, 2, 150, 16, 8, false, 61);
  const CompressOptions opts;
  absl::StatusOr<CompressResult> want = Compress(c.input, opts, *MakeCpuBackend());
  ASSERT_TRUE(want.ok());
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 16; ++t) {
    threads.emplace_back([&, t] {
      auto stub = t % 2 == 0 ? v1::Medakv::NewStub(server_->InProcessChannel()) : TcpStub();
      for (int i = 0; i < 3; ++i) {
        absl::StatusOr<RemoteResult> got = CompressRemote(*stub, c.input, opts);
        if (!got.ok() || got->result.layers[1].key != want->layers[1].key ||
            got->result.layers[0].positions != want->layers[0].positions) {
          ++failures;
        }
        const std::string id = absl::StrCat("client", t, "/", i);
        if (!Put(*stub, c, id).ok()) ++failures;
        grpc::Status st;
        auto layers = Reassemble(Get(*stub, id, &st));
        if (!st.ok() || layers[1].key != std::string(static_cast<const char*>(c.keys[1].data()), c.keys[1].NumBytes())) {
          ++failures;
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(failures.load(), 0);
}

// ---- policy presets (--policy_presets, docs/presets.md) -----------------------------

std::string WritePresets(const std::string& text) {
  static int n = 0;
  const std::string path = absl::StrCat(testing::TempDir(), "/server_presets_", getpid(), "_", n++, ".txtpb");
  std::ofstream(path) << text;
  return path;
}

constexpr char kServerPresets[] = R"pb(
preset { name: "soft" policy { rho: 0.1 meda { tau: 5 select { merge: MERGE_MODE_NONE } } } }
preset { name: "default" policy { rho: 0.25 h2o {} } }
)pb";

TEST_F(ServerTest, CompressWithAPresetEqualsTheLibraryWithItsOptions) {
  ServerOptions so;
  so.policy_presets = WritePresets(kServerPresets);
  StartServer(so);
  EXPECT_EQ(server_->presets(), 2u);
  TestCache c = MakeCache(DType::kFloat16, Layout::kHND, 3, 2, 2, 97, 16, 8, false, 7);
  CompressOptions soft = DefaultOptions(PolicyKind::kMeda);
  soft.budget.rho = 0.1;
  soft.budget.tau = 5;
  soft.merge = MergeMode::kNone;
  for (double rho : {0.0, 0.4}) {
    CompressOptions want_options = soft;
    if (rho > 0) want_options.budget.rho = rho;
    absl::StatusOr<CompressResult> want = Compress(c.input, want_options, *MakeCpuBackend());
    ASSERT_TRUE(want.ok()) << want.status();
    RemoteOptions r;
    r.preset = "soft";
    r.preset_rho = rho;
    absl::StatusOr<RemoteResult> got = CompressRemote(*stub_, c.input, CompressOptions{}, r);
    ASSERT_TRUE(got.ok()) << got.status();
    ExpectSameResult(got->result, *want);
    // The summary says what ran: the preset and every option.
    const v1::Policy& ran = got->summary.policy();
    EXPECT_EQ(ran.preset(), "soft");
    ASSERT_TRUE(ran.has_meda());
    EXPECT_EQ(ran.rho(), want_options.budget.rho);
    EXPECT_EQ(ran.meda().tau(), 5);
    EXPECT_EQ(ran.meda().select().merge(), v1::MERGE_MODE_NONE);
  }
  // Without a preset the summary names none, and carries the options too.
  CompressOptions h2o = DefaultOptions(PolicyKind::kH2O);
  absl::StatusOr<RemoteResult> plain = CompressRemote(*stub_, c.input, h2o);
  ASSERT_TRUE(plain.ok()) << plain.status();
  EXPECT_EQ(plain->summary.policy().preset(), "");
  EXPECT_TRUE(plain->summary.policy().has_h2o());
  EXPECT_EQ(plain->summary.policy().rho(), 0.2);
  // An unknown name, and a preset with a kind.
  RemoteOptions unknown;
  unknown.preset = "sharp";
  absl::StatusOr<RemoteResult> bad = CompressRemote(*stub_, c.input, CompressOptions{}, unknown);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(bad.status().message()).find("no such preset (this server has: soft, default)"),
            std::string::npos)
      << bad.status();
  v1::CompressRequest both = ValidHeader();
  both.mutable_header()->mutable_policy()->set_preset("soft");
  both.mutable_header()->mutable_policy()->mutable_h2o();
  ExpectStatus(SendRaw(*stub_, {both}), grpc::StatusCode::INVALID_ARGUMENT, "both set");
}

TEST_F(ServerTest, CompressCacheWithoutAPolicyUsesTheDefaultPreset) {
  ServerOptions so;
  so.policy_presets = WritePresets(kServerPresets);
  StartServer(so);
  TestCache c = MakeCache(DType::kFloat32, Layout::kNHD, 2, 2, 3, 64, 16, 6, false, 13);
  ASSERT_TRUE(Put(*stub_, c, "with-default").ok());
  CompressOptions h2o = DefaultOptions(PolicyKind::kH2O);
  h2o.budget.rho = 0.25;
  absl::StatusOr<CompressResult> want = Compress(c.input, h2o, *MakeCpuBackend());
  ASSERT_TRUE(want.ok()) << want.status();
  grpc::ClientContext ctx;
  v1::CompressCacheRequest req;
  req.set_cache_id("with-default");  // no policy at all
  v1::CompressCacheResponse resp;
  const grpc::Status s = stub_->CompressCache(&ctx, req, &resp);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(resp.summary().policy().preset(), "default");
  EXPECT_TRUE(resp.summary().policy().has_h2o());
  EXPECT_EQ(resp.summary().tokens_kept(), want->tokens_kept);
  ASSERT_EQ(resp.layers_size(), 2);
  for (int l = 0; l < 2; ++l) EXPECT_EQ(resp.layers(l).budget(), want->layers[l].budget);
}

TEST_F(ServerTest, StartFailsOnABadPresetsFile) {
  ServerOptions o;
  o.listen = "127.0.0.1:0";
  o.backend = "cpu";
  o.policy_presets = WritePresets("preset { name: \"a\" policy { h2o {} } }\npreset { name: \"a\" policy { h2o {} } }\n");
  absl::StatusOr<std::unique_ptr<MedakvServer>> s = MedakvServer::Start(o);
  EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(s.status().message()).find(":2: preset 2 ('a'): the name is used"), std::string::npos)
      << s.status();
  o.policy_presets = absl::StrCat(testing::TempDir(), "/no-such-presets-file.txtpb");
  EXPECT_EQ(MedakvServer::Start(o).status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace medakv
