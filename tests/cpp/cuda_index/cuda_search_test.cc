// Device index search (src/cuda/index_search.h) against a plain CPU reference in double, over a
// grid of awkward sizes (gpu label: needs a CUDA device; every test skips without one).
//
// Each shape is checked step by step so that a failure names its step:
//   1. votes (ScoreVotes) against double dot products, within the f32 summation error bound
//      (width + 2) * 2^-24 * sum_i |q_i x_i|;
//   2. scores (VoteStats + AggregateVotes) against a double reference computed from the GPU's
//      own votes, relative 1e-5;
//   3. SearchRows' top-k exactly equal to a CPU sort of the GPU's scores (score descending, row
//      ascending): same rows, same scores;
//   4. end to end: scores against the double reference from the inputs (relative 1e-3), and the
//      top-k set against the reference's, allowing swaps only between near-tied rows.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "cuda/index_search.h"
#include "kvagent/dtype.h"

namespace kvagent::cuda {
namespace {

bool HaveDevice() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

#define CUDA_ASSERT(expr)                                                                                 \
  do {                                                                                                    \
    const cudaError_t e_ = (expr);                                                                        \
    ASSERT_EQ(e_, cudaSuccess) << #expr << ": " << cudaGetErrorName(e_) << " " << cudaGetErrorString(e_); \
  } while (0)

// Owning device allocation.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() {
    if (p_ != nullptr) cudaFree(p_);
  }
  cudaError_t Allocate(size_t bytes) {
    if (p_ != nullptr) cudaFree(p_);
    p_ = nullptr;
    return cudaMalloc(&p_, std::max<size_t>(bytes, 1));
  }
  template <typename T>
  cudaError_t Upload(const std::vector<T>& v) {
    cudaError_t e = Allocate(v.size() * sizeof(T));
    if (e != cudaSuccess) return e;
    return cudaMemcpy(p_, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice);
  }
  template <typename T>
  T* as() const {
    return static_cast<T*>(p_);
  }
  void* get() const { return p_; }

 private:
  void* p_ = nullptr;
};

template <typename T>
cudaError_t Download(const DeviceBuffer& b, size_t count, std::vector<T>* out) {
  out->resize(count);
  return cudaMemcpy(out->data(), b.get(), count * sizeof(T), cudaMemcpyDeviceToHost);
}

// Runs fn(begin, end) over [0, n) on the available cores.
void ParallelRows(size_t n, const std::function<void(size_t, size_t)>& fn) {
  const size_t threads = std::clamp<size_t>(std::thread::hardware_concurrency(), 1, 16);
  if (n < 64 || threads == 1) {
    fn(0, n);
    return;
  }
  std::vector<std::thread> pool;
  for (size_t t = 0; t < threads; ++t) pool.emplace_back([&, t] { fn(n * t / threads, n * (t + 1) / threads); });
  for (auto& th : pool) th.join();
}

const char* NormName(TokenNorm n) {
  return n == TokenNorm::kNone ? "none" : n == TokenNorm::kSoftmax ? "softmax" : "zscore";
}
const char* AggName(Aggregation a) { return a == Aggregation::kMax ? "max" : "mean"; }

// One search problem on the host; rows hold f16 bits when f16 (row_f32 keeps their values).
struct Problem {
  size_t S = 0;
  int blocks = 0, width = 0, nq = 0;
  bool f16 = true;
  std::vector<uint16_t> row16;
  std::vector<float> row32;  // values used by the reference (the f16 values when f16)
  std::vector<float> q;
  int U() const { return blocks * nq; }
  std::string Describe() const {
    std::ostringstream o;
    o << "S=" << S << " blocks=" << blocks << " width=" << width << " nq=" << nq << (f16 ? " f16" : " f32");
    return o.str();
  }
};

