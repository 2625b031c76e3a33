"""The UCF-101 subset archive: download from the hub, safe extraction of any tar archive."""

from __future__ import annotations

import os
import sys
import tarfile
from pathlib import Path, PurePosixPath, PureWindowsPath

from huggingface_hub import hf_hub_download

from recipe.errors import DataError

__all__ = ["HUB_REPO_ID", "HUB_FILENAME", "UnsafeArchiveError", "safe_extract", "extract_archive",
           "download_subset_archive"]

HUB_REPO_ID = "sayakpaul/ucf101-subset"
HUB_FILENAME = "UCF101_subset.tar.gz"


class UnsafeArchiveError(DataError):
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
    """Safely extract a (compressed) tar archive, turning read errors into DataError."""
    if not archive.is_file():
        raise DataError(f"--archive {archive}: no such file")
    try:
        with tarfile.open(archive) as tar:
            safe_extract(tar, dest)
    except (tarfile.TarError, EOFError, OSError) as error:
        # zlib.error and gzip.BadGzipFile surface as OSError/EOFError/TarError here.
        raise DataError(f"cannot read or extract archive {archive}: {error}") from error


def download_subset_archive() -> Path:
    """Download (or reuse from the hub cache) the UCF-101 subset archive the original used."""
    print(f"fetching {HUB_FILENAME} from the hub dataset {HUB_REPO_ID} (offline: use --archive, "
          "--video_dir or --synthetic)", file=sys.stderr)
    try:
        path = hf_hub_download(repo_id=HUB_REPO_ID, filename=HUB_FILENAME, repo_type="dataset")
    except Exception as error:  # any failure (offline, DNS, HTTP, auth) has the same remedy
        raise DataError(
            f"could not download {HUB_FILENAME} from the hub dataset {HUB_REPO_ID} "
            f"({type(error).__name__}: {error}). Without hub access, convert a local copy with "
            "--archive UCF101_subset.tar.gz, your own videos with --video_dir DIR "
            "(DIR/{train,val,test}/<ClassName>/*.avi), or generated demo data with --synthetic."
        ) from error
    return Path(path)
