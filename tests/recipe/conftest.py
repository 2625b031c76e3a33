"""Session fixtures of the recipe tests: a tiny checkpoint and a small synthetic UCF-101 set."""

from pathlib import Path

import pytest
import torch

import convert_ucf101
from phi3v.tiny import save_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """Tiny random Phi-3.5-vision with a 1-crop image processor (the fewest image tokens)."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model", num_crops=1)


@pytest.fixture(scope="session")
def ucf101_data(tmp_path_factory) -> Path:
    """convert_ucf101.py output: 2 classes, 4 training and 4 test videos of 2 frames each."""
    out = tmp_path_factory.mktemp("ucf101") / "data"
    code = convert_ucf101.main([
        "--synthetic", "--out_dir", str(out), "--no-tqdm", "--num_frames", "2", "--synthetic_frames", "2",
        "--synthetic_classes", "2", "--synthetic_videos_per_class", "2", "--synthetic_eval_videos_per_class", "2",
    ])
    assert code == 0
    return out


@pytest.fixture(autouse=True)
def one_thread():
    # The tiny model's matrices are too small for a second thread to help (on 2 busy cores it
    # costs 5x), and subprocesses get the same setting so float results match across runs.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