Problem MakeProblem(size_t S, int blocks, int width, int nq, bool f16, uint32_t seed) {
  Problem p;
  p.S = S;
  p.blocks = blocks;
  p.width = width;
  p.nq = nq;
  p.f16 = f16;
  std::mt19937 rng(seed);
  std::normal_distribution<float> n;
  p.row32.resize(S * blocks * width);
  if (f16) p.row16.resize(p.row32.size());
  for (size_t i = 0; i < p.row32.size(); ++i) {
    const float v = n(rng);
    if (f16) {
      p.row16[i] = F32ToF16(v);
      p.row32[i] = F16ToF32(p.row16[i]);
    } else {
      p.row32[i] = v;
    }
  }
  // Scaled like attention queries, so raw votes are O(1) and softmax spans a useful range.
  const float scale = 1.0f / std::sqrt(static_cast<float>(width));
  p.q.resize(static_cast<size_t>(blocks) * nq * width);
  for (auto& v : p.q) v = n(rng) * scale;
  return p;
}

// ref[r * U + u] = q[u] . rows[r][b] in double; abs[r * U + u] = sum_i |q_i x_i|.
void ReferenceVotes(const Problem& p, std::vector<double>* ref, std::vector<double>* abs) {
  const int U = p.U(), W = p.width;
  ref->assign(p.S * U, 0.0);
  abs->assign(p.S * U, 0.0);
  ParallelRows(p.S, [&](size_t lo, size_t hi) {
    for (size_t r = lo; r < hi; ++r) {
      for (int b = 0; b < p.blocks; ++b) {
        const float* x = &p.row32[(r * p.blocks + b) * W];
        for (int j = 0; j < p.nq; ++j) {
          const float* qj = &p.q[(static_cast<size_t>(b) * p.nq + j) * W];
          double s = 0, a = 0;
          for (int i = 0; i < W; ++i) {
            const double t = static_cast<double>(qj[i]) * x[i];
            s += t;
            a += std::fabs(t);
          }
          (*ref)[r * U + b * p.nq + j] = s;
          (*abs)[r * U + b * p.nq + j] = a;
        }
      }
    }
  });
}

// LatentIndex's normalisation and aggregation in double over votes[r * U + u]. scale[r] is the
// mean (kMean) or max (kMax) of |normalised vote| of row r: the size of the terms that went in.
void ReferenceScores(const std::vector<double>& votes, size_t S, int U, TokenNorm norm, Aggregation agg,
                     std::vector<double>* score, std::vector<double>* scale, double* max_inv_sd = nullptr) {
  std::vector<double> a(U, 0.0), m(U, 1.0);  // normalised = (v - a) * m, or exp(v - a) * m (softmax)
  if (norm == TokenNorm::kSoftmax) {
    for (int u = 0; u < U; ++u) {
      double mx = -INFINITY, z = 0;
      for (size_t r = 0; r < S; ++r) mx = std::max(mx, votes[r * U + u]);
      for (size_t r = 0; r < S; ++r) z += std::exp(votes[r * U + u] - mx);
      a[u] = mx;
      m[u] = 1.0 / z;
    }
  } else if (norm == TokenNorm::kZScore) {
    for (int u = 0; u < U; ++u) {
      double s = 0, s2 = 0;
      for (size_t r = 0; r < S; ++r) {
        s += votes[r * U + u];
        s2 += votes[r * U + u] * votes[r * U + u];
      }
      const double mean = s / S;
      const double sd = std::sqrt(std::max(0.0, s2 / S - mean * mean));
      a[u] = mean;
      m[u] = sd > 1e-12 * std::max(1.0, std::fabs(mean)) ? 1.0 / sd : 0.0;
    }
  }
  if (max_inv_sd != nullptr) *max_inv_sd = norm == TokenNorm::kZScore ? *std::max_element(m.begin(), m.end()) : 0.0;
  score->assign(S, 0.0);
  scale->assign(S, 0.0);
  for (size_t r = 0; r < S; ++r) {
    double best = -INFINITY, sum = 0, big = 0, sum_abs = 0;
    for (int u = 0; u < U; ++u) {
      const double v = votes[r * U + u];
      const double n = norm == TokenNorm::kSoftmax ? std::exp(v - a[u]) * m[u] : (v - a[u]) * m[u];
      best = std::max(best, n);
      sum += n;
      big = std::max(big, std::fabs(n));
      sum_abs += std::fabs(n);
    }
    (*score)[r] = agg == Aggregation::kMax ? best : sum / U;
    (*scale)[r] = agg == Aggregation::kMax ? big : sum_abs / U;
  }
}

