"""Scale-out on torch.distributed (gloo, 2 CPU processes, tiny models):

* one context's segments sharded over 2 spawned processes encode to the memory of one process
  (API, ``torch.multiprocessing.spawn``), and so does ``torchrun -m perk.encode --shard_context``;
* ``torchrun --standalone --nproc_per_node=2 -m perk.train`` ends with the meta-parameters, the
  FT-ICR adapter and the predictions of the single-process run on the same global batches;
* a 2-process checkpoint resumes on 1 process to the same result;
* the pieces: the one-buffer weighted all-reduce, shares of a batch, the world-size rule.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from safetensors.torch import load_file

from perk import PerkConfig, PerkModel
from perk.cli import run_main
from perk.distributed import Launch, all_reduce_mean, shard, shard_bounds, shard_rows
from perk.segments import context_segments
from tests.tiny_models import save_tiny_model, tiny_model_and_tokenizer, tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PERK_KERNELS_BACKEND": "torch", "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1",
       "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]

# Long enough for several segments per context, so each rank holds rows of both contexts.
CONTEXTS = [
    ["Mary went to the kitchen. John moved to the garden.", "Sandra took the apple there. " * 3, "Bo slept."],
    "The office is north of the hall. Bo picked up the football there. " * 2,
]
ENCODE_SETTINGS = dict(rank=4, segment_len=16, inner_steps=3, micro_batch_tokens=40, inner_lr=0.3,
                       inner_max_grad_norm=0.05)  # a small clip norm: clipping acts, on the all-reduced gradient


@pytest.fixture(autouse=True)
def _torch_kernels(monkeypatch):
    monkeypatch.setenv("PERK_KERNELS_BACKEND", "torch")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ----------------------------------------------------------------------------------------------
# One context sharded across ranks
# ----------------------------------------------------------------------------------------------


def _worker(rank: int, world_size: int, port: int, out: str) -> None:
    """One process of the spawned pair (one spawn for every check: starting processes is the cost)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        results = {}
        # rank 0: the mean over 1 item, rank 1: over 3 items → the mean over the 4.
        weight = 1.0 if rank == 0 else 3.0
        grads = {"a": torch.full((2, 2), 4.0 if rank == 0 else 8.0), "b": torch.tensor([rank * 1.0])}
        results["mean"] = all_reduce_mean(2.0 if rank == 0 else 6.0, grads, {"x": 1.0 + rank, "tok_s": 10.0},
                                          weight, Launch(rank=rank, world_size=world_size, backend="gloo"))
        for token_weighting in (False, True):
            model, tokenizer = tiny_model_and_tokenizer("llama")
            perk = PerkModel.from_base(model, tokenizer, PerkConfig(**ENCODE_SETTINGS, token_weighting=token_weighting))
            memory = perk.encode(CONTEXTS, group=dist.group.WORLD)
            results[token_weighting] = (memory.flat, memory.inner_losses, memory.stats.context_tokens)
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """What each of 2 spawned gloo processes computed (see :func:`_worker`)."""
    out = tmp_path_factory.mktemp("spawned")
    with pytest.MonkeyPatch.context() as patch:  # set up before the function-scoped autouse fixture
        patch.setenv("PERK_KERNELS_BACKEND", "torch")
        patch.setenv("OMP_NUM_THREADS", "1")  # 2 processes on a small CPU: no thread oversubscription
        mp.spawn(_worker, args=(2, free_port(), str(out)), nprocs=2)
    return [torch.load(out / f"rank{rank}.pt") for rank in range(2)]


@pytest.mark.parametrize("token_weighting", [False, True])
def test_context_sharded_over_two_processes_encodes_like_one(spawned, token_weighting):
    model, tokenizer = tiny_model_and_tokenizer("llama")
    single = PerkModel.from_base(model, tokenizer, PerkConfig(**ENCODE_SETTINGS, token_weighting=token_weighting))
    single = single.encode(CONTEXTS)
    assert single.inner_losses[1:].lt(single.inner_losses[:-1]).all(), "the inner steps do something"
    for rank in range(2):
        flat, losses, tokens = spawned[rank][token_weighting]
        torch.testing.assert_close(flat, single.flat, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(losses, single.inner_losses, rtol=1e-5, atol=1e-6)
        assert tokens == single.stats.context_tokens


def test_all_reduce_mean_weights_each_rank_by_its_share(spawned):
    for rank in range(2):
        loss, grads, info = spawned[rank]["mean"]
        assert loss == pytest.approx((2.0 + 3 * 6.0) / 4)
        assert torch.equal(grads["a"], torch.full((2, 2), (4.0 + 3 * 8.0) / 4))
        assert torch.equal(grads["b"], torch.tensor([0.75]))
        assert info == pytest.approx({"x": (1.0 + 3 * 2.0) / 4, "tok_s": 20.0})


def test_shares_of_rows_and_items_cover_everything_once():
    segments = context_segments(tiny_tokenizer(), CONTEXTS, 16, pad_id=0)
    rows = segments.input_ids.shape[0]
    shares = [shard_rows(segments, r, 3) for r in range(3)]
    assert torch.equal(torch.cat([s.input_ids for s in shares]), segments.input_ids)
    assert torch.equal(sum(s.loss_weights.sum() for s in shares), segments.loss_weights.sum())
    assert [shard_bounds(rows, r, 3)[1] - shard_bounds(rows, r, 3)[0] for r in range(3)] in (
        [rows // 3 + (r >= 3 - rows % 3) for r in range(3)],)
    assert [shard(list(range(5)), Launch(rank=r, world_size=2)) for r in range(2)] == [[0, 1], [2, 3, 4]]
