// libFuzzer target: arbitrary catalog rows (store/catalog.h) in front of a valid segment file.
// The input is decoded into `files` and `records` rows (locations, codec and the SegmentInfo
// blob, all fuzzed) written with SQLite into a POSIX tier's catalog.sqlite; the tier then opens
// on it. Open must succeed (a bad catalog is dropped or rebuilt, never a failed Open), and every
// segment it serves must be exactly one that the segment file holds: the catalog is an index,
// never a source of data.
#include <sqlite3.h>
#include <stdlib.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>

#include "golden_inputs.h"
#include "kvagent/disk_tier.h"
#include "store/catalog.h"

using namespace kvagent;

namespace {

struct Input {
  const uint8_t* p;
  size_t n;
  template <typename T>
  T Get() {
    T v{};
    size_t k = std::min(sizeof(T), n);
    std::memcpy(&v, p, k);
    p += k;
    n -= k;
    return v;
  }
};

const std::string& Dir() {
  static const std::string dir = [] {
    std::string base = std::filesystem::exists("/dev/shm") ? "/dev/shm" : "/tmp";
    std::string tmpl = base + "/kvagent-catalog-fuzz-XXXXXX";
    if (::mkdtemp(tmpl.data()) == nullptr) abort();
    return tmpl;
  }();
  return dir;
}

const std::string& SegmentFile() {
  static const std::string bytes = golden::RecordsFile(2);
  return bytes;
}

bool Exec(sqlite3* db, const char* sql) { return sqlite3_exec(db, sql, nullptr, nullptr, nullptr) == SQLITE_OK; }

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  namespace fs = std::filesystem;
  const std::string& dir = Dir();
  for (const auto& e : fs::directory_iterator(dir)) fs::remove(e.path());
  {
    std::ofstream f(dir + "/segments-000001.kvs", std::ios::binary);
    f.write(SegmentFile().data(), static_cast<std::streamsize>(SegmentFile().size()));
  }
  {
    // The schema as the tier creates it, then the fuzzed rows.
    auto cat = disk::Catalog::Open(dir + "/catalog.sqlite");
    if (!cat.ok()) abort();
  }
  sqlite3* db = nullptr;
  if (sqlite3_open(( dir + "/catalog.sqlite").c_str(), &db) != SQLITE_OK) abort();
  Input in{data, size};
  sqlite3_stmt* files = nullptr;
  sqlite3_stmt* records = nullptr;
  sqlite3_prepare_v2(db, "INSERT OR REPLACE INTO files(file_no, scanned_end) VALUES(?1, ?2)", -1, &files, nullptr);
  sqlite3_prepare_v2(db,
                     "INSERT OR REPLACE INTO records(key, file_no, offset, record_len, payload_offset, payload_len, "
                     "payload_checksum, codec, model, ns, agent, session, turn, time_us, info) "
                     "VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, '', '', '', '', 0, 0, ?9)",
                     -1, &records, nullptr);
  Exec(db, "BEGIN");
  for (int i = in.Get<uint8_t>() % 4; i > 0; --i) {
    sqlite3_bind_int64(files, 1, in.Get<uint8_t>() % 4);
    sqlite3_bind_int64(files, 2, in.Get<int32_t>());
    sqlite3_step(files);
    sqlite3_reset(files);
  }
  for (int i = in.Get<uint8_t>() % 8; i > 0; --i) {
    uint8_t key[16];
    for (auto& b : key) b = in.Get<uint8_t>();
    sqlite3_bind_blob(records, 1, key, 16, SQLITE_TRANSIENT);
    sqlite3_bind_int64(records, 2, in.Get<uint8_t>() % 4);
    sqlite3_bind_int64(records, 3, in.Get<int32_t>());
    sqlite3_bind_int64(records, 4, in.Get<int32_t>());
    sqlite3_bind_int64(records, 5, in.Get<int32_t>());
    sqlite3_bind_int64(records, 6, in.Get<int32_t>());
    sqlite3_bind_int64(records, 7, in.Get<int64_t>());
    sqlite3_bind_int64(records, 8, in.Get<uint8_t>());
    const size_t len = std::min<size_t>(in.Get<uint16_t>(), in.n);
    sqlite3_bind_blob(records, 9, in.p, static_cast<int>(len), SQLITE_TRANSIENT);
    in.p += len;
    in.n -= len;
    sqlite3_step(records);
    sqlite3_reset(records);
  }
  Exec(db, "COMMIT");
  sqlite3_finalize(files);
  sqlite3_finalize(records);
  sqlite3_close(db);

  DiskTierOptions o;
  o.dir = dir;
  o.direct_io = false;
  o.sync = false;
  auto t = DiskTier::Open(o);
  if (!t.ok()) __builtin_trap();
  for (const SegmentInfo& info : (*t)->List({})) {
    auto got = (*t)->Get(info.key, info.model);
    if (!got.ok()) continue;
    const Segment& s = **got;
    bool known = false;
    for (int n = 0; n <= 3 && !known; ++n) {
      Segment want = n == 1 ? golden::MakeSegment(1, DType::kF16, 5)
                            : golden::MakeSegment(n, n == 2 ? DType::kBF16 : DType::kF32);
      if (want.key != s.key) continue;
      known = s.model == want.model && s.parent == want.parent && s.layout == want.layout &&
              s.tokens == want.tokens && s.positions == want.positions && s.meta == want.meta &&
              s.summary == want.summary && s.payload->size() == want.payload->size() &&
              (n == 1 || std::memcmp(s.payload->data(), want.payload->data(), want.payload->size()) == 0);
    }
    if (!known) __builtin_trap();
  }
  return 0;
}
