# Stage 3, training (package pipeline/training/): MAE pre-training with Ray Train, from the
# dataset manifest's shards. Ray's state (checkpoints, step checkpoints, metrics, TensorBoard)
# lives in {OUT}/training_state/, outside the declared outputs (Snakemake deletes those before a
# job): a rerun after a crash resumes from the last checkpoint. Locally the job starts its own Ray
# instance; under SLURM the launcher starts a Ray head on the first node and workers on the others
# (workflow/scripts/ray_slurm.sh).
#
# Training longer than one job's time limit: SLURM sends SIGURG signal_lead_s before the limit
# (slurm_extra below), the job writes a step checkpoint and exits with status 75; Snakemake
# resubmits it (retries: as many jobs as total_runtime_min holds) and the next job resumes.


rule train:
    input:
        dataset=f"{OUT}/dataset/manifest.json",
        shards=DATA.shards("dir"),
        quick_sets=list(TRAINING.quick_sets),
    output:
        encoder=f"{OUT}/training/encoder.safetensors",
        sidecar=f"{OUT}/training/encoder.json",
        metrics=f"{OUT}/training/metrics.csv",
        throughput=f"{OUT}/training/throughput.csv",
        quick_checks=f"{OUT}/training/quick_checks.csv",
        summary=f"{OUT}/training/summary.json",
        curve=f"{OUT}/training/loss_curve.png",
    log:
        f"{LOGS}/training/train.log",
    retries: TRAINING.retries
    conda:
        "../../envs/train.yaml"
    threads: TRAINING.threads
    resources:
        # Names of snakemake-executor-plugin-slurm: one task per node (sbatch --ntasks: with 1
        # task SLURM cuts --nodes to 1); the launcher starts one Ray node per allocated node
        # (srun), each using all the node's GPUs and CPUs. (GPU jobs get no --ntasks:
        # tasks_per_gpu: 0 in the profile.)
        nodes=config["training"]["nodes"],
        tasks=config["training"]["nodes"],
        cpus_per_task=TRAINING.threads,
        gres=TRAINING.gres,
        mem_mb=config["training"]["mem_mb"],
        runtime=config["training"]["runtime_min"],
        slurm_extra=TRAINING.slurm_extra,
    params:
        cfg=as_json(TRAINING.params),
        state=f"{OUT}/training_state",
        out=lambda wildcards, output: os.path.dirname(output.encoder),
        # (not workflow.source_path(): that is a fresh cache path on every run, a params change)
        launcher=os.path.join(workflow.basedir, "workflow", "scripts", "ray_slurm.sh"),
    shell:
        "bash {params.launcher:q} python -m dasheng_pipeline.training.train --dataset {input.dataset:q} "
        "--params {params.cfg:q} --state-dir {params.state:q} --out-dir {params.out:q} > {log:q} 2>&1"
