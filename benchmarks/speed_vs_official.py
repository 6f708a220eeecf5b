"""Speed against the official ``dasheng`` package (0.0.9), side by side in one process.

Both models hold the same random weights (the official model's, loaded into ours strictly; no
download). Every figure is the median of ``--repeats`` timed calls, official and ours alternated
call by call, so that the other users of a shared machine slow both alike; only the ratios carry
over between machines. Rows:

* encoder inference (base, batch × 10 s): official ``Dasheng(wav)`` in fp32 against
  ``dasheng_model.embed.embed(encoder, wav, dtype=...)`` in fp32 and in bf16 (autocast; the official
  package has no such option). The bf16 embeddings are compared with ours in fp32: cosine of
  every frame and every clip embedding.
* MAE training step (base, forward + backward + AdamW): the official ``AudioTransformerMAE``
  (waveform in, log-mel on the fly, group masking) with ``torch.optim.AdamW`` as it comes, against
  ours as the trainer runs it (``MaskedAutoencoder`` on the stored log-mel, the trainer's
  ``make_optimizer`` for ``optimizer: adamw``) in fp32 and under bf16 autocast (``training.precision``).
  The optimizer steps alone are timed too, so that the model's share of the gain shows.
* log-mel of one 10 s clip on 1 thread: torchaudio ``MelSpectrogram`` + ``AmplitudeToDB`` (the
  official front end) against ``dasheng_model.frontend.LogMel``.
* ``--only probe``: the demo tasks' probe and k-NN scores from fp32 and from bf16 embeddings.

    python benchmarks/speed_vs_official.py                  # CPU, 2 threads, batch 8, 5 repeats
    python benchmarks/speed_vs_official.py --repeats 9 --only inference --ablations
    python benchmarks/speed_vs_official.py --device cuda --batch 32

On CUDA the official model runs under bf16 autocast too when ours does (its front end disables it).
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dasheng_model import encoder as encoder_module  # noqa: E402
from dasheng_model.embed import embed  # noqa: E402
from dasheng_model.encoder import DashengEncoder  # noqa: E402
from dasheng_model.frontend import LogMel  # noqa: E402
from dasheng_model.mae import MaskedAutoencoder  # noqa: E402

SR = 16000
BASE = {"embed_dim": 768, "depth": 12, "num_heads": 12}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: dict, repeats: int, warmup: int, device: torch.device) -> dict[str, float]:
    """Median seconds per call of each function; the calls alternate, the order rotates each round."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            sync(device)
            t0 = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def test_audio(batch: int, seconds: float, seed: int = 0) -> torch.Tensor:
    """Tones and noise under slow random envelopes, (batch, seconds·16000), about -20 dBFS."""
    g = torch.Generator().manual_seed(seed)
    n = int(seconds * SR)
    t = torch.arange(n) / SR
    freqs = 100 * 2 ** (torch.rand(batch, 3, 1, generator=g) * 6)  # 100 Hz .. 6.4 kHz
    tones = torch.sin(2 * torch.pi * freqs * t).sum(1)
    env = F.interpolate(
        torch.rand(batch, 1, int(seconds * 4) + 1, generator=g), size=n, mode="linear"
    )[:, 0]
    return 0.05 * env * (tones + torch.randn(batch, n, generator=g))


def realistic_bn(model: torch.nn.Module) -> None:
    """init_bn statistics of dB log-mel (mean about -40 dB, std about 20), as a trained model has."""
    bn = model.init_bn[1]
    with torch.no_grad():
        bn.running_mean.fill_(-40.0)
        bn.running_var.fill_(400.0)


