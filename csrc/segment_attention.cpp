// Attention within each sample's segment of packed tokens, on CPU: forward and backward.
//
//   segment_attention_fwd(q[Tq,H,d], k[Tk,H,d], v[Tk,H,d], int[] q_cu, int[] k_cu, float scale)
//       -> (out[Tq,H,d], lse[Tq,H])
//   segment_attention_bwd(grad_out, q, k, v, out, lse, q_cu, k_cu, scale) -> (dq, dk, dv)
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
// inner loops are AVX-512 register tiles: 4 query rows at a time, keys 32 at a time for
// Q·Kᵀ (K transposed once per task), head-dim vectors for P·V. Where the CPU lacks AVX-512F (or
// the build is not x86-64) `available()` is false and olmoearth_fast/ops/segment_attention.py
// takes its reference path.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "avx512_math.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace olmoearth_fast {
namespace {

constexpr int kRows = 4;  // query rows per register tile
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

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

// [n] rows of D floats (stride ld) -> [D][lp] transposed, zero padded to lp. Written row by row
// of the output (contiguous stores; the n input rows stay in cache across the D passes).
template <int D>
void transpose_rows(const float* m, int64_t ld, int64_t n, int64_t lp, float* t) {
  for (int c = 0; c < D; ++c) {
    float* tc = t + c * lp;
    for (int64_t j = 0; j < n; ++j) tc[j] = m[j * ld + c];
    std::fill(tc + n, tc + lp, 0.0f);
  }
}

#ifdef OEF_X86  // the AVX-512 kernels (compiled for any x86-64 host, run where the CPU has them)

// lanes j..j+15 that are keys (< n)
OEF_AVX512 inline __mmask16 tail_mask(int64_t j, int64_t n) {
  return j + 16 <= n ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - j)) - 1);
}

// s[r][j] = scale · Σ_c a_r[c] · bt[c][j] for nr (<= 4) rows a_r (stride lda) against the
// transposed [D][lp] matrix bt (lp a multiple of 16, zero padded): keys 16 at a time.
template <int D>
OEF_AVX512 void rows_times_bt(const float* const* a, int nr, const float* bt, int64_t lp, float scale, float* s) {
  int64_t j = 0;
  for (; j + 32 <= lp; j += 32) {  // 32 keys a step: each broadcast feeds two FMAs
    __m512 acc[kRows][2];
    for (int r = 0; r < kRows; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int c = 0; c < D; ++c) {
      const __m512 b0 = _mm512_loadu_ps(bt + c * lp + j), b1 = _mm512_loadu_ps(bt + c * lp + j + 16);
      for (int r = 0; r < kRows; ++r)
        if (r < nr) {
          const __m512 ar = _mm512_set1_ps(a[r][c]);
          acc[r][0] = _mm512_fmadd_ps(ar, b0, acc[r][0]);
          acc[r][1] = _mm512_fmadd_ps(ar, b1, acc[r][1]);
        }
    }
    for (int r = 0; r < nr; ++r) {
      _mm512_storeu_ps(s + r * lp + j, _mm512_mul_ps(acc[r][0], _mm512_set1_ps(scale)));
      _mm512_storeu_ps(s + r * lp + j + 16, _mm512_mul_ps(acc[r][1], _mm512_set1_ps(scale)));
    }
  }
  for (; j < lp; j += 16) {
    __m512 acc[kRows];
    for (int r = 0; r < kRows; ++r) acc[r] = _mm512_setzero_ps();
    for (int c = 0; c < D; ++c) {
      const __m512 b = _mm512_loadu_ps(bt + c * lp + j);
      for (int r = 0; r < kRows; ++r)
        if (r < nr) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(a[r][c]), b, acc[r]);
    }
    for (int r = 0; r < nr; ++r) _mm512_storeu_ps(s + r * lp + j, _mm512_mul_ps(acc[r], _mm512_set1_ps(scale)));
  }
}

