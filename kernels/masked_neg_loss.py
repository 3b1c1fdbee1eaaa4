"""Fused, segmented masked-negatives patch-discrimination loss: Triton forward and backward.

The loss (docs/reference_semantics.md §8.1) is one InfoNCE per (sample, modality) segment of c
DECODER tokens. Tokens are packed: packed rows [seg_offsets[s], seg_offsets[s+1]) form segment s
(int32 offsets, like cu_seqlens), and packed row k lives in row `row_index[k]` of the `pred` /
`target` buffers, so callers need not copy rows into packed order. For rows i, j of one segment:

    s_ij   = <p_i, t_j> / (|p_i| |t_j| tau)          (L2 normalisation fused, eps 1e-12)
    dup_ij = <t_i, t_j> / (|t_i| |t_j|) > threshold   (only in segments with negative masking)
    valid  = (j == i) or not dup_ij
    lse_i  = logsumexp_{valid j} s_ij                 (online, flash style; never c x c in HBM)

The forward kernel writes per packed row lse_i, lse_i - s_ii, negcnt_i = #{j : not dup_ij}
(the whole-segment skip rule needs negcnt == 0) and ndup_i = #{j != i : dup_ij}. The O(rows)
reduction (mean over tokens, mean over counted samples, sum over modalities, x 2 tau) is done
by the caller (`olmoearth_fast.ops.masked_neg_loss`). The backward recomputes the scores (and
the duplicate test) tile by tile and produces the gradient for the predictions only:

    g_hat_i = w_i / tau * sum_{valid j} (softmax_ij - delta_ij) t_hat_j
    d p_i   = (g_hat_i - p_hat_i <p_hat_i, g_hat_i>) / |p_i|        (F.normalize backward)

with w_i the row weight (grad of the modality loss x 2 tau / (c x counted samples); 0 in
skipped segments, whose programs do nothing). <p_i, g_hat_i> is accumulated from the score
tiles (sum_j dL/ds_ij <p_i, t_j>), so the normalisation backward is one extra pass over D.
Targets get no gradient (they come from the frozen no-grad target path).

Grid: one program per (segment, block of BM rows), from a table built on the device without a
host sync (`_row_block_table`); the grid size cdiv(rows, BM) + segments is static, surplus
programs do nothing. Work is sum_s c_s^2 D, not B N^2 D; memory is O(rows).

Precision (docs/reference_semantics.md §8.3). The 0.999 duplicate threshold is 1e-3 from 1, below
bf16 (2^-8) and TF32 (2^-11) input rounding, and the scores define the loss value, so both dots
follow fp32 semantics:
  * fp32 inputs: `tf32x3` dots (3 TF32 MMAs, error ~fp32 ulp). Cost: ~1/3 of the TF32 MMA
    rate, ~165 TFLOP/s ceiling on H100 (vs ~495 TF32, 989 bf16), i.e. the masked forward
    (scores + duplicate test, 4 c^2 D flops) and backward (recompute + dS @ T, 4-6 c^2 D)
    are ~3x the TF32 time; `ieee` (~67 TFLOP/s SIMT) is available as an option.
  * bf16 / fp16 inputs: every value is exactly a TF32 value (8 resp. 10 mantissa bits; the
    normalisation is applied to the fp32 dot afterwards), so a single-pass `tf32` dot with fp32
    accumulation computes the same products as the reference's fp32 bmm, at ~1/3 the cost.
  * The gradient GEMM dS @ T multiplies fp32 softmax values, so it stays `tf32x3` by default.
  * Not chosen: a saved duplicate bitmask (sum c^2/8 bytes, data-dependent size needing a host
    sync to allocate). Instead the backward recomputes the duplicate test only in row blocks
    that have an off-diagonal duplicate (ndup > 0): never for unmasked modalities or rows
    without duplicates. Forward and backward use the same tiles and precision, so they take
    the same decisions.
The interpreter (TRITON_INTERPRET=1) computes every dot in numpy fp32, whatever the precision.

Tiles: BM = 64, BN = 32, BK = 32, 8 warps. Compiled for sm_90 (Triton 3.9, cuobjdump) this
uses 218 / 241 registers (fwd / bwd, fp32 inputs; 8 bytes of stack in the forward, none in the
backward) and 128 / 203 with bf16 inputs; 64 x 64 x 32 with 4 warps hit 255 registers and
spilled 360 / 864 bytes. Not yet timed on a GPU.

Design limits: D is looped in BK chunks (D = 768 would not fit a register tile); the backward
accumulates rp_i g_hat_i in the fp32 output buffer (BM x D per program, L2 resident), one
read-modify-write per column block, with a barrier between column blocks because the dot and
load layouts map elements to different threads. Packed row ids are int32 (< 2^31 rows).

Deterministic run to run: no atomics; every per-row output and every gradient row is written by
the one program that owns its row block (row_index is injective on segment rows). The caller's
O(rows) reduction is where order can vary (see `olmoearth_fast.ops.masked_neg_loss`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["dot_precision", "masked_neg_loss_bwd", "masked_neg_loss_fwd"]

EPS = 1e-12  # F.normalize's default eps
PRECISIONS = ("tf32", "tf32x3", "ieee")


def dot_precision(dtype: torch.dtype) -> str:
    """The cheapest Triton dot precision that is exact-product fp32 for inputs of `dtype`."""
    return "tf32" if dtype in (torch.bfloat16, torch.float16) else "tf32x3"


@triton.jit
def _row_norm_rcp(X, src, rmask, D, stride, eps, BM: tl.constexpr, BK: tl.constexpr):
    """(1 / max(|x|, eps), |x|^2) for a block of buffer rows `src`, as F.normalize divides."""
    ss = tl.zeros([BM], dtype=tl.float32)
    for k0 in range(0, D, BK):
        ks = k0 + tl.arange(0, BK)
        x = tl.load(X + src[:, None] * stride + ks[None, :],
                    mask=rmask[:, None] & (ks[None, :] < D), other=0.0).to(tl.float32)
        ss += tl.sum(x * x, 1)
    return 1.0 / tl.maximum(tl.sqrt(ss), eps), ss


@triton.jit
def _score_tile(P, T, src_r, rmask, src_c, cmask, D, stride_p, stride_t, use_g,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """Raw dots <p_i, t_j>, <t_i, t_j> (the latter only if use_g) and |t_j|^2 for one tile.

    src_r / src_c are the buffer rows of the tile's packed rows / columns.
    """
    acc_s = tl.zeros([BM, BN], dtype=tl.float32)
    acc_g = tl.zeros([BM, BN], dtype=tl.float32)
    ssc = tl.zeros([BN], dtype=tl.float32)
    for k0 in range(0, D, BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks < D
        # T columns loaded as [BK, BN] so the dot needs no transpose.
        tc = tl.load(T + src_c[None, :] * stride_t + ks[:, None],
                     mask=cmask[None, :] & kmask[:, None], other=0.0).to(tl.float32)
        p = tl.load(P + src_r[:, None] * stride_p + ks[None, :],
                    mask=rmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
        acc_s = tl.dot(p, tc, acc_s, input_precision=PREC)
        ssc += tl.sum(tc * tc, 0)
        if use_g:
            tr = tl.load(T + src_r[:, None] * stride_t + ks[None, :],
                         mask=rmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
            acc_g = tl.dot(tr, tc, acc_g, input_precision=PREC)
    return acc_s, acc_g, ssc


@triton.jit
def _program_rows(blk_seg, blk_row, seg_off, RIDX, BM: tl.constexpr):
    """Packed rows of this program, their mask and buffer rows, and its segment's bounds."""
    pid = tl.program_id(0)
    seg = tl.load(blk_seg + pid)
    live = seg >= 0
    seg = tl.maximum(seg, 0)
    start = tl.load(seg_off + seg)
    # A surplus program (seg < 0) gets an empty segment: its loops run zero times.
    end = tl.where(live, tl.load(seg_off + seg + 1), start)
    rows = start + tl.load(blk_row + pid) * BM + tl.arange(0, BM)
    rmask = rows < end
    src = tl.load(RIDX + rows, mask=rmask, other=0)
    return seg, live, start, end, rows, rmask, src


