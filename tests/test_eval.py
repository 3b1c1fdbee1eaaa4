"""Evaluation: EuroSAT layouts, kNN, linear probe, embedding export, CLI.

A demo model is trained once per module (exp14 demo recipe, nano, 60 steps of 8 samples on a
16-sample demo dataset, ~12 s on 2 CPU cores); the fixture is the synthetic EuroSAT of
`tests/helpers/eurosat_fixtures.py` (6 classes, 16 px), written in both layouts. Over 3 training
seeds x 2 fixture seeds the trained model beat the random-init one by 0.14-0.38 kNN accuracy
(random init: 0.18-0.25, chance 0.17).
"""

import json
import os
import pickle

import numpy as np
import pytest
import torch

from olmoearth_fast.data.normalize import normalize
from olmoearth_fast.eval import __main__ as cli
from olmoearth_fast.eval.datasets import (
    S2_BANDS,
    TORCHGEO_BASE_DIR,
    detect_layout,
    load_eurosat,
    safe_unpickle,
)
from olmoearth_fast.eval.embed import embed_h5_dataset, save_embeddings, select_samples
from olmoearth_fast.eval.embeddings import embed_batch, embed_images, load_model
from olmoearth_fast.eval.demo import WAVELENGTH_ORDER, synthetic_eurosat
from olmoearth_fast.eval.knn import evaluate_knn, knn_predict, knn_predict_ref
from olmoearth_fast.eval.linprobe import evaluate_linear_probe, probe_lr, train_linear_probe
from tests.helpers.eurosat_fixtures import (
    make_eurosat_fixture,
    split_assignment,
    write_geobench_eurosat,
    write_torchgeo_eurosat,
)

PER_CLASS = {"train": 20, "valid": 12, "test": 12}
NUM_CLASSES = 6
SIZE = 16


@pytest.fixture(scope="module")
def eurosat(tmp_path_factory):
    root = tmp_path_factory.mktemp("eurosat")
    return {
        layout: make_eurosat_fixture(root / layout, layout, PER_CLASS, SIZE, NUM_CLASSES, seed=0)
        for layout in ("geobench", "torchgeo")
    }


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """(checkpoint path, demo dataset path) of a briefly trained demo model."""
    from olmoearth_fast import experiments
    from olmoearth_fast.config import apply_overrides
    from olmoearth_fast.data.demo import ensure_demo_dataset
    from olmoearth_fast.trainer import Trainer, build_loader, build_model

    tmp = tmp_path_factory.mktemp("demo")
    data = ensure_demo_dataset(tmp / "demo_data", num_samples=16, tile_size=32)
    cfg = apply_overrides(
        experiments.demo(experiments.get("exp14")),
        [
            f"checkpoint.dir={tmp / 'run'}",
            f"data.dataset={data}",
            "data.num_workers=0",
            "data.global_batch_size=8",
            "data.rank_microbatch_size=8",
            "data.patch_sizes=[4]",
            "data.hw_p_list=[2,4]",
            "trainer.max_steps=60",
            "checkpoint.save_every=1000",
            "logging.plot=False",
        ],
    )
    loader = build_loader(cfg, 0, 1, str(tmp / "run"))
    model = build_model(cfg, torch.device("cpu"))
    Trainer(cfg, loader, model, torch.device("cpu"), str(tmp / "run"), log=lambda *a: None).fit()
    return str(tmp / "run"), str(data)


# ---------------------------------------------------------------------------------------------
# datasets


def test_layouts_read_the_same_pixels_and_labels(eurosat):
    gb, tg = load_eurosat(eurosat["geobench"]), load_eurosat(eurosat["torchgeo"])
    assert (gb.layout, tg.layout) == ("geobench", "torchgeo")
    assert gb.num_classes == tg.num_classes == NUM_CLASSES
    raw, labels = synthetic_eurosat(sum(PER_CLASS.values()), SIZE, NUM_CLASSES, seed=0)
    splits = np.array(split_assignment(labels, PER_CLASS))
    take = [WAVELENGTH_ORDER.index(b) for b in S2_BANDS]
    for s in ("train", "valid", "test"):
        ((xg, yg),) = gb.split(s).batches(1000)
        ((xt, yt),) = tg.split(s).batches(1000)
        want = normalize("sentinel2_l2a", raw[splits == s][..., take])
        np.testing.assert_array_equal(xg, want)
        np.testing.assert_array_equal(xt, want)
        np.testing.assert_array_equal(yg, labels[splits == s])
        np.testing.assert_array_equal(yt, labels[splits == s])
    assert load_eurosat(eurosat["geobench"]).split("val") is not None  # "val" alias


