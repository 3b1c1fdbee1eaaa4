"""Attention within each sample's segment of packed tokens, on CPU (C++ op in csrc/).

``segment_attention(q [Tq, H, d], k [Tk, H, d], v, q_cu, k_cu)`` (or q and k, v packed in one
tensor, or q, k, v packed: see `segment_attention`): the queries of sample i (rows
``q_cu[i]:q_cu[i+1]``) attend to its keys (rows ``k_cu[i]:k_cu[i+1]``), softmax(q·kᵀ/√d)·v; a
sample without keys gets zero outputs (and zero gradients), where the reference would give NaN.
``q_cu`` / ``k_cu`` are host lists of B+1 offsets.

* the C++ op (``torch.ops.olmoearth_fast.segment_attention_fwd`` / ``_bwd``,
  csrc/segment_attention.cpp): every segment and head in one call, AVX-512 register tiles,
  the backward recomputing the probabilities from the saved log-sum-exp. fp32, head dims 16,
  32, 64, 128, CPUs with AVX-512F;
* `segment_attention_ref`: PyTorch's SDPA once per segment (its CPU flash kernel), used
  elsewhere (other dtypes and head dims, no AVX-512, ``OLMOEARTH_FAST_KERNELS=pytorch``).

CUDA does not come here: `model.attention.attend` runs the varlen flash kernel there.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from olmoearth_fast import _C  # noqa: F401  (loads the C++ library: registers the ops)
from olmoearth_fast.ops import forced_kernels

_ops = torch.ops.olmoearth_fast
HEAD_DIMS = (16, 32, 64, 128)


@functools.cache
def kernel_available() -> bool:
    """Whether this CPU runs the C++ kernel (AVX-512F)."""
    return bool(_ops.segment_attention_available())


def uses_kernel(q: Tensor) -> bool:
    """Whether `segment_attention` takes the C++ kernel for queries like ``q``."""
    return (q.device.type == "cpu" and q.dtype == torch.float32 and q.shape[-1] in HEAD_DIMS
            and forced_kernels() != "pytorch" and kernel_available())


def unpack_qkv(q: Tensor, k: Tensor | None, v: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """(q, k, v) from the three tensors, from ``q`` and a packed ``k`` = kv [Tk, 2, H, d] (v None),
    or from a packed ``q`` = qkv [T, 3, H, d] (k, v None): views, no copies."""
    if k is None:
        return q.unbind(1)
    if v is None:
        return (q, *k.unbind(1))
    return q, k, v


class _SegmentAttention(torch.autograd.Function):
    """The C++ op, taking its inputs as given to `unpack_qkv`. The backward writes dq, dk, dv into
    gradients laid out like those inputs: a packed qkv (or kv) gets one packed gradient, with no
    stack copy (what autograd would add behind an ``unbind``)."""

    @staticmethod
    def forward(ctx, q_in, k_in, v_in, q_cu, k_cu, scale):
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in unpack_qkv(q_in, k_in, v_in))
        out, lse = _ops.segment_attention_fwd(q, k, v, q_cu, k_cu, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.shapes = tuple(None if t is None else t.shape for t in (q_in, k_in, v_in))  # the gradients' layout
        ctx.offsets = (q_cu, k_cu, scale)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        q_cu, k_cu, scale = ctx.offsets
        grad = grad if grad.stride(-1) == 1 else grad.contiguous()
        grads = tuple(None if shape is None else torch.empty(shape, dtype=q.dtype) for shape in ctx.shapes)
        _ops.segment_attention_bwd(grad, q, k, v, out, lse, q_cu, k_cu, scale, *unpack_qkv(*grads))
        return (*grads, None, None, None)


def segment_attention(q: Tensor, k: Tensor | None, v: Tensor | None, q_cu: list[int], k_cu: list[int]) -> Tensor:
    """Attention within each sample's segment → [Tq, H, d]. Inputs: q [Tq, H, d], k/v [Tk, H, d];
    or q and a packed kv [Tk, 2, H, d] as ``k`` (``v`` None); or a packed qkv [T, 3, H, d] as ``q``
    (``k``, ``v`` None), e.g. the unflattened output of one projection GEMM, whose gradient is then
    packed alike."""
    qq, kk, vv = unpack_qkv(q, k, v)
    if len(q_cu) != len(k_cu) or q_cu[-1] != qq.shape[0] or k_cu[-1] != kk.shape[0]:
        raise ValueError(f"segment_attention: offsets {len(q_cu)}/{len(k_cu)} entries ending at {q_cu[-1]}/{k_cu[-1]} "
                         f"do not describe q {tuple(qq.shape)} and k {tuple(kk.shape)}")
    if uses_kernel(qq) and kk.dtype == vv.dtype == torch.float32:
        return _SegmentAttention.apply(q, k, v, list(q_cu), list(k_cu), qq.shape[-1] ** -0.5)
    return segment_attention_ref(qq, kk, vv, q_cu, k_cu)


def segment_attention_ref(q: Tensor, k: Tensor, v: Tensor, q_cu: list[int], k_cu: list[int]) -> Tensor:
    """PyTorch's SDPA once per segment (one batched call when every segment has the same length)."""
    b = len(q_cu) - 1
    q_len = {q_cu[i + 1] - q_cu[i] for i in range(b)}
    k_len = {k_cu[i + 1] - k_cu[i] for i in range(b)}
    if len(q_len) == 1 and len(k_len) == 1 and min(k_len) > 0:
        # equal lengths (e.g. eval batches without masking): one batched call
        h, hd = q.shape[1], q.shape[2]
        qb, kb, vb = (t.reshape(b, -1, h, hd).transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(qb, kb, vb).transpose(1, 2).reshape(q.shape)
    # split, not slicing: split's backward is one cat, slicing's is a full-size zero fill per slice
    q_parts = q.split([q_cu[i + 1] - q_cu[i] for i in range(b)])
    k_parts = k.split([k_cu[i + 1] - k_cu[i] for i in range(b)])
    v_parts = v.split([k_cu[i + 1] - k_cu[i] for i in range(b)])
    outs = []
    for qi, ki, vi in zip(q_parts, k_parts, v_parts):
        if qi.shape[0] == 0:
            continue
        if ki.shape[0] == 0:  # no context for this sample: zero output (the reference gives NaN)
            outs.append(torch.zeros_like(qi))
            continue
        # 4-D [1, H, n, hd]: CPU SDPA takes its flash kernel only for 4-D inputs (3-D → math)
        qi, ki, vi = (t.transpose(0, 1).unsqueeze(0) for t in (qi, ki, vi))
        outs.append(F.scaled_dot_product_attention(qi, ki, vi)[0].transpose(0, 1))
    return torch.cat(outs) if outs else torch.zeros_like(q)
