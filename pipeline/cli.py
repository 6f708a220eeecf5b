"""``dasheng-pipeline``: the command line over :mod:`dasheng_pipeline.tools` (each subcommand calls one function).

    dasheng-pipeline embed recordings/ --model dasheng_base.pt --out e.parquet
    dasheng-pipeline evaluate hear/speech_commands-v0.0.2-full --model mispeech/dasheng-base
    dasheng-pipeline finetune words/ --model random:tiny --mode mlp --out clf/
    dasheng-pipeline predict new/*.wav --classifier clf/ --out tags.csv
    dasheng-pipeline inspect results/demo/training/encoder.safetensors
    dasheng-pipeline export dasheng_base.pt --to onnx --out dasheng_base.onnx

``--model`` everywhere is one model spec string: a checkpoint file (official .pt, ours .safetensors),
a Hugging Face folder or repo id, or ``random:<size>[:<seed>]`` (``evaluate`` also ``logmel`` and
``hear:<module>[:<path>]``); the DAG's ``models:`` resolve to the same strings. Each function logs
what it did (stdout); progress bars go to stderr. ``--numerics portable`` (or
``$DASHENG_NUMERICS``) caps the CPU kernels at AVX2 before any tensor work
(:mod:`dasheng_model.numerics`). Exit status: 0 done, 1 an error (one line on stderr saying what to
do), 2 a usage error, 130 interrupted (the message says what was kept).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from dasheng_pipeline.common import logs

log = logging.getLogger("dasheng-pipeline")

EPILOG = (
    "MODEL: a checkpoint file (official .pt or our .safetensors), a Hugging Face folder or repo id "
    "(owner/name), or random:<size>[:<seed>] with size tiny, base, 0.6B or 1.2B; embed and "
    "evaluate also take logmel (the log-mel baseline) and hear:<module>[:<path>] (a HEAR module)."
)


def _at_least(low: int):
    """An argparse type: a whole number >= ``low`` (else a usage error naming the option)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{text}: expected a whole number of at least {low}")
        return value

    parse.__name__ = f"whole number >= {low}"
    return parse


POSITIVE = _at_least(1)


def _parser_with(parent: argparse.ArgumentParser):
    class SubParser(argparse.ArgumentParser):
        def __init__(self, **kwargs):
            super().__init__(**kwargs, parents=[parent])

    return SubParser


def _model_args(p: argparse.ArgumentParser, model: bool = True) -> None:
    if model:
        p.add_argument("--model", required=True, metavar="MODEL", help="the encoder (see below)")
    p.add_argument(
        "--device",
        default="auto",
        help="auto (CUDA when present, else the CPU), cpu, cuda, cuda:1 … (default: auto)",
    )
    p.add_argument(
        "--dtype",
        choices=["fp32", "bf16"],
        default="fp32",
        help="bf16: autocast around the transformer, front end in fp32 (default: fp32)",
    )
    p.add_argument(
        "--batch-size", type=POSITIVE, default=8, help="10 s windows per forward pass (default: 8)"
    )


def _add_embed(sub) -> None:
    p = sub.add_parser(
        "embed",
        help="audio files → clip (and frame) embeddings, one Parquet row per file",
        description="Embed audio files, folders (recursive) or lists (.txt/.csv) into one Parquet "
        "row per file; files of any length in 10 s windows, in the same memory; a rerun skips what "
        "is done (docs/cli/embed.md).",
        epilog=EPILOG,
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="audio file, folder or list of files")
    p.add_argument(
        "--out", required=True, help="output .parquet (rejects: OUT.rejects.csv beside it)"
    )
    p.add_argument(
        "--frames",
        action="store_true",
        help="also store the 25 Hz frame embeddings and their times",
    )
    p.add_argument(
        "--decode-threads",
        type=POSITIVE,
        default=2,
        help="files decoded ahead in threads (default: 2)",
    )
    _model_args(p)


def _run_embed(args: argparse.Namespace) -> None:
    from dasheng_pipeline.tools.embed import embed_files

    embed_files(
        args.inputs,
        args.model,
        args.out,
        frames=args.frames,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        decode_threads=args.decode_threads,
        progress=not args.quiet,
    )


