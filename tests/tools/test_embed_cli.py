"""`dasheng-pipeline embed` and `inspect`: real ffmpeg decoding, real Parquet, the console script."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import bad_corpus, tone

from dasheng_model import hear
from dasheng_model.checkpoint import save_checkpoint
from dasheng_model.pretrained import random_encoder, save_hf
from dasheng_pipeline import cli
from dasheng_pipeline.common.audio import decode
from dasheng_pipeline.tools import embed as embed_tool
from dasheng_pipeline.tools import read_embeddings

LONG = "_background_noise_/running_tap.wav"  # the fixture's 61 s file


def _rejects(out):
    with open(embed_tool.rejects_path(out), newline="") as fh:
        return {r["path"]: r["reason"] for r in csv.DictReader(fh)}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["dasheng-pipeline", *args], capture_output=True, text=True)


def test_a_folder_is_embedded_once_and_other_spellings_of_it_are_skipped(
    tmp_path, speech_commands, monkeypatch
):
    out = tmp_path / "e.parquet"
    assert (
        cli.main(["embed", str(speech_commands), "--model", "random:tiny", "--out", str(out), "-q"])
        == 0
    )
    table = pq.read_table(out)
    wavs = sorted(str(p.resolve()) for p in speech_commands.rglob("*.wav"))
    assert table.column("path").to_pylist() == wavs  # every file, by resolved path, sorted
    assert table.column("input").to_pylist() == [
        str(speech_commands / os.path.relpath(p, speech_commands.resolve())) for p in wavs
    ]
    rows = {r["path"]: r for r in table.select(["path", "duration_s", "chunks"]).to_pylist()}
    longest = max(rows.values(), key=lambda r: r["duration_s"])
    assert longest["duration_s"] > 60 and longest["chunks"] == 7  # seven 10.08 s windows
    assert {r["chunks"] for r in rows.values() if r["duration_s"] <= 10} == {1}
    assert table.schema.field("embedding").type.list_size == 192
    meta = json.loads(table.schema.metadata[b"dasheng"])
    assert set(meta["provenance"]) == {"config_hash", "seed", "versions", "git_sha"}
    before = (out.read_bytes(), out.stat().st_mtime_ns)
    # the same folder under other spellings: relative, through ../, through a link
    link = tmp_path / "link"
    link.symlink_to(speech_commands)
    monkeypatch.chdir(speech_commands / "bed")
    for spelling in (".", "..", "../bed/..", str(link)):
        summary = embed_tool.embed_files([spelling], "random:tiny", out, progress=False)
        assert summary.embedded == 0 and summary.rows == len(wavs), spelling
    assert (out.read_bytes(), out.stat().st_mtime_ns) == before


def test_bad_files_go_to_the_rejects_and_frames_are_read_back(tmp_path):
    expected = bad_corpus(tmp_path / "corpus")
    (tmp_path / "corpus" / "x.wav").mkdir()
    out = tmp_path / "e.parquet"
    summary = embed_tool.embed_files(
        [tmp_path / "corpus"], "random:tiny", out, frames=True, progress=False
    )
    prefix = str((tmp_path / "corpus").resolve()) + "/"
    rejects = {p.removeprefix(prefix): r for p, r in _rejects(out).items()}
    assert rejects.pop("x.wav").startswith("a directory")
    ok = {k for k, v in expected.items() if v == "ok"} | {"bad/short.wav"}  # 50 ms: one token
    for name, reason in expected.items():
        if name not in ok:
            assert rejects[name].startswith(reason), (name, rejects[name])
    assert len(rejects) == len(expected) - len(ok) and summary.rejected == len(rejects) + 1
    paths, clips, frames, meta, table = read_embeddings(out)
    assert sorted(p.removeprefix(prefix) for p in paths) == sorted(ok)
    assert clips.shape == (len(ok), 192) and clips.dtype == np.float32 and meta["frames"]
    i = next(i for i, p in enumerate(paths) if p.endswith("long.flac"))
    assert frames[i].shape == (625, 192) and table.column("chunks")[i].as_py() == 3  # 25 s
    np.testing.assert_allclose(frames[i].mean(0), clips[i], rtol=1e-5, atol=1e-6)
    assert frames.times_ms(i)[:2].tolist() == [15.0, 55.0]
    assert table.column("num_frames").to_pylist() == [f.shape[0] for f in frames]


def test_a_long_file_is_streamed_and_equals_the_whole_file_computation(tmp_path, speech_commands):
    """The 61 s file is longer than what embed keeps in memory: it is read twice and embedded
    window by window; the frames are the encoder's on the whole waveform, bit for bit, and the
    clip their mean (the windows' float32 sums added in float64: within 1e-6 of the exact mean)."""
    from dasheng_pipeline.tools import inputs

    audio = speech_commands / LONG
    assert decode(audio).size / 16000 > inputs.IN_MEMORY_S
    embed_tool.embed_files([audio], "random:tiny", tmp_path / "e.parquet", frames=True)
    _, clips, frames, _, _ = read_embeddings(tmp_path / "e.parquet")
    with torch.no_grad():
        whole = random_encoder("tiny")(torch.from_numpy(decode(audio))[None])[0]
    assert torch.equal(torch.from_numpy(frames[0].copy()), whole)  # (Arrow's: read-only)
    np.testing.assert_allclose(clips[0], whole.double().mean(0).numpy(), rtol=1e-6, atol=1e-7)


def test_new_and_changed_files_are_embedded_and_other_weights_refused(tmp_path):
    folder = tmp_path / "a"
    tone(folder / "one.wav", 1.0)
    out = tmp_path / "e.parquet"
    embed_tool.embed_files([folder], "random:tiny", out, frames=True, progress=False)
    tone(folder / "two.wav", 2.0, freq=300.0)
    tone(folder / "one.wav", 1.5, freq=600.0)  # changed: size and time differ
    summary = embed_tool.embed_files([folder], "random:tiny", out, frames=True, progress=False)
    assert summary.embedded == 2 and summary.rows == 2
    paths, _, frames, _, table = read_embeddings(out)
    assert dict(zip(paths, table.column("duration_s").to_pylist())) == {
        str(folder / "one.wav"): 1.5,
        str(folder / "two.wav"): 2.0,
    }
    assert [f.shape[0] for f in frames] == [37, 50]  # the changed file's new frames
    assert len(list(embed_tool.store.frames_dir(out).iterdir())) == 2  # the old ones removed
    with pytest.raises(embed_tool.EmbedError, match="holds embeddings of other weights"):
        embed_tool.embed_files([folder], "random:tiny:1", out, frames=True, progress=False)


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
    a, b = (read_embeddings(tmp_path / f"{d}.parquet").clips for d in ("fp32", "bf16"))
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
        tables[name] = read_embeddings(tmp_path / f"{name}.parquet").clips
    assert np.array_equal(tables["official"], tables["hf"])
    assert np.array_equal(tables["hf"], tables["ours"])
    wav = torch.from_numpy(decode(audio))[None]
    for spec in (official, hf):
        scene = hear.get_scene_embeddings(wav, hear.load_model(str(spec), device="cpu")).numpy()
        assert np.array_equal(scene, tables["official"])  # one embedding path


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
    ok = _cli("embed", "--help")
    assert ok.returncode == 0 and "--dtype" in ok.stdout and "--device" in ok.stdout
    assert _cli("embed").returncode == 2
    bad = _cli(
        "embed", str(tmp_path), "--model", str(tmp_path / "missing.pt"), "--out", "e.parquet"
    )
    assert bad.returncode == 1 and bad.stderr.strip().count("\n") == 0
    assert bad.stderr.startswith("error: model ") and "missing.pt" in bad.stderr


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--device", "gpu"], 1, "error: --device gpu: not a device; use auto, cpu, cuda"),
        (["--device", "cuda:7"], 1, "error: --device cuda:7: "),
        (
            ["--batch-size", "0"],
            2,
            "argument --batch-size: 0: expected a whole number of at least 1",
        ),
        (["--batch-size", "-3"], 2, "argument --batch-size: -3: expected a whole number"),
        (["--decode-threads", "x"], 2, "argument --decode-threads: 'x': expected a whole number"),
    ],
)
def test_bad_options_are_one_line_errors(tmp_path, args, code, message):
    tone(tmp_path / "a.wav", 0.5)
    proc = _cli(
        "embed",
        str(tmp_path / "a.wav"),
        "--model",
        "random:tiny",
        "--out",
        str(tmp_path / "e.parquet"),
        *args,
    )
    assert proc.returncode == code and message in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].count("error") == 1


