"""Tests for convert_ucf101.py: frame sampling, output layout, safety and synthetic data.

Every video is made here with PyAV; nothing is downloaded.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the script lives at the project root, not in a package
    sys.path.insert(0, str(ROOT))

import convert_ucf101 as cu  # noqa: E402
from recipe.errors import DataError  # noqa: E402
from ucf101 import archive as ucf_archive, frames, synthetic, tree  # noqa: E402

# Grey levels far enough apart to identify a frame after MPEG-4/H.264 and JPEG compression.
LEVELS = [10 + 24 * i for i in range(10)]  # 10, 34, ..., 226


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def make_video(target, levels, fmt="avi", codec="mpeg4", size=(64, 48), options=None):
    """Encode one flat grey frame per entry of `levels`; `target` is a path or a file object."""
    width, height = size
    with av.open(target if not isinstance(target, Path) else str(target), "w", format=fmt,
                 options=options or {}) as container:
        stream = container.add_stream(codec, rate=8)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for level in levels:
            array = np.full((height, width, 3), level, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode())
    return target


def header_frames(path):
    with av.open(str(path)) as container:
        return container.streams.video[0].frames


def decoded_frames(path):
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def frame_levels(images):
    """Index into LEVELS of each (flat grey) image."""
    means = [float(np.asarray(image, np.float32).mean()) for image in images]
    found = [int(np.argmin([abs(m - level) for level in LEVELS])) for m in means]
    for m, i in zip(means, found):
        assert abs(m - LEVELS[i]) < 8, (means, found)
    return found


def one_error_line(stderr):
    """The `error:` line of a user error, checking it is the only one and no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def run(argv, capsys=None):
    code = cu.main([str(a) for a in argv] + ["--no-tqdm"])
    if capsys is None:
        return code
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(directory):
    """{relative path: bytes} of every file under `directory`."""
    directory = Path(directory)
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def leftovers(parent, name):
    """Hidden staging/backup siblings of out_dir `name` left in `parent`."""
    return sorted(p.name for p in Path(parent).iterdir() if p.name.startswith(f".{name}."))


@pytest.fixture
def small_tree(tmp_path):
    """A UCF-101 style tree with AVI (MPEG-4) and MP4 (H.264) clips and one corrupt file."""
    root = tmp_path / "videos"
    _mkdirs(root / "train/ClassA", root / "train/ClassB", root / "val/ClassA", root / "test/ClassB")
    make_video(root / "train/ClassB/v_b1.avi", LEVELS[:8])
    make_video(root / "train/ClassA/v_a1.mp4", LEVELS, fmt="mp4", codec="libx264")
    (root / "train/ClassA/v_zbad.avi").write_bytes(np.random.default_rng(0).bytes(4096))
    (root / "train/ClassA/notes.txt").write_text("not a video")
    make_video(root / "val/ClassA/v_a2.avi", LEVELS[:3])
    make_video(root / "test/ClassB/v_b2.mp4", LEVELS[:9], fmt="mp4", codec="libx264")
    return root


def _mkdirs(*dirs):
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)


# --------------------------------------------------------------------------------------------
# frame sampling and decoding
# --------------------------------------------------------------------------------------------


def test_sample_frame_indices_matches_original_and_repeats_short_videos():
    assert frames.sample_frame_indices(16, 8) == [0, 2, 4, 6, 8, 10, 12, 14]
    assert frames.sample_frame_indices(10, 4) == [0, 2, 5, 7]
    assert frames.sample_frame_indices(3, 8) == [0, 0, 0, 1, 1, 1, 2, 2]
    assert frames.sample_frame_indices(1, 3) == [0, 0, 0]
    # The original recipe: np.arange(0, total, total / n).astype(int), for total >= n.
    for n in (4, 8, 16):
        for total in range(n, 400):
            original = np.arange(0, total, total / n).astype(int).tolist()
            assert frames.sample_frame_indices(total, n) == original, (total, n)
    with pytest.raises(ValueError):
        frames.sample_frame_indices(0, 8)
    with pytest.raises(ValueError):
        frames.sample_frame_indices(8, 0)


