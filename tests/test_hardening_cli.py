"""The CLIs on damaged run directories and wrong arguments: one line on stderr and a non-zero exit,
before any expensive work, never a traceback or a silent wrong result (issue 17).

In-process (``run_main(main, argv)``) and on runs assembled without training (a saved config and
an untrained ``perk/``), so each case takes about a second.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from perk import PerkConfig, PerkModel
from perk import encode as perk_encode
from perk import eval as perk_eval
from perk import train as perk_train
from perk.config import TrainConfig
from perk.distributed import SINGLE_PROCESS
from perk.runs import (
    FTIC_ADAPTER,
    LOCK,
    METRICS,
    PERK_DIR,
    RESOLVED_CONFIG,
    MetricsLog,
    run_lock,
    save_resolved_config,
)
from perk.checkpoint import save_checkpoint
from perk.cli import UsageError, run_main
from perk.engine import CONFIG_NAME, WEIGHTS_NAME
from perk.tasks import generate, write_jsonl
from perk.trainer import Phase, all_tensors, run_phase
from tests.test_train_cli import tiny_args, tiny_model_dir  # noqa: F401  (a fixture)
from tests.tiny_models import tiny_model_and_tokenizer, tiny_tokenizer


@pytest.fixture(autouse=True)
def _torch_kernels(monkeypatch):
    monkeypatch.setenv("PERK_KERNELS_BACKEND", "torch")
    monkeypatch.setenv("TQDM_DISABLE", "1")


def untrained_run(tiny_model_dir, runs_dir, *extra):
    """A run directory as perk.train leaves it, with untrained meta-parameters (and FT-ICR adapter)."""
    _, config = perk_train.parse_args(tiny_args(tiny_model_dir, runs_dir) + list(extra))
    run = runs_dir / "run"
    save_resolved_config(run, config)
    model, tokenizer = tiny_model_and_tokenizer("llama")
    pm = PerkModel.from_base(model, tokenizer, config.perk)
    pm.save_pretrained(run / PERK_DIR)
    save_file({"adapter": pm.adapted.initial_adapter(torch.Generator().manual_seed(1))}, run / FTIC_ADAPTER)
    return run


@pytest.fixture
def run(tiny_model_dir, tmp_path):
    return untrained_run(tiny_model_dir, tmp_path / "runs")


def one_line_error(capsys, code, *fragments):
    """The CLI failed with exactly one ``prog: error: ...`` line naming ``fragments``, no traceback."""
    err = capsys.readouterr().err
    # transformers' own "Loading weights" progress bar may precede it; the error is one line.
    lines = [line for line in err.splitlines() if line.strip() and "Loading weights" not in line]
    assert code not in (0, None), err
    assert len(lines) == 1 and ": error: " in lines[0] and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def eval_args(run, *extra):
    return ["--checkpoint", str(run), "--device", "cpu", "--methods", "perk", "--n", "1", "--max_new_tokens", "2",
            *extra]


# --- 2. TrainConfig rates and clip norm: validated with the arguments, before the model is loaded --


@pytest.mark.parametrize(
    "key, value",
    [("max_grad_norm", "-1"), ("max_grad_norm", "0"), ("meta_lr", "nan"), ("inner_lr_meta_lr", "0"),
     ("ftic_lr", "inf"), ("meta_lr", "-3e-3")],
)
def test_train_refuses_bad_rates_and_clip_norms(tmp_path, capsys, key, value):
    # A model that does not exist: the argument must be refused before anything is loaded.
    argv = tiny_args(tmp_path / "no-model", tmp_path) + [f"--{key}={value}"]
    line = one_line_error(capsys, run_main(perk_train.main, argv, prog="perk.train"), key, "finite")
    assert "no such file" not in line
    assert not (tmp_path / "run").exists()


# --- 4. damaged run directories --------------------------------------------------------------------


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _nan_weights(path):
    tensors = load_file(path)
    tensors["inner_lr_log"][0, 0] = math.nan
    save_file(tensors, path)


def _without_layout(path):
    description = json.loads(path.read_text())
    del description["layout"]
    path.write_text(json.dumps(description))


DAMAGES = {
    "truncated weights": (f"{PERK_DIR}/{WEIGHTS_NAME}", _truncate, "not a readable safetensors"),
    "garbage weights": (f"{PERK_DIR}/{WEIGHTS_NAME}", lambda p: p.write_bytes(b"\xff" * 64), "not a readable safetensors"),
    "NaN weights": (f"{PERK_DIR}/{WEIGHTS_NAME}", _nan_weights, "inner_lr_log is not finite"),
    "no layout": (f"{PERK_DIR}/{CONFIG_NAME}", _without_layout, "layout"),
    "no weights": (f"{PERK_DIR}/{WEIGHTS_NAME}", lambda p: p.unlink(), "no such file"),
    "broken config.yaml": (RESOLVED_CONFIG, lambda p: p.write_text("meta_steps: [1\n  : :"), "not a readable run config"),
    "config.yaml not a mapping": (RESOLVED_CONFIG, lambda p: p.write_text("- 1\n"), "expected a mapping"),
    "bad value in config.yaml": (RESOLVED_CONFIG, lambda p: p.write_text("meta_steps: many\n"), "--meta_steps"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
@pytest.mark.parametrize("cli", ["eval", "encode"])
def test_damaged_run_directories_are_one_line_errors(run, tmp_path, capsys, damage, cli):
    name, spoil, message = DAMAGES[damage]
    spoil(run / name)
    if cli == "eval":
        code = run_main(perk_eval.main, eval_args(run), prog="perk.eval")
    else:
        context = tmp_path / "story.txt"
        context.write_text("Mary went to the kitchen.\n")
        code = run_main(perk_encode.main, ["--checkpoint", str(run), "--context", str(context), "--question", "Where?",
                                           "--device", "cpu"], prog="perk.encode")
    one_line_error(capsys, code, message)


def test_damaged_ftic_adapter_is_a_one_line_error(run, capsys):
    (run / FTIC_ADAPTER).write_bytes(b"\x00" * 10)
    code = run_main(perk_eval.main, eval_args(run, "--methods", "ftic"), prog="perk.eval")
    one_line_error(capsys, code, FTIC_ADAPTER, "not a readable safetensors")


def test_ftic_adapter_of_another_size_is_refused(run, capsys):
    save_file({"adapter": torch.zeros(7)}, run / FTIC_ADAPTER)
    code = run_main(perk_eval.main, eval_args(run, "--methods", "ftic"), prog="perk.eval")
    one_line_error(capsys, code, "adapter has shape (7,)")


def test_resume_refuses_broken_config_yaml(run, capsys):
    (run / RESOLVED_CONFIG).write_text("meta_steps: [1\n  : :")
    code = run_main(perk_train.main, ["--resume", "--name", "run", "--runs_dir", str(run.parent)], prog="perk.train")
    one_line_error(capsys, code, "not a readable run config")


@pytest.mark.parametrize("other", [dict(rank=4), dict(inner_steps=1, unroll_steps=1)])
def test_resume_refuses_checkpoints_of_another_model(run, capsys, other):
    """Checkpoint tensors of another shape would be broadcast by copy_ (or fail deep in torch)."""
    settings = {**yaml.safe_load((run / RESOLVED_CONFIG).read_text())["perk"], **other}
    model, tokenizer = tiny_model_and_tokenizer("llama")
    foreign = PerkModel.from_base(model, tokenizer, PerkConfig(**settings))
    state = {"phase": "perk", "phase_step": 1, "optimizer": {}, "scheduler": {}, "rng": {}}
    save_checkpoint(run, 1, all_tensors(foreign, foreign.adapted.initial_adapter(torch.Generator().manual_seed(1))), state)
    code = run_main(perk_train.main, ["--resume", "--name", "run", "--runs_dir", str(run.parent)], prog="perk.train")
    one_line_error(capsys, code, "step-00000001", "shape")


def test_a_non_finite_step_stops_before_updating_or_checkpointing(tmp_path):
    weight = torch.ones(3, requires_grad=True)
    phase = Phase("perk", {"w": weight}, {"w": 0.1}, lambda batch: (math.nan, {"w": torch.full((3,), math.nan)}, {}))
    config = TrainConfig(meta_steps=2, checkpoint_every=1)
    with pytest.raises(FloatingPointError, match="perk step 0: non-finite loss"):
        run_phase(phase, config=config, problems=[{}] * 4, run_dir=tmp_path,
                  metrics=MetricsLog(tmp_path / METRICS), checkpoint_tensors=lambda: {"w": weight})
    assert torch.equal(weight.detach(), torch.ones(3)) and not (tmp_path / "checkpoints").exists()


# --- issue 29, high: no code from a checkpoint, no run outside its folder ---------------------------


def test_resume_refuses_a_planted_pickle_with_one_line(run, capsys):
    """A state.pt pickle whose manifest matches (both writable by whoever can write the run) is
    never unpickled: one line, exit 1, the payload not run."""
    import hashlib
    import io
    import pathlib

    class RunsCode:
        def __reduce__(self):
            return (pathlib.Path.touch, (run / "pwned",))

    newest = save_checkpoint(run, 1, {}, {"phase": "perk", "phase_step": 1})
    buffer = io.BytesIO()
    torch.save({"phase": "perk", "phase_step": 1, "step": 1, "payload": RunsCode()}, buffer)
    (newest / "state.pt").write_bytes(buffer.getvalue())
    manifest = json.loads((newest / "manifest.json").read_text())
    manifest["sha256"]["state.pt"] = hashlib.sha256(buffer.getvalue()).hexdigest()
    (newest / "manifest.json").write_text(json.dumps(manifest))
    code = run_main(perk_train.main, ["--resume", "--name", "run", "--runs_dir", str(run.parent)], prog="perk.train")
    one_line_error(capsys, code, "state.pt", "pickle")
    assert not (run / "pwned").exists()


@pytest.mark.parametrize("name", ["..", ".", "", "../escape", "<absolute>", "a/b", "new\nline", " lead", "-x"])
def test_a_run_name_is_one_plain_folder_name(tiny_model_dir, tmp_path, capsys, name):
    runs = tmp_path / "repo" / "runs"
    runs.mkdir(parents=True)
    (tmp_path / "repo" / "perk").mkdir()
    (tmp_path / "repo" / "perk" / "__init__.py").write_text("source")
    if name == "<absolute>":  # inside tmp_path, so that a regression writes nothing outside it
        name = str(tmp_path / "absolute")
    argv = tiny_args(tiny_model_dir, runs) + [f"--name={name}"]
    one_line_error(capsys, run_main(perk_train.main, argv, prog="perk.train"), "name must be one plain folder name")
    assert {p.name for p in (tmp_path / "repo").iterdir()} == {"runs", "perk"}
    assert not (tmp_path / "absolute").exists()
    assert list(runs.iterdir()) == [] and (tmp_path / "repo" / "perk" / "__init__.py").read_text() == "source"


def test_a_run_directory_that_resolves_outside_runs_dir_is_refused(tiny_model_dir, tmp_path, capsys):
    runs, elsewhere = tmp_path / "runs", tmp_path / "elsewhere"
    runs.mkdir()
    elsewhere.mkdir()
    (runs / "run").symlink_to(elsewhere)
    code = run_main(perk_train.main, tiny_args(tiny_model_dir, runs), prog="perk.train")
    one_line_error(capsys, code, "outside runs_dir")
    assert list(elsewhere.iterdir()) == []


# --- 6. a torn last line of metrics.jsonl -----------------------------------------------------------


def test_torn_metrics_line_is_dropped_on_resume(tmp_path):
    path = tmp_path / METRICS
    records = [{"phase": "perk", "step": s, "loss": 1.0} for s in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"phase": "perk", "st')
    with pytest.warns(UserWarning, match="dropping 1 damaged line"):
        MetricsLog(path).truncate_after(0, 2)
    assert [json.loads(line) for line in path.read_text().splitlines()] == records[:2]
    MetricsLog(path).append(records[2])
    assert [json.loads(line) for line in path.read_text().splitlines()] == records


# --- 7. a start that fails leaves no run behind; empty data; --max_new_tokens checked first --------


def test_failed_data_generation_leaves_no_run_behind(tiny_model_dir, tmp_path, capsys, monkeypatch):
    def fail(config, tokenizer):
        raise ValueError("cannot place 3 supporting facts in 8 tokens")

    monkeypatch.setattr(perk_train, "make_problems", fail)
    code = run_main(perk_train.main, tiny_args(tiny_model_dir, tmp_path), prog="perk.train")
    one_line_error(capsys, code, "cannot place")
    assert not (tmp_path / "run" / RESOLVED_CONFIG).exists(), "the same --name must remain usable"
    monkeypatch.undo()
    monkeypatch.setattr(perk_train, "make_problems", lambda config, tokenizer: (_ for _ in ()).throw(ValueError("again")))
    code = run_main(perk_train.main, tiny_args(tiny_model_dir, tmp_path), prog="perk.train")
    assert "already holds a run" not in one_line_error(capsys, code, "again")


def test_eval_on_a_file_without_problems(run, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    code = run_main(perk_eval.main, eval_args(run, "--data", str(empty)), prog="perk.eval")
    one_line_error(capsys, code, "no problems")
    assert not (run / "eval").exists()


def test_eval_data_still_works(run, tmp_path):
    data = tmp_path / "one.jsonl"
    write_jsonl(data, generate("babilong/qa1", 1, 1024, tiny_tokenizer(), seed=3))
    assert run_main(perk_eval.main, eval_args(run, "--data", str(data), "--out", str(tmp_path / "out"))) == 0


@pytest.mark.parametrize("cli", [perk_eval, perk_encode])
def test_max_new_tokens_is_checked_before_loading(tmp_path, capsys, cli):
    context = tmp_path / "story.txt"
    context.write_text("Mary went home.\n")
    argv = ["--checkpoint", str(tmp_path / "no-run"), "--max_new_tokens", "0"]
    if cli is perk_encode:
        argv += ["--context", str(context), "--question", "Where?"]
    one_line_error(capsys, run_main(cli.main, argv), "--max_new_tokens: must be a positive integer")


def test_encode_checks_questions_against_the_window_before_encoding(run, tmp_path, capsys):
    context = tmp_path / "story.txt"
    context.write_text("Mary went home.\n")
    argv = ["--checkpoint", str(run), "--context", str(context), "--question", "Where?", "--max_new_tokens", "1020",
            "--device", "cpu"]
    one_line_error(capsys, run_main(perk_encode.main, argv), "max_new_tokens=1020", "window (1024)")
    assert "encoded" not in capsys.readouterr().out


# --- issue 29, medium and low -----------------------------------------------------------------------


def test_a_second_train_of_a_live_run_is_refused_naming_the_holder(tiny_model_dir, run, tmp_path, capsys):
    """3. One writer per run: while a perk.train holds the run (here this process, through the same
    lock), another start or --resume of it is one line naming the holder's pid; nothing is written."""
    runs = tmp_path / "runs"
    before = sorted(p.name for p in run.iterdir())
    with run_lock(run, SINGLE_PROCESS):
        code = run_main(perk_train.main, ["--resume", "--name", "run", "--runs_dir", str(runs)], prog="perk.train")
        one_line_error(capsys, code, f"{run} is in use by another perk.train (pid {os.getpid()})")
        with run_lock(runs / "new", SINGLE_PROCESS):
            code = run_main(perk_train.main, tiny_args(tiny_model_dir, runs, name="new"), prog="perk.train")
            one_line_error(capsys, code, "in use by another perk.train", f"pid {os.getpid()}")
    assert sorted(p.name for p in run.iterdir() if p.name != LOCK) == before
    assert not (runs / "new").exists(), "a run that wrote nothing leaves no folder behind"


