"""Small generated videos in a UCF-101 style tree, learnable by a tiny model in minutes.

Each class has a dominant background colour and a dark square moving in one direction. Either
cue alone separates the classes; both survive MPEG-4 and JPEG compression (the colours are far
apart, the square is large and high-contrast). The CPU demo and the tests train on these.
"""

from __future__ import annotations

import os
from pathlib import Path

import av
import numpy as np

from .tree import SPLITS

__all__ = ["SYNTHETIC_CLASSES", "SYNTHETIC_DEFAULTS", "check_size", "write_synthetic_tree"]

# (name, background RGB, direction of motion (dx, dy))
SYNTHETIC_CLASSES = (
    ("RedRight", (220, 40, 40), (1, 0)),
    ("GreenLeft", (40, 200, 60), (-1, 0)),
    ("BlueDown", (40, 70, 220), (0, 1)),
    ("YellowUp", (230, 210, 40), (0, -1)),
    ("MagentaRight", (210, 50, 200), (1, 0)),
    ("CyanLeft", (40, 210, 210), (-1, 0)),
    ("OrangeDown", (240, 140, 30), (0, 1)),
    ("GrayUp", (140, 140, 140), (0, -1)),
)
SYNTHETIC_SQUARE_RGB = (20, 20, 20)
# The defaults of `write_synthetic_tree`, keyed by the converter's flag names.
SYNTHETIC_DEFAULTS = {
    "synthetic_classes": 4,
    "synthetic_videos_per_class": 8,
    "synthetic_eval_videos_per_class": 3,
    "synthetic_frames": 16,
    "synthetic_size": (96, 72),
    "seed": 0,
}


def check_size(width: int, height: int) -> None:
    """Raise ValueError unless the frame size suits yuv420p MPEG-4 (even) and stays small."""
    if width % 2 or height % 2 or not (16 <= width <= 1280 and 16 <= height <= 1280):
        raise ValueError(f"width and height must be even and within 16..1280, got {width}x{height}")


def _synthetic_video(
    rng: np.random.Generator,
    colour: tuple[int, int, int],
    direction: tuple[int, int],
    num_frames: int,
    width: int,
    height: int,
) -> np.ndarray:
    """Frames (T, H, W, 3) of a noisy, jittered background colour with a dark square crossing
    most of the frame in `direction`, without wrapping (so the motion is unambiguous)."""
    side = max(4, min(width, height) // 3)
    background = np.clip(np.array(colour) + rng.integers(-25, 26, size=3), 0, 255)
    dx, dy = direction
    along_len, across_len = (width, height) if dx else (height, width)
    travel = along_len - side
    start = rng.uniform(0.0, 0.15) * travel
    distance = rng.uniform(0.6, 0.85) * travel
    across = int(rng.integers(0, across_len - side + 1))
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for t in range(num_frames):
        along = start + distance * t / max(num_frames - 1, 1)
        if dx < 0 or dy < 0:
            along = travel - along
        x, y = (int(round(along)), across) if dx else (across, int(round(along)))
        frame = background + rng.normal(0.0, 10.0, size=(height, width, 3))
        frame[y : y + side, x : x + side] = np.array(SYNTHETIC_SQUARE_RGB) + rng.normal(
            0.0, 10.0, size=(side, side, 3)
        )
        frames[t] = np.clip(frame, 0, 255).astype(np.uint8)
    return frames


def write_synthetic_tree(
    root: str | os.PathLike,
    num_classes: int = SYNTHETIC_DEFAULTS["synthetic_classes"],
    videos_per_class: int = SYNTHETIC_DEFAULTS["synthetic_videos_per_class"],
    eval_videos_per_class: int = SYNTHETIC_DEFAULTS["synthetic_eval_videos_per_class"],
    num_frames: int = SYNTHETIC_DEFAULTS["synthetic_frames"],
    size: tuple[int, int] = SYNTHETIC_DEFAULTS["synthetic_size"],
    seed: int = SYNTHETIC_DEFAULTS["seed"],
) -> list[str]:
    """Write a UCF-101 style tree of small MPEG-4 AVI videos and return the class names.

    `root/{train,val,test}/<Class>/v_<Class>_g<NN>_c01.avi`: `videos_per_class` training videos
    and `eval_videos_per_class` each for val and test, named like UCF-101 clips with the group
    number NN running on across splits (no group is shared between splits). Each class has its
    own background colour and motion direction (see SYNTHETIC_CLASSES); the same seed writes
    the same pixels.
    """
    width, height = size
    if not 2 <= num_classes <= len(SYNTHETIC_CLASSES):
        raise ValueError(f"num_classes must be in 2..{len(SYNTHETIC_CLASSES)}, got {num_classes}")
    if videos_per_class < 1 or eval_videos_per_class < 1 or num_frames < 1:
        raise ValueError("videos_per_class, eval_videos_per_class and num_frames must be >= 1")
    check_size(width, height)
    rng = np.random.default_rng(seed)
    counts = dict(train=videos_per_class, val=eval_videos_per_class, test=eval_videos_per_class)
    classes = SYNTHETIC_CLASSES[:num_classes]
    group = 0
    for split in SPLITS:
        for _ in range(counts[split]):
            group += 1
            for name, colour, direction in classes:
                path = Path(root) / split / name / f"v_{name}_g{group:02d}_c01.avi"
                path.parent.mkdir(parents=True, exist_ok=True)
                frames = _synthetic_video(rng, colour, direction, num_frames, width, height)
                _encode_video(path, frames)
    return sorted(name for name, _, _ in classes)


def _encode_video(path: Path, frames: np.ndarray, fps: int = 8) -> None:
    """Encode RGB frames as MPEG-4 Part 2 in AVI, the codec and container of UCF-101."""
    with av.open(str(path), "w", format="avi") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = 1_000_000  # generous for tiny frames: keeps colours and edges clean
        for array in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode())
