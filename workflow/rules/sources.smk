# Stage 1, audio (package pipeline/sources/). Families of jobs write one chunk manifest per chunk
# of clips: demo (synthetic), youtube (segment lists through yt-dlp), local (folder trees) and the
# mirrors (hf_parquet, webdataset, http_archive). A mirror also gets a key table over its chunks
# (the first copy of each key; the mel jobs reject later copies), and so does every route a later
# route of its corpus builds on. Audio lands in {OUT}/audio/{source}/{chunk}/, outside the
# declared outputs, so a rerun reuses what an earlier run fetched. Corpora (config key corpora)
# add an ID table per corpus; a route's chunk jobs read the key tables of the routes before it.
# One job writes the coverage report.
# (A key table's job reads a list of the manifests that a job of its own wrote: every chunk of
# the next stage depends on the key table, and Snakemake checks each such edge against all the
# inputs of its producer, which would cost chunks x chunks for a table with the manifests as inputs.)


rule demo_chunk:
    input:
        lambda wc: DATA.route_inputs(wc.source),
    output:
        f"{OUT}/manifests/{{source}}/{{chunk}}.json",
    log:
        f"{LOGS}/sources/{{source}}/{{chunk}}.log",
    wildcard_constraints:
        source=constraint(DATA.names_in("demo")),
        chunk=r"\d+",
    conda:
        "../../envs/data.yaml"
    params:
        cfg=lambda wc: source_params(wc.source),
        audio_dir=lambda wc: f"{OUT}/audio/{wc.source}/{wc.chunk}",
    shell:
        "python -m dasheng_pipeline.sources.demo --chunk {wildcards.chunk} --params {params.cfg:q} "
        "--out {output:q} --audio-dir {params.audio_dir:q} > {log:q} 2>&1"


rule youtube_index:
    input:
        lambda wc: SOURCES[wc.source].cfg["list"],
    output:
        f"{OUT}/lists/{{source}}.index.json",
    log:
        f"{LOGS}/sources/{{source}}.index.log",
    wildcard_constraints:
        source=constraint(DATA.names_in("youtube")),
    conda:
        "../../envs/data.yaml"
    params:
        cfg=lambda wc: source_params(
            wc.source, expected_chunks=len(SOURCES[wc.source].chunks)
        ),
    shell:
        "python -m dasheng_pipeline.sources.youtube index --list {input:q} --params {params.cfg:q} "
        "--out {output:q} > {log:q} 2>&1"


rule youtube_chunk:
    input:
        list=lambda wc: SOURCES[wc.source].cfg["list"],
        index=f"{OUT}/lists/{{source}}.index.json",
        route=lambda wc: DATA.route_inputs(wc.source),
    output:
        f"{OUT}/manifests/{{source}}/{{chunk}}.json",
    log:
        f"{LOGS}/sources/{{source}}/{{chunk}}.log",
    wildcard_constraints:
        source=constraint(DATA.names_in("youtube")),
        chunk=r"\d+",
    conda:
        "../../envs/data.yaml"
    resources:
        downloads=1,
    params:
        cfg=lambda wc: source_params(wc.source),
        audio_dir=lambda wc: f"{OUT}/audio/{wc.source}/{wc.chunk}",
    shell:
        "python -m dasheng_pipeline.sources.youtube chunk --list {input.list:q} --index {input.index:q} "
        "--chunk {wildcards.chunk} --params {params.cfg:q} --out {output:q} "
        "--audio-dir {params.audio_dir:q} > {log:q} 2>&1"


rule local_index:
    output:
        f"{OUT}/lists/{{source}}.files.json",
    log:
        f"{LOGS}/sources/{{source}}.index.log",
    wildcard_constraints:
        source=constraint(DATA.names_in("local")),
    conda:
        "../../envs/data.yaml"
    params:
        cfg=lambda wc: source_params(wc.source, files=SOURCES[wc.source].files),
    shell:
        "python -m dasheng_pipeline.sources.local index --params {params.cfg:q} --out {output:q} > {log:q} 2>&1"


