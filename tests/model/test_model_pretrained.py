"""dasheng_model.pretrained: one resolver for every way to name weights, and the Hugging Face format."""

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from dasheng_model.checkpoint import CheckpointError, save_checkpoint
from dasheng_model.pretrained import (
    dasheng_base,
    load,
    load_hf,
    parse_random,
    random_encoder,
    save_hf,
    weights_sha256,
)


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_every_format_of_the_same_weights_loads_the_same_encoder(tmp_path):
    encoder = random_encoder("tiny", 2)
    official = tmp_path / "tiny.pt"
    torch.save({"model": encoder.state_dict(), "config": {}}, official)
    ours = save_checkpoint(encoder, tmp_path / "tiny.safetensors")
    hf = save_hf(encoder, tmp_path / "hf")
    keys = load_file(str(hf / "model.safetensors")).keys()
    assert all(k.startswith("encoder.") for k in keys) and not any(
        k.startswith("encoder.front_end") for k in keys
    )
    config = json.loads((hf / "config.json").read_text())
    assert config["encoder_kwargs"] == {  # the published layout (the hub's DashengConfig)
        "embed_dim": 192,
        "depth": 6,
        "num_heads": 3,
        "mlp_ratio": 4.0,
        "patch_size": [64, 4],
        "patch_stride": [64, 4],
        "target_length": 1008,
    }
    assert (config["model_type"], config["name"]) == ("dasheng", "dasheng-tiny")
    assert config["dasheng_pipeline"]["config"]["size"] == "tiny"
    assert set(config["dasheng_pipeline"]["provenance"]) >= {"config_hash", "versions"}
    for spec in (official, ours, hf, hf / "model.safetensors", "random:tiny:2"):
        assert _same(load(spec), encoder), spec
    assert (
        weights_sha256("random:tiny:2")
        == weights_sha256("random:tiny:2", encoder)
        != weights_sha256("random:tiny")
    )
    assert weights_sha256(hf) == hashlib.sha256((hf / "model.safetensors").read_bytes()).hexdigest()


def test_hugging_face_folders_with_a_head_or_without_config(tmp_path, caplog):
    encoder = random_encoder("tiny", 3)
    hf = save_hf(encoder, tmp_path / "hf")
    tensors = load_file(str(hf / "model.safetensors"))
    save_file({**tensors, "outputlayer.weight": torch.zeros(2, 192)}, str(hf / "model.safetensors"))
    (hf / "config.json").unlink()  # the size then comes from the shapes
    with caplog.at_level("INFO", logger="dasheng_model.pretrained"):
        assert _same(load_hf(hf), encoder)
    assert "left out 1 keys outside the encoder (outputlayer.weight" in caplog.text
    (hf / "config.json").write_text('{"encoder_kwargs": {"embed_dim": 192}}')
    with pytest.raises(
        CheckpointError, match="config.json: expected a JSON object with encoder_kwargs"
    ):
        load_hf(hf)


def test_bad_names_are_one_line_errors(tmp_path):
    with pytest.raises(CheckpointError, match=r"unknown size 'huge'"):
        parse_random("random:huge")
    with pytest.raises(CheckpointError, match="no such file or folder"):
        load(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="a folder without model.safetensors"):
        load(tmp_path)
    ours = save_checkpoint(random_encoder("tiny"), tmp_path / "tiny.safetensors")
    with pytest.raises(CheckpointError, match="holds size tiny, not 'base'"):
        dasheng_base(ours)
    with pytest.raises(CheckpointError, match="holds size tiny, not 'base'"):
        dasheng_base(weights=ours)  # the earlier name of path
    with pytest.raises(ValueError, match=r"pretrained=False means random weights"):
        dasheng_base(ours, pretrained=False)


def test_constructors_default_to_the_release_and_pretrained_false_is_random(tmp_path, monkeypatch):
    """The official package's download in torch.hub's cache is the first place looked in."""
    release = random_encoder("base", 7)
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(
        {"model": release.state_dict(), "config": {"embed_dim": 768, "depth": 12, "num_heads": 12}},
        checkpoints / "dasheng_base.pt",
    )
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert _same(dasheng_base(), release)
    random = dasheng_base(pretrained=False)
    assert _same(random, random_encoder("base", 0)) and not _same(random, release)