def test_a_foreign_or_unwritable_out_is_refused_before_any_work(tmp_path):
    tone(tmp_path / "a.wav", 0.5)
    foreign = tmp_path / "other.parquet"
    pq.write_table(pa.table({"x": [1, 2]}), foreign)
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"not parquet at all")
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    for out, message in (
        (foreign, f"error: {foreign}: a Parquet file that embed did not write"),
        (garbage, f"error: {garbage}: not a Parquet file embed can add to"),
        (blocker / "e.parquet", f"error: --out {blocker / 'e.parquet'}: cannot write there"),
    ):
        proc = _cli("embed", str(tmp_path / "a.wav"), "--model", "random:tiny", "--out", str(out))
        assert proc.returncode == 1 and proc.stderr.startswith(message), proc.stderr
        assert proc.stderr.count("\n") == 1
    assert pq.read_table(foreign).column_names == ["x"]  # untouched
    # unwritable: refused before the model loads (it names no model that exists)
    proc = _cli(
        "embed", str(tmp_path), "--model", "nowhere.pt", "--out", str(blocker / "e.parquet")
    )
    assert "cannot write there" in proc.stderr


def test_missing_inputs_and_empty_runs_exit_1_after_the_rest(tmp_path):
    tone(tmp_path / "good" / "a.wav", 0.5)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "b.wav").write_bytes(b"no audio in here")
    out = tmp_path / "e.parquet"
    proc = _cli(
        "embed",
        str(tmp_path / "good"),
        str(tmp_path / "nope.wav"),
        "--model",
        "random:tiny",
        "--out",
        str(out),
        "-q",
    )
    assert proc.returncode == 1
    assert proc.stderr == (
        f"error: 1 named input(s) not found: {tmp_path / 'nope.wav'}; the rest is embedded in {out}\n"
    )
    assert read_embeddings(out).paths == [str(tmp_path / "good" / "a.wav")]
    assert _rejects(out)[str(tmp_path / "nope.wav")] == "no such file or folder"
    empty = tmp_path / "empty.parquet"
    proc = _cli("embed", str(tmp_path / "bad"), "--model", "random:tiny", "--out", str(empty), "-q")
    assert proc.returncode == 1 and proc.stderr.startswith("error: nothing could be embedded")
    assert pq.read_table(empty).num_rows == 0  # written, with the schema
    assert _rejects(empty)[str(tmp_path / "bad" / "b.wav")].startswith("undecodable")


