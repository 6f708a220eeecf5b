"""Disk full while the mel jobs write shards: a small tmpfs mounted on the shard folder (where the
machine allows mounting), and a file size limit (RLIMIT_FSIZE, the quota-like case that needs no
privilege). The job ends with one clear error naming the chunk and what to do; no partial or
temporary file is left; once space is freed, a rerun completes with the bytes of a run that never
ran out of space."""

from __future__ import annotations

import contextlib
import resource
import shutil
import signal
import subprocess
from pathlib import Path

import fault_util as fu
import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.network]

MESSAGES = (
    "disk full while writing the shards of",
    "file size limit exceeded while writing the shards of",
)


def _mount_tmpfs(path: Path, size: str) -> bool:
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "fault-tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    return proc.returncode == 0


def _limit_file_size(limit: int):
    def apply():
        signal.signal(
            signal.SIGXFSZ, signal.SIG_IGN
        )  # writes past the limit fail with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    return apply


def _no_partial_chunk(out: Path) -> list[str]:
    """Chunks whose shard folder exists without a manifest, or whose parts do not match it."""
    from dasheng_pipeline.features import shards

    bad = []
    for folder in sorted(
        p for p in (out / "shards").glob("*/*") if p.is_dir() and not p.name.startswith(".")
    ):
        doc_path = folder.with_suffix(".json")
        if not doc_path.is_file():
            bad.append(f"{folder.relative_to(out)} (no manifest)")
            continue
        for part in fu.read_json(doc_path)["shards"]:
            try:
                shards.verify(out.parent.parent / part["path"], part["sha256"])
            except Exception as exc:  # noqa: BLE001 - any failure is a partial chunk
                bad.append(str(exc))
    return bad


def _fill_disk_then_rerun(tmp_path, reference, figures, case: str, limit, lift):
    work = tmp_path / "w"
    shutil.copytree(reference, work, symlinks=True)
    cfg = yaml.safe_load((reference / "test-config.yaml").read_text())
    out = work / fu.OUT
    shutil.rmtree(out / "shards")
    shutil.rmtree(out / "dataset")
    (out / "shards").mkdir()
    with limit(out / "shards") as preexec:
        full = fu.run(work, cfg, "data", check=False, preexec_fn=preexec)
        logs = "".join(p.read_text() for p in (out / "logs/features").rglob("*.log"))
        text = full.stdout + full.stderr + logs
        leftovers, broken, partial = (
            fu.temp_leftovers(out),
            fu.untrusted_finals(out),
            _no_partial_chunk(out),
        )
        lift(out / "shards")
        again = fu.run(work, cfg, "data", check=False)
        same = fu.digests(out) == fu.digests(reference / fu.OUT)
        lost = fu.clips_lost(fu.accounting(reference), fu.accounting(work))
    named = (
        any(m in text for m in MESSAGES)
        and "free space and rerun" in text
        and "Traceback" not in logs
    )
    ok = (
        full.returncode != 0
        and named
        and not leftovers
        and not broken
        and not partial
        and again.returncode == 0
        and same
        and lost == 0
    )
    figures.record("disk full", case, tried=1, survived=int(ok), lost=lost)

    assert full.returncode != 0
    assert named, text[-4000:]
    assert leftovers == [] and broken == [] and partial == []
    assert again.returncode == 0, again.stderr[-4000:]
    assert same and lost == 0


def test_disk_full_on_a_small_tmpfs(tmp_path, reference, figures):
    @contextlib.contextmanager
    def tmpfs(folder):
        if not _mount_tmpfs(folder, "1200k"):
            pytest.skip(
                "cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN); "
                "test_disk_full_as_a_file_size_limit covers the same path"
            )
        try:
            yield None
        finally:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)

    def free_space(folder):
        subprocess.run(["mount", "-o", "remount,size=64m", str(folder)], check=True)

    _fill_disk_then_rerun(
        tmp_path, reference, figures, "tmpfs of 1.2 MB on the shard folder", tmpfs, free_space
    )


def test_disk_full_as_a_file_size_limit(tmp_path, reference, figures):
    @contextlib.contextmanager
    def fsize(folder):
        yield _limit_file_size(200_000)  # a shard part holds 3 windows (≈ 390 kB)

    _fill_disk_then_rerun(
        tmp_path,
        reference,
        figures,
        "file size limit 200 kB (RLIMIT_FSIZE)",
        fsize,
        lambda folder: None,
    )
