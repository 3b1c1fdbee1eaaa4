"""Two-view data loader: global order, rank sharding, per-batch shapes, workers, exact resume.

Reference behaviour kept (docs/reference_semantics.md §9.5):

* per epoch the sample order is a seeded shuffle, truncated to a multiple of the global batch;
* global batch s is rows s·G .. (s+1)·G of that order; rank r takes columns r::world_size;
* each rank batch draws one patch size p ~ U(patch_sizes) and one hw_p ~ U{hw_p_list ∩
  [1, tile/p]}, so ranks draw different shapes in the same step;
* every sample is cropped to hw_p·p px and T months (token budget), then the batch is masked
  `num_views` times independently.

Difference that makes resume exact: every random draw of global batch s on rank r (order
excepted) comes from a generator seeded by (seed, epoch, s, rank), not from a per-worker
stream, so a batch is the same whatever `num_workers` is and whenever it is produced; the
loader draws nothing from the global RNG, so the training is the same too. The
reference seeds per (seed + epoch + rank·workers + worker) and uses unseeded np.random for
crops and masks, so its batches are not reproducible. `state_dict()` is {epoch,
batches_processed, ...}; after `load_state_dict` iteration continues with the next batch.

hw_p is filtered with the dataset's tile size (128 in the reference H5, where the reference's
`IMAGE_TILE_SIZE / p = 256 / p` bound never binds for hw_p ≤ 12, p ≤ 8).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from olmoearth_fast.data.collate import MaskedViews, collate_views
from olmoearth_fast.data.dataset import OlmoEarthH5Dataset, Sample
from olmoearth_fast.data.h5 import CorruptSampleError
from olmoearth_fast.data.masking import MaskingConfig, MaskingStrategy, build_masking
from olmoearth_fast.errors import UserValueError
from olmoearth_fast.modalities import TRAINING_MODALITIES, as_tokenization

logger = logging.getLogger(__name__)


@dataclass
class DataConfig:
    """The run's data settings (`RunConfig.data`): what the loader reads, how it crops and masks
    (with the run's `MaskingConfig`), and the microbatch size the trainer splits rank batches into.
    Defaults are the reference experiments' (docs/reference_semantics.md §9, §10)."""

    # directory of reference-format H5 samples; "demo" (config.DEMO_DATASET) = the generated
    # demo dataset (--demo)
    dataset: str | None = None
    tokenization: str | dict | None = "single_bandset"  # preset name or {modality: [[bands]]}
    global_batch_size: int = 512
    rank_microbatch_size: int = 32
    token_budget: int | None = 2250
    # "default" counts the token budget with default bandsets (the reference's quirk)
    budget_tokenization: str = "default"
    patch_sizes: tuple[int, ...] = tuple(range(1, 9))
    hw_p_list: tuple[int, ...] = tuple(range(1, 13))
    num_views: int = 2
    # the reference's DataLoader: 16 worker processes per rank, 4 batches ahead per worker; on a
    # CPU-only machine the step's threads want those cores (trainer.loader_core_contention)
    num_workers: int = 16
    prefetch_factor: int = 4
    seed: int = 3622
    skip_corrupt: bool = False
    demo_samples: int = 256  # size of the generated demo dataset (dataset="demo")


class OlmoEarthLoader:
    """Iterable over `MaskedViews` rank batches of one epoch at a time.

    Args:
        dataset: an `OlmoEarthH5Dataset` or a directory of reference-format H5 samples.
        data: the run's `DataConfig`: global batch size, seed, workers, patch sizes, hw_p list,
            token budget and its tokenization, the experiment's tokenization, views,
            skip_corrupt (its `dataset`, `rank_microbatch_size` and `demo_samples` are not read
            here).
        masking: strategy, `MaskingConfig` (the run's `cfg.masking`), reference-style dict or
            name.
        rank, world_size: data-parallel position; the rank batch is global / world_size.
        training_modalities: modalities to load when `dataset` is a path.
        pin_memory: page-lock the batches made by worker processes (CUDA training).
        planner: ``planner(batch, seed)`` → the batch's microbatch plans, stored in
            `MaskedViews.plans` (`model.plan.BatchPlanner`); ``seed`` comes from the batch's
            seed, so the plans do not depend on the worker count.

    Raises:
        ValueError: inconsistent sizes, ranks or shape lists (the message names the setting).
    """

    def __init__(
        self,
        dataset: OlmoEarthH5Dataset | str | os.PathLike,
        data: DataConfig,
        *,
        masking: MaskingStrategy | MaskingConfig | Mapping | str,
        rank: int = 0,
        world_size: int = 1,
        training_modalities: Sequence[str] = TRAINING_MODALITIES,
        pin_memory: bool = False,
        planner: Callable[[MaskedViews, int], list] | None = None,
    ):
        if not isinstance(dataset, OlmoEarthH5Dataset):
            dataset = OlmoEarthH5Dataset(dataset, training_modalities, skip_corrupt=data.skip_corrupt)
        self.dataset = dataset
        # the microbatch plans of every batch, made with it (`model.plan.BatchPlanner`; set by the
        # trainer): in the worker processes, off the thread that feeds the device
        self.planner = planner
        global_batch_size = data.global_batch_size
        if global_batch_size < 1 or world_size < 1 or global_batch_size % world_size:
            raise UserValueError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                                 f"world_size={world_size}: set data.global_batch_size accordingly")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        if data.num_views not in (1, 2):
            raise ValueError(f"data.num_views must be 1 or 2, got {data.num_views}")
        if data.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {data.num_workers}")
        if data.prefetch_factor < 1:
            raise ValueError(f"data.prefetch_factor must be >= 1 (batches each worker makes ahead), "
                             f"got {data.prefetch_factor}")
        if data.budget_tokenization not in ("default", "experiment"):
            raise ValueError(f"data.budget_tokenization must be 'default' or 'experiment', got "
                             f"{data.budget_tokenization!r}")
        self.patch_sizes = [int(p) for p in data.patch_sizes]
        self.hw_p_list = [int(h) for h in data.hw_p_list]
        if not self.patch_sizes or min(self.patch_sizes) < 1:
            raise ValueError(f"data.patch_sizes must be positive ints, got {list(data.patch_sizes)}")
        if not self.hw_p_list or min(self.hw_p_list) < 1:
            raise ValueError(f"data.hw_p_list must be positive ints, got {list(data.hw_p_list)}")
        self.tokenization = as_tokenization(data.tokenization)
        if isinstance(masking, MaskingStrategy):
            if masking.tokenization != self.tokenization:
                raise ValueError("masking strategy tokenization differs from data.tokenization: "
                                 f"{masking.tokenization} vs {self.tokenization}")
            self.masking = masking
        else:
            self.masking = build_masking(masking, self.tokenization)
        self.global_batch_size = int(global_batch_size)
        self.rank, self.world_size = int(rank), int(world_size)
        self.rank_batch_size = self.global_batch_size // self.world_size
        self.seed = int(data.seed)
        self.num_workers = int(data.num_workers)
        self.prefetch_factor = int(data.prefetch_factor)
        self.token_budget = data.token_budget
        self.num_views = data.num_views
        self.budget_tokenization = data.budget_tokenization
        self.skip_corrupt = data.skip_corrupt or dataset.skip_corrupt
        self.pin_memory = pin_memory
        self.tile_size = dataset.tile_size
        if not any(h * p <= self.tile_size for p in self.patch_sizes for h in self.hw_p_list):
            raise UserValueError(f"no (patch_size, hw_p) pair fits the dataset's {self.tile_size}-px tiles "
                                 f"(patch_sizes={self.patch_sizes}, hw_p_list={self.hw_p_list}): lower "
                                 f"data.patch_sizes or data.hw_p_list")
        if len(dataset) < self.global_batch_size:
            most = len(dataset) // self.world_size * self.world_size
            raise UserValueError(f"dataset {dataset.root} has {len(dataset)} samples, fewer than one global batch "
                                 f"of {self.global_batch_size}: lower data.global_batch_size (to at most {most}, "
                                 f"a multiple of the {self.world_size} rank(s)) or use a larger dataset")
        self.epoch = 1
        self.batches_processed = 0
        self._order_epoch: int | None = None
        self._order: np.ndarray | None = None

    # ------------------------------------------------------------------ order and state
    def __len__(self) -> int:
        """Rank batches per epoch (drop_last)."""
        return len(self.dataset) // self.global_batch_size

    def global_order(self, epoch: int) -> np.ndarray:
        """Dataset positions of the epoch, truncated to whole global batches."""
        if self._order_epoch != epoch:
            order = np.arange(len(self.dataset), dtype=np.int64)
            np.random.default_rng([self.seed, epoch]).shuffle(order)
            self._order = order[: len(self) * self.global_batch_size]
            self._order_epoch = epoch
        return self._order

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "batches_processed": self.batches_processed,
            "seed": self.seed,
            "global_batch_size": self.global_batch_size,
            "world_size": self.world_size,
            "dataset_fingerprint": self.dataset.fingerprint,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the cursor; the next batch is the one after the last one consumed.

        Raises:
            ValueError: the global batch size differs (the cursor would mean other samples).
        """
        if int(state["global_batch_size"]) != self.global_batch_size:
            raise ValueError(f"state has global_batch_size={state['global_batch_size']}, "
                             f"loader has {self.global_batch_size}")
        if state.get("dataset_fingerprint") != self.dataset.fingerprint:
            logger.warning("restoring loader state from another dataset: %s vs %s",
                           state.get("dataset_fingerprint"), self.dataset.fingerprint)
        if int(state["seed"]) != self.seed:
            logger.warning("restoring loader state with seed %s (loader had %s)",
                           state["seed"], self.seed)
            self.seed = int(state["seed"])
            self._order_epoch = None
        self.epoch = int(state["epoch"])
        self.batches_processed = int(state["batches_processed"])

    # ------------------------------------------------------------------ batches
    def _load(self, pos: int, p: int, hw_p: int, rng: np.random.Generator) -> Sample:
        budget_tok = self.tokenization if self.budget_tokenization == "experiment" else None
        n = len(self.dataset)
        for attempt in range(n):
            i = (pos + attempt) % n
            try:
                return self.dataset.get_item(i, p, hw_p, self.token_budget, rng, budget_tok)
            except CorruptSampleError as e:
                if not self.skip_corrupt:
                    raise
                logger.warning("skipping unreadable sample: %s", e)
        raise CorruptSampleError(f"no readable sample in {self.dataset.root}")

    def batch_seed(self, epoch: int, step: int) -> np.random.SeedSequence:
        return np.random.SeedSequence([self.seed, epoch, step, self.rank])

    def make_batch(self, epoch: int, step: int) -> MaskedViews:
        """Rank batch `step` of `epoch` (pure function of the loader's settings)."""
        if not 0 <= step < len(self):
            raise ValueError(f"step={step} outside [0, {len(self)})")
        order = self.global_order(epoch)
        rows = order[step * self.global_batch_size:(step + 1) * self.global_batch_size]
        mine = rows[self.rank::self.world_size]
        ss = self.batch_seed(epoch, step)
        rng = np.random.default_rng(ss)
        p = int(rng.choice(self.patch_sizes))
        fits = [h for h in self.hw_p_list if h * p <= self.tile_size]
        if not fits:
            raise ValueError(f"no hw_p in {self.hw_p_list} fits patch_size={p} in "
                             f"{self.tile_size}-px tiles")
        hw_p = int(rng.choice(fits))
        samples = [self._load(int(pos), p, hw_p, rng) for pos in mine]
        words = ss.generate_state(2, np.uint64)  # [0]: the masks, [1]: the plans' DropPath draws
        batch = collate_views(samples, p, hw_p, self.masking, torch.Generator().manual_seed(int(words[0] >> 1)),
                              self.num_views)
        if self.planner is not None:
            batch.plans = self.planner(batch, int(words[1] >> 1))
        return batch

    def __iter__(self) -> Iterator[MaskedViews]:
        """Batches from the cursor to the end of the epoch; then the next epoch is armed."""
        epoch, start = self.epoch, self.batches_processed
        steps = list(range(start, len(self)))
        if self.num_workers == 0:
            source = (self.make_batch(epoch, s) for s in steps)
        else:
            source = iter(torch.utils.data.DataLoader(
                _EpochSlice(self, epoch, steps),
                batch_size=None,
                num_workers=self.num_workers,
                prefetch_factor=self.prefetch_factor,
                pin_memory=self.pin_memory,
                worker_init_fn=_worker_init,
                persistent_workers=False,
                # its own generator: a DataLoader without one draws the workers' base seed from the
                # global RNG on every new iterator, which would shift the model's band dropout and
                # DropPath draws with num_workers (the batches themselves are seeded per step)
                generator=torch.Generator(),
            ))
        for batch in source:
            self.batches_processed += 1
            yield batch
        if self.batches_processed >= len(self):
            self.epoch = epoch + 1
            self.batches_processed = 0


def _worker_init(worker_id: int) -> None:
    # masking and normalisation are per-batch vector ops on small tensors; one intra-op
    # thread per worker avoids oversubscribing the cores the workers already fill
    torch.set_num_threads(1)


class _EpochSlice(torch.utils.data.IterableDataset):
    """Worker w makes steps[w::num_workers]; torch's DataLoader interleaves workers
    round-robin, so batches arrive in step order."""

    def __init__(self, loader: OlmoEarthLoader, epoch: int, steps: list[int]):
        self.loader, self.epoch, self.steps = loader, epoch, steps

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (0, 1) if info is None else (info.id, info.num_workers)
        for s in self.steps[wid::nw]:
            yield self.loader.make_batch(self.epoch, s)
