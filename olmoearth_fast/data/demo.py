"""Demo dataset: synthetic reference-format H5 samples plus the committed real-pixel crops.

`make_demo_dataset(path)` writes `num_samples` samples of every modality used by the
experiments (the 9 training modalities, era5_10 and latlon) in the reference layout:

* spacetime modalities (S2 L2A, S1, Landsat) are spatially correlated random fields (bicubic
  upsampled noise at two scales, a shared "land cover" component, a seasonal cycle) scaled by
  each band's mean/std from the shipped normalisation stats, stored as the sensors' dtypes
  (uint16 DN, float32 dB); months are randomly absent (present-only storage + masks), whole
  modalities are randomly absent, and some samples cover less than a year, so time cropping,
  missing fill and the metadata filter are exercised;
* maps are class maps / rasters cut from correlated fields: WorldCover codes 10..100, CDL class
  ids, 0/100 WorldCereal layers, sparse 0/1 OSM layers, SRTM metres, canopy height metres;
* every `real_every`-th sample replaces its S2 or Landsat series by one real month from the
  committed fixture (olmoearth_fast/data/demo, see its PROVENANCE.md), alternating sensors.

Everything derives from `seed`; the same call writes the same bytes of array data.
"""

from __future__ import annotations

import json
import os
import shutil
from importlib.resources import files
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from olmoearth_fast.data.h5 import read_sample, write_metadata, write_sample
from olmoearth_fast.data.normalize import load_norm_stats
from olmoearth_fast.modalities import MAX_SEQUENCE_LENGTH, MODALITIES

DEMO_MODALITIES = (
    "sentinel2_l2a", "sentinel1", "landsat", "worldcover", "srtm", "openstreetmap_raster",
    "wri_canopy_height_map", "cdl", "worldcereal", "era5_10",
)
MANIFEST = "demo_manifest.json"
_VERSION = 1
# probability that a whole modality is absent from a sample
_ABSENT = {"sentinel1": 0.15, "landsat": 0.25, "cdl": 0.5, "worldcereal": 0.4,
           "wri_canopy_height_map": 0.1, "openstreetmap_raster": 0.05}
# probability that a present spacetime modality has a given month
_MONTH_P = {"sentinel2_l2a": 0.75, "sentinel1": 0.8, "landsat": 0.5}
_WORLDCOVER = np.array([10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 100])
_CDL = np.array([1, 5, 24, 36, 61, 111, 121, 141, 176, 190])


def fixture_dir() -> Path:
    """Directory of the committed real-pixel fixture."""
    return Path(str(files("olmoearth_fast") / "data" / "demo"))


