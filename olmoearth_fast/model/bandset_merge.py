"""Bandset merge / unmerge (experiments 9, 10, 12; docs/reference_semantics.md §4.5, §5.4).

Merge, for a modality with S > 1 bandsets, at each token position:
    zero every bandset whose mask is not ONLINE; merged = MLP(concat_s tokens_s) · S / max(1, #ONLINE)
    with MLP = Linear(S·D → D) → GELU → Linear(D → D); merged mask = ONLINE if any bandset is
    ONLINE, else the minimum of the bandset mask codes.
The MLP runs only on positions with an ONLINE bandset (the only ones the encoder keeps), laid out
by the C++ `merge_index` op: ``merge_gather`` builds the ``[M, S·D]`` input with exact zeros for
non-ONLINE bandsets, and the result is scattered back to ``[B·P, D]``.

Unmerge, at the decoder input: Linear(D → S·D) on each merged token, reshaped to S bandset
tokens; the decoder then uses the original per-bandset masks.

The reference built these modules before the encoder's xavier re-initialisation, so their
intended mean-pool init was overwritten: xavier weights and zero biases here too.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from olmoearth_fast.modalities import MaskValue
from olmoearth_fast.ops.packing import merge_gather, merge_index, scatter_rows


def merged_mask(mask: Tensor) -> Tensor:
    """[..., S] bandset codes → [..., 1]: ONLINE if any is ONLINE, else the minimum code."""
    online = (mask == MaskValue.ONLINE_ENCODER).any(-1, keepdim=True)
    return torch.where(online, torch.zeros_like(mask[..., :1]), mask.min(-1, keepdim=True).values)


class BandsetMerge(nn.Module):
    def __init__(self, embedding_size: int, num_bandsets: int):
        super().__init__()
        self.num_bandsets = num_bandsets
        self.proj = nn.Sequential(nn.Linear(num_bandsets * embedding_size, embedding_size), nn.GELU(),
                                  nn.Linear(embedding_size, embedding_size))

    def forward(self, tokens: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """tokens [B, *grid, S, D], mask [B, *grid, S] → merged [B, *grid, 1, D], mask [B, *grid, 1]."""
        *lead, s, d = tokens.shape
        rows = tokens.reshape(-1, d)
        keep = (mask == MaskValue.ONLINE_ENCODER).reshape(lead[0], -1, s)
        positions, mmap, _, _ = merge_index(keep)
        merged_in = merge_gather(rows, mmap)  # [M, S·D], zeros for non-ONLINE bandsets
        n_online = (mmap >= 0).sum(1, keepdim=True).clamp(min=1)
        merged = self.proj(merged_in) * (s / n_online).to(merged_in.dtype)
        out = scatter_rows(merged, positions, keep.shape[0] * keep.shape[1])
        return out.reshape(*lead, 1, d), merged_mask(mask)

    def forward_ref(self, tokens: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Dense reference of `forward` (every position through the MLP, as the reference does)."""
        online = (mask == MaskValue.ONLINE_ENCODER).unsqueeze(-1)
        x = (tokens * online).flatten(-2)
        scale = mask.shape[-1] / online.sum(-2).clamp(min=1)
        out = self.proj(x) * scale
        out = torch.where(online.any(-2), out, torch.zeros_like(out))  # positions the encoder drops
        return out.unsqueeze(-2), merged_mask(mask)


class BandsetUnmerge(nn.Module):
    def __init__(self, embedding_size: int, num_bandsets: int):
        super().__init__()
        self.num_bandsets = num_bandsets
        self.proj = nn.Linear(embedding_size, num_bandsets * embedding_size)

    def forward(self, tokens: Tensor) -> Tensor:
        """[..., 1, D] → [..., S, D]."""
        out = self.proj(tokens.squeeze(-2))
        return out.unflatten(-1, (self.num_bandsets, -1))

