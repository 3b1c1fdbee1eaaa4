"""The transformer blocks' Linear layers on CPU in fp32: oneDNN's inner product.

``linear(x, weight, bias)`` = ``F.linear(x, weight, bias)`` (`linear_ref`). On CPU in fp32 the
forward runs oneDNN's inner product (``torch.ops.mkldnn._linear_pointwise``, PyTorch's binding of
oneDNN, the op Inductor's CPU backend uses for Linear layers) instead of MKL's sgemm. The input
gradient ``dX = dY·W`` runs on oneDNN's inner product too, against ``Wᵀ`` (a copy of the weight,
transposed by `ops.transpose`). The weight gradient ``dW = dYᵀ·X`` runs on MKL (`torch.mm`) where
the layer is narrow (a weight dim below `ONEDNN_WEIGHT_GRAD_MIN_DIM`: nano, tiny, small) and on
oneDNN where it is wide (base, large), with ``dYᵀ`` and ``Xᵀ`` transposed by `ops.transpose`
(`_weight_grad_on_onednn` has the measurements). ``db = Σ_rows dY``.

Why: on the AMD EPYC (Zen 4) CPUs this project is benchmarked on, MKL's sgemm takes its AVX2
code path, while oneDNN's inner product uses AVX-512 (a 2048² matmul: ~215 against ~180
GFLOP/s). At fc1's shapes (fp32, 2 threads; benchmarks/bench_linear.py) the forward GEMM alone
is 1.2× (nano, tiny) to 1.3× (base) faster. In the training step (forward GEMMs timed inside it,
toggled step by step), the forward GEMMs took 0.48 against 0.51-0.53 s per tiny step. The
inner product contracts over the operands' rows only, so ``dW`` (a contraction over the tokens)
needs ``dYᵀ`` and ``Xᵀ`` copied out: M·(N + K) floats moved for 2·M·N·K FLOPs, which pays only
where N and K are both large. ``dX`` needs only ``Wᵀ`` (N·K floats, the weight's size), which
pays at every size: timed per layer inside the step, with the choice toggled step by step
(dX GEMM per step, MKL → oneDNN): nano fc1 59.0 → 46.7 ms and fc2 58.7 → 49.5 ms, tiny fc1
178.7 → 157.8 and fc2 181.6 → 156.8, small_shallow_decoder fc1 426.5 → 350.0 and fc2
429.2 → 367.4; the square projections within ±7% either way. Linear gradients per step in all:
nano 348 → 322 ms, tiny 1076 → 1024 ms, small 2505 → 2338 ms.

Elsewhere (CUDA, other dtypes, autocast, inside ``torch.compile``, PyTorch built without
oneDNN, ``OLMOEARTH_FAST_KERNELS=pytorch``) it is ``F.linear``. On Intel CPUs, where MKL runs
AVX-512 kernels too, the choice has not been measured (benchmarks/bench_linear.py times it).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from olmoearth_fast.ops import eager_cpu_fp32
from olmoearth_fast.ops.transpose import kernel_available as transpose_kernel_available
from olmoearth_fast.ops.transpose import transpose


@functools.cache
def kernel_available() -> bool:
    """Whether this PyTorch has oneDNN's CPU inner product (``mkldnn._linear_pointwise``)."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    try:
        x, w = torch.ones(2, 3), torch.ones(4, 3)
        return bool(torch.equal(_inner_product(x, w, torch.zeros(4)), torch.full((2, 4), 3.0)))
    except (RuntimeError, NotImplementedError):  # pragma: no cover - a build without the CPU op
        return False


def uses_kernel(x: Tensor) -> bool:
    """Whether `linear` takes oneDNN's inner product for inputs like ``x``."""
    return eager_cpu_fp32(x) and kernel_available()


def _inner_product(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


# Both weight dims at least this: the weight gradient goes through oneDNN too
# (`_weight_grad_on_onednn`).
ONEDNN_WEIGHT_GRAD_MIN_DIM = 512


def _weight_grad_on_onednn(weight: Tensor) -> bool:
    """Whether a Linear with this ``weight [N, K]`` computes its weight gradient with oneDNN's
    inner product too, ``dW = (dYᵀ) · (Xᵀ)ᵀ``, the transposes by `ops.transpose` (``dX`` always
    does).

    The transposes move M·(N + K) floats for 2·M·N·K FLOPs of ``dW``, so they pay where N and K
    are both large. Measured in the exp14 step (Linear backwards timed inside it, toggled step by
    step): base (D = 768) 4.25-4.66 against 4.65-5.02 s of Linear backward per step, and the
    whole step 1.12× faster; small (D = 384) 2.64 against 2.57 s; tiny (D = 192) 1.11, 1.14,
    1.24 against 1.02, 1.23, 1.18 s, no gain this machine resolves: MKL there. At base, oneDNN's
    ``dW`` alone, or ``dX`` alone, gained nothing (5.02 and 4.91 against 5.02 s): the pair pays.
    """
    return min(weight.shape) >= ONEDNN_WEIGHT_GRAD_MIN_DIM and transpose_kernel_available()


class _Linear(torch.autograd.Function):
    """x [M, K] · weightᵀ [K, N] (+ bias): oneDNN forward and input gradient; the weight gradient
    on MKL, or on oneDNN where `_weight_grad_on_onednn`."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _inner_product(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        dx = _inner_product(grad, transpose(weight), None) if ctx.needs_input_grad[0] else None
        if not ctx.needs_input_grad[1]:
            dw = None
        elif _weight_grad_on_onednn(weight):
            dw = _inner_product(transpose(grad), transpose(x), None)
        else:
            dw = grad.t().mm(x)
        db = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x [..., K] · weight [N, K]ᵀ + bias [N]`` → ``[..., N]`` (oneDNN's forward where `uses_kernel`)."""
    if (not uses_kernel(x) or weight.dtype != torch.float32 or (bias is not None and bias.dtype != torch.float32)
            or x.numel() == 0 or weight.device.type != "cpu"):
        return linear_ref(x, weight, bias)
    if x.shape[-1] != weight.shape[1] or (bias is not None and bias.shape != weight.shape[:1]):
        raise ValueError(f"linear: x {tuple(x.shape)}, weight {tuple(weight.shape)} and bias "
                         f"{None if bias is None else tuple(bias.shape)} do not fit (x [..., K], weight [N, K], bias [N])")
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    out = _Linear.apply(x2, weight.contiguous(), None if bias is None else bias.contiguous())
    return out.view(*x.shape[:-1], weight.shape[0])


def linear_ref(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """PyTorch's Linear (MKL's sgemm on CPU)."""
    return F.linear(x, weight, bias)
