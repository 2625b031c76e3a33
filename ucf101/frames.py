"""Decoding a video with PyAV and sampling `num_frames` frames evenly over its whole length."""

from __future__ import annotations

import os
from pathlib import Path

import av
from PIL import Image

__all__ = ["VideoReadError", "sample_frame_indices", "read_frames"]


class VideoReadError(Exception):
    """One video cannot be decoded; the converter skips it and lists it in the summary."""


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
