"""A GPU step-time floor on paper, for ours and for the reference, from the work model.

    python scripts/gpu_floor.py [--size base_shallow_decoder] [--batch 64 --micro 32 --patch-size 4 --hw-p 8]

Builds real exp14 rank batches from the loader (demo data: its masks, crops and missing-data
pattern), counts their work with `olmoearth_fast.perf.step_work`, and turns it into a time floor
per component on an H100 SXM and an H200: FLOPs at the bf16 dense tensor-core peak, bytes at
HBM bandwidth (`perf.gpu_traffic`'s model), the larger of the two, summed, plus kernel launches
at 4 µs each. Real kernels reach 50-75% of peak at best, so real steps are slower; the ratio of
the floors is the prediction. A prediction until a GPU measures it (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import tempfile

from olmoearth_fast import experiments, perf
from olmoearth_fast.config import apply_overrides
from olmoearth_fast.data.demo import ensure_demo_dataset
from olmoearth_fast.trainer import build_loader

COMPONENTS = ("patch_embed", "encoder_linear", "encoder_attention", "decoder_linear", "decoder_attention", "loss")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="base_shallow_decoder")
    ap.add_argument("--batch", type=int, default=64, help="rank batch")
    ap.add_argument("--micro", type=int, default=32, help="rank microbatch")
    ap.add_argument("--patch-size", type=int, default=4)
    ap.add_argument("--hw-p", type=int, default=8)
    ap.add_argument("--batches", type=int, default=4, help="rank batches averaged")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = ensure_demo_dataset(f"{tmp}/demo", num_samples=args.batch * args.batches)
        cfg = apply_overrides(experiments.get("exp14"), [
            f"model.size={args.size}", f"data.dataset={root}", f"checkpoint.dir={tmp}/run",
            f"data.global_batch_size={args.batch}", f"data.rank_microbatch_size={args.micro}",
            f"data.patch_sizes=[{args.patch_size}]", f"data.hw_p_list=[{args.hw_p}]", "data.num_workers=0"])
        loader = build_loader(cfg, 0, 1, f"{tmp}/run")
        work = perf.Work()
        for i in range(args.batches):
            work.add(perf.step_work(loader.make_batch(1, i), cfg, device_type="cuda"))
    n = args.batches
    for side in (work.ours, work.ref, work.tokens):
        for k in side:
            side[k] /= n
    print(f"exp14 {args.size}, rank batch {args.batch} in microbatches of {args.micro}, p={args.patch_size}, "
          f"hw_p={args.hw_p}; mean of {n} demo batches (a prediction on paper, not a measurement)")
    print(f"work: ours {work.ours_total / 1e12:.2f} TFLOP, reference {work.ref_total / 1e12:.2f} TFLOP "
          f"(work ratio {work.ratio:.2f})")
    for name, spec in (("H100 SXM", perf.GPU_SPECS["H100"]), ("H200", perf.GPU_SPECS["H200"])):
        floors = {side: perf.gpu_step_floor(work, cfg.model, side, spec) for side in ("ours", "ref")}
        print(f"\n{name}: {spec[0] / 1e12:.0f} TFLOP/s bf16 dense, {spec[1] / 1e12:.2f} TB/s")
        print("| component | ours ms (flop / byte floor) | reference ms (flop / byte floor) |")
        print("|---|---|---|")
        for k in COMPONENTS:
            cells = []
            for side in ("ours", "ref"):
                f = floors[side]
                cells.append(f"{f.component(k) * 1e3:.2f} ({f.flops_s.get(k, 0) * 1e3:.2f} / "
                             f"{f.bytes_s.get(k, 0) * 1e3:.2f})")
            print(f"| {k} | {cells[0]} | {cells[1]} |")
        print(f"| launches × 4 µs | {floors['ours'].launch_s * 1e3:.2f} ({floors['ours'].launches}) | "
              f"{floors['ref'].launch_s * 1e3:.2f} ({floors['ref'].launches}) |")
        o, r = floors["ours"].total, floors["ref"].total
        ko, kr = o - floors["ours"].launch_s, r - floors["ref"].launch_s
        print(f"| kernels alone (launches hidden) | {ko * 1e3:.1f} ms | {kr * 1e3:.1f} ms |")
        print(f"| **step floor** | **{o * 1e3:.1f} ms** | **{r * 1e3:.1f} ms** |")
        print(f"ratio of the kernel floors alone: {kr / ko:.2f}")
        print(f"predicted ratio reference / ours: {r / o:.2f}; per sample: ours {o / args.batch * 1e3:.3f} ms, "
              f"reference {r / args.batch * 1e3:.3f} ms")


if __name__ == "__main__":
    main()