@triton.jit
def _masked_neg_loss_fwd_kernel(
    P, T, RIDX, blk_seg, blk_row, seg_off, seg_mask,
    out_lse, out_loss, out_negcnt, out_ndup,
    D, stride_p, stride_t, inv_tau, thr, eps,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
):
    seg, live, start, end, rows, rmask, src_r = _program_rows(blk_seg, blk_row, seg_off, RIDX, BM)
    masked = live & (tl.load(seg_mask + seg) != 0)
    rp, _ = _row_norm_rcp(P, src_r, rmask, D, stride_p, eps, BM, BK)
    # tl.where(scalar, mask, False), not mask & scalar: the interpreter's & gives int32 there.
    rt, _ = _row_norm_rcp(T, src_r, tl.where(masked, rmask, False), D, stride_t, eps, BM, BK)

    # Finite start value: a row whose first column blocks are all masked keeps m = -1e30 and
    # l = 0 (exp(-inf) = 0) instead of producing exp(-inf - -inf) = nan.
    m_i = tl.full([BM], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    s_ii = tl.zeros([BM], dtype=tl.float32)
    negcnt = tl.zeros([BM], dtype=tl.int32)
    ndup = tl.zeros([BM], dtype=tl.int32)
    for c0 in range(start, end, BN):
        cols = c0 + tl.arange(0, BN)
        cmask = cols < end
        src_c = tl.load(RIDX + cols, mask=cmask, other=0)
        acc_s, acc_g, ssc = _score_tile(P, T, src_r, rmask, src_c, cmask, D, stride_p, stride_t,
                                        masked, BM, BN, BK, PREC)
        rtc = 1.0 / tl.maximum(tl.sqrt(ssc), eps)
        s = acc_s * rp[:, None] * (rtc * inv_tau)[None, :]
        dup = tl.where(masked, acc_g * rt[:, None] * rtc[None, :] > thr, False)
        diag = rows[:, None] == cols[None, :]
        valid = cmask[None, :] & (diag | ~dup)
        negcnt += tl.sum((cmask[None, :] & ~dup).to(tl.int32), 1)
        ndup += tl.sum((cmask[None, :] & dup & ~diag).to(tl.int32), 1)
        sm = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sm, 1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(sm - m_new[:, None]), 1)
        m_i = m_new
        s_ii += tl.sum(tl.where(diag, s, 0.0), 1)
    # l_i = 0 only in rows outside the segment (not stored); keep log() finite there.
    lse = m_i + tl.log(tl.where(rmask, l_i, 1.0))
    tl.store(out_lse + rows, lse, mask=rmask)
    tl.store(out_loss + rows, lse - s_ii, mask=rmask)
    tl.store(out_negcnt + rows, negcnt, mask=rmask)
    tl.store(out_ndup + rows, ndup, mask=rmask)