rule local_chunk:
    input:
        f"{OUT}/lists/{{source}}.files.json",
    output:
        f"{OUT}/manifests/{{source}}/{{chunk}}.json",
    log:
        f"{LOGS}/sources/{{source}}/{{chunk}}.log",
    wildcard_constraints:
        source=constraint(DATA.names_in("local")),
        chunk=r"\d+",
    conda:
        "../../envs/data.yaml"
    params:
        cfg=lambda wc: source_params(wc.source),
        audio_dir=lambda wc: f"{OUT}/audio/{wc.source}/{wc.chunk}",
    shell:
        "python -m dasheng_pipeline.sources.local chunk --index {input:q} --chunk {wildcards.chunk} "
        "--params {params.cfg:q} --out {output:q} --audio-dir {params.audio_dir:q} > {log:q} 2>&1"


rule demo_mirror:
    output:
        parquet=f"{OUT}/mirror/{{source}}/data/{{source}}-00000.parquet",
        ids=f"{OUT}/mirror/{{source}}/ids.txt",
    log:
        f"{LOGS}/sources/{{source}}.mirror.log",
    wildcard_constraints:
        source=constraint(DATA.demo_mirrors()),
    conda:
        "../../envs/data.yaml"
    params:
        cfg=lambda wc: source_params(wc.source),
    shell:
        "python -m dasheng_pipeline.sources.demo mirror --params {params.cfg:q} "
        "--parquet {output.parquet:q} --ids {output.ids:q} > {log:q} 2>&1"


rule hf_parquet_chunk:
    input:
        lambda wc: DATA.mirror_inputs(wc.source, wc.chunk),
    output:
        f"{OUT}/manifests/{{source}}/{{chunk}}.json",
    log:
        f"{LOGS}/sources/{{source}}/{{chunk}}.log",
    wildcard_constraints:
        source=constraint(DATA.names_in("hf_parquet")),
        chunk=r"\d+",
    conda:
        "../../envs/data.yaml"
    resources:
        mirror_downloads=1,  # --resources mirror_downloads=N caps them (YouTube's: downloads)
    params:
        cfg=lambda wc: source_params(
            wc.source, files=DATA.mirror_units(wc.source, wc.chunk)
        ),
        audio_dir=lambda wc: f"{OUT}/audio/{wc.source}/{wc.chunk}",
        download_dir=lambda wc: f"{OUT}/downloads/{wc.source}",
    shell:
        "python -m dasheng_pipeline.sources.hf_parquet chunk --chunk {wildcards.chunk} "
        "--params {params.cfg:q} --out {output:q} --audio-dir {params.audio_dir:q} "
        "--download-dir {params.download_dir:q} > {log:q} 2>&1"


rule webdataset_chunk:
    input:
        lambda wc: DATA.mirror_inputs(wc.source, wc.chunk),
    output:
        f"{OUT}/manifests/{{source}}/{{chunk}}.json",
    log:
        f"{LOGS}/sources/{{source}}/{{chunk}}.log",
    wildcard_constraints:
        source=constraint(DATA.names_in("webdataset")),
        chunk=r"\d+",
    conda:
        "../../envs/data.yaml"
    resources:
        mirror_downloads=1,  # --resources mirror_downloads=N caps them (YouTube's: downloads)
    params:
        cfg=lambda wc: source_params(
            wc.source, files=DATA.mirror_units(wc.source, wc.chunk)
        ),
        audio_dir=lambda wc: f"{OUT}/audio/{wc.source}/{wc.chunk}",
        download_dir=lambda wc: f"{OUT}/downloads/{wc.source}",
    shell:
        "python -m dasheng_pipeline.sources.tars chunk --chunk {wildcards.chunk} "
        "--params {params.cfg:q} --out {output:q} --audio-dir {params.audio_dir:q} "
        "--download-dir {params.download_dir:q} > {log:q} 2>&1"


