"""Token layout: how per-modality token grids are laid out in one per-sample sequence.

Each modality m contributes a block of tokens ``[h, w, T, BS]`` (spatial; T = 1 for maps) or
``[T, BS]`` (time-only era5_10), flattened row-major (bandset fastest, then t, then w, then h) as
in the reference, and blocks are concatenated in ``LOSS_FIELD_ORDER`` (the reference's loss
order; every other computation is permutation-equivariant: docs/reference_semantics.md §2.3).
A flat token position is ``b * N + n``. The layout is pure metadata (Python ints), computed once
per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from olmoearth_fast.modalities import LOSS_FIELD_ORDER, MODALITIES, TokenizationConfig


@dataclass(frozen=True)
class Segment:
    modality: str
    h: int
    w: int
    t: int
    bs: int
    offset: int

    @property
    def numel(self) -> int:
        return self.h * self.w * self.t * self.bs

    @property
    def grid(self) -> tuple[int, ...]:
        """Token grid shape: (h, w, t, bs) for spatial, (t, bs) for time-only modalities."""
        return (self.h, self.w, self.t, self.bs) if MODALITIES[self.modality].is_spatial else (self.t, self.bs)

    @property
    def slice(self) -> slice:
        return slice(self.offset, self.offset + self.numel)


@dataclass(frozen=True)
class TokenLayout:
    batch: int  # of the data it was built from (views stacked along B have V·batch rows)
    segments: tuple[Segment, ...]
    patch_size: int

    @property
    def seqlen(self) -> int:
        return sum(s.numel for s in self.segments)

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(s.modality for s in self.segments)

    def segment(self, modality: str) -> Segment:
        for s in self.segments:
            if s.modality == modality:
                return s
        raise KeyError(f"modality {modality!r} is not in this batch (has {self.modalities})")

    @classmethod
    def build(cls, data: dict[str, Tensor], patch_size: int, tokenization: TokenizationConfig,
              modalities: tuple[str, ...] | None = None) -> TokenLayout:
        """Layout of the modalities in ``data`` (``[B,H,W,T,C]`` or ``[B,T,C]`` tensors)."""
        names = [m for m in LOSS_FIELD_ORDER if m in data and (modalities is None or m in modalities)]
        if not names:
            raise ValueError(f"no supported modality in the batch: got {sorted(data)}")
        segments, offset, batch = [], 0, None
        for m in names:
            x = data[m]
            bs = tokenization.num_bandsets(m)
            if MODALITIES[m].is_spatial:
                b, hh, ww, t, _ = x.shape
                if hh % patch_size or ww % patch_size:
                    raise ValueError(f"{m}: image {hh}x{ww} is not divisible by patch size {patch_size}")
                seg = Segment(m, hh // patch_size, ww // patch_size, t, bs, offset)
            else:
                b, t, _ = x.shape
                seg = Segment(m, 1, 1, t, bs, offset)
            if batch is not None and b != batch:
                raise ValueError(f"{m}: batch size {b} differs from {batch} of {names[0]}")
            batch = b
            segments.append(seg)
            offset += seg.numel
        return cls(batch, tuple(segments), patch_size)

    def flatten(self, per_modality: dict[str, Tensor]) -> Tensor:
        """{m: [B, *grid, ...]} → [B, N, ...] in layout order."""
        parts = []
        for s in self.segments:
            x = per_modality[s.modality]
            parts.append(x.reshape(x.shape[0], s.numel, *x.shape[1 + len(s.grid):]))
        return torch.cat(parts, dim=1)

    def unflatten(self, x: Tensor) -> dict[str, Tensor]:
        """[B, N, ...] → {m: [B, *grid, ...]}."""
        return {s.modality: x[:, s.slice].reshape(x.shape[0], *s.grid, *x.shape[2:]) for s in self.segments}

    def token_masks(self, pixel_masks: dict[str, Tensor]) -> Tensor:
        """Pixel masks {m: [B,H,W,T,BS] | [B,T,BS]} → token mask codes [B, N] (long).

        A token's value is its patch's top-left pixel (docs/reference_semantics.md §2.2).
        """
        p = self.patch_size
        per = {}
        for s in self.segments:
            mk = pixel_masks[s.modality]
            per[s.modality] = mk[:, ::p, ::p] if MODALITIES[s.modality].is_spatial else mk
        return self.flatten(per).long()
