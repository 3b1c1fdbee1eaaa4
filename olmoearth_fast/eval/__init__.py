"""Evaluation: EuroSAT kNN and linear probe, embedding export (`python -m olmoearth_fast.eval`).

    from olmoearth_fast.eval import evaluate_knn, load_eurosat, load_model
    model, cfg = load_model("runs/demo")                    # latest checkpoint of a run
    evaluate_knn(model, load_eurosat("/data/geobench/classification_v1.0/m-eurosat"))
    # {"eval/knn/valid_acc": ..., "eval/knn/seconds": ...}

Modules: `datasets` (the GEO-Bench and torchgeo EuroSAT layouts), `embeddings` (model loading,
mean-pooled encoder embeddings), `knn`, `linprobe`, `embed` (H5 dataset export), `demo` (the
demo's kNN check on synthetic labelled scenes).
"""

from olmoearth_fast.eval.datasets import EuroSAT, load_eurosat
from olmoearth_fast.eval.embeddings import embed_batch, embed_images, load_model
from olmoearth_fast.eval.knn import evaluate_knn, knn_accuracy, knn_predict
from olmoearth_fast.eval.linprobe import evaluate_linear_probe, train_linear_probe

__all__ = [
    "EuroSAT",
    "embed_batch",
    "embed_images",
    "evaluate_knn",
    "evaluate_linear_probe",
    "knn_accuracy",
    "knn_predict",
    "load_eurosat",
    "load_model",
    "train_linear_probe",
]
