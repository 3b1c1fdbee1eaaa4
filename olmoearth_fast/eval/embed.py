"""Embedding export for OlmoEarth H5 datasets (npy or parquet).

Each selected sample is cropped to ``hw_p·p`` pixels (corner drawn from ``seed``; ``hw_p=None``
takes the whole tile from the top-left corner), all 12 months (no token budget), normalised
with the pretraining statistics, and embedded as the mean of its non-MISSING output tokens,
as the reference's embedding diagnostics do (`evals/datasets/pretrain_subset.py`: patch 4,
hw_p 8; with ``max_samples`` the subset is `RandomState(seed).choice(N, max_samples)`, the
reference's choice). Samples of one batch that differ in token count are padded together in
the encoder (the reference's eval attention-padding quirk, see `model/encoder.py`), so an
embedding can depend on its batch; ``batch_size=1`` removes that.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from olmoearth_fast.data.dataset import OlmoEarthH5Dataset
from olmoearth_fast.eval.embeddings import chunks, embed_batch, use_autocast

FORMATS = ("npy", "parquet")


def select_samples(n: int, max_samples: int | None, seed: int) -> list[int]:
    """Positions to embed: all in order, or the reference's RandomState(seed).choice subset."""
    if max_samples is None or max_samples >= n:
        return list(range(n))
    if max_samples < 1:
        raise ValueError(f"max_samples must be >= 1, got {max_samples}")
    return np.random.RandomState(seed).choice(n, size=max_samples, replace=False).tolist()


def embed_h5_dataset(
    model,
    root: str | os.PathLike,
    patch_size: int = 4,
    hw_p: int | None = 8,
    batch_size: int = 32,
    modalities: Sequence[str] | None = None,
    max_samples: int | None = None,
    seed: int = 42,
    precision: str = "auto",
) -> tuple[Tensor, np.ndarray]:
    """Embed samples of an OlmoEarth H5 dataset directory.

    Args:
        model: a `LatentMIM`.
        root: directory of `sample_*.h5` (reference layout).
        hw_p: tokens per crop side; None = the whole tile.
        modalities: input modalities (default: the model's); must be modalities of the model.

    Returns:
        (embeddings [N, D] float32, sample file indices [N] int64).
    """
    mods = tuple(modalities) if modalities else tuple(model.cfg.modalities)
    unknown = [m for m in mods if m not in model.cfg.modalities]
    if unknown:
        raise ValueError(
            f"modalities {unknown} are not inputs of the model (has {list(model.cfg.modalities)})"
        )
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"--dataset {root}: expected a directory of OlmoEarth H5 samples (sample_*.h5)"
        )
    ds = OlmoEarthH5Dataset(root, training_modalities=mods)
    tile = ds.tile_size
    hw_p = hw_p or tile // patch_size
    if hw_p * patch_size > tile:
        raise ValueError(f"hw_p={hw_p} x patch_size={patch_size} px exceeds the {tile} px tiles")
    device = next(model.parameters()).device
    autocast = use_autocast(precision, device)
    rng = np.random.default_rng(seed)
    positions = select_samples(len(ds), max_samples, seed)
    full_tile = hw_p * patch_size == tile
    embs, index = [], []
    for part in chunks(len(positions), batch_size):
        items = []
        for j in part:
            crop = (0, 0, 0) if full_tile else None
            items.append(ds.get_item(positions[j], patch_size, hw_p, None, rng, crop=crop))
        data = {
            m: torch.from_numpy(np.stack([s.data[m] for s in items])).to(device)
            for m in ds.training_modalities
        }
        ts = torch.from_numpy(np.stack([s.timestamps for s in items])).to(device)
        embs.append(embed_batch(model, data, ts, patch_size, "mask", autocast).cpu())
        index.extend(s.index for s in items)
    return torch.cat(embs), np.asarray(index, dtype=np.int64)


def save_embeddings(path: str | os.PathLike, emb: Tensor, sample_index: np.ndarray) -> list[Path]:
    """Write embeddings; the format follows the extension.

    * ``.npy``: the [N, D] float32 array, plus ``<stem>_index.npy`` with the sample indices;
    * ``.parquet``: columns ``sample_index`` (int64) and ``embedding`` (list of float32);
      needs pyarrow.

    Returns:
        The files written.
    """
    path = Path(path)
    fmt = path.suffix.lstrip(".")
    if fmt not in FORMATS:
        raise ValueError(f"--out {path}: expected a .npy or .parquet file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = emb.detach().float().cpu().numpy()
    if fmt == "npy":
        side = path.with_name(path.stem + "_index.npy")
        np.save(path, arr)
        np.save(side, np.asarray(sample_index, dtype=np.int64))
        return [path, side]
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise ImportError(
            "writing parquet needs the 'pyarrow' package (pip install pyarrow), "
            "or use a .npy output"
        ) from None
    import pandas as pd

    pd.DataFrame(
        {"sample_index": np.asarray(sample_index, dtype=np.int64), "embedding": list(arr)}
    ).to_parquet(path, index=False)
    return [path]
