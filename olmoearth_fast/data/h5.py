"""The reference H5 sample layout: reader and writer (docs/reference_semantics.md §9.1).

One file per sample, `<dir>/sample_{index}.h5`:

* `<modality>`: `[H, W, T_present, C]` (spacetime; only the present months, contiguous),
  `[H, W, 1, C]` (maps) or `[T_present, C]` (era5_10), canonical band order, raw units;
* `timestamps`: `[T_long, 3]` ints (day, month 0-based, year) of the monthly mosaics;
* `missing_timesteps_masks/<modality>`: `[T_long]` bool, which timestamps the modality has;
* `latlon`: `[2]` float32.

Side file `sample_metadata.csv`: `sample_index` plus one 0/1 presence column per modality.
Rasters are zstd-compressed through hdf5plugin (level 3, one chunk = the whole array), as the
`..._zstd_3_128_x_4` directories are.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np
import pandas as pd

from olmoearth_fast.modalities import MODALITIES

SAMPLE_FILE_PATTERN = "sample_{index}.h5"
METADATA_FILE = "sample_metadata.csv"
MISSING_TIMESTEPS_GROUP = "missing_timesteps_masks"


class CorruptSampleError(RuntimeError):
    """An H5 sample that cannot be read (truncated, not HDF5, malformed layout)."""


@dataclass
class H5Sample:
    """Raw contents of one sample file (no padding, no normalisation)."""

    path: str
    arrays: dict[str, np.ndarray]
    timestamps: np.ndarray
    missing_timesteps: dict[str, np.ndarray] = field(default_factory=dict)
    latlon: np.ndarray | None = None


def sample_path(directory: str | os.PathLike, index: int) -> Path:
    return Path(directory) / SAMPLE_FILE_PATTERN.format(index=index)


def compression_filter(compression: str | None, clevel: int = 3) -> dict:
    """h5py `create_dataset` keywords of a compression filter: zstd (hdf5plugin), gzip, or None."""
    if compression is None:
        return {}
    if compression == "zstd":
        return dict(hdf5plugin.Zstd(clevel=clevel))
    if compression == "gzip":
        return {"compression": "gzip", "compression_opts": clevel}
    raise ValueError(f"compression must be 'zstd', 'gzip' or None, got {compression!r}")


def _create_kwargs(data: np.ndarray, compression: str | None, clevel: int) -> dict:
    if compression is None or data.size == 0 or data.ndim == 0:
        return {}
    return {"chunks": data.shape, **compression_filter(compression, clevel)}


def write_sample(
    path: str | os.PathLike,
    arrays: Mapping[str, np.ndarray],
    timestamps: np.ndarray,
    missing_timesteps: Mapping[str, np.ndarray] | None = None,
    latlon: np.ndarray | None = None,
    compression: str | None = "zstd",
    clevel: int = 3,
) -> None:
    """Write one sample in the reference layout (arrays are written as given, dtype kept).

    Raises:
        ValueError: an unknown modality, a wrong rank, or timestamps not `[T, 3]`.
    """
    timestamps = np.asarray(timestamps)
    if timestamps.ndim != 2 or timestamps.shape[1] != 3:
        raise ValueError(f"timestamps must be [T, 3] (day, month, year), got {timestamps.shape}")
    for name, a in arrays.items():
        if name not in MODALITIES:
            raise ValueError(
                f"write_sample: unknown modality {name!r}; valid: {sorted(MODALITIES)}")
        want = 4 if MODALITIES[name].is_spatial else 2
        if np.ndim(a) != want:
            raise ValueError(f"write_sample: {name} must have {want} dims, got shape {np.shape(a)}")
    with h5py.File(path, "w") as f:
        if latlon is not None:
            f.create_dataset("latlon", data=np.asarray(latlon, dtype=np.float32))
        f.create_dataset("timestamps", data=timestamps)
        for name, a in arrays.items():
            a = np.asarray(a)
            f.create_dataset(name, data=a, **_create_kwargs(a, compression, clevel))
        if missing_timesteps:
            g = f.create_group(MISSING_TIMESTEPS_GROUP)
            for name, m in missing_timesteps.items():
                g.create_dataset(name, data=np.asarray(m, dtype=bool))


def read_sample(
    path: str | os.PathLike, modalities: Iterable[str] | None = None
) -> H5Sample:
    """Read a sample file fully (the given modalities, or every known one present).

    Raises:
        CorruptSampleError: the file is missing, truncated, not HDF5 or lacks `timestamps`.
    """
    wanted = None if modalities is None else set(modalities)
    try:
        with h5py.File(path, "r") as f:
            if "timestamps" not in f:
                raise CorruptSampleError(f"{path}: no 'timestamps' dataset")
            arrays = {
                k: f[k][()]
                for k in f.keys()
                if k in MODALITIES and (wanted is None or k in wanted)
            }
            masks = {}
            if MISSING_TIMESTEPS_GROUP in f:
                masks = {
                    k: np.asarray(v[()], dtype=bool)
                    for k, v in f[MISSING_TIMESTEPS_GROUP].items()
                    if wanted is None or k in wanted
                }
            latlon = f["latlon"][()] if "latlon" in f else None
            return H5Sample(str(path), arrays, f["timestamps"][()], masks, latlon)
    except CorruptSampleError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise CorruptSampleError(f"{path}: cannot read H5 sample ({type(e).__name__}: {e})") from e


def write_metadata(directory: str | os.PathLike, presence: Mapping[int, Iterable[str]],
                   modalities: Iterable[str]) -> Path:
    """Write `sample_metadata.csv`: one row per sample index, a 0/1 column per modality."""
    modalities = list(modalities)
    rows = {"sample_index": sorted(presence)}
    for m in modalities:
        rows[m] = [int(m in set(presence[i])) for i in rows["sample_index"]]
    out = Path(directory) / METADATA_FILE
    pd.DataFrame(rows).to_csv(out, index=False)
    return out


def read_metadata(directory: str | os.PathLike) -> pd.DataFrame | None:
    """`sample_metadata.csv` as a DataFrame, or None when the directory has none."""
    p = Path(directory) / METADATA_FILE
    if not p.is_file():
        return None
    return pd.read_csv(p)
