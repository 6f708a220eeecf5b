"""Hostile input: file names and list IDs with ``../``, shell metacharacters, newlines, quotes, a
leading dash, very long names and bytes that are not UTF-8 (through the DAG: the names travel in
JSON params, shell commands, ffmpeg calls, manifests and Parquet); a crafted pickle in a ``.pt``
checkpoint; Parquet files of the wrong schema; configs pointing outside the working directory
while ``allow_outside_paths`` is false.

The promises: nothing runs that the input smuggles in (a ``PWNED`` marker file is never created),
nothing is written outside the output folder, every input ends in exactly one status with a
reason, and refused input is named."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import fault_util as fu
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import REPO, tone

pytestmark = [pytest.mark.slow, pytest.mark.network]

MARK = "PWNED"
# Each payload, if it ever reached a shell or an exec, would create MARK in the working folder.
LOCAL_NAMES = {
    "speech/plain.wav": "ok",
    f"speech/a;touch {MARK};.wav": "ok",
    f"speech/$(touch {MARK}).wav": "ok",
    f"speech/`touch {MARK}`.wav": "ok",
    f"speech/x | touch {MARK} &.wav": "ok",
    "speech/new\nline.wav": "ok",
    "speech/-i evil.wav": "ok",
    "speech/quote'\"both.wav": "ok",
    "speech/" + "L" * 250 + ".wav": "ok",
    f"$(touch {MARK})/label from a folder.wav": "ok",
    "speech/escape.wav": "rejected",  # a link to ../../outside.wav
    b"speech/caf\xe9-latin1.wav": "rejected",  # not UTF-8
}
YT_ROWS = {  # list row → expected status
    '-dashstart1, 0, 10, "/m/x"': "ok",  # a valid ID that looks like an option
    '../../../../tmp/evil, 0, 10, "/m/x"': "rejected",
    f'$(touch {MARK}), 0, 10, "/m/x"': "rejected",
    f'a;touch {MARK}, 0, 10, "/m/x"': "rejected",
    '%2e%2e%2fetc%2f, 0, 10, "/m/x"': "rejected",
    "Z" * 5000 + ', 0, 10, "/m/x"': "rejected",
    f'"new\nline{MARK}", 0, 10, "/m/x"': "rejected",  # a quoted newline: two broken rows
}


def _corpus(root: Path, media: Path) -> None:
    for name in LOCAL_NAMES:
        raw = os.fsencode(root) + b"/" + (name if isinstance(name, bytes) else name.encode())
        path = Path(os.fsdecode(raw))
        path.parent.mkdir(parents=True, exist_ok=True)
        if name == "speech/escape.wav":
            path.symlink_to("../../outside.wav")
        else:
            shutil.copyfile(media, path)
    shutil.copyfile(media, root.parent / "outside.wav")


def _markers(*roots: Path) -> list[str]:
    return [str(p) for root in roots for p in root.rglob(f"*{MARK}*") if p.name == MARK]


def test_hostile_names_and_ids_through_the_dag(tmp_path, figures):
    media = tone(tmp_path / "media" / "tone.wav", 3.0, freq=300)
    work = tmp_path / "w"
    root = work / "corpus $(touch PWNED) ;'"  # the corpus root itself is hostile too
    _corpus(root, media)
    listing = work / "ids.csv"
    listing.write_text(
        "# YTID, start_seconds, end_seconds, positive_labels\n" + "\n".join(YT_ROWS) + "\n"
    )
    from loopback import File, Server

    with Server() as srv:
        srv.routes["-dashstart1"] = File(tone(tmp_path / "media" / "yt.m4a", 12.0), "audio/mp4")
        cfg = {
            "sources": {
                "mine": {"type": "local", "root": str(root), "chunk_size": 5, "labels": "folder"},
                "yt": {
                    "type": "youtube",
                    "list": str(listing),
                    "url_template": srv.url_template,
                    "sleep_between_s": 0,
                    "retries": 0,
                    "socket_timeout_s": 5,
                },
            },
            "allow_outside_paths": False,
            "training": {"validation_sources": []},
            "evaluation": {"enabled": False},
        }
        before = {p for p in tmp_path.rglob("*")}
        proc = fu.run(work, cfg, "data", check=False)
    out = work / fu.OUT
    docs = [fu.read_json(p) for p in sorted((out / "shards").glob("*/*.json"))]
    clips = [{**c, "source": d["source"]} for d in docs for c in d["clips"]]
    by_id = {}
    for c in clips:
        by_id.setdefault(c["clip_id"], []).append(c)
    written = {work / "test-config.yaml", work / "results", work / ".snakemake"}
    stray = sorted(
        str(p)
        for p in set(tmp_path.rglob("*")) - before
        if p not in written and not any(parent in written for parent in p.parents)
    )
    pwned = _markers(tmp_path, Path.cwd(), REPO)

    local = [c for c in clips if c["source"] == "mine"]
    youtube = [c for c in clips if c["source"] == "yt"]
    want_local = {os.fsdecode(n) if isinstance(n, bytes) else n: s for n, s in LOCAL_NAMES.items()}
    got_local = {c["clip_id"]: c["status"] for c in local}
    non_utf8 = [c for c in local if "\\xe9" in c["clip_id"]]
    local_ok = (
        len(local) == len(LOCAL_NAMES)
        and len(non_utf8) == 1
        and non_utf8[0]["status"] == "rejected"
        and all(got_local.get(n) == s for n, s in want_local.items() if "latin1" not in n)
    )
    escaped = by_id.get("speech/escape.wav", [{}])[0]
    labels = {
        c["clip_id"]: c["labels"]
        for p in sorted((out / "manifests/mine").glob("*.json"))
        for c in fu.read_json(p)["clips"]
    }
    yt_status = sorted(c["status"] for c in youtube)
    # the quoted newline splits into two rows: 8 list rows in all, one ok
    yt_ok = yt_status == ["ok"] + ["rejected"] * 7 and all(
        c["reason"] for c in youtube if c["status"] == "rejected"
    )
    dataset = (
        fu.read_json(out / "dataset/manifest.json")
        if (out / "dataset/manifest.json").is_file()
        else {}
    )
    for case, ok in (("local file names (12)", local_ok), ("list IDs (8 rows)", yt_ok)):
        figures.record(
            "hostile input",
            case,
            tried=1,
            survived=int(ok and proc.returncode == 0 and not pwned),
            lost=0 if ok else 1,
        )

    assert proc.returncode == 0, proc.stderr[-4000:]
    assert pwned == [], "a payload ran"
    assert stray == [], stray
    assert all(len(v) == 1 for v in by_id.values()), "an input recorded twice"
    assert local_ok, got_local
    assert escaped["reason"].startswith("link points outside the corpus root")
    assert labels[f"$(touch {MARK})/label from a folder.wav"] == [f"$(touch {MARK})"]
    assert yt_ok, [(c["clip_id"][:40], c["status"], c["reason"]) for c in youtube]
    assert dataset["totals"]["ok"] == 10 + 1
    # the audio store holds plain names only (hashes for anything unsafe), all inside its folder
    stored = [p.name for p in (out / "audio").rglob("*.flac")]
    assert len(stored) == 11 and all(
        p.isascii() and "/" not in p and not p.startswith("-") for p in stored
    )


def test_crafted_pickle_checkpoint_runs_nothing(tmp_path, figures):
    """A ``.pt`` whose unpickling would run a command, given to the embedding job's entry point as a
    model's weights (``models.<name>.path``), in the zip and the legacy pickle formats: the job
    fails naming the file, the command never runs, no embedding is written. (The task is a small
    demo task in HEAR format, so that the case runs wherever the suite does.)"""
    from dasheng_pipeline.evaluation.tasks import demo as demo_tasks

    hear_task = tmp_path / "task"
    demo_tasks.generate("demo_noise", hear_task, seed=0, scale=0.1)
    marker = tmp_path / MARK

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    import torch

    files = {"zip": tmp_path / "dasheng_evil.pt", "legacy pickle": tmp_path / "legacy_evil.pt"}
    torch.save({"model": Payload()}, files["zip"])
    files["legacy pickle"].write_bytes(pickle.dumps({"model": Payload()}))
    results = {}
    for kind, path in files.items():
        out = tmp_path / f"emb-{kind.replace(' ', '_')}"
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "dasheng_pipeline.evaluation.embeddings",
                "--task",
                str(hear_task),
                "--model",
                "evil",
                "--spec",
                str(path),
                "--out",
                str(out),
            ],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=300,
        )
        written = [p.name for p in out.rglob("*") if p.is_file()] if out.is_dir() else []
        results[kind] = {
            "rc": proc.returncode,
            "error": proc.stderr.strip().splitlines()[-1:],
            "ran": marker.exists(),
            "written": written,
        }
        figures.record(
            "hostile input",
            f"crafted pickle .pt ({kind})",
            tried=1,
            survived=int(proc.returncode != 0 and not marker.exists() and not written),
        )
    for kind, r in results.items():
        assert r["rc"] != 0 and not r["ran"] and r["written"] == [], (kind, r)
        assert str(files[kind]) in r["error"][0] and "refused to load" in r["error"][0], r["error"]


def _wrong_schema_files(folder: Path, shard: Path) -> dict[str, Path]:
    """Parquet files that carry a real shard's metadata but the wrong columns."""
    table = pq.read_table(shard)
    meta = table.schema.metadata
    mel = table.column("mel").combine_chunks()
    flat = pa.array(mel.storage.flatten().to_numpy(zero_copy_only=False).astype("float32"))
    as_f32 = pa.FixedSizeListArray.from_arrays(flat, mel.type.storage_type.list_size)
    variants = {
        "mel as float32": table.set_column(table.schema.get_field_index("mel"), "mel", as_f32),
        "mel column missing": table.drop_columns(["mel"]),
        "no pipeline metadata": table.replace_schema_metadata(None),
    }
    out = {}
    for name, tab in variants.items():
        path = folder / (name.replace(" ", "_") + ".parquet")
        pq.write_table(
            tab.replace_schema_metadata(meta) if name != "no pipeline metadata" else tab, path
        )
        out[name] = path
    return out


