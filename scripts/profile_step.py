"""Where the time of one exp14 training step goes: ours next to the reference's fastest config.

    python scripts/profile_step.py --size tiny --batch 8 [--steps 2] [--device cpu|cuda] [--top N] [--clock]
    python scripts/profile_step.py --size tiny --batch 8 --steps 12 --toggle residual_norm

Runs the `benchmarks/bench_train_step.py` setup (same weights, same masked batches, exp14,
p=4, hw_p=6 on CPU) under `torch.profiler` for ``--steps`` steps after a warm-up step and sorts
every operator's self time into: matmul (Linear, conv, bmm and their backward), attention
(SDPA kernels, our segment-attention op), elementwise and norms, data movement and indexing
(copies, cat, gather/scatter, fills), optimizer (the AdamW update), other ops; "Python /
dispatch" is the step's wall time minus the operators' time (framework overhead between
kernels). Prints one Markdown table, ending with the number of computing operators of one more
step (views excluded; on a GPU each launches a kernel, so with small matmuls the host's
dispatch of them can bound the step).
On CUDA the device time of each kernel is used instead (self CUDA time).

``--toggle NAME`` (e.g. ``residual_norm``): ours only, step by step with ``ops.NAME``'s kernel on
and off in turn (on, off, off, on, ...; its ``kernel_available`` patched, so the op takes its
reference path, the PyTorch ops), ``--steps`` rounds after a warm-up step on each batch in each
state: what that kernel saves in the step, side by side on a drifting machine.

``--clock`` (CPU): no profiler. torch.profiler inflates the step (tiny: ~1.47 s profiled against
1.13-1.25 s timed) and the self time of small C++ ops most. Instead each operator below autograd
is timed with a clock around its call (a `TorchDispatchMode`; its Python hook adds up to ~10%
to the step, printed as the clocked step minus the plain one); the table sorts those times into the same categories, and "between operators" is the
clocked step minus their sum. In a second pass over the same steps each GEMM (``mm``,
``addmm``) is also timed a second and third time at once, on the same operands, into a scratch
output: the first rate is the GEMM in the step, with its operands where the step left them in
the caches; the last, with them warm. Their gap is what the memory system costs the step's
GEMMs, which a square matmul peak does not see. The operators' times come from the first pass,
without the repeats, whose cache traffic would land on the operators after each GEMM (at tiny,
one pass read bias + GELU's backward at 77 ms a step, two passes 31-43 ms).
"""

from __future__ import annotations

import argparse
import importlib
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from reference_step import ReferenceStep, copy_weights, reference_model  # noqa: E402

from olmoearth_fast import experiments, perf  # noqa: E402
from olmoearth_fast.checkpoint import import_reference_state_dict  # noqa: E402
from olmoearth_fast.config import apply_overrides  # noqa: E402
from olmoearth_fast.data.demo import ensure_demo_dataset  # noqa: E402
from olmoearth_fast.trainer import Trainer, build_loader, build_model  # noqa: E402

CATEGORIES = [
    ("attention", r"scaled_dot_product|flash_attention|efficient_attention|varlen|segment_attention"),
    ("optimizer", r"adam|_foreach|lerp|addcdiv|addcmul|_fused"),
    ("matmul", r"^aten::(mm|addmm|bmm|baddbmm|matmul|linear|conv|convolution|mkldnn_conv|_convolution|"
               r"convolution_backward|_slow_conv|mkldnn_linear)|^mkldnn::_linear_pointwise"),
    ("data movement / indexing", r"copy|cat|stack|index|gather|scatter|fill|zero|clone|contiguous|narrow|"
                                 r"split|select_backward|slice_backward|masked|where|nonzero|_to_copy|empty|"
                                 r"olmoearth_fast::(gather|scatter|varlen|merge)"),
    ("elementwise / norms", r"norm|gelu|softmax|add|mul|div|sub|exp|log|sqrt|rsqrt|pow|sum|mean|max|min|"
                            r"neg|sin|cos|upsample|clamp|abs|sign|erf|tanh|relu|bitwise|eq|ne|lt|gt|ge|le|"
                            r"logical|any|all|rand|bernoulli|reciprocal|dropout|masked_neg_loss"),
]


def categorise(name: str) -> str:
    for cat, pattern in CATEGORIES:
        if re.search(pattern, name):
            return cat
    return "other ops"