@pytest.mark.parametrize("suffix,fmt,codec", [(".avi", "avi", "mpeg4"), (".mp4", "mp4", "libx264")])
def test_read_frames_samples_evenly(tmp_path, suffix, fmt, codec):
    path = make_video(tmp_path / f"v{suffix}", LEVELS, fmt=fmt, codec=codec, size=(80, 60))
    assert header_frames(path) == 10
    images = frames.read_frames(path, 4)
    assert [im.size for im in images] == [(80, 60)] * 4
    assert all(im.mode == "RGB" for im in images)
    assert frame_levels(images) == [0, 2, 5, 7]


@pytest.mark.parametrize(
    "name,fmt,codec,options",
    [
        ("frag.mp4", "mp4", "libx264", {"movflags": "frag_keyframe+empty_moov"}),
        ("v.mkv", "matroska", "mpeg4", None),
    ],
)
def test_read_frames_when_container_reports_zero_frames(tmp_path, name, fmt, codec, options):
    path = make_video(tmp_path / name, LEVELS, fmt=fmt, codec=codec, options=options)
    assert header_frames(path) == 0  # the case under test: no count in the container
    assert decoded_frames(path) == 10
    assert frame_levels(frames.read_frames(path, 4)) == [0, 2, 5, 7]
    assert frame_levels(frames.read_frames(path, 10)) == list(range(10))


def test_read_frames_ignores_a_wrong_header_count(tmp_path):
    # An AVI written to a pipe cannot go back to fill in its header: the count is garbage.
    class Pipe(io.RawIOBase):
        def __init__(self):
            self.data = bytearray()

        def writable(self):
            return True

        def write(self, b):
            self.data += b
            return len(b)

    pipe = make_video(Pipe(), LEVELS, fmt="avi", codec="mpeg4")
    path = tmp_path / "piped.avi"
    path.write_bytes(bytes(pipe.data))
    assert header_frames(path) not in (0, 10)
    assert decoded_frames(path) == 10
    assert frame_levels(frames.read_frames(path, 4)) == [0, 2, 5, 7]


def test_short_video_repeats_frames_evenly(tmp_path):
    path = make_video(tmp_path / "short.avi", LEVELS[:3])
    images = frames.read_frames(path, 8)
    assert len(images) == 8
    assert frame_levels(images) == [0, 0, 0, 1, 1, 1, 2, 2]


def test_unreadable_videos_raise_with_a_reason(tmp_path):
    garbage = tmp_path / "garbage.avi"
    garbage.write_bytes(np.random.default_rng(1).bytes(5000))
    empty = tmp_path / "empty.avi"
    empty.write_bytes(b"")
    audio = tmp_path / "audio.avi"
    with av.open(str(audio), "w", format="avi") as container:
        stream = container.add_stream("pcm_s16le", rate=8000, layout="mono")
        silence = np.zeros((1, 800), np.int16)
        frame = av.AudioFrame.from_ndarray(silence, format="s16", layout="mono")
        frame.sample_rate = 8000
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
    for path, reason in [(garbage, "Invalid data"), (empty, "InvalidDataError"),
                         (audio, "no video stream"), (tmp_path / "missing.avi", "No such file")]:
        with pytest.raises(frames.VideoReadError, match=reason):
            frames.read_frames(path, 8)


# --------------------------------------------------------------------------------------------
# output layout
# --------------------------------------------------------------------------------------------


