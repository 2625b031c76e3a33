"""Examples from the jsonl layout: reading, bad lines, unsafe paths, empty files, subsets."""

import pytest

from data_samples import good_record, image, write_jsonl
from recipe.layouts import load_jsonl, read_jsonl, resolve_image_path
from recipe.records import Conversation, Turn


def test_read_jsonl_reports_each_bad_line_with_file_and_line(tmp_path):
    (tmp_path / "img").mkdir()
    image(336, 336).save(tmp_path / "img" / "a.png")
    data = write_jsonl(tmp_path / "d.jsonl", [
        good_record(0, ["a.png"]),
        "{not json",
        {"id": "x"},
        {"conversations": [{"user": 3, "assistant": "a"}]},
        {"conversations": [{"user": "u", "asistant": "a"}]},
        {"conversations": [{"images": ["/etc/passwd"], "user": "u", "assistant": "a"}]},
        {"conversations": [{"images": ["../secret.png"], "user": "u", "assistant": "a"}]},
        {"conversations": [{"images": "a.png", "user": "u", "assistant": "a"}]},
    ])
    conversations, problems = read_jsonl(data, tmp_path / "img")
    assert [c.id for c in conversations] == ["ex0"]
    by_line = {}
    for p in problems:
        line = int(p.where.rsplit(":", 1)[1])
        by_line[line] = by_line.get(line, "") + p.message + "; "
    assert set(by_line) == {2, 3, 4, 5, 6, 7, 8}
    assert "invalid JSON" in by_line[2]
    assert "conversations" in by_line[3]
    assert "user must be a string" in by_line[4]
    assert "asistant" in by_line[5]
    assert "absolute" in by_line[6]
    assert "escapes" in by_line[7]
    assert "list of path strings" in by_line[8]
    assert all(str(data) in p.where for p in problems)


def test_path_traversal_refused():
    for bad in ["../x.png", "a/../../x.png", "/abs.png", ""]:
        with pytest.raises(ValueError):
            resolve_image_path(bad, "/data/images")
    assert str(resolve_image_path("a/./b/../c.png", "/data/images")) == "/data/images/a/c.png"


@pytest.mark.parametrize("content", ["", "\n  \n\t\n"])
def test_empty_or_blank_jsonl_is_one_error_line_naming_the_file(tmp_path, capsys, content):
    from recipe.errors import cli

    data = tmp_path / "ucf101_train.jsonl"
    data.write_text(content)
    assert cli(lambda: load_jsonl(data, tmp_path / "images")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    assert f"{data} has no examples" in err


def test_bad_lines_end_in_one_error_line_with_the_problems_above(tmp_path, capsys):
    from recipe.errors import cli

    data = write_jsonl(tmp_path / "d.jsonl", ["{broken", good_record(1, [])])
    assert cli(lambda: load_jsonl(data, tmp_path)) == 2
    *details, last = capsys.readouterr().err.splitlines()
    assert details == [f"  {data}:1: invalid JSON (Expecting property name enclosed in double quotes at column 2)"]
    assert last.startswith(f"error: 1 problem(s) in {data} (first: {data}:1: invalid JSON")
    assert cli(lambda: load_jsonl(tmp_path / "nope.jsonl", tmp_path)) == 2
    assert "nope.jsonl does not exist" in capsys.readouterr().err


def test_subsets_are_seeded_random_and_keep_file_order():
    from recipe.records import Conversations, Problem, subset

    # Converted data is sorted by class: the first N would all be one class.
    convs = Conversations([Conversation(f"{cls}{i}", [Turn("q", cls)]) for cls in "abcd" for i in range(25)],
                          problems=[Problem("d.jsonl:7", "invalid JSON", "invalid JSON")])
    picked = subset(convs, 20, seed=3)
    ids = [c.id for c in picked]
    assert len(ids) == 20 and len(set(ids)) == 20
    assert ids == sorted(ids, key=[c.id for c in convs].index)  # original order
    assert len({c.answer for c in picked}) > 1  # not one class
    assert [c.id for c in subset(convs, 20, seed=3)] == ids  # same seed, same subset (every rank)
    assert [c.id for c in subset(convs, 20, seed=4)] != ids
    assert picked.problems == convs.problems  # unreadable lines are still reported by validate
    assert [c.id for c in subset(convs, None, seed=3)] == [c.id for c in convs]
    assert len(subset(convs, 1000, seed=3)) == 100


def test_data_flag_checks():
    from recipe.args import DataArguments
    from recipe.errors import FlagError

    DataArguments(max_train_samples=5, max_eval_samples=1, max_length=512).check()
    with pytest.raises(FlagError, match="--max_eval_samples 0 must be at least 1"):
        DataArguments(max_eval_samples=0).check()
