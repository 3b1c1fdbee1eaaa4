"""Data pipeline throughput: read + crop + normalise + two-view masking of one rank batch.

ours: `OlmoEarthH5Dataset.get_item` (reads only the crop window) + `collate_views` (vectorised
masking, missingness shared by the views) + the microbatch plans the loader makes with each
batch (`model.plan.BatchPlanner`, exp14 at base: the step's host work, moved into the workers). ours_rechunked: the same on a copy of the files
made by `python -m olmoearth_fast.data.rechunk` (32-px chunks: a crop decompresses only the
chunks it touches, where the reference's one chunk per raster decompresses the whole tile).
ref: olmoearth_pretrain's `OlmoEarthDataset` items, stacked as its collator does, masked twice
with its strategy. Same files (synthetic 128-px reference-format tiles), same (patch size,
hw_p), single-bandset tokenization.
Samples/s = B / median time. The data pipeline runs on CPU workers in both, so the GPU size
only changes B.
"""

import numpy as np
import pytest
import torch

from olmoearth_fast.data.collate import collate_views
from olmoearth_fast.data.dataset import OlmoEarthH5Dataset
from olmoearth_fast.data.demo import make_demo_dataset
from olmoearth_fast.data.masking import build_masking
from olmoearth_fast.modalities import (
    ONLY_DECODE_MODALITIES,
    TOKENIZATION_PRESETS,
    TRAINING_MODALITIES,
)

ON_GPU = torch.cuda.is_available()
B = 64 if ON_GPU else 16
SHAPES = [(4, 6), (8, 12)] if ON_GPU else [(4, 6)]
STRATEGIES = {
    "modality_cross_random": {"allow_encoding_decoding_same_bandset": True},
    "random_with_decode": {},
}


@pytest.fixture(autouse=True)
def _one_thread():
    """Both pipelines run in DataLoader workers, where torch uses one intra-op thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _planner():
    """The exp14 base model's batch planner (microbatches of 32, or the whole batch)."""
    from olmoearth_fast import experiments
    from olmoearth_fast.config import apply_overrides
    from olmoearth_fast.trainer import build_model

    cfg = apply_overrides(experiments.get("exp14"), ["model.size=base_shallow_decoder"])
    return build_model(cfg, torch.device("cpu")).batch_planner(min(B, 32), cfg.loss.mask_negatives_for_modalities)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("bench_data"), num_samples=B, seed=0,
                             tile_size=128, real_every=0)


@pytest.fixture(scope="module")
def rechunked(files, tmp_path_factory):
    from olmoearth_fast.data.rechunk import rechunk_dataset

    out = tmp_path_factory.mktemp("bench_data_rechunked") / "data"
    rechunk_dataset(files, out)
    return out


@pytest.mark.parametrize("provider", ["ours", "ours_rechunked", "ref"])
@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("p,hw_p", SHAPES)
def test_bench_data(bench, files, rechunked, provider, strategy, p, hw_p):
    cfg = {"type": strategy, "encode_ratio": 0.5, "decode_ratio": 0.5,
           "only_decode_modalities": list(ONLY_DECODE_MODALITIES), **STRATEGIES[strategy]}
    idxs = list(range(B))
    if provider in ("ours", "ours_rechunked"):
        ds = OlmoEarthH5Dataset(rechunked if provider == "ours_rechunked" else files)
        masking = build_masking(cfg, "single_bandset")
        gen = torch.Generator().manual_seed(0)
        planner = _planner()

        def fn():
            rng = np.random.default_rng(0)
            samples = [ds.get_item(i, p, hw_p, 2250, rng) for i in idxs]
            batch = collate_views(samples, p, hw_p, masking, gen, num_views=2)
            batch.plans = planner(batch, 0)
            return batch
    else:
        pytest.importorskip("olmoearth_pretrain")
        from olmoearth_pretrain.datatypes import OlmoEarthSample
        from olmoearth_pretrain.nn.tokenization import ModalityTokenization, TokenizationConfig
        from olmoearth_pretrain.train.masking import MaskingConfig

        from tests.helpers.refcompat import import_reference_dataset, reference_dataset

        ref_mod = import_reference_dataset()
        ds = reference_dataset(files, TRAINING_MODALITIES)
        tok = TokenizationConfig(overrides={m: ModalityTokenization(band_groups=g) for m, g in
                                            TOKENIZATION_PRESETS["single_bandset"].items()})
        masking = MaskingConfig(strategy_config=cfg, tokenization_config=tok).build()

        def fn():
            np.random.seed(0)
            items = [ds[ref_mod.GetItemArgs(idx=i, patch_size=p, sampled_hw_p=hw_p,
                                            token_budget=2250)][1] for i in idxs]
            fields = items[0].modalities_with_timestamps  # collate_olmoearth_pretrain
            stacked = OlmoEarthSample(**{f: torch.stack([torch.from_numpy(getattr(s, f))
                                                         for s in items]) for f in fields})
            return masking.apply_mask(stacked, p), masking.apply_mask(stacked, p)

    median = bench(fn, group=f"data {strategy} B={B} p={p} hw_p={hw_p}", provider=provider,
                   warmup=1, B=B, patch_size=p, hw_p=hw_p, tile=128)
    print(f"{provider} {strategy} p={p} hw_p={hw_p}: {B / median:.1f} samples/s")
