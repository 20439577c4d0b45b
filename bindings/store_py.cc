// Python Store: every call into the store runs with the GIL released. Progress callbacks
// re-acquire it to call Python; an exception they raise is re-raised when the call returns.
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/unique_ptr.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "device_segment_py.h"
#include "errors.h"
#include "kvagent/codec.h"
#include "kvagent/store.h"
#include "registry.h"
#include "segment_py.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace kvagent::py {
namespace {

class PyStore;

// Stores not yet closed; closed at interpreter exit (while threads may still take the GIL),
// so write-behind data reaches disk and background threads stop before finalisation.
std::set<PyStore*>& LiveStores() {
  static auto* s = new std::set<PyStore*>();
  return *s;
}

class PyStore {
 public:
  explicit PyStore(std::unique_ptr<Store> s) : store_(std::move(s)) { LiveStores().insert(this); }
  ~PyStore() {
    LiveStores().erase(this);
    // The last reference may join the write-behind thread, which may need the GIL to drop
    // Python-owned payloads: release it first.
    nb::gil_scoped_release unlocked;
    if (store_) (void)store_->Close();
    store_.reset();
  }
  PyStore(const PyStore&) = delete;
  PyStore& operator=(const PyStore&) = delete;

  // Runs f(store) with the GIL released. The shared_ptr copy keeps the store alive if another
  // thread closes it meanwhile, and is dropped before the GIL is re-taken.
  template <typename F>
  auto Call(F&& f) {
    if (!store_) ThrowIfError(FailedPreconditionError("store is closed"));
    std::shared_ptr<Store> s = store_;
    nb::gil_scoped_release unlocked;
    auto result = f(*s);
    s.reset();
    return result;
  }

  void Close() {
    if (!store_) return;
    std::shared_ptr<Store> s = std::move(store_);
    LiveStores().erase(this);
    Status st;
    {
      nb::gil_scoped_release unlocked;
      st = s->Close();
      s.reset();
    }
    ThrowIfError(st);
  }

  bool closed() const { return !store_; }

 private:
  std::shared_ptr<Store> store_;
};

Hash128 KeyOf(nb::handle h) {
  Hash128 k;
  if (nb::try_cast(h, k, false)) return k;
  if (nb::isinstance<nb::str>(h)) return ValueOrThrow(Hash128::FromHex(nb::cast<std::string>(h)));
  ThrowIfError(InvalidArgumentError("key must be a Hash128 or a 32-digit hex string, got " +
                                    nb::cast<std::string>(nb::str(h.type()))));
  return k;
}

Hash128 ModelOf(nb::handle h) {
  ModelSpec spec;
  if (nb::try_cast(h, spec, false)) return spec.fingerprint;
  Hash128 m;
  if (nb::try_cast(h, m, false)) return m;
  if (nb::isinstance<nb::str>(h)) return ValueOrThrow(Hash128::FromHex(nb::cast<std::string>(h)));
  ThrowIfError(InvalidArgumentError("model must be a Hash128, a hex string or a ModelSpec, got " +
                                    nb::cast<std::string>(nb::str(h.type()))));
  return m;
}

// Wraps a Python callable as a ProgressFn; see the file comment for errors.
class Progress {
 public:
  explicit Progress(nb::handle cb) : cb_(cb) {}
  ~Progress() {
    Py_XDECREF(type_);
    Py_XDECREF(value_);
    Py_XDECREF(tb_);
  }
  ProgressFn Fn() {
    if (cb_.is_none()) return nullptr;
    return [this](uint64_t done, uint64_t total) {
      nb::gil_scoped_acquire locked;
      if (type_ != nullptr) return;  // the callback failed before: stop calling it
      try {
        cb_(done, total);
      } catch (nb::python_error& e) {
        e.restore();
        PyErr_Fetch(&type_, &value_, &tb_);
      }
    };
  }
  // Call with the GIL held, after the store call returned.
  void RethrowIfFailed() {
    if (type_ == nullptr) return;
    PyErr_Restore(type_, value_, tb_);
    type_ = value_ = tb_ = nullptr;
    throw nb::python_error();
  }

