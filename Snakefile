# The Dasheng pipeline as one DAG, one rule file per stage (workflow/rules/), each calling the
# entry points of its own package (pipeline/<stage>/, `python -m dasheng_pipeline.<stage>.<module>`);
# the model itself is the library in model/. Helpers of the rule files: workflow/rules/common.smk.
#   sources (stage 1) -> features (2) -> training (3) -> evaluate (4) -> report
#   snakemake --cores 2 all                       the embedded demo (config/config.yaml)
#   snakemake --cores 8 --configfile config/audioset.yaml all
#   snakemake --profile slurm all                 on a SLURM cluster
from snakemake.utils import min_version, validate

from dasheng_pipeline.plan import check_renamed_keys

min_version("9.0")


configfile: "config/config.yaml"


# a renamed key: one line naming the new one (the schema's message would call it unexpected)
check_renamed_keys(config)
validate(config, "config/schema.yaml", set_default=True)


include: "workflow/rules/common.smk"
include: "workflow/rules/sources.smk"
include: "workflow/rules/features.smk"
include: "workflow/rules/training.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


# Every per-chunk artifact is a target too: Snakemake does not re-create a deleted
# intermediate file whose consumers are up to date, so listing them makes a rerun redo
# exactly the chunks whose outputs are missing.
rule data:
    input:
        DATA.manifests(),
        DATA.shards("dir"),
        DATA.shards("json"),
        rules.dataset_manifest.output,
        rules.coverage.output,


rule all:
    default_target: True
    input:
        rules.data.input,
        rules.train.output,
        rules.evaluate.input,
        rules.provenance_table.output,