def profile_steps(step, batches, steps: int, cuda: bool, top: int = 0) -> tuple[dict[str, float], float]:
    step(batches[0])
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        for i in range(steps):
            step(batches[i % len(batches)])
        if cuda:
            torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / steps
    out: dict[str, float] = {}
    per_op: dict[str, float] = {}
    for e in prof.key_averages():
        if e.key.startswith("ProfilerStep") or e.key.startswith("autograd::") or e.key.startswith("Optimizer."):
            continue
        t = (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e6 / steps
        out[categorise(e.key)] = out.get(categorise(e.key), 0.0) + t
        per_op[e.key] = per_op.get(e.key, 0.0) + t
    for name, t in sorted(per_op.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {t:8.4f} s  {100 * t / wall:4.1f}%  [{categorise(name)}] {name}")
    return out, wall


class _Clock(TorchDispatchMode):
    """A clock around each operator call below autograd (views included: they cost dispatch);
    GEMMs timed again on warm operands (`main`'s ``--clock``)."""

    GEMMS = ("aten::mm", "aten::addmm")

    def __init__(self, repeat_gemms: bool = True):
        super().__init__()
        self.repeat_gemms = repeat_gemms
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.gemms: list[tuple[float, float, float]] = []  # (FLOPs, seconds in the step, seconds warm)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        t0 = time.perf_counter()
        out = func(*args, **kwargs)
        dt = time.perf_counter() - t0
        name = func._schema.name
        self.seconds[name] = self.seconds.get(name, 0.0) + dt
        self.calls[name] = self.calls.get(name, 0) + 1
        if self.repeat_gemms and name in self.GEMMS and isinstance(out, torch.Tensor) and out.dim() == 2:
            a = args[0] if name == "aten::mm" else args[1]
            flops = 2.0 * out.shape[0] * out.shape[1] * a.shape[1]
            scratch = torch.empty_like(out)
            overload = torch.ops.aten.mm.out if name == "aten::mm" else torch.ops.aten.addmm.out
            overload(*args, **kwargs, out=scratch)  # warms the operands and the scratch
            t1 = time.perf_counter()
            overload(*args, **kwargs, out=scratch)
            self.gemms.append((flops, dt, time.perf_counter() - t1))
        return out


def clock_steps(step, batches, steps: int) -> tuple[dict[str, float], float, float, _Clock]:
    """(seconds per step per category, plain step, clocked step, the clock) over ``steps`` steps
    after a warm-up step on each batch: the operators' times from a pass without the GEMMs'
    repeats, the clock's ``gemms`` from a second pass with them."""
    for batch in batches:
        step(batch)
    t0 = time.perf_counter()
    for i in range(steps):
        step(batches[i % len(batches)])
    plain = (time.perf_counter() - t0) / steps
    clock = _Clock(repeat_gemms=False)
    t0 = time.perf_counter()
    with clock:
        for i in range(steps):
            step(batches[i % len(batches)])
    clocked = (time.perf_counter() - t0) / steps
    with _Clock() as warm:
        for i in range(steps):
            step(batches[i % len(batches)])
    clock.gemms = warm.gemms
    out: dict[str, float] = {}
    for name, t in clock.seconds.items():
        out[categorise(name)] = out.get(categorise(name), 0.0) + t / steps
    return out, plain, clocked, clock


def gemm_rates(clock: _Clock, min_flops: float = 1e8) -> str:
    """The step's GEMMs: FLOP/s in the step and warm, and the spread over the larger calls."""
    if not clock.gemms:
        return "no GEMMs"
    flops = sum(f for f, _, _ in clock.gemms)
    cold = flops / sum(t for _, t, _ in clock.gemms)
    warm = flops / sum(t for _, _, t in clock.gemms)
    rates = sorted(f / t for f, t, _ in clock.gemms if f >= min_flops) or [cold]
    q = [rates[round(p * (len(rates) - 1))] / 1e9 for p in (0.1, 0.5, 0.9)]
    return (f"{cold / 1e9:.0f} GFLOP/s in the step (calls of >= {min_flops / 1e9:.1f} GFLOP: "
            f"10/50/90% {q[0]:.0f}/{q[1]:.0f}/{q[2]:.0f}), {warm / 1e9:.0f} GFLOP/s repeated at once on warm operands")


def toggle_steps(step, batches, rounds: int, module) -> dict[str, list[float]]:
    """Seconds of each round of ``step`` with ``module``'s kernel on and off (``module.kernel_available``
    patched), in turn: on, off, then off, on, ...; after a warm-up step on each batch in each state."""
    original = module.kernel_available
    state = {"on": True}
    module.kernel_available = lambda: state["on"] and original()
    times: dict[str, list[float]] = {"on": [], "off": []}
    try:
        for on in (True, False):
            state["on"] = on
            for batch in batches:
                step(batch)
        for i in range(rounds):
            for name in ("on", "off") if i % 2 == 0 else ("off", "on"):
                state["on"] = name == "on"
                t0 = time.perf_counter()
                step(batches[i % len(batches)])
                times[name].append(time.perf_counter() - t0)
    finally:
        module.kernel_available = original
    return times


def toggle_report(times: dict[str, list[float]]) -> str:
    """The toggle's table: median and fastest step each way, and off / on per round (its median)."""
    ratios = sorted(off / on for on, off in zip(times["on"], times["off"]))
    lines = ["| | kernel on | kernel off |", "|---|---|---|"]
    for what, f in (("median step", statistics.median), ("fastest step", min)):
        lines.append(f"| {what} | {f(times['on']):.3f} s | {f(times['off']):.3f} s |")
    lines.append(f"off / on, per round: median {statistics.median(ratios):.3f} (range {ratios[0]:.3f}-{ratios[-1]:.3f}, "
                 f"{len(ratios)} rounds)")
    return "\n".join(lines)


def count_operators(step, batch) -> int:
    """Computing operators of one step (`perf.count_operators`; run after the profiled steps:
    the count slows it)."""
    count = perf.count_operators(step, batch)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--patch-size", type=int, default=4)
    ap.add_argument("--hw-p", type=int, default=6)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--top", type=int, default=0,
                    help="also print the N operators of largest self time (with --clock: clocked time)")
    ap.add_argument("--clock", action="store_true",
                    help="CPU: time each operator with a clock instead of the profiler; GEMMs also timed warm")
    ap.add_argument("--toggle", metavar="NAME",
                    help="ours only: ops.NAME's kernel on and off step by step in turn, --steps rounds")
    args = ap.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.clock and cuda:
        ap.error("--clock times operators on the host: CPU only (on CUDA the profiler's device times are exact)")
    toggled = None
    if args.toggle:
        try:
            toggled = importlib.import_module(f"olmoearth_fast.ops.{args.toggle}")
        except ImportError:
            toggled = None
        if toggled is None or not hasattr(toggled, "kernel_available"):
            ap.error(f"--toggle {args.toggle}: not an op module with a kernel (olmoearth_fast/ops/NAME.py with "
                     "kernel_available)")
        if not toggled.kernel_available():
            ap.error(f"--toggle {args.toggle}: its kernel is not available on this machine: nothing to toggle")
    with tempfile.TemporaryDirectory() as tmp:
        root = ensure_demo_dataset(f"{tmp}/demo", num_samples=max(2 * args.batch, 32))
        cfg = apply_overrides(experiments.get("exp14"), [
            f"model.size={args.size}", f"data.dataset={root}", f"checkpoint.dir={tmp}/run",
            f"data.global_batch_size={args.batch}", f"data.rank_microbatch_size={args.batch}",
            f"data.patch_sizes=[{args.patch_size}]", f"data.hw_p_list=[{args.hw_p}]", "data.num_workers=0",
            "logging.wandb=False", "trainer.max_steps=1000"])
        loader = build_loader(cfg, 0, 1, f"{tmp}/run")
        batches = [loader.make_batch(1, i) for i in range(2)]
        work = perf.step_work(batches[0], cfg, device_type=device.type)
        torch.manual_seed(cfg.trainer.init_seed)
        init = reference_model(cfg, "feb")
        ours_model = build_model(cfg, torch.device("cpu"))
        import_reference_state_dict(ours_model, init.state_dict())
        trainer = Trainer(cfg, loader, ours_model.to(device), device, f"{tmp}/run", log=lambda *a: None)
        # ours on the same batches with the microbatch plans its loader now makes (in training,
        # in the loader's workers), as benchmarks/bench_train_step.py times it; on a GPU every
        # provider's batches page-locked, as a pin_memory DataLoader hands them over
        planned = [loader.make_batch(1, i) for i in range(2)]
        if cuda:
            batches, planned = [b.pin_memory() for b in batches], [b.pin_memory() for b in planned]
        if toggled is not None:
            times = toggle_steps(trainer.train_step, planned, args.steps, toggled)
            print(f"exp14 {args.size}, B={args.batch}, p={args.patch_size}, hw_p={args.hw_p}, {device}, "
                  f"{torch.get_num_threads()} threads: ours with ops.{args.toggle}'s kernel on and off, step by step "
                  f"in turn; seconds per step")
            print(toggle_report(times))
            return
        ref_model = reference_model(cfg, "best", device.type)
        copy_weights(ref_model, init)
        ref = ReferenceStep(ref_model, cfg, "best", device)
        results, operators, clocks, plains = {}, {}, {}, {}
        for name, step, inputs in (("ours", trainer.train_step, planned), ("ref_best", ref, batches)):
            if args.clock:
                per, plains[name], clocked, clocks[name] = clock_steps(step, inputs, args.steps)
                per["between operators"] = max(clocked - sum(per.values()), 0.0)
                results[name] = per, clocked
                operators[name] = sum(clocks[name].calls.values()) // args.steps
                if args.top:
                    print(f"{name}: the {args.top} operators of largest clocked time, seconds per step (share), "
                          f"calls per step")
                    for op, t in sorted(clocks[name].seconds.items(), key=lambda kv: -kv[1])[:args.top]:
                        t /= args.steps
                        print(f"  {t:8.4f} s  {100 * t / clocked:4.1f}%  {clocks[name].calls[op] // args.steps:5d}  "
                              f"[{categorise(op)}] {op}")
                continue
            if args.top:
                print(f"{name}: the {args.top} operators of largest self time, seconds per step (share)")
            results[name] = profile_steps(step, inputs, args.steps, cuda, args.top)
            operators[name] = count_operators(step, inputs[0])
    cats = [c for c, _ in CATEGORIES] + ["other ops", "between operators" if args.clock else "Python / dispatch"]
    how = "each operator clocked below autograd" if args.clock else "torch.profiler"
    print(f"exp14 {args.size}, B={args.batch}, p={args.patch_size}, hw_p={args.hw_p}, {device}, "
          f"{torch.get_num_threads()} threads, {how}; seconds per step (share of the step)")
    print("| | ours | ref_best |")
    print("|---|---|---|")
    for c in cats:
        cells = []
        for name in ("ours", "ref_best"):
            per, wall = results[name]
            t = max(wall - sum(per.values()), 0.0) if c == "Python / dispatch" else per.get(c, 0.0)
            cells.append(f"{t:.3f} ({100 * t / wall:.0f}%)")
        print(f"| {c} | {cells[0]} | {cells[1]} |")
    o, r = results["ours"][1], results["ref_best"][1]
    if args.clock:
        print(f"| **step (clocked)** | **{o:.3f}** | **{r:.3f}** |")
        print(f"| step, plain (no clock) | {plains['ours']:.3f} | {plains['ref_best']:.3f} |")
        print(f"| the clock's own cost (clocked − plain), inside \"between operators\" | "
              f"{o - plains['ours']:.3f} | {r - plains['ref_best']:.3f} |")
        print(f"| operator calls a step (views included) | {operators['ours']} | {operators['ref_best']} |")
        peak = perf.measure_cpu_peak(fresh=True)
        for name in ("ours", "ref_best"):
            print(f"{name}'s GEMMs: {gemm_rates(clocks[name])}")
        print(f"matmul peak probed now: {peak / 1e9:.0f} GFLOP/s")
    else:
        print(f"| **step (profiled)** | **{o:.3f}** | **{r:.3f}** |")
        print(f"| computing operators a step (each a kernel launch on a GPU) | {operators['ours']} | "
              f"{operators['ref_best']} |")
    print(f"work: ours {work.ours_total / 1e9:.1f} GFLOP, ref_best {work.ref_total / 1e9:.1f} GFLOP; "
          f"matmul-class FLOP/s: ours {work.ours_total / max(results['ours'][0].get('matmul', 0) + results['ours'][0].get('attention', 0), 1e-9) / 1e9:.0f} GFLOP/s, "
          f"ref_best {work.ref_total / max(results['ref_best'][0].get('matmul', 0) + results['ref_best'][0].get('attention', 0), 1e-9) / 1e9:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
