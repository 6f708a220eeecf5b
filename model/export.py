"""Writing an encoder in every format it is read in, and as an ONNX graph.

    from dasheng_model.export import export_model
    export_model("dasheng_base.pt", "onnx", "dasheng_base.onnx")        # log-mel inside the graph
    export_model("dasheng_base.pt", "onnx", "mel.onnx", front_end=False)  # dB log-mel in
    export_model("mispeech/dasheng-base", "official", "dasheng_base.pt")  # the official .pt
    export_model("encoder.safetensors", "hf", "dasheng-hf/")               # the Hugging Face layout
    export_model("dasheng_base.pt", "ours", "encoder.safetensors")        # this project's format

The model is any spec of :mod:`dasheng_model.pretrained` (or a ``DashengEncoder``). Every target
records provenance where its format has room for it: the export's stamp plus the source's spec,
its sha256 and the provenance stored with it (so a chain of conversions keeps the training run's
stamp): ours in the safetensors metadata and the ``.json`` sidecar, the Hugging Face layout under
``dasheng_pipeline`` in ``config.json``, the official ``.pt`` as a ``provenance`` entry beside
``model`` and ``config`` (the official loader reads only those two), ONNX in the model's
``metadata_props["dasheng"]``.

ONNX: the encoder on one window of up to 10.08 s (252 tokens), batch and time axes dynamic.
Input ``waveform`` (batch, samples ≤ 161 280) float32 at 16 kHz with the front end in the graph
(STFT, mel filterbank, per-clip dB clamp), or ``mel`` (batch, 64, frames ≤ 1008) dB log-mel
without it; output ``embeddings`` (batch, tokens, D) at 25 Hz. Longer audio: run 10.08 s windows
(the PyTorch model does the same on the token sequence). All items of a batch have one length.
The ``export`` extra (onnx, onnxscript, onnxruntime) is imported only here, on first use.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
from pathlib import Path

import torch
from torch import nn

from dasheng_model import encoder as encoder_module
from dasheng_model import pretrained
from dasheng_model.checkpoint import (
    FORMAT,
    CheckpointError,
    library_provenance,
    model_config,
    read_metadata,
    read_torch_file,
    save_checkpoint,
    write_atomically,
)
from dasheng_model.encoder import MAX_TOKENS, DashengEncoder
from dasheng_model.frontend import N_MELS, SAMPLE_RATE, LogMel
from dasheng_model.inputs import FRAMES_PER_TOKEN, SAMPLES_PER_TOKEN

log = logging.getLogger(__name__)

TARGETS = ("onnx", "hf", "official", "ours")
MAX_SAMPLES = MAX_TOKENS * SAMPLES_PER_TOKEN  # 161 280 samples: 10.08 s, 252 tokens
MAX_FRAMES = MAX_TOKENS * FRAMES_PER_TOKEN  # 1008 frames
ONNX_META_KEY = "dasheng"
EXTRA_HINT = "pip install 'dasheng-pipeline[export]'"
_ONNX_LIMIT = 2_000_000_000  # bytes of weights above which ONNX needs an external data file


# -- the source and its provenance ---------------------------------------------------------------


def stored_provenance(spec: str | os.PathLike) -> dict | None:
    """The provenance stored with the weights a spec names (ours, or a file this module wrote)."""
    path = Path(os.fspath(spec)).expanduser()
    if not path.exists():
        return None
    if pretrained.is_hf(path):
        config = (path if path.is_dir() else path.parent) / pretrained.HF_CONFIG
        if not config.is_file():
            return None
        try:
            entry = json.loads(config.read_text(encoding="utf-8")).get(pretrained.HF_OURS)
        except (json.JSONDecodeError, AttributeError):
            return None
        return entry.get("provenance") if isinstance(entry, dict) else None
    if path.is_dir():
        return None
    with open(path, "rb") as fh:
        head = fh.read(2)
    if head == b"PK" or head[:1] == b"\x80":
        return read_torch_file(path).get("provenance")
    return read_metadata(path).get("provenance")


def _resolve(model: str | os.PathLike | DashengEncoder) -> tuple[DashengEncoder, dict]:
    """The encoder to export, and the record of where it came from."""
    if isinstance(model, DashengEncoder):
        return model.eval(), {"model": None, "sha256": None, "provenance": None}
    encoder = pretrained.load(model)
    source = {
        "model": os.fspath(model),
        "sha256": pretrained.weights_sha256(model, encoder),
        "provenance": stored_provenance(model),
    }
    return encoder, source


# -- the three weight formats --------------------------------------------------------------------


def official_config(encoder: DashengEncoder) -> dict:
    """The ``config`` entry of an official ``.pt``: the official model's constructor arguments."""
    c = encoder.config
    return {
        "embed_dim": c.embed_dim,
        "depth": c.depth,
        "num_heads": c.num_heads,
        "mlp_ratio": c.mlp_ratio,
        "target_length": MAX_FRAMES,
    }


