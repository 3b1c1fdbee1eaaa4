"""Batch type and collation: one crop of B samples, independently masked into views.

The reference's `collate_double_masked_batched` stacks the samples and applies the masking
strategy twice to the same stacked data (views A and B share crop, months and patch size).
Here the per-pixel missingness, which depends only on the data, is computed once and shared by
the views.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from olmoearth_fast.data.dataset import Sample
from olmoearth_fast.data.masking import MaskingStrategy, missing_pixel_masks


@dataclass
class MaskedViews:
    """A rank batch: shared data plus one mask dict per view.

    Attributes:
        data: modality -> float32 `[B,H,W,T,C_all]` (maps T=1) or `[B,T,C_all]` (era5_10);
            normalised, −99999 where missing, all canonical bands.
        timestamps: int64 `[B,T,3]` (day, month 0-based, year).
        masks: one dict per view: modality -> uint8 `[B,H,W,T,BS]` / `[B,T,BS]` MaskValue codes
            at pixel resolution (constant per p×p patch except MISSING); the model reads
            tokens as `mask[:, ::p, ::p]`.
        patch_size: p, shared by the batch.
        hw_p: tokens per crop side (H = W = hw_p·p).
        sample_indices: int64 `[B]` file indices (for debugging and determinism checks).
        plans: the host plans of the batch's microbatches (`model.plan.MicrobatchPlan`, one per
            microbatch, made by the loader's planner), or None (the trainer plans then).
    """

    data: dict[str, Tensor]
    timestamps: Tensor
    masks: list[dict[str, Tensor]]
    patch_size: int
    hw_p: int
    sample_indices: Tensor | None = field(default=None)
    plans: list | None = field(default=None)

    @property
    def batch_size(self) -> int:
        return int(self.timestamps.shape[0])

    @property
    def num_views(self) -> int:
        return len(self.masks)

    def _map(self, fn, plan_fn=None) -> MaskedViews:
        return MaskedViews(
            data={k: fn(v) for k, v in self.data.items()},
            timestamps=fn(self.timestamps),
            masks=[{k: fn(v) for k, v in m.items()} for m in self.masks],
            patch_size=self.patch_size,
            hw_p=self.hw_p,
            sample_indices=None if self.sample_indices is None else fn(self.sample_indices),
            plans=None if self.plans is None or plan_fn is None else [plan_fn(p) for p in self.plans],
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> MaskedViews:
        """Every tensor moved to `device` (the plans too)."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking),
                         lambda p: p.to(torch.device(device), non_blocking))

    def pin_memory(self) -> MaskedViews:
        """Page-locked copy (called by torch's DataLoader when pin_memory=True), plans too."""
        return self._map(lambda t: t.pin_memory(), lambda p: p.pin_memory())

    def microbatches(self, size: int) -> list[MaskedViews]:
        """Split along B into chunks of `size` samples (the last may be smaller), like the
        reference's `split_masked_batch(batch, rank_microbatch_size)`; each chunk keeps its
        plan where the batch has them."""
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"microbatch size must be a positive int, got {size!r}")
        starts = range(0, self.batch_size, size)
        if self.plans is not None and len(self.plans) != len(starts):
            raise ValueError(f"the batch holds {len(self.plans)} microbatch plans, not one per microbatch of "
                             f"{size} ({len(starts)}): plan it with the same microbatch size")
        out = []
        for i, s in enumerate(starts):
            mb = self._map(lambda t, s=s: t[s:s + size])
            if self.plans is not None:
                mb.plans = [self.plans[i]]
            out.append(mb)
        return out


def stack_samples(samples: Sequence[Sample]) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """Stack per-sample arrays into batch tensors (data, timestamps, sample indices).

    Raises:
        ValueError: the samples disagree on modalities or shapes.
    """
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    names = list(samples[0].data)
    data = {}
    for m in names:
        shapes = {s.data[m].shape for s in samples}
        if len(shapes) != 1:
            raise ValueError(f"samples have different {m} shapes: {sorted(shapes)}")
        data[m] = torch.from_numpy(np.stack([s.data[m] for s in samples]))
    ts = torch.from_numpy(np.stack([s.timestamps for s in samples]).astype(np.int64))
    idx = torch.tensor([s.index for s in samples], dtype=torch.int64)
    return data, ts, idx


def collate_views(
    samples: Sequence[Sample],
    patch_size: int,
    hw_p: int,
    strategy: MaskingStrategy,
    generator: torch.Generator,
    num_views: int = 2,
) -> MaskedViews:
    """Stack samples and mask them `num_views` times independently with `strategy`."""
    if num_views not in (1, 2):
        raise ValueError(f"num_views must be 1 or 2, got {num_views}")
    data, ts, idx = stack_samples(samples)
    missing = missing_pixel_masks(data, strategy.tokenization)
    masks = [strategy(data, patch_size, generator, missing) for _ in range(num_views)]
    return MaskedViews(data, ts, masks, patch_size, hw_p, idx)
