"""Checkpoints: atomic, verified on load, the previous good one used when the newest is damaged."""

import hashlib
import io
import json
import pathlib
import random

import pytest
import torch

from perk.checkpoint import (
    CorruptCheckpoint,
    UnsafeCheckpoint,
    load_latest_checkpoint,
    read_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    write_file_atomic,
    write_folder_atomic,
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
        blob = bytearray((newest / "state.json").read_bytes())
        blob[len(blob) // 2] ^= 0xFF
        (newest / "state.json").write_bytes(bytes(blob))
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


def test_optimizer_scheduler_and_rng_state_round_trip_without_pickle(tmp_path):
    """An Adam + LambdaLR state (int-keyed dicts, tuples, 0-dim tensors) and the RNG states come
    back with the same types and values, and continue training bit-identically."""
    param = torch.nn.Parameter(torch.randn(4, 3))
    optimizer = torch.optim.Adam([param], lr=0.1, betas=(0.8, 0.9))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** step)
    for _ in range(2):
        param.grad = torch.randn(4, 3)
        optimizer.step()
        scheduler.step()
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()}
    save_checkpoint(tmp_path, 2, {"param": param}, state)
    loaded = load_latest_checkpoint(tmp_path)
    assert not list(loaded.path.glob("*.pt")), "no pickle is written"
    assert loaded.state["optimizer"]["param_groups"][0]["betas"] == (0.8, 0.9)
    assert list(loaded.state["optimizer"]["state"]) == [0], "integer keys stay integers"

    def next_steps(optimizer_state, scheduler_state, rng):
        p = torch.nn.Parameter(param.detach().clone())
        opt = torch.optim.Adam([p], lr=0.1, betas=(0.8, 0.9))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)
        opt.load_state_dict(optimizer_state)
        sched.load_state_dict(scheduler_state)
        set_rng_state(rng)
        for _ in range(2):
            p.grad = torch.randn(4, 3)
            opt.step()
            sched.step()
        return p.detach(), random.random()

    expected = next_steps(state["optimizer"], state["scheduler"], state["rng"])
    got = next_steps(loaded.state["optimizer"], loaded.state["scheduler"], loaded.state["rng"])
    assert got[0].equal(expected[0]) and got[1] == expected[1]


def test_state_that_is_not_plain_data_is_refused_when_saving(tmp_path):
    with pytest.raises(TypeError, match="set is not storable without pickle"):
        save_checkpoint(tmp_path, 1, {}, {"odd": {1, 2}})
    assert load_latest_checkpoint(tmp_path) is None


class _RunsCode:
    """A pickle that creates a file when unpickled: what a planted state.pt could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_a_planted_pickle_with_a_matching_manifest_is_refused_not_run(tmp_path):
    """A state.pt pickle (and a manifest that matches it) is never unpickled: the run stops with
    one line instead of resuming (issue 29, high 1)."""
    newest = _save(tmp_path, 1)
    marker = tmp_path / "pwned"
    buffer = io.BytesIO()
    torch.save({"step": 1, "payload": _RunsCode(marker)}, buffer)
    (newest / "state.pt").write_bytes(buffer.getvalue())
    manifest = json.loads((newest / "manifest.json").read_text())
    manifest["sha256"]["state.pt"] = hashlib.sha256(buffer.getvalue()).hexdigest()
    (newest / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UnsafeCheckpoint, match="pickle"):
        load_latest_checkpoint(tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("state_json", ['{"dict": [["step", 1], ["x", {"eval": "1"}]]}', '[1, 2]', '{"tensor": "9"}'])
def test_state_that_checks_out_but_is_not_a_state_falls_back(tmp_path, state_json):
    _save(tmp_path, 1)
    newest = _save(tmp_path, 2)
    (newest / "state.json").write_text(state_json)
    manifest = json.loads((newest / "manifest.json").read_text())
    manifest["sha256"]["state.json"] = hashlib.sha256(state_json.encode()).hexdigest()
    (newest / "manifest.json").write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match="cannot be read|not a step-2 checkpoint"):
        assert load_latest_checkpoint(tmp_path).step == 1


def test_atomic_folder_write_never_replaces_a_folder_it_did_not_write(tmp_path):
    """A folder with files of its own (a source package, a user's data) is refused, not deleted
    (issue 29, high 2: `--name ..` once made perk/ of the repository the save target)."""
    target = tmp_path / "perk"
    target.mkdir()
    (target / "__init__.py").write_text("source")
    with pytest.raises(FileExistsError, match="__init__.py"):
        write_folder_atomic(target, {"config.json": b"{}"})
    assert (target / "__init__.py").read_text() == "source"
    assert [p.name for p in tmp_path.iterdir()] == ["perk"], "no staging folder may remain"
    write_folder_atomic(tmp_path / "ours", {"a": b"1"})
    write_folder_atomic(tmp_path / "ours", {"a": b"2", "b": b"3"})  # its own folder: replaced whole
    assert (tmp_path / "ours" / "a").read_bytes() == b"2"
