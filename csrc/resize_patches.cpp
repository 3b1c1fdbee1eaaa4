// The patch embedding's resize on CPU, straight into a patch-major layout (forward only: it
// resizes the data, which needs no gradient).
//
//   resize_patches(x[B,H,W,T,C_all], band[C], row_start[Ho], row_w[Ho,S], row_n[Ho],
//                  col_start[Wo], col_w[Wo,S], col_n[Wo], base, portable=False)
//       -> patches[B·T·(Ho/base)·(Wo/base), base·base·C]
//
// portable=True takes the scalar path the CPUs without AVX-512 run (for tests).
//
// Row ((b·T + t)·h + i)·w + j holds token (i, j) of image (b, t): its base×base resized pixels,
// pixel-major with the C bands innermost, column (u·base + v)·C + c. The bands are gathered from
// x by `band`. A separable 1-D resize per axis: output pixel o of an axis reads inputs
// start[o] .. start[o] + n[o] − 1 with weights w[o, 0..n−1] (olmoearth_fast/ops/resize_patches.py
// takes them from PyTorch's antialiased bicubic itself). Width first, then height, each sum in
// tap order starting from the first product, as PyTorch's CPU kernel computes it.
//
// Why: PyTorch's antialiased resize runs at ~2 ns per output value on this layout and the
// step then gathers each token's 8×8×C patch out of the NCHW image with a slow strided index.
// Here the bands ride in vectors (C ≤ 16 per vector, AVX-512 where the CPU has it), and a token
// is one contiguous row, so the step's gather is a row copy.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "avx512_math.h"

