"""Benchmark metrics, pure Python, written to give the same numbers as the reference scorers.

Sources followed (lmms-eval, the harness the original LLaDA-V numbers come from):
- relaxed accuracy: `tasks/chartqa/utils.py::relaxed_correctness` (itself Qwen-VL's / Pix2Struct's);
- ANLS: `api/metrics.py::anls` (Qwen-VL's infographicsvqa_eval);
- MME: `tasks/mme/utils.py` (acc + acc+ per category, summed per perception/cognition);
- MMBench circular: VLMEvalKit / lmms-eval `mmbench_evals.py` (all rotations of a question right);
- MMMU open questions: MMMU `eval_utils.py::eval_open` (with `answers.parse_open_response`).
"""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Iterable, Sequence

# ------------------------------------------------------------------------------ text normalisation

_WS = re.compile(r"\s+")
_EDGE_PUNCT = " \t\n\r.,;:!?\"'`"


def normalize_text(s: str) -> str:
  """Lower-case, collapse whitespace, drop leading/trailing punctuation.

  Inner punctuation is kept on purpose: removing it everywhere would turn "3.5" into "35".
  """
  s = _WS.sub(" ", str(s).lower()).strip(_EDGE_PUNCT)
  return s.strip()


def exact_match(prediction: str, answers: str | Sequence[str]) -> float:
  """1.0 if the normalised prediction equals any normalised ground truth."""
  answers = [answers] if isinstance(answers, str) else list(answers)
  pred = normalize_text(prediction)
  return float(any(pred == normalize_text(a) for a in answers))


# ------------------------------------------------------------------------------ ChartQA

def _to_float(text: str) -> float | None:
  # Same as the reference: a trailing "%" divides by 100; commas are NOT removed, so "1,000"
  # only matches "1,000" by string equality (what the published ChartQA numbers used).
  try:
    if text.endswith("%"):
      return float(text.rstrip("%")) / 100.0
    return float(text)
  except ValueError:
    return None


def relaxed_correctness(prediction: str, target: str, max_relative_change: float = 0.05) -> bool:
  """ChartQA: numeric answers within 5% relative error; otherwise case-insensitive equality.

  A target of 0 (falsy) falls back to string equality, as in the reference (no division by 0).
  Outer whitespace is stripped first (the model output is already stripped in the original).
  """
  prediction, target = str(prediction).strip(), str(target).strip()
  p, t = _to_float(prediction), _to_float(target)
  if p is not None and t:
    return abs(p - t) / abs(t) <= max_relative_change
  return prediction.lower() == target.lower()


def relaxed_accuracy(prediction: str, targets: str | Sequence[str]) -> float:
  targets = [targets] if isinstance(targets, str) else list(targets)
  return float(any(relaxed_correctness(prediction, t) for t in targets))


# ------------------------------------------------------------------------------ ANLS

def levenshtein_distance(a: str, b: str) -> int:
  if len(a) > len(b):
    a, b = b, a
  prev = list(range(len(a) + 1))
  for j, cb in enumerate(b):
    cur = [j + 1]
    for i, ca in enumerate(a):
      cur.append(prev[i] if ca == cb else 1 + min(prev[i], prev[i + 1], cur[-1]))
    prev = cur
  return prev[-1]


def anls(prediction: str, answers: str | Sequence[str], threshold: float = 0.5) -> float:
  """Average Normalised Levenshtein Similarity for one question (DocVQA / InfoVQA).

  Max similarity over the ground truths; a similarity below `threshold` scores 0 (exactly 0.5
  still counts). As in lmms-eval, the distance is taken on the lower-cased, whitespace-collapsed
  strings but normalised by the length of the raw strings.
  """
  answers = [answers] if isinstance(answers, str) else list(answers)
  if not answers:
    return 0.0
  pred = str(prediction)
  det = " ".join(pred.strip().lower().split())
  dists = []
  for ans in answers:
    ans = str(ans)
    gt = " ".join(ans.strip().lower().split())
    length = max(len(ans), len(pred))
    dists.append(0.0 if length == 0 else levenshtein_distance(gt, det) / length)
  score = 1.0 - min(dists)
  return 0.0 if score < threshold else score


