"""Segmented masked-negatives patch-discrimination loss on packed DECODER tokens.

Packed layout: packed rows [seg_offsets[s], seg_offsets[s+1]) are the DECODER tokens of segment
s = one (modality, sample), in token order; `seg_modality[s]` names its modality (0..M-1) and
`seg_mask_neg[s]` whether it masks same-target negatives. Packed row k is row `row_index[k]`
of the `pred` / `target` buffers ([N, D]; default: the identity). Packed rows outside
[seg_offsets[0], seg_offsets[-1]) are ignored and buffer rows no segment uses get zero
gradient, so a buffer of static size needs no host sync.

`masked_neg_loss` returns the per-modality losses L_m (docs/reference_semantics.md §8.1): mean
over a segment's tokens of 2 tau (lse_i - s_ii), mean over counted segments of the modality
(c = 1 counts with 0; a masked segment with c > 1 where some row has no "not same" column is
skipped). The reference total is `weight * L.sum()`. In training the segments come from the
microbatch plan (`olmoearth_fast.model.plan`) over the decoder's packed DECODER tokens.

Implementations (`impl`):
* "triton" (default on CUDA): the fused kernels of `olmoearth_fast.kernels.masked_neg_loss`
  (online logsumexp, backward by recomputation; memory O(rows)).
* "chunked" (default on CPU): plain PyTorch over batches of segments of similar size, padded
  to the batch's largest c; a batch holds at most max(c_max^2, 2^21) score elements, so memory
  stays bounded (never a [B, N, N] tensor) while the bmm calls stay large enough to be fast.
  When a gradient is wanted it is computed in the forward, while the scores are at hand (an
  [N, D] fp32 buffer, the gradient's own size), and the backward only scales rows: on the
  2-core CPU that is cheaper than recomputing. The L2 normalisation is folded into the c x c
  scores (c < D). `_bwd_chunked` is the recomputing backward, used when the forward ran
  without grad, and the CPU mirror of the Triton backward.
Both share the O(rows) reduction (`_reduce_rows`). `masked_neg_loss_ref` is the obviously
correct per-segment loop (autograd, host syncs) used as the oracle in tests.

The op is registered as `olmoearth_fast::masked_neg_loss` (+ `_backward`) with fake and
autograd implementations, so it works under torch.compile(fullgraph=True). Only `pred` gets a
gradient: targets come from the frozen no-grad target path and must not require grad.

Determinism. The Triton kernels use no atomics: each row's statistics and gradient are written
by one program. The O(rows) reduction (`_reduce_rows`) sums rows into segments and segments
into modalities with `index_add_`, which on CUDA adds atomically in an unspecified order: the
loss value (not the gradient's direction, only its per-segment scale) may differ in the last
bits from run to run. Under `torch.use_deterministic_algorithms(True)` PyTorch's CUDA
`index_add_` switches to a sorted `index_put_(accumulate=True)`, which is deterministic; that
is the deterministic choice (the other `index_add_` calls here add at most one value into each
zero-initialised row, which is exact in any order). On CPU every path is deterministic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from olmoearth_fast.ops import forced_kernels

__all__ = [
    "masked_neg_loss",
    "masked_neg_loss_ref",
]

IMPLS = ("auto", "chunked", "triton")
EPS = 1e-12  # F.normalize's eps
# Score elements per chunked batch: 2^21 fp32 = 8 MiB per [g, c, c] tensor (about 4 alive).
_CHUNK_ELEMS = 1 << 21
# Segments whose length is below this fraction of the batch's largest start a new batch:
# padding then wastes at most 1 - 0.75^2 = 44% of a segment's pairs.
_CHUNK_RATIO = 0.75


# --------------------------------------------------------------------------------------------
# Reduction over rows, shared by both implementations (O(rows), no host sync)
# --------------------------------------------------------------------------------------------


def _row_segments(seg_offsets: Tensor, rows: int) -> tuple[Tensor, Tensor]:
    """Segment index of every row (clamped to [0, S-1]) and whether the row is in a segment."""
    off = seg_offsets.to(torch.int64)
    num_seg = off.numel() - 1
    r = torch.arange(rows, device=off.device)
    seg = torch.searchsorted(off[1:], r, right=True)
    in_seg = (seg < num_seg) & (r >= off[0])
    return seg.clamp(max=num_seg - 1), in_seg


def _reduce_rows(row_loss: Tensor, row_negcnt: Tensor, seg_offsets: Tensor, seg_modality: Tensor,
                 seg_mask_neg: Tensor, num_modalities: int, tau: float) -> tuple[Tensor, Tensor]:
    """Per-modality losses [M] and the per-row coefficient d L_{m(row)} / d (lse - s_ii).

    The segment and modality sums are `index_add_`: atomic (run-to-run nondeterministic in the
    last bits) on CUDA unless torch.use_deterministic_algorithms(True) (module docstring).
    """
    off = seg_offsets.to(torch.int64)
    num_seg = off.numel() - 1
    counts = off[1:] - off[:-1]
    seg, in_seg = _row_segments(seg_offsets, row_loss.numel())
    two_tau = 2.0 * tau
    # torch.where, not a product: rows outside every segment hold unspecified values.
    per_row = torch.where(in_seg, row_loss, 0.0) * two_tau
    seg_sum = row_loss.new_zeros(num_seg).index_add_(0, seg, per_row)
    no_neg = (in_seg & (row_negcnt == 0)).to(torch.float32)
    seg_no_neg = row_loss.new_zeros(num_seg).index_add_(0, seg, no_neg)
    skip = (seg_no_neg > 0) & seg_mask_neg & (counts > 1)
    counted = (counts > 0) & ~skip
    cnt = counts.clamp(min=1).to(torch.float32)
    seg_loss = torch.where(counted, seg_sum / cnt, 0.0)
    mod = seg_modality.to(torch.int64)
    mod_sum = row_loss.new_zeros(num_modalities).index_add_(0, mod, seg_loss)
    mod_cnt = row_loss.new_zeros(num_modalities).index_add_(0, mod, counted.to(torch.float32))
    mod_cnt = mod_cnt.clamp(min=1)
    seg_coef = torch.where(counted, two_tau / (cnt * mod_cnt[mod]), 0.0)
    row_coef = torch.where(in_seg, seg_coef[seg], 0.0)
    return mod_sum / mod_cnt, row_coef


# --------------------------------------------------------------------------------------------
# Chunked PyTorch implementation (CPU default)
# --------------------------------------------------------------------------------------------


def _batches(seg_offsets: Tensor, seg_mask_neg: Tensor, active: Tensor | None = None):
    """Yield (row index [g, c], valid [g, c], masked) for batches of similar-size segments."""
    off = seg_offsets.tolist()
    flags = seg_mask_neg.tolist()
    act = None if active is None else active.tolist()
    segs = [(bool(flags[s]), off[s + 1] - off[s], off[s]) for s in range(len(off) - 1)
            if off[s + 1] > off[s] and (act is None or act[s])]
    segs.sort(key=lambda x: (x[0], -x[1]))
    device = seg_offsets.device
    i = 0
    while i < len(segs):
        masked, cmax, _ = segs[i]
        j = i + 1
        while (j < len(segs) and segs[j][0] == masked and (j - i + 1) * cmax * cmax <= _CHUNK_ELEMS
               and segs[j][1] >= _CHUNK_RATIO * cmax):
            j += 1
        starts = torch.tensor([s[2] for s in segs[i:j]], device=device)
        lens = torch.tensor([s[1] for s in segs[i:j]], device=device)
        ar = torch.arange(cmax, device=device)
        valid = ar[None, :] < lens[:, None]
        idx = torch.where(valid, starts[:, None] + ar[None, :], starts[:, None])
        yield idx, valid, masked
        i = j


def _gather(x: Tensor, idx: Tensor) -> Tensor:
    """Rows idx [g, c] of x [rows, D] as fp32 [g, c, D]."""
    return x.index_select(0, idx.reshape(-1)).view(*idx.shape, x.shape[1]).float()


def _norm_rcp(x: Tensor) -> tuple[Tensor, Tensor]:
    """(|x|, 1 / max(|x|, eps)) over the last dim: what F.normalize divides by."""
    norm = torch.linalg.vector_norm(x, dim=-1)
    return norm, norm.clamp_min(EPS).reciprocal_()


def _keep_mask(t: Tensor, rt: Tensor, valid: Tensor, masked: bool, threshold: float,
               want_dup: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Kept score entries [g, c, c] of a batch and, for masked batches, negcnt and ndup."""
    c = valid.shape[1]
    cols = valid[:, None, :]
    if not (masked and want_dup):
        return cols.expand(-1, c, -1), None, None
    eye = torch.eye(c, dtype=torch.bool, device=t.device)
    # Cosines as the normalised dot: scale the c x c dots instead of the c x D rows (c < D).
    cos = torch.bmm(t, t.transpose(1, 2)).mul_(rt[:, :, None]).mul_(rt[:, None, :])
    same = cos > threshold
    negcnt = (cols & ~same).sum(-1)
    same &= cols
    keep = ~same
    keep &= cols
    keep |= eye
    ndup = (same & ~eye).sum(-1)
    return keep, negcnt, ndup


