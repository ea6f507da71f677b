"""The CLIs on damaged run directories and wrong arguments: one line on stderr and a non-zero exit,
before any expensive work, never a traceback or a silent wrong result (issue 17).

In-process (``run_main(main, argv)``) and on runs assembled without training (a saved config and
an untrained ``perk/``), so each case takes about a second.
"""

import json
import math

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from perk import PerkConfig, PerkModel
from perk import encode as perk_encode
from perk import eval as perk_eval
from perk import train as perk_train
from perk.runs import (
    FTIC_ADAPTER,
    METRICS,
    PERK_DIR,
    RESOLVED_CONFIG,
    MetricsLog,
    TrainConfig,
    save_resolved_config,
)
from perk.checkpoint import save_checkpoint
from perk.cli import run_main
from perk.engine import CONFIG_NAME, WEIGHTS_NAME
from perk.tasks import generate, write_jsonl
from perk.train import all_tensors
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
    phase = perk_train.Phase("perk", {"w": weight}, {"w": 0.1},
                             lambda batch: (math.nan, {"w": torch.full((3,), math.nan)}, {}))
    config = TrainConfig(meta_steps=2, checkpoint_every=1)
    with pytest.raises(FloatingPointError, match="perk step 0: non-finite loss"):
        perk_train.run_phase(phase, config=config, problems=[{}] * 4, run_dir=tmp_path,
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
