"""Modality specs and tokenization config (docs/reference_semantics.md §1)."""

import pytest

from olmoearth_fast.modalities import (
    LOSS_FIELD_ORDER,
    MISSING_VALUE,
    MODALITIES,
    ONLY_DECODE_MODALITIES,
    TOKENIZATION_PRESETS,
    TRAINING_MODALITIES,
    MaskValue,
    TokenizationConfig,
    as_tokenization,
    get_modality,
    tokenization_preset,
)


def test_mask_values_and_constants():
    assert [int(v) for v in MaskValue] == [0, 1, 2, 3]
    assert MISSING_VALUE == -99999


def test_modality_table():
    assert set(MODALITIES) <= set(LOSS_FIELD_ORDER)
    assert list(MODALITIES) == [m for m in LOSS_FIELD_ORDER if m in MODALITIES]
    s2 = MODALITIES["sentinel2_l2a"]
    assert s2.band_order == ("B02", "B03", "B04", "B08", "B05", "B06", "B07", "B8A", "B11",
                             "B12", "B01", "B09")
    assert s2.default_bandset_indices() == [[0, 1, 2, 3], [4, 5, 6, 7, 8, 9], [10, 11]]
    ls = MODALITIES["landsat"]
    assert ls.band_order[0] == "B8" and ls.num_bands == 11 and ls.num_bandsets == 2
    assert MODALITIES["openstreetmap_raster"].num_bands == 30
    assert MODALITIES["worldcereal"].num_bands == 8
    era5 = MODALITIES["era5_10"]
    assert era5.is_time_only and not era5.is_spatial and era5.num_bands == 6
    assert all(MODALITIES[m].is_spacetime for m in ("sentinel2_l2a", "sentinel1", "landsat"))
    assert all(MODALITIES[m].is_space_only for m in ONLY_DECODE_MODALITIES)
    assert len(TRAINING_MODALITIES) == 9 and "era5_10" not in TRAINING_MODALITIES
    assert len(ONLY_DECODE_MODALITIES) == 6


def test_presets_indices():
    single = tokenization_preset("single_bandset")
    assert single.bandset_indices("sentinel2_l2a") == [list(range(12))]
    assert single.bandset_indices("landsat") == [list(range(11))]
    assert single.num_bandsets("sentinel1") == 1
    assert tokenization_preset("single_bandset_no60m").bandset_indices("sentinel2_l2a") == [
        list(range(10))]
    assert tokenization_preset("single_bandset_10m_only").bands_per_bandset(
        "sentinel2_l2a") == [4]
    two = tokenization_preset("two_bandset")
    assert two.bandset_indices("sentinel2_l2a") == [[0, 1, 2, 3], [4, 5, 6, 7, 8, 9]]
    default = tokenization_preset("default")
    assert default.num_bandsets("sentinel2_l2a") == 3 and default.num_bandsets("landsat") == 2
    explicit = tokenization_preset("default_explicit")
    for m in MODALITIES:
        assert explicit.bandset_indices(m) == default.bandset_indices(m)


def test_override_order_and_overlap_kept():
    tok = TokenizationConfig({"sentinel2_l2a": [["B04", "B02"], ["B02", "B08"]]})
    assert tok.bandset_indices("sentinel2_l2a") == [[2, 0], [0, 3]]
    assert as_tokenization(tok.to_dict()) == tok
    assert as_tokenization({"overrides": {"sentinel2_l2a": {"band_groups": [["B04"]]}}}
                           ).bandset_indices("sentinel2_l2a") == [[2]]


def test_validation_errors_name_the_culprit():
    with pytest.raises(ValueError, match=r"unknown band 'B10'.*sentinel2_l2a.*B02"):
        TokenizationConfig({"sentinel2_l2a": [["B02", "B10"]]})
    with pytest.raises(ValueError, match=r"unknown modality 'sentinel9'.*sentinel2_l2a"):
        TokenizationConfig({"sentinel9": [["B02"]]})
    with pytest.raises(ValueError, match="non-empty"):
        TokenizationConfig({"landsat": []})
    with pytest.raises(ValueError, match="non-empty"):
        TokenizationConfig({"landsat": [[]]})
    with pytest.raises(ValueError, match="unknown modality"):
        get_modality("naip")
    with pytest.raises(ValueError, match="unknown tokenization preset"):
        tokenization_preset("three_bandset")


def test_matches_reference_constants():
    pytest.importorskip("olmoearth_pretrain")
    from olmoearth_pretrain.data.constants import Modality
    from olmoearth_pretrain.nn.tokenization import ModalityTokenization
    from olmoearth_pretrain.nn.tokenization import TokenizationConfig as RefTok

    for name, spec in MODALITIES.items():
        ref = Modality.get(name)
        assert list(spec.band_order) == ref.band_order
        assert [list(b) for b in spec.bandsets] == [b.bands for b in ref.band_sets]
        assert spec.is_spatial == ref.is_spatial
        assert spec.is_multitemporal == ref.is_multitemporal
        assert spec.default_bandset_indices() == ref.bandsets_as_indices()
    for preset, overrides in TOKENIZATION_PRESETS.items():
        ours = tokenization_preset(preset)
        ref = RefTok(overrides={m: ModalityTokenization(band_groups=g)
                                for m, g in overrides.items()})
        for m in MODALITIES:
            assert ours.bandset_indices(m) == ref.get_bandset_indices(m), (preset, m)
            assert ours.num_bandsets(m) == ref.get_num_bandsets(m)
