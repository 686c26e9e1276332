from __future__ import annotations

import argparse
import collections
import datetime
import hashlib

import pytest
import torch

from esm2_service.worker import checkpoint as ckpt


def test_random_checkpoint_loads_in_fair_esm_format_and_says_it_is_random(tiny_checkpoint):
    loaded = ckpt.load_checkpoint(tiny_checkpoint)
    assert (loaded.num_layers, loaded.embed_dim, loaded.attention_heads) == (6, 32, 4)
    assert loaded.random_weights is True
    assert loaded.sha256 == hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()
    assert ckpt.regression_path(tiny_checkpoint).name == "tiny-contact-regression.pt"


def test_plain_torch_load_refuses_the_namespace_that_real_checkpoints_hold(tiny_checkpoint):
    with pytest.raises(Exception, match="argparse.Namespace"):
        torch.load(tiny_checkpoint, weights_only=True)


def test_fair_esm_own_loader_accepts_the_files_we_write(tmp_path, tiny_checkpoint):
    import esm.pretrained

    # fair-esm picks its ESM-2 code path from a file name starting with "esm2".
    named = tmp_path / "esm2_tiny.pt"
    named.write_bytes(tiny_checkpoint.read_bytes())
    ckpt.regression_path(named).write_bytes(ckpt.regression_path(tiny_checkpoint).read_bytes())
    with torch.serialization.safe_globals([argparse.Namespace]):
        model, alphabet = esm.pretrained.load_model_and_alphabet_local(str(named))
    assert model.num_layers == 6 and model.embed_dim == 32
    assert len(alphabet.all_toks) == 33


def test_full_shape_is_esm2_8m(full_checkpoint):
    loaded = ckpt.load_checkpoint(full_checkpoint)
    assert (loaded.num_layers, loaded.embed_dim, loaded.attention_heads) == (6, 320, 20)
    model = ckpt.build_fair_esm_model(loaded)
    assert 7_000_000 < sum(p.numel() for p in model.parameters()) < 8_000_000


def test_real_checkpoints_are_not_marked_random(tmp_path, tiny_checkpoint):
    data = _load(tiny_checkpoint)
    del data[ckpt.RANDOM_MARKER]
    real = tmp_path / "esm2_t6_8M_UR50D.pt"
    torch.save(data, real)
    ckpt.regression_path(real).write_bytes(ckpt.regression_path(tiny_checkpoint).read_bytes())
    assert ckpt.load_checkpoint(real).random_weights is False


def test_objects_outside_the_allow_list_are_refused_not_unpickled(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "cfg": {"model": datetime.datetime(2020, 1, 1)}}, evil)
    with pytest.raises(ckpt.CheckpointError, match="outside the allow-list"):
        ckpt.load_checkpoint(evil)


def test_missing_files_and_wrong_formats_fail_clearly(tmp_path, tiny_checkpoint):
    with pytest.raises(ckpt.CheckpointError, match="checkpoint file not found"):
        ckpt.load_checkpoint(tmp_path / "nope.pt")
    lonely = tmp_path / "lonely.pt"
    lonely.write_bytes(tiny_checkpoint.read_bytes())
    with pytest.raises(ckpt.CheckpointError, match="lonely-contact-regression.pt"):
        ckpt.load_checkpoint(lonely)
    other = tmp_path / "other.pt"
    torch.save(collections.OrderedDict(weights=torch.zeros(2)), other)
    torch.save({"model": {}}, ckpt.regression_path(other))
    with pytest.raises(ckpt.CheckpointError, match="not an ESM-2 checkpoint"):
        ckpt.load_checkpoint(other)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ckpt.CheckpointError, match="not a readable torch checkpoint"):
        ckpt.load_checkpoint(garbage)


def test_make_checkpoint_command(tmp_path, capsys):
    out = tmp_path / "made.pt"
    assert ckpt.main(["--random", str(out), "--tiny", "--seed", "3"]) == 0
    assert "RANDOM weights" in capsys.readouterr().out
    assert ckpt.load_checkpoint(out).random_weights
    with pytest.raises(SystemExit):
        ckpt.main([str(out)])  # --random is required


def _load(path):
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, weights_only=True)
