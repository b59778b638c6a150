"""Benchmark task definitions: the original's generation settings, lmms-eval's prompts, scoring.

Generation settings are LLaDA-V's `eval/scripts/evaluate.sh` (docs/ORIGINAL.md, "Evaluation"): always
temperature 0 and low_confidence remasking; "<|eot_id|>" always stops (added once, after a task's own
stop strings, by inference.text.stop_list). Prompts follow
lmms-eval's `doc_to_text` for each task with its default `lmms_eval_specific_kwargs`.

Scores are in percent (as the published table), except MME (its own 0-2000 / 0-800 scale).
GPT-judged tasks (MathVista, MathVerse, MMBench's fallback) are scored with rule-based
extraction instead; their numbers are reported as `*_rule_based` and are not the paper's metric.
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Sequence

from lladav_jax.eval import answers as ans
from lladav_jax.eval import metrics as M
from lladav_jax.eval.sample import EvalSample
from lladav_jax.inference import SamplingParams

EOT = "<|eot_id|>"
MCQ_DIRECT = "Answer with the option's letter from the given choices directly."
SINGLE_WORD_OR_PHRASE = "Answer the question using a single word or phrase."


def with_think(context: str, think: str | None, has_visuals: bool) -> str:
  """The question with " /think" or " /no_think" appended where the original does: only in the branch
  where it inserts the image placeholders itself (llava_onevision_llada.generate_until), i.e. visuals
  are given and the context has no "<image>". Text-only and "<image>"-bearing contexts get no suffix."""
  if think in ("think", "no_think") and has_visuals and "<image>" not in context:
    return f"{context} /{think}"
  return context


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  kind: str               # mcq | open | yesno | math
  metric: str             # primary metric key of aggregate()
  gen_length: int
  block_length: int
  steps: int
  think: str | None       # "think" | "no_think" | None (no suffix)
  prompt_style: str       # see build_prompt
  post_prompt: str = ""
  stop_strings: tuple[str, ...] = ()  # the task's own stops; inference.text.stop_list adds "<|eot_id|>" after them
  mcq_parser: str = "generic"      # generic | mmmu
  answer_is_index: bool = False    # AI2D (HF) stores the answer as an option index
  needs_choices: bool = False      # a row without options is a data error
  open_metric: str = "exact_match"  # for kind == open: exact_match | relaxed_accuracy | anls
  description: str = ""
  # The model dtype the original evaluates in (its lmms-eval model loads float16); the eval CLI's
  # --dtype overrides it. None: the checkpoint's own dtype.
  dtype: str | None = "float16"

  # ---------------------------------------------------------------- generation
  def sampling_params(self) -> SamplingParams:
    """The original's settings (temperature 0, low-confidence remasking, its multi-stop rule: the stop
    strings are searched in order, see SamplingParams.stop_rule)."""
    return SamplingParams(gen_length=self.gen_length, block_length=self.block_length, steps=self.steps,
                          stop=self.stop_strings, stop_rule="original")

  def model_prompt(self, sample: EvalSample) -> str:
    """prompt_text plus the think suffix (see `with_think`)."""
    return with_think(sample.prompt_text, self.think, bool(sample.images))

  # ---------------------------------------------------------------- prompts
  def build_prompt(self, question: str, choices: Sequence[str] = (), meta: dict | None = None) -> str:
    return build_prompt(self, question, list(choices), meta or {})

  # ---------------------------------------------------------------- scoring
  def score(self, sample: EvalSample, prediction: str) -> dict:
    return score_sample(self, sample, prediction)

  def aggregate(self, records: Sequence[dict]) -> dict:
    return aggregate(self, records)


def _options_block(choices: Sequence[str], letters: Sequence[str] | None = None) -> str:
  letters = letters or ans.option_letters(len(choices))
  return "\n".join(f"{l}. {c}" for l, c in zip(letters, choices))


def build_prompt(task: Task, question: str, choices: list[str], meta: dict) -> str:
  style = task.prompt_style
  q = str(question)
  if style == "mmmu":  # MMMU / MMMU-Pro construct_prompt
    if meta.get("question_type", "multiple-choice") == "multiple-choice" and choices:
      return f"{q}\n{_options_block(choices)}\n\n{task.post_prompt}"
    return f"{q}\n\n{SINGLE_WORD_OR_PHRASE}"
  if style == "options":  # AI2D, MuirBench, SEED-Bench
    return f"{q}\n{_options_block(choices)}{task.post_prompt}"
  if style == "mmbench":  # "{hint} {question} There are several options:\nA. ..\n{post}"
    opts = "There are several options:\n" + _options_block(choices)
    hint = meta.get("hint")
    hint = None if hint is None or str(hint).strip() in ("", "nan", "None") else str(hint)
    body = f"{hint} {q} {opts}" if hint else f"{q} {opts}"
    return f"{body}{task.post_prompt}"
  if style == "mmstar":  # the question text already lists "Options: A: ..., B: ..."
    q = q.strip()
    if choices and "Options:" not in q:
      q = q + "\nOptions: " + ", ".join(f"{l}: {c}" for l, c in zip(ans.option_letters(len(choices)), choices))
    return f"{q}{task.post_prompt}"
  if style == "mme":
    return q.strip().replace(" Please answer yes or no.", "") + task.post_prompt
  if style == "mathvista":  # shot_type "format-prompt"
    return mathvista_query(q, choices, meta)
  if style == "mathverse":  # shot_type "format-prompt", query_type "query_wo"
    return str(meta.get("query_wo") or q).strip()
  if style == "plain":
    return f"{q.strip() if task.post_prompt == '' else q}{task.post_prompt}"
  raise ValueError(f"unknown prompt style {style!r}")


def mathvista_query(question: str, choices: list[str], meta: dict) -> str:
  """lmms-eval MathVista create_one_query with shot_type='format-prompt', zero-shot."""
  qtype = meta.get("question_type") or ("multi_choice" if choices else "free_form")
  atype = meta.get("answer_type") or ("text" if choices else "integer")
  precision = int(float(meta.get("precision") or 0))
  if qtype == "multi_choice":
    hint = MCQ_DIRECT
  elif atype == "integer":
    hint = "Answer the question using a single integer number."
  elif atype == "float" and precision == 1:
    hint = "Answer the question using a single floating-point number with one decimal place."
  elif atype == "float" and precision == 2:
    hint = "Answer the question using a single floating-point number with two decimal places."
  elif atype == "list":
    hint = "Answer the question using a Python list."
  else:
    hint = ""
  text = question
  if meta.get("unit"):
    text += f" (Unit: {meta['unit']})"
  parts = [text, _options_block(choices) if choices else "", hint]
  return "\n".join(p for p in parts if p).strip()


# ------------------------------------------------------------------------------ scoring

_NUMBER_WORDS = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}


def _letters(sample: EvalSample) -> list[str]:
  return ans.option_letters(len(sample.choices)) if sample.choices else list("ABCD")


def score_sample(task: Task, sample: EvalSample, prediction: str) -> dict:
  """Per-sample score in [0, 1] plus what was extracted and whether it parsed."""
  pred = prediction or ""
  gold = [str(a) for a in sample.answers]
  out: dict = {"parsed": True, "extracted": None, "method": ""}

  if task.kind == "mcq":
    if task.mcq_parser == "mmmu" and sample.meta.get("question_type", "multiple-choice") != "multiple-choice":
      parsed = ans.parse_open_response(pred)  # MMMU open question
      out.update(score=float(M.mmmu_eval_open(gold, parsed)), extracted=str(parsed[:5]), method="mmmu_open")
      return out
    if task.name == "realworldqa" and gold and gold[0].strip().upper() not in set("ABCDEFGH"):
      # RealWorldQA mixes letter and open answers; open ones are compared after number words -> digits.
      p = pred.lower().strip().rstrip(".")
      p = _NUMBER_WORDS.get(p, p)
      out.update(score=float(p == gold[0].lower().strip()), extracted=p, method="open")
      return out
    letters = _letters(sample)
    if task.mcq_parser == "mmmu":
      idx2 = dict(zip(letters, sample.choices))
      letter = ans.parse_multi_choice_response(pred, letters, idx2)
      parse = ans.MCQParse(letter, "mmmu" if letter else "unparsed")
    else:
      parse = ans.extract_choice(pred, sample.choices, letters)
    hit = parse.parsed and parse.letter in [g.strip().upper() for g in gold]
    out.update(score=float(hit), extracted=parse.letter, method=parse.method, parsed=parse.parsed)
    return out

  if task.kind == "open":
    fn = {"exact_match": M.exact_match, "relaxed_accuracy": M.relaxed_accuracy, "anls": M.anls}[task.open_metric]
    out.update(score=float(fn(pred, gold)), extracted=pred.strip(), method=task.open_metric)
    if task.open_metric != "anls":
      out["anls"] = M.anls(pred, gold)
    return out

  if task.kind == "yesno":
    label = ans.parse_yes_no(pred)
    g = gold[0].lower().strip().replace(".", "") if gold else ""
    out.update(score=float(label == g), extracted=label, method="yes_no", parsed=label != "other")
    return out

  if task.kind == "math":
    return _score_math(task, sample, pred, gold, out)
  raise ValueError(f"unknown task kind {task.kind!r}")


def _score_math(task: Task, sample: EvalSample, pred: str, gold: list[str], out: dict) -> dict:
  meta = sample.meta
  if task.name.startswith("mathvista"):
    qtype = meta.get("question_type") or ("multi_choice" if sample.choices else "free_form")
    atype = meta.get("answer_type") or ("text" if sample.choices else "integer")
    got, method = ans.extract_mathvista_answer(pred, qtype, atype, sample.choices, meta.get("precision"))
    norm = (lambda s: str(s).replace(" ", "")) if atype == "list" else (lambda s: str(s).strip())
    hit = got is not None and any(norm(got) == norm(g) for g in gold)
    out.update(score=float(hit), extracted=got, method=method, parsed=got is not None)
    return out
  # MathVerse: multiple choice by letter, free form by number (else normalised text).
  if str(meta.get("question_type", "")).startswith("multi") or (gold and gold[0].strip().strip("()").upper() in "ABCDEFGH" and len(gold[0].strip().strip("()")) == 1):
    parse = ans.extract_choice(pred, sample.choices, _letters(sample) if sample.choices else list("ABCDEFGH"))
    g = gold[0].strip().strip("()").upper() if gold else ""
    out.update(score=float(parse.letter == g), extracted=parse.letter, method=parse.method, parsed=parse.parsed)
    return out
  num = ans.last_number(pred)
  gnum = ans.last_number(gold[0]) if gold else None
  if num is not None and gnum is not None:
    hit = abs(num - gnum) <= 1e-6 * max(1.0, abs(gnum))
    out.update(score=float(hit), extracted=str(num), method="number")
  else:
    out.update(score=M.exact_match(pred, gold), extracted=pred.strip(), method="text", parsed=bool(pred.strip()))
  return out


# ------------------------------------------------------------------------------ aggregation

def aggregate(task: Task, records: Sequence[dict]) -> dict:
  """Task metrics from per-sample records (each: score, parsed, meta fields)."""
  n = len(records)
  res = {"num_scored": n, "num_unparsed": sum(1 for r in records if not r.get("parsed", True))}
  pct = 100.0 * M.mean(r["score"] for r in records)
  if task.kind == "yesno":  # MME
    res.update(M.mme_scores({"category": r.get("category", "unknown"), "pair_id": r.get("pair_id", r["id"]),
                             "score": r["score"]} for r in records))
    res["accuracy"] = pct
    res["total"] = res["perception"] + res["cognition"]
    return res
  if task.kind == "open":
    res[task.open_metric] = pct
    if task.open_metric != "anls":
      res["anls"] = 100.0 * M.mean(r.get("anls", 0.0) for r in records)
    if task.name == "chartqa":
      for split, key in (("human_test", "relaxed_human_split"), ("augmented_test", "relaxed_augmented_split")):
        sub = [r["score"] for r in records if r.get("type") == split]
        if sub:
          res[key] = 100.0 * M.mean(sub)
    return res
  res[task.metric] = pct
  if task.name.startswith("mmbench") and all("index" in r for r in records) and records:
    res["circular_accuracy"] = 100.0 * M.mmbench_circular_accuracy(records)
  cats = defaultdict(list)
  for r in records:
    if r.get("category") is not None:
      cats[str(r["category"])].append(r["score"])
  if len(cats) > 1:
    res["per_category"] = {c: 100.0 * M.mean(v) for c, v in sorted(cats.items())}
  return res


# ------------------------------------------------------------------------------ registry

def _mcq(name, style, post, parser="generic", **kw):
  return Task(name=name, kind="mcq", metric="accuracy", gen_length=2, block_length=2, steps=2,
              think="no_think", prompt_style=style, post_prompt=post, mcq_parser=parser, **kw)


TASKS: dict[str, Task] = {t.name: t for t in [
  _mcq("mmmu_val", "mmmu", MCQ_DIRECT, parser="mmmu", description="MMMU validation (lmms-eval mmmu_val)"),
  _mcq("mmmu_pro_standard", "mmmu", "Answer with the option letter from the given choices directly.",
       parser="mmmu", needs_choices=True, description="MMMU-Pro standard, 10 options"),
  _mcq("mmstar", "mmstar", "\nAnswer with the option's letter from the given choices directly"),
  _mcq("ai2d", "options", "\n" + MCQ_DIRECT, answer_is_index=True, needs_choices=True),
  _mcq("seedbench", "options", "\n" + MCQ_DIRECT, needs_choices=True),
  _mcq("mmbench_en_dev", "mmbench", "\n" + MCQ_DIRECT, needs_choices=True,
       description="MMBench-EN dev; circular_accuracy groups rotations by index % 1e6"),
  _mcq("muirbench", "options", "\n" + MCQ_DIRECT, needs_choices=True, description="multi-image"),
  _mcq("realworldqa", "plain", ""),
  Task("mme", kind="yesno", metric="perception", gen_length=2, block_length=2, steps=2, think="no_think",
       prompt_style="mme", post_prompt="\n" + SINGLE_WORD_OR_PHRASE),
  Task("chartqa", kind="open", metric="relaxed_accuracy", gen_length=16, block_length=16, steps=16,
       think="no_think", prompt_style="plain", post_prompt="\nAnswer the question with a single word.",
       stop_strings=("\n",), open_metric="relaxed_accuracy"),  # its stopping_criteria; eot follows (stop_list)
  Task("docvqa_val", kind="open", metric="anls", gen_length=32, block_length=32, steps=16, think="no_think",
       prompt_style="plain", post_prompt="\n" + SINGLE_WORD_OR_PHRASE, open_metric="anls"),
  Task("infovqa_val", kind="open", metric="anls", gen_length=32, block_length=32, steps=16, think="no_think",
       prompt_style="plain", post_prompt="\n" + SINGLE_WORD_OR_PHRASE, open_metric="anls"),
  Task("mathvista_testmini", kind="math", metric="accuracy_rule_based", gen_length=96, block_length=96,
       steps=48, think="think", prompt_style="mathvista",
       description="scored by rule-based extraction, not the reference's GPT extractor"),
  Task("mathverse_testmini_vision", kind="math", metric="accuracy_rule_based", gen_length=64,
       block_length=64, steps=32, think="think", prompt_style="mathverse",
       description="scored by rule-based matching, not the reference's GPT judge"),
  Task("demo", kind="open", metric="exact_match", gen_length=8, block_length=8, steps=8, think=None,
       prompt_style="plain", dtype=None, description="test split of the built-in synthetic data "
       "(lladav_jax/data/demo_data.py); answers are 1-3 words, so 8 positions suffice"),
  # A user's own LLaVA-format split (the first human turn asks, the first gpt turn answers), as trained on:
  Task("llava_exact_match", kind="open", metric="exact_match", gen_length=32, block_length=32, steps=32,
       think=None, prompt_style="plain", dtype=None,
       description="a LLaVA-format split scored by exact match of the answer (--gen_length for longer answers)"),
  Task("llava_anls", kind="open", metric="anls", gen_length=32, block_length=32, steps=32, think=None,
       prompt_style="plain", open_metric="anls", dtype=None,
       description="a LLaVA-format split scored by ANLS (average normalised Levenshtein similarity)"),
]}


def get_task(name: str) -> Task:
  try:
    return TASKS[name]
  except KeyError:
    raise KeyError(f"unknown task {name!r}; known: {', '.join(sorted(TASKS))}") from None
