"""`dasheng-pipeline embed` and `inspect`: real ffmpeg decoding, real Parquet, the console script."""

import csv
import json
import subprocess

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import bad_corpus, tone

from dasheng_model import hear
from dasheng_model.checkpoint import save_checkpoint
from dasheng_model.pretrained import random_encoder, save_hf
from dasheng_pipeline import cli
from dasheng_pipeline.tools import embed as embed_tool


def _rejects(out):
    with open(embed_tool.rejects_path(out), newline="") as fh:
        return {r["path"]: r["reason"] for r in csv.DictReader(fh)}


def test_a_folder_is_embedded_once_and_a_rerun_does_nothing(tmp_path, speech_commands):
    out = tmp_path / "e.parquet"
    assert (
        cli.main(["embed", str(speech_commands), "--model", "random:tiny", "--out", str(out), "-q"])
        == 0
    )
    table = pq.read_table(out)
    wavs = sorted(str(p) for p in speech_commands.rglob("*.wav"))
    assert table.column("path").to_pylist() == wavs  # every file, sorted by path
    rows = {r["path"]: r for r in table.select(["path", "duration_s", "chunks"]).to_pylist()}
    longest = max(rows.values(), key=lambda r: r["duration_s"])
    assert (
        longest["duration_s"] > 60 and longest["chunks"] == 7
    )  # the 61 s file: seven 10.08 s windows
    assert {r["chunks"] for r in rows.values() if r["duration_s"] <= 10} == {1}
    assert table.schema.field("embedding").type.list_size == 192
    meta = json.loads(table.schema.metadata[b"dasheng"])
    assert set(meta["provenance"]) == {"config_hash", "seed", "versions", "git_sha"}
    before = (out.read_bytes(), out.stat().st_mtime_ns)
    summary = embed_tool.embed_files([speech_commands], "random:tiny", out, progress=False)
    assert (summary.embedded, summary.skipped) == (0, len(wavs))
    assert (out.read_bytes(), out.stat().st_mtime_ns) == before


def test_bad_files_go_to_the_rejects_with_their_reasons(tmp_path):
    expected = bad_corpus(tmp_path / "corpus")
    (tmp_path / "corpus" / "x.wav").mkdir()
    out = tmp_path / "e.parquet"
    summary = embed_tool.embed_files(
        [tmp_path / "corpus"], "random:tiny", out, frames=True, progress=False
    )
    rejects = {p.removeprefix(str(tmp_path / "corpus") + "/"): r for p, r in _rejects(out).items()}
    assert rejects.pop("x.wav").startswith("a directory")
    ok = {k for k, v in expected.items() if v == "ok"} | {
        "bad/short.wav"
    }  # 50 ms: longer than one 40 ms token
    for name, reason in expected.items():
        if name not in ok:
            assert rejects[name].startswith(reason), (name, rejects[name])
    assert len(rejects) == len(expected) - len(ok) and summary.rejected == len(rejects) + 1
    table = pq.read_table(out)
    assert sorted(
        p.removeprefix(str(tmp_path / "corpus") + "/") for p in table.column("path").to_pylist()
    ) == sorted(ok)
    row = next(r for r in table.to_pylist() if r["path"].endswith("long.flac"))
    frames = np.array(row["frames"], dtype=np.float32)
    assert frames.shape == (625, 192) and row["chunks"] == 3  # 25 s at 25 Hz, three windows
    assert np.allclose(frames.mean(0), row["embedding"], atol=1e-6)
    assert row["frame_times_ms"][:2] == [15.0, 55.0]


def test_new_and_changed_files_are_embedded_and_other_weights_refused(tmp_path):
    folder = tmp_path / "a"
    tone(folder / "one.wav", 1.0)
    out = tmp_path / "e.parquet"
    embed_tool.embed_files([folder], "random:tiny", out, progress=False)
    tone(folder / "two.wav", 2.0, freq=300.0)
    tone(folder / "one.wav", 1.5, freq=600.0)  # changed: size and time differ
    summary = embed_tool.embed_files([folder], "random:tiny", out, progress=False)
    assert summary.embedded == 2 and summary.rows == 2
    durations = dict(zip(*pq.read_table(out).select(["path", "duration_s"]).to_pydict().values()))
    assert durations == {str(folder / "one.wav"): 1.5, str(folder / "two.wav"): 2.0}
    with pytest.raises(embed_tool.EmbedError, match="holds embeddings of other weights"):
        embed_tool.embed_files([folder], "random:tiny:1", out, progress=False)


