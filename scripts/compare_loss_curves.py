"""Train ours and the reference side by side on the same batches and compare the loss curves.

    python scripts/compare_loss_curves.py --steps 100 --size nano [--device auto|cpu|cuda] [--out curves.json]
    python scripts/compare_loss_curves.py --compare compiled --steps 200   # ours eager vs compiled
    for s in 0 1 2 3 4 5 6 7; do python scripts/compare_loss_curves.py --steps 200 --out run$s.json \\
        trainer.init_seed=$s; done; python scripts/compare_loss_curves.py --combine run*.json
    python scripts/compare_loss_curves.py --steps 200 --size base_shallow_decoder --device cuda \\
        [--batch 64 --micro 32 --patch-size 4 --hw-p 8 --token-budget 2250 --lr 2e-4] [a.b=value ...]

Both start from the same weights (the reference model's random init, imported into ours), see
the same rank batches (same crops, same two masks per sample) and use the same optimizer,
schedule and clipping; dropout draws (band dropout, DropPath) are independent, so the curves
agree within noise, not bit for bit. The reference walks its modalities in the order of a
Python set, so its band-dropout draws (and, through the random generator the two sides share,
ours from the second step on) follow the process's string hashing: a run repeats exactly only
with `PYTHONHASHSEED` set (the setup line shows it). Prints mean losses over windows of steps
and a verdict: two t-tests on the windows' mean differences, for a constant offset and for a
drift (`within_noise`); `--combine` judges several runs together, for a difference common to them
(`across_runs`). `--compare self` runs ours against a second copy of ours, which differ only
in their dropout draws (side A takes the DropPath the loader planned with each batch, side B
draws its own): the noise itself, on which the verdict's false-alarm rate can be checked.

Both run on one device (`--device`, auto = cuda when available). On CUDA both use bf16 autocast
with fp32 losses (ours through `Trainer`, the reference as `benchmarks/bench_train_step.py`
drives it), and the batch defaults to the GPU benchmark's shape (B=64 in microbatches of 32,
p=4, hw_p=8, token budget 2250, lr 2e-4) instead of the CPU demo's (B=16, p=4, hw_p=4, token
budget 600, lr 1e-3), which is too small to mean much for a base model on a GPU. Any other
field: dotted overrides (`optim.lr=...`, `data.global_batch_size=...`) after the options.
`--time-limit` stops after the step that crosses it and still writes and prints what it has
(the JSON is also rewritten after every window).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from reference_step import ReferenceStep, copy_weights, reference_model  # noqa: E402

from olmoearth_fast import experiments  # noqa: E402
from olmoearth_fast.checkpoint import import_reference_state_dict  # noqa: E402
from olmoearth_fast.config import apply_overrides  # noqa: E402
from olmoearth_fast.data.demo import ensure_demo_dataset  # noqa: E402
from olmoearth_fast.trainer import Trainer, build_loader, build_model, cuda_allocator_stats, lr_at  # noqa: E402

# (batch, microbatch, patch size, hw_p, token budget, lr) when an option is not given
CPU_DEFAULTS = (16, 16, 4, 4, 600, 1e-3)  # experiments.demo
GPU_DEFAULTS = (64, 32, 4, 8, 2250, 2e-4)  # bench_train_step's GPU shape, exp14's token budget


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False")
    return torch.device(name)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Inline:
    """An executor that runs each task when it is submitted, in the calling thread."""

    def submit(self, fn, *args) -> Future:
        f = Future()
        f.set_result(fn(*args))
        return f

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass


def paired_windows(ours: list[float], ref: list[float], window: int) -> list[dict]:
    """Window means of both curves and of their paired difference d = ours - ref.

    Both see the same batch at every step, so d is free of the batch-to-batch spread; what is
    left is dropout draws and the drift of the two models' states apart and back.
    """
    rows = []
    for s in range(0, min(len(ours), len(ref)), window):
        o, r = ours[s:s + window], ref[s:s + window]
        k = len(o)
        rows.append({"first": s + 1, "last": s + k, "steps": k, "ours": sum(o) / k, "ref": sum(r) / k,
                     "diff": sum(a - b for a, b in zip(o, r)) / k})
    return rows


def t_two_sided_p(t: float, dof: int) -> float:
    """P(|T| >= |t|) for Student's t with an integer number of degrees of freedom (the closed
    forms of Abramowitz & Stegun 26.7.3 and 26.7.4)."""
    if dof < 1:
        raise ValueError(f"dof must be >= 1, got {dof}")
    if math.isinf(t):
        return 0.0
    theta = math.atan2(abs(t), math.sqrt(dof))
    s, c = math.sin(theta), math.cos(theta)
    if dof % 2:  # odd: (2/pi) (theta + sin(theta) (cos + 2/3 cos^3 + 2*4/(3*5) cos^5 + ...))
        term = total = c if dof > 1 else 0.0
        for k in range(3, dof - 1, 2):
            term *= c * c * (k - 1) / k
            total += term
        inside = 2.0 / math.pi * (theta + s * total)
    else:  # even: sin(theta) (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...)
        term = total = 1.0
        for k in range(2, dof - 1, 2):
            term *= c * c * (k - 1) / k
            total += term
        inside = s * total
    return min(1.0, max(0.0, 1.0 - inside))


def mean_t_test(xs: list[float]) -> tuple[float, float, float]:
    """(mean, its standard error, two-sided p of a zero mean) of independent values xs (at
    least 2): Student's t with len(xs) - 1 degrees of freedom."""
    n = len(xs)
    mean = sum(xs) / n
    se = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1) / n)
    return mean, se, (t_two_sided_p(mean / se, n - 1) if se > 0 else float(mean == 0))


