"""Did the demo learn? kNN accuracy of the random-initialised and of the trained encoder.

The labelled data are synthetic (`synthetic_eurosat`): Sentinel-2 scenes of 10 classes drawn
from the land-cover model of the demo pretraining data (`olmoearth_fast.data.demo`). A pixel's
12 L2A bands are ``mean + 0.5·std·(a·z + 0.3·t + 0.05·ε)`` per band (pretraining statistics),
with z the pixel's material level, a a per-scene random loading in [0.4, 0.8] per band, t a
smooth texture shared by the bands and ε noise. A class is a distribution of material levels,
laid out in smooth blobs (`CLASS_LEVELS`: homogeneous, two materials ±1 or ±2, three
materials, a skewed pair, ...). Every class has the same mean level 0, so the classes share
their mean spectrum and differ in how materials mix inside a scene: a random encoder, nearly
linear under mean pooling, sits near chance, and only per-token features learnt in pretraining
separate them. (On scenes told apart by their mean spectrum alone, e.g. one reflectance curve
per class, a random-init encoder is a strong kNN baseline that a briefly trained one does not
beat.) kNN as in evaluation (k 20, cosine, patch 4, mean pooling), train scenes as neighbours,
test scenes as queries.

The tests write the same scenes in the GEO-Bench and torchgeo EuroSAT layouts
(tests/helpers/eurosat_fixtures.py).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from olmoearth_fast.data.normalize import load_norm_stats, normalize
from olmoearth_fast.eval.datasets import GEOBENCH_BANDS, S2_BANDS

CLASSES = 10
TRAIN_PER_CLASS = 30
TEST_PER_CLASS = 20
SIZE = 16  # px: 4×4 tokens at patch 4, the demo's training crop
SEED = 1

# Sentinel-2 bands in wavelength order: the GEO-Bench file order and `synthetic_eurosat`'s arrays
WAVELENGTH_ORDER = tuple(GEOBENCH_BANDS.values())
# Material levels z and their area fractions per class; every class has mean level 0.
CLASS_LEVELS: tuple[tuple[tuple[float, ...], tuple[float, ...]], ...] = (
    ((0.0,), (1.0,)),
    ((-1.0, 1.0), (0.5, 0.5)),
    ((-2.0, 2.0), (0.5, 0.5)),
    ((-2.0, 0.0, 2.0), (1 / 3, 1 / 3, 1 / 3)),
    ((-2 / 3, 2.0), (0.75, 0.25)),
    ((2 / 3, -2.0), (0.75, 0.25)),
    ((-3.0, 3.0), (0.5, 0.5)),
    ((-1.0, 0.0, 1.0), (1 / 3, 1 / 3, 1 / 3)),
    ((-1.0, 3.0), (0.75, 0.25)),
    ((1.0, -3.0), (0.75, 0.25)),
)
_B10_DN = 15  # cirrus band: not a model input (dropped by both loaders), small DN like real B10


def _smooth_fields(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """[n, size, size] fields, zero mean and unit variance each, correlation length ~ size / 3."""
    cells = max(2, min(4, size // 2))
    low = torch.from_numpy(rng.standard_normal((n, 1, cells, cells)))
    field = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)[
        :, 0
    ].numpy()
    field -= field.mean(axis=(1, 2), keepdims=True)
    return field / (field.std(axis=(1, 2), keepdims=True) + 1e-6)


def synthetic_eurosat(
    num_per_class: int, size: int = 64, num_classes: int = 10, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``num_per_class`` scenes of each of the first ``num_classes`` classes (module docstring).

    Returns:
        (uint16 [N, size, size, 13] DN in `WAVELENGTH_ORDER`, int64 labels [N]), class-major.
    """
    if not 1 <= num_classes <= len(CLASS_LEVELS):
        raise ValueError(f"num_classes must be in [1, {len(CLASS_LEVELS)}], got {num_classes}")
    if num_per_class < 1 or size < 2:
        raise ValueError(f"num_per_class must be >= 1 and size >= 2, got {num_per_class}, {size}")
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), num_per_class)
    n = len(labels)
    layout, texture = _smooth_fields(rng, 2 * n, size).reshape(2, n, size, size)
    z = np.empty((n, size, size))
    for i, c in enumerate(labels):
        levels, fractions = CLASS_LEVELS[c]
        # material k covers the pixels whose layout value falls in the k-th quantile band
        cuts = np.quantile(layout[i], np.cumsum(fractions)[:-1])
        z[i] = np.asarray(levels)[np.searchsorted(cuts, layout[i])]
    stats = load_norm_stats("computed")["sentinel2_l2a"]
    mean = np.array([stats[b]["mean"] for b in S2_BANDS])
    std = np.array([stats[b]["std"] for b in S2_BANDS])
    loading = rng.uniform(0.4, 0.8, (n, 1, 1, len(S2_BANDS)))
    u = (
        loading * z[..., None]
        + 0.3 * texture[..., None]
        + 0.05 * rng.standard_normal((n, size, size, 12))
    )
    l2a = mean + 0.5 * std * u
    out = np.empty((n, size, size, 13))
    for j, b in enumerate(S2_BANDS):
        out[..., WAVELENGTH_ORDER.index(b)] = l2a[..., j]
    out[..., WAVELENGTH_ORDER.index("B10")] = _B10_DN + rng.integers(-3, 4, (n, size, size))
    return np.clip(np.rint(out), 1, 2**15 - 1).astype(np.uint16), labels.astype(np.int64)


def labelled_fixture(train_per_class: int = TRAIN_PER_CLASS, test_per_class: int = TEST_PER_CLASS,
                     size: int = SIZE, num_classes: int = CLASSES, seed: int = SEED):
    """((train images, labels), (test images, labels)): normalised float32 [N, size, size, 12]
    in the model's S2 L2A band order, int64 labels."""
    per_class = train_per_class + test_per_class
    images, labels = synthetic_eurosat(per_class, size, num_classes, seed)
    x = normalize("sentinel2_l2a", images[..., [WAVELENGTH_ORDER.index(b) for b in S2_BANDS]])
    train = np.arange(len(labels)) % per_class < train_per_class  # class-major: the first of each class
    return (x[train], labels[train]), (x[~train], labels[~train])


def knn_before_after(random_model, trained_model, batch_size: int = 100) -> dict:
    """kNN test accuracy of both encoders on `labelled_fixture`.

    Returns:
        {"random": acc, "trained": acc, "chance": 1/classes, "title": figure title,
         "line": "kNN accuracy: random init X -> trained Y (...)"}.
    """
    from olmoearth_fast.eval.embeddings import embed_images
    from olmoearth_fast.eval.knn import knn_accuracy

    (xa, ya), (xb, yb) = labelled_fixture()

    def batches(x, y):
        return ((x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(y), batch_size))

    acc = {}
    for name, model in (("random", random_model), ("trained", trained_model)):
        with torch.no_grad():
            train = embed_images(model, batches(xa, ya), precision="fp32")
            test = embed_images(model, batches(xb, yb), precision="fp32")
        acc[name] = knn_accuracy(*train, *test, CLASSES)
    what = f"synthetic labelled fixture, {CLASSES} classes, {len(yb)} test scenes"
    return {**acc, "chance": 1 / CLASSES, "title": f"kNN accuracy ({what})",
            "line": f"kNN accuracy: random init {acc['random']:.3f} -> trained {acc['trained']:.3f} "
                    f"({what}; chance {1 / CLASSES:.2f})"}
