# Stage 4, evaluation (package pipeline/evaluation/: tasks/, protocols/, report/). For every
# (model, task): embeddings (frame + clip, per split), then the task's protocols (HEAR's MLP
# probe, the paper's k-NN, X-ARES's MLP and k-NN); then the score tables, the comparison with the
# paper and X-ARES, and the plots (the loss curve is the training stage's own figure). The quick
# sets feed the quick checks during training and the layer-wise table (quick checks:
# pipeline/common/quick_checks.py). Tasks: the demo tasks (synthesised by `demo_task`, in HEAR
# format; some also packed as X-ARES shards by `demo_xares_source`), and any HEAR task folder or
# X-ARES task (tar shards, converted to a HEAR folder by `xares_task`) named in
# config["evaluation"]["tasks"]. Models:
# config["models"] (trained encoder, random-init encoder, log-mel baseline, official Dasheng
# checkpoints, HEAR-API modules); a model with `enabled: auto` is evaluated when its weights
# exist or a job of the workflow produces them.


rule demo_task:
    output:
        directory(f"{EVAL_OUT}/tasks/{{task}}"),
    log:
        f"{EVAL_LOGS}/tasks/{{task}}.log",
    wildcard_constraints:
        task=constraint(task_names(demo=True)),
    conda:
        "../../envs/eval.yaml"
    params:
        cfg=seed_json(demo_tasks={"scale": EVAL["demo_tasks"]["scale"]}),
    shell:
        "python -m dasheng_pipeline.evaluation.tasks.demo --task {wildcards.task} --params {params.cfg:q} "
        "--out {output:q} > {log:q} 2>&1"


rule demo_xares_source:
    output:
        directory(f"{EVAL_OUT}/xares_sources/{{task}}"),
    log:
        f"{EVAL_LOGS}/xares_sources/{{task}}.log",
    wildcard_constraints:
        task=constraint(task_names(packed_demo=True)),
    conda:
        "../../envs/eval.yaml"
    params:
        demo=lambda wc: wc.task.removesuffix("_xares"),
        cfg=seed_json(demo_tasks={"scale": EVAL["demo_tasks"]["scale"]}),
    shell:
        "python -m dasheng_pipeline.evaluation.tasks.demo --task {params.demo} --xares --params {params.cfg:q} "
        "--out {output:q} > {log:q} 2>&1"


rule xares_task:
    input:
        eval_xares_source,
    output:
        directory(f"{EVAL_OUT}/tasks/{{task}}"),
    log:
        f"{EVAL_LOGS}/tasks/{{task}}.log",
    wildcard_constraints:
        task=constraint(task_names(format="xares")),
    conda:
        "../../envs/eval.yaml"
    params:
        spec=eval_xares_task_spec,
        cfg=seed_json(),
    shell:
        "python -m dasheng_pipeline.evaluation.tasks.xares --name {wildcards.task} --spec {params.spec:q} "
        "--params {params.cfg:q} --out {output:q} > {log:q} 2>&1"


rule embed:
    input:
        task=eval_task_dir,
        weights=eval_weights,
    output:
        directory(f"{EVAL_OUT}/embeddings/{{model}}/{{task}}"),
    log:
        f"{EVAL_LOGS}/embeddings/{{model}}/{{task}}.log",
    wildcard_constraints:
        model=EVAL_MODEL_NAMES,
        task=constraint(list(TASKS)),
    conda:
        "../../envs/eval.yaml"
    threads: EVAL["threads"]
    resources:
        mem_mb=4000,
    params:
        cfg=seed_json(
            batch_size=EVAL["batch_size"],
            frames=EVAL["frames"],
            decode_threads=EVAL["decode_threads"],
        ),
        spec=eval_model_spec,
        dtype=EVAL["dtype"],
    shell:
        "python -m dasheng_pipeline.evaluation.embeddings --task {input.task:q} --model {wildcards.model} --spec {params.spec:q} "
        "--params {params.cfg:q} --dtype {params.dtype} --out {output:q} --threads {threads} > {log:q} 2>&1"


