"""The data stage's coverage report (a `script:` so that any number of manifests fits)."""

import contextlib

from dasheng_pipeline.common import logs
from dasheng_pipeline.sources import coverage

with (
    open(snakemake.log[0], "w") as log,
    contextlib.redirect_stdout(log),
    contextlib.redirect_stderr(log),
):
    logs.setup(stream=log)
    coverage.build(snakemake.params.layout, snakemake.output.csv, snakemake.output.png)