// o_r[:] = Σ_j w[r][j] · m[j][:] for j < n (m rows of D floats at stride ldm), into o (D each).
template <int D>
OEF_AVX512 void weights_times_rows(const float* w, int64_t lp, int nr, const float* m, int64_t ldm, int64_t n,
                                   float* const* o) {
  constexpr int V = D / 16;
  __m512 acc[kRows][V];
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < V; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    const float* row = m + j * ldm;
    __m512 mv[V];
    for (int c = 0; c < V; ++c) mv[c] = _mm512_loadu_ps(row + 16 * c);
    for (int r = 0; r < kRows; ++r) {
      if (r >= nr) break;
      const __m512 wr = _mm512_set1_ps(w[r * lp + j]);
      for (int c = 0; c < V; ++c) acc[r][c] = _mm512_fmadd_ps(wr, mv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < nr; ++r)
    for (int c = 0; c < V; ++c) _mm512_storeu_ps(o[r] + 16 * c, acc[r][c]);
}

// acc[j][:] += Σ_r w[r][j] · x_r[:] for j < n: rank-nr update of a [n][D] accumulator.
template <int D>
OEF_AVX512 void accumulate_outer(const float* w, int64_t lp, int nr, const float* const* x, int64_t n, float* acc) {
  constexpr int V = D / 16;
  __m512 xv[kRows][V];
  for (int r = 0; r < nr; ++r)
    for (int c = 0; c < V; ++c) xv[r][c] = _mm512_loadu_ps(x[r] + 16 * c);
  for (int64_t j = 0; j < n; ++j) {
    float* row = acc + j * D;
    __m512 a[V];
    for (int c = 0; c < V; ++c) a[c] = _mm512_loadu_ps(row + 16 * c);
    for (int r = 0; r < kRows; ++r) {
      if (r >= nr) break;
      const __m512 wr = _mm512_set1_ps(w[r * lp + j]);
      for (int c = 0; c < V; ++c) a[c] = _mm512_fmadd_ps(wr, xv[r][c], a[c]);
    }
    for (int c = 0; c < V; ++c) _mm512_storeu_ps(row + 16 * c, a[c]);
  }
}

// Forward of one (segment, head): queries q0..q0+nq, keys k0..k0+nk (nk > 0).
template <int D>
OEF_AVX512 void forward_task(View q, View k, View v, Out out, float* lse, int64_t lse_row, int64_t h, int64_t q0,
                             int64_t nq, int64_t k0, int64_t nk, float scale) {
  const int64_t lp = (nk + 15) / 16 * 16;
  std::vector<float> kt(D * lp), s(kRows * lp);
  transpose_rows<D>(k.at(k0, h), k.row, nk, lp, kt.data());
  for (int64_t i = 0; i < nq; i += kRows) {
    const int nr = static_cast<int>(std::min<int64_t>(kRows, nq - i));
    const float* rows[kRows];
    float* dst[kRows];
    for (int r = 0; r < nr; ++r) {
      rows[r] = q.at(q0 + i + r, h);
      dst[r] = out.at(q0 + i + r, h);
    }
    rows_times_bt<D>(rows, nr, kt.data(), lp, scale, s.data());
    float inv[kRows];
    for (int r = 0; r < nr; ++r) {
      float* sr = s.data() + r * lp;
      __m512 mx = _mm512_set1_ps(kNegInf);
      for (int64_t j = 0; j < lp; j += 16)
        mx = _mm512_mask_max_ps(mx, tail_mask(j, nk), mx, _mm512_loadu_ps(sr + j));
      const float m = _mm512_reduce_max_ps(mx);
      const __m512 mv = _mm512_set1_ps(m);
      __m512 sum = _mm512_setzero_ps();
      for (int64_t j = 0; j < lp; j += 16) {
        const __m512 e = _mm512_maskz_mov_ps(tail_mask(j, nk), exp512(_mm512_sub_ps(_mm512_loadu_ps(sr + j), mv)));
        sum = _mm512_add_ps(sum, e);
        _mm512_storeu_ps(sr + j, e);
      }
      const float l = _mm512_reduce_add_ps(sum);
      inv[r] = 1.0f / l;
      lse[(q0 + i + r) * lse_row + h] = m + std::log(l);
    }
    // unnormalised weights, the 1/Σ applied to the D outputs of each row instead of to its keys
    weights_times_rows<D>(s.data(), lp, nr, v.at(k0, h), v.row, nk, dst);
    for (int r = 0; r < nr; ++r)
      for (int c = 0; c < D; c += 16)
        _mm512_storeu_ps(dst[r] + c, _mm512_mul_ps(_mm512_loadu_ps(dst[r] + c), _mm512_set1_ps(inv[r])));
  }
}

// Backward of one (segment, head). dk / dv rows of this segment and head are written here only.
template <int D>
OEF_AVX512 void backward_task(View go, View q, View k, View v, View out, const float* lse, int64_t lse_row, Out dq,
                              Out dk, Out dv, int64_t h, int64_t q0, int64_t nq, int64_t k0, int64_t nk, float scale) {
  const int64_t lp = (nk + 15) / 16 * 16;
  std::vector<float> kt(D * lp), vt(D * lp), p(kRows * lp), dp(kRows * lp), dk_acc(nk * D, 0.0f),
      dv_acc(nk * D, 0.0f), qs(kRows * D);
  transpose_rows<D>(k.at(k0, h), k.row, nk, lp, kt.data());
  transpose_rows<D>(v.at(k0, h), v.row, nk, lp, vt.data());
  for (int64_t i = 0; i < nq; i += kRows) {
    const int nr = static_cast<int>(std::min<int64_t>(kRows, nq - i));
    const float* qr[kRows];
    const float* gr[kRows];
    const float* qsr[kRows];
    float* dqr[kRows];
    float delta[kRows];
    for (int r = 0; r < nr; ++r) {
      const int64_t t = q0 + i + r;
      qr[r] = q.at(t, h);
      gr[r] = go.at(t, h);
      dqr[r] = dq.at(t, h);
      float d = 0.0f;  // Σ dO·O of the row
      for (int c = 0; c < D; ++c) d += gr[r][c] * out.at(t, h)[c];
      delta[r] = d;
      for (int c = 0; c < D; ++c) qs[r * D + c] = qr[r][c] * scale;
      qsr[r] = qs.data() + r * D;
    }
    rows_times_bt<D>(qr, nr, kt.data(), lp, scale, p.data());  // scores
    rows_times_bt<D>(gr, nr, vt.data(), lp, 1.0f, dp.data());  // dP = dO · Vᵀ
    for (int r = 0; r < nr; ++r) {
      float* pr = p.data() + r * lp;
      float* dpr = dp.data() + r * lp;
      const __m512 lv = _mm512_set1_ps(lse[(q0 + i + r) * lse_row + h]);
      const __m512 dv_ = _mm512_set1_ps(delta[r]);
      for (int64_t j = 0; j < lp; j += 16) {
        const __m512 e = _mm512_maskz_mov_ps(tail_mask(j, nk), exp512(_mm512_sub_ps(_mm512_loadu_ps(pr + j), lv)));
        _mm512_storeu_ps(pr + j, e);
        // dS = P ∘ (dP − δ)
        _mm512_storeu_ps(dpr + j, _mm512_mul_ps(e, _mm512_sub_ps(_mm512_loadu_ps(dpr + j), dv_)));
      }
    }
    accumulate_outer<D>(p.data(), lp, nr, gr, nk, dv_acc.data());    // dV += Pᵀ · dO
    weights_times_rows<D>(dp.data(), lp, nr, k.at(k0, h), k.row, nk, dqr);  // dQ = dS · K (× scale below)
    for (int r = 0; r < nr; ++r)
      for (int c = 0; c < D; ++c) dqr[r][c] *= scale;
    accumulate_outer<D>(dp.data(), lp, nr, qsr, nk, dk_acc.data());  // dK += dSᵀ · Q · scale
  }
  for (int64_t j = 0; j < nk; ++j)
    for (int c = 0; c < D; ++c) {
      dk.at(k0 + j, h)[c] = dk_acc[j * D + c];
      dv.at(k0 + j, h)[c] = dv_acc[j * D + c];
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

template <typename F>
void for_tasks(at::IntArrayRef q_cu, int64_t heads, const F& fn) {
  const int64_t b = static_cast<int64_t>(q_cu.size()) - 1;
  at::parallel_for(0, b * heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) fn(t / heads, t % heads);
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
  OEF_DISPATCH_D(q.size(2), for_tasks(q_cu, heads, [&](int64_t s, int64_t h) {
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> segment_attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, at::IntArrayRef q_cu, at::IntArrayRef k_cu, double scale) {
  check(q, k, v, q_cu, k_cu);
  TORCH_CHECK(available(), "segment_attention: this CPU has no AVX-512F (the op's Python wrapper falls back)");
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes() && grad_out.stride(2) == 1 &&
                  out.stride(2) == 1 && grad_out.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat,
              "segment_attention_bwd: grad_out and out must be fp32 like q");
  TORCH_CHECK(lse.is_contiguous() && lse.size(0) == q.size(0) && lse.size(1) == q.size(1),
              "segment_attention_bwd: lse must be a contiguous [Tq, H]");
  const int64_t heads = q.size(1);
  // every row is written below: by its task, or as zeros where its sample has no keys / queries
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  const View gv = view_of(grad_out), qv = view_of(q), kv = view_of(k), vv = view_of(v), ov = view_of(out);
  Out dqv = out_of(dq), dkv = out_of(dk), dvv = out_of(dv);
  const float* l = lse.data_ptr<float>();
  const float sc = static_cast<float>(scale);
#ifdef OEF_X86
  OEF_DISPATCH_D(q.size(2), for_tasks(q_cu, heads, [&](int64_t s, int64_t h) {
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
  return {dq, dk, dv};
}

}  // namespace
}  // namespace olmoearth_fast

TORCH_LIBRARY_FRAGMENT(olmoearth_fast, m) {
  m.def("segment_attention_available() -> bool", &olmoearth_fast::available);
  m.def("segment_attention_fwd(Tensor q, Tensor k, Tensor v, int[] q_cu, int[] k_cu, float scale) -> (Tensor, Tensor)");
  m.def("segment_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, int[] q_cu, "
        "int[] k_cu, float scale) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(olmoearth_fast, CPU, m) {
  m.impl("segment_attention_fwd", &olmoearth_fast::segment_attention_fwd);
  m.impl("segment_attention_bwd", &olmoearth_fast::segment_attention_bwd);
}
