"""dasheng_model.export: the weight formats round trip (the official package as the oracle), and
the ONNX graph against PyTorch on real audio."""

from __future__ import annotations

import hashlib
import json
import sys

import pytest
import torch
from dasheng.pretrained import pretrained as official_pkg  # the official package: the oracle
from model_testutil import read_wav, trained_like

from dasheng_model.checkpoint import CheckpointError, read_metadata
from dasheng_model.encoder import DashengEncoder
from dasheng_model.export import MAX_SAMPLES, export_model
from dasheng_model.pretrained import dasheng_base, load, random_encoder


def _speech(speech_commands, n: int = 3) -> torch.Tensor:
    """``n`` one-second utterances, zero-padded to 16 000 samples: (n, 16000)."""
    clips = [read_wav(p)[:16000] for p in sorted(speech_commands.rglob("*_nohash_*.wav"))[:n]]
    return torch.stack([torch.nn.functional.pad(c, (0, 16000 - len(c))) for c in clips])


def _tap(speech_commands, seconds: float, start_s: float = 0.0) -> torch.Tensor:
    """A slice of the 61 s recording (background noise of a running tap): (1, S)."""
    path = speech_commands / "_background_noise_" / "running_tap.wav"
    return read_wav(path, int(start_s * 16000), int(seconds * 16000))[None]


def _official_tiny(seed: int = 0):
    """A random official-package model, its statistics and weights away from their init values."""
    torch.manual_seed(seed)
    model = official_pkg.Dasheng(embed_dim=192, depth=6, num_heads=3)
    trained_like(model, seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_official_to_ours_to_hf_to_official_keeps_weights_outputs_and_provenance(
    tmp_path, speech_commands
):
    official = _official_tiny()
    release = tmp_path / "release.pt"
    config = {"embed_dim": 192, "depth": 6, "num_heads": 3}
    torch.save({"model": official.state_dict(), "config": config}, release)

    ours = export_model(release, "ours", tmp_path / "ours.safetensors")
    hf = export_model(ours, "hf", tmp_path / "hf")
    back = export_model(hf, "official", tmp_path / "back.pt")

    # the official package loads the end of the chain: the same tensors, the same outputs
    reloaded = official_pkg.Dasheng.from_pretrained(str(back)).eval()
    assert _same_state(reloaded.state_dict(), official.state_dict())
    # one clip at a time: in a batch the official front end clamps at the batch's peak (its
    # known quirk, dasheng-facts.md), which zero-padded or silent clips trigger
    clips = [read_wav(p)[None] for p in sorted(speech_commands.rglob("*_nohash_*.wav"))[:3]]
    long = _tap(speech_commands, 12.0)  # 300 tokens: two chunks
    ours_again = load(back)
    with torch.inference_mode():
        for x in [*clips, long]:
            assert torch.equal(reloaded(x), official(x))
            torch.testing.assert_close(ours_again(x), official(x), atol=1e-4, rtol=0)

    # provenance: each hop records its source, down to the release (which carries none)
    hop3 = torch.load(back, weights_only=True)["provenance"]
    hop2 = json.loads((hf / "config.json").read_text())["dasheng_pipeline"]["provenance"]
    hop1 = read_metadata(ours)["provenance"]
    assert hop3["source"]["model"] == str(hf) and hop3["source"]["provenance"] == hop2
    assert hop2["source"]["model"] == str(ours) and hop2["source"]["provenance"] == hop1
    assert hop1["source"]["model"] == str(release) and hop1["source"]["provenance"] is None
    assert hop1["source"]["sha256"] == hashlib.sha256(release.read_bytes()).hexdigest()
    assert json.loads(ours.with_suffix(".json").read_text())["provenance"] == hop1


@pytest.mark.slow
def test_an_exported_base_loads_in_the_official_constructor_with_the_same_outputs(
    tmp_path, speech_commands
):
    path = export_model("random:base:3", "official", tmp_path / "dasheng_base.pt")
    import dasheng  # the official constructor, given a path: no download

    theirs = dasheng.dasheng_base(str(path)).eval()
    ours = dasheng_base(path)
    wav = _tap(speech_commands, 2.0, start_s=30.0)
    with torch.inference_mode():
        torch.testing.assert_close(ours(wav), theirs(wav), atol=1e-4, rtol=0)


def test_bad_targets_and_a_missing_export_extra_are_one_line_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown export target 'tflite'; expected one of onnx"):
        export_model("random:tiny", "tflite", tmp_path / "x")
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if the extra were not installed
    with pytest.raises(CheckpointError, match=r"pip install 'dasheng-pipeline\[export\]'"):
        export_model("random:tiny", "onnx", tmp_path / "tiny.onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_onnx_matches_pytorch_on_real_audio_with_and_without_the_front_end(
    tmp_path, speech_commands
):
    """ONNX (onnxruntime, CPU) against the PyTorch encoder: speech, the tap recording's first
    10.08 s window (252 tokens, the longest) and a 7.3 s slice, batch and time axes dynamic."""
    import onnx
    import onnxruntime as ort

    torch.manual_seed(1)
    encoder = trained_like(DashengEncoder("tiny"), 1)
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    wav_graph = export_model(encoder, "onnx", tmp_path / "tiny.onnx")
    mel_graph = export_model(encoder, "onnx", tmp_path / "tiny_mel.onnx", front_end=False)
    inputs = [
        _speech(speech_commands),
        _tap(speech_commands, MAX_SAMPLES / 16000),
        _tap(speech_commands, 7.3, start_s=20.0),
    ]
    wav_session = ort.InferenceSession(str(wav_graph), providers=["CPUExecutionProvider"])
    mel_session = ort.InferenceSession(str(mel_graph), providers=["CPUExecutionProvider"])
    for wav in inputs:
        with torch.inference_mode():
            ref = encoder(wav)
            mel = encoder.front_end(wav)
        out = torch.from_numpy(wav_session.run(None, {"waveform": wav.numpy()})[0])
        out_mel = torch.from_numpy(mel_session.run(None, {"mel": mel.numpy()})[0])
        assert out.shape == ref.shape == (len(wav), (wav.shape[1] // 160 + 1) // 4, 192)
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
        torch.testing.assert_close(out_mel, ref, atol=1e-4, rtol=0)

    model = onnx.load(str(wav_graph))
    meta = json.loads({p.key: p.value for p in model.metadata_props}["dasheng"])
    assert (meta["input"], meta["max_time"], meta["config"]["size"]) == ("waveform", 161280, "tiny")
    assert {"config_hash", "versions", "source"} <= set(meta["provenance"])
    dims = [d.dim_param or d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "tokens", 192]
    assert [i.name for i in onnx.load(str(mel_graph)).graph.input] == ["mel"]


def test_random_specs_export_with_their_seed_in_the_source_record(tmp_path):
    path = export_model("random:tiny:5", "hf", tmp_path / "hf")
    source = json.loads((path / "config.json").read_text())["dasheng_pipeline"]["provenance"][
        "source"
    ]
    assert source["model"] == "random:tiny:5" and source["provenance"] is None
    encoder = load(path)
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            encoder.state_dict().values(), random_encoder("tiny", 5).state_dict().values()
        )
    )