rule http_archive_chunk:
    input:
        lambda wc: DATA.mirror_inputs(wc.source, wc.chunk),
    output:
        f"{OUT}/manifests/{{source}}/{{chunk}}.json",
    log:
        f"{LOGS}/sources/{{source}}/{{chunk}}.log",
    wildcard_constraints:
        source=constraint(DATA.names_in("http_archive")),
        chunk=r"\d+",
    conda:
        "../../envs/data.yaml"
    resources:
        mirror_downloads=1,  # --resources mirror_downloads=N caps them (YouTube's: downloads)
    params:
        cfg=lambda wc: source_params(
            wc.source, files=DATA.mirror_units(wc.source, wc.chunk)
        ),
        audio_dir=lambda wc: f"{OUT}/audio/{wc.source}/{wc.chunk}",
        download_dir=lambda wc: f"{OUT}/downloads/{wc.source}",
    shell:
        "python -m dasheng_pipeline.sources.http_archive chunk --chunk {wildcards.chunk} "
        "--params {params.cfg:q} --out {output:q} --audio-dir {params.audio_dir:q} "
        "--download-dir {params.download_dir:q} > {log:q} 2>&1"


rule source_manifests:
    input:
        lambda wc: DATA.manifests(wc.source),
    output:
        f"{OUT}/keys/{{source}}.manifests.txt",
    log:
        f"{LOGS}/sources/{{source}}.manifests.log",
    wildcard_constraints:
        source=constraint(DATA.keyed_sources()),
    conda:
        "../../envs/data.yaml"
    shell:
        "printf '%s\\n' {input:q} > {output:q} 2> {log:q}"


rule source_keys:
    input:
        f"{OUT}/keys/{{source}}.manifests.txt",
    output:
        f"{OUT}/keys/{{source}}.parquet",
    log:
        f"{LOGS}/sources/{{source}}.keys.log",
    wildcard_constraints:
        source=constraint(DATA.keyed_sources()),
    conda:
        "../../envs/data.yaml"
    params:
        cfg=lambda wc: as_json({"source": wc.source, "seed": config["seed"]}),
    shell:
        "python -m dasheng_pipeline.sources.routes keys --params {params.cfg:q} "
        "--listing {input:q} --out {output:q} > {log:q} 2>&1"


rule corpus_ids:
    input:
        lambda wc: CORPORA[wc.corpus]["list"],
    output:
        f"{OUT}/corpora/{{corpus}}/ids.parquet",
    log:
        f"{LOGS}/sources/{{corpus}}.ids.log",
    wildcard_constraints:
        corpus=constraint(list(CORPORA)),
    conda:
        "../../envs/data.yaml"
    params:
        cfg=lambda wc: as_json(
            {
                "corpus": wc.corpus,
                "corpus_cfg": CORPORA[wc.corpus],
                "seed": config["seed"],
            }
        ),
    shell:
        "python -m dasheng_pipeline.sources.routes ids --list {input:q} --params {params.cfg:q} "
        "--out {output:q} > {log:q} 2>&1"


rule coverage:
    input:
        manifests=DATA.manifests(),
        ids=[DATA.corpus_ids(c) for c in CORPORA],
        tables=[DATA.source_keys(n) for n in DATA.names_in(*MIRRORS)],
    output:
        csv=report(
            f"{OUT}/data/coverage.csv",
            caption="../report/coverage.rst",
            category="Data",
        ),
        png=report(
            f"{OUT}/data/coverage.png",
            caption="../report/coverage.rst",
            category="Data",
        ),
    log:
        f"{LOGS}/sources/coverage.log",
    conda:
        "../../envs/data.yaml"
    params:
        layout=DATA.coverage_layout(),
    script:
        "../scripts/coverage.py"
