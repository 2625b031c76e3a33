"""The parts of `convert_ucf101.py`, the converter from video trees to the recipes' jsonl layout.

- `frames`: decoding a video with PyAV and sampling its frames evenly.
- `tree`: the input tree (finding the videos) and the output tree (JPEG frames, jsonl lines,
  publishing the finished output in one rename).
- `archive`: the UCF-101 subset archive: download from the hub, extraction.
- `synthetic`: small generated videos that a tiny model learns in minutes (the CPU demo's data).

The command line, and the description of the output layout, are in `convert_ucf101.py`.
"""