def test_wrong_schema_parquet_is_refused_before_training(tmp_path, reference, figures):
    """A foreign Parquet file in place of a shard, with a manifest that vouches for its bytes (so the
    sha256 check passes): training's input check refuses it, naming the file and the column."""
    from dasheng_pipeline.common import atomic
    from dasheng_pipeline.features import shards
    from dasheng_pipeline.training.train import select_shards

    dataset = fu.read_json(reference / fu.OUT / "dataset/manifest.json")
    victim = dataset["shards"][0]
    results = {}
    for name, path in _wrong_schema_files(tmp_path, reference / victim["path"]).items():
        doc = {
            **dataset,
            "shards": [
                {**victim, "path": str(path), "sha256": atomic.sha256_file(path)},
                *dataset["shards"][1:],
            ],
        }
        try:
            select_shards(doc, ["demo_valid"], reference, verify=True)
            results[name] = "accepted"
        except shards.ShardError as exc:
            results[name] = str(exc)
    for name, message in results.items():
        figures.record(
            "hostile input",
            f"wrong-schema Parquet ({name})",
            tried=1,
            survived=int(message.startswith(str(tmp_path))),
        )
    assert "wrong schema: mel is fixed_size_list<" in results["mel as float32"]
    assert (
        "float>[64064], expected extension<arrow.fixed_shape_tensor[value_type=halffloat, shape=[64,1001]]>"
        in results["mel as float32"]
    )
    assert "missing column(s) ['mel']" in results["mel column missing"]
    assert "not a shard of this pipeline" in results["no pipeline metadata"]
    assert all(m.startswith(str(tmp_path)) for m in results.values()), results


