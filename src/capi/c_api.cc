// The C ABI (kvagent/c_api.h) over Store and LatentIndex: conversions only, no behaviour of its
// own. No exception may cross into C: the few calls that can throw (allocation) are caught.
#include "kvagent/c_api.h"

#include <cstring>
#include <exception>
#include <memory>
#include <string>
#include <vector>

#include "kvagent/index.h"
#include "kvagent/store.h"

struct kva_store {
  std::unique_ptr<kvagent::Store> store;
};
struct kva_index {
  std::unique_ptr<kvagent::LatentIndex> index;
};
struct kva_segment {
  kvagent::SegmentHandle segment;
};

namespace {

using kvagent::Hash128;
using kvagent::Status;
using kvagent::StatusCode;

thread_local std::string last_error;

kva_code Report(const Status& s) {
  if (s.ok()) {
    last_error.clear();
    return KVA_OK;
  }
  last_error = s.ToString();
  return static_cast<kva_code>(s.code());
}

kva_code Invalid(const char* what) { return Report(kvagent::InvalidArgumentError(what)); }

// Runs `f` (returning Status), turning exceptions (std::bad_alloc) into Internal errors.
template <typename F>
kva_code Guard(F&& f) {
  try {
    return Report(f());
  } catch (const std::exception& e) {
    return Report(kvagent::InternalError(std::string("kv-agent C API: ") + e.what()));
  }
}

Hash128 ToHash(kva_hash128 h) { return Hash128{h.lo, h.hi}; }
kva_hash128 FromHash(const Hash128& h) { return kva_hash128{h.lo, h.hi}; }
std::string Str(const char* s) { return s ? std::string(s) : std::string(); }

}  // namespace

