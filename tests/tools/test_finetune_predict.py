"""``finetune`` and ``predict`` on small generated data with ``random:tiny`` (real ffmpeg decoding,
real Parquet cache, real training): tones and noise are easy to tell apart even with random weights.

The frozen modes' embedding cache lives in one temporary folder for the module (``DASHENG_CACHE_DIR``),
so the runs here share it as two runs on one machine would, and nothing lands in ``~/.cache``."""

from __future__ import annotations

import csv
import dataclasses
import json
import threading
import wave
from pathlib import Path

import numpy as np
import pytest

from dasheng_pipeline import cli
from dasheng_pipeline.tools.embed import Model
from dasheng_pipeline.tools.finetune import (
    FinetuneError,
    finetune,
    read_data,
    split_folds,
    split_once,
)
from dasheng_pipeline.tools.finetune.features import ENV, cache_key, frozen_features
from dasheng_pipeline.tools.predict import predict

SR = 16000
MODEL = "random:tiny"


def write_wav(path: Path, x: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SR)
        w.writeframes((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def clip(kind: str, i: int, seconds: float = 0.5) -> np.ndarray:
    rng = np.random.default_rng(i)
    t = np.arange(int(seconds * SR)) / SR
    if kind == "noise":
        return 0.3 * rng.standard_normal(t.size)
    f0 = {"low": 200.0, "high": 3000.0}[kind] * (1 + 0.05 * i)
    return 0.5 * np.sin(2 * np.pi * f0 * t) + 0.01 * rng.standard_normal(t.size)


KINDS = ("high", "low", "noise")


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory) -> Path:
    """The embedding cache every run of this module shares."""
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ENV, str(root))
        yield root


@pytest.fixture(scope="module")
def words(tmp_path_factory) -> Path:
    """DATA as a folder of class folders: 3 classes × 6 clips, a broken file, and a ``_noise_``
    folder that is no class."""
    root = tmp_path_factory.mktemp("data") / "words"
    for kind in KINDS:
        for i in range(6):
            write_wav(root / kind / f"{i}.wav", clip(kind, i))
    (root / "low" / "broken.wav").write_bytes(b"RIFF not audio at all")
    write_wav(root / "_noise_" / "long.wav", clip("noise", 99, 2.0))
    return root


