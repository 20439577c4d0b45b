// Random data and a plain reference scorer for the LatentIndex tests.
#pragma once

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "kvagent/index.h"

namespace kvagent::testing_index {

inline ModelSpec Spec(int layers, int q_heads, int kv_heads, int dim, double attn_scale = 0.0) {
  RopeSpec rope;
  ModelSpec s = UniformModelSpec("t", layers, q_heads, kv_heads, dim, DType::kF32, rope, HashString("w"));
  s.attn_scale = attn_scale;
  return s;
}

// Keys [L][H][T][D] with per-dimension offsets so boxes differ between segments.
inline std::vector<float> RandomKeys(std::mt19937& rng, int L, int H, int T, int D) {
  std::normal_distribution<float> n(0.0f, 1.0f);
  std::vector<float> k(static_cast<size_t>(L) * H * T * D);
  std::vector<float> off(static_cast<size_t>(L) * H * D);
  for (auto& o : off) o = 1.5f * n(rng);
  for (int l = 0; l < L; ++l)
    for (int h = 0; h < H; ++h)
      for (int t = 0; t < T; ++t)
        for (int d = 0; d < D; ++d)
          k[((static_cast<size_t>(l) * H + h) * T + t) * D + d] = off[(l * H + h) * D + d] + n(rng);
  return k;
}

inline std::vector<float> RandomQuery(std::mt19937& rng, int L, int Hq, int T, int D) {
  std::normal_distribution<float> n(0.0f, 1.0f);
  std::vector<float> q(static_cast<size_t>(L) * Hq * T * D);
  for (auto& v : q) v = n(rng);
  return q;
}

// Plain double-precision reference of LatentIndex scoring: returns the aggregated score of every
// summary, in order, for the given options. q is f32 [L_sel][Hq][T][D] (already rounded to the
// dtype the index sees).
inline std::vector<double> ReferenceScores(const ModelSpec& spec, const IndexOptions& o, const std::vector<int>& layers,
                                           const std::vector<KeySummary>& sums, const std::vector<float>& q, int T) {
  const int L = static_cast<int>(layers.size()), G = spec.num_kv_heads, gs = spec.GroupSize(), D = spec.head_dim;
  const int Hq = spec.num_q_heads;
  const int C = o.token_chunks == 0 ? T : std::min(o.token_chunks, T);
  const double scale = spec.EffectiveAttnScale();
  const size_t S = sums.size();
  const int U = L * G * C;
  std::vector<std::vector<double>> x(S, std::vector<double>(U));
  auto qv = [&](int l, int h, int t, int d) {
    return static_cast<double>(q[((static_cast<size_t>(l) * Hq + h) * T + t) * D + d]);
  };
  for (int l = 0; l < L; ++l) {
    for (int g = 0; g < G; ++g) {
      for (int c = 0; c < C; ++c) {
        const int t0 = c * T / C, t1 = (c + 1) * T / C;
        // query vectors of this unit (one, or one per head)
        std::vector<std::vector<double>> vecs;
        if (o.head_reduce == HeadReduce::kMeanQuery) {
          std::vector<double> v(D, 0.0);
          for (int h = g * gs; h < (g + 1) * gs; ++h)
            for (int t = t0; t < t1; ++t)
              for (int d = 0; d < D; ++d) v[d] += qv(l, h, t, d);
          for (auto& e : v) e *= scale / (gs * (t1 - t0));
          vecs.push_back(v);
        } else {
          for (int h = g * gs; h < (g + 1) * gs; ++h) {
            std::vector<double> v(D, 0.0);
            for (int t = t0; t < t1; ++t)
              for (int d = 0; d < D; ++d) v[d] += qv(l, h, t, d);
            for (auto& e : v) e *= scale / (t1 - t0);
            vecs.push_back(v);
          }
        }
        for (size_t s = 0; s < S; ++s) {
          const int slot = sums[s].LayerSlot(layers[l]);
          const size_t base = sums[s].Offset(slot, g);
          std::vector<double> per;
          for (const auto& v : vecs) {
            double acc = 0;
            for (int d = 0; d < D; ++d) {
              if (o.score == ScoreKind::kBoundingBox) {
                acc += std::max(v[d] * sums[s].min[base + d], v[d] * sums[s].max[base + d]);
              } else {
                acc += v[d] * sums[s].mean[base + d];
              }
            }
            per.push_back(acc);
          }
          double r = 0;
          if (o.head_reduce == HeadReduce::kMaxScore) {
            r = *std::max_element(per.begin(), per.end());
          } else {
            for (double p : per) r += p;
            r /= per.size();
          }
          x[s][(l * G + g) * C + c] = r;
        }
      }
    }
  }
  for (int u = 0; u < U; ++u) {
    if (o.norm == TokenNorm::kSoftmax) {
      double m = -1e300, z = 0;
      for (size_t s = 0; s < S; ++s) m = std::max(m, x[s][u]);
      for (size_t s = 0; s < S; ++s) z += std::exp(x[s][u] - m);
      for (size_t s = 0; s < S; ++s) x[s][u] = std::exp(x[s][u] - m) / z;
    } else if (o.norm == TokenNorm::kZScore) {
      double mean = 0, var = 0;
      for (size_t s = 0; s < S; ++s) mean += x[s][u];
      mean /= S;
      for (size_t s = 0; s < S; ++s) var += (x[s][u] - mean) * (x[s][u] - mean);
      const double sd = std::sqrt(var / S);
      for (size_t s = 0; s < S; ++s) x[s][u] = sd > 0 ? (x[s][u] - mean) / sd : 0.0;
    }
  }
  std::vector<double> out(S);
  const int top_n = std::max(1, static_cast<int>(std::ceil(o.top_p * U - 1e-9)));
  for (size_t s = 0; s < S; ++s) {
    std::vector<double> v = x[s];
    std::sort(v.begin(), v.end(), std::greater<double>());
    if (o.agg == Aggregation::kMax) {
      out[s] = v[0];
    } else {
      const int n = o.agg == Aggregation::kTopP ? top_n : U;
      double a = 0;
      for (int k = 0; k < n; ++k) a += v[k];
      out[s] = a / n;
    }
  }
  return out;
}

}  // namespace kvagent::testing_index
