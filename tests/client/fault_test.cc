// Fault injection against real medakv-server processes on loopback ports
// (tests/client/server_process.h): a client process killed in the middle of
// an upload, a server killed and restarted under concurrent clients, the
// store filled past its byte budget by concurrent uploads and downloads, a
// deadline shorter than the work, and a slow reader of a large download.
// Each test checks what the server holds afterwards (Stats, ListCaches,
// /proc) and that every byte that comes back is the byte that was sent.
#include <arpa/inet.h>
#include <fcntl.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <limits>
#include <map>
#include <optional>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "client/cpp/client.h"
#include "client/cpp/remote.h"
#include "kernels/backend.h"
#include "medakv/v1/medakv.grpc.pb.h"
#include "service/server/convert.h"
#include "tests/client/client_test_util.h"
#include "tests/client/server_process.h"
#include "tests/service/test_cache.h"

extern char** environ;

namespace medakv {
namespace {

using test::CacheParams;
using test::HostTensor;
using test::LocalCompress;
using test::MakeTestCache;
using test::Meda;
using test::NewClient;
using test::PollUntil;
using test::ServerProcess;
using test::StartServer;
using test::TestCache;

// ---- helpers ----------------------------------------------------------------------------

// Options() with the shared-memory mode.
ClientOptions Options(const std::string& target, SharedMemoryMode shm = SharedMemoryMode::kAuto) {
  ClientOptions o = test::Options({target});
  o.shared_memory = shm;
  return o;
}

// What one server holds: its Stats (host tier) and its ListCaches.
struct StoreView {
  int64_t capacity = -1;
  int64_t used = -1;
  int64_t entries = -1;
  int64_t evictions = -1;
  int64_t inflight = -1;
  int64_t listed_bytes = 0;
  std::vector<v1::CacheInfo> caches;  // by id
};

absl::StatusOr<StoreView> ReadStore(Client& client) {
  absl::StatusOr<ClusterStats> stats = client.Stats();
  if (!stats.ok()) return stats.status();
  StoreView v;
  for (const v1::TierStats& t : stats->total.tiers()) {
    if (t.tier() != "host") continue;
    v.capacity = t.capacity_bytes();
    v.used = t.used_bytes();
    v.entries = t.entries();
    v.evictions = t.evictions();
  }
  if (v.used < 0) return absl::InternalError("Stats has no host tier");
  v.inflight = stats->total.inflight_compressions();
  absl::StatusOr<CacheList> list = client.ListCaches("", 1000);
  if (!list.ok()) return list.status();
  for (const ListedCache& l : list->caches) {
    v.listed_bytes += l.info.bytes();
    v.caches.push_back(l.info);
  }
  return v;
}

std::string Describe(const StoreView& v) {
  return absl::StrCat("used_bytes ", v.used, ", entries ", v.entries, ", listed ", v.caches.size(), " (",
                      v.listed_bytes, " bytes), evictions ", v.evictions, ", inflight_compressions ", v.inflight);
}

// The bytes the store charges for an uploaded cache with its statistics:
// keys, values, queries (or scores), int32 positions per kv head and token,
// and its visual spans.
int64_t EntryBytes(const CacheInput& in) {
  int64_t total = static_cast<int64_t>(SpansFromModality(in.modality).size() * sizeof(ModalitySpan));
  for (const LayerInput& l : in.layers) {
    total += l.key.NumBytes() + l.value.NumBytes() + in.kv_heads * in.tokens * 4;
    if (in.stats == StatsForm::kQueries) {
      total += l.query.NumBytes() + static_cast<int64_t>(l.query_positions.size()) * 4;
    } else {
      total += l.score_heads * in.tokens * 4;
    }
  }
  return total;
}

// Empty when a downloaded (uncompressed) cache holds exactly the uploaded keys
// and values, and positions 0..T-1 for every head; else what differs.
std::string FetchedDiff(const FetchedCache& got, const CacheInput& in) {
  if (got.layer_begin != 0 || got.layers.size() != in.layers.size()) {
    return absl::StrCat("layers [", got.layer_begin, ", +", got.layers.size(), "), want ", in.layers.size());
  }
  for (size_t l = 0; l < in.layers.size(); ++l) {
    const LayerResult& r = got.layers[l];
    const LayerInput& want = in.layers[l];
    if (r.budget != in.tokens) return absl::StrCat("layer ", l, " budget ", r.budget);
    if (static_cast<int64_t>(r.key.size()) != want.key.NumBytes() ||
        std::memcmp(r.key.data(), want.key.data, r.key.size()) != 0) {
      return absl::StrCat("layer ", l, " keys differ");
    }
    if (static_cast<int64_t>(r.value.size()) != want.value.NumBytes() ||
        std::memcmp(r.value.data(), want.value.data, r.value.size()) != 0) {
      return absl::StrCat("layer ", l, " values differ");
    }
    if (static_cast<int64_t>(r.positions.size()) != in.kv_heads * in.tokens) {
      return absl::StrCat("layer ", l, " has ", r.positions.size(), " positions");
    }
    for (int64_t i = 0; i < in.kv_heads * in.tokens; ++i) {
      if (r.positions[i] != i % in.tokens) return absl::StrCat("layer ", l, " position ", i, " is ", r.positions[i]);
    }
  }
  return "";
}

// Empty when two compression results are the same bit for bit; else what differs.
std::string ResultDiff(const CompressResult& got, const CompressResult& want) {
  if (got.layers.size() != want.layers.size()) return absl::StrCat(got.layers.size(), " layers");
  if (got.tokens_in != want.tokens_in || got.tokens_kept != want.tokens_kept) {
    return absl::StrCat("tokens ", got.tokens_in, "/", got.tokens_kept, ", want ", want.tokens_in, "/",
                        want.tokens_kept);
  }
  for (size_t l = 0; l < want.layers.size(); ++l) {
    const LayerResult& a = got.layers[l];
    const LayerResult& b = want.layers[l];
    if (a.budget != b.budget || a.entropy != b.entropy || a.alpha != b.alpha || a.positions != b.positions ||
        a.key != b.key || a.value != b.value) {
      return absl::StrCat("layer ", l, " differs");
    }
  }
  return "";
}

// Kills (SIGKILL) and reaps a child process when it goes out of scope, also
// when an assertion returns early.
class ChildProcess {
 public:
  explicit ChildProcess(pid_t pid) : pid_(pid) {}
  ~ChildProcess() { Kill(); }
  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;
  // SIGKILL and wait; the wait status (-1 when already reaped).
  int Kill() {
    if (pid_ <= 0) return -1;
    kill(pid_, SIGKILL);
    int status = 0;
    while (waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
    }
    pid_ = -1;
    return status;
  }

