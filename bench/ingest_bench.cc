// Ingest throughput of Compress (GB/s of KV) beside the machine's limit
// measured in the same process: a plain TCP copy of the same bytes over
// loopback. One process holds the client, a MedakvServer on 127.0.0.1:0 and
// the TCP copy's reader; see bench/README.md ("gRPC ingest").
//
//   build/bench/medakv_ingest_bench            # 256 MiB of KV, 4 and 16 MiB chunks
//   build/bench/medakv_ingest_bench --repeats=9 --chunk_mib=1,4,16
//
// Per configuration: one warm-up call, then --repeats timed calls; the median
// (and the range) of their GB/s is printed; ratios are to the TCP copy's
// median, taken over --repeats copies before and --repeats after the gRPC
// calls. "receive" is the server's summary times.receive_seconds (from
// the admission slot after the header to the last request chunk); "wall" is
// the client's CompressRemote call from start to the summary. The default
// policy (streaming_llm, rho 0.001: 4 sinks and 4 recent tokens per head) has
// no statistics to compute and returns a few KiB, so both are dominated by
// the upload; --policy=full returns the whole cache (wall then measures a
// round trip).
#include <arpa/inet.h>
#include <grpcpp/grpcpp.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "client/cpp/remote.h"
#include "kernels/common/status.h"
#include "service/compress/options.h"
#include "service/compress/pipeline.h"
#include "service/server/server.h"

ABSL_FLAG(int64_t, layers, 8, "Layers of the cache");
ABSL_FLAG(int64_t, kv_heads, 8, "KV heads");
ABSL_FLAG(int64_t, tokens, 8192, "Tokens");
ABSL_FLAG(int64_t, head_dim, 128, "Head size (float16 keys and values)");
ABSL_FLAG(std::string, chunk_mib, "4,16", "Comma list of request chunk sizes in MiB");
ABSL_FLAG(int, repeats, 5, "Timed calls per configuration (after one warm-up)");
ABSL_FLAG(std::string, policy, "streaming_llm", "Policy (streaming_llm: rho 0.001; full: everything comes back)");

