// CUDA implementation of the packing ops (schemas and CPU kernels in ../packing.cpp).
//
// gather_rows / scatter_rows: one warp-group per row, 16-byte vectorised copies when the row
// size and both pointers allow it (a 768-wide bf16 row = 96 uint4 loads), no host sync.
// varlen_index / merge_index: per-sample counts (block reduce), cu_seqlens by a device cumsum,
// then ONE host sync to size the index tensor (its length is data-dependent), then a per-sample
// block scan writes the indices in original order. Call it once per step and reuse the indices
// for every pack/unpack of that step.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <torch/library.h>

#include "../packing.h"

namespace olmoearth_fast {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ bool any_kept(const bool* keep, int64_t row, int64_t S) {
  const bool* k = keep + row * S;
  for (int64_t s = 0; s < S; ++s)
    if (k[s]) return true;
  return false;
}

__global__ void count_kernel(const bool* __restrict__ keep, int64_t P, int64_t S, int64_t* __restrict__ counts) {
  using Reduce = cub::BlockReduce<int64_t, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  const int64_t b = blockIdx.x;
  int64_t c = 0;
  for (int64_t p = threadIdx.x; p < P; p += kThreads) c += any_kept(keep, b * P + p, S);
  const int64_t total = Reduce(tmp).Sum(c);
  if (threadIdx.x == 0) counts[b] = total;
}

// One block per sample; chunks of kThreads positions are scanned in order with a running offset.
__global__ void write_index_kernel(const bool* __restrict__ keep, int64_t P, int64_t S,
                                   const int32_t* __restrict__ cu_seqlens, int64_t* __restrict__ positions,
                                   int64_t* __restrict__ map) {
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ typename Scan::TempStorage tmp;
  __shared__ int64_t running;
  const int64_t b = blockIdx.x;
  if (threadIdx.x == 0) running = cu_seqlens[b];
  __syncthreads();
  for (int64_t p0 = 0; p0 < P; p0 += kThreads) {
    const int64_t p = p0 + threadIdx.x;
    const int flag = (p < P) ? any_kept(keep, b * P + p, S) : 0;
    int offset, chunk_total;
    Scan(tmp).ExclusiveSum(flag, offset, chunk_total);
    if (flag) {
      const int64_t out = running + offset;
      positions[out] = b * P + p;
      if (map != nullptr) {
        const bool* k = keep + (b * P + p) * S;
        for (int64_t s = 0; s < S; ++s) map[out * S + s] = k[s] ? (b * P + p) * S + s : -1;
      }
    }
    __syncthreads();
    if (threadIdx.x == 0) running += chunk_total;
    __syncthreads();
  }
}

template <typename V>
__global__ void gather_rows_kernel(const V* __restrict__ src, const int64_t* __restrict__ index, V* __restrict__ out,
                                   int64_t K, int64_t row_vecs) {
  for (int64_t k = blockIdx.x; k < K; k += gridDim.x) {
    const int64_t i = index[k];
    V* o = out + k * row_vecs;
    if (i >= 0) {
      const V* s = src + i * row_vecs;
      for (int64_t j = threadIdx.x; j < row_vecs; j += blockDim.x) o[j] = s[j];
    } else {
      for (int64_t j = threadIdx.x; j < row_vecs; j += blockDim.x) o[j] = V{};
    }
  }
}

template <typename V>
__global__ void scatter_rows_kernel(const V* __restrict__ src, const int64_t* __restrict__ index, V* __restrict__ out,
                                    int64_t K, int64_t row_vecs) {
  for (int64_t k = blockIdx.x; k < K; k += gridDim.x) {
    const int64_t i = index[k];
    if (i < 0) continue;
    const V* s = src + k * row_vecs;
    V* o = out + i * row_vecs;
    for (int64_t j = threadIdx.x; j < row_vecs; j += blockDim.x) o[j] = s[j];
  }
}

// Calls f(V{}, bytes / sizeof(V)) with the widest copy unit V (16, 8, 4, 2 or 1 bytes) that
// divides the row size and both base pointers.
template <typename F>
void dispatch_width(int64_t bytes, const void* a, const void* b, F&& f) {
  auto aligned = [&](int64_t w) {
    return bytes % w == 0 && reinterpret_cast<uintptr_t>(a) % w == 0 && reinterpret_cast<uintptr_t>(b) % w == 0;
  };
  if (aligned(16)) return f(uint4{}, bytes / 16);
  if (aligned(8)) return f(uint2{}, bytes / 8);
  if (aligned(4)) return f(uint32_t{}, bytes / 4);
  if (aligned(2)) return f(uint16_t{}, bytes / 2);
  return f(uint8_t{}, bytes);
}

int rows_threads(int64_t row_vecs) {
  // a warp per 32 vectors, at least one warp, at most 256 threads per row
  return static_cast<int>(std::min<int64_t>(kThreads, std::max<int64_t>(32, (row_vecs + 31) / 32 * 32)));
}

int rows_blocks(int64_t K) {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(K, int64_t(sms) * 32)));
}

