"""The benchmark harness (benchmarks/conftest.py): interleaved timing of several providers
(`bench.paired`) gives each provider its own record, alternates their order, and its ratios
follow the providers' real costs."""

import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"

FAKE = '''
import json, os, time

def test_fake_paired(bench):
    calls = []

    def work(name, seconds):
        def fn():
            calls.append(name)
            time.sleep(seconds)
        return fn

    medians = bench.paired({"fast": work("fast", 0.01), "slow": work("slow", 0.03)}, group="fake", rounds=4,
                           flops={"fast": 1e9, "slow": 1e9}, note="x")
    with open(os.environ["CALLS_OUT"], "w") as f:
        json.dump({"calls": calls, "medians": medians}, f)


def varying():  # two inputs of unequal work in turn, as the training step's two batches
    state = {"i": 0}

    def step():
        state["i"] += 1
        time.sleep(0.01 if state["i"] % 2 else 0.03)  # 1 GFLOP in 10 ms, 3 GFLOP in 30 ms: 100 GFLOP/s

    return step, lambda: 1e9 if state["i"] % 2 else 3e9


def test_fake_varying_work_paired(bench):
    step, work = varying()
    bench.paired({"varying": step}, group="varying", rounds=3, flops={"varying": work})


def test_fake_varying_work_solo(bench):
    step, work = varying()
    bench(step, group="varying solo", provider="varying", rounds=3, warmup=1, flops=work)


def test_fake_settling(bench):  # a provider that grows the heap over its first three calls
    import torch

    held, calls = [], []

    def growing():
        calls.append(len(held))
        if len(held) < 3:
            held.append(torch.ones(16 << 20))  # 64 MiB written: pages touched for the first time
        time.sleep(0.002)

    bench.paired({"growing": growing, "steady": lambda: time.sleep(0.002)}, group="settle", rounds=2)
    with open(os.environ["CALLS_OUT"] + ".settle", "w") as f:
        json.dump(calls, f)


def test_fake_from_times(bench, benchmark):  # times taken elsewhere (the ranks of a distributed run)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    bench.from_times({"ours": [1.0, 2.0, 3.0], "ref_best": [2.0, 4.0, 6.5]}, group="external", world_size=2)
'''


def test_paired_timing(tmp_path):
    shutil.copy(BENCH / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "bench_fake.py").write_text(FAKE)
    env = dict(os.environ, OLMOEARTH_BENCH_LAST_RUN=str(tmp_path / "run.json"), CALLS_OUT=str(tmp_path / "calls.json"),
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-only",
           "-o", "python_files=bench_*.py", "--rootdir", str(tmp_path), str(tmp_path / "bench_fake.py")]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "interleaved over 4 rounds" in done.stdout
    calls = json.loads((tmp_path / "calls.json").read_text())
    # warm-up calls until two in a row page-faulted little (here the first two), then rounds in
    # alternating order
    assert calls["calls"] == ["fast", "fast", "slow", "slow"] + ["fast", "slow", "slow", "fast"] * 2
    results = json.loads((tmp_path / "run.json").read_text())["results"]
    records = {r["provider"]: r for r in results if r["group"] == "fake"}
    assert set(records) == {"fast", "slow"}
    assert records["slow"]["median_s"] >= 0.03 and records["fast"]["median_s"] >= 0.01
    assert 1.5 < records["slow"]["round_ratio_median"] < 4.5
    assert records["fast"]["speedup_vs_ref_best"] is None and records["fast"]["note"] == "x"
    assert records["fast"]["flop_s"] == 1e9 / records["fast"]["median_s"]
    assert calls["medians"]["slow"] == records["slow"]["median_s"]
    # on CPU the peak is probed once per round, beside the timings
    probes = records["fast"]["peak_probes"]
    assert len(probes) == 4 and all(p > 0 for p in probes)
    assert records["fast"]["device_peak_flop_s"] == statistics.median(probes)
    assert records["fast"]["peak_fraction"] == records["fast"]["flop_s"] / statistics.median(probes)
    assert "matmul peak probed beside the rounds" in done.stdout
    assert records["fast"]["warmup_calls"] == {"fast": 2, "slow": 2}
    # a provider still growing the heap is warmed up until it stops: three growing calls, then
    # two quiet ones; the timed rounds see none of the growth
    settle = {r["provider"]: r for r in results if r["group"] == "settle"}
    assert settle["growing"]["warmup_calls"] == {"growing": 5, "steady": 2}
    assert json.loads(Path(str(tmp_path / "calls.json") + ".settle").read_text()) == [0, 1, 2, 3, 3, 3, 3]
    external = {r["provider"]: r for r in results if r["group"] == "external"}
    assert external["ours"]["median_s"] == 2.0 and external["ref_best"]["median_s"] == 4.0
    assert external["ours"]["speedup_vs_ref_best"] == 2.0 and external["ref_best"]["round_ratio_median"] == 2.0
    assert external["ours"]["rounds"] == 3 and external["ours"]["world_size"] == 2
    assert external["ours"]["peak_fraction"] is None and external["ours"]["peak_probes"] is None
    assert "external | interleaved over 3 rounds" in done.stdout
    # work that alternates between calls: each round's FLOPs over its own time (100 GFLOP/s every
    # round), not the mean work over the median time (here the 30 ms rounds hold the median: 67)
    for group in ("varying", "varying solo"):
        rec = next(r for r in results if r["group"] == group)
        assert 0.75e11 < rec["flop_s"] < 1.0e11, (group, rec["flop_s"])
        assert rec["flops"] in (5e9 / 3, 7e9 / 3)  # the mean over the three timed rounds
