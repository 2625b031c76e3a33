"""Exact-match accuracy and DocVQA's ANLS, checked against hand-computed values."""

import pytest

from recipe.metrics import ANLS_THRESHOLD, accuracy, anls, anls_score, levenshtein, normalize_answer

# -- levenshtein -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "a, b, distance",
    [
        ("", "", 0),
        ("", "abc", 3),
        ("abc", "", 3),
        ("abc", "abc", 0),
        ("kitten", "sitting", 3),  # k->s, e->i, +g
        ("flaw", "lawn", 2),  # -f, +n
        ("intention", "execution", 5),
        ("ab", "ba", 2),  # no transpositions in plain Levenshtein
        ("café", "cafe", 1),  # one code point substituted
        ("日本語", "日本", 1),
        ("😀x", "x", 1),  # an astral-plane emoji is one code point, not two
        ("é", "e\u0301", 2),  # precomposed vs combining accent: not normalised
    ],
)
def test_levenshtein_known_distances(a, b, distance):
    assert levenshtein(a, b) == distance
    assert levenshtein(b, a) == distance


def test_levenshtein_longer_strings_against_rows_swapped():
    # The row runs over the shorter string; both argument orders must agree.
    a = "the quick brown fox jumps over the lazy dog"
    b = "a quick brown dog jumped over lazy foxes"
    assert levenshtein(a, b) == levenshtein(b, a) > 0
    assert levenshtein(a, a + "!") == 1


# -- ANLS ------------------------------------------------------------------------------------


def test_anls_examples_from_the_rrc_task_page():
    # The "Coca Cola" example the DocVQA/ST-VQA task pages use to illustrate ANLS.
    answers = ["Coca Cola", "Coca Cola Company"]
    assert anls_score("Coca Cola", answers) == 1.0
    assert anls_score("Coca cola", answers) == 1.0  # case-insensitive
    assert anls_score("COCA COLA COMPANY", answers) == 1.0
    assert anls_score("Cocacola", answers) == pytest.approx(1 - 1 / 9)  # space-sensitive
    assert anls_score("Coca-Cola", answers) == pytest.approx(1 - 1 / 9)
    assert anls_score("Cola", answers) == 0.0  # NL = 5/9 >= 0.5
    assert anls_score("The Coca", answers) == 0.0  # NL = 5/9


def test_anls_hand_computed_values():
    assert anls_score("12/15/89", ["12/15/88"]) == pytest.approx(0.875)  # 1 edit in 8
    assert anls_score("Dear dr. Lobo", ["Dear Dr. Lobo", "Dr. Lobo"]) == 1.0
    # "lobo" vs "dr. lobo": 4 deletions in 8 -> NL 0.5 -> 0 ; vs "lobo": exact.
    assert anls_score("Lobo", ["Dr. Lobo", "lobo"]) == 1.0
    assert anls_score("Lobo", ["Dr. Lobo"]) == 0.0


def test_anls_takes_the_best_reference_whatever_its_position():
    # vs "dear dr. lobo": 5 edits in 13 -> 1 - 5/13; vs "dr lobo": 1 edit in 8 -> 0.875.
    assert anls_score("Dr. Lobo", ["Dear Dr. Lobo", "Dr Lobo"]) == pytest.approx(0.875)
    assert anls_score("Dr. Lobo", ["Dr Lobo", "Dear Dr. Lobo"]) == pytest.approx(0.875)
    # A far-off reference (scored 0) never lowers the best one.
    assert anls_score("invoice", ["zzzzzzzzzzzz", "Invoice", "invoices"]) == 1.0


def test_anls_whitespace_is_stripped_and_collapsed():
    assert anls_score("  Coca \t  Cola\n", ["coca cola"]) == 1.0
    assert anls_score("coca cola", ["  COCA   COLA  "]) == 1.0
    # Collapsing is to one space, not removal: a missing space is still an edit.
    assert anls_score("coca  cola", ["cocacola"]) == pytest.approx(1 - 1 / 9)