@pytest.mark.parametrize("layout", ["geobench", "torchgeo"])
def test_band_order_drops_b10(layout, tmp_path):
    """Each band holds its own code: the loaders must return exactly S2_BANDS, B10 dropped."""
    images = np.broadcast_to(100 * (1 + np.arange(13)), (1, 4, 4, 13)).astype(np.uint16)
    images = np.concatenate([images, images])
    writer = write_geobench_eurosat if layout == "geobench" else write_torchgeo_eurosat
    writer(tmp_path, images, np.array([0, 1]), ["train", "valid"], ("A", "B"))
    x, _ = load_eurosat(tmp_path, layout, splits=("train",)).split("train")[0]
    raw = np.array([100 * (1 + WAVELENGTH_ORDER.index(b)) for b in S2_BANDS], dtype=np.float64)
    np.testing.assert_array_equal(x[0, 0], normalize("sentinel2_l2a", raw))


def test_torchgeo_band_order_argument(tmp_path, eurosat):
    """An explicit (legacy, B8A 9th) band order reads the same files differently."""
    legacy = (
        "B01",
        "B02",
        "B03",
        "B04",
        "B05",
        "B06",
        "B07",
        "B08",
        "B8A",
        "B09",
        "B10",
        "B11",
        "B12",
    )
    a, _ = load_eurosat(eurosat["torchgeo"]).split("train")[0]
    b, _ = load_eurosat(eurosat["torchgeo"], torchgeo_band_order=legacy).split("train")[0]
    assert not np.array_equal(a, b)
    with pytest.raises(ValueError, match="13 bands"):
        load_eurosat(eurosat["torchgeo"], torchgeo_band_order=legacy[:12])


def test_wrong_path_or_layout_names_what_was_expected(tmp_path, eurosat):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_eurosat(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError) as e:
        load_eurosat(tmp_path / "empty")
    assert "_partition.json" in str(e.value) and "eurosat-train.txt" in str(e.value)
    with pytest.raises(FileNotFoundError, match="not in the torchgeo layout.*eurosat-val.txt"):
        load_eurosat(eurosat["geobench"], layout="torchgeo")
    with pytest.raises(FileNotFoundError, match="not in the geobench layout.*_partition.json"):
        load_eurosat(eurosat["torchgeo"], layout="geobench")
    with pytest.raises(ValueError, match="layout must be"):
        detect_layout(eurosat["torchgeo"], layout="tif")
    with pytest.raises(ValueError, match="band_stats.json"):
        load_eurosat(eurosat["torchgeo"], norm="dataset")
    with pytest.raises(FileNotFoundError, match="0.01x_train_partition.json"):
        load_eurosat(eurosat["geobench"], partition="0.01x_train")
    # a sample listed in the partition but missing on disk
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(eurosat["geobench"], broken)
    os.unlink(broken / "id_0.hdf5")
    with pytest.raises(FileNotFoundError, match="id_0.hdf5"):
        load_eurosat(broken)


def test_geobench_dataset_norm_uses_band_stats(eurosat):
    ds = load_eurosat(eurosat["geobench"], norm="dataset")
    ((x, _),) = ds.split("train").batches(1000)
    # band_stats.json are the fixture's own statistics: mean ± 2 std -> [0, 1] centres each band
    assert np.allclose(x.mean((0, 1, 2)), 0.5, atol=0.06)


