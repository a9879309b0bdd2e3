// Compiled kernels for MindSpore's CPU backend (Custom ops of func_type "aot", built by mindrlhf/kernels/native.py).
// Each replaces a chain of small MindSpore kernels whose launches and memory passes dominate a CPU step:
// - attention with its rotary embedding: softmax(rope(q) rope(k)^T / sqrt(d) + mask) v, forward and backward, for
//   one (batch, head) pair and one block of query rows at a time, so that the S x S scores never leave the cache
//   and each key or value row loaded serves the whole block; keys a row cannot see are skipped (a block of rows
//   computes only keys [its first visible key rounded down to a key block, its last visible key]), so a row packed
//   with several sequences (issue #25) costs about the sum of its sequences' squares, not S^2;
// - RMSNorm and SwiGLU, forward and backward, one pass over the rows each.
// Plain loops the compiler vectorises; no -ffast-math, so NaN and inf still propagate. Work is split into fixed
// items, so results do not depend on the thread count.
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <atomic>
#include <thread>
#include <vector>

namespace {

constexpr int64_t kLane = 16;  // key columns per register block
constexpr float kHidden = -1e30f;

// The bits of a float as an int32 and back: memcpy is the portable C++17 bit cast (std::bit_cast is C++20,
// the compiler builtin needs GCC 11); compilers turn it into a register move, so loops still vectorise.
template <typename To, typename From>
inline To bit_cast(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast between types of one size");
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}

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
  const int32_t bits = (bit_cast<int32_t>(shifted) - 0x4B400000 + 127) << 23;
  return x < -87.0f ? 0.0f : p * bit_cast<float>(bits);
}

// The mask adder of one batch row in the two adder forms the Python side passes: a full (S, S) adder, or one
// adder per key (1, S) with the causal part implied, as the legacy mask builds it: (1 - visible) * -10000.
struct MaskView {
  const float* data;
  int64_t S;
  bool per_key;
  float at(int64_t i, int64_t j) const { return per_key ? (j <= i ? data[j] : -10000.0f) : data[i * S + j]; }
};

