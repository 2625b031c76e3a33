"""Validation results kept between launches, so a resume or a second run with the same data
starts in seconds instead of tokenizing every example and reading every image header again.

One file per setting, OUTPUT_DIR/.cache/validation-<setting>.pkl, where the setting is what an
example's result depends on besides the example: the tokenizer (its full serialisation and chat
template), --num_crops, --decode_images and the source of the code that checks an example (a
recipe update that measures differently starts afresh). --max_length is not part of it: the
cache holds each example's measured length, and the limit is applied to that afresh. Inside,
results are keyed per example by its content, not by where it stands in its file (deleting the
bad lines a run reported keeps the results of the lines below them): id, the system message,
every turn's text, and for each image
  a file path:      path, size and modification time (stat only: re-reading 40k images to hash
                    them would cost what the cache saves; a file rewritten in place keeps neither
                    its size nor its mtime in practice),
  a hub image:      the dataset's fingerprint (datasets' own content hash), row and column,
  a PIL image:      its size and mode (all a check of an in-memory image looks at),
  a streamed image: a hash of its encoded bytes (recipe.hub.EncodedImage.digest).
So an edited line, a replaced image or another tokenizer is checked again, and only that.
Only examples that passed are kept: a bad one is checked again at every launch, so its problem
names its current line, and one mended where the key does not look (a file's permissions) is
seen mended. Examples whose images are of another kind are not cached.
"""

from __future__ import annotations

import hashlib
import logging
import os
import functools
import pickle
from pathlib import Path
from typing import Any, Sequence

from PIL import Image

__all__ = ["ValidationCache", "CACHE_DIR"]

logger = logging.getLogger("recipe.validation")

CACHE_DIR = ".cache"
VERSION = 1  # raise when what a result holds changes
# The code an example's check runs (tokenizing, image token counts, image headers): its source is
# part of the setting, so a recipe update that measures differently does not reuse old lengths.
_ROOT = Path(__file__).resolve().parent.parent
CODE_FILES = tuple(_ROOT / name for name in (
    "recipe/tokenization.py", "recipe/validation.py", "recipe/records.py", "recipe/validation_cache.py",
    "phi3v/image_processing_phi3v.py", "phi3v/processing_phi3v.py",
))
_LOADED: dict[Path, tuple[int, dict]] = {}  # the last cache file read or written, by its mtime


def _image_key(image: Any) -> tuple | None:
    if isinstance(image, (str, os.PathLike)):
        try:
            stat = os.stat(image)
        except OSError:
            return ("missing", os.fspath(image))
        return ("file", os.fspath(image), stat.st_size, stat.st_mtime_ns)
    if isinstance(image, Image.Image):
        return ("pil", image.size, image.mode)
    digest = getattr(image, "digest", None)
    if isinstance(digest, str):
        return ("bytes", digest)
    fingerprint = getattr(getattr(image, "dataset", None), "_fingerprint", None)
    if fingerprint is not None:
        return ("hub", fingerprint, image.row, image.column, image.position)
    return None


def example_key(conversation) -> bytes | None:
    """A digest of everything the example's check reads, or None if it cannot be keyed."""
    turns = []
    for turn in conversation.turns:
        images = [_image_key(image) for image in turn.images]
        if None in images:
            return None
        turns.append((turn.user, turn.assistant, images))
    system = getattr(conversation, "system", "")  # rendered first: part of the length
    return hashlib.blake2b(repr((conversation.id, system, turns)).encode(),
                           digest_size=16).digest()


@functools.lru_cache(maxsize=1)
def _code_digest() -> str:
    digest = hashlib.sha256()
    for path in CODE_FILES:
        try:
            digest.update(Path(path).read_bytes())
        except OSError:  # (an installed copy without that file: the version alone then)
            digest.update(os.fspath(path).encode())
    return digest.hexdigest()


def setting_key(tokenizer, num_crops: int, decode_images: bool) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    serialised = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    parts = (VERSION, _code_digest(), type(tokenizer).__name__, serialised, tokenizer.chat_template, num_crops,
             decode_images)
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


class ValidationCache:
    """lookup(keys) -> the results found; store(items) merges and writes (main process)."""

    def __init__(self, directory: Path, tokenizer, num_crops: int, decode_images: bool):
        self.path = Path(directory) / f"validation-{setting_key(tokenizer, num_crops, decode_images)}.pkl"
        self._entries: dict[bytes, Any] | None = None

    def _load(self) -> dict[bytes, Any]:
        if self._entries is None:
            try:
                stamp = os.stat(self.path).st_mtime_ns
                if _LOADED.get(self.path, (None,))[0] == stamp:  # (training then evaluation data: read once)
                    self._entries = _LOADED[self.path][1]
                    return self._entries
                with open(self.path, "rb") as f:
                    self._entries = pickle.load(f)
                _LOADED.clear()
                _LOADED[self.path] = (stamp, self._entries)
            except FileNotFoundError:
                self._entries = {}
            except Exception as err:  # noqa: BLE001 - a damaged cache is only a slower start
                logger.warning("ignoring the validation cache %s (%s); checking every example", self.path, err)
                self._entries = {}
        return self._entries

    def lookup(self, keys: Sequence[bytes | None]) -> list[Any | None]:
        entries = self._load()
        return [entries.get(key) if key is not None else None for key in keys]

    def store(self, items: Sequence[tuple[bytes | None, Any]]) -> None:
        """Adds results and writes the file atomically (write a temporary file, rename)."""
        entries = self._load()
        new = {key: value for key, value in items if key is not None and key not in entries}
        if not new:
            return
        entries.update(new)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                pickle.dump(entries, f, protocol=pickle.HIGHEST_PROTOCOL)
            os.replace(tmp, self.path)
            _LOADED.clear()
            _LOADED[self.path] = (os.stat(self.path).st_mtime_ns, entries)
        except OSError as err:  # a full disk costs the cache, not the run
            tmp.unlink(missing_ok=True)
            logger.warning("could not write the validation cache %s (%s)", self.path, err)
