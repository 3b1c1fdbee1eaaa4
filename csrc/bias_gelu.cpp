// The MLP's bias + exact GELU on CPU, forward and backward, one pass over the activations each.
//
//   bias_gelu_fwd(h[M,N], bias[N])             -> gelu(h + bias)
//   bias_gelu_bwd(grad[M,N], h[M,N], bias[N])  -> (dh = grad · gelu'(h + bias), dbias = Σ_rows dh)
//
// gelu(x) = x/2 · (1 + erf(x/√2)), gelu'(x) = (1 + erf(x/√2))/2 + x · e^(−x²/2)/√(2π). fp32,
// contiguous h and grad. erf is the Abramowitz-Stegun 7.1.26 form PyTorch's own vectorised CPU
// erf uses (|error| < 1.5e-7), and e^(−x²/2) = e^(−z²) of that erf serves the derivative too.
//
// Why: after fc1 = x·W1ᵀ (a GEMM without its bias), PyTorch's path is four passes over the
// [tokens, 4·D] hidden activations: the bias in the GEMM's output, GELU, and in the backward
// gelu_backward and the bias gradient's column sum. Here the bias rides in the GELU pass, and the
// bias gradient is summed while dh is written. The column sums are per block of rows, added in
// block order: the same bits for any thread count.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "avx512_math.h"

namespace olmoearth_fast {
namespace {

constexpr int64_t kBlockRows = 64;  // rows per bias-gradient partial sum

#ifdef OEF_X86

struct Gelu {
  __m512 value, derivative;
};

// gelu(x) and, if wanted, gelu'(x) of 16 lanes.
template <bool kDerivative>
OEF_AVX512 inline Gelu gelu512(__m512 x) {
  const __m512 one = _mm512_set1_ps(1.0f), half = _mm512_set1_ps(0.5f);
  const __m512 z = _mm512_mul_ps(x, _mm512_set1_ps(0.70710678118654752f));
  const __m512 az = _mm512_abs_ps(z);
  // t = 1 / (1 + p·|z|): the 14-bit reciprocal estimate and one Newton step (relative error
  // ~1e-8, below erf's own 1.5e-7) instead of a division, whose throughput bounded the pass
  const __m512 den = _mm512_fmadd_ps(_mm512_set1_ps(0.3275911f), az, one);
  const __m512 t0 = _mm512_rcp14_ps(den);
  const __m512 t = _mm512_mul_ps(t0, _mm512_fnmadd_ps(den, t0, _mm512_set1_ps(2.0f)));
  __m512 r = _mm512_set1_ps(1.061405429f);
  r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(-1.453152027f));
  r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(1.421413741f));
  r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(-0.284496736f));
  r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(0.254829592f));
  const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(az, az)));  // e^(−z²)
  const __m512 erf_abs = _mm512_fnmadd_ps(_mm512_mul_ps(r, t), e, one);                   // erf(|z|)
  // 1 + erf(z), with erf's sign from z
  const __mmask16 neg = _mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_LT_OQ);
  const __m512 one_plus = _mm512_mask_sub_ps(_mm512_add_ps(one, erf_abs), neg, one, erf_abs);
  const __m512 cdf = _mm512_mul_ps(half, one_plus);
  Gelu g;
  g.value = _mm512_mul_ps(x, cdf);
  if constexpr (kDerivative)
    g.derivative = _mm512_fmadd_ps(_mm512_mul_ps(x, e), _mm512_set1_ps(0.39894228040143268f), cdf);
  return g;
}

OEF_AVX512 void forward_rows(const float* h, const float* b, float* out, int64_t r0, int64_t r1, int64_t n) {
  for (int64_t i = r0; i < r1; ++i) {
    const float* hi = h + i * n;
    float* oi = out + i * n;
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 m = tail_mask(j, n);
      const __m512 x = _mm512_add_ps(_mm512_maskz_loadu_ps(m, hi + j), _mm512_maskz_loadu_ps(m, b + j));
      _mm512_mask_storeu_ps(oi + j, m, gelu512<false>(x).value);
    }
  }
}

