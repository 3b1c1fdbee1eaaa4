"""Shared harness for `pytest benchmarks --benchmark-only`.

Every benchmark goes through the `bench` fixture:

    def test_pack(bench, provider):
        bench(fn, group="pack B=32 N=1152 D=768 r=0.25", provider=provider, B=32, ...)

* `fn` is timed with a device synchronisation inside the timed callable (CUDA), so GPU work is
  never under-counted; inputs are created by the benchmark, never all zeros. On CUDA, before
  every round (untimed, synchronised) a 256 MiB buffer is overwritten, which evicts the L2
  cache (50-60 MB on H100/H200), so no round reads its inputs from the previous round's cache.
* `bench.paired({provider: fn, ...}, group=..., rounds=...)` times several providers
  interleaved, one call of each per round (the order reversed every other round), for ratios
  that a drifting machine cannot skew; each provider gets its own record. On CPU each round
  also probes the matmul peak, and those records' fractions are against the probes' median.
* Before its timed rounds every provider is called untimed (``warmup=`` times), and on CPU on
  until two calls in a row page-fault fewer than 1024 pages (at most 8 calls, `_warm_up`): a
  step whose tensors change size grows the CPU heap over its first calls, and timing those would
  charge the kernel's first touch of new pages to whichever provider grows later. Each record
  says how many warm-up calls it took (``warmup_calls``).
* Each record carries provenance (device, torch/triton versions, git SHA, date) and the
  keyword arguments (shapes, dtype) in `extra_info`, so `--benchmark-json` is self-describing.
* At the end of the session a table prints, per group, every provider's median and its
  speed ratio against the group's reference providers (`ref_best`, the reference's fastest
  faithful configuration, where a group has it; `ref` otherwise and as a second column),
  plus peak memory where measured, and, for cases that pass the FLOPs of one call (`flops=`: a
  number, or a callable giving the FLOPs of the call just made, for providers whose work varies
  from call to call, e.g. a training step rotating batches), the achieved FLOP/s (the median
  over rounds of each round's FLOPs over its time) and the fraction of the device's peak
  (`olmoearth_fast.perf.peak_flops`: a measured fp32 matmul on CPU, the bf16 datasheet figure
  on GPU). The same table is
  written to `benchmarks/last_run.json` (or to ``$OLMOEARTH_BENCH_LAST_RUN``), rewritten after
  every case (a run stopped by a time limit keeps what it measured), and each case prints one
  line as it finishes (`bench: ...`, through pytest's terminal reporter, past the capture).
"""

from __future__ import annotations

import datetime
import json
import os
import resource
import statistics
import subprocess
import time

import sys

import pytest
import torch

from olmoearth_fast.perf import describe_device

# the benchmarks share helpers that live beside them (reference_step.py); pytest runs with
# --import-mode=importlib, which does not put this folder on sys.path
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # what our Trainer does on CPU (olmoearth_fast.trainer.keep_freed_memory), set here for the
    # whole session so that the reference providers run under the same allocator settings
    from olmoearth_fast.trainer import keep_freed_memory

    keep_freed_memory()
else:
    # what our Trainer does on CUDA (olmoearth_fast.trainer.expandable_cuda_segments), set here
    # for the whole session: the reference providers then run under the same allocator, whatever
    # the order of the cases
    from olmoearth_fast.trainer import expandable_cuda_segments

    expandable_cuda_segments()

_RESULTS: list[dict] = []
ON_GPU = torch.cuda.is_available()


def _git_sha() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


def _provenance() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    device = torch.cuda.get_device_name() if ON_GPU else describe_device("cpu")
    return {"device": device, "torch": torch.__version__, "triton": triton_version,
            "git_sha": _git_sha(), "date": datetime.date.today().isoformat()}


PROVENANCE = _provenance()


def _sync():
    if ON_GPU:
        torch.cuda.synchronize()


_L2_FLUSH: torch.Tensor | None = None


def _flush_l2() -> None:
    """Evict the GPU's L2 cache (untimed setup of every round); nothing to do on CPU."""
    global _L2_FLUSH
    if not ON_GPU:
        return
    if _L2_FLUSH is None:
        _L2_FLUSH = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    _L2_FLUSH.fill_(1)
    torch.cuda.synchronize()


