"""End-to-end training on the demo data: every experiment, exact resume, DDP, atomic saves."""

import math
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from olmoearth_fast import checkpoint as ckpt
from olmoearth_fast import experiments
from olmoearth_fast.config import apply_overrides
from olmoearth_fast.data.demo import ensure_demo_dataset
from olmoearth_fast.trainer import Trainer, build_loader, build_model, lr_at

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(name, run_dir, dataset, *extra):
    cfg = experiments.demo(experiments.get(name))
    return apply_overrides(cfg, [f"checkpoint.dir={run_dir}", f"data.dataset={dataset}",
                                 "data.num_workers=0", "data.global_batch_size=4", "data.rank_microbatch_size=2",
                                 "data.patch_sizes=[2,4]", "data.hw_p_list=[2,3]", "logging.plot=False",
                                 "trainer.log_every=1000", *extra])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from olmoearth_fast.data.demo import DEMO_MODALITIES

    root = tmp_path_factory.mktemp("demo") / "demo_data"
    ensure_demo_dataset(root, num_samples=16, tile_size=32, modalities=DEMO_MODALITIES)
    return str(root)


def _trainer(cfg, run_dir):
    loader = build_loader(cfg, 0, 1, str(run_dir))
    model = build_model(cfg, torch.device("cpu"))
    return Trainer(cfg, loader, model, torch.device("cpu"), str(run_dir), log=lambda *a: None)


@pytest.mark.parametrize("name", [f"exp{i}" for i in range(1, 15)])
def test_two_steps_of_every_experiment(name, dataset, tmp_path):
    cfg = _cfg(name, tmp_path / "run", dataset, "trainer.max_steps=2", "checkpoint.save_every=100")
    tr = _trainer(cfg, tmp_path / "run")
    history = tr.fit()
    assert [h["step"] for h in history] == [1, 2]
    assert all(torch.isfinite(torch.tensor(h["loss"])) and h["loss"] > 0 for h in history)
    assert ckpt.checkpoints(str(tmp_path / "run"))[-1][0] == 2  # final checkpoint


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_resume_is_exact(dataset, tmp_path):
    common = ("trainer.max_steps=20", "checkpoint.save_every=10", "checkpoint.keep_last=5")
    straight = _trainer(_cfg("exp14", tmp_path / "a", dataset, *common), tmp_path / "a")
    hist_a = straight.fit()

    first = _trainer(_cfg("exp14", tmp_path / "b", dataset, *common, "trainer.max_steps=10"), tmp_path / "b")
    hist_b = first.fit()
    # a fresh process-like start: new model (other init RNG use), new loader, then resume
    torch.manual_seed(1234)
    second = _trainer(_cfg("exp14", tmp_path / "b", dataset, *common), tmp_path / "b")
    second.load_state_dict(ckpt.load_checkpoint(str(tmp_path / "b")))
    assert second.step == 10
    hist_b2 = second.fit()
    assert [h["loss"] for h in hist_a] == [h["loss"] for h in hist_b2]  # history restored + continued
    assert [h["loss"] for h in hist_a[:10]] == [h["loss"] for h in hist_b]
    assert ckpt.checkpoint_tensors_equal(_weights(straight.model), _weights(second.model)) == []


def test_training_does_not_depend_on_the_loader_workers(dataset, tmp_path):
    """Same losses and weights whether the batches are made in the process or by worker
    processes, across an epoch boundary (16 samples, 4 a step): band dropout and DropPath draw
    from the global RNG, so the loader must not (a DataLoader without its own generator draws
    its workers' base seed from it on every new epoch)."""
    runs = {}
    for workers in (0, 2):
        run = tmp_path / f"w{workers}"
        cfg = _cfg("exp14", run, dataset, "trainer.max_steps=6", "checkpoint.save_every=100",
                   f"data.num_workers={workers}")
        tr = _trainer(cfg, run)
        runs[workers] = ([h["loss"] for h in tr.fit()], _weights(tr.model))
    assert runs[0][0] == runs[2][0]
    assert ckpt.checkpoint_tensors_equal(runs[0][1], runs[2][1]) == []


