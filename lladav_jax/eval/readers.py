"""Readers for benchmark files on local disk -> EvalSample lists.

Formats:
- TSV in VLMEvalKit's layout (MMBench, MMStar, SEED, AI2D, MME, ...): columns index, question,
  [hint], A..H option columns, answer, image (base64, a list literal of base64 strings, or the
  index of another row whose image it shares), optional image_path / category / l2-category.
- JSON Lines / JSON list, one question per row:
  * MMMU style: id, question, options (list or its Python-literal string), answer, question_type,
    images as `images: [...]` or `image_1`..`image_7`; `<image N>` tags select and order images.
  * open QA (ChartQA, DocVQA, InfoVQA, MathVista, MathVerse, demo): question, answers (list) or
    answer, image / images (path relative to the file, base64, data URI, or {"bytes"|"path"}).
  * LLaVA conversation rows (id, image, conversations) for the demo / synthetic splits.

A missing required column raises DataFormatError naming the file, row and column. A row whose
image cannot be read (missing file, not an image) is skipped and listed in ReadResult.skipped with its id
and the reason. Images stay encoded in the samples (ImageRef: bytes or a path); eval/run.py decodes
them a batch at a time.
"""
from __future__ import annotations

import ast
import base64
import binascii
import csv
import dataclasses
import io
import json
import os
import re
import sys
from typing import Any, Iterator

from PIL import Image, UnidentifiedImageError

from lladav_jax.eval import answers as ans
from lladav_jax.eval.sample import EvalSample
from lladav_jax.eval.tasks import Task

OPTION_COLUMNS = list("ABCDEFGHIJ")
_IMAGE_TAG = re.compile(r"<image (\d+)>")


class DataFormatError(ValueError):
  """The file does not have the structure the task needs (a missing column, a bad options field)."""


class ImageDecodeError(ValueError):
  pass


@dataclasses.dataclass
class ReadResult:
  samples: list[EvalSample]
  skipped: list[dict]   # {"id", "row", "reason"}
  rows_read: int        # rows considered (after --limit), including skipped ones
  path: str


# ------------------------------------------------------------------------------ images

class ImageRef:
  """One image kept encoded (its bytes, or the path of its file) until a batch needs it: a benchmark's
  samples hold these, so memory follows the file's size, not the decoded pixels (a DocVQA page is
  ~15 MB as RGB). `load()` decodes; eval/run.py decodes each batch's images and lets them go. The
  header is read when the reference is made, so a file that is not an image is caught by the reader.
  Other PIL attributes (getpixel, ...) read through a fresh decode that is not kept."""

  __slots__ = ("data", "path", "size")

  def __init__(self, data: bytes | None = None, path: str | None = None):
    self.data, self.path = data, path
    try:
      with Image.open(self._file()) as im:
        self.size = im.size
    except (UnidentifiedImageError, OSError, ValueError) as e:
      raise ImageDecodeError(f"{type(e).__name__}: {e}") from e

  def _file(self):
    return io.BytesIO(self.data) if self.data is not None else self.path

  def load(self) -> Image.Image:
    """The RGB image. Raises ImageDecodeError (e.g. a truncated file whose header was fine)."""
    try:
      with Image.open(self._file()) as im:
        im.load()
        return im if im.mode == "RGB" else im.convert("RGB")  # RGB: no second copy
    except (UnidentifiedImageError, OSError, ValueError) as e:
      raise ImageDecodeError(f"{type(e).__name__}: {e}") from e

  def __getattr__(self, name):
    if name.startswith("_"):  # copy / pickle protocol lookups: not the image's
      raise AttributeError(name)
    return getattr(self.load(), name)

  def __repr__(self):
    where = self.path or f"{len(self.data)} bytes"
    return f"ImageRef({where}, {self.size[0]}x{self.size[1]})"


