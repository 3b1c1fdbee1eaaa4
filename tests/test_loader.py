"""Two-view loader: determinism, worker independence, sharding, exact resume, corrupt files,
and the demo dataset."""

import logging

import numpy as np
import pytest
import torch

from olmoearth_fast.data.collate import MaskedViews
from olmoearth_fast.data.demo import ensure_demo_dataset, fixture_dir, make_demo_dataset
from olmoearth_fast.data.h5 import CorruptSampleError, read_sample
from olmoearth_fast.data.loader import DataConfig, OlmoEarthLoader
from olmoearth_fast.modalities import MODALITIES, ONLY_DECODE_MODALITIES

MASKING = {"type": "modality_cross_random", "allow_encoding_decoding_same_bandset": True,
           "only_decode_modalities": list(ONLY_DECODE_MODALITIES)}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), num_samples=24, seed=5,
                             tile_size=32)


def loader(path, rank=0, world_size=1, **data):
    """A loader over `path`: 8-sample batches, in-process; `data` overrides DataConfig fields."""
    cfg = DataConfig(**{"global_batch_size": 8, "num_workers": 0, "hw_p_list": tuple(range(1, 7)),
                        "patch_sizes": tuple(range(1, 5)), **data})
    return OlmoEarthLoader(path, cfg, masking=MASKING, rank=rank, world_size=world_size)


def same(a: MaskedViews, b: MaskedViews) -> bool:
    return (a.patch_size == b.patch_size and a.hw_p == b.hw_p
            and torch.equal(a.sample_indices, b.sample_indices)
            and torch.equal(a.timestamps, b.timestamps)
            and all(torch.equal(a.data[m], b.data[m]) for m in a.data)
            and all(torch.equal(x[m], y[m]) for x, y in zip(a.masks, b.masks) for m in x))


def test_batches_shapes_and_views(demo):
    ld = loader(demo)
    assert len(ld) == 3
    batches = list(ld)
    assert len(batches) == 3 and ld.state_dict()["epoch"] == 2
    for b in batches:
        H = b.hw_p * b.patch_size
        assert H <= 32 and b.batch_size == 8 and b.num_views == 2
        T = b.timestamps.shape[1]
        assert b.data["sentinel2_l2a"].shape == (8, H, H, T, 12)
        assert b.data["worldcover"].shape == (8, H, H, 1, 1)
        assert b.masks[0]["sentinel2_l2a"].shape == (8, H, H, T, 1)
        assert b.masks[0]["landsat"].dtype == torch.uint8
        # two independent masks of the same data
        assert not all(torch.equal(b.masks[0][m], b.masks[1][m]) for m in b.masks[0])
        # the sample order covers distinct samples
    idx = torch.cat([b.sample_indices for b in batches])
    assert len(set(idx.tolist())) == 24
    mbs = batches[0].microbatches(3)
    assert [m.batch_size for m in mbs] == [3, 3, 2]
    assert torch.equal(mbs[1].masks[1]["srtm"], batches[0].masks[1]["srtm"][3:6])
    moved = batches[0].to("cpu")
    assert moved.patch_size == batches[0].patch_size


def test_deterministic_and_worker_independent(demo):
    a = list(loader(demo))
    b = list(loader(demo))
    c = list(loader(demo, num_workers=2))
    d = list(loader(demo, seed=7))
    assert all(same(x, y) for x, y in zip(a, b))
    assert all(same(x, y) for x, y in zip(a, c))
    assert not all(same(x, y) for x, y in zip(a, d))


def test_exact_resume_mid_epoch(demo):
    full = loader(demo)
    first_epoch = list(full)
    second_epoch = list(full)
    ld = loader(demo)
    it = iter(ld)
    next(it)
    state = ld.state_dict()
    assert state["batches_processed"] == 1 and state["epoch"] == 1
    resumed = loader(demo)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == 2 and all(same(x, y) for x, y in zip(rest, first_epoch[1:]))
    assert same(next(iter(resumed)), second_epoch[0])
    with pytest.raises(ValueError, match="global_batch_size"):
        loader(demo, global_batch_size=4).load_state_dict(state)


def test_rank_sharding(demo):
    r0 = list(loader(demo, world_size=2, rank=0))
    r1 = list(loader(demo, world_size=2, rank=1))
    single = list(loader(demo))
    for a, b, s in zip(r0, r1, single):
        assert a.batch_size == 4 and b.batch_size == 4
        both = torch.stack([a.sample_indices, b.sample_indices], 1).flatten()
        assert torch.equal(both, s.sample_indices)  # columns r::world_size of the batch


def test_corrupt_sample_error_or_skip(demo, tmp_path, caplog):
    path = make_demo_dataset(tmp_path / "d", num_samples=8, seed=1, tile_size=16)
    bad = path / "sample_3.h5"
    bad.write_bytes(bad.read_bytes()[:1000])
    with pytest.raises(CorruptSampleError, match="sample_3.h5"):
        list(loader(path, global_batch_size=8, hw_p_list=[2], patch_sizes=[2]))
    with caplog.at_level(logging.WARNING):
        batches = list(loader(path, global_batch_size=8, hw_p_list=[2], patch_sizes=[2],
                              skip_corrupt=True))
    assert batches[0].batch_size == 8 and "sample_3.h5" in caplog.text
    assert 3 not in batches[0].sample_indices.tolist()


