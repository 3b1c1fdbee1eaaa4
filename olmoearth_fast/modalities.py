"""Modality and band specs, default bandsets, tokenization config, mask codes.

Everything here mirrors the reference's `data/constants.py` and `nn/tokenization.py` for the ten
modalities these experiments use (docs/reference_semantics.md §1). A modality's canonical band
order is the concatenation of its default bandsets; every data tensor carries all canonical
bands and a tokenization config picks band groups out of them by index.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum


class MaskValue(IntEnum):
    """Per-token (and per-pixel) role codes, identical to the reference's MaskValue."""

    ONLINE_ENCODER = 0
    TARGET_ENCODER_ONLY = 1
    DECODER = 2
    MISSING = 3


# Marker for absent pixels, timesteps and modalities; kept through normalisation.
MISSING_VALUE = -99999
# Monthly timesteps per sample (one year).
MAX_SEQUENCE_LENGTH = 12
# Metres per pixel of the common grid every spatial modality is stored on.
BASE_GSD = 10


@dataclass(frozen=True)
class ModalitySpec:
    """One modality: its bands, default bandsets and space/time kind.

    Attributes:
        name: Reference modality name (H5 dataset key).
        band_order: Canonical channel order of the data tensor.
        bandsets: Default band groups (one token per group and position), in order.
        bandset_resolution_factors: Reference resolution factor of each default bandset
            (metres = 0.625 * factor); informative only, all bands sit on the 10 m grid.
        is_spatial: Has H, W axes (False only for era5_10).
        is_multitemporal: Has a T axis of up to 12 months (maps are stored with T=1).
    """

    name: str
    band_order: tuple[str, ...]
    bandsets: tuple[tuple[str, ...], ...]
    bandset_resolution_factors: tuple[int, ...]
    is_spatial: bool
    is_multitemporal: bool

    @property
    def num_bands(self) -> int:
        return len(self.band_order)

    @property
    def num_bandsets(self) -> int:
        return len(self.bandsets)

    @property
    def is_spacetime(self) -> bool:
        return self.is_spatial and self.is_multitemporal

    @property
    def is_space_only(self) -> bool:
        return self.is_spatial and not self.is_multitemporal

    @property
    def is_time_only(self) -> bool:
        return self.is_multitemporal and not self.is_spatial

    @property
    def is_static(self) -> bool:
        return not self.is_spatial and not self.is_multitemporal

    def default_bandset_indices(self) -> list[list[int]]:
        """Default bandsets as indices into `band_order` (consecutive ranges)."""
        out, offset = [], 0
        for group in self.bandsets:
            out.append(list(range(offset, offset + len(group))))
            offset += len(group)
        return out


def _spec(name, bandsets, factors, spatial=True, temporal=False) -> ModalitySpec:
    bandsets = tuple(tuple(g) for g in bandsets)
    order = tuple(b for g in bandsets for b in g)
    return ModalitySpec(name, order, bandsets, tuple(factors), spatial, temporal)


_S2_10M = ("B02", "B03", "B04", "B08")
_S2_20M = ("B05", "B06", "B07", "B8A", "B11", "B12")
_S2_60M = ("B01", "B09")
_LANDSAT_30M = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B9", "B10", "B11")
_OSM_BANDS = (
    "aerialway_pylon", "aerodrome", "airstrip", "amenity_fuel", "building", "chimney",
    "communications_tower", "crane", "flagpole", "fountain", "generator_wind", "helipad",
    "highway", "leisure", "lighthouse", "obelisk", "observatory", "parking", "petroleum_well",
    "power_plant", "power_substation", "power_tower", "river", "runway", "satellite_dish",
    "silo", "storage_tank", "taxiway", "water_tower", "works",
)
_WORLDCEREAL_BANDS = (
    "tc-annual-temporarycrops-classification",
    "tc-maize-main-irrigation-classification",
    "tc-maize-main-maize-classification",
    "tc-maize-second-irrigation-classification",
    "tc-maize-second-maize-classification",
    "tc-springcereals-springcereals-classification",
    "tc-wintercereals-irrigation-classification",
    "tc-wintercereals-wintercereals-classification",
)
_ERA5_BANDS = (
    "2m-temperature", "2m-dewpoint-temperature", "surface-pressure",
    "10m-u-component-of-wind", "10m-v-component-of-wind", "total-precipitation",
)

