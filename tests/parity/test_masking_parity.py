"""Distribution parity of the vectorised masking with olmoearth_pretrain's strategies.

Over 200 random batches (random patch size, crop, months, absent modalities, missing months and
pixels), the per-modality fraction of each mask value must agree within 2 percentage points,
at token resolution (what the model reads) and at pixel resolution.
"""

import numpy as np
import pytest
import torch

from olmoearth_fast.data.masking import build_masking, missing_pixel_masks
from olmoearth_fast.modalities import (
    MODALITIES,
    ONLY_DECODE_MODALITIES,
    TOKENIZATION_PRESETS,
    TRAINING_MODALITIES,
)

N_BATCHES, B = 200, 16
SHAPES = [(2, 6), (3, 3), (4, 2), (2, 6), (3, 3), (4, 2), (1, 1), (2, 1), (1, 6)]
CASES = [
    ("modality_cross_random", {"allow_encoding_decoding_same_bandset": True}, "single_bandset"),
    ("modality_cross_random", {"allow_encoding_decoding_same_bandset": True}, "default"),
    ("random_with_decode", {}, "single_bandset"),
    ("random_time_with_decode", {"random_ratio": 0.5}, "single_bandset"),
]


def _batches(seed):
    rng = np.random.default_rng(seed)
    for _ in range(N_BATCHES):
        p = int(rng.choice([1, 2, 4]))
        # mostly crops of similar token counts (hw²·T ~ 24-32), so that no few batches
        # dominate the pooled fractions, plus small ones for the M == 1 / few-token rules
        hw, T = SHAPES[int(rng.integers(len(SHAPES)))]
        data = {}
        for m in TRAINING_MODALITIES:
            s = MODALITIES[m]
            t = T if s.is_multitemporal else 1
            x = rng.random((B, hw * p, hw * p, t, s.num_bands), dtype=np.float32)
            absent = rng.random(B) < (0.2 if s.is_multitemporal else 0.3)
            x[absent] = -99999
            if s.is_multitemporal:  # missing months
                months = rng.random((B, T)) < 0.3
                x.transpose(0, 3, 1, 2, 4)[months] = -99999
            holes = rng.random(x.shape[:-1]) < 0.02  # scattered missing pixels
            x[holes, int(rng.integers(s.num_bands))] = -99999
            data[m] = torch.from_numpy(x)
        yield p, data


def _fractions(masks, p, acc):
    for m, x in masks.items():
        x = x.long()
        tok = x[:, ::p, ::p] if x.dim() == 5 else x
        for level, t in (("token", tok), ("pixel", x)):
            c = torch.bincount(t.flatten(), minlength=4)[:4].double()
            acc.setdefault((m, level), torch.zeros(4, dtype=torch.float64)).add_(c)


@pytest.mark.parametrize("name,params,preset", CASES)
def test_mask_value_fractions_match_reference(name, params, preset):
    pytest.importorskip("olmoearth_pretrain")
    from olmoearth_pretrain.datatypes import MaskedOlmoEarthSample, OlmoEarthSample
    from olmoearth_pretrain.nn.tokenization import ModalityTokenization
    from olmoearth_pretrain.nn.tokenization import TokenizationConfig as RefTok
    from olmoearth_pretrain.train.masking import MaskingConfig as RefMaskingConfig

    cfg = {"type": name, "encode_ratio": 0.5, "decode_ratio": 0.5,
           "only_decode_modalities": list(ONLY_DECODE_MODALITIES), **params}
    ref_tok = RefTok(overrides={m: ModalityTokenization(band_groups=g)
                                for m, g in TOKENIZATION_PRESETS[preset].items()})
    ref = RefMaskingConfig(strategy_config=dict(cfg), tokenization_config=ref_tok).build()
    ours = build_masking(cfg, preset)
    np.random.seed(0)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    acc_ref, acc_ours = {}, {}
    for p, data in _batches(1):
        ts = torch.zeros(B, data["sentinel2_l2a"].shape[3], 3, dtype=torch.long)
        r = ref.apply_mask(OlmoEarthSample(**data, timestamps=ts), patch_size=p)
        _fractions({m: getattr(r, MaskedOlmoEarthSample.get_masked_modality_name(m))
                    for m in data}, p, acc_ref)
        missing = missing_pixel_masks(data, ours.tokenization)
        _fractions(ours(data, p, gen, missing), p, acc_ours)
    worst = 0.0
    for key, c_ref in acc_ref.items():
        f_ref = c_ref / c_ref.sum()
        f_ours = acc_ours[key] / acc_ours[key].sum()
        diff = (f_ref - f_ours).abs().max().item()
        worst = max(worst, diff)
        assert diff < 0.02, (key, f_ref.tolist(), f_ours.tolist())
    print(f"{name}/{preset}: worst fraction difference {worst:.4f}")
