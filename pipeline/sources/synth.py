"""Deterministic synthetic sounds (numpy only), the material of the demo corpus and of the
demo evaluation tasks.

Every generator takes a ``numpy.random.Generator`` and returns float32 mono samples at
16 kHz; the same generator state gives the same samples on every machine.
"""

from __future__ import annotations

import numpy as np

SR = 16000
FAMILIES = (
    "tone",
    "harmonic",
    "chirp",
    "noise",
    "clicks",
    "am",
    "fm",
    "melody",
    "chords",
    "babble",
    "scene",
    "mixture",
)
# Major and minor scales (semitones above the tonic) for melodies and chords.
SCALES = ((0, 2, 4, 5, 7, 9, 11), (0, 2, 3, 5, 7, 8, 10))
NOISE_COLOURS = {"white": 0.0, "pink": 1.0, "brown": 2.0, "blue": -1.0}


def midi_to_hz(note: float) -> float:
    return 440.0 * 2.0 ** ((note - 69) / 12)


def _time(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.float64) / SR


def envelope(n: int, attack_s: float, release_s: float) -> np.ndarray:
    """Linear attack, flat sustain, linear release."""
    env = np.ones(n)
    a = min(n, max(1, int(attack_s * SR)))
    r = min(n - a, max(1, int(release_s * SR)))
    env[:a] = np.linspace(0.0, 1.0, a, endpoint=False)
    if r > 0:
        env[n - r :] = np.linspace(1.0, 0.0, r)
    return env


def tone(n: int, freq: float, phase: float = 0.0) -> np.ndarray:
    return np.sin(2 * np.pi * freq * _time(n) + phase)


def harmonic(n: int, f0: float, n_harmonics: int, rolloff: float, decay_s: float) -> np.ndarray:
    """A plucked/struck note: harmonics with 1/k**rolloff amplitudes and exponential decay."""
    t = _time(n)
    out = np.zeros(n)
    for k in range(1, n_harmonics + 1):
        if k * f0 >= SR / 2:
            break
        out += np.sin(2 * np.pi * k * f0 * t) * k**-rolloff * np.exp(-t * k / (decay_s * 2))
    return out * np.exp(-t / decay_s)


def chirp(n: int, f_start: float, f_end: float) -> np.ndarray:
    """Exponential sweep from f_start to f_end over the clip."""
    t = _time(n)
    duration = max(t[-1], 1.0 / SR)
    k = np.log(f_end / f_start) / duration
    return np.sin(2 * np.pi * f_start * (np.exp(k * t) - 1) / k)


