// A medakv-server child process for the client tests: started on a loopback
// port (0: any free port, read back from its "listening on port N" line;
// likewise its /metrics port, which Metrics() scrapes),
// stopped with SIGTERM (then SIGKILL) and reaped when destroyed, also when a
// test fails. The child gets SIGKILL if the test process dies first
// (PR_SET_PDEATHSIG), so no server outlives a crashed test; start servers
// from the test's main thread (the signal follows the thread that forked).
// A sanitizer report in the server's log (sanitizer builds) fails the test
// and is copied to the test's stderr.
#pragma once

#include <arpa/inet.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

#ifndef MEDAKV_SERVER_PATH
#error "MEDAKV_SERVER_PATH must name the medakv-server binary"
#endif

namespace medakv::test {

class ServerProcess {
 public:
  // Starts medakv-server --listen=127.0.0.1:<port> --backend=cpu with
  // `flags` after the defaults (later flags win), and waits (at most 60 s)
  // for it to listen.
  static absl::StatusOr<std::unique_ptr<ServerProcess>> Start(const std::vector<std::string>& flags = {},
                                                              int port = 0) {
    char log_path[] = "/tmp/medakv-client-test-server-XXXXXX";
    const int log_fd = mkstemp(log_path);
    if (log_fd < 0) return absl::ErrnoToStatus(errno, "mkstemp");
    std::vector<std::string> args = {MEDAKV_SERVER_PATH,
                                     absl::StrCat("--listen=127.0.0.1:", port),
                                     "--metrics_listen=127.0.0.1:0",
                                     "--backend=cpu",
                                     "--shutdown_grace=1s",
                                     "--max_inflight=2"};
    args.insert(args.end(), flags.begin(), flags.end());
    std::vector<char*> argv;
    for (std::string& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    const pid_t parent = getpid();
    const pid_t pid = fork();
    if (pid < 0) {
      const int err = errno;
      close(log_fd);
      unlink(log_path);
      return absl::ErrnoToStatus(err, "fork");
    }
    if (pid == 0) {  // the child: async-signal-safe calls only, then exec
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (getppid() != parent) _exit(126);
      dup2(log_fd, STDERR_FILENO);
      dup2(log_fd, STDOUT_FILENO);
      execv(argv[0], argv.data());
      _exit(127);
    }
    close(log_fd);
    std::unique_ptr<ServerProcess> server(new ServerProcess(pid, log_path));
    const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    for (;;) {
      const std::string log = server->Log();
      const size_t at = log.find("listening on port ");
      if (at != std::string::npos) {
        const size_t begin = at + 18, end = log.find_first_not_of("0123456789", begin);
        if (end != std::string::npos && absl::SimpleAtoi(log.substr(begin, end - begin), &server->port_)) {
          // The metrics line comes first, when there is an endpoint.
          if (const size_t m = log.find("metrics on port "); m != std::string::npos) {
            const size_t mb = m + 16, me = log.find_first_not_of("0123456789", mb);
            if (me == std::string::npos || !absl::SimpleAtoi(log.substr(mb, me - mb), &server->metrics_port_)) {
              server->metrics_port_ = 0;
            }
          }
          return server;
        }
      }
      int status = 0;
      if (waitpid(pid, &status, WNOHANG) == pid) {
        server->pid_ = -1;
        return absl::InternalError(absl::StrCat("medakv-server exited (status ", status, "): ", log));
      }
      if (std::chrono::steady_clock::now() > give_up) {
        return absl::DeadlineExceededError(absl::StrCat("medakv-server did not listen within 60 s: ", log));
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  }

  ~ServerProcess() {
    Stop(SIGTERM);
    unlink(log_path_.c_str());
  }
  ServerProcess(const ServerProcess&) = delete;
  ServerProcess& operator=(const ServerProcess&) = delete;

  int port() const { return port_; }
  // The /metrics port (--metrics_listen=127.0.0.1:0 by default); 0 without one.
  int metrics_port() const { return metrics_port_; }
  std::string target() const { return absl::StrCat("127.0.0.1:", port_); }
  bool running() const { return pid_ > 0; }
  pid_t pid() const { return pid_; }  // -1 once stopped

  // SIGKILL and reap now: a replica that is down.
  void Kill() { Stop(SIGKILL); }
  // SIGTERM and reap (SIGKILL after 10 s): an orderly shutdown.
  void Terminate() { Stop(SIGTERM); }

  // The Prometheus text of GET /metrics (the body); empty when it cannot be read.
  std::string Metrics() const {
    if (metrics_port_ <= 0) return "";
    const int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) return "";
    timeval tv{};
    tv.tv_sec = 10;
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(static_cast<uint16_t>(metrics_port_));
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    std::string out;
    if (connect(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) == 0) {
      const std::string request = "GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
      if (write(fd, request.data(), request.size()) == static_cast<ssize_t>(request.size())) {
        char buf[4096];
        ssize_t n;
        while ((n = read(fd, buf, sizeof(buf))) > 0) out.append(buf, static_cast<size_t>(n));
      }
    }
    close(fd);
    const size_t body = out.find("\r\n\r\n");
    return body == std::string::npos ? "" : out.substr(body + 4);
  }

  // What the server wrote on stderr and stdout.
  std::string Log() const {
    std::ifstream in(log_path_);
    std::stringstream s;
    s << in.rdbuf();
    return s.str();
  }

 private:
  ServerProcess(pid_t pid, std::string log_path) : pid_(pid), log_path_(std::move(log_path)) {}

  // Sends `sig`, waits up to 10 s for the exit, then SIGKILL; always reaps.
  void Stop(int sig) {
    if (pid_ <= 0) return;
    kill(pid_, sig);
    const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    int status = 0;
    while (waitpid(pid_, &status, WNOHANG) == 0) {
      if (std::chrono::steady_clock::now() > give_up) {
        kill(pid_, SIGKILL);
        waitpid(pid_, &status, 0);
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    pid_ = -1;
    const std::string log = Log();
    for (const char* report :
         {"ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error: ", "WARNING: ThreadSanitizer"}) {
      if (log.find(report) != std::string::npos) {
        std::cerr << "medakv-server on port " << port_ << " reported:\n" << log << std::endl;
        ADD_FAILURE() << "medakv-server on port " << port_ << ": sanitizer report in its log (above)";
        break;
      }
    }
  }

  pid_t pid_;
  const std::string log_path_;
  int port_ = 0;
  int metrics_port_ = 0;
};

}  // namespace medakv::test
