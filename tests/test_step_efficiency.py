"""The efficient step: host-made packing plans, few host syncs, non-finite replay, compile."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from olmoearth_fast import experiments
from olmoearth_fast import trainer as trainer_mod
from olmoearth_fast.ops import linear as linear_op
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


def _trainer(cfg, run_dir, device=torch.device("cpu")):
    loader = build_loader(cfg, 0, 1, str(run_dir))
    torch.manual_seed(0)
    model = build_model(cfg, device)
    return Trainer(cfg, loader, model, device, str(run_dir), log=lambda *a: None)


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


@pytest.mark.parametrize("name", ["exp14", "exp2", "exp10"])
def test_embed_rows_equal_the_per_part_form(name, dataset, tmp_path):
    """`EmbedRows.build` (one sort) equals `build_ref` (a pass per part): parts, order, dtypes."""
    from olmoearth_fast.model.plan import EmbedRows
    from olmoearth_fast.ops.packing import varlen_index

    from olmoearth_fast.modalities import MaskValue

    cfg = _cfg(name, tmp_path, dataset)
    tr = _trainer(cfg, tmp_path)
    for step in range(2):
        batch = tr.loader.make_batch(1, step)
        layout = tr.model.layout(batch.data, batch.patch_size)
        masks = torch.cat([layout.token_masks(m) for m in batch.masks])
        for keep in (masks == MaskValue.ONLINE_ENCODER, masks == MaskValue.DECODER, masks != MaskValue.MISSING,
                     torch.zeros_like(masks, dtype=torch.bool)):
            index = varlen_index(keep)[0]
            got, want = EmbedRows.build(layout, index, layout.batch), EmbedRows.build_ref(layout, index, layout.batch)
            assert list(got.parts) == list(want.parts)
            for k, (rows, view) in want.parts.items():
                assert torch.equal(got.parts[k][0], rows) and got.parts[k][0].dtype == rows.dtype, k
                assert torch.equal(got.parts[k][1], view) and got.parts[k][1].dtype == view.dtype, k
            assert torch.equal(got.order, want.order) and got.order.dtype == want.order.dtype


def test_branch_drop_equals_the_per_sample_form():
    """`BranchDrop.from_keep` (numpy) equals `from_keep_ref`, empty samples and all/none kept too."""
    from olmoearth_fast.model.attention import Segments
    from olmoearth_fast.model.plan import BranchDrop

    gen = torch.Generator().manual_seed(0)
    for trial in range(40):
        b = 1 + trial % 9
        lengths = torch.randint(0, 7, (b,), generator=gen)
        if trial % 5 == 0:
            lengths[0] = 0
        cu = torch.zeros(b + 1, dtype=torch.int32)
        cu[1:] = lengths.cumsum(0)
        seg = Segments.from_cu_seqlens(cu, int(cu[-1]), int(lengths.max()))
        seg._host = cu.tolist()
        keep = torch.rand(b, generator=gen) < (0.0, 0.5, 0.9, 1.0)[trial % 4]
        got, want = BranchDrop.from_keep(seg, keep, 0.1), BranchDrop.from_keep_ref(seg, keep, 0.1)
        assert torch.equal(got.keep, want.keep) and got.rate == want.rate
        assert (got.rows is None) == (want.rows is None) and (got.seg is None) == (want.seg is None)
        if want.rows is not None:
            assert torch.equal(got.rows, want.rows) and got.rows.dtype == want.rows.dtype
            for f in ("cu_seqlens", "sample_ids"):
                x, y = getattr(got.seg, f), getattr(want.seg, f)
                assert torch.equal(x, y) and x.dtype == y.dtype, f
            assert got.seg.max_len == want.seg.max_len and got.seg.host() == want.seg.host()


def test_loader_plans_are_the_models(dataset, tmp_path):
    """The plans a loader batch brings equal `LatentMIM.plan` in training mode with the batch's
    DropPath generator, per microbatch; they travel with the batch (`to`, `microbatches`)."""
    import numpy as np

    cfg = _cfg("exp14", tmp_path, dataset, "model.drop_path=0.3")
    tr = _trainer(cfg, tmp_path)
    batch = tr.loader.make_batch(1, 1)
    gen = torch.Generator().manual_seed(int(tr.loader.batch_seed(1, 1).generate_state(2, np.uint64)[1] >> 1))
    tr.model.train()
    mbs = batch.to("cpu").microbatches(cfg.data.rank_microbatch_size)
    assert len(mbs) == len(batch.plans) == 2
    drawn = 0
    for mb in mbs:
        got = mb.plans[0]
        want = tr.model.plan(mb.data, mb.masks, mb.patch_size, cfg.loss.mask_negatives_for_modalities, gen)
        assert torch.equal(got.masks, want.masks) and got.layout == want.layout
        for a, b in ((got.online, want.online), (got.decoder, want.decoder)):
            assert torch.equal(a.index, b.index) and torch.equal(a.rows.order, b.rows.order)
        assert all(torch.equal(x, y) for x, y in zip(got.loss, want.loss))
        for (a1, m1), (a2, m2) in zip(got.drop_path, want.drop_path):
            assert torch.equal(a1.keep, a2.keep) and torch.equal(m1.keep, m2.keep)
            drawn += int((~a1.keep).sum() + (~m1.keep).sum())
    assert drawn > 0  # some branches dropped: the draws were compared
    (dev_mb, dev_plan), host_plan = tr._stage(mbs[0])
    assert host_plan is mbs[0].plans[0] and dev_mb.plans is None  # the plan is copied once, on its own
    with pytest.raises(ValueError, match="holds 2 microbatch plans, not one per microbatch of 1"):
        batch.microbatches(1)


def test_each_microbatch_is_planned_after_the_one_before_is_launched(dataset, tmp_path, monkeypatch):
    """The loader's batches bring their plans: the step makes none. A batch without them: the
    host plans microbatch i+1 while the device runs microbatch i (plan and forward alternate
    instead of every plan coming first)."""
    tr = _trainer(_cfg("exp14", tmp_path, dataset), tmp_path)  # 2 microbatches per step
    events = []
    plan, loss = tr.model.plan, trainer_mod.microbatch_loss

    def recorded(name, fn):
        def wrapped(*a, **k):
            events.append(name)
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(tr.model, "plan", recorded("plan", plan))
    monkeypatch.setattr(trainer_mod, "microbatch_loss", recorded("forward", loss))
    batch = tr.loader.make_batch(1, 0)
    assert len(batch.plans) == 2
    tr.train_step(batch)
    assert events == ["forward", "forward"]
    events.clear()
    batch.plans = None
    tr.train_step(batch)
    assert events == ["plan", "forward", "plan", "forward"]


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


def test_step_trains_a_model_left_in_eval_mode(dataset, tmp_path):
    """`train_step` skips `model.train()` when the model is already training (its walk over every
    module is host time), and still switches back a model an evaluation left in eval mode: every
    module trains again except the frozen target projection."""
    tr = _trainer(_cfg("exp14", tmp_path, dataset, "trainer.max_steps=2"), tmp_path)
    batch = tr.loader.make_batch(1, 0)
    tr.model.eval()
    tr.train_step(batch)
    target = set(tr.model.target_patch_embeddings.modules())
    assert all(m.training for m in tr.model.modules() if m not in target)
    assert not any(m.training for m in target)
    calls = []
    tr.model.train = lambda mode=True: calls.append(mode)
    tr.train_step(tr.loader.make_batch(1, 1))
    assert calls == []


# --------------------------------------------------------------------------------------------
# Host synchronisations. On CUDA every read of a device value (`.item()`, `float()`, `bool()`,
# `.tolist()`), every op whose output size depends on the data (`nonzero`, boolean indexing,
# `repeat_interleave` without `output_size`, the packing ops' index building) and every copy
# from pageable host memory stalls the CPU until the device catches up. On CPU they cost nothing,
# so the test counts the calls that would be syncs: aten ops through a dispatch mode, `tolist`
# and `numpy` by patching, in the device phase of a step (the host plan and the work model run
# on host tensors before/while the device works and are excluded), with the GPU code paths
# forced: the Triton kernels (under the interpreter, whose own numpy conversions are not
# counted) and host-planned packing.

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

aten = torch.ops.aten
_SYNC_OPS = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten.unique_consecutive,
             aten._unique2, aten.unique_dim}


def _outside_torch_caller() -> str:
    """File of the innermost frame that is not torch's, this test's, or the stdlib's."""
    f = sys._getframe(2)
    while f is not None:
        name = f.f_code.co_filename
        if "/torch/" not in name and name != __file__ and "/lib/python3" not in name.split("site-packages")[0][-20:]:
            return name
        f = f.f_back
    return ""


class SyncCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.events: list[str] = []
        self.paused = False

    def _hit(self, what: str) -> None:
        caller = _outside_torch_caller()
        if not self.paused and "/triton/" not in caller:
            self.events.append(f"{what} from {os.path.relpath(caller, ROOT) if caller else '?'}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet in _SYNC_OPS:
            self._hit(str(func))
        elif packet is aten.repeat_interleave and func is aten.repeat_interleave.Tensor and \
                kwargs.get("output_size") is None:
            self._hit(str(func))
        elif packet in (aten.index, aten.index_put, aten.index_put_) and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ())):
            self._hit(f"{func} with a boolean mask")
        elif str(packet).startswith("olmoearth_fast.") and packet.__name__ in ("varlen_index", "merge_index"):
            self._hit(str(func))
        return func(*args, **kwargs)


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("name", ["exp14"])
def test_at_most_two_host_syncs_per_step(name, autocast, dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("OLMOEARTH_FAST_KERNELS", "triton")
    # 2 microbatches per step; fused AdamW, the default (foreach AdamW reads its step counters on
    # CPU, where they are host tensors)
    cfg = _cfg(name, tmp_path, dataset, "data.patch_sizes=[2]", "data.hw_p_list=[2]")  # small: the interpreter
    tr = _trainer(cfg, tmp_path)
    tr.autocast = autocast  # also the GPU recipe's bf16 autocast (CPU autocast here)
    batches = [tr.loader.make_batch(1, i) for i in range(2)]
    tr.train_step(batches.pop())  # warm-up: one-time argument checks of the ops
    counter = SyncCounter()
    for method in ("tolist", "numpy"):
        original = getattr(torch.Tensor, method)

        def patched(self, *a, _original=original, _method=method, **k):
            counter._hit(f"Tensor.{_method}")
            return _original(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, method, patched)

    def host_phase(fn):
        def wrapped(*a, **k):
            counter.paused = True
            try:
                return fn(*a, **k)
            finally:
                counter.paused = False
        return wrapped

    monkeypatch.setattr(tr, "_stage", host_phase(tr._stage))
    monkeypatch.setattr(trainer_mod.perf, "plan_work", host_phase(trainer_mod.perf.plan_work))
    with counter:
        for b in batches:
            tr.train_step(b)
    assert len(counter.events) <= 2 * len(batches), "\n".join(counter.events)
    assert len(counter.events) >= len(batches)  # the statistics are read once per step: the counter sees it


@pytest.mark.gpu
def test_at_most_two_cuda_syncs_per_step(dataset, tmp_path):
    """The same bound on CUDA, counted by CUDA itself: torch's sync debug mode warns at every
    operation that makes the host wait for the device (a D2H copy, .item(), a stream sync), with
    the Python line that caused it; an event's wait (`trainer.read_later`), which it does not
    see, is counted by patching. Crops and masks change from step to step."""
    import warnings

    event_waits = []
    original_wait = torch.cuda.Event.synchronize

    def counted_wait(self):
        event_waits.append("torch.cuda.Event.synchronize")
        return original_wait(self)

    # 2 microbatches per step
    tr = _trainer(_cfg("exp14", tmp_path, dataset), tmp_path, torch.device("cuda"))
    batches = [tr.loader.make_batch(1, i) for i in range(len(tr.loader))]  # an epoch: 4 steps
    tr.train_step(batches[0])  # warm-up: kernel compilation, cuBLAS handles, allocator growth
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        torch.cuda.Event.synchronize = counted_wait
        try:
            for b in batches[1:]:
                tr.train_step(b)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            torch.cuda.Event.synchronize = original_wait
    syncs = [f"{w.filename}:{w.lineno}" for w in caught if "synchronizing" in str(w.message)] + event_waits
    steps = len(batches) - 1
    assert len(syncs) <= 2 * steps, "\n".join(syncs)
    assert len(syncs) >= steps  # the statistics are read once per step: the counter sees it
    assert len(event_waits) == steps  # the gradient norm, once a step


def test_read_later_reads_the_value_on_cpu():
    t = torch.tensor(2.5)
    read = trainer_mod.read_later(t)
    t.add_(1.0)  # the value as it was at the call, as on CUDA
    assert read() == 2.5


@pytest.mark.gpu
def test_read_later_does_not_wait_for_kernels_launched_after_it():
    """The gradient norm's read waits for the clipping, not for the optimizer's kernels behind it:
    a second of matmuls launched after `read_later` are still running when it returns."""
    t = torch.full((), 7.0, device="cuda")
    a = torch.randn(8192, 8192, device="cuda")
    torch.cuda.synchronize()
    read = trainer_mod.read_later(t * 2)
    t.fill_(-1.0)
    for _ in range(30):  # ~33 TFLOP of fp32: far more than the read takes
        a = a @ a / 8192 ** 0.5
    assert read() == 14.0
    busy = not torch.cuda.current_stream().query()
    torch.cuda.synchronize()
    assert busy


# --------------------------------------------------------------------------------------------
# torch.compile of the blocks (trainer.compile=true)


def test_compiled_blocks_recompile_a_bounded_number_of_times(dataset, tmp_path):
    """50 exp14 steps whose crops vary (patch sizes, crop sizes, token counts, masks): after the
    first step's graphs, at most a few more are built, and each is logged."""
    import torch._dynamo

    torch._dynamo.reset()
    lines = []
    cfg = _cfg("exp14", tmp_path, dataset, "trainer.compile=true", "trainer.max_steps=50",
               "data.patch_sizes=[1,2,4,8]", "data.hw_p_list=[1,2,3,4]", "checkpoint.save_every=1000")
    tr = _trainer(cfg, tmp_path)
    tr.log = lines.append
    shapes = set()
    first = None
    for step in range(50):
        batch = tr.loader.make_batch(1 + step // len(tr.loader), step % len(tr.loader))
        shapes.add((batch.patch_size, batch.hw_p))
        tr.train_step(batch)
        if first is None:
            first = trainer_mod._compiled_graphs()
    later = trainer_mod._compiled_graphs() - first
    assert len(shapes) >= 6  # the sampler did vary the crops
    assert first > 0 and later <= 6, f"{later} graphs built after the first step"
    history = tr.fit()  # the loop logs new graphs; nothing more to build here
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history)


def test_compiled_step_equals_eager_and_resume_is_exact(dataset, tmp_path):
    """Compiled blocks compute the eager step (fp32: to rounding), and a compiled run resumed
    from its checkpoint continues exactly as the straight run."""
    common = ("trainer.max_steps=6", "checkpoint.save_every=3", "checkpoint.keep_last=5")
    eager = _trainer(_cfg("exp14", tmp_path / "e", dataset, *common, "trainer.compile=false"), tmp_path / "e")
    comp = _trainer(_cfg("exp14", tmp_path / "c", dataset, *common, "trainer.compile=true"), tmp_path / "c")
    batch = eager.loader.make_batch(1, 0)
    # eval-mode forward: no dropout draws, so both see the same computation
    for tr in (eager, comp):
        tr.model.eval()
    with torch.no_grad():
        outs = []
        for tr in (eager, comp):
            plan = tr.model.plan(batch.data, batch.masks, batch.patch_size, None)
            outs.append(tr.model(batch.data, batch.timestamps, plan.masks, plan.layout, plan=plan))
    torch.testing.assert_close(outs[1].decoded.tokens, outs[0].decoded.tokens, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outs[1].pooled, outs[0].pooled, rtol=1e-4, atol=1e-5)

    straight = comp.fit()
    resumed_dir = tmp_path / "r"
    first = _trainer(_cfg("exp14", resumed_dir, dataset, *common, "trainer.compile=true",
                          "trainer.max_steps=3"), resumed_dir)
    first.fit()
    second = _trainer(_cfg("exp14", resumed_dir, dataset, *common, "trainer.compile=true",
                           "checkpoint.resume=true"), resumed_dir)
    from olmoearth_fast import checkpoint as ckpt

    second.load_state_dict(ckpt.load_checkpoint(str(resumed_dir)))
    assert second.step == 3
    resumed = second.fit()  # the history travels in the checkpoint
    assert [h["loss"] for h in resumed] == [h["loss"] for h in straight]
    for k, v in comp.model.state_dict().items():
        assert torch.equal(v, second.model.state_dict()[k]), k


@pytest.mark.skipif(not linear_op.kernel_available(), reason="PyTorch built without oneDNN's CPU inner product")
def test_step_on_either_linear_library_is_the_same(dataset, tmp_path, monkeypatch):
    """A training step with the Linear layers on oneDNN (AMD CPUs' default) and on MKL (the
    others'): same loss, gradient norm and parameters after the step, to fp32 rounding, so both
    paths are exercised in the whole step whatever CPU runs the tests."""
    inner_product, calls = linear_op._inner_product, []
    monkeypatch.setattr(linear_op, "_inner_product", lambda *a: calls.append(1) or inner_product(*a))
    results = []
    for library in ("onednn", "mkl"):
        monkeypatch.setenv("OLMOEARTH_FAST_CPU_LINEAR", library)
        tr = _trainer(_cfg("exp14", tmp_path / library, dataset), tmp_path / library)
        torch.manual_seed(1)  # the same band dropout draws
        calls.clear()
        stats, grad_norm = tr.train_step(tr.loader.make_batch(1, 0))
        assert (len(calls) > 0) == (library == "onednn")  # the library asked for ran the Linear layers
        results.append((stats.loss, grad_norm, tr.model.state_dict()))
    (loss_a, norm_a, params_a), (loss_b, norm_b, params_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-5) and norm_a == pytest.approx(norm_b, rel=1e-4)
    for k, v in params_a.items():
        torch.testing.assert_close(v, params_b[k], rtol=1e-4, atol=1e-6, msg=k)


def test_cpu_trainer_keeps_freed_memory_unless_told_not_to(dataset, tmp_path, monkeypatch):
    import platform

    calls = []
    monkeypatch.setattr(trainer_mod, "keep_freed_memory", lambda: calls.append(1) or True)
    _trainer(_cfg("exp14", tmp_path, dataset), tmp_path)
    _trainer(_cfg("exp14", tmp_path, dataset, "trainer.keep_freed_memory=false"), tmp_path)
    assert calls == [1]
    monkeypatch.undo()
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert trainer_mod.keep_freed_memory()


def test_expandable_cuda_segments_unless_the_user_configured_the_allocator(monkeypatch):
    calls = []
    monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", calls.append, raising=False)
    for var in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.delenv(var, raising=False)
    assert trainer_mod.expandable_cuda_segments()
    assert calls == ["expandable_segments:True"]
    for var in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):  # the user's setting wins
        monkeypatch.setenv(var, "max_split_size_mb:128")
        assert not trainer_mod.expandable_cuda_segments()
        monkeypatch.delenv(var)
    assert calls == ["expandable_segments:True"]
    # torch before 2.9: only the CUDA setter exists
    monkeypatch.delattr(torch._C, "_accelerator_setAllocatorSettings")
    monkeypatch.setattr(torch.cuda.memory, "_set_allocator_settings", lambda s: calls.append(("cuda", s)))
    assert trainer_mod.expandable_cuda_segments()
    assert calls[-1] == ("cuda", "expandable_segments:True")