def within_noise(windows: list[dict], alpha: float = 0.01) -> dict:
    """Verdict on the full windows' mean differences m_1..m_W (batch means).

    The per-step differences are not independent: the two models' states drift apart and back
    over tens of steps, so a window's 20 differences share much of their noise and a z-score from
    their own spread overstates the evidence (ours against ours, differing only in dropout
    draws, failed such a test in most 200-step runs). Window means are nearly independent of
    one another, and their spread includes the drift. Two t-tests on them:

    * offset: mean(m) against sd(m) / sqrt(W), W - 1 degrees of freedom;
    * drift: the least-squares slope of m over the window index against its standard error,
      W - 2 degrees of freedom (a difference that grows, or starts part-way);

    each at level alpha / 2, so that a run of two curves computing the same thing is judged
    to differ with probability about alpha. Needs at least 4 full windows.
    """
    k = max((row["steps"] for row in windows), default=0)
    m = [row["diff"] for row in windows if row["steps"] == k]
    n_w = len(m)
    biggest = max((abs(row["diff"]) for row in windows), default=float("nan"))
    out = {"ok": False, "windows": n_w, "mean_diff": float("nan"), "se": float("nan"), "slope": float("nan"),
           "p_offset": float("nan"), "p_drift": float("nan"), "max_abs_diff": biggest}
    if n_w < 4:
        out["text"] = f"curves too short to judge: {n_w} full windows, the verdict needs 4"
        return out
    mean, se, p_offset = mean_t_test(m)
    xs = [i - (n_w - 1) / 2 for i in range(n_w)]
    sxx = sum(x * x for x in xs)
    slope = sum(x * y for x, y in zip(xs, m)) / sxx
    resid = sum((y - mean - slope * x) ** 2 for x, y in zip(xs, m)) / (n_w - 2)
    se_slope = math.sqrt(resid / sxx)
    p_drift = t_two_sided_p(slope / se_slope, n_w - 2) if se_slope > 0 else float(slope == 0)
    ok = min(p_offset, p_drift) >= alpha / 2
    text = (f"curves {'agree within noise' if ok else 'DIFFER beyond noise'}: mean difference {mean:+.4f} "
            f"(standard error {se:.4f} from {n_w} windows of {k} steps; offset p = {p_offset:.3f}, drift "
            f"p = {p_drift:.3f}, limit {alpha / 2:g} each); largest window difference {biggest:.4f}")
    out.update(ok=ok, mean_diff=mean, se=se, slope=slope, p_offset=p_offset, p_drift=p_drift, text=text)
    return out


