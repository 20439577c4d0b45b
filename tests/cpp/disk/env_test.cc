// MemEnv semantics (matching POSIX where the store relies on them) and FaultInjectionEnv's
// faults and crash simulation.
#include "kvagent/env.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <vector>

#include "disk/disk_test_util.h"
#include "kvagent/fault_injection_env.h"

namespace kvagent {
namespace {

std::span<const std::byte> B(std::string_view s) { return std::as_bytes(std::span<const char>(s.data(), s.size())); }

std::string ReadAll(Env* env, const std::string& path) {
  auto s = ReadFileToString(env, path);
  EXPECT_TRUE(s.ok()) << s.status().ToString();
  return s.ok() ? *s : "";
}

// The same checks run against MemEnv and the POSIX Env.
class EnvTest : public ::testing::TestWithParam<bool> {
 protected:
  void SetUp() override {
    if (GetParam()) {
      env_ = Env::Default();
      root_ = tmp_.path();
    } else {
      mem_ = NewMemEnv();
      env_ = mem_.get();
      root_ = "/root";
      ASSERT_TRUE(env_->CreateDirs(root_).ok());
    }
  }
  testing::TempDir tmp_;
  std::unique_ptr<Env> mem_;
  Env* env_;
  std::string root_;
};

TEST_P(EnvTest, FilesDirsRenameTruncate) {
  const std::string d = root_ + "/a/b";
  ASSERT_TRUE(env_->CreateDirs(d).ok());
  ASSERT_TRUE(env_->CreateDirs(d).ok());
  EXPECT_EQ(env_->NewWritableFile(root_ + "/missing/x").status().code(), StatusCode::kNotFound);
  {
    auto f = env_->NewWritableFile(d + "/f");
    ASSERT_TRUE(f.ok());
    ASSERT_TRUE((*f)->Append(B("hello ")).ok());
    ASSERT_TRUE((*f)->Append(B("world")).ok());
    EXPECT_EQ((*f)->Size(), 11u);
    ASSERT_TRUE((*f)->Sync().ok());
    ASSERT_TRUE((*f)->Close().ok());
  }
  EXPECT_EQ(ReadAll(env_, d + "/f"), "hello world");
  {
    auto f = env_->NewAppendableFile(d + "/f");
    ASSERT_TRUE(f.ok());
    EXPECT_EQ((*f)->Size(), 11u);
    ASSERT_TRUE((*f)->Append(B("!")).ok());
  }
  EXPECT_EQ(*env_->GetFileSize(d + "/f"), 12u);
  auto r = env_->NewRandomAccessFile(d + "/f");
  ASSERT_TRUE(r.ok());
  std::string buf(5, '\0');
  size_t n = 0;
  ASSERT_TRUE((*r)->Read(6, std::as_writable_bytes(std::span<char>(buf.data(), 5)), &n).ok());
  EXPECT_EQ(n, 5u);
  EXPECT_EQ(buf, "world");
  ASSERT_TRUE((*r)->Read(10, std::as_writable_bytes(std::span<char>(buf.data(), 5)), &n).ok());
  EXPECT_EQ(n, 2u);  // short only at end of file
  ASSERT_TRUE(env_->TruncateFile(d + "/f", 5).ok());
  EXPECT_EQ(ReadAll(env_, d + "/f"), "hello");
  EXPECT_EQ(*(*r)->Size(), 5u);  // an open reader sees the truncation
  ASSERT_TRUE(WriteStringToFile(env_, "other", d + "/g", true).ok());
  ASSERT_TRUE(env_->RenameFile(d + "/g", d + "/f").ok());
  EXPECT_EQ(ReadAll(env_, d + "/f"), "other");
  EXPECT_FALSE(env_->FileExists(d + "/g"));
  auto kids = env_->GetChildren(d);
  ASSERT_TRUE(kids.ok());
  EXPECT_EQ(*kids, std::vector<std::string>{"f"});
  auto top = env_->GetChildren(root_ + "/a");
  ASSERT_TRUE(top.ok());
  EXPECT_EQ(*top, std::vector<std::string>{"b"});
  ASSERT_TRUE(env_->RemoveFile(d + "/f").ok());
  EXPECT_EQ(env_->RemoveFile(d + "/f").code(), StatusCode::kNotFound);
  EXPECT_EQ(env_->GetFileSize(d + "/f").status().code(), StatusCode::kNotFound);
  EXPECT_TRUE(env_->SyncDir(d).ok());
  EXPECT_TRUE(env_->FreeSpace(d).ok());
}

// ReadV fills its buffers in turn from one offset (POSIX: preadv; MemEnv: the default), skips
// empty ones, and stops short at the end of the file.
TEST_P(EnvTest, ReadVFillsBuffersInTurn) {
  const std::string path = root_ + "/v";
  ASSERT_TRUE(WriteStringToFile(env_, "0123456789abcdef", path, false).ok());
  auto f = env_->NewRandomAccessFile(path);
  ASSERT_TRUE(f.ok());
  std::string a(3, '.'), b(0, '.'), c(5, '.');
  auto span_of = [](std::string& s) { return std::as_writable_bytes(std::span<char>(s.data(), s.size())); };
  const std::span<std::byte> pieces[] = {span_of(a), span_of(b), span_of(c)};
  size_t n = 0;
  ASSERT_TRUE((*f)->ReadV(2, pieces, &n).ok());
  EXPECT_EQ(n, 8u);
  EXPECT_EQ(a + c, "23456789");
  std::string d(4, '.'), e(10, '.');
  const std::span<std::byte> tail[] = {span_of(d), span_of(e)};
  ASSERT_TRUE((*f)->ReadV(10, tail, &n).ok());
  EXPECT_EQ(n, 6u);  // end of file
  EXPECT_EQ(d + e.substr(0, 2), "abcdef");
}

TEST_P(EnvTest, LockIsExclusiveUntilReleased) {
  auto l1 = env_->LockFile(root_ + "/LOCK");
  ASSERT_TRUE(l1.ok());
  EXPECT_EQ(env_->LockFile(root_ + "/LOCK").status().code(), StatusCode::kFailedPrecondition);
  l1->reset();
  EXPECT_TRUE(env_->LockFile(root_ + "/LOCK").ok());
}

INSTANTIATE_TEST_SUITE_P(Envs, EnvTest, ::testing::Values(false, true),
                         [](const auto& info) { return info.param ? "Posix" : "MemEnv"; });

TEST(MemEnvTest, CapacityLimitsAppendsAndFreeSpace) {
  auto env = NewMemEnv(MemEnvOptions{100});
  ASSERT_TRUE(env->CreateDirs("/d").ok());
  EXPECT_EQ(*env->FreeSpace("/d"), 100u);
  auto f = env->NewWritableFile("/d/f");
  ASSERT_TRUE(f.ok());
  ASSERT_TRUE((*f)->Append(B(std::string(60, 'a'))).ok());
  EXPECT_EQ(*env->FreeSpace("/d"), 40u);
  EXPECT_EQ((*f)->Append(B(std::string(60, 'b'))).code(), StatusCode::kResourceExhausted);
  EXPECT_EQ((*f)->Size(), 100u);  // what fit was appended, like a short write on ENOSPC
  EXPECT_EQ(*env->FreeSpace("/d"), 0u);
  ASSERT_TRUE(env->TruncateFile("/d/f", 10).ok());
  EXPECT_EQ(*env->FreeSpace("/d"), 90u);
  ASSERT_TRUE(env->RemoveFile("/d/f").ok());
  EXPECT_EQ(*env->FreeSpace("/d"), 100u);
  EXPECT_GT(*NewMemEnv()->FreeSpace("/"), uint64_t{1} << 39);
}

TEST(MemEnvTest, InstancesAreIndependent) {
  auto a = NewMemEnv(), b = NewMemEnv();
  ASSERT_TRUE(a->CreateDirs("/x").ok());
  ASSERT_TRUE(WriteStringToFile(a.get(), "1", "/x/f", false).ok());
  EXPECT_FALSE(b->FileExists("/x/f"));
  EXPECT_TRUE(b->LockFile("/x/LOCK").status().code() == StatusCode::kNotFound);
}

TEST(FaultInjectionEnvTest, InjectedFaults) {
  auto mem = NewMemEnv();
  FaultInjectionEnv env(mem.get());
  ASSERT_TRUE(env.CreateDirs("/d").ok());
  auto f = env.NewWritableFile("/d/f");
  ASSERT_TRUE(f.ok());
  env.FailNextWrites(2);
  EXPECT_EQ((*f)->Append(B("aaaa")).code(), StatusCode::kInternal);
  EXPECT_EQ((*f)->Append(B("aaaa")).code(), StatusCode::kInternal);
  EXPECT_EQ((*f)->Size(), 0u);
  ASSERT_TRUE((*f)->Append(B("bbbb")).ok());
  env.ShortNextWrite(3);
  EXPECT_EQ((*f)->Append(B("cccccc")).code(), StatusCode::kInternal);
  EXPECT_EQ((*f)->Size(), 7u);
  env.FailNextSyncs(1);
  EXPECT_EQ((*f)->Sync().code(), StatusCode::kInternal);
  EXPECT_TRUE((*f)->Sync().ok());
  env.SetDiskBudget(5);
  EXPECT_EQ(*env.FreeSpace("/d"), 5u);
  ASSERT_TRUE((*f)->Append(B("dd")).ok());
  EXPECT_EQ((*f)->Append(B("eeee")).code(), StatusCode::kResourceExhausted);
  EXPECT_EQ((*f)->Size(), 12u);  // 7 + 2 + the 3 that fit
  env.ClearDiskBudget();
  ASSERT_TRUE((*f)->Append(B("ff")).ok());
  EXPECT_EQ(ReadAll(&env, "/d/f"), "bbbbcccddeeeff");
  EXPECT_EQ(env.injected_write_errors(), 3u);
  EXPECT_EQ(env.injected_sync_errors(), 1u);
  EXPECT_EQ(env.injected_enospc(), 1u);
}

TEST(FaultInjectionEnvTest, DropUnsyncedDataRevertsToLastSync) {
  auto mem = NewMemEnv();
  FaultInjectionEnv env(mem.get());
  ASSERT_TRUE(env.CreateDirs("/d").ok());
  ASSERT_TRUE(WriteStringToFile(&env, "durable", "/d/old", true).ok());  // synced + dir synced
  {
    auto f = env.NewAppendableFile("/d/old");
    ASSERT_TRUE(f.ok());
    ASSERT_TRUE((*f)->Append(B("+synced")).ok());
    ASSERT_TRUE((*f)->Sync().ok());
    ASSERT_TRUE((*f)->Append(B("+lost")).ok());
  }
  {
    auto f = env.NewWritableFile("/d/new");  // directory never synced afterwards
    ASSERT_TRUE(f.ok());
    ASSERT_TRUE((*f)->Append(B("x")).ok());
    ASSERT_TRUE((*f)->Sync().ok());
  }
  ASSERT_TRUE(env.DropUnsyncedData().ok());
  EXPECT_EQ(ReadAll(&env, "/d/old"), "durable+synced");
  EXPECT_FALSE(env.FileExists("/d/new"));
  EXPECT_FALSE(env.IsPosix());
}

// The POSIX direct-I/O appender: large block-aligned appends at block-aligned offsets bypass
// the page cache, everything else goes through it; any mix reads back exactly at once (no
// Flush needed), the file never holds more than was appended, and a reopened file continues.
TEST(PosixDirectFileTest, MixedAppendsReadBackAndReopen) {
  // /tmp may be tmpfs (no O_DIRECT); the build directory's file system usually is not.
  std::unique_ptr<testing::TempDir> tmp;
  std::unique_ptr<WritableFile> f;
  std::string path;
  for (const char* base : {static_cast<const char*>(nullptr), "."}) {
    tmp = std::make_unique<testing::TempDir>(base);
    path = tmp->path() + "/direct";
    auto opened = Env::Default()->NewDirectWritableFile(path, /*truncate=*/true);
    ASSERT_TRUE(opened.ok()) << opened.status().ToString();
    f = std::move(opened).value();
    if (f->DirectIoAlignment() != 0) break;
  }
  if (f->DirectIoAlignment() == 0) GTEST_SKIP() << "no file system here accepts O_DIRECT";
  const size_t block = f->DirectIoAlignment();
  Env* env = Env::Default();

  std::string expect;
  std::mt19937_64 rng(7);
  auto bytes = [&](size_t n) {
    std::string out(n, '\0');
    for (auto& c : out) c = static_cast<char>(rng());
    return out;
  };
  constexpr size_t kBig = (2u << 20) + 4096 + 5;  // above the direct threshold, odd tail
  std::unique_ptr<char, decltype(&std::free)> aligned(static_cast<char*>(std::aligned_alloc(block, 4u << 20)),
                                                      &std::free);
  auto check = [&] {
    EXPECT_EQ(f->Size(), expect.size());
    EXPECT_EQ(ReadAll(env, path), expect);
  };
  auto append = [&](std::string_view data) {
    ASSERT_TRUE(f->Append(B(data)).ok());
    expect += data;
    check();
  };
  auto append_aligned = [&](size_t n, size_t misalign = 0) {
    std::string d = bytes(n);
    std::memcpy(aligned.get() + misalign, d.data(), n);
    ASSERT_TRUE(f->Append(std::as_bytes(std::span<const char>(aligned.get() + misalign, n))).ok());
    expect += d;
    check();
  };
  append(bytes(100));
  append_aligned(kBig);  // file offset not aligned: buffered
  append(bytes(block - (expect.size() % block)));
  append_aligned(kBig);  // direct for the whole blocks, buffered tail
  append(bytes(block - (expect.size() % block)));
  append_aligned(kBig, 64);  // memory not aligned: buffered
  append(bytes(3 * block + 17));
  ASSERT_TRUE(f->Flush().ok());
  ASSERT_TRUE(f->Sync().ok());
  check();
  ASSERT_TRUE(f->Close().ok());
  check();
  EXPECT_FALSE(f->Append(B("x")).ok());  // closed

  auto again = env->NewDirectWritableFile(path, /*truncate=*/false);
  ASSERT_TRUE(again.ok()) << again.status().ToString();
  f = std::move(again).value();
  EXPECT_EQ(f->Size(), expect.size());
  append(bytes(block - (expect.size() % block)));
  append_aligned(kBig);
  ASSERT_TRUE(f->Close().ok());
  check();
}

// Opens a direct-I/O file in a file system that accepts O_DIRECT (skips the test where none
// does); `truncate` as in NewDirectWritableFile.
std::unique_ptr<WritableFile> OpenDirect(std::unique_ptr<testing::TempDir>* tmp, std::string* path) {
  for (const char* base : {static_cast<const char*>(nullptr), "."}) {
    *tmp = std::make_unique<testing::TempDir>(base);
    *path = (*tmp)->path() + "/async";
    auto opened = Env::Default()->NewDirectWritableFile(*path, /*truncate=*/true);
    if (!opened.ok()) return nullptr;
    if ((*opened)->DirectIoAlignment() != 0) return std::move(opened).value();
  }
  return nullptr;
}

// Asynchronous appends: several in flight, interleaved with synchronous appends (also on a
// reopened file, whose buffered descriptor must write at the file's logical end, not at the
// EOF the kernel sees while a direct write is still in flight), read back exactly after
// WaitAsync; misaligned data is written at once (id 0).
TEST(PosixDirectFileTest, AsyncAppendsInFlightReadBackInOrder) {
  std::unique_ptr<testing::TempDir> tmp;
  std::string path;
  std::unique_ptr<WritableFile> f = OpenDirect(&tmp, &path);
  if (!f) GTEST_SKIP() << "no file system here accepts O_DIRECT";
  const size_t block = f->DirectIoAlignment();
  Env* env = Env::Default();
  std::mt19937_64 rng(11);
  std::string expect;
  std::vector<std::unique_ptr<char, decltype(&std::free)>> keep;  // memory of appends in flight
  auto aligned_copy = [&](size_t n) {
    keep.emplace_back(static_cast<char*>(std::aligned_alloc(block, (n + block - 1) / block * block)), &std::free);
    char* p = keep.back().get();
    for (size_t i = 0; i < n; ++i) p[i] = static_cast<char>(rng());
    expect.append(p, n);
    return std::as_bytes(std::span<const char>(p, n));
  };
  auto sync_append = [&](size_t n) {
    std::string d(n, '\0');
    for (auto& c : d) c = static_cast<char>(rng());
    ASSERT_TRUE(f->Append(B(d)).ok());
    expect += d;
  };
  for (int reopen = 0; reopen < 2; ++reopen) {
    sync_append(block - expect.size() % block);  // to a block boundary
    uint64_t last = 0;
    for (int i = 0; i < 6; ++i) {
      auto id = f->AppendAsync(aligned_copy((1u << 20) + block * static_cast<size_t>(i)));
      ASSERT_TRUE(id.ok()) << id.status().ToString();
      EXPECT_GE(*id, last);
      last = *id;
    }
    EXPECT_EQ(f->Size(), expect.size());
    // A synchronous append behind the ones in flight lands behind them.
    sync_append(1000);
    auto misaligned = f->AppendAsync(aligned_copy(2 * block));  // file offset not aligned
    ASSERT_TRUE(misaligned.ok());
    EXPECT_EQ(*misaligned, 0u);
    sync_append(block - expect.size() % block);
    StatusOr<uint64_t> id = uint64_t{0};
    if (reopen == 0) {
      id = f->AppendAsync(aligned_copy(3u << 20));
    } else {
      // A gathering write of 10240 block-sized pieces: more requests (256 pieces each) than the
      // ring keeps in flight (32).
      auto whole = aligned_copy(40u << 20);
      std::vector<std::span<const std::byte>> pieces;
      for (size_t off = 0; off < whole.size(); off += block) pieces.push_back(whole.subspan(off, block));
      id = f->AppendAsyncV(pieces);
    }
    ASSERT_TRUE(id.ok()) << id.status().ToString();
    ASSERT_TRUE(f->WaitAsync(*id).ok());
    EXPECT_EQ(ReadAll(env, path), expect);
    sync_append(77);
    ASSERT_TRUE(f->Sync().ok());
    ASSERT_TRUE(f->Close().ok());
    EXPECT_EQ(ReadAll(env, path), expect);
    auto again = env->NewDirectWritableFile(path, /*truncate=*/false);
    ASSERT_TRUE(again.ok()) << again.status().ToString();
    f = std::move(again).value();
    EXPECT_EQ(f->Size(), expect.size());
  }
  ASSERT_TRUE(f->Close().ok());
  EXPECT_EQ(ReadAll(env, path), expect);
}

// FaultInjectionEnv's asynchronous mode: appends are deferred to WaitAsync, where the armed
// fault fires; the failed one and those queued behind it are never written, and the file
// refuses appends from then on.
TEST(FaultInjectionEnvTest, DeferredAsyncAppendFailsAtWait) {
  auto mem = NewMemEnv();
  FaultInjectionEnv env(mem.get());
  ASSERT_TRUE(env.CreateDirs("/d").ok());
  env.SimulateAsyncDirectIo(true);
  auto f = env.NewWritableFile("/d/f");
  ASSERT_TRUE(f.ok());
  EXPECT_EQ((*f)->DirectIoAlignment(), 4096u);
  ASSERT_TRUE((*f)->Append(B("head")).ok());
  auto a = (*f)->AppendAsync(B("first"));
  auto b = (*f)->AppendAsync(B("second"));
  auto c = (*f)->AppendAsync(B("third"));
  ASSERT_TRUE(a.ok() && b.ok() && c.ok());
  EXPECT_EQ((*f)->Size(), 4u + 5 + 6 + 5);
  EXPECT_EQ(ReadAll(mem.get(), "/d/f"), "head");  // nothing of them written yet
  ASSERT_TRUE((*f)->WaitAsync(*a).ok());
  EXPECT_EQ(ReadAll(mem.get(), "/d/f"), "headfirst");
  env.FailNextWrites(1);
  EXPECT_FALSE((*f)->WaitAsync(*c).ok());
  EXPECT_EQ(ReadAll(mem.get(), "/d/f"), "headfirst");
  EXPECT_FALSE((*f)->Append(B("more")).ok());
  EXPECT_FALSE((*f)->AppendAsync(B("more")).ok());
  EXPECT_FALSE((*f)->Sync().ok());
  EXPECT_EQ(env.injected_write_errors(), 1u);
}
}  // namespace
}  // namespace kvagent
