// The residual add and the pre-norm LayerNorm after it, on CPU: one pass over the rows forward,
// one backward.
//
//   residual_norm_fwd(x[T,D], r[R,D], r_bias[D]?, r_rows[R]?, alpha, weight[D], bias[D], y_rows[Ry]?, eps)
//       -> (s[T,D], y[Ry,D], mean[Ry], rstd[Ry])
//     s = x with alpha·(r[j] + r_bias) added to row r_rows[j] (to every row, R = T, without
//     r_rows), y[k] = LayerNorm(s[y_rows[k]]) (of every row, Ry = T, without y_rows);
//   residual_norm_bwd(ds[T,D]?, dy[Ry,D], s, mean, rstd, weight, r_rows?, y_rows?, alpha, R, with_r_bias)
//       -> (dx[T,D], dr[R,D], dweight[D], dbias[D], dr_bias[D])
//     dx = ds + the LayerNorm's input gradient at the rows y_rows, dr[j] = alpha·dx[r_rows[j]]
//     (dr is dx, the same tensor, for a plain add: every row, alpha 1), dr_bias = Σ_j dr[j] (an
//     empty tensor without with_r_bias).
//
// fp32, contiguous rows, any D. Row indices distinct, in [0, T). The add is r + r_bias rounded,
// times alpha rounded, then added (no FMA): the bits of PyTorch's `x + (r + r_bias) * alpha` /
// `x.index_add(0, rows, (r + r_bias) * alpha)`. mean and variance are two passes over the row
// (held in L1); rstd = 1/√(var + eps).
//
// r_bias is the bias of the Linear that made r (the attention's output projection, the MLP's
// fc2): added here, its GEMM runs without one (MKL's beta = 0 kernel instead of a pass that
// fills the output with the bias first), and its gradient is summed here from dr, in the pass
// that writes dr, instead of in a column sum over dr afterwards.
//
// Why: in a pre-norm transformer every LayerNorm but the first reads the residual stream right
// after a branch was added to it. As separate PyTorch ops (the residual add or the DropPath
// index_add, the gather of the kept samples' rows, LayerNorm; backward: LayerNorm's backward,
// the scatter back, the gradient sum with the residual, the DropPath factor) that is about ten
// passes over [T, D] forward and backward; here it is one each way, and two ops instead of ten.
// The weight and bias gradients are summed per block of rows, added in block order: the same
// bits for any thread count.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "avx512_math.h"