def image_ref(value: Any, base_dir: str = ".") -> ImageRef | Image.Image:
  """An ImageRef from base64 text, a data URI, raw bytes, a path, or {"bytes"/"path"} dicts (an
  already-decoded PIL image is returned as is). Raises ImageDecodeError."""
  try:
    if isinstance(value, Image.Image):
      return value
    if isinstance(value, dict):
      if value.get("bytes") is not None:
        return image_ref(value["bytes"], base_dir)
      if value.get("path"):
        return image_ref(value["path"], base_dir)
      raise ImageDecodeError("image dict has neither 'bytes' nor 'path'")
    if isinstance(value, (bytes, bytearray)):
      return ImageRef(data=bytes(value))
    if not isinstance(value, str) or not value.strip():
      raise ImageDecodeError(f"empty or non-string image value ({type(value).__name__})")
    s = value.strip()
    if s.startswith("data:"):
      s = s.split(",", 1)[-1]
    elif len(s) < 1024:  # short strings are paths; base64 of any real image is longer
      path = s if os.path.isabs(s) else os.path.join(base_dir, s)
      if os.path.exists(path):
        return ImageRef(path=os.path.abspath(path))
      if not _looks_base64(s):
        raise ImageDecodeError(f"image file not found: {path}")
    return ImageRef(data=base64.b64decode(s, validate=False))
  except ImageDecodeError:
    raise
  except (binascii.Error, ValueError) as e:
    raise ImageDecodeError(f"{type(e).__name__}: {e}") from e


def decode_image(value: Any, base_dir: str = ".") -> Image.Image:
  """PIL RGB image from base64 text, a data URI, raw bytes, a path, or {"bytes"/"path"} dicts."""
  ref = image_ref(value, base_dir)
  return ref.load() if isinstance(ref, ImageRef) else ref.convert("RGB")


def load_images(images) -> list:
  """A sample's images decoded (ImageRef -> RGB PIL image; anything else as it is)."""
  return [x.load() if isinstance(x, ImageRef) else x for x in images]


def _looks_base64(s: str) -> bool:
  return bool(re.fullmatch(r"[A-Za-z0-9+/=\s]+", s)) and len(s) % 4 == 0 and len(s) >= 16


def encode_image_base64(img: Image.Image, fmt: str = "PNG") -> str:
  buf = io.BytesIO()
  img.save(buf, format=fmt)
  return base64.b64encode(buf.getvalue()).decode("ascii")


# ------------------------------------------------------------------------------ helpers

def _present(v) -> bool:
  return v is not None and not (isinstance(v, float) and v != v) and str(v).strip() not in ("", "nan", "NaN", "None")


def _gold_letter(answer, choices: list[str], task: Task) -> str:
  """Gold option letter from a letter, an option index (AI2D), or the option text."""
  a = str(answer).strip()
  letters = ans.option_letters(max(len(choices), 4))
  if len(a) == 1 and a.upper() in letters:
    return a.upper()
  if task.answer_is_index and re.fullmatch(r"\d+", a) and int(a) < len(choices):
    return letters[int(a)]
  for l, c in zip(letters, choices):
    if a == str(c).strip():
      return l
  return a  # left as is; it will simply never match a letter


def _shard_take(i: int, shard_index: int, shard_count: int) -> bool:
  return i % shard_count == shard_index


# ------------------------------------------------------------------------------ TSV (VLMEvalKit)

def read_tsv(path: str, task: Task, limit: int | None = None, shard_index: int = 0, shard_count: int = 1,
             image_folder: str | None = None) -> ReadResult:
  csv.field_size_limit(sys.maxsize)  # base64 images are far larger than csv's 128 KiB default
  with open(path, newline="", encoding="utf-8") as f:
    rows = list(csv.DictReader(f, delimiter="\t"))
  if not rows:
    return ReadResult([], [], 0, path)
  cols = set(rows[0].keys())
  required = ["index", "question", "answer"]
  if "image" not in cols and "image_path" not in cols:
    required.append("image")
  for c in required:
    if c not in cols:
      raise DataFormatError(f"{path}: missing required column {c!r} (columns: {sorted(cols)})")
  by_index = {str(r["index"]): r for r in rows}
  rows = rows[:limit] if limit is not None else rows
  samples, skipped, shared = [], [], {}
  for i, row in enumerate(rows):
    if not _shard_take(i, shard_index, shard_count):
      continue
    rid = str(row["index"])
    for c in ("question", "answer"):
      if not _present(row.get(c)) and not (c == "question" and task.prompt_style == "mathverse"):
        raise DataFormatError(f"{path}: row {i + 1} (index {rid}): missing value in required column {c!r}")
    choices = [str(row[c]) for c in OPTION_COLUMNS if c in row and _present(row[c])]
    if not choices and _present(row.get("choices")):
      choices = _options(row["choices"], path, i, rid)
    if task.needs_choices and not choices:
      raise DataFormatError(f"{path}: row {i + 1} (index {rid}): no option columns A.. with values")
    try:
      images, image_key = _tsv_images(row, by_index, image_folder or os.path.dirname(path), shared)
    except ImageDecodeError as e:
      skipped.append({"id": rid, "row": i + 1, "reason": str(e)})
      continue
    meta = {k: row[k] for k in ("category", "l2-category", "hint", "split", "source", "question_type",
                                "answer_type", "precision", "unit", "query_wo", "type") if _present(row.get(k))}
    meta["index"] = int(rid) if rid.lstrip("-").isdigit() else rid
    meta["pair_id"] = row.get("image_path") or image_key
    if "l2-category" in meta:
      meta["l2_category"] = meta.pop("l2-category")
    answers = _answers_for(task, row["answer"], choices)
    samples.append(EvalSample(id=rid, prompt_text=task.build_prompt(row["question"], choices, meta),
                              images=images, answers=answers, choices=choices, meta=meta))
  return ReadResult(samples, skipped, len(rows), path)


