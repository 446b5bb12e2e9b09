// The server's Prometheus metrics: what each call records (requests by
// method, policy and code; stage durations equal to the summaries' stage
// times; bytes; tokens; the per-layer budgets of every policy), the sampled
// store, admission and request memory state, the process_* metrics, the
// bounded `layer` label, and the /metrics endpoint (port 0, the text format,
// a port in use).
#include "service/server/metrics.h"

#include <arpa/inet.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <ctime>
#include <fstream>
#include <functional>
#include <map>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "client/cpp/remote.h"
#include "medakv/v1/medakv.grpc.pb.h"
#include "service/server/convert.h"
#include "service/server/server.h"
#include "tests/service/grpc_test_util.h"
#include "tests/service/test_cache.h"

namespace medakv {
namespace {

using server::CallMetrics;
using server::MedakvServer;
using server::Method;
using server::Metrics;
using server::MetricsSample;
using server::ServerOptions;
using test::TestCache;

using Labels = std::map<std::string, std::string>;

// ---- reading collected values ------------------------------------------------------------

// The series `name` with exactly `labels`; null when absent.
const prometheus::ClientMetric* Series(const std::vector<prometheus::MetricFamily>& families, const std::string& name,
                                       const Labels& labels) {
  for (const prometheus::MetricFamily& f : families) {
    if (f.name != name) continue;
    for (const prometheus::ClientMetric& m : f.metric) {
      Labels got;
      for (const auto& l : m.label) got[l.name] = l.value;
      if (got == labels) return &m;
    }
  }
  return nullptr;
}

class Collected {
 public:
  explicit Collected(const Metrics& metrics) : families_(metrics.Collect()) {}

  bool Has(const std::string& name, const Labels& labels) const { return Series(families_, name, labels) != nullptr; }
  // Counter or gauge value; -1 (and a failure) when absent.
  double Value(const std::string& name, const Labels& labels) const {
    const prometheus::ClientMetric* m = Series(families_, name, labels);
    EXPECT_NE(m, nullptr) << name << " " << Describe(labels);
    if (m == nullptr) return -1;
    return m->counter.value + m->gauge.value;  // the other is 0
  }
  // A histogram series; checks its buckets are consistent with its count.
  prometheus::ClientMetric::Histogram Histogram(const std::string& name, const Labels& labels) const {
    const prometheus::ClientMetric* m = Series(families_, name, labels);
    EXPECT_NE(m, nullptr) << name << " " << Describe(labels);
    if (m == nullptr) return {};
    const auto& h = m->histogram;
    EXPECT_FALSE(h.bucket.empty());
    for (size_t i = 1; i < h.bucket.size(); ++i) {
      EXPECT_LE(h.bucket[i - 1].cumulative_count, h.bucket[i].cumulative_count) << name;
      EXPECT_LT(h.bucket[i - 1].upper_bound, h.bucket[i].upper_bound) << name;
    }
    if (!h.bucket.empty()) {
      EXPECT_EQ(h.bucket.back().cumulative_count, h.sample_count) << name << " +Inf bucket";
    }
    return h;
  }
  const std::vector<prometheus::MetricFamily>& families() const { return families_; }