def test_anls_empty_prediction():
    assert anls_score("", ["abc"]) == 0.0  # NL = 3/3
    assert anls_score("", [""]) == 1.0  # both empty: defined as NL = 0
    assert anls_score("   \n", [""]) == 1.0  # whitespace normalises to empty
    assert anls_score("", ["", "x"]) == 1.0
    assert anls_score("x", [""]) == 0.0


def test_anls_threshold_boundary():
    assert ANLS_THRESHOLD == 0.5
    # NL exactly 0.5 (1 edit in 2; 2 edits in 4) scores 0, as in the published definition.
    assert anls_score("ab", ["ac"]) == 0.0
    assert anls_score("abcd", ["abxy"]) == 0.0
    # Just below: 4 edits in 9 -> NL 0.444 -> 0.556.
    assert anls_score("abcdefghi", ["abcdewxyz"]) == pytest.approx(5 / 9)
    # A looser threshold lets the boundary case through with its similarity.
    assert anls_score("ab", ["ac"], threshold=0.6) == pytest.approx(0.5)
    assert anls_score("abcdefghi", ["abcdewxyz"], threshold=4 / 9) == 0.0


def test_anls_mean_over_examples():
    predictions = ["Denver Broncos", "12/15/89", "Dear dr. Lobo", "nothing"]
    references = [["Denver Broncos", "Denver R. Broncos"], ["12/15/88"], ["Dear Dr. Lobo", "Dr. Lobo"], ["42"]]
    assert anls(predictions, references) == pytest.approx((1 + 0.875 + 1 + 0) / 4)


def test_anls_rejects_misaligned_or_empty_input():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        anls(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="no examples"):
        anls([], [])
    with pytest.raises(ValueError, match="example 1: .*no reference"):
        anls(["a", "b"], [["a"], []])
    # A bare string of references would be scored character by character.
    with pytest.raises(TypeError, match="wrap it in a list"):
        anls_score("abc", "abc")
    with pytest.raises(TypeError, match="example 0"):
        anls(["abc"], ["abc"])
    with pytest.raises(ValueError, match="threshold"):
        anls_score("a", ["a"], threshold=0)


# -- accuracy --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, normal",
    [
        ("Yes", "yes"),
        ("  NO \n", "no"),
        ("yes.", "yes"),
        ('"Yes."', "yes"),
        ("'true'", "true"),
        ("“False”", "false"),
        ("(no)!", "no"),
        ("Apply  Eye\tMakeup", "apply eye makeup"),
        ("  Yo Yo .  ", "yo yo"),
        ("o'clock", "o'clock"),  # inner punctuation is kept
        ("c++", "c++"),  # symbols are not punctuation
        ("yes\nno", "yes no"),  # no first-line extraction
        ("...", ""),
    ],
)
def test_normalize_answer(raw, normal):
    assert normalize_answer(raw) == normal


def test_accuracy_normalises_before_matching():
    predictions = ["Yes.", '"no"', " ApplyEyeMakeup ", "TRUE", "yes, it is", "maybe"]
    references = ["yes", "No", "applyeyemakeup", "true", "yes", "no"]
    assert accuracy(predictions, references) == pytest.approx(4 / 6)


def test_accuracy_accepts_lists_of_acceptable_answers():
    predictions = ["true", "False", "yes"]
    references = [["True", "yes"], ("false",), ["no", "false"]]
    assert accuracy(predictions, references) == pytest.approx(2 / 3)
    # Mixed single answers and lists.
    assert accuracy(["a", "b"], ["A", ["x", "B"]]) == 1.0


def test_accuracy_rejects_misaligned_or_empty_input():
    with pytest.raises(ValueError, match="3 predictions but 2 references"):
        accuracy(["yes", "no", "yes"], ["yes", "no"])
    with pytest.raises(ValueError, match="no examples"):
        accuracy([], [])
    with pytest.raises(ValueError, match="reference 1 lists no acceptable answer"):
        accuracy(["yes", "no"], ["yes", []])
    # accuracy("yes", "yes") would otherwise compare characters and report 1.0.
    with pytest.raises(TypeError, match="predictions must be a sequence"):
        accuracy("yes", ["yes", "no", "no"])
    with pytest.raises(TypeError, match="prediction 0 is NoneType"):
        accuracy([None], ["yes"])