# A warm-up call that page-faulted this many pages (4 MiB) or more was still growing the heap.
SETTLE_FAULTS = 1024
MAX_WARMUP = 8


def _page_faults() -> int:
    """Minor page faults of this process so far: first touches of memory the heap grew by."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _warm_up(call, minimum: int) -> int:
    """Warm-up calls of ``call`` (untimed): at least ``minimum``, then on until two calls in a row
    page-faulted fewer than `SETTLE_FAULTS` pages, at most `MAX_WARMUP` in all. Returns how many.

    A provider whose tensors change size from call to call (a training step rotating two
    batches) grows the CPU heap over its first calls, and each call that grows it pays the
    kernel's first touch of the new pages (2.6-3.5 µs a page on the 2-core VMs). The reference's
    tiny step faulted 27-66K pages in its first two or three timed rounds after one warm-up
    call (0.2-0.3 s of a 3.2 s step), ours none, which tilted the ratio our way; timed rounds
    start once both have settled. On a GPU (whose tensors live in the caching allocator, and
    whose device time is scarce) the ``minimum`` only."""
    calls, quiet = 0, 0
    settle = 0 if ON_GPU else 2
    while minimum > 0 and (calls < minimum or (calls < MAX_WARMUP and quiet < settle)):
        before = _page_faults()
        call()
        calls += 1
        quiet = quiet + 1 if _page_faults() - before < SETTLE_FAULTS else 0
    return calls


def _peak_memory(fn) -> int | None:
    """Peak bytes allocated by one call (CUDA only: CPU allocators do not report it)."""
    if not ON_GPU:
        return None
    _sync()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    _sync()
    return torch.cuda.max_memory_allocated() - base


@pytest.fixture
def bench(benchmark, request):
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")

    def run(fn, *, group: str, provider: str, rounds: int | None = None, warmup: int = 2, **info):
        flops = info.pop("flops", None)
        done: list[float] = []  # the FLOPs of each call, in call order

        def timed():
            out = fn()
            _sync()
            if flops is not None:
                done.append(_flops_of_call(flops))
            return out

        info["warmup_calls"] = _warm_up(timed, warmup)
        peak = _peak_memory(fn)
        benchmark.group = group
        benchmark.extra_info.update(PROVENANCE)
        benchmark.extra_info.update({"provider": provider, "peak_bytes": peak, **info})
        if rounds is None:
            # about one second of timing per case on CPU, 50+ rounds on GPU
            t0 = time.perf_counter()
            timed()
            dt = max(time.perf_counter() - t0, 1e-6)
            rounds = int(min(max(1.0 / dt, 3), 200))
        benchmark.pedantic(timed, setup=_flush_l2, rounds=rounds, iterations=1)
        stats = benchmark.stats.stats
        gbps = _gbps(info, stats.median)
        flop_s = None
        if flops:  # the timed rounds are the last `rounds` calls
            flop_s, info["flops"] = _rate(done[-rounds:], list(stats.data))
            benchmark.extra_info["flops"] = info["flops"]
        frac = flop_s / _device_peak()[0] if flop_s else None
        _RESULTS.append({"group": group, "provider": provider, "median_s": stats.median,
                         "min_s": stats.min, "rounds": rounds, "peak_bytes": peak, "min_bytes_gbps": gbps,
                         "flop_s": flop_s, "peak_fraction": frac,
                         "device_peak_flop_s": _device_peak()[0] if flop_s else None, **info})
        _write_results()
        mem = "" if peak is None else f", peak {peak / 2**20:.1f} MiB"
        mem += "" if gbps is None else f", {gbps:.1f} GB/s of minimum traffic"
        mem += "" if flop_s is None else f", {flop_s / 1e12:.3f} TFLOP/s ({100 * frac:.0f}% of peak)"
        line = f"bench: {group} | {provider}: median {stats.median * 1e3:.3f} ms over {rounds} rounds{mem}"
        if reporter is not None and capture is not None:
            with capture.global_and_fixture_disabled():  # now, not at the end of the session
                reporter.ensure_newline()
                reporter.write_line(line)
        return stats.median

    def paired(fns: dict, *, group: str, rounds: int, warmup: int = 1, flops: dict | None = None, **info):
        """Time the providers ``fns`` ({provider: fn}) interleaved: each round calls every one
        once (the order reversed every other round), so a drifting machine (shared VMs) slows
        them alike and their ratio holds; pytest-benchmark times the whole round. On CPU each
        round also measures the matmul peak anew, and the fractions of peak are against the
        median of those probes, taken beside the timings. Each provider gets a record like
        `run`'s (median over rounds; FLOP/s from ``flops[provider]``) and the median of the
        per-round ratios to the first provider."""
        from olmoearth_fast.perf import measure_cpu_peak

        names = list(fns)
        flops = flops or {}
        warmed = {}
        for name in names:
            def call(fn=fns[name]):
                fn()
                _sync()

            warmed[name] = _warm_up(call, warmup)
        info["warmup_calls"] = warmed
        times: dict[str, list[float]] = {n: [] for n in names}
        done: dict[str, list[float]] = {n: [] for n in names if n in flops}  # FLOPs of each round's call
        probes: list[float] = []

        def one_round():
            order = names if len(times[names[0]]) % 2 == 0 else names[::-1]
            for n in order:
                t0 = time.perf_counter()
                fns[n]()
                _sync()
                times[n].append(time.perf_counter() - t0)
                if n in done:
                    done[n].append(_flops_of_call(flops[n]))
            if not ON_GPU:
                probes.append(measure_cpu_peak(reps=1, fresh=True))

        benchmark.group = group
        benchmark.extra_info.update(PROVENANCE)
        benchmark.extra_info.update({"provider": "+".join(names), "paired": True, **info})
        benchmark.pedantic(one_round, setup=_flush_l2, rounds=rounds, iterations=1)
        return from_times(times, group=group, flops=done or None, probes=probes, **info)

    def from_times(times: dict, *, group: str, flops: dict | None = None, probes: list | None = None, **info):
        """Records for providers timed interleaved elsewhere (``times``: {provider: [seconds per
        round]}, e.g. inside the ranks of a distributed run), as `paired` makes them. ``flops``:
        {provider: FLOPs of one call, or a list of each round's}."""
        names = list(times)
        rounds = len(times[names[0]])
        peak = statistics.median(probes) if probes else (_device_peak()[0] if flops else None)
        medians, per_round = {}, {}
        for n in names:
            med = statistics.median(times[n])
            per_round[n] = statistics.median(a / b for a, b in zip(times[n], times[names[0]]))
            f = (flops or {}).get(n)
            flop_s = None
            if f:
                flop_s, f = _rate(f if isinstance(f, list) else [f] * rounds, times[n])
            _RESULTS.append({"group": group, "provider": n, "median_s": med, "min_s": min(times[n]), "rounds": rounds,
                             "peak_bytes": None, "flop_s": flop_s,
                             "min_bytes_gbps": _gbps(info, med),
                             "peak_fraction": flop_s / peak if flop_s else None,
                             "device_peak_flop_s": peak if flop_s else None,
                             "peak_probes": probes or None,
                             "paired_with": names, "round_ratio_median": per_round[n],
                             **info, **({"flops": f} if f else {})})
            medians[n] = med
        line = (f"bench: {group} | interleaved over {rounds} rounds: "
                + ", ".join(f"{n} median {medians[n] * 1e3:.3f} ms" for n in names) + "; per-round time / "
                + f"{names[0]}'s: " + ", ".join(f"{n} {per_round[n]:.3f}" for n in names[1:]))
        if probes:
            line += (f"; matmul peak probed beside the rounds: median {peak / 1e12:.3f} TFLOP/s "
                     f"({min(probes) / 1e12:.3f}-{max(probes) / 1e12:.3f})")
        if reporter is not None and capture is not None:
            with capture.global_and_fixture_disabled():
                reporter.ensure_newline()
                reporter.write_line(line)
        _write_results()
        return medians

    run.paired = paired
    run.from_times = from_times
    return run


def _flops_of_call(flops) -> float:
    """The FLOPs of the call just made: ``flops``, or ``flops()`` where a provider's work varies
    from call to call."""
    return float(flops() if callable(flops) else flops)


def _rate(flops: list[float], seconds: list[float]) -> tuple[float, float]:
    """(achieved FLOP/s, mean FLOPs of a call) over rounds: the median of each round's FLOPs
    over its time. A provider that alternates between inputs of unequal work (two batches) is
    then not credited with the mean work at the time of its slower input, or the faster one."""
    if len(flops) != len(seconds) or not flops:
        raise ValueError(f"{len(flops)} FLOP counts for {len(seconds)} timed rounds")
    if len(set(flops)) == 1:  # the same work every round: over the median time
        return flops[0] / statistics.median(seconds), flops[0]
    return statistics.median(f / t for f, t in zip(flops, seconds)), statistics.fmean(flops)


def _gbps(info: dict, median_s: float) -> float | None:
    """Achieved bandwidth against the least traffic the op needs (benchmarks that pass ``min_bytes``)."""
    return info["min_bytes"] / median_s / 1e9 if "min_bytes" in info else None


_PEAK: tuple[float, str] | None = None


def _device_peak() -> tuple[float, str]:
    """The device's peak FLOP/s, measured (CPU) or looked up (GPU) once per session."""
    global _PEAK
    if _PEAK is None:
        from olmoearth_fast.perf import peak_flops

        _PEAK = peak_flops("cuda" if ON_GPU else "cpu")
        PROVENANCE["peak_flop_s"], PROVENANCE["peak_source"] = _PEAK
    return _PEAK


def _grouped() -> dict[str, list[dict]]:
    """Records by group, each with its speed ratios against the group's `ref_best` and `ref`
    records (reference median / provider median), where the group has them."""
    groups: dict[str, list[dict]] = {}
    for r in _RESULTS:
        groups.setdefault(r["group"], []).append(r)
    for rows in groups.values():
        refs = {name: next((r for r in rows if r["provider"] == name), None) for name in ("ref_best", "ref")}
        for r in rows:
            for name, ref in refs.items():
                r[f"speedup_vs_{name}"] = ref["median_s"] / r["median_s"] if ref else None
    return groups


def _write_results() -> None:
    table = [r for rows in _grouped().values() for r in rows]
    # OLMOEARTH_BENCH_LAST_RUN: somewhere else (the device programme publishes it after every case)
    out = os.environ.get("OLMOEARTH_BENCH_LAST_RUN") or os.path.join(os.path.dirname(__file__), "last_run.json")
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"provenance": PROVENANCE, "results": table}, f, indent=1)
    os.replace(tmp, out)