// Rows sorted by (score descending, row ascending), as the device top-k orders them.
std::vector<int32_t> SortedRows(const std::vector<float>& scores) {
  std::vector<int32_t> idx(scores.size());
  std::iota(idx.begin(), idx.end(), 0);
  std::stable_sort(idx.begin(), idx.end(), [&](int32_t a, int32_t b) { return scores[a] > scores[b]; });
  return idx;
}

// Top-k of the device against the double reference: every returned row must score at least the
// reference's k-th score minus tol, and every row scoring above it plus tol must be returned.
void ExpectTopKSetNearlyEqual(const std::vector<int32_t>& got, const std::vector<double>& ref, double tol,
                              const std::string& what) {
  std::vector<double> sorted = ref;
  std::sort(sorted.begin(), sorted.end(), std::greater<double>());
  const double kth = sorted[got.size() - 1];
  std::vector<char> in(ref.size(), 0);
  int bad = 0;
  for (int32_t r : got) {
    ASSERT_TRUE(r >= 0 && static_cast<size_t>(r) < ref.size()) << what << " row " << r;
    in[r] = 1;
    if (ref[r] < kth - tol && bad++ < 5) {
      ADD_FAILURE() << what << ": returned row " << r << " has reference score " << ref[r] << " < k-th " << kth
                    << " - tol " << tol;
    }
  }
  for (size_t r = 0; r < ref.size(); ++r) {
    if (!in[r] && ref[r] > kth + tol && bad++ < 5) {
      ADD_FAILURE() << what << ": row " << r << " with reference score " << ref[r] << " > k-th " << kth << " + tol "
                    << tol << " is missing";
    }
  }
}

