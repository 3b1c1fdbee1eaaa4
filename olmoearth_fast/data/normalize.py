"""Per-band normalisation with the reference statistics (docs/reference_semantics.md §9.2).

`x' = (x - lo) / (hi - lo)` per band with, in order of preference:

* "computed" stats (computed.json): lo, hi = mean -/+ 2 std, so mean +/- 2 std maps to [0, 1];
* "predefined" stats (predefined.json): lo, hi = min, max (OSM 0..1, WorldCereal 0..100).

A modality uses computed stats only if every one of its bands has them, else predefined for all
bands (the reference tries computed for the whole modality and falls back on any failure). No
clipping. Pixels equal to MISSING_VALUE stay MISSING_VALUE.

The arithmetic is done in float64 and rounded to float32 once, exactly as the reference (whose
band constants are float64 numpy arrays), so results are bit-identical to it.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib.resources import files

import numpy as np

from olmoearth_fast.modalities import MISSING_VALUE, get_modality


@lru_cache(maxsize=None)
def load_norm_stats(kind: str) -> dict:
    """The shipped statistics: kind "computed" (mean/std) or "predefined" (min/max)."""
    if kind not in ("computed", "predefined"):
        raise ValueError(f"kind must be 'computed' or 'predefined', got {kind!r}")
    with (files("olmoearth_fast") / "norm_configs" / f"{kind}.json").open() as f:
        return json.load(f)


@lru_cache(maxsize=None)
def norm_bounds(modality: str, std_multiplier: float = 2.0) -> tuple[np.ndarray, np.ndarray, str]:
    """Per-band (lo, hi) float64 arrays in canonical band order and the strategy used.

    Raises:
        ValueError: a modality without statistics for all its bands in either file.
    """
    spec = get_modality(modality)
    computed = load_norm_stats("computed").get(modality, {})
    if all(b in computed for b in spec.band_order):
        mean = np.array([computed[b]["mean"] for b in spec.band_order], dtype=np.float64)
        std = np.array([computed[b]["std"] for b in spec.band_order], dtype=np.float64)
        lo, hi = mean - std_multiplier * std, mean + std_multiplier * std
        return lo, hi, "computed"
    predefined = load_norm_stats("predefined").get(modality, {})
    if all(b in predefined for b in spec.band_order):
        lo = np.array([predefined[b]["min"] for b in spec.band_order], dtype=np.float64)
        hi = np.array([predefined[b]["max"] for b in spec.band_order], dtype=np.float64)
        return lo, hi, "predefined"
    raise ValueError(f"no normalisation statistics cover every band of modality {modality!r}")


def normalize(modality: str, x: np.ndarray, std_multiplier: float = 2.0) -> np.ndarray:
    """Normalise `x` (last axis = all canonical bands) to float32, keeping MISSING_VALUE.

    Args:
        modality: modality name.
        x: raw values, any real dtype, shape [..., C] with C = number of canonical bands.
        std_multiplier: k in mean -/+ k std (2 in the reference).

    Returns:
        float32 array of x's shape.
    """
    lo, hi, _ = norm_bounds(modality, float(std_multiplier))
    if x.shape[-1] != lo.shape[0]:
        raise ValueError(
            f"normalize({modality!r}): expected last axis of {lo.shape[0]} bands, got shape "
            f"{x.shape}"
        )
    out = ((x - lo) / (hi - lo)).astype(np.float32)
    missing = x == MISSING_VALUE
    if missing.any():
        out[missing] = MISSING_VALUE
    return out


def normalize_ref(modality: str, x: np.ndarray, std_multiplier: float = 2.0) -> np.ndarray:
    """Straight transcription of the reference formula (no fast path), for tests."""
    lo, hi, _ = norm_bounds(modality, float(std_multiplier))
    y = (x - lo) / (hi - lo)
    return np.where(x == MISSING_VALUE, x, y).astype(np.float32)


def denormalize(modality: str, y: np.ndarray, std_multiplier: float = 2.0) -> np.ndarray:
    """Inverse of `normalize` (float64), MISSING_VALUE kept; for visualisation and tests."""
    lo, hi, _ = norm_bounds(modality, float(std_multiplier))
    x = y.astype(np.float64) * (hi - lo) + lo
    return np.where(y == MISSING_VALUE, float(MISSING_VALUE), x)