namespace olmoearth_fast {
namespace {

constexpr int64_t kBlockRows = 32;  // rows per task, and per partial sum of the weight gradients

#ifdef OEF_X86

// s = x (+ alpha·(r + rb)); returns Σ s over the row
OEF_AVX512 float add_row(const float* x, const float* r, const float* rb, float alpha, float* s, int64_t d) {
  const __m512 a = _mm512_set1_ps(alpha);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t c = 0; c < d; c += 16) {
    const __mmask16 m = tail_mask(c, d);
    __m512 v = _mm512_maskz_loadu_ps(m, x + c);
    if (r != nullptr) {
      __m512 t = _mm512_maskz_loadu_ps(m, r + c);
      if (rb != nullptr) t = _mm512_add_ps(t, _mm512_maskz_loadu_ps(m, rb + c));
      // the product rounded before the add (an explicit rounding mode: never contracted into an FMA)
      v = _mm512_add_ps(v, _mm512_mul_round_ps(t, a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
    _mm512_mask_storeu_ps(s + c, m, v);
    sum = _mm512_add_ps(sum, v);
  }
  return _mm512_reduce_add_ps(sum);
}

// y = (s − mean)·rstd·w + b; stores mean and rstd
OEF_AVX512 void norm_row(const float* s, float sum, const float* w, const float* b, float eps, float* y, float* mean,
                         float* rstd, int64_t d) {
  const float mu = sum / static_cast<float>(d);
  const __m512 mv = _mm512_set1_ps(mu);
  __m512 sq = _mm512_setzero_ps();
  for (int64_t c = 0; c < d; c += 16) {
    const __mmask16 m = tail_mask(c, d);
    const __m512 v = _mm512_maskz_sub_ps(m, _mm512_maskz_loadu_ps(m, s + c), mv);
    sq = _mm512_fmadd_ps(v, v, sq);
  }
  const float rs = 1.0f / std::sqrt(_mm512_reduce_add_ps(sq) / static_cast<float>(d) + eps);
  const __m512 rv = _mm512_set1_ps(rs);
  for (int64_t c = 0; c < d; c += 16) {
    const __mmask16 m = tail_mask(c, d);
    const __m512 xh = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + c), mv), rv);
    _mm512_mask_storeu_ps(y + c, m, _mm512_fmadd_ps(xh, _mm512_maskz_loadu_ps(m, w + c), _mm512_maskz_loadu_ps(m, b + c)));
  }
  *mean = mu;
  *rstd = rs;
}

// g = ds (or 0) + the LayerNorm's input gradient of the row (if dy): rstd·(dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂)),
// x̂ = (s − mean)·rstd, dx̂ = dy·w; dw += dy·x̂, db += dy. dx = g, dr = alpha·g (if dr), prb += alpha·g
// (if prb: a row that r adds to).
OEF_AVX512 void backward_row(const float* ds, const float* dy, const float* s, float mean, float rstd, const float* w,
                             float* dx, float* dr, float alpha, float* pw, float* pb, float* prb, int64_t d) {
  const __m512 mv = _mm512_set1_ps(mean), rv = _mm512_set1_ps(rstd);
  __m512 c1 = _mm512_setzero_ps(), c2 = _mm512_setzero_ps();
  if (dy != nullptr) {
    for (int64_t c = 0; c < d; c += 16) {
      const __mmask16 m = tail_mask(c, d);
      const __m512 xh = _mm512_maskz_mul_ps(m, _mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + c), mv), rv);
      const __m512 g = _mm512_maskz_loadu_ps(m, dy + c);
      const __m512 gh = _mm512_mul_ps(g, _mm512_maskz_loadu_ps(m, w + c));
      c1 = _mm512_add_ps(c1, gh);
      c2 = _mm512_fmadd_ps(gh, xh, c2);
      _mm512_mask_storeu_ps(pw + c, m, _mm512_fmadd_ps(g, xh, _mm512_maskz_loadu_ps(m, pw + c)));
      _mm512_mask_storeu_ps(pb + c, m, _mm512_add_ps(g, _mm512_maskz_loadu_ps(m, pb + c)));
    }
  }
  const float inv_d = 1.0f / static_cast<float>(d);
  const __m512 a1 = _mm512_set1_ps(_mm512_reduce_add_ps(c1) * inv_d), a2 = _mm512_set1_ps(_mm512_reduce_add_ps(c2) * inv_d);
  const __m512 al = _mm512_set1_ps(alpha);
  for (int64_t c = 0; c < d; c += 16) {
    const __mmask16 m = tail_mask(c, d);
    __m512 g = ds != nullptr ? _mm512_maskz_loadu_ps(m, ds + c) : _mm512_setzero_ps();
    if (dy != nullptr) {
      const __m512 xh = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + c), mv), rv);
      const __m512 gh = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, dy + c), _mm512_maskz_loadu_ps(m, w + c));
      // rstd·(dx̂ − a1 − x̂·a2)
      const __m512 t = _mm512_sub_ps(_mm512_sub_ps(gh, a1), _mm512_mul_ps(xh, a2));
      g = _mm512_add_ps(g, _mm512_mul_ps(t, rv));
    }
    _mm512_mask_storeu_ps(dx + c, m, g);
    if (dr != nullptr || prb != nullptr) {
      const __m512 gr = _mm512_mul_ps(g, al);
      if (dr != nullptr) _mm512_mask_storeu_ps(dr + c, m, gr);
      if (prb != nullptr) _mm512_mask_storeu_ps(prb + c, m, _mm512_add_ps(gr, _mm512_maskz_loadu_ps(m, prb + c)));
    }
  }
}

#endif  // OEF_X86

bool available() { return cpu_has_avx512(); }

void check_rows(const at::Tensor& t, int64_t rows, int64_t d, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 2 && t.is_contiguous() &&
                  t.size(0) == rows && t.size(1) == d,
              "residual_norm: ", what, " must be a contiguous fp32 CPU tensor [", rows, ", ", d, "], got ",
              t.scalar_type(), " ", t.sizes());
}