def _tsv_images(row: dict, by_index: dict, base_dir: str, shared: dict) -> tuple[list, str]:
  """(ImageRefs, image key). `shared`: the refs made so far, by row, so an image that several rows
  point to is held once."""
  v = row.get("image")
  if not _present(v) and _present(row.get("image_path")):
    return [image_ref(row["image_path"], base_dir)], str(row["image_path"])
  if not _present(v):
    raise ImageDecodeError("empty image field")
  v = v.strip()
  # VLMEvalKit stores a repeated image once; other rows hold the index of the row that has it.
  if len(v) <= 64 and v in by_index and by_index[v] is not row:
    return _tsv_images(by_index[v], by_index, base_dir, shared)[0], v
  if id(row) not in shared:
    if v.startswith("["):
      try:
        items = ast.literal_eval(v)
      except (ValueError, SyntaxError) as e:
        raise ImageDecodeError(f"image list is not a valid literal: {e}") from e
      shared[id(row)] = [image_ref(x, base_dir) for x in items]
    else:
      shared[id(row)] = [image_ref(v, base_dir)]
  return shared[id(row)], str(row.get("index"))


def _answers_for(task: Task, answer, choices: list[str]) -> list[str]:
  if task.kind == "mcq":
    if isinstance(answer, list):
      return [_gold_letter(a, choices, task) for a in answer]
    return [_gold_letter(answer, choices, task)]
  if isinstance(answer, list):
    return [str(a) for a in answer]
  return [str(answer)]


def _options(value, path, i, rid) -> list[str]:
  try:
    return ans.parse_options_field(value)
  except ValueError as e:
    raise DataFormatError(f"{path}: row {i + 1} (id {rid}): bad 'options': {e}") from e


# ------------------------------------------------------------------------------ JSON / JSON Lines

def _json_rows(path: str) -> Iterator[tuple[int, dict]]:
  with open(path, encoding="utf-8") as f:
    if path.endswith(".jsonl"):
      for n, line in enumerate(f, 1):
        if line.strip():
          try:
            yield n, json.loads(line)
          except json.JSONDecodeError as e:
            raise DataFormatError(f"{path}: line {n}: not valid JSON ({e})") from e
      return
    data = json.load(f)
  if isinstance(data, dict):  # {"data": [...]} as DocVQA's official files
    data = data.get("data", data.get("questions"))
  if not isinstance(data, list):
    raise DataFormatError(f"{path}: expected a JSON list of rows (or {{'data': [...]}})")
  yield from enumerate(data, 1)


_ID_KEYS = ("id", "question_id", "questionId", "index", "idx", "pid", "sample_id")