void index_cuda(const at::Tensor& keep_in, int64_t B, int64_t P, int64_t S, at::Tensor& positions, at::Tensor* map,
                at::Tensor& cu_seqlens, at::Tensor& max_seqlen) {
  const c10::cuda::CUDAGuard guard(keep_in.device());
  const at::Tensor keep = keep_in.contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor counts = at::zeros({B}, keep.options().dtype(at::kLong));
  if (B > 0 && P > 0)
    count_kernel<<<B, kThreads, 0, stream>>>(keep.data_ptr<bool>(), P, S, counts.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  cu_seqlens = at::zeros({B + 1}, keep.options().dtype(at::kInt));
  cu_seqlens.narrow(0, 1, B).copy_(at::cumsum(counts, 0));
  max_seqlen = B > 0 ? counts.max().to(at::kInt) : at::zeros({}, keep.options().dtype(at::kInt));
  // The one host sync: the number of kept tokens sizes the output.
  const int64_t total = B > 0 ? cu_seqlens[B].item<int64_t>() : 0;
  positions = at::empty({total}, keep.options().dtype(at::kLong));
  int64_t* m = nullptr;
  if (map != nullptr) {
    *map = at::empty({total, S}, keep.options().dtype(at::kLong));
    m = map->data_ptr<int64_t>();
  }
  if (total > 0)
    write_index_kernel<<<B, kThreads, 0, stream>>>(keep.data_ptr<bool>(), P, S, cu_seqlens.data_ptr<int32_t>(),
                                                   positions.data_ptr<int64_t>(), m);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_index_cuda(const at::Tensor& keep) {
  check_keep(keep, 2, "varlen_index", "[B, N]");
  at::Tensor positions, cu_seqlens, max_seqlen;
  index_cuda(keep, keep.size(0), keep.size(1), 1, positions, nullptr, cu_seqlens, max_seqlen);
  return {positions, cu_seqlens, max_seqlen};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> merge_index_cuda(const at::Tensor& keep) {
  check_keep(keep, 3, "merge_index", "[B, P, S]");
  at::Tensor positions, map, cu_seqlens, max_seqlen;
  index_cuda(keep, keep.size(0), keep.size(1), keep.size(2), positions, &map, cu_seqlens, max_seqlen);
  return {positions, map, cu_seqlens, max_seqlen};
}

at::Tensor gather_rows_cuda(const at::Tensor& src_in, const at::Tensor& index_in) {
  check_rows(src_in, index_in, "gather_rows");
  const c10::cuda::CUDAGuard guard(src_in.device());
  const at::Tensor src = src_in.contiguous();
  const at::Tensor index = index_in.contiguous();
  const int64_t R = src.size(0), K = index.numel();
  // A 0-row source admits only index -1 (zero rows; CPU checks the values): zeros, and nothing
  // read from its (null) storage.
  if (R == 0) return at::zeros(row_shape(K, src), src.options());
  at::Tensor out = at::empty(row_shape(K, src), src.options());
  if (out.numel() == 0) return out;
  const int64_t bytes = row_bytes(src);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t* idx = index.data_ptr<int64_t>();
  // Index values are not range-checked here (that would need a host sync); CPU checks them.
  dispatch_width(bytes, src.data_ptr(), out.data_ptr(), [&](auto tag, int64_t row_vecs) {
    using V = decltype(tag);
    gather_rows_kernel<V><<<rows_blocks(K), rows_threads(row_vecs), 0, stream>>>(
        static_cast<const V*>(src.data_ptr()), idx, static_cast<V*>(out.data_ptr()), K, row_vecs);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor scatter_rows_cuda(const at::Tensor& src_in, const at::Tensor& index_in, int64_t num_rows) {
  check_rows(src_in, index_in, "scatter_rows");
  TORCH_CHECK(num_rows >= 0, "scatter_rows: argument 'num_rows' must be >= 0, got ", num_rows);
  TORCH_CHECK(src_in.size(0) == index_in.numel(), "scatter_rows: argument 'src' must have shape [K, ...] with K = ",
              index_in.numel(), " (the length of 'index'), got ", src_in.sizes());
  const c10::cuda::CUDAGuard guard(src_in.device());
  const at::Tensor src = src_in.contiguous();
  const at::Tensor index = index_in.contiguous();
  const int64_t K = index.numel();
  at::Tensor out = at::zeros(row_shape(num_rows, src), src.options());
  if (out.numel() == 0 || K == 0) return out;
  const int64_t bytes = row_bytes(out);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t* idx = index.data_ptr<int64_t>();
  dispatch_width(bytes, src.data_ptr(), out.data_ptr(), [&](auto tag, int64_t row_vecs) {
    using V = decltype(tag);
    scatter_rows_kernel<V><<<rows_blocks(K), rows_threads(row_vecs), 0, stream>>>(
        static_cast<const V*>(src.data_ptr()), idx, static_cast<V*>(out.data_ptr()), K, row_vecs);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace olmoearth_fast

TORCH_LIBRARY_IMPL(olmoearth_fast, CUDA, m) {
  m.impl("varlen_index", &olmoearth_fast::varlen_index_cuda);
  m.impl("merge_index", &olmoearth_fast::merge_index_cuda);
  m.impl("gather_rows", &olmoearth_fast::gather_rows_cuda);
  m.impl("scatter_rows", &olmoearth_fast::scatter_rows_cuda);
}
