"""Cross-attention-only decoder ("Predictor", docs/reference_semantics.md §5).

context = Linear(LN_in(encoder ONLINE tokens)) + decoder encodings, fixed across layers and never
LayerNorm'd inside the blocks; queries = mask_token + decoder encodings at DECODER positions;
blocks q ← q + Attn(LN1(q), context), q ← q + MLP(LN2(q)); output = Linear(LN(q)), shared by all
modalities and bandsets. MISSING and TARGET_ENCODER_ONLY tokens are neither queries nor context.

Only DECODER positions are computed (the reference computes the head for every token and the
loss reads the DECODER ones). With bandset unmerge (exps 9, 10, 12), merged encoder tokens are
first expanded back to one token per bandset with a Linear(D → S·D), and the original
per-bandset masks decide what is context and what is a query.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from olmoearth_fast.modalities import MaskValue, TokenizationConfig
from olmoearth_fast.model.attention import Block, init_linear_xavier, run_blocks
from olmoearth_fast.model.bandset_merge import BandsetUnmerge
from olmoearth_fast.model.encoder import Packed, pack_positions
from olmoearth_fast.model.encodings import CompositeEncodings
from olmoearth_fast.model.layout import TokenLayout
from olmoearth_fast.model.plan import PackPlan
from olmoearth_fast.ops.linear import linear
from olmoearth_fast.ops.packing import gather_rows


class Decoder(nn.Module):
    def __init__(self, modalities: tuple[str, ...], tokenization: TokenizationConfig, encoder_embedding_size: int,
                 embedding_size: int, depth: int, num_heads: int, mlp_ratio: float, output_embedding_size: int,
                 drop_path: float = 0.0, unmerge_bandsets: bool = False):
        super().__init__()
        self.modalities = tuple(modalities)
        self.mask_token = nn.Parameter(torch.zeros(embedding_size))
        self.blocks = nn.ModuleList(Block(embedding_size, num_heads, mlp_ratio, drop_path) for _ in range(depth))
        self.composite_encodings = CompositeEncodings(
            embedding_size, {m: tokenization.num_bandsets(m) for m in self.modalities})
        self.encoder_to_decoder_embed = nn.Linear(encoder_embedding_size, embedding_size)
        self.to_output_embed = nn.Linear(embedding_size, output_embedding_size)
        self.input_norm = nn.LayerNorm(encoder_embedding_size)
        self.norm = nn.LayerNorm(embedding_size)
        self.bandset_unmerge = nn.ModuleDict()
        if unmerge_bandsets:
            for m in self.modalities:
                if tokenization.num_bandsets(m) > 1:
                    self.bandset_unmerge[m] = BandsetUnmerge(encoder_embedding_size, tokenization.num_bandsets(m))
        init_linear_xavier(self)

    def _context(self, enc: Packed, layout: TokenLayout, mask: Tensor, timestamps: Tensor, patch_size: int):
        """Context tokens (packed ONLINE positions of ``layout``) from the encoder output."""
        if enc.layout != layout:
            # unmerge: expand merged modalities to S bandset tokens, then take the ONLINE ones
            per = enc.layout.unflatten(enc.full())
            for m, unmerge in self.bandset_unmerge.items():
                if m in per:
                    per[m] = unmerge(per[m])
            ctx, index, seg = pack_positions(layout.flatten(per), mask == MaskValue.ONLINE_ENCODER)
        else:
            ctx, index, seg = enc.tokens, enc.index, enc.seg
        embed = self.encoder_to_decoder_embed
        ctx = linear(self.input_norm(ctx), embed.weight, embed.bias)
        return ctx + self.composite_encodings(layout, timestamps, patch_size, positions=index), seg

    def forward(self, enc: Packed, layout: TokenLayout, mask: Tensor, timestamps: Tensor, patch_size: int,
                plan: PackPlan | None = None) -> Packed:
        """Predictions at the DECODER positions of ``layout`` (``mask`` [B, N] codes), packed
        (where ``plan``, made on the host, says, if given)."""
        context, ctx_seg = self._context(enc, layout, mask, timestamps, patch_size)
        _, index, seg = pack_positions(None, mask == MaskValue.DECODER, plan)
        q = self.mask_token + self.composite_encodings(layout, timestamps, patch_size, positions=index)
        q = run_blocks(self.blocks, q, seg, context, ctx_seg, norm=self.norm)
        out = linear(q, self.to_output_embed.weight, self.to_output_embed.bias)
        return Packed(out, index, seg, layout, mask)


def gather_targets(target_full: Tensor, index: Tensor, batch: int) -> Tensor:
    """Targets at packed positions of a (possibly multi-view) batch.

    ``target_full [B, N, D]`` is computed once per microbatch; ``index`` holds flat positions of a
    ``[V·B, N]`` batch (views stacked), so view v, sample b reads target row b.
    """
    n = target_full.shape[1]
    return gather_rows(target_full.flatten(0, 1), index % (batch * n))
