// The shared-memory data plane: POSIX regions registered with a lease stream,
// tensors sent and received as refs into them. Results equal the byte path
// bit for bit; every ref is checked against its region; the lease's end
// unregisters the region while calls that use it still complete; a client
// that truncates its object gets an error, not a crashed server.
#include <fcntl.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <map>
#include <thread>

#include "absl/strings/str_cat.h"
#include "client/cpp/remote.h"
#include "kernels/common/device_memory.h"
#include "medakv/v1/medakv.grpc.pb.h"
#include "service/server/assembler.h"
#include "service/server/convert.h"
#include "service/server/server.h"
#include "service/server/shared_memory.h"
#include "tests/kernels/test_util.h"
#include "tests/service/grpc_test_util.h"
#include "tests/service/test_cache.h"

namespace medakv {
namespace {

using server::CallRegions;
using server::MedakvServer;
using server::ServerOptions;
using server::SharedMemoryRegistry;
using test::HostTensor;

// ---- helpers ------------------------------------------------------------------------

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

void ExpectStatus(const absl::Status& s, absl::StatusCode code, const std::string& fragment) {
  EXPECT_EQ(s.code(), code) << s;
  EXPECT_NE(s.message().find(fragment), std::string::npos) << "'" << fragment << "' not in: " << s.message();
}

std::unique_ptr<SharedMemoryRegion> NewRegion(int64_t size) {
  absl::StatusOr<std::unique_ptr<SharedMemoryRegion>> r = SharedMemoryRegion::Create(size);
  EXPECT_TRUE(r.ok()) << r.status();
  return r.ok() ? *std::move(r) : nullptr;
}

v1::SharedMemoryRef Ref(const std::string& region, int64_t offset, int64_t length) {
  v1::SharedMemoryRef r;
  r.set_region(region);
  r.set_offset(offset);
  r.set_length(length);
  return r;
}

v1::RegisterSharedMemoryRequest RegisterRequest(const std::string& region, const std::string& shm_name, int64_t size) {
  v1::RegisterSharedMemoryRequest r;
  r.set_region(region);
  r.set_shm_name(shm_name);
  r.set_size(size);
  return r;
}

class ShmTest : public ::testing::Test {
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
  std::unique_ptr<SharedMemoryLease> Lease(const SharedMemoryRegion& region, const std::string& name) {
    absl::StatusOr<std::unique_ptr<SharedMemoryLease>> l = SharedMemoryLease::Register(*stub_, region, name);
    EXPECT_TRUE(l.ok()) << l.status();
    return l.ok() ? *std::move(l) : nullptr;
  }
  // Registers with a raw lease stream and returns the status it ends with.
  grpc::Status RegisterRaw(const v1::RegisterSharedMemoryRequest& request) {
    grpc::ClientContext ctx;
    auto reader = stub_->RegisterSharedMemory(&ctx, request);
    v1::RegisterSharedMemoryResponse r;
    if (reader->Read(&r)) ctx.TryCancel();
    return reader->Finish();
  }
  int RegionsRegistered() {
    grpc::ClientContext ctx;
    v1::StatsResponse r;
    EXPECT_TRUE(stub_->Stats(&ctx, v1::StatsRequest(), &r).ok());
    return r.shared_memory_regions();
  }
  // Polls Stats until `n` regions are registered (the server unregisters on
  // its own thread after a lease ends).
  bool WaitForRegions(int n) {
    for (int i = 0; i < 500; ++i) {
      if (RegionsRegistered() == n) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return false;
  }
  std::unique_ptr<MedakvServer> server_;
  std::unique_ptr<v1::Medakv::Stub> stub_;
};

// ---- Compress through shared memory equals the byte path ---------------------------------

struct ShmCase {
  DType dtype;
  Layout layout;
  PolicyKind policy;
  bool precomputed;
  bool input, output;
};

class ShmCompressTest : public ShmTest, public ::testing::WithParamInterface<ShmCase> {};

TEST_P(ShmCompressTest, EqualsBytePathBitForBit) {
  const ShmCase& p = GetParam();
  StartServer();
  TestCache c = MakeCache(p.dtype, p.layout, 3, 2, 2, 97, 16, 8, p.precomputed, 5);
  CompressOptions o = DefaultOptions(p.policy);
  o.budget.rho = 0.3;
  absl::StatusOr<CompressResult> want = Compress(c.input, o, *MakeCpuBackend());
  ASSERT_TRUE(want.ok()) << want.status();
  absl::StatusOr<RemoteResult> bytes = CompressRemote(*stub_, c.input, o);
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  ExpectSameResult(bytes->result, *want);

  auto region = NewRegion(1 << 20);
  ASSERT_NE(region, nullptr);
  auto lease = Lease(*region, "worker-0");
  ASSERT_NE(lease, nullptr);
  RemoteOptions r;
  r.shared_memory = lease.get();
  r.shm_input = p.input;
  r.shm_output = p.output;
  r.response_chunk_bytes = 1024;  // the byte path's chunks; refs are one per tensor
  for (int repeat = 0; repeat < 2; ++repeat) {  // the region is reused
    absl::StatusOr<RemoteResult> got = CompressRemote(*stub_, c.input, o, r);
    ASSERT_TRUE(got.ok()) << got.status();
    ExpectSameResult(got->result, bytes->result);
    EXPECT_EQ(got->summary.bytes_in(), bytes->summary.bytes_in());
    EXPECT_EQ(got->summary.bytes_out(), bytes->summary.bytes_out());
    EXPECT_EQ(got->summary.tokens_kept(), bytes->summary.tokens_kept());
  }
}

INSTANTIATE_TEST_SUITE_P(
    Cases, ShmCompressTest,
    ::testing::Values(ShmCase{DType::kFloat16, Layout::kHND, PolicyKind::kMeda, false, true, false},
                      ShmCase{DType::kFloat16, Layout::kHND, PolicyKind::kMeda, false, false, true},
                      ShmCase{DType::kFloat16, Layout::kHND, PolicyKind::kMeda, false, true, true},
                      ShmCase{DType::kBFloat16, Layout::kNHD, PolicyKind::kSnapKV, false, true, true},
                      ShmCase{DType::kFloat32, Layout::kHND, PolicyKind::kH2O, true, true, true},
                      ShmCase{DType::kFloat32, Layout::kNHD, PolicyKind::kLookM, true, false, true}),
    [](const auto& info) {
      const ShmCase& p = info.param;
      return absl::StrCat(test::DTypeTag(p.dtype), test::LayoutTag(p.layout), PolicyName(p.policy),
                          p.precomputed ? "Precomputed" : "Queries", p.input ? "ShmIn" : "BytesIn",
                          p.output ? "ShmOut" : "BytesOut");
    });

TEST_F(ShmTest, OverLoopbackTcpAndWithQueryPositions) {
  StartServer();
  TestCache c = MakeCache(DType::kFloat16, Layout::kHND, 4, 2, 4, 300, 32, 16, false, 9);
  std::vector<std::vector<int32_t>> positions(4);
  for (size_t l = 0; l < 4; ++l) {
    for (int32_t i = 0; i < 16; ++i) positions[l].push_back(100 + 10 * i + static_cast<int32_t>(l));
    c.input.layers[l].query_positions = positions[l];
  }
  const CompressOptions o;
  absl::StatusOr<CompressResult> want = Compress(c.input, o, *MakeCpuBackend());
  ASSERT_TRUE(want.ok()) << want.status();
  auto stub = TcpStub();
  auto region = NewRegion(4 << 20);
  absl::StatusOr<std::unique_ptr<SharedMemoryLease>> lease = SharedMemoryLease::Register(*stub, *region, "tcp");
  ASSERT_TRUE(lease.ok()) << lease.status();
  RemoteOptions r;
  r.shared_memory = lease->get();
  absl::StatusOr<RemoteResult> got = CompressRemote(*stub, c.input, o, r);
  ASSERT_TRUE(got.ok()) << got.status();
  ExpectSameResult(got->result, *want);
}

TEST_F(ShmTest, ResultsComeAsRefsLaidOutConsecutively) {
  StartServer();
  TestCache c = MakeCache(DType::kFloat16, Layout::kHND, 2, 2, 2, 64, 8, 4, false, 3);
  CompressOptions o;
  o.budget.rho = 0.25;
  absl::StatusOr<CompressResult> want = Compress(c.input, o, *MakeCpuBackend());
  ASSERT_TRUE(want.ok());
  auto region = NewRegion(1 << 16);
  auto lease = Lease(*region, "out");
  grpc::ClientContext ctx;
  auto stream = stub_->Compress(&ctx);
  v1::CompressRequest req;
  const CacheSpec spec = *SpecFromInput(c.input);
  ToProto(spec, req.mutable_header());
  *req.mutable_header()->mutable_policy() = PolicyToProto(o);
  *req.mutable_header()->mutable_output() = Ref("out", 100, 60000);
  ASSERT_TRUE(stream->Write(req));
  for (int l = 0; l < 2; ++l) {
    const LayerInput& in = c.input.layers[l];
    for (auto [kind, t] : {std::pair{v1::TENSOR_KIND_KEY, in.key}, std::pair{v1::TENSOR_KIND_VALUE, in.value},
                           std::pair{v1::TENSOR_KIND_QUERY, in.query}}) {
      req.Clear();
      req.mutable_chunk()->set_layer(l);
      req.mutable_chunk()->set_tensor(kind);
      req.mutable_chunk()->set_data(t.data, t.NumBytes());
      ASSERT_TRUE(stream->Write(req));
    }
  }
  stream->WritesDone();
  v1::CompressResponse resp;
  int64_t next = 100;
  int refs = 0;
  while (stream->Read(&resp)) {
    if (!resp.has_chunk()) continue;
    const v1::TensorChunk& ch = resp.chunk();
    ASSERT_TRUE(ch.has_shm());
    EXPECT_EQ(ch.offset(), 0);
    EXPECT_EQ(ch.shm().region(), "out");
    EXPECT_EQ(ch.shm().offset(), next) << "tensors lie consecutively, layer by layer";
    const LayerResult& w = want->layers[ch.layer()];
    const std::string got(reinterpret_cast<const char*>(region->data()) + ch.shm().offset(), ch.shm().length());
    if (ch.tensor() == v1::TENSOR_KIND_KEY) {
      EXPECT_EQ(got, std::string(w.key.begin(), w.key.end()));
    } else if (ch.tensor() == v1::TENSOR_KIND_VALUE) {
      EXPECT_EQ(got, std::string(w.value.begin(), w.value.end()));
    } else {
      EXPECT_EQ(got, std::string(reinterpret_cast<const char*>(w.positions.data()), w.positions.size() * 4));
    }
    next += ch.shm().length();
    ++refs;
  }
  ASSERT_TRUE(stream->Finish().ok());
  EXPECT_EQ(refs, 6);
  EXPECT_EQ(region->data()[99], 0) << "nothing before the output area";
  EXPECT_EQ(region->data()[next], 0) << "nothing after the results";
}

// ---- the store through shared memory --------------------------------------------------------

// Uploads `c` (keys, values, queries) with every tensor as a ref into
// `region` (registered as `name`), placed from `base`.
grpc::Status PutViaShm(v1::Medakv::Stub& stub, const TestCache& c, const std::string& id,
                       const SharedMemoryRegion& region, const std::string& name, int64_t base = 0) {
  grpc::ClientContext ctx;
  v1::PutCacheResponse response;
  auto writer = stub.PutCache(&ctx, &response);
  v1::PutCacheRequest req;
  v1::PutCacheHeader* h = req.mutable_header();
  h->set_cache_id(id);
  const CacheSpec spec = *SpecFromInput(c.input);
  ToProto(spec, h);
  bool ok = writer->Write(req);
  int64_t at = base;
  for (size_t l = 0; l < c.input.layers.size() && ok; ++l) {
    const LayerInput& in = c.input.layers[l];
    for (auto [kind, t] : {std::pair{v1::TENSOR_KIND_KEY, in.key}, std::pair{v1::TENSOR_KIND_VALUE, in.value},
                           std::pair{v1::TENSOR_KIND_QUERY, in.query}}) {
      // Two refs per tensor: the chunk rules hold for refs too.
      const int64_t n = t.NumBytes(), half = n / 2;
      if (at + n <= region.size()) std::memcpy(region.data() + at, t.data, n);  // else: a ref past the end
      for (auto [off, len] : {std::pair{int64_t{0}, half}, std::pair{half, n - half}}) {
        req.Clear();
        v1::TensorChunk* ch = req.mutable_chunk();
        ch->set_layer(static_cast<int32_t>(l));
        ch->set_tensor(kind);
        ch->set_offset(off);
        *ch->mutable_shm() = Ref(name, at + off, len);
        ok = ok && writer->Write(req);
      }
      at += n;
    }
  }
  if (ok) writer->WritesDone();
  return writer->Finish();
}

struct Downloaded {
  std::string key, value, positions;
};

// GetCache, with the tensors as bytes or (output set) as refs read from `region`.
std::map<int32_t, Downloaded> GetAll(v1::Medakv::Stub& stub, const std::string& id, grpc::Status* status,
                                     const v1::SharedMemoryRef* output = nullptr,
                                     const SharedMemoryRegion* region = nullptr) {
  grpc::ClientContext ctx;
  v1::GetCacheRequest req;
  req.set_cache_id(id);
  req.set_max_response_chunk_bytes(2048);
  if (output != nullptr) *req.mutable_output() = *output;
  auto reader = stub.GetCache(&ctx, req);
  std::map<int32_t, Downloaded> out;
  v1::GetCacheResponse r;
  while (reader->Read(&r)) {
    if (!r.has_chunk()) continue;
    const v1::TensorChunk& ch = r.chunk();
    Downloaded& d = out[ch.layer()];
    std::string& t = ch.tensor() == v1::TENSOR_KIND_KEY ? d.key : ch.tensor() == v1::TENSOR_KIND_VALUE ? d.value : d.positions;
    EXPECT_EQ(static_cast<int64_t>(t.size()), ch.offset());
    if (ch.has_shm()) {
      EXPECT_NE(region, nullptr);
      EXPECT_EQ(ch.shm().region(), output->region());
      t.append(reinterpret_cast<const char*>(region->data()) + ch.shm().offset(), ch.shm().length());
    } else {
      t += ch.data();
    }
  }
  *status = reader->Finish();
  return out;
}

// On the host tier, and on the device tier (emulated device memory): a
// device entry is downloaded a layer at a time into messages, or all at once
// into the output area.
class ShmTierTest : public ShmTest, public ::testing::WithParamInterface<bool> {};

TEST_P(ShmTierTest, PutViaShmThenGetAsBytesAndViaShm) {
  const bool device = GetParam();
  ServerOptions options;
  if (device) {
    options.device_cache_bytes = int64_t{1} << 30;
    options.device_memory = MakeEmulatedDeviceMemory();
  }
  StartServer(options);
  TestCache c = MakeCache(DType::kBFloat16, Layout::kNHD, 3, 2, 2, 120, 16, 6, false, 31);
  auto input = NewRegion(1 << 20);
  auto output = NewRegion(1 << 20);
  auto in_lease = Lease(*input, "in");
  auto out_lease = Lease(*output, "out");
  ASSERT_TRUE(in_lease && out_lease);
  EXPECT_EQ(RegionsRegistered(), 2);
  const grpc::Status put = PutViaShm(*stub_, c, "prompt/shm", *input, "in", 64);
  ASSERT_TRUE(put.ok()) << put.error_message();
  {
    grpc::ClientContext ctx;
    v1::ListCachesResponse list;
    ASSERT_TRUE(stub_->ListCaches(&ctx, v1::ListCachesRequest(), &list).ok());
    ASSERT_EQ(list.caches_size(), 1);
    EXPECT_EQ(list.caches(0).tier(), device ? "device" : "host");
  }

  grpc::Status st;
  std::map<int32_t, Downloaded> bytes = GetAll(*stub_, "prompt/shm", &st);
  ASSERT_TRUE(st.ok()) << st.error_message();
  ASSERT_EQ(bytes.size(), 3u);
  for (int l = 0; l < 3; ++l) {
    EXPECT_EQ(bytes[l].key, std::string(static_cast<const char*>(c.keys[l].data()), c.keys[l].NumBytes()));
    EXPECT_EQ(bytes[l].value, std::string(static_cast<const char*>(c.values[l].data()), c.values[l].NumBytes()));
  }
  const v1::SharedMemoryRef area = Ref("out", 4096, (1 << 20) - 4096);
  std::map<int32_t, Downloaded> shm = GetAll(*stub_, "prompt/shm", &st, &area, output.get());
  ASSERT_TRUE(st.ok()) << st.error_message();
  ASSERT_EQ(shm.size(), 3u);
  for (int l = 0; l < 3; ++l) {
    EXPECT_EQ(shm[l].key, bytes[l].key) << l;
    EXPECT_EQ(shm[l].value, bytes[l].value) << l;
    EXPECT_EQ(shm[l].positions, bytes[l].positions) << l;
  }

  // And a compressed entry (CompressCache with the stored queries) the same way.
  CompressOptions o;
  o.budget.rho = 0.25;
  {
    grpc::ClientContext ctx;
    v1::CompressCacheRequest req;
    req.set_cache_id("prompt/shm");
    *req.mutable_policy() = PolicyToProto(o);
    v1::CompressCacheResponse resp;
    ASSERT_TRUE(stub_->CompressCache(&ctx, req, &resp).ok());
  }
  absl::StatusOr<CompressResult> want = Compress(c.input, o, *MakeCpuBackend());
  ASSERT_TRUE(want.ok());
  shm = GetAll(*stub_, "prompt/shm", &st, &area, output.get());
  ASSERT_TRUE(st.ok()) << st.error_message();
  for (int l = 0; l < 3; ++l) {
    const LayerResult& w = want->layers[l];
    EXPECT_EQ(shm[l].key, std::string(w.key.begin(), w.key.end())) << l;
    EXPECT_EQ(shm[l].value, std::string(w.value.begin(), w.value.end())) << l;
    EXPECT_EQ(shm[l].positions, std::string(reinterpret_cast<const char*>(w.positions.data()), w.positions.size() * 4));
  }
}

INSTANTIATE_TEST_SUITE_P(Tiers, ShmTierTest, ::testing::Values(false, true),
                         [](const ::testing::TestParamInfo<bool>& i) { return i.param ? "Device" : "Host"; });

TEST_F(ShmTest, OutputAreaTooSmallIsResourceExhaustedBeforeAnyWrite) {
  StartServer();
  TestCache c = MakeCache(DType::kFloat16, Layout::kHND, 2, 2, 2, 100, 16, 4, false, 41);
  CompressOptions o;
  o.budget.rho = 0.5;
  absl::StatusOr<CompressResult> want = Compress(c.input, o, *MakeCpuBackend());
  ASSERT_TRUE(want.ok());
  int64_t needed = 0;
  for (const LayerResult& l : want->layers) {
    needed += static_cast<int64_t>(l.key.size() + l.value.size() + l.positions.size() * 4);
  }
  auto region = NewRegion(1 << 20);
  std::memset(region->data(), 0xAB, 1 << 20);
  auto lease = Lease(*region, "small");

  // Compress: a raw stream with an output area one byte short.
  auto compress = [&](int64_t length) {
    grpc::ClientContext ctx;
    auto stream = stub_->Compress(&ctx);
    v1::CompressRequest req;
    const CacheSpec spec = *SpecFromInput(c.input);
    ToProto(spec, req.mutable_header());
    *req.mutable_header()->mutable_policy() = PolicyToProto(o);
    *req.mutable_header()->mutable_output() = Ref("small", 0, length);
    stream->Write(req);
    for (int l = 0; l < 2; ++l) {
      const LayerInput& in = c.input.layers[l];
      for (auto [kind, t] : {std::pair{v1::TENSOR_KIND_KEY, in.key}, std::pair{v1::TENSOR_KIND_VALUE, in.value},
                             std::pair{v1::TENSOR_KIND_QUERY, in.query}}) {
        req.Clear();
        req.mutable_chunk()->set_layer(l);
        req.mutable_chunk()->set_tensor(kind);
        req.mutable_chunk()->set_data(t.data, t.NumBytes());
        stream->Write(req);
      }
    }
    stream->WritesDone();
    v1::CompressResponse resp;
    int messages = 0;
    while (stream->Read(&resp)) ++messages;
    const grpc::Status status = stream->Finish();
    if (!status.ok()) {
      EXPECT_EQ(messages, 0) << "a failed call sends nothing";
    }
    return status;
  };
  ExpectStatus(compress(needed - 1), grpc::StatusCode::RESOURCE_EXHAUSTED, absl::StrCat("need ", needed, " bytes"));
  ExpectStatus(compress(needed - 1), grpc::StatusCode::RESOURCE_EXHAUSTED, "header.output");
  for (int64_t i = 0; i < (1 << 20); ++i) {
    ASSERT_EQ(region->data()[i], 0xAB) << "byte " << i << " was written";
  }
  EXPECT_TRUE(compress(needed).ok()) << "exactly the size needed fits";

  // The client helper: a region with room for the input but not the results.
  const int64_t input_bytes = 2 * (c.keys[0].NumBytes() + c.values[0].NumBytes() + c.queries[0].NumBytes());
  auto tight = NewRegion(input_bytes + 256);
  auto tight_lease = Lease(*tight, "tight");
  RemoteOptions r;
  r.shared_memory = tight_lease.get();
  ExpectStatus(CompressRemote(*stub_, c.input, o, r).status(), absl::StatusCode::kResourceExhausted, "need");
  r.shm_output = false;  // input only: fits
  EXPECT_TRUE(CompressRemote(*stub_, c.input, o, r).ok());
  auto tiny = NewRegion(1000);
  auto tiny_lease = Lease(*tiny, "tiny");
  r.shared_memory = tiny_lease.get();
  ExpectStatus(CompressRemote(*stub_, c.input, o, r).status(), absl::StatusCode::kResourceExhausted,
               "the input needs");

  // GetCache likewise.
  TestCache stored = MakeCache(DType::kFloat16, Layout::kHND, 2, 2, 2, 100, 16, 4, false, 42);
  ASSERT_TRUE(PutViaShm(*stub_, stored, "stored", *region, "small").ok());
  std::memset(region->data(), 0xAB, 1 << 20);
  const int64_t stored_bytes = 2 * (2 * stored.keys[0].NumBytes() + 2 * 100 * 4);
  grpc::Status st;
  v1::SharedMemoryRef area = Ref("small", 10, stored_bytes - 1);
  GetAll(*stub_, "stored", &st, &area, region.get());
  ExpectStatus(st, grpc::StatusCode::RESOURCE_EXHAUSTED, absl::StrCat("need ", stored_bytes, " bytes"));
  for (int64_t i = 0; i < (1 << 20); ++i) {
    ASSERT_EQ(region->data()[i], 0xAB) << "byte " << i << " was written";
  }
  area.set_length(stored_bytes);
  GetAll(*stub_, "stored", &st, &area, region.get());
  EXPECT_TRUE(st.ok()) << st.error_message();
}

// ---- invalid refs ---------------------------------------------------------------------------

v1::CompressRequest ShmChunk(v1::TensorKind kind, int64_t offset, const v1::SharedMemoryRef& ref,
                             int32_t layer = 0) {
  v1::CompressRequest req;
  v1::TensorChunk* c = req.mutable_chunk();
  c->set_layer(layer);
  c->set_tensor(kind);
  c->set_offset(offset);
  *c->mutable_shm() = ref;
  return req;
}

TEST_F(ShmTest, EveryInvalidRefIsRejectedNamingTheField) {
  StartServer();
  auto region = NewRegion(4096);
  auto lease = Lease(*region, "r");
  const float half = 0.5f;
  for (int i = 0; i < 1024; ++i) std::memcpy(region->data() + 4 * i, &half, 4);
  const auto key = [](const v1::SharedMemoryRef& ref) { return ShmChunk(v1::TENSOR_KIND_KEY, 0, ref); };
  // Valid: key [0, 128), value [128, 256), query [256, 288) of the region.
  const std::vector<v1::CompressRequest> valid = {ValidHeader(), key(Ref("r", 0, 128)),
                                                  ShmChunk(v1::TENSOR_KIND_VALUE, 0, Ref("r", 128, 128)),
                                                  ShmChunk(v1::TENSOR_KIND_QUERY, 0, Ref("r", 256, 32))};
  EXPECT_TRUE(SendRaw(*stub_, valid).ok());
  {
    auto with_output = valid;
    *with_output[0].mutable_header()->mutable_output() = Ref("r", 1024, 3072);
    EXPECT_TRUE(SendRaw(*stub_, with_output).ok());
  }

  ExpectStatus(SendRaw(*stub_, {ValidHeader(), key(Ref("nope", 0, 128))}), grpc::StatusCode::NOT_FOUND,
               "chunk.shm.region 'nope' is not a registered");
  ExpectStatus(SendRaw(*stub_, {ValidHeader(), key(Ref("", 0, 128))}), grpc::StatusCode::NOT_FOUND,
               "chunk.shm.region");
  ExpectStatus(SendRaw(*stub_, {ValidHeader(), key(Ref("r", -1, 128))}), grpc::StatusCode::INVALID_ARGUMENT,
               "chunk.shm.offset must be >= 0, got -1");
  ExpectStatus(SendRaw(*stub_, {ValidHeader(), key(Ref("r", 0, 0))}), grpc::StatusCode::INVALID_ARGUMENT,
               "chunk.shm.length must be > 0, got 0");
  ExpectStatus(SendRaw(*stub_, {ValidHeader(), key(Ref("r", 0, -5))}), grpc::StatusCode::INVALID_ARGUMENT,
               "chunk.shm.length must be > 0");
  ExpectStatus(SendRaw(*stub_, {ValidHeader(), key(Ref("r", 4000, 128))}), grpc::StatusCode::INVALID_ARGUMENT,
               "chunk.shm.offset 4000 + chunk.shm.length 128 runs past the end of region 'r' (4096 bytes)");
  ExpectStatus(SendRaw(*stub_, {ValidHeader(), key(Ref("r", 4097, 1))}), grpc::StatusCode::INVALID_ARGUMENT,
               "past the end");
  ExpectStatus(SendRaw(*stub_, {ValidHeader(), key(Ref("r", 8, INT64_MAX))}), grpc::StatusCode::INVALID_ARGUMENT,
               "past the end");  // offset + length overflows int64
  ExpectStatus(SendRaw(*stub_, {ValidHeader(), key(Ref("r", INT64_MAX, INT64_MAX))}),
               grpc::StatusCode::INVALID_ARGUMENT, "past the end");
  // In the region, but against the chunk rules of the tensor.
  ExpectStatus(SendRaw(*stub_, {ValidHeader(), key(Ref("r", 0, 132))}), grpc::StatusCode::INVALID_ARGUMENT,
               "runs past the tensor's end (128 bytes)");
  ExpectStatus(SendRaw(*stub_, {ValidHeader(), ShmChunk(v1::TENSOR_KIND_KEY, 16, Ref("r", 0, 16))}),
               grpc::StatusCode::INVALID_ARGUMENT, "expected offset 0");
  ExpectStatus(SendRaw(*stub_, {ValidHeader(), key(Ref("r", 0, 128)), key(Ref("r", 0, 128))}),
               grpc::StatusCode::INVALID_ARGUMENT, "already received");
  // The output area.
  const auto with_output = [&](const v1::SharedMemoryRef& ref) {
    v1::CompressRequest h = ValidHeader();
    *h.mutable_header()->mutable_output() = ref;
    return h;
  };
  ExpectStatus(SendRaw(*stub_, {with_output(Ref("nope", 0, 10))}), grpc::StatusCode::NOT_FOUND,
               "header.output.region 'nope'");
  ExpectStatus(SendRaw(*stub_, {with_output(Ref("r", -8, 10))}), grpc::StatusCode::INVALID_ARGUMENT,
               "header.output.offset must be >= 0");
  ExpectStatus(SendRaw(*stub_, {with_output(Ref("r", 0, 0))}), grpc::StatusCode::INVALID_ARGUMENT,
               "header.output.length must be > 0");
  ExpectStatus(SendRaw(*stub_, {with_output(Ref("r", 1, 4096))}), grpc::StatusCode::INVALID_ARGUMENT,
               "header.output.offset 1 + header.output.length 4096 runs past the end");
  ExpectStatus(SendRaw(*stub_, {with_output(Ref("r", 2, INT64_MAX - 1))}), grpc::StatusCode::INVALID_ARGUMENT,
               "past the end");
  // GetCache's output area is checked before the cache is looked up.
  grpc::Status st;
  v1::SharedMemoryRef bad = Ref("r", 0, 4097);
  GetAll(*stub_, "no-such-cache", &st, &bad, region.get());
  ExpectStatus(st, grpc::StatusCode::INVALID_ARGUMENT, "output.offset 0 + output.length 4097");
  bad = Ref("zzz", 0, 1);
  GetAll(*stub_, "no-such-cache", &st, &bad, region.get());
  ExpectStatus(st, grpc::StatusCode::NOT_FOUND, "output.region 'zzz'");
  // PutCache refs go through the same checks.
  TestCache c = MakeCache(DType::kFloat32, Layout::kHND, 1, 1, 1, 8, 4, 2, false, 1);
  ExpectStatus(PutViaShm(*stub_, c, "x", *region, "r", /*base=*/4000), grpc::StatusCode::INVALID_ARGUMENT,
               "past the end of region 'r'");
  ExpectStatus(PutViaShm(*stub_, c, "x", *region, "unknown"), grpc::StatusCode::NOT_FOUND, "chunk.shm.region");
}

// ---- registration -----------------------------------------------------------------------------

TEST_F(ShmTest, RegisterErrors) {
  ServerOptions o;
  o.max_shm_regions = 3;
  o.max_shm_bytes = 3 << 20;
  StartServer(o);
  auto region = NewRegion(1 << 20);
  const std::string name = region->shm_name();
  ExpectStatus(RegisterRaw(RegisterRequest("", name, 4096)), grpc::StatusCode::INVALID_ARGUMENT, "region must be");
  ExpectStatus(RegisterRaw(RegisterRequest("bad name!", name, 4096)), grpc::StatusCode::INVALID_ARGUMENT,
               "region 'bad name!': byte 3");
  ExpectStatus(RegisterRaw(RegisterRequest(std::string(257, 'a'), name, 4096)), grpc::StatusCode::INVALID_ARGUMENT,
               "region must be 1-256 bytes");
  const std::vector<std::string> bad_names = {"", "/", "no-slash", "/a/b", "/.", "/..", "/" + std::string(255, 'x')};
  for (const std::string& bad : bad_names) {
    ExpectStatus(RegisterRaw(RegisterRequest("r", bad, 4096)), grpc::StatusCode::INVALID_ARGUMENT, "shm_name");
  }
  ExpectStatus(RegisterRaw(RegisterRequest("r", "/medakv-test-no-such-object", 4096)), grpc::StatusCode::NOT_FOUND,
               "shm_name '/medakv-test-no-such-object'");
  ExpectStatus(RegisterRaw(RegisterRequest("r", name, 0)), grpc::StatusCode::INVALID_ARGUMENT, "size must be > 0");
  ExpectStatus(RegisterRaw(RegisterRequest("r", name, -1)), grpc::StatusCode::INVALID_ARGUMENT, "size must be > 0");
  ExpectStatus(RegisterRaw(RegisterRequest("r", name, (1 << 20) + 1)), grpc::StatusCode::INVALID_ARGUMENT,
               "is larger than the shared-memory object");
  EXPECT_EQ(RegionsRegistered(), 0) << "failed registrations leave nothing behind";

  // A smaller size than the object is fine; a name is unique per server.
  auto a = SharedMemoryLease::Register(*stub_, *region, "a");
  ASSERT_TRUE(a.ok()) << a.status();
  ExpectStatus(RegisterRaw(RegisterRequest("a", name, 4096)), grpc::StatusCode::ALREADY_EXISTS,
               "region 'a' is registered already");
  auto b = SharedMemoryLease::Register(*stub_, *region, "b");  // the same object under a second name
  ASSERT_TRUE(b.ok()) << b.status();
  // Over --max_shm_bytes: 2 MiB registered, 1 MiB + 1 more would pass 3 MiB.
  auto big = NewRegion((1 << 20) + 1);
  ExpectStatus(RegisterRaw(RegisterRequest("c", big->shm_name(), (1 << 20) + 1)), grpc::StatusCode::RESOURCE_EXHAUSTED,
               "--max_shm_bytes=3145728");
  auto c = SharedMemoryLease::Register(*stub_, *region, "c");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(RegionsRegistered(), 3);
  // Over --max_shm_regions (checked before the bytes).
  auto small = NewRegion(16);
  ExpectStatus(RegisterRaw(RegisterRequest("d", small->shm_name(), 16)), grpc::StatusCode::RESOURCE_EXHAUSTED,
               "--max_shm_regions=3");
  // The client helper returns the server's error.
  ExpectStatus(SharedMemoryLease::Register(*stub_, *region, "a").status(), absl::StatusCode::kAlreadyExists,
               "registered already");
  // Releasing one makes room again.
  ASSERT_TRUE((*a)->Release().ok());
  EXPECT_TRUE((*a)->ended());
  EXPECT_TRUE((*a)->end_status().ok()) << (*a)->end_status();
  auto d = SharedMemoryLease::Register(*stub_, *small, "d");
  EXPECT_TRUE(d.ok()) << d.status();
}

TEST_F(ShmTest, ZeroRegionsDisablesTheDataPlane) {
  ServerOptions o;
  o.max_shm_regions = 0;
  StartServer(o);
  auto region = NewRegion(4096);
  ExpectStatus(RegisterRaw(RegisterRequest("r", region->shm_name(), 4096)), grpc::StatusCode::RESOURCE_EXHAUSTED,
               "--max_shm_regions=0");
  ServerOptions bad;
  bad.max_shm_regions = -1;
  bad.backend = "cpu";
  EXPECT_EQ(MedakvServer::Start(bad).status().code(), absl::StatusCode::kInvalidArgument);
}

// ---- the lease ---------------------------------------------------------------------------------

TEST_F(ShmTest, UnregisterEndsTheLeaseStreamOk) {
  StartServer();
  auto region = NewRegion(4096);
  grpc::ClientContext ctx;
  auto reader = stub_->RegisterSharedMemory(&ctx, RegisterRequest("r", region->shm_name(), 4096));
  v1::RegisterSharedMemoryResponse response;
  ASSERT_TRUE(reader->Read(&response));
  EXPECT_EQ(response.region(), "r");
  EXPECT_EQ(response.shm_name(), region->shm_name());
  EXPECT_EQ(response.size(), 4096);
  EXPECT_EQ(RegionsRegistered(), 1);
  {
    grpc::ClientContext uctx;
    v1::UnregisterSharedMemoryRequest req;
    req.set_region("r");
    v1::UnregisterSharedMemoryResponse resp;
    ASSERT_TRUE(stub_->UnregisterSharedMemory(&uctx, req, &resp).ok());
  }
  EXPECT_FALSE(reader->Read(&response));
  EXPECT_TRUE(reader->Finish().ok());
  EXPECT_EQ(RegionsRegistered(), 0);
  {
    grpc::ClientContext uctx;
    v1::UnregisterSharedMemoryRequest req;
    req.set_region("r");
    v1::UnregisterSharedMemoryResponse resp;
    ExpectStatus(stub_->UnregisterSharedMemory(&uctx, req, &resp), grpc::StatusCode::NOT_FOUND, "'r'");
  }
  // The name is free again.
  auto again = Lease(*region, "r");
  EXPECT_NE(again, nullptr);
}

TEST_F(ShmTest, CancellingTheLeaseUnregistersWhileAHoldingCallCompletes) {
  StartServer();
  TestCache c = MakeCache(DType::kFloat16, Layout::kHND, 3, 2, 2, 128, 16, 8, false, 77);
  const CompressOptions o;
  absl::StatusOr<CompressResult> want = Compress(c.input, o, *MakeCpuBackend());
  ASSERT_TRUE(want.ok());
  auto region = NewRegion(1 << 20);
  auto lease = Lease(*region, "held");
  ASSERT_NE(lease, nullptr);

  // A call that reads its input from and writes its results to the region:
  // everything sent, and the first response read (the call holds the region).
  grpc::ClientContext ctx;
  auto stream = stub_->Compress(&ctx);
  v1::CompressRequest req;
  const CacheSpec spec = *SpecFromInput(c.input);
  ToProto(spec, req.mutable_header());
  *req.mutable_header()->mutable_policy() = PolicyToProto(o);
  *req.mutable_header()->mutable_output() = Ref("held", 512 << 10, 512 << 10);
  ASSERT_TRUE(stream->Write(req));
  int64_t at = 0;
  for (int l = 0; l < 3; ++l) {
    const LayerInput& in = c.input.layers[l];
    for (auto [kind, t] : {std::pair{v1::TENSOR_KIND_KEY, in.key}, std::pair{v1::TENSOR_KIND_VALUE, in.value},
                           std::pair{v1::TENSOR_KIND_QUERY, in.query}}) {
      std::memcpy(region->data() + at, t.data, t.NumBytes());
      ASSERT_TRUE(stream->Write(ShmChunk(kind, 0, Ref("held", at, t.NumBytes()), l)));
      at += t.NumBytes();
    }
  }
  ASSERT_TRUE(stream->WritesDone());
  v1::CompressResponse resp;
  ASSERT_TRUE(stream->Read(&resp));
  ASSERT_TRUE(resp.has_layer());

  // The lease ends (the client object goes away): the region is unregistered now ...
  lease.reset();
  ASSERT_TRUE(WaitForRegions(0));
  ExpectStatus(SendRaw(*stub_, {ValidHeader(), ShmChunk(v1::TENSOR_KIND_KEY, 0, Ref("held", 0, 128))}),
               grpc::StatusCode::NOT_FOUND, "chunk.shm.region 'held' is not a registered shared-memory region");
  // ... and the call that holds it still completes, its refs readable.
  CompressResult got;
  got.layers.resize(3);
  bool summary = false;
  do {
    if (resp.has_layer()) got.layers[resp.layer().layer()].budget = resp.layer().budget();
    if (resp.has_chunk()) {
      const v1::TensorChunk& ch = resp.chunk();
      ASSERT_TRUE(ch.has_shm());
      const uint8_t* p = region->data() + ch.shm().offset();
      LayerResult& r = got.layers[ch.layer()];
      if (ch.tensor() == v1::TENSOR_KIND_KEY) r.key.assign(p, p + ch.shm().length());
      if (ch.tensor() == v1::TENSOR_KIND_VALUE) r.value.assign(p, p + ch.shm().length());
      if (ch.tensor() == v1::TENSOR_KIND_POSITIONS) {
        r.positions.resize(ch.shm().length() / 4);
        std::memcpy(r.positions.data(), p, ch.shm().length());
      }
    }
    summary = summary || resp.has_summary();
  } while (stream->Read(&resp));
  const grpc::Status st = stream->Finish();
  ASSERT_TRUE(st.ok()) << st.error_message();
  EXPECT_TRUE(summary);
  for (int l = 0; l < 3; ++l) {
    EXPECT_EQ(got.layers[l].budget, want->layers[l].budget);
    EXPECT_EQ(got.layers[l].key, want->layers[l].key) << l;
    EXPECT_EQ(got.layers[l].value, want->layers[l].value) << l;
    EXPECT_EQ(got.layers[l].positions, want->layers[l].positions) << l;
  }
}

TEST_F(ShmTest, ACallKeepsReadingARegionReleasedAfterItsFirstRef) {
  StartServer();
  TestCache c = MakeCache(DType::kFloat32, Layout::kNHD, 2, 2, 2, 96, 8, 4, false, 78);
  const CompressOptions o;
  absl::StatusOr<CompressResult> want = Compress(c.input, o, *MakeCpuBackend());
  ASSERT_TRUE(want.ok());
  auto region = NewRegion(1 << 20);
  auto lease = Lease(*region, "released");
  ASSERT_NE(lease, nullptr);
  std::vector<v1::CompressRequest> chunks;
  int64_t at = 0;
  for (int l = 0; l < 2; ++l) {
    const LayerInput& in = c.input.layers[l];
    for (auto [kind, t] : {std::pair{v1::TENSOR_KIND_KEY, in.key}, std::pair{v1::TENSOR_KIND_VALUE, in.value},
                           std::pair{v1::TENSOR_KIND_QUERY, in.query}}) {
      std::memcpy(region->data() + at, t.data, t.NumBytes());
      chunks.push_back(ShmChunk(kind, 0, Ref("released", at, t.NumBytes()), l));
      at += t.NumBytes();
    }
  }
  grpc::ClientContext ctx;
  auto stream = stub_->Compress(&ctx);
  v1::CompressRequest header;
  const CacheSpec spec = *SpecFromInput(c.input);
  ToProto(spec, header.mutable_header());
  *header.mutable_header()->mutable_policy() = PolicyToProto(o);
  ASSERT_TRUE(stream->Write(header));
  ASSERT_TRUE(stream->Write(chunks[0]));
  // Time for the server to read the first ref (the call then holds the
  // region); nothing in the API tells the client when it has.
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  ASSERT_TRUE(lease->Release().ok());
  EXPECT_EQ(RegionsRegistered(), 0);
  for (size_t i = 1; i < chunks.size(); ++i) ASSERT_TRUE(stream->Write(chunks[i]));
  ASSERT_TRUE(stream->WritesDone());
  std::map<std::pair<int32_t, int>, std::string> got;
  v1::CompressResponse resp;
  while (stream->Read(&resp)) {
    if (resp.has_chunk()) got[{resp.chunk().layer(), resp.chunk().tensor()}] += resp.chunk().data();
  }
  const grpc::Status st = stream->Finish();
  ASSERT_TRUE(st.ok()) << st.error_message();
  for (int32_t l = 0; l < 2; ++l) {
    const LayerResult& w = want->layers[l];
    EXPECT_EQ((got[{l, v1::TENSOR_KIND_KEY}]), std::string(w.key.begin(), w.key.end())) << l;
    EXPECT_EQ((got[{l, v1::TENSOR_KIND_VALUE}]), std::string(w.value.begin(), w.value.end())) << l;
    EXPECT_EQ((got[{l, v1::TENSOR_KIND_POSITIONS}]),
              std::string(reinterpret_cast<const char*>(w.positions.data()), w.positions.size() * 4));
  }
}

TEST_F(ShmTest, ALeaseWithADeadlineEndsThere) {
  StartServer();
  auto region = NewRegion(4096);
  auto stub = TcpStub();
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(500));
  auto reader = stub->RegisterSharedMemory(&ctx, RegisterRequest("brief", region->shm_name(), 4096));
  v1::RegisterSharedMemoryResponse response;
  ASSERT_TRUE(reader->Read(&response));
  EXPECT_EQ(RegionsRegistered(), 1);
  EXPECT_FALSE(reader->Read(&response));
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_TRUE(WaitForRegions(0));
}

TEST_F(ShmTest, ShutdownEndsLeasesAtOnce) {
  ServerOptions o;
  o.shutdown_grace = absl::Seconds(60);
  StartServer(o);
  auto region = NewRegion(4096);
  auto lease = Lease(*region, "r");
  ASSERT_NE(lease, nullptr);
  const auto t0 = std::chrono::steady_clock::now();
  server_->Shutdown();
  server_->Wait();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(10)) << "the lease held shutdown";
  for (int i = 0; i < 500 && !lease->ended(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  ASSERT_TRUE(lease->ended());
  EXPECT_EQ(lease->end_status().code(), absl::StatusCode::kUnavailable) << lease->end_status();
}

// ---- a client that truncates its object -------------------------------------------------------------

TEST_F(ShmTest, TruncatedObjectIsAnErrorNotACrash) {
  StartServer();
  auto region = NewRegion(1 << 20);
  auto lease = Lease(*region, "shrinks");
  const int fd = shm_open(region->shm_name().c_str(), O_RDWR, 0);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(ftruncate(fd, 4096), 0);  // the registered size stays 1 MiB
  close(fd);
  // Reading past the object's end.
  ExpectStatus(SendRaw(*stub_, {ValidHeader(), ShmChunk(v1::TENSOR_KIND_KEY, 0, Ref("shrinks", 8192, 128))}),
               grpc::StatusCode::FAILED_PRECONDITION, "was truncated");
  // Writing past it.
  TestCache c = MakeCache(DType::kFloat16, Layout::kHND, 1, 1, 1, 64, 8, 4, false, 2);
  {
    auto stored = NewRegion(1 << 16);
    auto stored_lease = Lease(*stored, "in");
    ASSERT_TRUE(PutViaShm(*stub_, c, "k", *stored, "in").ok());
  }
  grpc::Status st;
  v1::SharedMemoryRef area = Ref("shrinks", 65536, 65536);
  GetAll(*stub_, "k", &st, &area, region.get());
  ExpectStatus(st, grpc::StatusCode::FAILED_PRECONDITION, "was truncated");
  // The server is fine; bytes inside the object still work.
  area = Ref("shrinks", 0, 4096);
  GetAll(*stub_, "k", &st, &area, region.get());
  EXPECT_TRUE(st.ok()) << st.error_message();
}

// ---- the parts ----------------------------------------------------------------------------------------

TEST(ShmParts, CallRegionsHoldWhatTheyResolved) {
  auto region = NewRegion(4096);
  std::memcpy(region->data(), "medakv", 6);
  SharedMemoryRegistry registry(1 << 20, 4);
  int revoked = 0;
  absl::StatusOr<uint64_t> lease =
      registry.Register(RegisterRequest("r", region->shm_name(), 4096), [&](const absl::Status& s) { ++revoked; });
  ASSERT_TRUE(lease.ok()) << lease.status();
  EXPECT_EQ(registry.registered_bytes(), 4096);
  CallRegions holding(&registry, absl::OkStatus());
  ASSERT_TRUE(holding.Check(Ref("r", 0, 6), "chunk.shm").ok());
  ASSERT_TRUE(registry.Unregister("r").ok());
  EXPECT_EQ(revoked, 1);
  EXPECT_EQ(registry.regions(), 0);
  EXPECT_EQ(registry.registered_bytes(), 0);
  // The call still reads the region; a new call cannot find it.
  absl::StatusOr<const server::MappedRegion*> held = holding.Check(Ref("r", 0, 6), "chunk.shm");
  ASSERT_TRUE(held.ok()) << held.status();
  char buf[6];
  ASSERT_TRUE((*held)->Read(0, 6, buf).ok());
  EXPECT_EQ(std::string(buf, 6), "medakv");
  CallRegions fresh(&registry, absl::OkStatus());
  EXPECT_EQ(fresh.Check(Ref("r", 0, 6), "chunk.shm").status().code(), absl::StatusCode::kNotFound);
  // Remove leaves a later registration of the same name alone, and runs no revoke.
  absl::StatusOr<uint64_t> again =
      registry.Register(RegisterRequest("r", region->shm_name(), 4096), [&](const absl::Status& s) { ++revoked; });
  ASSERT_TRUE(again.ok());
  registry.Remove("r", *lease);
  EXPECT_EQ(registry.regions(), 1);
  registry.Remove("r", *again);
  EXPECT_EQ(registry.regions(), 0);
  EXPECT_EQ(revoked, 1);
  // Access denied: every ref gets the status.
  CallRegions denied(&registry, absl::PermissionDeniedError("remote"));
  EXPECT_EQ(denied.Check(Ref("r", 0, 6), "chunk.shm").status().code(), absl::StatusCode::kPermissionDenied);
  // Shutdown revokes with UNAVAILABLE and refuses later registrations.
  absl::Status end;
  ASSERT_TRUE(
      registry.Register(RegisterRequest("s", region->shm_name(), 16), [&](const absl::Status& s) { end = s; }).ok());
  registry.Shutdown();
  EXPECT_EQ(end.code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(registry.Register(RegisterRequest("t", region->shm_name(), 16), nullptr).status().code(),
            absl::StatusCode::kUnavailable);
}

TEST(ShmParts, GuardedCopySurvivesATruncatedMapping) {
  auto region = NewRegion(3 * 4096);
  const int fd = shm_open(region->shm_name().c_str(), O_RDWR, 0);
  ASSERT_GE(fd, 0);
  void* map = mmap(nullptr, 3 * 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  ASSERT_NE(map, MAP_FAILED);
  ASSERT_EQ(ftruncate(fd, 4096), 0);
  close(fd);
  std::vector<char> buf(3 * 4096);
  EXPECT_TRUE(server::GuardedCopy(buf.data(), map, 4096, map, 3 * 4096));
  EXPECT_FALSE(server::GuardedCopy(buf.data(), map, 2 * 4096, map, 3 * 4096));
  EXPECT_FALSE(server::GuardedCopy(static_cast<char*>(map) + 4096, buf.data(), 16, map, 3 * 4096));
  EXPECT_TRUE(server::GuardedCopy(buf.data(), map, 100, map, 3 * 4096)) << "the handler stays usable";
  munmap(map, 3 * 4096);
}

TEST(ShmParts, LocalPeers) {
  for (const char* peer : {"ipv4:127.0.0.1:5000", "ipv4:127.1.2.3:1", "ipv6:[::1]:5000", "ipv6:%5B::1%5D:5000",
                           "ipv6:[::ffff:127.0.0.1]:80", "unix:/tmp/medakv.sock", "unix-abstract:medakv", "inproc", "unknown"}) {
    EXPECT_TRUE(server::IsLocalPeer(peer)) << peer;
  }
  for (const char* peer : {"ipv4:10.0.0.7:5000", "ipv4:128.0.0.1:5000", "ipv6:[2001:db8::1]:5000",
                           "ipv6:[::ffff:10.0.0.1]:80", "ipv4:1127.0.0.1:5", "", "dns:localhost"}) {
    EXPECT_FALSE(server::IsLocalPeer(peer)) << peer;
  }
}

TEST(ShmParts, AssemblerRejectsARefWhereBytesWereExpected) {
  CacheSpec spec;
  spec.layers = 1;
  spec.kv_heads = 1;
  spec.head_dim = 4;
  spec.tokens = 8;
  spec.dtype = DType::kFloat32;
  absl::StatusOr<CacheAssembler> a = CacheAssembler::Create(spec);
  ASSERT_TRUE(a.ok()) << a.status();
  v1::TensorChunk chunk;
  chunk.set_tensor(v1::TENSOR_KIND_KEY);
  *chunk.mutable_shm() = Ref("r", 0, 128);
  ExpectStatus(a->Add(chunk), absl::StatusCode::kInvalidArgument, "chunk.shm");
  // AddFrom: a failing copy leaves the tensor as it was.
  ExpectStatus(a->AddFrom(0, v1::TENSOR_KIND_KEY, 0, 128,
                          [](void*, int64_t) { return absl::FailedPreconditionError("fault"); }),
               absl::StatusCode::kFailedPrecondition, "fault");
  EXPECT_EQ(a->bytes_received(), 0);
  EXPECT_TRUE(a->AddFrom(0, v1::TENSOR_KIND_KEY, 0, 128, [](void* dst, int64_t n) {
                 std::memset(dst, 0, n);
                 return absl::OkStatus();
               }).ok());
  EXPECT_EQ(a->bytes_received(), 128);
}

TEST(ShmParts, RegionCreateAndUnlink) {
  EXPECT_EQ(SharedMemoryRegion::Create(0).status().code(), absl::StatusCode::kInvalidArgument);
  std::string name;
  {
    auto a = NewRegion(100);
    auto b = NewRegion(100);
    ASSERT_TRUE(a && b);
    EXPECT_NE(a->shm_name(), b->shm_name());
    EXPECT_EQ(a->shm_name()[0], '/');
    EXPECT_EQ(a->data()[99], 0);
    name = a->shm_name();
  }
  EXPECT_LT(shm_open(name.c_str(), O_RDWR, 0), 0) << "unlinked on destruction";
}

}  // namespace
}  // namespace medakv
