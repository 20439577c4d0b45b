// Test helper: a real redis-server (Debian redis-server) on 127.0.0.1 at a free port, in its own
// temporary directory, without persistence. Stopped (SIGKILL) with the object. Kill, Pause
// (SIGSTOP), Resume and Restart (same port, empty) drive the fault tests.
#pragma once

#include <gtest/gtest.h>
#include <hiredis/hiredis.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include "temp_dir.h"

namespace kvagent::testing {

// A TCP port on 127.0.0.1 that was free a moment ago (the kernel picks it).
inline int FreePort() {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  EXPECT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
  socklen_t len = sizeof(a);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  ::close(fd);
  return ntohs(a.sin_port);
}

class RedisServer {
 public:
  // `extra`: more redis-server arguments (e.g. {"--cluster-enabled", "yes"}).
  explicit RedisServer(std::vector<std::string> extra = {}) : port_(FreePort()), extra_(std::move(extra)) { Start(); }
  ~RedisServer() { Kill(); }
  RedisServer(const RedisServer&) = delete;
  RedisServer& operator=(const RedisServer&) = delete;

  int port() const { return port_; }
  std::string url(const std::string& credentials = "") const {
    return "redis://" + (credentials.empty() ? "" : credentials + "@") + "127.0.0.1:" + std::to_string(port_);
  }

  // Starts the server (again, empty) and waits until it answers PING.
  void Start() {
    ASSERT_EQ(pid_, -1);
    std::vector<std::string> args = {"redis-server", "--port", std::to_string(port_), "--bind", "127.0.0.1",
                                     "--save", "", "--appendonly", "no", "--dir", dir_.path(),
                                     "--logfile", dir_.path() + "/redis.log", "--protected-mode", "no"};
    args.insert(args.end(), extra_.begin(), extra_.end());
    pid_ = ::fork();
    if (pid_ == 0) {
      std::vector<char*> argv;
      for (std::string& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      ::execvp("redis-server", argv.data());
      ::_exit(127);
    }
    ASSERT_GT(pid_, 0);
    for (int i = 0; i < 500; ++i) {
      redisReply* r = Command({"PING"});
      if (r != nullptr) {
        freeReplyObject(r);
        return;
      }
      int status = 0;
      ASSERT_EQ(::waitpid(pid_, &status, WNOHANG), 0) << "redis-server exited (is Debian's redis-server installed?)";
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    FAIL() << "redis-server did not answer on port " << port_;
  }
  // kill -9 and reap.
  void Kill() {
    if (pid_ <= 0) return;
    Resume();
    ::kill(pid_, SIGKILL);
    ::waitpid(pid_, nullptr, 0);
    pid_ = -1;
  }
  void Restart() {
    Kill();
    Start();
  }
  void Pause() { ::kill(pid_, SIGSTOP); }
  void Resume() {
    if (pid_ > 0) ::kill(pid_, SIGCONT);
  }

  // One command as the default user; the reply (free with freeReplyObject) or null when the
  // server does not answer.
  redisReply* Command(const std::vector<std::string>& args) const {
    timeval tv{1, 0};
    redisContext* c = redisConnectWithTimeout("127.0.0.1", port_, tv);
    if (c == nullptr || c->err) {
      if (c) redisFree(c);
      return nullptr;
    }
    redisSetTimeout(c, tv);
    std::vector<const char*> argv;
    std::vector<size_t> lens;
    for (const std::string& a : args) {
      argv.push_back(a.data());
      lens.push_back(a.size());
    }
    auto* r = static_cast<redisReply*>(redisCommandArgv(c, static_cast<int>(args.size()), argv.data(), lens.data()));
    redisFree(c);
    return r;
  }
  // The command's string/status reply, or "ERR:<message>" / "NIL" / "INT:<n>" / "ARRAY:<n>".
  std::string Run(const std::vector<std::string>& args) const {
    redisReply* r = Command(args);
    if (r == nullptr) return "NO REPLY";
    std::string out;
    switch (r->type) {
      case REDIS_REPLY_STRING:
      case REDIS_REPLY_STATUS: out = std::string(r->str, r->len); break;
      case REDIS_REPLY_ERROR: out = "ERR:" + std::string(r->str, r->len); break;
      case REDIS_REPLY_NIL: out = "NIL"; break;
      case REDIS_REPLY_INTEGER: out = "INT:" + std::to_string(r->integer); break;
      default: out = "ARRAY:" + std::to_string(r->elements); break;
    }
    freeReplyObject(r);
    return out;
  }

 private:
  int port_;
  std::vector<std::string> extra_;
  TempDir dir_;
  pid_t pid_ = -1;
};

}  // namespace kvagent::testing
