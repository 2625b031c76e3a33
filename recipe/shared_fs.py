"""Multi-node runs need --output_dir on a filesystem every node shares: checked before training.

Global rank 0 writes the checkpoints and outputs; every node reads them back (resume from a
checkpoint, --merge_lora's merged/, its evaluation). On a node-local disk each node would see
only its own files, which a user finds out at the first resume. So before anything loads, one
rank per node writes a marker file into --output_dir, all ranks wait, and every rank looks for
every node's marker; the markers are removed afterwards. A single-node run skips the check.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from pathlib import Path

from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object

from .errors import UserError

__all__ = ["check_shared_output_dir"]

logger = logging.getLogger("recipe")

MARKER = ".shared_fs_check"


def _this_node() -> str:
    """This process' node: torchrun's node rank (GROUP_RANK) and the host name."""
    return f"node {os.environ.get('GROUP_RANK', '0')} ({socket.gethostname()})"


def check_shared_output_dir(output_dir: Path) -> None:
    """Raises a UserError (on every rank) naming a node that does not see the others' markers."""
    if PartialState().num_processes == 1:
        return
    node = _this_node()
    ranks = gather_object([(node, PartialState().process_index)])
    nodes = sorted({n for n, _ in ranks})
    if len(nodes) == 1:
        return
    writer = min(rank for n, rank in ranks if n == node) == PartialState().process_index
    token = broadcast_object_list([uuid.uuid4().hex])[0]  # this run's markers, not an earlier run's
    marker = lambda n: output_dir / f"{MARKER}.{token}.{nodes.index(n)}"  # noqa: E731
    try:
        if writer:
            output_dir.mkdir(parents=True, exist_ok=True)
            marker(node).write_text(node + "\n", encoding="utf-8")
        PartialState().wait_for_everyone()
        unseen = [n for n in nodes if not marker(n).exists()]
        views = gather_object([(node, unseen)])
        PartialState().wait_for_everyone()
    finally:  # (also when another rank fails meanwhile: no marker is left behind)
        if writer:
            marker(node).unlink(missing_ok=True)
    blind = [(n, unseen) for n, unseen in views if unseen]
    if blind:
        n, unseen = blind[0]
        raise UserError(
            f"--output_dir {output_dir} is not shared by all {len(nodes)} nodes: {n} does not see the file "
            f"{unseen[0]} wrote there. Put --output_dir on a filesystem every node mounts at the same path "
            "(NFS, Lustre, ...): rank 0 writes checkpoints and outputs and every node reads them back",
            everywhere=True,
        )
    logger.info("--output_dir %s is shared by all %d nodes", output_dir, len(nodes))