// dh of rows r0..r1 and their column sums into `partial` (n floats)
OEF_AVX512 void backward_rows(const float* g, const float* h, const float* b, float* dh, float* partial, int64_t r0,
                              int64_t r1, int64_t n) {
  std::fill(partial, partial + n, 0.0f);
  for (int64_t i = r0; i < r1; ++i) {
    const float* gi = g + i * n;
    const float* hi = h + i * n;
    float* di = dh + i * n;
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 m = tail_mask(j, n);
      const __m512 x = _mm512_add_ps(_mm512_maskz_loadu_ps(m, hi + j), _mm512_maskz_loadu_ps(m, b + j));
      const __m512 d = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, gi + j), gelu512<true>(x).derivative);
      _mm512_mask_storeu_ps(di + j, m, d);
      _mm512_mask_storeu_ps(partial + j, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, partial + j), d));
    }
  }
}

#endif  // OEF_X86

bool available() { return cpu_has_avx512(); }

void check(const at::Tensor& h, const at::Tensor& bias, const char* op) {
  TORCH_CHECK(h.device().is_cpu() && h.scalar_type() == at::kFloat && h.dim() == 2 && h.is_contiguous(), op,
              ": h must be a contiguous fp32 CPU tensor [M, N], got ", h.scalar_type(), " ", h.sizes());
  TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.dim() == 1 && bias.size(0) == h.size(1) &&
                  bias.is_contiguous(),
              op, ": bias must be a contiguous fp32 [N] with N = ", h.size(1), ", got ", bias.sizes());
  TORCH_CHECK(available(), op, ": this CPU has no AVX-512F (the op's Python wrapper falls back)");
}

at::Tensor bias_gelu_fwd(const at::Tensor& h, const at::Tensor& bias) {
  check(h, bias, "bias_gelu_fwd");
  at::Tensor out = at::empty_like(h);
#ifdef OEF_X86
  const float* hp = h.data_ptr<float>();
  const float* bp = bias.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t n = h.size(1);
  at::parallel_for(0, h.size(0), kBlockRows, [&](int64_t r0, int64_t r1) { forward_rows(hp, bp, op, r0, r1, n); });
#endif
  return out;
}

std::tuple<at::Tensor, at::Tensor> bias_gelu_bwd(const at::Tensor& grad, const at::Tensor& h, const at::Tensor& bias) {
  check(h, bias, "bias_gelu_bwd");
  TORCH_CHECK(grad.sizes() == h.sizes() && grad.scalar_type() == at::kFloat && grad.is_contiguous(),
              "bias_gelu_bwd: grad must be a contiguous fp32 tensor shaped like h ", h.sizes(), ", got ", grad.sizes());
  const int64_t rows = h.size(0), n = h.size(1);
  at::Tensor dh = at::empty_like(h);
  at::Tensor dbias = at::zeros({n}, h.options());
#ifdef OEF_X86
  const int64_t blocks = (rows + kBlockRows - 1) / kBlockRows;
  std::vector<float> partial(static_cast<size_t>(blocks * n));
  const float* gp = grad.data_ptr<float>();
  const float* hp = h.data_ptr<float>();
  const float* bp = bias.data_ptr<float>();
  float* dp = dh.data_ptr<float>();
  at::parallel_for(0, blocks, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k)
      backward_rows(gp, hp, bp, dp, partial.data() + k * n, k * kBlockRows, std::min(rows, (k + 1) * kBlockRows), n);
  });
  float* db = dbias.data_ptr<float>();
  for (int64_t k = 0; k < blocks; ++k)  // in block order: deterministic
    for (int64_t j = 0; j < n; ++j) db[j] += partial[k * n + j];
#endif
  return {dh, dbias};
}

}  // namespace
}  // namespace olmoearth_fast

TORCH_LIBRARY_FRAGMENT(olmoearth_fast, m) {
  m.def("bias_gelu_available() -> bool", &olmoearth_fast::available);
  m.def("bias_gelu_fwd(Tensor h, Tensor bias) -> Tensor");
  m.def("bias_gelu_bwd(Tensor grad, Tensor h, Tensor bias) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(olmoearth_fast, CPU, m) {
  m.impl("bias_gelu_fwd", &olmoearth_fast::bias_gelu_fwd);
  m.impl("bias_gelu_bwd", &olmoearth_fast::bias_gelu_bwd);
}
