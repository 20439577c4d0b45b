#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "cuda/kv_kernels.cuh"

namespace kvagent::cuda::kernels {
namespace {

// Raw storage of `kBytes` bytes: moved as one access so copies stay bit-exact.
template <int kBytes>
struct RawT;
template <>
struct RawT<16> {
  using type = uint4;
};
template <>
struct RawT<8> {
  using type = uint2;
};
template <>
struct RawT<4> {
  using type = uint32_t;
};
template <>
struct RawT<2> {
  using type = uint16_t;
};
template <>
struct RawT<1> {
  using type = uint8_t;
};

template <typename T>
__device__ __forceinline__ float ToF(T x);
template <>
__device__ __forceinline__ float ToF<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ float ToF<__half>(__half x) {
  return __half2float(x);
}
template <>
__device__ __forceinline__ float ToF<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
template <typename T>
__device__ __forceinline__ T FromF(float x);
template <>
__device__ __forceinline__ float FromF<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half FromF<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 FromF<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

template <typename T, int kVec>
struct Vec {
  using Raw = typename RawT<sizeof(T) * kVec>::type;
  union {
    Raw raw;
    T e[kVec];
  };
};

template <typename T, int kVec>
__device__ __forceinline__ void LoadVec(const T* p, Vec<T, kVec>& v) {
  using Raw = typename Vec<T, kVec>::Raw;
  v.raw = *reinterpret_cast<const Raw*>(p);
}
template <typename T, int kVec>
__device__ __forceinline__ void StoreVec(T* p, const Vec<T, kVec>& v) {
  using Raw = typename Vec<T, kVec>::Raw;
  *reinterpret_cast<Raw*>(p) = v.raw;
}

// Angle reduction in double: positions up to 2^40 and any inv_freq <= 1 keep the reduced
// angle within a few ulp of fp32; the fp32 sincosf then runs on [-pi, pi].
__device__ __forceinline__ void CosSin(int64_t pos, double inv_freq, float scale, float* c, float* s) {
  constexpr double kTwoPiHi = 6.283185307179586232;   // 2*pi rounded to double
  constexpr double kTwoPiLo = 2.449293598294706e-16;  // 2*pi - kTwoPiHi
  constexpr double kInvTwoPi = 0.15915494309189535;
  double a = static_cast<double>(pos) * inv_freq;
  double k = rint(a * kInvTwoPi);
  double r = fma(-k, kTwoPiHi, a);
  r = fma(-k, kTwoPiLo, r);
  float sf, cf;
  sincosf(static_cast<float>(r), &sf, &cf);
  *c = cf * scale;
  *s = sf * scale;
}

template <int kVec>
__device__ __forceinline__ void LoadI8(const int8_t* p, int8_t (&q)[kVec]) {
  using Raw = typename RawT<kVec>::type;
  union {
    Raw raw;
    int8_t e[kVec];
  } u;
  u.raw = *reinterpret_cast<const Raw*>(p);
#pragma unroll
  for (int i = 0; i < kVec; ++i) q[i] = u.e[i];
}

// One work item: a vector of kVec elements of a row (or a pair of vectors for half-split
// rotation) — loaded first for all unrolled items, then converted and stored.
template <typename T, int kVec>
struct Item {
  Vec<T, kVec> a, b;          // a: the vector at d; b: its half-split partner
  int8_t qa[kVec], qb[kVec];  // int8 source
  int64_t src_off, dst_off;   // element offsets of `a` (partner at + half)
  int d;                      // first dim of `a`
  int tt;                     // row within tile
  int kind;                   // 0: none, 1: plain, 2: half-split pair, 3: interleaved rotate
  int kv, head;
};

// The item (segment span) that holds tile `tile`.
__device__ __forceinline__ int FindItem(const MoveParams& p, int tile) {
  int lo = 0, hi = p.num_items - 1;
  while (lo < hi) {
    int mid = (lo + hi + 1) >> 1;
    if (p.items[mid].tile_begin <= tile)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

// Shared memory of both kernels: cos and sin [kTileTokens][max_half], then the engine row
// offsets [kTileTokens] (see MoveSharedBytes).
struct Smem {
  float* cos_s;
  float* sin_s;
  int64_t* eng_row;
};
__device__ __forceinline__ Smem SmemOf(unsigned char* raw, int max_half) {
  Smem s;
  s.cos_s = reinterpret_cast<float*>(raw);
  s.sin_s = s.cos_s + kTileTokens * max_half;
  s.eng_row = reinterpret_cast<int64_t*>(s.sin_s + kTileTokens * max_half);
  return s;
}

// Rotation scale of a model layer for the launch's mode, and its rotary dim (0 for kNone).
__device__ __forceinline__ void LayerRope(const MoveParams& p, int model_layer, int* rd, float* scale) {
  *rd = 0;
  *scale = 1.f;
  if (p.mode != RotMode::kNone) {
    *rd = p.rope.rotary_dim[model_layer];
    float f = p.rope.attn_factor[model_layer];
    *scale = p.mode == RotMode::kApply ? f : (p.mode == RotMode::kInverse ? 1.f / f : 1.f);
  }
}

// Engine element offset of each row of the tile (-1: slot outside the view, row skipped).
__device__ __forceinline__ void FillEngineRows(const MoveParams& p, const SegItem& it, int t0, int nt,
                                               int64_t* eng_row) {
  for (int tt = threadIdx.x; tt < nt; tt += blockDim.x) {
    int64_t row = it.row_offset + t0 + tt;
    int64_t slot = p.slots ? p.slots[row] : p.slot_base + row;
    int64_t off = -1;
    if (slot >= 0 && slot < p.eng.num_slots) {
      if (p.eng.block_size == 1) {
        off = slot * p.eng.stride_block;
      } else {
        // Slots fit 32 bits (checked by the caller), so the division is 32-bit.
        uint32_t s32 = static_cast<uint32_t>(slot), bs = static_cast<uint32_t>(p.eng.block_size);
        off = static_cast<int64_t>(s32 / bs) * p.eng.stride_block + static_cast<int64_t>(s32 % bs) * p.eng.stride_slot;
      }
    }
    eng_row[tt] = off;
  }
}

// cos/sin [tt][f] of the tile's rows for one model layer's frequencies.
__device__ __forceinline__ void FillTable(const MoveParams& p, const SegItem& it, int t0, int nt, int model_layer,
                                          int half, float scale, float* cos_s, float* sin_s) {
  const double* inv = p.rope.inv_freq + static_cast<int64_t>(model_layer) * p.rope.freq_stride;
  for (int i = threadIdx.x; i < nt * half; i += blockDim.x) {
    int tt = i / half, f = i - tt * half;
    int64_t row = it.row_offset + t0 + tt;
    // Only the positions the mode needs are read (the other array may be null or stale).
    int64_t pn = 0, po = 0;
    if (p.mode != RotMode::kInverse) pn = p.pos_new ? p.pos_new[row] : p.pos_new_base + row;
    if (p.mode != RotMode::kApply) po = p.pos_old ? p.pos_old[row] : p.pos_old_base + row;
    int64_t pos = p.mode == RotMode::kApply ? pn : (p.mode == RotMode::kInverse ? -po : pn - po);
    CosSin(pos, inv[f], scale, &cos_s[tt * p.max_half + f], &sin_s[tt * p.max_half + f]);
  }
}

// Generic path: one tile of one launch layer, any vector width, rotary split, int8 source and
// direction. Starts with a barrier, so a block may call it repeatedly (shared memory reuse).
template <typename T, int kVec, bool kInt8>
__device__ void MoveTileLayer(const MoveParams& p, const SegItem& it, int t0, int nt, int layer, Smem sm) {
  float* cos_s = sm.cos_s;
  float* sin_s = sm.sin_s;
  int64_t* eng_row = sm.eng_row;
  const int model_layer = p.layer_begin + layer;
  const int H = p.num_heads;
  const int D = p.head_dim;

  int rd;
  float scale;
  LayerRope(p, model_layer, &rd, &scale);
  const int half = rd / 2;

  // Per-row engine offsets and per-(row, frequency) cos/sin, shared by all heads and K rows.
  __syncthreads();  // earlier users of the shared arrays are done
  FillEngineRows(p, it, t0, nt, eng_row);
  if (half > 0) FillTable(p, it, t0, nt, model_layer, half, scale, cos_s, sin_s);
  __syncthreads();

  using TS = T;  // engine / canonical element type
  const int row_vecs = D / kVec;
  // K rows: half-split rotation pairs items (half / kVec pairs + pass-through), else plain.
  const int k_items = (half > 0 && !p.rope.interleaved) ? (half / kVec + (D - rd) / kVec) : row_vecs;
  const int k_total = H * nt * k_items;
  const int total = k_total + H * nt * row_vecs;
  const int64_t plane = static_cast<int64_t>(it.total_tokens) * D;
  const float* scales = kInt8 ? it.scales : nullptr;

  constexpr int kUnroll = 4;
  for (int base = threadIdx.x; base < total; base += kUnroll * blockDim.x) {
    Item<TS, kVec> w[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      int i = base + u * blockDim.x;
      w[u].kind = 0;
      if (i >= total) continue;
      int kv, per, j, r;
      if (i < k_total) {
        kv = 0;
        per = k_items;
        j = i % per;
        r = i / per;
      } else {
        kv = 1;
        per = row_vecs;
        int i2 = i - k_total;
        j = i2 % per;
        r = i2 / per;
      }
      const int tt = r % nt;
      const int head = r / nt;
      const int64_t er = eng_row[tt];
      if (er < 0) continue;
      int d, kind;
      if (kv == 0 && half > 0) {
        if (!p.rope.interleaved) {
          if (j < half / kVec) {
            d = j * kVec;
            kind = 2;
          } else {
            d = rd + (j - half / kVec) * kVec;
            kind = 1;
          }
        } else {
          d = j * kVec;
          kind = d < rd ? 3 : 1;
        }
      } else {
        d = j * kVec;
        kind = 1;
      }
      const int64_t canon = (static_cast<int64_t>(layer) * 2 + kv) * H * plane + head * plane +
                            static_cast<int64_t>(it.token_begin + t0 + tt) * D + d;
      const int64_t eng = er + head * p.eng.stride_head + d;
      w[u].kind = kind;
      w[u].d = d;
      w[u].tt = tt;
      w[u].kv = kv;
      w[u].head = head;
      if (p.to_engine) {
        w[u].src_off = canon;
        w[u].dst_off = eng;
      } else {
        w[u].src_off = eng;
        w[u].dst_off = canon;
      }
      const TS* src_eng = static_cast<const TS*>(kv ? p.eng.v[layer] : p.eng.k[layer]);
      if (p.to_engine) {
        if constexpr (kInt8) {
          const int8_t* q = static_cast<const int8_t*>(it.data);
          LoadI8<kVec>(q + canon, w[u].qa);
          if (kind == 2) LoadI8<kVec>(q + canon + half, w[u].qb);
        } else {
          const TS* s = static_cast<const TS*>(it.data);
          LoadVec(s + canon, w[u].a);
          if (kind == 2) LoadVec(s + canon + half, w[u].b);
        }
      } else {
        LoadVec(src_eng + eng, w[u].a);
        if (kind == 2) LoadVec(src_eng + eng + half, w[u].b);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (w[u].kind == 0) continue;
      TS* dst = p.to_engine ? static_cast<TS*>(w[u].kv ? p.eng.v[layer] : p.eng.k[layer])
                            : static_cast<TS*>(const_cast<void*>(it.data));
      float xa[kVec], xb[kVec];
      const bool need_float = kInt8 || w[u].kind >= 2;
      if (!need_float) {
        StoreVec(dst + w[u].dst_off, w[u].a);
        continue;
      }
      if constexpr (kInt8) {
        const float* sc = scales + ((static_cast<int64_t>(layer) * 2 + w[u].kv) * H + w[u].head) * D;
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          xa[e] = static_cast<float>(w[u].qa[e]) * __ldg(sc + w[u].d + e);
          xb[e] = w[u].kind == 2 ? static_cast<float>(w[u].qb[e]) * __ldg(sc + w[u].d + half + e) : 0.f;
        }
      } else {
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          xa[e] = ToF(w[u].a.e[e]);
          xb[e] = w[u].kind == 2 ? ToF(w[u].b.e[e]) : 0.f;
        }
      }
      const float* cs = cos_s + w[u].tt * p.max_half;
      const float* sn = sin_s + w[u].tt * p.max_half;
      Vec<TS, kVec> oa, ob;
      if (w[u].kind == 2) {
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          float c = cs[w[u].d + e], s = sn[w[u].d + e];
          oa.e[e] = FromF<TS>(xa[e] * c - xb[e] * s);
          ob.e[e] = FromF<TS>(xb[e] * c + xa[e] * s);
        }
        StoreVec(dst + w[u].dst_off, oa);
        StoreVec(dst + w[u].dst_off + half, ob);
      } else if (w[u].kind == 3) {
        if constexpr (kVec >= 2) {
#pragma unroll
          for (int e = 0; e < kVec; e += 2) {
            int f = (w[u].d + e) / 2;
            float c = cs[f], s = sn[f];
            oa.e[e] = FromF<TS>(xa[e] * c - xa[e + 1] * s);
            oa.e[e + 1] = FromF<TS>(xa[e + 1] * c + xa[e] * s);
          }
          StoreVec(dst + w[u].dst_off, oa);
        }
      } else {  // int8 dequantisation without rotation
#pragma unroll
        for (int e = 0; e < kVec; ++e) oa.e[e] = FromF<TS>(xa[e]);
        StoreVec(dst + w[u].dst_off, oa);
      }
    }
  }
}

// Generic kernel: one block per (tile, launch layer).
template <typename T, int kVec, bool kInt8>
__global__ void __launch_bounds__(kThreads, 2) MoveKernel(const __grid_constant__ MoveParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int tile = blockIdx.x;
  const SegItem& it = p.items[FindItem(p, tile)];
  const int t0 = (tile - it.tile_begin) * kTileTokens;
  const int nt = min(kTileTokens, it.num_tokens - t0);
  MoveTileLayer<T, kVec, kInt8>(p, it, t0, nt, blockIdx.y, SmemOf(smem_raw, p.max_half));
}

// Pair kernel, the fast path of the common case: 16-byte vectors, no int8 source, rows of
// P = 2^log2p vector pairs (d, d + D/2), and per layer either no rotation or rotation of the
// whole head (rotary_dim == D: half-split pairs are exactly the rotation partners; interleaved
// pairs rotate within each vector). One block moves one tile for a group of `lpb` launch
// layers (gridDim.y groups; 1 by default, see LaunchPair), with the rows' engine offsets, and
// the cos/sin table when the group's layers share one rotation, computed once per group. Over
// the generic kernel (62% of D2D memcpy on the H200 with rotation): the per-element index
// arithmetic is shifts and masks instead of divisions, each thread has 2 * kUnroll 16-byte
// loads in flight before its first store, and 80 registers (not 115) allow 3 blocks per SM.
// A group with a partial rotary dim on some layer falls back to the generic path in-block.
template <typename T, int kUnroll>
__global__ void __launch_bounds__(kThreads, 3) PairKernel(const __grid_constant__ MoveParams p, int lpb, int log2p) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  static_assert(kTileTokens == 16, "row index = (k|v, head) << 4 | token");
  using V = Vec<T, kVec>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const Smem sm = SmemOf(smem_raw, p.max_half);
  const int tile = blockIdx.x;
  const SegItem& it = p.items[FindItem(p, tile)];
  const int t0 = (tile - it.tile_begin) * kTileTokens;
  const int nt = min(kTileTokens, it.num_tokens - t0);
  const int l_begin = blockIdx.y * lpb;
  const int l_end = min(p.num_layers, l_begin + lpb);
  const int H = p.num_heads, D = p.head_dim, hd = D / 2;
  const int mh = p.max_half;