def test_a_killed_holder_leaves_no_stale_lock(run):
    """3. The lock is the operating system's (flock): a holder killed with SIGKILL releases it."""
    import fcntl  # noqa: F401  (the holder below uses it)

    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time\nf = open(sys.argv[1], 'a+')\nfcntl.flock(f, fcntl.LOCK_EX)\n"
         "f.write('4242\\n'); f.flush(); print('held', flush=True); time.sleep(120)", str(run / LOCK)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UsageError, match="pid 4242"), run_lock(run, SINGLE_PROCESS):
            pass
    finally:
        holder.kill()
        holder.wait()
    with run_lock(run, SINGLE_PROCESS):
        assert (run / LOCK).read_text() == f"{os.getpid()}\n"


GOOD = {"context": ["Mary went to the kitchen."], "question": "Where is Mary?", "answer": "kitchen"}


def _database(questions) -> str:
    row = dict.fromkeys(["Student Id", "Student Name", "Year", "School", "Major"], "x") | {"Grade": 1}
    return json.dumps({"database": [row], "questions": questions})


@pytest.mark.parametrize(
    "option, content, message",
    [
        ("train_file", "", "holds no problems: nothing to train on"),  # 4.
        ("train_file", _database(["...", "..."]), "holds no problems: nothing to train on"),  # 4.
        ("eval_file", "\n", "holds no problems: nothing to evaluate"),  # 14.
    ],
)
def test_a_data_file_without_problems_is_refused_before_anything_is_written(tiny_model_dir, tmp_path, capsys,
                                                                             option, content, message):
    data = tmp_path / "data.json"
    data.write_text(content)
    runs = tmp_path / "runs"
    other = tmp_path / "other.jsonl"
    write_jsonl(other, [GOOD] * 3)
    files = {"train_file": other, "eval_file": other} | {option: data}
    argv = tiny_args(tiny_model_dir, runs) + [f"--data.{name}={path}" for name, path in files.items()]
    one_line_error(capsys, run_main(perk_train.main, argv, prog="perk.train"), str(data), message)
    assert not runs.exists() or list(runs.iterdir()) == [], "the name stays usable"


