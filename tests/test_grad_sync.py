"""Gradient averaging over ranks: the bucketed all-reduce launched during the backward equals the
plain one after it, with unused parameters, accumulation and a non-finite step (two gloo ranks)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from olmoearth_fast.grad_sync import BucketedAllReduce, all_reduce_mean_ref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.ModuleList(torch.nn.Linear(8, 64) for _ in range(3))  # one per "modality"
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(64, 64) for _ in range(6))
        self.head = torch.nn.Linear(64, 4)
        self.frozen = torch.nn.Linear(64, 64).requires_grad_(False)

    def forward(self, x, used):
        h = sum(self.embed[m](x) for m in used)
        for blk in self.blocks:
            h = h + torch.tanh(blk(h))
        return self.head(self.frozen(h)).square().mean()


def _grads(net):
    return [p.grad.clone() for p in net.parameters() if p.requires_grad]


def _worker(rank, world, init_file, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    # rank 1 never uses modality 2; modality 1 only in the first microbatch on both ranks
    used = [[(0, 1), (0, 2)], [(0, 1), (0,)]][rank]
    results = {}
    for mode, mb in (("ref", 0), ("one_bucket", 100.0), ("buckets", 0.004)):
        net = Net()
        params = [p for p in net.parameters() if p.requires_grad]
        reducer = BucketedAllReduce(params, world, mb) if mb else None
        fired = []
        for i, p in enumerate(params):
            p.register_post_accumulate_grad_hook(lambda _p, i=i: fired.append(i))
        g = torch.Generator().manual_seed(100 + rank)
        for step in range(2):  # the buckets are reordered after the first
            net.zero_grad(set_to_none=True)
            for i, u in enumerate(used):
                if reducer is not None and i == len(used) - 1:
                    reducer.arm()
                fired.clear()
                net(torch.randn(16, 8, generator=g), u).backward()
            if reducer is None:
                all_reduce_mean_ref(params, world)
            else:
                reducer.finish()
                reducer.apply()
                results[mode, "launched", step] = (reducer.launched_in_backward, len(reducer))
                results[mode, "order", step] = [i for b in reducer.buckets for i in b]
            results[mode, step] = _grads(net)
        results["fired"] = list(fired)  # the last backward's gradient order
        if reducer is not None:  # a resumed run's reducer launches the same buckets
            resumed = BucketedAllReduce([p for p in Net().parameters() if p.requires_grad], world, mb)
            resumed.load_state_dict(reducer.state_dict())
            resumed.arm()
            results[mode, "resumed"] = resumed.buckets == reducer.buckets
    torch.save(results, f"{out}.{rank}")
    dist.destroy_process_group()


def test_bucketed_equals_plain_all_reduce(tmp_path):
    out = tmp_path / "grads.pt"
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    res, res1 = torch.load(f"{out}.0"), torch.load(f"{out}.1")
    for mode in ("one_bucket", "buckets"):
        for step in range(2):
            assert len(res[mode, step]) == len(res["ref", step])
            for a, b in zip(res[mode, step], res["ref", step]):
                assert torch.equal(a, b), (mode, step)  # two ranks: the same sums, bit for bit
    launched, buckets = res["buckets", "launched", 0]
    assert buckets > 6
    # embed[1] (unused in the last microbatch) and embed[2] (unused on rank 1) sit in the last
    # buckets; every bucket before them is launched by the hooks, during the backward
    assert launched >= buckets - 3, res["buckets", "launched", 0]
    assert res["one_bucket", "launched", 0] == (0, 1)  # its last gradient never arrives on rank 1
    # from the second step on, the buckets follow rank 0's gradient order, on both ranks
    first, second = res["buckets", "order", 0], res["buckets", "order", 1]
    assert first == list(reversed(range(len(first))))
    assert second[:len(res["fired"])] == res["fired"] != first[:len(res["fired"])]
    assert res1["buckets", "order", 1] == second and sorted(second) == first[::-1]
    assert res["buckets", "resumed"] and res["one_bucket", "resumed"]


def test_bucket_layout():
    net = Net()
    params = [p for p in net.parameters() if p.requires_grad]
    r = BucketedAllReduce(params, 2, 0.02)
    order = [i for b in r.buckets for i in b]
    assert order == list(reversed(range(len(params))))  # every parameter once, last registered first
    sizes = [sum(params[i].numel() * 4 for i in b) for b in r.buckets]
    assert sizes[0] <= 2**20 and all(s <= 0.02 * 2**20 or len(b) == 1 for s, b in zip(sizes[1:], r.buckets[1:]))
    with pytest.raises(ValueError, match="bucket_mb must be positive"):
        BucketedAllReduce(params, 2, 0)
    with pytest.raises(RuntimeError, match="without arm"):
        r.finish()
    assert r.state_dict() == {"order": None}  # not decided before a first step
    with pytest.raises(ValueError, match="does not fit this model's 20 trainable parameters"):
        r.load_state_dict({"order": [0, 1]})
    r.remove()


TRAIN_SCRIPT = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    from olmoearth_fast import experiments, trainer as trainer_mod
    from olmoearth_fast.config import apply_overrides
    from olmoearth_fast.trainer import Trainer, build_loader, build_model
    dataset, out = sys.argv[1], sys.argv[2]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo")
    original = trainer_mod.microbatch_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):  # rank 0, step 2, microbatch 1 of 2: a NaN loss
        loss, stats = original(*args, **kwargs)
        calls["n"] += 1
        if rank == 0 and calls["n"] == 4:
            loss, stats = loss * float("nan"), stats * float("nan")
        return loss, stats

    trainer_mod.microbatch_loss = poisoned
    result = {}
    for mb in (0.0, 25.0, 0.01):
        cfg = experiments.demo(experiments.get("exp14"))
        cfg = apply_overrides(cfg, [f"data.dataset={dataset}", "data.num_workers=0", "data.global_batch_size=4",
                                    "data.rank_microbatch_size=1", "data.patch_sizes=[2]", "data.hw_p_list=[2]",
                                    "checkpoint.dir=" + out + "/ckpt", "logging.plot=False",
                                    f"trainer.grad_bucket_mb={mb}"])
        loader = build_loader(cfg, rank, world, out)
        torch.manual_seed(0)
        model = build_model(cfg, torch.device("cpu"))
        tr = Trainer(cfg, loader, model, torch.device("cpu"), out + "/ckpt", rank, world, log=lambda *a: None)
        calls["n"] = 0
        torch.manual_seed(1)
        flags, launched = [], []
        for step in range(3):
            stats, _ = tr.train_step(loader.make_batch(1, step))
            flags.append(stats.nonfinite)
            launched.append((tr.reducer.launched_in_backward, len(tr.reducer)) if tr.reducer else None)
        result[mb] = (flags, launched, {k: v.clone() for k, v in model.state_dict().items()},
                      tr.state_dict()["grad_buckets"])
    torch.save(result, out + f"/rank{rank}.pt")
    dist.destroy_process_group()
""")


