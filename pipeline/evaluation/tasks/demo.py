"""Demo evaluation tasks in HEAR format, synthesised deterministically (no downloads).

Held out from the demo pre-training audio: clip ``i`` of task stream ``s`` is drawn from
``numpy.random.default_rng([seed, s, i])`` alone, and the pre-training corpus
(``dasheng_pipeline.sources.demo``) uses stream ``CORPUS_STREAM = 0``; every task has its own stream >= 1.

| task | like | classes | clips (scale 1) | split | metrics |
|---|---|---|---|---|---|
| ``demo_pitch`` | NSynth pitch | 24 MIDI notes 48–71 | 288 × 1 s | train/valid/test | pitch_acc, chroma_acc |
| ``demo_timbre`` | instrument family | 5 waveforms (sine, square, saw, …) | 200 × 1 s | 5 new folds | top1_acc |
| ``demo_noise`` | environment texture | 6 (white … brown noise, crackle, hum) | 180 × 1 s | 4 folds | top1_acc |
| ``demo_events`` | DCASE 2016 task 2 | 4 events with known onsets | 60 × 3 s | train/valid/test | onset F |

With ``espeak-ng`` on PATH (a Debian package; optional) three speech tasks are available too:
``demo_keyword`` (10 words, Speech-Commands-like), ``demo_language`` (5 languages reading random
numbers, VoxLingua-like) and ``demo_speaker_count`` (0–3 overlapping voices, LibriCount-like).

Audio is written as 16 kHz 16-bit PCM wav under ``16000/<split>/``; ``task_metadata.json`` also
carries ``domain`` (env/speech/music) and the provenance stamp.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import shutil
import subprocess
import sys
import wave
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dasheng_pipeline.common import atomic, audio, logs, provenance
from dasheng_pipeline.sources import synth
from dasheng_pipeline.sources.demo import CORPUS_STREAM

log = logging.getLogger(__name__)

SR = synth.SR
VERSION = "demo-1"


@dataclass(frozen=True)
class Spec:
    name: str
    stream: int
    domain: str
    embedding_type: str
    split_mode: str
    evaluation: tuple[str, ...]
    labels: tuple[str, ...]
    per_class: int  # clips per class at scale 1 (event tasks: clips in all)
    seconds: float
    nfolds: int = 0
    numeric_labels: bool = False
    needs_espeak: bool = False


PITCHES = tuple(str(n) for n in range(48, 72))
WAVEFORMS = ("sine", "square", "sawtooth", "triangle", "pulse")
TEXTURES = ("white", "pink", "brown", "blue", "crackle", "hum")
EVENTS = ("beep", "chirp", "knock", "noise_burst")
KEYWORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
LANGUAGES = ("en", "de", "fr", "es", "it")
COUNTS = ("0", "1", "2", "3")

SPECS = {
    s.name: s
    for s in (
        Spec(
            "demo_pitch",
            1,
            "music",
            "scene",
            "trainvaltest",
            ("pitch_acc", "chroma_acc"),
            PITCHES,
            12,
            1.0,
            numeric_labels=True,
        ),
        Spec(
            "demo_timbre",
            2,
            "music",
            "scene",
            "new_split_kfold",
            ("top1_acc",),
            WAVEFORMS,
            40,
            1.0,
            nfolds=5,
        ),
        Spec(
            "demo_noise",
            3,
            "env",
            "scene",
            "presplit_kfold",
            ("top1_acc",),
            TEXTURES,
            30,
            1.0,
            nfolds=4,
        ),
        Spec(
            "demo_events",
            4,
            "env",
            "event",
            "trainvaltest",
            ("event_onset_200ms_fms", "segment_1s_er"),
            EVENTS,
            60,
            3.0,
        ),
        Spec(
            "demo_keyword",
            5,
            "speech",
            "scene",
            "trainvaltest",
            ("top1_acc",),
            KEYWORDS,
            16,
            1.0,
            needs_espeak=True,
        ),
        Spec(
            "demo_language",
            6,
            "speech",
            "scene",
            "new_split_kfold",
            ("top1_acc",),
            LANGUAGES,
            24,
            2.0,
            nfolds=3,
            needs_espeak=True,
        ),
        Spec(
            "demo_speaker_count",
            7,
            "speech",
            "scene",
            "trainvaltest",
            ("top1_acc",),
            COUNTS,
            30,
            2.0,
            needs_espeak=True,
        ),
    )
}
assert all(s.stream != CORPUS_STREAM for s in SPECS.values())
SYNTHETIC = tuple(n for n, s in SPECS.items() if not s.needs_espeak)
SPEECH = tuple(n for n, s in SPECS.items() if s.needs_espeak)


def espeak_exe() -> str | None:
    return shutil.which("espeak-ng")


def available(speech: str = "auto") -> list[str]:
    """Demo task names to run: the synthetic ones, plus the speech ones when ``speech`` is
    ``"true"`` (espeak-ng required) or ``"auto"`` and espeak-ng is on PATH."""
    if speech == "true" or (speech == "auto" and espeak_exe()):
        return list(SYNTHETIC + SPEECH)
    return list(SYNTHETIC)


# -- sound makers: rng, label → (samples, events) -------------------------------------------------


def _finish(
    rng: np.random.Generator, x: np.ndarray, low_db: float = 1.0, high_db: float = 20.0
) -> np.ndarray:
    x = synth.normalise(x, -rng.uniform(low_db, high_db))
    return (x + synth.noise_floor(rng, x.size)).astype(np.float32)


def _additive(
    n: int, f0: float, coef: Callable[[int], float], vibrato_hz: float, vibrato_cents: float
) -> np.ndarray:
    t = np.arange(n) / SR
    # instantaneous phase of the fundamental with a slow vibrato
    inst = f0 * 2 ** (vibrato_cents / 1200 * np.sin(2 * np.pi * vibrato_hz * t))
    phase = 2 * np.pi * np.cumsum(inst) / SR
    out = np.zeros(n)
    k = 1
    while k * f0 * 1.02 < SR / 2 and k <= 60:
        c = coef(k)
        if c:
            out += c * np.sin(k * phase)
        k += 1
    return out


WAVE_COEF = {
    "sine": lambda k: 1.0 if k == 1 else 0.0,
    "square": lambda k: 1.0 / k if k % 2 else 0.0,
    "sawtooth": lambda k: (-1) ** (k + 1) / k,
    "triangle": lambda k: (-1) ** ((k - 1) // 2) / k**2 if k % 2 else 0.0,
    "pulse": lambda k: np.sin(np.pi * k * 0.2) / k,
}


def make_pitch(rng: np.random.Generator, label: str, n: int):
    note = int(label)
    f0 = synth.midi_to_hz(note)
    x = synth.harmonic(
        n, f0, int(rng.integers(1, 13)), rng.uniform(0.5, 2.0), rng.uniform(0.3, 3.0)
    )
    x = x * synth.envelope(n, rng.uniform(0.002, 0.05), 0.05)
    return _finish(rng, x), ()


def make_timbre(rng: np.random.Generator, label: str, n: int):
    f0 = synth.midi_to_hz(rng.uniform(40, 84))
    x = _additive(n, f0, WAVE_COEF[label], rng.uniform(3, 7), rng.uniform(0, 30))
    x = x * synth.envelope(n, rng.uniform(0.005, 0.1), rng.uniform(0.02, 0.2))
    return _finish(rng, x), ()


def make_texture(rng: np.random.Generator, label: str, n: int):
    if label in synth.NOISE_COLOURS:
        x = synth.coloured_noise(rng, n, synth.NOISE_COLOURS[label])
    elif label == "crackle":  # sparse random impulses of random sizes (fire, rain on a roof)
        x = np.zeros(n)
        count = int(rng.uniform(20, 120) * n / SR)
        pos = rng.integers(0, n, count)
        x[pos] = rng.standard_normal(count) * rng.uniform(0.2, 1.0, count)
        x = np.convolve(x, np.exp(-np.arange(48) / 8.0), mode="same")
    elif label == "hum":  # mains / engine hum: low harmonic buzz with a slow wobble
        f0 = rng.uniform(40, 130)
        x = _additive(
            n,
            f0,
            lambda k: 1.0 / k ** rng.uniform(0.8, 1.5),
            rng.uniform(0.5, 3),
            rng.uniform(5, 40),
        )
    else:
        raise ValueError(label)
    # a faint background of another colour, so that no class is a pure signal
    colour = list(synth.NOISE_COLOURS)[int(rng.integers(4))]
    bg = synth.coloured_noise(rng, n, synth.NOISE_COLOURS[colour])
    x = synth.normalise(x, 0) + synth.normalise(bg, -rng.uniform(25, 40))
    return _finish(rng, x), ()


def _event_sound(rng: np.random.Generator, label: str, n: int) -> np.ndarray:
    if label == "beep":
        x = synth.tone(n, rng.uniform(500, 2500))
    elif label == "chirp":
        lo = rng.uniform(200, 800)
        x = synth.chirp(n, lo, lo * rng.uniform(3, 8))
    elif label == "knock":
        x = synth.clicks(rng, n, rng.uniform(6, 14), 0.1)
        x = np.convolve(
            x,
            np.sin(2 * np.pi * rng.uniform(150, 400) * np.arange(400) / SR)
            * np.exp(-np.arange(400) / 80),
            "same",
        )
    elif label == "noise_burst":
        x = synth.coloured_noise(rng, n, rng.uniform(-0.5, 1.0))
    else:
        raise ValueError(label)
    return synth.normalise(x, 0) * synth.envelope(n, 0.005, 0.02)


def make_events(rng: np.random.Generator, _label: str, n: int):
    bg = synth.normalise(synth.coloured_noise(rng, n, 1.0), -rng.uniform(30, 40))
    x = bg.copy()
    events = []
    for _ in range(int(rng.integers(1, 4))):
        label = EVENTS[int(rng.integers(len(EVENTS)))]
        length = int(rng.uniform(0.25, 1.0) * SR)
        start = int(rng.integers(0, n - length))
        x[start : start + length] += _event_sound(rng, label, length) * 10 ** (
            -rng.uniform(0, 10) / 20
        )
        events.append(
            {
                "label": label,
                "start": round(1000 * start / SR, 3),
                "end": round(1000 * (start + length) / SR, 3),
            }
        )
    events.sort(key=lambda e: (e["start"], e["label"]))
    return _finish(rng, x, 1.0, 6.0), tuple(events)


# -- espeak-ng speech ------------------------------------------------------------------------------

ESPEAK_VOICES = {
    "en": ("en", "en-us", "en-gb-scotland"),
    "de": ("de",),
    "fr": ("fr",),
    "es": ("es",),
    "it": ("it",),
}
VARIANTS = ("m1", "m2", "m3", "f1", "f2", "f3", "f4")


def _speak(text: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    exe = espeak_exe()
    if exe is None:
        raise RuntimeError(
            "the speech demo tasks need espeak-ng on PATH (Debian: apt-get install espeak-ng)"
        )
    proc = subprocess.run(
        [exe, "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", "--", text],
        capture_output=True,
        check=False,
        timeout=60,
    )
    if proc.returncode != 0 or not proc.stdout:
        raise RuntimeError(
            f"espeak-ng failed for voice {voice!r}: {proc.stderr.decode(errors='replace').strip()}"
        )
    with atomic.atomic_path(_scratch() / "speech.wav") as tmp:
        tmp.write_bytes(proc.stdout)
        samples = audio.decode(tmp)  # the project's one decode path (resamples 22.05 → 16 kHz)
    return samples.astype(np.float64)


@functools.cache
def _scratch() -> Path:
    import tempfile

    return Path(tempfile.mkdtemp(prefix="dasheng-demo-speech-"))


def _voice(rng: np.random.Generator, lang: str = "en") -> tuple[str, int, int]:
    base = ESPEAK_VOICES[lang][int(rng.integers(len(ESPEAK_VOICES[lang])))]
    return (
        f"{base}+{VARIANTS[int(rng.integers(len(VARIANTS)))]}",
        int(rng.integers(120, 220)),
        int(rng.integers(20, 80)),
    )


def _place(rng: np.random.Generator, speech: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros(n)
    speech = speech[:n]
    start = int(rng.integers(0, n - speech.size + 1))
    out[start : start + speech.size] = synth.normalise(speech, 0)
    return out


def make_keyword(rng: np.random.Generator, label: str, n: int):
    voice, speed, pitch = _voice(rng)
    x = _place(rng, _speak(label, voice, speed, pitch), n)
    x += synth.normalise(synth.coloured_noise(rng, n, rng.uniform(0, 2)), -rng.uniform(25, 40))
    return _finish(rng, x), ()


def make_language(rng: np.random.Generator, label: str, n: int):
    voice, speed, pitch = _voice(rng, label)
    text = " ".join(str(int(v)) for v in rng.integers(1, 10000, 3))
    x = _place(rng, _speak(text, voice, speed, pitch), n)
    return _finish(rng, x), ()


def make_speaker_count(rng: np.random.Generator, label: str, n: int):
    x = synth.normalise(synth.coloured_noise(rng, n, 1.0), -40)
    for _ in range(int(label)):
        voice, speed, pitch = _voice(rng)
        word = KEYWORDS[int(rng.integers(len(KEYWORDS)))]
        text = " ".join([word] + [KEYWORDS[int(i)] for i in rng.integers(0, len(KEYWORDS), 2)])
        x += _place(rng, _speak(text, voice, speed, pitch), n) * 10 ** (-rng.uniform(0, 6) / 20)
    return _finish(rng, x), ()


MAKERS = {
    "demo_pitch": make_pitch,
    "demo_timbre": make_timbre,
    "demo_noise": make_texture,
    "demo_events": make_events,
    "demo_keyword": make_keyword,
    "demo_language": make_language,
    "demo_speaker_count": make_speaker_count,
}


# -- writing ---------------------------------------------------------------------------------------


def wav_bytes(samples: np.ndarray) -> bytes:
    """16-bit PCM mono wav at 16 kHz (no metadata, so byte-identical for the same samples)."""
    pcm = (np.clip(samples, -1.0, 1.0) * 32767).round().astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SR)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


def trainvaltest_split(i: int, count: int) -> str:
    """Split of the ``i``-th of ``count`` clips: 60 % train, 20 % valid, 20 % test (at least one each)."""
    n_valid = n_test = max(1, round(0.2 * count))
    if i < count - n_valid - n_test:
        return "train"
    return "valid" if i < count - n_test else "test"


def assign_splits(spec: Spec, labels: list[str]) -> list[str]:
    """Split of each clip, stratified by class (clip order is class-interleaved)."""
    count = {label: labels.count(label) for label in set(labels)}
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        i = seen.get(label, 0)
        seen[label] = i + 1
        if spec.split_mode == "trainvaltest":
            out.append(trainvaltest_split(i, count[label]))
        else:
            out.append(f"fold{i % spec.nfolds:02d}")
    return out


def clip_plan(spec: Spec, scale: float) -> list[str]:
    """The label of each clip index (events: a placeholder, the events are drawn per clip)."""
    if spec.embedding_type == "event":
        return ["events"] * max(10, int(round(spec.per_class * scale)))
    per_class = max(spec.nfolds or 5, int(round(spec.per_class * scale)))
    return [label for _ in range(per_class) for label in spec.labels]


def split_names(spec: Spec) -> list[str]:
    if spec.split_mode == "trainvaltest":
        return ["train", "valid", "test"]
    return [f"fold{i:02d}" for i in range(spec.nfolds)]


def _write_clips(spec: Spec, out: Path, seed: int, plan: list[str]) -> dict[str, dict]:
    """Synthesise every clip of the plan into ``16000/<split>/``; returns each split's labels."""
    from tqdm import tqdm

    splits_of = (
        assign_splits(spec, plan) if spec.embedding_type == "scene" else _event_splits(len(plan))
    )
    n = int(round(spec.seconds * SR))
    contents: dict[str, dict] = {s: {} for s in split_names(spec)}
    for index, (label, split) in enumerate(
        tqdm(
            list(zip(plan, splits_of)), desc=spec.name, unit="clip", file=sys.stdout, mininterval=5
        )
    ):
        rng = np.random.default_rng([seed, spec.stream, index])
        samples, events = MAKERS[spec.name](rng, label, n)
        fname = f"{spec.name}-{index:05d}.wav"
        atomic.write_bytes(out / str(SR) / split / fname, wav_bytes(samples))
        if spec.embedding_type == "event":
            contents[split][fname] = list(events)
        else:
            contents[split][fname] = [int(label) if spec.numeric_labels else label]
    return contents


