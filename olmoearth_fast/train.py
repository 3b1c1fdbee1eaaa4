"""Launcher: `torchrun --nproc_per_node=N -m olmoearth_fast.train exp14 data.dataset=/path [a.b=c ...]`.

Also `python -m olmoearth_fast.train exp14 ...` (one process), `--demo` (nano model on the
generated demo dataset, minutes on a CPU, ending with kNN accuracy before and after training),
`--dry-run` (print the resolved config as JSON and exit), `--resume` (continue from the latest
checkpoint of the run directory), `--init-from PATH` (start from a reference checkpoint's or
another run's weights), `--export DIR` (write the latest checkpoint in the reference layout).

A run set up wrong stops before training with one line naming the problem and the fix, exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist

from olmoearth_fast import checkpoint as ckpt
from olmoearth_fast import experiments, perf
from olmoearth_fast.config import dumps
from olmoearth_fast.errors import UserError, UserFileExistsError, UserValueError
from olmoearth_fast.trainer import Trainer, build_loader, build_model, loader_core_contention, plot_history


def parse(argv=None):
    ap = argparse.ArgumentParser(prog="olmoearth_fast.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("experiment", nargs="?", default=None, help="exp1 … exp17 or a reference key")
    ap.add_argument("--demo", action="store_true", help="nano model, demo dataset, a few minutes on CPU")
    ap.add_argument("--dry-run", action="store_true", help="print the resolved config as JSON and exit")
    ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    ap.add_argument("--init-from", metavar="PATH", help="initial weights: a reference checkpoint directory "
                    "(config.json + weights.pth), a weights .pth, or a run directory / step_*.pt of ours")
    ap.add_argument("--export", metavar="DIR", help="write the run's latest checkpoint in the reference layout "
                    "(config.json + weights.pth for olmoearth_pretrain.model_loader) to DIR and exit")
    args, rest = ap.parse_known_args(argv)
    if args.experiment is not None and "=" in args.experiment:  # `--demo a.b=c`: an override, not a name
        rest.insert(0, args.experiment)
        args.experiment = None
    if args.experiment is None and not args.demo:
        raise UserValueError("name an experiment (e.g. `exp14 data.dataset=/path/to/h5_dataset`) or pass --demo")
    cfg = experiments.resolve(args.experiment, rest, demo_run=args.demo)
    cfg.checkpoint.resume = cfg.checkpoint.resume or args.resume
    return cfg, args


def run(cfg, args, rank: int, world_size: int) -> None:
    if args.dry_run:
        print(dumps(cfg))
        return
    log = print if rank == 0 else (lambda *a, **k: None)
    run_dir = cfg.checkpoint.dir.format(run_name=cfg.logging.run_name or cfg.name)
    if args.export:
        model = build_model(cfg, torch.device("cpu"))
        ckpt.init_from(model, cfg, ckpt.latest_checkpoint(run_dir))
        ckpt.export_reference(model, cfg, args.export)
        return log(f"exported {run_dir} to {args.export}")
    cuda = torch.cuda.is_available()
    device = (torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")) \
        if cfg.trainer.device == "auto" else torch.device(cfg.trainer.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    existing = ckpt.checkpoints(run_dir)
    if existing and not (cfg.checkpoint.resume or cfg.checkpoint.overwrite):
        raise UserFileExistsError(f"{run_dir} already holds a run (checkpoint of step {existing[-1][0]}): pass "
                                  "--resume to continue it, checkpoint.dir=... for a new run, or "
                                  "checkpoint.overwrite=true to start again there")
    loader = build_loader(cfg, rank, world_size, run_dir, pin_memory=device.type == "cuda")
    if (note := loader_core_contention(cfg.data.num_workers, device)) is not None:
        log(note)
    model = build_model(cfg, device)
    state = ckpt.resume_state(run_dir, cfg, model) if cfg.checkpoint.resume else None
    if args.init_from and state is None:
        log(f"initialised with {ckpt.init_from(model, cfg, args.init_from)}")
    trainer = Trainer(cfg, loader, model, device, run_dir, rank, world_size, log)
    if state is not None:
        trainer.load_state_dict(state)
        log(f"resumed from step {trainer.step} ({run_dir})")
    elif cfg.checkpoint.resume:
        log(f"--resume: no checkpoint in {run_dir} yet; starting at step 0")
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"{cfg.name}: {cfg.model.size} ({n_params / 1e6:.2f}M trainable), {len(loader.dataset)} samples, "
        f"global batch {cfg.data.global_batch_size} on {world_size} rank(s), {perf.describe_device(device)}, "
        f"{trainer.max_steps} steps")
    try:
        history = trainer.fit()
    except torch.OutOfMemoryError as e:
        raise SystemExit(f"out of GPU memory ({e}); lower the microbatch, e.g. data.rank_microbatch_size="
                         f"{max(1, cfg.data.rank_microbatch_size // 2)}") from None
    knn = None
    if args.demo and rank == 0:  # the demo ends by showing what training did to the encoder
        from olmoearth_fast.eval.demo import knn_before_after

        knn = knn_before_after(build_model(cfg, device), model)
    if rank == 0 and cfg.logging.plot and history:
        log(f"loss curve{' and kNN accuracy' if knn else ''}: {plot_history(history, run_dir, knn)}")
    if knn:
        log(knn["line"])
    if world_size > 1:
        dist.destroy_process_group()


def main(argv=None) -> None:
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    try:
        run(*parse(argv), rank, world_size)
    except UserError as e:
        line = f"error: {e}"
        if rank == 0:
            print(line, file=sys.stderr)
        if os.environ.get("TORCHELASTIC_ERROR_FILE"):  # torchrun's failure report then quotes the line
            with open(os.environ["TORCHELASTIC_ERROR_FILE"], "w") as f:
                json.dump({"message": {"message": line, "extraInfo": {"py_callstack": line,
                                                                      "timestamp": str(int(time.time()))}}}, f)
        sys.exit(2)


if __name__ == "__main__":
    main()