def test_bf16_matches_fp32(tmp_path):
    """bf16 autocast against fp32 on the same files: clip cosine >= 0.999 (measured: printed)."""
    folder = tmp_path / "a"
    for i, f in enumerate((220.0, 440.0, 880.0)):
        tone(folder / f"{i}.wav", 3.0 + 4 * i, freq=f)
    fp32 = embed_tool.embed_files(
        [folder], "random:tiny", tmp_path / "fp32.parquet", progress=False
    )
    bf16 = embed_tool.embed_files(
        [folder], "random:tiny", tmp_path / "bf16.parquet", dtype="bf16", progress=False
    )
    assert fp32.embedded == bf16.embedded == 3
    a = np.array(pq.read_table(tmp_path / "fp32.parquet").column("embedding").to_pylist())
    b = np.array(pq.read_table(tmp_path / "bf16.parquet").column("embedding").to_pylist())
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    print(f"bf16 vs fp32 clip cosine: min {cos.min():.5f}")
    assert cos.min() >= 0.999 and not np.array_equal(a, b)


def test_embed_equals_the_hear_module_in_every_format(tmp_path):
    """The same weights as an official .pt, a Hugging Face folder and our .safetensors give identical
    embeddings through embed, and the HEAR module's scene embeddings for them."""
    encoder = random_encoder("tiny", 5)
    official = tmp_path / "tiny.pt"
    torch.save(
        {"model": encoder.state_dict(), "config": {"embed_dim": 192, "depth": 6, "num_heads": 3}},
        official,
    )
    hf = save_hf(encoder, tmp_path / "tiny-hf")
    ours = save_checkpoint(encoder, tmp_path / "tiny.safetensors", seed=5)
    audio = tone(tmp_path / "audio" / "a.wav", 12.5, sample_rate=16000)
    tables = {}
    for name, spec in (("official", official), ("hf", hf), ("ours", ours)):
        embed_tool.embed_files([audio], str(spec), tmp_path / f"{name}.parquet", progress=False)
        tables[name] = np.array(
            pq.read_table(tmp_path / f"{name}.parquet").column("embedding").to_pylist()
        )
    assert np.array_equal(tables["official"], tables["hf"]) and np.array_equal(
        tables["hf"], tables["ours"]
    )
    from dasheng_pipeline.common.audio import decode

    wav = torch.from_numpy(decode(audio))[None]
    for spec in (official, hf):
        scene = hear.get_scene_embeddings(wav, hear.load_model(str(spec), device="cpu")).numpy()
        assert np.allclose(scene, tables["official"], atol=1e-5)


def test_inspect_names_format_size_and_provenance(tmp_path, capsys):
    encoder = random_encoder("tiny", 1)
    ours = save_checkpoint(encoder, tmp_path / "tiny.safetensors", seed=1)
    hf = save_hf(encoder, tmp_path / "hf")
    assert cli.main(["inspect", str(ours), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["format"], info["kind"], info["size"], info["parameters"]) == (
        "dasheng-pipeline",
        "encoder",
        "tiny",
        2767616,
    )
    assert info["provenance"]["seed"] == 1 and len(info["sha256"]) == 64
    assert cli.main(["inspect", str(hf)]) == 0
    text = capsys.readouterr().out
    assert "huggingface" in text and "192" in text


def test_the_console_script_exit_codes(tmp_path):
    ok = subprocess.run(["dasheng-pipeline", "embed", "--help"], capture_output=True, text=True)
    assert ok.returncode == 0 and "--dtype" in ok.stdout
    usage = subprocess.run(["dasheng-pipeline", "embed"], capture_output=True, text=True)
    assert usage.returncode == 2
    bad = subprocess.run(
        [
            "dasheng-pipeline",
            "embed",
            str(tmp_path),
            "--model",
            str(tmp_path / "missing.pt"),
            "--out",
            str(tmp_path / "e.parquet"),
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1
    assert (
        bad.stderr.strip().count("\n") == 0
        and bad.stderr.startswith("error: model ")
        and "missing.pt" in bad.stderr
    )


def test_a_killed_run_keeps_its_parts_and_the_rerun_finishes_it(tmp_path):
    import signal
    import sys
    import time

    folder = tmp_path / "a"
    for i in range(40):
        tone(folder / f"{i:02d}.wav", 1.0, sample_rate=16000, freq=200.0 + 20 * i)
    out = tmp_path / "e.parquet"
    code = (
        "import sys; from dasheng_pipeline.tools.embed import embed_files; "
        "embed_files([sys.argv[1]], 'random:tiny', sys.argv[2], batch_size=1, part_files=1, progress=False)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder), str(out)])
    parts = embed_tool.parts_dir(out)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(parts.glob("part-*.parquet"))) < 2:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists() and len(list(parts.glob("part-*.parquet"))) >= 2
    summary = embed_tool.embed_files([folder], "random:tiny", out, progress=False)
    assert summary.skipped >= 2 and summary.embedded == 40 - summary.skipped and summary.rows == 40
    assert pq.read_table(out).column("path").to_pylist() == sorted(
        str(p) for p in folder.glob("*.wav")
    )
    assert not parts.exists()