# The reference's TokensAndMasks / MaskedOlmoEarthSample field order, including modalities not
# used here (latlon, naip, ...). The loss sums modalities in this order, token sequences
# concatenate them in it, and modality_cross_random lists present units in it (the "2 present
# units: encode the first" rule depends on it): docs/reference_semantics.md §2.3.
LOSS_FIELD_ORDER: tuple[str, ...] = (
    "sentinel2_l2a", "sentinel1", "worldcover", "latlon", "openstreetmap_raster", "srtm",
    "landsat", "naip", "naip_10", "gse", "cdl", "worldpop", "worldcereal",
    "wri_canopy_height_map", "era5_10", "eurocrops",
)

MODALITIES: dict[str, ModalitySpec] = {
    m.name: m
    for m in sorted(
        [
            _spec("sentinel2_l2a", [_S2_10M, _S2_20M, _S2_60M], [16, 32, 64], temporal=True),
            _spec("sentinel1", [("vv", "vh")], [16], temporal=True),
            _spec("landsat", [("B8",), _LANDSAT_30M], [16, 32], temporal=True),
            _spec("worldcover", [("B1",)], [16]),
            _spec("srtm", [("srtm",)], [16]),
            _spec("openstreetmap_raster", [_OSM_BANDS], [4]),
            _spec("wri_canopy_height_map", [("B1",)], [16]),
            _spec("cdl", [("cdl",)], [16]),
            _spec("worldcereal", [_WORLDCEREAL_BANDS], [16]),
            # tile size 256/256 = 1 pixel: time-only, data [T, 6]
            _spec("era5_10", [_ERA5_BANDS], [4096], spatial=False, temporal=True),
        ],
        key=lambda s: LOSS_FIELD_ORDER.index(s.name),
    )
}

# The 9 modalities of every experiment (era5_10 is added by exps 7/15/16).
TRAINING_MODALITIES: tuple[str, ...] = (
    "sentinel2_l2a", "sentinel1", "landsat", "worldcover", "srtm", "openstreetmap_raster",
    "wri_canopy_height_map", "cdl", "worldcereal",
)
# Map modalities that are only ever decoded (era5_10 joins them in exps 7/15/16).
ONLY_DECODE_MODALITIES: tuple[str, ...] = (
    "worldcover", "srtm", "openstreetmap_raster", "wri_canopy_height_map", "cdl", "worldcereal",
)


def get_modality(name: str) -> ModalitySpec:
    """Look a modality up by name; an unknown name raises and lists the valid ones."""
    try:
        return MODALITIES[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown modality {name!r}; valid modalities: {sorted(MODALITIES)}"
        ) from None


def check_modalities(names: Sequence[str], what: str = "modalities") -> tuple[str, ...]:
    """Validate a list of modality names (each must be known, no duplicates)."""
    if isinstance(names, str):
        raise ValueError(f"{what} must be a list of modality names, got the string {names!r}")
    for n in names:
        get_modality(n)
    if len(set(names)) != len(names):
        raise ValueError(f"{what} has duplicates: {list(names)}")
    return tuple(names)


