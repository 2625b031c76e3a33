"""Convert a UCF-101 style video tree into the jsonl-plus-images layout of the video recipe.

Each video becomes `--num_frames` JPEG frames sampled evenly over the whole video, and one
jsonl line asking the model to name the video's class:

    # the UCF-101 subset from the hub (sayakpaul/ucf101-subset, UCF101_subset.tar.gz)
    python convert_ucf101.py --out_dir data/ucf101
    # the same archive, already on disk (no network needed)
    python convert_ucf101.py --archive UCF101_subset.tar.gz --out_dir data/ucf101
    # your own videos: DIR/{train,val,test}/<ClassName>/*.avi|*.mp4
    python convert_ucf101.py --video_dir DIR --out_dir data/my_videos --num_workers 4
    # small generated videos that a tiny model learns in minutes (the CPU demo's data)
    python convert_ucf101.py --synthetic --out_dir data/ucf101_synthetic

Output layout (the same as Microsoft's original recipe, which the training script and users'
existing data rely on):

    out_dir/
      ucf101_train.jsonl  ucf101_val.jsonl  ucf101_test.jsonl   (always all three, maybe empty)
      images/<split>/<ClassName>/<video stem>.<k>.jpg              k = 0 .. num_frames-1

One line per converted video, keys in this order (`json.dumps` defaults, ASCII):

    {"id": "train-0000000000", "source": "ucf101",
     "conversations": [{"images": ["train/ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.0.jpg", ...],
                        "user": "Classify the video into one of the following classes: "
                                "ApplyEyeMakeup, ApplyLipstick, ....",
                        "assistant": "ApplyEyeMakeup"}]}

- Image paths are relative to `out_dir/images` (not to `out_dir`), with `/` separators.
- `id` is `<split>-<n>` with n zero-padded to 10 digits, numbered over all videos found in
  the order train, val, test (so val ids do not restart at 0). Videos are visited sorted by
  class directory and then file name (the original used unsorted glob order). A skipped
  video keeps its number, so the ids of the other videos do not depend on which files fail.
- The class list in the prompt is every class directory holding at least one video in any
  split, sorted, joined with ", " and followed by ".".
- Frame k of N decoded frames is frame floor(k * N / num_frames): the original's positions,
  computed exactly in integers. N is counted by decoding, never taken from the container
  header, which can be 0 (Matroska, fragmented MP4, MPEG-TS) or wrong (AVI written to a pipe).
  A video with fewer than num_frames frames repeats frames evenly (3 frames, 8 wanted:
  0 0 0 1 1 1 2 2), so every example has exactly num_frames images.

Input tree: `<root>/{train,val,test}/<ClassName>/<video>` where video files end in .avi or .mp4
(any case; names starting with "." are ignored). `<root>` may also be a directory holding a
single such tree (e.g. the `UCF101_subset/` directory of the archive). Other files are listed
as ignored. Two videos of one class with the same stem (a.avi, a.mp4) would write the same
images and are refused.

Safety: a non-empty `--out_dir` is refused unless `--overwrite`. The output is built in a
hidden sibling `.<out_dir name>.tmp-*` and renamed into place only once complete, so a killed
run never leaves a half-written jsonl; with `--overwrite` the previous output is moved aside
(`.<name>.old-*`) and deleted only after the new one is in place. Archive members that would
land outside the extraction directory (absolute paths, `..`, links pointing outside, devices)
are refused with the member's name. An unreadable video is reported with the reason, skipped
and listed in the final summary; the exit code is 1 only if no video could be converted, 2 for
a usage or input error.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path, PurePosixPath, PureWindowsPath

import av
import numpy as np
from huggingface_hub import hf_hub_download
from PIL import Image
from tqdm.auto import tqdm

HUB_REPO_ID = "sayakpaul/ucf101-subset"
HUB_FILENAME = "UCF101_subset.tar.gz"
SPLITS = ("train", "val", "test")
VIDEO_SUFFIXES = (".avi", ".mp4")
IMAGE_DIR = "images"
SOURCE = "ucf101"
PROMPT = "Classify the video into one of the following classes: {classes}."

# Synthetic classes: a dominant background colour plus a dark square moving in one direction.
# Either cue alone separates the classes, so a tiny model learns them in minutes; both survive
# MPEG-4 and JPEG compression (colours are far apart, the square is large and high-contrast).
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
SYNTHETIC_DEFAULTS = {
    "synthetic_classes": 4,
    "synthetic_videos_per_class": 8,
    "synthetic_eval_videos_per_class": 3,
    "synthetic_frames": 16,
    "synthetic_size": (96, 72),
    "seed": 0,
}


class ConversionError(Exception):
    """A user or input error: reported as one line, exit code 2."""


class VideoReadError(Exception):
    """One video cannot be decoded; it is skipped and listed in the summary."""


# --------------------------------------------------------------------------------------------
# Reading frames
# --------------------------------------------------------------------------------------------


def sample_frame_indices(total_frames: int, num_frames: int) -> list[int]:
    """Return `num_frames` evenly spaced frame indices in `range(total_frames)`.

    Index k is floor(k * total_frames / num_frames), the positions the original recipe used
    (it computed them in floating point). With fewer frames than wanted, frames repeat evenly:
    `sample_frame_indices(3, 8) == [0, 0, 0, 1, 1, 1, 2, 2]`.
    """
    if total_frames < 1:
        raise ValueError(f"total_frames must be >= 1, got {total_frames}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    return [k * total_frames // num_frames for k in range(num_frames)]


def _decode_pass(
    path: Path, num_frames: int, total_frames: int | None
) -> tuple[int, dict[int, Image.Image]]:
    """Decode every frame of the first video stream of `path` once.

    Keeps only the frames `sample_frame_indices` selects for `total_frames` frames (for the
    container header's count when None), so memory does not grow with the video's length.
    Returns (number of frames decoded, {frame index: RGB image}).
    """
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoReadError("no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"  # frame threading: several times faster, same frames
            if total_frames is None:
                total_frames = stream.frames
            wanted = set()
            if total_frames > 0:
                wanted = set(sample_frame_indices(total_frames, num_frames))
            picked: dict[int, Image.Image] = {}
            decoded = 0
            for frame in container.decode(stream):
                if decoded in wanted:
                    picked[decoded] = frame.to_image()
                decoded += 1
    except (av.error.FFmpegError, OSError) as error:
        # strerror leaves out the file name, which the caller reports in a shorter form.
        raise VideoReadError(f"{type(error).__name__}: {error.strerror or error}") from error
    return decoded, picked


def read_frames(path: str | os.PathLike, num_frames: int) -> list[Image.Image]:
    """Decode `num_frames` RGB frames sampled evenly over the whole video at `path`.

    The header's frame count is only a hint: the first pass decodes every frame (to count
    them), keeping the frames the hint selects. If the hint was wrong (0 for Matroska,
    fragmented MP4 or MPEG-TS; garbage for an AVI written to a pipe) a second pass picks the
    frames for the counted length. Raises VideoReadError if the file cannot be decoded.
    """
    path = Path(path)
    decoded, picked = _decode_pass(path, num_frames, total_frames=None)
    if decoded == 0:
        raise VideoReadError("no decodable video frames")
    indices = sample_frame_indices(decoded, num_frames)
    if not set(indices) <= picked.keys():
        decoded_again, picked = _decode_pass(path, num_frames, total_frames=decoded)
        if decoded_again != decoded:
            raise VideoReadError(
                f"decoded {decoded} frames, then {decoded_again} from the same file"
            )
    return [picked[i] for i in indices]


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


def find_dataset_root(path: Path) -> Path:
    """Return the directory holding train/, val/, test/: `path` itself, or its only subdirectory
    (so both an extracted archive and the `UCF101_subset/` inside it work)."""
    if not path.is_dir():
        raise ConversionError(f"{path} is not a directory")
    if any((path / split).is_dir() for split in SPLITS):
        return path
    subdirs = [p for p in sorted(path.iterdir()) if p.is_dir() and not p.name.startswith(".")]
    if len(subdirs) == 1 and any((subdirs[0] / split).is_dir() for split in SPLITS):
        return subdirs[0]
    raise ConversionError(
        f"no train/, val/ or test/ directory in {path}: expected "
        f"{path}/{{train,val,test}}/<ClassName>/<video>.avi (or .mp4)"
    )


def scan_video_tree(root: Path) -> tuple[list[VideoTask], list[Path]]:
    """List the videos of a `root/<split>/<ClassName>/<video>` tree, sorted by split (train,
    val, test), class and file name. Returns (videos, ignored files and directories)."""
    tasks: list[VideoTask] = []
    ignored: list[Path] = []
    seen: dict[str, Path] = {}
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
                prefix = f"{split}/{class_dir.name}/{path.stem}"
                if prefix in seen:
                    raise ConversionError(
                        f"{seen[prefix]} and {path} would both write images/{prefix}.*.jpg; "
                        "rename one of them"
                    )
                seen[prefix] = path
                tasks.append(VideoTask(len(tasks), split, class_dir.name, path, prefix))
    if not tasks:
        raise ConversionError(
            f"no videos found under {root}: expected {root}/{{train,val,test}}/<ClassName>/"
            f"<video> with one of the suffixes {', '.join(VIDEO_SUFFIXES)}"
        )
    return tasks, ignored


# --------------------------------------------------------------------------------------------
# Getting the videos: archive, hub, synthetic
# --------------------------------------------------------------------------------------------


class UnsafeArchiveError(ConversionError):
    """An archive member would be written outside the extraction directory."""

    def __init__(self, archive: str, member: str, reason: str):
        super().__init__(f"refusing to extract {archive}: member {member!r} {reason}")
        self.member = member


def _is_inside(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def _unsafe_reason(member: tarfile.TarInfo, dest: str) -> str | None:
    """Why `member` must not be extracted into `dest` (judged from its names alone), or None."""
    name = member.name
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).anchor:
        return "has an absolute path"
    if not _is_inside(os.path.normpath(os.path.join(dest, name)), dest):
        return "points outside the destination (..)"
    if member.issym() or member.islnk():
        kind = "symlink" if member.issym() else "hard link"
        link = member.linkname
        if PurePosixPath(link).is_absolute() or PureWindowsPath(link).anchor:
            return f"is a {kind} to the absolute path {link!r}"
        # A symlink is relative to its own directory, a hard link to the archive root.
        base = os.path.join(dest, os.path.dirname(name)) if member.issym() else dest
        if not _is_inside(os.path.normpath(os.path.join(base, link)), dest):
            return f"is a {kind} pointing outside the destination ({link!r})"
    if member.isdev():
        return "is a device or fifo"
    return None


def safe_extract(tar: tarfile.TarFile, dest: str | os.PathLike) -> None:
    """Extract every member of `tar` into `dest`, refusing (before writing anything) any member
    that would land outside it: absolute paths, `..`, links pointing outside, devices.

    The name checks above cannot see a path that escapes through a symlink extracted earlier
    (`a -> ..` inside, then `a/a/../x`); tarfile's "data" filter resolves real paths as it
    extracts and catches those too, so nothing is ever written outside `dest`.
    Raises UnsafeArchiveError naming the member.
    """
    dest = os.path.realpath(dest)
    archive = tar.name or "archive"
    members = tar.getmembers()
    for member in members:
        reason = _unsafe_reason(member, dest)
        if reason is not None:
            raise UnsafeArchiveError(archive, member.name, reason)
    try:
        tar.extractall(dest, members=members, filter="data")
    except tarfile.FilterError as error:
        raise UnsafeArchiveError(archive, error.tarinfo.name, f"was refused: {error}") from error


def extract_archive(archive: Path, dest: Path) -> None:
    """Safely extract a (compressed) tar archive, turning read errors into ConversionError."""
    if not archive.is_file():
        raise ConversionError(f"--archive {archive}: no such file")
    try:
        with tarfile.open(archive) as tar:
            safe_extract(tar, dest)
    except (tarfile.TarError, EOFError, OSError) as error:
        # zlib.error and gzip.BadGzipFile surface as OSError/EOFError/TarError here.
        raise ConversionError(f"cannot read or extract archive {archive}: {error}") from error


def download_subset_archive() -> Path:
    """Download (or reuse from the hub cache) the UCF-101 subset archive the original used."""
    print(f"fetching {HUB_FILENAME} from the hub dataset {HUB_REPO_ID} (offline: use --archive, "
          "--video_dir or --synthetic)", file=sys.stderr)
    try:
        path = hf_hub_download(repo_id=HUB_REPO_ID, filename=HUB_FILENAME, repo_type="dataset")
    except Exception as error:  # any failure (offline, DNS, HTTP, auth) has the same remedy
        raise ConversionError(
            f"could not download {HUB_FILENAME} from the hub dataset {HUB_REPO_ID} "
            f"({type(error).__name__}: {error}). Without hub access, convert a local copy with "
            "--archive UCF101_subset.tar.gz, your own videos with --video_dir DIR "
            "(DIR/{train,val,test}/<ClassName>/*.avi), or generated demo data with --synthetic."
        ) from error
    return Path(path)


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
    if width % 2 or height % 2 or not (16 <= width <= 1280 and 16 <= height <= 1280):
        raise ValueError(f"size must be even and within 16..1280, got {width}x{height}")
    rng = np.random.default_rng(seed)
    counts = dict(train=videos_per_class, val=eval_videos_per_class, test=eval_videos_per_class)
    classes = SYNTHETIC_CLASSES[:num_classes]
    group = 0
    for split in SPLITS:
        for k in range(counts[split]):
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


def make_record(task: VideoTask, num_frames: int, prompt: str) -> dict:
    """The jsonl line of one video, keys in the original's order."""
    return {
        "id": f"{task.split}-{task.index:010d}",
        "source": SOURCE,
        "conversations": [
            {"images": task.image_paths(num_frames), "user": prompt, "assistant": task.label}
        ],
    }


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