 private:
  pid_t pid_;
};

// Sets threads that loop until `stop` and joins them when it goes out of
// scope (also on an early return), so that no thread outlives the test.
class Threads {
 public:
  explicit Threads(std::atomic<bool>* stop) : stop_(stop) {}
  ~Threads() { Join(); }
  void Add(std::function<void()> f) { threads_.emplace_back(std::move(f)); }
  void Join() {
    stop_->store(true);
    for (std::thread& t : threads_) {
      if (t.joinable()) t.join();
    }
  }

 private:
  std::atomic<bool>* stop_;
  std::vector<std::thread> threads_;
};

// Errors that threads report, for the main thread to check.
class Problems {
 public:
  void Add(std::string what) {
    absl::MutexLock l(&mu_);
    ++count_;
    if (list_.size() < 40) list_.push_back(std::move(what));
  }
  int count() const {
    absl::MutexLock l(&mu_);
    return count_;
  }
  std::string Text() const {
    absl::MutexLock l(&mu_);
    std::string s;
    for (const std::string& p : list_) absl::StrAppend(&s, "\n  ", p);
    return s;
  }

 private:
  mutable absl::Mutex mu_;
  int count_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<std::string> list_ ABSL_GUARDED_BY(mu_);
};

// ---- 1. a client killed in the middle of an upload -----------------------------------------

// The child process of ClientKilledMidUpload is this test binary again
// (fork, then exec, so that the child starts gRPC from scratch rather than
// inheriting the parent's threads and locks): with this variable set
// ("<target>,<pipe fd>") the test body uploads part of a cache and blocks.
constexpr char kUploaderEnv[] = "MEDAKV_FAULT_TEST_UPLOADER";
constexpr char kKilledId[] = "killed-upload";
constexpr int64_t kUploadChunkBytes = int64_t{64} << 10;

CacheParams UploadParams() {
  CacheParams p;
  p.layers = 4;
  p.kv_heads = 2;
  p.group = 2;
  p.tokens = 4096;
  p.head_dim = 64;  // keys and values 1 MiB per layer
  p.seed = 4242;
  return p;
}

// The child's side: a raw PutCache stream with the header, the keys of layer
// 0 and half of its values (the rest never comes), then a byte on the pipe,
// then nothing until the parent's SIGKILL. Never returns.
[[noreturn]] void UploadPartOfACacheThenBlock(const char* arg) {
  auto fail = [](const std::string& why) {
    std::cerr << "uploader child: " << why << std::endl;
    _exit(2);
  };
  const std::vector<std::string> parts = absl::StrSplit(arg, ',');
  int fd = -1;
  if (parts.size() != 2 || !absl::SimpleAtoi(parts[1], &fd)) fail(absl::StrCat("bad ", kUploaderEnv, "=", arg));
  TestCache c = MakeTestCache(UploadParams());
  absl::StatusOr<CacheSpec> spec = SpecFromInput(c.input);
  if (!spec.ok()) fail(spec.status().ToString());
  std::unique_ptr<v1::Medakv::Stub> stub =
      v1::Medakv::NewStub(grpc::CreateChannel(parts[0], grpc::InsecureChannelCredentials()));
  grpc::ClientContext context;
  v1::PutCacheResponse response;
  std::unique_ptr<grpc::ClientWriter<v1::PutCacheRequest>> writer = stub->PutCache(&context, &response);
  v1::PutCacheRequest request;
  v1::PutCacheHeader* header = request.mutable_header();
  header->set_cache_id(kKilledId);
  ToProto(*spec, header);
  if (!writer->Write(request)) fail("the header was not sent");
  auto send = [&](int32_t layer, v1::TensorKind kind, int64_t offset, const uint8_t* data, int64_t n) {
    request.Clear();
    v1::TensorChunk* chunk = request.mutable_chunk();
    chunk->set_layer(layer);
    chunk->set_tensor(kind);
    chunk->set_offset(offset);
    chunk->set_data(data, static_cast<size_t>(n));
    return writer->Write(request);
  };
  const LayerInput& l0 = c.input.layers[0];
  if (!SendTensor(0, v1::TENSOR_KIND_KEY, l0.key.data, l0.key.NumBytes(), kUploadChunkBytes, send) ||
      !SendTensor(0, v1::TENSOR_KIND_VALUE, l0.value.data, l0.value.NumBytes() / 2, kUploadChunkBytes, send)) {
    fail("the stream broke during the upload");
  }
  if (write(fd, "1", 1) != 1) fail("cannot write to the pipe");
  close(fd);
  // Blocked, the stream open, until SIGKILL (or the parent's death: PR_SET_PDEATHSIG).
  for (int i = 0; i < 600; ++i) std::this_thread::sleep_for(std::chrono::seconds(1));
  fail("not killed within 600 s");
  _exit(2);
}

TEST(FaultTest, ClientKilledMidUpload) {
  if (const char* uploader = std::getenv(kUploaderEnv)) UploadPartOfACacheThenBlock(uploader);

  const std::unique_ptr<ServerProcess> server = StartServer();
  ASSERT_NE(server, nullptr);
  const std::unique_ptr<Client> observer = NewClient(Options(server->target(), SharedMemoryMode::kOff));
  ASSERT_NE(observer, nullptr);
  absl::StatusOr<StoreView> before = ReadStore(*observer);
  ASSERT_TRUE(before.ok()) << before.status();
  ASSERT_EQ(before->used, 0);
  ASSERT_EQ(before->entries, 0);

  // The child: this binary, running this test with kUploaderEnv set. Every
  // argument and the environment are built before the fork (the child only
  // makes async-signal-safe calls before exec).
  std::error_code ec;
  const std::string self = std::filesystem::read_symlink("/proc/self/exe", ec).string();
  ASSERT_FALSE(ec) << ec.message();
  int fds[2];
  ASSERT_EQ(pipe2(fds, O_CLOEXEC), 0) << std::strerror(errno);
  std::vector<std::string> args = {self, "--gtest_filter=FaultTest.ClientKilledMidUpload"};
  std::vector<std::string> env = {absl::StrCat(kUploaderEnv, "=", server->target(), ",", fds[1])};
  for (char** e = environ; *e != nullptr; ++e) {
    if (!absl::StartsWith(*e, absl::StrCat(kUploaderEnv, "="))) env.emplace_back(*e);
  }
  std::vector<char*> argv, envp;
  for (std::string& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  for (std::string& e : env) envp.push_back(e.data());
  envp.push_back(nullptr);
  const pid_t parent = getpid();
  const pid_t pid = fork();
  if (pid == 0) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent) _exit(126);
    close(fds[0]);
    fcntl(fds[1], F_SETFD, 0);  // the write end survives the exec
    const int devnull = open("/dev/null", O_WRONLY | O_CLOEXEC);
    if (devnull >= 0) dup2(devnull, STDOUT_FILENO);  // the child's gtest chatter; stderr stays
    execve(argv[0], argv.data(), envp.data());
    _exit(127);
  }
  close(fds[1]);
  ASSERT_GT(pid, 0) << std::strerror(errno);
  ChildProcess child(pid);
  const absl::Time forked = absl::Now();

