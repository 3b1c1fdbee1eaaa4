"""OlmoEarth H5 dataset: one item = a cropped, normalised sample (docs/reference_semantics.md
§9.3).

Item semantics are the reference's `OlmoEarthDataset.__getitem__` + `subset_sample_default`:

1. crop `timestamps` to [first, last] present month over the training modalities' masks;
2. edge-pad timestamps to 12;
3. put each multitemporal modality's stored (present-only) months at their positions in the
   12-slot axis, −99999 elsewhere; an absent modality is all −99999 and is not normalised;
4. T = min(12, floor((budget − static tokens) / tokens per month)) with **default** bandset
   counts (reference quirk; `budget_tokenization` counts the experiment's own instead);
   start month uniform over present months that leave T months (0 if the year fits);
   top-left corner uniform so the hw_p·p square fits;
5. normalise present modalities, −99999 kept.

`get_item` does the same but reads only the crop window out of each H5 dataset (a hyperslab:
the whole zstd chunk is still decompressed, but the full tile is never padded, cast or copied)
and normalises only the crop. The tests hold the literal full-tile transcription as its oracle
(tests/helpers/dataset_ref.py); both draw the crop with the same numpy Generator calls, so for
one seed they return identical arrays.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401  (registers the zstd filter with h5py)
import numpy as np

from olmoearth_fast.data.h5 import (
    MISSING_TIMESTEPS_GROUP,
    CorruptSampleError,
    read_metadata,
    sample_path,
)
from olmoearth_fast.data.normalize import normalize as normalize_band_values
from olmoearth_fast.modalities import (
    LOSS_FIELD_ORDER,
    MAX_SEQUENCE_LENGTH,
    MISSING_VALUE,
    TRAINING_MODALITIES,
    TokenizationConfig,
    check_modalities,
    get_modality,
)


@dataclass
class Sample:
    """One cropped, normalised sample.

    Attributes:
        data: modality -> float32 `[h, w, T, C]` (maps T=1) or `[T, C]` (era5_10); all
            training modalities, −99999 where missing.
        timestamps: int64 `[T, 3]` (day, month 0-based, year).
        index: file index (`sample_{index}.h5`).
        missing_modalities: training modalities absent from the file.
    """

    data: dict[str, np.ndarray]
    timestamps: np.ndarray
    index: int
    missing_modalities: list[str] = field(default_factory=list)


def max_t_within_budget(
    modalities: Sequence[str],
    hw_p: int,
    token_budget: int | None,
    tokenization: TokenizationConfig | None = None,
    max_sequence_length: int = MAX_SEQUENCE_LENGTH,
) -> int:
    """Months per sample under the token budget (reference `_get_max_t_within_token_budget`).

    `time_tokens = hw_p² · Σ_spacetime BS + Σ_time-only BS`, `static = hw_p² · Σ_maps BS`,
    `T = min(max_sequence_length, floor((budget − static) / time_tokens))`; BS are default
    bandset counts when `tokenization` is None (the reference dataloader's behaviour).

    Raises:
        ValueError: the budget leaves less than one month.
    """
    if token_budget is None:
        return max_sequence_length
    tok = tokenization or TokenizationConfig()
    per_t, static = 0, 0
    for m in modalities:
        spec = get_modality(m)
        bs = tok.num_bandsets(m)
        if spec.is_spacetime:
            per_t += hw_p * hw_p * bs
        elif spec.is_space_only:
            static += hw_p * hw_p * bs
        elif spec.is_time_only:
            per_t += bs
        else:
            static += bs
    if per_t == 0:
        return 1
    t = (token_budget - static) / per_t
    if t < 1:
        raise ValueError(
            f"token_budget={token_budget} leaves no month for hw_p={hw_p} "
            f"({static} static tokens, {per_t} tokens per month)"
        )
    return min(math.floor(t), max_sequence_length)


def valid_start_months(masks: dict[str, np.ndarray], max_t: int, current_length: int) -> list[int]:
    """Start months the crop may use (reference `get_valid_start_ts`)."""
    if current_length <= max_t:
        return [0]
    if not masks:
        return list(range(current_length - max_t + 1))
    starts: set[int] = set()
    for m in masks.values():
        t = np.flatnonzero(m)
        starts.update(int(x) for x in t[t + max_t <= current_length])
    if not starts:
        raise ValueError(f"no valid start month for max_t={max_t}, length={current_length}")
    return sorted(starts)


class OlmoEarthH5Dataset:
    """A directory of reference-format H5 samples.

    Args:
        root: directory holding `sample_{i}.h5` and (optionally) `sample_metadata.csv`.
        training_modalities: modalities to load (others in the files are ignored).
        normalize: apply the reference normalisation.
        max_sequence_length: months per year axis (12).
        std_multiplier: k of mean -/+ k std (2).
        skip_corrupt: recorded for the loader (which substitutes the next readable sample
            with a warning); `get_item` itself always raises CorruptSampleError.
        filter_no_spacetime: drop samples whose metadata row has none of the training
            spacetime modalities (the reference's `_filter_sample_indices_for_training`).

    Raises:
        FileNotFoundError: `root` does not exist or holds no sample.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        training_modalities: Sequence[str] = TRAINING_MODALITIES,
        normalize: bool = True,
        max_sequence_length: int = MAX_SEQUENCE_LENGTH,
        std_multiplier: float = 2.0,
        skip_corrupt: bool = False,
        filter_no_spacetime: bool = True,
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"dataset directory does not exist: {self.root}")
        check_modalities(training_modalities, "training_modalities")
        # field order, so "first spatial modality" and iteration are deterministic
        self.training_modalities = tuple(m for m in LOSS_FIELD_ORDER if m in training_modalities)
        self.normalize = normalize
        self.max_sequence_length = max_sequence_length
        self.std_multiplier = std_multiplier
        self.skip_corrupt = skip_corrupt
        meta = read_metadata(self.root)
        if meta is not None:
            indices = meta["sample_index"].to_numpy(dtype=np.int64)
            spacetime = [
                m for m in self.training_modalities
                if get_modality(m).is_spacetime and m in meta.columns
            ]
            if filter_no_spacetime and spacetime:
                keep = meta[spacetime].sum(axis=1).to_numpy() > 0
                indices = indices[keep]
        else:
            names = [p.name for p in self.root.glob("sample_*.h5")]
            indices = np.array(sorted(int(n[len("sample_"):-len(".h5")]) for n in names),
                               dtype=np.int64)
        if len(indices) == 0:
            raise FileNotFoundError(f"no samples in {self.root}")
        self.sample_indices = indices
        self._tile_size: int | None = None

    def __len__(self) -> int:
        return len(self.sample_indices)

    def path(self, i: int) -> Path:
        """File of the i-th (post-filter) sample."""
        return sample_path(self.root, int(self.sample_indices[i]))

    @property
    def tile_size(self) -> int:
        """Side in pixels of the samples (read from the first readable file)."""
        if self._tile_size is None:
            for i in range(len(self)):
                try:
                    with h5py.File(self.path(i), "r") as f:
                        for m in self.training_modalities:
                            if m in f and get_modality(m).is_spatial:
                                self._tile_size = int(min(f[m].shape[0], f[m].shape[1]))
                                return self._tile_size
                except OSError:
                    continue
            raise ValueError(f"no readable sample with a spatial modality in {self.root}")
        return self._tile_size

    @property
    def fingerprint(self) -> str:
        """Identity of the data order: directory name, sample count, modality list."""
        return f"{self.root.name}:{len(self)}:{','.join(self.training_modalities)}"

    def max_t(self, hw_p: int, token_budget: int | None,
              budget_tokenization: TokenizationConfig | None = None) -> int:
        return max_t_within_budget(self.training_modalities, hw_p, token_budget,
                                   budget_tokenization, self.max_sequence_length)

    # ------------------------------------------------------------------ shared steps
    def _time_axis(self, ts: np.ndarray, masks: dict[str, np.ndarray], path) -> tuple:
        """Crop timestamps/masks to [first, last] present month, then edge-pad to 12."""
        L = self.max_sequence_length
        if masks:
            present = [np.flatnonzero(m) for m in masks.values()]
            present = [p for p in present if len(p)]
            if not present:
                raise CorruptSampleError(f"{path}: every missing_timesteps mask is all False")
            first = min(int(p[0]) for p in present)
            last = max(int(p[-1]) for p in present)
        else:
            first, last = 0, L
        ts = ts[first:last + 1]
        masks = {k: v[first:last + 1] for k, v in masks.items()}
        current = ts.shape[0]
        if current > L:
            raise CorruptSampleError(f"{path}: {current} timestamps, more than {L}")
        if current < L:
            ts = np.pad(ts, ((0, L - current), (0, 0)), mode="edge")
        return ts.astype(np.int64), masks, current

    def _draw_crop(self, rng, masks, max_t, current, height, hw, crop):
        if hw > height:
            raise ValueError(f"crop side {hw} px exceeds the sample's {height} px")
        if crop is not None:
            return crop
        start_t = int(rng.choice(valid_start_months(masks, max_t, current)))
        start_h = int(rng.choice(height - hw + 1))
        start_w = int(rng.choice(height - hw + 1))
        return start_t, start_h, start_w

    def _finish(self, name, x, cast_first):
        """Normalise a present modality's crop (the reference casts masked ones first)."""
        if cast_first:
            x = x.astype(np.float32)
        if self.normalize:
            return normalize_band_values(name, x, self.std_multiplier)
        return x.astype(np.float32)

    # ------------------------------------------------------------------ fast path
    def get_item(
        self,
        i: int,
        patch_size: int,
        hw_p: int,
        token_budget: int | None,
        rng: np.random.Generator,
        budget_tokenization: TokenizationConfig | None = None,
        crop: tuple[int, int, int] | None = None,
    ) -> Sample:
        """Read, crop and normalise sample i (reading only the crop window).

        Args:
            i: position in the (filtered) dataset.
            patch_size: pixels per token side, p.
            hw_p: tokens per crop side; the crop is hw_p·p pixels square.
            token_budget: tokens per sample that fix T (2250 in the reference); None = 12.
            rng: draws the start month and the corner (start_t, then start_h, start_w).
            budget_tokenization: count the budget with this tokenization (None = defaults,
                the reference quirk).
            crop: (start_t, start_h, start_w) to use instead of drawing.

        Raises:
            CorruptSampleError: the file cannot be read; names the file.
        """
        path = self.path(i)
        hw = hw_p * patch_size
        L = self.max_sequence_length
        max_t = self.max_t(hw_p, token_budget, budget_tokenization)
        try:
            with h5py.File(path, "r") as f:
                if "timestamps" not in f:
                    raise CorruptSampleError(f"{path}: no 'timestamps' dataset")
                masks = {}
                if MISSING_TIMESTEPS_GROUP in f:
                    g = f[MISSING_TIMESTEPS_GROUP]
                    masks = {m: np.asarray(g[m][()], bool)
                             for m in self.training_modalities if m in g}
                ts, masks, current = self._time_axis(f["timestamps"][()], masks, path)
                present = [m for m in self.training_modalities if m in f]
                spatial = [m for m in present if get_modality(m).is_spatial]
                if not spatial:
                    raise CorruptSampleError(f"{path}: no spatial training modality")
                height = min(f[spatial[0]].shape[0], f[spatial[0]].shape[1])
                t0, h0, w0 = self._draw_crop(rng, masks, max_t, current, height, hw, crop)
                data: dict[str, np.ndarray] = {}
                for m in self.training_modalities:
                    spec = get_modality(m)
                    if m not in f:
                        continue
                    d = f[m]
                    sp = (slice(h0, h0 + hw), slice(w0, w0 + hw)) if spec.is_spatial else ()
                    if not spec.is_multitemporal:
                        data[m] = self._finish(m, d[sp], cast_first=False)
                        continue
                    # stored month k sits at padded slot slots[k]
                    t_axis = 2 if spec.is_spatial else 0
                    n_stored = d.shape[t_axis]
                    if m in masks:
                        slots = np.flatnonzero(masks[m])[:n_stored]
                    else:
                        slots = np.arange(min(n_stored, L))
                    sel = np.flatnonzero((slots >= t0) & (slots < t0 + max_t))
                    shape = ((hw, hw) if spec.is_spatial else ()) + (max_t, spec.num_bands)
                    out = np.full(shape, MISSING_VALUE, dtype=np.float32)
                    if len(sel):
                        k0, k1 = int(sel[0]), int(sel[-1]) + 1  # contiguous in storage
                        part = d[sp + (slice(k0, k1),)]
                        part = self._finish(m, part, cast_first=m in masks)
                        out[..., slots[k0:k1] - t0, :] = part
                    data[m] = out
        except CorruptSampleError:
            raise
        except (OSError, KeyError, TypeError, IndexError) as e:
            raise CorruptSampleError(
                f"{path}: cannot read H5 sample ({type(e).__name__}: {e})") from e
        missing = self._fill_absent(data, hw, max_t)
        data = {m: data[m] for m in self.training_modalities}
        return Sample(data, ts[t0:t0 + max_t], int(self.sample_indices[i]), missing)

    def _fill_absent(self, data: dict, hw: int, max_t: int) -> list[str]:
        missing = []
        for m in self.training_modalities:
            if m in data:
                continue
            spec = get_modality(m)
            if spec.is_spacetime:
                shape = (hw, hw, max_t, spec.num_bands)
            elif spec.is_space_only:
                shape = (hw, hw, 1, spec.num_bands)
            elif spec.is_time_only:
                shape = (max_t, spec.num_bands)
            else:
                shape = (spec.num_bands,)
            data[m] = np.full(shape, MISSING_VALUE, dtype=np.float32)
            missing.append(m)
        return missing
