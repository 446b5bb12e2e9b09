// Limits of the server: the in-flight slots and their bounded wait,
// deadlines, shutdown with calls in flight, and the Admission class itself.
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <atomic>
#include <thread>

#include "absl/synchronization/notification.h"
#include "client/cpp/remote.h"
#include "medakv/v1/medakv.grpc.pb.h"
#include "service/server/admission.h"
#include "service/server/server.h"
#include "tests/kernels/test_util.h"

namespace medakv {
namespace {

using server::Admission;
using server::MedakvServer;
using server::ServerOptions;

// ---- Admission ------------------------------------------------------------------

TEST(AdmissionTest, GrantsUpToSlotsThenQueuesInOrder) {
  Admission a(2, absl::Seconds(60));
  std::vector<int> order;
  absl::Mutex mu;
  auto record = [&](int id) {
    return [&, id](absl::Status s) {
      ASSERT_TRUE(s.ok()) << s;
      absl::MutexLock lock(&mu);
      order.push_back(id);
    };
  };
  a.Acquire(Admission::NewTicket(), record(1));
  a.Acquire(Admission::NewTicket(), record(2));
  a.Acquire(Admission::NewTicket(), record(3));
  a.Acquire(Admission::NewTicket(), record(4));
  EXPECT_EQ(a.in_use(), 2);
  EXPECT_EQ(a.waiting(), 2);
  a.Release();  // the slot passes to 3
  a.Release();  // and to 4
  EXPECT_EQ(order, (std::vector<int>{1, 2, 3, 4}));
  EXPECT_EQ(a.in_use(), 2);
  a.Release();
  a.Release();
  EXPECT_EQ(a.in_use(), 0);
}

// --max_queued: beyond max_waiting waiters the next is refused at once
// (RESOURCE_EXHAUSTED before Acquire returns); 0 lets none wait; a freed
// place in the queue takes a waiter again.
TEST(AdmissionTest, BoundedQueueRefusesAtOnce) {
  Admission a(1, absl::Seconds(60), 2);
  a.Acquire(Admission::NewTicket(), [](absl::Status s) { EXPECT_TRUE(s.ok()) << s; });
  std::vector<absl::Status> got(4, absl::UnknownError("not called"));
  std::vector<uint64_t> tickets;
  for (int i = 0; i < 4; ++i) {
    tickets.push_back(Admission::NewTicket());
    a.Acquire(tickets.back(), [&got, i](absl::Status s) { got[i] = std::move(s); });
  }
  EXPECT_EQ(a.waiting(), 2);
  EXPECT_EQ(got[0].code(), absl::StatusCode::kUnknown);  // waiting
  EXPECT_EQ(got[1].code(), absl::StatusCode::kUnknown);
  for (int i : {2, 3}) {
    EXPECT_EQ(got[i].code(), absl::StatusCode::kResourceExhausted) << got[i];
    EXPECT_NE(got[i].message().find("--max_queued"), absl::string_view::npos) << got[i];
  }
  a.Cancel(tickets[0]);  // a place frees
  got[2] = absl::UnknownError("not called");
  a.Acquire(tickets[2], [&got](absl::Status s) { got[2] = std::move(s); });
  EXPECT_EQ(got[2].code(), absl::StatusCode::kUnknown);  // waiting again
  a.Release();  // to tickets[1]
  EXPECT_TRUE(got[1].ok()) << got[1];
  a.Release();  // to tickets[2]
  EXPECT_TRUE(got[2].ok()) << got[2];
  a.Release();
  EXPECT_EQ(a.in_use(), 0);

  Admission none(1, absl::Seconds(60), 0);
  none.Acquire(Admission::NewTicket(), [](absl::Status s) { EXPECT_TRUE(s.ok()) << s; });
  absl::Status refused = absl::UnknownError("not called");
  none.Acquire(Admission::NewTicket(), [&](absl::Status s) { refused = std::move(s); });
  EXPECT_EQ(refused.code(), absl::StatusCode::kResourceExhausted) << refused;
  EXPECT_EQ(none.waiting(), 0);
  none.Release();
}

TEST(AdmissionTest, CancelledWaiterGetsCancelledAndLosesItsPlace) {
  Admission a(1, absl::Seconds(60));
  a.Acquire(Admission::NewTicket(), [](absl::Status s) { EXPECT_TRUE(s.ok()); });
  const uint64_t t = Admission::NewTicket();
  absl::Status got = absl::UnknownError("not called");
  a.Acquire(t, [&](absl::Status s) { got = s; });
  a.Cancel(t);
  EXPECT_EQ(got.code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(a.waiting(), 0);
  a.Release();
  EXPECT_EQ(a.in_use(), 0);
  a.Cancel(t);  // a second cancel is a no-op
}

TEST(AdmissionTest, WaitIsBounded) {
  Admission a(1, absl::Milliseconds(50));
  a.Acquire(Admission::NewTicket(), [](absl::Status) {});
  absl::Notification done;
  absl::Status got;
  a.Acquire(Admission::NewTicket(), [&](absl::Status s) {
    got = s;
    done.Notify();
  });
  ASSERT_TRUE(done.WaitForNotificationWithTimeout(absl::Seconds(10)));
  EXPECT_EQ(got.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(std::string(got.message()).find("--max_inflight"), std::string::npos) << got;
  EXPECT_EQ(a.in_use(), 1);
}

TEST(AdmissionTest, DestructionCancelsWaiters) {
  absl::Status got;
  {
    Admission a(1, absl::Seconds(60));
    a.Acquire(Admission::NewTicket(), [](absl::Status) {});
    a.Acquire(Admission::NewTicket(), [&](absl::Status s) { got = s; });
  }
  EXPECT_EQ(got.code(), absl::StatusCode::kCancelled);
}

// ---- the server's limits -----------------------------------------------------------

struct OneLayer {
  test::HostTensor key, value, query;
  CacheInput input;
};

OneLayer MakeOneLayer(int64_t tokens) {
  OneLayer c;
  c.key = test::RandomTensor(DType::kFloat32, Layout::kHND, 2, tokens, 64, 1);
  c.value = test::RandomTensor(DType::kFloat32, Layout::kHND, 2, tokens, 64, 2);
  c.query = test::RandomTensor(DType::kFloat32, Layout::kHND, 4, 32, 64, 3);
  c.input.kv_heads = 2;
  c.input.q_heads = 4;
  c.input.head_dim = 64;
  c.input.tokens = tokens;
  c.input.dtype = DType::kFloat32;
  LayerInput layer;
  layer.key = c.key.view();
  layer.value = c.value.view();
  layer.query = c.query.view();
  c.input.layers.push_back(layer);
  return c;
}

v1::CompressRequest HeaderFor(const CacheInput& in) {
  v1::CompressRequest req;
  v1::CompressHeader* h = req.mutable_header();
  h->mutable_shape()->set_layers(1);
  h->mutable_shape()->set_kv_heads(in.kv_heads);
  h->mutable_shape()->set_q_heads(in.q_heads);
  h->mutable_shape()->set_head_dim(in.head_dim);
  h->mutable_shape()->set_tokens(in.tokens);
  h->mutable_shape()->set_dtype(v1::DTYPE_FLOAT32);
  h->set_stats(v1::STATS_FORM_QUERIES);
  h->set_q_tokens(in.layers[0].query.tokens);
  return req;
}

std::unique_ptr<MedakvServer> Start(ServerOptions o) {
  o.listen = "127.0.0.1:0";
  o.backend = "cpu";
  absl::StatusOr<std::unique_ptr<MedakvServer>> s = MedakvServer::Start(o);
  EXPECT_TRUE(s.ok()) << s.status();
  return s.ok() ? *std::move(s) : nullptr;
}

// A Compress call that sent its header (and so holds a slot) and waits.
struct HeldCall {
  grpc::ClientContext ctx;
  std::unique_ptr<grpc::ClientReaderWriter<v1::CompressRequest, v1::CompressResponse>> stream;
};

std::unique_ptr<HeldCall> HoldSlot(v1::Medakv::Stub& stub, const CacheInput& in) {
  auto call = std::make_unique<HeldCall>();
  call->stream = stub.Compress(&call->ctx);
  EXPECT_TRUE(call->stream->Write(HeaderFor(in)));
  return call;
}

int InflightOnServer(v1::Medakv::Stub& stub) {
  grpc::ClientContext ctx;
  v1::StatsResponse r;
  EXPECT_TRUE(stub.Stats(&ctx, v1::StatsRequest(), &r).ok());
  return static_cast<int>(r.inflight_compressions());
}

void WaitInflight(v1::Medakv::Stub& stub, int want) {
  for (int i = 0; i < 500 && InflightOnServer(stub) != want; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ASSERT_EQ(InflightOnServer(stub), want);
}

TEST(ServerLimitsTest, BusySlotsAnswerResourceExhaustedAfterTheQueueTimeout) {
  ServerOptions o;
  o.max_inflight = 1;
  o.queue_timeout = absl::Milliseconds(100);
  auto server = Start(o);
  ASSERT_NE(server, nullptr);
  auto stub = v1::Medakv::NewStub(server->InProcessChannel());
  OneLayer c = MakeOneLayer(64);
  auto held = HoldSlot(*stub, c.input);
  WaitInflight(*stub, 1);
  absl::StatusOr<RemoteResult> r = CompressRemote(*stub, c.input, CompressOptions{});
  EXPECT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted) << r.status();
  EXPECT_NE(std::string(r.status().message()).find("--max_inflight"), std::string::npos) << r.status();
  held->ctx.TryCancel();
  held->stream->Finish();
  WaitInflight(*stub, 0);
  // The slot is free again.
  EXPECT_TRUE(CompressRemote(*stub, c.input, CompressOptions{}).ok());
}

TEST(ServerLimitsTest, AWaitingCallRunsWhenTheSlotFrees) {
  ServerOptions o;
  o.max_inflight = 1;
  o.queue_timeout = absl::Seconds(30);
  auto server = Start(o);
  ASSERT_NE(server, nullptr);
  auto stub = v1::Medakv::NewStub(server->InProcessChannel());
  OneLayer c = MakeOneLayer(64);
  const absl::StatusOr<CompressResult> want = Compress(c.input, CompressOptions{}, *MakeCpuBackend());
  ASSERT_TRUE(want.ok());
  auto held = HoldSlot(*stub, c.input);
  WaitInflight(*stub, 1);
  absl::StatusOr<RemoteResult> waiting;
  std::thread t([&] { waiting = CompressRemote(*stub, c.input, CompressOptions{}); });
  WaitInflight(*stub, 2);
  held->ctx.TryCancel();  // frees the slot
  held->stream->Finish();
  t.join();
  ASSERT_TRUE(waiting.ok()) << waiting.status();
  EXPECT_EQ(waiting->result.layers[0].key, want->layers[0].key);
}

TEST(ServerLimitsTest, DeadlineShorterThanTheWork) {
  auto server = Start(ServerOptions{});
  ASSERT_NE(server, nullptr);
  auto stub = v1::Medakv::NewStub(server->InProcessChannel());
  OneLayer c = MakeOneLayer(4096);
  RemoteOptions r;
  r.timeout = absl::Milliseconds(1);
  absl::StatusOr<RemoteResult> got = CompressRemote(*stub, c.input, CompressOptions{}, r);
  EXPECT_EQ(got.status().code(), absl::StatusCode::kDeadlineExceeded) << got.status();
  WaitInflight(*stub, 0);  // the call released everything
}

TEST(ServerLimitsTest, ShutdownEndsCallsThatOutliveTheGrace) {
  ServerOptions o;
  o.shutdown_grace = absl::Milliseconds(100);
  auto server = Start(o);
  ASSERT_NE(server, nullptr);
  auto stub = v1::Medakv::NewStub(server->InProcessChannel());
  OneLayer c = MakeOneLayer(64);
  auto held = HoldSlot(*stub, c.input);
  WaitInflight(*stub, 1);
  server->Shutdown();
  server->Wait();
  v1::CompressResponse r;
  EXPECT_FALSE(held->stream->Read(&r));
  EXPECT_FALSE(held->stream->Finish().ok());
}

}  // namespace
}  // namespace medakv
