"""Averaging the gradients over two data-parallel ranks (NCCL with two GPUs, gloo with one CPU
thread per rank otherwise): ours,
bucketed all-reduces launched during the last microbatch's backward
(`olmoearth_fast/grad_sync.py`, `trainer.grad_bucket_mb=25`), against the reference's fastest
scheme, its July 2026 replicated DP: one all-reduce of the flattened gradients after the
backward (`all_reduce_mean_ref`, `trainer.grad_bucket_mb=0`). Both run our exp14 step on the
same rank batch (p=4, hw_p=6), step by step in turn (`grad_sync_ranks.py`); a step's time is
the slower rank's. Beside the step times, each record holds ``exposed_s``: the median time a
step spends averaging gradients after its backward (the flat all-reduce, or waiting for the
buckets and copying them back) on the rank that finished its backward last (the other one also
waits for it there): the part of the communication the step does not hide. CPU only: on GPUs
the host does not wait for NCCL there (the stream does), so the step times are the measure.

On this CPU the collective runs on gloo's threads beside the two ranks' compute, so the figure
says that the communication is hidden, not what NCCL on a GPU node gains: there, the exposed
all-reduce of the gradients (360 MB at base) is a few milliseconds within a node and tens of
milliseconds between nodes. On a machine with two or more GPUs the same case runs on two of
them over NCCL (bf16 autocast), where the exposed time is what the step loses; with one GPU it
is skipped (NCCL needs a device per rank).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
# size: (rank batch, rounds); on CPU base at a small batch so that the case takes about a minute
CASES = ({s: (32, 10) for s in ("nano", "tiny", "base_shallow_decoder")} if torch.cuda.device_count() >= 2 else
         {"nano": (8, 6), "tiny": (4, 5), "base_shallow_decoder": (2, 3)})
SIZES = [s for s in os.environ.get("OLMOEARTH_BENCH_SIZES", ",".join(CASES)).split(",") if s in CASES]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from olmoearth_fast.data.demo import DEMO_MODALITIES, ensure_demo_dataset

    root = tmp_path_factory.mktemp("grad_sync") / "demo_data"
    samples = max(16, 2 * max(batch for batch, _ in CASES.values()))  # a global batch of two ranks
    ensure_demo_dataset(root, num_samples=samples, tile_size=32, modalities=DEMO_MODALITIES)
    return str(root)


@pytest.mark.skipif(torch.cuda.device_count() == 1, reason="two ranks need two GPUs (NCCL) or none (gloo)")
@pytest.mark.parametrize("size", SIZES)
def test_bench_grad_sync(bench, benchmark, dataset, size, tmp_path):
    batch, rounds = CASES[size]
    out = tmp_path / "times.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29591",
           os.path.join(HERE, "grad_sync_ranks.py"), size, str(batch), str(rounds), dataset, str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    benchmark.pedantic(lambda: subprocess.run(cmd, check=True, env=env, cwd=os.path.dirname(HERE)),
                       rounds=1, iterations=1)
    res = json.loads(out.read_text())
    exposed = {name: statistics.median(v) for name, v in res["exposed"].items() if v}
    backend = "nccl" if torch.cuda.device_count() >= 2 else "gloo"
    bench.from_times(res["times"], group=f"exp14 step {size} B={batch}/rank, 2 {backend} ranks: gradient averaging",
                     size=size, batch=batch, world_size=2, buckets=res["buckets"], grad_bytes=res["grad_bytes"],
                     exposed_s=exposed)
    if exposed:
        print(f"{size}: gradient averaging after the backward (the later rank, median): "
              + ", ".join(f"{n} {t * 1e3:.1f} ms" for n, t in exposed.items()))
