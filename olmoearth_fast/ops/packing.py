"""Variable-length token packing (C++/CUDA ops in csrc/) and bandset merge indexing.

After masking, each sample keeps a different number of tokens. Instead of the reference's
stable-sort + gather + truncate-to-longest padding, the kept tokens of all samples are packed
into one ``[total, ...]`` buffer with ``cu_seqlens`` (int32, B+1), the layout varlen attention
kernels take.

Ops (namespace ``torch.ops.olmoearth_fast``), each with a plain-PyTorch ``*_ref`` below:

* ``varlen_index(keep[B,N])`` → flat indices ``b*N+n`` of kept tokens (sample-major, original
  order), ``cu_seqlens`` and ``max_seqlen`` (0-d int32 tensor), computed in one pass. The index
  length is data dependent: on CUDA this is the op pair's only host sync, so compute it once per
  step and reuse it for every pack/unpack of that step.
* ``gather_rows(src[R,...], index[K])`` / ``scatter_rows(src[K,...], index[K], R)``: row copies
  where index −1 means "zero row" / "drop". Index maps are injective, so each is the other's
  backward, and ``pack``/``unpack`` are thin compositions.
* ``merge_index(keep[B,P,S])`` → the merged layout of bandset merge: one token per (sample,
  position) where any of the S bandsets is kept, its flat position ``b*P+p``, and an ``[M,S]``
  map of flat token rows ``(b*P+p)*S+s`` (−1 where that bandset is not kept). ``merge_gather``
  builds ``[M, S·D]`` from it (zeros for non-kept bandsets); ``unmerge_scatter`` is its inverse.
"""

from __future__ import annotations

import torch
from torch import Tensor

from olmoearth_fast import _C  # noqa: F401  (loads the C++ library: registers the ops)

_ops = torch.ops.olmoearth_fast

# ---------------------------------------------------------------------------------------------
# Fake (meta) implementations: shapes only, for torch.compile / export.


@torch.library.register_fake("olmoearth_fast::varlen_index")
def _varlen_index_fake(keep: Tensor):
    torch._check(keep.dim() == 2, lambda: f"varlen_index: 'keep' must be [B, N], got {keep.shape}")
    total = torch.library.get_ctx().new_dynamic_size()
    return (keep.new_empty(total, dtype=torch.long), keep.new_empty(keep.shape[0] + 1, dtype=torch.int32),
            keep.new_empty((), dtype=torch.int32))


@torch.library.register_fake("olmoearth_fast::merge_index")
def _merge_index_fake(keep: Tensor):
    torch._check(keep.dim() == 3, lambda: f"merge_index: 'keep' must be [B, P, S], got {keep.shape}")
    total = torch.library.get_ctx().new_dynamic_size()
    return (keep.new_empty(total, dtype=torch.long), keep.new_empty((total, keep.shape[2]), dtype=torch.long),
            keep.new_empty(keep.shape[0] + 1, dtype=torch.int32), keep.new_empty((), dtype=torch.int32))


@torch.library.register_fake("olmoearth_fast::gather_rows")
def _gather_rows_fake(src: Tensor, index: Tensor):
    torch._check(index.dim() == 1, lambda: f"gather_rows: 'index' must be [K], got {index.shape}")
    return src.new_empty((index.shape[0], *src.shape[1:]))


@torch.library.register_fake("olmoearth_fast::scatter_rows")
def _scatter_rows_fake(src: Tensor, index: Tensor, num_rows):
    torch._check(index.dim() == 1, lambda: f"scatter_rows: 'index' must be [K], got {index.shape}")
    torch._check(src.shape[0] == index.shape[0],
                 lambda: f"scatter_rows: 'src' must be [K={index.shape[0]}, ...], got {src.shape}")
    return src.new_empty((num_rows, *src.shape[1:]))


# ---------------------------------------------------------------------------------------------
# Autograd: gather and scatter are each other's backward (the index maps are injective).


def _gather_setup(ctx, inputs, output):
    src, index = inputs
    ctx.save_for_backward(index)
    ctx.num_rows = src.shape[0]


def _gather_backward(ctx, grad):
    (index,) = ctx.saved_tensors
    return _ops.scatter_rows(grad.contiguous(), index, ctx.num_rows), None


def _scatter_setup(ctx, inputs, output):
    _, index, _ = inputs
    ctx.save_for_backward(index)


def _scatter_backward(ctx, grad):
    (index,) = ctx.saved_tensors
    return _ops.gather_rows(grad.contiguous(), index), None, None


torch.library.register_autograd("olmoearth_fast::gather_rows", _gather_backward, setup_context=_gather_setup)
torch.library.register_autograd("olmoearth_fast::scatter_rows", _scatter_backward, setup_context=_scatter_setup)


# ---------------------------------------------------------------------------------------------
# Public API


