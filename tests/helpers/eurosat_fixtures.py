"""Synthetic EuroSAT written in both on-disk layouts, for the evaluation tests.

The scenes are the demo's labelled fixture (`olmoearth_fast.eval.demo.synthetic_eurosat`);
`write_geobench_eurosat` and `write_torchgeo_eurosat` store them exactly as GEO-Bench
m-eurosat and torchgeo EuroSATallBands do (see `olmoearth_fast.eval.datasets`), including the
pickled GEO-Bench metadata (built from plain records: geobench is not needed to write them).
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path

import h5py
import numpy as np

from olmoearth_fast.eval.datasets import (
    GEOBENCH_BANDS,
    TORCHGEO_BAND_ORDER,
    TORCHGEO_BASE_DIR,
    TORCHGEO_SPLIT_FILES,
)
from olmoearth_fast.eval.demo import WAVELENGTH_ORDER, synthetic_eurosat

EUROSAT_CLASSES = (
    "AnnualCrop",
    "Forest",
    "HerbaceousVegetation",
    "Highway",
    "Industrial",
    "Pasture",
    "PermanentCrop",
    "Residential",
    "River",
    "SeaLake",
)


def split_assignment(labels: np.ndarray, per_class: Mapping[str, int]) -> list[str]:
    """Split name of each sample: the first per_class["train"] of a class, then valid, test."""
    out, seen = [], {}
    bounds = np.cumsum(list(per_class.values()))
    names = list(per_class)
    for y in labels:
        k = seen.get(int(y), 0)
        seen[int(y)] = k + 1
        j = int(np.searchsorted(bounds, k, side="right"))
        if j >= len(names):
            raise ValueError(f"class {y} has more samples than {dict(per_class)} assigns")
        out.append(names[j])
    return out


# ---------------------------------------------------------------------------------------------
# GEO-Bench layout. Its metadata are pickles of geobench classes; the records below are pickled
# with protocol 2 (class references as plain "module\nname\n" text) and renamed to the geobench
# classes afterwards, so the bytes are what geobench writes without importing geobench.


class _Rec:
    def __init__(self, **state):
        self.__dict__.update(state)


class _Sentinel2(_Rec):
    pass


class _TaskSpecifications(_Rec):
    pass


class _Classification(_Rec):
    pass


_RENAMES = {
    _Sentinel2: b"geobench.dataset\nSentinel2\n",
    _TaskSpecifications: b"geobench.task\nTaskSpecifications\n",
    _Classification: b"geobench.label\nClassification\n",
}


def _geobench_pickle(obj) -> bytes:
    data = pickle.dumps(obj, protocol=2)
    for cls, target in _RENAMES.items():
        data = data.replace(f"{cls.__module__}\n{cls.__qualname__}\n".encode(), target)
    return data


def _band_info(name: str) -> _Sentinel2:
    res = {"B01": 60, "B09": 60, "B10": 60, "B02": 10, "B03": 10, "B04": 10, "B08": 10}
    band = GEOBENCH_BANDS[name]
    return _Sentinel2(
        name=name, alt_names=(band[1:].lstrip("0"), band[1:]), spatial_resolution=res.get(band, 20)
    )


def write_geobench_eurosat(
    task_dir: str | os.PathLike,
    images: np.ndarray,
    labels: np.ndarray,
    splits: Sequence[str],
    class_names: Sequence[str] = EUROSAT_CLASSES,
    partition: str = "default",
) -> Path:
    """Write a GEO-Bench m-eurosat task directory.

    Args:
        task_dir: output directory (e.g. ``<root>/classification_v1.0/m-eurosat``).
        images: [N, H, W, 13] integer DN in `WAVELENGTH_ORDER`.
        labels: [N] class indices.
        splits: split name ("train", "valid", "test") of each sample.
        class_names: names of the classes (task_specs.pkl).
        partition: partition file name prefix.
    """
    task = Path(task_dir)
    task.mkdir(parents=True, exist_ok=True)
    if images.ndim != 4 or images.shape[-1] != 13:
        raise ValueError(f"images must be [N, H, W, 13], got {images.shape}")
    names = list(GEOBENCH_BANDS)
    part: dict[str, list[str]] = {"train": [], "valid": [], "test": []}
    for i, (img, y, s) in enumerate(zip(images, labels, splits)):
        sample = f"id_{i}"
        part[s].append(sample)
        attrs = {"label": int(y), "bands_order": names}
        with h5py.File(task / f"{sample}.hdf5", "w") as f:
            for b, name in enumerate(names):
                f.create_dataset(name, data=img[..., b].astype(np.int16))
                attrs[name] = {
                    "date": None,
                    "date_id": None,
                    "spatial_resolution": 10,
                    "band_info": _band_info(name),
                    "meta_info": None,
                }
            f.attrs["pickle"] = str(_geobench_pickle(attrs))  # geobench stores str(bytes)
    with open(task / f"{partition}_partition.json", "w") as f:
        json.dump(part, f, indent=1)
    x = images.reshape(-1, 13).astype(np.float64)
    stats = {
        n: {
            "mean": float(x[:, b].mean()),
            "std": float(x[:, b].std()),
            "min": float(x[:, b].min()),
            "max": float(x[:, b].max()),
        }
        for b, n in enumerate(names)
    }
    with open(task / "band_stats.json", "w") as f:
        json.dump(stats, f, indent=1)
    specs = _TaskSpecifications(
        dataset_name="m-eurosat",
        benchmark_name="classification_v1.0",
        patch_size=images.shape[1:3],
        n_time_steps=1,
        bands_info=[_band_info(n) for n in names],
        label_type=_Classification(n_classes=len(class_names), _class_names=list(class_names)),
        eval_metrics=None,
        spatial_resolution=None,
    )
    (task / "task_specs.pkl").write_bytes(_geobench_pickle(specs))
    return task


def write_torchgeo_eurosat(
    root: str | os.PathLike,
    images: np.ndarray,
    labels: np.ndarray,
    splits: Sequence[str],
    class_names: Sequence[str] = EUROSAT_CLASSES,
    band_order: Sequence[str] = TORCHGEO_BAND_ORDER,
) -> Path:
    """Write a torchgeo EuroSATallBands directory (uint16 13-band GeoTIFFs + split files).

    Args:
        root: output directory.
        images: [N, H, W, 13] integer DN in `WAVELENGTH_ORDER`.
        labels: [N] class indices into ``class_names``.
        splits: split name ("train", "valid", "test") of each sample.
        class_names: class directory names (torchgeo sorts them to get the label).
        band_order: band of each GeoTIFF channel.
    """
    try:
        import tifffile
    except ImportError:
        raise ImportError(
            "writing GeoTIFFs needs the 'tifffile' package (pip install tifffile)"
        ) from None
    if list(class_names) != sorted(class_names):
        raise ValueError(
            "class_names must be sorted: torchgeo labels classes by sorted directory name"
        )
    root = Path(root)
    take = [WAVELENGTH_ORDER.index(b) for b in band_order]
    lists: dict[str, list[str]] = {"train": [], "valid": [], "test": []}
    counters: dict[int, int] = {}
    for img, y, s in zip(images, labels, splits):
        cls = class_names[int(y)]
        counters[int(y)] = counters.get(int(y), 0) + 1
        name = f"{cls}_{counters[int(y)]}"
        out = root / TORCHGEO_BASE_DIR / cls / f"{name}.tif"
        out.parent.mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(
            out,
            np.ascontiguousarray(img[..., take].astype(np.uint16)),
            photometric="minisblack",
            planarconfig="contig",
        )
        lists[s].append(f"{name}.jpg")  # the split lists name the RGB .jpg files
    for s, fname in TORCHGEO_SPLIT_FILES.items():
        (root / fname).write_text("".join(f"{n}\n" for n in lists[s]))
    return root


def make_eurosat_fixture(
    root: str | os.PathLike,
    layout: str,
    per_class: Mapping[str, int] | None = None,
    size: int = 64,
    num_classes: int = 10,
    seed: int = 0,
) -> Path:
    """A synthetic EuroSAT in ``layout`` ("geobench" or "torchgeo"); returns the dataset path.

    Classes are stored under the first ``num_classes`` EuroSAT class names (they name the
    `CLASS_LEVELS` mixtures; the pixels do not imitate those land covers).

    ``per_class``: samples per class and split, default {"train": 20, "valid": 10, "test": 10}.
    The same seed gives the same pixels in both layouts.
    """
    per_class = dict(per_class or {"train": 20, "valid": 10, "test": 10})
    images, labels = synthetic_eurosat(sum(per_class.values()), size, num_classes, seed)
    splits = split_assignment(labels, per_class)
    if layout == "geobench":
        return write_geobench_eurosat(
            Path(root) / "classification_v1.0" / "m-eurosat",
            images,
            labels,
            splits,
            EUROSAT_CLASSES[:num_classes],
        )
    if layout == "torchgeo":
        return write_torchgeo_eurosat(root, images, labels, splits, EUROSAT_CLASSES[:num_classes])
    raise ValueError(f"layout must be 'geobench' or 'torchgeo', got {layout!r}")
