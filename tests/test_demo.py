"""`make demo`, the main job on the embedded default, reaches its accuracy target."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_make_demo_learns_the_synthetic_videos():
    result = subprocess.run(["make", "demo"], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    match = re.search(r"ucf101 accuracy: before ([\d.]+) -> after ([\d.]+)", result.stdout)
    assert match, result.stdout[-2000:]
    before, after = float(match.group(1)), float(match.group(2))
    assert before <= 0.5  # a random model: near or below chance (4 classes)
    assert after >= 0.9
