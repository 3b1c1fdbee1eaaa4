"""The host-side plan of a microbatch (`LatentMIM.plan`, `olmoearth_fast/model/plan.py`): every
mask-dependent index of a step, made on the CPU before the copy to the device. On a GPU the
device waits for it at the start of every step, so its time is part of the step's.

Providers, interleaved (`bench.paired`): ``ours``, the plan as the trainer makes it;
``per_part``, the same plan with the `_ref` forms of its two largest parts (`EmbedRows.build_ref`:
one pass over the positions per (modality, bandset) part; `BranchDrop.from_keep_ref`: a torch op
per kept sample of each DropPath draw). The same masks, the same draws (the generator is
reseeded before each plan). Shape: exp14, base_shallow_decoder (12 encoder blocks, DropPath
0.1), microbatch 32, two views, p=4, hw_p=8 (the GPU benchmark's), one thread (the trainer's
host thread does this between launches).
"""

from __future__ import annotations

import pytest
import torch

from olmoearth_fast import experiments
from olmoearth_fast.config import apply_overrides
from olmoearth_fast.model import plan as plan_mod
from olmoearth_fast.trainer import build_loader, build_model

B = 32


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from olmoearth_fast.data.demo import DEMO_MODALITIES, ensure_demo_dataset

    root = tmp_path_factory.mktemp("bench_plan")
    ensure_demo_dataset(root / "data", num_samples=B, tile_size=64, modalities=DEMO_MODALITIES)
    cfg = apply_overrides(experiments.get("exp14"), [
        f"data.dataset={root / 'data'}", "data.num_workers=0", f"data.global_batch_size={B}",
        f"data.rank_microbatch_size={B}", "data.patch_sizes=[4]", "data.hw_p_list=[8]",
        "model.size=base_shallow_decoder", f"checkpoint.dir={root / 'ckpt'}", "logging.wandb=False"])
    model = build_model(cfg, torch.device("cpu")).train()
    batch = build_loader(cfg, 0, 1, str(root / "ckpt")).make_batch(1, 0)
    return cfg, model, batch


def test_bench_plan(bench, setup, monkeypatch):
    cfg, model, batch = setup
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def make(ref: bool):
        def fn():
            if ref:
                monkeypatch.setattr(plan_mod.EmbedRows, "build", plan_mod.EmbedRows.build_ref)
                monkeypatch.setattr(plan_mod.BranchDrop, "from_keep", plan_mod.BranchDrop.from_keep_ref)
            torch.manual_seed(0)
            try:
                return model.plan(batch.data, batch.masks, batch.patch_size, cfg.loss.mask_negatives_for_modalities)
            finally:
                monkeypatch.undo()
        return fn

    try:
        ours, ref = make(False)(), make(True)()
        assert torch.equal(ours.online.rows.order, ref.online.rows.order)
        assert all(torch.equal(a.rows, b.rows) for (a, _), (b, _) in zip(ours.drop_path, ref.drop_path)
                   if a.rows is not None)
        tokens = int(ours.online.index.shape[0] + ours.decoder.index.shape[0])
        bench.paired({"ours": make(False), "per_part": make(True)}, group=f"plan of a microbatch B={B}, two views, "
                     "p=4, hw_p=8, base (DropPath over 12 blocks)", rounds=30, B=B, packed_tokens=tokens)
    finally:
        torch.set_num_threads(threads)
