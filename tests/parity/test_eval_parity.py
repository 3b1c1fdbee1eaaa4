"""Evaluation parity with the reference package (olmoearth-pretrain==0.1.2).

* kNN: on the same embeddings, our predictions and accuracy equal `evals.knn.run_knn`'s.
* Linear probe: same embeddings and torch seed -> the same valid/test accuracy as
  `evals.linear_probe.train_and_eval_probe` (classification).
* EuroSAT input: the reference's band mapping (`EVAL_TO_OLMOEARTH_S2_BANDS`) and pretraining
  `Normalizer` (or `normalize_bands` with GEO-Bench band stats) give our loader's arrays exactly.
* Embeddings: a reference encoder with our weights, run as its eval wrapper does (fast pass,
  or MISSING tokens left out, then `pool_unmasked_tokens(MEAN)`), gives our `embed_batch`.

`olmoearth_pretrain.evals.datasets/__init__` imports every eval dataset (geobench, rslearn,
rioxarray, ...), none of which the code under test uses, so the package is registered without
running that __init__ and its submodules load from their real files. The reference's
`eval_wrapper` module imports competitor models (cartopy, ...); its three-line OlmoEarth path
is replicated in `_ref_embed`.
"""

import importlib
import json
import os
import sys
import types

import numpy as np
import pytest
import torch

pytest.importorskip("olmoearth_pretrain")
pytest.importorskip("sklearn")
pytest.importorskip("pydantic")
pytest.importorskip("upath")

from olmoearth_fast.eval.datasets import GEOBENCH_BANDS, S2_BANDS, load_eurosat
from olmoearth_fast.eval.demo import synthetic_eurosat
from olmoearth_fast.eval.embeddings import embed_batch
from olmoearth_fast.eval.knn import knn_accuracy, knn_predict
from olmoearth_fast.eval.linprobe import evaluate_linear_probe
from tests.helpers.eurosat_fixtures import make_eurosat_fixture


def _reference_evals():
    import olmoearth_pretrain.evals as ev

    name = "olmoearth_pretrain.evals.datasets"
    if name not in sys.modules:
        pkg = types.ModuleType(name)
        pkg.__path__ = [os.path.join(os.path.dirname(ev.__file__), "datasets")]
        sys.modules[name] = pkg
    mods = {}
    for m in (
        "knn",
        "linear_probe",
        "datasets.configs",
        "datasets.constants",
        "datasets.normalize",
    ):
        mods[m] = importlib.import_module(f"olmoearth_pretrain.evals.{m}")
    return mods


REF = _reference_evals()


def _config(num_classes):
    cfg = REF["datasets.configs"]
    return cfg.EvalDatasetConfig(
        task_type=cfg.TaskType.CLASSIFICATION,
        imputes=[],
        num_classes=num_classes,
        is_multilabel=False,
        supported_modalities=["sentinel2_l2a"],
    )


def _clusters(n, d, c, noise, seed):
    """Noisy samples around c class centres (the same centres for every seed)."""
    centers = torch.randn(c, d, generator=torch.Generator().manual_seed(100))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g)
    return centers[y] + noise * torch.randn(n, d, generator=g), y


@pytest.fixture(scope="module")
def model_embeddings(tmp_path_factory):
    """Embeddings of the synthetic EuroSAT from a random-init nano encoder (10 classes)."""
    from olmoearth_fast.config import RunConfig
    from olmoearth_fast.eval.embeddings import embed_images
    from olmoearth_fast.trainer import build_model

    root = make_eurosat_fixture(
        tmp_path_factory.mktemp("eurosat"),
        "geobench",
        {"train": 10, "valid": 5, "test": 5},
        size=16,
    )
    cfg = RunConfig()
    cfg.model.size = "nano"
    model = build_model(cfg, torch.device("cpu")).eval()
    ds = load_eurosat(root)
    return {s: embed_images(model, ds.split(s).batches(64)) for s in ("train", "valid", "test")}


