"""The dataset item, transcribed literally: the oracle of `OlmoEarthH5Dataset.get_item`.

`get_item` reads only the crop window of each H5 dataset; `get_item_ref` reads whole tiles,
pads every multitemporal modality to the 12-month axis, then crops and normalises, in the
reference's order (docs/reference_semantics.md §9.3). Both draw the crop with the same numpy
Generator calls, so for one seed they return identical arrays.
"""

from __future__ import annotations

import numpy as np

from olmoearth_fast.data.dataset import OlmoEarthH5Dataset, Sample
from olmoearth_fast.data.h5 import CorruptSampleError, read_sample
from olmoearth_fast.modalities import MISSING_VALUE, TokenizationConfig, get_modality


def get_item_ref(
    ds: OlmoEarthH5Dataset,
    i: int,
    patch_size: int,
    hw_p: int,
    token_budget: int | None,
    rng: np.random.Generator,
    budget_tokenization: TokenizationConfig | None = None,
    crop: tuple[int, int, int] | None = None,
) -> Sample:
    """`ds.get_item` as a literal full-tile transcription of the reference item: read every
    array whole, pad the year axis, crop, normalise. Same arguments and random draws."""
    path = ds.path(i)
    L = ds.max_sequence_length
    raw = read_sample(path, ds.training_modalities)
    ts, masks, current = ds._time_axis(raw.timestamps, raw.missing_timesteps, path)
    full: dict[str, np.ndarray] = {}
    for m in ds.training_modalities:
        if m not in raw.arrays:
            continue
        x = raw.arrays[m]
        spec = get_modality(m)
        if m in masks:
            x = x.astype(np.float32)
            mask = masks[m]
            if not mask.all() or len(mask) < L:
                t_axis = 2 if spec.is_spatial else 0
                shape = list(x.shape)
                shape[t_axis] = L
                padded = np.full(shape, MISSING_VALUE, dtype=np.float32)
                idx = np.flatnonzero(mask)
                n = min(len(idx), x.shape[t_axis])
                if spec.is_spatial:
                    padded[:, :, idx[:n]] = x[:, :, :n]
                else:
                    padded[idx[:n]] = x[:n]
                x = padded
        full[m] = x
    spatial = [m for m in ds.training_modalities
               if m in full and get_modality(m).is_spatial]
    if not spatial:
        raise CorruptSampleError(f"{path}: no spatial training modality")
    height = full[spatial[0]].shape[0]
    hw = hw_p * patch_size
    max_t = ds.max_t(hw_p, token_budget, budget_tokenization)
    t0, h0, w0 = ds._draw_crop(rng, masks, max_t, current, height, hw, crop)
    data = {}
    for m, x in full.items():
        spec = get_modality(m)
        if spec.is_spacetime:
            x = x[h0:h0 + hw, w0:w0 + hw, t0:t0 + max_t]
        elif spec.is_space_only:
            x = x[h0:h0 + hw, w0:w0 + hw]
        elif spec.is_time_only:
            x = x[t0:t0 + max_t]
        data[m] = ds._finish(m, x, cast_first=False)
    missing = ds._fill_absent(data, hw, max_t)
    data = {m: data[m] for m in ds.training_modalities}
    return Sample(data, ts[t0:t0 + max_t], int(ds.sample_indices[i]), missing)
