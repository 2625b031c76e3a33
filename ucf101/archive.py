"""The UCF-101 subset archive: download from the hub, extraction of any tar archive."""

from __future__ import annotations

import sys
import tarfile
from pathlib import Path

from huggingface_hub import hf_hub_download

from recipe.errors import DataError

__all__ = ["HUB_REPO_ID", "HUB_FILENAME", "extract_archive", "download_subset_archive"]

HUB_REPO_ID = "sayakpaul/ucf101-subset"
HUB_FILENAME = "UCF101_subset.tar.gz"


def extract_archive(archive: Path, dest: Path) -> None:
    """Extract a (compressed) tar archive into `dest` through tarfile's "data" filter.

    The filter refuses members that would land outside `dest` (`..`, links to absolute paths or
    pointing outside, also through a link extracted earlier), device files and fifos; leading
    "/" in names are stripped, as GNU tar does, so absolute names land inside `dest`. A refused
    or unreadable archive raises DataError naming the archive (and the member). Members before
    a refused one stay in `dest`, so `dest` should be a temporary directory.
    """
    if not archive.is_file():
        raise DataError(
            f"--archive {archive}: no such file; give the path of {HUB_FILENAME} or another "
            ".tar[.gz] of a {train,val,test}/<ClassName>/<video> tree"
        )
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(dest, filter="data")
    except tarfile.FilterError as error:
        raise DataError(
            f"refusing to extract archive {archive}: {error}; nothing was written outside the "
            "temporary directory. Use a copy of the archive from a source you trust"
        ) from error
    except (tarfile.TarError, EOFError, OSError) as error:
        # zlib.error and gzip.BadGzipFile surface as OSError/EOFError/TarError here.
        raise DataError(
            f"cannot read or extract archive {archive}: {error}; check that it is a complete "
            ".tar or .tar.gz (download it again if it was cut short)"
        ) from error


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
