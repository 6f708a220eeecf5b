"""dasheng_model.pretrained: one resolver for every way to name weights, and the Hugging Face format."""

import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading

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


class _FakeHub(http.server.BaseHTTPRequestHandler):
    """The calls huggingface_hub makes for a snapshot: repo info, the file tree, then each file (HEAD + GET)."""

    files: dict = {}
    sha = "0123456789abcdef0123456789abcdef01234567"

    def log_message(self, *args):
        pass

    def _send(self, body: bytes, content_type: str, head: bool, etag: str | None = None):
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Repo-Commit", self.sha)
        if etag:
            self.send_header("ETag", f'"{etag}"')
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _route(self, head: bool):
        parts = self.path.split("?")[0].strip("/").split("/")
        if parts[:2] == ["api", "models"] and parts[4:5] == ["revision"] and self.files:
            info = {
                "id": "/".join(parts[2:4]),
                "sha": self.sha,
                "siblings": [{"rfilename": f} for f in self.files],
            }
            return self._send(json.dumps(info).encode(), "application/json", head)
        if parts[:2] == ["api", "models"] and parts[4:5] == ["tree"]:
            tree = [
                {"type": "file", "path": f, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                for f, b in self.files.items()
            ]
            return self._send(json.dumps(tree).encode(), "application/json", head)
        if len(parts) == 5 and parts[2] == "resolve" and parts[4] in self.files:
            body = self.files[parts[4]]
            return self._send(
                body, "application/octet-stream", head, hashlib.sha256(body).hexdigest()
            )
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self):
        self._route(head=False)

    def do_HEAD(self):
        self._route(head=True)


def _load_from_hub(repo_id: str, endpoint: str, home) -> subprocess.CompletedProcess:
    code = (
        "import sys; from dasheng_model.pretrained import load, weights_sha256; e = load(sys.argv[1]); "
        "print(e.config.embed_dim, weights_sha256(sys.argv[1], e))"
    )
    env = {
        **os.environ,
        "HF_ENDPOINT": endpoint,
        "HF_HOME": str(home),
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    env.pop("HF_HUB_OFFLINE", None)
    return subprocess.run(
        [sys.executable, "-c", code, repo_id], capture_output=True, text=True, env=env, timeout=120
    )


@pytest.mark.network
def test_a_repo_id_is_fetched_from_the_hub_and_a_failure_is_one_line(tmp_path):
    """huggingface_hub against a loopback server standing in for the hub (no internet)."""
    encoder = random_encoder("tiny", 4)
    hf = save_hf(encoder, tmp_path / "hf")
    _FakeHub.files = {
        name: (hf / name).read_bytes() for name in ("model.safetensors", "config.json")
    }
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        ok = _load_from_hub("mispeech/dasheng-test", endpoint, tmp_path / "home")
        assert ok.returncode == 0, ok.stderr
        assert ok.stdout.split() == ["192", weights_sha256("random:tiny:4", encoder)]
        _FakeHub.files = {}
        missing = _load_from_hub("mispeech/absent", endpoint, tmp_path / "home2")
    finally:
        server.shutdown()
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
    release = random_encoder("base", 8)
    hf = save_hf(release, tmp_path / "hf")
    _FakeHub.files = {
        name: (hf / name).read_bytes() for name in ("model.safetensors", "config.json")
    }
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        online = _dasheng_base_in_child(tmp_path / "home", endpoint, tmp_path)
    finally:
        server.shutdown()
        _FakeHub.files = {}
    (hf / "model.safetensors").unlink()  # only the hub's cache holds the weights now
    offline = _dasheng_base_in_child(tmp_path / "home", None, tmp_path)
    assert online.returncode == 0, online.stderr
    assert online.stdout.split() == offline.stdout.split() == [_released_digest(release)]
