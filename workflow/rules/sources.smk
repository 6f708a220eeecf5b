# Stage 1, audio (package pipeline/sources/). Three families of jobs write one chunk manifest
# per chunk of clips: demo (synthetic), youtube (segment lists through yt-dlp) and local (folder
# trees). Audio lands in {OUT}/audio/{source}/{chunk}/, outside the declared outputs, so a rerun
# reuses what an earlier run fetched.


rule demo_chunk:
    output:
        f"{OUT}/manifests/{{source}}/{{chunk}}.json",
    log:
        f"{LOGS}/sources/{{source}}/{{chunk}}.log",
    wildcard_constraints:
        source=constraint(names_of("demo")),
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
        source=constraint(names_of("youtube")),
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
    output:
        f"{OUT}/manifests/{{source}}/{{chunk}}.json",
    log:
        f"{LOGS}/sources/{{source}}/{{chunk}}.log",
    wildcard_constraints:
        source=constraint(names_of("youtube")),
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
        source=constraint(names_of("local")),
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
        source=constraint(names_of("local")),
        chunk=r"\d+",
    conda:
        "../../envs/data.yaml"
    params:
        cfg=lambda wc: source_params(wc.source),
        audio_dir=lambda wc: f"{OUT}/audio/{wc.source}/{wc.chunk}",
    shell:
        "python -m dasheng_pipeline.sources.local chunk --index {input:q} --chunk {wildcards.chunk} "
        "--params {params.cfg:q} --out {output:q} --audio-dir {params.audio_dir:q} > {log:q} 2>&1"