@pytest.mark.parametrize("fmt", ["ogg", "mp3", "wav", "flac"])
def test_a_truncated_file_is_rejected_in_every_format(tmp_path, fmt):
    """One rule: a file that ends before its container says it does is undecodable (the Ogg's
    last page lacks its end-of-stream flag, the MP3's Info header and the WAV's data chunk
    declare more, FLAC fails to decode); the whole file is embedded."""
    codec = {"ogg": ("-c:a", "libvorbis"), "mp3": ("-c:a", "libmp3lame")}.get(fmt, ())
    whole = tone(tmp_path / f"whole.{fmt}", 8.0, extra=codec)
    data = whole.read_bytes()
    (tmp_path / f"cut.{fmt}").write_bytes(data[: len(data) * 6 // 10 // 2 * 2])
    out = tmp_path / "e.parquet"
    summary = embed_tool.embed_files(
        [whole, tmp_path / f"cut.{fmt}"], "random:tiny", out, progress=False
    )
    assert summary.embedded == 1 and read_embeddings(out).paths == [str(whole)]
    reason = _rejects(out)[str(tmp_path / f"cut.{fmt}")]
    assert reason.startswith("undecodable: ") and (
        "truncated" in reason or "decoding errors" in reason
    )


def test_an_interrupted_run_keeps_what_it_says_and_a_rerun_finishes(tmp_path):
    folder = tmp_path / "a"
    for i in range(40):
        tone(folder / f"{i:02d}.wav", 1.0, sample_rate=16000, freq=200.0 + 20 * i)
    out = tmp_path / "e.parquet"
    code = (
        "import sys; from dasheng_pipeline import cli; from dasheng_pipeline.tools import embed; "
        "embed.FLUSH_S = 0.0; sys.exit(cli.main(sys.argv[1:]))"
    )
    args = [
        "embed",
        str(folder),
        "--model",
        "random:tiny",
        "--out",
        str(out),
        "--batch-size",
        "1",
        "-q",
    ]
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stderr=subprocess.PIPE, text=True)
    parts = embed_tool.parts_dir(out)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(parts.glob("part-*.parquet"))) < 2:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    kept = pq.read_table(out).num_rows  # merged into OUT
    assert 2 <= kept < 40 and not parts.exists()
    assert err.strip() == (
        f"interrupted: kept the {kept} files this run finished ({kept} rows in {out}, 0 new "
        "rejects); rerun the same command to continue"
    )
    summary = embed_tool.embed_files([folder], "random:tiny", out, progress=False)
    assert summary.skipped == kept and summary.embedded == 40 - kept and summary.rows == 40
    assert read_embeddings(out).paths == sorted(str(p) for p in folder.glob("*.wav"))