  // Rotation of the group: bit 0 = some layer rotates only part of the head (generic path);
  // bit 1 = layers differ from the group's first in rotary dim, factor or frequencies.
  const int ml0 = p.layer_begin + l_begin;
  int rd0;
  float sc0;
  LayerRope(p, ml0, &rd0, &sc0);
  int flags = 0;
  if (p.mode != RotMode::kNone) {
    for (int l = l_begin + static_cast<int>(threadIdx.x); l < l_end; l += blockDim.x) {
      int rd;
      float sc;
      LayerRope(p, p.layer_begin + l, &rd, &sc);
      if (rd != 0 && rd != D) flags |= 1;
      if (rd != rd0 || sc != sc0) flags |= 2;
    }
    if (rd0 == D) {
      const double* inv0 = p.rope.inv_freq + static_cast<int64_t>(ml0) * p.rope.freq_stride;
      const int n = (l_end - l_begin - 1) * hd;
      for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const int l = 1 + i / hd, f = i - (l - 1) * hd;
        if (inv0[static_cast<int64_t>(l) * p.rope.freq_stride + f] != inv0[f]) flags |= 2;
      }
    }
  }
  if (__syncthreads_or(flags & 1)) {
    // 2-wide vectors: valid wherever the 16-byte ones are, and light on registers.
    for (int l = l_begin; l < l_end; ++l) MoveTileLayer<T, 2, false>(p, it, t0, nt, l, sm);
    return;
  }
  const bool shared_table = !__syncthreads_or(flags & 2);
  FillEngineRows(p, it, t0, nt, sm.eng_row);
  if (rd0 == D) FillTable(p, it, t0, nt, ml0, hd, sc0, sm.cos_s, sm.sin_s);
  __syncthreads();

