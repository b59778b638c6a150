"""Metric functions against hand-computed values, including the reference scorers' edge cases."""
import pytest

from lladav_jax.eval import metrics as M


@pytest.mark.parametrize("pred,target,expected", [
    ("12%", "0.12", True),      # '%' divides by 100 (ChartQA reference)
    ("0.12", "12%", True),
    ("105", "100", True),       # exactly 5% off
    ("105.1", "100", False),
    ("95", "100", True),
    ("0", "0", True),           # target 0 is falsy -> string equality, no division by zero
    ("0.0", "0", False),        # ... so "0.0" != "0"
    ("Yes", "yes", True),       # non-numeric: case-insensitive equality
    ("yes ", "Yes", True),      # outer whitespace stripped
    ("1,000", "1000", False),   # the reference does not remove commas
    ("1,000", "1,000", True),
    ("Asia", "Europe", False),
])
def test_relaxed_correctness(pred, target, expected):
  assert M.relaxed_correctness(pred, target) is expected


def test_relaxed_accuracy_takes_any_target():
  assert M.relaxed_accuracy("49", ["10", "50"]) == 1.0
  assert M.relaxed_accuracy("40", ["10", "50"]) == 0.0


def test_levenshtein():
  assert M.levenshtein_distance("kitten", "sitting") == 3
  assert M.levenshtein_distance("", "abc") == 3
  assert M.levenshtein_distance("same", "same") == 0


def test_anls_values():
  assert M.anls("hello", ["hello"]) == 1.0
  assert M.anls("helo", ["hello"]) == pytest.approx(1 - 1 / 5)          # 0.8
  assert M.anls("Hello  World", ["hello world"]) == pytest.approx(1 - 0 / 12)  # case/space normalised
  assert M.anls("ab", ["ac"]) == pytest.approx(0.5)                     # exactly at threshold: kept
  assert M.anls("abc", ["xyz"]) == 0.0                                   # below threshold -> 0
  assert M.anls("abcd", ["abxy"]) == pytest.approx(0.5)
  assert M.anls("abcde", ["axyze"]) == 0.0                               # 1 - 3/5 = 0.4 -> 0
  assert M.anls("hello", ["foo", "hello", "help"]) == 1.0                # max over answers
  assert M.anls("anything", []) == 0.0
  # Distance on normalised strings, length of the raw strings (lmms-eval): 1 - 1/5.
  assert M.anls("  abc", ["abd"]) == pytest.approx(0.8)


def test_exact_match_normalisation():
  assert M.exact_match("The Cat.", ["the cat"]) == 1.0
  assert M.exact_match("  two   words ", "Two Words") == 1.0
  assert M.exact_match("3.5", ["35"]) == 0.0   # inner punctuation is kept
  assert M.exact_match("dog", ["cat", "Dog"]) == 1.0
  assert M.exact_match("dogs", ["dog"]) == 0.0


def test_multiple_choice_accuracy():
  assert M.multiple_choice_accuracy(["A", None, "c"], ["A", "B", "C"]) == pytest.approx(2 / 3)
  assert M.multiple_choice_accuracy([], []) == 0.0
  with pytest.raises(ValueError):
    M.multiple_choice_accuracy(["A"], ["A", "B"])


def test_mme_scores_pairs_and_categories():
  recs = [
      {"category": "existence", "pair_id": "1.jpg", "score": 1}, {"category": "existence", "pair_id": "1.jpg", "score": 1},
      {"category": "existence", "pair_id": "2.jpg", "score": 1}, {"category": "existence", "pair_id": "2.jpg", "score": 0},
      {"category": "count", "pair_id": "3.jpg", "score": 0}, {"category": "count", "pair_id": "3.jpg", "score": 1},
      {"category": "code_reasoning", "pair_id": "4.png", "score": 0}, {"category": "code_reasoning", "pair_id": "4.png", "score": 0},
  ]
  s = M.mme_scores(recs)
  # existence: (200 + 50) / 2 = 125; count: 50; code_reasoning: 0.
  assert s["per_category"]["existence"] == pytest.approx(125.0)
  assert s["perception"] == pytest.approx(175.0)
  assert s["cognition"] == pytest.approx(0.0)
  assert s["incomplete_pairs"] == 0
  assert M.mme_scores([{"category": "count", "pair_id": "x", "score": 1}])["incomplete_pairs"] == 1


def test_mmbench_circular_accuracy():
  recs = [{"index": 1, "score": 1}, {"index": 1000001, "score": 1},
          {"index": 2, "score": 1}, {"index": 1000002, "score": 0}, {"index": 3, "score": 1}]
  assert M.mmbench_circular_accuracy(recs) == pytest.approx(2 / 3)


def test_mmmu_eval_open():
  assert M.mmmu_eval_open("5", [5.0]) is True
  assert M.mmmu_eval_open("1,000", [1000.0]) is True
  assert M.mmmu_eval_open("cat", ["a cat sat"]) is True
  assert M.mmmu_eval_open("cat", ["a dog", 3.0]) is False
  assert M.mmmu_eval_open(["7", "seven"], ["seven apples"]) is True
