"""Normalisation with the shipped reference statistics."""

import numpy as np
import pytest

from olmoearth_fast.data.normalize import (
    denormalize,
    load_norm_stats,
    norm_bounds,
    normalize,
    normalize_ref,
)
from olmoearth_fast.modalities import MODALITIES


def test_computed_two_sigma_maps_to_unit_interval_without_clipping():
    st = load_norm_stats("computed")["sentinel2_l2a"]["B02"]
    mu, sd = st["mean"], st["std"]
    x = np.zeros((3, 12))
    x[:, 0] = [mu - 2 * sd, mu + 2 * sd, mu + 6 * sd]
    y = normalize("sentinel2_l2a", x)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y[:, 0], [0.0, 1.0, 2.0], atol=1e-6)
    assert norm_bounds("sentinel2_l2a")[2] == "computed"


def test_predefined_fallback():
    assert norm_bounds("openstreetmap_raster")[2] == "predefined"
    assert norm_bounds("worldcereal")[2] == "predefined"
    for m in ("sentinel1", "landsat", "worldcover", "srtm", "cdl", "wri_canopy_height_map",
              "era5_10"):
        assert norm_bounds(m)[2] == "computed", m
    y = normalize("worldcereal", np.array([[0, 50, 100, 0, 0, 0, 0, 0]], np.uint8))
    np.testing.assert_allclose(y[0, :3], [0.0, 0.5, 1.0])


def test_missing_kept_and_inverse():
    x = np.full((4, 4, 2, 2), -12.0, np.float32)
    x[0, 0, 0, 1] = -99999
    y = normalize("sentinel1", x)
    assert y[0, 0, 0, 1] == -99999 and (y[y != -99999] != -99999).all()
    back = denormalize("sentinel1", y)
    np.testing.assert_allclose(back[y != -99999], -12.0, rtol=1e-5)
    assert back[0, 0, 0, 1] == -99999


def test_bad_band_count():
    with pytest.raises(ValueError, match="expected last axis of 12 bands"):
        normalize("sentinel2_l2a", np.zeros((2, 11)))


def test_bit_identical_to_reference_normalizer():
    pytest.importorskip("olmoearth_pretrain")
    from olmoearth_pretrain.data.constants import Modality
    from olmoearth_pretrain.data.normalize import Normalizer, Strategy

    comp, pre = Normalizer(Strategy.COMPUTED), Normalizer(Strategy.PREDEFINED)
    rng = np.random.default_rng(0)
    for m, spec in MODALITIES.items():
        for dtype in (np.uint16, np.float32):
            x = rng.uniform(0, 3000, (5, 7, spec.num_bands)).astype(dtype)
            try:
                ref = comp.normalize(Modality.get(m), x)
            except Exception:
                ref = pre.normalize(Modality.get(m), x)
            ref = ref.astype(np.float32)
            np.testing.assert_array_equal(normalize(m, x), ref, err_msg=m)
            np.testing.assert_array_equal(normalize_ref(m, x), ref, err_msg=m)
