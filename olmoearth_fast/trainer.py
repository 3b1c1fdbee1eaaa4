"""The training loop: microbatches, two views in one pass, loss, optimizer, schedule, logging.

Per rank batch (docs/reference_semantics.md §8.5; reduction order §8.2): split into
microbatches; for each, the frozen target projection is computed once, both views go through
encoder and decoder as one 2B batch, and
    L = weight · (L_A + L_B) / 2 + InfoNCE_w(pooled_A, pooled_B),   divided by #microbatches,
with the masked-negatives loss computed in fp32 on the packed DECODER tokens. A non-finite L
stops the accumulation for this step (the reference `break`s too; here the step is replayed
without the rest) and the optimizer still steps. Gradients are averaged over ranks in buckets
whose all-reduces run during the last microbatch's backward (`grad_sync.py`), clipped to
max_grad_norm, and AdamW steps with linear warmup then cosine decay. Every mask-dependent
index is planned on the host before the copy to the device (`model/plan.py`), and the device
is read twice per step (statistics, grad norm).
"""

from __future__ import annotations

import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist
from torch import Tensor

from olmoearth_fast import checkpoint as ckpt
from olmoearth_fast import perf
from olmoearth_fast.config import RunConfig, dumps
from olmoearth_fast.data.collate import MaskedViews
from olmoearth_fast.grad_sync import BucketedAllReduce, all_reduce_mean_ref
from olmoearth_fast.losses import info_nce
from olmoearth_fast.modalities import LOSS_FIELD_ORDER
from olmoearth_fast.model.latent_mim import LatentMIM, build_model  # noqa: F401  (build_model: part of this API)
from olmoearth_fast.model.plan import MicrobatchPlan
from olmoearth_fast.ops.masked_neg_loss import masked_neg_loss


def lr_at(step: int, cfg: RunConfig, max_steps: int) -> float:
    """Linear warmup from 0, then cosine to alpha_f·lr at max_steps (olmo-core CosWithWarmup)."""
    lr, warm = cfg.optim.lr, cfg.schedule.warmup_steps
    if step < warm:
        return lr * step / warm
    final = cfg.schedule.alpha_f * lr
    if step >= max_steps:
        return final
    progress = (step - warm) / max(1, max_steps - warm)
    return final + (lr - final) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class StepStats:
    loss: float = 0.0
    patch_disc: float = 0.0
    infonce: float = 0.0
    encoded: int = 0
    decoded: int = 0
    nonfinite: bool = False
    per_modality: dict[str, float] = field(default_factory=dict)
    flops: float = 0.0  # work model (olmoearth_fast.perf) of the step
    ref_flops: float = 0.0  # what the reference computes on the same batch


def microbatch_loss(model: LatentMIM, mb: MaskedViews, cfg: RunConfig, autocast: bool,
                    plan: MicrobatchPlan) -> tuple[Tensor, Tensor]:
    """Loss of one microbatch of V views (not yet divided by the number of microbatches) and its
    detached statistics, on the device: ``[loss, patch_disc, infonce, L_m (M modalities)]``.

    ``plan`` (`LatentMIM.plan`, made on the host from the same masks) holds every index whose
    size depends on the masks, so nothing here reads a value back from the device.
    """
    b, views = mb.batch_size, mb.num_views
    layout = plan.layout
    with torch.autocast(device_type=plan.masks.device.type, dtype=torch.bfloat16, enabled=autocast):
        out = model(mb.data, mb.timestamps, plan.masks, layout, with_target=True, plan=plan)
    m = len(layout.modalities)
    seg_offsets, seg_modality, seg_mask_neg = plan.loss
    # DECODER tokens are packed sample-major, modality-major within a sample: segments (v·b, m)
    per = masked_neg_loss(out.decoded.tokens, out.target, seg_offsets, seg_modality, seg_mask_neg, views * m,
                          tau=cfg.loss.tau, same_target_threshold=cfg.loss.same_target_threshold).view(views, m)
    patch_disc = cfg.loss.weight * per.sum(1).mean()  # Σ over modalities, mean over views
    infonce = (info_nce(out.pooled[:b], out.pooled[b:2 * b], tau=cfg.loss.infonce_tau, weight=cfg.loss.infonce_weight)
               if views == 2 else patch_disc.new_zeros(()))
    loss = patch_disc + infonce
    stats = torch.cat([torch.stack([loss, patch_disc, infonce]), per.mean(0)]).detach().float()
    return loss, stats


