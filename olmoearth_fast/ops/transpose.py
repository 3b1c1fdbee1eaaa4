"""A 2-D fp32 transpose on CPU (C++ op in csrc/transpose.cpp).

``transpose(x)`` = ``x.t().contiguous()`` (`transpose_ref`), bit-identical: each 16×16 block goes
through AVX-512 registers, parallel over bands of rows, where PyTorch's strided copy moves a few
GB/s (2.4-4.7× slower at the Linear layers' shapes; benchmarks/bench_transpose.py). Used by
`ops.linear`'s gradients: ``Wᵀ`` for the input gradient at every size, and ``dYᵀ``, ``Xᵀ`` for the
weight gradient of the wide layers, which give oneDNN's inner product its operands transposed. Elsewhere
(CUDA, other dtypes, CPUs without AVX-512F, ``OLMOEARTH_FAST_KERNELS=pytorch``, rows not
contiguous) it is `transpose_ref`.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from olmoearth_fast import _C  # noqa: F401  (loads the C++ library: registers the ops)
from olmoearth_fast.ops import forced_kernels

_ops = torch.ops.olmoearth_fast


@functools.cache
def kernel_available() -> bool:
    """Whether this CPU runs the C++ kernel (AVX-512F)."""
    return bool(_ops.transpose_available())


def uses_kernel(x: Tensor) -> bool:
    """Whether `transpose` takes the C++ op for ``x``."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2
            and (x.shape[1] <= 1 or x.stride(1) == 1) and forced_kernels() != "pytorch" and kernel_available())


def transpose(x: Tensor) -> Tensor:
    """``x [R, C]`` → ``xᵀ [C, R]``, contiguous (a copy; no autograd)."""
    if x.dim() != 2:
        raise ValueError(f"transpose: expected a 2-D tensor, got shape {tuple(x.shape)}")
    return _ops.transpose(x) if uses_kernel(x) else transpose_ref(x)


def transpose_ref(x: Tensor) -> Tensor:
    """PyTorch's strided copy."""
    return x.t().contiguous()
