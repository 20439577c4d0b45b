// Synthetic index data with retrieval structure, for recall tests of the two-stage search
// (tests/cpp/index/prefilter_test.cc) and bench/index_bench.cc.
//
// Random summaries have no structure: under max aggregation their top-k is whichever segment holds
// the most extreme noise in one vote, which no cheaper proxy predicts and no retrieval needs. Here,
// per index layer and KV head (per dimension, before the 1/sqrt(head_dim) attention scale):
//   - keys and queries have a shared bias (real pre-RoPE keys and queries are far from zero-mean);
//   - segments belong to `topics` topics: mean key = key bias + topic centre + segment noise;
//   - the query is about topic 0: every third token is a content token (query bias + a pull
//     towards the topic centre + noise), the others template tokens (query bias + noise);
//   - `targets` planted segments have their mean key moved by strength * |.| along the query's
//     content direction (the mean of `target_tokens` content tokens' queries, group-averaged,
//     minus the query bias) on `target_layers` randomly chosen index layers (every KV head), with
//     strengths from `strength` down to half of it. On-topic targets also carry the topic centre.
// Values come from a counter-based generator (splitmix64, approximately normal), so segment i is
// the same whatever else is generated and 1M segments take seconds.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

#include "kvagent/index.h"

namespace kvagent::testing_index {

struct PlantedSpec {
  int num_layers = 8;             // index layers (the summary holds model layers 0 .. num_layers-1 unless set)
  std::vector<int> model_layers;  // model layer of each index layer; empty = 0 .. num_layers-1
  int q_heads = 8;
  int kv_heads = 2;
  int head_dim = 32;
  int query_tokens = 30;
  int topics = 256;
  int targets = 5;
  int target_layers = 4;  // index layers each target aligns on
  int target_tokens = 0;  // content tokens whose mean query a target aligns with; 0 = all
  bool targets_on_topic = true;
  double strength = 1.5;    // planted shift per dimension, in units of the noise
  double topic_pull = 0.5;  // content tokens' pull towards the topic centre
  bool box = false;         // min/max around the mean (else min = max = mean)
  uint64_t seed = 1;
};

class PlantedData {
 public:
  PlantedData(const PlantedSpec& spec, size_t num_segments) : s_(spec), n_(num_segments) {
    if (s_.model_layers.empty()) {
      s_.model_layers.resize(s_.num_layers);
      std::iota(s_.model_layers.begin(), s_.model_layers.end(), 0);
    }
    const int L = s_.num_layers, G = s_.kv_heads, D = s_.head_dim, gs = s_.q_heads / s_.kv_heads;
    const int T = s_.query_tokens;
    const size_t per_topic = static_cast<size_t>(L) * G * D;
    key_bias_.resize(per_topic);
    topic_.resize(per_topic * s_.topics);
    for (size_t i = 0; i < per_topic; ++i) key_bias_[i] = static_cast<float>(Gauss(Key(0, i)));
    for (size_t i = 0; i < topic_.size(); ++i) topic_[i] = static_cast<float>(kTopicSd * Gauss(Key(2, i)));
    q_.assign(static_cast<size_t>(L) * s_.q_heads * T * D, 0.0f);
    for (int l = 0; l < L; ++l) {
      for (int h = 0; h < s_.q_heads; ++h) {
        for (int t = 0; t < T; ++t) {
          for (int d = 0; d < D; ++d) {
            const size_t pos = ((static_cast<size_t>(l) * s_.q_heads + h) * T + t) * D + d;
            double v = QueryBias(l, h, d) + Gauss(Key(3, pos));
            if (Content(t)) v += s_.topic_pull * Topic(0, l, h / gs, d) / kTopicSd;
            q_[pos] = static_cast<float>(v);
          }
        }
      }
    }
    // Planted direction per target, index layer, KV head: mean content query of the group minus
    // the query bias, unit length (times sqrt(D) so the shift per dimension is about `strength`).
    for (int k = 0; k < s_.targets; ++k) {
      const size_t seg = (2 * static_cast<size_t>(k) + 1) * n_ / (2 * std::max(1, s_.targets));
      targets_.push_back(seg);
      std::vector<int> order(L);
      std::iota(order.begin(), order.end(), 0);
      for (int i = L - 1; i > 0; --i) std::swap(order[i], order[Key(4, k * 64 + i) % (i + 1)]);
      std::vector<char> aligned(L, 0);
      for (int i = 0; i < std::min(L, s_.target_layers); ++i) aligned[order[i]] = 1;
      std::vector<int> tokens;
      for (int t = 0; t < T; ++t) {
        if (Content(t)) tokens.push_back(t);
      }
      const int first = static_cast<int>(Key(5, k) % tokens.size());
      const int nt = s_.target_tokens > 0 ? std::min<int>(s_.target_tokens, tokens.size()) : tokens.size();
      const double beta = s_.strength * (1.0 - 0.5 * k / std::max(1, s_.targets - 1));
      std::vector<float> shift(static_cast<size_t>(L) * G * D, 0.0f);
      for (int l = 0; l < L; ++l) {
        if (!aligned[l]) continue;
        for (int g = 0; g < G; ++g) {
          std::vector<double> dir(D, 0.0);
          for (int i = 0; i < nt; ++i) {
            const int t = tokens[(first + i) % tokens.size()];
            for (int h = g * gs; h < (g + 1) * gs; ++h) {
              for (int d = 0; d < D; ++d) dir[d] += QueryAt(l, h, t, d) - QueryBias(l, h, d);
            }
          }
          double norm = 0;
          for (double x : dir) norm += x * x;
          const double f = beta * std::sqrt(D / std::max(norm, 1e-30));
          for (int d = 0; d < D; ++d) shift[(static_cast<size_t>(l) * G + g) * D + d] = static_cast<float>(f * dir[d]);
        }
      }
      shifts_.push_back(std::move(shift));
    }
  }

