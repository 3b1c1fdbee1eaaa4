"""Dataset item semantics: token budget, time cropping, missing fill, crop, normalisation."""

import numpy as np
import pytest

from olmoearth_fast.data.dataset import (
    OlmoEarthH5Dataset,
    max_t_within_budget,
    valid_start_months,
)
from olmoearth_fast.data.demo import make_demo_dataset
from olmoearth_fast.data.h5 import write_metadata, write_sample
from olmoearth_fast.data.normalize import normalize
from olmoearth_fast.modalities import TRAINING_MODALITIES, tokenization_preset
from tests.helpers.dataset_ref import get_item_ref


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), num_samples=12, seed=3,
                             tile_size=32)


def test_budget_table_default_bandsets():
    """docs/reference_semantics.md §9.4: T per hw_p with the default-bandset quirk."""
    got = [max_t_within_budget(TRAINING_MODALITIES, h, 2250) for h in range(1, 13)]
    assert got == [12, 12, 12, 12, 12, 9, 6, 4, 3, 2, 2, 1]
    # counting the single-bandset tokenization instead: 3 tokens/month, 6 static per position
    single = tokenization_preset("single_bandset")
    got = [max_t_within_budget(TRAINING_MODALITIES, h, 2250, single) for h in range(1, 13)]
    assert got == [min(12, (2250 - 6 * h * h) // (3 * h * h)) for h in range(1, 13)]
    # era5_10 adds one token per month, T unchanged for hw_p = 6 (2250 - 216) / 217 = 9.37
    assert max_t_within_budget(TRAINING_MODALITIES + ("era5_10",), 6, 2250) == 9
    assert max_t_within_budget(TRAINING_MODALITIES, 6, None) == 12
    with pytest.raises(ValueError, match="leaves no month"):
        max_t_within_budget(TRAINING_MODALITIES, 12, 500)


def test_valid_start_months():
    masks = {"a": np.array([0, 1, 1, 0, 0, 1, 0, 0, 0, 0], bool)}
    assert valid_start_months(masks, 4, 10) == [1, 2, 5]
    assert valid_start_months({}, 4, 6) == [0, 1, 2]
    assert valid_start_months(masks, 12, 10) == [0]


@pytest.mark.parametrize("p,hw_p,budget", [(1, 1, 2250), (2, 6, 2250), (4, 3, 2250),
                                           (8, 4, None), (1, 12, 2250)])
def test_fast_path_equals_full_tile_path(demo, p, hw_p, budget):
    ds = OlmoEarthH5Dataset(demo)
    for i in range(len(ds)):
        if hw_p * p > ds.tile_size:
            continue
        a = ds.get_item(i, p, hw_p, budget, np.random.default_rng(i))
        b = get_item_ref(ds, i, p, hw_p, budget, np.random.default_rng(i))
        assert a.missing_modalities == b.missing_modalities
        np.testing.assert_array_equal(a.timestamps, b.timestamps)
        for m in TRAINING_MODALITIES:
            assert a.data[m].dtype == np.float32
            np.testing.assert_array_equal(a.data[m], b.data[m], err_msg=f"{i} {m}")


def _write_partial_year(tmp_path):
    rng = np.random.default_rng(0)
    s2_months = [2, 3, 6]  # months 0,1 and 7..11 absent everywhere -> time axis cropped
    s1_months = [4]
    s2 = rng.integers(100, 5000, (16, 16, 3, 12)).astype(np.uint16)
    s1 = rng.normal(-12, 2, (16, 16, 1, 2)).astype(np.float32)
    ts = np.array([[1, (5 + k) % 12, 2020 + (5 + k) // 12] for k in range(12)])
    write_sample(tmp_path / "sample_0.h5",
                 {"sentinel2_l2a": s2, "sentinel1": s1,
                  "srtm": np.full((16, 16, 1, 1), 500, np.int16)},
                 ts, {"sentinel2_l2a": np.isin(np.arange(12), s2_months),
                      "sentinel1": np.isin(np.arange(12), s1_months)})
    # a sample without any spacetime modality: filtered out through the metadata
    write_sample(tmp_path / "sample_1.h5", {"srtm": np.zeros((16, 16, 1, 1), np.int16)}, ts)
    write_metadata(tmp_path, {0: ["sentinel2_l2a", "sentinel1", "srtm"], 1: ["srtm"]},
                   TRAINING_MODALITIES)
    return s2, s1, ts


def test_time_crop_missing_fill_and_normalisation(tmp_path):
    s2, s1, ts = _write_partial_year(tmp_path)
    ds = OlmoEarthH5Dataset(tmp_path)
    assert len(ds) == 1  # sample_1 has no S2/S1/Landsat
    item = ds.get_item(0, 4, 4, None, np.random.default_rng(0), crop=(0, 0, 0))
    # cropped to months 2..6 (5 real), padded to 12 by repeating month 6's timestamp
    np.testing.assert_array_equal(item.timestamps[:5], ts[2:7])
    np.testing.assert_array_equal(item.timestamps[5:], np.tile(ts[6], (7, 1)))
    x = item.data["sentinel2_l2a"]
    np.testing.assert_array_equal(x[:, :, [0, 1, 4]], normalize("sentinel2_l2a", s2))
    assert (x[:, :, [2, 3] + list(range(5, 12))] == -99999).all()
    y = item.data["sentinel1"]
    np.testing.assert_array_equal(y[:, :, 2], normalize("sentinel1", s1[:, :, 0]))
    assert (np.delete(y, 2, axis=2) == -99999).all()
    # absent modalities: all -99999, not normalised, right shapes
    assert item.data["landsat"].shape == (16, 16, 12, 11) and (item.data["landsat"] == -99999).all()
    assert item.data["worldcover"].shape == (16, 16, 1, 1)
    assert "landsat" in item.missing_modalities and "srtm" not in item.missing_modalities
    # budget T = 4 at hw_p = 8: starts drawn among present S2/S1 months with 4 months left
    seen = {int(ds.get_item(0, 2, 8, 2250, np.random.default_rng(k)).timestamps[0, 1])
            for k in range(40)}
    assert seen == {int(ts[2, 1]), int(ts[3, 1])}  # slots 0, 1 (slot 2 = month 4 is S1 only,
    # and 2 + 4 > 5 real months is not allowed)


def test_crop_too_large_and_budget_errors(tmp_path):
    _write_partial_year(tmp_path)
    ds = OlmoEarthH5Dataset(tmp_path)
    with pytest.raises(ValueError, match="exceeds"):
        ds.get_item(0, 8, 3, 2250, np.random.default_rng(0))
    with pytest.raises(FileNotFoundError):
        OlmoEarthH5Dataset(tmp_path / "nope")


def test_matches_reference_dataset(demo):
    """Same crop draws (legacy np.random with one seed) -> bit-identical arrays."""
    pytest.importorskip("olmoearth_pretrain")
    from tests.helpers.refcompat import import_reference_dataset, reference_dataset

    ref_mod = import_reference_dataset()
    ref = reference_dataset(demo, TRAINING_MODALITIES)
    ours = OlmoEarthH5Dataset(demo)
    np.testing.assert_array_equal(ours.sample_indices, ref.sample_indices)
    for i in range(len(ours)):
        for p, hw_p in [(1, 6), (2, 3), (4, 8), (8, 2)]:
            seed = 100 * i + p
            np.random.seed(seed)
            _, r = ref[ref_mod.GetItemArgs(idx=i, patch_size=p, sampled_hw_p=hw_p,
                                           token_budget=2250)]
            o = ours.get_item(i, p, hw_p, 2250, np.random.RandomState(seed))
            np.testing.assert_array_equal(o.timestamps, r.timestamps)
            for m in TRAINING_MODALITIES:
                np.testing.assert_array_equal(o.data[m], getattr(r, m), err_msg=f"{i} {m}")
