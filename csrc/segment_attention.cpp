// Attention within each sample's segment of packed tokens, on CPU: forward and backward.
//
//   segment_attention_fwd(q[Tq,H,d], k[Tk,H,d], v[Tk,H,d], int[] q_cu, int[] k_cu, float scale)
//       -> (out[Tq,H,d], lse[Tq,H])
//   segment_attention_bwd(grad_out, q, k, v, out, lse, q_cu, k_cu, scale, dq!, dk!, dv!): writes the gradients
//
// Query rows q_cu[i]..q_cu[i+1] attend to key rows k_cu[i]..k_cu[i+1] (host offsets, B+1 each);
// a sample without keys gets zero outputs and zero gradients. fp32, head dim 16, 32, 64 or 128,
// the last dim contiguous (rows and heads may be strided: q, k, v are views of one qkv GEMM).
// lse = log Σ exp(scale·q·k) per query row and head, kept for the backward, which recomputes
// the probabilities from it (as flash attention does) instead of storing them.
//
// Why: the training step calls attention once per sample and layer on short segments (100-600
// tokens) with small heads (nano: 8 heads of 16). PyTorch's CPU flash kernel runs those at about
// a third of the matmul peak, and the per-segment calls cost Python dispatch and autograd nodes.
// Here one op call covers every segment and head (parallel over (segment, head) pairs), and the
// inner loops are AVX-512 register tiles: kRows<D> query rows at a time, keys 64 at a time for
// Q·Kᵀ (K transposed once per task into panels of 64 keys, each [D][64] contiguous, so that a
// tile streams one panel per block of keys: at tiny's shapes forward 0-6% and backward 2-3% faster
// than D rows at stride lp; each row's max taken from the registers), head-dim vectors
// for P·V. The softmax scale and log2 e fold into one FMA before exp2, so at head dim 16, where
// the exponentials cost about as much as the products, each score takes one pass after Q·Kᵀ.
// The backward takes a task's query rows in chunks (kChunk): the tiles write the chunk's P and
// dS and its dQ, then dV += Pᵀ·dO and dK += dSᵀ·Q run over the chunk's rows with each block of
// keys' accumulators in registers, written straight into dv / dk: 7-13% faster at the nano and
// tiny shapes (old and new builds in alternating processes) than rank-4/6 updates of [keys, D]
// accumulators in memory after every tile, which then had to be zeroed and copied out.
// Where the CPU lacks AVX-512F (or the build is not x86-64) `available()` is false and
// olmoearth_fast/ops/segment_attention.py takes its reference path.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "avx512_math.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <memory>
#include <utility>
#include <vector>

