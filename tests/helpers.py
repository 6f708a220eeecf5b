"""Test helpers: media files made with the project's ffmpeg, and real Snakemake runs."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import yaml

from dasheng_pipeline.common.audio import ffmpeg_exe

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("DASHENG_SHARED", REPO.parent / "shared"))
FIXTURES = SHARED / "fixtures"
HEAR_TASK = FIXTURES / "hear" / "spoken_digit-1.0.9-small"
SPEECH_COMMANDS = FIXTURES / "speech_commands_small"


def tone(
    path: Path,
    seconds: float,
    *,
    sample_rate: int = 44100,
    channels: int = 1,
    freq: float = 440.0,
    extra: tuple[str, ...] = (),
) -> Path:
    """A sine tone in any container/codec ffmpeg infers from ``path``'s extension."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            ffmpeg_exe(),
            "-nostdin",
            "-hide_banner",
            "-loglevel",
            "error",
            "-y",
            "-f",
            "lavfi",
            "-i",
            f"sine=frequency={freq}:sample_rate={sample_rate}:duration={seconds}",
            "-ac",
            str(channels),
            *extra,
            str(path),
        ],
        check=True,
        capture_output=True,
    )
    return path


def float_wav(path: Path, samples, sample_rate: int = 16000) -> Path:
    """A 32-bit float WAV written by hand (so it can hold NaN)."""
    data = b"".join(struct.pack("<f", float(x)) for x in samples)
    header = (
        b"RIFF"
        + struct.pack("<I", 36 + len(data))
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 3, 1, sample_rate, sample_rate * 4, 4, 32)
        + b"data"
        + struct.pack("<I", len(data))
    )
    Path(path).write_bytes(header + data)
    return Path(path)


def silent_wav(path: Path, seconds: float, sample_rate: int = 16000) -> Path:
    return float_wav(path, [0.0] * int(seconds * sample_rate), sample_rate)


def bad_corpus(root: Path) -> dict[str, str]:
    """A folder of good and bad files; returns {relative path: expected reason prefix or 'ok'}."""
    root.mkdir(parents=True, exist_ok=True)
    tone(root / "good" / "tone.wav", 3.0)
    tone(root / "good" / "tone.mp3", 2.0)
    tone(root / "good" / "long.flac", 25.0, sample_rate=22050)
    full = tone(root / "scratch.flac", 3.0)
    (root / "bad").mkdir(exist_ok=True)
    (root / "bad" / "truncated.flac").write_bytes(full.read_bytes()[:30000])
    full.unlink()
    (root / "bad" / "corrupt.wav").write_bytes(os.urandom(4000))
    (root / "bad" / "empty.wav").write_bytes(b"")
    (root / "bad" / "text.mp3").write_text("this is not audio\n")
    float_wav(root / "bad" / "nan.wav", [float("nan")] * 8000)
    silent_wav(root / "bad" / "silent.wav", 2.0)
    tone(root / "bad" / "short.wav", 0.05)
    zero = root / "bad" / "zero_length.wav"
    zero.write_bytes(
        b"RIFF"
        + struct.pack("<I", 36)
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, 1, 16000, 32000, 2, 16)
        + b"data"
        + struct.pack("<I", 0)
    )
    (root / "notes.txt").write_text("not listed: not an audio extension\n")
    return {
        "good/tone.wav": "ok",
        "good/tone.mp3": "ok",
        "good/long.flac": "ok",
        "bad/truncated.flac": "undecodable",
        "bad/corrupt.wav": "undecodable",
        "bad/empty.wav": "empty file",
        "bad/text.mp3": "undecodable",
        "bad/nan.wav": "8000 of 8000 samples are NaN",
        "bad/silent.wav": "silent",
        "bad/short.wav": "too short",
        "bad/zero_length.wav": "no audio decoded",
    }


# The SLURM executor plugin runs `scontrol show config` when Snakemake loads it, at every start. Where
# the SLURM client is configured but no controller answers (this machine between SLURM tests, once
# scripts/slurm_local.sh has written /etc/slurm/slurm.conf), scontrol retries for MessageTimeout:
# about 9 s added to every Snakemake run. Tests that do not use SLURM point the client at a config
# whose controller refuses at once (conftest.py); the SLURM tests put back SLURM_CONF_AT_START.
SLURM_CONF_AT_START = os.environ.get("SLURM_CONF")
NO_CONTROLLER_CONF = (
    "ClusterName=none\nSlurmctldHost=localhost(127.0.0.1)\nSlurmctldPort=9\nMessageTimeout=1\n"
)


def snakemake_env(**extra: str) -> dict:
    """The environment of a workflow run: this venv's tools first on PATH."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return {**env, **extra}


def snakemake_cmd(
    workdir: Path, config: dict, *args: str, label: str = "", cores: int | None = 2
) -> list[str]:
    """The command line of a real workflow run with ``config`` (written to the work folder as
    test-config[-label].yaml); ``cores`` None leaves the number to ``args`` (a profile)."""
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = workdir / f"test-config{'-' + label if label else ''}.yaml"
    cfg.write_text(yaml.safe_dump(config, sort_keys=True))
    snakefile, folder = str(REPO / "Snakefile"), str(workdir)
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        snakefile,
        "-d",
        folder,
        "--configfile",
        str(cfg),
    ]
    return cmd + (["--cores", str(cores)] if cores else []) + list(args)


def snakemake(
    workdir: Path,
    config: dict,
    *args: str,
    check: bool = True,
    timeout: int = 900,
    env: dict | None = None,
    **popen,
) -> subprocess.CompletedProcess:
    """Run the real workflow with ``config`` (merged over nothing: schema defaults apply);
    ``popen`` goes to ``subprocess.run`` (``preexec_fn``, say)."""
    proc = subprocess.run(
        snakemake_cmd(workdir, config, *args),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or snakemake_env(),
        cwd=workdir,
        **popen,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"snakemake failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def read_json(path: Path) -> dict:
    with open(path) as fh:
        return json.load(fh)
