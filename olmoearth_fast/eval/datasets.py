"""EuroSAT for evaluation, in its two common on-disk layouts, as 12-band S2 L2A model input.

* **GEO-Bench m-eurosat** (what the reference evaluates, `evals/datasets/geobench_dataset.py`):
  a task directory `.../classification_v1.0/m-eurosat/` with `{partition}_partition.json`
  (`{"train": [...], "valid": [...], "test": [...]}` sample names), `band_stats.json`,
  `task_specs.pkl` and one `<name>.hdf5` per sample: one int16 `[H, W]` dataset per band,
  named "01 - Coastal aerosol" … "12 - SWIR", and the label in a pickled attribute.
* **torchgeo EuroSATallBands**: `eurosat-{train,val,test}.txt` (file names, `.jpg`) next to
  `ds/images/remote_sensing/otherDatasets/sentinel_2/tif/<Class>/<Class>_<n>.tif`, 13-band
  uint16 GeoTIFFs; labels are the sorted class-directory indices (ImageFolder).

Both give the 13 Sentinel-2 L1C bands; B10 (cirrus) is dropped and the rest reordered to
`MODALITIES["sentinel2_l2a"].band_order`. Band order inside the files: GEO-Bench names each
band and the reference trusts the names (GEO-Bench issue #28 says its "08A" slot really holds
B09, and the reference inherits that); torchgeo ≥ 0.7 reads the TIFF bands as B01…B12, B8A
(torchgeo PR #2480), which `TORCHGEO_BAND_ORDER` follows.

Normalisation, as the reference's m-eurosat task (`norm_stats_from_pretrained=True`): the
pretraining statistics, mean ± 2 std → [0, 1], no clipping (`olmoearth_fast.data.normalize`).
`norm="dataset"` uses GEO-Bench's `band_stats.json` the same way (the reference's
`norm_stats_from_pretrained=False` with `norm_no_clip_2_std`). Every sample is one month,
dated (day 1, month 6 (0-based: July), 2020), the reference's GEO-Bench default.

GEO-Bench stores metadata as Python pickles of geobench/rasterio objects. They are read with
an unpickler that never imports anything: every class becomes an inert record, so reading
needs neither geobench nor rasterio and a hostile file cannot run code.
"""

from __future__ import annotations

import ast
import io
import json
import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from olmoearth_fast.data.normalize import normalize
from olmoearth_fast.modalities import MODALITIES

S2_BANDS = MODALITIES["sentinel2_l2a"].band_order  # the 12 model bands
# GEO-Bench band names (file datasets) -> Sentinel-2 band
GEOBENCH_BANDS: dict[str, str] = {
    "01 - Coastal aerosol": "B01",
    "02 - Blue": "B02",
    "03 - Green": "B03",
    "04 - Red": "B04",
    "05 - Vegetation Red Edge": "B05",
    "06 - Vegetation Red Edge": "B06",
    "07 - Vegetation Red Edge": "B07",
    "08 - NIR": "B08",
    "08A - Vegetation Red Edge": "B8A",
    "09 - Water vapour": "B09",
    "10 - SWIR - Cirrus": "B10",
    "11 - SWIR": "B11",
    "12 - SWIR": "B12",
}
TORCHGEO_BAND_ORDER = (
    "B01",
    "B02",
    "B03",
    "B04",
    "B05",
    "B06",
    "B07",
    "B08",
    "B09",
    "B10",
    "B11",
    "B12",
    "B8A",
)
TORCHGEO_BASE_DIR = os.path.join(
    "ds", "images", "remote_sensing", "otherDatasets", "sentinel_2", "tif"
)
TORCHGEO_SPLIT_FILES = {
    "train": "eurosat-train.txt",
    "valid": "eurosat-val.txt",
    "test": "eurosat-test.txt",
}
GEOBENCH_TASK_SUBDIR = os.path.join("classification_v1.0", "m-eurosat")
DEFAULT_TIMESTAMP = (1, 6, 2020)  # (day, month 0-based, year), reference GeobenchDataset default
SPLITS = ("train", "valid", "test")
LAYOUTS = ("geobench", "torchgeo")
NORMS = ("pretrain", "dataset")

_GEOBENCH_EXPECT = (
    "GEO-Bench m-eurosat: a task directory with {partition}_partition.json and "
    "<sample>.hdf5 files (or a GEO-Bench root holding classification_v1.0/m-eurosat)"
)
_TORCHGEO_EXPECT = (
    f"torchgeo EuroSATallBands: eurosat-train.txt / eurosat-val.txt / eurosat-test.txt "
    f"next to {TORCHGEO_BASE_DIR}/<Class>/<Class>_<n>.tif"
)