  // Wait for the child's byte: the header and part of the chunks are sent.
  pollfd p{fds[0], POLLIN, 0};
  char byte = 0;
  const ssize_t n = poll(&p, 1, 60'000) == 1 ? read(fds[0], &byte, 1) : -1;
  close(fds[0]);
  ASSERT_EQ(n, 1) << "the uploader child did not report within 60 s (it exited or hung; its stderr is above)";
  ASSERT_EQ(byte, '1');

  // The upload is in progress: the server holds store space for the bytes
  // that arrived (not the whole cache's, on the header's word) and stores
  // nothing yet.
  int64_t reserved = 0;
  absl::StatusOr<StoreView> during;
  EXPECT_TRUE(PollUntil(absl::Seconds(30), [&] {
    during = ReadStore(*observer);
    reserved = during.ok() ? during->used : 0;
    return reserved > 0;
  })) << "no reservation seen within 30 s";
  ASSERT_TRUE(during.ok()) << during.status();
  EXPECT_EQ(during->entries, 0);
  EXPECT_TRUE(during->caches.empty());

  // SIGKILL: no WritesDone, no cancel, the socket just closes.
  const absl::Time killed = absl::Now();
  const int status = child.Kill();
  EXPECT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL)
      << "the uploader ended before the kill (wait status " << status << ")";

  // The server notices the dead connection and releases the reservation.
  absl::StatusOr<StoreView> after;
  const bool released = PollUntil(absl::Seconds(30), [&] {
    after = ReadStore(*observer);
    return after.ok() && after->used == 0;
  });
  ASSERT_TRUE(after.ok()) << after.status();
  std::cout << "killed upload: " << reserved << " bytes reserved " << absl::ToDoubleSeconds(killed - forked)
            << " s after the fork, released " << absl::ToDoubleSeconds(absl::Now() - killed) << " s after the kill"
            << std::endl;
  EXPECT_TRUE(released) << "30 s after the kill: " << Describe(*after);
  EXPECT_EQ(after->used, 0);
  EXPECT_EQ(after->entries, 0);
  EXPECT_TRUE(after->caches.empty());
  EXPECT_EQ(observer->GetCache(kKilledId).status().code(), absl::StatusCode::kNotFound);