def across_runs(verdicts: list[dict], alpha: float = 0.01) -> dict:
    """Verdict over several runs (other seeds: ``trainer.init_seed=N``), from their
    `within_noise` results.

    One run's verdict raises false alarms somewhat more often than its level: a trajectory can
    jump once early on and stay apart for the whole run (at nano, one seed in ten, ours against
    the reference and ours against ours alike). A difference between the implementations is
    common to the runs instead. So: t-tests of the runs' mean differences for a common offset,
    and of their slopes (per window) for a common drift, R - 1 degrees of freedom each, at
    alpha / 2 each. Needs 3 runs or more (its power grows with them: 8 or more to find an
    offset a few times a run's standard error).
    """
    runs = [v for v in verdicts if math.isfinite(v.get("mean_diff", float("nan")))
            and math.isfinite(v.get("slope", float("nan")))]
    r = len(runs)
    alarms = sum(not v["ok"] for v in runs)
    out = {"ok": False, "runs": r, "alarms": alarms, "mean_diff": float("nan"), "se": float("nan"),
           "p_offset": float("nan"), "p_drift": float("nan")}
    if r < 3:
        out["text"] = f"too few runs to judge across them: {r} judged, the verdict needs 3"
        return out
    mean, se, p_offset = mean_t_test([v["mean_diff"] for v in runs])
    _, _, p_drift = mean_t_test([v["slope"] for v in runs])
    ok = min(p_offset, p_drift) >= alpha / 2
    text = (f"over {r} runs the curves {'agree within noise' if ok else 'DIFFER beyond noise'}: mean difference "
            f"{mean:+.4f} (standard error {se:.4f}; common offset p = {p_offset:.3f}, common drift p = "
            f"{p_drift:.3f}, limit {alpha / 2:g} each); {alarms} of {r} runs alarmed on their own")
    out.update(ok=ok, mean_diff=mean, se=se, p_offset=p_offset, p_drift=p_drift, text=text)
    return out


