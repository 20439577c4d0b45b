// SQLite catalog of the disk tier: key -> record location and metadata, and per segment file
// the offset up to which the file has been indexed ("scanned end"). The catalog is an index,
// not the source of truth: everything in it can be rebuilt by scanning the segment files.
//
// Path "" opens a private in-memory database (used with non-POSIX Envs, whose files SQLite
// cannot see). Thread-safety: none; the disk tier serialises access under its mutex.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "kvagent/codec.h"
#include "kvagent/segment.h"
#include "kvagent/status.h"

struct sqlite3;
struct sqlite3_stmt;

namespace kvagent::disk {

// Where a live record lives and what the tier needs to read it without its header.
struct RecordLocation {
  uint64_t file_no = 0;
  uint64_t offset = 0;
  uint64_t record_len = 0;
  uint32_t payload_offset = 0;
  uint64_t payload_len = 0;
  uint64_t payload_checksum = 0;
  CodecKind codec = CodecKind::kRaw;
};

struct CatalogEntry {
  RecordLocation loc;
  SegmentInfo info;
};

class Catalog {
 public:
  // Opens (creating the schema if needed) the catalog at `path` in WAL mode, or an in-memory
  // one for "". DataLoss if the file is not a usable catalog (the caller then rebuilds it).
  static StatusOr<std::unique_ptr<Catalog>> Open(const std::string& path);
  ~Catalog();
  Catalog(const Catalog&) = delete;
  Catalog& operator=(const Catalog&) = delete;

  // Every record row and every file's scanned end.
  Status Load(std::vector<CatalogEntry>* entries, std::map<uint64_t, uint64_t>* file_ends);

  Status Begin();
  Status Commit();
  void Rollback();

  Status Upsert(const CatalogEntry& e);
  Status Remove(const Hash128& key);
  Status SetFileEnd(uint64_t file_no, uint64_t end);
  Status ForgetFile(uint64_t file_no);  // the file's row and every record row pointing into it

 private:
  explicit Catalog(sqlite3* db) : db_(db) {}
  Status Exec(const char* sql);
  Status Prepare(const char* sql, sqlite3_stmt** stmt);
  Status Error(const char* what) const;

  sqlite3* db_;
  sqlite3_stmt* upsert_ = nullptr;
  sqlite3_stmt* remove_ = nullptr;
  sqlite3_stmt* set_end_ = nullptr;
};

}  // namespace kvagent::disk
