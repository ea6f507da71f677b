"""Checkpoints: atomic, verified on load, the previous good one used when the newest is damaged."""

import random

import pytest
import torch

from perk.checkpoint import (
    CorruptCheckpoint,
    load_latest_checkpoint,
    read_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    write_file_atomic,
)


def _save(run, step):
    tensors = {"theta": torch.full((3, 2), float(step)), "log_lr": torch.arange(4.0) * step}
    return save_checkpoint(run, step, tensors, {"data_position": step * 8, "rng": rng_state()})


def test_round_trip_and_keep_newest(tmp_path):
    for step in (10, 20, 30):
        _save(tmp_path, step)
    ckpt = load_latest_checkpoint(tmp_path)
    assert ckpt.step == 30 and ckpt.state["data_position"] == 240
    torch.testing.assert_close(ckpt.tensors["theta"], torch.full((3, 2), 30.0))
    assert [p.name for p in sorted((tmp_path / "checkpoints").iterdir())] == ["step-00000020", "step-00000030"]


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_manifest", "empty_dir"])
def test_damaged_newest_falls_back_to_previous(tmp_path, damage):
    _save(tmp_path, 1)
    newest = _save(tmp_path, 2)
    if damage == "truncate":
        blob = (newest / "tensors.safetensors").read_bytes()
        (newest / "tensors.safetensors").write_bytes(blob[: len(blob) // 2])
    elif damage == "flip":
        blob = bytearray((newest / "state.pt").read_bytes())
        blob[len(blob) // 2] ^= 0xFF
        (newest / "state.pt").write_bytes(bytes(blob))
    elif damage == "no_manifest":
        (newest / "manifest.json").unlink()
    else:
        for f in newest.iterdir():
            f.unlink()
    with pytest.raises(CorruptCheckpoint, match="step-00000002"):
        read_checkpoint(newest)
    with pytest.warns(UserWarning, match="step-00000002"):
        ckpt = load_latest_checkpoint(tmp_path)
    assert ckpt.step == 1


def test_no_checkpoint_gives_none(tmp_path):
    assert load_latest_checkpoint(tmp_path) is None


def test_rng_state_round_trip():
    state = rng_state()
    expected = (random.random(), torch.rand(3))
    set_rng_state(state)
    assert random.random() == expected[0]
    assert torch.rand(3).equal(expected[1])


def test_atomic_write_replaces_whole_file(tmp_path):
    target = tmp_path / "table.md"
    write_file_atomic(target, b"old")
    write_file_atomic(target, b"new contents")
    assert target.read_bytes() == b"new contents"
    assert [p.name for p in tmp_path.iterdir()] == ["table.md"], "no temporary file may remain"