def test_safe_unpickle_never_imports(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    rec = safe_unpickle(pickle.dumps({"label": 3, "x": Evil()}))
    assert rec["label"] == 3 and not marker.exists()


# ---------------------------------------------------------------------------------------------
# kNN and linear probe


@pytest.mark.parametrize("n_train,n_query,c,k", [(50, 17, 4, 20), (23, 5, 3, 1), (64, 40, 10, 23)])
def test_knn_matches_oracle(n_train, n_query, c, k):
    g = torch.Generator().manual_seed(n_train)
    centers = torch.randn(c, 16, generator=g)
    ytr = torch.randint(0, c, (n_train,), generator=g)
    yq = torch.randint(0, c, (n_query,), generator=g)
    tr = centers[ytr] + 0.8 * torch.randn(n_train, 16, generator=g)
    q = centers[yq] + 0.8 * torch.randn(n_query, 16, generator=g)
    want = knn_predict_ref(tr, ytr, q, c, k)
    for chunk in (1, 7, 4096):
        assert torch.equal(knn_predict(tr, ytr, q, c, k, chunk_size=chunk), want)
    votes = knn_predict(tr, ytr, q, c, k, return_votes=True)
    torch.testing.assert_close(votes.sum(1), torch.ones(n_query))
    assert torch.equal(votes.argmax(1), want)


def test_knn_errors():
    tr, y = torch.randn(10, 4), torch.arange(10) % 3
    with pytest.raises(ValueError, match="k must be in"):
        knn_predict(tr, y, tr, 3, k=11)
    with pytest.raises(ValueError, match="same D"):
        knn_predict(tr, y, torch.randn(2, 5), 3)
    with pytest.raises(ValueError, match=r"train_labels must be in \[0, 2\)"):
        knn_predict(tr, y, tr, 2, k=5)


def test_probe_lr_schedule():
    assert probe_lr(0.0, 0.1, 50) == 0.0
    assert probe_lr(2.5, 0.1, 50) == pytest.approx(0.05)  # warmup 5 epochs
    assert probe_lr(5.0, 0.1, 50) == pytest.approx(0.1)
    assert probe_lr(50.0, 0.1, 50) == pytest.approx(1e-5)
    assert probe_lr(0.0, 0.1, 5) == pytest.approx(0.1)  # no warmup under 10 epochs


def test_linear_probe_learns_and_is_seeded():
    g = torch.Generator().manual_seed(0)
    centers = 3 * torch.randn(4, 8, generator=g)
    y = torch.randint(0, 4, (200,), generator=g)
    x = centers[y] + torch.randn(200, 8, generator=g)
    train, val = (x[:150], y[:150]), {"valid": (x[150:], y[150:])}
    torch.manual_seed(3)
    a = evaluate_linear_probe(train, val, 4, [1e-3, 1e-1], epochs=8, autocast=False)
    torch.manual_seed(3)
    b = evaluate_linear_probe(train, val, 4, [1e-3, 1e-1], epochs=8, autocast=False)
    assert a == b
    assert a["valid"] > 0.8 and a["best_lr"] == 1e-1
    with pytest.raises(ValueError, match="emb must be"):
        train_linear_probe(x, y[:10], 4)


# ---------------------------------------------------------------------------------------------
# models: acceptance


@pytest.mark.parametrize("layout", ["geobench", "torchgeo"])
def test_trained_demo_model_beats_random_init(layout, demo, eurosat):
    ckpt, _ = demo
    ds = load_eurosat(eurosat[layout])
    scores = {}
    for name, random_init in (("random", True), ("trained", False)):
        model, _ = load_model(ckpt, "cpu", random_init=random_init)
        scores[name] = evaluate_knn(model, ds, eval_splits=("valid", "test"))
    print(layout, scores)
    chance = 1 / NUM_CLASSES
    for s in ("valid", "test"):
        trained, random = (
            scores["trained"][f"eval/knn/{s}_acc"],
            scores["random"][f"eval/knn/{s}_acc"],
        )
        assert trained > random + 0.1 and trained > chance + 0.15, (s, trained, random)


def test_evaluate_knn_restores_mode_and_subsets(demo, eurosat):
    model, _ = load_model(demo[0], "cpu")
    model.train()
    out = evaluate_knn(model, str(eurosat["torchgeo"]), eval_splits=("test",), max_samples=40, k=10)
    assert model.training and set(out) == {"eval/knn/test_acc", "eval/knn/seconds"}
    assert 0.0 <= out["eval/knn/test_acc"] <= 1.0


def test_export_directory_loads_the_same_model(demo, eurosat, tmp_path):
    from olmoearth_fast.checkpoint import export_reference

    model, cfg = load_model(demo[0], "cpu")
    export_reference(model, cfg, str(tmp_path / "export"))
    again, _ = load_model(tmp_path / "export", "cpu")
    batches = list(load_eurosat(eurosat["geobench"]).split("valid").subset(10).batches(5))
    a, _ = embed_images(model, batches)
    b, _ = embed_images(again, batches)
    assert torch.equal(a, b)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path, "cpu")


