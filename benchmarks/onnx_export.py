"""ONNX export: parity with PyTorch on real audio, and onnxruntime's CPU throughput against
PyTorch fp32 and bf16, all in one process on the same random weights.

    python benchmarks/onnx_export.py                 # base, 2 threads, 5 repeats
    python benchmarks/onnx_export.py --size tiny --repeats 3

Parity: the 61 s fixture recording (running_tap.wav) as six 10 s windows (one batch) and its first
10.08 s window (252 tokens, the longest), and every Speech Commands utterance of the fixture one at
a time; through the graph with the front end inside (waveform in) and the one without (dB log-mel
in), against ``DashengEncoder.forward`` / ``forward_mel``. Throughput: the six 10 s windows as one
batch through onnxruntime (CPUExecutionProvider, graph optimisations on), PyTorch fp32
(``DashengEncoder.forward`` under inference mode) and PyTorch bf16 (``dasheng_model.embed.embed``
with ``dtype="bf16"``), calls alternated, the order rotating each round, median of the repeats.
Needs the export extra and the shared fixtures (``DASHENG_SHARED``).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from speed_vs_official import cpu_name, interleaved, realistic_bn  # noqa: E402

from dasheng_model.embed import embed  # noqa: E402
from dasheng_model.export import export_model  # noqa: E402
from dasheng_model.pretrained import random_encoder  # noqa: E402

SR = 16000
FIXTURES = Path(os.environ.get("DASHENG_SHARED", Path(__file__).resolve().parents[2] / "shared"))
SPEECH = FIXTURES / "fixtures" / "speech_commands_small"


def read_wav(path: Path) -> torch.Tensor:
    import wave

    import numpy as np

    with wave.open(str(path), "rb") as w:
        data = w.readframes(w.getnframes())
    return torch.from_numpy(np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0)


def parity(encoder, sessions: dict, inputs: list[torch.Tensor]) -> dict[str, tuple[float, float]]:
    """Max |ONNX − PyTorch| and the minimum frame cosine, per graph, over all inputs."""
    worst = {name: (0.0, 1.0) for name in sessions}
    for wav in inputs:
        with torch.inference_mode():
            ref, mel = encoder(wav), encoder.front_end(wav)
        feeds = {"waveform": {"waveform": wav.numpy()}, "mel": {"mel": mel.numpy()}}
        for name, session in sessions.items():
            out = torch.from_numpy(session.run(None, feeds[name])[0])
            diff = float((out - ref).abs().max())
            cos = float(F.cosine_similarity(out.double(), ref.double(), dim=-1).min())
            worst[name] = (max(worst[name][0], diff), min(worst[name][1], cos))
    return worst


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="base")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    args = p.parse_args(argv)
    import onnxruntime as ort

    torch.set_num_threads(args.threads)
    encoder = random_encoder(args.size, 0)
    realistic_bn(encoder)
    tap = read_wav(SPEECH / "_background_noise_" / "running_tap.wav")
    windows = tap[: 6 * 10 * SR].reshape(6, 10 * SR)  # six 10 s windows, one batch
    clips = [read_wav(f)[None] for f in sorted(SPEECH.rglob("*_nohash_*.wav"))]

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        wav_graph = export_model(encoder, "onnx", Path(tmp) / "wav.onnx", check=False)
        export_s = time.perf_counter() - t0
        mel_graph = export_model(encoder, "onnx", Path(tmp) / "mel.onnx", front_end=False)
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
        sessions = {
            name: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            for name, path in (("waveform", wav_graph), ("mel", mel_graph))
        }
        worst = parity(encoder, sessions, [windows, tap[None, :161280], *clips])
        feed = {"waveform": windows.numpy()}

        def pytorch_fp32():
            with torch.inference_mode():
                return encoder(windows)

        fns = {
            "onnxruntime fp32 (waveform graph)": lambda: sessions["waveform"].run(None, feed),
            "PyTorch fp32": pytorch_fp32,
            'PyTorch bf16 (`embed(..., dtype="bf16")`)': lambda: embed(
                encoder, windows, dtype="bf16"
            ),
        }
        t = interleaved(fns, args.repeats, args.warmup, torch.device("cpu"))

    print(
        f"{args.size}, random weights (init_bn at dB statistics), {cpu_name()}, {args.threads} threads, "
        f"torch {torch.__version__}, onnxruntime {ort.__version__}; batch 6 × 10 s of running_tap.wav; "
        f"median of {args.repeats} interleaved repeats after {args.warmup} warm-up; export {export_s:.1f} s\n"
    )
    ort_s = t["onnxruntime fp32 (waveform graph)"]
    print("| path | s / batch | × real time | onnxruntime speed relative to it |")
    print("|---|---:|---:|---:|")
    for name, s in t.items():
        print(f"| {name} | {s:.3f} | {60 / s:.0f} | {s / ort_s:.2f} |")
    print()
    n = 2 + len(clips)
    for name, (diff, cos) in worst.items():
        print(
            f"- parity, {name} graph against PyTorch fp32 on {n} real inputs "
            f"(6 × 10 s, 1 × 10.08 s, {len(clips)} utterances): max |diff| {diff:.2e}, "
            f"frame cosine min {cos:.8f}"
        )
    print(
        f"\ncommand: python {shlex.join(['benchmarks/onnx_export.py', *(argv if argv is not None else sys.argv[1:])])}"
    )


if __name__ == "__main__":
    main()
