// A 2-D fp32 transpose on CPU: transpose(x[R, C]) -> xᵀ [C, R], contiguous (x's rows may be
// strided; its last dim must be contiguous). Values are copied, never computed: bit-identical
// to x.t().contiguous().
//
// Why: the Linear gradients run on oneDNN's inner product (olmoearth_fast/ops/linear.py), which
// contracts over its operands' rows: dX = dY·W takes Wᵀ, and the wide layers' dW = dYᵀ·X both
// operands transposed. PyTorch's strided copy behind x.t().contiguous() moves 3-7 GB/s on the
// AVX-512 VMs (10 ms for a [2048, 3072] matrix, against 1.4 ms for a plain copy of it), which ate
// most of what the faster GEMM saves. Here each
// 16×16 block goes through registers (the shuffle transpose of avx512_math.h): 16 rows' cache
// lines in, 16 whole cache lines out, parallel over bands of 64 input rows; where the output's
// rows are whole cache lines, the stores stream past the caches (2.4-4.7× the strided copy at
// the Linear layers' shapes, benchmarks/bench_transpose.py; 3.1-3.8× with plain stores).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "avx512_math.h"

namespace olmoearth_fast {
namespace {

bool available() { return cpu_has_avx512(); }

#ifdef OEF_X86
// input rows per task: per 16 columns, each output row gets 256 contiguous bytes
constexpr int64_t kBandRows = 64;

// out[c][r] = x[r][c] for the rows r0..r0+64 (fewer at the end) and every column, 16 columns
// at a time: the band's four 16×16 blocks of those columns, each through registers.
OEF_AVX512 void transpose_band(const float* x, int64_t ld, int64_t rows, int64_t cols, int64_t r0, float* out) {
  const int64_t r_end = std::min(rows, r0 + kBandRows);
  // whole 64-byte lines of the output (its rows a multiple of 16 floats, the buffer 64-byte
  // aligned): stored around the caches (the output's rows lie rows·4 bytes apart, often a
  // multiple of 4 KiB, and 16 of them would contend for one cache set)
  const bool stream = rows % 16 == 0 && reinterpret_cast<uintptr_t>(out) % 64 == 0;
  for (int64_t c0 = 0; c0 < cols; c0 += 16) {
    const __mmask16 col_mask = tail_mask(c0, cols);
    const int64_t nc = std::min<int64_t>(16, cols - c0);
    for (int64_t b = r0; b < r_end; b += 16) {
      const int64_t nr = std::min<int64_t>(16, r_end - b);
      const __mmask16 row_mask = tail_mask(0, nr);
      __m512 r[16];
      for (int i = 0; i < 16; ++i)
        r[i] = i < nr ? _mm512_maskz_loadu_ps(col_mask, x + (b + i) * ld + c0) : _mm512_setzero_ps();
      transpose16(r);
      if (stream && nr == 16) {
        for (int i = 0; i < nc; ++i) _mm512_stream_ps(out + (c0 + i) * rows + b, r[i]);
      } else {
        for (int i = 0; i < nc; ++i) _mm512_mask_storeu_ps(out + (c0 + i) * rows + b, row_mask, r[i]);
      }
    }
  }
}
#endif

at::Tensor transpose(const at::Tensor& x) {
  TORCH_CHECK(available(), "transpose: this CPU has no AVX-512F (the op's Python wrapper falls back)");
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2,
              "transpose: expected a 2-D fp32 CPU tensor, got ", x.scalar_type(), " ", x.sizes(), " on ", x.device());
  TORCH_CHECK(x.size(1) <= 1 || x.stride(1) == 1, "transpose: x's last dim must be contiguous, strides ", x.strides());
  const int64_t rows = x.size(0), cols = x.size(1);
  at::Tensor out = at::empty({cols, rows}, x.options());
#ifdef OEF_X86
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t ld = x.stride(0), bands = (rows + kBandRows - 1) / kBandRows;
  at::parallel_for(0, bands, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) transpose_band(xp, ld, rows, cols, b * kBandRows, op);
    _mm_sfence();  // the streamed stores are visible before the op returns
  });
#endif
  return out;
}

}  // namespace
}  // namespace olmoearth_fast

TORCH_LIBRARY_FRAGMENT(olmoearth_fast, m) {
  m.def("transpose_available() -> bool", &olmoearth_fast::available);
  m.def("transpose(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(olmoearth_fast, CPU, m) { m.impl("transpose", &olmoearth_fast::transpose); }