  // The same id uploads whole afterwards (nothing left of the broken upload:
  // no ALREADY_EXISTS) and comes back byte for byte.
  const std::unique_ptr<Client> client = NewClient(Options(server->target(), SharedMemoryMode::kOff));
  ASSERT_NE(client, nullptr);
  TestCache c = MakeTestCache(UploadParams());
  absl::StatusOr<PutResult> put = client->PutCache(kKilledId, c.input);
  ASSERT_TRUE(put.ok()) << put.status();
  EXPECT_EQ(put->info.bytes(), EntryBytes(c.input));
  EXPECT_LE(reserved, put->info.bytes()) << "the broken upload held more than the whole cache's bytes";
  absl::StatusOr<FetchedCache> got = client->GetCache(kKilledId);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(FetchedDiff(*got, c.input), "");
  absl::StatusOr<StoreView> last = ReadStore(*observer);
  ASSERT_TRUE(last.ok()) << last.status();
  EXPECT_EQ(last->used, put->info.bytes());
  EXPECT_EQ(last->entries, 1);
}

// ---- 2. the server killed and restarted under concurrent clients ---------------------------

// Retries seen on this thread (ClientOptions::on_retry runs on the thread of
// the attempt; with one replica, the calling thread).
thread_local int retries_on_this_thread = 0;

TEST(FaultTest, ServerKilledAndRestartedWhileClientsRun) {
  std::unique_ptr<ServerProcess> server = StartServer();
  ASSERT_NE(server, nullptr);
  const int port = server->port();
  const std::string target = server->target();
  std::atomic<int> retries{0};
  auto options = [&](SharedMemoryMode mode) {
    ClientOptions o = Options(target, mode);
    o.deadline = absl::Seconds(30);  // covers a restart, also under sanitizers
    o.retry.max_attempts = 1000;     // bounded by the deadline
    o.retry.max_backoff = absl::Milliseconds(200);
    o.on_retry = [&](const RetryEvent&) {
      retries.fetch_add(1);
      ++retries_on_this_thread;
    };
    return o;
  };
  // Half the threads send through shared memory (their regions die with the
  // server and must be registered again), half through the socket.
  const std::unique_ptr<Client> shm = NewClient(options(SharedMemoryMode::kAuto));
  const std::unique_ptr<Client> socket = NewClient(options(SharedMemoryMode::kOff));
  ASSERT_NE(shm, nullptr);
  ASSERT_NE(socket, nullptr);
  CacheParams params;
  params.layers = 3;
  params.tokens = 160;
  TestCache c = MakeTestCache(params);
  const CompressOptions meda = Meda(0.25);
  const CompressResult want = LocalCompress(c.input, meda);

  constexpr int kThreads = 4;
  // 0: the first server; 1: killed, the new one not yet up; 2: restarted.
  std::atomic<int> generation{0};
  struct Tally {
    std::atomic<int> ok_before{0};  // whole iterations (every call OK) on the first server
    std::atomic<int> ok_after{0};   // whole iterations that started after the restart
    std::atomic<int> unavailable{0};
    std::atomic<int> lost{0};       // GetCache NOT_FOUND: the entry was on the killed server
    std::atomic<int> crossed{0};    // idempotent calls retried (UNAVAILABLE), then answered by the new server
  };
  std::array<Tally, kThreads> tally;
  Problems problems;
  absl::Mutex mu;
  std::vector<std::string> stored_after;  // ids that iterations started after the restart stored

  std::atomic<bool> stop{false};
  Threads threads(&stop);
  for (int t = 0; t < kThreads; ++t) {
    threads.Add([&, t] {
      Client& client = t % 2 == 0 ? *shm : *socket;
      Tally& mine = tally[t];
      auto failed = [&](const std::string& call, const absl::Status& s) {
        if (s.code() == absl::StatusCode::kUnavailable) {
          mine.unavailable.fetch_add(1);
        } else {
          problems.Add(absl::StrCat(call, ": ", s.ToString()));
        }
      };
      for (int i = 0; !stop.load(); ++i) {
        const int g0 = generation.load();
        const std::string id = absl::StrCat("restart-", t, "-", i);
        bool ok = true;
        // Not idempotent: UNAVAILABLE while the server is down, never retried.
        absl::StatusOr<PutResult> put = client.PutCache(id, c.input);
        if (!put.ok()) {
          ok = false;
          failed(absl::StrCat("PutCache ", id), put.status());
        }
        // Idempotent: retried until the new server answers. NOT_FOUND only
        // when the entry went down with the killed server.
        const int retries_before_get = retries_on_this_thread;
        absl::StatusOr<FetchedCache> got = client.GetCache(id);
        if (retries_on_this_thread != retries_before_get &&
            (got.ok() || got.status().code() == absl::StatusCode::kNotFound)) {
          mine.crossed.fetch_add(1);
        }
        if (got.ok()) {
          if (const std::string diff = FetchedDiff(*got, c.input); !diff.empty()) {
            problems.Add(absl::StrCat("GetCache ", id, ": wrong data: ", diff));
          }
        } else if (got.status().code() == absl::StatusCode::kNotFound && (!put.ok() || generation.load() != g0)) {
          ok = false;
          mine.lost.fetch_add(1);
        } else {
          ok = false;
          problems.Add(absl::StrCat("GetCache ", id, " (put ", put.status().ToString(), "): ", got.status().ToString()));
        }
        absl::StatusOr<RemoteResult> compressed = client.Compress(c.input, meda);
        if (compressed.ok()) {
          if (const std::string diff = ResultDiff(compressed->result, want); !diff.empty()) {
            problems.Add(absl::StrCat("Compress: wrong result: ", diff));
          }
        } else {
          ok = false;
          failed("Compress", compressed.status());
        }
        const int retries_before_stats = retries_on_this_thread;
        absl::StatusOr<ClusterStats> stats = client.Stats();
        if (!stats.ok()) {
          ok = false;
          problems.Add(absl::StrCat("Stats (retried): ", stats.status().ToString()));
        } else if (retries_on_this_thread != retries_before_stats) {
          mine.crossed.fetch_add(1);
        }
        const int g1 = generation.load();
        if (ok && g0 == 0 && g1 == 0) mine.ok_before.fetch_add(1);
        if (ok && g0 == 2) {
          mine.ok_after.fetch_add(1);
          absl::MutexLock l(&mu);
          stored_after.push_back(id);
        }
      }
    });
  }
  auto every = [&](std::atomic<int> Tally::*field, int at_least) {
    return std::all_of(tally.begin(), tally.end(), [&](const Tally& x) { return (x.*field).load() >= at_least; });
  };
  auto tallies = [&] {
    std::string s;
    for (int t = 0; t < kThreads; ++t) {
      absl::StrAppend(&s, "\n  thread ", t, ": ok before ", tally[t].ok_before.load(), ", ok after ",
                      tally[t].ok_after.load(), ", unavailable ", tally[t].unavailable.load(), ", lost ",
                      tally[t].lost.load(), ", crossed ", tally[t].crossed.load());
    }
    return s;
  };

  // Every thread works against the first server, then it dies mid-run.
  ASSERT_TRUE(PollUntil(absl::Seconds(60), [&] { return every(&Tally::ok_before, 1); }))
      << "not every thread succeeded before the kill:" << tallies() << problems.Text();
  generation.store(1);
  server->Kill();
  absl::SleepFor(absl::Milliseconds(300));  // calls meet the dead server meanwhile
  server = StartServer({}, port);
  ASSERT_NE(server, nullptr) << "the server did not restart on port " << port;
  generation.store(2);
  // Every thread works again against the new server.
  const bool recovered = PollUntil(absl::Seconds(60), [&] { return every(&Tally::ok_after, 2); });
  threads.Join();
  EXPECT_TRUE(recovered) << "60 s after the restart:" << tallies();
  std::cout << "kill and restart: retries " << retries.load() << tallies() << std::endl;

  EXPECT_EQ(problems.count(), 0) << "errors other than UNAVAILABLE, or wrong data:" << problems.Text();
  int unavailable = 0, crossed = 0;
  for (const Tally& x : tally) {
    unavailable += x.unavailable.load();
    crossed += x.crossed.load();
  }
  EXPECT_GT(unavailable + retries.load(), 0) << "no call noticed the kill:" << tallies();
  EXPECT_GT(crossed, 0) << "no GetCache or Stats was retried through the restart and answered:" << tallies();
  // The new server holds every entry that iterations after the restart
  // stored, byte accounting exact.
  const std::unique_ptr<Client> observer = NewClient(Options(target, SharedMemoryMode::kOff));
  ASSERT_NE(observer, nullptr);
  absl::StatusOr<StoreView> view;
  const bool quiet = PollUntil(absl::Seconds(10), [&] {
    view = ReadStore(*observer);
    return view.ok() && view->used == view->listed_bytes;
  });
  ASSERT_TRUE(view.ok()) << view.status();
  EXPECT_TRUE(quiet) << Describe(*view);
  EXPECT_EQ(view->entries, static_cast<int64_t>(view->caches.size()));
  std::set<std::string> listed;
  for (const v1::CacheInfo& info : view->caches) listed.insert(info.cache_id());
  for (const std::string& id : stored_after) EXPECT_TRUE(listed.count(id)) << id << " is missing on the new server";
}

// ---- 3. the store filled past its budget under concurrent load -----------------------------

TEST(FaultTest, StoreFilledPastItsBudgetUnderConcurrentLoad) {
  constexpr int kPutThreads = 3, kGetThreads = 2, kIdsPerThread = 16, kIds = kPutThreads * kIdsPerThread;
  // Every id gets its own contents, so a download of the wrong entry shows.
  std::vector<TestCache> caches;
  caches.reserve(kIds);
  for (int i = 0; i < kIds; ++i) {
    CacheParams p;
    p.layers = 2;
    p.kv_heads = 2;
    p.group = 2;
    p.tokens = 256;
    p.head_dim = 64;
    p.seed = 1000 + 7 * static_cast<uint64_t>(i);
    caches.push_back(MakeTestCache(p));
  }
  const int64_t entry = EntryBytes(caches[0].input);
  // Room for 8 entries: more than the uploads (3 reservations) and the
  // downloads (2 readers, each holding an entry until its call ends, maybe
  // a moment after the client returned) can pin at once, so no upload may
  // fail; far fewer than the 48 ids, so most are evicted.
  const int64_t capacity = 8 * entry + entry / 2;
  const std::unique_ptr<ServerProcess> server = StartServer({absl::StrCat("--host_cache_bytes=", capacity)});
  ASSERT_NE(server, nullptr);
  const std::unique_ptr<Client> shm = NewClient(Options(server->target(), SharedMemoryMode::kAuto));
  const std::unique_ptr<Client> socket = NewClient(Options(server->target(), SharedMemoryMode::kOff));
  ASSERT_NE(shm, nullptr);
  ASSERT_NE(socket, nullptr);

  Problems problems;
  absl::Mutex mu;
  std::vector<int> stored;  // ids whose upload completed, in order
  std::atomic<int> puts_ok{0}, gets_ok{0}, gets_missing{0}, putters_left{kPutThreads};
  std::atomic<bool> stop{false};
  {
    Threads threads(&stop);
    for (int t = 0; t < kPutThreads; ++t) {
      threads.Add([&, t] {
        Client& client = t % 2 == 0 ? *shm : *socket;
        for (int k = 0; k < kIdsPerThread; ++k) {
          const int i = t * kIdsPerThread + k;
          const std::string id = absl::StrCat("budget-", i);
          absl::StatusOr<PutResult> put = client.PutCache(id, caches[i].input);
          if (!put.ok()) {
            problems.Add(absl::StrCat("PutCache ", id, ": ", put.status().ToString()));
            continue;
          }
          if (put->info.bytes() != entry) {
            problems.Add(absl::StrCat("PutCache ", id, ": ", put->info.bytes(), " bytes, want ", entry));
          }
          puts_ok.fetch_add(1);
          absl::MutexLock l(&mu);
          stored.push_back(i);
        }
        putters_left.fetch_sub(1);
      });
    }
    for (int t = 0; t < kGetThreads; ++t) {
      threads.Add([&, t] {
        Client& client = t % 2 == 0 ? *socket : *shm;
        std::mt19937 rng(77 + t);
        // Until the uploads are done, and at least 20 downloads each.
        for (int n = 0; putters_left.load() > 0 || n < 20; ++n) {
          int i = -1;
          {
            absl::MutexLock l(&mu);
            if (!stored.empty()) {
              // One of the 10 latest: some still stored, some evicted meanwhile.
              const size_t back = std::min<size_t>(stored.size(), 10);
              i = stored[stored.size() - 1 - rng() % back];
            }
          }
          if (i < 0) {
            std::this_thread::sleep_for(std::chrono::milliseconds(1));
            continue;
          }
          const std::string id = absl::StrCat("budget-", i);
          absl::StatusOr<FetchedCache> got = client.GetCache(id);
          if (got.ok()) {
            gets_ok.fetch_add(1);
            if (got->info.cache_id() != id) problems.Add(absl::StrCat("GetCache ", id, " answered ", got->info.cache_id()));
            if (const std::string diff = FetchedDiff(*got, caches[i].input); !diff.empty()) {
              problems.Add(absl::StrCat("GetCache ", id, ": wrong data: ", diff));
            }
          } else if (got.status().code() == absl::StatusCode::kNotFound) {
            gets_missing.fetch_add(1);
          } else {
            problems.Add(absl::StrCat("GetCache ", id, ": ", got.status().ToString()));
          }
        }
      });
    }
  }  // joined

  std::cout << "past the budget: " << puts_ok.load() << " uploads, " << gets_ok.load() << " downloads, "
            << gets_missing.load() << " NOT_FOUND (evicted)" << std::endl;
  EXPECT_EQ(problems.count(), 0) << problems.Text();
  EXPECT_EQ(puts_ok.load(), kIds);
  EXPECT_GT(gets_ok.load(), 0) << gets_missing.load() << " downloads found nothing";
  // Quiescent: the readers' references are gone (bounded wait: the server
  // drops them when the calls' reactors end), and the accounting is exact.
  absl::StatusOr<StoreView> view;
  const bool quiet = PollUntil(absl::Seconds(10), [&] {
    view = ReadStore(*socket);
    return view.ok() && view->used == view->listed_bytes;
  });
  ASSERT_TRUE(view.ok()) << view.status();
  EXPECT_TRUE(quiet) << Describe(*view);
  EXPECT_EQ(view->used, view->listed_bytes) << Describe(*view);
  EXPECT_EQ(view->entries, static_cast<int64_t>(view->caches.size()));
  EXPECT_EQ(view->capacity, capacity);
  EXPECT_LE(view->used, capacity);
  EXPECT_GE(view->caches.size(), 1u);
  EXPECT_LE(view->caches.size(), 8u);
  // No ttl, no delete, no overwrite: every id not stored was evicted.
  EXPECT_GT(view->evictions, 0);
  EXPECT_EQ(view->evictions, puts_ok.load() - static_cast<int64_t>(view->caches.size())) << Describe(*view);
  for (const v1::CacheInfo& info : view->caches) {
    int i = -1;
    ASSERT_TRUE(absl::StartsWith(info.cache_id(), "budget-") && absl::SimpleAtoi(info.cache_id().substr(7), &i) &&
                i >= 0 && i < kIds)
        << info.cache_id();
    EXPECT_EQ(info.bytes(), entry) << info.cache_id();
    absl::StatusOr<FetchedCache> got = socket->GetCache(info.cache_id());
    ASSERT_TRUE(got.ok()) << info.cache_id() << ": " << got.status();
    EXPECT_EQ(FetchedDiff(*got, caches[i].input), "") << info.cache_id();
  }
}

// ---- 4. a deadline shorter than the work, over loopback -----------------------------------

// The server's Prometheus text, from its metrics port (the log line "metrics
// on port N"), over plain HTTP/1.0.
absl::StatusOr<std::string> ScrapeMetrics(const ServerProcess& server) {
  const std::string log = server.Log();
  const size_t at = log.find("metrics on port ");
  int port = 0;
  if (at == std::string::npos) return absl::NotFoundError("no metrics port in the server's log");
  const size_t begin = at + 16, end = log.find_first_not_of("0123456789", begin);
  if (!absl::SimpleAtoi(log.substr(begin, end - begin), &port)) return absl::InternalError("bad metrics port");
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return absl::ErrnoToStatus(errno, "socket");
  timeval timeout{10, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof(timeout));
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = htons(static_cast<uint16_t>(port));
  std::string response;
  if (connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0) {
    const std::string request = "GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
    if (send(fd, request.data(), request.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(request.size())) {
      char buffer[65536];
      for (ssize_t n; (n = recv(fd, buffer, sizeof(buffer), 0)) > 0;) response.append(buffer, static_cast<size_t>(n));
    }
  }
  close(fd);
  const size_t body = response.find("\r\n\r\n");
  if (!absl::StartsWith(response, "HTTP/1.") || body == std::string::npos) {
    return absl::UnavailableError(absl::StrCat("no answer from /metrics on port ", port, ": ", response));
  }
  return response.substr(body + 4);
}

// medakv_requests_total of `method` by status code (every policy summed).
std::map<std::string, double> RequestsByCode(const std::string& metrics, const std::string& method) {
  std::map<std::string, double> by_code;
  std::istringstream lines(metrics);
  for (std::string line; std::getline(lines, line);) {
    if (!absl::StartsWith(line, "medakv_requests_total{") ||
        line.find(absl::StrCat("method=\"", method, "\"")) == std::string::npos) {
      continue;
    }
    const size_t code = line.find("code=\"");
    const size_t close = line.rfind('}');
    double value = 0;
    if (code == std::string::npos || close == std::string::npos ||
        !absl::SimpleAtod(absl::StripAsciiWhitespace(line.substr(close + 1)), &value)) {
      continue;
    }
    by_code[line.substr(code + 6, line.find('"', code + 6) - code - 6)] += value;
  }
  return by_code;
}

// Calls of `method` that ended with a code other than OK.
double NotOk(const std::map<std::string, double>& by_code) {
  double n = 0;
  for (const auto& [code, count] : by_code) n += code == "OK" ? 0 : count;
  return n;
}

std::string Codes(const std::map<std::string, double>& by_code) {
  std::string s;
  for (const auto& [code, count] : by_code) absl::StrAppend(&s, s.empty() ? "" : ", ", code, " ", count);
  return s.empty() ? "none" : s;
}

TEST(FaultTest, DeadlineShorterThanTheWorkReleasesMemory) {
  const std::unique_ptr<ServerProcess> server = StartServer();
  ASSERT_NE(server, nullptr);
  const std::unique_ptr<Client> client = NewClient(Options(server->target(), SharedMemoryMode::kOff));
  ASSERT_NE(client, nullptr);
  // 8 MiB of keys and values: a compression takes ~0.6 s (measured on 2
  // cores, without sanitizers), 30 times the shorter deadline.
  CacheParams big;
  big.layers = 4;
  big.kv_heads = 2;
  big.group = 4;
  big.tokens = 4096;
  big.head_dim = 64;
  big.q_tokens = 32;
  big.seed = 9;
  TestCache c = MakeTestCache(big);
  constexpr char kId[] = "deadline-stored";
  absl::StatusOr<PutResult> put = client->PutCache(kId, c.input);
  ASSERT_TRUE(put.ok()) << put.status();
  const int64_t stored = put->info.bytes();
  EXPECT_EQ(stored, EntryBytes(c.input));

  CallOptions short_call;
  short_call.deadline = absl::Milliseconds(50);
  const absl::Status in_place = client->CompressCache(kId, Meda(0.2), short_call).status();
  EXPECT_EQ(in_place.code(), absl::StatusCode::kDeadlineExceeded) << in_place;
  const absl::Status streamed = client->Compress(c.input, Meda(0.2), short_call).status();
  EXPECT_EQ(streamed.code(), absl::StatusCode::kDeadlineExceeded) << streamed;

  // The server ends both calls (its metrics count them, not as OK), holds
  // no compression in flight and, in the host tier, the stored entry and
  // nothing else: the expired in-place compression committed nothing.
  const absl::Time expired = absl::Now();
  absl::StatusOr<StoreView> view;
  absl::StatusOr<std::string> metrics;
  std::map<std::string, double> in_place_codes, streamed_codes;
  const bool released = PollUntil(absl::Seconds(30), [&] {
    view = ReadStore(*client);
    metrics = ScrapeMetrics(*server);
    if (!view.ok() || !metrics.ok()) return false;
    in_place_codes = RequestsByCode(*metrics, "CompressCache");
    streamed_codes = RequestsByCode(*metrics, "Compress");
    return NotOk(in_place_codes) + NotOk(streamed_codes) == 2 && view->inflight == 0 && view->used == stored;
  });
  ASSERT_TRUE(view.ok()) << view.status();
  ASSERT_TRUE(metrics.ok()) << metrics.status();
  std::cout << "expired calls: ended on the server " << absl::ToDoubleSeconds(absl::Now() - expired)
            << " s after the client gave up" << std::endl;
  EXPECT_TRUE(released) << "30 s after the deadlines: " << Describe(*view) << "; CompressCache calls ended: "
                        << Codes(in_place_codes) << "; Compress calls ended: " << Codes(streamed_codes);
  EXPECT_EQ(NotOk(in_place_codes), 1) << Codes(in_place_codes);
  EXPECT_EQ(in_place_codes["OK"], 0) << "the expired CompressCache ran to the end";
  EXPECT_EQ(NotOk(streamed_codes), 1) << Codes(streamed_codes);
  EXPECT_EQ(streamed_codes["OK"], 0) << "the expired Compress ran to the end";
  EXPECT_EQ(view->inflight, 0);
  EXPECT_EQ(view->used, stored);
  EXPECT_EQ(view->entries, 1);
  ASSERT_EQ(view->caches.size(), 1u);
  EXPECT_EQ(view->caches[0].cache_id(), kId);
  EXPECT_EQ(view->caches[0].bytes(), stored);
  EXPECT_FALSE(view->caches[0].compressed());

  // The server still answers, right: a compression, and one in place (of a
  // small entry: the big one takes seconds under sanitizers).
  CacheParams small;
  small.tokens = 120;
  TestCache s = MakeTestCache(small);
  const CompressResult want = LocalCompress(s.input, Meda(0.3));
  absl::StatusOr<RemoteResult> compressed = client->Compress(s.input, Meda(0.3));
  ASSERT_TRUE(compressed.ok()) << compressed.status();
  EXPECT_EQ(ResultDiff(compressed->result, want), "");
  ASSERT_TRUE(client->PutCache("deadline-small", s.input).ok());
  absl::StatusOr<v1::CompressCacheResponse> done = client->CompressCache("deadline-small", Meda(0.3));
  ASSERT_TRUE(done.ok()) << done.status();
  EXPECT_TRUE(done->info().compressed());
  EXPECT_EQ(done->summary().tokens_kept(), want.tokens_kept);
  // The server frees a call's slot once its last message is written, which
  // may be just after the client has read it.
  absl::StatusOr<StoreView> last;
  PollUntil(absl::Seconds(10), [&] {
    last = ReadStore(*client);
    return last.ok() && last->inflight == 0;
  });
  ASSERT_TRUE(last.ok()) << last.status();
  EXPECT_EQ(last->used, stored + done->info().bytes());
  EXPECT_EQ(last->entries, 2);
  EXPECT_EQ(last->inflight, 0);
}

// ---- 5. a slow reader of a large download --------------------------------------------------

// VmRSS of a process in bytes, -1 when it cannot be read.
int64_t RssBytes(pid_t pid) {
  std::ifstream in(absl::StrCat("/proc/", pid, "/status"));
  std::string line;
  while (std::getline(in, line)) {
    if (!absl::StartsWith(line, "VmRSS:")) continue;
    std::istringstream fields(line.substr(6));
    int64_t kib = -1;
    fields >> kib;
    return kib < 0 ? -1 : kib * 1024;
  }
  return -1;
}

// Sets an environment variable for the server children started while it
// lives (they inherit the environment), and restores it afterwards.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const std::string& value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old;
    setenv(name, value.c_str(), 1);
  }
  ~ScopedEnv() {
    if (old_) {
      setenv(name_, old_->c_str(), 1);
    } else {
      unsetenv(name_);
    }
  }