def test_output_layout_matches_the_original(tmp_path, small_tree, capsys):
    out = tmp_path / "out"
    code, stdout, stderr = run(["--video_dir", small_tree, "--out_dir", out], capsys)
    assert code == 0

    # Sorted by split, class, file name; the corrupt v_zbad.avi keeps its number (1).
    prompt = "Classify the video into one of the following classes: ClassA, ClassB."
    expected = {
        "train": [("train-0000000000", "train/ClassA/v_a1", "ClassA"),
                  ("train-0000000002", "train/ClassB/v_b1", "ClassB")],
        "val": [("val-0000000003", "val/ClassA/v_a2", "ClassA")],
        "test": [("test-0000000004", "test/ClassB/v_b2", "ClassB")],
    }
    for split, rows in expected.items():
        lines = (out / f"ucf101_{split}.jsonl").read_text().splitlines(keepends=True)
        assert len(lines) == len(rows)
        for line, (id_, prefix, label) in zip(lines, rows):
            record = {
                "id": id_,
                "source": "ucf101",
                "conversations": [
                    {"images": [f"{prefix}.{k}.jpg" for k in range(8)], "user": prompt,
                     "assistant": label}
                ],
            }
            assert line == json.dumps(record) + "\n"  # key order and formatting included
            parsed = json.loads(line)
            assert list(parsed) == ["id", "source", "conversations"]
            assert list(parsed["conversations"][0]) == ["images", "user", "assistant"]

    # Exactly these files: three jsonl and num_frames JPEGs per converted video.
    files = set(snapshot(out))
    images = {f"images/{p}.{k}.jpg" for rows in expected.values() for _, p, _ in rows
              for k in range(8)}
    assert files == {"ucf101_train.jsonl", "ucf101_val.jsonl", "ucf101_test.jsonl"} | images
    for name in images:
        with Image.open(out / name) as image:
            assert image.format == "JPEG" and image.size == (64, 48)
    # The 3-frame val video repeats its frames; the 9-frame test video samples floor(9k/8).
    val = [Image.open(out / f"images/val/ClassA/v_a2.{k}.jpg") for k in range(8)]
    assert frame_levels(val) == [0, 0, 0, 1, 1, 1, 2, 2]
    test = [Image.open(out / f"images/test/ClassB/v_b2.{k}.jpg") for k in range(8)]
    assert frame_levels(test) == [0, 1, 2, 3, 4, 5, 6, 7]

    # The corrupt file is reported by name with the reason, during the run and at the end.
    assert "train/ClassA/v_zbad.avi: InvalidDataError" in stderr
    assert "skipped 1 unreadable video(s):\n  train/ClassA/v_zbad.avi: InvalidDataError" in stdout
    assert "converted 4 of 5 videos, 8 frames each: train 2, val 1, test 1" in stdout
    assert "train/ClassA/notes.txt" in stdout  # ignored, and said so
    assert "converting" not in stderr  # --no-tqdm: no progress bar
    assert leftovers(tmp_path, "out") == []


def test_num_frames_and_missing_splits(tmp_path):
    root = tmp_path / "videos"
    _mkdirs(root / "train/Only")
    make_video(root / "train/Only/v.avi", LEVELS)
    out = tmp_path / "out"
    assert run(["--video_dir", root, "--out_dir", out, "--num_frames", "3"]) == 0
    (record,) = [json.loads(line) for line in (out / "ucf101_train.jsonl").read_text().splitlines()]
    assert record["conversations"][0]["images"] == [f"train/Only/v.{k}.jpg" for k in range(3)]
    assert (out / "ucf101_val.jsonl").read_text() == ""  # all three files exist, as before
    assert (out / "ucf101_test.jsonl").read_text() == ""


def test_dataset_root_may_be_the_directory_above(tmp_path, small_tree):
    # Pointing at the parent of the tree (like the archive's UCF101_subset/) works the same.
    out_a, out_b = tmp_path / "outputs/a", tmp_path / "outputs/b"
    assert run(["--video_dir", small_tree, "--out_dir", out_a]) == 0
    assert sorted(p.name for p in small_tree.parent.iterdir()) == ["outputs", "videos"]
    wrapper = tmp_path / "wrapper"
    (wrapper / ".hidden").mkdir(parents=True)  # hidden directories do not count
    small_tree.rename(wrapper / "UCF101_subset")
    assert run(["--video_dir", wrapper, "--out_dir", out_b]) == 0
    assert snapshot(out_a) == snapshot(out_b)