def test_argument_validation(demo):
    with pytest.raises(ValueError, match="multiple of world_size"):
        loader(demo, global_batch_size=6, world_size=4)
    with pytest.raises(ValueError, match="rank=2"):
        loader(demo, world_size=2, rank=2)
    with pytest.raises(ValueError, match="no \\(patch_size, hw_p\\) pair fits"):
        loader(demo, patch_sizes=[8], hw_p_list=[5])
    with pytest.raises(ValueError, match="budget_tokenization"):
        loader(demo, budget_tokenization="ours")


def test_demo_dataset_contents(demo, tmp_path):
    s = read_sample(demo / "sample_0.h5")
    fix = read_sample(fixture_dir() / "sample_0.h5")
    # sample 0 carries the first real S2 crop at its calendar month
    month = int(fix.timestamps[0, 1])
    assert s.missing_timesteps["sentinel2_l2a"].tolist() == [k == month for k in range(12)]
    np.testing.assert_array_equal(s.arrays["sentinel2_l2a"],
                                  fix.arrays["sentinel2_l2a"][:32, :32])
    s4 = read_sample(demo / "sample_4.h5")
    assert s4.missing_timesteps["landsat"].sum() == 1  # the next real sample is Landsat
    assert set(s.arrays) >= {"worldcover", "srtm", "era5_10"}
    wc = np.unique(s.arrays["worldcover"])
    assert set(wc.tolist()) <= {10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 100}
    for m, x in read_sample(demo / "sample_1.h5").arrays.items():
        spec = MODALITIES[m]
        assert x.shape[-1] == spec.num_bands
        if spec.is_spatial:
            assert x.shape[:2] == (32, 32)
        else:
            assert x.shape == (12, 6)
    again = make_demo_dataset(tmp_path / "again", num_samples=24, seed=5, tile_size=32)
    for i in (1, 7):
        a, b = read_sample(demo / f"sample_{i}.h5"), read_sample(again / f"sample_{i}.h5")
        for m in a.arrays:
            np.testing.assert_array_equal(a.arrays[m], b.arrays[m])
    assert ensure_demo_dataset(again, num_samples=24, seed=5, tile_size=32) == again


def test_rechunked_dataset_gives_the_same_batches(demo, tmp_path):
    """`python -m olmoearth_fast.data.rechunk`: spatial rasters in 16-px chunks over all months and
    bands, every array and side file kept, the loader's batches identical; a second run skips the
    finished files."""
    import h5py

    from olmoearth_fast.data.rechunk import main, rechunk_dataset

    out = tmp_path / "chunked"
    assert rechunk_dataset(demo, out, chunk=16) == {"written": 24, "kept": 0, "copied": 0}
    assert (out / "sample_metadata.csv").read_bytes() == (demo / "sample_metadata.csv").read_bytes()
    with h5py.File(demo / "sample_0.h5") as a, h5py.File(out / "sample_0.h5") as b:
        s2 = b["sentinel2_l2a"]
        assert s2.chunks == (16, 16, *s2.shape[2:]) and s2.shape[:2] == (32, 32)
        assert a["sentinel2_l2a"].chunks == a["sentinel2_l2a"].shape  # the reference's one chunk
        names = []
        a.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        assert "missing_timesteps_masks/sentinel2_l2a" in names
        for n in names:
            assert b[n].dtype == a[n].dtype and np.array_equal(a[n][()], b[n][()]), n
    for x, y in zip(loader(demo), loader(out)):
        assert same(x, y)
    assert rechunk_dataset(demo, out, chunk=16) == {"written": 0, "kept": 24, "copied": 0}
    assert not list(out.glob(".tmp-*"))
    with pytest.raises(SystemExit) as e:
        main([str(demo), str(demo)])
    assert e.value.code == 2


@pytest.mark.parametrize("args,message", [
    (["{missing}", "{out}"], "is not a directory"),
    (["{empty}", "{out}"], "holds no sample_*.h5 file"),
    (["{demo}", "{out}", "--chunk", "0"], "--chunk 0: must be at least 1"),
    (["{demo}", "{out}", "--workers", "0"], "--workers 0: must be at least 1"),
])
def test_rechunk_refuses_bad_input(demo, tmp_path, capsys, args, message):
    from olmoearth_fast.data.rechunk import main

    (tmp_path / "empty").mkdir()
    paths = {"missing": tmp_path / "nope", "empty": tmp_path / "empty", "demo": demo, "out": tmp_path / "o"}
    with pytest.raises(SystemExit) as e:
        main([a.format(**paths) for a in args])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_rechunk_copies_an_unreadable_sample_as_it_is(demo, tmp_path):
    """rechunk_file names the file and leaves nothing behind; rechunk_dataset (2 processes)
    copies it unchanged, names it, and rechunks the rest."""
    import shutil

    from olmoearth_fast.data.rechunk import rechunk_dataset, rechunk_file

    src = tmp_path / "src"
    shutil.copytree(demo, src)
    (src / "sample_3.h5").write_bytes(b"not hdf5")
    with pytest.raises(CorruptSampleError, match="sample_3.h5: cannot rechunk"):
        rechunk_file(src / "sample_3.h5", tmp_path / "out.h5")
    assert not (tmp_path / "out.h5").exists() and not (tmp_path / ".tmp-out.h5").exists()
    lines = []
    got = rechunk_dataset(src, tmp_path / "dst", workers=2, log=lines.append)
    assert got == {"written": 23, "kept": 0, "copied": 1}
    assert lines == [f"{src / 'sample_3.h5'}: unreadable, copied as it is"]
    assert (tmp_path / "dst" / "sample_3.h5").read_bytes() == b"not hdf5"