 private:
  nb::handle cb_;
  PyObject* type_ = nullptr;
  PyObject* value_ = nullptr;
  PyObject* tb_ = nullptr;
};

nb::dict TierDict(const TierStats& t, bool disk) {
  nb::dict d;
  d["hits"] = t.hits;
  d["misses"] = t.misses;
  d["puts"] = t.puts;
  d["evictions"] = t.evictions;
  d["segments"] = t.segments;
  d["bytes"] = t.bytes;
  d["capacity_bytes"] = t.capacity_bytes;
  if (disk) {
    d["file_bytes"] = t.file_bytes;
    d["pooled_bytes"] = t.pooled_bytes;
    d["corrupt_records"] = t.corrupt_records;
  }
  return d;
}

nb::dict RemoteDict(const RemoteStats& r, uint64_t promotions) {
  nb::dict d = TierDict(r.tier, false);
  d["corrupt_records"] = r.tier.corrupt_records;
  d["bytes_read"] = r.bytes_read;
  d["queue_depth"] = r.queue_depth;
  d["dropped"] = r.dropped;
  d["retries"] = r.retries;
  d["errors"] = r.errors;
  d["connected"] = r.connected;
  d["promotions"] = promotions;
  return d;
}

nb::dict StatsDict(const StoreStats& s) {
  nb::dict d;
  d["host"] = TierDict(s.host, false);
  d["disk"] = s.has_disk ? nb::object(TierDict(s.disk, true)) : nb::none();
  d["device"] = s.has_device ? nb::object(TierDict(s.device, false)) : nb::none();
  d["promotions"] = s.promotions;
  d["write_queue_depth"] = s.write_queue_depth;
  d["write_errors"] = s.write_errors;
  d["has_disk"] = s.has_disk;
  d["has_device"] = s.has_device;
  d["remote"] = s.has_remote ? nb::object(RemoteDict(s.remote, s.remote_promotions)) : nb::none();
  d["has_remote"] = s.has_remote;
  return d;
}

std::unique_ptr<PyStore> Open(std::optional<std::string> path, uint64_t host_capacity_bytes,
                              uint64_t disk_capacity_bytes, uint64_t max_file_bytes, bool write_behind,
                              size_t write_queue_limit, bool sync, const std::string& codec,
                              uint64_t device_capacity_bytes, int device, std::optional<std::string> remote,
                              const std::string& remote_namespace, uint64_t remote_ttl_seconds,
                              int remote_timeout_ms) {
  StoreOptions o;
  o.path = path.value_or("");
  o.host_capacity_bytes = host_capacity_bytes;
  o.disk_capacity_bytes = disk_capacity_bytes;
  o.max_file_bytes = max_file_bytes;
  o.write_behind = write_behind;
  o.write_queue_limit = write_queue_limit;
  o.sync = sync;
  o.disk_codec = ValueOrThrow(CodecFromName(codec));
  o.device_capacity_bytes = device_capacity_bytes;
  o.device = device;
  o.remote.url = remote.value_or("");
  o.remote.ns = remote_namespace;
  o.remote.ttl_seconds = remote_ttl_seconds;
  o.remote.command_timeout_ms = remote_timeout_ms;
  StatusOr<std::unique_ptr<Store>> s = [&] {
    nb::gil_scoped_release unlocked;
    return Store::Open(o);
  }();
  return std::make_unique<PyStore>(ValueOrThrow(std::move(s)));
}

void AtExit() {
  std::vector<PyStore*> live(LiveStores().begin(), LiveStores().end());
  for (PyStore* s : live) {
    try {
      s->Close();
    } catch (nb::python_error& e) {
      e.discard_as_unraisable("closing a kv_agent Store at exit");
    }
  }
}

void RegisterStore(nb::module_& m) {
  nb::class_<PyStore>(m, "Store",
                      "The tiered segment store (host tier, optional disk tier with write-behind).\n"
                      "Thread-safe; every call releases the GIL. Use Store.open(...) and close() or a with block.")
      .def_static("open", &Open, "path"_a = nb::none(), nb::kw_only(), "host_capacity_bytes"_a = 1ull << 30,
                  "disk_capacity_bytes"_a = 0, "max_file_bytes"_a = 256ull << 20, "write_behind"_a = true,
                  "write_queue_limit"_a = 64, "sync"_a = true, "codec"_a = "raw", "device_capacity_bytes"_a = 0,
                  "device"_a = 0, "remote"_a = nb::none(), "remote_namespace"_a = "default",
                  "remote_ttl_seconds"_a = 0, "remote_timeout_ms"_a = 2000,
                  "Opens (creating if needed) a store. path=None: host tier only. disk_capacity_bytes=0: "
                  "unbounded. codec: 'raw' (bit-exact) or 'int8' (per-channel scales) for disk payloads. "
                  "device_capacity_bytes > 0 adds a device tier on CUDA device `device` (UnavailableError "
                  "without CUDA or a GPU). remote='redis://[user:password@]host:port[/db]' adds the shared Redis "
                  "tier for namespace remote_namespace (docs/multi-agent.md); an unreachable server is not an "
                  "error, rejected credentials are (PermissionDeniedError).")
      .def(
          "put",
          [](PyStore& self, const PySegment& seg) {
            SegmentHandle h = seg.seg;
            ThrowIfError(self.Call([&](Store& s) { return s.Put(h); }));
          },
          "segment"_a, "Stores the segment (replacing its key). Blocks while the write-behind queue is full.")
      .def(
          "get",
          [](PyStore& self, nb::handle key, nb::handle model) {
            Hash128 k = KeyOf(key), md = ModelOf(model);
            SegmentHandle h = ValueOrThrow(self.Call([&](Store& s) { return s.Get(k, md); }));
            return PySegment{std::move(h)};
          },
          "key"_a, "model"_a,
          "The segment `key` produced by `model` (Hash128/hex/ModelSpec). NotFoundError, "
          "FailedPreconditionError on a fingerprint mismatch, DataLossError on a corrupt record.")
      .def(
          "get_device",
          [](PyStore& self, nb::handle key, nb::handle model) {
            Hash128 k = KeyOf(key), md = ModelOf(model);
            DeviceSegment d = ValueOrThrow(self.Call([&](Store& s) { return s.GetDevice(k, md); }));
            return PyDeviceSegment{std::move(d)};
          },
          "key"_a, "model"_a,
          "The segment resident in the device tier (a DeviceSegment: .kv()/.k()/.v() are CUDA torch tensors "
          "without copies), loading it host -> device on a miss (promoting disk -> host first). Errors as get(); "
          "UnavailableError if the store has no device tier; ResourceExhaustedError if it cannot fit.")
      .def(
          "info",
          [](PyStore& self, nb::handle key) {
            Hash128 k = KeyOf(key);
            return ValueOrThrow(self.Call([&](Store& s) { return s.Info(k); }));
          },
          "key"_a)
      .def(
          "contains",
          [](PyStore& self, nb::handle key) {
            Hash128 k = KeyOf(key);
            return self.Call([&](Store& s) { return s.Contains(k); });
          },
          "key"_a)
      .def("__contains__",
           [](PyStore& self, nb::handle key) {
             Hash128 k = KeyOf(key);
             return self.Call([&](Store& s) { return s.Contains(k); });
           })
      .def(
          "delete",
          [](PyStore& self, nb::handle key) {
            Hash128 k = KeyOf(key);
            ThrowIfError(self.Call([&](Store& s) { return s.Delete(k); }));
          },
          "key"_a, "NotFoundError if absent.")
      .def(
          "list",
          [](PyStore& self, nb::handle model, const std::string& ns, const std::string& agent,
             const std::string& session, std::optional<int64_t> min_time_us, std::optional<int64_t> max_time_us) {
            SegmentFilter f;
            if (!model.is_none()) f.model = ModelOf(model);
            f.ns = ns;
            f.agent = agent;
            f.session = session;
            if (min_time_us) f.min_time_us = *min_time_us;
            if (max_time_us) f.max_time_us = *max_time_us;
            return self.Call([&](Store& s) { return s.List(f); });
          },
          nb::kw_only(), "model"_a = nb::none(), "ns"_a = "", "agent"_a = "", "session"_a = "",
          "min_time_us"_a = nb::none(), "max_time_us"_a = nb::none(),
          "SegmentInfos matching every given filter (empty strings match anything; times inclusive).")
      .def(
          "flush", [](PyStore& self) { ThrowIfError(self.Call([](Store& s) { return s.Flush(); })); },
          "Waits until every acknowledged put is on disk and synced.")
      .def(
          "flush_remote",
          [](PyStore& self, int timeout_ms) {
            ThrowIfError(self.Call([&](Store& s) { return s.FlushRemote(timeout_ms); }));
          },
          "timeout_ms"_a = 10000,
          "Waits until every put so far has been written to the remote tier (or dropped: UnavailableError). "
          "DeadlineExceededError on timeout; FailedPreconditionError without a remote tier.")
      .def(
          "stats", [](PyStore& self) { return StatsDict(self.Call([](Store& s) { return s.Stats(); })); },
          "{'host': {...}, 'disk': {...} or None, 'device': {...} or None, 'promotions', 'write_queue_depth', "
          "'write_errors', 'has_disk', 'has_device'}")
      .def(
          "verify",
          [](PyStore& self, nb::handle progress) {
            Progress p(progress);
            ProgressFn fn = p.Fn();
            StatusOr<VerifyReport> r = self.Call([&](Store& s) { return s.Verify(fn); });
            p.RethrowIfFailed();
            VerifyReport v = ValueOrThrow(std::move(r));
            nb::dict d;
            d["records"] = v.records;
            d["ok"] = v.ok;
            d["corrupt"] = v.corrupt;
            d["bytes"] = v.bytes;
            d["problems"] = v.problems;
            return d;
          },
          "progress"_a = nb::none(),
          "Reads every disk record and checks its checksum. progress(done, total) is called from the "
          "working thread with the GIL held. Returns {'records', 'ok', 'corrupt', 'bytes', 'problems'}.")
      .def(
          "compact",
          [](PyStore& self, nb::handle progress) {
            Progress p(progress);
            ProgressFn fn = p.Fn();
            StatusOr<CompactReport> r = self.Call([&](Store& s) { return s.Compact(fn); });
            p.RethrowIfFailed();
            CompactReport c = ValueOrThrow(std::move(r));
            nb::dict d;
            d["files_before"] = c.files_before;
            d["files_after"] = c.files_after;
            d["bytes_before"] = c.bytes_before;
            d["bytes_after"] = c.bytes_after;
            d["records_moved"] = c.records_moved;
            return d;
          },
          "progress"_a = nb::none(), "Rewrites segment files without dead space; progress as verify().")
      .def("close", &PyStore::Close, "Flushes and stops background work. Later calls raise FailedPreconditionError.")
      .def_prop_ro("closed", &PyStore::closed)
      .def("__enter__", [](nb::handle self) { return nb::borrow(self); })
      .def(
          "__exit__", [](PyStore& self, nb::handle, nb::handle, nb::handle) { self.Close(); }, "exc_type"_a.none(),
          "exc"_a.none(), "tb"_a.none());

  m.def(
      "codec_encoded_size",
      [](const SegmentLayout& layout, const std::string& codec) {
        return EncodedSize(layout, ValueOrThrow(CodecFromName(codec)));
      },
      "layout"_a, "codec"_a, "Bytes of a payload of `layout` encoded with codec 'raw' or 'int8'.");
  m.def("_close_all_stores", &AtExit, "Closes every open Store (registered with atexit).");
  nb::module_::import_("atexit").attr("register")(m.attr("_close_all_stores"));
}

Registration reg("store", 2, &RegisterStore);

}  // namespace
}  // namespace kvagent::py
