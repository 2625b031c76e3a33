"""Training-curve PNGs from a Trainer's log_history."""

import os

import matplotlib.pyplot as plt
import pytest
from PIL import Image

from recipe.plotting import eval_metric_keys, plot_training_curves

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def realistic_log_history(steps=300, log_every=10, eval_every=100, warmup=30, lr=2e-5):
    """What transformers.Trainer leaves in state.log_history for a short run with evaluation."""
    history = []
    for step in range(log_every, steps + 1, log_every):
        rate = lr * step / warmup if step <= warmup else lr * (steps - step) / (steps - warmup)
        history.append(
            {"loss": 2.5 * 0.99**step + 0.3, "grad_norm": 1.5, "learning_rate": rate, "epoch": step / 100, "step": step}
        )
        if step % eval_every == 0:
            history.append(
                {
                    "eval_loss": 2.4 * 0.992**step + 0.45,
                    "eval_anls": 0.4 + 0.4 * (1 - 0.99**step),
                    "eval_runtime": 12.5,
                    "eval_samples_per_second": 8.0,
                    "eval_steps_per_second": 1.0,
                    "epoch": step / 100,
                    "step": step,
                }
            )
    history.append(
        {
            "train_runtime": 100.0,
            "train_samples_per_second": 24.0,
            "train_steps_per_second": 3.0,
            "total_flos": 1e15,
            "train_loss": 0.8,
            "epoch": steps / 100,
            "step": steps,
        }
    )
    return history


def read_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.load()  # decodes the whole file: a truncated PNG fails here
        return image.format, image.size


def test_realistic_history_writes_a_png_with_three_panels(tmp_path):
    path = tmp_path / "training_curves.png"
    written = plot_training_curves(
        realistic_log_history(),
        path,
        title="DocVQA, LoRA",
    )
    assert written == path
    image_format, (width, height) = read_png(path)
    assert image_format == "PNG"
    # 8 inches wide at 120 dpi; three panels make it taller than wide.
    assert 800 <= width <= 1100 and height > width
    assert plt.get_fignums() == []
    # Only the PNG: the temporary file was renamed, not left behind.
    assert [p.name for p in tmp_path.iterdir()] == ["training_curves.png"]


def test_empty_history_writes_nothing(tmp_path):
    path = tmp_path / "curves.png"
    assert plot_training_curves([], path) is None
    # Entries without anything plottable (the final train summary) count as empty too.
    assert plot_training_curves([{"train_runtime": 1.0, "train_loss": 0.5, "epoch": 1.0, "step": 5}], path) is None
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_eval_only_history_gives_only_the_metric_panel(tmp_path):
    history = [
        {"eval_accuracy": 0.52, "eval_runtime": 3.0, "eval_steps_per_second": 2.0, "epoch": 0.0, "step": 0},
        {"eval_accuracy": 0.74, "eval_runtime": 3.0, "eval_steps_per_second": 2.0, "epoch": 1.0, "step": 50},
    ]
    path = plot_training_curves(history, tmp_path / "eval.png")
    _, (width, height) = read_png(path)
    # One panel: wider than tall; three panels (above) are taller than wide.
    assert height < width
    assert plt.get_fignums() == []


def test_metric_keys_exclude_loss_timings_and_non_numbers():
    history = realistic_log_history() + [
        {"eval_model_preparation_time": 0.1, "eval_tokens_per_second": 5.0, "eval_note": "x", "step": 1}
    ]
    assert eval_metric_keys(history) == ["eval_anls"]


def test_existing_file_is_replaced_atomically(tmp_path):
    path = tmp_path / "curves.png"
    path.write_bytes(b"old")
    plot_training_curves(realistic_log_history(steps=50, eval_every=25), path)
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]
    # The umask applies as for any file (a mkstemp file would be 0600).
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_non_finite_values_are_reported_not_fatal(tmp_path):
    history = [{"loss": 1.0, "step": 1}, {"loss": float("nan"), "step": 2}, {"loss": float("inf"), "step": 3}]
    assert read_png(plot_training_curves(history, tmp_path / "nan.png"))[0] == "PNG"
    # A diverged run is exactly when the plot matters: all-NaN loss still gives a file.
    diverged = [{"loss": float("nan"), "step": 1}, {"loss": float("nan"), "step": 2}]
    assert plot_training_curves(diverged, tmp_path / "diverged.png") is not None


def test_bad_input_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"log_history\[1\] has 'loss' but no numeric 'step'"):
        plot_training_curves([{"loss": 1.0, "step": 1}, {"loss": 0.9}], tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []
    assert plt.get_fignums() == []
