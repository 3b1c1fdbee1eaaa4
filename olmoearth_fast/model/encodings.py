"""Composite encodings: four additive slots of n = int(D/4) dims (docs/reference_semantics.md
§4.1).

    [0:n)   channel/bandset embedding, a learnable [BS, n] table per modality, zero-initialised
    [n:2n)  time index 0..T-1 (multitemporal modalities)
    [2n:3n) month of year (multitemporal): sin(2πm/12) repeated n/2 times, then the cosine
    [3n:4n) 2-D position (spatial): sincos(col·p, n/2) ++ sincos(row·p, n/2), column first

`sincos_1d` uses the reference's frequencies ω_k = 10000^(−k/(2E)) (not the usual 2k/E), so the
slowest frequency is ≈ 0.1 and the encodings are low-frequency. Everything except the channel
tables is a fixed function, computed in fp32 on the fly for any (T, h, w, p).

Encodings are evaluated only where needed: `CompositeEncodings.forward` returns them at the flat
token positions of a `TokenLayout` (or for all of them), never a full [B, N, D] tensor of
zeros-plus-slices per modality as the reference does. The parameter-free part of a layout (time
and spatial slots, and per token its channel-table row and time index) is made once per
(layout, patch size, width, device) and kept (`fixed_tables`, a small LRU): a step's crops
repeat it, and the encoder and decoder call the encodings three times a microbatch. Each call is
then 13 operators (gathers and one concatenation) instead of about 210 (the sincos
tables of every modality rebuilt), which on a GPU are as many kernel launches.
`CompositeEncodings.forward_ref` builds everything per call, as before: the same values.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from olmoearth_fast.modalities import MODALITIES


def sincos_1d(pos: Tensor, dim: int) -> Tensor:
    """[L] positions → [L, dim]: dim/2 sines then dim/2 cosines, ω_k = 10000^(−k/(2·dim))."""
    if dim % 2:
        raise ValueError(f"sincos_1d: dim must be even, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, device=pos.device, dtype=torch.float32) / dim / 2.0)
    angles = pos.reshape(-1, 1).to(torch.float32) * omega
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def month_table(dim: int) -> Tensor:
    """[12, dim]: row m = [sin(2πm/12)]·dim/2 ++ [cos(2πm/12)]·dim/2."""
    angles = torch.arange(12, dtype=torch.float32) * (2 * math.pi / 12)
    half = dim // 2
    return torch.cat([angles.sin()[:, None].expand(12, half), angles.cos()[:, None].expand(12, half)], dim=1)


def spatial_2d(h: int, w: int, patch_size: int, dim: int, device=None) -> Tensor:
    """[h, w, dim] for the token grid: column encoding first, positions scaled by the patch size."""
    rows = torch.arange(h, device=device, dtype=torch.float32) * patch_size
    cols = torch.arange(w, device=device, dtype=torch.float32) * patch_size
    enc_col = sincos_1d(cols, dim // 2)  # [w, dim/2]
    enc_row = sincos_1d(rows, dim // 2)  # [h, dim/2]
    return torch.cat([enc_col[None, :, :].expand(h, w, -1), enc_row[:, None, :].expand(h, w, -1)], dim=-1)


@dataclass(frozen=True)
class FixedTables:
    """The parameter-free part of a layout's encodings, one row per token of a sample (N rows)."""

    time_space: Tensor  # [N, 2n] fp32: the time slot, then the spatial slot (zeros where absent)
    channel_row: Tensor  # [N] long: the token's row in its layout's channel tables, concatenated
    t_index: Tensor  # [N] long: the token's time index (0 for modalities without time)
    temporal: Tensor  # [N] bool: whether the token's modality is multitemporal (gets a month)


@functools.lru_cache(maxsize=16)
def fixed_tables(segments: tuple, patch_size: int, n: int, device: torch.device) -> FixedTables:
    """`FixedTables` of a layout's ``segments`` (`model.layout.Segment`s) at slot width ``n``,
    computed by the ops `CompositeEncodings.modality_table` uses (the same values), and kept: at
    most 16 layouts, each a few MB at the largest crops. Made outside autograd, autocast and
    inference mode, so that a table first made in an eval pass serves training too."""
    with torch.inference_mode(False), torch.no_grad(), torch.autocast(device.type, enabled=False):
        time_space, channel_row, t_index, temporal = [], [], [], []
        first_row = 0
        for seg in segments:
            spec = MODALITIES[seg.modality]
            grid = (seg.h, seg.w, seg.t, seg.bs)
            ts = torch.zeros(*grid, 2 * n, dtype=torch.float32, device=device)
            if spec.is_multitemporal:
                ts[..., :n] = sincos_1d(torch.arange(seg.t, device=device), n)[None, None, :, None, :]
            if spec.is_spatial:
                ts[..., n:] = spatial_2d(seg.h, seg.w, patch_size, n, device)[:, :, None, None, :]
            time_space.append(ts.reshape(-1, 2 * n))
            channel_row.append((first_row + torch.arange(seg.bs, device=device)).expand(grid).reshape(-1))
            t_index.append(torch.arange(seg.t, device=device)[:, None].expand(grid).reshape(-1))
            temporal.append(torch.full((seg.numel,), spec.is_multitemporal, dtype=torch.bool, device=device))
            first_row += seg.bs
        return FixedTables(torch.cat(time_space), torch.cat(channel_row), torch.cat(t_index), torch.cat(temporal))


