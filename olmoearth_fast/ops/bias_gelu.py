"""The MLP's bias + exact GELU on CPU (C++ op in csrc/bias_gelu.cpp).

``bias_gelu(h, bias)`` = ``F.gelu(h + bias)`` (`bias_gelu_ref`), where ``h = x · W1ᵀ`` is fc1's
GEMM without its bias. The C++ op adds the bias inside the GELU pass, and its backward writes
``dh = grad · gelu'(h + bias)`` and sums the bias gradient in the same pass: two passes over the
hidden activations per step where PyTorch's ``gelu(addmm(...))`` makes four (the bias in the
GEMM, GELU, gelu_backward, the bias gradient's column sum). fp32, CPUs with AVX-512F, outside
``torch.compile`` and autocast; elsewhere (CUDA, other dtypes, ``OLMOEARTH_FAST_KERNELS=pytorch``)
`model.attention.Mlp` keeps PyTorch's Linear and GELU.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from olmoearth_fast import _C  # noqa: F401  (loads the C++ library: registers the ops)
from olmoearth_fast.ops import eager_cpu_fp32

_ops = torch.ops.olmoearth_fast


@functools.cache
def kernel_available() -> bool:
    """Whether this CPU runs the C++ kernel (AVX-512F)."""
    return bool(_ops.bias_gelu_available())


def uses_kernel(x: Tensor) -> bool:
    """Whether an MLP input like ``x`` takes `bias_gelu`'s C++ op."""
    return eager_cpu_fp32(x) and kernel_available()


class _BiasGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, bias):
        ctx.save_for_backward(h, bias)
        return _ops.bias_gelu_fwd(h, bias)

    @staticmethod
    def backward(ctx, grad):
        h, bias = ctx.saved_tensors
        dh, dbias = _ops.bias_gelu_bwd(grad.contiguous(), h, bias)
        return dh, dbias


def bias_gelu(h: Tensor, bias: Tensor) -> Tensor:
    """``gelu(h + bias)`` for ``h [..., N]``, ``bias [N]`` (the C++ op where `uses_kernel`)."""
    if not uses_kernel(h) or bias.dtype != torch.float32 or h.numel() == 0:
        return bias_gelu_ref(h, bias)
    if bias.shape != h.shape[-1:]:
        raise ValueError(f"bias_gelu: bias {tuple(bias.shape)} does not match h {tuple(h.shape)}")
    h2 = h.reshape(-1, h.shape[-1]).contiguous()
    return _BiasGelu.apply(h2, bias.contiguous()).view(h.shape)


def bias_gelu_ref(h: Tensor, bias: Tensor) -> Tensor:
    """PyTorch's exact GELU of ``h + bias``."""
    return F.gelu(h + bias)