@pytest.mark.parametrize("source", ["model", "clusters"])
@pytest.mark.parametrize("k", [20, 5])
def test_knn_equals_reference(source, k, model_embeddings):
    if source == "model":
        (tr, ytr), (va, yva), (te, yte) = (model_embeddings[s] for s in ("train", "valid", "test"))
        c = 10
    else:
        tr, ytr = _clusters(300, 32, 7, 2.0, 0)
        va, yva = _clusters(120, 32, 7, 2.0, 1)
        te, yte = _clusters(90, 32, 7, 2.0, 2)
        c = 7
    ref = REF["knn"].run_knn(_config(c), tr, ytr, va, yva, te, yte, torch.device("cpu"), k=k)
    ours_val = knn_accuracy(tr, ytr, va, yva, c, k)
    ours_test = knn_accuracy(tr, ytr, te, yte, c, k)
    print(
        f"{source} k={k}: valid {ours_val:.4f} (ref {ref.val_result.primary:.4f}), "
        f"test {ours_test:.4f} (ref {ref.test_result.primary:.4f})"
    )
    assert ours_val == ref.val_result.primary
    assert ours_test == ref.test_result.primary
    ref_pred = REF["knn"]._run_knn_for_k(tr, ytr, va, c, k, torch.device("cpu"), skip_idx=False)
    assert torch.equal(knn_predict(tr, ytr, va, c, k), ref_pred)
    ref_votes = REF["knn"]._run_knn_for_k(
        tr, ytr, va, c, k, torch.device("cpu"), skip_idx=False, return_scores=True
    )
    torch.testing.assert_close(
        knn_predict(tr, ytr, va, c, k, return_votes=True), ref_votes, rtol=1e-6, atol=1e-7
    )


@pytest.mark.parametrize("source", ["model", "clusters"])
def test_linear_probe_equals_reference(source, model_embeddings):
    """bf16 autocast on CPU, as the reference always runs its probe."""
    if source == "model":
        tr, va, te = (model_embeddings[s] for s in ("train", "valid", "test"))
        c = 10
    else:
        tr, va, te = (_clusters(n, 32, 7, 2.0, seed) for n, seed in ((200, 0), (80, 1), (60, 2)))
        c = 7
    torch.manual_seed(7)
    ours = evaluate_linear_probe(tr, {"valid": va, "test": te}, c, [0.05], epochs=12, batch_size=16)
    torch.manual_seed(7)
    ref = REF["linear_probe"].train_and_eval_probe(
        _config(c), 0.05, *tr, *va, *te, torch.device("cpu"), batch_size=16, epochs=12
    )
    print(
        f"{source}: valid {ours['valid']:.4f} (ref {ref.val_result.primary:.4f}), "
        f"test {ours['test']:.4f} (ref {ref.test_result.primary:.4f})"
    )
    assert ours["valid"] == ref.val_result.primary
    assert ours["test"] == ref.test_result.primary


@pytest.mark.parametrize("norm", ["pretrain", "dataset"])
def test_eurosat_input_equals_reference(norm, tmp_path):
    from olmoearth_pretrain.data.constants import Modality
    from olmoearth_pretrain.data.normalize import Normalizer, Strategy

    root = make_eurosat_fixture(
        tmp_path, "geobench", {"train": 2, "valid": 1, "test": 1}, size=8, num_classes=3
    )
    ds = load_eurosat(root, norm=norm)
    raw, _ = synthetic_eurosat(4, 8, 3, 0)  # the fixture's pixels (same seed), GEO-Bench band order
    ours = next(ds.split("train").batches(100))[0]
    train_raw = raw[[0, 1, 4, 5, 8, 9]]  # the train split: first two of each class
    x = train_raw.astype(np.int16)  # GEO-Bench stores int16
    const = REF["datasets.constants"]
    if norm == "pretrain":
        s2 = x[..., None, :][..., const.EVAL_TO_OLMOEARTH_S2_BANDS]
        ref = Normalizer(Strategy.COMPUTED).normalize(Modality.SENTINEL2_L2A, s2)[..., 0, :]
    else:
        stats = json.loads((root / "band_stats.json").read_text())
        names = const.EVAL_S2_BAND_NAMES
        mean = np.array([stats[n]["mean"] for n in names])
        std = np.array([stats[n]["std"] for n in names])
        full = REF["datasets.normalize"].normalize_bands(x, mean, std, method="norm_no_clip_2_std")
        ref = full[..., const.EVAL_TO_OLMOEARTH_S2_BANDS]
    assert [
        GEOBENCH_BANDS[const.EVAL_S2_BAND_NAMES[i]] for i in const.EVAL_TO_OLMOEARTH_S2_BANDS
    ] == list(S2_BANDS)
    np.testing.assert_array_equal(ours, torch.tensor(ref).float().numpy())


