"""The problems a run trains and is evaluated on, as its :class:`~perk.config.DataConfig` says.

Generated offline (:mod:`perk.tasks`: the config's task, context length, order markers and
document indices), or read from dataset files (the official PERK data as it comes), optionally as
support-then-answer targets. :func:`make_problems` is what ``python -m perk.train`` uses;
``python -m perk.eval`` generates with :func:`generate_problems` and converts with
:func:`as_trained`, so an evaluation sees problems made the way the run's were.
"""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedTokenizerBase

from perk.adapted_model import AdaptedModel
from perk.cli import UsageError
from perk.config import DataConfig, TrainConfig
from perk.methods import answer_budget, check_problem_fits
from perk.tasks import generate, read_located_problems, with_support_target


def generate_problems(data: DataConfig, tokenizer: PreTrainedTokenizerBase, n: int, seed: int, *,
                      task: str | None = None, context_tokens: int | None = None,
                      depth: float | None = None) -> list[dict]:
    """``n`` problems generated with ``seed`` as ``data`` says; ``task``, ``context_tokens`` and
    ``depth`` (of the first supporting fact, in %) override the config's."""
    problems = generate(task or data.task, n, context_tokens or data.context_tokens, tokenizer, seed=seed,
                        depth=depth, order_markers=data.order_markers, doc_index=data.doc_index)
    return [p.to_json() for p in problems]


def as_trained(data: DataConfig, problem: dict) -> dict:
    """``problem`` with the answer a run of ``data`` trains on: the support-then-answer target
    with ``data.support_targets``, else unchanged."""
    return with_support_target(problem) if data.support_targets else problem


def check_data_files(data: DataConfig) -> None:
    """The dataset files exist (UsageError otherwise). Checked where they are read (perk.train),
    not when a run's config is loaded: a finished run is used without its training data."""
    for name in ("train_file", "eval_file"):
        if getattr(data, name) is not None and not Path(getattr(data, name)).is_file():
            raise UsageError(f"data.{name}: no such file: {getattr(data, name)}")


def make_problems(config: TrainConfig, adapted: AdaptedModel) -> tuple[list[dict], list[dict]]:
    """(training, held-out) problems: generated, or read from data.train_file / data.eval_file;
    as support-then-answer targets with data.support_targets.

    Every problem the run will use is checked here, before anything is written: none of the sets is
    empty, and each problem's rows fit the model window (its question prompt and its answer for
    training, its question prompt and the answer length limit for the evaluation); a problem that
    does not is a UsageError naming where it is (``file:line``), not a failure mid-training."""
    data = config.data
    tokenizer = adapted.tokenizer

    def generated(n: int, seed: int) -> list[tuple[str, dict]]:
        problems = generate_problems(data, tokenizer, n, seed)
        return [(f"generated {data.task} problem {i} (seed {seed})", p) for i, p in enumerate(problems)]

    if data.train_file is None:
        train = generated(data.train_problems, data.seed)
    else:
        # With an eval file only the first train_problems are used (the file is read no further);
        # without one, the last eval_problems of the whole file are held out.
        train = read_located_problems(data.train_file, limit=data.train_problems if data.eval_file else None)
        if not train:
            raise UsageError(f"data.train_file {data.train_file} holds no problems: nothing to train on")
    if data.eval_file is not None:
        held_out = read_located_problems(data.eval_file, limit=data.eval_problems)
        if not held_out:
            raise UsageError(f"data.eval_file {data.eval_file} holds no problems: nothing to evaluate")
    elif data.train_file is not None:
        if len(train) <= data.eval_problems:
            raise UsageError(
                f"data.train_file holds {len(train)} problems, too few to hold out data.eval_problems="
                f"{data.eval_problems} of them: pass data.eval_file or a smaller data.eval_problems"
            )
        train, held_out = train[: -data.eval_problems], train[-data.eval_problems :]
    else:
        held_out = generated(data.eval_problems, data.seed + 1)
    train = [(where, as_trained(data, p)) for where, p in train[: data.train_problems]]
    held_out = [(where, as_trained(data, p)) for where, p in held_out]
    budget = answer_budget(tokenizer, [p for _, p in held_out], config.max_new_tokens)
    for problems, answer_tokens in ((train, None), (held_out, budget)):
        for where, problem in problems:
            try:
                check_problem_fits(adapted, problem, answer_tokens=answer_tokens)
            except ValueError as err:
                raise UsageError(f"{where}: {err}") from None
    return [p for _, p in train], [p for _, p in held_out]