def save_official(encoder: DashengEncoder, path: str | os.PathLike, provenance: dict) -> Path:
    """``{'model': state_dict, 'config': {...}, 'provenance': {...}}`` with torch.save, atomically:
    what ``dasheng.pretrained.pretrained.Dasheng.from_pretrained`` and ``dasheng_base(path)`` read."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    dump = {"model": state, "config": official_config(encoder), "provenance": provenance}
    write_atomically(path, lambda tmp: torch.save(dump, tmp))
    return path


# -- ONNX ----------------------------------------------------------------------------------------


def _require_onnx():
    """The export extra's modules, or a one-line error naming the extra."""
    try:
        import onnx  # noqa: F401 - the exporter needs it
        import onnxruntime
        import onnxscript  # noqa: F401 - torch's exporter translates through it
    except ImportError as exc:
        raise CheckpointError(
            f"ONNX export needs the export extra ({exc.name or exc} is missing): {EXTRA_HINT}"
        ) from exc
    return onnxruntime


def log_mel_fp64(front_end: LogMel, wav: torch.Tensor) -> torch.Tensor:
    """``front_end(wav)`` (torchaudio's mel spectrogram, then per-clip dB) computed in float64 and
    returned in float32, with the module's own window, filterbank and settings.

    For the graph: onnxruntime's float32 STFT rounds differently from PyTorch's FFT, by up to
    0.03 dB in bins 100 dB below a clip's peak (PyTorch's float32 itself is 0.012 dB off float64
    there); in float64 the graph's log-mel is the exact one, and the embeddings stay within 1e-4
    of PyTorch's (BENCHMARKS.md).
    """
    mel_spec, to_db = front_end[0], front_end[1]
    spec = mel_spec.spectrogram
    stft = torch.stft(
        wav.double(),
        n_fft=spec.n_fft,
        hop_length=spec.hop_length,
        win_length=spec.win_length,
        window=spec.window.double(),
        center=spec.center,
        pad_mode=spec.pad_mode,
        normalized=False,
        onesided=spec.onesided,
        return_complex=True,
    )  # (B, n_fft // 2 + 1, T)
    power = stft.abs().pow(spec.power)
    mel = torch.matmul(power.transpose(-1, -2), mel_spec.mel_scale.fb.double()).transpose(-1, -2)
    return to_db(mel).float()  # (B, 64, T)


class OnnxEncoder(nn.Module):
    """One window through the encoder, written without data-dependent branches (for tracing):
    waveform (B, S) or dB log-mel (B, 64, T) → (B, N ≤ 252, D)."""

    def __init__(self, encoder: DashengEncoder, front_end: bool = True):
        super().__init__()
        self.encoder = encoder
        self.front_end = front_end

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mel = log_mel_fp64(self.encoder.front_end, x) if self.front_end else x
        tokens = self.encoder.tokenize(mel)  # (B, D, 1, N)
        return self.encoder.transformer(self.encoder.add_positions(tokens))


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter's chatter (torchvision's ops it skips, each optimiser pass) kept to errors."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


@contextlib.contextmanager
def _plain_linear():
    """The oneDNN inference path off: the exporter traces ``F.linear``, not oneDNN's own ops."""
    before = encoder_module.ONEDNN_INFERENCE
    encoder_module.ONEDNN_INFERENCE = False
    try:
        yield
    finally:
        encoder_module.ONEDNN_INFERENCE = before


def _example(front_end: bool) -> tuple[torch.Tensor, dict]:
    """A 3 s batch of 2 to trace with, and its dynamic axes (batch, time up to one window)."""
    Dim = torch.export.Dim
    batch = Dim("batch", min=1, max=4096)
    g = torch.Generator().manual_seed(0)
    if front_end:
        time = Dim("samples", min=SAMPLES_PER_TOKEN, max=MAX_SAMPLES)
        return torch.randn(2, 3 * SAMPLE_RATE, generator=g) * 0.1, {"x": {0: batch, 1: time}}
    time = Dim("frames", min=FRAMES_PER_TOKEN, max=MAX_FRAMES)
    return torch.randn(2, N_MELS, 300, generator=g) * 10 - 40, {"x": {0: batch, 2: time}}


def _onnx_program(encoder: DashengEncoder, front_end: bool, opset: int | None):
    wrapper = OnnxEncoder(encoder, front_end).eval()
    example, dynamic = _example(front_end)
    with _plain_linear(), _quiet_exporter(), torch.no_grad():
        return torch.onnx.export(
            wrapper,
            (example,),
            dynamo=True,
            dynamic_shapes=dynamic,
            input_names=["waveform" if front_end else "mel"],
            output_names=["embeddings"],
            opset_version=opset,
            verbose=False,
        )