def _add_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="a HEAR or X-ARES task folder → the DAG's scores for it",
        description="Embed a task and score it exactly as the DAG does: a HEAR task folder with the "
        "HEAR MLP probe and the paper's k-NN, an X-ARES task (webdataset .tar shards, described by an "
        "evaluation.tasks entry of --config, e.g. config/xares.yaml) with X-ARES's MLP and k-NN.",
        epilog=EPILOG,
    )
    p.add_argument(
        "task", metavar="TASK_DIR", help="HEAR task folder, or X-ARES task folder of .tar shards"
    )
    p.add_argument(
        "--model",
        required=True,
        metavar="MODEL",
        help="the encoder (see below), logmel for the baseline, or hear:<module>[:<path>]",
    )
    p.add_argument("--out", help="output folder (default: eval-<task name>)")
    protocols = [
        ("--probe", "probe", "the HEAR MLP probe"),
        ("--knn", "knn", "the paper's k-NN"),
        ("--xares-mlp", "xares_mlp", "X-ARES's MLP"),
        (
            "--xares-knn",
            "xares_knn",
            "X-ARES's k-NN "
            "(default: --probe --knn for HEAR folders, --xares-mlp --xares-knn for X-ARES ones)",
        ),
    ]
    for flag, const, text in protocols:
        p.add_argument(flag, action="append_const", const=const, dest="protocols", help=text)
    p.add_argument(
        "--config",
        help="a workflow config (e.g. config/config.yaml, config/xares.yaml): its seed, "
        "evaluation settings and X-ARES task descriptions",
    )
    p.add_argument("--threads", type=POSITIVE, default=1, help="torch threads (default: 1)")


def _run_evaluate(args: argparse.Namespace) -> None:
    from pathlib import Path

    from dasheng_pipeline.tools.evaluate import evaluate_task, headline

    out = args.out or f"eval-{Path(args.task).resolve().name}"
    results = evaluate_task(
        args.task,
        args.model,
        out,
        protocols=args.protocols,
        config=args.config,
        threads=args.threads,
    )
    print(headline(results))
    print(f"results in {out}/")


def _add_finetune(sub) -> None:
    p = sub.add_parser(
        "finetune",
        help="labelled audio → a classifier (linear, mlp or full fine-tuning)",
        description="Train a classifier on DATA: a folder with one subfolder per class, or a CSV "
        "path,label[,split] (labels ';'-separated for multi-label).",
        epilog=EPILOG,
    )
    p.add_argument(
        "data", metavar="DATA", help="folder of class folders, or CSV with path,label[,split]"
    )
    p.add_argument("--out", required=True, help="output folder (classifier, metrics, plots)")
    p.add_argument(
        "--mode",
        choices=["linear", "mlp", "full"],
        default="mlp",
        help="linear/mlp: frozen encoder, embeddings cached; full: the encoder trained too (default: mlp)",
    )
    p.add_argument(
        "--folds", type=_at_least(0), default=0, help="K-fold cross-validation instead of one split"
    )
    for flag in ("--valid-fraction", "--test-fraction"):
        p.add_argument(
            flag, type=float, default=0.15, help="stratified split, when the CSV gives none"
        )
    p.add_argument(
        "--epochs", type=POSITIVE, default=None, help="default: 100 (linear/mlp), 10 (full)"
    )
    p.add_argument("--lr", type=float, default=None, help="default: 1e-3 (linear/mlp), 1e-4 (full)")
    p.add_argument(
        "--layer-decay", type=float, default=0.75, help="full: layer-wise lr decay (default: 0.75)"
    )
    p.add_argument(
        "--mixup", type=float, default=0.0, help="full: mixup alpha, 0 = off (default: 0)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--cache-dir",
        default=None,
        help="linear/mlp: root of the shared embedding cache "
        "(default: $DASHENG_CACHE_DIR, else ~/.cache/dasheng-pipeline)",
    )
    _model_args(p)


def _run_finetune(args: argparse.Namespace) -> None:
    from dasheng_pipeline.tools.finetune import finetune

    finetune(
        args.data,
        args.model,
        args.out,
        mode=args.mode,
        folds=args.folds,
        valid_fraction=args.valid_fraction,
        test_fraction=args.test_fraction,
        epochs=args.epochs,
        lr=args.lr,
        layer_decay=args.layer_decay,
        mixup=args.mixup,
        seed=args.seed,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        progress=not args.quiet,
        cache_dir=args.cache_dir,
    )


