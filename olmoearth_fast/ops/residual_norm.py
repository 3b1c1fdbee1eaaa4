"""The residual add and the LayerNorm after it, in one pass on CPU (C++ op in csrc/).

``residual_norm(x, r, weight, bias, eps, r_rows, alpha, y_rows, r_bias) -> (s, y)``:

* ``s = x + alpha·(r + r_bias)``: the branch output ``r`` plus the bias of the Linear that made
  it (``r_bias``, optional: the GEMM then runs without its bias, and the bias gradient is summed
  in the backward pass that writes r's), times the DropPath factor ``alpha`` (a host float: 1,
  0, or 1/(1 − rate) rounded to fp32), added to every row of the residual stream ``x [T, D]``,
  or with ``r_rows [R]`` (int64, distinct) to those rows only (r is ``[R, D]``: the rows of the
  samples that kept the branch);
* ``y = LayerNorm(s)`` of every row, or with ``y_rows [Ry]`` of those rows only (the next
  branch's input, for the samples that keep it).

A pre-norm block's LayerNorm always reads the stream right after a branch was added, so the
blocks carry the stream with its last branch not yet added (`model.attention.Stream`) and each
LayerNorm adds it: `residual_norm`. On CPU in fp32 (eager, AVX-512F) that is the C++ op
(``torch.ops.olmoearth_fast.residual_norm_fwd`` / ``_bwd``): one pass over the rows each way
instead of about ten separate ones. Elsewhere (CUDA, compiled blocks, whose graphs fuse them;
autocast, other dtypes, ``OLMOEARTH_FAST_KERNELS=pytorch``) `residual_norm_ref`: the PyTorch ops,
the factor's product rounded once in the branch's dtype (bf16 under autocast), as the
reference's DropPath rounds it on CUDA.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from olmoearth_fast import _C  # noqa: F401  (loads the C++ library: registers the ops)
from olmoearth_fast.ops import eager_cpu_fp32
from olmoearth_fast.ops.packing import gather_rows

_ops = torch.ops.olmoearth_fast


@functools.cache
def kernel_available() -> bool:
    """Whether this CPU runs the C++ kernel (AVX-512F)."""
    return bool(_ops.residual_norm_available())


def uses_kernel(x: Tensor) -> bool:
    """Whether a residual stream like ``x`` takes `residual_norm`'s C++ op."""
    return eager_cpu_fp32(x) and kernel_available()


class _ResidualNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, r, weight, bias, r_bias, r_rows, y_rows, alpha, eps):
        s, y, mean, rstd = _ops.residual_norm_fwd(x, r, r_bias, r_rows, alpha, weight, bias, y_rows, eps)
        ctx.save_for_backward(s, mean, rstd, weight)
        ctx.rows = (r_rows, y_rows, alpha, r.shape[0], r_bias is not None)
        ctx.set_materialize_grads(False)  # s unused downstream (a final norm): no zeros to read
        return s, y

    @staticmethod
    def backward(ctx, ds, dy):
        s, mean, rstd, weight = ctx.saved_tensors
        r_rows, y_rows, alpha, r_count, with_r_bias = ctx.rows
        if dy is None:
            dy = s.new_zeros(mean.shape[0], s.shape[1])
        dx, dr, dw, db, drb = _ops.residual_norm_bwd(None if ds is None else ds.contiguous(), dy.contiguous(), s,
                                                     mean, rstd, weight, r_rows, y_rows, alpha, r_count, with_r_bias)
        return dx, dr, dw, db, drb if with_r_bias else None, None, None, None, None


def residual_norm(x: Tensor, r: Tensor | None, weight: Tensor, bias: Tensor, eps: float,
                  r_rows: Tensor | None = None, alpha: float = 1.0, y_rows: Tensor | None = None,
                  r_bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(s, y)``: the stream ``s = x + alpha·(r + r_bias)`` (r at the rows ``r_rows``, every row
    if None; ``r_bias`` [D], the bias of the Linear that made r, or None; ``r`` None: ``s = x``)
    and ``y = layer_norm(s[y_rows])`` (every row if None), the C++ op where `uses_kernel`."""
    d = x.shape[-1]
    want_r = x.shape[0] if r_rows is None else r_rows.shape[0]
    if (x.dim() != 2 or weight.shape != (d,) or bias.shape != (d,)
            or (r is not None and (r.dim() != 2 or r.shape != (want_r, d)))
            or (r_bias is not None and (r is None or r_bias.shape != (d,)))):
        raise ValueError(f"residual_norm: x {tuple(x.shape)}, r {None if r is None else tuple(r.shape)} "
                         f"({'every row' if r_rows is None else f'{want_r} rows'}), weight {tuple(weight.shape)}, "
                         f"bias {tuple(bias.shape)}, r_bias {None if r_bias is None else tuple(r_bias.shape)} do not "
                         f"fit (x [T, D], r [T or len(r_rows), D], weight, bias [D], r_bias [D] with r, or None)")
    if (r is None or not uses_kernel(x) or r.dtype != torch.float32 or weight.dtype != torch.float32
            or bias.dtype != torch.float32 or (r_bias is not None and r_bias.dtype != torch.float32)
            or x.shape[0] == 0 or (r_rows is not None and r_rows.device != x.device)):
        return residual_norm_ref(x, r, weight, bias, eps, r_rows, alpha, y_rows, r_bias)
    return _ResidualNorm.apply(x.contiguous(), r.contiguous(), weight.contiguous(), bias.contiguous(),
                               None if r_bias is None else r_bias.contiguous(), r_rows, y_rows, float(alpha),
                               float(eps))


def residual_add(x: Tensor, r: Tensor | None, r_rows: Tensor | None = None, alpha: float = 1.0,
                 r_bias: Tensor | None = None) -> Tensor:
    """``x + alpha·(r + r_bias)`` (r at the rows ``r_rows``; ``r_bias`` None: no bias), in PyTorch
    ops, the sum in x's dtype.
    The product ``alpha·r`` in r's dtype, the factor a Python float: for a bf16 ``r`` PyTorch
    multiplies in fp32 (its opmath) and rounds once, as the reference's ``r.div(1 − rate)`` does
    on CUDA (a multiply by the fp32 reciprocal, which `model.plan.keep_factor` is)."""
    if r is None:
        return x
    if r_bias is not None:
        r = r + r_bias
    if alpha != 1.0:
        r = r * alpha
    return x + r if r_rows is None else x.index_add(0, r_rows, r.to(x.dtype))


def residual_norm_ref(x: Tensor, r: Tensor | None, weight: Tensor, bias: Tensor, eps: float,
                      r_rows: Tensor | None = None, alpha: float = 1.0, y_rows: Tensor | None = None,
                      r_bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """`residual_add`, then the rows ``y_rows`` (`ops.packing.gather_rows`), then PyTorch's LayerNorm."""
    s = residual_add(x, r, r_rows, alpha, r_bias)
    h = s if y_rows is None else gather_rows(s, y_rows)
    return s, F.layer_norm(h, h.shape[-1:], weight, bias, eps)