namespace medakv {
namespace {

using Clock = std::chrono::steady_clock;
constexpr int64_t kMiB = int64_t{1} << 20;
constexpr int64_t kTcpWriteBytes = 4 * kMiB;  // the TCP copy's write (and read) size

double Seconds(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 == 1 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

absl::Status Errno(const char* what) { return absl::InternalError(absl::StrCat(what, ": ", std::strerror(errno))); }

// RAII file descriptor.
class Fd {
 public:
  explicit Fd(int fd = -1) : fd_(fd) {}
  ~Fd() {
    if (fd_ >= 0) close(fd_);
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int get() const { return fd_; }

 private:
  int fd_;
};

// Seconds to move `n` bytes from `src` to `dst` over a fresh loopback TCP
// connection: a reader thread accepts and reads into `dst` (4 MiB reads);
// this thread writes `src` in 4 MiB writes. The clock runs from the first
// write until the reader has every byte.
absl::StatusOr<double> TcpCopySeconds(const uint8_t* src, uint8_t* dst, int64_t n) {
  Fd listener(socket(AF_INET, SOCK_STREAM, 0));
  if (listener.get() < 0) return Errno("socket");
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  if (bind(listener.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) return Errno("bind");
  if (listen(listener.get(), 1) != 0) return Errno("listen");
  socklen_t len = sizeof(addr);
  if (getsockname(listener.get(), reinterpret_cast<sockaddr*>(&addr), &len) != 0) return Errno("getsockname");

  int64_t received = 0;
  Clock::time_point done;
  std::thread reader([&] {
    Fd conn(accept(listener.get(), nullptr, nullptr));
    if (conn.get() < 0) return;
    while (received < n) {
      const ssize_t r =
          recv(conn.get(), dst + received, static_cast<size_t>(std::min(kTcpWriteBytes, n - received)), 0);
      if (r <= 0) break;
      received += r;
    }
    done = Clock::now();
  });
  Fd client(socket(AF_INET, SOCK_STREAM, 0));
  absl::Status status;
  if (client.get() < 0 || connect(client.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    status = Errno("connect");
  }
  const Clock::time_point start = Clock::now();
  for (int64_t sent = 0; status.ok() && sent < n;) {
    const ssize_t w = send(client.get(), src + sent, static_cast<size_t>(std::min(kTcpWriteBytes, n - sent)), 0);
    if (w <= 0) {
      status = Errno("send");
      break;
    }
    sent += w;
  }
  if (!status.ok()) shutdown(listener.get(), SHUT_RDWR);  // unblock accept
  reader.join();
  if (!status.ok()) return status;
  if (received != n) return absl::InternalError(absl::StrCat("the reader got ", received, " of ", n, " bytes"));
  return Seconds(start, done);
}

// A float16 cache with precomputed statistics (scores per kv head, entropy).
struct Cache {
  std::vector<uint16_t> kv;   // [layers][key, value][kv_heads, tokens, head_dim]
  std::vector<float> scores;  // [layers][kv_heads, tokens]
  CacheInput input;
  int64_t kv_bytes = 0, request_bytes = 0;
};

std::unique_ptr<Cache> MakeCache(int64_t layers, int64_t kv_heads, int64_t tokens, int64_t head_dim) {
  auto c = std::make_unique<Cache>();
  const int64_t per_tensor = kv_heads * tokens * head_dim;
  c->kv.resize(static_cast<size_t>(layers * 2 * per_tensor));
  uint32_t x = 12345;
  for (uint16_t& h : c->kv) {  // finite positive halves in [0.125, 0.25)
    x = x * 1664525u + 1013904223u;
    h = static_cast<uint16_t>(0x3000u | (x >> 22));
  }
  c->scores.resize(static_cast<size_t>(layers * kv_heads * tokens));
  for (size_t i = 0; i < c->scores.size(); ++i) c->scores[i] = static_cast<float>(i % 97) / 97.f;
  CacheInput& in = c->input;
  in.kv_heads = kv_heads;
  in.q_heads = kv_heads;
  in.head_dim = head_dim;
  in.tokens = tokens;
  in.dtype = DType::kFloat16;
  in.layout = Layout::kHND;
  in.stats = StatsForm::kPrecomputed;
  for (int64_t l = 0; l < layers; ++l) {
    LayerInput layer;
    layer.key =
        TensorView{c->kv.data() + (2 * l) * per_tensor, DType::kFloat16, Layout::kHND, kv_heads, tokens, head_dim};
    layer.value =
        TensorView{c->kv.data() + (2 * l + 1) * per_tensor, DType::kFloat16, Layout::kHND, kv_heads, tokens, head_dim};
    layer.scores = c->scores.data() + l * kv_heads * tokens;
    layer.score_heads = kv_heads;
    layer.entropy = 1.f + 0.1f * static_cast<float>(l);
    in.layers.push_back(layer);
  }
  c->kv_bytes = static_cast<int64_t>(c->kv.size() * sizeof(uint16_t));
  c->request_bytes = c->kv_bytes + static_cast<int64_t>(c->scores.size() * sizeof(float)) + layers * 4;
  return c;
}

struct Sample {
  double receive_s = 0, wall_s = 0;
};

absl::StatusOr<Sample> CompressOnce(v1::Medakv::StubInterface& stub, const Cache& cache, const CompressOptions& o,
                                    int64_t chunk_bytes, const SharedMemoryLease* lease = nullptr) {
  RemoteOptions r;
  r.chunk_bytes = chunk_bytes;
  r.shared_memory = lease;
  const Clock::time_point t0 = Clock::now();
  absl::StatusOr<RemoteResult> got = CompressRemote(stub, cache.input, o, r);
  const Clock::time_point t1 = Clock::now();
  if (!got.ok()) return got.status();
  if (got->summary.bytes_in() != cache.request_bytes) {
    return absl::InternalError(
        absl::StrCat("the server received ", got->summary.bytes_in(), " bytes, expected ", cache.request_bytes));
  }
  return Sample{got->summary.times().receive_seconds(), Seconds(t0, t1)};
}

absl::Status Run() {
  const int64_t layers = absl::GetFlag(FLAGS_layers), kv_heads = absl::GetFlag(FLAGS_kv_heads),
                tokens = absl::GetFlag(FLAGS_tokens), head_dim = absl::GetFlag(FLAGS_head_dim);
  const int repeats = absl::GetFlag(FLAGS_repeats);
  if (layers < 1 || kv_heads < 1 || tokens < 16 || head_dim < 1 || repeats < 1) {
    return absl::InvalidArgumentError("--layers, --kv_heads, --head_dim, --repeats must be >= 1, --tokens >= 16");
  }
  std::vector<int64_t> chunks;
  for (absl::string_view s : absl::StrSplit(absl::GetFlag(FLAGS_chunk_mib), ',')) {
    int64_t mib = 0;
    if (!absl::SimpleAtoi(s, &mib) || mib < 1 || mib > 512) {
      return absl::InvalidArgumentError(absl::StrCat("--chunk_mib: '", s, "' is not in [1, 512]"));
    }
    chunks.push_back(mib * kMiB);
  }
  MEDAKV_ASSIGN_OR_RETURN(const PolicyKind policy, ParsePolicy(absl::GetFlag(FLAGS_policy)));
  CompressOptions options = DefaultOptions(policy);
  if (policy == PolicyKind::kStreamingLlm) options.budget.rho = 0.001;
  if (policy != PolicyKind::kStreamingLlm && policy != PolicyKind::kFull) {
    return absl::InvalidArgumentError("--policy: streaming_llm or full (compute must stay negligible)");
  }

  const std::unique_ptr<Cache> cache = MakeCache(layers, kv_heads, tokens, head_dim);
  const double gb = static_cast<double>(cache->kv_bytes) / 1e9;
  std::cout << absl::StrFormat(
      "KV %.1f MiB (%d layers x %d kv heads x %d tokens x %d dims, float16) + %.1f MiB of scores; policy %s%s; "
      "median of %d after 1 warm-up; GB = 1e9 bytes of KV\n\n",
      static_cast<double>(cache->kv_bytes) / kMiB, layers, kv_heads, tokens, head_dim,
      static_cast<double>(cache->request_bytes - cache->kv_bytes) / kMiB, PolicyName(policy),
      policy == PolicyKind::kStreamingLlm ? " rho 0.001" : "", repeats);

  // (a) The limit: a plain TCP copy of the KV bytes over loopback, measured
  // before and after the gRPC runs (the median of both sets is the limit).
  std::vector<uint8_t> sink(static_cast<size_t>(cache->kv_bytes), 1);  // touched: no page faults while timed
  const auto* src = reinterpret_cast<const uint8_t*>(cache->kv.data());
  std::vector<double> tcp;
  auto tcp_copies = [&]() -> absl::Status {
    for (int i = 0; i <= repeats; ++i) {
      MEDAKV_ASSIGN_OR_RETURN(const double s, TcpCopySeconds(src, sink.data(), cache->kv_bytes));
      if (i > 0) tcp.push_back(gb / s);
    }
    if (std::memcmp(sink.data(), src, sink.size()) != 0) return absl::InternalError("the TCP copy differs");
    return absl::OkStatus();
  };
  MEDAKV_RETURN_IF_ERROR(tcp_copies());

  // (b) Compress through a MedakvServer, over TCP loopback and in process.
  server::ServerOptions so;
  so.listen = "127.0.0.1:0";
  so.backend = "cpu";
  // A chunk and its framing fit in a message.
  so.max_message_bytes = std::max(*std::max_element(chunks.begin(), chunks.end()) + kMiB, int64_t{16} << 20);
  MEDAKV_ASSIGN_OR_RETURN(std::unique_ptr<server::MedakvServer> srv, server::MedakvServer::Start(so));
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(-1);
  args.SetMaxSendMessageSize(-1);
  const std::unique_ptr<v1::Medakv::Stub> tcp_stub = v1::Medakv::NewStub(
      grpc::CreateCustomChannel(absl::StrCat("127.0.0.1:", srv->port()), grpc::InsecureChannelCredentials(), args));
  const std::unique_ptr<v1::Medakv::Stub> inproc_stub = v1::Medakv::NewStub(srv->InProcessChannel());
  const std::pair<const char*, v1::Medakv::Stub*> paths[] = {{"gRPC over TCP loopback", tcp_stub.get()},
                                                             {"gRPC in-process channel", inproc_stub.get()}};
  struct Row {
    std::string name;
    int64_t chunk;
    std::vector<double> receive, wall;  // GB/s
  };
  std::vector<Row> rows;
  for (const auto& [name, stub] : paths) {
    for (const int64_t chunk : chunks) {
      Row row{name, chunk, {}, {}};
      for (int i = 0; i <= repeats; ++i) {
        absl::StatusOr<Sample> s = CompressOnce(*stub, *cache, options, chunk);
        if (!s.ok()) return absl::Status(s.status().code(), absl::StrCat(name, ": ", s.status().message()));
        if (i == 0) continue;
        row.receive.push_back(gb / s->receive_s);
        row.wall.push_back(gb / s->wall_s);
      }
      rows.push_back(std::move(row));
    }
  }
  // (c) The same-node data plane: the tensors go through a registered
  // shared-memory region (the client copies them in, the server copies them
  // out); gRPC carries only refs. One ref per tensor, so no chunk size.
  {
    MEDAKV_ASSIGN_OR_RETURN(std::unique_ptr<SharedMemoryRegion> region,
                            SharedMemoryRegion::Create(cache->request_bytes + 64 * kMiB));
    MEDAKV_ASSIGN_OR_RETURN(std::unique_ptr<SharedMemoryLease> lease,
                            SharedMemoryLease::Register(*tcp_stub, *region, "ingest-bench"));
    Row row{"shared memory (TCP refs)", 0, {}, {}};
    for (int i = 0; i <= repeats; ++i) {
      absl::StatusOr<Sample> s = CompressOnce(*tcp_stub, *cache, options, chunks.front(), lease.get());
      if (!s.ok()) return absl::Status(s.status().code(), absl::StrCat("shared memory: ", s.status().message()));
      if (i == 0) continue;
      row.receive.push_back(gb / s->receive_s);
      row.wall.push_back(gb / s->wall_s);
    }
    rows.push_back(std::move(row));
  }
  MEDAKV_RETURN_IF_ERROR(tcp_copies());

  const double limit = Median(tcp);
  auto range = [](const std::vector<double>& v) {
    return absl::StrFormat("%.2f-%.2f", *std::min_element(v.begin(), v.end()), *std::max_element(v.begin(), v.end()));
  };
  std::cout << absl::StrFormat("%-24s %6s  %12s %11s %6s  %9s %11s %6s\n", "path", "chunk", "receive GB/s", "(min-max)",
                               "ratio", "wall GB/s", "(min-max)", "ratio");
  std::cout << absl::StrFormat("%-24s %6s  %12.2f %11s %6.2f\n", "TCP copy (the limit)", "4 MiB", limit, range(tcp),
                               1.0);
  for (const Row& r : rows) {
    const double receive = Median(r.receive), wall = Median(r.wall);
    std::cout << absl::StrFormat("%-24s %6s  %12.2f %11s %6.2f  %9.2f %11s %6.2f\n", r.name,
                                 r.chunk > 0 ? absl::StrCat(r.chunk / kMiB, " MiB") : std::string("-"), receive, range(r.receive), receive / limit, wall,
                                 range(r.wall), wall / limit);
  }
  return absl::OkStatus();
}

}  // namespace
}  // namespace medakv

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  if (const absl::Status s = medakv::Run(); !s.ok()) {
    std::cerr << "medakv_ingest_bench: error: " << s << "\n";
    return 1;
  }
  return 0;
}
