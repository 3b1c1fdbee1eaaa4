// Variable-length token packing for olmoearth_fast: schemas, input checks, CPU kernels.
//
// Four ops, one contract (the CUDA file registers the same schemas):
//   varlen_index(keep bool[B,N])   -> (indices i64[total], cu_seqlens i32[B+1], max_seqlen i32[])
//   merge_index(keep bool[B,P,S])  -> (positions i64[M], map i64[M,S], cu_seqlens i32[B+1],
//                                      max_seqlen i32[])
//   gather_rows(src[R,...], index i64[K])            -> out[K,...], out[k] = src[index[k]] (0 if -1);
//                                                       R = 0 admits only -1: K zero rows
//   scatter_rows(src[K,...], index i64[K], int R)    -> out[R,...], out[index[k]] = src[k], 0 elsewhere
//
// Indices are flat row numbers (b*N + n, or b*P*S + p*S + s for the merge map), sample-major
// and in original order, so pack = gather_rows(x.view(B*N, F), indices) and
// unpack = scatter_rows(packed, indices, B*N). The index maps are injective, so gather_rows and
// scatter_rows are each other's backward (registered in olmoearth_fast/ops/packing.py).
//
// Row copies are dtype-agnostic memcpy's of F*itemsize bytes: one kernel serves fp32/bf16/fp16
// and the integer dtypes, and a 768-wide bf16 row is a single 1.5 KB copy.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <cstring>

#include "packing.h"

namespace olmoearth_fast {

// ---------------------------------------------------------------------------------------------
// Input checks (shared with the CUDA implementation through packing.h)

void check_keep(const at::Tensor& keep, int64_t rank, const char* op, const char* shape) {
  TORCH_CHECK(keep.scalar_type() == at::kBool, op, ": argument 'keep' must be a bool tensor of shape ",
              shape, ", got dtype ", keep.scalar_type());
  TORCH_CHECK(keep.dim() == rank, op, ": argument 'keep' must have shape ", shape, " (", rank,
              " dims), got ", keep.sizes());
}

void check_rows(const at::Tensor& src, const at::Tensor& index, const char* op) {
  TORCH_CHECK(src.dim() >= 1, op, ": argument 'src' must have shape [rows, ...] (at least 1 dim), got a 0-d tensor");
  TORCH_CHECK(index.scalar_type() == at::kLong, op, ": argument 'index' must be int64 of shape [K], got dtype ",
              index.scalar_type());
  TORCH_CHECK(index.dim() == 1, op, ": argument 'index' must have shape [K] (1 dim), got ", index.sizes());
  TORCH_CHECK(src.device() == index.device(), op, ": arguments 'src' and 'index' must be on the same device, got ",
              src.device(), " and ", index.device());
}

std::vector<int64_t> row_shape(int64_t rows, const at::Tensor& like) {
  std::vector<int64_t> shape{rows};
  for (int64_t d = 1; d < like.dim(); ++d) shape.push_back(like.size(d));
  return shape;
}

int64_t row_bytes(const at::Tensor& like) {
  // From the row shape, not numel / rows: a 0-row tensor still has rows of this size (numel / 1
  // = 0 gave 0-byte copies, i.e. gather_rows of a 0-row source returned uninitialised memory).
  int64_t elems = 1;
  for (int64_t d = 1; d < like.dim(); ++d) elems *= like.size(d);
  return elems * static_cast<int64_t>(like.element_size());
}

// ---------------------------------------------------------------------------------------------
// CPU kernels

namespace {

// Shared by varlen_index (S = 1) and merge_index: a position is kept if any of its S flags is.
// Pass 1 counts kept positions per sample (parallel over samples); a serial B-long prefix sum
// gives cu_seqlens; pass 2 writes positions (and the S-wide map) per sample in parallel.
void index_cpu(const at::Tensor& keep_in, int64_t B, int64_t P, int64_t S, at::Tensor& positions,
               at::Tensor* map, at::Tensor& cu_seqlens, at::Tensor& max_seqlen) {
  const at::Tensor keep = keep_in.contiguous();
  const bool* k = keep.data_ptr<bool>();
  auto any_kept = [&](int64_t b, int64_t p) {
    const bool* row = k + (b * P + p) * S;
    for (int64_t s = 0; s < S; ++s)
      if (row[s]) return true;
    return false;
  };
  std::vector<int64_t> counts(B, 0);
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t c = 0;
      for (int64_t p = 0; p < P; ++p) c += any_kept(b, p);
      counts[b] = c;
    }
  });
  cu_seqlens = at::empty({B + 1}, keep.options().dtype(at::kInt));
  int32_t* cu = cu_seqlens.data_ptr<int32_t>();
  int64_t total = 0, longest = 0;
  cu[0] = 0;
  for (int64_t b = 0; b < B; ++b) {
    total += counts[b];
    longest = std::max(longest, counts[b]);
    cu[b + 1] = static_cast<int32_t>(total);
  }
  TORCH_CHECK(total <= INT32_MAX, "varlen index: more than 2^31 kept tokens do not fit int32 cu_seqlens");
  positions = at::empty({total}, keep.options().dtype(at::kLong));
  int64_t* pos = positions.data_ptr<int64_t>();
  int64_t* m = nullptr;
  if (map != nullptr) {
    *map = at::empty({total, S}, keep.options().dtype(at::kLong));
    m = map->data_ptr<int64_t>();
  }
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t out = cu[b];
      for (int64_t p = 0; p < P; ++p) {
        if (!any_kept(b, p)) continue;
        pos[out] = b * P + p;
        if (m != nullptr) {
          const bool* row = k + (b * P + p) * S;
          for (int64_t s = 0; s < S; ++s) m[out * S + s] = row[s] ? (b * P + p) * S + s : -1;
        }
        ++out;
      }
    }
  });
  max_seqlen = at::scalar_tensor(static_cast<int32_t>(longest), keep.options().dtype(at::kInt));
}