def coloured_noise(rng: np.random.Generator, n: int, exponent: float) -> np.ndarray:
    """Noise with a 1/f**exponent power spectrum (0 white, 1 pink, 2 brown, -1 blue)."""
    spectrum = rng.standard_normal(n // 2 + 1) + 1j * rng.standard_normal(n // 2 + 1)
    freqs = np.fft.rfftfreq(n, 1 / SR)
    freqs[0] = freqs[1] if n > 1 else 1.0
    spectrum *= freqs ** (-exponent / 2)
    out = np.fft.irfft(spectrum, n)
    return out / (np.abs(out).max() + 1e-12)


def clicks(rng: np.random.Generator, n: int, rate_hz: float, jitter: float) -> np.ndarray:
    """A click train (short decaying bursts) at ``rate_hz`` with relative timing jitter."""
    out = np.zeros(n)
    click = np.exp(-np.arange(int(0.004 * SR)) / (0.0008 * SR)) * rng.choice(
        [-1.0, 1.0], int(0.004 * SR)
    )
    period = SR / rate_hz
    pos = rng.uniform(0, period)
    while pos < n:
        i = int(pos)
        seg = click[: n - i]
        out[i : i + seg.size] += seg
        pos += period * (1 + rng.uniform(-jitter, jitter))
    return out


def am(n: int, carrier: float, mod_hz: float, depth: float) -> np.ndarray:
    return (1 - depth / 2 + depth / 2 * np.sin(2 * np.pi * mod_hz * _time(n))) * tone(n, carrier)


def fm(n: int, carrier: float, mod_hz: float, index: float) -> np.ndarray:
    t = _time(n)
    return np.sin(2 * np.pi * carrier * t + index * np.sin(2 * np.pi * mod_hz * t))


def _segments(
    rng: np.random.Generator, n: int, min_s: float, max_s: float
) -> list[tuple[int, int]]:
    """Consecutive (start, end) sample ranges of random lengths covering ``n`` samples."""
    out, start = [], 0
    while start < n:
        end = min(n, start + max(1, int(rng.uniform(min_s, max_s) * SR)))
        out.append((start, end))
        start = end
    return out


def melody(rng: np.random.Generator, n: int) -> np.ndarray:
    """Notes of a random scale, one after another, with one harmonic timbre (music-like)."""
    tonic, scale = int(rng.integers(45, 70)), SCALES[int(rng.integers(len(SCALES)))]
    harmonics, rolloff, decay = (
        int(rng.integers(2, 12)),
        rng.uniform(0.6, 2.0),
        rng.uniform(0.2, 1.5),
    )
    out = np.zeros(n)
    for start, end in _segments(rng, n, 0.12, 0.6):
        note = tonic + scale[int(rng.integers(len(scale)))] + 12 * int(rng.integers(-1, 2))
        m = end - start
        out[start:end] = harmonic(m, midi_to_hz(note), harmonics, rolloff, decay) * envelope(
            m, 0.005, 0.03
        )
    return out


def chords(rng: np.random.Generator, n: int) -> np.ndarray:
    """Three- or four-note chords of a random scale, changing every 0.4-1.5 s."""
    tonic, scale = int(rng.integers(40, 64)), SCALES[int(rng.integers(len(SCALES)))]
    out = np.zeros(n)
    for start, end in _segments(rng, n, 0.4, 1.5):
        root = int(rng.integers(len(scale)))
        m = end - start
        for k in range(int(rng.integers(3, 5))):
            step = root + 2 * k
            note = tonic + scale[step % len(scale)] + 12 * (step // len(scale))
            out[start:end] += harmonic(m, midi_to_hz(note), 6, 1.2, 2.0) * envelope(m, 0.01, 0.05)
    return out


def babble(rng: np.random.Generator, n: int) -> np.ndarray:
    """Speech-like sound: a glottal pulse train with a wandering pitch, shaped by vowel formants
    that change every syllable (0.08-0.3 s), with short unvoiced gaps."""
    t = _time(n)
    f0 = rng.uniform(90, 240) * (
        1 + 0.15 * np.sin(2 * np.pi * rng.uniform(0.5, 3) * t + rng.uniform(0, 6))
    )
    phase = 2 * np.pi * np.cumsum(f0) / SR
    source = sum(np.sin(k * phase) / k for k in range(1, 30))  # sawtooth-like pulse train
    out = np.zeros(n)
    for start, end in _segments(rng, n, 0.08, 0.3):
        if rng.random() < 0.15:
            continue  # a pause between syllables
        f1, f2, f3 = rng.uniform(300, 900), rng.uniform(900, 2500), rng.uniform(2400, 3500)
        seg = source[start:end]
        spec = np.fft.rfft(seg)
        f = np.fft.rfftfreq(seg.size, 1 / SR)
        gain = sum(np.exp(-0.5 * ((f - fc) / (fc * 0.12)) ** 2) for fc in (f1, f2, f3))
        out[start:end] = np.fft.irfft(spec * gain, seg.size) * envelope(seg.size, 0.01, 0.02)
    return out


def scene(rng: np.random.Generator, n: int) -> np.ndarray:
    """An environment-like scene: a coloured-noise background with sparse short events."""
    colour = list(NOISE_COLOURS)[int(rng.integers(len(NOISE_COLOURS)))]
    out = normalise(coloured_noise(rng, n, NOISE_COLOURS[colour]), -rng.uniform(10, 25))
    for _ in range(int(rng.integers(2, 8))):
        m = int(rng.uniform(0.05, 0.5) * SR)
        if m >= n:
            continue
        start = int(rng.integers(0, n - m))
        kind = rng.integers(3)
        if kind == 0:
            event = tone(m, rng.uniform(300, 4000))
        elif kind == 1:
            event = chirp(m, rng.uniform(200, 1000), rng.uniform(1500, 6000))
        else:
            event = coloured_noise(rng, m, rng.uniform(-1, 2))
        out[start : start + m] += event * envelope(m, 0.003, m / SR / 3)
    return out


def normalise(x: np.ndarray, peak_dbfs: float) -> np.ndarray:
    return x / (np.abs(x).max() + 1e-12) * 10 ** (peak_dbfs / 20)


def _tone(rng: np.random.Generator, n: int) -> np.ndarray:
    return tone(n, rng.uniform(80, 4000), rng.uniform(0, 2 * np.pi)) * envelope(n, 0.02, 0.05)


def _harmonic(rng: np.random.Generator, n: int) -> np.ndarray:
    return harmonic(
        n,
        midi_to_hz(rng.integers(36, 96)),
        int(rng.integers(3, 16)),
        rng.uniform(0.5, 2.0),
        rng.uniform(0.3, 3.0),
    )


def _chirp(rng: np.random.Generator, n: int) -> np.ndarray:
    lo, hi = sorted(rng.uniform(60, 7000, 2))
    f0, f1 = (lo, hi) if rng.random() < 0.5 else (hi, lo)
    return chirp(n, f0, f1) * envelope(n, 0.02, 0.05)


def _noise(rng: np.random.Generator, n: int) -> np.ndarray:
    colour = list(NOISE_COLOURS)[int(rng.integers(len(NOISE_COLOURS)))]
    return coloured_noise(rng, n, NOISE_COLOURS[colour])


def _clicks(rng: np.random.Generator, n: int) -> np.ndarray:
    return clicks(rng, n, rng.uniform(2, 40), rng.uniform(0, 0.3))


def _am(rng: np.random.Generator, n: int) -> np.ndarray:
    return am(n, rng.uniform(150, 3000), rng.uniform(2, 30), rng.uniform(0.5, 1.0))


def _fm(rng: np.random.Generator, n: int) -> np.ndarray:
    return fm(n, rng.uniform(150, 3000), rng.uniform(2, 200), rng.uniform(0.5, 8.0))


def _mixture(rng: np.random.Generator, n: int) -> np.ndarray:
    """Two or three sounds of the other families, each at a random level."""
    parts = rng.choice(
        [f for f in FAMILIES if f != "mixture"], size=int(rng.integers(2, 4)), replace=False
    )
    return sum(normalise(render(rng, str(p), n), -rng.uniform(0, 12)) for p in parts)


# Each family's generator: its parameters drawn from the rng, in a fixed order (the demo's
# audio, and so its shards, depend on that order).
_GENERATORS = {
    "tone": _tone,
    "harmonic": _harmonic,
    "chirp": _chirp,
    "noise": _noise,
    "clicks": _clicks,
    "am": _am,
    "fm": _fm,
    "melody": melody,
    "chords": chords,
    "babble": babble,
    "scene": scene,
    "mixture": _mixture,
}


def render(rng: np.random.Generator, family: str, n: int) -> np.ndarray:
    """A random sound of one family (its parameters drawn from ``rng``), peak 1."""
    generate = _GENERATORS.get(family)
    if generate is None:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    x = generate(rng, n)
    return x / (np.abs(x).max() + 1e-12)


def noise_floor(rng: np.random.Generator, n: int, dbfs: float = -70.0) -> np.ndarray:
    """A faint white floor so that no synthetic clip is digitally silent."""
    return rng.standard_normal(n) * 10 ** (dbfs / 20)