def _metadata(spec: Spec, clips: int, stamp: dict) -> dict:
    meta = {
        "task_name": spec.name,
        "version": VERSION,
        "mode": "full",
        "embedding_type": spec.embedding_type,
        "prediction_type": "multilabel" if spec.embedding_type == "event" else "multiclass",
        "split_mode": spec.split_mode,
        "sample_duration": spec.seconds,
        "evaluation": list(spec.evaluation),
        "splits": split_names(spec),
        "domain": spec.domain,
        "clips": clips,
        "provenance": stamp,
    }
    if spec.nfolds:
        meta["nfolds"] = spec.nfolds
    return meta


def generate(
    name: str, out: str | Path, seed: int, scale: float, params: dict | None = None
) -> dict:
    """Write task ``name`` to folder ``out``; returns its metadata (``params``: what the
    provenance stamp hashes, the job's params; by default the DAG's)."""
    if name not in SPECS:
        raise ValueError(f"unknown demo task {name!r}; expected one of {sorted(SPECS)}")
    spec = SPECS[name]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plan = clip_plan(spec, scale)
    contents = _write_clips(spec, out, seed, plan)
    for split, mapping in contents.items():
        atomic.write_json(out / f"{split}.json", mapping)
    with atomic.atomic_open(out / "labelvocabulary.csv", "w", encoding="utf-8", newline="") as fh:
        fh.write("idx,label\n" + "".join(f"{i},{label}\n" for i, label in enumerate(spec.labels)))
    if params is None:
        params = {"seed": seed, "demo_tasks": {"scale": scale}}
    stamp = provenance.stamp(params, seed, audio.versions())
    meta = _metadata(spec, len(plan), stamp)
    atomic.write_json(out / "task_metadata.json", meta)
    log.info(
        f"{name}: {len(plan)} clips of {spec.seconds:g} s, {len(spec.labels)} labels, splits "
        + ", ".join(f"{s} {len(contents[s])}" for s in meta["splits"])
    )
    return meta


