"""Masking rules of docs/reference_semantics.md §7.1-§7.4, checked exactly per sample."""

import math

import pytest
import torch

from olmoearth_fast.data.masking import (
    MaskingConfig,
    ModalityCrossRandomMasking,
    build_masking,
    missing_pixel_masks,
)
from olmoearth_fast.modalities import (
    MODALITIES,
    ONLY_DECODE_MODALITIES,
    TRAINING_MODALITIES,
    TokenizationConfig,
    tokenization_preset,
)

ON, TG, DE, MI = 0, 1, 2, 3
SINGLE = tokenization_preset("single_bandset")
CROSS = dict(type="modality_cross_random", allow_encoding_decoding_same_bandset=True,
             only_decode_modalities=list(ONLY_DECODE_MODALITIES))
RWD = dict(type="random_with_decode", only_decode_modalities=list(ONLY_DECODE_MODALITIES))


def make_data(B=6, p=2, hw=4, T=3, absent=(), modalities=TRAINING_MODALITIES, seed=0):
    g = torch.Generator().manual_seed(seed)
    data = {}
    for m in modalities:
        s = MODALITIES[m]
        t = T if s.is_multitemporal else 1
        shape = (B, hw * p, hw * p, t, s.num_bands) if s.is_spatial else (B, T, s.num_bands)
        x = torch.rand(shape, generator=g)
        if m in absent:
            x[:] = -99999
        data[m] = x
    return data


def tokens(mask, p):
    return mask[:, ::p, ::p] if mask.dim() == 5 else mask


def counts(mask, p, b, bs=0):
    t = tokens(mask, p)[b, ..., bs]
    return [int((t == v).sum()) for v in range(4)]


def test_shapes_dtype_and_patch_constancy():
    p = 2
    data = make_data(p=p)
    for cfg in (CROSS, RWD, dict(type="random_time_with_decode"), dict(type="random")):
        st = build_masking(cfg, "two_bandset")
        masks = st(data, p, torch.Generator().manual_seed(0))
        assert masks["sentinel2_l2a"].shape == (6, 8, 8, 3, 2)
        assert masks["landsat"].shape == (6, 8, 8, 3, 1)
        assert masks["worldcover"].shape == (6, 8, 8, 1, 1)
        for m, x in masks.items():
            assert x.dtype == torch.uint8 and int(x.max()) <= 3
            blocks = x.view(6, 4, p, 4, p, *x.shape[3:])
            assert (blocks == blocks[:, :, :1, :, :1]).all(), (cfg["type"], m)


