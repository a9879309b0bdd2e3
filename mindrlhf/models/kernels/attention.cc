// Fused attention for MindSpore on CPU (a Custom op of func_type "aot"): softmax(q k^T + mask) v, forward and
// backward, for one (batch, head) pair and one block of query rows at a time, so that the S x S scores never
// leave the cache and each key or value row loaded serves the whole block. Keys a row cannot see are skipped (see
// visible_ends). Plain loops the compiler vectorises; no -ffast-math, so NaN and inf still propagate.
#include <algorithm>
#include <cfloat>
#include <cstdint>
#include <cstring>
#include <atomic>
#include <thread>
#include <vector>

namespace {

constexpr int64_t kLane = 16;  // key columns per register block
constexpr float kHidden = -1e30f;

// exp(x), Cephes' expf polynomial (about 1 ulp), branch-free so that loops over it vectorise; 0 below -87.
inline float exp_ps(float x) {
  const float xc = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float shifted = xc * 1.44269504088896341f + 12582912.0f;  // + 1.5 * 2^23 rounds to an integer
  const float n = shifted - 12582912.0f;
  const float r = xc - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (__builtin_bit_cast(int32_t, shifted) - 0x4B400000 + 127) << 23;
  return x < -87.0f ? 0.0f : p * __builtin_bit_cast(float, bits);
}

// The mask adder of one batch row in either form the Python side passes: a full (S, S) adder, or one adder per
// key (1, S) with the causal part implied, as the legacy mask builds it: (1 - visible) * -10000.
struct MaskView {
  const float* data;
  int64_t S;
  bool per_key;
  float at(int64_t i, int64_t j) const { return per_key ? (j <= i ? data[j] : -10000.0f) : data[i * S + j]; }
};

// The last key each row can see: the last j whose adder is above -1000 (the legacy mask adds 0 or -10000).
// Later keys would get exp(score - 10000 - max) = 0 in float32, so skipping them is exact. A row that sees no
// key keeps them all, as the stock softmax of equally shifted scores does.
void visible_ends(const MaskView& m, int64_t* ends) {
  for (int64_t i = 0; i < m.S; ++i) {
    int64_t j = m.per_key ? i : m.S - 1;
    while (j >= 0 && m.at(i, j) <= -1000.0f) --j;
    ends[i] = j >= 0 ? j : m.S - 1;
  }
}

// Scores of rows [i0, i0 + R) against keys [0, np): s[r * SP + j] = q_r . k_j + mask, kHidden past a row's end.
template <int64_t D, int64_t R>
inline void block_scores(int64_t SP, int64_t np, const float* q, const float* kt, const MaskView& mask,
                         const int64_t* ends, int64_t i0, float* s) {
  for (int64_t jb = 0; jb < np; jb += kLane) {
    float acc[R][kLane] = {};
    for (int64_t d = 0; d < D; ++d) {
      const float* kd = kt + d * SP + jb;
      for (int64_t r = 0; r < R; ++r) {
        const float qd = q[(i0 + r) * D + d];
#pragma omp simd
        for (int64_t jj = 0; jj < kLane; ++jj) acc[r][jj] += qd * kd[jj];
      }
    }
    // The mask is added last, as the stock layer does: scores near -10000 keep only 1e-3 of precision.
    for (int64_t r = 0; r < R; ++r)
      for (int64_t jj = 0; jj < kLane; ++jj)
        s[r * SP + jb + jj] = jb + jj <= ends[i0 + r] ? acc[r][jj] + mask.at(i0 + r, jb + jj) : kHidden;
  }
}

// Same for dO_r . v_j (no mask).
template <int64_t D, int64_t R>
inline void block_dots(int64_t SP, int64_t np, const float* g, int64_t g_stride, const float* vt, float* dp) {
  for (int64_t jb = 0; jb < np; jb += kLane) {
    float acc[R][kLane] = {};
    for (int64_t d = 0; d < D; ++d) {
      const float* vd = vt + d * SP + jb;
      for (int64_t r = 0; r < R; ++r) {
        const float gd = g[r * g_stride + d];
#pragma omp simd
        for (int64_t jj = 0; jj < kLane; ++jj) acc[r][jj] += gd * vd[jj];
      }
    }
    for (int64_t r = 0; r < R; ++r)
      for (int64_t jj = 0; jj < kLane; ++jj) dp[r * SP + jb + jj] = acc[r][jj];
  }
}

inline void transpose_padded(int64_t S, int64_t SP, int64_t D, const float* x, float* xt) {
  for (int64_t d = 0; d < D; ++d) {
    for (int64_t j = 0; j < S; ++j) xt[d * SP + j] = x[j * D + d];
    for (int64_t j = S; j < SP; ++j) xt[d * SP + j] = 0.0f;
  }
}

template <int64_t D, int64_t R>
void forward_rows(int64_t SP, int64_t H, int64_t h, const float* q, const float* kt, const float* v,
                  const MaskView& mask, const int64_t* ends, int64_t i0, float* out, float* stats, float* s) {
  int64_t n = 0;
  for (int64_t r = 0; r < R; ++r) n = std::max(n, ends[i0 + r] + 1);
  const int64_t np = (n + kLane - 1) / kLane * kLane;
  block_scores<D, R>(SP, np, q, kt, mask, ends, i0, s);
  float inv[R];
  for (int64_t r = 0; r < R; ++r) {
    float* sr = s + r * SP;
    float mx = -FLT_MAX;
#pragma omp simd reduction(max : mx)
    for (int64_t j = 0; j < np; ++j) mx = std::max(mx, sr[j]);
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < np; ++j) {
      sr[j] = exp_ps(sr[j] - mx);
      sum += sr[j];
    }
    inv[r] = 1.0f / sum;
    stats[2 * (i0 + r)] = mx;  // not a log-sum-exp: next to -10000 its rounding would shift every probability
    stats[2 * (i0 + r) + 1] = inv[r];
  }
  float acc[R][D] = {};
  for (int64_t j = 0; j < n; ++j) {
    const float* vj = v + j * D;
    for (int64_t r = 0; r < R; ++r) {
      const float p = s[r * SP + j];
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) acc[r][d] += p * vj[d];
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    float* o = out + ((i0 + r) * H + h) * D;
    for (int64_t d = 0; d < D; ++d) o[d] = acc[r][d] * inv[r];
  }
}

