"""The input tree (finding the videos) and the output tree (frames, jsonl, publishing).

Input: `<root>/{train,val,test}/<ClassName>/<video>.avi|.mp4`. Output: `out_dir/ucf101_<split>.jsonl`
plus `out_dir/images/<split>/<ClassName>/<stem>.<k>.jpg`, built in a hidden sibling of
`out_dir` and renamed into place only once complete (the layout is described in
`convert_ucf101.py`).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

from tqdm.auto import tqdm

from recipe.errors import DataError, FlagError

from .frames import VideoReadError, read_frames

__all__ = [
    "SPLITS", "VIDEO_SUFFIXES", "IMAGE_DIR", "PROMPT", "VideoTask", "find_dataset_root",
    "scan_video_tree", "convert_video", "convert_videos", "make_record", "write_jsonl",
    "check_out_dir", "write_dataset",
]

SPLITS = ("train", "val", "test")
VIDEO_SUFFIXES = (".avi", ".mp4")
IMAGE_DIR = "images"
SOURCE = "ucf101"
PROMPT = "Classify the video into one of the following classes: {classes}."


# --------------------------------------------------------------------------------------------
# Finding the videos
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VideoTask:
    """One video to convert; picklable, so it can go to a worker process."""

    index: int  # position among all videos found (train, val, test), used in the id
    split: str
    label: str
    path: Path
    image_prefix: str  # "<split>/<label>/<stem>", relative to out_dir/images

    @property
    def name(self) -> str:
        """The video's path inside the tree, for messages (the tree may be a temp dir)."""
        return f"{self.split}/{self.label}/{self.path.name}"

    def image_paths(self, num_frames: int) -> list[str]:
        """The frame paths as written in the jsonl (relative to out_dir/images)."""
        return [f"{self.image_prefix}.{k}.jpg" for k in range(num_frames)]


def find_dataset_root(path: Path, where: str | None = None) -> Path:
    """Return the directory holding train/, val/, test/: `path` itself, or its only subdirectory
    (so both an extracted archive and the `UCF101_subset/` inside it work).

    `where` names the input in messages (default: `path`; an extracted archive names the
    archive rather than its temporary directory).
    """
    where = where or str(path)
    if not path.is_dir():
        raise DataError(f"{where}: no such directory; give the directory holding train/, val/, test/")
    if any((path / split).is_dir() for split in SPLITS):
        return path
    subdirs = [p for p in sorted(path.iterdir()) if p.is_dir() and not p.name.startswith(".")]
    if len(subdirs) == 1 and any((subdirs[0] / split).is_dir() for split in SPLITS):
        return subdirs[0]
    raise DataError(
        f"{where}: no train/, val/ or test/ directory; expected "
        "{train,val,test}/<ClassName>/<video>.avi (or .mp4) in it or in its only subdirectory"
    )


def scan_video_tree(root: Path, where: str | None = None) -> tuple[list[VideoTask], list[Path]]:
    """List the videos of a `root/<split>/<ClassName>/<video>` tree, sorted by split (train,
    val, test), class and file name. Returns (videos, ignored files and directories)."""
    where = where or str(root)
    tasks: list[VideoTask] = []
    ignored: list[Path] = []
    seen: dict[str, VideoTask] = {}
    ignored += [
        p for p in sorted(root.iterdir()) if p.name not in SPLITS and not p.name.startswith(".")
    ]
    for split in SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            continue
        for class_dir in sorted(split_dir.iterdir()):
            if class_dir.name.startswith("."):
                continue
            if not class_dir.is_dir():
                ignored.append(class_dir)
                continue
            for path in sorted(class_dir.iterdir()):
                if path.name.startswith("."):  # e.g. macOS "._x.avi" resource forks
                    continue
                if not (path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES):
                    ignored.append(path)
                    continue
                task = VideoTask(
                    len(tasks), split, class_dir.name, path, f"{split}/{class_dir.name}/{path.stem}"
                )
                if task.image_prefix in seen:
                    raise DataError(
                        f"{where}: {seen[task.image_prefix].name} and {task.name} would both "
                        f"write images/{task.image_prefix}.*.jpg; rename one of them"
                    )
                seen[task.image_prefix] = task
                tasks.append(task)
    if not tasks:
        raise DataError(
            f"{where}: no videos found; expected {{train,val,test}}/<ClassName>/<video> with "
            f"one of the suffixes {', '.join(VIDEO_SUFFIXES)}"
        )
    return tasks, ignored


# --------------------------------------------------------------------------------------------
# Converting
# --------------------------------------------------------------------------------------------


def convert_video(task: VideoTask, image_root: Path, num_frames: int) -> str | None:
    """Write the sampled frames of one video as JPEGs under `image_root`.

    Returns None, or the reason the video could not be read (it is then skipped). Errors while
    writing (disk full, permissions) are not the video's fault and propagate.
    """
    try:
        images = read_frames(task.path, num_frames)
    except VideoReadError as error:
        return str(error)
    (image_root / task.image_prefix).parent.mkdir(parents=True, exist_ok=True)
    for image, relative in zip(images, task.image_paths(num_frames)):
        image.save(image_root / relative, format="JPEG")  # PIL's default quality, as the original
    return None