  const int64_t plane = static_cast<int64_t>(it.total_tokens) * D;
  const int64_t tok0 = static_cast<int64_t>(it.token_begin) + t0;
  const int pmask = (1 << log2p) - 1;
  const int units = (2 * H) << (4 + log2p);  // (k|v, head) x kTileTokens rows x P pairs
  T* const canon_base = static_cast<T*>(const_cast<void*>(it.data));
  for (int l = l_begin; l < l_end; ++l) {
    int rd = rd0;
    if (!shared_table && l > l_begin) {
      float sc;
      LayerRope(p, p.layer_begin + l, &rd, &sc);
      __syncthreads();  // readers of the previous layer's table are done
      if (rd == D) FillTable(p, it, t0, nt, p.layer_begin + l, hd, sc, sm.cos_s, sm.sin_s);
      __syncthreads();
    }
    const bool rot = rd == D;
    T* const eng_k = static_cast<T*>(p.eng.k[l]);
    T* const eng_v = static_cast<T*>(p.eng.v[l]);
    const int64_t layer_canon = static_cast<int64_t>(l) * 2 * H * plane;
    for (int base = threadIdx.x; base < units; base += kUnroll * kThreads) {
      V a[kUnroll], b[kUnroll];
      T* dst[kUnroll];
      int kind[kUnroll], cs_off[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int i = base + u * kThreads;
        kind[u] = 0;
        dst[u] = nullptr;
        cs_off[u] = 0;
        if (i >= units) continue;
        const int r = i >> log2p;
        const int tt = r & (kTileTokens - 1);
        if (tt >= nt) continue;
        const int64_t er = sm.eng_row[tt];
        if (er < 0) continue;
        const int kvh = r >> 4;
        const int kv = kvh >= H ? 1 : 0;
        const int head = kvh - kv * H;
        const int d = (i & pmask) * kVec;
        const int64_t canon = layer_canon + (static_cast<int64_t>(kv) * H + head) * plane + (tok0 + tt) * D + d;
        T* const eng = (kv ? eng_v : eng_k) + er + static_cast<int64_t>(head) * p.eng.stride_head + d;
        const T* src;
        if (p.to_engine) {
          src = canon_base + canon;
          dst[u] = eng;
        } else {
          src = eng;
          dst[u] = canon_base + canon;
        }
        LoadVec(src, a[u]);
        LoadVec(src + hd, b[u]);
        kind[u] = (rot && kv == 0) ? 2 : 1;
        cs_off[u] = tt * mh + d;
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (kind[u] == 0) continue;
        if (kind[u] == 2) {
          const float* cs = sm.cos_s + cs_off[u];
          const float* sn = sm.sin_s + cs_off[u];
          V oa, ob;
          if (!p.rope.interleaved) {
            // Half-split: a and b hold the two halves of the same kVec frequencies.
            float c[kVec], s[kVec];
#pragma unroll
            for (int q = 0; q < kVec; q += 4) {
              const float4 c4 = *reinterpret_cast<const float4*>(cs + q);
              const float4 s4 = *reinterpret_cast<const float4*>(sn + q);
              c[q] = c4.x, c[q + 1] = c4.y, c[q + 2] = c4.z, c[q + 3] = c4.w;
              s[q] = s4.x, s[q + 1] = s4.y, s[q + 2] = s4.z, s[q + 3] = s4.w;
            }
#pragma unroll
            for (int e = 0; e < kVec; ++e) {
              const float xa = ToF(a[u].e[e]), xb = ToF(b[u].e[e]);
              oa.e[e] = FromF<T>(xa * c[e] - xb * s[e]);
              ob.e[e] = FromF<T>(xb * c[e] + xa * s[e]);
            }
          } else {
            // Interleaved: pairs (2f, 2f + 1) inside each vector; cs_off holds tt * mh + d, and
            // dims d + e use frequency (d + e) / 2, dims hd + d + e frequency (hd + d + e) / 2.
            const int tt_mh = cs_off[u] - (cs_off[u] % mh);
            const int d = cs_off[u] - tt_mh;
#pragma unroll
            for (int e = 0; e < kVec; e += 2) {
              const int fa = (d + e) / 2, fb = (hd + d + e) / 2;
              const float ca = sm.cos_s[tt_mh + fa], sa = sm.sin_s[tt_mh + fa];
              const float cb = sm.cos_s[tt_mh + fb], sb = sm.sin_s[tt_mh + fb];
              const float a0 = ToF(a[u].e[e]), a1 = ToF(a[u].e[e + 1]);
              const float b0 = ToF(b[u].e[e]), b1 = ToF(b[u].e[e + 1]);
              oa.e[e] = FromF<T>(a0 * ca - a1 * sa);
              oa.e[e + 1] = FromF<T>(a1 * ca + a0 * sa);
              ob.e[e] = FromF<T>(b0 * cb - b1 * sb);
              ob.e[e + 1] = FromF<T>(b1 * cb + b0 * sb);
            }
          }
          StoreVec(dst[u], oa);
          StoreVec(dst[u] + hd, ob);
        } else {
          StoreVec(dst[u], a[u]);
          StoreVec(dst[u] + hd, b[u]);
        }
      }
    }
  }
}