namespace olmoearth_fast {
namespace {

// Query rows per register tile. 4 at head dims 16, 32, 128 (8 at 16: no faster forward, slower
// backward). 6 at 64 (tiny to large): the Q·Kᵀ step loads 2 key vectors + 6 broadcast rows per 12
// FMAs instead of 2 + 4 per 8; 29 of the 32 vector registers in P·V and dQ (then also dK / dV);
// forward 2-4%, backward 4-5% faster at tiny's shapes (3 heads, 16 segments of 90-470 tokens),
// same results.
template <int D>
constexpr int kRows = D == 64 ? 6 : 4;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// A task's key count rounded up to whole 16-key vectors: the row length of its Kᵀ, Vᵀ and scores.
inline int64_t padded_keys(int64_t nk) { return (nk + 15) / 16 * 16; }

struct View {  // a [T, H, d] fp32 tensor: row and head strides in floats, last dim contiguous
  const float* p;
  int64_t row, head;
  const float* at(int64_t t, int64_t h) const { return p + t * row + h * head; }
};

struct Out {
  float* p;
  int64_t row, head;
  float* at(int64_t t, int64_t h) const { return p + t * row + h * head; }
};

#ifdef OEF_X86  // the AVX-512 kernels (compiled for any x86-64 host, run where the CPU has them)

// Kᵀ (and Vᵀ) in key panels: the keys in blocks of 64, then one of 32 and one of 16 for the rest,
// each block [D][width] contiguous at float offset start·D. transpose_rows writes them and
// rows_times_bt walks them, both through this function. A tile's Q·Kᵀ then streams one
// contiguous panel per block of keys instead of D rows at stride lp.
inline void key_panel(int64_t lp, int64_t j, int64_t& start, int64_t& width) {
  const int64_t full = lp / 64 * 64;
  if (j < full) {
    start = j / 64 * 64, width = 64;
  } else if (lp - full >= 32 && j < full + 32) {
    start = full, width = 32;
  } else {
    start = j / 16 * 16, width = 16;
  }
}

// [n] rows of D floats (stride ld) -> key panels (key_panel) of the transpose, zero padded to lp
// keys (a multiple of 16): 16×16 blocks in registers; the last block's missing rows are zeros,
// which is the padding.
template <int D>
OEF_AVX512 void transpose_rows(const float* m, int64_t ld, int64_t n, int64_t lp, float* t) {
  for (int64_t j = 0; j < lp; j += 16) {
    const int64_t rows = std::min<int64_t>(16, n - j);
    int64_t start, width;
    key_panel(lp, j, start, width);
    float* panel = t + start * D + (j - start);
    for (int c0 = 0; c0 < D; c0 += 16) {
      __m512 r[16];
      for (int i = 0; i < 16; ++i) r[i] = i < rows ? _mm512_loadu_ps(m + (j + i) * ld + c0) : _mm512_setzero_ps();
      transpose16(r);
      for (int i = 0; i < 16; ++i) _mm512_storeu_ps(panel + (c0 + i) * width, r[i]);
    }
  }
}

// Each tile of NR query rows runs through helpers templated on (D, NR): the row loops unroll
// without per-row branches. A task's full tiles take kRows<D> rows, its last few rows one at a time.

OEF_AVX512 inline float dot(const float* a, const float* b, int d) {
  __m512 acc = _mm512_setzero_ps();
  for (int c = 0; c < d; c += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + c), _mm512_loadu_ps(b + c), acc);
  return _mm512_reduce_add_ps(acc);
}

OEF_AVX512 inline void scale_row(float* x, int d, float f) {
  for (int c = 0; c < d; c += 16) _mm512_storeu_ps(x + c, _mm512_mul_ps(_mm512_loadu_ps(x + c), _mm512_set1_ps(f)));
}

// Keys j..j+16·KV of rows_times_bt: each broadcast of a row's element feeds KV FMAs.
template <int D, int NR, int KV, bool kMax>
OEF_AVX512 inline void key_block(const float* const* a, const float* bt, int64_t lp, int64_t nk, int64_t j, float* s,
                                 __m512* m) {
  __m512 acc[NR][KV];
  for (int r = 0; r < NR; ++r)
    for (int u = 0; u < KV; ++u) acc[r][u] = _mm512_setzero_ps();
  for (int c = 0; c < D; ++c) {
    __m512 b[KV];
    for (int u = 0; u < KV; ++u) b[u] = _mm512_loadu_ps(bt + j * D + c * (16 * KV) + 16 * u);  // its panel
    for (int r = 0; r < NR; ++r) {
      const __m512 ar = _mm512_set1_ps(a[r][c]);
      for (int u = 0; u < KV; ++u) acc[r][u] = _mm512_fmadd_ps(ar, b[u], acc[r][u]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int u = 0; u < KV; ++u) {
      _mm512_storeu_ps(s + r * lp + j + 16 * u, acc[r][u]);
      if (kMax) m[r] = _mm512_mask_max_ps(m[r], tail_mask(j + 16 * u, nk), m[r], acc[r][u]);
    }
}

// s[r][j] = Σ_c a_r[c] · bt[c][j] for NR rows a_r against bt, a transpose in key panels
// (transpose_rows; lp a multiple of 16, zero padded past the nk keys), panel by panel: 64 keys
// at a time, the NR × 4 accumulators and the 4 key vectors in the 32 vector registers (4 loads
// + NR broadcasts per 4·NR FMAs, against 2 + NR per 2·NR 32 at a time: at tiny's shapes the
// op's forward and backward 2-9% faster, old and new builds timed in alternating processes);
// then 32 and 16 for the rest. With kMax, also mx[r] = max over the nk keys of s[r][·]: from
// the registers where the running maxima fit beside the accumulators, else (6 rows) from s
// afterwards (a pass over NR·lp floats in L1).
template <int D, int NR, bool kMax>
OEF_AVX512 void rows_times_bt(const float* const* a, const float* bt, int64_t lp, int64_t nk, float* s, float* mx) {
  static_assert(4 * NR + 4 + 1 <= 32, "64-key panels: the accumulators of at most 6 rows a tile");
  constexpr bool kMaxInRegisters = kMax && 4 * NR + 4 + 1 + NR <= 32;
  __m512 m[NR];
  for (int r = 0; r < NR; ++r) m[r] = _mm512_set1_ps(kNegInf);
  for (int64_t j = 0, start, width; j < lp; j += width) {
    key_panel(lp, j, start, width);
    if (width == 64) {
      key_block<D, NR, 4, kMaxInRegisters>(a, bt, lp, nk, j, s, m);
    } else if (width == 32) {
      key_block<D, NR, 2, kMaxInRegisters>(a, bt, lp, nk, j, s, m);
    } else {
      key_block<D, NR, 1, kMaxInRegisters>(a, bt, lp, nk, j, s, m);
    }
  }
  if (kMax && !kMaxInRegisters)
    for (int r = 0; r < NR; ++r)
      for (int64_t k = 0; k < lp; k += 16)
        m[r] = _mm512_mask_max_ps(m[r], tail_mask(k, nk), m[r], _mm512_loadu_ps(s + r * lp + k));
  if (kMax)
    for (int r = 0; r < NR; ++r) mx[r] = _mm512_reduce_max_ps(m[r]);
}

// o_r[:] = Σ_j w[r][j] · m[j][:] for j < n (m rows of D floats at stride ldm), into o (D each).
template <int D, int NR>
OEF_AVX512 void weights_times_rows(const float* w, int64_t lp, const float* m, int64_t ldm, int64_t n,
                                   float* const* o) {
  constexpr int V = D / 16;
  __m512 acc[NR][V];
  for (int r = 0; r < NR; ++r)
    for (int c = 0; c < V; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    const float* row = m + j * ldm;
    __m512 mv[V];
    for (int c = 0; c < V; ++c) mv[c] = _mm512_loadu_ps(row + 16 * c);
    for (int r = 0; r < NR; ++r) {
      const __m512 wr = _mm512_set1_ps(w[r * lp + j]);
      for (int c = 0; c < V; ++c) acc[r][c] = _mm512_fmadd_ps(wr, mv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int c = 0; c < V; ++c) _mm512_storeu_ps(o[r] + 16 * c, acc[r][c]);
}

// Keys per block of columns_times_rows: its NK × D/16 accumulators take 24 of the 32 vector registers.
template <int D>
constexpr int kKeys = 24 / (D / 16);

// o_j[:] = Σ_{i<n} w[i][j] · x_i[:] (+ o_j[:] if kAdd) for the keys j = j0 .. j0+keys−1 (keys <=
// NK): w's rows at stride lp, x's rows from row x0 of head h, o's rows from row o0 (strided
// views). The accumulators stay in registers over the n rows; each row costs D/16 loads of x_i
// and NK broadcasts of w[i][j0 ..] per NK·D/16 FMAs. A last block of fewer keys still computes
// NK columns (reading up to NK − 1 floats past w's last row: its buffer is padded) and stores
// its own.
template <int D, int NK, bool kAdd>
OEF_AVX512 void columns_times_rows(const float* w, int64_t lp, int64_t j0, int64_t keys, View x, int64_t x0, int64_t h,
                                   int64_t n, Out o, int64_t o0) {
  constexpr int V = D / 16;
  __m512 acc[NK][V];
#pragma GCC unroll 24
  for (int k = 0; k < NK; ++k)
#pragma GCC unroll 8
    for (int c = 0; c < V; ++c) acc[k][c] = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; ++i) {
    const float* xi = x.at(x0 + i, h);
    const float* wi = w + i * lp + j0;
    __m512 xv[V];
#pragma GCC unroll 8
    for (int c = 0; c < V; ++c) xv[c] = _mm512_loadu_ps(xi + 16 * c);
    // unrolled in full, or the compiler keeps the accumulators on the stack (24 of them at D = 16)
#pragma GCC unroll 24
    for (int k = 0; k < NK; ++k) {
      const __m512 wk = _mm512_set1_ps(wi[k]);
#pragma GCC unroll 8
      for (int c = 0; c < V; ++c) acc[k][c] = _mm512_fmadd_ps(wk, xv[c], acc[k][c]);
    }
  }
#pragma GCC unroll 24
  for (int k = 0; k < NK; ++k) {
    if (k >= keys) break;
    float* ok = o.at(o0 + j0 + k, h);
#pragma GCC unroll 8
    for (int c = 0; c < V; ++c)
      _mm512_storeu_ps(ok + 16 * c, kAdd ? _mm512_add_ps(acc[k][c], _mm512_loadu_ps(ok + 16 * c)) : acc[k][c]);
  }
}

// o[k0 + j] (+)= Σ_{i<n} w[i][j] · x_i for every key j < nk, in blocks of kKeys<D> keys.
template <int D, bool kAdd>
OEF_AVX512 void keys_update(const float* w, int64_t lp, int64_t nk, View x, int64_t x0, int64_t h, int64_t n, Out o,
                            int64_t k0) {
  constexpr int NK = kKeys<D>;
  for (int64_t j = 0; j < nk; j += NK)
    columns_times_rows<D, NK, kAdd>(w, lp, j, std::min<int64_t>(NK, nk - j), x, x0, h, n, o, k0);
}

// What the tiles of one (segment, head) share: its inputs, outputs and buffers.
template <int D>
struct TaskData {
  View q, k, v;
  int64_t h, q0, k0, nk, lp;
  float scale;  // softmax scale; probabilities are exp2(raw·scale·log2 e − ...): one FMA before exp2
  const float* kt;  // Kᵀ, D × lp in key panels (transpose_rows)
  float* s;  // scores, kRows<D> × lp
};

constexpr float kLog2e = 1.44269504088896341f;

// Forward of query rows i..i+NR: raw scores and their max, unnormalised weights e and their sum
// (lse = scale·max + log Σ e), out = (e · V) / Σ e.
template <int D, int NR>
OEF_AVX512 void forward_tile(const TaskData<D>& t, Out out, float* lse, int64_t lse_row, int64_t i) {
  const float* rows[NR];
  float* dst[NR];
  for (int r = 0; r < NR; ++r) {
    rows[r] = t.q.at(t.q0 + i + r, t.h);
    dst[r] = out.at(t.q0 + i + r, t.h);
  }
  float mx[NR], inv[NR];
  rows_times_bt<D, NR, true>(rows, t.kt, t.lp, t.nk, t.s, mx);
  const __m512 c = _mm512_set1_ps(t.scale * kLog2e);
  for (int r = 0; r < NR; ++r) {
    float* sr = t.s + r * t.lp;
    const __m512 mc = _mm512_set1_ps(mx[r] * (t.scale * kLog2e));  // the max's own FMA term, rounded
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < t.lp; j += 16) {
      const __m512 x = _mm512_fmsub_ps(_mm512_loadu_ps(sr + j), c, mc);  // (s − max)·scale·log2 e
      const __m512 e = _mm512_maskz_mov_ps(tail_mask(j, t.nk), exp2_512(x));
      sum = _mm512_add_ps(sum, e);
      _mm512_storeu_ps(sr + j, e);
    }
    const float l = _mm512_reduce_add_ps(sum);
    inv[r] = 1.0f / l;
    lse[(t.q0 + i + r) * lse_row + t.h] = mx[r] * t.scale + std::log(l);
  }
  // unnormalised weights, the 1/Σ applied to the D outputs of each row instead of to its keys
  weights_times_rows<D, NR>(t.s, t.lp, t.v.at(t.k0, t.h), t.v.row, t.nk, dst);
  for (int r = 0; r < NR; ++r) scale_row(dst[r], D, inv[r]);
}

// Forward of one (segment, head): queries q0..q0+nq, keys k0..k0+nk (nk > 0).
template <int D>
OEF_AVX512 void forward_task(View q, View k, View v, Out out, float* lse, int64_t lse_row, int64_t h, int64_t q0,
                             int64_t nq, int64_t k0, int64_t nk, float scale) {
  constexpr int R = kRows<D>;
  const int64_t lp = padded_keys(nk);
  std::unique_ptr<float[]> buf(new float[(D + R) * lp]);  // Kᵀ, then the tile's scores (written before read)
  float* kt = buf.get();
  transpose_rows<D>(k.at(k0, h), k.row, nk, lp, kt);
  const TaskData<D> t{q, k, v, h, q0, k0, nk, lp, scale, kt, kt + D * lp};
  int64_t i = 0;
  for (; i + R <= nq; i += R) forward_tile<D, R>(t, out, lse, lse_row, i);
  for (; i < nq; ++i) forward_tile<D, 1>(t, out, lse, lse_row, i);
}

// What the backward tiles of one (segment, head) share besides TaskData.
template <int D>
struct BackwardData {
  View go, out;
  const float* lse;
  int64_t lse_row;
  Out dq;
  const float* vt;  // Vᵀ, D × lp in key panels
  float* ds;  // a chunk's dS rows × scale (first its dP), kChunk<D> × lp; its P rows are TaskData::s
};

// Query rows per chunk of the backward: a multiple of kRows<D>, the chunk's rows of Q and dO
// (16 KB each) held in L1 while its dK and dV updates run, its P and dS (chunk × keys) in L2.
template <int D>
constexpr int kChunk = 4096 / D / kRows<D> * kRows<D>;

// Backward of query rows i..i+NR, its rows r of P and dS at row i − c0 + r of the chunk's
// buffers: P recomputed from lse, dS = scale · P ∘ (dO·Vᵀ − Σ dO·O), dQ = dS·K.
template <int D, int NR>
OEF_AVX512 void backward_tile(const TaskData<D>& t, const BackwardData<D>& b, int64_t i, int64_t c0) {
  const float* qr[NR];
  const float* gr[NR];
  float* dqr[NR];
  float delta[NR];
  for (int r = 0; r < NR; ++r) {
    const int64_t row = t.q0 + i + r;
    qr[r] = t.q.at(row, t.h);
    gr[r] = b.go.at(row, t.h);
    dqr[r] = b.dq.at(row, t.h);
    delta[r] = dot(gr[r], b.out.at(row, t.h), D);  // Σ dO·O of the row
  }
  float* p = t.s + (i - c0) * t.lp;
  float* ds = b.ds + (i - c0) * t.lp;
  rows_times_bt<D, NR, false>(qr, t.kt, t.lp, t.nk, p, nullptr);  // raw scores
  rows_times_bt<D, NR, false>(gr, b.vt, t.lp, t.nk, ds, nullptr);  // dP = dO · Vᵀ
  const __m512 c = _mm512_set1_ps(t.scale * kLog2e), sc = _mm512_set1_ps(t.scale);
  for (int r = 0; r < NR; ++r) {
    float* pr = p + r * t.lp;
    float* dpr = ds + r * t.lp;
    const __m512 lc = _mm512_set1_ps(b.lse[(t.q0 + i + r) * b.lse_row + t.h] * kLog2e);
    const __m512 dl = _mm512_set1_ps(delta[r]);
    for (int64_t j = 0; j < t.lp; j += 16) {
      const __m512 x = _mm512_fmsub_ps(_mm512_loadu_ps(pr + j), c, lc);  // s·scale·log2 e − lse·log2 e
      const __m512 e = _mm512_maskz_mov_ps(tail_mask(j, t.nk), exp2_512(x));
      _mm512_storeu_ps(pr + j, e);
      // dS × scale: the scale of dQ = scale · dS·K and dK = scale · dSᵀ·Q, applied once here
      _mm512_storeu_ps(dpr + j, _mm512_mul_ps(_mm512_mul_ps(e, _mm512_sub_ps(_mm512_loadu_ps(dpr + j), dl)), sc));
    }
  }
  weights_times_rows<D, NR>(ds, t.lp, t.k.at(t.k0, t.h), t.k.row, t.nk, dqr);  // dQ = dS · K
}

// Backward of one (segment, head), chunk by chunk of query rows: the chunk's P and dS (tiles of
// kRows<D> rows, with dQ), then its updates of dV += Pᵀ·dO and dK += dSᵀ·Q, the accumulators of
// each block of keys in registers, written (the first chunk) or added (the others) straight
// into dv / dk. dk / dv rows of this segment and head are written here only.
template <int D>
OEF_AVX512 void backward_task(View go, View q, View k, View v, View out, const float* lse, int64_t lse_row, Out dq,
                              Out dk, Out dv, int64_t h, int64_t q0, int64_t nq, int64_t k0, int64_t nk, float scale) {
  constexpr int R = kRows<D>, C = kChunk<D>;
  const int64_t lp = padded_keys(nk);
  const int64_t rows = std::min<int64_t>(C, nq);
  // Kᵀ, Vᵀ, a chunk's P and dS: each written before read; then zeros, read by the last key block
  const int64_t size = (2 * D + 2 * rows) * lp;
  std::unique_ptr<float[]> buf(new float[size + kKeys<D>]);
  std::fill_n(buf.get() + size, kKeys<D>, 0.0f);
  float* kt = buf.get();
  float* vt = kt + D * lp;
  float* p = vt + D * lp;
  transpose_rows<D>(k.at(k0, h), k.row, nk, lp, kt);
  transpose_rows<D>(v.at(k0, h), v.row, nk, lp, vt);
  const TaskData<D> t{q, k, v, h, q0, k0, nk, lp, scale, kt, p};
  const BackwardData<D> b{go, out, lse, lse_row, dq, vt, p + rows * lp};
  for (int64_t c0 = 0; c0 < nq; c0 += C) {
    const int64_t c1 = std::min(nq, c0 + C);
    int64_t i = c0;
    for (; i + R <= c1; i += R) backward_tile<D, R>(t, b, i, c0);
    for (; i < c1; ++i) backward_tile<D, 1>(t, b, i, c0);
    const auto update = c0 == 0 ? keys_update<D, false> : keys_update<D, true>;
    update(p, lp, nk, go, q0 + c0, h, c1 - c0, dv, k0);    // dV (+)= Pᵀ · dO
    update(b.ds, lp, nk, q, q0 + c0, h, c1 - c0, dk, k0);  // dK (+)= dSᵀ · Q
  }
}

#endif  // OEF_X86

bool available() { return cpu_has_avx512(); }

View view_of(const at::Tensor& t) { return {t.data_ptr<float>(), t.stride(0), t.stride(1)}; }
Out out_of(at::Tensor& t) { return {t.data_ptr<float>(), t.stride(0), t.stride(1)}; }

void check(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::IntArrayRef q_cu, at::IntArrayRef k_cu) {
  for (const at::Tensor* t : {&q, &k, &v}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->dim() == 3 && t->stride(2) == 1,
                "segment_attention: q, k, v must be fp32 CPU tensors [T, H, d] with a contiguous last dim");
  }
  TORCH_CHECK(k.sizes() == v.sizes(), "segment_attention: k and v shapes differ");
  TORCH_CHECK(q.size(1) == k.size(1) && q.size(2) == k.size(2), "segment_attention: q and k heads / dims differ");
  const int64_t d = q.size(2);
  TORCH_CHECK(d == 16 || d == 32 || d == 64 || d == 128, "segment_attention: head dim must be 16, 32, 64 or 128, got ", d);
  TORCH_CHECK(q_cu.size() == k_cu.size() && !q_cu.empty(), "segment_attention: q_cu and k_cu need B+1 entries each");
  TORCH_CHECK(q_cu.front() == 0 && q_cu.back() == q.size(0) && k_cu.front() == 0 && k_cu.back() == k.size(0),
              "segment_attention: offsets must run from 0 to the row counts");
  for (size_t i = 0; i + 1 < q_cu.size(); ++i)
    TORCH_CHECK(q_cu[i + 1] >= q_cu[i] && k_cu[i + 1] >= k_cu[i], "segment_attention: offsets must not decrease");
}

// Runs fn(segment, head) for every pair, longest first, each thread taking the next pair when it
// is free. A task's cost grows with nq·nk and the lengths vary 5× within a batch, so the static
// split of at::parallel_for (contiguous halves on 2 threads) left one thread idle for ~12% of the
// op on average at 16 segments; longest-first dynamic takes ends within about one short task.
template <typename F>
void for_tasks(at::IntArrayRef q_cu, at::IntArrayRef k_cu, int64_t heads, const F& fn) {
  const int64_t b = static_cast<int64_t>(q_cu.size()) - 1;
  std::vector<std::pair<int64_t, int64_t>> order;  // (−cost, segment)
  order.reserve(b);
  for (int64_t s = 0; s < b; ++s) {
    const int64_t nq = q_cu[s + 1] - q_cu[s], nk = k_cu[s + 1] - k_cu[s];
    order.emplace_back(-(nq * padded_keys(nk) + nq + nk), s);  // Q·Kᵀ tiles, plus per-row work
  }
  std::stable_sort(order.begin(), order.end());
  const int64_t n = b * heads;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, n, 1, [&](int64_t, int64_t) {  // every thread's call pulls until all are taken
    for (int64_t t = next.fetch_add(1); t < n; t = next.fetch_add(1)) fn(order[t / heads].second, t % heads);
  });
}

#define OEF_DISPATCH_D(d, ...)                        \
  switch (d) {                                        \
    case 16: { constexpr int D = 16; __VA_ARGS__; break; } \
    case 32: { constexpr int D = 32; __VA_ARGS__; break; } \
    case 64: { constexpr int D = 64; __VA_ARGS__; break; } \
    default: { constexpr int D = 128; __VA_ARGS__; break; } \
  }

std::tuple<at::Tensor, at::Tensor> segment_attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                         at::IntArrayRef q_cu, at::IntArrayRef k_cu, double scale) {
  check(q, k, v, q_cu, k_cu);
  TORCH_CHECK(available(), "segment_attention: this CPU has no AVX-512F (the op's Python wrapper falls back)");
  const int64_t heads = q.size(1);
  // every row is written below: by its task, or as zeros / −inf where its sample has no keys
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(0), heads}, q.options());
  const View qv = view_of(q), kv = view_of(k), vv = view_of(v);
  Out ov = out_of(out);
  float* l = lse.data_ptr<float>();
  const float sc = static_cast<float>(scale);