template <int64_t D, int64_t R>
void backward_rows(int64_t SP, int64_t H, int64_t h, const float* q, const float* k, const float* kt,
                   const float* vt, const MaskView& mask, const int64_t* ends, const float* out, const float* stats,
                   const float* dout, int64_t i0, float* dq, float* dk, float* dv, float* s, float* ds) {
  int64_t n = 0;
  for (int64_t r = 0; r < R; ++r) n = std::max(n, ends[i0 + r] + 1);
  const int64_t np = (n + kLane - 1) / kLane * kLane;
  const int64_t stride = H * D;
  const float* g = dout + (i0 * H + h) * D;
  block_scores<D, R>(SP, np, q, kt, mask, ends, i0, s);
  block_dots<D, R>(SP, np, g, stride, vt, ds);
  for (int64_t r = 0; r < R; ++r) {
    const float* o = out + ((i0 + r) * H + h) * D;
    float delta = 0.0f;
    for (int64_t d = 0; d < D; ++d) delta += g[r * stride + d] * o[d];
    const float mx = stats[2 * (i0 + r)], inv = stats[2 * (i0 + r) + 1];
    float* sr = s + r * SP;
    float* dsr = ds + r * SP;
#pragma omp simd
    for (int64_t j = 0; j < np; ++j) {
      const float p = exp_ps(sr[j] - mx) * inv;
      sr[j] = p;
      dsr[j] = p * (dsr[j] - delta);
    }
  }
  float acc[R][D] = {};
  for (int64_t j = 0; j < n; ++j) {
    const float* kj = k + j * D;
    float dkj[D], dvj[D];
    for (int64_t d = 0; d < D; ++d) {
      dkj[d] = dk[j * D + d];
      dvj[d] = dv[j * D + d];
    }
    for (int64_t r = 0; r < R; ++r) {
      const float gs = ds[r * SP + j], p = s[r * SP + j];
      const float* qr = q + (i0 + r) * D;
      const float* gr = g + r * stride;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) {
        acc[r][d] += gs * kj[d];
        dkj[d] += gs * qr[d];
        dvj[d] += p * gr[d];
      }
    }
    for (int64_t d = 0; d < D; ++d) {
      dk[j * D + d] = dkj[d];
      dv[j * D + d] = dvj[d];
    }
  }
  for (int64_t r = 0; r < R; ++r)
    for (int64_t d = 0; d < D; ++d) dq[(i0 + r) * D + d] = acc[r][d];
}