// Launch shape overrides, for benchmarks and tests (environment, read per launch):
// KVAGENT_KV_MOVE=generic (never the pair kernel), KVAGENT_KV_MOVE_LPB=<layers per block>,
// KVAGENT_KV_MOVE_UNROLL=2|4 (pair kernel; 8 spills at the 3-blocks-per-SM register cap).
int EnvInt(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return (v && *v) ? std::atoi(v) : fallback;
}

template <typename T>
cudaError_t LaunchPair(const MoveParams& p, int log2p, cudaStream_t stream) {
  // One layer per block by default: on an H200 (2026-11-28, 16k tokens of Llama-3.1-8B-shaped
  // KV, rotation on) 1 layer per block reached 94.0% of the D2D memcpy rate against 91.2% for 8;
  // sharing the cos/sin table across layers saves less than the coarser grid costs.
  const int lpb = std::clamp(EnvInt("KVAGENT_KV_MOVE_LPB", 1), 1, p.num_layers);
  dim3 grid(static_cast<unsigned>(p.num_tiles), static_cast<unsigned>((p.num_layers + lpb - 1) / lpb));
  const size_t smem = MoveSharedBytes(p.max_half);
  switch (EnvInt("KVAGENT_KV_MOVE_UNROLL", 4)) {
    case 2:
      PairKernel<T, 2><<<grid, kThreads, smem, stream>>>(p, lpb, log2p);
      break;
    default:
      PairKernel<T, 4><<<grid, kThreads, smem, stream>>>(p, lpb, log2p);
      break;
  }
  return cudaGetLastError();
}