class TokenizationConfig:
    """Per-modality band groups; each group becomes one token per (h, w, t) position.

    Modalities without an override use their default bandsets. Group order and the order of
    bands inside a group are kept (that is the channel order the group's patch embedding sees);
    groups may overlap or leave bands out (exp 13 omits B01/B09), as in the reference.

    Args:
        overrides: modality name -> list of band-name groups. A value may also be a mapping
            `{"band_groups": [...]}` (the reference's serialised ModalityTokenization).

    Raises:
        ValueError: unknown modality or band (the message names it and lists the valid ones),
            or an empty group list / empty group.
    """

    def __init__(self, overrides: Mapping[str, Sequence[Sequence[str]]] | None = None):
        self.overrides: dict[str, tuple[tuple[str, ...], ...]] = {}
        for name, groups in (overrides or {}).items():
            spec = get_modality(name)
            if isinstance(groups, Mapping):
                groups = groups.get("band_groups")
            if groups is None or isinstance(groups, str) or len(groups) == 0:
                raise ValueError(
                    f"tokenization override for {name!r} must be a non-empty list of band "
                    f"groups, got {groups!r}"
                )
            clean = []
            for group in groups:
                if isinstance(group, str) or len(group) == 0:
                    raise ValueError(
                        f"tokenization override for {name!r}: each group must be a non-empty "
                        f"list of band names, got {group!r}"
                    )
                for band in group:
                    if band not in spec.band_order:
                        raise ValueError(
                            f"unknown band {band!r} for modality {name!r}; valid bands: "
                            f"{list(spec.band_order)}"
                        )
                clean.append(tuple(group))
            self.overrides[name] = tuple(clean)
        self._cache: dict[str, list[list[int]]] = {}

    def band_groups(self, modality: str) -> tuple[tuple[str, ...], ...]:
        """Band-name groups of a modality (override or default)."""
        spec = get_modality(modality)
        return self.overrides.get(modality, spec.bandsets)

    def bandset_indices(self, modality: str) -> list[list[int]]:
        """Band groups as indices into the modality's canonical band order."""
        if modality not in self._cache:
            spec = get_modality(modality)
            pos = {b: i for i, b in enumerate(spec.band_order)}
            self._cache[modality] = [[pos[b] for b in g] for g in self.band_groups(modality)]
        return [list(g) for g in self._cache[modality]]

    def num_bandsets(self, modality: str) -> int:
        return len(self.band_groups(modality))

    def bands_per_bandset(self, modality: str) -> list[int]:
        return [len(g) for g in self.band_groups(modality)]

    def to_dict(self) -> dict[str, list[list[str]]]:
        """Plain-JSON form accepted back by the constructor."""
        return {m: [list(g) for g in gs] for m, gs in self.overrides.items()}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TokenizationConfig) and self.overrides == other.overrides

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.overrides.items())))

    def __repr__(self) -> str:
        return f"TokenizationConfig({self.to_dict()!r})"


_S2 = MODALITIES["sentinel2_l2a"]
_LANDSAT = MODALITIES["landsat"]
# Named band groupings of the experiments (docs/reference_semantics.md §1.3).
TOKENIZATION_PRESETS: dict[str, dict[str, list[list[str]]]] = {
    # exps 9/10 (and the multi-bandset baseline): no override, S2 3 groups, Landsat 2
    "default": {},
    # exp 11: the defaults written out explicitly; equal to "default"
    "default_explicit": {
        "sentinel2_l2a": [list(g) for g in _S2.bandsets],
        "landsat": [list(g) for g in _LANDSAT.bandsets],
    },
    # exps 1/2/5/6/7/14-17: S2 one group of all 12, Landsat one group of all 11
    "single_bandset": {
        "sentinel2_l2a": [list(_S2.band_order)],
        "landsat": [list(_LANDSAT.band_order)],
    },
    # exps 3/13: S2 without the 60 m bands B01/B09 (loaded, never tokenised)
    "single_bandset_no60m": {
        "sentinel2_l2a": [list(_S2_10M + _S2_20M)],
        "landsat": [list(_LANDSAT.band_order)],
    },
    # exp 4: S2 10 m bands only
    "single_bandset_10m_only": {
        "sentinel2_l2a": [list(_S2_10M)],
        "landsat": [list(_LANDSAT.band_order)],
    },
    # exps 8/12: S2 10 m and 20 m groups (B01/B09 dropped), Landsat single
    "two_bandset": {
        "sentinel2_l2a": [list(_S2_10M), list(_S2_20M)],
        "landsat": [list(_LANDSAT.band_order)],
    },
}


def tokenization_preset(name: str) -> TokenizationConfig:
    """Build one of `TOKENIZATION_PRESETS` by name."""
    if name not in TOKENIZATION_PRESETS:
        raise ValueError(
            f"unknown tokenization preset {name!r}; valid presets: {sorted(TOKENIZATION_PRESETS)}"
        )
    return TokenizationConfig(TOKENIZATION_PRESETS[name])


def as_tokenization(tok: TokenizationConfig | Mapping | str | None) -> TokenizationConfig:
    """Coerce None (defaults), a preset name or an overrides mapping to a TokenizationConfig."""
    if tok is None:
        return TokenizationConfig()
    if isinstance(tok, TokenizationConfig):
        return tok
    if isinstance(tok, str):
        return tokenization_preset(tok)
    if isinstance(tok, Mapping):
        inner = tok.get("overrides", tok) if "overrides" in tok else tok
        return TokenizationConfig(inner)
    raise ValueError(
        f"tokenization must be None, a preset name, a mapping or a TokenizationConfig, "
        f"got {type(tok).__name__}"
    )
