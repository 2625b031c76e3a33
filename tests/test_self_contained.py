"""A clone stands alone: no tracked file names a path of one machine or a document the
repository does not hold (what users need to know about the checkpoint format is in
docs/checkpoint_format.md)."""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Written so that this file does not match itself.
MACHINE_PATH = re.compile(r"(?<![\w.~:/-])/(?:wo" r"rk|ho" r"me|ro" r"ot)/")
OUTSIDE_DOCUMENT = re.compile(r"\.\./sha" r"red|PHI3V_" r"SPEC")


def tracked_files() -> list[Path]:
    try:
        listing = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files are unknown")
    return [ROOT / name for name in listing.stdout.decode().split("\0") if name]


def offending_lines(pattern: re.Pattern) -> list[str]:
    found = []
    for path in tracked_files():
        if not path.is_file():  # deleted in the working tree, not yet committed
            continue
        text = path.read_bytes().decode("utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            if pattern.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:120]}")
    return found


def test_the_patterns_catch_what_they_are_for():
    assert MACHINE_PATH.search("see /wo" "rk/shared/spec") and MACHINE_PATH.search('"/ro' 'ot/.cache"')
    assert not MACHINE_PATH.search("https://example.com/ho" "me/x") and not MACHINE_PATH.search("~/ho" "me/")
    assert OUTSIDE_DOCUMENT.search("PHI3V_" "SPEC.md 8.1") and OUTSIDE_DOCUMENT.search("../sha" "red/release")


def test_no_absolute_machine_paths_in_tracked_files():
    assert offending_lines(MACHINE_PATH) == []


def test_no_references_to_documents_outside_the_repository():
    assert offending_lines(OUTSIDE_DOCUMENT) == []


def test_the_checkpoint_format_document_has_the_sections_the_code_cites():
    cited = set()
    for path in tracked_files():
        if path.suffix in (".py", ".md") and path.is_file():
            cited |= set(re.findall(r"checkpoint_format\.md §(\d+)", path.read_text(encoding="utf-8")))
    headings = set(re.findall(r"^## (\d+)\.", (ROOT / "docs" / "checkpoint_format.md").read_text(), re.M))
    assert cited and cited <= headings