class CompositeEncodings(nn.Module):
    """Channel tables (learnable) + the fixed time, month and spatial encodings."""

    def __init__(self, embedding_size: int, num_bandsets: dict[str, int]):
        super().__init__()
        self.embedding_size = embedding_size
        self.n = int(embedding_size * 0.25)
        # frozen month table kept as a (non-trainable) parameter so the state_dict matches the
        # reference layout (`month_embed.weight`)
        self.month_embed = nn.Embedding.from_pretrained(month_table(self.n), freeze=True)
        self.per_modality_channel_embeddings = nn.ParameterDict(
            {m: nn.Parameter(torch.zeros(bs, self.n)) for m, bs in num_bandsets.items()})

    def modality_table(self, modality: str, h: int, w: int, t: int, patch_size: int) -> Tensor:
        """Batch-independent part (channel + time + spatial) as [h, w, t, BS, D] (fp32)."""
        spec = MODALITIES[modality]
        chan = self.per_modality_channel_embeddings[modality]
        bs, n, d = chan.shape[0], self.n, self.embedding_size
        table = chan.new_zeros(h, w, t, bs, d, dtype=torch.float32)
        table[..., :n] = chan.float()
        if spec.is_multitemporal:
            table[..., n:2 * n] = sincos_1d(torch.arange(t, device=chan.device), n)[None, None, :, None, :]
        if spec.is_spatial:
            table[..., 3 * n:4 * n] = spatial_2d(h, w, patch_size, n, chan.device)[:, :, None, None, :]
        return table

    def month(self, timestamps: Tensor) -> Tensor:
        """[B, T, n] month encodings from timestamps [B, T, 3] (month is 0-based)."""
        return self.month_embed(timestamps[:, :, 1].long())

    def forward(self, layout, timestamps: Tensor, patch_size: int, positions: Tensor | None = None) -> Tensor:
        """Encodings at flat token positions ``b*N + n`` of ``layout``.

        Returns ``[B, N, D]`` when ``positions`` is None, else ``[len(positions), D]`` (fp32).
        """
        chans = [self.per_modality_channel_embeddings[seg.modality] for seg in layout.segments]
        fixed = fixed_tables(layout.segments, patch_size, self.n, chans[0].device)
        b, n_tok, n = timestamps.shape[0], layout.seqlen, self.n
        flat = torch.arange(b * n_tok, device=chans[0].device) if positions is None else positions
        sample, token = flat // n_tok, flat % n_tok
        channel = torch.cat(chans).float().index_select(0, fixed.channel_row.index_select(0, token))
        time_space = fixed.time_space.index_select(0, token)
        month = self.month(timestamps)[sample, fixed.t_index.index_select(0, token)].float()
        month = torch.where(fixed.temporal.index_select(0, token)[:, None], month, 0.0)
        parts = [channel, time_space[:, :n], month, time_space[:, n:]]
        if self.embedding_size > 4 * n:  # the slots leave the last D − 4n dims at zero
            parts.append(time_space.new_zeros(len(flat), self.embedding_size - 4 * n))
        out = torch.cat(parts, 1)
        return out if positions is not None else out.view(b, n_tok, self.embedding_size)

    def forward_ref(self, layout, timestamps: Tensor, patch_size: int, positions: Tensor | None = None) -> Tensor:
        """`forward`, every table built in this call (`modality_table`)."""
        tables, months_flat = [], []
        month = self.month(timestamps)  # [B, T, n]
        b = timestamps.shape[0]
        for seg in layout.segments:
            table = self.modality_table(seg.modality, seg.h, seg.w, seg.t, patch_size)
            tables.append(table.reshape(-1, self.embedding_size))
            if MODALITIES[seg.modality].is_multitemporal:
                # month index of each token of the segment = its t coordinate
                t_of_token = torch.arange(seg.t, device=month.device)[None, None, :, None].expand(
                    seg.h, seg.w, seg.t, seg.bs).reshape(-1)
                months_flat.append((seg.t, t_of_token))
            else:
                months_flat.append(None)
        static = torch.cat(tables, 0)  # [N, D], batch independent
        if positions is None:
            out = static.unsqueeze(0).repeat(b, 1, 1)
            for seg, mt in zip(layout.segments, months_flat):
                if mt is not None:
                    sl = slice(seg.offset, seg.offset + seg.numel)
                    out[:, sl, 2 * self.n:3 * self.n] = month[:, mt[1], :].float()
            return out
        n_tok = layout.seqlen
        sample, token = positions // n_tok, positions % n_tok
        # index_select: its CPU backward (index_add) is deterministic, unlike advanced indexing
        out = static.index_select(0, token)
        for seg, mt in zip(layout.segments, months_flat):
            if mt is None:
                continue
            in_seg = (token >= seg.offset) & (token < seg.offset + seg.numel)
            t_idx = mt[1][(token - seg.offset).clamp(0, seg.numel - 1)]
            m = month[sample, t_idx].float()
            out[:, 2 * self.n:3 * self.n] = torch.where(in_seg[:, None], m, out[:, 2 * self.n:3 * self.n])
        return out
