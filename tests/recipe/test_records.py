"""The records every layout reads into (recipe.records): subsets."""

from recipe.records import Conversation, Conversations, Problem, Turn, subset


def test_subsets_are_seeded_random_and_keep_file_order():
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
