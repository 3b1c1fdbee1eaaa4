"""Averaging the gradients over data-parallel ranks, during the last microbatch's backward.

`all_reduce_mean_ref` is the plain form: after the backward, every gradient flattened into one
buffer, one all-reduce, divided by the world size, copied back. Nothing of the communication
overlaps the computation: at base (~90M parameters, 360 MB of fp32 gradients) that is a few
milliseconds on one NVLink node and tens of milliseconds between nodes, on every step.

`BucketedAllReduce` computes the same thing while the backward still runs, as DDP does: the
trainable parameters are cut into buckets of about ``bucket_mb`` MB (the first one small, so
that the first collective starts early), and a bucket's all-reduce is launched from a
post-accumulate-grad hook as soon as every gradient in it has been accumulated. The buckets
follow the order in which the backward produces the gradients: reverse registration order on
the first step, then the order that step's backward showed on rank 0 (broadcast once, so that
all ranks agree). Reverse registration order alone is a poor guess here: the decoder's input
projection and norm are registered last but get their gradients only after every decoder
block, so the first bucket would wait until a quarter of the gradients had arrived.

Collectives must be issued in the same order on every rank, so bucket k is launched only after
buckets 0..k-1; buckets whose gradients never arrive (a parameter this rank did not use, e.g.
a modality absent from its batch) are launched in order at `finish`, with zeros for the
missing gradients, exactly as the plain form fills them. Element for element each rank
contributes the same values to the same sums, so the result equals the plain form's (bitwise
with two ranks; with more the collective's summation order may differ between buffer layouts).

The buckets are separate buffers: the reduced values reach the gradients only in `apply`, so
a step whose loss turns out non-finite on some rank can still discard them and fall back to the
plain form after its replay (trainer.py). Memory: one extra copy of the gradients.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

FIRST_BUCKET_MB = 1.0  # DDP's first bucket too: the first collective starts after few gradients


def _missing_as_zeros(params: list[Tensor]) -> list[Tensor]:
    """Every gradient, a zero one where the backward gave none (all ranks reduce the same list)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return [p.grad for p in params]


def all_reduce_mean_ref(params: list[Tensor], world_size: int) -> None:
    """Gradients averaged over the ranks, after the backward: one flat all-reduce."""
    grads = _missing_as_zeros(params)
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= world_size
    for g, reduced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.copy_(reduced)


