/* The C ABI (kvagent/c_api.h) from C: a disk store (put, get, list, delete, reopen), the error
 * codes and messages of bad calls (the store unchanged), and an index over stored segments. */
#define _DEFAULT_SOURCE /* mkdtemp */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvagent/c_api.h"

static int failures = 0;
#define CHECK(cond)                                                   \
  do {                                                                \
    if (!(cond)) {                                                    \
      fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++failures;                                                     \
    }                                                                 \
  } while (0)
#define CHECK_CODE(call, want)                                                                      \
  do {                                                                                              \
    kva_code got_ = (call);                                                                         \
    if (got_ != (want)) {                                                                           \
      fprintf(stderr, "%s:%d: %s returned %s (%s), want %s\n", __FILE__, __LINE__, #call,           \
              kva_code_name(got_), kva_last_error(), kva_code_name(want));                          \
      ++failures;                                                                                   \
    }                                                                                               \
  } while (0)

/* The golden model spec (tests/cpp/golden/model_spec.bin): 4 layers, 4 query heads, 2 KV heads,
 * head_dim 8. */
static const kva_hash128 kModel = {0x0123456789abcdefULL, 0xfedcba9876543210ULL};
enum { kLayers = 4, kHeads = 2, kDim = 8, kTokens = 3, kQHeads = 4 };
#define kElems (kLayers * 2 * kHeads * kTokens * kDim)

/* Segment `n`: every key points along dimension n (values 1 there, 0 elsewhere), values are n. */
static void fill(int n, float* payload, int32_t* tokens, int64_t* positions, kva_segment_desc* d, char* text) {
  int l, kv, h, t, i;
  for (l = 0; l < kLayers; ++l)
    for (kv = 0; kv < 2; ++kv)
      for (h = 0; h < kHeads; ++h)
        for (t = 0; t < kTokens; ++t)
          for (i = 0; i < kDim; ++i)
            payload[(((l * 2 + kv) * kHeads + h) * kTokens + t) * kDim + i] = kv == 0 ? (i == n ? 1.0f : 0.0f) : (float)n;
  for (t = 0; t < kTokens; ++t) {
    tokens[t] = 100 * n + t;
    positions[t] = 10 * n + t;
  }
  sprintf(text, "turn %d", n);
  memset(d, 0, sizeof *d);
  d->key = kva_memory_key("c", "s", n, 0);
  d->model = kModel;
  d->num_layers = kLayers;
  d->num_kv_heads = kHeads;
  d->head_dim = kDim;
  d->num_tokens = kTokens;
  d->dtype = KVA_F32;
  d->pre_rope = 1;
  d->tokens = tokens;
  d->positions = positions;
  d->ns = "c";
  d->session = "s";
  d->turn = n;
  d->role = "user";
  d->text = text;
  d->time_us = 1000 + n;
  d->payload = payload;
  d->payload_bytes = sizeof(float) * kElems;
}

static int put(kva_store* store, int n) {
  float payload[kElems];
  int32_t tokens[kTokens];
  int64_t positions[kTokens];
  char text[32];
  kva_segment_desc d;
  fill(n, payload, tokens, positions, &d, text);
  return kva_store_put(store, &d);
}