namespace olmoearth_fast {
namespace {

struct Axis {  // the 1-D resize of one axis
  const int64_t* start;
  const float* w;
  const int64_t* n;
  int64_t taps;  // S: the row length of w
  int64_t out;
};

// One image (b, t): in [H][W][C] (bands gathered), tmp [H][Wo][C], then patches.
struct Image {
  const float* in;
  float* tmp;
  int64_t H, W, C;
};

// dst[k] = Σ_s w[s] · src[s·stride + k] for k < C: the portable path (and the exact order).
inline void taps_scalar(const float* w, int64_t n, const float* src, int64_t stride, int64_t C, float* dst) {
  for (int64_t k = 0; k < C; ++k) {
    float acc = w[0] * src[k];
    for (int64_t s = 1; s < n; ++s) acc = std::fma(w[s], src[s * stride + k], acc);
    dst[k] = acc;
  }
}

#ifdef OEF_X86
OEF_AVX512 inline void taps_avx512(const float* w, int64_t n, const float* src, int64_t stride, int64_t C,
                                   float* dst) {
  for (int64_t k = 0; k < C; k += 16) {
    const __mmask16 m = tail_mask(k, C);
    __m512 acc = _mm512_mul_ps(_mm512_set1_ps(w[0]), _mm512_maskz_loadu_ps(m, src + k));
    for (int64_t s = 1; s < n; ++s)
      acc = _mm512_fmadd_ps(_mm512_set1_ps(w[s]), _mm512_maskz_loadu_ps(m, src + s * stride + k), acc);
    _mm512_mask_storeu_ps(dst + k, m, acc);
  }
}
#endif

// Inlined into the two entry points below: one compiled for AVX-512, one portable.
template <bool kAvx512>
__attribute__((always_inline)) inline void resize_image(const Image& im, const Axis& rows, const Axis& cols,
                                                        int64_t base, float* out, int64_t w_tok) {
  const int64_t C = im.C, Wo = cols.out;
  auto taps = [&](const float* w, int64_t n, const float* src, int64_t stride, float* dst) {
#ifdef OEF_X86
    if constexpr (kAvx512) return taps_avx512(w, n, src, stride, C, dst);
#endif
    taps_scalar(w, n, src, stride, C, dst);
  };
  for (int64_t y = 0; y < im.H; ++y)  // width
    for (int64_t o = 0; o < Wo; ++o)
      taps(cols.w + o * cols.taps, cols.n[o], im.in + (y * im.W + cols.start[o]) * C, C, im.tmp + (y * Wo + o) * C);
  const int64_t row_len = base * base * C;
  for (int64_t o = 0; o < rows.out; ++o) {  // height, into the patch rows
    const int64_t i = o / base, u = o % base;
    for (int64_t x = 0; x < Wo; ++x) {
      float* dst = out + (i * w_tok + x / base) * row_len + (u * base + x % base) * C;
      taps(rows.w + o * rows.taps, rows.n[o], im.tmp + (rows.start[o] * Wo + x) * C, Wo * C, dst);
    }
  }
}

#ifdef OEF_X86
OEF_AVX512 void resize_image_avx512(const Image& im, const Axis& rows, const Axis& cols, int64_t base, float* out,
                                   int64_t w_tok) {
  resize_image<true>(im, rows, cols, base, out, w_tok);
}
#endif

void resize_image_portable(const Image& im, const Axis& rows, const Axis& cols, int64_t base, float* out,
                           int64_t w_tok) {
  resize_image<false>(im, rows, cols, base, out, w_tok);
}

void check_axis(const at::Tensor& start, const at::Tensor& w, const at::Tensor& n, int64_t in, int64_t base,
                const char* name) {
  TORCH_CHECK(start.dim() == 1 && n.dim() == 1 && w.dim() == 2 && start.size(0) == w.size(0) &&
                  n.size(0) == w.size(0) && start.scalar_type() == at::kLong && n.scalar_type() == at::kLong &&
                  w.scalar_type() == at::kFloat && start.is_contiguous() && n.is_contiguous() && w.is_contiguous() &&
                  start.device().is_cpu() && w.device().is_cpu() && n.device().is_cpu(),
              "resize_patches: ", name, " taps must be contiguous CPU start[O] int64, w[O, S] fp32, n[O] int64");
  TORCH_CHECK(w.size(0) % base == 0, "resize_patches: ", name, " output size ", w.size(0),
              " is not a multiple of base=", base);
  const int64_t* s = start.data_ptr<int64_t>();
  const int64_t* k = n.data_ptr<int64_t>();
  for (int64_t o = 0; o < w.size(0); ++o)
    TORCH_CHECK(k[o] >= 1 && k[o] <= w.size(1) && s[o] >= 0 && s[o] + k[o] <= in, "resize_patches: ", name,
                " output ", o, " reads inputs ", s[o], "..", s[o] + k[o] - 1, " of ", in);
}

at::Tensor resize_patches(const at::Tensor& x, const at::Tensor& band, const at::Tensor& row_start,
                          const at::Tensor& row_w, const at::Tensor& row_n, const at::Tensor& col_start,
                          const at::Tensor& col_w, const at::Tensor& col_n, int64_t base, bool portable) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 5 && x.is_contiguous(),
              "resize_patches: x must be a contiguous fp32 CPU tensor [B, H, W, T, C_all], got ", x.sizes());
  TORCH_CHECK(band.device().is_cpu() && band.dim() == 1 && band.scalar_type() == at::kLong && band.is_contiguous() &&
                  band.numel() >= 1,
              "resize_patches: band must be a contiguous CPU int64 [C] with C >= 1");
  TORCH_CHECK(base >= 1, "resize_patches: base must be >= 1");
  const int64_t B = x.size(0), H = x.size(1), W = x.size(2), T = x.size(3), call = x.size(4), C = band.numel();
  const int64_t* bp = band.data_ptr<int64_t>();
  for (int64_t c = 0; c < C; ++c)
    TORCH_CHECK(bp[c] >= 0 && bp[c] < call, "resize_patches: band index ", bp[c], " out of range for ", call, " bands");
  check_axis(row_start, row_w, row_n, H, base, "row");
  check_axis(col_start, col_w, col_n, W, base, "column");
  const Axis rows{row_start.data_ptr<int64_t>(), row_w.data_ptr<float>(), row_n.data_ptr<int64_t>(), row_w.size(1),
                  row_w.size(0)};
  const Axis cols{col_start.data_ptr<int64_t>(), col_w.data_ptr<float>(), col_n.data_ptr<int64_t>(), col_w.size(1),
                  col_w.size(0)};
  const int64_t h = rows.out / base, w = cols.out / base;
  at::Tensor out = at::empty({B * T * h * w, base * base * C}, x.options());
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const bool avx = cpu_has_avx512() && !portable;
  at::parallel_for(0, B * T, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> in(H * W * C), tmp(H * cols.out * C);
    for (int64_t bt = begin; bt < end; ++bt) {
      const int64_t b = bt / T, t = bt % T;
      for (int64_t y = 0; y < H; ++y)
        for (int64_t xx = 0; xx < W; ++xx) {
          const float* px = xp + (((b * H + y) * W + xx) * T + t) * call;
          float* dst = in.data() + (y * W + xx) * C;
          for (int64_t c = 0; c < C; ++c) dst[c] = px[bp[c]];
        }
      const Image im{in.data(), tmp.data(), H, W, C};
      float* img_out = op + bt * h * w * base * base * C;
#ifdef OEF_X86
      if (avx) {
        resize_image_avx512(im, rows, cols, base, img_out, w);
        continue;
      }
#endif
      resize_image_portable(im, rows, cols, base, img_out, w);
    }
  });
  return out;
}

}  // namespace
}  // namespace olmoearth_fast

TORCH_LIBRARY_FRAGMENT(olmoearth_fast, m) {
  m.def("resize_patches(Tensor x, Tensor band, Tensor row_start, Tensor row_w, Tensor row_n, Tensor col_start, "
        "Tensor col_w, Tensor col_n, int base, bool portable=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(olmoearth_fast, CPU, m) { m.impl("resize_patches", &olmoearth_fast::resize_patches); }