def pytest_terminal_summary(terminalreporter):
    if not _RESULTS:
        return
    groups = _grouped()
    tr = terminalreporter
    tr.section(f"olmoearth_fast vs reference ({PROVENANCE['device']}, torch {PROVENANCE['torch']}, "
               f"triton {PROVENANCE['triton']}, {PROVENANCE['git_sha']})")
    if _PEAK is not None:
        tr.write_line(f"peak: {_PEAK[0] / 1e12:.3f} TFLOP/s ({_PEAK[1]})")
    for group, rows in groups.items():
        head = next((r for r in rows if r["provider"] == "ref_best"), None) or \
            next((r for r in rows if r["provider"] == "ref"), None)
        work = next((r["work_ratio"] for r in rows if r.get("work_ratio")), None)
        tr.write_line(group + (f"  (work ratio ref/ours {work:.2f})" if work else ""))
        for r in rows:
            ratios = "".join(f"  {r[f'speedup_vs_{n}']:6.2f}x vs {n:<8}" for n in ("ref_best", "ref")
                             if r.get(f"speedup_vs_{n}"))
            mem = "" if r["peak_bytes"] is None else f"  peak {r['peak_bytes'] / 2**20:9.1f} MiB"
            if head and head["peak_bytes"] and r["peak_bytes"]:
                mem += f" ({head['peak_bytes'] / max(r['peak_bytes'], 1):.1f}x less)"
            if r.get("min_bytes_gbps") is not None:
                mem += f"  {r['min_bytes_gbps']:7.1f} GB/s"
            if r.get("flop_s"):
                probed = " (probed beside it)" if r.get("peak_probes") else ""
                mem += f"  {r['flop_s'] / 1e12:7.3f} TFLOP/s {100 * r['peak_fraction']:4.0f}% of peak{probed}"
            tr.write_line(f"  {r['provider']:<14} {r['median_s'] * 1e3:10.3f} ms" + ratios + mem)
    _write_results()
