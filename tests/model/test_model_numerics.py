"""Numerics across CPU kinds: 'portable' computes on this CPU what an AVX2-only CPU computes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# A few fp32 training steps of the tiny MAE, then an inference pass: a hash of the weights and of
# the embeddings (the oneDNN inference path included).
STEPS = """
import hashlib, sys, torch
from dasheng_model import numerics
numerics.apply(sys.argv[1] if len(sys.argv) > 1 else None)
torch.manual_seed(0)
torch.set_num_threads(1)
from dasheng_model.mae import MaskedAutoencoder
m = MaskedAutoencoder("tiny")
opt = torch.optim.AdamW(m.parameters(), lr=3e-4)
g = torch.Generator().manual_seed(1)
mel = torch.randn(4, 64, 400, generator=g) * 10 - 40
for i in range(3):
    out = m(mel, generator=torch.Generator().manual_seed(i))
    opt.zero_grad(); out.loss.backward(); opt.step()
m.eval()
with torch.no_grad():
    emb = m.encoder(torch.randn(2, 32000, generator=g) * 0.1)
h = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in m.parameters()))
h.update(emb.numpy().tobytes())
print(h.hexdigest(), torch.backends.cpu.get_cpu_capability())
"""
# What a CPU with AVX2 and nothing wider picks by default (MKL, ATen and oneDNN capped at AVX2).
AVX2_ONLY_CPU = {
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
}
CLEAR = (
    "MKL_ENABLE_INSTRUCTIONS",
    "ATEN_CPU_CAPABILITY",
    "ONEDNN_MAX_CPU_ISA",
    "MKL_CBWR",
    "DASHENG_NUMERICS",
)


def run(*args: str, env: dict | None = None) -> tuple[str, str]:
    base = {k: v for k, v in os.environ.items() if k not in CLEAR}
    proc = subprocess.run(
        [sys.executable, "-c", STEPS, *args], env=base | (env or {}), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    digest, capability = proc.stdout.split()
    return digest, capability


@pytest.fixture(scope="module")
def native() -> tuple[str, str]:
    return run()


@pytest.mark.slow  # (four training runs in fresh interpreters)
def test_portable_numerics_equal_an_avx2_only_cpu_and_native_may_not(native):
    avx2_cpu, cap = run(env=AVX2_ONLY_CPU)
    assert cap == "AVX2"
    portable, cap = run("portable")
    assert cap == "AVX2"
    assert portable == avx2_cpu
    assert run(env={"DASHENG_NUMERICS": "portable"})[0] == portable  # the variable does the same
    native, native_cap = native
    if native_cap == "AVX2":
        pytest.skip("this CPU's widest units are AVX2: native already is the portable result")
    # Wider units (AVX-512, AMX) sum in another order: the reason the mode exists.
    assert native != portable


def test_portable_too_late_is_one_clear_error(native):
    with pytest.raises(ValueError, match="use one of native, portable"):
        from dasheng_model import numerics

        numerics.environment("fast")
    if native[1] == "AVX2":
        pytest.skip("this CPU's widest units are AVX2: there is nothing to switch")
    code = (
        "import torch; torch.ones(4) + 1; torch.backends.cpu.get_cpu_capability();"
        "from dasheng_model import numerics; numerics.apply('portable')"
    )
    base = {k: v for k, v in os.environ.items() if k not in CLEAR}
    proc = subprocess.run([sys.executable, "-c", code], env=base, capture_output=True, text=True)
    assert proc.returncode != 0 and "came too late" in proc.stderr.strip().splitlines()[-1]