def _load_from_hub(repo_id: str, hub, home) -> subprocess.CompletedProcess:
    code = (
        "import sys; from dasheng_model.pretrained import load, weights_sha256; e = load(sys.argv[1]); "
        "print(e.config.embed_dim, weights_sha256(sys.argv[1], e))"
    )
    env = {**os.environ, **hub.env(home)}
    env.pop("HF_HUB_OFFLINE", None)
    return subprocess.run(
        [sys.executable, "-c", code, repo_id], capture_output=True, text=True, env=env, timeout=120
    )


@pytest.mark.network
def test_a_repo_id_is_fetched_from_the_hub_and_a_failure_is_one_line(tmp_path):
    """huggingface_hub against a loopback server standing in for the hub (no internet)."""
    from loopback import Hub

    encoder = random_encoder("tiny", 4)
    hf = save_hf(encoder, tmp_path / "hf")
    with Hub() as hub:
        files = {name: (hf / name).read_bytes() for name in ("model.safetensors", "config.json")}
        hub.add("models", "mispeech/dasheng-test", files)
        ok = _load_from_hub("mispeech/dasheng-test", hub, tmp_path / "home")
        assert ok.returncode == 0, ok.stderr
        assert ok.stdout.split() == ["192", weights_sha256("random:tiny:4", encoder)]
        missing = _load_from_hub("mispeech/absent", hub, tmp_path / "home2")
    assert missing.returncode == 1
    last = missing.stderr.strip().splitlines()[-1]
    assert (
        "model 'mispeech/absent': not a local path, and fetching it from the Hugging Face hub failed"
        in last
    )
    assert "run `hf download mispeech/absent`" in last  # the CLI that huggingface_hub installs


_RELEASED = (
    "import hashlib, sys\n"
    "from dasheng_model.checkpoint import CheckpointError\n"
    "from dasheng_model.pretrained import dasheng_base\n"
    "try:\n"
    "    e = dasheng_base()\n"
    "except CheckpointError as exc:\n"
    "    print(exc, file=sys.stderr); sys.exit(1)\n"
    "d = hashlib.sha256()\n"
    "for k, v in e.state_dict().items():\n"
    "    d.update(k.encode()); d.update(v.contiguous().view(-1).view(torch.uint8).numpy().tobytes())\n"
    "print(d.hexdigest())\n"
)


def _released_digest(encoder) -> str:
    digest = hashlib.sha256()
    for key, value in encoder.state_dict().items():
        digest.update(key.encode())
        digest.update(value.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _dasheng_base_in_child(home, endpoint: str | None, tmp_path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_HOME": str(home),
        "TORCH_HOME": str(tmp_path / "no-torch-home"),  # no official download there
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    env.pop("HF_ENDPOINT", None)
    env.pop("HF_HUB_OFFLINE", None)
    if endpoint is None:
        env["HF_HUB_OFFLINE"] = "1"
    else:
        env["HF_ENDPOINT"] = endpoint
    code = "import torch\n" + _RELEASED
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )


def test_offline_without_a_copy_of_the_release_is_a_one_line_error_never_random_weights(tmp_path):
    empty = _dasheng_base_in_child(tmp_path / "empty-home", None, tmp_path)
    assert empty.returncode == 1 and empty.stdout == ""
    error = empty.stderr.strip()
    assert len(error.splitlines()) == 1, error
    assert error.startswith("dasheng_base(): the released weights are neither in ")
    assert "HF_HUB_OFFLINE is set" in error
    assert "`hf download mispeech/dasheng-base`" in error and "pretrained=False" in error


@pytest.mark.slow
@pytest.mark.network
def test_the_release_comes_from_the_hub_online_then_from_its_cache_offline(tmp_path):
    """dasheng_base() against a loopback hub serving a base-size mispeech/dasheng-base, then
    with HF_HUB_OFFLINE=1 from the cache it filled."""
    from loopback import Hub

    release = random_encoder("base", 8)
    hf = save_hf(release, tmp_path / "hf")
    with Hub() as hub:
        files = {name: (hf / name).read_bytes() for name in ("model.safetensors", "config.json")}
        hub.add("models", "mispeech/dasheng-base", files)
        online = _dasheng_base_in_child(tmp_path / "home", hub.endpoint, tmp_path)
    (hf / "model.safetensors").unlink()  # only the hub's cache holds the weights now
    offline = _dasheng_base_in_child(tmp_path / "home", None, tmp_path)
    assert online.returncode == 0, online.stderr
    assert online.stdout.split() == offline.stdout.split() == [_released_digest(release)]