def test_saved_config_with_unknown_keys(demo, tmp_path):
    """A checkpoint from another version: unknown non-model keys are dropped, model keys are not."""
    from olmoearth_fast.checkpoint import load_checkpoint

    state = load_checkpoint(demo[0])
    cfg = json.loads(state["config"])
    cfg["trainer"]["removed_option"] = True
    torch.save({"model": state["model"], "config": json.dumps(cfg)}, tmp_path / "step_00000001.pt")
    with pytest.warns(UserWarning, match="trainer.removed_option"):
        load_model(tmp_path / "step_00000001.pt", "cpu")
    cfg["model"]["new_layer"] = 1
    torch.save({"model": state["model"], "config": json.dumps(cfg)}, tmp_path / "step_00000002.pt")
    with pytest.raises(KeyError, match="model.new_layer"):
        load_model(tmp_path / "step_00000002.pt", "cpu")


def test_embeddings_online_vs_missing_tokens(demo):
    """Without missing pixels the two token policies agree; with them only "mask" drops tokens."""
    model, _ = load_model(demo[0], "cpu")
    g = torch.Generator().manual_seed(0)
    data = {"sentinel2_l2a": torch.rand(2, 8, 8, 1, 12, generator=g)}
    ts = torch.tensor([1, 6, 2020]).expand(2, 1, 3)
    torch.testing.assert_close(
        embed_batch(model, data, ts, 4, "online"), embed_batch(model, data, ts, 4, "mask")
    )
    data["sentinel2_l2a"][0, :4, :4] = -99999
    a, b = embed_batch(model, data, ts, 4, "online"), embed_batch(model, data, ts, 4, "mask")
    assert not torch.allclose(a[0], b[0])
    with pytest.raises(ValueError, match="missing must be"):
        embed_batch(model, data, ts, 4, "drop")


# ---------------------------------------------------------------------------------------------
# H5 embedding export and the CLI


def test_embed_h5_dataset(demo, tmp_path):
    ckpt, data = demo
    model, _ = load_model(ckpt, "cpu")
    emb, index = embed_h5_dataset(model, data, hw_p=4, batch_size=5, max_samples=7, seed=1)
    assert emb.shape == (7, 128) and torch.isfinite(emb).all()
    assert sorted(index.tolist()) == sorted(select_samples(16, 7, 1))  # the demo keeps all 16
    full, idx_full = embed_h5_dataset(
        model, data, hw_p=None, batch_size=1, modalities=["sentinel2_l2a"]
    )
    assert full.shape == (16, 128) and idx_full.tolist() == list(range(16))
    files = save_embeddings(tmp_path / "e.npy", emb, index)
    np.testing.assert_array_equal(np.load(files[0]), emb.numpy())
    np.testing.assert_array_equal(np.load(tmp_path / "e_index.npy"), index)
    with pytest.raises(ValueError, match="not inputs of the model"):
        embed_h5_dataset(model, data, modalities=["era5_10"])
    with pytest.raises(ValueError, match=".npy or .parquet"):
        save_embeddings(tmp_path / "e.csv", emb, index)
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pyarrow"):
            save_embeddings(tmp_path / "e.parquet", emb, index)
    else:
        import pandas as pd

        save_embeddings(tmp_path / "e.parquet", emb, index)
        df = pd.read_parquet(tmp_path / "e.parquet")
        np.testing.assert_array_equal(np.stack(df["embedding"]), emb.numpy())