def test_trainer_bucketed_equals_plain_with_a_nonfinite_step(tmp_path):
    from olmoearth_fast.data.demo import DEMO_MODALITIES, ensure_demo_dataset

    dataset = tmp_path / "demo"
    ensure_demo_dataset(dataset, num_samples=12, tile_size=16, modalities=DEMO_MODALITIES)
    script = tmp_path / "train2.py"
    script.write_text(TRAIN_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
                    str(script), str(dataset), str(tmp_path)], check=True, cwd=ROOT, env=env)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    for mb in (25.0, 0.01):
        assert r0[mb][0] == [False, True, False] and r1[mb][0] == [False, False, False]
        for k, v in r0[0.0][2].items():
            assert torch.equal(r0[mb][2][k], v), (mb, k)
            assert torch.equal(r1[mb][2][k], v), (mb, k)  # the ranks stay in step
    assert r0[0.0][3] is None
    for mb in (25.0, 0.01):  # the checkpoint carries the bucket order, the same on every rank
        assert r0[mb][3] == r1[mb][3] and sorted(r0[mb][3]["order"]) == list(range(len(r0[mb][3]["order"])))
    launched, buckets = r0[0.01][1][0]
    assert buckets > 10 and launched > buckets // 2, r0[0.01][1]



def _one_rank(backend, device, init):
    """Bucketed against plain on a single rank (the average is the gradient itself), two steps."""
    dist.init_process_group(backend, init_method=f"file://{init}", rank=0, world_size=1)
    try:
        grads, launched = {}, []
        for mb in (0, 0.004):
            net = Net().to(device)
            params = [p for p in net.parameters() if p.requires_grad]
            reducer = BucketedAllReduce(params, 1, mb) if mb else None
            torch.manual_seed(1)
            for step in range(2):
                net.zero_grad(set_to_none=True)
                if reducer is not None:
                    reducer.arm()
                net(torch.randn(4096, 8, device=device), (0, 1)).backward()
                if reducer is None:
                    all_reduce_mean_ref(params, 1)
                else:
                    reducer.finish()
                    reducer.apply()
                    held = min(b for b, idx in enumerate(reducer.buckets) if {4, 5} & set(idx))  # embed[2]
                    launched.append((reducer.launched_in_backward, held))
            grads[mb] = _grads(net)
        for a, b in zip(grads[0], grads[0.004]):
            assert torch.equal(a, b)
        # every bucket before the first with embed[2] (never used) is launched during the backward:
        # on step 1 (reverse registration order) embed[1] and embed[0] wait behind it, on step 2
        # (the backward's order) they come before it
        assert all(n == held for n, held in launched) and launched[1][0] > launched[0][0], launched
    finally:
        dist.destroy_process_group()