// Uploads the problem and runs every check for each norm x aggregation.
void CheckProblem(const Problem& p, int top_k) {
  SCOPED_TRACE(p.Describe() + " top_k=" + std::to_string(top_k));
  const int U = p.U();
  DeviceBuffer rows, q, votes, stats, scores, search_ws, out_s, out_r;
  if (p.f16) {
    CUDA_ASSERT(rows.Upload(p.row16));
  } else {
    CUDA_ASSERT(rows.Upload(p.row32));
  }
  CUDA_ASSERT(q.Upload(p.q));
  CUDA_ASSERT(votes.Allocate(p.S * U * sizeof(float)));
  CUDA_ASSERT(stats.Allocate(2 * U * sizeof(float)));
  CUDA_ASSERT(scores.Allocate(p.S * sizeof(float)));
  CUDA_ASSERT(out_s.Allocate(top_k * sizeof(float)));
  CUDA_ASSERT(out_r.Allocate(top_k * sizeof(int32_t)));

  // 1. votes
  Status st = ScoreVotes(rows.get(), p.f16, p.S, p.blocks, p.width, q.as<float>(), p.nq, votes.as<float>(), nullptr);
  ASSERT_TRUE(st.ok()) << st.ToString();
  CUDA_ASSERT(cudaDeviceSynchronize());
  std::vector<float> vm;  // vote-major from the device
  CUDA_ASSERT(Download(votes, p.S * U, &vm));
  std::vector<double> ref, abs;
  ReferenceVotes(p, &ref, &abs);
  std::vector<double> gpu_votes(p.S * U);  // row-major copy of the device votes
  double vote_err = 0;                     // largest error bound of a vote
  {
    int bad = 0;
    double worst = 0;
    for (size_t r = 0; r < p.S; ++r) {
      for (int u = 0; u < U; ++u) {
        const double got = vm[static_cast<size_t>(u) * p.S + r];
        gpu_votes[r * U + u] = got;
        const double want = ref[r * U + u];
        const double tol = (p.width + 2) * 0x1p-24 * abs[r * U + u] + 1e-30;
        worst = std::max(worst, std::fabs(got - want) / tol);
        vote_err = std::max(vote_err, tol);
        if (!(std::fabs(got - want) <= tol) && bad++ < 5) {
          ADD_FAILURE() << "vote r=" << r << " u=" << u << " (block " << u / p.nq << ", query " << u % p.nq << "): got "
                        << got << " want " << want << " tol " << tol;
        }
      }
    }
    ASSERT_EQ(bad, 0) << bad << " votes outside the bound; worst error / bound = " << worst;
  }

  for (TokenNorm norm : {TokenNorm::kNone, TokenNorm::kSoftmax, TokenNorm::kZScore}) {
    for (Aggregation agg : {Aggregation::kMean, Aggregation::kMax}) {
      SCOPED_TRACE(std::string("norm=") + NormName(norm) + " agg=" + AggName(agg));
      // 2. scores from the device votes
      st = VoteStats(votes.as<float>(), p.S, U, norm, stats.as<float>(), nullptr);
      ASSERT_TRUE(st.ok()) << st.ToString();
      st = AggregateVotes(votes.as<float>(), p.S, U, norm, agg, stats.as<float>(), scores.as<float>(), nullptr);
      ASSERT_TRUE(st.ok()) << st.ToString();
      CUDA_ASSERT(cudaDeviceSynchronize());
      std::vector<float> got;
      CUDA_ASSERT(Download(scores, p.S, &got));
      std::vector<double> want, scale;
      ReferenceScores(gpu_votes, p.S, U, norm, agg, &want, &scale);
      int bad = 0;
      for (size_t r = 0; r < p.S; ++r) {
        const double tol = 1e-5 * (std::fabs(want[r]) + scale[r]) + 1e-37;
        if (!(std::fabs(got[r] - want[r]) <= tol) && bad++ < 5) {
          ADD_FAILURE() << "score (from device votes) r=" << r << ": got " << got[r] << " want " << want[r] << " tol "
                        << tol;
        }
      }
      ASSERT_EQ(bad, 0);

      // 3. SearchRows end to end: top-k equals the sort of the device scores exactly.
      RowSearch s;
      s.rows = rows.get();
      s.f16 = p.f16;
      s.num_rows = p.S;
      s.blocks = p.blocks;
      s.width = p.width;
      s.q = q.as<float>();
      s.nq = p.nq;
      s.norm = norm;
      s.agg = agg;
      s.top_k = top_k;
      auto need = SearchRowsWorkspaceBytes(s);
      ASSERT_TRUE(need.ok()) << need.status().ToString();
      ASSERT_GE(*need, p.S * U * sizeof(float));
      CUDA_ASSERT(search_ws.Allocate(*need));
      CUDA_ASSERT(cudaMemset(out_r.get(), 0xFF, top_k * sizeof(int32_t)));
      st = SearchRows(s, search_ws.get(), *need, out_s.as<float>(), out_r.as<int32_t>(), nullptr);
      ASSERT_TRUE(st.ok()) << st.ToString();
      CUDA_ASSERT(cudaDeviceSynchronize());
      const size_t count = std::min<size_t>(top_k, p.S);
      std::vector<float> top_s;
      std::vector<int32_t> top_r;
      CUDA_ASSERT(Download(out_s, count, &top_s));
      CUDA_ASSERT(Download(out_r, count, &top_r));
      const std::vector<int32_t> order = SortedRows(got);
      for (size_t i = 0; i < count; ++i) {
        ASSERT_EQ(top_r[i], order[i]) << "top-k position " << i << ": got row " << top_r[i] << " score " << top_s[i]
                                      << ", want row " << order[i] << " score " << got[order[i]];
        ASSERT_EQ(top_s[i], got[order[i]]) << "top-k position " << i << " (row " << top_r[i] << ")";
      }

      // 4. against the reference from the inputs: 1e-3 relative plus what the vote error bound
      // can do through the normalisation (shift for none, relative for softmax, / sd for z-score).
      std::vector<double> full, full_scale;
      double inv_sd = 0;
      ReferenceScores(ref, p.S, U, norm, agg, &full, &full_scale, &inv_sd);
      auto end_tol = [&](double value, double scale) {
        const double mag = std::fabs(value) + scale;
        if (norm == TokenNorm::kNone) return 1e-3 * mag + vote_err;
        if (norm == TokenNorm::kSoftmax) return (1e-3 + 4 * vote_err) * mag + 1e-37;
        return 1e-3 * mag + 2 * vote_err * inv_sd * (1 + mag);
      };
      bad = 0;
      for (size_t r = 0; r < p.S; ++r) {
        const double tol = end_tol(full[r], full_scale[r]);
        if (!(std::fabs(got[r] - full[r]) <= tol) && bad++ < 5) {
          ADD_FAILURE() << "score (end to end) r=" << r << ": got " << got[r] << " want " << full[r] << " tol " << tol;
        }
      }
      ASSERT_EQ(bad, 0);
      const double hi = *std::max_element(full.begin(), full.end());
      const double lo = *std::min_element(full.begin(), full.end());
      const double big_scale = *std::max_element(full_scale.begin(), full_scale.end());
      const double kth = [&] {
        std::vector<double> v = full;
        std::nth_element(v.begin(), v.begin() + (count - 1), v.end(), std::greater<double>());
        return v[count - 1];
      }();
      ExpectTopKSetNearlyEqual(top_r, full, 2 * end_tol(kth, big_scale) + 2e-4 * (hi - lo), "top-k set");
    }
  }
}