LONG = "x" * 1100  # the tiny tokenizer's one token a byte: longer than the 1024-token window alone


@pytest.mark.parametrize(
    "bad, extra, message",
    [
        ({"question": LONG + "?"}, [], "train.jsonl:3: question + answer are"),
        ({"answer": LONG}, [], "train.jsonl:3: question + answer are"),
        ({"support": [LONG]}, ["--data.support_targets", "true"], "train.jsonl:3: question + answer are"),
        ({"question": "x" * 1010 + "?"}, ["--data.eval_file", "<eval>"], "eval.jsonl:2: the question is"),
    ],
)
def test_records_that_cannot_fit_the_window_are_refused_naming_file_and_line(tiny_model_dir, tmp_path, capsys,
                                                                              bad, extra, message):
    """5. Checked when the file is read, tokenized lengths included (not mid-training, naming a
    batch position, and at the same step on every --resume)."""
    good = GOOD | {"support": ["Mary went to the kitchen."]}
    train, evaluation = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    write_jsonl(train, [good, good, good | bad if "<eval>" not in extra else good, good, good])
    write_jsonl(evaluation, [good, good | bad])
    extra = [str(evaluation) if e == "<eval>" else e for e in extra]
    argv = tiny_args(tiny_model_dir, tmp_path / "runs") + ["--data.train_file", str(train), "--data.eval_problems", "2",
                                                           *extra]
    one_line_error(capsys, run_main(perk_train.main, argv, prog="perk.train"), message, "model window (1024)")
    assert not (tmp_path / "runs").exists() or list((tmp_path / "runs").iterdir()) == []


