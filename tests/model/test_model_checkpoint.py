"""Checkpoints: our safetensors format, official .pt files, strict keys, hostile pickles."""

from __future__ import annotations

import builtins
import hashlib
import json

import pytest
import torch
from dasheng.pretrained import pretrained  # the official package (dev extra): the test oracle
from model_testutil import noise, trained_like
from safetensors import safe_open

from dasheng_model.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_encoder,
    load_official,
    read_metadata,
    save_checkpoint,
)
from dasheng_model.encoder import DashengEncoder, EncoderConfig
from dasheng_model.mae import MaskedAutoencoder


def official_file(encoder: DashengEncoder, path, config: dict | None = None):
    """Write ``encoder`` in the release's layout: torch.save({'model': state_dict, 'config': kwargs})."""
    c = encoder.config
    config = (
        config
        if config is not None
        else {
            "embed_dim": c.embed_dim,
            "depth": c.depth,
            "num_heads": c.num_heads,
            "patch_size": (64, 4),
            "patch_stride": (64, 4),
            "target_length": 1008,
            "pooling": "mean",
        }
    )
    torch.save({"model": encoder.state_dict(), "config": config}, path)
    return path


def test_encoder_round_trip_is_bit_exact(tmp_path, tiny):
    path = save_checkpoint(tiny, tmp_path / "enc.safetensors", seed=7)
    loaded = load_checkpoint(path)
    assert isinstance(loaded, DashengEncoder) and not loaded.training
    a, b = tiny.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    wav = noise(2, 2.0)
    with torch.no_grad():
        assert torch.equal(tiny(wav), loaded(wav))
    assert [p.name for p in tmp_path.iterdir()] and not [
        p for p in tmp_path.iterdir() if ".tmp-" in p.name
    ]