def test_the_step_line_names_the_wait_for_data(dataset, tmp_path):
    """A loader slower than the step: its wait is in every record (data_wait_s) and on the
    step line, and not in the step time."""
    import time

    cfg = _cfg("exp14", tmp_path / "run", dataset, "trainer.max_steps=2", "checkpoint.save_every=100",
               "trainer.log_every=1")
    inner = build_loader(cfg, 0, 1, str(tmp_path / "run"))
    batches = [inner.make_batch(1, s) for s in range(2)]

    class Slow(list):
        dataset = inner.dataset

        def __iter__(self):
            for b in super().__iter__():
                time.sleep(1.5)
                yield b

        def state_dict(self):
            return {}

    lines = []
    tr = Trainer(cfg, Slow(batches), build_model(cfg, torch.device("cpu")), torch.device("cpu"),
                 str(tmp_path / "run"), log=lines.append)
    history = tr.fit()
    assert all(1.5 <= h["data_wait_s"] < 2.5 for h in history)  # the sleep, not the step before
    assert all(h["step_time"] < 1.5 for h in history)  # nor the sleep in the step
    step_lines = [line for line in lines if line.startswith("step ")]
    assert len(step_lines) == 2 and all("| waited 1.5" in line for line in step_lines), step_lines


def test_loader_core_contention_note(monkeypatch):
    from olmoearth_fast.trainer import loader_core_contention

    cpu = torch.device("cpu")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert loader_core_contention(0, cpu) is None
    note = loader_core_contention(1, cpu)
    assert "data.num_workers=1" in note and "2 compute threads" in note and "2 CPU cores" in note
    assert loader_core_contention(4, torch.device("cuda")) is None  # GPU training: workers feed the device
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert loader_core_contention(4, cpu) is None  # 2 threads + 4 workers fit 16 cores
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # four ranks of 2 + 4 do not
    assert "(4 rank(s) here) share 16 CPU cores" in loader_core_contention(4, cpu)


def test_lr_schedule():
    cfg = experiments.get("exp14")
    assert lr_at(0, cfg, 100000) == 0.0
    assert lr_at(4000, cfg, 100000) == pytest.approx(5e-5)
    assert lr_at(8000, cfg, 100000) == pytest.approx(1e-4)
    assert lr_at(100000, cfg, 100000) == pytest.approx(1e-5)
    mid = (8000 + 100000) // 2
    assert lr_at(mid, cfg, 100000) == pytest.approx(1e-5 + 0.5 * 9e-5)


def test_save_is_atomic_when_interrupted(tmp_path, monkeypatch):
    run = str(tmp_path)
    ckpt.save_checkpoint({"x": torch.ones(3)}, run, 1)

    def broken_save(obj, f):
        f.write(b"partial bytes")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint({"x": torch.zeros(3)}, run, 2)
    monkeypatch.undo()
    assert [s for s, _ in ckpt.checkpoints(run)] == [1]
    assert torch.equal(ckpt.load_checkpoint(run)["x"], torch.ones(3))
    assert sorted(os.listdir(run)) == ["step_00000001.pt"]  # no temporary file left behind