 private:
  const char* name_;
  std::optional<std::string> old_;
};

TEST(FaultTest, SlowReaderIsBoundedByFlowControl) {
  // The server's RSS must follow its live memory: glibc's malloc with a
  // fixed mmap threshold (a freed big buffer goes back to the kernel instead
  // of staying resident for reuse, which could hide a server that buffers
  // the whole response in memory freed by the upload), and under
  // AddressSanitizer a small quarantine (8 MiB: freed chunks otherwise stay
  // resident up to 256 MiB; measured growth with it ~10 MiB, with 16 MiB ~20).
  // The server children inherit the environment; it is restored at the end.
  ScopedEnv mmap_threshold("MALLOC_MMAP_THRESHOLD_", "131072");
#if defined(__SANITIZE_ADDRESS__)
  const char* asan = std::getenv("ASAN_OPTIONS");
  ScopedEnv quarantine("ASAN_OPTIONS", absl::StrCat(asan != nullptr ? asan : "", asan != nullptr ? ":" : "",
                                                    "quarantine_size_mb=8:thread_local_quarantine_size_kb=256"));
#endif
  const std::unique_ptr<ServerProcess> server = StartServer();
  ASSERT_NE(server, nullptr);
  const pid_t pid = server->pid();
  ASSERT_GT(pid, 0);

  // 192 MiB of fp16 keys and values (6 layers of 8 heads x 8192 tokens x
  // 128), filled cheaply with finite values, stored without statistics
  // (the defaults allow it: --max_request_bytes and --host_cache_bytes are 8 GiB).
  constexpr int64_t kLayers = 6, kHeads = 8, kTokens = 8192, kDim = 128;
  TestCache c;
  CacheInput& in = c.input;
  in.kv_heads = kHeads;
  in.q_heads = kHeads;
  in.head_dim = kDim;
  in.tokens = kTokens;
  in.dtype = DType::kFloat16;
  in.stats = StatsForm::kPrecomputed;
  uint64_t x = 0x9e3779b97f4a7c15ULL;
  for (int64_t l = 0; l < kLayers; ++l) {
    for (std::vector<HostTensor>* tensors : {&c.keys, &c.values}) {
      HostTensor t(DType::kFloat16, Layout::kHND, kHeads, kTokens, kDim);
      for (uint32_t& w : t.storage) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w = static_cast<uint32_t>(x) & 0x3bff3bffu;  // two fp16 of magnitude < 1
      }
      tensors->push_back(std::move(t));
    }
    c.scores.emplace_back(kHeads * kTokens, 0.5f);
  }
  for (int64_t l = 0; l < kLayers; ++l) {
    LayerInput layer;
    layer.key = c.keys[l].view();
    layer.value = c.values[l].view();
    layer.scores = c.scores[l].data();
    layer.score_heads = kHeads;
    layer.entropy = 1.f;
    in.layers.push_back(layer);
  }
  const int64_t tensor_bytes = kHeads * kTokens * kDim * 2;
  const int64_t positions_bytes = kHeads * kTokens * 4;
  const int64_t total_bytes = kLayers * (2 * tensor_bytes + positions_bytes);
  {
    const std::unique_ptr<Client> client = NewClient(Options(server->target(), SharedMemoryMode::kOff));
    ASSERT_NE(client, nullptr);
    PutOptions kv_only;
    kv_only.with_statistics = false;
    absl::StatusOr<PutResult> put = client->PutCache("large", in, kv_only);
    ASSERT_TRUE(put.ok()) << put.status();
    ASSERT_EQ(put->info.bytes(), total_bytes);
  }

  // Download through the raw stub in 1 MiB messages, reading one every
  // 75 ms for 2.5 s while sampling the server's RSS.
  constexpr int64_t kChunk = int64_t{1} << 20;
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(16 << 20);
  std::unique_ptr<v1::Medakv::Stub> stub = v1::Medakv::NewStub(
      grpc::CreateCustomChannel(server->target(), grpc::InsecureChannelCredentials(), args));
  const int64_t rss_before = RssBytes(pid);
  ASSERT_GT(rss_before, 0);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
  v1::GetCacheRequest request;
  request.set_cache_id("large");
  request.set_max_response_chunk_bytes(kChunk);
  std::unique_ptr<grpc::ClientReader<v1::GetCacheResponse>> reader = stub->GetCache(&context, request);

  // Every chunk is checked where it lands: its tensor's next bytes.
  std::map<std::pair<int32_t, int>, int64_t> received;  // (layer, kind) -> bytes so far
  int64_t received_total = 0, messages = 0;
  std::string mismatch;
  auto check = [&](const v1::GetCacheResponse& m) {
    ++messages;
    if (m.has_info()) {
      if (messages != 1 || m.info().bytes() != total_bytes) mismatch = "unexpected info";
      return;
    }
    if (m.has_layer()) {
      if (m.layer().budget() != kTokens) mismatch = absl::StrCat("layer ", m.layer().layer(), " budget");
      return;
    }
    const v1::TensorChunk& ch = m.chunk();
    if (ch.layer() < 0 || ch.layer() >= kLayers || !ch.has_data()) {
      mismatch = "a chunk outside the cache";
      return;
    }
    int64_t& so_far = received[{ch.layer(), static_cast<int>(ch.tensor())}];
    const std::string& data = ch.data();
    if (ch.offset() != so_far) mismatch = absl::StrCat("layer ", ch.layer(), " out of order");
    so_far += static_cast<int64_t>(data.size());
    received_total += static_cast<int64_t>(data.size());
    if (ch.tensor() == v1::TENSOR_KIND_KEY || ch.tensor() == v1::TENSOR_KIND_VALUE) {
      const HostTensor& want = ch.tensor() == v1::TENSOR_KIND_KEY ? c.keys[ch.layer()] : c.values[ch.layer()];
      if (so_far > tensor_bytes ||
          std::memcmp(static_cast<const char*>(want.data()) + ch.offset(), data.data(), data.size()) != 0) {
        mismatch = absl::StrCat("layer ", ch.layer(), " tensor ", ch.tensor(), " bytes differ at ", ch.offset());
      }
    } else if (ch.tensor() == v1::TENSOR_KIND_POSITIONS) {
      if (so_far > positions_bytes || ch.offset() % 4 != 0 || data.size() % 4 != 0) {
        mismatch = "positions";
        return;
      }
      for (size_t b = 0; b < data.size(); b += 4) {
        int32_t p;
        std::memcpy(&p, data.data() + b, 4);
        if (p != ((ch.offset() + static_cast<int64_t>(b)) / 4) % kTokens) mismatch = "positions differ";
      }
    } else {
      mismatch = "an unexpected tensor kind";
    }
  };

  v1::GetCacheResponse message;
  int64_t rss_max = rss_before;
  const absl::Time slow_until = absl::Now() + absl::Milliseconds(2500);
  while (absl::Now() < slow_until) {
    if (!reader->Read(&message)) break;
    check(message);
    rss_max = std::max(rss_max, RssBytes(pid));
    absl::SleepFor(absl::Milliseconds(75));
    rss_max = std::max(rss_max, RssBytes(pid));
  }
  const int64_t read_slowly = received_total;
  const int64_t growth = rss_max - rss_before;
  std::cout << "slow reader: read " << read_slowly / (1 << 20) << " MiB of " << total_bytes / (1 << 20)
            << " MiB in 2.5 s; server RSS " << rss_before / (1 << 20) << " MiB before, growth at most "
            << growth / (1 << 20) << " MiB" << std::endl;
  // Then the rest, fast.
  while (reader->Read(&message)) check(message);
  const grpc::Status status = reader->Finish();
  ASSERT_TRUE(status.ok()) << status.error_code() << ": " << status.error_message();

  EXPECT_LT(read_slowly, total_bytes / 2) << "the slow phase read most of the entry: it tells little";
  EXPECT_LT(growth, (int64_t{32} << 20) + 4 * kChunk)
      << "the server's RSS grew by " << growth << " bytes while a reader took " << read_slowly << " of "
      << total_bytes << " bytes: it buffers the response instead of waiting for flow control";
  EXPECT_EQ(mismatch, "");
  EXPECT_EQ(received_total, total_bytes);
  for (int32_t l = 0; l < kLayers; ++l) {
    EXPECT_EQ((received[{l, v1::TENSOR_KIND_KEY}]), tensor_bytes) << "layer " << l;
    EXPECT_EQ((received[{l, v1::TENSOR_KIND_VALUE}]), tensor_bytes) << "layer " << l;
    EXPECT_EQ((received[{l, v1::TENSOR_KIND_POSITIONS}]), positions_bytes) << "layer " << l;
  }
}

}  // namespace
}  // namespace medakv