def test_all_videos_unreadable_exits_1_and_writes_nothing(tmp_path, capsys):
    root = tmp_path / "videos"
    _mkdirs(root / "train/A")
    (root / "train/A/broken.avi").write_bytes(b"\x00" * 1000)
    out = tmp_path / "out"
    code, stdout, stderr = run(["--video_dir", root, "--out_dir", out], capsys)
    assert code == 1
    assert "train/A/broken.avi" in stdout and "no video could be converted" in stderr
    assert not out.exists() and leftovers(tmp_path, "out") == []


def test_duplicate_stems_are_refused(tmp_path, capsys):
    root = tmp_path / "videos"
    _mkdirs(root / "train/A")
    make_video(root / "train/A/clip.avi", LEVELS[:2])
    make_video(root / "train/A/clip.mp4", LEVELS[:2], fmt="mp4", codec="libx264")
    code, _, stderr = run(["--video_dir", root, "--out_dir", tmp_path / "out"], capsys)
    line = one_error_line(stderr)
    assert code == 2 and "train/A/clip.avi and train/A/clip.mp4" in line and "rename" in line


def test_tree_without_splits_is_refused(tmp_path, capsys):
    (tmp_path / "videos/A").mkdir(parents=True)
    argv = ["--video_dir", tmp_path / "videos", "--out_dir", tmp_path / "out"]
    code, _, stderr = run(argv, capsys)
    line = one_error_line(stderr)
    assert code == 2 and f"--video_dir {tmp_path / 'videos'}: no train/, val/ or test/" in line


def test_missing_video_dir_is_a_one_line_error(tmp_path, capsys):
    missing = tmp_path / "nope"
    code, _, stderr = run(["--video_dir", missing, "--out_dir", tmp_path / "out"], capsys)
    assert code == 2
    assert one_error_line(stderr).startswith(f"error: --video_dir {missing}: no such directory")


def test_num_workers_gives_identical_output(tmp_path, small_tree):
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    assert run(["--video_dir", small_tree, "--out_dir", serial]) == 0
    assert run(["--video_dir", small_tree, "--out_dir", parallel, "--num_workers", "2"]) == 0
    assert snapshot(serial) == snapshot(parallel)


# --------------------------------------------------------------------------------------------
# out_dir safety and atomicity
# --------------------------------------------------------------------------------------------


