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
(`.<name>.old-*`) and deleted only after the new one is in place. Archives are extracted
with tarfile's "data" filter into a temporary directory: members that would land outside it
(`..`, links pointing outside or to absolute paths) and device files are refused with the
member's name; leading "/" are dropped, as GNU tar does. An unreadable video is reported
with the reason, skipped and listed in the final summary.

Exit status: 0 done; 1 no video could be converted (nothing written); 2 a usage or input
error, reported as one line `error: <what, where, what to do>` on stderr.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from recipe.errors import FlagError, cli
from ucf101.archive import HUB_FILENAME, HUB_REPO_ID, download_subset_archive, extract_archive
from ucf101.synthetic import SYNTHETIC_CLASSES, SYNTHETIC_DEFAULTS, check_size, write_synthetic_tree
from ucf101.tree import (
    SPLITS,
    VIDEO_SUFFIXES,
    VideoTask,
    check_out_dir,
    find_dataset_root,
    scan_video_tree,
    write_dataset,
)


def convert(args: argparse.Namespace) -> int:
    """Run a command line checked by `parse_args`; see `main`."""
    with tempfile.TemporaryDirectory(prefix="convert_ucf101-", dir=args.tmp_dir) as work:
        source, where = _get_videos(args, Path(work))
        root = find_dataset_root(source, where)
        tasks, ignored = scan_video_tree(root, where)
        skipped = write_dataset(tasks, args.out_dir, args.num_frames, args.num_workers,
                                progress=not args.no_tqdm, overwrite=args.overwrite)
    _print_summary(tasks, skipped, ignored, root, args.num_frames, args.out_dir)
    if len(skipped) == len(tasks):
        print("error: no video could be converted (reasons listed above); nothing written. "
              "Check that the files are videos FFmpeg can decode (e.g. with ffprobe)",
              file=sys.stderr)
        return 1
    return 0


def _get_videos(args: argparse.Namespace, work: Path) -> tuple[Path, str]:
    """The directory holding the input tree (generated or extracted into `work` if need be),
    and how messages name the input."""
    if args.synthetic:
        write_synthetic_tree(
            work / "UCF101_synthetic",
            num_classes=args.synthetic_classes,
            videos_per_class=args.synthetic_videos_per_class,
            eval_videos_per_class=args.synthetic_eval_videos_per_class,
            num_frames=args.synthetic_frames,
            size=args.synthetic_size,
            seed=args.seed,
        )
        return work / "UCF101_synthetic", "--synthetic"
    if args.video_dir is not None:
        return args.video_dir, f"--video_dir {args.video_dir}"
    archive = args.archive if args.archive is not None else download_subset_archive()
    extract_archive(archive, work / "extracted")
    return work / "extracted", f"archive {archive}"


def _print_summary(
    tasks: Sequence[VideoTask], skipped: dict[int, str], ignored: Sequence[Path], root: Path,
    num_frames: int, out_dir: Path,
) -> None:
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
    try:
        check_size(width, height)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return width, height


class _Parser(argparse.ArgumentParser):
    """argparse whose errors (unknown flag, missing value, bad type, exclusive flags) are
    FlagErrors, so they end in the same one `error:` line as every other user error."""

    def error(self, message: str):
        raise FlagError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
    """Parse the command line and check every flag and path, before any work.

    Raises FlagError (one `error:` line, exit status 2) for anything that cannot work.
    """
    args = build_parser().parse_args(argv)
    for flag in ("num_frames", "num_workers"):
        if getattr(args, flag) < 1:
            raise FlagError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    for flag, default in SYNTHETIC_DEFAULTS.items():
        if getattr(args, flag) is None:
            setattr(args, flag, default)
        elif not args.synthetic:
            raise FlagError(f"--{flag} only applies with --synthetic; add --synthetic or drop it")
    if args.synthetic:
        if not 2 <= args.synthetic_classes <= len(SYNTHETIC_CLASSES):
            raise FlagError(
                f"--synthetic_classes must be in 2..{len(SYNTHETIC_CLASSES)}, "
                f"got {args.synthetic_classes}"
            )
        for flag in ("synthetic_videos_per_class", "synthetic_eval_videos_per_class",
                     "synthetic_frames"):
            if getattr(args, flag) < 1:
                raise FlagError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.tmp_dir is not None and not args.tmp_dir.is_dir():
        raise FlagError(f"--tmp_dir {args.tmp_dir}: no such directory; create it or drop the flag")
    check_out_dir(args.out_dir, args.overwrite,
                  {"video_dir": args.video_dir, "archive": args.archive, "tmp_dir": args.tmp_dir})
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Convert as the command line `argv` says; return the exit code (0, 1 or 2)."""
    status = 0

    def run() -> None:
        nonlocal status
        status = convert(parse_args(argv))

    return cli(run) or status


if __name__ == "__main__":
    sys.exit(main())