def test_cross_random_single_bandset_roles():
    """S2, S1, Landsat present with single bandsets: 2 or 3 units encoded, maps never."""
    p, N = 2, 4 * 4 * 3
    st = build_masking(CROSS, SINGLE)
    data = make_data(B=64, p=p)
    masks = st(data, p, torch.Generator().manual_seed(1))
    n_encoded = torch.zeros(64, dtype=torch.long)
    for m in ("sentinel2_l2a", "sentinel1", "landsat"):
        for b in range(64):
            on, tg, de, mi = counts(masks[m], p, b)
            assert mi == 0 and on in (0, N // 2)
            # encoded: floor(N/2) ONLINE; decoded or not encoded: DECODER tokens kept
            assert de in (0, N // 2)
            if on == 0:
                assert de == N // 2, "a non-encoded unit keeps its DECODER tokens"
            n_encoded[b] += on > 0
    assert set(n_encoded.tolist()) <= {2, 3} and set(n_encoded.tolist()) == {2, 3}
    for m in ONLY_DECODE_MODALITIES:
        t = tokens(masks[m], p)
        assert not (t == ON).any()
        per_sample = (t == DE).flatten(1).sum(1)
        assert set(per_sample.tolist()) == {8}  # floor(16 / 2), decoded or not


def test_cross_random_two_unit_rule():
    """Only S2 and S1 present: first (S2) encoded not decoded, S1 decoded, not encoded."""
    p = 1
    absent = [m for m in TRAINING_MODALITIES if m not in ("sentinel2_l2a", "sentinel1")]
    data = make_data(B=8, p=p, absent=absent)
    masks = build_masking(CROSS, SINGLE)(data, p, torch.Generator().manual_seed(2))
    N = 4 * 4 * 3
    for b in range(8):
        assert counts(masks["sentinel2_l2a"], p, b) == [N // 2, N - N // 2, 0, 0]
        assert counts(masks["sentinel1"], p, b) == [0, N - N // 2, N // 2, 0]
        assert (masks["landsat"][b] == MI).all()


def test_cross_random_one_unit_fallback():
    """One unit: encoded, nothing decoded -> no DECODER -> the sample's non-only-decode
    modalities are re-drawn 50/50 over all their bandsets jointly, missing tokens excluded."""
    p = 2
    absent = [m for m in TRAINING_MODALITIES if m != "sentinel2_l2a"]
    data = make_data(B=4, p=p, hw=3, T=1, absent=absent)
    data["sentinel2_l2a"][..., 4:] = -99999  # only the 10 m bandset of the 3 default ones
    masks = build_masking(CROSS, "default")(data, p, torch.Generator().manual_seed(3))
    M = 3 * 3 * 1  # valid tokens: bandset 0 only
    for b in range(4):
        t = tokens(masks["sentinel2_l2a"], p)[b]
        assert int((t == ON).sum()) == M // 2 and int((t == DE).sum()) == M // 2
        assert (t[..., 1:] == MI).all()
    # re-drawn units take the token value at every pixel of the patch (reference repeat)
    data["sentinel2_l2a"][:, 1, 1, :, 0] = -99999  # a non-top-left pixel
    masks = build_masking(CROSS, "default")(data, p, torch.Generator().manual_seed(3))
    assert not (masks["sentinel2_l2a"][:, 1, 1, :, 0] == MI).any()


def test_cross_random_missing_pixels_and_tokens():
    p = 2
    data = make_data(B=8, p=p)
    x = data["sentinel2_l2a"]
    x[:, 1, 1, :, 5] = -99999   # one non-top-left pixel of token (0, 0): pixel MISSING only
    x[:, 2, 2, 0, 0] = -99999   # top-left pixel of token (1, 1) at t=0: token MISSING
    masks = build_masking(CROSS, SINGLE)(data, p, torch.Generator().manual_seed(4))
    m = masks["sentinel2_l2a"]
    assert (m[:, 1, 1] == MI).all() and (m[:, 2, 2, 0] == MI).all()
    assert (m[:, 0, 0] != MI).all() and (tokens(m, p)[:, 1, 1, 0] == MI).all()
    # the other pixels of a token whose top-left is missing keep the drawn value
    assert not (m[:, 3, 3, 0] == MI).any()
    # an S2-only missing band does not make S1 missing
    assert not (masks["sentinel1"] == MI).any()


def test_cross_random_fallback_counts_only_valid_tokens():
    """Fallback draw uses M = tokens whose top-left pixel is valid, M == 1 -> one ONLINE."""
    p = 1
    absent = [m for m in TRAINING_MODALITIES if m != "sentinel2_l2a"]
    data = make_data(B=3, p=p, hw=2, T=1, absent=absent)
    data["sentinel2_l2a"][:, :, :, :, :][:, 0, 0] = -99999
    data["sentinel2_l2a"][:, 0, 1] = -99999
    data["sentinel2_l2a"][:, 1, 0] = -99999  # one valid token left
    masks = build_masking(CROSS, SINGLE)(data, p, torch.Generator().manual_seed(5))
    for b in range(3):
        assert counts(masks["sentinel2_l2a"], p, b) == [1, 0, 0, 3]


def test_random_with_decode_roles():
    p, N = 2, 4 * 4 * 3
    data = make_data(B=32, p=p)
    data["worldcover"][:, 0:2, 0:2] = -99999  # one missing map token
    masks = build_masking(RWD, SINGLE)(data, p, torch.Generator().manual_seed(6))
    for m in ONLY_DECODE_MODALITIES:
        t = tokens(masks[m], p)
        valid = t != MI
        assert (t[valid] == DE).all()
    assert int((tokens(masks["worldcover"], p) == MI).sum()) == 32
    n_units = math.ceil(3 * 0.5)
    for b in range(32):
        roles = []
        for m in ("sentinel2_l2a", "sentinel1", "landsat"):
            c = counts(masks[m], p, b)
            assert c in ([N // 2, N - N // 2, 0, 0], [0, N - N // 2, N // 2, 0]), c
            roles.append(c[0] > 0)
        assert sum(roles) == n_units  # 2 encode-role units, 1 decode-role unit


def test_random_with_decode_single_token_and_single_unit():
    """M == 1: the token is ONLINE even in a decode-role unit; a single unit gets both."""
    data = make_data(B=16, p=1, hw=1, T=1)
    masks = build_masking(RWD, SINGLE)(data, 1, torch.Generator().manual_seed(7))
    for m in ("sentinel2_l2a", "sentinel1", "landsat"):
        assert (masks[m] == ON).all()
    absent = [m for m in TRAINING_MODALITIES if m != "sentinel1"]
    data = make_data(B=4, p=1, hw=2, T=2, absent=absent)
    masks = build_masking(RWD, SINGLE)(data, 1, torch.Generator().manual_seed(8))
    for b in range(4):
        assert counts(masks["sentinel1"], 1, b) == [4, 0, 4, 0]


def test_random_time_with_decode_time_mode():
    p, T = 1, 4
    data = make_data(B=16, p=p, hw=2, T=T)
    st = build_masking(dict(type="random_time_with_decode", random_ratio=0.0,
                            only_decode_modalities=list(ONLY_DECODE_MODALITIES)), SINGLE)
    masks = st(data, p, torch.Generator().manual_seed(9))
    for b in range(16):
        enc_months, dec_months = set(), set()
        for m in ("sentinel2_l2a", "sentinel1", "landsat"):
            t = masks[m][b, ..., 0]  # [h, w, T]
            per_t = [set(t[:, :, k].unique().tolist()) for k in range(T)]
            for k, vals in enumerate(per_t):
                assert len(vals) == 1
                if vals == {ON}:
                    enc_months.add(k)
                if vals == {DE}:
                    dec_months.add(k)
        assert len(enc_months) == 2 and len(dec_months) == 2  # ceil(4 * 0.5) encode months
        assert not enc_months & dec_months


def test_tokenization_groups_define_missing():
    data = make_data(B=2, p=1)
    data["sentinel2_l2a"][..., 10] = -99999  # B01 missing everywhere
    miss = missing_pixel_masks(data, tokenization_preset("single_bandset_no60m"))
    assert not miss["sentinel2_l2a"].any()
    miss = missing_pixel_masks(data, TokenizationConfig())
    assert miss["sentinel2_l2a"][..., 2].all() and not miss["sentinel2_l2a"][..., :2].any()


def test_determinism_and_independence():
    data = make_data(B=4)
    st = build_masking(CROSS, SINGLE)
    a = st(data, 2, torch.Generator().manual_seed(11))
    b = st(data, 2, torch.Generator().manual_seed(11))
    c = st(data, 2, torch.Generator().manual_seed(12))
    assert all(torch.equal(a[m], b[m]) for m in a)
    assert not all(torch.equal(a[m], c[m]) for m in a)


def test_config_validation():
    with pytest.raises(ValueError, match="unknown masking strategy 'space'"):
        build_masking("space")
    with pytest.raises(ValueError, match="does not take parameter 'random_ratio'"):
        build_masking(dict(type="random_with_decode", random_ratio=0.3))
    with pytest.raises(ValueError, match="min_encoded_bandsets must be > 1"):
        ModalityCrossRandomMasking(min_encoded_bandsets=1)
    with pytest.raises(ValueError, match="unknown modality"):
        build_masking(RWD, only_decode_modalities=["worldcoverr"])
    with pytest.raises(ValueError, match="not a multiple of patch_size=3"):
        build_masking(RWD)(make_data(B=1, p=2, hw=2), 3, torch.Generator())
    st = build_masking(MaskingConfig(name="modality_cross_random", max_encoded_bandsets=2),
                       "default")
    assert st.max_enc == 2 and st.min_enc == 2