def test_cli_knn_linprobe_embed(demo, eurosat, tmp_path, capsys):
    ckpt, data = demo
    out = tmp_path / "knn.json"
    cli.main(
        ["knn", "--checkpoint", ckpt, "--dataset", str(eurosat["torchgeo"]), "--json", str(out)]
    )
    res = json.loads(out.read_text())
    assert res["layout"] == "torchgeo" and res["num_samples"] == {
        s: n * NUM_CLASSES for s, n in PER_CLASS.items()
    }
    assert 0 <= res["valid_acc"] <= 1 and res["k"] == 20
    # the CLI and the library agree
    model, _ = load_model(ckpt, "cpu")
    assert (
        res["test_acc"]
        == evaluate_knn(model, load_eurosat(eurosat["torchgeo"]), eval_splits=("test",))[
            "eval/knn/test_acc"
        ]
    )
    cli.main(
        [
            "linprobe",
            "--checkpoint",
            ckpt,
            "--dataset",
            str(eurosat["geobench"]),
            "--lr",
            "0.01,0.1",
            "--epochs",
            "5",
            "--max-samples",
            "30",
            "--json",
            str(out),
        ]
    )
    res = json.loads(out.read_text())
    assert res["best_lr"] in (0.01, 0.1) and set(res["per_lr"]) == {"0.01", "0.1"}
    cli.main(
        [
            "embed",
            "--checkpoint",
            ckpt,
            "--dataset",
            data,
            "--out",
            str(tmp_path / "x.npy"),
            "--max-samples",
            "4",
            "--hw-p",
            "0",
        ]
    )
    assert np.load(tmp_path / "x.npy").shape == (4, 128)
    capsys.readouterr()
    with pytest.raises(SystemExit, match="eurosat-train.txt"):
        cli.main(["knn", "--checkpoint", ckpt, "--dataset", str(tmp_path)])
    with pytest.raises(SystemExit, match="checkpoint not found"):
        cli.main(
            [
                "knn",
                "--checkpoint",
                str(tmp_path / "none.pt"),
                "--dataset",
                str(eurosat["torchgeo"]),
            ]
        )


def test_fixture_layout_files(eurosat):
    gb = eurosat["geobench"]
    assert {"default_partition.json", "band_stats.json", "task_specs.pkl", "id_0.hdf5"} <= set(
        os.listdir(gb)
    )
    specs = safe_unpickle((gb / "task_specs.pkl").read_bytes())
    assert (type(specs).__module__, type(specs).__name__) == ("geobench.task", "TaskSpecifications")
    assert specs.label_type.n_classes == NUM_CLASSES
    tg = eurosat["torchgeo"]
    assert (tg / TORCHGEO_BASE_DIR / "AnnualCrop" / "AnnualCrop_1.tif").is_file()
    assert (tg / "eurosat-val.txt").read_text().splitlines()[0].endswith(".jpg")


def test_periodic_knn_during_training(demo, eurosat, tmp_path):
    from olmoearth_fast import experiments
    from olmoearth_fast.config import apply_overrides
    from olmoearth_fast.trainer import Trainer, build_loader, build_model

    _, data = demo
    run = tmp_path / "run"
    cfg = apply_overrides(experiments.demo(experiments.get("exp14")), [
        f"checkpoint.dir={run}", f"data.dataset={data}", "data.num_workers=0", "data.global_batch_size=4",
        "data.rank_microbatch_size=4", "trainer.max_steps=4", "logging.plot=False",
        f"eval.knn_dataset={eurosat['geobench']}", "eval.every=2", "eval.max_samples=30", "eval.batch_size=16"])
    tr = Trainer(cfg, build_loader(cfg, 0, 1, str(run)), build_model(cfg, torch.device("cpu")),
                 torch.device("cpu"), str(run), log=lambda *a: None)
    history = tr.fit()
    evaluated = [h["step"] for h in history if "eval/knn/valid_acc" in h]
    assert evaluated == [2, 4] and all(0 <= h["eval/knn/valid_acc"] <= 1 for h in history if h["step"] in evaluated)
    assert tr.model.training  # train mode restored
    bad = apply_overrides(cfg, [f"eval.knn_dataset={tmp_path / 'missing'}"])
    with pytest.raises((FileNotFoundError, ValueError)):
        Trainer(bad, tr.loader, tr.model, torch.device("cpu"), str(run), log=lambda *a: None)