def test_cpu_trainer_leaves_the_cuda_allocator_alone(dataset, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(trainer_mod, "expandable_cuda_segments", lambda: calls.append(1) or True)
    tr = _trainer(_cfg("exp14", tmp_path, dataset, "trainer.max_steps=1"), tmp_path)
    tr.fit()
    assert calls == []
    assert "device_allocs" not in tr.history[-1] and tr.history[-1]["mem_gib"] > 0


@pytest.mark.gpu
def test_cuda_trainer_grows_expandable_segments_and_counts_driver_calls(dataset, tmp_path, monkeypatch):
    """On CUDA the trainer turns expandable segments on, and its history counts the allocator's
    driver calls: over steps of changing packed sizes the cache settles (no cudaMalloc retries)."""
    for var in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.delenv(var, raising=False)
    device = torch.device("cuda")
    tr = _trainer(_cfg("exp14", tmp_path, dataset, "trainer.max_steps=8"), tmp_path, device)
    retries = trainer_mod.cuda_allocator_stats(device)["alloc_retries"]  # since the process began
    history = tr.fit()
    assert len(history) == 8
    assert all(isinstance(h["device_allocs"], int) and h["alloc_retries"] == retries for h in history)
    assert history[-1]["device_allocs"] >= history[0]["device_allocs"] > 0
    # the step's activations live in expandable segments (the weights may sit in earlier ones);
    # the snapshot names a segment's kind where torch reports it
    segments = torch.cuda.memory._snapshot()["segments"]
    if segments and "is_expandable" in segments[0]:
        assert any(seg["is_expandable"] for seg in segments)
