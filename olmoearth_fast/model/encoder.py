"""Online encoder on packed ONLINE tokens (docs/reference_semantics.md §4).

patch tokens → (+ composite encodings) → keep ONLINE tokens, packed varlen with the C++ ops →
pre-norm blocks (per-sample DropPath) → final LayerNorm → pooled projection (mean of ONLINE
tokens, then Linear). Optional bandset merge before the transformer or after block k (docs/reference_semantics.md §4.5).

Removed tokens are never materialised: encodings are evaluated only at the kept positions, and
the packed output is scattered back to ``[B, N, D]`` (exact zeros elsewhere) only on request.

Reference quirk kept by default (`eval_attend_padding=True`): in eval mode the reference runs
its padded ``[B, L, D]`` batch without a key-padding mask, so the zero padding rows (up to the
longest sample's length L) take part in attention. Setting it False attends within each
sample only, which makes eval embeddings independent of the other samples in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from olmoearth_fast.modalities import MaskValue, TokenizationConfig
from olmoearth_fast.model.attention import Block, Segments, init_linear_xavier, run_blocks
from olmoearth_fast.model.bandset_merge import BandsetMerge
from olmoearth_fast.model.encodings import CompositeEncodings
from olmoearth_fast.model.layout import Segment, TokenLayout
from olmoearth_fast.model.plan import PackPlan
from olmoearth_fast.ops.packing import gather_rows, scatter_rows, varlen_index


@dataclass
class Packed:
    """Tokens of some positions of a layout, packed sample-major: ``[total, D]``."""

    tokens: Tensor
    index: Tensor  # [total] flat positions b*N + n in `layout`
    seg: Segments
    layout: TokenLayout
    mask: Tensor  # [B, N] token codes of `layout`

    def full(self) -> Tensor:
        """[B, N, D] with exact zeros at positions not in the pack."""
        b, n = self.mask.shape
        return scatter_rows(self.tokens, self.index, b * n).unflatten(0, (b, n))


def pack_positions(tokens_or_none: Tensor | None, keep: Tensor,
                   plan: PackPlan | None = None) -> tuple[Tensor | None, Tensor, Segments]:
    """varlen-index ``keep [B, N]`` once (or take the host-made ``plan`` of it: no device sync);
    gather ``tokens [B, N, D]`` if given."""
    if plan is not None:
        index, seg = plan.index, plan.seg
    else:
        index, cu_seqlens, max_seqlen = varlen_index(keep)
        seg = Segments.from_cu_seqlens(cu_seqlens, index.shape[0], int(max_seqlen))
    packed = None if tokens_or_none is None else gather_rows(tokens_or_none.flatten(0, 1), index)
    return packed, index, seg


def merged_layout(layout: TokenLayout, merged: tuple[str, ...]) -> TokenLayout:
    segs, offset = [], 0
    for s in layout.segments:
        bs = 1 if s.modality in merged else s.bs
        segs.append(Segment(s.modality, s.h, s.w, s.t, bs, offset))
        offset += segs[-1].numel
    return TokenLayout(layout.batch, tuple(segs), layout.patch_size)


class Encoder(nn.Module):
    def __init__(self, modalities: tuple[str, ...], tokenization: TokenizationConfig, embedding_size: int,
                 depth: int, num_heads: int, mlp_ratio: float, drop_path: float = 0.1,
                 merge_bandsets: bool = False, merge_after_layer: int = -1, eval_attend_padding: bool = True):
        super().__init__()
        self.modalities = tuple(modalities)
        self.embedding_size = embedding_size
        self.composite_encodings = CompositeEncodings(
            embedding_size, {m: tokenization.num_bandsets(m) for m in self.modalities})
        self.blocks = nn.ModuleList(Block(embedding_size, num_heads, mlp_ratio, drop_path) for _ in range(depth))
        self.norm = nn.LayerNorm(embedding_size)
        self.project_and_aggregate = nn.Module()
        self.project_and_aggregate.projection = nn.Sequential(nn.Linear(embedding_size, embedding_size))
        self.merge_after_layer = merge_after_layer
        self.eval_attend_padding = eval_attend_padding
        self.bandset_merge = nn.ModuleDict()
        if merge_bandsets:
            if not -1 <= merge_after_layer < depth:
                raise ValueError(f"merge_after_layer must be in [-1, {depth - 1}], got {merge_after_layer}")
            for m in self.modalities:
                if tokenization.num_bandsets(m) > 1:
                    self.bandset_merge[m] = BandsetMerge(embedding_size, tokenization.num_bandsets(m))
        init_linear_xavier(self)

    # -----------------------------------------------------------------------------------------

    def _merge(self, full: Tensor, layout: TokenLayout, mask: Tensor) -> tuple[Tensor, TokenLayout, Tensor]:
        """Merge the bandsets of every multi-bandset modality of ``full [B, N, D]``."""
        per_tok, per_mask = layout.unflatten(full), layout.unflatten(mask)
        for m, merge in self.bandset_merge.items():
            if m in per_tok:
                per_tok[m], per_mask[m] = merge(per_tok[m], per_mask[m])
        new_layout = merged_layout(layout, tuple(m for m in self.bandset_merge if m in per_tok))
        return new_layout.flatten(per_tok), new_layout, new_layout.flatten(per_mask)

    def _blocks(self, x: Tensor, seg: Segments, blocks, drops: list | None = None,
                norm: nn.LayerNorm | None = None) -> Tensor:
        ragged = not self.training and self.eval_attend_padding
        if ragged:
            # reference eval quirk: padded rows (zeros) are real rows that every block updates
            pad_index, unpad_index, _ = seg.padded()
            b, length = seg.batch, max(seg.max_len, 1)
            x = gather_rows(x, pad_index)
            cu = torch.arange(0, (b + 1) * length, length, device=x.device, dtype=torch.int32)
            seg_run = Segments.from_cu_seqlens(cu, b * length, length)
        else:
            seg_run = seg
        x = run_blocks(blocks, x, seg_run, drops=drops, norm=norm)
        if ragged:
            # the final norm is per token, so it commutes with dropping the padding rows
            x = gather_rows(x, unpad_index)
        return x

    def forward(self, patch_tokens: dict[str, Tensor] | Tensor, mask: Tensor, layout: TokenLayout,
                timestamps: Tensor, patch_size: int, plan: PackPlan | None = None,
                drops: list | None = None) -> tuple[Packed, Tensor]:
        """patch tokens, mask [B, N] codes → (packed ONLINE tokens, pooled [B, D]).

        ``patch_tokens``: {m: [B, *grid, BS, D]} of every position, or ``[total, D]`` of the ONLINE
        positions only, packed as ``plan`` says (`MultiModalPatchEmbeddings.packed`); with those,
        ``drops`` may hold the blocks' DropPath draws made on the host (`model.plan.draw_drop_path`).
        ``plan``: the packing of ``mask == ONLINE`` made on the host (`model/plan.py`); not used
        with bandset merge, which packs the merged tokens here."""
        merge_now = len(self.bandset_merge) > 0 and self.merge_after_layer == -1
        if isinstance(patch_tokens, Tensor):  # already packed at the plan's positions
            if plan is None or len(self.bandset_merge):
                raise ValueError("Encoder: packed patch tokens need the plan of their positions (and no bandset merge)")
            x, index, seg = patch_tokens, plan.index, plan.seg
        else:
            full = layout.flatten(patch_tokens)
            if merge_now:
                full = full + self.composite_encodings(layout, timestamps, patch_size)
                full, layout, mask = self._merge(full, layout, mask)
            x, index, seg = pack_positions(full, mask == MaskValue.ONLINE_ENCODER,
                                           None if len(self.bandset_merge) else plan)
        if not merge_now:
            x = x + self.composite_encodings(layout, timestamps, patch_size, positions=index)
        if len(self.bandset_merge) > 0 and self.merge_after_layer >= 0:
            k = self.merge_after_layer + 1
            x = self._blocks(x, seg, self.blocks[:k])
            b, n = mask.shape
            full = scatter_rows(x, index, b * n).unflatten(0, (b, n))
            full, layout, mask = self._merge(full, layout, mask)
            x, index, seg = pack_positions(full, mask == MaskValue.ONLINE_ENCODER)
            x = self._blocks(x, seg, self.blocks[k:], norm=self.norm)
        else:
            x = self._blocks(x, seg, self.blocks, drops, norm=self.norm)
        out = Packed(x, index, seg, layout, mask)
        return out, self.pool(out)

    def pool(self, out: Packed) -> Tensor:
        """Mean of each sample's ONLINE tokens, then the projection (reference: ProjectAndAggregate)."""
        return self.project_and_aggregate.projection(mean_pool(out))


def mean_pool(out: Packed) -> Tensor:
    """[B, D] mean of each sample's packed tokens (0 for a sample without tokens, where the
    reference raises).

    The per-sample sums are an `index_add`: on CUDA it adds atomically in an unspecified order,
    so the pooled vector (and the InfoNCE loss on it) can differ in the last bits from run to
    run. Under torch.use_deterministic_algorithms(True) PyTorch's CUDA `index_add` becomes a
    sorted `index_put_(accumulate=True)`: deterministic. CPU is deterministic either way. The
    backward (an index_select) is deterministic everywhere."""
    b = out.seg.batch
    sums = out.tokens.new_zeros(b, out.tokens.shape[-1], dtype=torch.float32)
    sums = sums.index_add(0, out.seg.sample_ids, out.tokens.float())
    counts = (out.seg.cu_seqlens[1:] - out.seg.cu_seqlens[:-1]).clamp(min=1).to(sums.dtype)
    return (sums / counts[:, None]).to(out.tokens.dtype)
