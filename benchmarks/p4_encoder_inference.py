"""P4: Dasheng encoder inference throughput, ours (SDPA) against an explicit-softmax reference.

The reference is the same architecture with the same weights, whose attention is computed the
straightforward way the official code does it (q·kᵀ·scale → masked_fill → softmax → ·v).
Both run in the same process, interleaved, on the same batch of 10 s clips; the ratio of
their median times is the figure to compare, absolute numbers depend on the machine.

    python benchmarks/p4_encoder_inference.py                       # CPU: tiny and base, fp32
    python benchmarks/p4_encoder_inference.py --device cuda --dtype bf16 --sizes base 0.6B 1.2B --batch 32
    python benchmarks/p4_encoder_inference.py --device cuda --dtype bf16 --sizes base --mae --batch 32

On a GPU it also prints the model FLOP utilisation (MFU) the time implies, from the FLOPs of the
matrix products (patch embedding, qkv/proj/MLP and attention) against the device's dense peak.
``--mae`` times MAE training steps (forward, backward, AdamW) instead of encoder inference.
"""

from __future__ import annotations

import argparse
import copy
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dasheng_model.encoder import SIZES, Attention, DashengEncoder, EncoderConfig  # noqa: E402
from dasheng_model.frontend import LogMel  # noqa: E402
from dasheng_model.mae import MaskedAutoencoder  # noqa: E402

SR = 16000
# Dense bf16 tensor-core peaks (TFLOP/s) by device-name fragment, without sparsity.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


class ReferenceAttention(Attention):
    """Explicit softmax attention: materialises the (B, H, N, N) score matrix."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = (
            self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        )
        scores = (q @ k.transpose(-2, -1)) * (D // self.num_heads) ** -0.5  # (B, H, N, N)
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, torch.finfo(scores.dtype).min)
        weights = scores.softmax(dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(B, N, D))


def reference_of(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` with every attention replaced by ReferenceAttention (same weights)."""
    ref = copy.deepcopy(model)
    for module in list(ref.modules()):
        for name, child in list(module.named_children()):
            if type(child) is Attention:
                dim = child.qkv.in_features
                swap = ReferenceAttention(dim, child.num_heads).to(child.qkv.weight.device)
                swap.load_state_dict(child.state_dict())
                setattr(module, name, swap)
    return ref


def encoder_flops(config: EncoderConfig, tokens: int, chunk: int) -> float:
    """Forward FLOPs of the matrix products for ``tokens`` tokens in chunks of ``chunk``."""
    D, L = config.embed_dim, config.depth
    hidden = int(D * config.mlp_ratio)
    per_token_layer = 2 * (4 * D * D + 2 * D * hidden) + 4 * chunk * D  # linears + QKᵀ and AV
    return tokens * (L * per_token_layer + 2 * 256 * D)


