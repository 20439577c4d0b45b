// Writes the golden files of tests/cpp/golden/ (golden_inputs.h says what they hold):
//   golden_gen <dir>
// Run it only for a deliberate format change, and keep the old files as well: golden_test reads
// every checked-in file with today's code, so an incompatible change fails there.
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

#include "golden_inputs.h"
#include "kvagent/disk_tier.h"
#include "store/record.h"

using namespace kvagent;
namespace fs = std::filesystem;

namespace {

bool Write(const fs::path& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  std::printf("wrote %s (%zu bytes)\n", path.c_str(), bytes.size());
  return static_cast<bool>(f);
}

// A disk tier written by today's code on the POSIX Env: segments 0, 2 and 4 (raw), then 4 deleted.
// Only the segment files and the SQLite catalog are kept (not LOCK).
bool WriteStore(const fs::path& dir) {
  fs::path work = dir / "store.tmp";
  fs::remove_all(work);
  {
    DiskTierOptions o;
    o.dir = work.string();
    o.direct_io = false;
    auto t = DiskTier::Open(o);
    if (!t.ok()) return std::fprintf(stderr, "open: %s\n", t.status().ToString().c_str()), false;
    for (int n : {0, 2, 4}) {
      Status s = (*t)->Put(golden::MakeSegment(n));
      if (!s.ok()) return std::fprintf(stderr, "put: %s\n", s.ToString().c_str()), false;
    }
    if (!(*t)->Delete(golden::MakeSegment(4).key).ok()) return false;
  }
  fs::path out = dir / "store";
  fs::remove_all(out);
  fs::create_directories(out);
  for (const char* name : {"catalog.sqlite", "segments-000001.kvs"}) {
    fs::copy_file(work / name, out / name);
    std::printf("wrote %s\n", (out / name).c_str());
  }
  for (const auto& e : fs::directory_iterator(work)) {
    std::string name = e.path().filename().string();
    if (name != "catalog.sqlite" && name != "segments-000001.kvs" && name != "LOCK")
      return std::fprintf(stderr, "unexpected file %s in the store\n", name.c_str()), false;
  }
  fs::remove_all(work);
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s <dir>\n", argv[0]);
    return 2;
  }
  fs::path dir = argv[1];
  std::string hashes;
  for (const auto& [name, h] : golden::Hashes()) hashes += name + " " + h.ToHex() + "\n";
  bool ok = Write(dir / "model_spec.bin", golden::Spec().Serialize()) &&
            Write(dir / "key_summary_f16.bin", golden::Summary().Serialize(DType::kF16)) &&
            Write(dir / "key_summary_f32.bin", golden::Summary().Serialize(DType::kF32)) &&
            Write(dir / "segment_info.bin", disk::EncodeInfo(golden::Info(1))) &&
            Write(dir / "records_v1.kvs", golden::RecordsFile(1)) &&
            Write(dir / "records_v2.kvs", golden::RecordsFile(2)) && Write(dir / "hashes.txt", hashes) &&
            WriteStore(dir);
  return ok ? 0 : 1;
}