def _unit_grad(p: Tensor, t: Tensor, raw: Tensor, prob: Tensor, rp: Tensor, rt: Tensor,
               norm: Tensor, row_w: Tensor, tau: float) -> Tensor:
    """d(sum_i w_i l_i)/dp [g, c, D] from the kept softmax `prob` (modified in place).

    With ds_ij = w_i (softmax_ij - delta_ij) / (|t_j| tau) = dL/d<p_hat_i, t_j>, p_hat = p rp
    and g_hat = sum_j ds_ij t_j, the F.normalize backward is rp (g_hat - p_hat <p_hat, g_hat>);
    <p, g_hat> = sum_j ds_ij raw_ij, so it needs only c x c work plus one fused GEMM:
    grad = (rp ds) @ t - p rp^3 <p, g_hat>   (no projection term where |p| <= eps).
    """
    prob.diagonal(dim1=1, dim2=2).sub_(1.0)
    ds = prob.mul_(row_w[..., None]).mul_((rt / tau)[:, None, :])
    proj = (ds * raw).sum(-1) * rp * rp * rp
    proj = torch.where(norm > EPS, proj, 0.0)
    return torch.bmm(ds.mul_(rp[:, :, None]), t).addcmul_(p, proj[..., None], value=-1.0)


def _fwd_chunked(pred: Tensor, target: Tensor, row_index: Tensor, seg_offsets: Tensor,
                 seg_mask_neg: Tensor, tau: float, threshold: float,
                 need_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-row forward statistics and, if need_grad, d l_i/d p_i of every row (unit weight).

    On CPU computing the gradient here, while the scores are at hand, is cheaper than
    recomputing them in the backward (which then only scales rows); it costs an fp32
    [N + 1, D] buffer, the size of the gradient itself. Row N is scratch: padded batch rows
    are copied there, so the other rows are written exactly once (index_copy, no zero fill
    of the rows that segments cover).
    """
    rows = row_index.numel()
    lse = pred.new_zeros(rows, dtype=torch.float32)
    loss = pred.new_zeros(rows, dtype=torch.float32)
    negcnt = pred.new_zeros(rows, dtype=torch.int32)
    ndup = pred.new_zeros(rows, dtype=torch.int32)
    n = pred.shape[0]
    gbuf = pred.new_empty((n + 1 if need_grad else 0, pred.shape[1]), dtype=torch.float32)
    if need_grad:
        # Zero the buffer rows that no segment row covers (the others are overwritten).
        off = seg_offsets.tolist()
        covered = torch.zeros(n + 1, dtype=torch.bool, device=pred.device)
        covered[row_index[off[0]:off[-1]]] = True
        gbuf.index_fill_(0, (~covered).nonzero().squeeze(1), 0.0)
    for idx, valid, masked in _batches(seg_offsets, seg_mask_neg):
        src = row_index[idx]
        p, t = _gather(pred, src), _gather(target, src)
        norm, rp = _norm_rcp(p)
        _, rt = _norm_rcp(t)
        raw = torch.bmm(p, t.transpose(1, 2))
        # The L2 normalisation is folded into the [g, c, c] scores (c < D: fewer flops and
        # memory passes than normalising the [g, c, D] rows).
        s = raw * rp[:, :, None]
        s.mul_((rt / tau)[:, None, :])
        keep, nc, nd = _keep_mask(t, rt, valid, masked, threshold, True)
        s_ii = s.diagonal(dim1=1, dim2=2).clone()
        s.masked_fill_(~keep, float("-inf"))
        l = torch.logsumexp(s, -1)
        r = idx[valid]
        lse[r] = l[valid]
        loss[r] = (l - s_ii)[valid]
        if masked:
            negcnt[r] = nc[valid].to(torch.int32)
            ndup[r] = nd[valid].to(torch.int32)
        else:
            negcnt[r] = valid.sum(-1, keepdim=True).expand_as(valid)[valid].to(torch.int32)
        if need_grad:
            prob = torch.exp_(s.sub_(l[..., None]))
            gx = _unit_grad(p, t, raw, prob, rp, rt, norm, valid.to(torch.float32), tau)
            gbuf.index_copy_(0, torch.where(valid, src, n).reshape(-1), gx.view(-1, gx.shape[-1]))
    return lse, loss, negcnt, ndup, gbuf


def _bwd_chunked(pred: Tensor, target: Tensor, row_index: Tensor, seg_offsets: Tensor,
                 seg_mask_neg: Tensor, row_lse: Tensor, row_w: Tensor, row_ndup: Tensor,
                 tau: float, threshold: float) -> Tensor:
    """The backward by recomputation (the Triton kernel's algorithm), for a forward that did
    not keep the gradient buffer."""
    grad = pred.new_zeros(pred.shape, dtype=torch.float32)
    rows = row_index.numel()
    starts = seg_offsets[:-1].to(torch.int64).clamp(max=max(rows - 1, 0))
    # w is constant within a segment; zero for skipped segments, which need no work.
    active = row_w[starts] != 0 if rows else None
    for idx, valid, masked in _batches(seg_offsets, seg_mask_neg, active):
        src = row_index[idx]
        p, t = _gather(pred, src), _gather(target, src)
        norm, rp = _norm_rcp(p)
        _, rt = _norm_rcp(t)
        raw = torch.bmm(p, t.transpose(1, 2))
        s = raw * rp[:, :, None]
        s.mul_((rt / tau)[:, None, :])
        want_dup = masked and bool((row_ndup[idx] * valid).any())
        keep, _, _ = _keep_mask(t, rt, valid, masked, threshold, want_dup)
        prob = torch.exp_(s.sub_(row_lse[idx][..., None])).masked_fill_(~keep, 0.0)
        gx = _unit_grad(p, t, raw, prob, rp, rt, norm, row_w[idx] * valid, tau)
        grad.index_add_(0, src.reshape(-1), gx.view(-1, gx.shape[-1]))
    return grad


# --------------------------------------------------------------------------------------------
# The registered op
# --------------------------------------------------------------------------------------------


def _resolve_impl(impl: str, x: Tensor) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        forced = forced_kernels()
        if forced is not None:
            return "triton" if forced == "triton" else "chunked"
        return "triton" if x.is_cuda else "chunked"
    return impl


def _keeps_grad(impl: str, need_grad: bool) -> bool:
    """Whether the forward returns the gradient buffer (chunked path, gradient wanted)."""
    return need_grad and impl == "chunked"


@torch.library.custom_op("olmoearth_fast::masked_neg_loss", mutates_args=())
def _masked_neg_loss_op(
    pred: Tensor,
    target: Tensor,
    row_index: Tensor,
    seg_offsets: Tensor,
    seg_modality: Tensor,
    seg_mask_neg: Tensor,
    num_modalities: int,
    tau: float,
    threshold: float,
    impl: str,
    need_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    impl = _resolve_impl(impl, pred)
    with torch.autocast(device_type=pred.device.type, enabled=False):
        if impl == "triton":
            from olmoearth_fast.kernels.masked_neg_loss import masked_neg_loss_fwd

            lse, loss, negcnt, ndup = masked_neg_loss_fwd(pred, target, row_index, seg_offsets,
                                                          seg_mask_neg, tau, threshold)
            gbuf = pred.new_empty(0, pred.shape[1], dtype=torch.float32)
        else:
            lse, loss, negcnt, ndup, gbuf = _fwd_chunked(pred, target, row_index, seg_offsets,
                                                         seg_mask_neg, tau, threshold,
                                                         _keeps_grad(impl, need_grad))
        mod_loss, row_coef = _reduce_rows(loss, negcnt, seg_offsets, seg_modality, seg_mask_neg,
                                          num_modalities, tau)
    return mod_loss, lse, row_coef, ndup, gbuf


@_masked_neg_loss_op.register_fake
def _(pred, target, row_index, seg_offsets, seg_modality, seg_mask_neg, num_modalities, tau,
      threshold, impl, need_grad):
    rows = row_index.shape[0]
    keep = _keeps_grad(_resolve_impl(impl, pred), need_grad)
    return (pred.new_empty(num_modalities, dtype=torch.float32),
            pred.new_empty(rows, dtype=torch.float32),
            pred.new_empty(rows, dtype=torch.float32),
            pred.new_empty(rows, dtype=torch.int32),
            pred.new_empty(pred.shape[0] + 1 if keep else 0, pred.shape[1], dtype=torch.float32))


@torch.library.custom_op("olmoearth_fast::masked_neg_loss_backward", mutates_args=())
def _masked_neg_loss_backward_op(
    grad_loss: Tensor,
    pred: Tensor,
    target: Tensor,
    row_index: Tensor,
    seg_offsets: Tensor,
    seg_modality: Tensor,
    seg_mask_neg: Tensor,
    row_lse: Tensor,
    row_coef: Tensor,
    row_ndup: Tensor,
    grad_buf: Tensor,
    tau: float,
    threshold: float,
    impl: str,
) -> Tensor:
    impl = _resolve_impl(impl, pred)
    with torch.autocast(device_type=pred.device.type, enabled=False):
        seg, _ = _row_segments(seg_offsets, row_index.numel())
        # row_coef is 0 outside segments and in skipped ones.
        row_w = row_coef * grad_loss.to(torch.float32)[seg_modality.to(torch.int64)[seg]]
        if grad_buf.shape[0] == pred.shape[0] + 1:
            # Row i of the loss depends on p_i only, so the gradient is the per-row unit
            # gradient of the forward times w_i (rows outside segments add w = 0).
            scale = row_w.new_zeros(pred.shape[0]).index_add_(0, row_index, row_w)
            grad = grad_buf[:-1] * scale[:, None]
        elif impl == "triton":
            from olmoearth_fast.kernels.masked_neg_loss import masked_neg_loss_bwd

            grad = masked_neg_loss_bwd(pred, target, row_index, seg_offsets, seg_mask_neg,
                                       row_lse, row_w, row_ndup, tau, threshold)
        else:
            grad = _bwd_chunked(pred, target, row_index, seg_offsets, seg_mask_neg, row_lse,
                                row_w, row_ndup, tau, threshold)
    return grad.to(pred.dtype)


@_masked_neg_loss_backward_op.register_fake
def _(grad_loss, pred, target, row_index, seg_offsets, seg_modality, seg_mask_neg, row_lse,
      row_coef, row_ndup, grad_buf, tau, threshold, impl):
    return pred.new_empty(pred.shape)


def _setup_context(ctx, inputs, output) -> None:
    (pred, target, row_index, seg_offsets, seg_modality, seg_mask_neg, _, tau, threshold,
     impl, _) = inputs
    _, row_lse, row_coef, row_ndup, grad_buf = output
    ctx.save_for_backward(pred, target, row_index, seg_offsets, seg_modality, seg_mask_neg,
                          row_lse, row_coef, row_ndup, grad_buf)
    ctx.tau, ctx.threshold, ctx.impl = tau, threshold, impl


def _backward(ctx, grad_loss, *unused):
    grad_pred = _masked_neg_loss_backward_op(grad_loss, *ctx.saved_tensors, ctx.tau,
                                             ctx.threshold, ctx.impl)
    return (grad_pred,) + (None,) * 10


_masked_neg_loss_op.register_autograd(_backward, setup_context=_setup_context)


def _check_packed(pred: Tensor, target: Tensor, row_index: Tensor | None, seg_offsets: Tensor,
                  seg_modality: Tensor, seg_mask_neg: Tensor, num_modalities: int) -> None:
    if pred.dim() != 2 or not pred.is_floating_point():
        raise ValueError(f"pred must be a float [N, D] tensor, got {pred.dtype} "
                         f"{tuple(pred.shape)}")
    if target.shape != pred.shape or not target.is_floating_point():
        raise ValueError(f"target must be a float tensor of pred's shape {tuple(pred.shape)}, "
                         f"got {target.dtype} {tuple(target.shape)}")
    if target.requires_grad and torch.is_grad_enabled():
        raise ValueError("target must not require grad: the loss returns no target gradient "
                         "(targets come from the frozen target path); pass target.detach()")
    if row_index is not None and (row_index.dtype != torch.int64 or row_index.dim() != 1):
        raise ValueError(f"row_index must be a 1-D int64 tensor, got {row_index.dtype} "
                         f"{tuple(row_index.shape)}")
    if seg_offsets.dtype != torch.int32 or seg_offsets.dim() != 1 or seg_offsets.numel() < 2:
        raise ValueError("seg_offsets must be a 1-D int32 tensor [S+1] with S >= 1, got "
                         f"{seg_offsets.dtype} {tuple(seg_offsets.shape)}")
    num_seg = seg_offsets.numel() - 1
    if seg_modality.shape != (num_seg,) or seg_modality.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"seg_modality must be an int32/int64 tensor [S] = [{num_seg}], got "
                         f"{seg_modality.dtype} {tuple(seg_modality.shape)}")
    if seg_mask_neg.shape != (num_seg,) or seg_mask_neg.dtype != torch.bool:
        raise ValueError(f"seg_mask_neg must be a bool tensor [S] = [{num_seg}], got "
                         f"{seg_mask_neg.dtype} {tuple(seg_mask_neg.shape)}")
    if num_modalities < 1:
        raise ValueError(f"num_modalities must be >= 1, got {num_modalities}")
    for name, x in (("target", target), ("row_index", row_index), ("seg_offsets", seg_offsets),
                    ("seg_modality", seg_modality), ("seg_mask_neg", seg_mask_neg)):
        if x is not None and x.device != pred.device:
            raise ValueError(f"{name} is on {x.device}, pred on {pred.device}")


def masked_neg_loss(
    pred: Tensor,
    target: Tensor,
    seg_offsets: Tensor,
    seg_modality: Tensor,
    seg_mask_neg: Tensor,
    num_modalities: int,
    *,
    row_index: Tensor | None = None,
    tau: float = 0.1,
    same_target_threshold: float = 0.999,
    impl: str = "auto",
) -> Tensor:
    """Per-modality masked-negatives patch-discrimination losses on packed DECODER tokens.

    Args:
        pred: [N, D] predictions, any float dtype (computed in fp32, autocast off).
        target: [N, D] targets, no grad.
        seg_offsets: [S+1] int32 boundaries of the (modality, sample) segments over packed
            rows, like cu_seqlens (non-decreasing; packed rows past seg_offsets[-1] are ignored).
        seg_modality: [S] int modality index in [0, num_modalities) of each segment.
        seg_mask_neg: [S] bool, whether the segment masks same-target negatives.
        num_modalities: M, the length of the result.
        row_index: optional [R] int64 buffer row of each packed row (injective on segment
            rows), so callers need not copy the rows into packed order; None = identity.
        tau: softmax temperature.
        same_target_threshold: strict cosine threshold for "same target".
        impl: "auto" (Triton on CUDA, chunked PyTorch on CPU), "triton" or "chunked".

    Returns:
        [M] fp32 losses L_m (0 for a modality without a counted segment); the reference's
        total is `weight * result.sum()`. Differentiable with respect to `pred` (buffer rows
        outside every segment get zero gradient).
    """
    _check_packed(pred, target, row_index, seg_offsets, seg_modality, seg_mask_neg,
                  num_modalities)
    _resolve_impl(impl, pred)
    if row_index is None:
        row_index = torch.arange(pred.shape[0], device=pred.device)
    need_grad = pred.requires_grad and torch.is_grad_enabled()
    return _masked_neg_loss_op(pred, target, row_index, seg_offsets, seg_modality, seg_mask_neg,
                               num_modalities, float(tau), float(same_target_threshold), impl,
                               need_grad)[0]


def masked_neg_loss_ref(
    pred: Tensor,
    target: Tensor,
    seg_offsets: Tensor,
    seg_modality: Tensor,
    seg_mask_neg: Tensor,
    num_modalities: int,
    *,
    row_index: Tensor | None = None,
    tau: float = 0.1,
    same_target_threshold: float = 0.999,
) -> Tensor:
    """`masked_neg_loss` as a plain per-segment loop (autograd, host syncs); the test oracle."""
    _check_packed(pred, target, row_index, seg_offsets, seg_modality, seg_mask_neg,
                  num_modalities)
    if row_index is not None:
        pred, target = pred[row_index], target[row_index]
    off = seg_offsets.tolist()
    mods = seg_modality.tolist()
    flags = seg_mask_neg.tolist()
    terms: list[list[Tensor]] = [[] for _ in range(num_modalities)]
    with torch.autocast(device_type=pred.device.type, enabled=False):
        for s in range(len(off) - 1):
            c = off[s + 1] - off[s]
            if c == 0:
                continue
            p = F.normalize(pred[off[s]:off[s + 1]].float(), p=2, dim=-1)
            t = F.normalize(target[off[s]:off[s + 1]].float(), p=2, dim=-1)
            scores = p @ t.T / tau
            if flags[s] and c > 1:
                same = t @ t.T > same_target_threshold
                if bool(((~same).sum(-1) == 0).any()):
                    continue  # skipped: some token has no valid negative
                eye = torch.eye(c, dtype=torch.bool, device=pred.device)
                scores = scores.masked_fill(same & ~eye, float("-inf"))
            labels = torch.arange(c, device=pred.device)
            terms[mods[s]].append(F.cross_entropy(scores, labels) * (2 * tau))
        # 0 * sum keeps a modality without counted segments in the graph (zero gradient).
        zero = pred.float().sum() * 0.0
        return torch.stack([torch.stack(x).mean() if x else zero for x in terms])