def test_kill_during_save_leaves_previous_checkpoint(tmp_path):
    run = str(tmp_path)
    ckpt.save_checkpoint({"step": 0, "x": torch.ones(4)}, run, 0)
    script = textwrap.dedent(f"""
        import torch
        from olmoearth_fast import checkpoint as ckpt
        big = torch.randn(64, 1024, 1024)  # 256 MiB: the kill lands mid-write
        print("ready", flush=True)
        for step in range(1, 1000):
            ckpt.save_checkpoint({{"step": step, "x": big}}, {run!r}, step, keep_last=1)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, cwd=ROOT)
    assert proc.stdout.readline().strip() == b"ready"
    import time

    time.sleep(1.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = ckpt.load_checkpoint(run)  # the latest complete checkpoint loads
    assert state["x"].shape in ((4,), (64, 1024, 1024))
    for f in os.listdir(run):
        if f.startswith(".tmp-"):
            os.unlink(f"{run}/{f}")


DDP_SCRIPT = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    from olmoearth_fast import experiments
    from olmoearth_fast.config import apply_overrides
    from olmoearth_fast.trainer import Trainer, build_loader, build_model
    dataset, out, world = sys.argv[1], sys.argv[2], int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    cfg = experiments.demo(experiments.get("exp1"))
    cfg = apply_overrides(cfg, [f"data.dataset={dataset}", "data.num_workers=0", "data.global_batch_size=4",
                                "data.rank_microbatch_size=2", "data.patch_sizes=[2]", "data.hw_p_list=[2]",
                                "model.drop_path=0.0", "checkpoint.dir=" + out + "/ckpt", "logging.plot=False"])
    # the same three global batches for every world size: made once with world_size=1
    full = build_loader(cfg, 0, 1, out)
    batches = [full.make_batch(1, s) for s in range(3)]
    half = 4 // world
    batches = [b.microbatches(half)[rank] for b in batches]

    class Fixed(list):
        dataset = full.dataset
        def state_dict(self): return {}
        def load_state_dict(self, s): pass

    model = build_model(cfg, torch.device("cpu"))
    tr = Trainer(cfg, Fixed(batches), model, torch.device("cpu"), out + "/ckpt", rank, world, log=lambda *a: None)
    for b in batches:
        tr.train_step(b)
    if rank == 0:
        torch.save(model.state_dict(), out + f"/params_{world}.pt")
    if world > 1:
        dist.destroy_process_group()
""")


def test_torchrun_two_ranks_equals_one_process(dataset, tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(script), dataset, str(tmp_path)], check=True, cwd=ROOT, env=env)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531",
                    str(script), dataset, str(tmp_path)], check=True, cwd=ROOT, env=env)
    one = torch.load(tmp_path / "params_1.pt")
    two = torch.load(tmp_path / "params_2.pt")
    init = build_model(experiments.demo(experiments.get("exp1")), torch.device("cpu")).state_dict()
    moved = [k for k in one if not torch.equal(one[k], init[k])]
    assert moved, "training did not change the parameters"
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-6, msg=k)


def test_wandb_offline_and_resumed_run_id(dataset, tmp_path, monkeypatch):
    import types

    calls = []
    fake = types.ModuleType("wandb")
    fake.util = types.SimpleNamespace(generate_id=lambda: "run123")

    class Run:
        def log(self, rec, step):
            calls.append(("log", step))

        def finish(self):
            calls.append(("finish",))

    def init(**kw):
        calls.append(("init", kw["id"], kw["mode"], kw["resume"]))
        return Run()

    fake.init = init
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run = tmp_path / "run"
    for steps in (1, 2):
        cfg = _cfg("exp1", run, dataset, f"trainer.max_steps={steps}", "logging.wandb=True")
        tr = _trainer(cfg, run)
        if steps == 2:
            tr.load_state_dict(ckpt.load_checkpoint(str(run)))
        tr.fit()
    inits = [c for c in calls if c[0] == "init"]
    assert inits == [("init", "run123", "offline", "allow")] * 2  # same run id after resume, offline
    assert ("log", 1) in calls and ("log", 2) in calls and calls[-1] == ("finish",)
    cfg = _cfg("exp1", tmp_path / "off", dataset, "trainer.max_steps=1", "logging.wandb=False")
    calls.clear()
    _trainer(cfg, tmp_path / "off").fit()
    assert calls == []