def test_non_empty_out_dir_is_refused_and_untouched(tmp_path, small_tree, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    # Refused before any work: not even a download is attempted.
    monkeypatch.setattr(ucf_archive, "hf_hub_download", lambda **kw: pytest.fail("downloaded"))
    for argv in (["--video_dir", small_tree], []):
        code, _, stderr = run(argv + ["--out_dir", out], capsys)
        line = one_error_line(stderr)
        assert code == 2 and "pass --overwrite" in line and f"--out_dir {out}" in line
        assert snapshot(out) == {"precious.txt": b"keep me"}
    assert leftovers(tmp_path, "out") == []


def test_empty_out_dir_is_accepted(tmp_path, small_tree):
    out = tmp_path / "out"
    out.mkdir()
    assert run(["--video_dir", small_tree, "--out_dir", out]) == 0
    assert (out / "ucf101_train.jsonl").is_file()


def test_out_dir_may_not_contain_the_input(tmp_path, small_tree, capsys):
    before = snapshot(small_tree)
    for out in (small_tree, small_tree.parent):
        code, _, stderr = run(["--video_dir", small_tree, "--out_dir", out, "--overwrite"], capsys)
        assert code == 2 and "contains --video_dir" in one_error_line(stderr)
    assert snapshot(small_tree) == before


def test_overwrite_replaces_the_old_output(tmp_path, small_tree):
    out = tmp_path / "out"
    assert run(["--video_dir", small_tree, "--out_dir", out]) == 0
    (out / "stale.txt").write_text("old run")
    argv = ["--video_dir", small_tree, "--out_dir", out, "--overwrite", "--num_frames", "2"]
    assert run(argv) == 0
    assert not (out / "stale.txt").exists()
    assert not (out / "images/train/ClassA/v_a1.2.jpg").exists()
    assert (out / "images/train/ClassA/v_a1.1.jpg").exists()
    assert leftovers(tmp_path, "out") == []


def test_failure_mid_conversion_keeps_the_earlier_output(tmp_path, small_tree, monkeypatch):
    out = tmp_path / "out"
    assert run(["--video_dir", small_tree, "--out_dir", out]) == 0
    before = snapshot(out)
    calls = []
    real = tree.convert_video

    def dies_on_third_video(task, image_root, num_frames):
        calls.append(task.name)
        if len(calls) == 3:
            raise KeyboardInterrupt  # like Ctrl-C (or any crash) half way through
        return real(task, image_root, num_frames)

    monkeypatch.setattr(tree, "convert_video", dies_on_third_video)
    # Ctrl-C is one line and status 130 (recipe.errors.cli), not a traceback
    assert run(["--video_dir", small_tree, "--out_dir", out, "--overwrite", "--num_frames", "2"]) == 130
    assert len(calls) == 3
    assert snapshot(out) == before
    assert leftovers(tmp_path, "out") == []


def test_failure_while_writing_jsonl_leaves_no_partial_file(tmp_path, small_tree, monkeypatch):
    real = tree.write_jsonl

    def dies_in_second_file(path, records):
        if path.name == "ucf101_val.jsonl":
            path.write_text('{"id": "val-')  # half a line, then the process dies
            raise OSError("disk full")
        real(path, records)

    monkeypatch.setattr(tree, "write_jsonl", dies_in_second_file)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"):
        run(["--video_dir", small_tree, "--out_dir", out])
    assert not out.exists()
    assert list(tmp_path.rglob("*.jsonl")) == []


def test_failed_final_rename_restores_the_earlier_output(tmp_path, small_tree, monkeypatch):
    out = tmp_path / "out"
    assert run(["--video_dir", small_tree, "--out_dir", out]) == 0
    before = snapshot(out)
    real_rename = os.rename

    def rename(src, dst):
        if Path(src).name.startswith(".out.tmp-"):
            raise OSError("simulated crash while moving the new output into place")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="simulated crash"):
        run(["--video_dir", small_tree, "--out_dir", out, "--overwrite", "--num_frames", "2"])
    monkeypatch.undo()
    assert snapshot(out) == before
    assert leftovers(tmp_path, "out") == []


# --------------------------------------------------------------------------------------------
# archives and the hub
# --------------------------------------------------------------------------------------------


def make_archive(path, tree, extra=()):
    """tar.gz of `tree` stored as UCF101_subset/..., plus `extra` (TarInfo, bytes) members."""
    with tarfile.open(path, "w:gz") as tar:
        tar.add(tree, arcname="UCF101_subset")
        for info, data in extra:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def member(name, data=b"evil", kind=tarfile.REGTYPE, linkname=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data if kind == tarfile.REGTYPE else None


def test_archive_converts_like_the_video_dir(tmp_path, small_tree):
    archive = make_archive(tmp_path / "UCF101_subset.tar.gz", small_tree)
    from_dir, from_archive = tmp_path / "a", tmp_path / "b"
    assert run(["--video_dir", small_tree, "--out_dir", from_dir]) == 0
    assert run(["--archive", archive, "--out_dir", from_archive, "--tmp_dir", tmp_path]) == 0
    assert snapshot(from_dir) == snapshot(from_archive)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("convert_ucf101-")] == []


