"""Did the demo learn? kNN accuracy of the random-initialised and of the trained encoder.

The labelled data are synthetic (`olmoearth_fast.eval.fixtures.synthetic_eurosat`): Sentinel-2
scenes of 10 classes drawn from the land-cover model of the demo pretraining data. The classes
share their mean spectrum and differ in how materials mix inside a scene, so a random encoder,
nearly linear under mean pooling, sits near chance, and only per-token features learnt in
pretraining separate them. kNN as in evaluation (k 20, cosine, patch 4, mean pooling), train
scenes as neighbours, test scenes as queries.
"""

from __future__ import annotations

import numpy as np
import torch

CLASSES = 10
TRAIN_PER_CLASS = 30
TEST_PER_CLASS = 20
SIZE = 16  # px: 4×4 tokens at patch 4, the demo's training crop
SEED = 1


def labelled_fixture(train_per_class: int = TRAIN_PER_CLASS, test_per_class: int = TEST_PER_CLASS,
                     size: int = SIZE, num_classes: int = CLASSES, seed: int = SEED):
    """((train images, labels), (test images, labels)): normalised float32 [N, size, size, 12]
    in the model's S2 L2A band order, int64 labels."""
    from olmoearth_fast.data.normalize import normalize
    from olmoearth_fast.eval.datasets import S2_BANDS
    from olmoearth_fast.eval.fixtures import WAVELENGTH_ORDER, synthetic_eurosat

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