// row -> its position in `rows` (-1 where absent); identity without `rows` (count must be total)
std::vector<int64_t> position_of(const std::optional<at::Tensor>& rows, int64_t total, int64_t count,
                                 const char* what) {
  std::vector<int64_t> pos(static_cast<size_t>(total), rows ? -1 : 0);
  if (!rows) {
    TORCH_CHECK(count == total, "residual_norm: without ", what, " the rows must be all ", total, ", got ", count);
    for (int64_t t = 0; t < total; ++t) pos[t] = t;
    return pos;
  }
  TORCH_CHECK(rows->device().is_cpu() && rows->scalar_type() == at::kLong && rows->dim() == 1 &&
                  rows->size(0) == count,
              "residual_norm: ", what, " must be an int64 CPU tensor [", count, "], got ", rows->scalar_type(), " ",
              rows->sizes());
  const at::Tensor c = rows->contiguous();
  const int64_t* p = c.data_ptr<int64_t>();
  for (int64_t j = 0; j < count; ++j) {
    TORCH_CHECK(p[j] >= 0 && p[j] < total && pos[p[j]] < 0, "residual_norm: ", what,
                " must hold distinct rows in [0, ", total, "), got ", p[j], " at ", j);
    pos[p[j]] = j;
  }
  return pos;
}

void check_norm(const at::Tensor& weight, int64_t d, const char* what = "the LayerNorm's weight and bias") {
  TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == at::kFloat && weight.dim() == 1 &&
                  weight.size(0) == d && weight.is_contiguous(),
              "residual_norm: ", what, " must be contiguous fp32 [", d, "], got ", weight.scalar_type(), " ",
              weight.sizes());
  TORCH_CHECK(available(), "residual_norm: this CPU has no AVX-512F (the op's Python wrapper falls back)");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> residual_norm_fwd(
    const at::Tensor& x, const at::Tensor& r, const std::optional<at::Tensor>& r_bias,
    const std::optional<at::Tensor>& r_rows, double alpha, const at::Tensor& weight, const at::Tensor& bias,
    const std::optional<at::Tensor>& y_rows, double eps) {
  TORCH_CHECK(x.dim() == 2, "residual_norm: x must be [T, D], got ", x.sizes());
  const int64_t total = x.size(0), d = x.size(1);
  check_rows(x, total, d, "x");
  check_rows(r, r.dim() == 2 ? r.size(0) : -1, d, "r");
  check_norm(weight, d);
  check_norm(bias, d);
  if (r_bias) check_norm(*r_bias, d, "r_bias");
  const int64_t ny = y_rows ? y_rows->numel() : total;
  const std::vector<int64_t> r_pos = position_of(r_rows, total, r.size(0), "r_rows");
  const std::vector<int64_t> y_pos = position_of(y_rows, total, ny, "y_rows");
  at::Tensor s = at::empty_like(x);
  at::Tensor y = at::empty({ny, d}, x.options());
  at::Tensor mean = at::empty({ny}, x.options());
  at::Tensor rstd = at::empty({ny}, x.options());
#ifdef OEF_X86
  const float *xp = x.data_ptr<float>(), *rp = r.data_ptr<float>(), *wp = weight.data_ptr<float>(),
              *bp = bias.data_ptr<float>(), *rbp = r_bias ? r_bias->data_ptr<float>() : nullptr;
  float *sp = s.data_ptr<float>(), *yp = y.data_ptr<float>(), *mp = mean.data_ptr<float>(),
        *vp = rstd.data_ptr<float>();
  const float a = static_cast<float>(alpha), e = static_cast<float>(eps);
  at::parallel_for(0, total, kBlockRows, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t j = r_pos[t], k = y_pos[t];
      const float sum = add_row(xp + t * d, j >= 0 ? rp + j * d : nullptr, rbp, a, sp + t * d, d);
      if (k >= 0) norm_row(sp + t * d, sum, wp, bp, e, yp + k * d, mp + k, vp + k, d);
    }
  });