def _name_axes(program, encoder: DashengEncoder, meta: dict) -> None:
    """Readable output axes (batch, tokens, D) and the metadata entry."""
    import onnx_ir as ir

    out = program.model.graph.outputs[0]
    out.shape = ir.Shape(["batch", "tokens", encoder.config.embed_dim])
    program.model.metadata_props[ONNX_META_KEY] = json.dumps(meta, sort_keys=True)


def _save_onnx(program, path: Path, external: bool) -> None:
    """Save in a temporary folder beside ``path``, then move the data file and the graph into
    place (the graph last): a killed export never leaves a graph under the final name."""
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir(parents=True)
    try:
        program.save(str(tmp / path.name), external_data=external)
        for item in sorted(tmp.iterdir(), key=lambda p: p.name == path.name):
            os.replace(item, path.parent / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_onnx(path: str | os.PathLike, encoder: DashengEncoder, front_end: bool = True) -> float:
    """Max |ONNX − PyTorch| on 1.5 s of noise (batch 2): onnxruntime on the CPU against the encoder."""
    ort = _require_onnx()
    g = torch.Generator().manual_seed(1)
    wav = torch.randn(2, 24_000, generator=g) * 0.1
    with torch.inference_mode():
        x = wav if front_end else encoder.front_end(wav)
        ref = encoder(wav) if front_end else encoder.forward_mel(x)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    return float((torch.from_numpy(out) - ref).abs().max())


def save_onnx(
    encoder: DashengEncoder,
    path: str | os.PathLike,
    meta: dict,
    front_end: bool = True,
    opset: int | None = None,
) -> Path:
    """The encoder as an ONNX graph (see the module docstring); weights over 2 GB go to
    ``PATH.data`` beside it. ``meta`` is stored as JSON in ``metadata_props["dasheng"]``."""
    _require_onnx()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    encoder = encoder.eval()
    program = _onnx_program(encoder, front_end, opset)
    _name_axes(program, encoder, meta)
    size = sum(p.numel() * p.element_size() for p in encoder.state_dict().values())
    with _quiet_exporter():
        _save_onnx(program, path, external=size > _ONNX_LIMIT)
    return path


def onnx_metadata(encoder: DashengEncoder, front_end: bool, provenance: dict) -> dict:
    return {
        "format": FORMAT,
        "config": model_config(encoder),
        "provenance": provenance,
        "input": "waveform" if front_end else "mel",
        "input_shape": ["batch", "samples"] if front_end else ["batch", N_MELS, "frames"],
        "max_time": MAX_SAMPLES if front_end else MAX_FRAMES,
        "sample_rate": SAMPLE_RATE,
        "output": "embeddings",
        "output_shape": ["batch", "tokens", encoder.config.embed_dim],
        "tokens_per_second": SAMPLE_RATE // SAMPLES_PER_TOKEN,
    }


# -- one entry point -----------------------------------------------------------------------------


def export_model(
    model: str | os.PathLike | DashengEncoder,
    to: str,
    out: str | os.PathLike,
    *,
    front_end: bool = True,
    provenance: dict | None = None,
    opset: int | None = None,
    check: bool = True,
) -> Path:
    """Write ``model`` (any spec, or an encoder) as ``to`` (onnx, hf, official, ours) at ``out``.

    ``out``: a ``.onnx`` file, a folder (hf), a ``.pt`` file (official) or a ``.safetensors``
    file (ours). ``provenance``: the export's own stamp (default :func:`library_provenance`);
    the source's spec, sha256 and stored provenance are added under ``source``.
    ONNX only: ``front_end`` (log-mel inside the graph), ``opset``, and ``check`` (run the graph
    once in onnxruntime against PyTorch and log the largest difference).
    """
    if to not in TARGETS:
        raise ValueError(f"unknown export target {to!r}; expected one of {', '.join(TARGETS)}")
    if to == "onnx":
        _require_onnx()  # before loading a large model
    encoder, source = _resolve(model)
    stamp = provenance if provenance is not None else library_provenance(model_config(encoder))
    stamp = {**stamp, "source": source}
    out = Path(out)
    if to == "hf":
        pretrained.save_hf(encoder, out, stamp)
    elif to == "official":
        save_official(encoder, out, stamp)
    elif to == "ours":
        save_checkpoint(encoder, out, provenance=stamp)
    else:
        save_onnx(encoder, out, onnx_metadata(encoder, front_end, stamp), front_end, opset)
        if check:
            diff = check_onnx(out, encoder, front_end)
            log.info(f"{out}: onnxruntime against PyTorch on 1.5 s of noise: max |diff| {diff:.2e}")
    log.info(f"{out}: {source['model'] or 'the encoder'} written as {to}")
    return out