TEST(CudaIndexSearch, MatchesReferenceOverAwkwardSizes) {
  if (!HaveDevice()) GTEST_SKIP() << "no CUDA device";
  // Every (rows, blocks, nq, dtype) combination; widths and top_k rotate through their lists
  // (7 widths: a period coprime to the 6 (nq, dtype) pairs, so every width meets every pair).
  // 13 and 36 take the scalar load paths (36 is vectorised for f32 only); 264 ends in a
  // partial tile of the query staging.
  const size_t kRowCounts[] = {1, 7, 1000, 4099};
  const int kBlocks[] = {1, 3, 64};
  const int kNq[] = {1, 5, 30};
  const int kWidths[] = {64, 80, 128, 256, 13, 36, 264};
  const int kTopK[] = {1, 5, 256};
  int c = 0;
  for (size_t S : kRowCounts) {
    for (int blocks : kBlocks) {
      for (int nq : kNq) {
        for (bool f16 : {true, false}) {
          const int width = kWidths[c % 7];
          const int top_k = kTopK[c % 3];
          ++c;
          const Problem p = MakeProblem(S, blocks, width, nq, f16, 1000 + c);
          CheckProblem(p, top_k);
          if (HasFatalFailure()) return;
        }
      }
    }
  }
}

TEST(CudaIndexSearch, ManyRowsMultiPassTopK) {
  if (!HaveDevice()) GTEST_SKIP() << "no CUDA device";
  // 300k rows: three top-k passes (74 chunks -> 18944 candidates -> 5 chunks -> 1), and vote
  // offsets beyond one chunk of the grid.
  const Problem p = MakeProblem(300000, 2, 64, 3, true, 7);
  CheckProblem(p, 1024);
}