#ifdef OEF_X86
  OEF_DISPATCH_D(q.size(2), for_tasks(q_cu, k_cu, heads, [&](int64_t s, int64_t h) {
    const int64_t nq = q_cu[s + 1] - q_cu[s], nk = k_cu[s + 1] - k_cu[s];
    if (nq > 0 && nk > 0) {
      forward_task<D>(qv, kv, vv, ov, l, heads, h, q_cu[s], nq, k_cu[s], nk, sc);
    } else {
      for (int64_t t = q_cu[s]; t < q_cu[s + 1]; ++t) {
        std::fill(ov.at(t, h), ov.at(t, h) + D, 0.0f);
        l[t * heads + h] = kNegInf;
      }
    }
  }));
#endif
  return {out, lse};
}

// Writes dq, dk, dv into the given tensors (shaped like q, k, v; rows and heads may be strided,
// e.g. slices of one packed [T, 3, H, d] gradient, so that no stack copy follows).
void segment_attention_bwd(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const at::Tensor& out, const at::Tensor& lse, at::IntArrayRef q_cu, at::IntArrayRef k_cu,
                           double scale, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  check(q, k, v, q_cu, k_cu);
  TORCH_CHECK(available(), "segment_attention: this CPU has no AVX-512F (the op's Python wrapper falls back)");
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes() && grad_out.stride(2) == 1 &&
                  out.stride(2) == 1 && grad_out.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat,
              "segment_attention_bwd: grad_out and out must be fp32 like q");
  TORCH_CHECK(lse.is_contiguous() && lse.size(0) == q.size(0) && lse.size(1) == q.size(1),
              "segment_attention_bwd: lse must be a contiguous [Tq, H]");
  const int64_t heads = q.size(1);
  for (const auto& [g, t] : {std::pair<const at::Tensor*, const at::Tensor*>{&dq, &q}, {&dk, &k}, {&dv, &v}})
    TORCH_CHECK(g->sizes() == t->sizes() && g->device().is_cpu() && g->scalar_type() == at::kFloat && g->stride(2) == 1,
                "segment_attention_bwd: dq, dk, dv must be fp32 CPU tensors shaped like q, k, v with a contiguous "
                "last dim");
  // every row is written below: by its task, or as zeros where its sample has no keys / queries
  const View gv = view_of(grad_out), qv = view_of(q), kv = view_of(k), vv = view_of(v), ov = view_of(out);
  Out dqv = out_of(dq), dkv = out_of(dk), dvv = out_of(dv);
  const float* l = lse.data_ptr<float>();
  const float sc = static_cast<float>(scale);
