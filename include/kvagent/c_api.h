/* C ABI of kv-agent: the segment store and the latent index for hosts that are not C++ (a
 * llama.cpp-based server, Go through cgo, Rust through bindgen). Plain C99; every object is an
 * opaque handle created and destroyed by this API.
 *
 * Errors: every fallible function returns a kva_code (KVA_OK = 0, else the kvagent::StatusCode
 * value of the error, kvagent/status.h) and sets the calling thread's last error message, read
 * with kva_last_error() (valid until the thread's next call into this API). A failed call leaves
 * its out-parameters untouched and the store or index unchanged (as the C++ API documents).
 *
 * Ownership: pointers passed in are borrowed for the duration of the call (the store copies what
 * it keeps); handles returned (kva_store, kva_index, kva_segment) are owned by the caller and
 * released with the matching _free function. A kva_segment stays valid after the segment is
 * deleted or the store is closed, until kva_segment_free.
 *
 * Thread-safety: a kva_store and a kva_index may be used from several threads at once (the
 * C++ objects are thread-safe); a kva_segment is immutable. Freeing a handle while another
 * thread uses it is undefined.
 */
#ifndef KVAGENT_C_API_H_
#define KVAGENT_C_API_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum kva_code {
  KVA_OK = 0,
  KVA_CANCELLED = 1,
  KVA_UNKNOWN = 2,
  KVA_INVALID_ARGUMENT = 3,
  KVA_DEADLINE_EXCEEDED = 4,
  KVA_NOT_FOUND = 5,
  KVA_ALREADY_EXISTS = 6,
  KVA_PERMISSION_DENIED = 7,
  KVA_RESOURCE_EXHAUSTED = 8,
  KVA_FAILED_PRECONDITION = 9,
  KVA_ABORTED = 10,
  KVA_OUT_OF_RANGE = 11,
  KVA_UNIMPLEMENTED = 12,
  KVA_INTERNAL = 13,
  KVA_UNAVAILABLE = 14,
  KVA_DATA_LOSS = 15
} kva_code;

/* Message of the calling thread's last failed call ("" after a successful one). Never NULL. */
const char* kva_last_error(void);
/* Canonical name of a code ("InvalidArgument"). Never NULL. */
const char* kva_code_name(kva_code code);

/* 128-bit identity (kvagent/hash.h): segment keys and model fingerprints. */
typedef struct kva_hash128 {
  uint64_t lo;
  uint64_t hi;
} kva_hash128;

/* Element types of payloads and queries (kvagent/dtype.h). */
typedef enum kva_dtype { KVA_F32 = 0, KVA_F16 = 1, KVA_BF16 = 2 } kva_dtype;

/* kvagent::MemoryKey(ns, session, turn, chunk): the key of a memory slot. NULL strings are "". */
kva_hash128 kva_memory_key(const char* ns, const char* session, int64_t turn, int32_t chunk);

/* ---- store ---- */

typedef struct kva_store kva_store;

typedef struct kva_store_options {
  const char* path;             /* directory of the disk tier; NULL or "" = host memory only */
  uint64_t host_capacity_bytes; /* 0 = the C++ default (1 GiB) */
  int write_behind;             /* nonzero: Puts reach disk in the background (kva_store_flush) */
  int sync;                     /* nonzero: fdatasync records (durable on flush/close) */
} kva_store_options;

/* Default options: no path, 1 GiB host tier, write-behind and sync on. */
kva_store_options kva_store_default_options(void);
/* Opens a store (kvagent::Store::Open). *out receives the handle. */
kva_code kva_store_open(const kva_store_options* options, kva_store** out);
/* Flushes and closes; the handle must still be freed. Later calls return FAILED_PRECONDITION. */
kva_code kva_store_close(kva_store* store);
/* Closes (ignoring errors; call kva_store_close first to see them) and frees. NULL is a no-op. */
void kva_store_free(kva_store* store);
/* Waits until every acknowledged put is on disk and synced. */
kva_code kva_store_flush(kva_store* store);

/* A segment to store: geometry, tokens, positions, metadata, canonical payload
 * [layer][k|v][kv_head][token][dim] in `dtype`. Strings may be NULL (= ""). */
typedef struct kva_segment_desc {
  kva_hash128 key;
  kva_hash128 model;
  kva_hash128 parent;
  int32_t num_layers, num_kv_heads, head_dim, num_tokens;
  int32_t dtype;           /* a kva_dtype value; anything else is KVA_INVALID_ARGUMENT */
  int pre_rope;            /* nonzero: keys are stored before rotation */
  const int32_t* tokens;   /* num_tokens */
  const int64_t* positions; /* num_tokens */
  const char* ns;
  const char* agent;
  const char* session;
  int64_t turn;
  int32_t chunk;
  const char* role;
  const char* text;
  int64_t time_us;
  const void* payload;     /* payload_bytes bytes, copied */
  size_t payload_bytes;    /* num_layers * 2 * num_kv_heads * num_tokens * head_dim * sizeof(dtype) */
  const void* summary;     /* serialised KeySummary (kvagent/index.h) or NULL: kva_index_add_stored
                              computes one from the pre-RoPE keys when absent */
  size_t summary_bytes;
} kva_segment_desc;