def mae_step_flops(mae: MaskedAutoencoder, batch: int, tokens: int) -> float:
    """Training-step FLOPs (3× forward): encoder on the visible quarter, decoder on all tokens."""
    visible = max(2, int(tokens / 2 * (1 - mae.mask_ratio)) * 2)
    enc = encoder_flops(mae.encoder.config, batch * visible, visible)
    d = mae.decoder_config
    dec_cfg = EncoderConfig(d.embed_dim, d.depth, d.num_heads, d.mlp_ratio)
    dec = encoder_flops(dec_cfg, batch * tokens, tokens) + batch * tokens * 2 * (
        mae.encoder.embed_dim * d.embed_dim + d.embed_dim * 256
    )
    return 3 * (enc + dec)


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    fns: dict, repeats: int, warmup: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds per call of each function, calls interleaved so that drift hits both alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def bench_inference(size: str, args, device: torch.device, autocast: bool) -> list[dict]:
    torch.manual_seed(0)
    ours = DashengEncoder(size).to(device).eval()
    ref = reference_of(ours).eval()
    wav = torch.randn(args.batch, int(args.seconds * SR), device=device) * 0.1

    def run(model):
        with (
            torch.inference_mode(),
            torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast),
        ):
            return model(wav)

    diff = (run(ours).float() - run(ref).float()).abs().max().item()
    times = time_interleaved(
        {"ours (SDPA)": lambda: run(ours), "reference": lambda: run(ref)},
        args.repeats,
        args.warmup,
        device,
    )
    tokens = args.batch * ((int(args.seconds * SR) // 160 + 1) // 4)
    flops = encoder_flops(ours.config, tokens, min(252, tokens // args.batch))
    ref_median = statistics.median(times["reference"])
    rows = []
    for name, ts in times.items():
        t = statistics.median(ts)
        rows.append(
            {
                "size": size,
                "impl": name,
                "ms": 1000 * t,
                "clips_s": args.batch / t,
                "rt": args.batch * args.seconds / t,
                "tokens_s": tokens / t,
                "flops": flops / t,
                "ratio": ref_median / t,
                "diff": diff,
            }
        )
    return rows


def bench_mae(size: str, args, device: torch.device, autocast: bool) -> list[dict]:
    torch.manual_seed(0)
    mae = MaskedAutoencoder(size).to(device).train()
    ref = reference_of(mae).train()
    frames = min(1001, int(args.seconds * SR) // 160 + 1)
    mel = LogMel().to(device)(torch.randn(args.batch, (frames - 1) * 160, device=device) * 0.1)
    opts = {id(m): torch.optim.AdamW(m.parameters(), lr=1e-4) for m in (mae, ref)}

    def step(model):
        g = torch.Generator(device=device).manual_seed(0)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(mel, generator=g).loss
        opts[id(model)].zero_grad(set_to_none=True)
        loss.backward()
        opts[id(model)].step()

    times = time_interleaved(
        {"ours (SDPA)": lambda: step(mae), "reference": lambda: step(ref)},
        args.repeats,
        args.warmup,
        device,
    )
    tokens = frames // 4
    flops = mae_step_flops(mae, args.batch, tokens)
    ref_median = statistics.median(times["reference"])
    rows = []
    for name, ts in times.items():
        t = statistics.median(ts)
        rows.append(
            {
                "size": size,
                "impl": name,
                "ms": 1000 * t,
                "clips_s": args.batch / t,
                "rt": args.batch * frames / 100 / t,
                "tokens_s": args.batch * tokens / t,
                "flops": flops / t,
                "ratio": ref_median / t,
                "diff": float("nan"),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast")
    p.add_argument("--sizes", nargs="+", default=["tiny", "base"], choices=sorted(SIZES))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument(
        "--mae", action="store_true", help="time MAE training steps instead of inference"
    )
    p.add_argument(
        "--peak-tflops", type=float, default=None, help="device peak for MFU (default: by GPU name)"
    )
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    autocast = args.dtype == "bf16"
    peak = peak_tflops(device, args.peak_tflops)
    bench = bench_mae if args.mae else bench_inference
    rows = [row for size in args.sizes for row in bench(size, args, device, autocast)]

    what = "MAE training step" if args.mae else "encoder inference"
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {args.threads} threads"
    )
    print(
        f"P4 {what}: batch {args.batch} × {args.seconds:g} s, {args.dtype}, {where}, torch {torch.__version__}, "
        f"median of {args.repeats} (after {args.warmup} warm-up)\n"
    )
    mfu = "| MFU " if peak else ""
    print(
        f"| size | implementation | ms / batch | clips/s | × real time | tokens/s | GFLOP/s {mfu}| speed-up vs reference |"
    )
    print(f"|---|---|---:|---:|---:|---:|---:{'|---:' if peak else ''}|---:|")
    for r in rows:
        mfu_cell = f"| {100 * r['flops'] / (peak * 1e12):.1f} % " if peak else ""
        print(
            f"| {r['size']} | {r['impl']} | {r['ms']:.1f} | {r['clips_s']:.2f} | {r['rt']:.1f} | "
            f"{r['tokens_s']:.0f} | {r['flops'] / 1e9:.1f} {mfu_cell}| {r['ratio']:.2f}× |"
        )
    if not args.mae:
        diffs = ", ".join(f"{r['size']} {r['diff']:.1e}" for r in rows[::2])
        print(f"\nmax |ours − reference| over the outputs: {diffs}")
    print(
        f"\ncommand: python {shlex.join(['benchmarks/p4_encoder_inference.py', *(argv if argv is not None else sys.argv[1:])])}"
    )


if __name__ == "__main__":
    main()