#ifdef OEF_X86
  OEF_DISPATCH_D(q.size(2), for_tasks(q_cu, k_cu, heads, [&](int64_t s, int64_t h) {
    const int64_t nq = q_cu[s + 1] - q_cu[s], nk = k_cu[s + 1] - k_cu[s];
    if (nq > 0 && nk > 0) {
      backward_task<D>(gv, qv, kv, vv, ov, l, heads, dqv, dkv, dvv, h, q_cu[s], nq, k_cu[s], nk, sc);
    } else {
      for (int64_t t = q_cu[s]; t < q_cu[s + 1]; ++t) std::fill(dqv.at(t, h), dqv.at(t, h) + D, 0.0f);
      for (int64_t t = k_cu[s]; t < k_cu[s + 1]; ++t) {
        std::fill(dkv.at(t, h), dkv.at(t, h) + D, 0.0f);
        std::fill(dvv.at(t, h), dvv.at(t, h) + D, 0.0f);
      }
    }
  }));
#endif
}

}  // namespace
}  // namespace olmoearth_fast

TORCH_LIBRARY_FRAGMENT(olmoearth_fast, m) {
  m.def("segment_attention_available() -> bool", &olmoearth_fast::available);
  m.def("segment_attention_fwd(Tensor q, Tensor k, Tensor v, int[] q_cu, int[] k_cu, float scale) -> (Tensor, Tensor)");
  m.def("segment_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, int[] q_cu, "
        "int[] k_cu, float scale, Tensor(a!) dq, Tensor(b!) dk, Tensor(c!) dv) -> ()");
}

TORCH_LIBRARY_IMPL(olmoearth_fast, CPU, m) {
  m.impl("segment_attention_fwd", &olmoearth_fast::segment_attention_fwd);
  m.impl("segment_attention_bwd", &olmoearth_fast::segment_attention_bwd);
}