template <typename T, bool kInt8>
cudaError_t LaunchTyped(const MoveParams& p, int vec, cudaStream_t stream) {
  if constexpr (!kInt8) {
    // The pair kernel needs full 16-byte vectors and P = D / (2 vec) a power of two <= 32.
    const int pairs = p.head_dim / (2 * vec);
    const char* which = std::getenv("KVAGENT_KV_MOVE");
    const bool want_generic = which != nullptr && std::strcmp(which, "generic") == 0;
    if (!want_generic && vec * static_cast<int>(sizeof(T)) == 16 && p.head_dim % (2 * vec) == 0 && pairs <= 32 &&
        (pairs & (pairs - 1)) == 0)
      return LaunchPair<T>(p, __builtin_ctz(static_cast<unsigned>(pairs)), stream);
  }
  dim3 grid(static_cast<unsigned>(p.num_tiles), static_cast<unsigned>(p.num_layers));
  size_t smem = MoveSharedBytes(p.max_half);
  constexpr int kMaxVec = 16 / sizeof(T);
  switch (vec) {
    case 1:
      MoveKernel<T, 1, kInt8><<<grid, kThreads, smem, stream>>>(p);
      break;
    case 2:
      MoveKernel<T, 2, kInt8><<<grid, kThreads, smem, stream>>>(p);
      break;
    case 4:
      MoveKernel<T, 4, kInt8><<<grid, kThreads, smem, stream>>>(p);
      break;
    case 8:
      if constexpr (kMaxVec >= 8) {
        MoveKernel<T, (kMaxVec >= 8 ? 8 : 1), kInt8><<<grid, kThreads, smem, stream>>>(p);
        break;
      } else {
        return cudaErrorInvalidValue;
      }
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace

size_t MoveSharedBytes(int max_half) {
  return static_cast<size_t>(kTileTokens) * max_half * 2 * sizeof(float) + kTileTokens * sizeof(int64_t);
}

cudaError_t LaunchMove(const MoveParams& p, int vec, cudaStream_t stream) {
  if (p.num_tiles <= 0 || p.num_items <= 0 || p.num_layers <= 0) return cudaSuccess;
  switch (p.elem) {
    case Elem::kF32:
      return p.src_int8 ? LaunchTyped<float, true>(p, vec, stream) : LaunchTyped<float, false>(p, vec, stream);
    case Elem::kF16:
      return p.src_int8 ? LaunchTyped<__half, true>(p, vec, stream) : LaunchTyped<__half, false>(p, vec, stream);
    case Elem::kBF16:
      return p.src_int8 ? LaunchTyped<__nv_bfloat16, true>(p, vec, stream)
                        : LaunchTyped<__nv_bfloat16, false>(p, vec, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace kvagent::cuda::kernels
