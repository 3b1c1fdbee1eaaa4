"""Import the reference package's data modules for parity tests and benchmarks.

`olmoearth-pretrain==0.1.2` installed with `--no-deps` (as CI does) lacks `universal-pathlib`
and the dataset-creation stack (`rasterio`, `cartopy`, `pyproj`) that
`olmoearth_pretrain.data.dataset` imports at module level although `__getitem__` needs none of
it. When those imports fail, minimal stand-ins are registered: `upath.UPath` = `pathlib.Path`
(the dataset only joins, opens and tests paths) and a `convert_to_h5py` module holding just the
file-name constants of `ConvertToH5py`. Nothing is patched when the real modules import.
"""

from __future__ import annotations

import importlib
import pathlib
import sys
import types


def _ensure_upath() -> None:
    try:
        importlib.import_module("upath")
    except ImportError:
        mod = types.ModuleType("upath")
        mod.UPath = pathlib.Path
        sys.modules["upath"] = mod


def _ensure_convert_to_h5py() -> None:
    name = "olmoearth_pretrain.dataset.convert_to_h5py"
    try:
        importlib.import_module(name)
    except ImportError:
        mod = types.ModuleType(name)

        class ConvertToH5py:  # the constants OlmoEarthDataset reads
            latlon_distribution_fname = "latlon_distribution.npy"
            sample_metadata_fname = "sample_metadata.csv"
            sample_file_pattern = "sample_{index}.h5"
            compression_settings_fname = "compression_settings.json"
            missing_timesteps_mask_group_name = "missing_timesteps_masks"

        mod.ConvertToH5py = ConvertToH5py
        sys.modules[name] = mod


def import_reference_dataset() -> types.ModuleType:
    """`olmoearth_pretrain.data.dataset`, importable without the dataset-creation extras."""
    _ensure_upath()
    _ensure_convert_to_h5py()
    return importlib.import_module("olmoearth_pretrain.data.dataset")


def reference_dataset(root, training_modalities, sample_indices=None):
    """A prepared reference `OlmoEarthDataset` over `root` (float32, normalised).

    `prepare()` parses the sample count from the directory name, so the indices are set
    directly (all files, or `sample_indices`).
    """
    import numpy as np

    ds_mod = import_reference_dataset()
    ds = ds_mod.OlmoEarthDataset(pathlib.Path(root), list(training_modalities), np.float32)
    if sample_indices is None:
        names = pathlib.Path(root).glob("sample_*.h5")
        sample_indices = sorted(int(p.stem[len("sample_"):]) for p in names)
    ds.sample_indices = np.asarray(sample_indices)
    return ds