class BucketedAllReduce:
    """All-reduce of the gradients in buckets, launched while the backward runs.

    Per step: `arm()` before the last microbatch's backward, `finish()` after it (launches what
    is left, in bucket order, and waits for every collective on the device's stream), then
    `apply()` to write the averaged values into the gradients (or nothing, to drop them).
    """

    def __init__(self, params: list[Tensor], world_size: int, bucket_mb: float):
        if bucket_mb <= 0:
            raise ValueError(f"bucket_mb must be positive, got {bucket_mb}")
        self.params = [p for p in params if p.requires_grad]
        self.world_size, self.bucket_mb = world_size, bucket_mb
        self._set_buckets(list(reversed(range(len(self.params)))))
        self._order: list[int] | None = []  # the first armed backward's gradient order, then None
        self._next_order: list[int] | None = None
        self._armed = False
        self._works: list = []
        self.launched_in_backward = 0  # buckets of the last step launched from the hooks (tests, logs)
        self._hooks = [p.register_post_accumulate_grad_hook(self._make_hook(i)) for i, p in enumerate(self.params)]

    def _set_buckets(self, order: list[int]) -> None:
        """Consecutive runs of ``order`` (parameter indices), a small first bucket, then about
        ``bucket_mb`` MB each (a larger parameter gets a bucket of its own)."""
        self.buckets: list[list[int]] = []  # parameter indices, in launch order
        limit, size = min(FIRST_BUCKET_MB, self.bucket_mb) * 2**20, 0
        for i in order:
            nbytes = self.params[i].numel() * self.params[i].element_size()
            if self.buckets and size + nbytes <= limit:
                self.buckets[-1].append(i)
                size += nbytes
            else:
                if self.buckets:
                    limit = self.bucket_mb * 2**20
                self.buckets.append([i])
                size = nbytes
        self.bucket_of = {i: b for b, idx in enumerate(self.buckets) for i in idx}
        self._flat: list[Tensor | None] = [None] * len(self.buckets)

    def __len__(self) -> int:
        return len(self.buckets)

    def _make_hook(self, i: int):
        def hook(_param: Tensor) -> None:
            if not self._armed:
                return
            if self._order is not None:
                self._order.append(i)
            b = self.bucket_of[i]
            self._pending[b] -= 1
            while self._next < len(self.buckets) and self._pending[self._next] == 0:
                self._launch(self._next)
                self.launched_in_backward += 1
        return hook

    def arm(self) -> None:
        """The next backward is the step's last: launch each bucket as soon as it is complete."""
        if self._next_order is not None:
            self._set_buckets(self._next_order)
            self._next_order = None
        self._pending = [len(idx) for idx in self.buckets]
        self._next, self._works, self.launched_in_backward = 0, [], 0
        self._armed = True

    def _launch(self, b: int) -> None:
        grads = _missing_as_zeros([self.params[i] for i in self.buckets[b]])
        flat = self._flat[b]
        numel = sum(g.numel() for g in grads)
        if flat is None or flat.numel() != numel or flat.device != grads[0].device or flat.dtype != grads[0].dtype:
            flat = self._flat[b] = grads[0].new_empty(numel)
        torch.cat([g.reshape(-1) for g in grads], out=flat)
        self._works.append(dist.all_reduce(flat, async_op=True))
        self._next = b + 1

    def finish(self) -> None:
        """Launch the buckets not yet launched (in order) and wait for all of them."""
        if not self._armed:
            raise RuntimeError("BucketedAllReduce.finish() without arm()")
        self._armed = False
        for b in range(self._next, len(self.buckets)):
            self._launch(b)
        for w in self._works:
            w.wait()  # NCCL: the current stream waits, not the host
        self._works = []
        if self._order is not None:
            self._rebuild()

    def _rebuild(self) -> None:
        """Buckets in the order the first backward produced the gradients (rank 0's, so that all
        ranks agree; parameters it did not see follow in reverse registration order). Decided
        once, after the first step's collectives; used from the next `arm` on, so that the first
        step's `apply` still reads the buckets it reduced."""
        seen = set(self._order)
        order = self._order + [i for i in reversed(range(len(self.params))) if i not in seen]
        self._order = None
        t = torch.tensor(order, dtype=torch.int64).to(self.params[0].device)
        dist.broadcast(t, 0)
        self._next_order = t.tolist()  # one host read, on the first step only

    def apply(self) -> None:
        """Write the averaged gradients (after `finish`)."""
        for b, idx in enumerate(self.buckets):
            flat = self._flat[b]
            flat /= self.world_size
            grads = [self.params[i].grad for i in idx]
            torch._foreach_copy_(grads, [v.view_as(g) for v, g in zip(flat.split([g.numel() for g in grads]), grads)])

    def state_dict(self) -> dict:
        """The bucket order once the first step has decided it: a resumed run launches the same
        buffers, so each collective sums in the same order as in the run straight through."""
        if self._order is not None:
            return {"order": None}
        return {"order": list(self._next_order) if self._next_order is not None else
                [i for b in self.buckets for i in b]}

    def load_state_dict(self, state: dict) -> None:
        order = state.get("order")
        if order is None:
            return
        if sorted(order) != list(range(len(self.params))):
            raise ValueError(f"a bucket order over {len(order)} parameters does not fit this model's "
                             f"{len(self.params)} trainable parameters")
        self._order, self._next_order = None, list(order)

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