OUTSIDE_CASES = {  # config change → the key the error must name
    "out_dir": lambda w, o: {"out_dir": str(o / "results")},
    "out_dir (../)": lambda w, o: {"out_dir": "../escaped"},
    "sources.yt.list": lambda w, o: {
        "sources": {"yt": {"type": "youtube", "list": str(o / "ids.csv")}}
    },
    "sources.yt.cookies": lambda w, o: {
        "sources": {"yt": {"type": "youtube", "list": "ids.csv", "cookies": str(o / "cookies.txt")}}
    },
    "sources.mine.root": lambda w, o: {"sources": {"mine": {"type": "local", "root": str(o)}}},
    "sources.mine.root (a link)": lambda w, o: {
        "sources": {"mine": {"type": "local", "root": "link"}}
    },
    "sources.mine.labels_csv": lambda w, o: {
        "sources": {
            "mine": {
                "type": "local",
                "root": "corpus",
                "labels": "csv",
                "labels_csv": str(o / "labels.csv"),
            }
        }
    },
    "models.evil.path": lambda w, o: {
        "models": {"evil": {"type": "checkpoint", "path": str(o / "w.safetensors")}}
    },
}


def test_config_pointing_outside_is_refused(tmp_path, figures):
    outside = tmp_path / "outside"
    outside.mkdir()
    for name in ("ids.csv", "cookies.txt", "labels.csv", "w.safetensors"):
        (outside / name).write_text("path,labels\n" if name.endswith(".csv") else "x")
    results = {}
    for case, change in OUTSIDE_CASES.items():
        work = tmp_path / f"w{len(results)}"
        work.mkdir()
        (work / "ids.csv").write_text("# YTID, start_seconds, end_seconds, positive_labels\n")
        (work / "corpus").mkdir()
        (work / "link").symlink_to(outside)
        base = {
            "sources": {"demo": {"type": "demo", "clips": 2, "chunk_size": 2}},
            "allow_outside_paths": False,
        }
        cfg = {**base, **change(work, outside)}
        proc = fu.run(work, cfg, "-n", "all", check=False)
        key = case.split(" ")[0]
        text = proc.stdout + proc.stderr
        results[case] = (
            proc.returncode != 0
            and f"config key {key}:" in text
            and "allow_outside_paths is false" in text
        )
        figures.record(
            "hostile input", f"outside path: {case}", tried=1, survived=int(results[case])
        )
    # the same first config with allow_outside_paths: true is accepted
    first = {
        "sources": {"demo": {"type": "demo", "clips": 2, "chunk_size": 2}},
        "out_dir": str(outside / "results"),
    }
    allowed = fu.run(tmp_path / "w0", first, "-n", "all", check=False)
    assert results == {k: True for k in OUTSIDE_CASES}, results
    assert allowed.returncode == 0, allowed.stderr[-3000:]