static void test_store(const char* dir) {
  kva_store_options o = kva_store_default_options();
  kva_store* store = NULL;
  kva_segment* seg = NULL;
  kva_hash128 keys[8];
  size_t count = 0, bytes = 0, n = 0;
  int n_seg;
  o.path = dir;
  CHECK_CODE(kva_store_open(&o, &store), KVA_OK);
  if (!store) return;
  for (n_seg = 0; n_seg < 3; ++n_seg) CHECK_CODE(put(store, n_seg), KVA_OK);

  CHECK_CODE(kva_store_get(store, kva_memory_key("c", "s", 1, 0), kModel, &seg), KVA_OK);
  if (seg) {
    const float* p = (const float*)kva_segment_payload(seg, &bytes);
    const int32_t* tokens = kva_segment_tokens(seg, &n);
    int64_t turn = 0, time_us = 0;
    int32_t layers = 0, heads = 0, dim = 0, ntok = 0;
    kva_dtype dt = KVA_F16;
    CHECK(bytes == sizeof(float) * kElems);
    CHECK(p[1] == 1.0f && p[0] == 0.0f);
    CHECK(n == kTokens && tokens[2] == 102);
    CHECK(strcmp(kva_segment_text(seg, &n), "turn 1") == 0 && n == 6);
    CHECK(strcmp(kva_segment_session(seg, NULL), "s") == 0);
    kva_segment_turn(seg, &turn, &time_us);
    CHECK(turn == 1 && time_us == 1001);
    kva_segment_layout(seg, &layers, &heads, &dim, &ntok, &dt);
    CHECK(layers == kLayers && heads == kHeads && dim == kDim && ntok == kTokens && dt == KVA_F32);
    CHECK(kva_segment_key(seg).lo == kva_memory_key("c", "s", 1, 0).lo);
    kva_segment_free(seg);
    seg = NULL;
  }

  /* Errors: a code, a message, out-parameters and the store untouched. */
  CHECK_CODE(kva_store_get(store, kva_memory_key("c", "s", 9, 0), kModel, &seg), KVA_NOT_FOUND);
  CHECK(seg == NULL && strlen(kva_last_error()) > 0);
  {
    kva_hash128 other = {1, 2};
    CHECK_CODE(kva_store_get(store, kva_memory_key("c", "s", 1, 0), other, &seg), KVA_FAILED_PRECONDITION);
    CHECK(strstr(kva_last_error(), "FailedPrecondition") != NULL);
  }
  {
    float payload[kElems];
    int32_t tokens[kTokens];
    int64_t positions[kTokens];
    char text[32];
    kva_segment_desc d;
    fill(7, payload, tokens, positions, &d, text);
    d.payload_bytes -= 4;
    CHECK_CODE(kva_store_put(store, &d), KVA_INVALID_ARGUMENT);
    d.payload_bytes += 4;
    d.dtype = 9;
    CHECK_CODE(kva_store_put(store, &d), KVA_INVALID_ARGUMENT);
  }
  CHECK_CODE(kva_store_put(store, NULL), KVA_INVALID_ARGUMENT);
  CHECK_CODE(kva_store_list(store, "c", NULL, NULL, 0, &count), KVA_OK);
  CHECK(count == 3);
  CHECK(strcmp(kva_last_error(), "") == 0);

  CHECK_CODE(kva_store_delete(store, kva_memory_key("c", "s", 0, 0)), KVA_OK);
  CHECK_CODE(kva_store_delete(store, kva_memory_key("c", "s", 0, 0)), KVA_NOT_FOUND);
  keys[1].lo = 42;
  CHECK_CODE(kva_store_list(store, NULL, NULL, keys, 1, &count), KVA_OK);
  CHECK(count == 2 && keys[1].lo == 42); /* only `capacity` keys written */
  CHECK(keys[0].lo == kva_memory_key("c", "s", 1, 0).lo || keys[0].lo == kva_memory_key("c", "s", 2, 0).lo);
  CHECK_CODE(kva_store_list(store, NULL, NULL, keys, 8, &count), KVA_OK);
  CHECK(count == 2 && keys[0].lo != keys[1].lo);
  CHECK_CODE(kva_store_list(store, "other", NULL, keys, 8, &count), KVA_OK);
  CHECK(count == 0);
  CHECK_CODE(kva_store_close(store), KVA_OK);
  CHECK_CODE(kva_store_flush(store), KVA_FAILED_PRECONDITION);
  kva_store_free(store);

  /* Reopen: what was acknowledged is on disk. */
  store = NULL;
  CHECK_CODE(kva_store_open(&o, &store), KVA_OK);
  if (!store) return;
  CHECK_CODE(kva_store_list(store, NULL, NULL, keys, 8, &count), KVA_OK);
  CHECK(count == 2);
  kva_store_free(store);
}