class Trainer:
    def __init__(self, cfg: RunConfig, loader, model: LatentMIM, device: torch.device, run_dir: str,
                 rank: int = 0, world_size: int = 1, log=print):
        self.cfg, self.loader, self.model, self.device = cfg, loader, model, device
        self.rank, self.world_size, self.log = rank, world_size, log
        self.run_dir = run_dir
        if cfg.trainer.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"trainer.precision must be auto, bf16 or fp32, got {cfg.trainer.precision!r}")
        self.autocast = device.type == "cuda" and cfg.trainer.precision in ("auto", "bf16")
        if cfg.trainer.precision == "bf16" and device.type != "cuda":
            raise ValueError("trainer.precision=bf16 needs CUDA; use fp32 (or auto) on CPU")
        if device.type == "cpu" and cfg.trainer.keep_freed_memory:
            keep_freed_memory()
        if device.type == "cuda" and cfg.trainer.expandable_segments:
            expandable_cuda_segments()
        self.compiled = cfg.trainer.compile if cfg.trainer.compile is not None else COMPILE_BY_DEFAULT[device.type]
        if self.compiled:
            model.compile_blocks()
        self._graphs = _compiled_graphs()
        if hasattr(loader, "planner"):  # the loader plans each batch where it makes it
            loader.planner = model.batch_planner(cfg.data.rank_microbatch_size, cfg.loss.mask_negatives_for_modalities)
        fused = bool(cfg.optim.fused)
        self.params = params = [p for p in model.parameters() if p.requires_grad]
        if cfg.trainer.grad_bucket_mb < 0:
            raise ValueError(f"trainer.grad_bucket_mb must be >= 0 (0: one all-reduce after the backward), "
                             f"got {cfg.trainer.grad_bucket_mb}")
        self.reducer = (BucketedAllReduce(params, world_size, cfg.trainer.grad_bucket_mb)
                        if world_size > 1 and cfg.trainer.grad_bucket_mb > 0 else None)
        # one parameter group, weight decay on every parameter (as the reference's AdamW config)
        self.optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
                                           weight_decay=cfg.optim.weight_decay, fused=fused)
        self.step = 0
        try:  # the limit the step line's achieved FLOP/s is compared with (CPU: measured, ~0.5 s)
            self.peak: float | None = perf.peak_flops(device)[0]
        except ValueError:  # a GPU without a datasheet entry: FLOP/s only
            self.peak = None
        steps_per_epoch = len(loader)
        self.max_steps = cfg.trainer.max_steps or cfg.trainer.epochs * steps_per_epoch
        self.history: list[dict] = []
        self._stop_signal: int | None = None
        self.wandb = None
        self._knn_dataset = None
        if cfg.eval.knn_dataset:
            from olmoearth_fast.eval import load_eurosat

            # opened here so that a wrong path fails at start-up, not after hours of training
            self._knn_dataset = load_eurosat(cfg.eval.knn_dataset, splits=("train", "valid"))

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step,
                "loader": self.loader.state_dict(), "rng": ckpt.rng_state(), "history": self.history,
                "config": dumps(self.cfg), "grad_buckets": self.reducer.state_dict() if self.reducer else None}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"], strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.loader.load_state_dict(state["loader"])
        ckpt.set_rng_state(state["rng"])
        self.history = list(state.get("history", []))
        if self.reducer is not None and state.get("grad_buckets"):
            self.reducer.load_state_dict(state["grad_buckets"])

    # ------------------------------------------------------------------------------ loop
    def _handle_signal(self, signum, frame):
        self._stop_signal = signum

    def _stage(self, mb: MaskedViews) -> tuple[tuple[MaskedViews, MicrobatchPlan], MicrobatchPlan]:
        """A microbatch and its plan on the device, and the plan on the host. The loader's
        batches bring their plans (made in its workers); others are planned here, drawing the
        encoder's DropPath from the global generator. On CUDA everything is page-locked first (a
        no-op for what the loader pinned): a copy from pageable memory synchronises the stream,
        a pinned one does not."""
        if mb.plans is not None:  # made by the loader (its planner, set in __init__)
            plan, mb = mb.plans[0], replace(mb, plans=None)  # the plan is copied on its own, once
        else:
            plan = self.model.plan(mb.data, mb.masks, mb.patch_size, self.cfg.loss.mask_negatives_for_modalities)
        host_plan = plan
        if self.device.type == "cuda":
            mb, plan = mb.pin_memory(), plan.pin_memory()
        return (mb.to(self.device, non_blocking=True), plan.to(self.device, non_blocking=True)), host_plan

    def _forward_backward(self, staged, n: int) -> Tensor:
        """Loss and backward of one staged microbatch of ``n``; its statistics (device)."""
        mb, plan = staged
        loss, stats = microbatch_loss(self.model, mb, self.cfg, self.autocast, plan)
        (loss / n).backward()
        return stats

    def train_step(self, batch: MaskedViews) -> tuple[StepStats, float]:
        """One optimizer step on a rank batch. Two host syncs in all: the microbatches'
        statistics and finiteness are read once after their backward passes, the gradient norm
        once after clipping, without waiting for the optimizer's kernels (`read_later`;
        per-microbatch reads would stall the device's launch queue). The
        loader's batches bring their microbatch plans (made in its workers); each microbatch is
        copied (and, in a batch without plans, planned) just before its forward, so that from
        the second on this host work runs while the device computes the one before.

        A non-finite microbatch loss ends the accumulation there, as in the reference (its
        `break` precedes that microbatch's backward): the step is replayed from its saved RNG
        state through the microbatches before it, so the gradients are exactly those the
        reference keeps, and the optimizer still steps. This costs time only on such steps.
        """
        # train() walks every module (~0.8 ms a call at tiny): host time a GPU step waits on
        if not self.model.training:
            self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        mbs = batch.microbatches(self.cfg.data.rank_microbatch_size)
        n = len(mbs)
        staged, plans, rngs, stats = [], [], [], []
        for i, mb in enumerate(mbs):
            # microbatch i is staged on the host while the device still runs microbatch i-1
            dev, plan = self._stage(mb)
            staged.append(dev)
            plans.append(plan)
            rngs.append(_torch_rng_state())  # what its forward draws from (band dropout, CPU DropPath)
            if self.reducer is not None and i == n - 1:
                self.reducer.arm()  # the gradient buckets' all-reduces start during this backward
            stats.append(self._forward_backward(dev, n))
        # host arithmetic while the device works
        work = perf.plan_work(plans, self.cfg, device_type=self.device.type)
        stats = torch.stack(stats)  # [n, 3 + M]
        finite = torch.isfinite(stats[:, 0])
        # ranks whose step had a non-finite loss (0 with one rank): the bucketed averages are
        # kept only when there are none, since a replay changes that rank's gradients
        nonfinite_ranks = (~finite).any().float().reshape(1)
        if self.reducer is not None:
            self.reducer.finish()
            dist.all_reduce(nonfinite_ranks)
        # host sync 1 of 2; per microbatch: [finite, nonfinite_ranks, loss, patch_disc, infonce, L_m...]
        host = torch.cat([finite.float()[:, None], nonfinite_ranks.expand(n)[:, None], stats], 1).tolist()
        good = next((i for i, row in enumerate(host) if not row[0]), n)
        if good < n:
            self.log(f"warning: non-finite loss at step {self.step}, microbatch {good}; keeping the gradients of "
                     f"the {good} microbatch(es) before it")
            after = _torch_rng_state()
            self.optimizer.zero_grad(set_to_none=True)
            for i in range(good):
                _set_torch_rng_state(rngs[i])
                self._forward_backward(staged[i], n)
            _set_torch_rng_state(after)
        if self.reducer is not None and host[0][1] == 0:
            self.reducer.apply()
        elif self.world_size > 1:
            all_reduce_mean_ref(self.params, self.world_size)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.max_grad_norm)
        read_grad_norm = read_later(grad_norm)  # before the optimizer's launches, which it does not wait for
        lr = lr_at(self.step, self.cfg, self.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.step += 1
        total = StepStats(nonfinite=good < n, encoded=int(work.tokens["encoder_tokens"]),
                          decoded=int(work.tokens["decoder_queries"]), flops=work.ours_total, ref_flops=work.ref_total)
        mods = plans[0].layout.modalities
        for row in host[:good]:
            total.loss += row[2] / n
            total.patch_disc += row[3] / n
            total.infonce += row[4] / n
            for k, v in zip(mods, row[5:]):
                total.per_modality[k] = total.per_modality.get(k, 0.0) + v / n
        # host sync 2 of 2: waits for the clipping, while the optimizer's kernels run on into the
        # host's work between steps (logging, the next batch, its copies and first launches)
        return total, read_grad_norm()

    def fit(self) -> list[dict]:
        cfg = self.cfg
        handlers = {s: signal.signal(s, self._handle_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        self.wandb = ckpt.start_wandb(cfg, self.run_dir) if self.rank == 0 else None
        t_start, samples = time.perf_counter(), 0
        try:
            while self.step < self.max_steps:
                t_fetch = time.perf_counter()
                for batch in self.loader:
                    t0 = time.perf_counter()
                    wait = t0 - t_fetch  # blocked on the loader: its workers did not keep up
                    stats, grad_norm = self.train_step(batch)
                    dt = time.perf_counter() - t0
                    samples += batch.batch_size * self.world_size
                    self._log_step(stats, grad_norm, dt, batch, t_start, wait)
                    if self.compiled and self.rank == 0:
                        graphs = _compiled_graphs()
                        if graphs != self._graphs:
                            self.log(f"compile: {graphs} graphs after step {self.step} (+{graphs - self._graphs}; "
                                     "a new shape class or first use)")
                            self._graphs = graphs
                    if self._knn_dataset is not None and self.step % cfg.eval.every == 0:
                        self.evaluate()
                    if self.step % cfg.checkpoint.save_every == 0 or self.step >= self.max_steps \
                            or self._stop_signal is not None:
                        self.save()
                    if self._stop_signal is not None:
                        self.log(f"received signal {self._stop_signal}: checkpoint written at step {self.step}")
                        return self.history
                    if self.step >= self.max_steps:
                        break
                    t_fetch = time.perf_counter()
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
            if self.wandb is not None:
                self.wandb.finish()
        if self.rank == 0:
            elapsed = time.perf_counter() - t_start
            self.log(f"done: {self.step} steps, {samples} samples in {elapsed:.1f}s "
                     f"({samples / max(elapsed, 1e-9):.1f} samples/s); final loss {self.history[-1]['loss']:.4f}"
                     if self.history else "done: no step taken")
        return self.history

    def evaluate(self) -> dict[str, float] | None:
        """EuroSAT kNN on rank 0 (no RNG use, train mode restored: resume stays exact)."""
        metrics = None
        if self.rank == 0:
            from olmoearth_fast.eval import evaluate_knn

            e = self.cfg.eval
            metrics = evaluate_knn(self.model, self._knn_dataset, patch_size=e.patch_size, batch_size=e.batch_size,
                                   max_samples=e.max_samples)
            self.log("eval: " + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            self.history[-1].update(metrics)
            if self.wandb is not None:
                self.wandb.log(metrics, step=self.step)
        if self.world_size > 1:
            dist.barrier()
        return metrics

    def save(self) -> None:
        if self.rank == 0:
            path = ckpt.save_checkpoint(self.state_dict(), self.run_dir, self.step, keep_last=self.cfg.checkpoint.keep_last)
            self.log(f"checkpoint: {path}")
        if self.world_size > 1:
            dist.barrier()

    def _log_step(self, s: StepStats, grad_norm: float, dt: float, batch: MaskedViews, t_start: float,
                  data_wait: float = 0.0) -> None:
        """Append the step's record to the history (and wandb); print its line every
        ``trainer.log_every`` steps. ``data_wait``: seconds the loop waited for this batch
        (``data_wait_s``; the line names it where it is a tenth of the step or more: the
        loader's workers are then what limits the run, see `data.num_workers`)."""
        n = batch.batch_size * self.world_size
        rec = {"step": self.step, "loss": s.loss, "patch_disc": s.patch_disc, "infonce": s.infonce,
               "grad_norm": grad_norm, "lr": self.optimizer.param_groups[0]["lr"], "samples_per_s": n / dt,
               "encoded_tok_per_s": s.encoded * self.world_size / dt, "decoded_tok_per_s": s.decoded * self.world_size / dt,
               "patch_size": batch.patch_size, "hw_p": batch.hw_p, "step_time": dt, "data_wait_s": data_wait,
               # achieved FLOP/s of the work model's useful work; work_ratio = reference / ours
               "tflops": s.flops / dt / 1e12, "work_ratio": s.ref_flops / max(s.flops, 1.0)}
        if self.peak is not None:
            rec["peak_fraction"] = s.flops / dt / self.peak
        if self.device.type == "cuda":
            rec.update(cuda_allocator_stats(self.device))
        else:  # peak resident set size of the process (ru_maxrss is in KiB on Linux)
            import resource

            rec["mem_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        self.history.append(rec)
        if self.rank != 0:
            return
        if self.wandb is not None:
            self.wandb.log({**rec, **{f"loss/{k}": v for k, v in s.per_modality.items()}}, step=self.step)
        if self.step % self.cfg.trainer.log_every and self.step != self.max_steps:
            return
        elapsed = time.perf_counter() - t_start
        done = len(self.history)
        eta = elapsed / done * (self.max_steps - self.step) if done else 0.0
        width = len(str(self.max_steps))
        mem = f" | mem {rec['mem_gib']:.2f} GiB"
        if rec.get("alloc_retries"):  # the allocator had to free its cache (and sync) to allocate
            mem += f" ({rec['alloc_retries']} cudaMalloc retries)"
        frac = f" ({100 * rec['peak_fraction']:.0f}% of peak)" if "peak_fraction" in rec else ""
        waited = f" | waited {data_wait:.2f} s for data" if data_wait >= 0.1 * dt else ""
        self.log(f"step {self.step:>{width}}/{self.max_steps} | loss {s.loss:.4f} | infonce {s.infonce:.4f} "
                 f"| gnorm {grad_norm:.3f} | lr {rec['lr']:.2e} | {rec['samples_per_s']:.1f} samples/s "
                 f"| enc {rec['encoded_tok_per_s'] / 1e3:.1f}k tok/s | dec {rec['decoded_tok_per_s'] / 1e3:.1f}k tok/s"
                 f" | {rec['tflops']:.3f} TFLOP/s{frac}{mem} | p={batch.patch_size} hw={batch.hw_p}{waited} "
                 f"| eta {_fmt_time(eta)}")


# `trainer.compile` when not set: on where compiling the blocks measured faster on that device
# (benchmarks/RESULTS.md). CPU: slower (exp14 nano B=16: 0.79 -> 0.85 s, tiny B=8: 1.71 ->
# 1.79 s; no fusion pays for the graph breaks around attention). CUDA: not yet measured; the
# device programme times `ours_compiled` beside `ours` (benchmarks/bench_train_step.py).
COMPILE_BY_DEFAULT = {"cuda": False, "cpu": False}


def _compiled_graphs() -> int:
    """Graphs torch.compile has built in this process (new ones after warm-up = recompiles)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def keep_freed_memory() -> bool:
    """Serve large CPU tensors from the heap and keep freed memory in the process (glibc).

    glibc gives every allocation above 32 MB its own mmap and unmaps it on free, so each large
    activation of a step page-faults its memory in again (zeroed by the kernel). At
    base_shallow_decoder, microbatch 32 on the 2-core CPU that was 40 of 110 CPU-seconds per step
    in the kernel: M_MMAP_MAX=0 and a high M_TRIM_THRESHOLD made the step 1.6x faster (60 ->
    37 s; no change at nano or tiny, whose tensors stay below the threshold). The process keeps
    its peak memory reserved instead of returning it between steps. Returns whether it applied
    (Linux with glibc only).
    """
    import ctypes
    import platform

    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return libc.mallopt(m_mmap_max, 0) == 1 and libc.mallopt(m_trim_threshold, 2**31 - 1) == 1


def expandable_cuda_segments() -> bool:
    """Let PyTorch's CUDA caching allocator grow its memory segments in place
    (``expandable_segments:True``), unless the user configured the allocator (the
    ``PYTORCH_CUDA_ALLOC_CONF`` or ``PYTORCH_ALLOC_CONF`` environment variable wins).

    Packed batches change size every step: the tokens each sample keeps after masking, the
    sampler's patch size and crop. With fixed segments the allocator serves each new size by
    splitting cached blocks sized for earlier steps; the leftovers fragment the cache, reserved
    memory creeps up, and when a cudaMalloc fails it synchronises the device, frees its cache
    and retries. Expandable segments map one growing virtual range per stream, so blocks of any
    size sit next to each other and merge when freed. The trainer records the allocator's
    driver calls in each step's history (``device_allocs``, ``alloc_retries``) and
    scripts/compare_loss_curves.py per side (`cuda_allocator_stats`), so that a GPU run shows
    whether the cache settled (not yet timed on a GPU: none has run this code). Applies to
    segments created from now on (the process's allocator is shared: a reference model timed in
    the same process gets it too). Returns whether it applied.
    """
    if os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF"):
        return False
    # torch >= 2.9 has the device-generic setter (and deprecates the CUDA one); older: the CUDA one
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None) or torch.cuda.memory._set_allocator_settings
    setter("expandable_segments:True")
    return True


def cuda_allocator_stats(device: torch.device) -> dict:
    """The CUDA caching allocator's host-side counters in one read (no sync): ``mem_gib``, the
    peak allocated since the last reset (what torch.cuda.max_memory_allocated reads), and its
    calls into the driver since the process began, ``device_allocs`` (cudaMalloc / cuMemMap) and
    ``alloc_retries`` (a failed cudaMalloc, then the cache freed and the device synchronised):
    a step that makes either stalls the device."""
    stats = torch.cuda.memory_stats(device)
    return {"mem_gib": stats.get("allocated_bytes.all.peak", 0) / 2**30,
            "device_allocs": stats.get("num_device_alloc", 0),
            "alloc_retries": stats.get("num_alloc_retries", 0)}


def read_later(t: Tensor) -> Callable[[], float]:
    """A function that reads the scalar ``t`` as it is now, without waiting for kernels launched
    after this call.

    On CUDA ``t`` is copied into page-locked memory behind the kernels that compute it, and an
    event is recorded behind the copy; the function waits for that event only. (``float(t)``
    would wait for everything queued on the stream by then.) Elsewhere ``t`` is read now.
    """
    if t.device.type != "cuda":
        value = float(t)
        return lambda: value
    host = torch.empty((), dtype=t.dtype, pin_memory=True)
    host.copy_(t.detach(), non_blocking=True)
    copied = torch.cuda.Event()
    copied.record(torch.cuda.current_stream(t.device))  # the stream of t's device, which the copy joined

    def read() -> float:
        copied.synchronize()
        return float(host)
    return read


def _torch_rng_state() -> tuple:
    """torch's generators (CPU, and every CUDA device's): what dropout draws depend on."""
    return (torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def _set_torch_rng_state(state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def check_dataset_modalities(dataset, modalities: tuple[str, ...]) -> None:
    """A clear error when the dataset holds none of some modality the experiment trains on."""
    from olmoearth_fast.data.h5 import read_metadata
    from olmoearth_fast.errors import UserValueError

    meta = read_metadata(dataset.root)
    if meta is None:
        return
    absent = [m for m in modalities if m not in meta.columns or int(meta[m].sum()) == 0]
    if absent:
        have = [m for m in LOSS_FIELD_ORDER if m in meta.columns and int(meta[m].sum()) > 0]
        raise UserValueError(f"dataset {dataset.root} has no sample with {absent} (it has {have}), which the "
                             f"experiment trains on: choose another data.dataset, or set model.modalities={have}")


def build_loader(cfg: RunConfig, rank: int, world_size: int, run_dir: str, pin_memory: bool = False):
    """The rank's two-view loader; ``pin_memory`` (for CUDA training with workers) page-locks the
    batches so the trainer's non-blocking host-to-device copy overlaps.

    Raises:
        UserError: no dataset given, a path without samples, a dataset without the experiment's
            modalities, or fewer samples than the global batch.
    """
    from olmoearth_fast.config import DEMO_DATASET
    from olmoearth_fast.data.dataset import OlmoEarthH5Dataset
    from olmoearth_fast.data.demo import ensure_demo_dataset
    from olmoearth_fast.data.loader import OlmoEarthLoader
    from olmoearth_fast.errors import UserFileNotFoundError, UserValueError

    d = cfg.data
    path = d.dataset
    if path is None:
        raise UserValueError("no dataset: pass data.dataset=/path/to/h5_dataset (a directory of reference-format "
                             "sample_*.h5 files), or --demo to train on the generated demo data")
    if path == DEMO_DATASET:
        # the demo dataset, generated once next to the runs (a few seconds)
        path = os.path.join(os.path.dirname(run_dir.rstrip("/")) or ".", "demo_data")
        if rank == 0:
            ensure_demo_dataset(path, num_samples=d.demo_samples)
        if world_size > 1:
            dist.barrier()
    elif not os.path.isdir(path):
        raise UserFileNotFoundError(f"data.dataset={path} is not a directory: point it at a directory of "
                                    f"reference-format sample_*.h5 files, or use --demo")
    try:
        dataset = OlmoEarthH5Dataset(path, cfg.model.modalities, skip_corrupt=d.skip_corrupt)
    except FileNotFoundError as e:  # no sample_*.h5, or none left after the metadata filter
        raise UserFileNotFoundError(f"data.dataset={path}: {e}; expected reference-format sample_*.h5 files "
                                    f"(with sample_metadata.csv), or use --demo") from None
    check_dataset_modalities(dataset, cfg.model.modalities)
    return OlmoEarthLoader(dataset, d, masking=cfg.masking, rank=rank, world_size=world_size,
                           training_modalities=cfg.model.modalities, pin_memory=pin_memory and d.num_workers > 0)


def loader_core_contention(num_workers: int, device: torch.device) -> str | None:
    """A note when CPU training's loader worker processes and compute threads need more cores
    than this process may use (None otherwise, and on GPUs).

    On CPU the step's intra-op threads use every core they are given; a worker process making
    the next batch then takes a core from them mid-step, and the threads wait for each other.
    On the 2-core CI machine the demo's 100 steps took 60 s with 1 worker against 46 s with
    ``data.num_workers=0`` (the batches made between steps: ~0.12 s each). Ranks started together
    by torchrun on one machine (``LOCAL_WORLD_SIZE``) share its cores.
    """
    if device.type != "cpu" or num_workers == 0:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads, local = torch.get_num_threads(), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if local * (threads + num_workers) <= cores:
        return None
    return (f"note: data.num_workers={num_workers} loader process(es) and {threads} compute threads per rank "
            f"({local} rank(s) here) share {cores} CPU cores, so they take turns mid-step; "
            "data.num_workers=0 makes the batches between steps instead (the demo's steps: 1.3x faster so on 2 cores)")


def plot_history(history: list[dict], run_dir: str, knn: dict | None = None) -> str:
    """Loss curves (raw, faint, under a moving average that shows the trend) and, given ``knn``
    ({"random": acc, "trained": acc, "chance": acc, "title": str}), the demo's kNN panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    def smooth(values: np.ndarray, window: int) -> np.ndarray:
        """Centred moving average; the window shrinks at the ends (no lag, no pull towards 0)."""
        n, half = len(values), window // 2
        cum = np.concatenate([[0.0], np.cumsum(values)])
        lo, hi = np.clip(np.arange(n) - half, 0, n), np.clip(np.arange(n) + half + 1, 0, n)
        return (cum[hi] - cum[lo]) / (hi - lo)

    steps = [h["step"] for h in history]
    # about 20 windows over the run: step-to-step noise (batch composition) is several times the
    # trend of a short run, so the raw curve alone looks flat
    window = max(5, len(steps) // 20)
    fig, axes = plt.subplots(1, 3 if knn else 2, figsize=(15 if knn else 10, 3.8))
    for ax, keys, title in ((axes[0], (("loss", "total", "tab:blue"), ("patch_disc", "patch discrimination",
                                                                         "tab:orange")), "loss"),
                            (axes[1], (("infonce", "InfoNCE", "tab:green"),), "InfoNCE (weighted)")):
        lows, highs = [], []
        for key, label, color in keys:
            raw = np.array([h[key] for h in history], dtype=np.float64)
            smoothed = smooth(raw, window)
            ax.plot(steps, raw, color=color, alpha=0.25, linewidth=0.8)
            ax.plot(steps, smoothed, color=color, linewidth=2, label=f"{label} (mean of {window} steps)")
            lows.append(np.percentile(raw, 2))
            highs.append(np.percentile(raw, 98))
        if steps:  # clip the first steps' spike so the trend keeps the vertical range
            pad = 0.05 * (max(highs) - min(lows) or 1.0)
            ax.set_ylim(min(lows) - pad, max(highs) + pad)
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.legend(fontsize=8)
    if knn:
        ax = axes[2]
        values = [knn["random"], knn["trained"]]
        bars = ax.bar(["random init", "trained"], values, color=["tab:gray", "tab:blue"])
        for bar, v in zip(bars, values):
            ax.text(bar.get_x() + bar.get_width() / 2, v + 0.01, f"{v:.3f}", ha="center", va="bottom")
        if knn.get("chance") is not None:
            ax.axhline(knn["chance"], color="k", linestyle=":", linewidth=1, label=f"chance {knn['chance']:.2f}")
            ax.legend(fontsize=8, loc="upper left")
        ax.set_ylim(0, 1)
        ax.set_title(knn.get("title", "kNN accuracy"), fontsize=9)
    fig.tight_layout()
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "loss_curve.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