def test_clear_errors(dataset, tmp_path):
    cfg = _cfg("exp1", tmp_path / "run", tmp_path / "nope", "trainer.max_steps=1")
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        build_loader(cfg, 0, 1, str(tmp_path / "run"))
    from olmoearth_fast.trainer import check_dataset_modalities

    cfg = _cfg("exp7", tmp_path / "run", dataset, "trainer.max_steps=1")
    loader = build_loader(cfg, 0, 1, str(tmp_path / "run"))
    only_s2 = tmp_path / "only_s2"
    from olmoearth_fast.data.demo import ensure_demo_dataset

    ensure_demo_dataset(only_s2, num_samples=8, tile_size=16, modalities=("sentinel2_l2a",))
    loader.dataset.root = only_s2
    with pytest.raises(ValueError, match="has no sample with"):
        check_dataset_modalities(loader.dataset, cfg.model.modalities)


def test_export_cli_writes_reference_layout(dataset, tmp_path):
    from olmoearth_fast.train import main

    run = tmp_path / "run"
    cfg = _cfg("exp14", run, dataset, "trainer.max_steps=1")
    tr = _trainer(cfg, run)
    tr.fit()
    out = tmp_path / "export"
    main(["exp14", "--demo", f"checkpoint.dir={run}", "--export", str(out)])
    assert sorted(os.listdir(out)) == ["config.json", "weights.pth"]
    loader = pytest.importorskip("olmoearth_pretrain.model_loader")
    ref = loader.load_model_from_path(str(out))
    exported = ckpt.export_reference_state_dict(tr.model)
    assert ckpt.checkpoint_tensors_equal(ref.state_dict(), exported) == []