int threads = 1;

// Runs body(item) for items [0, count) on `threads` threads (this one included), items handed out one at a
// time. Plain threads, started per call: OpenMP's idle workers spin-wait after a parallel region and took the
// cores from the MindSpore kernels that run next (a 2-core step went from 62 to 85 ms).
template <typename Body>
void parallel_items(int64_t count, const Body& body) {
  std::atomic<int64_t> next{0};
  auto worker = [&]() {
    for (int64_t item = next++; item < count; item = next++) body(item);
  };
  std::vector<std::thread> pool;
  for (int t = 1; t < std::min<int64_t>(threads, count); ++t) pool.emplace_back(worker);
  worker();
  for (auto& thread : pool) thread.join();
}

// Query rows per block: as many as keep the block's accumulators in registers (measured at head sizes 16, 32).
template <int64_t D>
constexpr int64_t rows_for() { return D <= 16 ? 16 : (D <= 32 ? 8 : 4); }

struct Shapes {
  int64_t B, H, S, D, mask_batch, mask_rows;
  MaskView mask(const float* data, int64_t b) const {
    return {data + (mask_batch == 1 ? 0 : b) * mask_rows * S, S, mask_rows == 1};
  }
};

template <int64_t D>
int forward_all(const Shapes& x, const float* q, const float* k, const float* v, const float* mask, float* out,
                float* stats) {
  constexpr int64_t kRows = rows_for<D>();
  const int64_t S = x.S, H = x.H, SP = (S + kLane - 1) / kLane * kLane;
  std::vector<int64_t> ends(x.mask_batch * S);
  for (int64_t b = 0; b < x.mask_batch; ++b) visible_ends(x.mask(mask, b), ends.data() + b * S);
  parallel_items(x.B * H, [&](int64_t bh) {
    thread_local std::vector<float> kt, s;
    kt.resize(D * SP);
    s.resize(kRows * SP);
    const int64_t b = bh / H, h = bh % H, off = bh * S * D;
    const MaskView m = x.mask(mask, b);
    const int64_t* e = ends.data() + (x.mask_batch == 1 ? 0 : b) * S;
    transpose_padded(S, SP, D, k + off, kt.data());
    int64_t i0 = 0;
    for (; i0 + kRows <= S; i0 += kRows)
      forward_rows<D, kRows>(SP, H, h, q + off, kt.data(), v + off, m, e, i0, out + b * S * H * D,
                             stats + 2 * bh * S, s.data());
    for (; i0 < S; ++i0)
      forward_rows<D, 1>(SP, H, h, q + off, kt.data(), v + off, m, e, i0, out + b * S * H * D,
                         stats + 2 * bh * S, s.data());
  });
  return 0;
}

