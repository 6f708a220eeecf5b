"""k-nearest-neighbour classification on mean-pooled clip embeddings: ``python -m dasheng_pipeline.evaluation.knn``.

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
from dasheng_pipeline.evaluation import hear_tasks
from dasheng_pipeline.evaluation.embeddings import load_meta, load_split

log = logging.getLogger(__name__)


def knn_accuracy(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, k: int = 10
) -> float:
    """Accuracy of a k-NN (cosine) classifier; ``k`` is capped at the number of references."""
    from sklearn.neighbors import KNeighborsClassifier

    if len(train_x) == 0 or len(test_x) == 0:
        raise ValueError(f"k-NN needs references and queries, got {len(train_x)} and {len(test_x)}")
    clf = KNeighborsClassifier(n_neighbors=min(k, len(train_x)), metric="cosine", algorithm="brute")
    clf.fit(train_x, train_y)
    return float((clf.predict(test_x) == test_y).mean())


def _xy(task: hear_tasks.Task, emb_dir: Path, splits) -> tuple[np.ndarray, np.ndarray]:
    index = task.label_index
    xs, ys = [], []
    for split in splits:
        arr = load_split(emb_dir, split)
        labels = task.split_labels(split)
        xs.append(arr["clip"])
        ys.append(np.array([index[labels[str(f)][0]] for f in arr["files"]], dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def run(
    task_dir: str | Path,
    emb_dir: str | Path,
    k: int = 10,
    use_valid: bool = True,
    seed: int = 0,
    stamp_section: dict | None = None,
) -> dict:
    task = hear_tasks.load_task(task_dir)
    emb_dir = Path(emb_dir)
    meta = load_meta(emb_dir)
    result = {
        "method": "knn",
        "model": meta["model"],
        "task": task.name,
        "task_dir": str(task_dir),
        "task_mode": task.metadata.get("mode"),
        "domain": task.metadata.get("domain"),
        "embedding_type": task.embedding_type,
        "split_mode": task.split_mode,
        "primary_metric": "top1_acc",
        "k": k,
        "use_valid": use_valid,
        "embeddings_provenance": meta.get("provenance"),
        "provenance": provenance.stamp(
            stamp_section if stamp_section is not None else {"k": k, "use_valid": use_valid}, seed
        ),
    }
    if task.is_event or task.prediction_type != "multiclass":
        why = "event task" if task.is_event else "multilabel task (accuracy is undefined)"
        log.info(f"k-NN skipped for {task.name}: {why}")
        return {**result, "skipped": why, "metrics": {}, "folds": []}
    folds = []
    for fold in task.folds():
        refs = fold.train + (fold.valid if use_valid else ())
        tx, ty = _xy(task, emb_dir, refs)
        qx, qy = _xy(task, emb_dir, fold.test)
        acc = knn_accuracy(tx, ty, qx, qy, k)
        folds.append(
            {
                "index": fold.index,
                "references": list(refs),
                "test": list(fold.test),
                "n_references": int(len(tx)),
                "n_test": int(len(qx)),
                "top1_acc": acc,
            }
        )
        log.info(f"  split {fold.index} (test {', '.join(fold.test)}): k-NN top1_acc {acc:.4f}")
    accs = np.array([f["top1_acc"] for f in folds])
    log.info(
        f"k-NN (k={k}) {meta['model']}/{task.name}: top1_acc {accs.mean():.4f} ± {accs.std():.4f}"
    )
    return {
        **result,
        "metrics": {
            "top1_acc": {
                "mean": float(accs.mean()),
                "std": float(accs.std()),
                "folds": [float(a) for a in accs],
            }
        },
        "folds": folds,
    }


def main(argv: list[str] | None = None) -> None:
    parser = hear_tasks.scoring_parser(
        "dasheng_pipeline.evaluation.knn", __doc__, "seed, knn {k, use_valid}", threads=False
    )
    args = parser.parse_args(argv)
    logs.setup()
    params = json.loads(args.params)
    knn = params.get("knn", {})
    with logs.one_line_errors():
        result = run(
            args.task,
            args.embeddings,
            int(knn.get("k", 10)),
            bool(knn.get("use_valid", True)),
            int(params.get("seed", 0)),
            params,
        )
    atomic.write_json(args.out, result)


if __name__ == "__main__":
    main()
