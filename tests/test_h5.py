"""Reference H5 layout: writer/reader round trip, hand-written files, corrupt files."""

import h5py
import hdf5plugin
import numpy as np
import pytest

from olmoearth_fast.data.dataset import OlmoEarthH5Dataset
from olmoearth_fast.data.h5 import (
    CorruptSampleError,
    read_metadata,
    read_sample,
    sample_path,
    write_metadata,
    write_sample,
)


def _arrays(rng, size=16):
    return {
        "sentinel2_l2a": rng.integers(0, 10000, (size, size, 3, 12), dtype=np.uint16),
        "sentinel1": rng.normal(-12, 3, (size, size, 5, 2)).astype(np.float32),
        "worldcover": rng.choice([10, 20, 30], (size, size, 1, 1)).astype(np.uint8),
        "openstreetmap_raster": rng.integers(0, 2, (size, size, 1, 30), dtype=np.uint8),
        "era5_10": rng.normal(0, 1, (12, 6)).astype(np.float32),
    }


@pytest.mark.parametrize("compression", ["zstd", "gzip", None])
def test_round_trip_identical(tmp_path, compression):
    rng = np.random.default_rng(0)
    arrays = _arrays(rng)
    ts = np.stack([np.ones(12), np.arange(12), np.full(12, 2020)], 1).astype(np.int64)
    masks = {"sentinel2_l2a": np.arange(12) % 4 == 0, "sentinel1": np.arange(12) < 5,
             "era5_10": np.ones(12, bool)}
    p = tmp_path / "sample_0.h5"
    write_sample(p, arrays, ts, masks, latlon=np.array([1.5, 2.5]), compression=compression)
    s = read_sample(p)
    assert set(s.arrays) == set(arrays)
    for k, v in arrays.items():
        assert s.arrays[k].dtype == v.dtype
        np.testing.assert_array_equal(s.arrays[k], v)
    np.testing.assert_array_equal(s.timestamps, ts)
    for k, v in masks.items():
        np.testing.assert_array_equal(s.missing_timesteps[k], v)
    np.testing.assert_array_equal(s.latlon, np.array([1.5, 2.5], np.float32))
    only = read_sample(p, ["sentinel1"])
    assert set(only.arrays) == {"sentinel1"} and set(only.missing_timesteps) == {"sentinel1"}
    if compression == "zstd":
        with h5py.File(p) as f:  # the reference's zstd filter id, one chunk per array
            assert f["sentinel2_l2a"].chunks == f["sentinel2_l2a"].shape
            assert f["sentinel2_l2a"]._filters[str(hdf5plugin.ZSTD_ID)] == (3,)


def test_hand_written_reference_layout_loads(tmp_path):
    """A file built with plain h5py the way convert_to_h5py writes it."""
    rng = np.random.default_rng(1)
    s2 = rng.integers(1, 9000, (32, 32, 2, 12), dtype=np.uint16)
    wc = np.full((32, 32, 1, 1), 40, np.uint8)
    ts = np.array([[1, m, 2021] for m in range(12)], dtype=np.int64)
    with h5py.File(tmp_path / "sample_7.h5", "w") as f:
        f.create_dataset("latlon", data=np.array([47.0, 8.0], np.float32))
        f.create_dataset("timestamps", data=ts)
        for k, v in {"sentinel2_l2a": s2, "worldcover": wc}.items():
            f.create_dataset(k, data=v, chunks=v.shape, compression=hdf5plugin.Zstd(clevel=3))
        g = f.create_group("missing_timesteps_masks")
        g.create_dataset("sentinel2_l2a", data=np.isin(np.arange(12), [3, 4]))
    s = read_sample(tmp_path / "sample_7.h5")
    np.testing.assert_array_equal(s.arrays["sentinel2_l2a"], s2)
    ds = OlmoEarthH5Dataset(tmp_path, normalize=False)
    assert len(ds) == 1 and ds.tile_size == 32
    item = ds.get_item(0, 4, 8, None, np.random.default_rng(0))
    # months 3 and 4 present: the time axis is cropped to them (T = 2 real + 10 padded)
    x = item.data["sentinel2_l2a"]
    assert x.shape == (32, 32, 12, 12)
    np.testing.assert_array_equal(x[:, :, :2], s2.astype(np.float32))
    assert (x[:, :, 2:] == -99999).all()
    np.testing.assert_array_equal(item.timestamps[:2, 1], [3, 4])
    np.testing.assert_array_equal(item.timestamps[2:], np.tile(ts[4], (10, 1)))
    assert set(item.missing_modalities) == {"sentinel1", "landsat", "srtm", "openstreetmap_raster",
                                         "wri_canopy_height_map", "cdl", "worldcereal"}


def test_corrupt_and_missing_files_name_the_file(tmp_path):
    rng = np.random.default_rng(2)
    good = tmp_path / "sample_0.h5"
    write_sample(good, _arrays(rng), np.zeros((12, 3), np.int64))
    truncated = tmp_path / "sample_1.h5"
    truncated.write_bytes(good.read_bytes()[:600])
    garbage = tmp_path / "sample_2.h5"
    garbage.write_bytes(b"not an hdf5 file at all" * 10)
    for p in (truncated, garbage, tmp_path / "sample_3.h5"):
        with pytest.raises(CorruptSampleError, match=p.name):
            read_sample(p)
    ds = OlmoEarthH5Dataset(tmp_path)
    with pytest.raises(CorruptSampleError, match="sample_1.h5"):
        ds.get_item(1, 2, 2, 2250, np.random.default_rng(0))


def test_writer_validates(tmp_path):
    with pytest.raises(ValueError, match="unknown modality 'naip'"):
        write_sample(tmp_path / "a.h5", {"naip": np.zeros((2, 2, 1, 4))}, np.zeros((1, 3)))
    with pytest.raises(ValueError, match="sentinel1 must have 4 dims"):
        write_sample(tmp_path / "a.h5", {"sentinel1": np.zeros((2, 2))}, np.zeros((1, 3)))
    with pytest.raises(ValueError, match=r"timestamps must be \[T, 3\]"):
        write_sample(tmp_path / "a.h5", {}, np.zeros((3,)))


def test_metadata_round_trip(tmp_path):
    write_metadata(tmp_path, {0: ["sentinel2_l2a"], 1: ["landsat", "srtm"]},
                   ["sentinel2_l2a", "landsat", "srtm"])
    df = read_metadata(tmp_path)
    assert list(df.columns) == ["sample_index", "sentinel2_l2a", "landsat", "srtm"]
    assert df.to_numpy().tolist() == [[0, 1, 0, 0], [1, 0, 1, 1]]
    assert read_metadata(tmp_path / "nothing") is None
    assert sample_path(tmp_path, 3).name == "sample_3.h5"