def combine(paths: list[str], window: int) -> dict:
    """`across_runs` of the runs written by ``--out`` (their windows judged again at ``window``
    steps), printing a line per run and the verdict."""
    verdicts = []
    for path in paths:
        try:
            run = json.loads(Path(path).read_text())
            n = min(len(run["ours"]), len(run["ref"]))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"--combine: {path} is not a run written by --out ({type(e).__name__}: {e})")
        v = within_noise(paired_windows(run["ours"][:n], run["ref"][:n], window))
        partial = "" if run.get("complete", True) else f", {n} of {run.get('setup', {}).get('steps', '?')} steps"
        print(f"{path} (init seed {run.get('setup', {}).get('init_seed', '?')}{partial}): {v['text']}")
        verdicts.append(v)
    verdict = across_runs(verdicts)
    print(verdict["text"])
    return verdict


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--size", default="nano")
    ap.add_argument("--window", type=int, default=20)
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--batch", type=int, default=None, help="global (= rank) batch size")
    ap.add_argument("--micro", type=int, default=None, help="rank microbatch size")
    ap.add_argument("--patch-size", type=int, default=None)
    ap.add_argument("--hw-p", type=int, default=None, help="crop size in patches")
    ap.add_argument("--token-budget", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--samples", type=int, default=256, help="demo dataset size")
    ap.add_argument("--time-limit", type=float, default=None, help="seconds; stop after the step that crosses it")
    ap.add_argument("--out", default=None)
    ap.add_argument("--compare", choices=("ref", "compiled", "self"), default="ref",
                    help="ref: ours vs the reference's fastest configuration; compiled: ours eager vs ours with "
                         "trainer.compile=true (both with the loader's DropPath draws, planned per batch); self: ours "
                         "vs a second copy of ours, which differ only in their dropout draws (band dropout and "
                         "DropPath: the copy plans its batches itself), the noise the verdict judges against. "
                         "The JSON keeps the keys 'ours' for side A and 'ref' for side B")
    ap.add_argument("--combine", nargs="+", metavar="RUN.json", default=None,
                    help="judge runs written by --out (e.g. one per trainer.init_seed) together, without training: "
                         "each run's verdict, then a test for an offset or drift common to them (`across_runs`)")
    args, overrides = ap.parse_known_args()
    if args.combine:
        if overrides:
            ap.error(f"--combine trains nothing: unexpected {' '.join(overrides)}")
        combine(args.combine, args.window)
        return
    device = _device(args.device)
    defaults = GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    given = (args.batch, args.micro, args.patch_size, args.hw_p, args.token_budget, args.lr)
    batch, micro, p, hw, budget, lr = (d if g is None else g for g, d in zip(given, defaults))
    micro = min(micro, batch)
    t_start = time.perf_counter()

    root = ensure_demo_dataset("runs/demo_data" if args.samples == 256 else f"runs/demo_data_{args.samples}",
                               num_samples=args.samples)
    cfg = experiments.demo(experiments.get("exp14"))
    cfg = apply_overrides(cfg, [f"data.dataset={root}", f"model.size={args.size}", "data.num_workers=0",
                                f"trainer.max_steps={args.steps}", "checkpoint.dir=runs/compare",
                                f"data.global_batch_size={batch}", f"data.rank_microbatch_size={micro}",
                                f"data.patch_sizes=[{p}]", f"data.hw_p_list=[{hw}]", f"data.token_budget={budget}",
                                f"optim.lr={lr}", *overrides])
    d = cfg.data
    setup = {"size": args.size, "device": str(device), "steps": args.steps,
             "batch": d.global_batch_size, "microbatch": d.rank_microbatch_size, "patch_sizes": list(d.patch_sizes),
             "hw_p_list": list(d.hw_p_list), "token_budget": d.token_budget, "lr": cfg.optim.lr,
             "warmup_steps": cfg.schedule.warmup_steps, "dtype": "bf16 autocast" if device.type == "cuda" else "fp32",
             "init_seed": cfg.trainer.init_seed, "torch": torch.__version__,
             "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
             # the reference walks its modalities in a set's order (string hashing), and so draws
             # its band dropout in an order that changes from process to process unless it is set
             "python_hash_seed": os.environ.get("PYTHONHASHSEED", "random")}
    print("setup: " + ", ".join(f"{k}={v}" for k, v in setup.items()), flush=True)

    loader = build_loader(cfg, 0, 1, "runs/compare")
    torch.manual_seed(cfg.trainer.init_seed)
    init = reference_model(cfg, "feb")  # the shared initial weights (Conv2d layout)

    def our_trainer(compile_blocks: bool | None):
        model = build_model(cfg, torch.device("cpu"))
        import_reference_state_dict(model, init.state_dict())
        c = cfg if compile_blocks is None else apply_overrides(cfg, [f"trainer.compile={compile_blocks}"])
        return Trainer(c, loader, model.to(device), device, "runs/compare", log=lambda *a: None)

    # side A ("ours" in the JSON) and side B ("ref"), each a step function returning the loss
    if args.compare == "ref":
        labels = ("ours", "ref")
        trainer = our_trainer(None)
        ref_model = reference_model(cfg, "best", device.type)
        copy_weights(ref_model, init)
        ref = ReferenceStep(ref_model, cfg, "best", device=device)

        def step_b(b, step):
            for g in ref.opt.param_groups:
                g["lr"] = lr_at(step, cfg, args.steps)
            return float(ref(b).detach())
    else:  # ours vs ours (compiled, or a second eager copy), from the same weights on the same batches
        labels = ("eager", "compiled") if args.compare == "compiled" else ("ours_a", "ours_b")
        trainer, other = our_trainer(False), our_trainer(args.compare == "compiled")

        def step_b(b, step):
            if args.compare == "self":  # side B draws its DropPath itself, not the batch's planned draws
                b = replace(b, plans=None)
            return other.train_step(b)[0].loss
    setup["sides"] = list(labels)
    print(f"comparing {labels[0]} (A) with {labels[1]} (B)", flush=True)

    # on CUDA, rank batches are made on the CPU one step ahead, in a thread, while the device
    # trains; on CPU between the steps (a thread would take cores from whichever side's step it
    # overlaps, and time it). The batch of step s is the same either way (make_batch(epoch,
    # index) is deterministic)
    def make(s):
        return loader.make_batch(1 + s // len(loader), s % len(loader))

    pool = ThreadPoolExecutor(max_workers=1) if device.type == "cuda" else _Inline()
    ahead: deque = deque(pool.submit(make, s) for s in range(min(2, args.steps)))
    curves: dict[str, list[float]] = {"ours": [], "ref": []}
    times = {"ours": 0.0, "ref": 0.0}
    step_times: dict[str, list[float]] = {"ours": [], "ref": []}
    peak = {"ours": 0.0, "ref": 0.0}
    # the CUDA caching allocator's driver calls during each side's steps (`cuda_allocator_stats`)
    alloc = {k: {"ours": 0, "ref": 0} for k in ("device_allocs", "alloc_retries")}
    wait_s = 0.0
    stopped = None

    def timed(name, fn):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            before = cuda_allocator_stats(device)
        t0 = time.perf_counter()
        value = fn()
        _sync(device)
        dt = time.perf_counter() - t0
        times[name] += dt
        step_times[name].append(dt)
        if device.type == "cuda":
            after = cuda_allocator_stats(device)
            peak[name] = max(peak[name], after["mem_gib"])
            for key in alloc:
                alloc[key][name] += after[key] - before[key]
        return value

    def write(final: bool) -> None:
        if not args.out:
            return
        n = len(curves["ref"])
        windows = paired_windows(curves["ours"][:n], curves["ref"][:n], args.window)
        result = {**curves, "windows": windows, "verdict": within_noise(windows),
                  "setup": setup, "steps_done": n, "complete": n == args.steps, "stopped": stopped,
                  "times_s": times, "step_times_s": step_times, "batch_wait_s": wait_s,
                  "peak_gib": peak if device.type == "cuda" else None,
                  **{k: v if device.type == "cuda" else None for k, v in alloc.items()}, "final": final}
        tmp = Path(args.out + ".tmp")
        tmp.write_text(json.dumps(result))
        tmp.replace(args.out)

    t_loop = time.perf_counter()
    print(f"start-up {t_loop - t_start:.1f}s; training {args.steps} steps", flush=True)
    for step in range(args.steps):
        t0 = time.perf_counter()
        batch = ahead.popleft().result()
        wait_s += time.perf_counter() - t0
        if step + 2 < args.steps:
            ahead.append(pool.submit(make, step + 2))
        stats, _ = timed("ours", lambda b=batch: trainer.train_step(b))
        curves["ours"].append(stats.loss)
        curves["ref"].append(timed("ref", lambda b=batch, s=step: step_b(b, s)))
        done = step + 1
        if done % args.window == 0 or done == args.steps:
            w = curves["ours"][-args.window:], curves["ref"][-args.window:]
            print(f"step {done:>5}/{args.steps}: {labels[0]} {sum(w[0]) / len(w[0]):.4f}  {labels[1]} "
                  f"{sum(w[1]) / len(w[1]):.4f}  | {labels[0]} {times['ours']:.1f}s {labels[1]} {times['ref']:.1f}s "
                  f"| {time.perf_counter() - t_start:.0f}s elapsed", flush=True)
            write(final=False)
        if args.time_limit is not None and time.perf_counter() - t_start > args.time_limit and done < args.steps:
            stopped = f"time limit {args.time_limit:.0f}s reached after {done} of {args.steps} steps"
            print("STOPPED: " + stopped, flush=True)
            break
    for f in ahead:
        f.cancel()
    pool.shutdown(wait=True, cancel_futures=True)

    n = len(curves["ref"])
    w = args.window
    windows = paired_windows(curves["ours"][:n], curves["ref"][:n], w)
    print(f"{'steps':>12} {labels[0]:>8} {labels[1]:>8} {'diff':>8}")
    for row in windows:
        print(f"{row['first']:>5}-{row['last']:<6} {row['ours']:8.4f} {row['ref']:8.4f} {row['diff']:+8.4f}")
    verdict = within_noise(windows)
    print(verdict["text"])
    bad = [k for k, v in curves.items() if any(not math.isfinite(x) for x in v)]
    if bad:
        print(f"WARNING: non-finite losses in {', '.join(bad)}")
    # steady state: without the first window (compilation, autotuning, allocator warm-up)
    skip = min(w, n - 1) if n > 1 else 0
    steady = {k: sum(v[skip:]) / max(1, len(v[skip:])) for k, v in step_times.items()}
    print(f"time: {labels[0]} {times['ours']:.1f}s, {labels[1]} {times['ref']:.1f}s "
          f"({times['ref'] / max(times['ours'], 1e-9):.2f}x); "
          f"per step after step {skip}: {labels[0]} {steady['ours'] * 1e3:.0f} ms, {labels[1]} {steady['ref'] * 1e3:.0f} ms "
          f"({steady['ref'] / max(steady['ours'], 1e-9):.2f}x); waited {wait_s:.1f}s for batches")
    if device.type == "cuda":
        print(f"peak memory per step: {labels[0]} {peak['ours']:.2f} GiB, {labels[1]} {peak['ref']:.2f} GiB "
              "(both models resident)")
    write(final=True)


if __name__ == "__main__":
    main()
