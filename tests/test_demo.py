"""The demo ends by showing that the model learned: one kNN line (random init -> trained) on the
synthetic labelled fixture, also drawn on the figure, whose loss panels show the trend."""

import re

import matplotlib.image as mpimg
import numpy as np
import pytest

from olmoearth_fast.data.demo import ensure_demo_dataset
from olmoearth_fast.eval.demo import labelled_fixture
from olmoearth_fast.train import main
from olmoearth_fast.trainer import plot_history


def test_labelled_fixture_is_balanced_and_normalised():
    (xa, ya), (xb, yb) = labelled_fixture(train_per_class=3, test_per_class=2, size=8, num_classes=4)
    assert xa.shape == (12, 8, 8, 12) and xb.shape == (8, 8, 8, 12) and xa.dtype == np.float32
    assert np.bincount(ya).tolist() == [3] * 4 and np.bincount(yb).tolist() == [2] * 4
    assert -1 < float(xa.mean()) < 2  # pretraining normalisation maps mean ± 2 std to [0, 1]


def test_demo_prints_and_draws_the_knn_line(tmp_path, capsys):
    data = ensure_demo_dataset(tmp_path / "demo_data", num_samples=32, tile_size=32)
    main(["--demo", f"data.dataset={data}", f"checkpoint.dir={tmp_path / 'run'}", "data.num_workers=0",
          "data.global_batch_size=8", "data.rank_microbatch_size=8", "trainer.max_steps=40",
          "trainer.log_every=1000", "checkpoint.save_every=1000"])
    lines = capsys.readouterr().out.strip().splitlines()
    last = re.fullmatch(r"kNN accuracy: random init ([\d.]+) -> trained ([\d.]+) \(synthetic labelled fixture.*",
                        lines[-1])
    assert last, lines[-1]
    random, trained = float(last[1]), float(last[2])
    assert trained > random + 0.1, lines[-1]
    assert lines[-2] == f"loss curve and kNN accuracy: {tmp_path / 'run' / 'loss_curve.png'}"
    height, width, _ = mpimg.imread(tmp_path / "run" / "loss_curve.png").shape
    assert width == 1500  # three panels: loss, InfoNCE, kNN


@pytest.mark.parametrize("steps", [1, 7, 300])
def test_loss_panel_draws_raw_and_smoothed_curves(tmp_path, steps):
    rng = np.random.default_rng(0)
    history = [{"step": s, "loss": 4.3 - 0.1 * s / steps + 0.05 * rng.standard_normal(),
                "patch_disc": 4.1 - 0.1 * s / steps, "infonce": 0.2 - 0.1 * s / steps} for s in range(1, steps + 1)]
    path = plot_history(history, str(tmp_path))
    assert mpimg.imread(path).shape[1] == 1000  # two panels without the kNN result
