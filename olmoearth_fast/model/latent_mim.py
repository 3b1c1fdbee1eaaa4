"""LatentMIM: online patch embeddings + encoder + decoder, and the frozen projection target.

The reference's target is `deepcopy(encoder)` run with token_exit_cfg all 0 and EMA decay
(1, 1): it is exactly the frozen, randomly initialised patch-embedding projection of the
unmasked, un-dropped input (docs/reference_semantics.md §6). Only that projection is kept here
(`target_patch_embeddings`, no grad), and it is computed once per microbatch for both views, at
the positions the decoder predicts (the loss reads nothing else).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from olmoearth_fast.config import ModelConfig
from olmoearth_fast.modalities import MISSING_VALUE, MaskValue, TokenizationConfig, as_tokenization, check_modalities
from olmoearth_fast.model.decoder import Decoder, gather_targets
from olmoearth_fast.model.encoder import Encoder, Packed
from olmoearth_fast.model.layout import TokenLayout
from olmoearth_fast.model.patch_embed import MultiModalPatchEmbeddings
from olmoearth_fast.model.plan import BatchPlanner, MicrobatchPlan, PackPlan, plan_microbatch

# The reference's MODEL_SIZE_ARGS (internal/utils.py; FEB ⊂ HEAD):
# (encoder D, encoder depth, encoder heads, decoder D, decoder depth, decoder heads, mlp_ratio)
MODEL_SIZES: dict[str, tuple[int, int, int, int, int, int, float]] = {
    "nano": (128, 4, 8, 128, 4, 8, 4.0),
    "tiny": (192, 12, 3, 192, 12, 3, 4.0),
    "tiny_more_heads": (192, 12, 8, 192, 12, 8, 4.0),
    "tiny_shallow_decoder": (192, 12, 3, 192, 4, 3, 4.0),
    "tiny_super_shallow_decoder": (192, 12, 3, 192, 2, 3, 4.0),
    "small_shallow_decoder": (384, 12, 6, 384, 4, 6, 4.0),
    "base": (768, 12, 12, 768, 12, 12, 4.0),
    "base_shallow_decoder": (768, 12, 12, 768, 4, 12, 4.0),
    "base_super_shallow_decoder": (768, 12, 12, 768, 2, 12, 4.0),
    "base_many_heads_shallow_decoder": (768, 8, 16, 768, 4, 12, 4.0),
    "base_many_heads_shallower_decoder": (768, 8, 16, 768, 2, 12, 4.0),
    "large": (1024, 24, 16, 1024, 24, 16, 4.0),
    "large_shallow_decoder": (1024, 24, 16, 1024, 4, 16, 4.0),
    "large_super_shallow_decoder": (1024, 24, 16, 1024, 2, 16, 4.0),
    "giga": (1536, 40, 24, 1536, 40, 24, 4.0),
    "giga_shallow_decoder": (1536, 40, 24, 1536, 4, 24, 4.0),
    "giga_super_shallow_decoder": (1536, 40, 24, 1536, 2, 24, 4.0),
}


@dataclass
class ViewOutput:
    encoded: Packed  # ONLINE tokens after the encoder's final LayerNorm
    pooled: Tensor  # [B, D] pooled projection (InfoNCE input)
    decoded: Packed  # predictions at DECODER positions
    target: Tensor | None = None  # [decoded, D] frozen projection at the decoded positions (with_target=True)


class LatentMIM(nn.Module):
    def __init__(self, cfg: ModelConfig, tokenization: TokenizationConfig):
        super().__init__()
        check_modalities(cfg.modalities, "model.modalities")
        if cfg.dims is None and cfg.size not in MODEL_SIZES:
            raise ValueError(f"unknown model size {cfg.size!r}; valid sizes: {', '.join(MODEL_SIZES)}")
        if not cfg.modalities:
            raise ValueError("ModelConfig.modalities is empty: name the modalities the model embeds")
        d_enc, depth, heads, d_dec, dec_depth, dec_heads, mlp = cfg.dims or MODEL_SIZES[cfg.size]
        self.cfg = cfg
        self.tokenization = tokenization
        self.patch_embeddings = MultiModalPatchEmbeddings(
            cfg.modalities, tokenization, d_enc, cfg.band_dropout_rate, cfg.random_band_dropout,
            cfg.band_dropout_modalities)
        self.encoder = Encoder(cfg.modalities, tokenization, d_enc, depth, heads, mlp, cfg.drop_path,
                               cfg.merge_bandsets, cfg.merge_after_layer, cfg.eval_attend_padding)
        self.decoder = Decoder(cfg.modalities, tokenization, d_enc, d_dec, dec_depth, dec_heads, mlp, d_enc,
                               cfg.decoder_drop_path, unmerge_bandsets=cfg.merge_bandsets)
        # frozen copy of the initial projection: the target (never band-dropped, never trained)
        self.target_patch_embeddings = copy.deepcopy(self.patch_embeddings)
        self.target_patch_embeddings.band_dropout_rate = 0.0
        self.target_patch_embeddings.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.target_patch_embeddings.train(False)
        return self

    def compile_blocks(self) -> None:
        """`torch.compile` every transformer block in place (parameter names unchanged, so
        checkpoints and exports are unaffected). Packed lengths change every step, so shapes
        are dynamic from the first call (no recompilation per length); attention itself stays
        eager (`model.attention.attend`), compile fuses the norms, activations, residuals and
        DropPath around the Linear layers, forward and backward."""
        for blk in (*self.encoder.blocks, *self.decoder.blocks):
            blk.compile(dynamic=True)

    def layout(self, data: dict[str, Tensor], patch_size: int) -> TokenLayout:
        return TokenLayout.build(data, patch_size, self.tokenization, self.cfg.modalities)

    def plan(self, data: dict[str, Tensor], view_masks: list[dict[str, Tensor]], patch_size: int,
             mask_negatives_for: tuple[str, ...] | None, generator: torch.Generator | None = None) -> MicrobatchPlan:
        """Host-side packing plan of a microbatch (host tensors in, host tensors out); in training
        mode it also draws the encoder's DropPath (`model.plan.draw_drop_path`, from
        ``generator`` or the global CPU generator)."""
        drop = (len(self.encoder.blocks), self.cfg.drop_path) if self.training else None
        return plan_microbatch(self.layout(data, patch_size), view_masks, self.cfg.merge_bandsets,
                               mask_negatives_for, drop, generator)

    def batch_planner(self, microbatch_size: int, mask_negatives_for: tuple[str, ...] | None) -> BatchPlanner:
        """What `plan` does in training mode, for the loader to run on whole rank batches."""
        return BatchPlanner(self.tokenization, tuple(self.cfg.modalities), self.cfg.merge_bandsets,
                            mask_negatives_for, microbatch_size, (len(self.encoder.blocks), self.cfg.drop_path))

    @torch.no_grad()
    def target(self, data: dict[str, Tensor], layout: TokenLayout) -> Tensor:
        """[B, N, D] frozen projection of the full input (identical for every view)."""
        return layout.flatten(self.target_patch_embeddings(data, layout.patch_size))

    def forward(self, data: dict[str, Tensor], timestamps: Tensor, masks: Tensor, layout: TokenLayout,
                with_target: bool = False, plan: MicrobatchPlan | None = None) -> ViewOutput:
        """Encode and decode V views of one batch in a single pass.

        ``data`` ({m: [B, ...]}) and ``timestamps`` [B, T, 3] are shared by the views;
        ``masks`` [V·B, N] holds the token codes of the views stacked along the batch.
        ``with_target`` also returns the frozen projection at the decoded positions (rows of
        `target(data, layout)`, aligned with ``decoded.tokens``), computed in the same patch
        embedding pass. ``plan`` (`model/plan.py`, made on the host from the same masks)
        supplies the packings, so that the device never reads a size back; without it they are
        made here from ``masks``.

        Only the tokens a step reads are patch-embedded (`MultiModalPatchEmbeddings.packed`):
        the ONLINE ones, and the target at the DECODER positions. The bandset-merge models
        embed every position (their merge reads whole bandset groups).
        """
        p = layout.patch_size
        b = timestamps.shape[0]
        if masks.shape[0] % b:
            raise ValueError(f"masks has {masks.shape[0]} rows, not a multiple of the batch size {b}")
        views = masks.shape[0] // b
        timestamps_v = timestamps.repeat(views, 1, 1) if views > 1 else timestamps
        target_module = self.target_patch_embeddings if with_target else None
        packed = len(self.encoder.bandset_merge) == 0  # the merge models embed every position
        dec_plan = plan.decoder if plan is not None else PackPlan.build(masks == MaskValue.DECODER,
                                                                         layout if packed else None)
        if packed:
            online = plan.online if plan is not None else PackPlan.build(masks == MaskValue.ONLINE_ENCODER, layout)
            tokens = self.patch_embeddings.packed(data, p, online.rows, views, target_module, dec_plan.rows)
            tokens, target = tokens if with_target else (tokens, None)
            encoded, pooled = self.encoder(tokens, masks, layout, timestamps_v, p, online,
                                           None if plan is None else plan.drop_path)
        else:
            tokens = self.patch_embeddings(data, p, num_views=views, target=target_module)
            tokens, target = tokens if with_target else (tokens, None)
            if with_target:
                target = gather_targets(layout.flatten(target), dec_plan.index, b)
            encoded, pooled = self.encoder(tokens, masks, layout, timestamps_v, p)
        decoded = self.decoder(encoded, layout, masks, timestamps_v, p, dec_plan)
        return ViewOutput(encoded, pooled, decoded, None if target is None else target.detach())

    def encode(self, data: dict[str, Tensor], timestamps: Tensor, patch_size: int,
               masks: Tensor | None = None) -> tuple[Packed, Tensor]:
        """Encoder only, for evaluation and embedding export: ``(tokens, pooled projection)``.

        Without ``masks`` every token is ONLINE except where its top-left pixel is missing in a
        band of its bandset (MISSING), as for the reference's unmasked inference batches.
        ``mean_pool(tokens)`` gives the mean-pooled token embedding used by kNN evaluation.
        """
        layout = self.layout(data, patch_size)
        if masks is None:
            pixel = {}
            for m in layout.modalities:
                groups = self.tokenization.bandset_indices(m)
                miss = torch.stack([(data[m][..., g] == MISSING_VALUE).any(-1) for g in groups], -1)
                pixel[m] = torch.where(miss, int(MaskValue.MISSING), int(MaskValue.ONLINE_ENCODER))
            masks = layout.token_masks(pixel)
        tokens = self.patch_embeddings(data, patch_size)
        return self.encoder(tokens, masks, layout, timestamps, patch_size)


def build_model(cfg, device: torch.device) -> LatentMIM:
    """The model of a RunConfig, initialised from ``cfg.trainer.init_seed``, on ``device``."""
    torch.manual_seed(cfg.trainer.init_seed)
    return LatentMIM(cfg.model, as_tokenization(cfg.data.tokenization)).to(device)
