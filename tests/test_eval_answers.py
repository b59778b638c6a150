"""Answer extraction on realistic model outputs; output clean-up as the original does it."""
import pytest

from lladav_jax.eval import answers as A

CHOICES = ["cat", "dog", "bird", "fish"]

# (model output, expected letter or None when it must count as unparsed)
TABLE = [
    ("B", "B"),
    ("B.", "B"),
    ("b", "B"),
    ("(C)", "C"),
    ("(C) bird", "C"),
    ("C) bird", "C"),
    ("[D]", "D"),
    ("B: dog", "B"),
    ("**B**", "B"),
    ("The answer is D.", "D"),
    ("Answer: (A)", "A"),
    ("Option B", "B"),
    ("I think the correct option is C because it has wings.", "C"),
    ("The correct choice is (B), the dog.", "B"),
    ("A dog is sitting on the grass next to a tree.", "B"),   # article, not option A
    ("dog", "B"),
    ("Dog.", "B"),
    ("It's a fish", "D"),
    ("The image shows a small bird perched on a branch", "C"),
    ("E", None),            # not one of the 4 options
    ("I don't know", None),
    ("", None),
]


@pytest.mark.parametrize("out,expected", TABLE)
def test_extract_choice_table(out, expected):
  got = A.extract_choice(out, CHOICES)
  assert got.letter == expected, (out, got)
  assert got.parsed is (expected is not None)


def test_extract_choice_letters_without_option_texts():
  # MMStar TSVs can have the options only inside the question: letters default to A-D.
  assert A.extract_choice("C", []).letter == "C"
  assert A.extract_choice("F", []).letter is None


def test_mmmu_parser_semantics():
  idx = dict(zip("ABCD", CHOICES))
  assert A.parse_multi_choice_response("(A) and (C) look close but (C) is right", list("ABCD"), idx) == "C"
  assert A.parse_multi_choice_response("B", list("ABCD"), idx) == "B"
  assert A.parse_multi_choice_response("The picture clearly shows a dog in the park", list("ABCD"), idx) == "B"
  # Short text is not matched against option texts (MMMU needs > 5 words) ...
  assert A.parse_multi_choice_response("a dog", list("ABCD"), idx) is None
  # ... and nothing parsed is None every time, never a random letter.
  assert all(A.parse_multi_choice_response("no idea", list("ABCD"), idx) is None for _ in range(20))


def test_postprocess_output_matches_original():
  assert A.postprocess_output("B.") == "B"
  assert A.postprocess_output("B. ") == "B."      # '.' is dropped before the strip, as in the original
  assert A.postprocess_output("3.5..") == "3.5."  # only one period
  assert A.postprocess_output("  yes ") == "yes"


@pytest.mark.parametrize("out,label", [("Yes", "yes"), ("Yes.", "yes"), ("no, it is not", "no"), ("y", "yes"),
                                       ("N", "no"), ("maybe", "other"), ("The answer is yes", "other")])
def test_parse_yes_no(out, label):
  assert A.parse_yes_no(out) == label


def test_parse_open_response():
  assert 42.0 in A.parse_open_response("The answer is 42.")
  assert "paris" in A.parse_open_response("Paris")


def test_parse_options_field():
  assert A.parse_options_field("['1', '2', 'x y']") == ["1", "2", "x y"]
  assert A.parse_options_field(["a", 3]) == ["a", "3"]
  assert A.parse_options_field("[]") == []
  with pytest.raises(ValueError):
    A.parse_options_field("not a list")


def test_mathvista_extraction():
  ex = A.extract_mathvista_answer
  assert ex("The answer is 7", "free_form", "integer", None, None) == ("7", "number")
  assert ex("approximately 3.14", "free_form", "float", None, 1)[0] == "3.1"
  assert ex("Answer: 12.345", "free_form", "float", None, 2)[0] == "12.35"
  assert ex("B", "multi_choice", "text", ["2", "4", "6"], None)[0] == "4"
  assert ex("around 6 meters", "multi_choice", "text", ["2 m", "4 m", "6 m"], None) == ("6 m", "option_text")
  assert ex("6m", "multi_choice", "text", ["2 m", "4 m", "6 m"], None) == ("6 m", "nearest_option")
  assert ex("[1, 2, 3]", "free_form", "list", None, None)[0] == "[1,2,3]"
  assert ex("no number here", "free_form", "integer", None, None) == (None, "unparsed")
