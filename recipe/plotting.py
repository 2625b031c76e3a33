"""Training curves as a PNG next to the checkpoints, readable without TensorBoard.

`plot_training_curves(trainer.state.log_history, output_dir / "training_curves.png")`
draws up to three panels over the optimizer step:

  1. loss: the training loss ("loss") and, when evaluated, the eval loss ("eval_loss") on
     the same axis, since their gap is what shows over- or underfitting;
  2. learning rate ("learning_rate"), to see warmup and decay;
  3. eval metrics: every other "eval_*" number (e.g. eval_accuracy, eval_anls: the recipes log
     the task metric before, during and after training), except the timing keys the Trainer
     adds (eval_runtime, eval_*_per_second, ...).

Panels without data are left out; with no data at all nothing is written. A NaN or inf
value (a diverged loss) leaves a gap in its line and is counted in the legend, so a run
whose loss is all NaN still gets a plot that says so.

Figures are built with matplotlib's object API on the Agg canvas, never through pyplot:
GPU nodes have no display, pyplot's global backend choice belongs to the user (a notebook
importing the recipe keeps its inline backend), and a figure pyplot never registered can't
leak. The PNG is written to a temporary file in the target directory and renamed over the
target, so a crash mid-write never leaves a truncated plot.
"""

from __future__ import annotations

import math
import os
import uuid
from numbers import Real
from pathlib import Path
from typing import Any, Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

__all__ = ["plot_training_curves", "eval_metric_keys"]

# Keys the Trainer logs under the eval prefix that measure speed, not quality
# (transformers.trainer_utils.speed_metrics and Trainer.evaluate).
_TIMING_SUFFIXES = (
    "_runtime",
    "_samples_per_second",
    "_steps_per_second",
    "_tokens_per_second",
    "_model_preparation_time",
    "_jit_compilation_time",
)

Series = dict[str, tuple[list[float], list[float]]]  # label -> (steps, values)


def _is_number(value: Any) -> bool:
    # bool is an int subclass but never a metric value; numpy scalars are Real.
    return isinstance(value, Real) and not isinstance(value, bool)


def eval_metric_keys(log_history: Sequence[Mapping[str, Any]]) -> list[str]:
    """The quality metrics in `log_history`: numeric "eval_*" keys except eval_loss and timings.

    In first-seen order, so colours stay stable between plots of the same run.
    """
    keys: dict[str, None] = {}
    for entry in log_history:
        for key, value in entry.items():
            if (
                key.startswith("eval_")
                and key != "eval_loss"
                and not key.endswith(_TIMING_SUFFIXES)
                and _is_number(value)
            ):
                keys[key] = None
    return list(keys)


def _series(log_history: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> tuple[Series, dict[str, int]]:
    """Collect (step, value) per key; count the non-finite values that cannot be drawn."""
    series: Series = {}
    dropped: dict[str, int] = {}
    for index, entry in enumerate(log_history):
        present = [key for key in keys if _is_number(entry.get(key))]
        if not present:
            continue
        step = entry.get("step")
        if not _is_number(step):
            raise ValueError(
                f"log_history[{index}] has {present[0]!r} but no numeric 'step' "
                f"(got {step!r}); pass transformers.TrainerState.log_history, whose entries all have one"
            )
        for key in present:
            value = float(entry[key])
            if not math.isfinite(value):
                # A NaN/inf loss can't be drawn but must not vanish: NaN breaks the line there,
                # and the legend says how many points are missing.
                dropped[key] = dropped.get(key, 0) + 1
                value = math.nan
            steps, values = series.setdefault(key, ([], []))
            steps.append(float(step))
            values.append(value)
    return series, dropped


_DISPLAY_NAMES = {"loss": "train loss", "learning_rate": "learning rate"}


def _label(key: str, dropped: Mapping[str, int]) -> str:
    name = _DISPLAY_NAMES.get(key, key)
    count = dropped.get(key, 0)
    return f"{name} ({count} non-finite not shown)" if count else name


def plot_training_curves(
    log_history: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    title: str | None = None,
) -> Path | None:
    """Write a PNG of loss, learning rate and eval metrics against the training step.

    Args:
        log_history: `transformers.TrainerState.log_history` (a list of dicts with "step"
            and any of "loss", "learning_rate", "eval_loss", "eval_<metric>", ...).
        path: where to write the PNG; its directory is created if needed, and an existing
            file is replaced atomically.
        title: figure title, e.g. the task and training mode.

    Returns:
        The path written, or None when there was nothing to plot (no file is written).

    Raises:
        ValueError: an entry with values to plot has no numeric "step".
    """
    metric_keys = eval_metric_keys(log_history)
    series, dropped = _series(log_history, ["loss", "eval_loss", "learning_rate", *metric_keys])
    # Training logs come every few steps, so lines; evaluations are sparse, so lines with dots.
    train_style = {}
    eval_style = {"marker": "o", "markersize": 4}

    def lines(keys, style):
        # Points between NaN gaps, or a lone point, have no segment to draw: give them dots.
        return [
            (_label(key, dropped), *series[key], style if key not in dropped else {**eval_style, **style})
            for key in keys
            if key in series
        ]

    panels = [  # (y label, [(legend label, steps, values, style), ...])
        ("loss", lines(["loss"], train_style) + lines(["eval_loss"], eval_style)),
        ("learning rate", lines(["learning_rate"], train_style)),
        ("eval metric", lines(metric_keys, eval_style)),
    ]
    panels = [(ylabel, panel_lines) for ylabel, panel_lines in panels if panel_lines]
    if not panels:
        return None

    figure = Figure(figsize=(8, 2.6 * len(panels) + 0.6), layout="constrained")
    FigureCanvasAgg(figure)  # explicit Agg: no display needed, independent of pyplot's backend
    axes = figure.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (ylabel, panel_lines) in zip(axes, panels):
        for label, steps, values, style in panel_lines:
            if len(steps) == 1 and "marker" not in style:
                style = {**style, **eval_style}
            ax.plot(steps, values, label=label, **style)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize="small")
        if ylabel == "learning rate":
            # Rates like 2e-5 otherwise print as 0.00002 or with a detached offset label.
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    axes[-1].set_xlabel("step")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 2.5, 5, 10]))  # steps are whole numbers
    if title:
        figure.suptitle(title)

    path = Path(path)
    _save_atomically(figure, path)
    return path


def _save_atomically(figure: Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same directory so os.replace is a rename on one filesystem; opened with "xb" (not
    # mkstemp) so the file gets the usual umask permissions rather than 0600.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as handle:
            figure.savefig(handle, format="png", dpi=120)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
