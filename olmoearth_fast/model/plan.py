"""The host-side plan of a microbatch: every data-dependent index the step needs, from CPU masks.

The loader's masks live on the host. Everything in a training step whose size depends on the
masks (the token codes, the packed positions of the ONLINE and DECODER tokens, their
``cu_seqlens`` and longest lengths, the loss's (view, sample, modality) segments) is computed
here, on the CPU, before the microbatch goes to the device, and copied with it (pinned,
non-blocking). The device step then never reads a size back: on CUDA each such read
(`.item()`, `nonzero`, a `varlen_index` whose output length is data-dependent) is a host sync
that stalls the launch queue, and a pageable host-to-device copy is one too.

The loader makes the plans of each batch with the batch (`BatchPlanner`, in its worker
processes), so the thread that feeds the device only copies them.

The model takes the plan's packings in place of packing on the device (`LatentMIM.forward`'s
``plan``); without a plan (evaluation, embedding export) it packs on the device as before, with
the same result. The bandset-merge experiments (9, 10, 12) pack their merged tokens on the
device: the merge's index depends on per-bandset codes the plan does not carry.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from olmoearth_fast.modalities import MODALITIES, MaskValue, TokenizationConfig
from olmoearth_fast.model.attention import Segments
from olmoearth_fast.model.layout import TokenLayout
from olmoearth_fast.ops.packing import varlen_index

ONLINE, DECODER = int(MaskValue.ONLINE_ENCODER), int(MaskValue.DECODER)


@dataclass
class EmbedRows:
    """Which patch-embedding tokens the packed positions of a ``[V·B, N]`` batch read.

    ``parts[(modality, bandset)] = (rows, view)``: the token-grid rows (``((b·T + t)·h + i)·w +
    j`` for spatial modalities, ``b·T + t`` for time-only ones, b the sample in the un-stacked
    batch) of the positions of that bandset, in packed order, and the view each belongs to.
    ``order [total]``: packed slot k is row ``order[k]`` of the parts' outputs concatenated in
    ``parts``' order. `MultiModalPatchEmbeddings.packed` embeds exactly these tokens.
    """

    parts: dict[tuple[str, int], tuple[Tensor, Tensor]]
    order: Tensor

    @classmethod
    def build(cls, layout: TokenLayout, index: Tensor, batch: int) -> EmbedRows:
        """From flat positions ``index`` (``vb·N + n`` of a ``[V·B, N]`` stack of ``layout``
        with ``batch`` samples per view), on ``index``'s device.

        Each position's segment and bandset give it a key (the parts' order); one stable sort
        by key is ``order``'s inverse and cuts the positions into the parts, so the work is a
        few passes over ``index`` whatever the number of (modality, bandset) parts (`build_ref`
        makes one pass per part).
        """
        n_tok = layout.seqlen
        vb, n = index // n_tok, index % n_tok
        b, view = vb % batch, vb // batch
        segs = layout.segments
        dev, dt = index.device, index.dtype
        starts = torch.tensor([s.offset for s in segs], dtype=dt, device=dev)
        seg = torch.searchsorted(starts, n, right=True) - 1
        table = torch.tensor([[s.offset, s.bs, s.t, s.h * s.w if MODALITIES[s.modality].is_spatial else 1,
                               sum(x.bs for x in segs[:i])] for i, s in enumerate(segs)], dtype=dt, device=dev)
        offset, bs, t_len, cells, key0 = table[seg].unbind(1)
        local = n - offset
        bandset = local % bs
        t = (local // bs) % t_len
        rows = (b * t_len + t) * cells + local // (bs * t_len) % cells  # cell = i·w + j (0: time-only)
        key = key0 + bandset
        perm = torch.sort(key, stable=True).indices
        counts = torch.bincount(key, minlength=int(sum(s.bs for s in segs))).tolist()
        rows, view = rows[perm].split(counts), view[perm].split(counts)
        names = [(s.modality, k) for s in segs for k in range(s.bs)]
        order = torch.empty_like(index)
        order[perm] = torch.arange(index.shape[0], device=dev, dtype=dt)
        return cls({k: (r, v) for k, r, v in zip(names, rows, view)}, order)

    @classmethod
    def build_ref(cls, layout: TokenLayout, index: Tensor, batch: int) -> EmbedRows:
        """`build`, one pass over ``index`` per (modality, bandset) part."""
        n_tok = layout.seqlen
        vb, n = index // n_tok, index % n_tok
        b, view = vb % batch, vb // batch
        parts, picks = {}, []
        for s in layout.segments:
            local = n - s.offset
            in_seg = (local >= 0) & (local < s.numel)
            bandset = local % s.bs
            t = (local // s.bs) % s.t
            if MODALITIES[s.modality].is_spatial:
                cell = local // (s.bs * s.t)  # i·w + j
                rows = (b * s.t + t) * (s.h * s.w) + cell
            else:
                rows = b * s.t + t
            for k in range(s.bs):
                pick = torch.nonzero(in_seg & (bandset == k)).flatten()
                parts[(s.modality, k)] = (rows[pick], view[pick])
                picks.append(pick)
        order = torch.empty_like(index)
        order[torch.cat(picks)] = torch.arange(index.shape[0], device=index.device)
        return cls(parts, order)

    def to(self, device: torch.device, non_blocking: bool = False) -> EmbedRows:
        return EmbedRows({k: (r.to(device, non_blocking=non_blocking), v.to(device, non_blocking=non_blocking))
                          for k, (r, v) in self.parts.items()}, self.order.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> EmbedRows:
        return EmbedRows({k: (r.pin_memory(), v.pin_memory()) for k, (r, v) in self.parts.items()},
                         self.order.pin_memory())


@dataclass
class PackPlan:
    """Where the kept tokens of a ``[V·B, N]`` batch go in the packed ``[total, D]`` buffer."""

    index: Tensor  # [total] flat positions b*N + n, sample-major
    seg: Segments
    rows: EmbedRows | None = None  # the patch-embedding tokens they read (`build` with a layout)

    @classmethod
    def build(cls, keep: Tensor, layout: TokenLayout | None = None) -> PackPlan:
        """From ``keep [V·B, N]`` (bool): indices, cu_seqlens, lengths (read on the host: free for
        a host ``keep``, a device sync otherwise) and, given its ``layout``, the `EmbedRows`."""
        index, cu_seqlens, max_seqlen = varlen_index(keep)
        host = cu_seqlens.tolist()
        seg = Segments.from_cu_seqlens(cu_seqlens, index.shape[0], int(max_seqlen))
        seg._host = host
        return cls(index, seg, None if layout is None else EmbedRows.build(layout, index, layout.batch))

    def to(self, device: torch.device, non_blocking: bool = False) -> PackPlan:
        return PackPlan(self.index.to(device, non_blocking=non_blocking), self.seg.to(device, non_blocking),
                        None if self.rows is None else self.rows.to(device, non_blocking))

    def pin_memory(self) -> PackPlan:
        return PackPlan(self.index.pin_memory(), self.seg.pin_memory(),
                        None if self.rows is None else self.rows.pin_memory())


@dataclass
class BranchDrop:
    """Stochastic depth of one residual branch, drawn on the host: which samples keep it.

    ``keep [B]`` (bool) is the per-sample Bernoulli(1 − rate) draw. Where some samples drop the
    branch and some keep it, ``rows`` (the kept samples' packed rows) and ``seg`` (their
    segments) let the block compute the branch for the kept samples only: a dropped sample's
    branch output is multiplied by 0 and its gradient is 0, so skipping it changes nothing
    (`model.attention.Block`). Both None when every sample keeps the branch, or none does (then
    the block runs it on every row and multiplies, so that its parameters still get a
    gradient, zero, as the reference's).
    """

    keep: Tensor
    rate: float
    rows: Tensor | None = None
    seg: Segments | None = None
    # the factor of the branch output at the rows that add it, a host float (`from_keep`):
    # `keep_factor(rate)` where some sample keeps the branch, 0 where none does; None: the
    # per-sample multiply by ``keep`` (`model.attention.drop_path`)
    factor: float | None = None

    @classmethod
    def draw(cls, seg: Segments, rate: float, generator: torch.Generator | None = None) -> BranchDrop:
        """One draw for the samples of host segments ``seg`` (from ``generator``, or the global
        CPU generator)."""
        return cls.from_keep(seg, torch.rand(seg.batch, generator=generator) < 1.0 - rate, rate)

    @classmethod
    def from_keep(cls, seg: Segments, keep: Tensor, rate: float) -> BranchDrop:
        """From a host draw ``keep [B]`` (bool) over host segments ``seg``. Small arrays (B
        entries) in numpy, where a torch op costs more than its work: 2 × depth of these a
        microbatch."""
        kept = keep.numpy()
        if kept.all() or not kept.any():
            return cls(keep, rate, factor=keep_factor(rate) if kept.any() else 0.0)
        cu = np.asarray(seg.host(), dtype=np.int64)
        starts, lengths = cu[:-1][kept], np.diff(cu)[kept]
        cu_kept = np.zeros(len(lengths) + 1, dtype=np.int32)
        np.cumsum(lengths, out=cu_kept[1:])
        total = int(cu_kept[-1])
        # the kept samples' rows, start_i .. start_i + length_i - 1 each
        rows = np.arange(total, dtype=np.int64) + np.repeat(starts - cu_kept[:-1], lengths)
        sub = Segments(torch.from_numpy(cu_kept),
                       torch.from_numpy(np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)),
                       int(lengths.max()), None, cu_kept.tolist())
        return cls(keep, rate, torch.from_numpy(rows), sub, keep_factor(rate))

    @classmethod
    def from_keep_ref(cls, seg: Segments, keep: Tensor, rate: float) -> BranchDrop:
        """`from_keep` with a torch op per kept sample."""
        kept = keep.tolist()
        if all(kept) or not any(kept):
            return cls(keep, rate, factor=keep_factor(rate) if any(kept) else 0.0)
        cu = seg.host()
        lengths = [cu[i + 1] - cu[i] for i in range(seg.batch) if kept[i]]
        rows = torch.cat([torch.arange(cu[i], cu[i + 1]) for i in range(seg.batch) if kept[i]])
        cu_kept = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        sub = Segments.from_cu_seqlens(cu_kept, rows.shape[0], max(lengths))
        sub._host = cu_kept.tolist()
        return cls(keep, rate, rows, sub, keep_factor(rate))

    def to(self, device: torch.device, non_blocking: bool = False) -> BranchDrop:
        return BranchDrop(self.keep.to(device, non_blocking=non_blocking), self.rate,
                          None if self.rows is None else self.rows.to(device, non_blocking=non_blocking),
                          None if self.seg is None else self.seg.to(device, non_blocking), self.factor)

    def pin_memory(self) -> BranchDrop:
        return BranchDrop(self.keep.pin_memory(), self.rate, None if self.rows is None else self.rows.pin_memory(),
                          None if self.seg is None else self.seg.pin_memory(), self.factor)


def keep_factor(rate: float) -> float:
    """A kept branch's DropPath factor 1/(1 − rate), rounded to fp32 as PyTorch's fp32
    ``torch.ones(()) / (1 - rate)`` rounds it (an IEEE fp32 division)."""
    return float(np.float32(1.0) / np.float32(1.0 - rate))


def draw_drop_path(seg: Segments, depth: int, rate: float,
                   generator: torch.Generator | None = None) -> list[tuple[BranchDrop, BranchDrop]]:
    """The (attention, MLP) branch draws of ``depth`` blocks over host segments ``seg``."""
    return [(BranchDrop.draw(seg, rate, generator), BranchDrop.draw(seg, rate, generator)) for _ in range(depth)]


@dataclass
class LossSegments:
    """The masked-negatives loss's segments over the packed DECODER tokens (sample-major,
    modality-major within a sample: segment s = (view·B + b)·M + m)."""

    seg_offsets: Tensor  # int32 [V·B·M + 1]
    seg_modality: Tensor  # int32 [V·B·M], view·M + m (one loss per view and modality)
    seg_mask_neg: Tensor  # bool [V·B·M]

    def to(self, device: torch.device, non_blocking: bool = False) -> LossSegments:
        return LossSegments(*(t.to(device, non_blocking=non_blocking) for t in self))

    def pin_memory(self) -> LossSegments:
        return LossSegments(*(t.pin_memory() for t in self))

    def __iter__(self):
        return iter((self.seg_offsets, self.seg_modality, self.seg_mask_neg))


@dataclass
class MicrobatchPlan:
    layout: TokenLayout
    masks: Tensor  # [V·B, N] token codes (int64)
    online: PackPlan | None  # None for the bandset-merge experiments (packed on the device)
    decoder: PackPlan
    loss: LossSegments
    num_views: int
    # the encoder blocks' stochastic depth (`draw_drop_path`), None where it is drawn on the device
    drop_path: list[tuple[BranchDrop, BranchDrop]] | None = None

    def to(self, device: torch.device, non_blocking: bool = False) -> MicrobatchPlan:
        return MicrobatchPlan(self.layout, self.masks.to(device, non_blocking=non_blocking),
                              None if self.online is None else self.online.to(device, non_blocking),
                              self.decoder.to(device, non_blocking), self.loss.to(device, non_blocking),
                              self.num_views, None if self.drop_path is None else
                              [(a.to(device, non_blocking), m.to(device, non_blocking)) for a, m in self.drop_path])

    def pin_memory(self) -> MicrobatchPlan:
        return MicrobatchPlan(self.layout, self.masks.pin_memory(),
                              None if self.online is None else self.online.pin_memory(),
                              self.decoder.pin_memory(), self.loss.pin_memory(), self.num_views,
                              None if self.drop_path is None else
                              [(a.pin_memory(), m.pin_memory()) for a, m in self.drop_path])


def plan_microbatch(layout: TokenLayout, view_masks: list[dict[str, Tensor]], merge_bandsets: bool,
                    mask_negatives_for: tuple[str, ...] | None,
                    drop_path: tuple[int, float] | None = None,
                    generator: torch.Generator | None = None) -> MicrobatchPlan:
    """The plan of one microbatch from its host pixel masks (one dict per view).

    ``drop_path`` (encoder depth, rate) also draws the encoder's stochastic depth here, on the
    host, from ``generator`` (default: the global CPU generator); not with the bandset merge,
    whose packing the plan does not hold."""
    masks = torch.cat([layout.token_masks(m) for m in view_masks])  # [V·B, N]
    if masks.is_cuda:
        raise ValueError("plan_microbatch: masks must be on the host (plan before moving the batch)")
    views = len(view_masks)
    # the token rows the packed patch embedding reads (the merge models embed every position)
    rows_of = None if merge_bandsets else layout
    online = None if merge_bandsets else PackPlan.build(masks == ONLINE, rows_of)
    decoder = PackPlan.build(masks == DECODER, rows_of)
    mods = layout.modalities
    m = len(mods)
    counts = torch.stack([(masks[:, s.slice] == DECODER).sum(1) for s in layout.segments], 1)  # [V·B, M]
    seg_offsets = torch.zeros(counts.numel() + 1, dtype=torch.int32)
    seg_offsets[1:] = counts.flatten().cumsum(0)
    b = masks.shape[0] // views
    view_of_row = torch.arange(views * b) // b
    seg_modality = (torch.arange(m)[None, :] + m * view_of_row[:, None]).flatten().to(torch.int32)
    flags = torch.tensor([mask_negatives_for is None or mod in mask_negatives_for for mod in mods])
    drops = None
    if drop_path is not None and drop_path[1] > 0 and online is not None:
        drops = draw_drop_path(online.seg, *drop_path, generator)
    return MicrobatchPlan(layout, masks, online, decoder,
                          LossSegments(seg_offsets, seg_modality, flags.repeat(views * b)), views, drops)


@dataclass(frozen=True)
class BatchPlanner:
    """The plans of a rank batch's microbatches, made where the batch is made.

    The loader calls it for every batch (`OlmoEarthLoader(planner=...)`, in its worker
    processes when it has any), so that the training step finds its plans ready and the host
    thread that feeds the device only copies them. The DropPath draws come from a generator
    seeded per batch, so a batch's plans are the same wherever and whenever they are made.
    `LatentMIM.batch_planner` makes one from a model's settings.
    """

    tokenization: TokenizationConfig
    modalities: tuple[str, ...]
    merge_bandsets: bool
    mask_negatives_for: tuple[str, ...] | None
    microbatch_size: int
    drop_path: tuple[int, float] | None  # (encoder depth, rate)

    def __call__(self, batch, seed: int) -> list[MicrobatchPlan]:
        """Plans of ``batch`` (`data.collate.MaskedViews`) split into microbatches."""
        gen = torch.Generator().manual_seed(seed)
        plans = []
        for mb in batch.microbatches(self.microbatch_size):
            layout = TokenLayout.build(mb.data, mb.patch_size, self.tokenization, self.modalities)
            plans.append(plan_microbatch(layout, mb.masks, self.merge_bandsets, self.mask_negatives_for,
                                         self.drop_path, gen))
        return plans
