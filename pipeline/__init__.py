"""The Dasheng pipeline: the DAG's stages, the plan of a run, and the command line over them.

One subpackage per stage, in the order the data flows:

- ``dasheng_pipeline.common``: atomic writes, provenance stamps, audio decoding (ffmpeg), manifests, logging;
- ``dasheng_pipeline.sources``: stage 1, audio from the demo synthesiser, YouTube segment lists or local trees;
- ``dasheng_pipeline.features``: stage 2, 10 s windows → log-mel (the model's front end) → Parquet shards;
- ``dasheng_pipeline.training``: stage 3, MAE pre-training with Ray Train, the loader, schedule, averaging;
- ``dasheng_pipeline.evaluation``: stage 4, task readers, embeddings, HEAR probe, k-NN, tables, plots;
- ``dasheng_pipeline.plan``: what a workflow config means (chunks, tasks, models, jobs, targets), for the
  rule files (workflow/rules/common.smk) and the command line.

Every stage uses the ``model`` library; ``model`` never imports ``pipeline`` (enforced by
import-linter, see ``[tool.importlinter]`` in pyproject.toml).
"""
