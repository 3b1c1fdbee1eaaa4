"""kNN classification of frozen embeddings, the reference's in-loop EuroSAT metric.

Reference semantics (`evals/knn.py`): L2-normalise embeddings (eps 1e-8), cosine similarity of
each query to every train embedding, the k = 20 most similar train samples vote for their
class with weight exp(sim / 0.07), the prediction is the arg-max of the summed votes (ties to
the lower class index), and the metric is accuracy. The train split embeds the neighbours, the
valid split is the reported score (test too, when asked).

`knn_predict` processes queries in chunks (memory O(chunk · N_train)); `knn_predict_ref` is a
per-query transcription used as the test oracle.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

K = 20
TEMPERATURE = 0.07
_EPS = 1e-8


def _check(
    train_emb: Tensor, train_labels: Tensor, query_emb: Tensor, num_classes: int, k: int
) -> None:
    if train_emb.ndim != 2 or query_emb.ndim != 2 or train_emb.shape[1] != query_emb.shape[1]:
        raise ValueError(
            f"embeddings must be [N, D] with the same D, got train {tuple(train_emb.shape)}, "
            f"query {tuple(query_emb.shape)}"
        )
    if train_labels.shape != (train_emb.shape[0],):
        raise ValueError(
            f"train_labels must be [{train_emb.shape[0]}], got {tuple(train_labels.shape)}"
        )
    if not 1 <= k <= train_emb.shape[0]:
        raise ValueError(
            f"k must be in [1, number of train samples = {train_emb.shape[0]}], got {k}"
        )
    if train_labels.numel() and (
        int(train_labels.min()) < 0 or int(train_labels.max()) >= num_classes
    ):
        raise ValueError(
            f"train_labels must be in [0, {num_classes}), got [{int(train_labels.min())}, "
            f"{int(train_labels.max())}]"
        )


def knn_predict(
    train_emb: Tensor,
    train_labels: Tensor,
    query_emb: Tensor,
    num_classes: int,
    k: int = K,
    temperature: float = TEMPERATURE,
    chunk_size: int = 2000,
    return_votes: bool = False,
) -> Tensor:
    """Predicted class of each query (or its [Q, C] vote distribution, summing to 1).

    Args:
        train_emb: [N, D] neighbour embeddings; train_labels: [N] int64 in [0, num_classes).
        query_emb: [Q, D] embeddings to classify.
        k: neighbours per query; temperature: vote weight exp(sim / temperature).
        chunk_size: queries per similarity block.
    """
    _check(train_emb, train_labels, query_emb, num_classes, k)
    device = train_emb.device
    train = F.normalize(train_emb.float(), p=2, dim=1, eps=_EPS)
    labels = train_labels.to(device)
    out = []
    for q in query_emb.to(device).float().split(chunk_size):
        sim = F.normalize(q, p=2, dim=1, eps=_EPS) @ train.T  # [q, N]
        top_sim, top_idx = sim.topk(k, dim=1)
        # one-hot votes summed over the k neighbours (that order of summation is the reference's)
        votes = (
            F.one_hot(labels[top_idx], num_classes) * torch.exp(top_sim / temperature)[..., None]
        ).sum(1)
        out.append(
            votes / votes.sum(1, keepdim=True).clamp_min(_EPS) if return_votes else votes.argmax(1)
        )
    return torch.cat(out).cpu()


def knn_predict_ref(
    train_emb: Tensor,
    train_labels: Tensor,
    query_emb: Tensor,
    num_classes: int,
    k: int = K,
    temperature: float = TEMPERATURE,
) -> Tensor:
    """Per-query loop over a full sort (fp64): the oracle for `knn_predict`."""
    _check(train_emb, train_labels, query_emb, num_classes, k)
    train = train_emb.double()
    train = train / train.norm(dim=1, keepdim=True).clamp_min(_EPS)
    preds = []
    for q in query_emb.double():
        sim = train @ (q / q.norm().clamp_min(_EPS))
        order = torch.argsort(sim, descending=True)[:k]
        votes = [0.0] * num_classes
        for j in order.tolist():
            votes[int(train_labels[j])] += float(torch.exp(sim[j] / temperature))
        preds.append(max(range(num_classes), key=lambda c: (votes[c], -c)))
    return torch.tensor(preds, dtype=torch.long)


def accuracy(pred: Tensor, labels: Tensor) -> float:
    if pred.shape != labels.shape or pred.numel() == 0:
        raise ValueError(
            f"predictions {tuple(pred.shape)}, labels {tuple(labels.shape)}: "
            "expected equal shapes, non-empty"
        )
    return float((pred.cpu() == labels.cpu()).double().mean())


def knn_accuracy(
    train_emb: Tensor,
    train_labels: Tensor,
    query_emb: Tensor,
    query_labels: Tensor,
    num_classes: int,
    k: int = K,
    temperature: float = TEMPERATURE,
) -> float:
    """Accuracy of `knn_predict` on labelled queries."""
    return accuracy(
        knn_predict(train_emb, train_labels, query_emb, num_classes, k, temperature), query_labels
    )


def evaluate_knn(
    model,
    dataset,
    *,
    eval_splits: Sequence[str] = ("valid",),
    train_split: str = "train",
    k: int = K,
    patch_size: int = 4,
    batch_size: int = 128,
    precision: str = "auto",
    max_samples: int | None = None,
    prefix: str = "eval/knn",
) -> dict[str, float]:
    """kNN accuracy of ``model``'s embeddings; callable from a training loop.

    Args:
        model: a `LatentMIM` (any mode; it is put in eval mode and restored).
        dataset: a `EuroSAT` (opened once with `load_eurosat`, cheap to reuse) or its path.
        eval_splits: splits to score against the train split's neighbours.
        max_samples: use N evenly spaced samples of each split (a quicker in-loop check).
        prefix: metric name prefix.

    Returns:
        {"{prefix}/{split}_acc": accuracy, ...,  "{prefix}/seconds": wall time}.
    """
    import time

    from olmoearth_fast.eval.datasets import EuroSAT, load_eurosat
    from olmoearth_fast.eval.embeddings import embed_images

    t0 = time.perf_counter()
    if not isinstance(dataset, EuroSAT):
        dataset = load_eurosat(dataset, splits=(train_split, *eval_splits))

    def embed(split: str) -> tuple[Tensor, Tensor]:
        sp = dataset.split(split)
        sp = sp.subset(max_samples) if max_samples is not None else sp
        return embed_images(model, sp.batches(batch_size), patch_size, precision)

    train_emb, train_y = embed(train_split)
    out = {}
    for split in eval_splits:
        emb, y = embed(split)
        out[f"{prefix}/{split}_acc"] = knn_accuracy(
            train_emb, train_y, emb, y, dataset.num_classes, k
        )
    out[f"{prefix}/seconds"] = time.perf_counter() - t0
    return out