def test_bucketed_all_reduce_one_rank(tmp_path):
    _one_rank("gloo", "cpu", tmp_path / "init")


@pytest.mark.gpu
def test_bucketed_all_reduce_on_nccl(tmp_path):
    """The hooks launch NCCL collectives from the backward's device thread, and `finish` orders
    the stream after them."""
    _one_rank("nccl", "cuda", tmp_path / "init")


def test_torchrun_resume_is_exact(tmp_path):
    """The launcher under torchrun, two gloo ranks, a loader worker each (plans made there),
    gradients in buckets: 3 steps straight equal 2 steps, then --resume to 3, bit for bit, and
    the checkpoint carries the same bucket order."""
    from olmoearth_fast.data.demo import DEMO_MODALITIES, ensure_demo_dataset

    data = tmp_path / "data"
    ensure_demo_dataset(data, num_samples=16, tile_size=32, modalities=DEMO_MODALITIES)
    args = ["exp14", f"data.dataset={data}", "model.size=nano", "data.global_batch_size=8",
            "data.rank_microbatch_size=2", "data.num_workers=1", "data.patch_sizes=[2,4]", "data.hw_p_list=[2,4]",
            "checkpoint.save_every=2", "logging.wandb=false", "logging.plot=false", "trainer.grad_bucket_mb=0.05"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def launch(run, port, *extra):
        run.mkdir(exist_ok=True)
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                        "-m", "olmoearth_fast.train", *args, *extra], check=True, cwd=run, env=env,
                       capture_output=True)

    launch(tmp_path / "straight", 29541, "trainer.max_steps=3")
    launch(tmp_path / "resumed", 29542, "trainer.max_steps=2")
    launch(tmp_path / "resumed", 29543, "trainer.max_steps=3", "--resume")
    a, b = (torch.load(tmp_path / r / "runs" / "single_bandset_all12_random_band_dropout_cross_random_masked_neg"
                       / "step_00000003.pt", weights_only=False) for r in ("straight", "resumed"))
    assert a["grad_buckets"]["order"] is not None and a["grad_buckets"] == b["grad_buckets"]
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
