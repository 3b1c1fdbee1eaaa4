"""Training losses: masked-negatives patch discrimination and InfoNCE (reference semantics).

`modality_patch_disc_masked_neg` is the dense, vectorised PyTorch form of the reference's
`modality_patch_discrimination_masked_negatives` (docs/reference_semantics.md §8.1, §8.2):

* per modality m (summed in `LOSS_FIELD_ORDER`) and sample b, the c_b DECODER tokens form one
  c_b x c_b InfoNCE: s_ij = <p_hat_i, t_hat_j>/tau, positive = diagonal;
* same-target masking (modalities in `mask_negatives_for_modalities`, None = all, only when
  c_b > 1): t_hat_i . t_hat_j > threshold (strict, fp32) removes j from row i's negatives; a
  sample where any row is left with no "not same" column is skipped (not counted);
* l_i = 2 tau (logsumexp_j s_ij - s_ii); mean over the sample's tokens, mean over counted
  samples (c_b = 1 counts, with loss 0), sum over modalities, times `weight`.

It works on all N_m positions of a modality (O(B N_m^2) memory, like the reference's `_vec`);
the fused op `olmoearth_fast.ops.masked_neg_loss.masked_neg_loss` has the same semantics on
packed DECODER tokens and touches only the sum_b c_b^2 decoder pairs (tests compare the two
through `tests/helpers/masked_neg_loss_dict.py`). Both run in fp32 with autocast disabled:
under bf16 autocast the bmm re-casts and the 0.999 test flips (docs/reference_semantics.md §8.3).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from olmoearth_fast.modalities import LOSS_FIELD_ORDER, MaskValue

DECODER = int(MaskValue.DECODER)  # a plain int: torch.compile traces `tensor == int` cleanly

__all__ = ["LOSS_FIELD_ORDER", "info_nce", "loss_modalities", "modality_patch_disc_masked_neg"]


def loss_modalities(
    pred: Mapping[str, Tensor], target: Mapping[str, Tensor], mask: Mapping[str, Tensor]
) -> list[str]:
    """Validate the dict-form loss inputs and return their modalities in `LOSS_FIELD_ORDER`.

    Args:
        pred: modality -> [B, N_m, D] predictions.
        target: modality -> [B, N_m, D] targets (same keys and shapes as `pred`).
        mask: modality -> [B, N_m] MaskValue codes (at least the keys of `pred`).

    Raises:
        ValueError: on unknown modalities, mismatched keys, shapes, batch sizes or widths.
    """
    unknown = sorted(set(pred) - set(LOSS_FIELD_ORDER))
    if unknown:
        raise ValueError(f"pred has modalities {unknown} that are not in LOSS_FIELD_ORDER "
                         f"{LOSS_FIELD_ORDER}")
    if set(target) != set(pred):
        raise ValueError(f"target must have the keys of pred {sorted(pred)}, got {sorted(target)}")
    missing = sorted(set(pred) - set(mask))
    if missing:
        raise ValueError(f"mask lacks the modalities {missing} present in pred")
    names = [m for m in LOSS_FIELD_ORDER if m in pred]
    if not names:
        raise ValueError("pred is empty: the loss needs at least one modality")
    batch, dim = pred[names[0]].shape[0], pred[names[0]].shape[-1]
    for m in names:
        p, t, k = pred[m], target[m], mask[m]
        if p.dim() != 3 or p.shape[0] != batch or p.shape[2] != dim:
            raise ValueError(f"pred[{m!r}] must be [B={batch}, N, D={dim}], got {tuple(p.shape)}")
        if t.shape != p.shape:
            raise ValueError(f"target[{m!r}] must have pred's shape {tuple(p.shape)}, "
                             f"got {tuple(t.shape)}")
        if k.shape != p.shape[:2]:
            raise ValueError(f"mask[{m!r}] must be [B, N] = {tuple(p.shape[:2])}, "
                             f"got {tuple(k.shape)}")
    return names


def _modality_loss(pred: Tensor, target: Tensor, mask: Tensor, tau: float, threshold: float,
                   mask_negatives: bool) -> Tensor:
    """Loss of one modality, [B, N, D] inputs; O(B N^2) like the reference's `_vec`."""
    batch, n, _ = pred.shape
    p = F.normalize(pred.float(), p=2, dim=-1)
    t = F.normalize(target.float(), p=2, dim=-1)
    dec = mask == DECODER
    count = dec.sum(-1)
    scores = torch.bmm(p, t.transpose(1, 2)) / tau
    eye = torch.eye(n, dtype=torch.bool, device=pred.device)
    cols = dec[:, None, :]
    # The diagonal is always kept, also in non-decoder rows: every row stays finite, so the
    # masked-out rows contribute exact zeros to value and gradient instead of nan.
    keep = cols | eye
    skip = torch.zeros(batch, dtype=torch.bool, device=pred.device)
    if mask_negatives:
        same = torch.bmm(t, t.transpose(1, 2)) > threshold
        keep = keep & (~same | eye)
        no_negative = (cols & ~same).sum(-1) == 0
        skip = (no_negative & dec).any(-1) & (count > 1)
    scores = scores.masked_fill(~keep, float("-inf"))
    per_token = (torch.logsumexp(scores, -1) - scores.diagonal(dim1=1, dim2=2)) * (2 * tau)
    per_sample = (per_token * dec).sum(-1) / count.clamp(min=1)
    counted = (count > 0) & ~skip
    return (per_sample * counted).sum() / counted.sum().clamp(min=1)