  size_t size() const { return n_; }
  // Planted segment indices, strongest first.
  const std::vector<size_t>& targets() const { return targets_; }
  // Query [num_layers][q_heads][query_tokens][head_dim], f32.
  const std::vector<float>& query() const { return q_; }
  QueryView View() const {
    return QueryView{q_.data(), DType::kF32, s_.num_layers, s_.q_heads, s_.query_tokens, s_.head_dim};
  }
  int TopicOf(size_t i) const {
    for (size_t k = 0; k < targets_.size(); ++k) {
      if (targets_[k] == i && s_.targets_on_topic) return 0;
    }
    return static_cast<int>(Key(6, i) % s_.topics);
  }

  KeySummary Summary(size_t i) const {
    const int L = s_.num_layers, G = s_.kv_heads, D = s_.head_dim;
    KeySummary out;
    out.num_kv_heads = G;
    out.head_dim = D;
    out.num_tokens = 16;
    out.layers = s_.model_layers;
    std::sort(out.layers.begin(), out.layers.end());
    const size_t n = static_cast<size_t>(L) * G * D;
    out.mean.resize(n);
    out.min.resize(n);
    out.max.resize(n);
    const int topic = TopicOf(i);
    const std::vector<float>* shift = nullptr;
    for (size_t k = 0; k < targets_.size(); ++k) {
      if (targets_[k] == i) shift = &shifts_[k];
    }
    for (int l = 0; l < L; ++l) {
      const int slot = static_cast<int>(std::lower_bound(out.layers.begin(), out.layers.end(), s_.model_layers[l]) -
                                        out.layers.begin());
      for (int g = 0; g < G; ++g) {
        for (int d = 0; d < D; ++d) {
          const size_t src = (static_cast<size_t>(l) * G + g) * D + d;
          double v = key_bias_[src] + topic_[topic * n + src] + kNoiseSd * Gauss(Key(7, i * n + src));
          if (shift) v += (*shift)[src];
          const size_t dst = out.Offset(slot, g) + d;
          out.mean[dst] = static_cast<float>(v);
          const double spread = s_.box ? 0.5 + 0.5 * std::fabs(Gauss(Key(8, i * n + src))) : 0.0;
          out.min[dst] = static_cast<float>(v - spread);
          out.max[dst] = static_cast<float>(v + spread);
        }
      }
    }
    return out;
  }

 private:
  static constexpr double kTopicSd = 0.5;
  static constexpr double kNoiseSd = 0.5;

  static uint64_t Mix(uint64_t x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
  }
  uint64_t Key(uint64_t stream, uint64_t i) const { return Mix(Mix(s_.seed * 0x100 + stream) ^ i); }
  // Approximately N(0, 1): the sum of four 16-bit uniforms, standardised.
  static double Gauss(uint64_t r) {
    double s = 0;
    for (int k = 0; k < 4; ++k) s += static_cast<double>((r >> (16 * k)) & 0xffff);
    return (s - 2 * 65535.0) / (65535.0 * std::sqrt(4.0 / 12.0));
  }
  bool Content(int t) const { return t % 3 == 1; }
  double QueryBias(int l, int h, int d) const { return Gauss(Key(1, (l * 256 + h) * 4096 + d)); }
  double Topic(int topic, int l, int g, int d) const {
    return topic_[((static_cast<size_t>(topic) * s_.num_layers + l) * s_.kv_heads + g) * s_.head_dim + d];
  }
  double QueryAt(int l, int h, int t, int d) const {
    return q_[((static_cast<size_t>(l) * s_.q_heads + h) * s_.query_tokens + t) * s_.head_dim + d];
  }

  PlantedSpec s_;
  size_t n_;
  std::vector<float> key_bias_;  // [layer][kv_head][dim]
  std::vector<float> topic_;     // [topic][layer][kv_head][dim]
  std::vector<float> q_;
  std::vector<size_t> targets_;
  std::vector<std::vector<float>> shifts_;
};

// Fraction of `want` (keys) found in `got`.
inline double Recall(const std::vector<Hit>& got, const std::vector<Hit>& want) {
  if (want.empty()) return 1.0;
  size_t found = 0;
  for (const Hit& w : want) {
    for (const Hit& g : got) found += g.entry.key == w.entry.key;
  }
  return static_cast<double>(found) / want.size();
}

}  // namespace kvagent::testing_index