def varlen_index(keep: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Flat indices of kept tokens, ``cu_seqlens`` (int32, B+1) and ``max_seqlen`` (0-d int32)."""
    return _ops.varlen_index(keep)


def gather_rows(src: Tensor, index: Tensor) -> Tensor:
    """``out[k] = src[index[k]]``, zero rows where ``index[k] == -1``. Differentiable in ``src``."""
    return _ops.gather_rows(src, index)


def scatter_rows(src: Tensor, index: Tensor, num_rows: int) -> Tensor:
    """``out[index[k]] = src[k]`` into ``num_rows`` zero rows; ``-1`` drops a row. Injective index."""
    return _ops.scatter_rows(src, index, num_rows)


def pack(x: Tensor, keep: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Pack the kept tokens of ``x [B, N, ...]`` into ``[total, ...]``.

    Returns ``(packed, cu_seqlens, indices, max_seqlen)``; pass ``indices`` to :func:`unpack`
    (and to further :func:`gather_rows` calls that reuse the same layout).
    """
    if x.dim() < 2 or keep.shape != x.shape[:2]:
        raise ValueError(f"pack: 'x' must be [B, N, ...] with keep [B, N]; got x {tuple(x.shape)}, "
                         f"keep {tuple(keep.shape)}")
    indices, cu_seqlens, max_seqlen = varlen_index(keep)
    return gather_rows(x.flatten(0, 1), indices), cu_seqlens, indices, max_seqlen


def unpack(packed: Tensor, indices: Tensor, batch: int, seqlen: int) -> Tensor:
    """Inverse of :func:`pack`: ``[total, ...] → [batch, seqlen, ...]`` with zeros elsewhere."""
    return scatter_rows(packed, indices, batch * seqlen).unflatten(0, (batch, seqlen))


def merge_index(keep: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Merged layout of per-position bandset keep flags ``keep [B, P, S]``.

    Returns ``(positions [M], map [M, S], cu_seqlens [B+1], max_seqlen)``: one merged token per
    (sample, position) with any kept bandset, at flat position ``b*P+p``; ``map[m, s]`` is the flat
    token row ``(b*P+p)*S+s`` of bandset ``s`` or −1 where that bandset is not kept.
    """
    return _ops.merge_index(keep)


def merge_gather(rows: Tensor, merge_map: Tensor) -> Tensor:
    """``rows [R, D]`` (flat per-bandset tokens) → ``[M, S·D]``, zeros for non-kept bandsets."""
    m, s = merge_map.shape
    return gather_rows(rows, merge_map.reshape(-1)).reshape(m, s * rows.shape[-1])


def unmerge_scatter(merged: Tensor, merge_map: Tensor, num_rows: int) -> Tensor:
    """Inverse of :func:`merge_gather`: ``[M, S·D] → [num_rows, D]``; non-kept bandsets dropped."""
    m, s = merge_map.shape
    return scatter_rows(merged.reshape(m * s, -1), merge_map.reshape(-1), num_rows)


# ---------------------------------------------------------------------------------------------
# Plain-PyTorch references (tests, benchmarks, and the documentation of the contract).


def varlen_index_ref(keep: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    counts = keep.sum(1)
    cu_seqlens = torch.zeros(keep.shape[0] + 1, dtype=torch.int32, device=keep.device)
    cu_seqlens[1:] = counts.cumsum(0)
    max_seqlen = counts.max().to(torch.int32) if keep.shape[0] else cu_seqlens.new_zeros(())
    return keep.flatten().nonzero().flatten(), cu_seqlens, max_seqlen


def gather_rows_ref(src: Tensor, index: Tensor) -> Tensor:
    if src.shape[0] == 0:
        return src.new_zeros((index.shape[0], *src.shape[1:]))
    valid = (index >= 0).view(-1, *[1] * (src.dim() - 1))
    return torch.where(valid, src[index.clamp(min=0)], torch.zeros((), dtype=src.dtype, device=src.device))


def scatter_rows_ref(src: Tensor, index: Tensor, num_rows: int) -> Tensor:
    out = src.new_zeros((num_rows, *src.shape[1:]))
    valid = index >= 0
    return out.index_put((index[valid],), src[valid])


def pack_ref(x: Tensor, keep: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    indices, cu_seqlens, max_seqlen = varlen_index_ref(keep)
    return x.flatten(0, 1)[indices], cu_seqlens, indices, max_seqlen


def unpack_ref(packed: Tensor, indices: Tensor, batch: int, seqlen: int) -> Tensor:
    return scatter_rows_ref(packed, indices, batch * seqlen).unflatten(0, (batch, seqlen))


def merge_index_ref(keep: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    b, p, s = keep.shape
    positions, cu_seqlens, max_seqlen = varlen_index_ref(keep.any(-1))
    rows = positions[:, None] * s + torch.arange(s, device=keep.device)
    merge_map = torch.where(keep.reshape(b * p, s)[positions], rows, torch.full_like(rows, -1))
    return positions, merge_map, cu_seqlens, max_seqlen


def merge_gather_ref(rows: Tensor, merge_map: Tensor) -> Tensor:
    m, s = merge_map.shape
    return gather_rows_ref(rows, merge_map.reshape(-1)).reshape(m, s * rows.shape[-1])


def unmerge_scatter_ref(merged: Tensor, merge_map: Tensor, num_rows: int) -> Tensor:
    m, s = merge_map.shape
    return scatter_rows_ref(merged.reshape(m * s, -1), merge_map.reshape(-1), num_rows)