def split_name(split: str) -> str:
    """Canonical split name; "val"/"validation" are accepted for "valid"."""
    name = {"val": "valid", "validation": "valid"}.get(split, split)
    if name not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} (or 'val'), got {split!r}")
    return name


# ---------------------------------------------------------------------------------------------
# Safe reading of GEO-Bench pickles


class PickledRecord:
    """Stand-in for any class found in a GEO-Bench pickle; keeps its constructor args and state."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs, self.state = args, kwargs, None

    def __setstate__(self, state) -> None:
        self.state = state

    def __getattr__(self, name: str):
        state = self.__dict__.get("state")
        if isinstance(state, dict) and name in state:
            return state[name]
        raise AttributeError(name)


class _NoImportUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        # builtin containers are handled by opcodes; anything named is replaced, never imported
        return type(name, (PickledRecord,), {"__module__": module})


def safe_unpickle(data: bytes):
    """Unpickle ``data`` with every referenced class replaced by an inert `PickledRecord`."""
    return _NoImportUnpickler(io.BytesIO(data)).load()


def read_geobench_sample(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], int]:
    """{GEO-Bench band name: [H, W] array} and the integer label of one sample file."""
    with h5py.File(path, "r") as f:
        if "pickle" not in f.attrs:
            raise ValueError(f"{path}: no 'pickle' attribute; not a GEO-Bench sample file")
        raw = f.attrs["pickle"]
        raw = ast.literal_eval(raw) if isinstance(raw, str) else bytes(raw)
        attrs = safe_unpickle(raw)
        order = attrs.get("bands_order") or list(f.keys())
        bands = {name: f[name][()] for name in order if not name.startswith("label")}
    label = attrs.get("label")
    if not isinstance(label, (int, np.integer)):
        kind = type(label).__name__
        raise ValueError(f"{path}: expected an integer class label, got {kind}")  # noqa: TRY004
    return bands, int(label)


def read_geotiff(path: str | os.PathLike, num_bands: int = 13) -> np.ndarray:
    """[H, W, C] array of a multi-band GeoTIFF (pixel- or band-interleaved)."""
    try:
        import tifffile
    except ImportError:
        raise ImportError(
            "reading torchgeo EuroSAT GeoTIFFs needs the 'tifffile' package (pip install tifffile)"
        ) from None
    x = tifffile.imread(path)
    if x.ndim == 3 and x.shape[-1] == num_bands:
        return x
    if x.ndim == 3 and x.shape[0] == num_bands:
        return np.moveaxis(x, 0, -1)
    raise ValueError(f"{path}: expected a {num_bands}-band image, got array shape {x.shape}")


# ---------------------------------------------------------------------------------------------
# Layouts


def _geobench_task_dir(root: Path, partition: str) -> Path | None:
    for cand in (root, root / GEOBENCH_TASK_SUBDIR, root / "m-eurosat"):
        if (cand / f"{partition}_partition.json").is_file():
            return cand
    return None


def _torchgeo_dirs(root: Path) -> tuple[Path, Path] | None:
    """(directory of the split files, directory of the class folders)."""
    if not (root / TORCHGEO_SPLIT_FILES["train"]).is_file():
        return None
    for tif in (root / TORCHGEO_BASE_DIR, root):
        if tif.is_dir() and any(p.is_dir() and any(p.glob("*.tif")) for p in tif.iterdir()):
            return root, tif
    return None


def detect_layout(root: str | os.PathLike, layout: str = "auto", partition: str = "default") -> str:
    """The layout of ``root`` ("geobench" or "torchgeo"); raises naming what each expects."""
    root = Path(root)
    if layout not in ("auto",) + LAYOUTS:
        raise ValueError(f"layout must be 'auto', 'geobench' or 'torchgeo', got {layout!r}")
    if not root.exists():
        raise FileNotFoundError(f"EuroSAT dataset path does not exist: {root}")
    found = [
        name
        for name, ok in (
            ("geobench", _geobench_task_dir(root, partition) is not None),
            ("torchgeo", _torchgeo_dirs(root) is not None),
        )
        if ok
    ]
    if layout != "auto":
        if layout not in found:
            expect = _GEOBENCH_EXPECT if layout == "geobench" else _TORCHGEO_EXPECT
            raise FileNotFoundError(
                f"{root} is not in the {layout} layout; expected "
                f"{expect.format(partition=partition)}"
            )
        return layout
    if not found:
        raise FileNotFoundError(
            f"{root} is not a EuroSAT dataset; expected either "
            f"{_GEOBENCH_EXPECT.format(partition=partition)}, or {_TORCHGEO_EXPECT}"
        )
    return found[0]


@dataclass
class EuroSATSplit:
    """One split: file paths and labels; samples are read and normalised on access.

    Attributes:
        name: "train", "valid" or "test".
        paths: one file per sample.
        labels: int64 [N] (None for GEO-Bench until read: its labels live in the files).
    """

    name: str
    paths: list[Path]
    labels: np.ndarray | None
    _read: Callable[[Path], tuple[np.ndarray, int]]
    _normalize: Callable[[np.ndarray], np.ndarray]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        """(normalised float32 [H, W, 12] in S2 L2A band order, label)."""
        x, label = self._read(self.paths[i])
        return self._normalize(x), label

    def subset(self, n: int) -> EuroSATSplit:
        """``n`` evenly spaced samples (all when n >= len), e.g. for a quick in-loop check."""
        if n < 1:
            raise ValueError(f"subset size must be >= 1, got {n}")
        if n >= len(self):
            return self
        idx = np.linspace(0, len(self) - 1, n).round().astype(int)
        labels = None if self.labels is None else self.labels[idx]
        return EuroSATSplit(
            self.name, [self.paths[i] for i in idx], labels, self._read, self._normalize
        )

    def batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(images [B, H, W, 12] float32, labels [B] int64) in file order."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for start in range(0, len(self), batch_size):
            items = [self[i] for i in range(start, min(start + batch_size, len(self)))]
            yield np.stack([x for x, _ in items]), np.array([y for _, y in items], dtype=np.int64)


@dataclass
class EuroSAT:
    """A EuroSAT dataset on disk (see the module docstring for the layouts)."""

    root: Path
    layout: str
    num_classes: int
    class_names: list[str]
    splits: dict[str, EuroSATSplit]
    norm: str

    def split(self, name: str) -> EuroSATSplit:
        name = split_name(name)
        if name not in self.splits:
            raise KeyError(
                f"EuroSAT at {self.root} has no {name!r} split (has {sorted(self.splits)})"
            )
        return self.splits[name]


def _pick(band_names: Sequence[str], wanted: Sequence[str], where: str) -> list[int]:
    pos = {b: i for i, b in enumerate(band_names)}
    missing = [b for b in wanted if b not in pos]
    if missing:
        raise ValueError(f"{where}: bands {missing} are missing (have {list(band_names)})")
    return [pos[b] for b in wanted]


def _norm_fn(norm: str, stats: dict | None) -> Callable[[np.ndarray], np.ndarray]:
    if norm == "pretrain":
        return lambda x: normalize("sentinel2_l2a", x)
    # GEO-Bench band_stats.json in S2 L2A order, mean ± 2 std -> [0, 1], float64 then float32
    lo = np.array([stats[b]["mean"] - 2 * stats[b]["std"] for b in S2_BANDS], dtype=np.float64)
    hi = np.array([stats[b]["mean"] + 2 * stats[b]["std"] for b in S2_BANDS], dtype=np.float64)
    return lambda x: ((x - lo) / (hi - lo)).astype(np.float32)


def _load_geobench(task: Path, splits: Sequence[str], partition: str, norm: str) -> EuroSAT:
    with open(task / f"{partition}_partition.json") as f:
        part = json.load(f)
    num_classes, class_names = None, None
    if (task / "task_specs.pkl").is_file():
        specs = safe_unpickle((task / "task_specs.pkl").read_bytes())
        label_type = getattr(specs, "label_type", None)
        num_classes = getattr(label_type, "n_classes", None)
        class_names = getattr(label_type, "_class_names", None)
    stats = None
    if norm == "dataset":
        if not (task / "band_stats.json").is_file():
            raise FileNotFoundError(f"norm='dataset' needs {task / 'band_stats.json'}")
        with open(task / "band_stats.json") as f:
            stats = {GEOBENCH_BANDS[k]: v for k, v in json.load(f).items() if k in GEOBENCH_BANDS}

    def read(path: Path) -> tuple[np.ndarray, int]:
        bands, label = read_geobench_sample(path)
        by_s2 = {GEOBENCH_BANDS[k]: v for k, v in bands.items() if k in GEOBENCH_BANDS}
        missing = [b for b in S2_BANDS if b not in by_s2]
        if missing:
            raise ValueError(f"{path}: bands {missing} are missing (has {sorted(bands)})")
        return np.stack([by_s2[b] for b in S2_BANDS], axis=-1), label

    out = {}
    for s in splits:
        names = part.get(s)
        if names is None:
            raise KeyError(
                f"{task / f'{partition}_partition.json'} has no {s!r} split (has {sorted(part)})"
            )
        paths = [task / f"{n}.hdf5" for n in names]
        absent = [p.name for p in paths if not p.is_file()]
        if absent:
            raise FileNotFoundError(
                f"{task}: {len(absent)} sample files of split {s!r} are missing, e.g. {absent[:3]}"
            )
        out[s] = EuroSATSplit(s, paths, None, read, _norm_fn(norm, stats))
    if num_classes is None:  # no task_specs.pkl: the largest label seen
        num_classes = 1 + max(read_geobench_sample(p)[1] for sp in out.values() for p in sp.paths)
    names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
    return EuroSAT(task, "geobench", int(num_classes), names, out, norm)


def _load_torchgeo(
    root: Path, splits: Sequence[str], norm: str, band_order: Sequence[str]
) -> EuroSAT:
    if norm != "pretrain":
        raise ValueError(
            "norm='dataset' needs GEO-Bench's band_stats.json; the torchgeo layout has "
            "no statistics file, use norm='pretrain'"
        )
    if len(band_order) != 13:
        raise ValueError(
            f"band_order must name the 13 bands of the GeoTIFFs, got {len(band_order)}"
        )
    split_dir, tif_dir = _torchgeo_dirs(root)
    classes = sorted(p.name for p in tif_dir.iterdir() if p.is_dir())
    index = {}
    for c, name in enumerate(classes):
        for p in (tif_dir / name).glob("*.tif"):
            index[p.name] = (p, c)
    take = _pick(band_order, S2_BANDS, f"band_order {list(band_order)}")

    def read(path: Path) -> tuple[np.ndarray, int]:
        return read_geotiff(path, len(band_order))[..., take], index[path.name][1]

    out = {}
    for s in splits:
        split_file = split_dir / TORCHGEO_SPLIT_FILES[s]
        if not split_file.is_file():
            raise FileNotFoundError(
                f"{root}: split file {split_file.name} for split {s!r} not found"
            )
        names = [
            ln.strip().replace(".jpg", ".tif")
            for ln in split_file.read_text().splitlines()
            if ln.strip()
        ]
        absent = [n for n in names if n not in index]
        if absent:
            raise FileNotFoundError(
                f"{tif_dir}: {len(absent)} GeoTIFFs listed in {split_file.name} are "
                f"missing, e.g. {absent[:3]}"
            )
        paths = [index[n][0] for n in names]
        labels = np.array([index[n][1] for n in names], dtype=np.int64)
        out[s] = EuroSATSplit(s, paths, labels, read, _norm_fn(norm, None))
    return EuroSAT(root, "torchgeo", len(classes), classes, out, norm)


def load_eurosat(
    root: str | os.PathLike,
    layout: str = "auto",
    splits: Sequence[str] = SPLITS,
    partition: str = "default",
    norm: str = "pretrain",
    torchgeo_band_order: Sequence[str] = TORCHGEO_BAND_ORDER,
) -> EuroSAT:
    """Open EuroSAT at ``root`` (lazy: samples are read when accessed).

    Args:
        root: a GEO-Bench m-eurosat task directory (or a GEO-Bench root above it), or a torchgeo
            EuroSATallBands directory.
        layout: "auto", "geobench" or "torchgeo".
        splits: which splits to open ("val" is accepted for "valid").
        partition: GEO-Bench partition ("default" = all labels; "0.01x_train", …).
        norm: "pretrain" (pretraining statistics, the reference's default) or "dataset"
            (GEO-Bench band_stats.json).
        torchgeo_band_order: band of each GeoTIFF channel.

    Raises:
        FileNotFoundError: the path does not exist or is in neither layout; the message says
            what each layout expects.
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    splits = tuple(dict.fromkeys(split_name(s) for s in splits))
    root = Path(root)
    layout = detect_layout(root, layout, partition)
    if layout == "geobench":
        return _load_geobench(_geobench_task_dir(root, partition), splits, partition, norm)
    return _load_torchgeo(root, splits, norm, torchgeo_band_order)