def convert_videos(
    tasks: Sequence[VideoTask],
    image_root: Path,
    num_frames: int,
    num_workers: int = 1,
    progress: bool = True,
) -> dict[int, str]:
    """Convert all videos (in `num_workers` processes); return {task index: skip reason}."""
    convert = functools.partial(convert_video, image_root=image_root, num_frames=num_frames)
    skipped: dict[int, str] = {}
    executor = None
    if num_workers > 1:
        # "spawn": workers start clean (no copied decoder threads or tqdm monitor), on any OS.
        executor = ProcessPoolExecutor(num_workers, mp_context=get_context("spawn"))
    try:
        results = executor.map(convert, tasks) if executor else map(convert, tasks)
        with tqdm(total=len(tasks), unit="video", desc="converting", disable=not progress) as bar:
            for task, reason in zip(tasks, results):
                if reason is not None:
                    skipped[task.index] = reason
                    tqdm.write(f"skipping {task.name}: {reason}", file=sys.stderr)
                bar.update()
    finally:
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
    return skipped


def make_record(task: VideoTask, num_frames: int, prompt: str) -> dict:
    """The jsonl line of one video, keys in the original's order."""
    return {
        "id": f"{task.split}-{task.index:010d}",
        "source": SOURCE,
        "conversations": [
            {"images": task.image_paths(num_frames), "user": prompt, "assistant": task.label}
        ],
    }


def write_jsonl(path: Path, records: Sequence[dict]) -> None:
    """One `json.dumps` line per record (ASCII, default separators, as the original).

    Written in the staging directory, so it needs no atomic write of its own: the whole
    directory becomes visible at once in `_publish`.
    """
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


# --------------------------------------------------------------------------------------------
# Publishing
# --------------------------------------------------------------------------------------------


def check_out_dir(out_dir: Path, overwrite: bool, inputs: dict[str, Path | None]) -> None:
    """Fail before any work if writing `out_dir` would clobber something it must not.

    `inputs` maps flag names to the input paths, which `out_dir` may not contain (replacing
    it would delete them).
    """
    existing = next(p for p in (out_dir.absolute(), *out_dir.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise FlagError(f"--out_dir {out_dir}: {existing} is not a directory; choose another path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FlagError(
            f"--out_dir {out_dir} is not empty; pass --overwrite to replace it (the old contents "
            "are kept until the new output is complete) or choose another directory"
        )
    resolved = out_dir.resolve()
    for flag, value in inputs.items():
        if value is not None:
            other = value.resolve()
            if other == resolved or resolved in other.parents:
                raise FlagError(
                    f"--out_dir {out_dir} contains --{flag} {value}; choose another --out_dir"
                )


def write_dataset(
    tasks: Sequence[VideoTask],
    out_dir: Path,
    num_frames: int,
    num_workers: int = 1,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[int, str]:
    """Convert `tasks` into the output layout and publish it as `out_dir` in one rename.

    Returns {task index: skip reason} of the unreadable videos. If no video could be read,
    nothing is published. A crash at any point leaves `out_dir` as it was.
    """
    prompt = PROMPT.format(classes=", ".join(sorted({task.label for task in tasks})))
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        # A sibling of out_dir: on the same file system, so the final rename is atomic.
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    except OSError as error:
        raise FlagError(
            f"--out_dir {out_dir}: cannot create it ({error.strerror}); choose a writable directory"
        ) from error
    try:
        skipped = convert_videos(tasks, staging / IMAGE_DIR, num_frames, num_workers, progress)
        if len(skipped) == len(tasks):
            shutil.rmtree(staging)
            return skipped
        for split in SPLITS:
            records = [
                make_record(task, num_frames, prompt)
                for task in tasks
                if task.split == split and task.index not in skipped
            ]
            write_jsonl(staging / f"ucf101_{split}.jsonl", records)
        _publish(staging, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return skipped


def _publish(staging: Path, out_dir: Path, overwrite: bool) -> None:
    """Move the complete output `staging` to `out_dir`; an old output goes only afterwards."""
    if not out_dir.exists():
        os.rename(staging, out_dir)
        return
    if not overwrite:
        try:
            out_dir.rmdir()  # only the empty directory checked at the start may be replaced
        except OSError as error:
            raise FlagError(
                f"--out_dir {out_dir} was filled by something else during the conversion; "
                "nothing written; run again with another --out_dir"
            ) from error
        os.rename(staging, out_dir)
        return
    backup = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    os.rename(out_dir, backup)  # replaces the empty placeholder directory
    try:
        os.rename(staging, out_dir)
    except BaseException:
        os.rename(backup, out_dir)
        raise
    shutil.rmtree(backup)