@pytest.mark.parametrize("name", ["exp14", "exp2"])
def test_train_step_through_triton_kernels(name, dataset, tmp_path, monkeypatch):
    """The model and trainer wired to the fused kernels (OLMOEARTH_FAST_KERNELS=triton; on CPU
    they run under TRITON_INTERPRET; on a GPU compiled, both runs in fp32) give the loss and
    gradients of the PyTorch paths: the integration a GPU session would otherwise be the first
    to exercise (strides, band gather, dropout multipliers, segment offsets, row maps, autograd)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton kernels need a GPU or TRITON_INTERPRET=1")
    cfg = _cfg(name, tmp_path / "run", dataset, "data.global_batch_size=2", "data.rank_microbatch_size=2",
               "data.patch_sizes=[2]", "data.hw_p_list=[3]", "trainer.precision=fp32")
    loader = build_loader(cfg, 0, 1, str(tmp_path / "run"))
    batch = loader.make_batch(1, 0)
    from olmoearth_fast.kernels import masked_neg_loss as loss_kernels
    from olmoearth_fast.kernels import patch_embed as embed_kernels

    launched = []
    for module, fn in ((embed_kernels, "patch_embed_fwd"), (embed_kernels, "patch_embed_bwd_effective"),
                       (loss_kernels, "masked_neg_loss_fwd"), (loss_kernels, "masked_neg_loss_bwd")):
        def counted(*a, _f=getattr(module, fn), _n=fn, **kw):
            launched.append(_n)
            return _f(*a, **kw)
        monkeypatch.setattr(module, fn, counted)
    results = {}
    for kernels in ("pytorch", "triton"):
        monkeypatch.setenv("OLMOEARTH_FAST_KERNELS", kernels)
        torch.manual_seed(0)
        model = build_model(cfg, device)
        trainer = Trainer(cfg, loader, model, device, str(tmp_path / kernels), log=lambda *a: None)
        torch.manual_seed(1)  # same band-dropout and DropPath draws for both
        launched.clear()
        stats, grad_norm = trainer.train_step(batch)
        results[kernels] = stats, grad_norm, _weights(model), set(launched)
    (ref, ref_norm, ref_w, ref_launched), (fused, fused_norm, fused_w, fused_launched) = results.values()
    assert not ref_launched
    assert fused_launched == {"patch_embed_fwd", "patch_embed_bwd_effective", "masked_neg_loss_fwd",
                             "masked_neg_loss_bwd"}
    assert fused.loss == pytest.approx(ref.loss, rel=1e-5)
    assert fused.patch_disc == pytest.approx(ref.patch_disc, rel=1e-5)
    assert fused_norm == pytest.approx(ref_norm, rel=1e-4)
    for k in ref_w:  # one AdamW step from the same init: the updates agree
        torch.testing.assert_close(fused_w[k], ref_w[k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize("name,kernels,compiled", [
    ("exp14", "pytorch", False), ("exp14", "triton", False), ("exp14", "pytorch", True),
    ("exp10", "pytorch", False), ("exp10", "triton", False)])
def test_train_step_under_bf16_autocast(name, kernels, compiled, dataset, tmp_path, monkeypatch):
    """The GPU recipe's precision (bf16 autocast, the loss in fp32) through a whole training step,
    here on CPU autocast: the dtypes that meet in packing, DropPath's residual adds, the
    mid-encoder bandset merge (exp10), the loss and the optimizer, through the PyTorch paths, the
    Triton kernels (interpreted here) and compiled blocks (`trainer.compile`, as the GPU
    benchmark's ``ours_compiled`` runs them). The step's loss and gradient norm stay within bf16's
    rounding of the fp32 step's, parameters and gradients stay fp32, and the gradient points the
    same way."""
    if kernels == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton kernels need TRITON_INTERPRET=1 on CPU")
    monkeypatch.setenv("OLMOEARTH_FAST_KERNELS", kernels)
    if compiled:
        import torch._dynamo as dynamo

        dynamo.reset()
    cfg = _cfg(name, tmp_path / "run", dataset, "data.global_batch_size=2", "data.rank_microbatch_size=2",
               "data.patch_sizes=[2]", "data.hw_p_list=[3]", f"trainer.compile={compiled}")
    loader = build_loader(cfg, 0, 1, str(tmp_path / "run"))
    batch = loader.make_batch(1, 0)
    results = {}
    for autocast in (False, True):
        torch.manual_seed(0)
        model = build_model(cfg, torch.device("cpu"))
        trainer = Trainer(cfg, loader, model, torch.device("cpu"), str(tmp_path / f"run{autocast}"),
                          log=lambda *a: None)
        trainer.autocast = autocast  # what trainer.precision=auto sets on CUDA (bf16 is refused on CPU)
        linear_out = set()
        hooks = [m.register_forward_hook(lambda m, i, o: linear_out.add(o.dtype))
                 for m in model.modules() if isinstance(m, torch.nn.Linear)]
        torch.manual_seed(1)  # same band-dropout and DropPath draws for both
        stats, grad_norm = trainer.train_step(batch)
        for h in hooks:
            h.remove()
        assert {p.dtype for p in model.parameters()} == {torch.float32}
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and {g.dtype for g in grads} == {torch.float32}
        assert linear_out == ({torch.bfloat16} if autocast else {torch.float32})
        results[autocast] = stats, grad_norm, torch.cat([g.flatten() for g in grads]).double()
    (ref, ref_norm, ref_grad), (low, low_norm, low_grad) = results[False], results[True]
    assert math.isfinite(low.loss) and low.loss == pytest.approx(ref.loss, rel=2e-3)
    assert low.patch_disc == pytest.approx(ref.patch_disc, rel=2e-3)
    assert low_norm == pytest.approx(ref_norm, rel=1e-2)
    assert low_grad.shape == ref_grad.shape
    assert torch.nn.functional.cosine_similarity(low_grad, ref_grad, dim=0) > 0.995


def test_kernel_override_rejects_unknown_value(monkeypatch):
    from olmoearth_fast.ops import forced_kernels

    monkeypatch.setenv("OLMOEARTH_FAST_KERNELS", "cuda")
    with pytest.raises(ValueError, match="OLMOEARTH_FAST_KERNELS='cuda'.*auto, triton, pytorch"):
        forced_kernels()
    monkeypatch.setenv("OLMOEARTH_FAST_KERNELS", "Triton")
    assert forced_kernels() == "triton"
