"""Linear probe on frozen embeddings (classification), the reference's offline EuroSAT probe.

Reference semantics (`evals/linear_probe.py`, classification branch): BatchNorm1d(D) then
Linear(D, C); AdamW (torch defaults: betas (0.9, 0.999), weight decay 0.01) at ``lr``;
cross-entropy; mini-batches of 32 reshuffled every epoch (torch DataLoader, global RNG);
the learning rate is set before every optimizer step to
    lr(e) = lr · e / w                               for e < w = int(0.1 · epochs),
    lr(e) = 1e-5 + (lr − 1e-5) · ½ (1 + cos(π (e − w) / (epochs − w)))   otherwise,
with e = epoch + i / batches_per_epoch (so the very first step has lr 0 when w > 0); bf16
autocast on the probe's device; 50 epochs; accuracy of the final probe on valid and test
(the reference evaluates every 50 epochs, i.e. only at the end for 50-epoch runs).
Full sweeps (`internal/full_eval_sweep.py`) try lr in `SWEEP_LRS` and keep the best on valid.

Given the same embeddings and torch seed, `train_linear_probe` consumes the global RNG as the
reference does (probe init, then one DataLoader per run), so results match it step for step
for epochs <= 50. (Beyond 50 epochs the reference evaluates every 50 and starts a fresh AdamW
for each 50-epoch chunk; here one optimizer runs throughout.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from olmoearth_fast.eval.knn import accuracy

SWEEP_LRS = (1e-4, 5e-4, 1e-3, 5e-3, 1e-2, 5e-2, 1e-1, 5e-1)
MIN_LR = 1e-5


def probe_lr(epoch: float, lr: float, epochs: int, min_lr: float = MIN_LR) -> float:
    """Learning rate at fractional epoch ``epoch``: 10 % linear warmup, then half cosine."""
    warmup = int(epochs * 0.1)
    if epoch < warmup:
        return lr * epoch / warmup
    return min_lr + (lr - min_lr) * 0.5 * (
        1.0 + math.cos(math.pi * (epoch - warmup) / (epochs - warmup))
    )


class LinearProbe(nn.Module):
    """BatchNorm1d + Linear: [B, D] embeddings -> [B, C] logits."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.batchnorm = nn.BatchNorm1d(dim)
        self.linear = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.batchnorm(x))


def train_linear_probe(
    emb: Tensor,
    labels: Tensor,
    num_classes: int,
    lr: float = 1e-2,
    epochs: int = 50,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    autocast: bool = True,
) -> LinearProbe:
    """Fit a `LinearProbe` on (emb [N, D], labels [N]); see the module docstring.

    Args:
        autocast: bf16 autocast for the forward pass (the reference always uses it).
    """
    if emb.ndim != 2 or labels.shape != (emb.shape[0],):
        raise ValueError(
            f"emb must be [N, D] and labels [N], got {tuple(emb.shape)}, {tuple(labels.shape)}"
        )
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(
            f"epochs, batch_size and lr must be positive, got {epochs}, {batch_size}, {lr}"
        )
    device = torch.device(device)
    probe = LinearProbe(emb.shape[1], num_classes).to(device)
    opt = torch.optim.AdamW(probe.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss(ignore_index=-1)
    loader = DataLoader(TensorDataset(emb, labels), batch_size=batch_size, shuffle=True)
    probe.train()
    for epoch in range(epochs):
        for i, (x, y) in enumerate(loader):
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = loss_fn(probe(x.to(device)), y.to(device))
            loss.backward()
            for group in opt.param_groups:
                group["lr"] = probe_lr(epoch + i / len(loader), lr, epochs)
            opt.step()
            opt.zero_grad()
    return probe.eval()


@torch.no_grad()
def probe_predict(
    probe: LinearProbe, emb: Tensor, batch_size: int = 1024, autocast: bool = True
) -> Tensor:
    """Arg-max class of each embedding under the (eval-mode) probe."""
    probe.eval()
    device = next(probe.parameters()).device
    out = []
    for x in emb.split(batch_size):
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast):
            out.append(probe(x.to(device)).argmax(1).cpu())
    return torch.cat(out)


def evaluate_linear_probe(
    train: tuple[Tensor, Tensor],
    evals: dict[str, tuple[Tensor, Tensor]],
    num_classes: int,
    lrs: Sequence[float] = (1e-2,),
    epochs: int = 50,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    autocast: bool = True,
    select_split: str = "valid",
) -> dict:
    """Train one probe per lr; report every split's accuracy and the lr best on ``select_split``.

    Returns:
        {"per_lr": {lr: {split: acc}}, "best_lr": lr, **{split: acc of the best lr}}.
    """
    if not lrs:
        raise ValueError("lrs is empty: give at least one probe learning rate")
    if select_split not in evals:
        raise ValueError(
            f"select_split {select_split!r} is not among the evaluated splits {sorted(evals)}"
        )
    per_lr = {}
    for lr in lrs:
        probe = train_linear_probe(*train, num_classes, lr, epochs, batch_size, device, autocast)
        per_lr[lr] = {
            s: accuracy(probe_predict(probe, e, autocast=autocast), y)
            for s, (e, y) in evals.items()
        }
    best = max(lrs, key=lambda lr: per_lr[lr][select_split])  # first lr wins ties
    return {"per_lr": per_lr, "best_lr": best, **per_lr[best]}