def _write_jsonl(path: Path, records: Sequence[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def _publish(staging: Path, out_dir: Path, overwrite: bool) -> None:
    """Move the complete output `staging` to `out_dir`; an old output goes only afterwards."""
    if not out_dir.exists():
        os.rename(staging, out_dir)
        return
    if not overwrite:
        try:
            out_dir.rmdir()  # only the empty directory checked at the start may be replaced
        except OSError as error:
            raise ConversionError(
                f"--out_dir {out_dir} was filled by something else during the conversion; "
                "nothing written"
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


def _check_paths(args: argparse.Namespace) -> None:
    """Fail before any work if the output would clobber something it must not."""
    out_dir = args.out_dir
    if out_dir.exists() and not out_dir.is_dir():
        raise ConversionError(f"--out_dir {out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not args.overwrite:
        raise ConversionError(
            f"--out_dir {out_dir} is not empty; pass --overwrite to replace it (the old contents "
            "are kept until the new output is complete) or choose another directory"
        )
    resolved = out_dir.resolve()
    for flag in ("video_dir", "archive", "tmp_dir"):
        value = getattr(args, flag)
        if value is not None:
            other = value.resolve()
            if other == resolved or resolved in other.parents:
                raise ConversionError(
                    f"--out_dir {out_dir} contains --{flag} {value}; choose another --out_dir"
                )


def _print_summary(tasks, skipped, ignored, root, num_frames, out_dir) -> None:
    converted = {split: 0 for split in SPLITS}
    for task in tasks:
        if task.index not in skipped:
            converted[task.split] += 1
    per_split = ", ".join(f"{split} {n}" for split, n in converted.items())
    total = sum(converted.values())
    print(f"converted {total} of {len(tasks)} videos, {num_frames} frames each: {per_split}")
    if skipped:
        print(f"skipped {len(skipped)} unreadable video(s):")
        for task in tasks:
            if task.index in skipped:
                print(f"  {task.name}: {skipped[task.index]}")
    if ignored:
        suffixes = "|".join(VIDEO_SUFFIXES)
        print(f"ignored {len(ignored)} path(s) that are not <split>/<class>/<video>{suffixes}:")
        for path in ignored[:10]:
            print(f"  {path.relative_to(root)}")
        if len(ignored) > 10:
            print(f"  ... and {len(ignored) - 10} more")
    if total:
        print(f"wrote {out_dir}")


def convert(args: argparse.Namespace) -> int:
    """Run a parsed command line; see `main`."""
    _check_paths(args)
    with tempfile.TemporaryDirectory(prefix="convert_ucf101-", dir=args.tmp_dir) as work:
        work = Path(work)
        if args.synthetic:
            source = work / "UCF101_synthetic"
            write_synthetic_tree(
                source,
                num_classes=args.synthetic_classes,
                videos_per_class=args.synthetic_videos_per_class,
                eval_videos_per_class=args.synthetic_eval_videos_per_class,
                num_frames=args.synthetic_frames,
                size=args.synthetic_size,
                seed=args.seed,
            )
        elif args.video_dir is not None:
            source = args.video_dir
        else:
            archive = args.archive if args.archive is not None else download_subset_archive()
            source = work / "extracted"
            extract_archive(archive, source)
        root = find_dataset_root(source)
        tasks, ignored = scan_video_tree(root)
        prompt = PROMPT.format(classes=", ".join(sorted({task.label for task in tasks})))

        out_dir = args.out_dir
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        # A sibling of out_dir: on the same file system, so the final rename is atomic.
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
        try:
            skipped = convert_videos(
                tasks, staging / IMAGE_DIR, args.num_frames, args.num_workers, not args.no_tqdm
            )
            if len(skipped) == len(tasks):
                _print_summary(tasks, skipped, ignored, root, args.num_frames, out_dir)
                print("error: no video could be converted; nothing written", file=sys.stderr)
                shutil.rmtree(staging)
                return 1
            for split in SPLITS:
                records = [
                    make_record(task, args.num_frames, prompt)
                    for task in tasks
                    if task.split == split and task.index not in skipped
                ]
                _write_jsonl(staging / f"ucf101_{split}.jsonl", records)
            _publish(staging, out_dir, args.overwrite)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    _print_summary(tasks, skipped, ignored, root, args.num_frames, out_dir)
    return 0


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _frame_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected WIDTHxHEIGHT such as 96x72, got {text!r}"
        ) from None
    if width % 2 or height % 2 or not (16 <= width <= 1280 and 16 <= height <= 1280):
        raise argparse.ArgumentTypeError(
            f"width and height must be even and within 16..1280, got {text!r}"
        )
    return width, height


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Convert a UCF-101 style video tree into ucf101_{train,val,test}.jsonl plus "
        "JPEG frames (the layout of Microsoft's Phi-3.5-vision UCF-101 recipe).",
        epilog="Without --video_dir, --archive or --synthetic the UCF-101 subset archive is "
        f"downloaded from the hub dataset {HUB_REPO_ID}. Exit codes: 0 done, 1 no video could "
        "be converted, 2 usage or input error.",
    )
    add = parser.add_argument
    add("--out_dir", type=Path, required=True,
        help="Output directory; must be empty or absent unless --overwrite.")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--video_dir", type=Path,
                        help="Local tree DIR/{train,val,test}/<ClassName>/*.avi|*.mp4.")
    source.add_argument("--archive", type=Path,
                        help=f"Local copy of {HUB_FILENAME} (or any .tar[.gz] of such a tree).")
    source.add_argument("--synthetic", action="store_true",
                        help="Generate small learnable videos (coloured backgrounds, moving "
                        "squares) and convert them.")
    add("--num_frames", type=int, default=8, help="Frames sampled evenly per video (default: 8).")
    add("--num_workers", type=int, default=1,
        help="Worker processes decoding videos (default: 1).")
    add("--overwrite", action="store_true",
        help="Replace a non-empty --out_dir (only once the new output is complete).")
    add("--tmp_dir", type=Path, default=None,
        help="Where to extract the archive / write synthetic videos (default: system temp dir).")
    add("--no-tqdm", dest="no_tqdm", action="store_true", help="Do not show a progress bar.")

    synthetic = parser.add_argument_group("synthetic data (only with --synthetic)").add_argument
    d = SYNTHETIC_DEFAULTS
    synthetic("--synthetic_classes", type=int,
              help=f"Number of classes, 2..{len(SYNTHETIC_CLASSES)} "
              f"(default: {d['synthetic_classes']}).")
    synthetic("--synthetic_videos_per_class", type=int,
              help=f"Training videos per class (default: {d['synthetic_videos_per_class']}).")
    synthetic("--synthetic_eval_videos_per_class", type=int,
              help="Videos per class in each of val and test "
              f"(default: {d['synthetic_eval_videos_per_class']}).")
    synthetic("--synthetic_frames", type=int,
              help=f"Frames per generated video (default: {d['synthetic_frames']}).")
    synthetic("--synthetic_size", type=_frame_size,
              help="Frame size WIDTHxHEIGHT, even numbers (default: {}x{}).".format(
                  *d["synthetic_size"]))
    synthetic("--seed", type=int,
              help=f"Random seed of the generated videos (default: {d['seed']}).")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and cross-check the command line (errors exit with status 2, like argparse)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.num_frames < 1:
        parser.error(f"--num_frames must be >= 1, got {args.num_frames}")
    if args.num_workers < 1:
        parser.error(f"--num_workers must be >= 1, got {args.num_workers}")
    for flag, default in SYNTHETIC_DEFAULTS.items():
        if getattr(args, flag) is None:
            setattr(args, flag, default)
        elif not args.synthetic:
            parser.error(f"--{flag} only applies with --synthetic")
    if args.synthetic:
        if not 2 <= args.synthetic_classes <= len(SYNTHETIC_CLASSES):
            parser.error(
                f"--synthetic_classes must be in 2..{len(SYNTHETIC_CLASSES)}, "
                f"got {args.synthetic_classes}"
            )
        for flag in ("synthetic_videos_per_class", "synthetic_eval_videos_per_class",
                     "synthetic_frames"):
            if getattr(args, flag) < 1:
                parser.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Convert as the command line `argv` says; return the exit code (0, 1 or 2)."""
    args = parse_args(argv)
    try:
        return convert(args)
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