// What the row loops need of one batch row's mask, in any of the three forms: the keys each row computes
// ([begins[i], ends[i]]), the rotary row of each token (rot) and, for a packed row, who sees whom.
// Packed (issue #25; codes as mindrlhf/data/packing.py builds them): mask (2, 1, S) of positions and layout codes
// (segment * 8 + kind). Its invisible keys get kHidden, never -10000 added: exp() of it is exactly 0, so a key of
// another sequence cannot change a row's result, and no score is rounded by a large adder.
struct Layout {
  MaskView adder{nullptr, 0, false};
  bool packed = false;
  std::vector<int64_t> begins, ends, rot;
  // Packed visibility: key j is visible to query i in [begins[i], ends[i]] (so j <= i) if it is of
  // i's segment, not a pad and on the shared branch or i's own. As integers the compiler can vectorise:
  // tag[j] = segment * 16 + the branches that see j (all for branch 0, its own else; none for a pad),
  // segment[i] and branch_bit[i] = 1 << branch; visible iff tag >> 4 == segment and tag & branch_bit.
  std::vector<int32_t> tag, segment, branch_bit;
  std::vector<uint8_t> alone;  // filler rows, and rows that see no key, see only themselves
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

// Keys are handled in blocks of kLane: n rounded up to whole blocks.
inline int64_t whole_blocks(int64_t n) { return (n + kLane - 1) / kLane * kLane; }

// The two adder forms: every row starts at key 0 and rotates token j by table row j.
void adder_layout(const MaskView& m, Layout* out) {
  out->adder = m;
  out->ends.resize(m.S);
  out->begins.assign(m.S, 0);
  out->rot.resize(m.S);
  visible_ends(m, out->ends.data());
  for (int64_t j = 0; j < m.S; ++j) out->rot[j] = j;
}

// The packed form: positions (S) then codes (S), exact integers in float32. Each row's first and last visible
// key come from one sweep (the first and latest non-pad key of each segment and branch so far), so segments need
// not be contiguous. False if a position is outside [0, S) or a code is not a segment <= S and kind.
bool packed_layout(const float* mask, int64_t S, Layout* out) {
  out->packed = true;
  out->begins.resize(S);
  out->ends.resize(S);
  out->rot.resize(S);
  out->tag.assign(whole_blocks(S), 0);  // to whole key blocks: a block's keys [lo, lo + np) read no further
  out->segment.resize(S);
  out->branch_bit.resize(S);
  out->alone.assign(S, 0);
  const float* pos = mask;
  const float* code = mask + S;
  std::vector<int32_t> codes(S);
  for (int64_t i = 0; i < S; ++i) {
    if (!(pos[i] >= 0.0f && pos[i] < static_cast<float>(S) && pos[i] == std::floor(pos[i]))) return false;
    if (!(code[i] >= 0.0f && code[i] < 8.0f * static_cast<float>(S + 1) && code[i] == std::floor(code[i])))
      return false;
    out->rot[i] = static_cast<int64_t>(pos[i]);
    const int32_t c = static_cast<int32_t>(code[i]), seg = c / 8, branch = c & 3;
    codes[i] = c;
    out->segment[i] = seg;
    out->branch_bit[i] = 1 << branch;
    out->tag[i] = (c & 4) ? 0 : seg * 16 + (branch == 0 ? 15 : 1 << branch);
  }
  std::vector<int64_t> first(4 * (S + 1), -1), last(4 * (S + 1), -1);  // per segment * 4 + branch
  for (int64_t i = 0; i < S; ++i) {
    const int32_t c = codes[i], seg = c / 8, branch = c & 3;
    if (seg != 0 && !(c & 4)) {
      if (first[seg * 4 + branch] < 0) first[seg * 4 + branch] = i;
      last[seg * 4 + branch] = i;
    }
    int64_t begin = -1, end = -1;
    if (seg != 0) {
      begin = first[seg * 4];
      end = last[seg * 4];
      if (branch != 0 && first[seg * 4 + branch] >= 0) {
        begin = begin < 0 ? first[seg * 4 + branch] : std::min(begin, first[seg * 4 + branch]);
        end = std::max(end, last[seg * 4 + branch]);
      }
    }
    if (begin < 0) {  // filler, or nothing visible: the row sees itself (finite, and no other sequence)
      out->alone[i] = 1;
      begin = end = i;
    }
    out->begins[i] = begin;
    out->ends[i] = end;
  }
  return true;
}

// The keys rows [i0, i0 + R) need: from the earliest first visible key (rounded down to a key block, so the key
// columns stay aligned) to the furthest last visible key. Returns the first key, lo; n = the count.
template <int64_t R>
inline int64_t block_keys(const Layout& L, int64_t i0, int64_t* n) {
  int64_t lo = L.begins[i0], hi = 0;
  for (int64_t r = 0; r < R; ++r) {
    lo = std::min(lo, L.begins[i0 + r]);
    hi = std::max(hi, L.ends[i0 + r] + 1);
  }
  lo = lo / kLane * kLane;
  *n = hi - lo;
  return lo;
}

// Dot products of R rows (row r at a + r * stride, D long) with keys [0, np) given transposed (D x SP):
// out[r * SP + j].
template <int64_t D, int64_t R>
inline void block_dots(int64_t SP, int64_t np, const float* a, int64_t stride, const float* columns, float* out) {
  for (int64_t jb = 0; jb < np; jb += kLane) {
    float acc[R][kLane] = {};
    for (int64_t d = 0; d < D; ++d) {
      const float* cd = columns + d * SP + jb;
      for (int64_t r = 0; r < R; ++r) {
        const float ad = a[r * stride + d];
#pragma omp simd
        for (int64_t jj = 0; jj < kLane; ++jj) acc[r][jj] += ad * cd[jj];
      }
    }
    for (int64_t r = 0; r < R; ++r)
      for (int64_t jj = 0; jj < kLane; ++jj) out[r * SP + jb + jj] = acc[r][jj];
  }
}

// Scores of rows [i0, i0 + R) against keys [lo, lo + np): s[r * SP + j] = q_r . k_{lo+j} + mask, kHidden past a
// row's end (and, packed, wherever the row cannot see).
template <int64_t D, int64_t R>
inline void block_scores(int64_t SP, int64_t lo, int64_t np, const float* q, const float* kt, const Layout& L,
                         int64_t i0, float* s) {
  block_dots<D, R>(SP, np, q + i0 * D, D, kt + lo, s);
  for (int64_t r = 0; r < R; ++r) {
    float* sr = s + r * SP;
    const int64_t i = i0 + r, begin = L.begins[i], end = L.ends[i];
    if (L.packed && L.alone[i]) {
      for (int64_t j = 0; j < np; ++j) sr[j] = lo + j == i ? sr[j] : kHidden;
    } else if (L.packed) {
      const int32_t* tag = L.tag.data() + lo;
      const int32_t seg = L.segment[i], bit = L.branch_bit[i];
      for (int64_t j = 0; j < np; ++j) {
        const int64_t key = lo + j;
        const bool visible = (key >= begin) & (key <= end) & ((tag[j] >> 4) == seg) & ((tag[j] & bit) != 0);
        sr[j] = visible ? sr[j] : kHidden;
      }
    } else {  // lo is 0: the mask is added last, as the stock layer does (scores near -10000 keep 1e-3)
      for (int64_t j = 0; j < np; ++j) sr[j] = j <= end ? sr[j] + L.adder.at(i, j) : kHidden;
    }
  }
}

// Rotary embedding of one head row at position j, as MindFormers' RotaryEmbedding (rotate-half form):
// y = x * cos + [-x2, x1] * sin, times `scale`.
template <int64_t D>
inline void rope_row(const float* x, const float* cos, const float* sin, float scale, float* y) {
  constexpr int64_t half = D / 2;
  for (int64_t d = 0; d < half; ++d) {
    y[d] = (x[d] * cos[d] - x[d + half] * sin[d]) * scale;
    y[d + half] = (x[d + half] * cos[d + half] + x[d] * sin[d + half]) * scale;
  }
}

// The gradient through rope_row: dx = dy * cos + the rotation's transpose of dy * sin, times `scale`.
template <int64_t D>
inline void rope_row_backward(const float* dy, const float* cos, const float* sin, float scale, float* dx) {
  constexpr int64_t half = D / 2;
  for (int64_t d = 0; d < half; ++d) {
    dx[d] = (dy[d] * cos[d] + dy[d + half] * sin[d + half]) * scale;
    dx[d + half] = (dy[d + half] * cos[d + half] - dy[d] * sin[d]) * scale;
  }
}

// The rotary tables (S rows of D) and the query's scale, 1 / sqrt(D).
struct Tables {
  const float* cos;
  const float* sin;
  float scale;
};

// One head (rows of `stride` apart in x), rotated (token j by table row rot[j]) and scaled into contiguous rows
// (S x D) and/or columns (D x SP, zero-padded to whole key blocks); either may be null. Columns are written a
// key block at a time: one token at a time, its D writes 4 * SP bytes apart fell in one cache set (SP a power of
// 2) and cost more than a packed row's attention itself.
template <int64_t D>
void rotated_head(int64_t S, int64_t SP, int64_t stride, const float* x, const Tables& t, const int64_t* rot,
                  float scale, float* rows, float* columns) {
  for (int64_t j0 = 0; j0 < S; j0 += kLane) {
    const int64_t m = std::min(kLane, S - j0);
    float y[kLane][D];
    for (int64_t jj = 0; jj < m; ++jj) {
      const int64_t j = j0 + jj;
      rope_row<D>(x + j * stride, t.cos + rot[j] * D, t.sin + rot[j] * D, scale, y[jj]);
      if (rows) std::copy(y[jj], y[jj] + D, rows + j * D);
    }
    if (columns)
      for (int64_t d = 0; d < D; ++d)
        for (int64_t jj = 0; jj < m; ++jj) columns[d * SP + j0 + jj] = y[jj][d];
  }
  if (columns)
    for (int64_t d = 0; d < D; ++d)
      for (int64_t j = S; j < SP; ++j) columns[d * SP + j] = 0.0f;
}

// x's head transposed into columns (D x SP, zero-padded), a key block at a time (see rotated_head).
inline void transposed_head(int64_t S, int64_t SP, int64_t D, int64_t stride, const float* x, float* columns) {
  for (int64_t j0 = 0; j0 < S; j0 += kLane) {
    const int64_t m = std::min(kLane, S - j0);
    for (int64_t d = 0; d < D; ++d)
      for (int64_t jj = 0; jj < m; ++jj) columns[d * SP + j0 + jj] = x[(j0 + jj) * stride + d];
  }
  for (int64_t d = 0; d < D; ++d)
    for (int64_t j = S; j < SP; ++j) columns[d * SP + j] = 0.0f;
}

// Rows [i0, i0 + R) of one head: q is the rotated, scaled head (S x D), kt its keys transposed, v the values with
// row stride vs; out rows have stride os. Writes each row's max score and 1 / sum to stats.
template <int64_t D, int64_t R>
void forward_rows(int64_t SP, const float* q, const float* kt, const float* v, int64_t vs, const Layout& L,
                  int64_t i0, float* out, int64_t os, float* stats, float* s) {
  int64_t n;
  const int64_t lo = block_keys<R>(L, i0, &n), np = whole_blocks(n);
  block_scores<D, R>(SP, lo, np, q, kt, L, i0, s);
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
    const float* vj = v + (lo + j) * vs;
    for (int64_t r = 0; r < R; ++r) {
      const float p = s[r * SP + j];
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) acc[r][d] += p * vj[d];
    }
  }
  for (int64_t r = 0; r < R; ++r)
    for (int64_t d = 0; d < D; ++d) out[(i0 + r) * os + d] = acc[r][d] * inv[r];
}