static void test_index(const char* spec_path) {
  char spec[4096];
  size_t spec_len;
  kva_store_options o = kva_store_default_options();
  kva_store* store = NULL;
  kva_index* index = NULL;
  kva_hit hits[4];
  size_t count = 0;
  float query[kLayers * kQHeads * 1 * kDim];
  int i, n;
  FILE* f = fopen(spec_path, "rb");
  CHECK(f != NULL);
  if (!f) return;
  spec_len = fread(spec, 1, sizeof spec, f);
  fclose(f);

  CHECK_CODE(kva_index_create(spec, 3, &index), KVA_DATA_LOSS);
  CHECK(index == NULL);
  CHECK_CODE(kva_index_create(spec, spec_len, &index), KVA_OK);
  CHECK_CODE(kva_store_open(&o, &store), KVA_OK);
  if (!index || !store) return;
  for (n = 0; n < 4; ++n) CHECK_CODE(put(store, n), KVA_OK);
  for (n = 0; n < 4; ++n) CHECK_CODE(kva_index_add_stored(index, store, kva_memory_key("c", "s", n, 0), 0), KVA_OK);
  CHECK(kva_index_size(index) == 4);
  CHECK_CODE(kva_index_add_stored(index, store, kva_memory_key("c", "s", 1, 0), 0), KVA_ALREADY_EXISTS);
  CHECK_CODE(kva_index_add_stored(index, store, kva_memory_key("c", "s", 8, 0), 0), KVA_NOT_FOUND);
  CHECK(kva_index_size(index) == 4);

  /* A query along dimension 2 finds segment 2 first. */
  for (i = 0; i < (int)(sizeof query / sizeof query[0]); ++i) query[i] = (i % kDim) == 2 ? 4.0f : 0.0f;
  CHECK_CODE(kva_index_search(index, query, kLayers, kQHeads, 1, kDim, 2, "c", -1, hits, 4, &count), KVA_OK);
  CHECK(count == 2);
  /* Hits come in the segments' stored order; rank 0 is the best. */
  CHECK(hits[0].turn < hits[1].turn);
  {
    const kva_hit* best = hits[0].rank == 0 ? &hits[0] : &hits[1];
    const kva_hit* other = best == &hits[0] ? &hits[1] : &hits[0];
    CHECK(best->rank == 0 && other->rank == 1);
    CHECK(best->key.lo == kva_memory_key("c", "s", 2, 0).lo && best->turn == 2);
    CHECK(best->num_tokens == kTokens && !best->pinned && isfinite(best->score));
    CHECK(best->score > other->score);
  }
  /* Another namespace: nothing. A query of the wrong shape: InvalidArgument. */
  CHECK_CODE(kva_index_search(index, query, kLayers, kQHeads, 1, kDim, 2, "other", -1, hits, 4, &count), KVA_OK);
  CHECK(count == 0);
  count = 77;
  CHECK_CODE(kva_index_search(index, query, kLayers, kQHeads, 1, kDim / 2, 2, NULL, -1, hits, 4, &count),
             KVA_INVALID_ARGUMENT);
  CHECK(count == 77);
  CHECK_CODE(kva_index_remove(index, kva_memory_key("c", "s", 2, 0)), KVA_OK);
  CHECK_CODE(kva_index_remove(index, kva_memory_key("c", "s", 2, 0)), KVA_NOT_FOUND);
  CHECK_CODE(kva_index_search(index, query, kLayers, kQHeads, 1, kDim, 1, NULL, -1, hits, 4, &count), KVA_OK);
  CHECK(count == 1 && hits[0].key.lo != kva_memory_key("c", "s", 2, 0).lo);
  kva_index_free(index);
  kva_store_free(store);
}

int main(void) {
  char dir[] = "/tmp/kvagent-c-api-XXXXXX";
  char cmd[128];
  if (!mkdtemp(dir)) return 2;
  test_store(dir);
  test_index(KVAGENT_GOLDEN_DIR "/model_spec.bin");
  snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
  if (system(cmd) != 0) ++failures;
  if (failures) fprintf(stderr, "%d checks failed\n", failures);
  else printf("c_api_test: all checks passed\n");
  return failures ? 1 : 0;
}
