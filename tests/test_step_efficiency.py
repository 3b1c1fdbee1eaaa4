"""The efficient step: host-made packing plans, few host syncs, non-finite replay, compile."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from olmoearth_fast import experiments
from olmoearth_fast import trainer as trainer_mod
from olmoearth_fast.config import apply_overrides
from olmoearth_fast.data.demo import ensure_demo_dataset
from olmoearth_fast.trainer import Trainer, build_loader, build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from olmoearth_fast.data.demo import DEMO_MODALITIES

    root = tmp_path_factory.mktemp("demo") / "demo_data"
    ensure_demo_dataset(root, num_samples=16, tile_size=32, modalities=DEMO_MODALITIES)
    return str(root)


def _cfg(name, run_dir, dataset, *extra):
    cfg = experiments.demo(experiments.get(name))
    return apply_overrides(cfg, [f"checkpoint.dir={run_dir}", f"data.dataset={dataset}",
                                 "data.num_workers=0", "data.global_batch_size=4", "data.rank_microbatch_size=2",
                                 "data.patch_sizes=[2,4]", "data.hw_p_list=[2,3]", "logging.plot=False",
                                 "logging.wandb=False", "trainer.log_every=1000", *extra])


def _trainer(cfg, run_dir):
    loader = build_loader(cfg, 0, 1, str(run_dir))
    torch.manual_seed(0)
    model = build_model(cfg, torch.device("cpu"))
    return Trainer(cfg, loader, model, torch.device("cpu"), str(run_dir), log=lambda *a: None)


@pytest.mark.parametrize("name", ["exp14", "exp2", "exp10"])
def test_plan_packing_equals_device_packing(name, dataset, tmp_path):
    """The model given the host plan computes exactly what it computes packing on the device."""
    cfg = _cfg(name, tmp_path, dataset)
    tr = _trainer(cfg, tmp_path)
    model = tr.model.eval()  # no dropout draws: both passes see the same computation
    batch = tr.loader.make_batch(1, 0)
    plan = model.plan(batch.data, batch.masks, batch.patch_size, cfg.loss.mask_negatives_for_modalities)
    layout = model.layout(batch.data, batch.patch_size)
    masks = torch.cat([layout.token_masks(m) for m in batch.masks])
    assert torch.equal(plan.masks, masks)
    with torch.no_grad():
        a = model(batch.data, batch.timestamps, masks, layout, with_target=True)
        b = model(batch.data, batch.timestamps, plan.masks, plan.layout, with_target=True, plan=plan)
    for x, y in ((a.encoded, b.encoded), (a.decoded, b.decoded)):
        assert torch.equal(x.index, y.index)
        assert torch.equal(x.seg.cu_seqlens, y.seg.cu_seqlens) and x.seg.max_len == y.seg.max_len
        assert torch.equal(x.tokens, y.tokens)
    assert torch.equal(a.pooled, b.pooled) and torch.equal(a.target, b.target)
    # loss segments: (view, sample, modality) counts of DECODER tokens, in packed order
    counts = torch.diff(plan.loss.seg_offsets.long())
    assert counts.sum() == a.decoded.tokens.shape[0]


def test_nonfinite_microbatch_keeps_the_gradients_before_it(dataset, tmp_path, monkeypatch):
    """A NaN loss in microbatch 1 of 2: the step's update equals one where microbatch 1
    contributes nothing (the reference breaks before its backward), and the step is flagged."""
    cfg = _cfg("exp14", tmp_path, dataset, "trainer.max_steps=5")
    original = trainer_mod.microbatch_loss
    state = {"calls": 0, "scale": float("nan")}

    def poisoned(*args, **kwargs):
        loss, stats = original(*args, **kwargs)
        state["calls"] += 1
        if state["calls"] == 2:  # the first pass's second microbatch
            loss = loss * state["scale"]
            stats = torch.cat([stats[:1] * state["scale"], stats[1:]])
        return loss, stats

    monkeypatch.setattr(trainer_mod, "microbatch_loss", poisoned)
    runs = {}
    for name, scale in (("nan", float("nan")), ("zero", 0.0)):
        state.update(calls=0, scale=scale)
        tr = _trainer(cfg, tmp_path / name)
        batch = tr.loader.make_batch(1, 0)
        torch.manual_seed(123)
        stats, grad_norm = tr.train_step(batch)
        runs[name] = (stats, grad_norm, {k: v.clone() for k, v in tr.model.state_dict().items()},
                      torch.get_rng_state())
    nan_stats, zero_stats = runs["nan"][0], runs["zero"][0]
    assert nan_stats.nonfinite and not zero_stats.nonfinite
    assert state["calls"] == 2  # the zero run: no replay
    assert runs["nan"][1] == pytest.approx(runs["zero"][1], rel=1e-6)
    for k, v in runs["nan"][2].items():
        torch.testing.assert_close(v, runs["zero"][2][k], rtol=1e-6, atol=1e-7, msg=k)
    assert torch.equal(runs["nan"][3], runs["zero"][3])  # the RNG continues as after a normal step
    assert nan_stats.loss == pytest.approx(zero_stats.loss, rel=1e-6)  # microbatch 0's loss / 2


def test_step_line_reports_flops_and_peak(dataset, tmp_path):
    lines = []
    cfg = _cfg("exp14", tmp_path, dataset, "trainer.max_steps=2", "trainer.log_every=1", "checkpoint.save_every=100")
    tr = _trainer(cfg, tmp_path)
    tr.log = lines.append
    history = tr.fit()
    step_lines = [ln for ln in lines if ln.startswith("step ")]
    assert len(step_lines) == 2
    assert all(" TFLOP/s (" in ln and "% of peak)" in ln for ln in step_lines)
    for h in history:
        assert h["tflops"] > 0 and 0 < h["peak_fraction"] < 1.5 and h["work_ratio"] > 1