def test_a_finished_run_is_used_without_its_training_data(tiny_model_dir, tmp_path, capsys):
    """6. Loading a run does not read (or need) its data files; only evaluating on the run's own
    data.eval_file does, and without it that is one line."""
    data = tmp_path / "train.jsonl"
    write_jsonl(data, [GOOD] * 3)
    run = untrained_run(tiny_model_dir, tmp_path / "runs", "--data.train_file", str(data), "--data.eval_file", str(data))
    other = tmp_path / "other.jsonl"
    data.rename(other)
    out = tmp_path / "out"
    assert run_main(perk_eval.main, eval_args(run, "--data", str(other), "--out", str(out)), prog="perk.eval") == 0
    assert (out / "eval.json").is_file()
    story = tmp_path / "story.txt"
    story.write_text("Mary went to the kitchen.\n")
    argv = ["--checkpoint", str(run), "--context", str(story), "--question", "Where?", "--device", "cpu",
            "--max_new_tokens", "2"]
    assert run_main(perk_encode.main, argv, prog="perk.encode") == 0
    capsys.readouterr()
    code = run_main(perk_eval.main, eval_args(run), prog="perk.eval")
    one_line_error(capsys, code, f"the run's data.eval_file {data} no longer exists", "--data")


def test_world_size_without_rank_is_one_line(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """16. WORLD_SIZE set by hand without RANK (not by torchrun): one line, not a KeyError."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    code = run_main(perk_train.main, tiny_args(tiny_model_dir, tmp_path / "runs"), prog="perk.train")
    one_line_error(capsys, code, "WORLD_SIZE=2 is set but RANK is not", "torchrun")


def test_a_collapsed_inner_loop_stops_the_run(tmp_path):
    """17. Inner steps so large that the adapted model predicts the uniform distribution: the
    meta-loss sits at ln(vocab) with an exactly zero meta-gradient (measured on the tiny model with
    --perk.inner_lr 1e6: 5.556828 vs ln 259 = 5.556828, grad 0). The run stops before the step, with
    a message saying what to change, instead of training for nothing."""
    model, tokenizer = tiny_model_and_tokenizer("llama")
    pm = PerkModel.from_base(model, tokenizer, PerkConfig(rank=2))
    assert perk_train.perk_phase(pm, TrainConfig()).uniform_loss == pytest.approx(math.log(259))
    weight = torch.ones(3, requires_grad=True)
    phase = Phase("perk", {"w": weight}, {"w": 0.1}, lambda batch: (math.log(259) + 1e-6, {"w": torch.zeros(3)}, {}),
                             uniform_loss=math.log(259))
    config = TrainConfig(meta_steps=2, checkpoint_every=1)
    with pytest.raises(FloatingPointError, match=r"perk step 0: the inner loop collapsed.*259-token vocabulary.*"
                                                 r"lower perk.inner_lr or perk.inner_weight_decay"):
        run_phase(phase, config=config, problems=[{}] * 4, run_dir=tmp_path,
                  metrics=MetricsLog(tmp_path / METRICS), checkpoint_tensors=lambda: {"w": weight})
    assert not (tmp_path / "checkpoints").exists()
    # A zero gradient away from the uniform level, or the uniform level with a gradient, trains on.
    for loss, grad in ((1.0, torch.zeros(3)), (math.log(259), torch.ones(3))):
        phase.loss_and_grads = lambda batch, loss=loss, grad=grad: (loss, {"w": grad}, {})
        run_phase(phase, config=config, problems=[{}] * 4, run_dir=tmp_path / str(loss),
                             metrics=MetricsLog(tmp_path / METRICS), checkpoint_tensors=lambda: {"w": weight})


def test_a_checkpoint_state_missing_keys_falls_back_to_the_previous_one(run, capsys):
    """19. A checkpoint that matches its manifest and decodes, but whose state lacks 'phase': skipped
    with a warning for the previous checkpoint (here one of another model, whose one-line shape error
    shows that it is the one resumed from), never a KeyError traceback."""
    settings = {**yaml.safe_load((run / RESOLVED_CONFIG).read_text())["perk"], "rank": 4}
    model, tokenizer = tiny_model_and_tokenizer("llama")
    foreign = PerkModel.from_base(model, tokenizer, PerkConfig(**settings))
    tensors = all_tensors(foreign, foreign.adapted.initial_adapter(torch.Generator().manual_seed(1)))
    save_checkpoint(run, 1, tensors, {"phase": "perk", "phase_step": 1, "optimizer": {}, "scheduler": {}, "rng": {}})
    save_checkpoint(run, 2, tensors, {"phase_step": 2, "optimizer": {}, "scheduler": {}, "rng": {}})
    with pytest.warns(UserWarning, match=r"step-00000002: matches its checksums but its state names no phase"):
        code = run_main(perk_train.main, ["--resume", "--name", "run", "--runs_dir", str(run.parent)], prog="perk.train")
    one_line_error(capsys, code, "step-00000001", "shape")