def _add_predict(sub) -> None:
    p = sub.add_parser(
        "predict",
        help="a classifier → top-k labels per file (or per 10 s chunk)",
        description="Tag audio files with a classifier written by finetune.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="audio file, folder or list of files")
    p.add_argument("--classifier", required=True, help="folder written by finetune")
    p.add_argument("--out", required=True, help="output .csv")
    p.add_argument("--top-k", type=POSITIVE, default=5)
    p.add_argument(
        "--chunks", action="store_true", help="one row per 10 s chunk instead of per file"
    )
    _model_args(p, model=False)


def _run_predict(args: argparse.Namespace) -> None:
    from dasheng_pipeline.tools.predict import predict

    predict(
        args.inputs,
        args.classifier,
        args.out,
        top_k=args.top_k,
        chunks=args.chunks,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        progress=not args.quiet,
    )


def _add_inspect(sub) -> None:
    p = sub.add_parser(
        "inspect", help="a checkpoint → format, size, parameters, sha256, provenance", epilog=EPILOG
    )
    p.add_argument("checkpoint", metavar="MODEL")
    p.add_argument("--json", action="store_true", help="print JSON")


def _run_inspect(args: argparse.Namespace) -> None:
    from dasheng_pipeline.tools.checkpoints import describe_checkpoint, render

    info = describe_checkpoint(args.checkpoint)
    print(json.dumps(info, indent=1, sort_keys=True) if args.json else render(info))


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="a model → ONNX, the Hugging Face layout, the official .pt or our format",
        description="Write MODEL in another format: onnx (the encoder on one window of up to "
        "10.08 s, log-mel inside the graph unless --no-front-end; needs the export extra), hf "
        "(model.safetensors + config.json), official (.pt that the dasheng package loads) or ours "
        "(.safetensors + .json). Provenance goes with it wherever the format has room.",
        epilog=EPILOG,
    )
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--to", required=True, choices=["onnx", "hf", "official", "ours"])
    p.add_argument(
        "--out",
        required=True,
        help="a .onnx file, a folder (hf), a .pt file (official) or a .safetensors file (ours)",
    )
    p.add_argument(
        "--no-front-end",
        dest="front_end",
        action="store_false",
        help="onnx: dB log-mel (batch, 64, frames) in, instead of the 16 kHz waveform",
    )
    p.add_argument("--opset", type=int, default=None, help="onnx: the opset (default: torch's)")


def _run_export(args: argparse.Namespace) -> None:
    from dasheng_model.export import export_model
    from dasheng_pipeline.common.provenance import stamp

    section = {"export": {"model": args.model, "to": args.to, "front_end": args.front_end}}
    if args.to == "onnx":
        section["export"]["opset"] = args.opset
    export_model(  # logs what it wrote
        args.model,
        args.to,
        args.out,
        front_end=args.front_end,
        provenance=stamp(section),
        opset=args.opset,
    )


COMMANDS = {
    "embed": (_add_embed, _run_embed),
    "evaluate": (_add_evaluate, _run_evaluate),
    "finetune": (_add_finetune, _run_finetune),
    "predict": (_add_predict, _run_predict),
    "inspect": (_add_inspect, _run_inspect),
    "export": (_add_export, _run_export),
}


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="dasheng-pipeline",
        description="Dasheng audio encoders on your own audio: "
        "embed, evaluate, fine-tune, predict, inspect, export.",
        epilog=EPILOG,
    )
    top.add_argument("--version", action="store_true", help="print the versions and exit")
    top.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    numerics = {
        "choices": ["native", "portable"],
        "help": "native: the CPU's widest kernels; portable: capped at AVX2, the same numbers on "
        "every x86-64 CPU kind (default: $DASHENG_NUMERICS, else native)",
    }
    top.add_argument("--numerics", default=None, **numerics)
    quiet = argparse.ArgumentParser(add_help=False)  # -q and --numerics after the subcommand too
    quiet.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=argparse.SUPPRESS,
        help="no progress bars, warnings only",
    )
    quiet.add_argument("--numerics", default=argparse.SUPPRESS, **numerics)
    sub = top.add_subparsers(dest="command", metavar="COMMAND", parser_class=_parser_with(quiet))
    for add, _ in COMMANDS.values():
        add(sub)
    return top


def _run(args: argparse.Namespace) -> int:
    COMMANDS[args.command][1](args)
    return 0


def _versions() -> str:
    from dasheng_pipeline.common.provenance import package_versions

    return " ".join(f"{k} {v}" for k, v in package_versions().items())


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.version:
        print(_versions())
        return 0
    if not args.command:
        parser().print_help()
        return 2
    logs.setup(logging.WARNING if args.quiet else logging.INFO)
    from dasheng_model import numerics

    try:
        numerics.apply(args.numerics)  # before any tensor work (torch is imported below)
    except (ValueError, RuntimeError) as exc:
        print(f"error: --numerics: {exc}", file=sys.stderr)
        return 1
    from dasheng_model.checkpoint import CheckpointError

    try:
        return _run(args)
    except KeyboardInterrupt as exc:
        print(getattr(exc, "message", "interrupted"), file=sys.stderr)
        return 130
    except (
        CheckpointError,
        ValueError,
        FileNotFoundError,
        IsADirectoryError,
        FileExistsError,
        NotADirectoryError,
        PermissionError,
    ) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