rule probe:
    input:
        task=eval_task_dir,
        embeddings=f"{EVAL_OUT}/embeddings/{{model}}/{{task}}",
    output:
        f"{EVAL_OUT}/probe/{{model}}/{{task}}.json",
    log:
        f"{EVAL_LOGS}/probe/{{model}}/{{task}}.log",
    wildcard_constraints:
        model=EVAL_MODEL_NAMES,
        task=constraint(list(TASKS)),
    conda:
        "../../envs/eval.yaml"
    threads: EVAL["threads"]
    resources:
        mem_mb=4000,
    params:
        cfg=seed_json(probe=EVAL["probe"]),
    shell:
        "python -m dasheng_pipeline.evaluation.protocols.hear_mlp --task {input.task:q} --embeddings {input.embeddings:q} "
        "--params {params.cfg:q} --out {output:q} --threads {threads} > {log:q} 2>&1"


rule knn:
    input:
        task=eval_task_dir,
        embeddings=f"{EVAL_OUT}/embeddings/{{model}}/{{task}}",
    output:
        f"{EVAL_OUT}/knn/{{model}}/{{task}}.json",
    log:
        f"{EVAL_LOGS}/knn/{{model}}/{{task}}.log",
    wildcard_constraints:
        model=EVAL_MODEL_NAMES,
        task=constraint(list(TASKS)),
    conda:
        "../../envs/eval.yaml"
    params:
        cfg=seed_json(knn=EVAL["knn"]),
    shell:
        "python -m dasheng_pipeline.evaluation.protocols.knn --task {input.task:q} --embeddings {input.embeddings:q} "
        "--params {params.cfg:q} --out {output:q} > {log:q} 2>&1"


rule xares_protocol:
    input:
        task=eval_task_dir,
        embeddings=f"{EVAL_OUT}/embeddings/{{model}}/{{task}}",
    output:
        f"{EVAL_OUT}/{{protocol}}/{{model}}/{{task}}.json",
    log:
        f"{EVAL_LOGS}/{{protocol}}/{{model}}/{{task}}.log",
    wildcard_constraints:
        protocol="xares_mlp|xares_knn",
        model=EVAL_MODEL_NAMES,
        task=constraint(list(TASKS)),
    conda:
        "../../envs/eval.yaml"
    threads: EVAL["threads"]
    params:
        cfg=seed_json(xares=EVAL["xares"]),
    shell:
        "python -m dasheng_pipeline.evaluation.protocols.xares --protocol {wildcards.protocol} --task {input.task:q} "
        "--embeddings {input.embeddings:q} --params {params.cfg:q} --out {output:q} --threads {threads} "
        "> {log:q} 2>&1"


rule eval_results:
    input:
        results=planned("result_files"),
        paper=os.path.join(workflow.basedir, "config", "paper_results.csv"),
        xares=os.path.join(workflow.basedir, "config", "xares_results.csv"),
    output:
        scores=report(
            f"{EVAL_OUT}/results/scores.csv",
            caption="../report/scores.rst",
            category="Evaluation",
        ),
        scores_md=f"{EVAL_OUT}/results/scores.md",
        comparison=report(
            f"{EVAL_OUT}/results/comparison.csv",
            caption="../report/comparison.rst",
            category="Evaluation",
        ),
        comparison_md=f"{EVAL_OUT}/results/comparison.md",
        summary=f"{EVAL_OUT}/results/summary.json",
        xares=f"{EVAL_OUT}/results/xares.csv",
        xares_md=f"{EVAL_OUT}/results/xares.md",
    log:
        f"{EVAL_LOGS}/results.log",
    conda:
        "../../envs/eval.yaml"
    params:
        cfg=eval_results_params,
        out_dir=lambda wildcards, output: os.path.dirname(output.scores),
    shell:
        "python -m dasheng_pipeline.evaluation.report.results --inputs {input.results:q} --paper {input.paper:q} "
        "--xares {input.xares:q} "
        "--params {params.cfg:q} --out-dir {params.out_dir:q} > {log:q} 2>&1"