@pytest.fixture(scope="module")
def mlp(words, tmp_path_factory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("mlp") / "clf"
    return out, finetune(words, MODEL, out, mode="mlp", epochs=40, seed=0, progress=False)


def rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_mlp_beats_chance_writes_the_classifier_and_a_rerun_reuses_the_cache(mlp, words, caplog):
    out, result = mlp
    assert result.classes == 3 and result.examples == 18 and result.rejected == 1
    assert result.test >= 0.9 > result.chance == pytest.approx(1 / 3)
    for name in (
        "classifier.safetensors",
        "classifier.json",
        "metrics.json",
        "per_class.csv",
        "confusion.png",
        "curve.csv",
        "curve.png",
        "splits.csv",
        "rejects.csv",
    ):
        assert (out / name).is_file(), name
    assert not (out / "embeddings.parquet").exists()  # the embeddings are in the shared cache
    meta = json.loads((out / "classifier.json").read_text())
    assert meta["labels"] == list(KINDS) and meta["mode"] == "mlp" and not meta["multilabel"]
    assert meta["model"]["spec"] == MODEL and len(meta["model"]["sha256"]) == 64
    assert meta["head"]["hidden_layers"] == 1 and meta["provenance"]["seed"] == 0
    assert [r["item"] for r in rows(out / "rejects.csv")] == [str(words / "low" / "broken.wav")]
    per_class = rows(out / "per_class.csv")
    assert [r["label"] for r in per_class] == list(KINDS) and all(
        r["examples"] == "6" for r in per_class
    )
    curve = rows(out / "curve.csv")
    assert curve and set(curve[0]) == {"epoch", "train_loss", "valid_loss", "valid_accuracy"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["folds"][0]["counts"] == {
        "train": 12,
        "valid": 3,
        "test": 3,
    }  # stratified 0.15/0.15

    before = (out / "metrics.json").read_bytes(), (out / "classifier.safetensors").read_bytes()
    caplog.set_level("INFO")
    finetune(words, MODEL, out, mode="mlp", epochs=40, seed=0, progress=False)
    assert "embedded 0 files" in caplog.text  # the cached embeddings were reused
    assert (
        (out / "metrics.json").read_bytes(),
        (out / "classifier.safetensors").read_bytes(),
    ) == before


def test_predict_writes_top_k_rows_and_rejects_bad_files(mlp, words, tmp_path):
    out, _ = mlp
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"")
    summary = predict(
        [words / "high", bad, tmp_path / "missing.flac"],
        out,
        tmp_path / "tags.csv",
        top_k=2,
        progress=False,
    )
    assert (summary.files, summary.rows, summary.rejected) == (6, 12, 2)
    tags = rows(tmp_path / "tags.csv")
    assert list(tags[0]) == ["path", "rank", "label", "score"]
    firsts = [r for r in tags if r["rank"] == "1"]
    assert len(firsts) == 6 and sum(r["label"] == "high" for r in firsts) >= 5
    for a, b in zip(tags[::2], tags[1::2]):
        assert (
            a["path"] == b["path"]
            and (a["rank"], b["rank"]) == ("1", "2")
            and float(a["score"]) >= float(b["score"])
        )
    assert {r["path"] for r in rows(tmp_path / "tags.rejects.csv")} == {
        str(bad),
        str(tmp_path / "missing.flac"),
    }

    test = {r["path"]: r["label"] for r in rows(out / "splits.csv") if r["split"] == "test"}
    predict(list(test), out, tmp_path / "test.csv", top_k=1, progress=False)
    hits = [test[r["path"]] == r["label"] for r in rows(tmp_path / "test.csv")]
    assert len(hits) == 3 and np.mean(hits) == pytest.approx(
        mlp[1].test
    )  # predict agrees with finetune's score


def test_folds_pool_out_of_fold_predictions_from_the_shared_cache(mlp, words, tmp_path, caplog):
    """``linear`` after ``mlp``, into another OUT: the embeddings come from the shared cache."""
    out, first = mlp
    assert (first.embedded, first.cached) == (18, 0)  # mlp filled the cache (and rejected 1)
    caplog.set_level("INFO")
    result = finetune(words, MODEL, tmp_path, mode="linear", folds=3, epochs=30, progress=False)
    assert (result.embedded, result.cached) == (0, 19)  # 18 rows and the broken file's reject
    assert result.rejected == 1 and "embedded 0 files" in caplog.text
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for fold in metrics["folds"]:  # the note on a best last epoch, exactly for the folds it fits
        note = f"fold {fold['fold']}: the best epoch is the last one"
        assert (note in caplog.text) == (fold["best_epoch"] == fold["epochs_run"])
    assert len(metrics["test"]["folds"]) == 3 and result.test_std is not None and result.test >= 0.8
    assert metrics["scored_examples"] == 18  # every example tested once
    assert sorted(r["test_fold"] for r in rows(tmp_path / "splits.csv")) == sorted("012" * 6)
    assert sum(int(r["scored"]) for r in rows(tmp_path / "per_class.csv")) == 18


def test_a_best_last_epoch_is_logged_with_a_hint(mlp, words, tmp_path, caplog):
    caplog.set_level("INFO")
    result = finetune(words, MODEL, tmp_path, mode="linear", epochs=1, progress=False)
    assert result.best_epoch == 1 and result.embedded == 0  # the shared cache again
    assert "fold 0: the best epoch is the last one (1 of 1)" in caplog.text
    assert "try more epochs (--epochs)" in caplog.text


def test_two_runs_sharing_a_cache_take_turns(words, tmp_path):
    """Two runs on the same files at once: one embeds, the other waits and reads its rows."""
    model = Model.load(MODEL)
    start = threading.Barrier(2)
    got = []

    def run() -> None:
        data = read_data(words)
        start.wait()
        x, use = frozen_features(data, model, 8, False, tmp_path)
        got.append((x, use, [e.item.path for e in data.examples], data.rejects))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    (x0, use0, paths0, rejects0), (x1, use1, paths1, rejects1) = got
    assert sorted([use0.embedded, use1.embedded]) == [0, 18] and use0.folder == use1.folder
    assert np.array_equal(x0, x1) and x0.shape[0] == 18 and paths0 == paths1
    assert rejects0 == rejects1 and [r[0] for r in rejects0] == [str(words / "low" / "broken.wav")]
    left = sorted(p.name for p in use0.folder.iterdir())
    assert left == [".lock", "embeddings.parquet", "embeddings.rejects.csv", "key.json"]


def test_the_cache_key_follows_files_weights_and_settings(words, tmp_path):
    items = [e.item for e in read_data(words).examples]
    tiny, other = Model.load(MODEL), Model.load(MODEL + ":1")
    key = cache_key(items, tiny, 8)[0]
    assert cache_key(list(items), Model.load(MODEL), 8)[0] == key  # the same again
    touched = [dataclasses.replace(items[0], mtime_ns=items[0].mtime_ns + 1), *items[1:]]
    changed = [
        cache_key(touched, tiny, 8),  # a file modified
        cache_key(items[::-1], tiny, 8),  # another order: other batches, other rounding
        cache_key(items, other, 8),  # other weights
        cache_key(items, tiny, 4),  # other batches
        cache_key(items, Model.load(MODEL, dtype="bf16"), 8),
    ]
    assert len({key} | {k for k, _ in changed}) == 6


def test_full_mode_trains_the_encoder_and_predict_uses_it_per_chunk(words, tmp_path):
    out = tmp_path / "full"
    result = finetune(
        words, MODEL, out, mode="full", epochs=2, batch_size=4, mixup=0.2, progress=False
    )
    assert result.mode == "full" and result.test is not None and len(rows(out / "curve.csv")) == 2
    for name in (
        "classifier.safetensors",
        "classifier.json",
        "metrics.json",
        "per_class.csv",
        "confusion.png",
        "curve.png",
    ):
        assert (out / name).is_file(), name
    assert not (out / "embeddings.parquet").exists()
    from safetensors import safe_open

    with safe_open(str(out / "classifier.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "encoder.blocks.0.attn.qkv.weight" in keys and "head.mean" in keys
    long = write_wav(
        tmp_path / "long.wav", np.concatenate([clip("low", 1, 10.5), clip("noise", 2, 2.0)])
    )
    summary = predict([long], out, tmp_path / "chunks.csv", top_k=1, chunks=True, progress=False)
    tags = rows(tmp_path / "chunks.csv")
    assert summary.rows == 2 and [r["chunk"] for r in tags] == ["0", "1"]
    assert [(r["start_s"], r["end_s"]) for r in tags] == [("0.00", "10.08"), ("10.08", "12.50")]


def test_multilabel_csv_gives_map(tmp_path):
    data = tmp_path / "tags.csv"
    lines = ["path,label,split"]
    for i in range(12):
        kinds = [("low",), ("high",), ("low", "noise"), ("high", "noise")][i % 4]
        x = sum(clip(k, i) for k in kinds)
        write_wav(tmp_path / "audio" / f"{i}.wav", x)
        lines.append(
            f"audio/{i}.wav,{';'.join(kinds)},{'train' if i < 8 else 'valid' if i < 10 else 'test'}"
        )
    lines += ["audio/missing.wav,low,train", "audio/0.wav,low,train", "audio/1.wav,low,holdout"]
    data.write_text("\n".join(lines) + "\n")
    result = finetune(data, MODEL, tmp_path / "out", mode="linear", epochs=30, progress=False)
    assert (
        result.metric == "mAP"
        and result.examples == 12
        and result.rejected == 3
        and result.test > 0.5
    )
    assert (tmp_path / "out" / "per_class_ap.png").is_file() and not (
        tmp_path / "out" / "confusion.png"
    ).exists()
    assert list(rows(tmp_path / "out" / "per_class.csv")[0]) == [
        "label",
        "examples",
        "scored_positives",
        "ap",
    ]
    reasons = " | ".join(r["reason"] for r in rows(tmp_path / "out" / "rejects.csv"))
    assert "no such file" in reasons and "listed twice" in reasons and "split 'holdout'" in reasons
    assert json.loads((tmp_path / "out" / "classifier.json").read_text())["multilabel"] is True


def test_tiny_classes_fall_back_to_a_per_class_split():
    keys = ["a"] + ["b"] * 2 + ["c"] * 3 + ["d"] * 4 + ["e"] * 10
    assign = split_once(keys, 0.15, 0.15, seed=0)
    by = {k: sorted(assign[i] for i in range(len(keys)) if keys[i] == k) for k in "abcde"}
    assert (
        by["a"] == ["train"]
        and by["b"] == ["test", "train"]
        and by["c"] == ["test", "train", "train"]
    )
    assert by["d"] == ["test", "train", "train", "valid"]
    assert (
        by["e"].count("train") == 6 and by["e"].count("test") == 2 and by["e"].count("valid") == 2
    )
    assert list(split_once(keys, 0.15, 0.15, seed=0)) == list(assign)  # the seed decides
    folds = split_folds(["x"] * 4 + ["y"] * 5, 3, seed=1)
    assert (
        all((f == "test").sum() >= 2 for f in folds)
        and sum((f == "test") for f in folds).tolist() == [1] * 9
    )


def test_cli_cache_dir_puts_the_embeddings_there(words, tmp_path):
    args = ["-q", "finetune", str(words), "--model", MODEL, "--out", str(tmp_path / "o")]
    args += ["--mode", "linear", "--epochs", "1", "--cache-dir", str(tmp_path / "c")]
    assert cli.main(args) == 0
    (key,) = (tmp_path / "c" / "embeddings").iterdir()
    assert (key / "key.json").is_file() and list(key.glob("*.parquet"))


def test_cli_bad_data_exits_1_with_one_line(tmp_path, capsys):
    assert (
        cli.main(
            [
                "-q",
                "finetune",
                str(tmp_path / "nope"),
                "--model",
                MODEL,
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 1
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: DATA") and "one subfolder per class" in err and "\n" not in err
    write_wav(tmp_path / "one" / "only" / "a.wav", clip("low", 0))
    assert (
        cli.main(
            [
                "-q",
                "finetune",
                str(tmp_path / "one"),
                "--model",
                MODEL,
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 1
    )
    assert "at least 2" in capsys.readouterr().err
    assert (
        cli.main(
            [
                "-q",
                "predict",
                str(tmp_path),
                "--classifier",
                str(tmp_path),
                "--out",
                str(tmp_path / "t.csv"),
            ]
        )
        == 1
    )
    assert "written by finetune" in capsys.readouterr().err
    with pytest.raises(FinetuneError, match="--folds 1"):
        finetune(tmp_path / "one", MODEL, tmp_path / "o", folds=1)


@pytest.mark.slow
def test_speech_commands_words(speech_commands, tmp_path):
    """The real fixture: 35 word folders of 1-3 clips; _background_noise_ is no class."""
    result = finetune(speech_commands, MODEL, tmp_path, mode="mlp", progress=False)
    labels = json.loads((tmp_path / "classifier.json").read_text())["labels"]
    assert len(labels) == 35 and "_background_noise_" not in labels and result.examples == 77
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    # too few clips to stratify: 13 one-clip words only train, 2-clip words train + test, 3-clip words 2 + test
    assert metrics["folds"][0]["counts"] == {"train": 55, "valid": 0, "test": 22}
    assert (
        metrics["folds"][0]["best_epoch"] == metrics["folds"][0]["epochs_run"] == 100
    )  # no validation: the last
    assert metrics["chance"] == pytest.approx(1 / 35)