def modality_patch_disc_masked_neg(
    pred: Mapping[str, Tensor],
    target: Mapping[str, Tensor],
    mask: Mapping[str, Tensor],
    *,
    tau: float = 0.1,
    same_target_threshold: float = 0.999,
    mask_negatives_for_modalities: Iterable[str] | None = None,
    weight: float = 1.0,
) -> Tensor:
    """Masked-negatives patch-discrimination loss (reference `..._masked_negatives`).

    Args:
        pred: modality -> [B, N_m, D] decoder outputs (flattened over h, w, t, bandset).
        target: modality -> [B, N_m, D] frozen targets.
        mask: modality -> [B, N_m] MaskValue codes of the predictions; DECODER rows count.
        tau: softmax temperature.
        same_target_threshold: targets with cosine > this are not negatives of each other.
        mask_negatives_for_modalities: modalities with same-target masking; None = all.
        weight: factor on the sum over modalities.

    Returns:
        Scalar fp32 loss (0 with a graph to `pred` when no sample counts).
    """
    names = loss_modalities(pred, target, mask)
    masked = None if mask_negatives_for_modalities is None else set(mask_negatives_for_modalities)
    device = pred[names[0]].device
    with torch.autocast(device_type=device.type, enabled=False):
        total = None
        for m in names:
            loss = _modality_loss(pred[m], target[m], mask[m], tau, same_target_threshold,
                                  masked is None or m in masked)
            total = loss if total is None else total + loss
        return weight * total


def info_nce(p: Tensor, q: Tensor, *, tau: float = 0.1, weight: float = 1.0) -> Tensor:
    """One-directional InfoNCE between two views' pooled projections
    (docs/reference_semantics.md §8.4).

    logits = normalize(p) normalize(q)^T / tau, cross-entropy against the diagonal, mean over
    rows, times `weight`. Negatives are the other rows of the same (rank-local) batch; a batch
    of 1 gives 0. Runs in fp32 with autocast disabled.

    Args:
        p: [B, D] view-A projections.
        q: [B, D] view-B projections.
        tau: temperature.
        weight: loss weight (the reference trains with 0.1).
    """
    if p.dim() != 2 or p.shape != q.shape:
        raise ValueError(f"p and q must both be [B, D]; got {tuple(p.shape)} and {tuple(q.shape)}")
    with torch.autocast(device_type=p.device.type, enabled=False):
        pn = F.normalize(p.float(), p=2, dim=-1)
        qn = F.normalize(q.float(), p=2, dim=-1)
        logits = pn @ qn.transpose(0, 1)
        labels = torch.arange(p.shape[0], device=p.device)
        return weight * F.cross_entropy(logits / tau, labels)
