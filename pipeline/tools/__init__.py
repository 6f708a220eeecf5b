"""The user-facing operations, as plain functions; ``pipeline.cli`` is a thin command line over them.

- :func:`embed_files` — audio files, folders or lists → one Parquet row per file (``embed``);
- :func:`evaluate_task` — a HEAR task folder → the DAG's probe and k-NN scores (``evaluate``);
- :func:`finetune` — labelled audio → a classifier on the encoder (``finetune``);
- :func:`predict` — a classifier → top-k labels per file or per 10 s chunk (``predict``);
- :func:`describe_checkpoint` — format, size, parameters, sha256, provenance (``inspect``).

Models are named by the specs of :mod:`model.pretrained` everywhere.
"""
