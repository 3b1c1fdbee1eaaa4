"""The ranks of `bench_grad_sync.py` (run under torchrun; NCCL with a GPU per rank, gloo on the
CPU otherwise): exp14 steps of two trainers,
one averaging the gradients in buckets during the backward, one with a single all-reduce after
it, timed in turn on the same rank batch (each rank its own); rank 0 writes the step times as
JSON.

    torchrun --nproc_per_node=2 benchmarks/grad_sync_ranks.py SIZE BATCH ROUNDS DATASET OUT.json
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.distributed as dist

from olmoearth_fast import experiments
from olmoearth_fast import trainer as trainer_mod
from olmoearth_fast.config import apply_overrides
from olmoearth_fast.trainer import Trainer, build_loader, build_model

PROVIDERS = {"ours": 25.0, "ref_best": 0.0}  # trainer.grad_bucket_mb
# untimed rounds: the first step decides the bucket order, the second allocates the reordered
# buckets (a first timed round was still ~35% slower at base)
WARMUP = 2


def _timed(fn, into: list):
    def wrapped(*args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        into[-1] += time.perf_counter() - t0
        return out
    return wrapped


def main(size: str, rank_batch: int, rounds: int, dataset: str, out: str) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.device_count() >= world:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    trainers, batch = {}, None
    for name, mb in PROVIDERS.items():
        cfg = apply_overrides(experiments.get("exp14"), [
            f"data.dataset={dataset}", "data.num_workers=0", f"data.global_batch_size={rank_batch * world}",
            f"data.rank_microbatch_size={rank_batch}", "data.patch_sizes=[4]", "data.hw_p_list=[6]",
            f"model.size={size}", f"checkpoint.dir={out}.ckpt", "logging.wandb=False", "logging.plot=False",
            f"trainer.grad_bucket_mb={mb}"])
        loader = build_loader(cfg, rank, world, f"{out}.ckpt")
        torch.manual_seed(0)
        trainers[name] = Trainer(cfg, loader, build_model(cfg, device), device, f"{out}.ckpt", rank, world,
                                 log=lambda *a: None)
        batch = batch or loader.make_batch(1, 0)
    # the time each step spends averaging gradients after its backward: what is left exposed
    exposed = {name: [] for name in PROVIDERS}
    reducer = trainers["ours"].reducer
    reducer.finish = _timed(reducer.finish, exposed["ours"])
    reducer.apply = _timed(reducer.apply, exposed["ours"])
    trainer_mod.all_reduce_mean_ref = _timed(trainer_mod.all_reduce_mean_ref, exposed["ref_best"])
    times = {name: [] for name in PROVIDERS}
    for r in range(rounds + WARMUP):
        for name in (list(PROVIDERS) if r % 2 else list(PROVIDERS)[::-1]):
            dist.barrier()
            exposed[name].append(0.0)
            t0 = time.perf_counter()
            trainers[name].train_step(batch)  # ends with a host read: the device is done
            dt = torch.tensor([time.perf_counter() - t0], device=device)
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)  # the step ends when the slower rank's does
            # the rank whose backward ends last waits for no other: its time is the communication
            # itself (the other rank's includes the wait for it)
            e = torch.tensor([exposed[name].pop()], device=device)
            dist.all_reduce(e, op=dist.ReduceOp.MIN)
            if r >= WARMUP:
                times[name].append(float(dt))
                if device.type == "cpu":  # on NCCL the host does not wait in these calls
                    exposed[name].append(float(e))
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"times": times, "exposed": exposed, "buckets": len(reducer),
                       "grad_bytes": sum(p.numel() * 4 for p in trainers["ours"].params)}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
