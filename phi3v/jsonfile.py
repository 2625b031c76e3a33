"""JSON files written whole or not at all: the one JSON writer of the package and the recipes
(saved configs, eval_*.json, run_complete.json).

Neither the standard library nor huggingface_hub has a public atomic writer (huggingface_hub
writes its downloads through a temporary file and a rename, privately), so it is these lines.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["write_json_atomic"]


def write_json_atomic(path: str | os.PathLike, data: Any, sort_keys: bool = False) -> None:
    """JSON written to a temporary file beside `path`, then renamed over it: a reader (or a crash)
    never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=sort_keys, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
