"""What a task script supplies (`Task`) and its one call into the shared runner (`Task.main`).

Light on purpose: a task script imports only this, so `--help`, a flag error or `--dry_run`
answer before torch and the trainer's libraries load (recipe.runner, imported by `run` once the
flags are good).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, NoReturn, Sequence

from . import quiet_libraries
from .args import DataArguments, ModelArguments
from .errors import FlagError, cli
from .flag_parser import Flags, parse_flags

if TYPE_CHECKING:
    from .records import Conversation

__all__ = ["Task", "run", "task_flags"]


@dataclass
class Task:
    """What a task script supplies.

    load_data(data_args, model_args) -> (train conversations or None with --eval_only, eval conversations)
    score(predictions, references) -> float, references being every accepted answer per example.
    from_flags(data_args) -> Task: for a task named and scored by its flags (finetune_hf_trainer_custom.py's
    --task_name, --metric), the task those flags describe; its name goes into every output.
    script: the script's file name, for the model card (default finetune_hf_trainer_<name>.py).
    objective: what training optimises, by its name in recipe.runner.OBJECTIVES: "supervised"
    (finetuning, labels on the answers) or "preference" (DPO on pairs); or a recipe.objective.Objective.
    """

    name: str
    metric: str
    load_data: Callable[[DataArguments, ModelArguments], tuple[Sequence[Conversation] | None, Sequence[Conversation]]]
    score: Callable[[list[str], list[list[str]]], float]
    data_args_class: type = DataArguments
    defaults: dict = field(default_factory=dict)
    from_flags: Callable[[DataArguments], Task] | None = None
    script: str | None = None
    objective: str | Any = "supervised"

    def resolve(self, data_args) -> Task:
        return self.from_flags(data_args) if self.from_flags is not None else self

    def run(self, argv: list[str] | None = None) -> dict:
        """Runs the task with `argv` (default: the command line); returns the results."""
        return run(self, argv)

    def main(self, argv: list[str] | None = None) -> NoReturn:
        """A task script's `__main__`: runs the task and exits 0, or 2 with one line for a user
        error (recipe.errors.cli)."""
        sys.exit(cli(lambda: self.run(argv)))


def task_flags(task: Task, argv: list[str] | None = None) -> Flags:
    """The task's flags, parsed with its defaults and checked (recipe.flag_parser.parse_flags). A chosen
    --log_level shows again what recipe/__init__.py hides by default (before the libraries load)."""
    late = (lambda data_args: {"metric_for_best_model": task.resolve(data_args).metric}) if task.from_flags else None
    flags = parse_flags(task.data_args_class, argv, {"metric_for_best_model": task.metric, **task.defaults},
                        late_defaults=late)
    metric, chosen = task.resolve(flags.data).metric, flags.training.metric_for_best_model
    if chosen not in (None, metric, f"eval_{metric}"):
        # (the Trainer would look it up in the first evaluation's results, during training, and fail there)
        raise FlagError(f"--metric_for_best_model {chosen}: evaluations during training report the task's metric, "
                        f"{metric}; drop the flag (it defaults to {metric})")
    if flags.training.log_level != "passive":
        quiet_libraries(False)
    return flags


def run(task: Task, argv: list[str] | None = None) -> dict:
    """Parses and checks the flags, then runs the task (recipe.runner.Runner) or, with --dry_run,
    prints what the run would cost (recipe.dry_run) without loading weights."""
    flags = task_flags(task, argv)
    if flags.training.dry_run:
        objective = getattr(task.objective, "name", task.objective)  # (a name, or an Objective)
        if objective != "supervised":
            raise FlagError(f"--dry_run plans supervised finetuning; {task.name} trains with the {objective!r} "
                            "objective, which it does not model: try a few steps with --max_steps instead")
        from .dry_run import dry_run

        return dry_run(task, flags)
    from .runner import Runner

    return Runner.from_flags(task, flags).run()
