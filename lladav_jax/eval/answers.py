"""Turning generated text into answers: stop truncation, the original's output clean-up, and
letter / yes-no / number extraction as the reference scorers define them.

No random fallback anywhere: MMMU's and MMBench's reference parsers pick a random letter when
nothing parses; here such outputs return None (counted wrong and flagged "unparsed"), so a score
never depends on a random draw.
"""
from __future__ import annotations

import ast
import dataclasses
import re
from typing import Sequence

import numpy as np

from lladav_jax.eval.metrics import levenshtein_distance, mmmu_normalize_str

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def option_letters(n: int) -> list[str]:
  return list(LETTERS[:n])


# ------------------------------------------------------------------------------ output clean-up

def postprocess_output(text: str) -> str:
  """The original's clean-up (llava_onevision_llada.generate_until): drop ONE trailing '.', then
  strip whitespace, in that order ("B. " keeps its period)."""
  if text.endswith("."):
    text = text[:-1]
  return text.strip()


# ------------------------------------------------------------------------------ multiple choice

def parse_multi_choice_response(response: str, all_choices: Sequence[str], index2ans: dict) -> str | None:
  """MMMU's parse_multi_choice_response (MMMU eval_utils.py / lmms-eval mmmu_mcq_utils.py), except
  that it returns None where the reference returns random.choice(all_choices)."""
  for ch in [",", ".", "!", "?", ";", ":", "'"]:
    response = response.strip(ch)
  response = " " + response + " "
  index_ans, ans_with_brack, candidates = True, False, []
  for c in all_choices:
    if f"({c})" in response:
      candidates.append(c)
      ans_with_brack = True
  if not candidates:
    candidates = [c for c in all_choices if f"{c} " in response]
  if not candidates:
    candidates = [c for c in all_choices if f"{c}." in response]
  if not candidates and len(response.split()) > 5:
    for idx, ans in index2ans.items():
      if str(ans).lower() in response.lower():
        candidates.append(idx)
        index_ans = False
  if not candidates:
    return None
  if len(candidates) == 1:
    return candidates[0]
  if index_ans:
    pat = "({})" if ans_with_brack else " {} "
    starts = [response.rfind(pat.format(c)) for c in candidates]
  else:
    starts = [response.lower().rfind(str(index2ans[c]).lower()) for c in candidates]
  return candidates[int(np.argmax(starts))]


@dataclasses.dataclass(frozen=True)
class MCQParse:
  letter: str | None
  method: str  # start | phrase | mmmu | option_text | unparsed | empty

  @property
  def parsed(self) -> bool:
    return self.letter is not None


_START = re.compile(r"^\s*[\(\[]?([A-Z])[\)\]]?(?=$|[\s.,:;)\]])")
_PHRASE = re.compile(r"(?i:answer|option|choice)\s*(?i:is|would be|should be)?\s*[:\-]?\s*[\(\[]?([A-Z])[\)\]]?(?![A-Za-z])")


def extract_choice(response: str, choices: Sequence[str] | None = None, letters: Sequence[str] | None = None) -> MCQParse:
  """Option letter from free text, most specific rule first:

  1. a lone letter in any case ("b", "(C)"), or an upper-case letter standing at the start
     ("(B) cat", "B. cat", "B:") -- what a 2-token answer looks like; "A dog sits ..." (an
     article) is not taken as a letter;
  2. an answer phrase ("The answer is C", "Answer: (D)", "option B"), last one wins;
  3. MMMU's parser ("(B)", "B ", "B.", option text in responses longer than 5 words);
  4. the option text itself (equal after normalisation, or the only option contained in it).
  `letters` defaults to one per choice, or A-D when no choice texts are known (MMStar TSVs).
  """
  choices = list(choices or [])
  letters = list(letters) if letters else (option_letters(len(choices)) if choices else list("ABCD"))
  text = (response or "").replace("**", "").strip()  # markdown bold around a letter
  if not text:
    return MCQParse(None, "empty")
  bare = text.strip(" .()[]")
  if len(bare) == 1 and bare.upper() in letters:  # "b", "(c)": a lone letter in any case
    return MCQParse(bare.upper(), "start")
  m = _START.match(text)
  article = False
  if m and m.group(1) in letters:
    rest = text[m.end():].split()
    article = (m.group(0).strip() == m.group(1) and len(rest) >= 3 and rest[0][:1].islower() and rest[0].isalpha())
    if not article:
      return MCQParse(m.group(1), "start")
  hits = [h.group(1) for h in _PHRASE.finditer(text) if h.group(1) in letters]
  if hits:
    return MCQParse(hits[-1], "phrase")
  index2ans = {l: c for l, c in zip(letters, choices)}
  # Without its leading article, "A dog sits on a mat" cannot be read as option A by MMMU's rules.
  got = parse_multi_choice_response(text[m.end():] if article else text, letters, index2ans)
  if got is not None:
    return MCQParse(got, "mmmu")
  if choices:
    norm = lambda s: " ".join(str(s).lower().split()).strip(" .")
    t = norm(text)
    equal = [l for l, c in index2ans.items() if norm(c) == t]
    if len(equal) == 1:
      return MCQParse(equal[0], "option_text")
    inside = [l for l, c in index2ans.items() if norm(c) and norm(c) in t]
    if len(inside) == 1:
      return MCQParse(inside[0], "option_text")
  return MCQParse(None, "unparsed")


