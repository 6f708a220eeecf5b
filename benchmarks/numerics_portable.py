"""The cost of ``numerics: portable`` (ATen, MKL and oneDNN capped at AVX2) against native numerics.

Each measurement runs in its own process (the variables act at a library's first use), native
and portable alternated, median of the repeats. Reported as portable / native time ratios:
an fp32 MAE training step (tiny and base) and an fp32 encoder inference pass (base).

    python benchmarks/numerics_portable.py --repeats 3
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import subprocess
import sys

CASE = """
import sys, time, torch
from dasheng_model import numerics
numerics.apply(sys.argv[1])
torch.manual_seed(0)
torch.set_num_threads(int(sys.argv[4]))
kind, size = sys.argv[2], sys.argv[3]
g = torch.Generator().manual_seed(1)
if kind == "train":
    from dasheng_model.mae import MaskedAutoencoder
    m = MaskedAutoencoder(size)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-4)
    mel = torch.randn(8, 64, 1000, generator=g) * 10 - 40
    def step(i):
        out = m(mel, generator=torch.Generator().manual_seed(i))
        opt.zero_grad(); out.loss.backward(); opt.step()
else:
    from dasheng_model.pretrained import random_encoder
    m = random_encoder(size).eval()
    wav = torch.randn(8, 160000, generator=g) * 0.1
    def step(i):
        with torch.no_grad():
            m(wav)
step(0)
t = time.perf_counter()
n = int(sys.argv[5])
for i in range(1, n + 1):
    step(i)
print((time.perf_counter() - t) / n, torch.backends.cpu.get_cpu_capability())
"""
CASES = [("train", "tiny", 5), ("train", "base", 2), ("infer", "base", 2)]


def measure(mode: str, kind: str, size: str, threads: int, steps: int) -> tuple[float, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DASHENG_NUMERICS",)}
    proc = subprocess.run(
        [sys.executable, "-c", CASE, mode, kind, size, str(threads), str(steps)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    seconds, capability = proc.stdout.split()
    return float(seconds), capability


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    print(f"CPU: {platform.processor() or platform.machine()}, threads {args.threads}")
    print("| case | native s | native kernels | portable s | portable / native |")
    print("|---|---|---|---|---|")
    for kind, size, steps in CASES:
        times: dict[str, list[float]] = {"native": [], "portable": []}
        caps = {}
        for _ in range(args.repeats):
            for mode in ("native", "portable"):
                seconds, caps[mode] = measure(mode, kind, size, args.threads, steps)
                times[mode].append(seconds)
        native, portable = (statistics.median(times[m]) for m in ("native", "portable"))
        label = f"{'MAE training step' if kind == 'train' else 'inference, batch 8 × 10 s'}, {size}, fp32"
        print(
            f"| {label} | {native:.3f} | {caps['native']} | {portable:.3f} | {portable / native:.2f} |"
        )
    cmd = shlex.join(
        ["benchmarks/numerics_portable.py", *(argv if argv is not None else sys.argv[1:])]
    )
    print(f"\ncommand: python {cmd}")


if __name__ == "__main__":
    main()
