# Stage 2, features (package pipeline/features/). One job per chunk: decode (16 kHz mono), cut
# into 10 s windows, log-mel with the model's own front end (model/frontend.py), a folder of
# Parquet shards (parts of at most shards.max_rows windows) + a shard manifest listing them and
# accounting for every clip. Then one job aggregates the dataset manifest (shards, sha256,
# per-bin mean/std) and the rejects list.


rule mel_chunk:
    input:
        unpack(lambda wc: DATA.mel_inputs(wc.source, wc.chunk)),
    output:
        shards=directory(f"{OUT}/shards/{{source}}/{{chunk}}"),
        manifest=f"{OUT}/shards/{{source}}/{{chunk}}.json",
    log:
        f"{LOGS}/features/{{source}}/{{chunk}}.log",
    wildcard_constraints:
        chunk=r"\d+",
    conda:
        "../../envs/data.yaml"
    threads: 1
    resources:
        mem_mb=2000,
    params:
        cfg=features_params(),
        table=lambda wc, input: f"--keys '{input.table}'" if input.table else "",
    shell:
        "python -m dasheng_pipeline.features.mel --manifest {input.manifest:q} "
        "--shards {output.shards:q} --out {output.manifest:q} --params {params.cfg:q} "
        "--threads {threads} {params.table} > {log:q} 2>&1"


rule dataset_manifest:
    input:
        manifests=DATA.shards("json"),
        shards=DATA.shards("dir"),
    output:
        manifest=f"{OUT}/dataset/manifest.json",
        rejects=f"{OUT}/dataset/rejects.json",
    log:
        f"{LOGS}/features/dataset_manifest.log",
    conda:
        "../../envs/data.yaml"
    params:
        cfg=features_params(),
    script:
        "../scripts/dataset_manifest.py"