# ------------------------------------------------------------------------------ multiple choice

def multiple_choice_accuracy(predicted: Sequence[str | None], gold: Sequence[str]) -> float:
  """Fraction of predicted letters equal to the gold letters; an unparsed (None) prediction is wrong."""
  if len(predicted) != len(gold):
    raise ValueError(f"{len(predicted)} predictions for {len(gold)} gold answers")
  if not gold:
    return 0.0
  hits = sum(1 for p, g in zip(predicted, gold) if p is not None and str(p).strip().upper() == str(g).strip().upper())
  return hits / len(gold)


def mean(values: Iterable[float]) -> float:
  values = list(values)
  return float(sum(values) / len(values)) if values else 0.0


# ------------------------------------------------------------------------------ MME

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene",
                  "landmark", "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def mme_scores(records: Iterable[dict]) -> dict:
  """MME perception / cognition scores from records {category, pair_id, score}.

  Each image carries a yes and a no question. Per category: mean over images of
  (acc + acc+) with acc = % of the pair right and acc+ = 100 if both right. Category scores
  are summed (perception max 2000, cognition max 800). Pairs cut by --limit are counted with
  what is there and reported in `incomplete_pairs`.
  """
  cat_pairs: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
  for r in records:
    cat_pairs[r["category"]][str(r["pair_id"])].append(float(r["score"]))
  per_cat, incomplete = {}, 0
  for cat, pairs in cat_pairs.items():
    total = 0.0
    for scores in pairs.values():
      incomplete += len(scores) != 2
      total += 100.0 * sum(scores) / len(scores) + 100.0 * all(s == 1.0 for s in scores)
    per_cat[cat] = total / len(pairs)
  cog = {c for c in per_cat if c in MME_COGNITION}
  return {"perception": sum(v for c, v in per_cat.items() if c not in cog),
          "cognition": sum(v for c, v in per_cat.items() if c in cog),
          "per_category": per_cat, "incomplete_pairs": incomplete}


# ------------------------------------------------------------------------------ MMBench

def mmbench_circular_accuracy(records: Iterable[dict]) -> float:
  """MMBench CircularEval: rows whose index agrees modulo 1e6 are rotations of one question;
  the question counts only if every rotation is right."""
  groups: dict[int, list[float]] = defaultdict(list)
  for r in records:
    groups[int(r["index"]) % 1_000_000].append(float(r["score"]))
  return mean(float(all(s == 1.0 for s in v)) for v in groups.values())


# ------------------------------------------------------------------------------ MMMU open questions

def _check_is_number(s: str) -> bool:
  try:
    float(s.replace(",", ""))
    return True
  except ValueError:
    return False


def mmmu_normalize_str(s: str) -> list:
  """MMMU's normalize_str: numbers become floats rounded to 2 decimals; one-letter strings are
  padded with a space on either side so they do not match inside words."""
  s = str(s).strip()
  if _check_is_number(s):
    return [round(float(s.replace(",", "")), 2)]
  s = s.lower()
  return [" " + s, s + " "] if len(s) == 1 else [s]


def mmmu_eval_open(gold: str | Sequence[str], parsed_preds: Sequence) -> bool:
  """MMMU eval_open: a string gold must be a substring of a predicted string; a numeric gold must
  equal a predicted number."""
  golds = [gold] if isinstance(gold, str) else list(gold)
  norm = [n for g in golds for n in mmmu_normalize_str(g)]
  for pred in parsed_preds:
    if isinstance(pred, str):
      if any(isinstance(n, str) and n in pred for n in norm):
        return True
    elif pred in norm:
      return True
  return False
