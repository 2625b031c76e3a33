"""`make demo`, the main job on the embedded default, reaches its accuracy target.

The test runs the Makefile's own commands with `DEMO=` pointing into a temporary directory,
so the user's `demo_out/` in the checkout is neither read nor overwritten.
"""

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def tree_state(path: Path) -> dict[str, tuple[int, int]]:
    """Every file below `path` with its size and modification time (empty if there is none)."""
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in path.rglob("*")}


def test_make_demo_learns_the_synthetic_videos(tmp_path):
    users_demo = ROOT / "demo_out"
    before = tree_state(users_demo)
    out = tmp_path / "demo"
    # One thread per process, as the other subprocess tests: the tiny model gains nothing from a
    # second one, and on busy cores OpenMP's spinning threads double the CPU time.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["make", "demo", f"DEMO={out}"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    match = re.search(r"ucf101 accuracy: before ([\d.]+) -> after ([\d.]+)", result.stdout)
    assert match, result.stdout[-2000:]
    before_acc, after_acc = float(match.group(1)), float(match.group(2))
    assert before_acc <= 0.5  # a random model: near or below chance (4 classes)
    assert after_acc >= 0.9
    # The run went to DEMO, and the user's demo_out/ (if any) is as it was.
    assert (out / "run" / "eval_after.json").is_file() and (out / "tiny" / "config.json").is_file()
    assert tree_state(users_demo) == before


@pytest.mark.slow  # (CI: tests/recipe/test_preference.py checks the same learning, smaller)
def test_make_demo_dpo_prefers_the_true_colour(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["make", "demo-dpo", f"DEMO={tmp_path / 'demo'}"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    match = re.search(r"rlaif_v reward accuracy: before ([\d.]+) -> after ([\d.]+)", result.stdout)
    assert match, result.stdout[-2000:]
    assert float(match.group(1)) == 0.0  # the model is its own reference before training
    assert float(match.group(2)) >= 0.9