XARES_SUFFIX = "_xares"


def xares_config(name: str, path: str) -> dict:
    """The ``evaluation.tasks`` entry (format xares) of demo task ``name`` packed by :func:`generate_xares`."""
    spec = SPECS[name]
    cfg = {
        "path": path,
        "label": "label",
        "kind": "frame" if spec.embedding_type == "event" else "multiclass",
        "domain": spec.domain,
    }
    if spec.split_mode == "trainvaltest":
        cfg["splits"] = {s: f"wds-audio-{s}" for s in ("train", "valid", "test")}
    else:
        cfg["folds"] = list(range(spec.nfolds))
    return cfg


def generate_xares(
    name: str, out: str | Path, seed: int, scale: float, params: dict | None = None
) -> list[Path]:
    """Demo task ``name`` as an X-ARES task: webdataset shards in ``out`` (``wds-audio-fold-<k>-000000.tar``
    or ``wds-audio-<split>-000000.tar``), each sample a wav and a json ``{"label": ...}`` (events:
    ``{"label": [{onset, offset, label}, ...]}`` in seconds). The same clips as the HEAR demo task."""
    from dasheng_pipeline.evaluation.tasks import xares

    out = Path(out)
    hear_dir = out / ".hear"
    meta = generate(name, hear_dir, seed, scale, params)
    written = []
    for split in meta["splits"]:
        labels = json.loads((hear_dir / f"{split}.json").read_text(encoding="utf-8"))
        samples = []
        for fname, value in sorted(labels.items()):
            if meta["embedding_type"] == "event":
                value = [
                    {"onset": ev["start"] / 1000, "offset": ev["end"] / 1000, "label": ev["label"]}
                    for ev in value
                ]
            else:
                value = value[0]
            data = (hear_dir / str(SR) / split / fname).read_bytes()
            samples.append((Path(fname).stem, "wav", data, {"label": value}))
        stem = (
            f"wds-audio-fold-{int(split[4:])}-*.tar"
            if split.startswith("fold")
            else f"wds-audio-{split}-*.tar"
        )
        written += xares.write_shards(samples, out / stem)
    shutil.rmtree(hear_dir)
    log.info(f"{name}: X-ARES shards in {out}: {', '.join(p.name for p in written)}")
    return written


def _event_splits(count: int) -> list[str]:
    return [trainvaltest_split(i, count) for i in range(count)]


def main(argv: list[str] | None = None) -> None:
    parser = logs.entry_parser("dasheng_pipeline.evaluation.tasks.demo", __doc__)
    parser.add_argument("--task", required=True, choices=sorted(SPECS))
    parser.add_argument("--params", required=True, help="JSON: seed, demo_tasks (scale, speech)")
    parser.add_argument("--out", required=True, help="task folder to write")
    parser.add_argument(
        "--xares", action="store_true", help="write X-ARES-format shards instead of a HEAR folder"
    )
    args = parser.parse_args(argv)
    logs.setup()
    params = json.loads(args.params)
    make = generate_xares if args.xares else generate
    make(args.task, args.out, int(params["seed"]), float(params["demo_tasks"]["scale"]), params)


if __name__ == "__main__":
    main()