def cosines(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    c = F.cosine_similarity(a.double(), b.double(), dim=-1).flatten()
    return float(c.min()), float(c.mean())


def plain_linear(fn):
    """``fn()`` with the encoder's oneDNN inference path switched off (F.linear everywhere)."""
    saved, encoder_module.ONEDNN_INFERENCE = encoder_module.ONEDNN_INFERENCE, False
    try:
        return fn()
    finally:
        encoder_module.ONEDNN_INFERENCE = saved


def bench_inference(args, device: torch.device) -> tuple[list[tuple], list[str]]:
    from dasheng.pretrained.pretrained import Dasheng

    torch.manual_seed(0)
    official = Dasheng(**BASE)
    realistic_bn(official)
    official = official.to(device).eval()
    ours = DashengEncoder("base")
    ours.load_state_dict(official.state_dict(), strict=True)
    ours = ours.to(device).eval()
    wav = test_audio(args.batch, args.seconds).to(device)
    gpu_bf16 = device.type == "cuda"  # on a GPU the official model is timed in bf16 too

    def official_run(bf16: bool = False):
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return official(wav)

    notes = []
    fp32, bf16 = embed(ours, wav).frames, embed(ours, wav, dtype="bf16").frames
    official_diff = float((official_run().float() - fp32).abs().max())
    frame_cos, clip_cos = cosines(bf16, fp32), cosines(bf16.mean(1), fp32.mean(1))
    fns = {
        "official fp32": official_run,
        "ours fp32": lambda: embed(ours, wav),
        "ours bf16": lambda: embed(ours, wav, dtype="bf16"),
    }
    if gpu_bf16:
        fns["official bf16"] = lambda: official_run(True)
    if args.ablations:
        fns["ours fp32, F.linear (no oneDNN path)"] = lambda: plain_linear(lambda: embed(ours, wav))

        def plain_autocast():
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
                return ours(wav)

        fns["ours bf16, plain autocast and F.linear (no packed weights)"] = lambda: plain_linear(
            plain_autocast
        )
    t = interleaved(fns, args.repeats, args.warmup, device)
    rate = {k: args.batch / v for k, v in t.items()}
    if args.ablations:
        for name in list(t)[3 + gpu_bf16 :]:
            base = "ours fp32" if "fp32" in name else "ours bf16"
            notes.append(
                f"ablation: {name}: {rate[name]:.2f} clips/s ({base} is {t[name] / t[base]:.2f}× faster)"
            )
    rows = [
        (
            "encoder inference, base, fp32",
            f"{rate['official fp32']:.2f} clips/s",
            f"{rate['ours fp32']:.2f} clips/s",
            rate["ours fp32"] / rate["official fp32"],
        ),
        (
            'encoder inference, base, bf16 autocast (`dtype="bf16"`)',
            f"{rate['official bf16']:.2f} clips/s" if gpu_bf16 else "—",
            f"{rate['ours bf16']:.2f} clips/s, clip cosine to fp32 ≥ {clip_cos[0]:.5f}",
            rate["ours bf16"] / rate["official bf16" if gpu_bf16 else "official fp32"],
        ),
    ]
    notes += [
        f"ours fp32 against the official fp32 outputs: max |difference| {official_diff:.1e}",
        f"bf16 against fp32 (ours): frame cosine min {frame_cos[0]:.5f} / mean {frame_cos[1]:.6f}; "
        f"clip cosine min {clip_cos[0]:.6f} / mean {clip_cos[1]:.6f}",
    ]
    return rows, notes


def bench_training(args, device: torch.device) -> tuple[list[tuple], list[str]]:
    from dasheng.train.models import dasheng_base

    torch.manual_seed(0)
    official = dasheng_base(group_masking=True)  # the paper's group masking (pairs of tokens)
    realistic_bn(official.encoder)
    official = official.to(device).train()
    ours = MaskedAutoencoder("base")
    ours.encoder.load_state_dict(official.encoder.state_dict(), strict=True)
    ours = ours.to(device).train()
    wav = test_audio(args.batch, args.seconds, seed=1).to(device)
    mel = LogMel().to(device)(wav)  # ours trains on the stored log-mel
    from dasheng_pipeline.training.train import make_optimizer

    opts = {
        id(official): torch.optim.AdamW(
            official.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.01
        ),
        id(ours): make_optimizer(
            ours.parameters(), {"optimizer": "adamw", "lr": 1e-5, "weight_decay": 0.01}
        ),
    }

    def step(model, loss_fn, bf16: bool):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn()
        loss.backward()
        opts[id(model)].step()
        opts[id(model)].zero_grad(set_to_none=True)

    official_loss = lambda: official(wav, return_loss=True)  # noqa: E731
    ours_loss = lambda: ours(mel, generator=torch.Generator(device).manual_seed(0)).loss  # noqa: E731
    gpu_bf16 = device.type == "cuda"
    fns = {
        "official fp32": lambda: step(official, official_loss, False),
        "ours fp32": lambda: step(ours, ours_loss, False),
        "ours bf16": lambda: step(ours, ours_loss, True),
    }
    if gpu_bf16:
        fns["official bf16"] = lambda: step(official, official_loss, True)
    t = interleaved(fns, args.repeats, args.warmup, device)
    rate = {k: args.batch / v for k, v in t.items()}
    for p in [*official.parameters(), *ours.parameters()]:
        p.grad = torch.randn_like(p) * 1e-3
    adamw8bit = make_optimizer(
        ours.parameters(), {"optimizer": "adamw8bit", "lr": 1e-5, "weight_decay": 0.01}
    )
    o = interleaved(
        {
            "official": opts[id(official)].step,
            "ours": opts[id(ours)].step,
            "adamw8bit": adamw8bit.step,
        },
        args.repeats,
        1,
        device,
    )
    notes = [
        f"optimizer step alone: official {o['official']:.2f} s (torch.optim.AdamW, per-tensor loop on CPU), "
        f"ours {o['ours']:.2f} s (fused AdamW, `optimizer: adamw`; `adamw8bit`, bitsandbytes: {o['adamw8bit']:.2f} s); "
        f"forward + backward alone (step − optimizer): "
        f"official {t['official fp32'] - o['official']:.2f} s, ours {t['ours fp32'] - o['ours']:.2f} s fp32 / "
        f"{t['ours bf16'] - o['ours']:.2f} s bf16 → ratios {(t['official fp32'] - o['official']) / (t['ours fp32'] - o['ours']):.2f} "
        f"/ {(t['official fp32'] - o['official']) / (t['ours bf16'] - o['ours']):.2f}",
    ]
    rows = [
        (
            "MAE training step, base, fp32 (official: waveform in, mel on the fly; ours: stored mel)",
            f"{rate['official fp32']:.2f} samples/s",
            f"{rate['ours fp32']:.2f} samples/s",
            rate["ours fp32"] / rate["official fp32"],
        ),
        (
            "MAE training step, base, bf16 autocast (`training.precision: bf16`)",
            f"{rate['official bf16']:.2f} samples/s" if gpu_bf16 else "—",
            f"{rate['ours bf16']:.2f} samples/s",
            rate["ours bf16"] / rate["official bf16" if gpu_bf16 else "official fp32"],
        ),
    ]
    return rows, notes


def bench_logmel(args, device: torch.device) -> tuple[list[tuple], list[str]]:
    from dasheng.pretrained.pretrained import Dasheng

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        official = Dasheng(embed_dim=192, depth=1, num_heads=3).front_end.to(
            device
        )  # MelSpectrogram + AmplitudeToDB
        ours = LogMel().to(device)
        wav = test_audio(1, 10.0, seed=2).to(device)
        diff = float((official(wav) - ours(wav)).abs().max())
        with torch.no_grad():
            t = interleaved(
                {"official": lambda: official(wav), "ours": lambda: ours(wav)},
                max(args.repeats, 5) * 10,
                args.warmup,
                device,
            )
    finally:
        torch.set_num_threads(threads)
    rt = {k: 10.0 / v for k, v in t.items()}
    rows = [
        (
            "log-mel per 10 s clip, 1 thread (torchaudio MelSpectrogram + AmplitudeToDB)",
            f"{rt['official']:,.0f}× real time",
            f"{rt['ours']:,.0f}×",
            rt["ours"] / rt["official"],
        )
    ]
    return rows, [f"log-mel: max |ours − official| {diff:.1e} dB (one clip: the same clamp)"]


def bench_probe(args, device: torch.device) -> tuple[list[tuple], list[str]]:
    """Probe and k-NN scores of the demo tasks with embeddings made in fp32 and in bf16 (same
    random-init encoder, the demo config's probe), to see whether bf16 moves the scores."""
    import logging
    import os
    import tempfile

    os.environ["TQDM_DISABLE"] = "1"
    logging.disable(logging.WARNING)
    from dasheng_pipeline.evaluation import embeddings as extract
    from dasheng_pipeline.evaluation.protocols import hear_mlp as probe
    from dasheng_pipeline.evaluation.protocols import knn
    from dasheng_pipeline.evaluation.tasks import demo as demo_tasks

    cfg = probe.ProbeConfig(
        hidden_layers=[1], grid_points=2, max_epochs=150, patience=8
    )  # config/config.yaml's
    notes = []
    with tempfile.TemporaryDirectory() as tmp:
        for task in ("demo_pitch", "demo_timbre", "demo_noise", "demo_events"):
            folder = Path(tmp) / task
            demo_tasks.generate(task, folder, seed=0, scale=args.probe_scale)
            scores = {}
            for dtype in ("fp32", "bf16"):
                emb = Path(tmp) / f"emb-{task}-{dtype}"
                spec = f"random:{args.probe_size}:0"
                extract.run(folder, "random", spec, {"seed": 0}, emb, args.threads, dtype)
                scores[dtype] = []
                if task in args.probe_mlp:
                    result = probe.run(folder, emb, cfg, 0, args.threads, {"seed": 0})
                    metric = result["primary_metric"]
                    scores[dtype].append(f"probe {metric} {result['metrics'][metric]['mean']:.4f}")
                k = knn.run(folder, emb, 10, True, 0, {"seed": 0})
                if not k.get("skipped"):
                    scores[dtype].append(f"k-NN top1_acc {k['metrics']['top1_acc']['mean']:.4f}")
            notes.append(
                f"{task} (random-init {args.probe_size}, scale {args.probe_scale:g}): fp32 "
                f"{', '.join(scores['fp32'])}; bf16 {', '.join(scores['bf16'])}"
            )
    logging.disable(logging.NOTSET)
    return [], notes


def cpu_name() -> str:
    """The CPU's model name and its bf16 matrix units (the figures depend on them: bf16 gains most with AMX)."""
    name, flags = platform.processor() or "CPU", set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    units = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return f"{name} ({', '.join(units) or 'no bf16 units'})"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument(
        "--ablations",
        action="store_true",
        help="also time ours without each speed-up (F.linear instead of oneDNN; autocast without cached casts)",
    )
    p.add_argument(
        "--probe-size",
        default="tiny",
        help="probe: the random-init encoder's size (the demo's is tiny)",
    )
    p.add_argument(
        "--probe-scale",
        type=float,
        default=1.0,
        help="probe: demo task size (evaluation.demo_tasks.scale)",
    )
    p.add_argument(
        "--probe-mlp",
        nargs="*",
        default=["demo_pitch", "demo_timbre", "demo_noise", "demo_events"],
        help="probe: the tasks that get the MLP probe too (every one gets k-NN where it applies)",
    )
    p.add_argument(
        "--only",
        nargs="+",
        choices=["inference", "training", "logmel", "probe"],
        default=["inference", "training", "logmel"],
    )
    args = p.parse_args(argv)
    import dasheng

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    benches = {
        "inference": bench_inference,
        "training": bench_training,
        "logmel": bench_logmel,
        "probe": bench_probe,
    }
    rows, notes = [], []
    for name in args.only:
        r, n = benches[name](args, device)
        rows += r
        notes += n
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{cpu_name()}, {args.threads} threads"
    )
    print(
        f"one process, same random weights, {where}, batch {args.batch} × {args.seconds:g} s, torch {torch.__version__}, "
        f"dasheng {getattr(dasheng, '__version__', '0.0.9')}; median of {args.repeats} interleaved repeats "
        f"after {args.warmup} warm-up\n"
    )
    if rows:
        print("| what | official `dasheng` 0.0.9 | ours | ratio |")
        print("|---|---|---|---|")
        for what, theirs, mine, ratio in rows:
            print(f"| {what} | {theirs} | {mine} | {ratio:.2f} |")
        print()
    for n in notes:
        print(f"- {n}")
    print(
        f"\ncommand: python {shlex.join(['benchmarks/speed_vs_official.py', *(argv if argv is not None else sys.argv[1:])])}"
    )


if __name__ == "__main__":
    main()
