# The provenance table of the run (config hash, seed, versions, git SHA of the main
# artifacts), shown in `snakemake --report` (pipeline/common/provenance.py).


rule provenance_table:
    input:
        planned("provenance_artifacts"),
    output:
        report(
            f"{OUT}/provenance.csv",
            caption="../report/provenance.rst",
            category="Provenance",
        ),
    log:
        f"{LOGS}/provenance.log",
    conda:
        "../../envs/data.yaml"
    shell:
        "python -m dasheng_pipeline.common.provenance --out {output:q} {input:q} > {log:q} 2>&1"