TEST(CudaIndexSearch, EqualRowsTieToLowestRows) {
  if (!HaveDevice()) GTEST_SKIP() << "no CUDA device";
  // Identical rows: softmax gives every row 1/S, z-score gives 0 (sd 0), and the top-k is
  // rows 0..k-1 in order.
  const size_t S = 50;
  const int blocks = 2, width = 16, nq = 3, k = 7;
  Problem p = MakeProblem(1, blocks, width, nq, false, 3);
  std::vector<float> rows;
  for (size_t r = 0; r < S; ++r) rows.insert(rows.end(), p.row32.begin(), p.row32.end());
  DeviceBuffer drows, dq, ws, out_s, out_r;
  CUDA_ASSERT(drows.Upload(rows));
  CUDA_ASSERT(dq.Upload(p.q));
  CUDA_ASSERT(out_s.Allocate(k * sizeof(float)));
  CUDA_ASSERT(out_r.Allocate(k * sizeof(int32_t)));
  for (TokenNorm norm : {TokenNorm::kNone, TokenNorm::kSoftmax, TokenNorm::kZScore}) {
    for (Aggregation agg : {Aggregation::kMean, Aggregation::kMax}) {
      SCOPED_TRACE(std::string("norm=") + NormName(norm) + " agg=" + AggName(agg));
      RowSearch s{drows.get(), false, S, blocks, width, dq.as<float>(), nq, norm, agg, k};
      auto need = SearchRowsWorkspaceBytes(s);
      ASSERT_TRUE(need.ok()) << need.status().ToString();
      CUDA_ASSERT(ws.Allocate(*need));
      Status st = SearchRows(s, ws.get(), *need, out_s.as<float>(), out_r.as<int32_t>(), nullptr);
      ASSERT_TRUE(st.ok()) << st.ToString();
      CUDA_ASSERT(cudaDeviceSynchronize());
      std::vector<float> top_s;
      std::vector<int32_t> top_r;
      CUDA_ASSERT(Download(out_s, k, &top_s));
      CUDA_ASSERT(Download(out_r, k, &top_r));
      for (int i = 0; i < k; ++i) {
        EXPECT_EQ(top_r[i], i);
        EXPECT_EQ(top_s[i], top_s[0]);
        if (norm == TokenNorm::kSoftmax) {
          EXPECT_NEAR(top_s[i], 1.0 / S, 1e-6 / S);
        } else if (norm == TokenNorm::kZScore) {
          EXPECT_EQ(top_s[i], 0.0f);
        }
      }
    }
  }
}

TEST(CudaIndexSearch, TopKMatchesSortWithTies) {
  if (!HaveDevice()) GTEST_SKIP() << "no CUDA device";
  std::mt19937 rng(5);
  for (size_t n : {size_t{1}, size_t{3}, size_t{4096}, size_t{4097}, size_t{70000}, size_t{300001}}) {
    // Few distinct values (many ties), both zeros, infinities and large magnitudes.
    const float kValues[] = {0.0f, -0.0f, 1.0f, -1.0f, 0.5f, 3e38f, -3e38f, INFINITY, -INFINITY, 1e-40f, 2.0f, 7.0f};
    std::vector<float> v(n);
    for (auto& x : v) x = kValues[rng() % 12] * (rng() % 4 == 0 ? 1.0f : static_cast<float>(1 + rng() % 50));
    DeviceBuffer dv, ws, out_s, out_r;
    CUDA_ASSERT(dv.Upload(v));
    std::vector<int32_t> order(n);
    std::iota(order.begin(), order.end(), 0);
    // -0 == +0 and the lower row wins on equal scores.
    std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return v[a] > v[b]; });
    for (int k : {1, 7, 256, 1024}) {
      SCOPED_TRACE("n=" + std::to_string(n) + " k=" + std::to_string(k));
      const size_t bytes = TopKWorkspaceBytes(n, k);
      CUDA_ASSERT(ws.Allocate(bytes));
      CUDA_ASSERT(out_s.Allocate(k * sizeof(float)));
      CUDA_ASSERT(out_r.Allocate(k * sizeof(int32_t)));
      Status st = TopKRows(dv.as<float>(), n, k, ws.get(), bytes, out_s.as<float>(), out_r.as<int32_t>(), nullptr);
      ASSERT_TRUE(st.ok()) << st.ToString();
      CUDA_ASSERT(cudaDeviceSynchronize());
      const size_t count = std::min<size_t>(k, n);
      std::vector<float> got_s;
      std::vector<int32_t> got_r;
      CUDA_ASSERT(Download(out_s, count, &got_s));
      CUDA_ASSERT(Download(out_r, count, &got_r));
      for (size_t i = 0; i < count; ++i) {
        ASSERT_EQ(got_r[i], order[i]) << "position " << i << " score " << got_s[i] << " want " << v[order[i]];
        ASSERT_EQ(got_s[i], v[order[i]]) << "position " << i;
      }
    }
  }
}

}  // namespace
}  // namespace kvagent::cuda