def _fields(rng: np.random.Generator, n: int, size: int, cells: int) -> np.ndarray:
    """n unit-variance fields [n, size, size] with correlation length ~ size / cells."""
    low = torch.from_numpy(rng.standard_normal((n, 1, cells + 3, cells + 3), dtype=np.float32))
    up = F.interpolate(low, size=(size + 3 * size // cells,) * 2, mode="bicubic",
                       align_corners=False)[:, 0, :size, :size]
    up = up - up.mean(dim=(1, 2), keepdim=True)
    return (up / up.std(dim=(1, 2), keepdim=True).clamp_min(1e-6)).numpy()


def _band_stats(modality: str) -> tuple[np.ndarray, np.ndarray]:
    stats = load_norm_stats("computed")[modality]
    order = MODALITIES[modality].band_order
    return (np.array([stats[b]["mean"] for b in order]),
            np.array([stats[b]["std"] for b in order]))


def _spacetime(rng, modality, size, months, cover) -> np.ndarray:
    """[size, size, len(months), C] values for the given month indices (0..11)."""
    mean, std = _band_stats(modality)
    C, T = len(mean), len(months)
    own = _fields(rng, C, size, 6)  # band-specific structure
    fine = _fields(rng, 1, size, 24)[0]
    season = np.cos(2 * np.pi * (np.asarray(months) + rng.uniform(0, 12)) / 12)  # [T]
    loading = rng.uniform(0.4, 0.8, C)
    z = (loading[None, None, :] * cover[..., None] + 0.3 * own.transpose(1, 2, 0)
         + 0.2 * fine[..., None])  # [H, W, C]
    z = z[:, :, None, :] + 0.3 * season[None, None, :, None] * rng.uniform(0.5, 1.5, C)
    z = z + 0.05 * rng.standard_normal((size, size, T, C), dtype=np.float32)
    x = mean + 0.5 * std * z
    if modality == "sentinel1":
        return x.astype(np.float32)  # dB
    return np.clip(np.rint(x), 1, 65535).astype(np.uint16)


def _maps(rng, size, cover) -> dict[str, np.ndarray]:
    f = _fields(rng, 6, size, 5)
    out = {}
    q = np.clip(((cover + 2.5) / 5 * len(_WORLDCOVER)).astype(int), 0, len(_WORLDCOVER) - 1)
    out["worldcover"] = _WORLDCOVER[q][..., None, None].astype(np.uint8)
    out["srtm"] = np.rint(677 + 400 * f[0] + 100 * cover)[..., None, None].astype(np.int16)
    out["wri_canopy_height_map"] = np.clip(np.rint(10 + 5 * f[1] + 3 * cover), 0, 60)[
        ..., None, None].astype(np.uint8)
    q = np.clip(((f[2] + 2.5) / 5 * len(_CDL)).astype(int), 0, len(_CDL) - 1)
    out["cdl"] = _CDL[q][..., None, None].astype(np.uint8)
    crops = f[3] > 0.2
    cereal = np.zeros((size, size, 1, 8), np.uint8)
    cereal[..., 0, 0] = 100 * crops
    cereal[..., 0, 2] = 100 * (crops & (f[4] > 0.5))
    cereal[..., 0, 7] = 100 * (crops & (f[4] < -0.5))
    out["worldcereal"] = cereal
    osm = np.zeros((size, size, 1, 30), np.uint8)
    bands = MODALITIES["openstreetmap_raster"].band_order
    osm[..., 0, bands.index("building")] = f[5] > 1.3
    road_r, road_c = rng.integers(0, size, 2)
    osm[road_r, :, 0, bands.index("highway")] = 1
    osm[:, road_c, 0, bands.index("highway")] = 1
    osm[..., 0, bands.index("river")] = np.abs(f[4]) < 0.05
    for b in rng.choice(30, 3, replace=False):  # a few point features
        r, c = rng.integers(0, size, 2)
        osm[r, c, 0, b] = 1
    out["openstreetmap_raster"] = osm
    return out


def _era5(rng, months) -> np.ndarray:
    mean, std = _band_stats("era5_10")
    season = np.cos(2 * np.pi * (np.asarray(months) + rng.uniform(0, 12)) / 12)[:, None]
    x = mean + std * (0.8 * season * rng.uniform(0.5, 1.0, len(mean))
                      + 0.3 * rng.standard_normal((len(months), len(mean))))
    return x.astype(np.float32)


def _fixture_samples(tile: int) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    out = []
    for p in sorted(fixture_dir().glob("sample_*.h5"), key=lambda p: int(p.stem[7:])):
        s = read_sample(p)
        for m, x in s.arrays.items():
            out.append((m, x[:tile, :tile], s.timestamps[0], s.latlon))
    return out


def _one_sample(rng, i, tile, real, modalities):
    start_month = int(rng.integers(0, 12))
    year = int(rng.integers(2017, 2023))
    m_abs = start_month + np.arange(MAX_SEQUENCE_LENGTH)
    ts = np.stack([np.ones(12, np.int64), m_abs % 12, year + m_abs // 12], 1).astype(np.int64)
    # ~25% of samples cover only part of the year (first/last months absent everywhere)
    lo, hi = 0, MAX_SEQUENCE_LENGTH
    if rng.random() < 0.25:
        lo, hi = int(rng.integers(0, 3)), MAX_SEQUENCE_LENGTH - int(rng.integers(0, 3))
    cover = _fields(rng, 1, tile, 4)[0]
    arrays, masks = {}, {}
    for m in ("sentinel2_l2a", "sentinel1", "landsat"):
        if m not in modalities or rng.random() < _ABSENT.get(m, 0.0):
            continue
        present = np.zeros(12, bool)
        present[lo:hi] = rng.random(hi - lo) < _MONTH_P[m]
        if not present.any():
            continue
        months = np.flatnonzero(present)
        arrays[m] = _spacetime(rng, m, tile, ts[months, 1], cover)
        masks[m] = present
    if real is not None:
        m, x, (day, month, ryear), latlon = real
        # the real month becomes the only month of that sensor, at its calendar slot
        ts = np.stack([np.ones(12, np.int64), np.arange(12), np.full(12, ryear)], 1)
        lo, hi = 0, MAX_SEQUENCE_LENGTH
        for k in list(masks):
            months = np.flatnonzero(masks[k])
            arrays[k] = _spacetime(rng, k, tile, ts[months, 1], cover)
        present = np.zeros(12, bool)
        present[int(month)] = True
        arrays[m], masks[m] = x, present
    if not masks:  # keep at least one spacetime modality, as the reference data does
        present = np.zeros(12, bool)
        present[lo] = True
        arrays["sentinel2_l2a"] = _spacetime(rng, "sentinel2_l2a", tile, ts[[lo], 1], cover)
        masks["sentinel2_l2a"] = present
    maps = _maps(rng, tile, cover)
    for m, x in maps.items():
        if m in modalities and rng.random() >= _ABSENT.get(m, 0.0):
            arrays[m] = x
    if "era5_10" in modalities:
        arrays["era5_10"] = _era5(rng, ts[:, 1])
        masks["era5_10"] = np.ones(12, bool)
    latlon = np.array([rng.uniform(-50, 60), rng.uniform(-180, 180)], np.float32)
    return arrays, ts, masks, latlon


def make_demo_dataset(
    path: str | os.PathLike,
    num_samples: int = 64,
    seed: int = 0,
    tile_size: int = 64,
    real_every: int = 4,
    modalities: tuple[str, ...] = DEMO_MODALITIES,
    overwrite: bool = True,
) -> Path:
    """Write the demo dataset into `path` (created if needed) and return it.

    Args:
        path: output directory.
        num_samples: number of `sample_{i}.h5` files.
        seed: everything derives from it.
        tile_size: side in px (the reference H5 tiles are 128; <= 64 when real pixels are
            mixed in, the fixture crops' size).
        real_every: sample i with i % real_every == 0 carries a real S2 or Landsat month;
            0 disables the real pixels.
        modalities: which of DEMO_MODALITIES to write.
        overwrite: remove existing `sample_*.h5` first.

    Raises:
        ValueError: bad sizes or an unknown modality.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if not 8 <= tile_size <= 256:
        raise ValueError(f"tile_size must be in [8, 256], got {tile_size}")
    if real_every and tile_size > 64:
        raise ValueError(f"tile_size={tile_size} > 64 px, the real crops' size: pass real_every=0")
    bad = set(modalities) - set(DEMO_MODALITIES)
    if bad:
        raise ValueError(f"unknown demo modalities {sorted(bad)}; valid: {list(DEMO_MODALITIES)}")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for p in out.glob("sample_*.h5"):
            p.unlink()
    real = _fixture_samples(tile_size) if real_every else []
    real = [r for r in real if r[0] in modalities]
    rng = np.random.default_rng(seed)
    presence = {}
    n_real = 0
    for i in range(num_samples):
        r = None
        if real and i % real_every == 0:
            # alternate sensors: fixture order is S2 crops then Landsat crops
            s2 = [x for x in real if x[0] == "sentinel2_l2a"]
            ls = [x for x in real if x[0] == "landsat"]
            pool = (s2, ls)[n_real % 2] or s2 or ls
            r = pool[(n_real // 2) % len(pool)]
            n_real += 1
        arrays, ts, masks, latlon = _one_sample(rng, i, tile_size, r, modalities)
        write_sample(out / f"sample_{i}.h5", arrays, ts, masks, latlon)
        presence[i] = list(arrays)
    write_metadata(out, presence, modalities)
    (out / MANIFEST).write_text(json.dumps({
        "version": _VERSION, "num_samples": num_samples, "seed": seed, "tile_size": tile_size,
        "real_every": real_every, "modalities": list(modalities), "real_samples": n_real,
    }, indent=1))
    return out


def ensure_demo_dataset(path: str | os.PathLike, **kwargs) -> Path:
    """`make_demo_dataset` unless `path` already holds one made with the same arguments."""
    out = Path(path)
    want = {"version": _VERSION, "num_samples": kwargs.get("num_samples", 64),
            "seed": kwargs.get("seed", 0), "tile_size": kwargs.get("tile_size", 64),
            "real_every": kwargs.get("real_every", 4),
            "modalities": list(kwargs.get("modalities", DEMO_MODALITIES))}
    man = out / MANIFEST
    if man.is_file():
        have = json.loads(man.read_text())
        if all(have.get(k) == v for k, v in want.items()) and all(
                (out / f"sample_{i}.h5").is_file() for i in range(want["num_samples"])):
            return out
        shutil.rmtree(out)
    return make_demo_dataset(out, **kwargs)
