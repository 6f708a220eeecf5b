"""The user-facing operations as functions: embed, evaluate, finetune, predict, inspect, export.

``dasheng_pipeline.cli`` is a thin command line over them.

- :func:`embed_files` — audio files, folders or lists → one Parquet row per file (``embed``);
- :func:`read_embeddings` — an ``embed`` output → paths, clip embeddings (N, D), frames per file;
- :func:`evaluate_task` — a HEAR task folder → the DAG's probe and k-NN scores (``evaluate``);
- :func:`finetune` — labelled audio → a classifier on the encoder (``finetune``);
- :func:`predict` — a classifier → top-k labels per file or per 10 s chunk (``predict``);
- :func:`describe_checkpoint` — format, size, parameters, sha256, provenance (``inspect``);
- :func:`export_model` — a model → ONNX, the Hugging Face layout, the official ``.pt`` or ours
  (``export``; the model library's own :func:`dasheng_model.export.export_model`).

Models are named by one spec string everywhere (the DAG's ``models:`` resolve to the same):
a checkpoint, a Hugging Face folder or repo id, ``random:<size>[:<seed>]``
(:mod:`dasheng_model.pretrained`), and for ``embed`` and ``evaluate`` also ``logmel`` and
``hear:<module>[:<path>]``.
"""

import importlib

_WHERE = {
    "embed_files": "dasheng_pipeline.tools.embed",
    "read_embeddings": "dasheng_pipeline.tools.store",
    "evaluate_task": "dasheng_pipeline.tools.evaluate",
    "finetune": "dasheng_pipeline.tools.finetune",
    "predict": "dasheng_pipeline.tools.predict",
    "describe_checkpoint": "dasheng_pipeline.tools.checkpoints",
    "export_model": "dasheng_model.export",
}
__all__ = list(_WHERE)


def __getattr__(name: str):
    """Import on first use: ``from dasheng_pipeline.tools import embed_files`` loads only what it needs."""
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'dasheng_pipeline.tools' has no attribute {name!r}")