@pytest.mark.parametrize(
    "members,name,reason",
    [
        ([member("../evil")], "../evil", "outside the destination"),
        ([member("UCF101_subset/../../evil")], "UCF101_subset/../../evil",
         "outside the destination"),
        ([member("link", kind=tarfile.SYMTYPE, linkname=".."), member("link/evil")], "link",
         "would link to"),
        ([member("link", kind=tarfile.SYMTYPE, linkname="{outside}")], "link",
         "is a link to an absolute path"),
        ([member("UCF101_subset/hard", kind=tarfile.LNKTYPE, linkname="../evil")],
         "UCF101_subset/hard", "would link to"),
        # Each name looks harmless; only resolving the symlink on disk shows the escape.
        ([member("x/l", kind=tarfile.SYMTYPE, linkname=".."), member("x/l/x/l/../evil")],
         "x/l/x/l/../evil", "outside the destination"),
        ([member("UCF101_subset/dev", kind=tarfile.CHRTYPE)], "UCF101_subset/dev",
         "is a special file"),
    ],
)
def test_archive_members_escaping_the_target_are_refused(
    tmp_path, small_tree, capsys, members, name, reason
):
    outside = tmp_path / "outside"
    outside.mkdir()
    work = tmp_path / "work"  # extraction happens in work/convert_ucf101-*/extracted
    work.mkdir()
    extra = []
    for info, data in members:
        info.linkname = info.linkname.format(outside=outside)
        extra.append((info, data))
    archive = make_archive(tmp_path / "bad.tar.gz", small_tree, extra)
    with tarfile.open(archive) as tar:  # the archive really holds the hostile names
        assert name in tar.getnames()
    before = snapshot(tmp_path)

    out = tmp_path / "out"
    code, _, stderr = run(["--archive", archive, "--out_dir", out, "--tmp_dir", work], capsys)
    assert code == 2
    line = one_error_line(stderr)
    assert line.startswith(f"error: refusing to extract archive {archive}: ")
    assert repr(name) in line and reason in line
    assert snapshot(tmp_path) == before  # nothing written anywhere, inside work/ or outside
    assert not out.exists() and list(work.iterdir()) == []

    # extract_archive on its own: refuses and writes nothing outside the destination.
    dest = tmp_path / "a" / "b" / "dest"
    with pytest.raises(DataError, match=reason) as info:
        ucf_archive.extract_archive(archive, dest)
    assert repr(name) in str(info.value)
    assert [p.name for p in (tmp_path / "a" / "b").iterdir()] == ["dest"]
    assert not (tmp_path / "evil").exists() and not (tmp_path / "a" / "evil").exists()
    assert list(outside.iterdir()) == []


def test_extract_keeps_links_inside_and_absolute_names_inside(tmp_path):
    archive = tmp_path / "ok.tar"
    outside = tmp_path / "outside"
    with tarfile.open(archive, "w") as tar:
        for info, data in [member("d/f.txt", b"hi"),
                           member("d/sym", kind=tarfile.SYMTYPE, linkname="f.txt"),
                           member("d/hard", kind=tarfile.LNKTYPE, linkname="d/f.txt"),
                           member(str(outside / "abs.txt"), b"abs")]:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    ucf_archive.extract_archive(archive, tmp_path / "dest")
    assert (tmp_path / "dest/d/sym").read_bytes() == b"hi"
    assert (tmp_path / "dest/d/hard").read_bytes() == b"hi"
    # As GNU tar does: the leading "/" is dropped, the file lands inside the destination.
    assert (tmp_path / "dest" / str(outside / "abs.txt").lstrip("/")).read_bytes() == b"abs"
    assert not outside.exists()


def test_not_an_archive_is_a_clear_error(tmp_path, capsys):
    bogus = tmp_path / "x.tar.gz"
    bogus.write_bytes(b"definitely not gzip")
    code, _, stderr = run(["--archive", bogus, "--out_dir", tmp_path / "out"], capsys)
    assert code == 2
    assert f"cannot read or extract archive {bogus}" in one_error_line(stderr)
    argv = ["--archive", tmp_path / "nope.tar.gz", "--out_dir", tmp_path / "out"]
    code, _, stderr = run(argv, capsys)
    assert code == 2 and "nope.tar.gz: no such file" in one_error_line(stderr)