def parse_options_field(options) -> list[str]:
  """MMMU stores options as a Python-literal string ("['a', 'b']"); accept that or a list."""
  if options is None:
    return []
  if isinstance(options, str):
    s = options.strip()
    if not s:
      return []
    try:
      val = ast.literal_eval(s)
    except (ValueError, SyntaxError) as e:
      raise ValueError(f"options is not a list literal: {s[:80]!r}") from e
    options = val
  if not isinstance(options, (list, tuple)):
    raise ValueError(f"options must be a list, got {type(options).__name__}")
  return [str(o) for o in options]


# ------------------------------------------------------------------------------ yes / no (MME)

def parse_yes_no(text: str) -> str:
  """MME's parse_pred_ans (from Otter): 'yes' / 'no' / 'other', looking at the first 4 chars."""
  t = str(text).lower().strip().replace(".", "")
  if t in ("yes", "no"):
    return t
  if len(t) == 1:
    return {"y": "yes", "n": "no"}.get(t, "other")
  head = t[:4]
  return "yes" if "yes" in head else ("no" if "no" in head else "other")


# ------------------------------------------------------------------------------ MMMU open questions

def extract_numbers(s: str) -> list[str]:
  """MMMU's extract_numbers: comma-grouped, scientific, then plain numbers."""
  commas = re.findall(r"-?\b\d{1,3}(?:,\d{3})+\b", s)
  sci = re.findall(r"-?\d+(?:\.\d+)?[eE][+-]?\d+", s)
  simple = re.findall(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])", s)
  return commas + sci + simple


def parse_open_response(response: str) -> list:
  """MMMU's parse_open_response: key sub-responses after "is", "so", "=", ..., plus their numbers,
  normalised (numbers -> rounded floats, strings lower-cased)."""
  indicators = ["could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result "]
  resp = response.strip().strip(".").lower()
  subs = re.split(r"\.\s(?=[A-Z])|\n", resp)
  keys = []
  for i, sub in enumerate(subs):
    inds = indicators + (["="] if i == len(subs) - 1 else [])
    shortest = None
    for ind in inds:
      if ind in sub:
        tail = sub.split(ind)[-1].strip()
        if shortest is None or len(tail) < len(shortest):
          shortest = tail
    if shortest and shortest.strip() not in [":", ",", ".", "!", "?", ";", "'"]:
      keys.append(shortest)
  keys = keys or [resp]
  preds = list(keys)
  for k in keys:
    preds.extend(extract_numbers(k))
  out = []
  for p in preds:
    for n in mmmu_normalize_str(p):
      if n not in out:
        out.append(n)
  return out


# ------------------------------------------------------------------------------ math answers

_NUM = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?|-?\.\d+")
_ANSWER_TAIL = re.compile(r"(?i:answer)\s*(?:is|:)\s*(.+)")


def last_number(text: str) -> float | None:
  nums = _NUM.findall(text)
  if not nums:
    return None
  try:
    return float(nums[-1].replace(",", ""))
  except ValueError:
    return None


def extract_mathvista_answer(response: str, question_type: str, answer_type: str,
                             choices: Sequence[str] | None, precision: int | None) -> tuple[str | None, str]:
  """Rule-based stand-in for MathVista's GPT answer extractor; returns (answer, method).

  Multiple choice: the option text (letter -> text; otherwise the nearest option by edit distance,
  the reference's own normalisation step). Free form: the number after "answer is"/"Answer:" or the
  last number, formatted as the reference's normalize_extracted_answer does.
  """
  r = (response or "").strip()
  if not r:
    return None, "empty"
  choices = list(choices or [])
  if question_type == "multi_choice" and choices:
    if r in choices:
      return r, "option_text"
    p = extract_choice(r, choices)
    if p.parsed:
      return choices[LETTERS.index(p.letter)], p.method
    return min(choices, key=lambda c: levenshtein_distance(r, str(c))), "nearest_option"
  tail = _ANSWER_TAIL.findall(r)
  cand = tail[-1].strip() if tail else r
  if answer_type == "list":
    lists = re.findall(r"\[[^\[\]]*\]", cand) or re.findall(r"\[[^\[\]]*\]", r)
    return (lists[-1].replace(" ", "") if lists else None), "list"
  if answer_type in ("integer", "float"):
    num = last_number(cand)
    if num is None:
      num = last_number(r)
    if num is None:
      return None, "unparsed"
    if answer_type == "integer":
      return str(int(num)), "number"
    return str(round(num, int(precision or 0))), "number"
  return cand.strip(" ."), "text"