extern "C" {

const char* kva_last_error(void) { return last_error.c_str(); }

const char* kva_code_name(kva_code code) {
  // StatusCodeName returns views of string literals, so data() is NUL-terminated.
  return kvagent::StatusCodeName(static_cast<StatusCode>(code)).data();
}

kva_hash128 kva_memory_key(const char* ns, const char* session, int64_t turn, int32_t chunk) {
  return FromHash(kvagent::MemoryKey(ns ? ns : "", session ? session : "", turn, chunk));
}

kva_store_options kva_store_default_options(void) {
  kvagent::StoreOptions d;
  return kva_store_options{nullptr, d.host_capacity_bytes, d.write_behind ? 1 : 0, d.sync ? 1 : 0};
}

kva_code kva_store_open(const kva_store_options* options, kva_store** out) {
  if (!options || !out) return Invalid("kva_store_open: NULL argument");
  return Guard([&]() -> Status {
    kvagent::StoreOptions o;
    o.path = Str(options->path);
    if (options->host_capacity_bytes != 0) o.host_capacity_bytes = options->host_capacity_bytes;
    o.write_behind = options->write_behind != 0;
    o.sync = options->sync != 0;
    KVAGENT_ASSIGN_OR_RETURN(auto store, kvagent::Store::Open(o));
    *out = new kva_store{std::move(store)};
    return Status::Ok();
  });
}

kva_code kva_store_close(kva_store* store) {
  if (!store) return Invalid("kva_store_close: NULL store");
  return Guard([&] { return store->store->Close(); });
}

void kva_store_free(kva_store* store) {
  if (!store) return;
  store->store->Close().IgnoreError();
  delete store;
}

kva_code kva_store_flush(kva_store* store) {
  if (!store) return Invalid("kva_store_flush: NULL store");
  return Guard([&] { return store->store->Flush(); });
}

kva_code kva_store_put(kva_store* store, const kva_segment_desc* d) {
  if (!store || !d) return Invalid("kva_store_put: NULL argument");
  if (d->num_tokens < 0 || (d->num_tokens > 0 && (!d->tokens || !d->positions)))
    return Invalid("kva_store_put: tokens and positions must hold num_tokens values");
  if (d->dtype != KVA_F32 && d->dtype != KVA_F16 && d->dtype != KVA_BF16) return Invalid("kva_store_put: bad dtype");
  if (!d->payload && d->payload_bytes != 0) return Invalid("kva_store_put: NULL payload");
  if (!d->summary && d->summary_bytes != 0) return Invalid("kva_store_put: NULL summary");
  return Guard([&]() -> Status {
    auto s = std::make_shared<kvagent::Segment>();
    s->key = ToHash(d->key);
    s->model = ToHash(d->model);
    s->parent = ToHash(d->parent);
    s->layout = kvagent::SegmentLayout{d->num_layers, d->num_kv_heads, d->head_dim, d->num_tokens,
                                       static_cast<kvagent::DType>(d->dtype)};
    s->pre_rope = d->pre_rope != 0;
    s->tokens.assign(d->tokens, d->tokens + d->num_tokens);
    s->positions.assign(d->positions, d->positions + d->num_tokens);
    s->meta = kvagent::SegmentMeta{Str(d->ns), Str(d->agent), Str(d->session), d->turn,
                                   d->chunk,   Str(d->role),  Str(d->text),    d->time_us};
    if (d->summary) s->summary.assign(static_cast<const char*>(d->summary), d->summary_bytes);
    // Validate (in Put) compares payload_bytes with the layout before anything is copied twice.
    KVAGENT_ASSIGN_OR_RETURN(s->payload, kvagent::Buffer::CopyOf(std::span<const std::byte>(
                                             static_cast<const std::byte*>(d->payload), d->payload_bytes)));
    return store->store->Put(std::move(s));
  });
}

kva_code kva_store_get(kva_store* store, kva_hash128 key, kva_hash128 model, kva_segment** out) {
  if (!store || !out) return Invalid("kva_store_get: NULL argument");
  return Guard([&]() -> Status {
    KVAGENT_ASSIGN_OR_RETURN(auto seg, store->store->Get(ToHash(key), ToHash(model)));
    *out = new kva_segment{std::move(seg)};
    return Status::Ok();
  });
}

kva_code kva_store_delete(kva_store* store, kva_hash128 key) {
  if (!store) return Invalid("kva_store_delete: NULL store");
  return Guard([&] { return store->store->Delete(ToHash(key)); });
}

kva_code kva_store_list(kva_store* store, const char* ns, const char* session, kva_hash128* keys, size_t capacity,
                        size_t* count) {
  if (!store || !count || (!keys && capacity != 0)) return Invalid("kva_store_list: NULL argument");
  return Guard([&]() -> Status {
    kvagent::SegmentFilter f;
    f.ns = Str(ns);
    f.session = Str(session);
    const auto infos = store->store->List(f);
    for (size_t i = 0; i < infos.size() && i < capacity; ++i) keys[i] = FromHash(infos[i].key);
    *count = infos.size();
    return Status::Ok();
  });
}

void kva_segment_free(kva_segment* segment) { delete segment; }

kva_hash128 kva_segment_key(const kva_segment* segment) { return FromHash(segment->segment->key); }

void kva_segment_layout(const kva_segment* segment, int32_t* num_layers, int32_t* num_kv_heads, int32_t* head_dim,
                        int32_t* num_tokens, kva_dtype* dtype) {
  const kvagent::SegmentLayout& l = segment->segment->layout;
  if (num_layers) *num_layers = l.num_layers;
  if (num_kv_heads) *num_kv_heads = l.num_kv_heads;
  if (head_dim) *head_dim = l.head_dim;
  if (num_tokens) *num_tokens = l.num_tokens;
  if (dtype) *dtype = static_cast<kva_dtype>(l.dtype);
}

const void* kva_segment_payload(const kva_segment* segment, size_t* bytes) {
  const auto& p = segment->segment->payload;
  if (bytes) *bytes = p ? p->size() : 0;
  return p ? p->data() : nullptr;
}

const int32_t* kva_segment_tokens(const kva_segment* segment, size_t* count) {
  if (count) *count = segment->segment->tokens.size();
  return segment->segment->tokens.data();
}

const int64_t* kva_segment_positions(const kva_segment* segment, size_t* count) {
  if (count) *count = segment->segment->positions.size();
  return segment->segment->positions.data();
}

const char* kva_segment_text(const kva_segment* segment, size_t* len) {
  if (len) *len = segment->segment->meta.text.size();
  return segment->segment->meta.text.c_str();
}

const char* kva_segment_session(const kva_segment* segment, size_t* len) {
  if (len) *len = segment->segment->meta.session.size();
  return segment->segment->meta.session.c_str();
}

void kva_segment_turn(const kva_segment* segment, int64_t* turn, int64_t* time_us) {
  if (turn) *turn = segment->segment->meta.turn;
  if (time_us) *time_us = segment->segment->meta.time_us;
}

kva_code kva_index_create(const void* spec, size_t spec_bytes, kva_index** out) {
  if (!spec || !out) return Invalid("kva_index_create: NULL argument");
  return Guard([&]() -> Status {
    KVAGENT_ASSIGN_OR_RETURN(auto model,
                             kvagent::ModelSpec::Deserialize(std::string_view(static_cast<const char*>(spec), spec_bytes)));
    KVAGENT_ASSIGN_OR_RETURN(auto index, kvagent::LatentIndex::Create(model));
    *out = new kva_index{std::move(index)};
    return Status::Ok();
  });
}

void kva_index_free(kva_index* index) { delete index; }

size_t kva_index_size(const kva_index* index) { return index->index->size(); }

kva_code kva_index_add_stored(kva_index* index, kva_store* store, kva_hash128 key, int pinned) {
  if (!index || !store) return Invalid("kva_index_add_stored: NULL argument");
  return Guard([&]() -> Status {
    KVAGENT_ASSIGN_OR_RETURN(auto seg, store->store->Get(ToHash(key), index->index->spec().fingerprint));
    kvagent::IndexEntry e;
    e.key = seg->key;
    e.ns = seg->meta.ns;
    e.agent = seg->meta.agent;
    e.session = seg->meta.session;
    e.turn = seg->meta.turn;
    e.chunk = seg->meta.chunk;
    e.time_us = seg->meta.time_us;
    e.num_tokens = seg->layout.num_tokens;
    e.pinned = pinned != 0;
    if (!seg->summary.empty()) return index->index->AddSerialized(e, seg->summary);
    KVAGENT_ASSIGN_OR_RETURN(auto summary, kvagent::KeySummary::FromSegment(*seg, index->index->layers()));
    return index->index->Add(e, summary);
  });
}

kva_code kva_index_remove(kva_index* index, kva_hash128 key) {
  if (!index) return Invalid("kva_index_remove: NULL index");
  return Guard([&] { return index->index->Remove(ToHash(key)); });
}

kva_code kva_index_search(const kva_index* index, const float* query, int32_t num_layers, int32_t num_q_heads,
                          int32_t num_tokens, int32_t head_dim, int32_t top_k, const char* ns, int64_t token_budget,
                          kva_hit* hits, size_t capacity, size_t* count) {
  if (!index || !query || !count || (!hits && capacity != 0)) return Invalid("kva_index_search: NULL argument");
  return Guard([&]() -> Status {
    kvagent::QueryView q{query, kvagent::DType::kF32, num_layers, num_q_heads, num_tokens, head_dim};
    kvagent::SearchRequest r;
    r.top_k = top_k;
    if (token_budget >= 0) r.token_budget = token_budget;
    if (ns) r.ns = std::string(ns);
    r.explain = false;
    KVAGENT_ASSIGN_OR_RETURN(auto found, index->index->Search(q, r));
    for (size_t i = 0; i < found.size() && i < capacity; ++i) {
      const kvagent::Hit& h = found[i];
      hits[i] = kva_hit{FromHash(h.entry.key), h.score, h.rank, h.pinned ? 1 : 0, h.entry.turn, h.entry.num_tokens};
    }
    *count = found.size();
    return Status::Ok();
  });
}

}  // extern "C"
