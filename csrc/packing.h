// Shared declarations of the packing extension (CPU in packing.cpp, CUDA in cuda/packing.cu).
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

namespace olmoearth_fast {

// Readable argument checks: each names the op, the argument and the expected shape.
void check_keep(const at::Tensor& keep, int64_t rank, const char* op, const char* shape);
void check_rows(const at::Tensor& src, const at::Tensor& index, const char* op);
// [rows] + like.shape[1:]
std::vector<int64_t> row_shape(int64_t rows, const at::Tensor& like);
// bytes of one row of `like` (prod(like.shape[1:]) * itemsize), also when like has 0 rows
int64_t row_bytes(const at::Tensor& like);

}  // namespace olmoearth_fast