@pytest.mark.slow  # (three runs of the command line)
def test_numerics_portable_is_applied_before_any_tensor_work(tmp_path):
    """--numerics portable (also after the subcommand, or $DASHENG_NUMERICS) caps torch's CPU
    kernels at AVX2: the variables are set before torch chooses (dasheng_model.numerics)."""
    tone(tmp_path / "a.wav", 0.5)
    code = (
        "import sys; from dasheng_pipeline import cli; rc = cli.main(sys.argv[1:]); "
        "import torch; print(rc, torch.backends.cpu.get_cpu_capability())"
    )
    embed = ["embed", str(tmp_path / "a.wav"), "--model", "random:tiny", "-q", "--out"]
    for args, env in (
        (["--numerics", "portable", *embed, str(tmp_path / "a.parquet")], {}),
        ([*embed, str(tmp_path / "b.parquet"), "--numerics", "portable"], {}),
        ([*embed, str(tmp_path / "c.parquet")], {"DASHENG_NUMERICS": "portable"}),
    ):
        proc = subprocess.run(
            [sys.executable, "-c", code, *args],
            capture_output=True,
            text=True,
            env={**os.environ, **env},
        )
        assert proc.stdout.split() in (["0", "AVX2"], ["0", "DEFAULT"]), proc.stderr
    assert _cli("--numerics", "fast", "embed").returncode == 2


def test_every_model_spec_string_embeds(tmp_path, speech_commands):
    """The baseline and HEAR modules take the same spec strings as in the DAG's models: and the
    evaluate command; the project's own HEAR module gives the encoder's bits."""
    words = sorted(p for p in speech_commands.glob("*/*.wav") if "background" not in str(p))
    files = [speech_commands / LONG, *words[:2]]
    got = {}
    for spec in ("random:tiny", "hear:dasheng_model.hear:random:tiny", "logmel"):
        out = tmp_path / f"{spec.replace(':', '_')}.parquet"
        assert (
            cli.main(
                ["embed", *map(str, files), "--model", spec, "--out", str(out), "--frames", "-q"]
            )
            == 0
        )
        got[spec] = read_embeddings(out)
    enc, mod, mel = got.values()
    assert enc.meta["model"] == "random:tiny" and mod.meta["model"].startswith("hear:")
    assert np.array_equal(enc.clips, mod.clips)
    assert all(np.array_equal(a, b) for a, b in zip(enc.frames, mod.frames))
    assert mel.clips.shape == (3, 64) and mel.frames[0].shape == enc.frames[0].shape[:1] + (64,)
    np.testing.assert_allclose(mel.frames.times_ms(1), enc.frames.times_ms(1))
