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
import shutil
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
from perk.distributed import Launch, all_reduce_mean, check_same_everywhere, shard, shard_bounds, shard_rows
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


@pytest.fixture(autouse=True)
def _one_thread():
    # In-process runs beside the 2 worker processes' single threads: on a small, shared CPU two
    # intra-op threads per process slow a tiny model's passes down several times.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def encoder(token_weighting: bool) -> PerkModel:
    """The PerkModel every rank and the single process encode with. With token weighting its output
    layer (zero at init, so every weight 1) is perturbed: weights from about 0.3 to 1.8, so that an
    uneven weighting is what gets sharded."""
    model, tokenizer = tiny_model_and_tokenizer("llama")
    perk = PerkModel.from_base(model, tokenizer, PerkConfig(**ENCODE_SETTINGS, token_weighting=token_weighting))
    if token_weighting:
        with torch.no_grad():
            out = perk.weighting.out
            out.weight.copy_(torch.randn(out.weight.shape, generator=torch.Generator().manual_seed(5)) * 3.0)
    return perk


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
        launch = Launch(rank=rank, world_size=world_size, backend="gloo")
        check_same_everywhere("the config", "seed: 1\n", launch)  # the same everywhere: passes
        try:
            check_same_everywhere("the resolved config", f"seed: {rank}\nmeta_lr: 0.003\n", launch)
        except ValueError as err:
            results["differing config"] = str(err)
        results["mean"] = all_reduce_mean(2.0 if rank == 0 else 6.0, grads, {"x": 1.0 + rank, "tok_s": 10.0},
                                          weight, Launch(rank=rank, world_size=world_size, backend="gloo"))
        for token_weighting in (False, True):
            memory = encoder(token_weighting).encode(CONTEXTS, process_group=dist.group.WORLD)
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
    perk = encoder(token_weighting)
    if token_weighting:
        weights = perk._token_weights(context_segments(perk.tokenizer, CONTEXTS, ENCODE_SETTINGS["segment_len"]))
        assert weights.max() - weights.min() > 0.5, "uneven weights"
    single = perk.encode(CONTEXTS)
    assert single.inner_losses[1:].lt(single.inner_losses[:-1]).all(), "the inner steps do something"
    for rank in range(2):
        flat, losses, tokens = spawned[rank][token_weighting]
        torch.testing.assert_close(flat, single.flat, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(losses, single.inner_losses, rtol=1e-5, atol=1e-6)
        assert tokens == single.stats.context_tokens


def test_processes_with_different_configs_are_refused_on_every_rank(spawned):
    """Issue 29, 15: per-rank options that differ (a seed, a rate: same shapes, so no collective
    would fail) are found by one all-gather of the config's hash, and every rank stops."""
    for rank in range(2):
        assert spawned[rank]["differing config"] == (
            "the resolved config differs between the processes (rank 1 vs rank 0): give every process the same options"
        )


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


# ----------------------------------------------------------------------------------------------
# torchrun -m perk.train / -m perk.encode
# ----------------------------------------------------------------------------------------------


def train_args(model_dir, runs_dir, name):
    # 4 problems a step (2 per process), 3 held-out problems (shares of 1 and 2): every step and
    # the evaluation are sharded; fp32 base so the single-process run computes the same sums.
    return [
        "--model", str(model_dir), "--runs_dir", str(runs_dir), "--name", name, "--device", "cpu",
        "--base_dtype", "float32", "--meta_steps", "2", "--meta_batch", "4", "--checkpoint_every", "1",
        "--keep_checkpoints", "4", "--eval_batch", "2", "--max_new_tokens", "3", "--data.context_tokens", "1024",
        "--data.train_problems", "6", "--data.eval_problems", "3", "--perk.rank", "2", "--perk.segment_len", "64",
        "--perk.inner_steps", "2", "--perk.unroll_steps", "1", "--perk.micro_batch_tokens", "512",
    ]


def torchrun(module, args, timeout=300):
    return subprocess.run([*TORCHRUN, "-m", module, *args], env=ENV, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """``runs/two``: perk.train on 2 processes (torchrun, gloo), PERK and FT-ICR phases."""
    runs = tmp_path_factory.mktemp("runs")
    out = torchrun("perk.train", train_args(tiny_model_dir, runs, "two"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("perk.train: run ") == 1, "rank 0 alone prints"
    assert "(2 processes, gloo)" in out.stdout
    return runs


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(run, reference, atol=2e-5):
    """The same meta-parameters, FT-ICR adapter and predictions. Adam's first steps move every
    element by about lr = 1e-3 whatever its gradient's size, so float noise in a near-zero
    gradient element shows as ~1e-6 in the parameters: atol is 2% of one step."""
    for name in ("perk/perk_meta.safetensors", "ftic_adapter.safetensors"):
        got, want = load_file(run / name), load_file(reference / name)
        assert got.keys() == want.keys()
        for key in got:
            torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=atol, msg=f"{name}:{key}")
    for got, want in zip(metrics(run), metrics(reference), strict=True):
        assert (got["phase"], got["step"]) == (want["phase"], want["step"])
        for key in ("loss", "grad_norm", "lr", "inner_first", "inner_last"):
            if key in want:
                # rel 1e-4: after the first step the parameters differ by that noise, so do the gradients.
                assert got[key] == pytest.approx(want[key], rel=1e-4), (key, got, want)
    predictions = [json.loads((r / "results.json").read_text())["predictions"] for r in (run, reference)]
    assert [(p["method"], p["question"], p["prediction"]) for p in predictions[0]] == [
        (p["method"], p["question"], p["prediction"]) for p in predictions[1]]


def test_two_processes_train_like_one_on_the_same_global_batches(runs, tiny_model_dir):
    from perk.train import main

    assert main(train_args(tiny_model_dir, runs, "one")) == 0
    two, one = runs / "two", runs / "one"
    assert_same_run(two, one)
    assert (two / "config.yaml").read_text().startswith("# launched on 2 processes (torchrun)\n")
    assert (one / "config.yaml").read_text().startswith("# launched on 1 process\n")
    assert yaml.safe_load((two / "config.yaml").read_text())["meta_batch"] == 4
    assert {r["world_size"] for r in metrics(two)} == {2} and {r["world_size"] for r in metrics(one)} == {1}
    assert "on cpu (2 processes, gloo)" in (two / "results.md").read_text()
    assert len(json.loads((two / "results.json").read_text())["predictions"]) == 3 * 3  # every problem, every method


def test_a_two_process_checkpoint_resumes_on_one_process(runs, tiny_model_dir, capsys):
    from perk.train import main

    # The two-process run as it was after its first PERK step: its first checkpoint only.
    resumed = runs / "resumed"
    shutil.copytree(runs / "two", resumed)
    for path in [resumed / "perk", resumed / "ftic_adapter.safetensors", resumed / "results.json"]:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    for checkpoint in sorted((resumed / "checkpoints").iterdir())[1:]:
        shutil.rmtree(checkpoint)
    capsys.readouterr()
    assert main(["--resume", "--name", "resumed", "--runs_dir", str(runs)]) == 0
    assert "resuming from step-00000001 (perk step 1; written by 2, continued by 1 processes)" in capsys.readouterr().out
    assert_same_run(resumed, runs / "two")
    assert [r["world_size"] for r in metrics(resumed)] == [2, 1, 1, 1]


def test_sharded_encode_under_torchrun_writes_the_memory_of_one_process(runs, tmp_path, capsys):
    from perk.encode import main

    context = tmp_path / "book.txt"
    context.write_text("\n\n".join(f"Mary went to room {i}. John moved to the garden." for i in range(30)))
    args = ["--checkpoint", str(runs / "two"), "--context", str(context), "--question", "Where is Mary?",
            "--max_new_tokens", "3"]
    out = torchrun("perk.encode", [*args, "--shard_context", "--save_memory", str(tmp_path / "sharded")])
    assert out.returncode == 0, out.stderr[-3000:]
    assert main([*args, "--save_memory", str(tmp_path / "single")]) == 0
    single_out = capsys.readouterr().out
    assert out.stdout.count("Q: Where is Mary?") == 1, "rank 0 alone answers"
    # The same context losses and answer (the printed lines, less the timing and the folder).
    assert out.stdout.split("step: ")[1].split("memory saved")[0] == single_out.split("step: ")[1].split("memory saved")[0]
    sharded, single = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("sharded", "single"))
    for key in single:
        torch.testing.assert_close(sharded[key], single[key], rtol=1e-5, atol=1e-6)


def test_meta_batch_must_be_a_multiple_of_the_world_size(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from perk.train import main

    # Checked before anything is loaded or written (a stand-in launch: no process group is joined).
    monkeypatch.setattr("perk.train.from_torchrun", lambda device: Launch(rank=0, world_size=3, device=device))
    code = run_main(main, train_args(tiny_model_dir, tmp_path, "bad"), prog="perk.train")
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "meta_batch=4 is not a multiple of the world size (3 processes)" in err and "use meta_batch=6" in err
    assert not (tmp_path / "bad").exists()