/* Stores a copy of the segment (replaces an existing key). INVALID_ARGUMENT if inconsistent. */
kva_code kva_store_put(kva_store* store, const kva_segment_desc* segment);

typedef struct kva_segment kva_segment;
/* The segment `key` produced by `model`: NOT_FOUND, FAILED_PRECONDITION for another model. */
kva_code kva_store_get(kva_store* store, kva_hash128 key, kva_hash128 model, kva_segment** out);
/* NOT_FOUND if absent. */
kva_code kva_store_delete(kva_store* store, kva_hash128 key);
/* Keys of the stored segments whose namespace and session match (NULL or "" = any), in no
 * particular order: writes up to `capacity` keys to `keys` (may be NULL when capacity is 0) and
 * the total number of matches to *count (call with capacity 0 to size the array). */
kva_code kva_store_list(kva_store* store, const char* ns, const char* session, kva_hash128* keys, size_t capacity,
                        size_t* count);

/* Reading a segment. The pointers returned live as long as the kva_segment. */
void kva_segment_free(kva_segment* segment);
kva_hash128 kva_segment_key(const kva_segment* segment);
/* Geometry; any out-pointer may be NULL. */
void kva_segment_layout(const kva_segment* segment, int32_t* num_layers, int32_t* num_kv_heads, int32_t* head_dim,
                        int32_t* num_tokens, kva_dtype* dtype);
const void* kva_segment_payload(const kva_segment* segment, size_t* bytes);
const int32_t* kva_segment_tokens(const kva_segment* segment, size_t* count);
const int64_t* kva_segment_positions(const kva_segment* segment, size_t* count);
/* Metadata; turn and time_us may be NULL. Strings are NUL-terminated (embedded NULs are kept;
 * the _len variants give the full length). */
const char* kva_segment_text(const kva_segment* segment, size_t* len);
const char* kva_segment_session(const kva_segment* segment, size_t* len);
void kva_segment_turn(const kva_segment* segment, int64_t* turn, int64_t* time_us);

/* ---- latent index ---- */

typedef struct kva_index kva_index;

/* Creates an index for the model whose spec is `spec` (kvagent::ModelSpec::Serialize bytes, the
 * stable form the Python package and the store use), with the default IndexOptions. DATA_LOSS
 * for malformed spec bytes. */
kva_code kva_index_create(const void* spec, size_t spec_bytes, kva_index** out);
void kva_index_free(kva_index* index);
/* Number of indexed segments. */
size_t kva_index_size(const kva_index* index);

/* Indexes the stored segment `key` (produced by the index's model) under its metadata: its
 * stored key summary when it has one, else one computed from its pre-RoPE keys. NOT_FOUND,
 * FAILED_PRECONDITION (other model), ALREADY_EXISTS, INVALID_ARGUMENT (post-RoPE keys without
 * a summary, geometry unlike the spec). `pinned`: always returned by searches. */
kva_code kva_index_add_stored(kva_index* index, kva_store* store, kva_hash128 key, int pinned);
/* NOT_FOUND if absent. */
kva_code kva_index_remove(kva_index* index, kva_hash128 key);

typedef struct kva_hit {
  kva_hash128 key;
  float score;        /* comparable within one search only */
  int32_t rank;       /* 0 = best */
  int32_t pinned;     /* included because pinned */
  int64_t turn;
  int64_t num_tokens;
} kva_hit;

/* Searches with query vectors `query`, dense f32 [num_layers][num_q_heads][num_tokens][head_dim]
 * over the index's layers (kvagent/index.h QueryView), for at most `top_k` non-pinned hits of
 * namespace `ns` (NULL = any) within `token_budget` tokens (< 0 = no limit). Writes up to
 * `capacity` hits in the segments' original order (as LatentIndex::Search returns them; `rank`
 * 0 is the best) and their number to *count. INVALID_ARGUMENT for a query of the wrong shape. */
kva_code kva_index_search(const kva_index* index, const float* query, int32_t num_layers, int32_t num_q_heads,
                          int32_t num_tokens, int32_t head_dim, int32_t top_k, const char* ns, int64_t token_budget,
                          kva_hit* hits, size_t capacity, size_t* count);

#ifdef __cplusplus
}
#endif

#endif /* KVAGENT_C_API_H_ */