@triton.jit
def _masked_neg_loss_bwd_kernel(
    P, T, GP, RIDX, blk_seg, blk_row, seg_off, seg_mask, row_lse, row_w, row_ndup,
    D, stride_p, stride_t, stride_g, inv_tau, thr, eps,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
    GRAD_PREC: tl.constexpr,
):
    seg, live, start, end, rows, rmask, src_r = _program_rows(blk_seg, blk_row, seg_off, RIDX, BM)
    w = tl.load(row_w + rows, mask=rmask, other=0.0)
    # Skipped segments (and surplus programs) have w == 0: their gradient stays the zeros the
    # launcher allocated, so every loop below runs zero times.
    active = tl.max(tl.abs(w), 0) > 0
    end = tl.where(active, end, start)
    d_end = tl.where(active, D, 0)
    rmask = tl.where(active, rmask, False)
    ndup = tl.load(row_ndup + rows, mask=rmask, other=0)
    masked = live & (tl.load(seg_mask + seg) != 0)
    # The duplicate test only changes anything where a row has an off-diagonal duplicate.
    use_g = masked & (tl.max(ndup, 0) > 0)
    lse = tl.load(row_lse + rows, mask=rmask, other=0.0)
    rp, ssp = _row_norm_rcp(P, src_r, rmask, d_end, stride_p, eps, BM, BK)
    rt, _ = _row_norm_rcp(T, src_r, tl.where(use_g, rmask, False), d_end, stride_t, eps, BM, BK)

    # GP accumulates rp_i * g_hat_i with g_hat_i = sum_j dL/d<p_hat_i, t_j> t_j; pg_i gathers
    # <p_i, g_hat_i> = sum_j dL/d<p_hat_i, t_j> <p_i, t_j> from the score tiles, so the
    # F.normalize backward below needs one pass, not two.
    pg = tl.zeros([BM], dtype=tl.float32)
    for c0 in range(start, end, BN):
        cols = c0 + tl.arange(0, BN)
        cmask = cols < end
        src_c = tl.load(RIDX + cols, mask=cmask, other=0)
        acc_s, acc_g, ssc = _score_tile(P, T, src_r, rmask, src_c, cmask, D, stride_p, stride_t,
                                        use_g, BM, BN, BK, PREC)
        rtc = 1.0 / tl.maximum(tl.sqrt(ssc), eps)
        s = acc_s * rp[:, None] * (rtc * inv_tau)[None, :]
        dup = tl.where(use_g, acc_g * rt[:, None] * rtc[None, :] > thr, False)
        diag = rows[:, None] == cols[None, :]
        valid = cmask[None, :] & (diag | ~dup)
        prob = tl.where(valid, tl.exp(s - lse[:, None]), 0.0)
        # dL/d<p_hat_i, t_j> = w_i (softmax_ij - delta_ij) / (|t_j| tau)
        dsc = w[:, None] * (prob - diag.to(tl.float32)) * (rtc * inv_tau)[None, :]
        pg += tl.sum(dsc * acc_s, 1)
        dsc = dsc * rp[:, None]
        for k0 in range(0, D, BK):
            ks = k0 + tl.arange(0, BK)
            kmask = ks < D
            tc = tl.load(T + src_c[:, None] * stride_t + ks[None, :],
                         mask=cmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
            gptr = GP + src_r[:, None] * stride_g + ks[None, :]
            gmask = rmask[:, None] & kmask[None, :]
            acc = tl.load(gptr, mask=gmask, other=0.0)
            acc = tl.dot(dsc, tc, acc, input_precision=GRAD_PREC)
            tl.store(gptr, acc, mask=gmask)
        # The next read of GP may come from another thread than this write (dot vs load layout).
        tl.debug_barrier()

    # F.normalize backward: rp (g_hat - p_hat <p_hat, g_hat>) = GP - p rp^3 <p, g_hat> where
    # |p| > eps; GP alone (= g_hat / eps) otherwise.
    proj = tl.where(tl.sqrt(ssp) > eps, pg * rp * rp * rp, 0.0)
    for k0 in range(0, d_end, BK):
        ks = k0 + tl.arange(0, BK)
        m2 = rmask[:, None] & (ks[None, :] < D)
        p = tl.load(P + src_r[:, None] * stride_p + ks[None, :], mask=m2, other=0.0)
        gptr = GP + src_r[:, None] * stride_g + ks[None, :]
        gp = tl.load(gptr, mask=m2, other=0.0)
        tl.store(gptr, gp - p.to(tl.float32) * proj[:, None], mask=m2)


def _row_block_table(seg_offsets: Tensor, rows: int, block_m: int) -> tuple[Tensor, Tensor, int]:
    """(segment, row block) of every program, built on the device without a host sync.

    sum_s cdiv(c_s, BM) <= cdiv(rows, BM) + S, so that many programs cover every row block;
    the surplus get segment -1.
    """
    off = seg_offsets.to(torch.int64)
    num_seg = off.numel() - 1
    nblk = (off[1:] - off[:-1] + block_m - 1) // block_m
    cum = torch.cumsum(nblk, 0)
    grid = triton.cdiv(rows, block_m) + num_seg
    pid = torch.arange(grid, device=off.device)
    seg = torch.searchsorted(cum, pid, right=True)
    segc = seg.clamp(max=num_seg - 1)
    blk_row = pid - (cum[segc] - nblk[segc])
    blk_seg = torch.where(seg < num_seg, seg, -1)
    return blk_seg.to(torch.int32), blk_row.to(torch.int32), grid


def _check(pred: Tensor, target: Tensor, row_index: Tensor, seg_offsets: Tensor,
           seg_mask_neg: Tensor) -> None:
    if pred.dim() != 2 or pred.shape != target.shape:
        raise ValueError(f"pred and target must both be [N, D]; got {tuple(pred.shape)} and "
                         f"{tuple(target.shape)}")
    if row_index.dtype != torch.int64 or row_index.dim() != 1:
        raise ValueError(f"row_index must be a 1-D int64 tensor, got {row_index.dtype} "
                         f"{tuple(row_index.shape)}")
    if seg_offsets.dtype != torch.int32 or seg_offsets.dim() != 1 or seg_offsets.numel() < 2:
        raise ValueError("seg_offsets must be a 1-D int32 tensor [S+1] with S >= 1, got "
                         f"{seg_offsets.dtype} {tuple(seg_offsets.shape)}")
    if seg_mask_neg.shape != (seg_offsets.numel() - 1,):
        raise ValueError(f"seg_mask_neg must be [S] = [{seg_offsets.numel() - 1}], got "
                         f"{tuple(seg_mask_neg.shape)}")


def _last_dim_contiguous(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _index_args(row_index: Tensor, seg_offsets: Tensor, seg_mask_neg: Tensor):
    """The kernels read these three at ptr + i: contiguous copies of strided views (a
    `seg_offsets[::2]` or a column of a table would otherwise be read at the wrong offsets)."""
    return row_index.contiguous(), seg_offsets.contiguous(), seg_mask_neg.to(torch.int32).contiguous()


def _precision(name: str, value: str) -> str:
    if value not in PRECISIONS:
        raise ValueError(f"{name} must be one of {PRECISIONS}, got {value!r}")
    return value


def masked_neg_loss_fwd(
    pred: Tensor,
    target: Tensor,
    row_index: Tensor,
    seg_offsets: Tensor,
    seg_mask_neg: Tensor,
    tau: float,
    threshold: float,
    *,
    precision: str | None = None,
    block_m: int = 64,
    block_n: int = 32,
    block_k: int = 32,
    num_warps: int = 8,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-row forward statistics of the segmented masked-negatives InfoNCE.

    Args:
        pred: [N, D] prediction buffer (any float dtype; computed in fp32).
        target: [N, D] target buffer.
        row_index: [R] int64, buffer row of each packed row (injective on the segment rows).
        seg_offsets: [S+1] int32 segment boundaries over packed rows; packed rows outside
            [off[0], off[S]) are ignored.
        seg_mask_neg: [S] bool/int, whether segment s masks same-target negatives.
        tau: softmax temperature.
        threshold: same-target cosine threshold (strict >).
        precision: Triton dot precision; default `dot_precision(pred.dtype)`.
        block_m, block_n, block_k: tile sizes (>= 16, powers of two).
        num_warps: warps per program.

    Returns:
        Per packed row: lse [R] fp32, lse - s_ii [R] fp32, negcnt [R] int32, ndup [R] int32
        (values of rows outside every segment are unspecified).
    """
    _check(pred, target, row_index, seg_offsets, seg_mask_neg)
    precision = _precision("precision", precision or dot_precision(pred.dtype))
    pred, target = _last_dim_contiguous(pred), _last_dim_contiguous(target)
    rows, dim = row_index.numel(), pred.shape[1]
    lse = pred.new_empty(rows, dtype=torch.float32)
    loss = pred.new_empty(rows, dtype=torch.float32)
    negcnt = pred.new_empty(rows, dtype=torch.int32)
    ndup = pred.new_empty(rows, dtype=torch.int32)
    if rows == 0:
        return lse, loss, negcnt, ndup
    row_index, seg_offsets, mask_neg = _index_args(row_index, seg_offsets, seg_mask_neg)
    blk_seg, blk_row, grid = _row_block_table(seg_offsets, rows, block_m)
    _masked_neg_loss_fwd_kernel[(grid,)](
        pred, target, row_index, blk_seg, blk_row, seg_offsets, mask_neg, lse, loss, negcnt, ndup,
        dim, pred.stride(0), target.stride(0), 1.0 / tau, threshold, EPS,
        BM=block_m, BN=block_n, BK=block_k, PREC=precision, num_warps=num_warps, num_stages=2,
    )
    return lse, loss, negcnt, ndup


def masked_neg_loss_bwd(
    pred: Tensor,
    target: Tensor,
    row_index: Tensor,
    seg_offsets: Tensor,
    seg_mask_neg: Tensor,
    row_lse: Tensor,
    row_w: Tensor,
    row_ndup: Tensor,
    tau: float,
    threshold: float,
    *,
    precision: str | None = None,
    grad_precision: str = "tf32x3",
    block_m: int = 64,
    block_n: int = 32,
    block_k: int = 32,
    num_warps: int = 8,
) -> Tensor:
    """Gradient of sum_i row_w[i] (lse_i - s_ii) with respect to the `pred` buffer (fp32 [N, D]).

    `row_lse` and `row_ndup` are the forward's outputs; `row_w` [R] is 0 for rows whose
    segment does not count (skipped, or outside every segment). Buffer rows that no segment
    row maps to get 0. Use the forward's tile sizes and precision so the duplicate decisions
    are recomputed identically.
    """
    _check(pred, target, row_index, seg_offsets, seg_mask_neg)
    precision = _precision("precision", precision or dot_precision(pred.dtype))
    grad_precision = _precision("grad_precision", grad_precision)
    pred, target = _last_dim_contiguous(pred), _last_dim_contiguous(target)
    rows, dim = row_index.numel(), pred.shape[1]
    grad = torch.zeros(pred.shape, dtype=torch.float32, device=pred.device)
    if rows == 0:
        return grad
    row_index, seg_offsets, mask_neg = _index_args(row_index, seg_offsets, seg_mask_neg)
    blk_seg, blk_row, grid = _row_block_table(seg_offsets, rows, block_m)
    _masked_neg_loss_bwd_kernel[(grid,)](
        pred, target, grad, row_index, blk_seg, blk_row, seg_offsets, mask_neg,
        row_lse.contiguous(), row_w.to(torch.float32).contiguous(), row_ndup.contiguous(),
        dim, pred.stride(0), target.stride(0), grad.stride(0), 1.0 / tau, threshold, EPS,
        BM=block_m, BN=block_n, BK=block_k, PREC=precision, GRAD_PREC=grad_precision,
        num_warps=num_warps, num_stages=2,
    )
    return grad
