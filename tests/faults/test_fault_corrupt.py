"""Damage to finished shards: a flipped bit, a truncated part, a deleted part and a truncated shard
manifest. The next run of the dataset manifest job (forced, as Snakemake tracks shard folders by a
timestamp) detects each one, names the file and moves the chunk aside; the following run rebuilds
exactly those chunks, byte-identical to the originals (runs are deterministic)."""

from __future__ import annotations

import re
import shutil

import fault_util as fu
import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.network]


def _mel_jobs(proc) -> int:
    return len(re.findall(r"^localrule mel_chunk:", proc.stdout + proc.stderr, re.M))


def test_damaged_shards_are_detected_named_and_rebuilt(tmp_path, reference, figures):
    work = tmp_path / "w"
    shutil.copytree(reference, work, symlinks=True)
    cfg = yaml.safe_load((reference / "test-config.yaml").read_text())  # the very same config
    out = work / fu.OUT
    original = fu.digests(reference / fu.OUT)

    flipped = out / "shards/yt/00001/part-000.parquet"
    truncated = out / "shards/demo/00000/part-001.parquet"
    deleted = out / "shards/demo_valid/00000/part-000.parquet"
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x10
    flipped.write_bytes(bytes(data))
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    deleted.unlink()

    detect = fu.run(work, cfg, "data", "--forcerun", "dataset_manifest", check=False)
    text = detect.stdout + detect.stderr
    named = {
        "bit flip": f"{flipped.relative_to(work)}: sha256" in text,
        "truncation": f"{truncated.relative_to(work)}: sha256" in text,
        "deleted part": f"{deleted.relative_to(work)}: shard listed in the dataset manifest is missing"
        in text,
    }
    moved = {
        name: (
            out / "shards" / src / ".damaged" / "00000"
            if src != "yt"
            else out / "shards/yt/.damaged/00001"
        ).is_dir()
        for name, src in (
            ("bit flip", "yt"),
            ("truncation", "demo"),
            ("deleted part", "demo_valid"),
        )
    }
    rebuild = fu.run(work, cfg, "data", check=False)
    after = fu.digests(out)
    first = {
        name: named[name] and moved[name] and rebuild.returncode == 0 and after == original
        for name in named
    }

    # A truncated shard manifest: the job names it and says what to do (delete it); then it is rebuilt.
    manifest = out / "shards/yt/00000.json"
    manifest.write_text(manifest.read_text()[:200])
    detect2 = fu.run(work, cfg, "data", "--forcerun", "dataset_manifest", check=False)
    text2 = detect2.stdout + detect2.stderr
    named_json = (
        f"{manifest.relative_to(work)}: not a valid manifest" in text2
        and "delete it and rerun its rule" in text2
    )
    manifest.unlink()
    rebuild2 = fu.run(work, cfg, "data", check=False)
    after2 = fu.digests(out)
    first["truncated shard manifest"] = (
        named_json and rebuild2.returncode == 0 and after2 == original
    )

    lost = fu.clips_lost(fu.accounting(reference), fu.accounting(work))
    for name, ok in first.items():
        figures.record("damaged shard", name, tried=1, survived=int(ok), lost=lost)

    assert detect.returncode != 0 and named == {k: True for k in named}, text[-4000:]
    assert moved == {k: True for k in moved}
    assert rebuild.returncode == 0, rebuild.stderr[-4000:]
    assert _mel_jobs(rebuild) == 3  # exactly the three damaged chunks
    assert after == original  # rebuilt bytes equal the originals
    assert detect2.returncode != 0 and named_json, text2[-4000:]
    assert rebuild2.returncode == 0 and _mel_jobs(rebuild2) == 1 and after2 == original
    assert fu.verify_dataset(work) == sum(p.endswith(".parquet") for p in original)
    assert lost == 0
