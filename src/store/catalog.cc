#include "store/catalog.h"

#include <sqlite3.h>

#include <cstring>

#include "store/record.h"

namespace kvagent::disk {

namespace {

constexpr const char* kSchema = R"sql(
CREATE TABLE IF NOT EXISTS files(
  file_no INTEGER PRIMARY KEY,
  scanned_end INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS records(
  key BLOB PRIMARY KEY,
  file_no INTEGER NOT NULL,
  offset INTEGER NOT NULL,
  record_len INTEGER NOT NULL,
  payload_offset INTEGER NOT NULL,
  payload_len INTEGER NOT NULL,
  payload_checksum INTEGER NOT NULL,
  codec INTEGER NOT NULL,
  model TEXT NOT NULL,
  ns TEXT NOT NULL,
  agent TEXT NOT NULL,
  session TEXT NOT NULL,
  turn INTEGER NOT NULL,
  time_us INTEGER NOT NULL,
  info BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS records_by_file ON records(file_no, offset);
)sql";

std::string KeyBlob(const Hash128& k) {
  std::string b(16, '\0');
  std::memcpy(b.data(), &k.lo, 8);
  std::memcpy(b.data() + 8, &k.hi, 8);
  return b;
}

}  // namespace

StatusOr<std::unique_ptr<Catalog>> Catalog::Open(const std::string& path) {
  sqlite3* db = nullptr;
  int flags = SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX;
  int rc = sqlite3_open_v2(path.empty() ? ":memory:" : path.c_str(), &db, flags, nullptr);
  if (rc != SQLITE_OK) {
    std::string msg = db ? sqlite3_errmsg(db) : sqlite3_errstr(rc);
    sqlite3_close(db);
    return DataLossError("cannot open catalog " + path + ": " + msg);
  }
  std::unique_ptr<Catalog> c(new Catalog(db));
  if (!path.empty()) {
    // WAL + NORMAL: a commit survives a process crash; after power loss the last commits may
    // roll back, which only makes the next Open rescan more of the segment files.
    KVAGENT_RETURN_IF_ERROR(c->Exec("PRAGMA journal_mode=WAL"));
    KVAGENT_RETURN_IF_ERROR(c->Exec("PRAGMA synchronous=NORMAL"));
  }
  Status s = c->Exec(kSchema);
  if (!s.ok()) return DataLossError("catalog " + path + " is unusable: " + s.message());
  KVAGENT_RETURN_IF_ERROR(
      c->Prepare("INSERT OR REPLACE INTO records(key, file_no, offset, record_len, payload_offset, payload_len, "
                 "payload_checksum, codec, model, ns, agent, session, turn, time_us, info) "
                 "VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
                 &c->upsert_));
  KVAGENT_RETURN_IF_ERROR(c->Prepare("DELETE FROM records WHERE key = ?1", &c->remove_));
  KVAGENT_RETURN_IF_ERROR(
      c->Prepare("INSERT OR REPLACE INTO files(file_no, scanned_end) VALUES(?1, ?2)", &c->set_end_));
  return c;
}

Catalog::~Catalog() {
  sqlite3_finalize(upsert_);
  sqlite3_finalize(remove_);
  sqlite3_finalize(set_end_);
  sqlite3_close(db_);
}

Status Catalog::Error(const char* what) const {
  return DataLossError(std::string("catalog ") + what + ": " + sqlite3_errmsg(db_));
}

Status Catalog::Exec(const char* sql) {
  char* err = nullptr;
  int rc = sqlite3_exec(db_, sql, nullptr, nullptr, &err);
  if (rc != SQLITE_OK) {
    std::string msg = err ? err : sqlite3_errstr(rc);
    sqlite3_free(err);
    return InternalError("catalog: " + msg);
  }
  return Status::Ok();
}

Status Catalog::Prepare(const char* sql, sqlite3_stmt** stmt) {
  if (sqlite3_prepare_v2(db_, sql, -1, stmt, nullptr) != SQLITE_OK) return Error("prepare");
  return Status::Ok();
}

Status Catalog::Load(std::vector<CatalogEntry>* entries, std::map<uint64_t, uint64_t>* file_ends) {
  sqlite3_stmt* st = nullptr;
  KVAGENT_RETURN_IF_ERROR(Prepare("SELECT file_no, scanned_end FROM files", &st));
  int rc;
  while ((rc = sqlite3_step(st)) == SQLITE_ROW)
    (*file_ends)[static_cast<uint64_t>(sqlite3_column_int64(st, 0))] =
        static_cast<uint64_t>(sqlite3_column_int64(st, 1));
  sqlite3_finalize(st);
  if (rc != SQLITE_DONE) return Error("load files");
  KVAGENT_RETURN_IF_ERROR(
      Prepare("SELECT file_no, offset, record_len, payload_offset, payload_len, payload_checksum, codec, info "
              "FROM records ORDER BY file_no, offset",
              &st));
  Status bad;
  while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
    CatalogEntry e;
    e.loc.file_no = static_cast<uint64_t>(sqlite3_column_int64(st, 0));
    e.loc.offset = static_cast<uint64_t>(sqlite3_column_int64(st, 1));
    e.loc.record_len = static_cast<uint64_t>(sqlite3_column_int64(st, 2));
    e.loc.payload_offset = static_cast<uint32_t>(sqlite3_column_int64(st, 3));
    e.loc.payload_len = static_cast<uint64_t>(sqlite3_column_int64(st, 4));
    e.loc.payload_checksum = static_cast<uint64_t>(sqlite3_column_int64(st, 5));
    int64_t codec = sqlite3_column_int64(st, 6);
    const void* blob = sqlite3_column_blob(st, 7);
    int n = sqlite3_column_bytes(st, 7);
    Status s = codec == 0 || codec == 1 ? DecodeInfo(std::string_view(static_cast<const char*>(blob), n), &e.info)
                                        : DataLossError("catalog: bad codec");
    if (!s.ok()) {
      bad = s;
      break;
    }
    e.loc.codec = static_cast<CodecKind>(codec);
    entries->push_back(std::move(e));
  }
  sqlite3_finalize(st);
  if (!bad.ok()) return bad;
  if (rc != SQLITE_DONE && rc != SQLITE_ROW) return Error("load records");
  return Status::Ok();
}

Status Catalog::Begin() { return Exec("BEGIN IMMEDIATE"); }
Status Catalog::Commit() { return Exec("COMMIT"); }
void Catalog::Rollback() { Exec("ROLLBACK").IgnoreError(); }

Status Catalog::Upsert(const CatalogEntry& e) {
  std::string key = KeyBlob(e.info.key), model = e.info.model.ToHex(), info = EncodeInfo(e.info);
  sqlite3_stmt* st = upsert_;
  sqlite3_reset(st);
  sqlite3_bind_blob(st, 1, key.data(), static_cast<int>(key.size()), SQLITE_TRANSIENT);
  sqlite3_bind_int64(st, 2, static_cast<int64_t>(e.loc.file_no));
  sqlite3_bind_int64(st, 3, static_cast<int64_t>(e.loc.offset));
  sqlite3_bind_int64(st, 4, static_cast<int64_t>(e.loc.record_len));
  sqlite3_bind_int64(st, 5, e.loc.payload_offset);
  sqlite3_bind_int64(st, 6, static_cast<int64_t>(e.loc.payload_len));
  sqlite3_bind_int64(st, 7, static_cast<int64_t>(e.loc.payload_checksum));
  sqlite3_bind_int64(st, 8, static_cast<int64_t>(e.loc.codec));
  sqlite3_bind_text(st, 9, model.data(), static_cast<int>(model.size()), SQLITE_TRANSIENT);
  sqlite3_bind_text(st, 10, e.info.meta.ns.data(), static_cast<int>(e.info.meta.ns.size()), SQLITE_TRANSIENT);
  sqlite3_bind_text(st, 11, e.info.meta.agent.data(), static_cast<int>(e.info.meta.agent.size()), SQLITE_TRANSIENT);
  sqlite3_bind_text(st, 12, e.info.meta.session.data(), static_cast<int>(e.info.meta.session.size()), SQLITE_TRANSIENT);
  sqlite3_bind_int64(st, 13, e.info.meta.turn);
  sqlite3_bind_int64(st, 14, e.info.meta.time_us);
  sqlite3_bind_blob(st, 15, info.data(), static_cast<int>(info.size()), SQLITE_TRANSIENT);
  if (sqlite3_step(st) != SQLITE_DONE) return Error("upsert");
  return Status::Ok();
}

Status Catalog::Remove(const Hash128& key) {
  std::string k = KeyBlob(key);
  sqlite3_reset(remove_);
  sqlite3_bind_blob(remove_, 1, k.data(), static_cast<int>(k.size()), SQLITE_TRANSIENT);
  if (sqlite3_step(remove_) != SQLITE_DONE) return Error("remove");
  return Status::Ok();
}

Status Catalog::SetFileEnd(uint64_t file_no, uint64_t end) {
  sqlite3_reset(set_end_);
  sqlite3_bind_int64(set_end_, 1, static_cast<int64_t>(file_no));
  sqlite3_bind_int64(set_end_, 2, static_cast<int64_t>(end));
  if (sqlite3_step(set_end_) != SQLITE_DONE) return Error("set file end");
  return Status::Ok();
}

Status Catalog::ForgetFile(uint64_t file_no) {
  std::string n = std::to_string(file_no);
  KVAGENT_RETURN_IF_ERROR(Exec(("DELETE FROM records WHERE file_no = " + n).c_str()));
  return Exec(("DELETE FROM files WHERE file_no = " + n).c_str());
}

}  // namespace kvagent::disk
