"""A random masked batch for parity tests: model inputs the reference and ours both accept."""

from __future__ import annotations

import torch

from olmoearth_fast.modalities import MISSING_VALUE, MODALITIES, MaskValue, TokenizationConfig


def random_masked_batch(tok: TokenizationConfig, mods, p: int, hw: int, t: int, b: int, seed: int = 0):
    """(data, pixel masks, timestamps): random normalised values with scattered missing pixels,
    mask codes drawn per token (MISSING where the token's top-left pixel misses a band); every
    sample keeps an ONLINE S2 token and a DECODER worldcover token, sample 0 has no ONLINE
    token of its second modality (ragged ONLINE counts)."""
    g = torch.Generator().manual_seed(seed)
    data, masks = {}, {}
    for m in mods:
        spec, bs = MODALITIES[m], tok.num_bandsets(m)
        tt = t if spec.is_multitemporal else 1
        if spec.is_spatial:
            x = torch.randn(b, hw * p, hw * p, tt, spec.num_bands, generator=g)
            x[torch.rand(b, hw * p, hw * p, tt, generator=g) < 0.03] = MISSING_VALUE
            codes = torch.randint(0, 3, (b, hw, hw, tt, bs), generator=g)
            pix = codes.repeat_interleave(p, 1).repeat_interleave(p, 2)
            for i, idx in enumerate(tok.bandset_indices(m)):
                pix[..., i][(x[..., idx] == MISSING_VALUE).any(-1)] = MaskValue.MISSING
        else:
            x = torch.randn(b, tt, spec.num_bands, generator=g)
            pix = torch.randint(0, 3, (b, tt, bs), generator=g)
        data[m], masks[m] = x, pix.long()
    masks["sentinel2_l2a"][:, 0, 0, 0, 0] = MaskValue.ONLINE_ENCODER
    masks["worldcover"][:, 0, 0, 0, 0] = MaskValue.DECODER
    data["sentinel2_l2a"][:, 0, 0, 0, :] = 0.5
    data["worldcover"][:, 0, 0, 0, :] = 0.5
    second = masks[mods[1]][0]
    second[second == MaskValue.ONLINE_ENCODER] = MaskValue.TARGET_ENCODER_ONLY
    days = torch.randint(1, 28, (b, t, 1), generator=g)
    months = torch.randint(0, 12, (b, t, 1), generator=g)
    return data, masks, torch.cat([days, months, torch.full((b, t, 1), 2021)], -1)