rule eval_plots:
    input:
        f"{EVAL_OUT}/results/scores.csv",
    output:
        domains=report(
            f"{EVAL_OUT}/plots/domains.png",
            caption="../report/domains.rst",
            category="Evaluation",
        ),
        tasks=report(
            f"{EVAL_OUT}/plots/tasks.png",
            caption="../report/tasks.rst",
            category="Evaluation",
        ),
    log:
        f"{EVAL_LOGS}/plots.log",
    conda:
        "../../envs/eval.yaml"
    params:
        cfg=eval_results_params,
    shell:
        "python -m dasheng_pipeline.evaluation.report.plots scores --scores {input:q} --domains {output.domains:q} "
        "--tasks {output.tasks:q} --params {params.cfg:q} > {log:q} 2>&1"


rule eval_loss_curve:
    input:
        PLAN.training_metrics,
    output:
        report(
            f"{EVAL_OUT}/plots/loss_curve.png",
            caption="../report/loss_curve.rst",
            category="Training",
        ),
    log:
        f"{EVAL_LOGS}/loss_curve.log",
    conda:
        "../../envs/eval.yaml"
    params:
        cfg=seed_json(),
    shell:
        "python -m dasheng_pipeline.training.curve --metrics {input:q} --out {output:q} --params {params.cfg:q} > {log:q} 2>&1"


rule quick_set:
    input:
        task=eval_task_dir,
    output:
        f"{EVAL_OUT}/quick/{{task}}.npz",
    log:
        f"{EVAL_LOGS}/quick/{{task}}.log",
    wildcard_constraints:
        task=constraint(list(TASKS)),
    conda:
        "../../envs/eval.yaml"
    params:
        cfg=seed_json(**EVAL["quick_sets"]),
    shell:
        "python -m dasheng_pipeline.evaluation.tasks.quick_sets --task {input.task:q} --params {params.cfg:q} "
        "--out {output:q} > {log:q} 2>&1"


rule layer_scores:
    input:
        quick=f"{EVAL_OUT}/quick/{{task}}.npz",
        weights=eval_weights,
    output:
        f"{EVAL_OUT}/layers/{{model}}/{{task}}.json",
    log:
        f"{EVAL_LOGS}/layers/{{model}}/{{task}}.log",
    wildcard_constraints:
        model=EVAL_MODEL_NAMES,
        task=constraint(list(TASKS)),
    conda:
        "../../envs/eval.yaml"
    threads: EVAL["threads"]
    params:
        cfg=seed_json(k=EVAL["layers"]["k"]),
        spec=eval_model_spec,
    shell:
        "python -m dasheng_pipeline.evaluation.report.layers score --quick {input.quick:q} --model {wildcards.model} "
        "--spec {params.spec:q} --params {params.cfg:q} --out {output:q} --threads {threads} > {log:q} 2>&1"


rule eval_layers:
    input:
        planned("layer_files"),
    output:
        csv=f"{EVAL_OUT}/results/layers.csv",
        md=f"{EVAL_OUT}/results/layers.md",
        plot=report(
            f"{EVAL_OUT}/plots/layers.png",
            caption="../report/layers.rst",
            category="Evaluation",
        ),
    log:
        f"{EVAL_LOGS}/layers.log",
    conda:
        "../../envs/eval.yaml"
    params:
        cfg=seed_json(),
        out_dir=lambda wildcards, output: os.path.dirname(output.csv),
    shell:
        "python -m dasheng_pipeline.evaluation.report.layers table --inputs {input:q} --out-dir {params.out_dir:q} "
        "--plot {output.plot:q} --params {params.cfg:q} > {log:q} 2>&1"


rule eval_quick_checks_curve:
    input:
        f"{OUT}/training/quick_checks.csv",
    output:
        report(
            f"{EVAL_OUT}/plots/quick_checks.png",
            caption="../report/quick_checks.rst",
            category="Training",
        ),
    log:
        f"{EVAL_LOGS}/quick_checks_curve.log",
    conda:
        "../../envs/eval.yaml"
    params:
        cfg=seed_json(),
    shell:
        "python -m dasheng_pipeline.evaluation.report.plots quick_checks --csv {input:q} --out {output:q} --params {params.cfg:q} > {log:q} 2>&1"


rule evaluate:
    input:
        planned("targets"),