template <int64_t D>
int backward_all(const Shapes& x, const float* q, const float* k, const float* v, const float* mask,
                 const float* out, const float* stats, const float* dout, float* dq, float* dk, float* dv) {
  constexpr int64_t kRows = rows_for<D>();
  const int64_t S = x.S, H = x.H, SP = (S + kLane - 1) / kLane * kLane;
  std::vector<int64_t> ends(x.mask_batch * S);
  for (int64_t b = 0; b < x.mask_batch; ++b) visible_ends(x.mask(mask, b), ends.data() + b * S);
  parallel_items(x.B * H, [&](int64_t bh) {
    thread_local std::vector<float> kt, vt, s, ds;
    kt.resize(D * SP);
    vt.resize(D * SP);
    s.resize(kRows * SP);
    ds.resize(kRows * SP);
    const int64_t b = bh / H, h = bh % H, off = bh * S * D;
    const MaskView m = x.mask(mask, b);
    const int64_t* e = ends.data() + (x.mask_batch == 1 ? 0 : b) * S;
    transpose_padded(S, SP, D, k + off, kt.data());
    transpose_padded(S, SP, D, v + off, vt.data());
    std::fill(dk + off, dk + off + S * D, 0.0f);
    std::fill(dv + off, dv + off + S * D, 0.0f);
    const float* o = out + b * S * H * D;
    const float* g = dout + b * S * H * D;
    int64_t i0 = 0;
    for (; i0 + kRows <= S; i0 += kRows)
      backward_rows<D, kRows>(SP, H, h, q + off, k + off, kt.data(), vt.data(), m, e, o, stats + 2 * bh * S, g,
                              i0, dq + off, dk + off, dv + off, s.data(), ds.data());
    for (; i0 < S; ++i0)
      backward_rows<D, 1>(SP, H, h, q + off, k + off, kt.data(), vt.data(), m, e, o, stats + 2 * bh * S, g,
                          i0, dq + off, dk + off, dv + off, s.data(), ds.data());
  });
  return 0;
}

// Checks what the Python side promises: float32 everywhere, q (B, H, S, D), mask (B or 1, 1, S or 1, S).
bool shapes_of(int nparam, int expected, const int* ndims, int64_t** shapes, const char** dtypes, Shapes* x) {
  if (nparam != expected || ndims[0] != 4 || ndims[3] != 4) return false;
  for (int i = 0; i < nparam; ++i)
    if (std::strcmp(dtypes[i], "float32") != 0 && std::strcmp(dtypes[i], "float") != 0) return false;
  *x = {shapes[0][0], shapes[0][1], shapes[0][2], shapes[0][3], shapes[3][0], shapes[3][2]};
  return shapes[3][1] == 1 && (x->mask_rows == x->S || x->mask_rows == 1) && shapes[3][3] == x->S &&
         (x->mask_batch == 1 || x->mask_batch == x->B);
}

}  // namespace

// Inputs q, k, v (B, H, S, D) and the mask adder (B or 1, 1, S or 1, S); outputs out (B, S, H * D), heads merged as
// the layer's next projection wants them, and each row's max score and 1 / sum (B, H, S, 2) for the backward.
extern "C" int FusedAttentionForward(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes,
                                     void*, void*) {
  Shapes x;
  if (!shapes_of(nparam, 6, ndims, shapes, dtypes, &x)) return 1;
  auto p = reinterpret_cast<float**>(params);
  switch (x.D) {
    case 16: return forward_all<16>(x, p[0], p[1], p[2], p[3], p[4], p[5]);
    case 32: return forward_all<32>(x, p[0], p[1], p[2], p[3], p[4], p[5]);
    case 64: return forward_all<64>(x, p[0], p[1], p[2], p[3], p[4], p[5]);
    case 128: return forward_all<128>(x, p[0], p[1], p[2], p[3], p[4], p[5]);
    default: return 3;
  }
}

// Inputs q, k, v, mask, out, stats and dout (B, S, H * D); outputs dq, dk, dv (B, H, S, D).
extern "C" int FusedAttentionBackward(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes,
                                      void*, void*) {
  Shapes x;
  if (!shapes_of(nparam, 10, ndims, shapes, dtypes, &x)) return 1;
  auto p = reinterpret_cast<float**>(params);
  switch (x.D) {
    case 16: return backward_all<16>(x, p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8], p[9]);
    case 32: return backward_all<32>(x, p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8], p[9]);
    case 64: return backward_all<64>(x, p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8], p[9]);
    case 128: return backward_all<128>(x, p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8], p[9]);
    default: return 3;
  }
}

// Threads for both kernels; Python sets it once after loading (several ranks on one host share its cores).
extern "C" void FusedAttentionSetThreads(int count) { threads = count; }
