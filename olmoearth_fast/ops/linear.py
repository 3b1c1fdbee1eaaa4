"""The transformer blocks' Linear layers on CPU in fp32: oneDNN's inner product on AMD CPUs.

``linear(x, weight, bias)`` = ``F.linear(x, weight, bias)`` (`linear_ref`). Which library runs it
on CPU in fp32 is `backend()`: ``"mkl"`` is PyTorch's Linear itself (MKL's sgemm), ``"onednn"``
runs the forward on oneDNN's inner product (``torch.ops.mkldnn._linear_pointwise``, PyTorch's
binding of oneDNN, the op Inductor's CPU backend uses for Linear layers) instead. There the input
gradient ``dX = dY·W`` runs on oneDNN's inner product too, against ``Wᵀ`` (a copy of the weight,
transposed by `ops.transpose`). The weight gradient ``dW = dYᵀ·X`` runs on MKL (`torch.mm`) where
the layer is narrow (a weight dim below `ONEDNN_WEIGHT_GRAD_MIN_DIM`: nano, tiny, small) and on
oneDNN where it is wide (base, large), with ``dYᵀ`` and ``Xᵀ`` transposed by `ops.transpose`
(`_weight_grad_on_onednn` has the measurements). ``db = Σ_rows dY``.

Why it depends on the CPU: MKL's sgemm runs AVX-512 kernels on Intel CPUs only. On the AMD EPYC
(Zen 4) CPUs this project was first benchmarked on, it takes its AVX2 code path, while oneDNN's
inner product uses AVX-512 (a 2048² matmul: ~215 against ~180 GFLOP/s). There, at fc1's shapes
(fp32, 2 threads; benchmarks/bench_linear.py) the forward GEMM alone is 1.2× (nano, tiny) to
1.3× (base) faster. In the training step (forward GEMMs timed inside it, toggled step by step),
the forward GEMMs took 0.48 against 0.51-0.53 s per tiny step. The inner product contracts over
the operands' rows only, so ``dW`` (a contraction over the tokens) needs ``dYᵀ`` and ``Xᵀ``
copied out: M·(N + K) floats moved for 2·M·N·K FLOPs, which pays only where N and K are both
large. ``dX`` needs only ``Wᵀ`` (N·K floats, the weight's size), which pays at every size: timed
per layer inside the step, with the choice toggled step by step (dX GEMM per step, MKL →
oneDNN): nano fc1 59.0 → 46.7 ms and fc2 58.7 → 49.5 ms, tiny fc1 178.7 → 157.8 and fc2
181.6 → 156.8, small_shallow_decoder fc1 426.5 → 350.0 and fc2 429.2 → 367.4; the square
projections within ±7% either way. Linear gradients per step in all: nano 348 → 322 ms, tiny
1076 → 1024 ms, small 2505 → 2338 ms.

On an Intel Xeon (AVX-512, 2 threads), where MKL runs AVX-512 kernels too, the same toggle
gives the other answer: the exp14 step (p=4, hw_p=6, one microbatch, the choice toggled step
by step in one process, medians of 8-12 rounds) with PyTorch's Linear against the oneDNN path
took 0.874× the time at base_shallow_decoder B=4 (4.77 vs 5.35 s), 0.927× at tiny B=8 (1.39 vs
1.53 s) and 0.977× at nano B=16; keeping only the oneDNN forward gave 0.906×, 0.943×, 0.975×.
So ``auto`` picks oneDNN on AMD CPUs with AVX-512 and PyTorch's Linear everywhere else (Intel,
CPUs without AVX-512, where no choice was measured). ``OLMOEARTH_FAST_CPU_LINEAR=onednn|mkl``
forces either (tests, benchmarks/bench_linear.py).

Elsewhere (CUDA, other dtypes, autocast, inside ``torch.compile``, PyTorch built without
oneDNN, ``OLMOEARTH_FAST_KERNELS=pytorch``) it is ``F.linear``.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from olmoearth_fast.ops import cpu_model, eager_cpu_fp32
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


CPU_LINEAR_ENV = "OLMOEARTH_FAST_CPU_LINEAR"
_CPU_LINEAR_CHOICES = ("auto", "onednn", "mkl")


def backend() -> str:
    """Which library runs `linear` on CPU in fp32: ``"onednn"`` or ``"mkl"`` (PyTorch's Linear).

    ``OLMOEARTH_FAST_CPU_LINEAR``: ``auto`` (or unset) picks oneDNN on AMD CPUs with AVX-512
    (`_auto_backend`), ``onednn`` / ``mkl`` force one. Read at every call, like
    ``OLMOEARTH_FAST_KERNELS``, so a test or a benchmark can switch it.
    """
    value = os.environ.get(CPU_LINEAR_ENV, "auto").strip().lower() or "auto"
    if value not in _CPU_LINEAR_CHOICES:
        raise ValueError(f"{CPU_LINEAR_ENV}={os.environ[CPU_LINEAR_ENV]!r}: expected one of {', '.join(_CPU_LINEAR_CHOICES)}")
    return _auto_backend() if value == "auto" else value


@functools.cache
def _auto_backend() -> str:
    """oneDNN where MKL's sgemm takes its AVX2 path but the CPU has AVX-512 (AMD), else MKL."""
    vendor, _ = cpu_model()
    amd_avx512 = vendor == "AuthenticAMD" and torch.backends.cpu.get_cpu_capability() == "AVX512"
    return "onednn" if amd_avx512 else "mkl"


def uses_kernel(x: Tensor) -> bool:
    """Whether `linear` takes oneDNN's inner product for inputs like ``x``."""
    return eager_cpu_fp32(x) and backend() == "onednn" and kernel_available()


def _inner_product(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def onednn_matmul(x: Tensor, weight: Tensor) -> Tensor:
    """``x [M, K] · weight [N, K]ᵀ`` on oneDNN's inner product whatever `backend()` picks (no
    autograd; ``F.linear`` where PyTorch lacks the op): the second GEMM of the matmul peak's probe
    (`perf.measure_cpu_peak`)."""
    return _inner_product(x, weight, None) if kernel_available() else F.linear(x, weight)


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