def test_default_downloads_the_subset_archive_from_the_hub(tmp_path, small_tree, monkeypatch):
    archive = make_archive(tmp_path / "UCF101_subset.tar.gz", small_tree)
    calls = []

    def fake_download(**kwargs):
        calls.append(kwargs)
        return str(archive)

    monkeypatch.setattr(ucf_archive, "hf_hub_download", fake_download)
    assert run(["--out_dir", tmp_path / "out"]) == 0
    assert calls == [{"repo_id": "sayakpaul/ucf101-subset", "filename": "UCF101_subset.tar.gz",
                      "repo_type": "dataset"}]
    assert len((tmp_path / "out/ucf101_train.jsonl").read_text().splitlines()) == 2


def test_unreachable_hub_suggests_local_input(tmp_path, monkeypatch, capsys):
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(**kwargs):
        raise LocalEntryNotFoundError("cannot reach huggingface.co")

    monkeypatch.setattr(ucf_archive, "hf_hub_download", offline)
    code, _, stderr = run(["--out_dir", tmp_path / "out"], capsys)
    assert code == 2
    line = one_error_line(stderr)
    assert "sayakpaul/ucf101-subset" in line and "cannot reach huggingface.co" in line
    assert "--video_dir" in line and "--archive" in line
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# synthetic data
# --------------------------------------------------------------------------------------------


def test_synthetic_end_to_end_is_learnable(tmp_path):
    out = tmp_path / "out"
    argv = ["--synthetic", "--out_dir", out, "--synthetic_classes", "4",
            "--synthetic_videos_per_class", "3", "--synthetic_eval_videos_per_class", "2",
            "--synthetic_size", "64x48", "--synthetic_frames", "12"]
    assert run(argv) == 0
    names = ["BlueDown", "GreenLeft", "RedRight", "YellowUp"]
    records = {
        split: [json.loads(line) for line in (out / f"ucf101_{split}.jsonl").open()]
        for split in tree.SPLITS
    }
    assert {split: len(rows) for split, rows in records.items()} == dict(train=12, val=8, test=8)
    prompt = f"Classify the video into one of the following classes: {', '.join(names)}."
    for rows in records.values():
        for row in rows:
            (turn,) = row["conversations"]
            assert turn["user"] == prompt and turn["assistant"] in names
            assert len(turn["images"]) == 8

    def frames(row):
        return [np.asarray(Image.open(out / "images" / p), np.float32)
                for p in row["conversations"][0]["images"]]

    # Colour alone separates the classes: nearest centroid of the mean colour is always right.
    def mean_colour(row):
        return np.mean([f.reshape(-1, 3).mean(0) for f in frames(row)], axis=0)

    centroids = {n: np.mean([mean_colour(r) for r in records["train"]
                             if r["conversations"][0]["assistant"] == n], axis=0) for n in names}
    for row in records["val"] + records["test"]:
        guess = min(names, key=lambda n: np.linalg.norm(mean_colour(row) - centroids[n]))
        assert guess == row["conversations"][0]["assistant"]

    # Motion alone too: the dark square moves in the direction the class name says.
    direction = {"Down": (0, 1), "Left": (-1, 0), "Right": (1, 0), "Up": (0, -1)}
    for row in records["train"] + records["test"]:
        fs = frames(row)
        centres = [np.argwhere(f.mean(-1) < 70).mean(0) for f in (fs[0], fs[-1])]  # (y, x)
        dy, dx = centres[1] - centres[0]
        label = row["conversations"][0]["assistant"]
        want = next(v for k, v in direction.items() if label.endswith(k))
        assert np.sign([round(dx / 4), round(dy / 4)]).tolist() == list(want), (label, dx, dy)