#endif
  return {s, y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> residual_norm_bwd(
    const std::optional<at::Tensor>& ds, const at::Tensor& dy, const at::Tensor& s, const at::Tensor& mean,
    const at::Tensor& rstd, const at::Tensor& weight, const std::optional<at::Tensor>& r_rows,
    const std::optional<at::Tensor>& y_rows, double alpha, int64_t r_count, bool with_r_bias) {
  TORCH_CHECK(s.dim() == 2, "residual_norm: s must be [T, D], got ", s.sizes());
  const int64_t total = s.size(0), d = s.size(1);
  check_rows(s, total, d, "s");
  if (ds) check_rows(*ds, total, d, "ds");
  const int64_t ny = y_rows ? y_rows->numel() : total;
  check_rows(dy, ny, d, "dy");
  TORCH_CHECK(mean.is_contiguous() && rstd.is_contiguous() && mean.numel() == ny && rstd.numel() == ny &&
                  mean.scalar_type() == at::kFloat && rstd.scalar_type() == at::kFloat,
              "residual_norm: mean and rstd must be contiguous fp32 [", ny, "]");
  check_norm(weight, d);
  const std::vector<int64_t> r_pos = position_of(r_rows, total, r_count, "r_rows");
  const std::vector<int64_t> y_pos = position_of(y_rows, total, ny, "y_rows");
  at::Tensor dx = at::empty_like(s);
  // a plain add (every row, alpha 1): dr is dx itself, as PyTorch's add gives both inputs one gradient
  const bool dr_is_dx = !r_rows && alpha == 1.0;
  at::Tensor dr = dr_is_dx ? dx : at::empty({r_count, d}, s.options());
  at::Tensor dw = at::zeros({d}, s.options());
  at::Tensor db = at::zeros({d}, s.options());
  at::Tensor drb = with_r_bias ? at::zeros({d}, s.options()) : at::empty({0}, s.options());
#ifdef OEF_X86
  const int64_t blocks = (total + kBlockRows - 1) / kBlockRows;
  const int64_t np = with_r_bias ? 3 : 2;  // partial sums per block: dweight, dbias (, dr_bias)
  std::vector<float> partial(static_cast<size_t>(blocks * np * d), 0.0f);
  const float* dsp = ds ? ds->data_ptr<float>() : nullptr;
  const float *dyp = dy.data_ptr<float>(), *sp = s.data_ptr<float>(), *mp = mean.data_ptr<float>(),
              *vp = rstd.data_ptr<float>(), *wp = weight.data_ptr<float>();
  float *dxp = dx.data_ptr<float>(), *drp = dr.data_ptr<float>();
  const float a = static_cast<float>(alpha);
  at::parallel_for(0, blocks, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t blk = k0; blk < k1; ++blk) {
      float* pw = partial.data() + blk * np * d;
      for (int64_t t = blk * kBlockRows; t < std::min(total, (blk + 1) * kBlockRows); ++t) {
        const int64_t j = r_pos[t], k = y_pos[t];
        backward_row(dsp != nullptr ? dsp + t * d : nullptr, k >= 0 ? dyp + k * d : nullptr, sp + t * d,
                     k >= 0 ? mp[k] : 0.0f, k >= 0 ? vp[k] : 0.0f, wp, dxp + t * d,
                     j >= 0 && !dr_is_dx ? drp + j * d : nullptr, a, pw, pw + d,
                     j >= 0 && with_r_bias ? pw + 2 * d : nullptr, d);
      }
    }
  });
  float *dwp = dw.data_ptr<float>(), *dbp = db.data_ptr<float>();
  float* drbp = with_r_bias ? drb.data_ptr<float>() : nullptr;
  for (int64_t blk = 0; blk < blocks; ++blk) {  // in block order: deterministic
    const float* pw = partial.data() + blk * np * d;
    for (int64_t c = 0; c < d; ++c) {
      dwp[c] += pw[c];
      dbp[c] += pw[d + c];
      if (drbp != nullptr) drbp[c] += pw[2 * d + c];
    }
  }
#endif
  return {dx, dr, dw, db, drb};
}

}  // namespace
}  // namespace olmoearth_fast

TORCH_LIBRARY_FRAGMENT(olmoearth_fast, m) {
  m.def("residual_norm_available() -> bool", &olmoearth_fast::available);
  m.def("residual_norm_fwd(Tensor x, Tensor r, Tensor? r_bias, Tensor? r_rows, float alpha, Tensor weight, "
        "Tensor bias, Tensor? y_rows, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("residual_norm_bwd(Tensor? ds, Tensor dy, Tensor s, Tensor mean, Tensor rstd, Tensor weight, "
        "Tensor? r_rows, Tensor? y_rows, float alpha, int r_count, bool with_r_bias) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(olmoearth_fast, CPU, m) {
  m.impl("residual_norm_fwd", &olmoearth_fast::residual_norm_fwd);
  m.impl("residual_norm_bwd", &olmoearth_fast::residual_norm_bwd);
}
