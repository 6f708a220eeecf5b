"""Aggregate the shard manifests (a `script:` so that any number of inputs fits)."""

import contextlib
import json

from dasheng_pipeline.common import logs
from dasheng_pipeline.features import shards

with (
    open(snakemake.log[0], "w") as log,
    contextlib.redirect_stdout(log),
    contextlib.redirect_stderr(log),
):
    logs.setup(stream=log)
    shards.build_dataset_manifest(
        list(snakemake.input.manifests),
        json.loads(snakemake.params.cfg),
        snakemake.output.manifest,
        snakemake.output.rejects,
    )
