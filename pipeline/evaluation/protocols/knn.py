"""The paper's k-NN on mean-pooled clip embeddings: ``python -m dasheng_pipeline.evaluation.protocols.knn``.

As the paper's Table 5: k = 10, cosine similarity, accuracy. scikit-learn's
``KNeighborsClassifier(metric="cosine", algorithm="brute")`` (uniform votes; a tie goes to the
label listed first in the vocabulary). Splits follow HEAR's rotation: a train/valid/test task is
scored on its test split, a k-fold task on every fold in turn (test fold i) with the scores
averaged. There is nothing to tune, so the neighbours are drawn from train and valid together
(``use_valid: false`` keeps valid out). Multiclass scene tasks only: for event and multilabel tasks
the result says it was skipped and why.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from dasheng_pipeline.common import atomic, logs, provenance
from dasheng_pipeline.evaluation.embeddings import load_meta
from dasheng_pipeline.evaluation.protocols import inputs
from dasheng_pipeline.evaluation.tasks import hear

log = logging.getLogger(__name__)


def knn_accuracy(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, k: int
) -> float:
    """Accuracy of a k-NN (cosine) classifier; ``k`` is capped at the number of references."""
    from sklearn.neighbors import KNeighborsClassifier

    if len(train_x) == 0 or len(test_x) == 0:
        raise ValueError(f"k-NN needs references and queries, got {len(train_x)} and {len(test_x)}")
    clf = KNeighborsClassifier(n_neighbors=min(k, len(train_x)), metric="cosine", algorithm="brute")
    clf.fit(train_x, train_y)
    return float((clf.predict(test_x) == test_y).mean())


def _xy(task: hear.Task, emb_dir: Path, splits) -> tuple[np.ndarray, np.ndarray]:
    """Clip embeddings of ``splits`` and their class indices (a multiclass scene task)."""
    data = inputs.load_splits(task, emb_dir, tuple(splits), frame_targets=None)
    return data.x, data.y.argmax(1)


def _split_accuracy(task: hear.Task, emb_dir: Path, fold: hear.Fold, k: int, use_valid: bool):
    """The record of one split: the accuracy on its test clips, the references drawn from its
    train (and valid) clips."""
    refs = fold.train + (fold.valid if use_valid else ())
    tx, ty = _xy(task, emb_dir, refs)
    qx, qy = _xy(task, emb_dir, fold.test)
    acc = knn_accuracy(tx, ty, qx, qy, k)
    log.info(f"  split {fold.index} (test {', '.join(fold.test)}): k-NN top1_acc {acc:.4f}")
    return {
        "index": fold.index,
        "references": list(refs),
        "test": list(fold.test),
        "n_references": int(len(tx)),
        "n_test": int(len(qx)),
        "top1_acc": acc,
    }


def run(
    task_dir: str | Path,
    emb_dir: str | Path,
    k: int,
    use_valid: bool,
    seed: int,
    stamp_section: dict,
) -> dict:
    """The paper's k-NN on one task's clip embeddings (``stamp_section``: what the provenance
    stamp hashes, the job's params); event and multilabel tasks are skipped, saying why."""
    task = hear.load_task(task_dir)
    emb_dir = Path(emb_dir)
    meta = load_meta(emb_dir)
    result = {
        **inputs.result_fields("knn", meta, task, task_dir),
        "primary_metric": "top1_acc",
        "k": k,
        "use_valid": use_valid,
        "embeddings_provenance": meta.get("provenance"),
        "provenance": provenance.stamp(stamp_section, seed),
    }
    if task.is_event or task.prediction_type != "multiclass":
        why = "event task" if task.is_event else "multilabel task (accuracy is undefined)"
        log.info(f"k-NN skipped for {task.name}: {why}")
        return {**result, "skipped": why, "metrics": {}, "folds": []}
    folds = [_split_accuracy(task, emb_dir, fold, k, use_valid) for fold in task.folds()]
    accs = np.array([f["top1_acc"] for f in folds])
    log.info(
        f"k-NN (k={k}) {meta['model']}/{task.name}: top1_acc {accs.mean():.4f} ± {accs.std():.4f}"
    )
    top1 = {"mean": float(accs.mean()), "std": float(accs.std()), "folds": [float(a) for a in accs]}
    return {**result, "metrics": {"top1_acc": top1}, "folds": folds}


def main(argv: list[str] | None = None) -> None:
    parser = inputs.scoring_parser(
        "dasheng_pipeline.evaluation.protocols.knn",
        __doc__,
        "seed, knn {k, use_valid}",
        threads=False,
    )
    args = parser.parse_args(argv)
    logs.setup()
    params = json.loads(args.params)
    k, use_valid = int(params["knn"]["k"]), bool(params["knn"]["use_valid"])
    with logs.one_line_errors():
        result = run(args.task, args.embeddings, k, use_valid, int(params["seed"]), params)
    atomic.write_json(args.out, result)


if __name__ == "__main__":
    main()