def test_write_synthetic_tree_is_deterministic(tmp_path):
    kwargs = dict(num_classes=2, videos_per_class=1, eval_videos_per_class=1, num_frames=4,
                  size=(32, 24))
    assert synthetic.write_synthetic_tree(tmp_path / "a", seed=3, **kwargs) == ["GreenLeft", "RedRight"]
    synthetic.write_synthetic_tree(tmp_path / "b", seed=3, **kwargs)
    synthetic.write_synthetic_tree(tmp_path / "c", seed=4, **kwargs)
    a = snapshot(tmp_path / "a")
    assert sorted(a) == sorted(f"{split}/{name}/v_{name}_g{g:02d}_c01.avi"
                               for split, g in (("train", 1), ("val", 2), ("test", 3))
                               for name in ("GreenLeft", "RedRight"))
    assert a == snapshot(tmp_path / "b")
    assert a != snapshot(tmp_path / "c")
    for path in (tmp_path / "a").rglob("*.avi"):
        assert header_frames(path) == 4 and decoded_frames(path) == 4


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--video_dir", "a", "--archive", "b"], "argument --archive: not allowed with"),
        (["--video_dir", "a", "--synthetic"], "argument --synthetic: not allowed with"),
        (["--video_dir", "a", "--synthetic_classes", "3"], "only applies with --synthetic"),
        (["--seed", "1"], "--seed only applies with --synthetic"),
        (["--synthetic", "--synthetic_classes", "9"], "--synthetic_classes must be in 2..8"),
        (["--synthetic", "--synthetic_frames", "0"], "--synthetic_frames must be >= 1"),
        (["--synthetic", "--synthetic_size", "63x48"], "must be even"),
        (["--synthetic", "--synthetic_size", "big"], "WIDTHxHEIGHT"),
        (["--video_dir", "a", "--num_frames", "0"], "--num_frames must be >= 1"),
        (["--video_dir", "a", "--num_frames", "x"], "argument --num_frames: invalid int value"),
        (["--video_dir", "a", "--num_workers", "0"], "--num_workers must be >= 1"),
        (["--video_dir", "a", "--frames", "3"], "unrecognized arguments: --frames 3"),
        (["--synthetic", "--tmp_dir", "{tmp}/nope"], "--tmp_dir {tmp}/nope: no such directory"),
        (["--video_dir", "a"], "required: --out_dir"),
    ],
)
def test_bad_flags_are_one_line_errors(argv, message, capsys, tmp_path):
    argv = [a.format(tmp=tmp_path) for a in argv]
    if "--out_dir" not in message:
        argv = argv + ["--out_dir", str(tmp_path / "out")]
    assert cu.main(argv) == 2
    assert message.format(tmp=tmp_path) in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_out_dir_below_a_file_is_refused_before_any_work(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, _, stderr = run(["--synthetic", "--out_dir", tmp_path / "file/out"], capsys)
    assert code == 2
    assert one_error_line(stderr) == (f"error: --out_dir {tmp_path / 'file/out'}: "
                                      f"{tmp_path / 'file'} is not a directory; choose another path")


def test_command_line_user_errors_print_one_line(tmp_path):
    # As users run it: the whole stderr is the one error line, no traceback, status 2.
    script = str(ROOT / "convert_ucf101.py")
    for argv in (["--num_frames", "0"], ["--video_dir", str(tmp_path / "nope")]):
        cmd = [sys.executable, script, "--out_dir", str(tmp_path / "out"), *argv]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert result.returncode == 2
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
        assert result.stdout == ""


def test_command_line_with_workers(tmp_path):
    # As users run it: a separate interpreter, worker processes spawned from __main__.
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "convert_ucf101.py"), "--synthetic", "--out_dir", str(out),
           "--synthetic_classes", "2", "--synthetic_videos_per_class", "2",
           "--synthetic_eval_videos_per_class", "1", "--synthetic_size", "32x24",
           "--num_workers", "2", "--num_frames", "4"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "converted 8 of 8 videos, 4 frames each: train 4, val 2, test 2" in result.stdout
    assert "converting" in result.stderr  # the progress bar
    assert len(list((out / "images").rglob("*.jpg"))) == 32
