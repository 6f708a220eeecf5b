"""Numerics that hold across CPU kinds: the same bytes on an AMX Xeon and on an AVX2-only CPU.

On CPU, PyTorch's results depend on the instruction set its three kernel libraries pick at run
time: ATen's own vectorised kernels (``ATEN_CPU_CAPABILITY``), MKL's BLAS (``MKL_CBWR``) and
oneDNN (``ONEDNN_MAX_CPU_ISA``). Each picks the widest the CPU has (AVX-512, AMX), and each changes
the summation order, so the same config and seed give bitwise-identical results on the same kind
of CPU only. ``portable`` caps all three at AVX2, which every x86-64 server CPU of the last decade
has: a machine with wider units then computes exactly what an AVX2-only machine computes by
default. The cost on this project's 2-core AMX Xeon: a tiny-MAE fp32 training step 1.25x slower
(BENCHMARKS.md, "Numerics across CPU kinds").

The variables are read when each library first computes, so :func:`apply` must run before any
tensor work in the process (an entry point's first line; the DAG sets them in every job's
environment instead, and Ray's workers inherit them). Not covered: another thread count
(parallel reductions), oneDNN's cache-size-dependent blocking on CPUs with other cache sizes, ARM,
and GPUs.
"""

from __future__ import annotations

import os

MODES = ("native", "portable")
PORTABLE_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "AVX2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
}
ENV_VAR = "DASHENG_NUMERICS"  # native | portable: read by apply(None)


def environment(mode: str) -> dict[str, str]:
    """The environment variables of ``mode`` (empty for ``native``)."""
    if mode not in MODES:
        raise ValueError(f"numerics mode {mode!r}: use one of {', '.join(MODES)}")
    return dict(PORTABLE_ENV) if mode == "portable" else {}


def apply(mode: str | None = None) -> str:
    """Switch this process to ``mode`` (default: ``$DASHENG_NUMERICS``, else native) before any
    tensor work, and check that it took effect. Returns the mode."""
    mode = mode or os.environ.get(ENV_VAR) or "native"
    env = environment(mode)
    os.environ.update(env)
    if env:
        import torch

        got = torch.backends.cpu.get_cpu_capability()
        if got not in ("AVX2", "DEFAULT"):
            raise RuntimeError(
                f"numerics 'portable' came too late: PyTorch already chose {got} kernels in this "
                f"process; set {ENV_VAR}=portable (or {', '.join(f'{k}={v}' for k, v in env.items())}) "
                "in the environment before starting Python"
            )
    return mode
