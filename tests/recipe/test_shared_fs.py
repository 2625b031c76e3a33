"""recipe.shared_fs on one process standing in for one rank of a two-node job (the 2-rank runs
are in test_distributed.py): what it leaves in --output_dir when the job fails mid-check."""

from types import SimpleNamespace

import pytest

import recipe.shared_fs as shared_fs


def test_a_failed_check_leaves_no_marker(tmp_path, monkeypatch):
    """Another rank dies while the markers are being looked for: this node's marker goes too."""
    state = SimpleNamespace(num_processes=2, process_index=0, wait_for_everyone=lambda: None)
    monkeypatch.setattr(shared_fs, "PartialState", lambda: state)
    monkeypatch.setattr(shared_fs, "_this_node", lambda: "node 0 (here)")
    monkeypatch.setattr(shared_fs, "broadcast_object_list", lambda objects: objects)
    calls = []

    def gather_object(objects):
        calls.append(objects)
        if len(calls) == 1:
            return [("node 0 (here)", 0), ("node 1 (there)", 1)]
        raise RuntimeError("rank 1 is gone")

    monkeypatch.setattr(shared_fs, "gather_object", gather_object)
    with pytest.raises(RuntimeError, match="rank 1 is gone"):
        shared_fs.check_shared_output_dir(tmp_path)
    assert len(calls) == 2 and not list(tmp_path.iterdir())
