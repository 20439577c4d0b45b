#include <cuda_bf16.h>
#include <cuda_fp16.h>

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

template <typename T, int kVec, bool kInt8>
__global__ void __launch_bounds__(kThreads, 2) MoveKernel(const __grid_constant__ MoveParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* cos_s = reinterpret_cast<float*>(smem_raw);
  float* sin_s = cos_s + kTileTokens * p.max_half;
  int64_t* eng_row = reinterpret_cast<int64_t*>(sin_s + kTileTokens * p.max_half);

  const int tile = blockIdx.x;
  int lo = 0, hi = p.num_items - 1;
  while (lo < hi) {
    int mid = (lo + hi + 1) >> 1;
    if (p.items[mid].tile_begin <= tile)
      lo = mid;
    else
      hi = mid - 1;
  }
  const SegItem& it = p.items[lo];
  const int t0 = (tile - it.tile_begin) * kTileTokens;
  const int nt = min(kTileTokens, it.num_tokens - t0);
  const int layer = blockIdx.y;
  const int model_layer = p.layer_begin + layer;
  const int H = p.num_heads;
  const int D = p.head_dim;

  int rd = 0;
  float scale = 1.f;
  if (p.mode != RotMode::kNone) {
    rd = p.rope.rotary_dim[model_layer];
    float f = p.rope.attn_factor[model_layer];
    scale = p.mode == RotMode::kApply ? f : (p.mode == RotMode::kInverse ? 1.f / f : 1.f);
  }
  const int half = rd / 2;

  // Per-row engine offsets and per-(row, frequency) cos/sin, shared by all heads and K rows.
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
  if (half > 0) {
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

template <typename T, bool kInt8>
cudaError_t LaunchTyped(const MoveParams& p, int vec, cudaStream_t stream) {
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
