"""Band dropout: the keep multiplier of one (modality, bandset) embedding call.

The reference zeroes whole bands of the online encoder's input, per sample, before the patch
embedding (docs/reference_semantics.md §3.3); `patch_embed` takes the result as its `keep`
argument and folds the multiply into its input loads.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["band_dropout_keep"]


def band_dropout_keep(
    batch: int,
    num_bands: int,
    rate: float,
    *,
    random_rate: bool = False,
    draws: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Draw the band-dropout keep multiplier of one (modality, bandset) embedding call.

    Semantics of the reference (docs/reference_semantics.md §3.3): with `random_rate`, one rate
    r = U[0,1)·rate is drawn per call (shared by all samples); otherwise r = rate.
    keep[b, c] = (U[0,1) >= r), independent per sample and band; a sample with no band kept
    gets one band, drawn uniformly, forced on. No 1/(1-r) rescale. The result is shared over
    H, W and T by the caller (it is a [B, C] multiplier).

    Unlike the reference, nothing here syncs with the host: the random rate stays a 0-d device
    tensor and the at-least-one rule is an unconditional masked OR (a replacement index is
    drawn for every sample, used only where none was kept). The distribution is identical;
    the random stream is not.

    With ``draws`` = V, V independent multipliers in one call (each with its own random rate):
    what V calls give, in distribution, from one set of about ten small operators instead of V
    sets (the two views' multipliers of one (modality, bandset); on a GPU each operator is a
    kernel launch). The random stream is not that of V calls.

    Args:
        batch: Number of samples B.
        num_bands: Number of bands C of the bandset (>= 1).
        rate: Fixed drop probability, or the maximum of the random rate, in [0, 1].
        random_rate: Draw the rate as U[0,1)·rate once per call (per draw with ``draws``).
        draws: None (one multiplier) or the number V >= 1 of independent multipliers.
        generator: Optional torch.Generator (on `device`).
        device: Device of the result.

    Returns:
        float32 tensor [B, C] of 0/1, or [V, B, C] with ``draws``.
    """
    if batch < 0:
        raise ValueError(f"band_dropout_keep: batch must be >= 0, got {batch}")
    if num_bands < 1:
        raise ValueError(f"band_dropout_keep: num_bands must be >= 1, got {num_bands}")
    if not 0.0 <= float(rate) <= 1.0:
        raise ValueError(f"band_dropout_keep: rate must be in [0, 1], got {rate}")
    if draws is not None and draws < 1:
        raise ValueError(f"band_dropout_keep: draws must be >= 1, got {draws}")
    kw = dict(generator=generator, device=device)
    lead = () if draws is None else (draws,)
    r: Tensor | float = rate
    if random_rate:
        r = (torch.rand(lead, **kw) * rate)[..., None, None]  # one rate per draw
    keep = torch.rand(*lead, batch, num_bands, **kw) >= r
    none_kept = ~keep.any(dim=-1, keepdim=True)
    replacement = torch.randint(num_bands, (*lead, batch, 1), **kw)
    forced = torch.arange(num_bands, device=keep.device) == replacement  # [..., B, C] one-hot
    return (keep | (forced & none_kept)).to(torch.float32)