// The backward of forward_rows: accumulates into dq (S x D, rotated), dk (S x D, rotated) and dv (S x D); out
// and dout rows have stride os.
template <int64_t D, int64_t R>
void backward_rows(int64_t SP, const float* q, const float* k, const float* kt, const float* vt, const Layout& L,
                   const float* out, const float* dout, int64_t os, const float* stats, int64_t i0, float* dq,
                   float* dk, float* dv, float* s, float* ds) {
  int64_t n;
  const int64_t lo = block_keys<R>(L, i0, &n), np = whole_blocks(n);
  const float* g = dout + i0 * os;
  block_scores<D, R>(SP, lo, np, q, kt, L, i0, s);
  block_dots<D, R>(SP, np, g, os, vt + lo, ds);
  for (int64_t r = 0; r < R; ++r) {
    const float* o = out + (i0 + r) * os;
    float delta = 0.0f;
    for (int64_t d = 0; d < D; ++d) delta += g[r * os + d] * o[d];
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
  for (int64_t jj = 0; jj < n; ++jj) {
    const int64_t j = lo + jj;
    const float* kj = k + j * D;
    float dkj[D], dvj[D];
    for (int64_t d = 0; d < D; ++d) {
      dkj[d] = dk[j * D + d];
      dvj[d] = dv[j * D + d];
    }
    for (int64_t r = 0; r < R; ++r) {
      const float gs = ds[r * SP + jj], p = s[r * SP + jj];
      const float* qr = q + (i0 + r) * D;
      const float* gr = g + r * os;
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

// parallel_items over [0, total) cut into fixed chunks: body(item, lo, hi).
template <typename Body>
void parallel_chunks(int64_t total, int64_t chunk, const Body& body) {
  parallel_items((total + chunk - 1) / chunk,
                 [&](int64_t item) { body(item, item * chunk, std::min(total, (item + 1) * chunk)); });
}

// Query rows per block: as many as keep the block's accumulators in registers (measured at head sizes 16, 32 on
// a Zen 5). With 512-bit vectors (32 registers of 16 floats) 16 / 8 / 4 rows. Narrower vectors (AVX2: 16 registers
// of 8 floats; NEON: 32 of 4) spill 16 rows of 16 accumulators at head size 16: built for AVX2 there, 8 rows
// forward and 4 backward were 1.1x and 1.45x faster. Row counts only change which exact zeros are added, not
// results.
#if defined(__AVX512F__)
constexpr bool kWideVectors = true;
#else
constexpr bool kWideVectors = false;
#endif
template <int64_t D, bool Backward>
constexpr int64_t rows_for() {
  return D <= 16 ? (kWideVectors ? 16 : (Backward ? 4 : 8)) : (D <= 32 ? 8 : 4);
}

// q (B, S, H * D), k and v (B, S, G * D) as the projections give them (G key heads, each shared by H / G query
// heads); the mask (B or 1, 1, S or 1, S), or packed (B, 2, 1, S).
struct Shapes {
  int64_t B, S, H, G, D, mask_batch, mask_planes, mask_rows;
  bool packed() const { return mask_planes == 2; }
  int64_t mask_index(int64_t b) const { return mask_batch == 1 ? 0 : b; }
  const float* mask(const float* data, int64_t b) const { return data + mask_index(b) * mask_planes * mask_rows * S; }
};

// The Layout of every mask (batch row b's at mask_index(b)); false if a packed mask is malformed.
bool all_layouts(const Shapes& x, const float* mask, std::vector<Layout>* layouts) {
  layouts->resize(x.mask_batch);
  for (int64_t b = 0; b < x.mask_batch; ++b) {
    if (x.packed()) {
      if (!packed_layout(x.mask(mask, b), x.S, &(*layouts)[b])) return false;
    } else {
      adder_layout({x.mask(mask, b), x.S, x.mask_rows == 1}, &(*layouts)[b]);
    }
  }
  return true;
}

template <int64_t D>
int forward_all(const Shapes& x, const Tables& t, const float* q, const float* k, const float* v, const float* mask,
                float* out, float* stats) {
  constexpr int64_t kRows = rows_for<D, false>();
  const int64_t S = x.S, H = x.H, G = x.G, SP = whole_blocks(S);
  std::vector<Layout> layouts;
  if (!all_layouts(x, mask, &layouts)) return 2;
  parallel_items(x.B * H, [&](int64_t bh) {
    thread_local std::vector<float> qr, kt, s;
    qr.resize(S * D);
    kt.resize(D * SP);
    s.resize(kRows * SP);
    const int64_t b = bh / H, h = bh % H, g = h / (H / G);
    const Layout& L = layouts[x.mask_index(b)];
    rotated_head<D>(S, SP, H * D, q + b * S * H * D + h * D, t, L.rot.data(), t.scale, qr.data(), nullptr);
    rotated_head<D>(S, SP, G * D, k + b * S * G * D + g * D, t, L.rot.data(), 1.0f, nullptr, kt.data());
    const float* vh = v + b * S * G * D + g * D;
    float* oh = out + b * S * H * D + h * D;
    float* st = stats + 2 * bh * S;
    int64_t i0 = 0;
    for (; i0 + kRows <= S; i0 += kRows)
      forward_rows<D, kRows>(SP, qr.data(), kt.data(), vh, G * D, L, i0, oh, H * D, st, s.data());
    for (; i0 < S; ++i0) forward_rows<D, 1>(SP, qr.data(), kt.data(), vh, G * D, L, i0, oh, H * D, st, s.data());
  });
  return 0;
}

// One item per (batch, key head), so that the query heads sharing a key head add into its dk and dv in turn.
template <int64_t D>
int backward_all(const Shapes& x, const Tables& t, const float* q, const float* k, const float* v, const float* mask,
                 const float* out, const float* stats, const float* dout, float* dq, float* dk, float* dv) {
  constexpr int64_t kRows = rows_for<D, true>();
  const int64_t S = x.S, H = x.H, G = x.G, SP = whole_blocks(S);
  std::vector<Layout> layouts;
  if (!all_layouts(x, mask, &layouts)) return 2;
  parallel_items(x.B * G, [&](int64_t bg) {
    thread_local std::vector<float> qr, kr, kt, vt, s, ds, dqr, dkr, dvh;
    for (auto* buffer : {&qr, &kr, &dqr, &dkr, &dvh}) buffer->resize(S * D);
    kt.resize(D * SP);
    vt.resize(D * SP);
    s.resize(kRows * SP);
    ds.resize(kRows * SP);
    const int64_t b = bg / G, g = bg % G;
    const Layout& L = layouts[x.mask_index(b)];
    const int64_t* rot = L.rot.data();
    rotated_head<D>(S, SP, G * D, k + b * S * G * D + g * D, t, rot, 1.0f, kr.data(), kt.data());
    transposed_head(S, SP, D, G * D, v + b * S * G * D + g * D, vt.data());
    std::fill(dkr.begin(), dkr.end(), 0.0f);
    std::fill(dvh.begin(), dvh.end(), 0.0f);
    for (int64_t h = g * (H / G); h < (g + 1) * (H / G); ++h) {
      rotated_head<D>(S, SP, H * D, q + b * S * H * D + h * D, t, rot, t.scale, qr.data(), nullptr);
      const float* oh = out + b * S * H * D + h * D;
      const float* gh = dout + b * S * H * D + h * D;
      const float* st = stats + 2 * (b * H + h) * S;
      int64_t i0 = 0;
      for (; i0 + kRows <= S; i0 += kRows)
        backward_rows<D, kRows>(SP, qr.data(), kr.data(), kt.data(), vt.data(), L, oh, gh, H * D, st, i0,
                                dqr.data(), dkr.data(), dvh.data(), s.data(), ds.data());
      for (; i0 < S; ++i0)
        backward_rows<D, 1>(SP, qr.data(), kr.data(), kt.data(), vt.data(), L, oh, gh, H * D, st, i0, dqr.data(),
                            dkr.data(), dvh.data(), s.data(), ds.data());
      for (int64_t i = 0; i < S; ++i)  // dq: through the scale and the rotation
        rope_row_backward<D>(dqr.data() + i * D, t.cos + rot[i] * D, t.sin + rot[i] * D, t.scale,
                             dq + (b * S + i) * H * D + h * D);
    }
    for (int64_t j = 0; j < S; ++j) {
      float* dkj = dk + (b * S + j) * G * D + g * D;
      rope_row_backward<D>(dkr.data() + j * D, t.cos + rot[j] * D, t.sin + rot[j] * D, 1.0f, dkj);
      std::copy(dvh.data() + j * D, dvh.data() + (j + 1) * D, dv + (b * S + j) * G * D + g * D);
    }
  });
  return 0;
}

bool all_float32(int nparam, const char** dtypes) {
  for (int i = 0; i < nparam; ++i)
    if (std::strcmp(dtypes[i], "float32") != 0 && std::strcmp(dtypes[i], "float") != 0) return false;
  return true;
}

int64_t count(const int* ndims, int64_t** shapes, int i) {
  int64_t n = 1;
  for (int d = 0; d < ndims[i]; ++d) n *= shapes[i][d];
  return n;
}

// Inputs q, k, v, cos, sin, mask; checks that they are float32 and fit together (see Shapes): cos and sin hold
// S rows of D, the mask's last axis is S and its batch is B or 1 (packed: B, its one row per batch row).
bool attention_shapes(int nparam, int expected, const int* ndims, int64_t** shapes, const char** dtypes,
                      Shapes* x) {
  if (nparam != expected || !all_float32(nparam, dtypes) || ndims[5] != 4) return false;
  const int64_t* mask = shapes[5];
  const bool packed = mask[1] == 2;
  const int64_t B = mask[0] == 1 && !packed ? 0 : mask[0], S = mask[3], D = shapes[3][ndims[3] - 1];
  if (S <= 0 || D <= 0 || D % 2 || count(ndims, shapes, 3) != S * D || count(ndims, shapes, 4) != S * D) return false;
  const int64_t qn = count(ndims, shapes, 0), kn = count(ndims, shapes, 1);
  const int64_t batch = B ? B : qn / (S * shapes[0][ndims[0] - 1]);
  if (shapes[0][ndims[0] - 1] % D || shapes[1][ndims[1] - 1] % D || kn != count(ndims, shapes, 2)) return false;
  *x = {batch, S, shapes[0][ndims[0] - 1] / D, shapes[1][ndims[1] - 1] / D, D, mask[0], mask[1], mask[2]};
  return x->G > 0 && x->H % x->G == 0 && qn == batch * S * x->H * D && kn == batch * S * x->G * D &&
         (packed ? x->mask_rows == 1 : mask[1] == 1 && (x->mask_rows == 1 || x->mask_rows == S));
}

// ---- RMSNorm: y = x * rsqrt(mean(x^2) + eps) * w over the last axis ----

constexpr int64_t kNormRows = 64;       // rows per work item
constexpr int64_t kElements = 1 << 14;  // SwiGLU elements per work item

float row_rstd(const float* x, int64_t W, float eps) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t d = 0; d < W; ++d) sum += x[d] * x[d];
  return 1.0f / std::sqrt(sum / static_cast<float>(W) + eps);
}

}  // namespace

extern "C" {

// Threads for every kernel here; Python sets it once after loading (ranks on one host share its cores).
void MindrlhfSetThreads(int count) { threads = std::max(count, 1); }

// Inputs q (B, S, H * D) and k, v (B, S, G * D) straight from the projections, the rotary tables cos and sin
// (S rows of D, as FreqsMgr gives them) and the mask: an adder (B or 1, 1, S or 1, S), or packed (B, 2, 1, S) of
// positions and layout codes (see Layout); outputs the attention (B, S, H * D), heads merged as the output
// projection wants them, and each row's max score and 1 / sum (B, H, S, 2) for the backward. The query is scaled
// by 1 / sqrt(D) after its rotation, as the stock layer does. Returns 1 for shapes that do not fit, 2 for a packed
// mask with a position outside [0, S) or a code that is no segment and kind, 3 for an unsupported head size.
int RopeAttentionForward(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes, void*, void*) {
  Shapes x;
  if (!attention_shapes(nparam, 8, ndims, shapes, dtypes, &x)) return 1;
  auto p = reinterpret_cast<float**>(params);
  const Tables t{p[3], p[4], 1.0f / std::sqrt(static_cast<float>(x.D))};
  switch (x.D) {
    case 16: return forward_all<16>(x, t, p[0], p[1], p[2], p[5], p[6], p[7]);
    case 32: return forward_all<32>(x, t, p[0], p[1], p[2], p[5], p[6], p[7]);
    case 64: return forward_all<64>(x, t, p[0], p[1], p[2], p[5], p[6], p[7]);
    case 128: return forward_all<128>(x, t, p[0], p[1], p[2], p[5], p[6], p[7]);
    default: return 3;
  }
}

// Inputs q, k, v, cos, sin, mask, out, stats and dout (B, S, H * D); outputs dq, dk, dv shaped as q, k, v.
int RopeAttentionBackward(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes, void*, void*) {
  Shapes x;
  if (!attention_shapes(nparam, 12, ndims, shapes, dtypes, &x)) return 1;
  auto p = reinterpret_cast<float**>(params);
  const Tables t{p[3], p[4], 1.0f / std::sqrt(static_cast<float>(x.D))};
  switch (x.D) {
    case 16: return backward_all<16>(x, t, p[0], p[1], p[2], p[5], p[6], p[7], p[8], p[9], p[10], p[11]);
    case 32: return backward_all<32>(x, t, p[0], p[1], p[2], p[5], p[6], p[7], p[8], p[9], p[10], p[11]);
    case 64: return backward_all<64>(x, t, p[0], p[1], p[2], p[5], p[6], p[7], p[8], p[9], p[10], p[11]);
    case 128: return backward_all<128>(x, t, p[0], p[1], p[2], p[5], p[6], p[7], p[8], p[9], p[10], p[11]);
    default: return 3;
  }
}

// Inputs x (..., W), weight (W), eps (1); output y shaped as x.
int RmsNormForward(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes, void*, void*) {
  if (nparam != 4 || !all_float32(nparam, dtypes)) return 1;
  auto p = reinterpret_cast<float**>(params);
  const int64_t W = shapes[0][ndims[0] - 1], N = count(ndims, shapes, 0) / W;
  const float eps = p[2][0];
  parallel_chunks(N, kNormRows, [&](int64_t, int64_t lo, int64_t hi) {
    for (int64_t n = lo; n < hi; ++n) {
      const float* x = p[0] + n * W;
      float* y = p[3] + n * W;
      const float rstd = row_rstd(x, W, eps);
#pragma omp simd
      for (int64_t d = 0; d < W; ++d) y[d] = x[d] * rstd * p[1][d];
    }
  });
  return 0;
}

// Inputs x, weight, eps, dy; outputs dx and dweight. dweight sums fixed blocks of rows, then the blocks in order.
int RmsNormBackward(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes, void*, void*) {
  if (nparam != 6 || !all_float32(nparam, dtypes)) return 1;
  auto p = reinterpret_cast<float**>(params);
  const int64_t W = shapes[0][ndims[0] - 1], N = count(ndims, shapes, 0) / W;
  const int64_t items = (N + kNormRows - 1) / kNormRows;
  const float eps = p[2][0];
  const float* w = p[1];
  std::vector<float> partial(items * W, 0.0f);
  parallel_chunks(N, kNormRows, [&](int64_t item, int64_t lo, int64_t hi) {
    float* dw = partial.data() + item * W;
    for (int64_t n = lo; n < hi; ++n) {
      const float* x = p[0] + n * W;
      const float* dy = p[3] + n * W;
      float* dx = p[4] + n * W;
      const float rstd = row_rstd(x, W, eps);
      float dot = 0.0f;  // mean(dy * w * xhat)
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < W; ++d) {
        dot += dy[d] * w[d] * x[d] * rstd;
        dw[d] += dy[d] * x[d] * rstd;
      }
      dot /= static_cast<float>(W);
#pragma omp simd
      for (int64_t d = 0; d < W; ++d) dx[d] = rstd * (dy[d] * w[d] - x[d] * rstd * dot);
    }
  });
  float* dw = p[5];
  std::fill(dw, dw + W, 0.0f);
  for (int64_t item = 0; item < items; ++item)
    for (int64_t d = 0; d < W; ++d) dw[d] += partial[item * W + d];
  return 0;
}

// Inputs gate, up (same shape); output silu(gate) * up.
int SwigluForward(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes, void*, void*) {
  if (nparam != 3 || !all_float32(nparam, dtypes) || count(ndims, shapes, 0) != count(ndims, shapes, 1)) return 1;
  auto p = reinterpret_cast<float**>(params);
  parallel_chunks(count(ndims, shapes, 0), kElements, [&](int64_t, int64_t lo, int64_t hi) {
#pragma omp simd
    for (int64_t i = lo; i < hi; ++i) {
      const float g = p[0][i];
      p[2][i] = g / (1.0f + exp_ps(-g)) * p[1][i];
    }
  });
  return 0;
}

// Inputs gate, up, dout; outputs dgate, dup.
int SwigluBackward(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes, void*, void*) {
  if (nparam != 5 || !all_float32(nparam, dtypes) || count(ndims, shapes, 0) != count(ndims, shapes, 1)) return 1;
  auto p = reinterpret_cast<float**>(params);
  parallel_chunks(count(ndims, shapes, 0), kElements, [&](int64_t, int64_t lo, int64_t hi) {
#pragma omp simd
    for (int64_t i = lo; i < hi; ++i) {
      const float g = p[0][i], u = p[1][i], dy = p[2][i];
      const float sig = 1.0f / (1.0f + exp_ps(-g));
      p[3][i] = dy * u * sig * (1.0f + g * (1.0f - sig));
      p[4][i] = dy * g * sig;
    }
  });
  return 0;
}

}  // extern "C"