def read_json(path: str, task: Task, limit: int | None = None, shard_index: int = 0, shard_count: int = 1,
              image_folder: str | None = None) -> ReadResult:
  base_dir = image_folder or os.path.dirname(os.path.abspath(path))
  samples, skipped, n_rows = [], [], 0
  for i, (line_no, row) in enumerate(_json_rows(path)):
    if limit is not None and i >= limit:
      break
    n_rows += 1
    if not _shard_take(i, shard_index, shard_count):
      continue
    if not isinstance(row, dict):
      raise DataFormatError(f"{path}: line {line_no}: a row must be a JSON object")
    rid = next((str(row[k]) for k in _ID_KEYS if k in row and _present(row[k])), str(i))
    where = f"{path}: line {line_no} (id {rid})"
    question, gold = _question_answer(row, task, where)
    choices = []
    for key in ("options", "choices"):
      if row.get(key) is not None:
        choices = _options(row[key], path, i, rid)
        break
    if not choices:
      choices = [str(row[c]) for c in OPTION_COLUMNS if c in row and _present(row[c])]
    meta = {k: row[k] for k in ("question_type", "answer_type", "precision", "unit", "category", "hint",
                                "type", "query_wo", "subfield", "task", "image_relation") if k in row}
    if task.mcq_parser == "mmmu":
      meta.setdefault("question_type", "multiple-choice" if choices else "open")
    if task.needs_choices and not choices:
      raise DataFormatError(f"{where}: missing required field 'options'")
    try:
      images = _json_images(row, question, choices, base_dir)
    except ImageDecodeError as e:
      skipped.append({"id": rid, "row": line_no, "reason": str(e)})
      continue
    meta["index"] = row.get("index", i)
    img = row.get("image")
    meta["pair_id"] = str(row.get("pair_id") or (img if isinstance(img, str) and len(img) < 512 else None)
                          or row.get("question_id") or rid)
    samples.append(EvalSample(id=rid, prompt_text=task.build_prompt(question, choices, meta), images=images,
                              answers=_answers_for(task, gold, choices), choices=choices, meta=meta))
  return ReadResult(samples, skipped, n_rows, path)


def _question_answer(row: dict, task: Task, where: str) -> tuple[str, Any]:
  if "conversations" in row:  # LLaVA format: first human turn asks, first gpt turn answers
    turns = row["conversations"]
    q = next((t.get("value", t.get("content")) for t in turns if t.get("from", t.get("role")) in ("human", "user")), None)
    a = next((t.get("value", t.get("content")) for t in turns if t.get("from", t.get("role")) in ("gpt", "assistant")), None)
    if q is None or a is None:
      raise DataFormatError(f"{where}: 'conversations' needs a human and a gpt turn")
    return q.replace("<image>\n", "").replace("<image>", "").strip(), a
  q = row.get("question")
  if q is None and task.prompt_style == "mathverse":
    q = row.get("query_wo")
  if q is None:
    raise DataFormatError(f"{where}: missing required field 'question'")
  for key in ("answers", "answer", "ground_truth", "label"):
    if key in row and row[key] is not None:
      return str(q), row[key]
  raise DataFormatError(f"{where}: missing required field 'answers' (or 'answer')")


def _json_images(row: dict, question: str, choices: list[str], base_dir: str) -> list:
  tagged = [f"image_{k}" for k in range(1, 8) if row.get(f"image_{k}") is not None]
  listed = row.get("images", row.get("image_list"))
  single = row.get("image", row.get("image_path"))
  tags = sorted({int(t) for t in _IMAGE_TAG.findall(question + "\n" + "\n".join(choices))})
  if tagged:  # MMMU: the images referenced by <image N> tags, in tag order
    keys = [f"image_{t}" for t in tags if f"image_{t}" in tagged] or tagged
    return [image_ref(row[k], base_dir) for k in keys]
  if isinstance(listed, list):
    if tags and all(1 <= t <= len(listed) for t in tags):
      listed = [listed[t - 1] for t in tags]
    return [image_ref(x, base_dir) for x in listed]
  if isinstance(single, list):
    return [image_ref(x, base_dir) for x in single]
  if single is not None:
    return [image_ref(single, base_dir)]
  return []


# ------------------------------------------------------------------------------ dispatch

def read_samples(path: str, task: Task, limit: int | None = None, shard_index: int = 0,
                 shard_count: int = 1, image_folder: str | None = None) -> ReadResult:
  """Read `path` for `task`. `limit` keeps the first N rows of the file; rows are then dealt to
  shards round-robin (row i -> shard i % shard_count) so each process decodes only its own. Relative image
  paths are read under `image_folder` (a training set's `data.image_folder`), by default the file's folder."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"data file not found: {path}")
  if image_folder and not os.path.isdir(image_folder):
    raise FileNotFoundError(f"image folder not found: {image_folder}")
  if path.endswith(".tsv"):
    return read_tsv(path, task, limit, shard_index, shard_count, image_folder)
  if path.endswith((".jsonl", ".json")):
    return read_json(path, task, limit, shard_index, shard_count, image_folder)
  raise DataFormatError(f"{path}: unknown data format (expected .tsv, .jsonl or .json)")