 private:
  static std::string Describe(const Labels& labels) {
    std::string s = "{";
    for (const auto& [k, v] : labels) absl::StrAppend(&s, k, "=\"", v, "\",");
    return s + "}";
  }
  std::vector<prometheus::MetricFamily> families_;
};

// Polls `condition` (state that another thread changes: a reactor's OnDone,
// the admission queue) for at most 10 s.
bool Eventually(const std::function<bool()>& condition) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (std::chrono::steady_clock::now() < deadline) {
    if (condition()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return condition();
}

TestCache MakeCache(int64_t layers, int64_t tokens, uint64_t seed) {
  return test::MakeTestCache({.dtype = DType::kFloat16,
                              .layout = Layout::kHND,
                              .layers = layers,
                              .kv_heads = 2,
                              .group = 2,
                              .tokens = tokens,
                              .head_dim = 16,
                              .q_tokens = 8,
                              .spread_step = 0.4,
                              .seed = seed});
}

// ---- through the server --------------------------------------------------------------------

class MetricsServerTest : public ::testing::Test {
 protected:
  void StartServer(ServerOptions o = {}) {
    o.listen = "127.0.0.1:0";
    o.backend = "cpu";
    absl::StatusOr<std::unique_ptr<MedakvServer>> s = MedakvServer::Start(o);
    ASSERT_TRUE(s.ok()) << s.status();
    server_ = *std::move(s);
    stub_ = v1::Medakv::NewStub(server_->InProcessChannel());
  }
  Collected Collect() const { return Collected(server_->metrics()); }
  // Waits until no call of `method` is in flight (OnDone runs after the client has its status).
  void ExpectNoneInFlight(const char* method) {
    EXPECT_TRUE(Eventually([&] {
      return Collect().Value("medakv_inflight_requests", {{"method", method}}) == 0;
    })) << method;
  }

  std::unique_ptr<MedakvServer> server_;
  std::unique_ptr<v1::Medakv::Stub> stub_;
};

TEST_F(MetricsServerTest, CompressionsAreCountedByPreset) {
  const std::string path = absl::StrCat(testing::TempDir(), "/metrics_presets_", getpid(), ".txtpb");
  std::ofstream(path) << "preset { name: \"fast\" policy { rho: 0.1 streaming_llm {} } }\n";
  ServerOptions o;
  o.policy_presets = path;
  StartServer(o);
  {
    const Collected fresh = Collect();
    for (const char* method : {"Compress", "CompressCache"}) {
      for (const char* preset : {"none", "fast"}) {
        EXPECT_EQ(fresh.Value("medakv_preset_requests_total", {{"method", method}, {"preset", preset}, {"code", "OK"}}),
                  0)
            << method << " " << preset;
      }
    }
  }
  TestCache c = MakeCache(2, 50, 9);
  RemoteOptions fast;
  fast.preset = "fast";
  ASSERT_TRUE(CompressRemote(*stub_, c.input, CompressOptions{}, fast).ok());
  ASSERT_TRUE(CompressRemote(*stub_, c.input, CompressOptions{}, fast).ok());
  ASSERT_TRUE(CompressRemote(*stub_, c.input, DefaultOptions(PolicyKind::kH2O)).ok());
  RemoteOptions unknown;
  unknown.preset = "slow";
  EXPECT_FALSE(CompressRemote(*stub_, c.input, CompressOptions{}, unknown).ok());
  ExpectNoneInFlight("Compress");
  const Collected m = Collect();
  EXPECT_EQ(m.Value("medakv_preset_requests_total", {{"method", "Compress"}, {"preset", "fast"}, {"code", "OK"}}), 2);
  EXPECT_EQ(m.Value("medakv_preset_requests_total", {{"method", "Compress"}, {"preset", "none"}, {"code", "OK"}}), 1);
  // A name the server does not have is never a label value.
  EXPECT_FALSE(m.Has("medakv_preset_requests_total",
                     {{"method", "Compress"}, {"preset", "slow"}, {"code", "INVALID_ARGUMENT"}}));
  EXPECT_EQ(m.Value("medakv_preset_requests_total",
                    {{"method", "Compress"}, {"preset", "none"}, {"code", "INVALID_ARGUMENT"}}),
            1);
  // The preset's policy is the `policy` label of the usual counters.
  EXPECT_EQ(m.Value("medakv_requests_total", {{"method", "Compress"}, {"policy", "streaming_llm"}, {"code", "OK"}}), 2);
  std::remove(path.c_str());
}

TEST_F(MetricsServerTest, CompressRecordsRequestsStagesBytesTokensAndBudgets) {
  StartServer();
  EXPECT_EQ(server_->metrics_port(), 0);  // no metrics_listen: no endpoint, values still recorded
  {
    // Successful calls of every method and policy, and tokens per policy, are series from the start.
    const Collected fresh = Collect();
    EXPECT_EQ(fresh.Value("medakv_requests_total", {{"method", "Compress"}, {"policy", "h2o"}, {"code", "OK"}}), 0);
    EXPECT_EQ(fresh.Value("medakv_requests_total", {{"method", "GetCache"}, {"policy", "none"}, {"code", "OK"}}), 0);
    EXPECT_EQ(fresh.Value("medakv_tokens_kept_total", {{"policy", "look_m"}}), 0);
    EXPECT_FALSE(fresh.Has("medakv_requests_total", {{"method", "GetCache"}, {"policy", "meda"}, {"code", "OK"}}));
  }
  constexpr int64_t kLayers = 3, kTokens = 97;
  std::vector<RemoteResult> meda;
  for (uint64_t seed : {1, 2, 3}) {
    TestCache c = MakeCache(kLayers, kTokens, seed);
    CompressOptions o = DefaultOptions(PolicyKind::kMeda);
    o.budget.rho = 0.3;
    RemoteOptions remote;
    remote.chunk_bytes = 1000;
    absl::StatusOr<RemoteResult> r = CompressRemote(*stub_, c.input, o, remote);
    ASSERT_TRUE(r.ok()) << r.status();
    meda.push_back(*std::move(r));
  }
  TestCache c = MakeCache(kLayers, kTokens, 4);
  CompressOptions snap = DefaultOptions(PolicyKind::kSnapKV);
  snap.budget.rho = 0.5;
  absl::StatusOr<RemoteResult> snapkv = CompressRemote(*stub_, c.input, snap);
  ASSERT_TRUE(snapkv.ok()) << snapkv.status();
  // Two rejected before their policy is read: no statistics form; rho out of range.
  v1::CompressRequest no_stats = test::ValidHeader();
  no_stats.mutable_header()->set_stats(v1::STATS_FORM_NONE);
  EXPECT_EQ(test::SendRaw(*stub_, {no_stats}).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  v1::CompressRequest bad_rho = test::ValidHeader();
  bad_rho.mutable_header()->mutable_policy()->set_rho(2.0);
  EXPECT_EQ(test::SendRaw(*stub_, {bad_rho}).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  ExpectNoneInFlight("Compress");

  const Collected m = Collect();
  EXPECT_EQ(m.Value("medakv_requests_total", {{"method", "Compress"}, {"policy", "meda"}, {"code", "OK"}}), 3);
  EXPECT_EQ(m.Value("medakv_requests_total", {{"method", "Compress"}, {"policy", "snapkv"}, {"code", "OK"}}), 1);
  EXPECT_EQ(
      m.Value("medakv_requests_total", {{"method", "Compress"}, {"policy", "none"}, {"code", "INVALID_ARGUMENT"}}), 2);
  EXPECT_FALSE(
      m.Has("medakv_requests_total", {{"method", "Compress"}, {"policy", "meda"}, {"code", "INVALID_ARGUMENT"}}));
  EXPECT_EQ(m.Histogram("medakv_request_duration_seconds", {{"method", "Compress"}}).sample_count, 6u);
  EXPECT_EQ(m.Histogram("medakv_request_duration_seconds", {{"method", "Stats"}}).sample_count, 0u);

  // Stage durations are the summaries' stage times, one observation per completed compression.
  std::vector<const v1::CompressSummary*> summaries;
  for (const RemoteResult& r : meda) summaries.push_back(&r.summary);
  summaries.push_back(&snapkv->summary);
  const std::map<std::string, std::function<double(const v1::StageTimes&)>> stages = {
      {"receive", [](const v1::StageTimes& t) { return t.receive_seconds(); }},
      {"statistics", [](const v1::StageTimes& t) { return t.statistics_seconds(); }},
      {"allocate", [](const v1::StageTimes& t) { return t.allocate_seconds(); }},
      {"select_merge", [](const v1::StageTimes& t) { return t.select_merge_seconds(); }},
      {"send", [](const v1::StageTimes& t) { return t.send_seconds(); }}};
  for (const auto& [stage, time] : stages) {
    double want = 0;
    for (const v1::CompressSummary* s : summaries) want += time(s->times());
    const auto h = m.Histogram("medakv_stage_duration_seconds", {{"method", "Compress"}, {"stage", stage}});
    EXPECT_EQ(h.sample_count, 4u) << stage;
    EXPECT_NEAR(h.sample_sum, want, 1e-9) << stage;
    ASSERT_EQ(h.bucket.size(), 20u) << stage;  // 19 bounds from 100 us to 60 s, then +Inf
    EXPECT_DOUBLE_EQ(h.bucket.front().upper_bound, 0.0001);
    EXPECT_DOUBLE_EQ(h.bucket[18].upper_bound, 60);
  }
  EXPECT_EQ(m.Histogram("medakv_queue_wait_seconds", {{"method", "Compress"}}).sample_count, 4u);

  int64_t bytes_in = 0, bytes_out = 0;
  for (const v1::CompressSummary* s : summaries) {
    bytes_in += s->bytes_in();
    bytes_out += s->bytes_out();
  }
  EXPECT_GT(bytes_in, 0);
  EXPECT_EQ(m.Value("medakv_received_bytes_total", {{"method", "Compress"}}), bytes_in);
  EXPECT_EQ(m.Value("medakv_sent_bytes_total", {{"method", "Compress"}}), bytes_out);

  // Tokens, the kept ratio, and the layer budgets over T, by policy.
  int64_t kept = 0;
  double ratio_sum = 0;
  std::vector<double> budget_sum(kLayers, 0.0);
  for (const RemoteResult& r : meda) {
    kept += r.result.tokens_kept;
    ratio_sum += static_cast<double>(r.result.tokens_kept) / (kLayers * kTokens);
    ASSERT_EQ(r.result.layers.size(), static_cast<size_t>(kLayers));
    for (int l = 0; l < kLayers; ++l) budget_sum[l] += static_cast<double>(r.result.layers[l].budget) / kTokens;
  }
  EXPECT_EQ(m.Value("medakv_tokens_in_total", {{"policy", "meda"}}), 3 * kLayers * kTokens);
  EXPECT_EQ(m.Value("medakv_tokens_kept_total", {{"policy", "meda"}}), kept);
  EXPECT_EQ(m.Value("medakv_tokens_kept_total", {{"policy", "snapkv"}}), snapkv->result.tokens_kept);
  const auto ratio = m.Histogram("medakv_compression_ratio", {{"policy", "meda"}});
  EXPECT_EQ(ratio.sample_count, 3u);
  EXPECT_NEAR(ratio.sample_sum, ratio_sum, 1e-12);
  EXPECT_EQ(m.Histogram("medakv_compression_ratio", {{"policy", "snapkv"}}).sample_count, 1u);
  for (int l = 0; l < kLayers; ++l) {
    const auto h = m.Histogram("medakv_layer_budget_ratio", {{"policy", "meda"}, {"layer", std::to_string(l)}});
    EXPECT_EQ(h.sample_count, 3u) << l;
    EXPECT_NEAR(h.sample_sum, budget_sum[l], 1e-12) << l;
  }
  EXPECT_FALSE(m.Has("medakv_layer_budget_ratio", {{"policy", "meda"}, {"layer", std::to_string(kLayers)}}));
  // A policy other than meda records its layers' budgets too, under its own label.
  ASSERT_EQ(snapkv->result.layers.size(), static_cast<size_t>(kLayers));
  for (int l = 0; l < kLayers; ++l) {
    const auto h = m.Histogram("medakv_layer_budget_ratio", {{"policy", "snapkv"}, {"layer", std::to_string(l)}});
    EXPECT_EQ(h.sample_count, 1u) << l;
    EXPECT_NEAR(h.sample_sum, static_cast<double>(snapkv->result.layers[l].budget) / kTokens, 1e-12) << l;
  }
  EXPECT_FALSE(m.Has("medakv_layer_budget_ratio", {{"policy", "snapkv"}, {"layer", std::to_string(kLayers)}}));
  // Series appear with their policy's first compression: none for a policy not used.
  EXPECT_FALSE(m.Has("medakv_layer_budget_ratio", {{"policy", "h2o"}, {"layer", "0"}}));
  // MEDA gives the layers different budgets: the metric is not a constant.
  EXPECT_NE(budget_sum[0], budget_sum[kLayers - 1]);
  EXPECT_EQ(m.Value("medakv_build_info", {{"version", "0.1.0"}, {"backend", "cpu"}}), 1);
}

// Uploads `c` (with its queries) under `id`.
grpc::Status Put(v1::Medakv::Stub& stub, const TestCache& c, const std::string& id) {
  grpc::ClientContext ctx;
  v1::PutCacheResponse response;
  auto writer = stub.PutCache(&ctx, &response);
  v1::PutCacheRequest req;
  req.mutable_header()->set_cache_id(id);
  ToProto(*SpecFromInput(c.input), req.mutable_header());
  bool ok = writer->Write(req);
  auto send = [&](int32_t layer, v1::TensorKind kind, int64_t offset, const uint8_t* data, int64_t n) {
    req.Clear();
    v1::TensorChunk* chunk = req.mutable_chunk();
    chunk->set_layer(layer);
    chunk->set_tensor(kind);
    chunk->set_offset(offset);
    chunk->set_data(data, n);
    return writer->Write(req);
  };
  for (size_t l = 0; l < c.input.layers.size() && ok; ++l) {
    const LayerInput& in = c.input.layers[l];
    ok = SendTensor(l, v1::TENSOR_KIND_KEY, in.key.data, in.key.NumBytes(), 4096, send) &&
         SendTensor(l, v1::TENSOR_KIND_VALUE, in.value.data, in.value.NumBytes(), 4096, send) &&
         SendTensor(l, v1::TENSOR_KIND_QUERY, in.query.data, in.query.NumBytes(), 4096, send);
  }
  if (ok) writer->WritesDone();
  return writer->Finish();
}

int64_t UploadBytes(const TestCache& c) {
  int64_t n = 0;
  for (const LayerInput& in : c.input.layers) n += in.key.NumBytes() + in.value.NumBytes() + in.query.NumBytes();
  return n;
}

TEST_F(MetricsServerTest, StoreCallsEvictionsAndStoreGauges) {
  constexpr int64_t kLayers = 2, kTokens = 150;
  const TestCache a = MakeCache(kLayers, kTokens, 11), b = MakeCache(kLayers, kTokens, 12);
  // Room for one cache (keys, values, queries, int32 positions and 24 bytes
  // per visual span), not two.
  const int64_t one = UploadBytes(a) + kLayers * 2 * kTokens * 4 +
                      24 * static_cast<int64_t>(SpansFromModality(a.input.modality).size());
  ServerOptions o;
  o.host_cache_bytes = one + one / 2;
  StartServer(o);

  ASSERT_TRUE(Put(*stub_, a, "a").ok());
  {
    const Collected m = Collect();
    EXPECT_EQ(m.Value("medakv_store_entries", {{"tier", "host"}}), 1);
    EXPECT_EQ(m.Value("medakv_store_used_bytes", {{"tier", "host"}}), one);
    EXPECT_EQ(m.Value("medakv_store_capacity_bytes", {{"tier", "host"}}), o.host_cache_bytes);
    EXPECT_EQ(m.Value("medakv_store_evictions_total", {{"tier", "host"}, {"reason", "lru"}}), 0);
    EXPECT_FALSE(m.Has("medakv_store_entries", {{"tier", "device"}}));  // no device tier configured
  }
  ASSERT_TRUE(Put(*stub_, b, "b").ok());  // evicts a
  {
    const Collected m = Collect();
    EXPECT_EQ(m.Value("medakv_store_entries", {{"tier", "host"}}), 1);
    EXPECT_EQ(m.Value("medakv_store_evictions_total", {{"tier", "host"}, {"reason", "lru"}}), 1);
    EXPECT_EQ(m.Value("medakv_store_evictions_total", {{"tier", "host"}, {"reason", "expired"}}), 0);
    EXPECT_EQ(m.Value("medakv_requests_total", {{"method", "PutCache"}, {"policy", "none"}, {"code", "OK"}}), 2);
    EXPECT_EQ(m.Value("medakv_received_bytes_total", {{"method", "PutCache"}}), UploadBytes(a) + UploadBytes(b));
    EXPECT_EQ(m.Histogram("medakv_stage_duration_seconds", {{"method", "PutCache"}, {"stage", "receive"}}).sample_count,
              2u);
  }
  // A second collection does not count the eviction again.
  EXPECT_EQ(Collect().Value("medakv_store_evictions_total", {{"tier", "host"}, {"reason", "lru"}}), 1);

  // Compress in place with MEDA: its budgets are recorded under CompressCache's stages.
  v1::CompressCacheResponse compressed;
  {
    grpc::ClientContext ctx;
    v1::CompressCacheRequest req;
    req.set_cache_id("b");
    CompressOptions options = DefaultOptions(PolicyKind::kMeda);
    options.budget.rho = 0.25;
    *req.mutable_policy() = PolicyToProto(options);
    grpc::Status s = stub_->CompressCache(&ctx, req, &compressed);
    ASSERT_TRUE(s.ok()) << s.error_message();
  }
  // Download it; then a missing id.
  int64_t downloaded = 0;
  {
    grpc::ClientContext ctx;
    v1::GetCacheRequest req;
    req.set_cache_id("b");
    req.set_max_response_chunk_bytes(1024);
    auto reader = stub_->GetCache(&ctx, req);
    v1::GetCacheResponse r;
    while (reader->Read(&r)) {
      if (r.has_chunk()) downloaded += static_cast<int64_t>(r.chunk().data().size());
    }
    ASSERT_TRUE(reader->Finish().ok());
  }
  {
    grpc::ClientContext ctx;
    v1::GetCacheRequest req;
    req.set_cache_id("missing");
    auto reader = stub_->GetCache(&ctx, req);
    v1::GetCacheResponse r;
    while (reader->Read(&r)) {
    }
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::NOT_FOUND);
  }
  {
    grpc::ClientContext ctx;
    v1::ListCachesRequest req;
    req.set_limit(-1);
    v1::ListCachesResponse resp;
    EXPECT_EQ(stub_->ListCaches(&ctx, req, &resp).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  }
  {
    grpc::ClientContext ctx;
    v1::DeleteCacheRequest req;
    req.set_cache_id("b");
    v1::DeleteCacheResponse resp;
    EXPECT_TRUE(stub_->DeleteCache(&ctx, req, &resp).ok());
  }
  ExpectNoneInFlight("GetCache");
  ExpectNoneInFlight("CompressCache");

  const Collected m = Collect();
  EXPECT_EQ(m.Value("medakv_requests_total", {{"method", "CompressCache"}, {"policy", "meda"}, {"code", "OK"}}), 1);
  EXPECT_EQ(
      m.Histogram("medakv_stage_duration_seconds", {{"method", "CompressCache"}, {"stage", "statistics"}}).sample_count,
      1u);
  EXPECT_NEAR(
      m.Histogram("medakv_stage_duration_seconds", {{"method", "CompressCache"}, {"stage", "select_merge"}}).sample_sum,
      compressed.summary().times().select_merge_seconds(), 1e-12);
  EXPECT_EQ(m.Histogram("medakv_queue_wait_seconds", {{"method", "CompressCache"}}).sample_count, 1u);
  ASSERT_EQ(compressed.layers_size(), kLayers);
  for (int l = 0; l < kLayers; ++l) {
    const auto h = m.Histogram("medakv_layer_budget_ratio", {{"policy", "meda"}, {"layer", std::to_string(l)}});
    EXPECT_EQ(h.sample_count, 1u);
    EXPECT_NEAR(h.sample_sum, static_cast<double>(compressed.layers(l).budget()) / kTokens, 1e-12);
  }
  EXPECT_EQ(m.Value("medakv_tokens_in_total", {{"policy", "meda"}}), kLayers * kTokens);
  EXPECT_EQ(m.Value("medakv_tokens_kept_total", {{"policy", "meda"}}), compressed.summary().tokens_kept());

  EXPECT_GT(downloaded, 0);
  EXPECT_EQ(m.Value("medakv_sent_bytes_total", {{"method", "GetCache"}}), downloaded);
  EXPECT_EQ(m.Histogram("medakv_stage_duration_seconds", {{"method", "GetCache"}, {"stage", "send"}}).sample_count, 1u);
  EXPECT_EQ(m.Value("medakv_requests_total", {{"method", "GetCache"}, {"policy", "none"}, {"code", "OK"}}), 1);
  EXPECT_EQ(m.Value("medakv_requests_total", {{"method", "GetCache"}, {"policy", "none"}, {"code", "NOT_FOUND"}}), 1);
  EXPECT_EQ(
      m.Value("medakv_requests_total", {{"method", "ListCaches"}, {"policy", "none"}, {"code", "INVALID_ARGUMENT"}}),
      1);
  EXPECT_EQ(m.Value("medakv_requests_total", {{"method", "DeleteCache"}, {"policy", "none"}, {"code", "OK"}}), 1);
  EXPECT_EQ(m.Value("medakv_store_entries", {{"tier", "host"}}), 0);
  EXPECT_EQ(m.Value("medakv_store_used_bytes", {{"tier", "host"}}), 0);
}

TEST_F(MetricsServerTest, AdmissionSlotsQueueAndInFlight) {
  ServerOptions o;
  o.max_inflight = 1;
  o.max_request_bytes = int64_t{3} << 30;
  StartServer(o);
  EXPECT_EQ(Collect().Value("medakv_admission_slots", {}), 1);
  // The bound on inflight request memory: --max_inflight x --max_request_bytes.
  EXPECT_EQ(Collect().Value("medakv_request_memory_bound_bytes", {}), int64_t{3} << 30);
  // The first call takes the only slot at its header and holds it while its
  // upload is open; the second waits in the queue.
  grpc::ClientContext first_ctx, second_ctx;
  auto first = stub_->Compress(&first_ctx);
  ASSERT_TRUE(first->Write(test::ValidHeader()));
  EXPECT_TRUE(Eventually([&] { return Collect().Value("medakv_admission_slots_used", {}) == 1; }));
  auto second = stub_->Compress(&second_ctx);
  ASSERT_TRUE(second->Write(test::ValidHeader()));
  EXPECT_TRUE(Eventually([&] { return Collect().Value("medakv_queued_requests", {}) == 1; }));
  EXPECT_EQ(Collect().Value("medakv_inflight_requests", {{"method", "Compress"}}), 2);

  second_ctx.TryCancel();  // leaves the queue: CANCELLED, after a measured wait
  EXPECT_EQ(second->Finish().error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_TRUE(Eventually([&] { return Collect().Value("medakv_queued_requests", {}) == 0; }));
  EXPECT_EQ(Collect().Value("medakv_admission_slots_used", {}), 1);
  {
    const Collected m = Collect();
    EXPECT_EQ(m.Histogram("medakv_queue_wait_seconds", {{"method", "Compress"}}).sample_count, 2u);
    EXPECT_EQ(m.Value("medakv_requests_total",
                      {{"method", "Compress"}, {"policy", "amber"}, {"code", "CANCELLED"}}),
              1);
  }
  first_ctx.TryCancel();
  EXPECT_EQ(first->Finish().error_code(), grpc::StatusCode::CANCELLED);
  ExpectNoneInFlight("Compress");
  const Collected m = Collect();
  EXPECT_EQ(m.Value("medakv_admission_slots_used", {}), 0);
  // The first call's status is CANCELLED, or INVALID_ARGUMENT (tensors
  // missing) when the server sees its upload end before the cancellation:
  // either way the server recorded exactly one status for it.
  double compress_calls = 0;
  for (const prometheus::MetricFamily& f : m.families()) {
    if (f.name != "medakv_requests_total") continue;
    for (const auto& series : f.metric) {
      for (const auto& l : series.label) {
        if (l.name == "method" && l.value == "Compress") compress_calls += series.counter.value;
      }
    }
  }
  EXPECT_EQ(compress_calls, 2);
}

TEST_F(MetricsServerTest, SharedMemoryLease) {
  StartServer();
  absl::StatusOr<std::unique_ptr<SharedMemoryRegion>> region = SharedMemoryRegion::Create(1 << 16);
  ASSERT_TRUE(region.ok()) << region.status();
  {
    absl::StatusOr<std::unique_ptr<SharedMemoryLease>> lease =
        SharedMemoryLease::Register(*stub_, **region, "metrics-test");
    ASSERT_TRUE(lease.ok()) << lease.status();
    const Collected m = Collect();
    EXPECT_EQ(m.Value("medakv_shm_regions", {}), 1);
    EXPECT_EQ(m.Value("medakv_shm_registered_bytes", {}), 1 << 16);
    EXPECT_EQ(m.Value("medakv_inflight_requests", {{"method", "RegisterSharedMemory"}}), 1);
    ASSERT_TRUE((*lease)->Release().ok());
  }
  ExpectNoneInFlight("RegisterSharedMemory");
  const Collected m = Collect();
  EXPECT_EQ(m.Value("medakv_shm_regions", {}), 0);
  EXPECT_EQ(m.Histogram("medakv_request_duration_seconds", {{"method", "RegisterSharedMemory"}}).sample_count, 1u);
  double ended = 0;  // the lease's end status is the client's doing: count every code
  for (const prometheus::MetricFamily& f : m.families()) {
    if (f.name != "medakv_requests_total") continue;
    for (const auto& s : f.metric) {
      for (const auto& l : s.label) {
        if (l.name == "method" && l.value == "RegisterSharedMemory") ended += s.counter.value;
      }
    }
  }
  EXPECT_EQ(ended, 1);
}

// ---- the /metrics endpoint ----------------------------------------------------------------

// A TCP socket connected to 127.0.0.1:port, or -1.
int ConnectLoopback(int port) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return -1;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

// GET http://127.0.0.1:port/path; the whole response (status line, headers,
// body), or what arrived before a read waited `timeout_seconds` (0: no limit).
std::string HttpGet(int port, const std::string& path, int timeout_seconds = 0) {
  const int fd = ConnectLoopback(port);
  if (fd < 0) return "";
  if (timeout_seconds > 0) {
    timeval tv{};
    tv.tv_sec = timeout_seconds;
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
  }
  std::string out;
  const std::string request = absl::StrCat("GET ", path, " HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
  if (write(fd, request.data(), request.size()) == static_cast<ssize_t>(request.size())) {
    char buf[4096];
    ssize_t n;
    while ((n = read(fd, buf, sizeof(buf))) > 0) out.append(buf, static_cast<size_t>(n));
  }
  close(fd);
  return out;
}

// Idle connections to the metrics port (a port scanner, a stuck scraper) do
// not hold up a scrape: the endpoint has more workers than a few such
// connections, and each read times out.
TEST_F(MetricsServerTest, IdleConnectionsDoNotHoldUpAScrape) {
  ServerOptions o;
  o.metrics_listen = "127.0.0.1:0";
  StartServer(o);
  const int port = server_->metrics_port();
  ASSERT_GT(port, 0);
  std::vector<int> idle;
  for (int i = 0; i < 4; ++i) {
    const int fd = ConnectLoopback(port);
    ASSERT_GE(fd, 0);
    idle.push_back(fd);  // connected, sends nothing
  }
  // The scrape gets its answer within 3 s (with civetweb's former 2 workers and
  // 30 s timeout it waited for the idle connections to time out).
  const std::string text = HttpGet(port, "/metrics", /*timeout_seconds=*/3);
  EXPECT_NE(text.find("HTTP/1.1 200"), std::string::npos) << text.substr(0, 200);
  EXPECT_NE(text.find("# TYPE medakv_requests_total counter"), std::string::npos);
  for (int fd : idle) close(fd);
}

TEST_F(MetricsServerTest, ServesPrometheusTextOnAnyFreePort) {
  ServerOptions o;
  o.metrics_listen = "127.0.0.1:0";
  StartServer(o);
  const int port = server_->metrics_port();
  ASSERT_GT(port, 0);
  EXPECT_NE(port, server_->port());
  {
    grpc::ClientContext ctx;
    v1::StatsResponse r;
    ASSERT_TRUE(stub_->Stats(&ctx, v1::StatsRequest(), &r).ok());
  }
  const std::string text = HttpGet(port, "/metrics");
  EXPECT_NE(text.find("HTTP/1.1 200"), std::string::npos) << text.substr(0, 200);
  EXPECT_NE(text.find("# TYPE medakv_requests_total counter"), std::string::npos);
  EXPECT_NE(text.find("medakv_requests_total{code=\"OK\",method=\"Stats\",policy=\"none\"} 1"), std::string::npos);
  EXPECT_NE(text.find("medakv_build_info{backend=\"cpu\",version=\"0.1.0\"} 1"), std::string::npos);
  EXPECT_NE(text.find("# TYPE medakv_stage_duration_seconds histogram"), std::string::npos);
  EXPECT_NE(text.find("medakv_store_capacity_bytes{tier=\"host\"} 8589934592"), std::string::npos);
  EXPECT_NE(text.find("medakv_request_memory_bytes{state=\"inflight\"} 0"), std::string::npos);
  EXPECT_NE(text.find("medakv_request_memory_bound_bytes "), std::string::npos);
  // The process metrics, under their conventional names and types.
  for (const char* family : {"process_cpu_seconds_total counter", "process_resident_memory_bytes gauge",
                             "process_virtual_memory_bytes gauge", "process_start_time_seconds gauge",
                             "process_open_fds gauge", "process_max_fds gauge"}) {
    EXPECT_NE(text.find(absl::StrCat("# TYPE ", family, "\n")), std::string::npos) << family;
  }
  EXPECT_NE(text.find("\nprocess_resident_memory_bytes "), std::string::npos);
  // No label carries a cache id or a peer address.
  EXPECT_EQ(text.find("cache_id"), std::string::npos);
  EXPECT_EQ(text.find("peer"), std::string::npos);

  // The same port again: a clear start-up error, not a server without metrics.
  ServerOptions again;
  again.listen = "127.0.0.1:0";
  again.backend = "cpu";
  again.metrics_listen = absl::StrCat("127.0.0.1:", port);
  absl::StatusOr<std::unique_ptr<MedakvServer>> second = MedakvServer::Start(again);
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(second.status().message().find("cannot serve metrics on 127.0.0.1:"), std::string::npos) << second.status();
}

// ---- the Metrics object alone ----------------------------------------------------------------

TEST(MetricsTest, EvictionCountersFollowTheStoreAndNeverGoBack) {
  Metrics metrics("1.2.3", "cpu");
  MetricsSample sample;
  TierStats host;
  host.tier = Tier::kHost;
  host.capacity_bytes = 1000;
  host.used_bytes = 600;
  host.entries = 3;
  host.evicted_lru = 2;
  host.expired = 1;
  sample.tiers = {host};
  sample.admission_slots = 4;
  sample.admission_in_use = 3;
  sample.admission_waiting = 7;
  metrics.SetSampler([&] { return sample; });
  {
    const Collected m(metrics);
    EXPECT_EQ(m.Value("medakv_store_evictions_total", {{"tier", "host"}, {"reason", "lru"}}), 2);
    EXPECT_EQ(m.Value("medakv_store_evictions_total", {{"tier", "host"}, {"reason", "expired"}}), 1);
    EXPECT_EQ(m.Value("medakv_store_used_bytes", {{"tier", "host"}}), 600);
    EXPECT_EQ(m.Value("medakv_admission_slots_used", {}), 3);
    EXPECT_EQ(m.Value("medakv_queued_requests", {}), 7);
    EXPECT_EQ(m.Value("medakv_build_info", {{"version", "1.2.3"}, {"backend", "cpu"}}), 1);
  }
  sample.tiers[0].evicted_lru = 5;
  sample.tiers[0].used_bytes = 100;
  EXPECT_EQ(Collected(metrics).Value("medakv_store_evictions_total", {{"tier", "host"}, {"reason", "lru"}}), 5);
  EXPECT_EQ(Collected(metrics).Value("medakv_store_used_bytes", {{"tier", "host"}}), 100);
  sample.tiers[0].evicted_lru = 4;  // a counter never decreases
  EXPECT_EQ(Collected(metrics).Value("medakv_store_evictions_total", {{"tier", "host"}, {"reason", "lru"}}), 5);
  metrics.SetSampler({});  // gauges keep their last values
  EXPECT_EQ(Collected(metrics).Value("medakv_store_used_bytes", {{"tier", "host"}}), 100);
}

TEST(MetricsTest, LayerLabelIsCappedAndEveryPolicyIsRecorded) {
  Metrics metrics("0", "cpu");
  CompressResult r;
  const int64_t layers = server::kMaxBudgetLayers + 2;
  r.layers.resize(layers);
  for (int64_t l = 0; l < layers; ++l) r.layers[l].budget = l % 10 + 1;
  r.tokens_in = layers * 10;
  for (const LayerResult& l : r.layers) r.tokens_kept += l.budget;
  metrics.ObserveCompression(PolicyKind::kMeda, r, 10);
  metrics.ObserveCompression(PolicyKind::kPyramidKV, r, 10);
  metrics.ObserveCompression(PolicyKind::kAmber, r, 10);
  metrics.ObserveCompression(PolicyKind::kAmber, r, 10);
  const Collected m(metrics);
  std::map<std::string, std::set<std::string>> labels;  // policy: layers
  for (const prometheus::MetricFamily& f : m.families()) {
    if (f.name != "medakv_layer_budget_ratio") continue;
    for (const auto& s : f.metric) {
      Labels got;
      for (const auto& l : s.label) got[l.name] = l.value;
      ASSERT_EQ(got.size(), 2u);
      labels[got["policy"]].insert(got["layer"]);
    }
  }
  ASSERT_EQ(labels.size(), 3u);  // the policies used, no other
  for (const auto& [policy, layer_labels] : labels) {
    EXPECT_TRUE(policy == "meda" || policy == "pyramidkv" || policy == "amber") << policy;
    EXPECT_EQ(layer_labels.size(), static_cast<size_t>(server::kMaxBudgetLayers + 1)) << policy;
    EXPECT_EQ(layer_labels.count("other"), 1u) << policy;
    EXPECT_EQ(layer_labels.count(std::to_string(server::kMaxBudgetLayers)), 0u) << policy;
  }
  for (const auto& [policy, runs] : std::map<std::string, uint64_t>{{"meda", 1}, {"pyramidkv", 1}, {"amber", 2}}) {
    const auto first = m.Histogram("medakv_layer_budget_ratio", {{"policy", policy}, {"layer", "0"}});
    EXPECT_EQ(first.sample_count, runs) << policy;
    EXPECT_DOUBLE_EQ(first.sample_sum, runs * 0.1) << policy;
    const auto last = m.Histogram("medakv_layer_budget_ratio",
                                  {{"policy", policy}, {"layer", std::to_string(server::kMaxBudgetLayers - 1)}});
    EXPECT_EQ(last.sample_count, runs) << policy;
    EXPECT_DOUBLE_EQ(last.sample_sum, runs * ((server::kMaxBudgetLayers - 1) % 10 + 1) / 10.0) << policy;
    const auto other = m.Histogram("medakv_layer_budget_ratio", {{"policy", policy}, {"layer", "other"}});
    EXPECT_EQ(other.sample_count, 2 * runs) << policy;
    EXPECT_DOUBLE_EQ(other.sample_sum,
                     runs * (server::kMaxBudgetLayers % 10 + 1 + (server::kMaxBudgetLayers + 1) % 10 + 1) / 10.0)
        << policy;
    // Seven buckets up to 1, then +Inf: each layer's ratio is at most 1.
    ASSERT_EQ(first.bucket.size(), 8u);
    EXPECT_DOUBLE_EQ(first.bucket[6].upper_bound, 1);
  }
  EXPECT_EQ(m.Value("medakv_tokens_in_total", {{"policy", "pyramidkv"}}), r.tokens_in);
  EXPECT_EQ(m.Histogram("medakv_compression_ratio", {{"policy", "meda"}}).sample_count, 1u);
}

TEST(MetricsTest, RequestMemoryGaugesAreWhatTheSamplerReturns) {
  Metrics metrics("0", "cpu");
  {
    // The series exist from the start, at 0.
    const Collected fresh(metrics);
    EXPECT_EQ(fresh.Value("medakv_request_memory_bytes", {{"state", "inflight"}}), 0);
    EXPECT_EQ(fresh.Value("medakv_request_memory_bytes", {{"state", "queued"}}), 0);
    EXPECT_EQ(fresh.Value("medakv_request_memory_bound_bytes", {}), 0);
  }
  MetricsSample sample;
  sample.held_inflight_bytes = int64_t{3} << 30;
  sample.held_queued_bytes = 12345;
  sample.held_bound_bytes = int64_t{32} << 30;
  metrics.SetSampler([&] { return sample; });
  {
    const Collected m(metrics);
    EXPECT_EQ(m.Value("medakv_request_memory_bytes", {{"state", "inflight"}}), sample.held_inflight_bytes);
    EXPECT_EQ(m.Value("medakv_request_memory_bytes", {{"state", "queued"}}), sample.held_queued_bytes);
    EXPECT_EQ(m.Value("medakv_request_memory_bound_bytes", {}), sample.held_bound_bytes);
  }
  sample.held_inflight_bytes = 0;  // calls ended: the gauge goes down
  sample.held_queued_bytes = 7;
  const Collected m(metrics);
  EXPECT_EQ(m.Value("medakv_request_memory_bytes", {{"state", "inflight"}}), 0);
  EXPECT_EQ(m.Value("medakv_request_memory_bytes", {{"state", "queued"}}), 7);
  EXPECT_EQ(m.Value("medakv_request_memory_bound_bytes", {}), sample.held_bound_bytes);
  for (const prometheus::MetricFamily& f : m.families()) {
    if (f.name == "medakv_request_memory_bytes") {
      EXPECT_EQ(f.metric.size(), 2u);  // inflight, queued
    }
  }
}

// The process_* metrics in `families` (one unlabelled sample each): name -> value.
std::map<std::string, double> ProcessValues(const std::vector<prometheus::MetricFamily>& families) {
  std::map<std::string, double> out;
  for (const prometheus::MetricFamily& f : families) {
    if (f.name.rfind("process_", 0) != 0) continue;
    EXPECT_EQ(f.metric.size(), 1u) << f.name;
    if (f.metric.size() != 1) continue;
    EXPECT_TRUE(f.metric[0].label.empty()) << f.name;
    EXPECT_EQ(f.type,
              f.name == "process_cpu_seconds_total" ? prometheus::MetricType::Counter : prometheus::MetricType::Gauge)
        << f.name;
    out[f.name] = f.metric[0].counter.value + f.metric[0].gauge.value;
  }
  return out;
}

TEST(MetricsTest, ProcessMetricsArePlausible) {
  Metrics metrics("0", "cpu");
  // Some CPU time to count.
  volatile double x = 0;
  for (int i = 0; i < 2000000; ++i) x = x + 1e-9 * i;
  std::map<std::string, double> p = ProcessValues(Collected(metrics).families());
  ASSERT_EQ(p.size(), 6u) << "process_* families: " << p.size();
  EXPECT_GT(p["process_resident_memory_bytes"], 1 << 20);  // at least a MiB: this test binary is running
  EXPECT_GE(p["process_virtual_memory_bytes"], p["process_resident_memory_bytes"]);
  EXPECT_GE(p["process_open_fds"], 3);  // stdin, stdout, stderr
  EXPECT_GE(p["process_max_fds"], p["process_open_fds"]);
  EXPECT_GE(p["process_cpu_seconds_total"], 0);
  const double now = static_cast<double>(std::time(nullptr));
  EXPECT_LE(p["process_start_time_seconds"], now + 1);
  EXPECT_GT(p["process_start_time_seconds"], now - 3600);  // this test started within the hour

  // The values follow the process: a new descriptor is counted, and CPU time does not go back.
  const int fd = dup(1);
  ASSERT_GE(fd, 0);
  const std::map<std::string, double> after = ProcessValues(Collected(metrics).families());
  close(fd);
  EXPECT_GE(after.at("process_open_fds"), p["process_open_fds"] + 1);
  EXPECT_GE(after.at("process_cpu_seconds_total"), p["process_cpu_seconds_total"]);
  EXPECT_DOUBLE_EQ(after.at("process_start_time_seconds"), p["process_start_time_seconds"]);

  // Without /proc, the series are left out (not reported as 0).
  EXPECT_TRUE(server::ProcessMetrics("/nonexistent-proc").empty());
}

TEST(MetricsTest, CallMetricsCountsOnceAndTracksInFlight) {
  Metrics metrics("0", "cpu");
  {
    CallMetrics call(&metrics, Method::kCompressCache);
    EXPECT_EQ(Collected(metrics).Value("medakv_inflight_requests", {{"method", "CompressCache"}}), 1);
    call.set_policy(PolicyKind::kLookM);
    call.ReceivedSoFar(100);
    call.ReceivedSoFar(250);
    call.ReceivedSoFar(250);
    call.End(absl::StatusCode::kResourceExhausted);
    call.End(absl::StatusCode::kOk);  // ignored
  }
  const Collected m(metrics);
  EXPECT_EQ(m.Value("medakv_inflight_requests", {{"method", "CompressCache"}}), 0);
  EXPECT_EQ(m.Value("medakv_requests_total",
                    {{"method", "CompressCache"}, {"policy", "look_m"}, {"code", "RESOURCE_EXHAUSTED"}}),
            1);
  EXPECT_EQ(m.Value("medakv_requests_total", {{"method", "CompressCache"}, {"policy", "look_m"}, {"code", "OK"}}), 0);
  EXPECT_EQ(m.Value("medakv_received_bytes_total", {{"method", "CompressCache"}}), 250);
  EXPECT_EQ(m.Histogram("medakv_request_duration_seconds", {{"method", "CompressCache"}}).sample_count, 1u);

  CallMetrics nothing(nullptr, Method::kStats);  // records nothing, and does not crash
  nothing.ObserveStage(server::Stage::kSend, 1.0);
  nothing.End(absl::StatusCode::kOk);

  EXPECT_STREQ(server::CodeName(absl::StatusCode::kOk), "OK");
  EXPECT_STREQ(server::CodeName(absl::StatusCode::kUnauthenticated), "UNAUTHENTICATED");
  EXPECT_STREQ(server::CodeName(static_cast<absl::StatusCode>(99)), "UNKNOWN");
}

}  // namespace
}  // namespace medakv
