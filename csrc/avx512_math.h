// AVX-512 helpers shared by the CPU kernels (segment_attention.cpp, bias_gelu.cpp,
// residual_norm.cpp, resize_patches.cpp, transpose.cpp).
//
// The kernels are compiled for any x86-64 host with a target attribute (no -mavx512f for the
// whole file) and run only where `cpu_has_avx512()`; elsewhere (no AVX-512F, a non-x86 build, or
// -DOEF_NO_AVX512) the ops report themselves unavailable and their Python wrappers take the
// reference paths, or (resize_patches) the op takes its portable path.
#pragma once

#include <cstdint>

#if defined(__x86_64__) && !defined(OEF_NO_AVX512)  // -DOEF_NO_AVX512: build without the kernels
#include <immintrin.h>
#define OEF_X86 1
#define OEF_AVX512 __attribute__((target("avx512f,avx512dq,fma")))
#endif

namespace olmoearth_fast {

inline bool cpu_has_avx512() {
#ifdef OEF_X86
  return __builtin_cpu_supports("avx512f");
#else
  return false;
#endif
}

#ifdef OEF_X86
// lanes j..j+15 of a row of n floats that lie inside it (j < n)
OEF_AVX512 inline __mmask16 tail_mask(int64_t j, int64_t n) {
  return j + 16 <= n ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - j)) - 1);
}

// r[i] (16 rows of 16 floats) -> r[c] = column c: the usual three-stage shuffle transpose
// (pairs of floats, pairs of doubles, then 128-bit lanes twice).
OEF_AVX512 inline void transpose16(__m512 r[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
    u[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    u[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    u[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    u[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 4; ++j) {
      t[8 * i + j] = _mm512_shuffle_f32x4(u[8 * i + j], u[8 * i + 4 + j], 0x88);
      t[8 * i + 4 + j] = _mm512_shuffle_f32x4(u[8 * i + j], u[8 * i + 4 + j], 0xdd);
    }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88);
    r[j + 8] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0xdd);
  }
}

// e^r · 2^n for |r| <= 0.35: e^r by its degree-6 Taylor polynomial, then scalef.
OEF_AVX512 inline __m512 exp_reduced(__m512 r, __m512 n) {
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// e^x for x <= 0 (e.g. scores minus their max): exp2 split (n = round(x·log2 e), r = x − n·ln 2
// in two steps), then exp_reduced.
OEF_AVX512 inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  return exp_reduced(r, n);
}

// 2^t for finite t <= 0 (underflows to 0 for very negative t: no clamp): n = round(t), then
// 2^(t − n) = e^r at r = (t − n)·ln 2, |r| <= 0.35, by exp_reduced.
OEF_AVX512 inline __m512 exp2_512(__m512 t) {
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return exp_reduced(_mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.693147180559945309f)), n);
}
#endif

}  // namespace olmoearth_fast