def test_metadata_and_sidecar_carry_config_and_provenance(tmp_path, tiny):
    prov = {
        "config_hash": "0123456789abcdef",
        "seed": 3,
        "versions": {"torch": "2.11.0"},
        "git_sha": "abc",
    }
    path = save_checkpoint(tiny, tmp_path / "enc.safetensors", provenance=prov)
    meta = read_metadata(path)
    assert meta["provenance"] == prov
    assert meta["config"]["kind"] == "encoder" and meta["config"]["size"] == "tiny"
    assert meta["config"]["encoder"] == {
        "embed_dim": 192,
        "depth": 6,
        "num_heads": 3,
        "mlp_ratio": 4.0,
    }
    assert meta["config"]["mel"]["hop_length"] == 160
    side = json.loads((tmp_path / "enc.json").read_text())
    assert (
        side["provenance"] == prov
        and side["config"] == meta["config"]
        and side["weights"] == "enc.safetensors"
    )
    assert side["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == set(tiny.state_dict())
    # default provenance (the library alone): a hash of the model config, the seed, the versions
    default = read_metadata(save_checkpoint(tiny, tmp_path / "b.safetensors", seed=11))[
        "provenance"
    ]
    assert default["seed"] == 11 and set(default) == {"config_hash", "seed", "versions", "git_sha"}
    assert (
        default["versions"]["torch"] == torch.__version__.split("+")[0]
        and default["git_sha"] is None
    )


def test_mae_round_trip_and_encoder_export(tmp_path):
    torch.manual_seed(1)
    mae = MaskedAutoencoder("tiny", mask_ratio=0.7)
    path = save_checkpoint(mae, tmp_path / "mae.safetensors")
    loaded = load_checkpoint(path)
    assert isinstance(loaded, MaskedAutoencoder) and loaded.mask_ratio == 0.7
    for k, v in mae.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    encoder = load_encoder(path)  # the encoder of an MAE checkpoint
    assert isinstance(encoder, DashengEncoder)
    assert torch.equal(encoder.blocks[2].mlp.fc1.weight, mae.encoder.blocks[2].mlp.fc1.weight)


def test_official_format_loads_strictly(tmp_path, tiny):
    path = official_file(tiny, tmp_path / "dasheng_tiny.pt")
    loaded = load_encoder(path)
    assert loaded.config == tiny.config and not loaded.training
    for k, v in tiny.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    # a bare state dict, and a config without num_heads (heads then come from the size table)
    torch.save(tiny.state_dict(), tmp_path / "bare.pt")
    assert load_encoder(tmp_path / "bare.pt").config == tiny.config
    assert (
        load_official(
            official_file(tiny, tmp_path / "noheads.pt", {}),
        ).config
        == tiny.config
    )


def test_missing_and_unexpected_keys_are_listed(tmp_path, tiny):
    sd = dict(tiny.state_dict())
    del sd["blocks.3.attn.qkv.weight"]
    sd["blocks.3.attn.rel_pos"] = torch.zeros(3)
    torch.save({"model": sd, "config": {"num_heads": 3}}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as err:
        load_encoder(tmp_path / "bad.pt")
    msg = str(err.value)
    assert "1 missing keys: blocks.3.attn.qkv.weight" in msg
    assert "1 unexpected keys: blocks.3.attn.rel_pos" in msg
    assert "fit size 'tiny'" in msg


def test_wrong_size_names_the_size_that_fits(tmp_path, tiny):
    path = official_file(tiny, tmp_path / "tiny.pt")
    with pytest.raises(CheckpointError) as err:
        load_encoder(path, size="base")
    msg = str(err.value)
    assert (
        "size 'base'" in msg
        and "its shapes fit size 'tiny' (embed_dim 192, depth 6, 3 heads)" in msg
    )
    assert "patch_embed.proj.weight (192, 1, 64, 4) (model: (768, 1, 64, 4))" in msg
    assert "72 missing keys: blocks.6.attn.proj.bias, blocks.6.attn.proj.weight" in msg
    ours = save_checkpoint(tiny, tmp_path / "tiny.safetensors")
    with pytest.raises(CheckpointError, match="holds size 'tiny', not the requested 'base'"):
        load_encoder(ours, size="base")


def test_custom_size_without_heads_is_explained(tmp_path):
    enc = DashengEncoder(EncoderConfig(embed_dim=64, depth=2, num_heads=4))
    torch.save({"model": enc.state_dict(), "config": {}}, tmp_path / "custom.pt")
    with pytest.raises(CheckpointError, match=r"embed_dim 64, depth 2\) fit no size"):
        load_encoder(tmp_path / "custom.pt")
    torch.save({"model": enc.state_dict(), "config": {"num_heads": 4}}, tmp_path / "custom4.pt")
    assert load_encoder(tmp_path / "custom4.pt").config == enc.config


class _Exploit:
    """Unpickling this would call open(target, 'w'): creating a file proves code ran."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (builtins.open, (self.target, "w"))


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, tiny):
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": tiny.state_dict(), "config": {"x": _Exploit(target)}}, path)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_encoder(path)
    assert not target.exists()
    # the same payload in a legacy (non-zip) pickle file
    torch.save(
        {"model": _Exploit(target)},
        tmp_path / "evil_legacy.pt",
        _use_new_zipfile_serialization=False,
    )
    with pytest.raises(CheckpointError, match="refused to load"):
        load_encoder(tmp_path / "evil_legacy.pt")
    assert not target.exists()
    # sanity: an unrestricted unpickle of that file would have run the payload
    torch.load(path, weights_only=False)
    assert target.exists()


@pytest.mark.parametrize(
    "content",
    [b"", b"PK\x03\x04 truncated zip", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json", b"hello"],
)
def test_corrupt_files_raise_checkpoint_errors(tmp_path, content):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError):
        load_encoder(path)


def test_truncated_safetensors_is_refused(tmp_path, tiny):
    path = save_checkpoint(tiny, tmp_path / "t.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        load_encoder(path)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_encoder(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="must end in .safetensors"):
        save_checkpoint(tiny, tmp_path / "x.pt")


def test_official_implementation_equivalence(tmp_path):
    """Oracle: the official package (random weights, no download) and ours on the same audio."""
    torch.manual_seed(0)
    official = pretrained.Dasheng(embed_dim=192, depth=6, num_heads=3)
    trained_like(official)  # same init_bn treatment, so its statistics are not trivial
    with torch.no_grad():
        for p in official.parameters():  # biases and LayerNorms away from their init values
            p.add_(torch.randn_like(p) * 0.02)
    path = tmp_path / "official_tiny.pt"
    torch.save(
        {"model": official.state_dict(), "config": {"embed_dim": 192, "depth": 6, "num_heads": 3}},
        path,
    )
    ours = load_encoder(path)
    assert sum(p.numel() for p in ours.parameters()) == sum(
        p.numel() for p in official.parameters()
    )
    official.eval()

    wav = noise(3, 23.5, seed=2)  # long: three chunks of ≤ 252 tokens
    lengths = torch.tensor([376000, 100000, 200000])
    with torch.no_grad():
        torch.testing.assert_close(ours(wav), official(wav), atol=1e-4, rtol=0)
        a, b = ours(wav, lengths), official(wav, lengths)
        for i, n in enumerate((lengths // 640).tolist()):
            torch.testing.assert_close(a[i, :n], b[i, :n], atol=1e-4, rtol=0)
        short = noise(2, 1.0, seed=3)
        torch.testing.assert_close(ours(short), official(short), atol=1e-4, rtol=0)
    # and the official loader accepts a file we write in its format
    reloaded = pretrained.Dasheng.from_pretrained(str(official_file(ours, tmp_path / "ours.pt")))
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(short), ours(short), atol=1e-4, rtol=0)


def test_official_base_parameter_count_and_keys():
    official = pretrained.Dasheng(embed_dim=768, depth=12, num_heads=12)
    with torch.device("meta"):
        ours = DashengEncoder("base")
    assert (
        sum(p.numel() for p in official.parameters())
        == sum(p.numel() for p in ours.parameters())
        == 85_447_808
    )
    assert {k: tuple(v.shape) for k, v in official.state_dict().items()} == {
        k: tuple(v.shape) for k, v in ours.state_dict().items()
    }