def _ref_embed(ref_encoder, data, masks, timestamps, p, fast_pass):
    from olmoearth_pretrain.datatypes import MaskedOlmoEarthSample
    from olmoearth_pretrain.nn.pooling import PoolingType, pool_unmasked_tokens

    sample = MaskedOlmoEarthSample(
        timestamps=timestamps, **data, **{f"{m}_mask": masks[m] for m in data}
    )
    out = ref_encoder(sample, patch_size=p, fast_pass=fast_pass)["tokens_and_masks"]
    return pool_unmasked_tokens(out, PoolingType.MEAN, spatial_pooling=False)


@pytest.mark.parametrize("tok_name", ["single_bandset", "default"])
@pytest.mark.parametrize("case", ["eurosat", "h5_missing"])
def test_embeddings_equal_reference(tok_name, case):
    from olmoearth_pretrain.nn import flexi_vit
    from olmoearth_pretrain.nn.latent_mim import LatentMIMConfig
    from olmoearth_pretrain.nn.tokenization import ModalityTokenization
    from olmoearth_pretrain.nn.tokenization import TokenizationConfig as RefTokenization

    from olmoearth_fast.checkpoint import import_reference_state_dict
    from olmoearth_fast.modalities import MISSING_VALUE, MaskValue, tokenization_preset
    from olmoearth_fast.model.latent_mim import LatentMIM, ModelConfig

    mods = ("sentinel2_l2a", "sentinel1", "worldcover")
    tok = tokenization_preset(tok_name)
    ref_tok = RefTokenization(
        overrides={
            "sentinel2_l2a": ModalityTokenization(
                band_groups=[list(g) for g in tok.band_groups("sentinel2_l2a")]
            )
        }
    )
    torch.manual_seed(0)
    enc = flexi_vit.EncoderConfig(
        supported_modality_names=list(mods),
        embedding_size=64,
        num_heads=4,
        depth=2,
        mlp_ratio=2.0,
        drop_path=0.1,
        use_linear_patch_embed=False,
        tokenization_config=ref_tok,
    )
    dec = flexi_vit.PredictorConfig(
        supported_modality_names=list(mods),
        encoder_embedding_size=64,
        decoder_embedding_size=64,
        depth=1,
        num_heads=4,
        mlp_ratio=2.0,
        tokenization_config=ref_tok,
    )
    ref = LatentMIMConfig(encoder_config=enc, decoder_config=dec).build().eval()
    ours = LatentMIM(ModelConfig(dims=(64, 2, 4, 64, 1, 4, 2.0), modalities=mods), tok).eval()
    import_reference_state_dict(ours, ref.state_dict())

    g = torch.Generator().manual_seed(1)
    p, b = 4, 3
    if case == "eurosat":
        data = {"sentinel2_l2a": torch.rand(b, 16, 16, 1, 12, generator=g)}
        timestamps = torch.tensor([1, 6, 2020]).expand(b, 1, 3)
        masks = {
            "sentinel2_l2a": torch.zeros(
                b, 16, 16, 1, tok.num_bandsets("sentinel2_l2a"), dtype=torch.long
            )
        }
        fast_pass, missing = True, "online"
    else:
        data = {
            "sentinel2_l2a": torch.rand(b, 16, 16, 3, 12, generator=g),
            "sentinel1": torch.randn(b, 16, 16, 3, 2, generator=g),
            "worldcover": torch.rand(b, 16, 16, 1, 1, generator=g),
        }
        data["sentinel2_l2a"][0, :, :, 1] = MISSING_VALUE  # a missing month
        data["sentinel1"][1] = MISSING_VALUE  # a missing modality
        data["sentinel2_l2a"][2, :8, :8, 0, 10:] = MISSING_VALUE  # missing 60 m bands in one corner
        timestamps = torch.stack(
            [torch.ones(b, 3), torch.tensor([2.0, 3, 4]).expand(b, 3), torch.full((b, 3), 2021.0)],
            -1,
        ).long()
        masks = {}
        for m, x in data.items():
            groups = tok.bandset_indices(m) if m == "sentinel2_l2a" else [list(range(x.shape[-1]))]
            miss = torch.stack([(x[..., gi] == MISSING_VALUE).any(-1) for gi in groups], -1)
            masks[m] = torch.where(
                miss, int(MaskValue.MISSING), int(MaskValue.ONLINE_ENCODER)
            ).long()
        fast_pass, missing = False, "mask"
    with torch.no_grad():
        want = _ref_embed(ref.encoder, data, masks, timestamps, p, fast_pass)
        got = embed_batch(ours, data, timestamps, p, missing)
    err = ((got - want).abs().max() / want.abs().max()).item()
    print(f"{tok_name} {case}: max relative error {err:.2e}")
    assert err < 1e-4
