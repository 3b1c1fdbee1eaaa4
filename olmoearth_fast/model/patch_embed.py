"""Per-(modality, bandset) patch embeddings with band dropout (docs/reference_semantics.md §3).

Spatial bandsets: band gather → band dropout → antialiased bicubic resize by 8/p → Conv2d 8×8
stride 8, all inside one `olmoearth_fast.ops.patch_embed` call (fused Triton kernel on CUDA).
Time-only era5_10: band gather → band dropout → Linear(C, D) (xavier init, as the reference
re-initialises it). Parameter names follow the reference so its state_dicts map 1:1.

`MultiModalPatchEmbeddings.forward` embeds every position (evaluation, the bandset-merge models);
`MultiModalPatchEmbeddings.packed` only the tokens a training step reads, straight into the
packed layout (`ops.patch_embed.patch_embed_rows`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from olmoearth_fast.modalities import MODALITIES, TokenizationConfig
from olmoearth_fast.ops.band_dropout import band_dropout_keep
from olmoearth_fast.ops.packing import gather_rows
from olmoearth_fast.ops.patch_embed import patch_embed, patch_embed_multi, patch_embed_rows

BASE_PATCH = 8  # the conv kernel is 8×8 at 10 m for every modality used here


class FlexiPatchEmbed(nn.Module):
    """Conv2d(C, D, 8, stride 8) applied after resizing the image by 8/p (reference Feb layout)."""

    def __init__(self, in_chans: int, embedding_size: int):
        super().__init__()
        # PyTorch's default Conv2d init (kaiming-uniform a=√5) is the frozen target's init
        self.proj = nn.Conv2d(in_chans, embedding_size, kernel_size=BASE_PATCH, stride=BASE_PATCH)

    def forward(self, x: Tensor, patch_size: int, keep: Tensor | None, band_index: Tensor) -> Tensor:
        return patch_embed(x, self.proj.weight, self.proj.bias, patch_size, keep, band_index)


class MultiModalPatchEmbeddings(nn.Module):
    def __init__(self, modalities: tuple[str, ...], tokenization: TokenizationConfig, embedding_size: int,
                 band_dropout_rate: float = 0.0, random_band_dropout: bool = False,
                 band_dropout_modalities: tuple[str, ...] | None = None):
        super().__init__()
        self.modalities = tuple(modalities)
        self.band_dropout_rate = band_dropout_rate
        self.random_band_dropout = random_band_dropout
        self.band_dropout_modalities = band_dropout_modalities
        self.per_modality_embeddings = nn.ModuleDict()
        for m in self.modalities:
            groups = tokenization.bandset_indices(m)
            mods = nn.ModuleDict()
            for i, idx in enumerate(groups):
                if MODALITIES[m].is_spatial:
                    mods[f"{m}__{i}"] = FlexiPatchEmbed(len(idx), embedding_size)
                else:
                    lin = nn.Linear(len(idx), embedding_size)
                    nn.init.xavier_uniform_(lin.weight)
                    nn.init.zeros_(lin.bias)
                    mods[f"{m}__{i}"] = lin
                self.register_buffer(f"bands__{m}__{i}", torch.tensor(idx, dtype=torch.long), persistent=False)
            self.per_modality_embeddings[m] = mods

    def _keeps(self, modality: str, batch: int, num_bands: int, views: int, device) -> list[Tensor] | None:
        """The V views' band-dropout multipliers of one (modality, bandset), drawn in one call
        (each view its own rate, as the reference's per-view calls), or None when not applied."""
        if not self.training or self.band_dropout_rate <= 0 or num_bands <= 1:
            return None
        if self.band_dropout_modalities is not None and modality not in self.band_dropout_modalities:
            return None
        return list(band_dropout_keep(batch, num_bands, self.band_dropout_rate, random_rate=self.random_band_dropout,
                                      draws=views, device=device).unbind(0))

    def _embed(self, modality: str, embed: nn.Module, x: Tensor, patch_size: int, keep: Tensor | None,
               idx: Tensor) -> Tensor:
        if MODALITIES[modality].is_spatial:
            return embed(x, patch_size, keep, idx)
        xb = x.index_select(-1, idx)
        return embed(xb if keep is None else xb * keep[:, None, :].to(xb.dtype))

    def forward(self, data: dict[str, Tensor], patch_size: int, num_views: int = 1,
                target: MultiModalPatchEmbeddings | None = None):
        """{m: [B,H,W,T,C_all] | [B,T,C_all]} → {m: [V·B,h,w,T,BS,D] | [V·B,T,BS,D]}.

        With ``num_views`` V > 1 the views are stacked along the batch. Band dropout is drawn
        per view (one rate per (modality, bandset, view), as the reference's per-view calls do);
        without dropout the tokens are computed once and repeated.

        With ``target`` (a module of the same layout: the frozen target projection, which never
        drops bands) returns ``(tokens, target_tokens)``, the target's {m: [B,...,BS,D]}
        computed from the same resized images as the online tokens (`patch_embed_multi`).
        """
        out, out_target = {}, {}
        for m, _, x, idx, embed, t_embed, keeps in self._bandsets(data, num_views, target):
            if MODALITIES[m].is_spatial:
                projections = [(embed.proj.weight, embed.proj.bias, k) for k in keeps or [None]]
                if t_embed is not None:
                    projections.append((t_embed.proj.weight, t_embed.proj.bias, None))
                ys = patch_embed_multi(x, projections, patch_size, idx)
            else:
                ys = [self._embed(m, embed, x, patch_size, k, idx) for k in keeps or [None]]
                if t_embed is not None:
                    ys.append(self._embed(m, t_embed, x, patch_size, None, idx))
            if t_embed is not None:
                out_target.setdefault(m, []).append(ys.pop())
            if keeps is None and num_views > 1:  # computed once, repeated for the views
                ys = [ys[0].repeat(num_views, *[1] * (ys[0].dim() - 1))]
            out.setdefault(m, []).append(torch.cat(ys) if len(ys) > 1 else ys[0])
        out = {m: torch.stack(tokens, dim=-2) for m, tokens in out.items()}
        if target is None:
            return out
        return out, {m: torch.stack(tokens, dim=-2) for m, tokens in out_target.items()}

    def _bandsets(self, data: dict[str, Tensor], num_views: int, target: MultiModalPatchEmbeddings | None):
        """Every (modality, bandset) of ``data`` in this module's order, as ``(modality, bandset
        number, x, band index, embedding, target embedding or None, keeps)``: x in the compute
        dtype, ``keeps`` the V per-view band-dropout multipliers, drawn here in this order (None
        without dropout). `forward` and `packed` both iterate it, so they draw the same keeps."""
        for m in self.modalities:
            if m not in data:
                continue
            x = data[m]
            if x.is_cuda and torch.is_autocast_enabled("cuda"):
                # the fused kernel computes in its input's dtype: bf16 under autocast, like the
                # reference's bf16 FSDP compute (missing values are already in the masks)
                x = x.to(torch.get_autocast_dtype("cuda"))
            for k, (name, embed) in enumerate(self.per_modality_embeddings[m].items()):
                idx = getattr(self, f"bands__{name}")
                keeps = self._keeps(m, x.shape[0], idx.numel(), num_views, x.device)
                t_embed = None if target is None else target.per_modality_embeddings[m][name]
                yield m, k, x, idx, embed, t_embed, keeps

    def packed(self, data: dict[str, Tensor], patch_size: int, rows, num_views: int = 1,
               target: MultiModalPatchEmbeddings | None = None, target_rows=None):
        """The tokens at packed positions only: ``[total, D]`` in the order of ``rows``
        (`model.plan.EmbedRows` of e.g. the ONLINE positions of V stacked views), and with
        ``target`` the frozen projection at ``target_rows``' positions (e.g. the DECODER ones).

        Computes what `forward` computes at those positions (`ops.patch_embed.patch_embed_rows`;
        on CPU only those tokens are embedded), drawing the same band-dropout keeps in the same
        order, so the RNG stream is `forward`'s.
        """
        outs: dict[tuple[str, int], Tensor] = {}
        target_outs: dict[tuple[str, int], Tensor] = {}
        for m, k, x, idx, embed, t_embed, keeps in self._bandsets(data, num_views, target):
            r, view = rows.parts[(m, k)]
            if MODALITIES[m].is_spatial:
                projections = [(embed.proj.weight, embed.proj.bias, keeps, r, view)]
                if t_embed is not None:
                    projections.append((t_embed.proj.weight, t_embed.proj.bias, None, *target_rows.parts[(m, k)]))
                ys = patch_embed_rows(x, projections, patch_size, idx)
            else:
                ys = [_time_rows(embed, x, idx, keeps, r, view)]
                if t_embed is not None:
                    ys.append(_time_rows(t_embed, x, idx, None, *target_rows.parts[(m, k)]))
            outs[(m, k)] = ys[0]
            if t_embed is not None:
                target_outs[(m, k)] = ys[1]
        tokens = gather_rows(torch.cat([outs[key] for key in rows.parts]), rows.order)
        if target is None:
            return tokens
        return tokens, gather_rows(torch.cat([target_outs[key] for key in target_rows.parts]), target_rows.order)


def _time_rows(embed: nn.Linear, x: Tensor, idx: Tensor, keeps: list[Tensor] | None, rows: Tensor,
               view: Tensor) -> Tensor:
    """A time-only bandset's Linear at token rows ``b·T + t`` of ``x [B, T, C_all]``."""
    xb = x.flatten(0, 1).index_select(0, rows).index_select(-1, idx)
    if keeps is not None:
        xb = xb * torch.stack(keeps)[view, rows // x.shape[1]].to(xb.dtype)
    return embed(xb)