void check_index_values_cpu(const at::Tensor& index, int64_t rows, const char* op, const char* what) {
  const int64_t* idx = index.data_ptr<int64_t>();
  const int64_t K = index.numel();
  for (int64_t i = 0; i < K; ++i)
    TORCH_CHECK(idx[i] >= -1 && idx[i] < rows, op, ": index[", i, "] = ", idx[i], " is out of range for ", what,
                " with ", rows, " rows (expected -1 or 0 <= index < ", rows, ")");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_index_cpu(const at::Tensor& keep) {
  check_keep(keep, 2, "varlen_index", "[B, N]");
  at::Tensor positions, cu_seqlens, max_seqlen;
  index_cpu(keep, keep.size(0), keep.size(1), 1, positions, nullptr, cu_seqlens, max_seqlen);
  return {positions, cu_seqlens, max_seqlen};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> merge_index_cpu(const at::Tensor& keep) {
  check_keep(keep, 3, "merge_index", "[B, P, S]");
  at::Tensor positions, map, cu_seqlens, max_seqlen;
  index_cpu(keep, keep.size(0), keep.size(1), keep.size(2), positions, &map, cu_seqlens, max_seqlen);
  return {positions, map, cu_seqlens, max_seqlen};
}

at::Tensor gather_rows_cpu(const at::Tensor& src_in, const at::Tensor& index_in) {
  check_rows(src_in, index_in, "gather_rows");
  const at::Tensor src = src_in.contiguous();
  const at::Tensor index = index_in.contiguous();
  const int64_t R = src.size(0), K = index.numel();
  check_index_values_cpu(index, R, "gather_rows", "argument 'src'");
  at::Tensor out = at::empty(row_shape(K, src), src.options());
  if (out.numel() == 0) return out;
  const int64_t bytes = row_bytes(src);
  const char* s = static_cast<const char*>(src.data_ptr());
  char* o = static_cast<char*>(out.data_ptr());
  const int64_t* idx = index.data_ptr<int64_t>();
  // grain: ~64 KB of copying per task so small batches stay on one thread
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(bytes, 1));
  at::parallel_for(0, K, grain, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      if (idx[k] >= 0)
        std::memcpy(o + k * bytes, s + idx[k] * bytes, bytes);
      else
        std::memset(o + k * bytes, 0, bytes);
    }
  });
  return out;
}

at::Tensor scatter_rows_cpu(const at::Tensor& src_in, const at::Tensor& index_in, int64_t num_rows) {
  check_rows(src_in, index_in, "scatter_rows");
  TORCH_CHECK(num_rows >= 0, "scatter_rows: argument 'num_rows' must be >= 0, got ", num_rows);
  TORCH_CHECK(src_in.size(0) == index_in.numel(), "scatter_rows: argument 'src' must have shape [K, ...] with K = ",
              index_in.numel(), " (the length of 'index'), got ", src_in.sizes());
  const at::Tensor src = src_in.contiguous();
  const at::Tensor index = index_in.contiguous();
  check_index_values_cpu(index, num_rows, "scatter_rows", "the output");
  const int64_t K = index.numel();
  // One pass over the output: each row is written once, either copied or zeroed. Zero-filling
  // first and then scattering writes the kept rows twice (1.5x the bytes at keep ratio 0.5).
  at::Tensor out = at::empty(row_shape(num_rows, src), src.options());
  if (out.numel() == 0) return out;
  const int64_t bytes = row_bytes(out);
  std::vector<int64_t> source(num_rows, -1);
  const int64_t* idx = index.data_ptr<int64_t>();
  for (int64_t k = 0; k < K; ++k)
    if (idx[k] >= 0) source[idx[k]] = k;
  const char* s = static_cast<const char*>(src.data_ptr());
  char* o = static_cast<char*>(out.data_ptr());
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(bytes, 1));
  at::parallel_for(0, num_rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      if (source[r] >= 0)
        std::memcpy(o + r * bytes, s + source[r] * bytes, bytes);
      else
        std::memset(o + r * bytes, 0, bytes);
    }
  });
  return out;
}

}  // namespace olmoearth_fast

TORCH_LIBRARY(olmoearth_fast, m) {
  m.def("varlen_index(Tensor keep) -> (Tensor indices, Tensor cu_seqlens, Tensor max_seqlen)");
  m.def("merge_index(Tensor keep) -> (Tensor positions, Tensor map, Tensor cu_seqlens, Tensor max_seqlen)");
  m.def("gather_rows(Tensor src, Tensor index) -> Tensor");
  m.def("scatter_rows(Tensor src, Tensor index, SymInt num_rows) -> Tensor");
}

TORCH_LIBRARY_IMPL(olmoearth_fast, CPU, m) {
  m.impl("varlen_index", &olmoearth_fast::varlen_index_cpu);
  m.impl("merge_index", &olmoearth_fast::merge_index_cpu);
  m.impl("gather_rows", &olmoearth_fast::gather_rows_cpu);
  m.impl("scatter_rows", &olmoearth_fast::scatter_rows_cpu);
}

// Importing olmoearth_fast._C runs the static registrations above; the module itself only
// reports how it was built.
PYBIND11_MODULE(_C, module) {
#ifdef OLMOEARTH_FAST_WITH_CUDA
  module.attr("with_cuda") = true;
#else
  module.attr("with_cuda") = false;
#endif
}
