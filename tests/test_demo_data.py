"""The built-in demo set: answers agree with the drawn pixels, answers are short, and generation
is deterministic."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from lladav_jax.data import demo_data


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
  return demo_data.ensure_demo_data(str(tmp_path_factory.mktemp("demo")), num_train=60, num_val=10, num_test=20)


def _cells_from_pixels(path):
  """(color or None) per cell, read at each cell's centre (inside every shape)."""
  a = np.asarray(Image.open(path).convert("RGB"))
  by_rgb = {v: k for k, v in demo_data.COLORS.items()}
  out = []
  for k in range(4):
    x0, y0 = (k % 2) * demo_data.CELL + 4, (k // 2) * demo_data.CELL + 4
    out.append(by_rgb.get(tuple(int(v) for v in a[y0 + 12, x0 + 9])))
  return out


def _load(path):
  with open(path) as f:
    return json.load(f)


def test_answers_match_the_pixels(demo):
  """Colour answers agree with the one shape drawn (read back from the PNG)."""
  n = 0
  for split in ("train", "test"):
    for r in _load(demo[split]):
      images = r["image"] if isinstance(r["image"], list) else [r["image"]]
      cells = [_cells_from_pixels(os.path.join(demo["image_folder"], p)) for p in images]
      assert all(sum(c is not None for c in cs) == 1 for cs in cells), r["id"]
      q, a = r["conversations"][0]["value"], r["conversations"][1]["value"]
      colors = [next(c for c in cs if c is not None) for cs in cells]
      if q.endswith("What color is the shape?") or q.endswith("What is in the image?"):
        assert a.split()[0] == colors[0], r["id"]
      elif "in the first image" in q or "in the second image" in q:
        assert a == colors[0 if "first" in q else 1], r["id"]
      else:
        continue
      n += 1
  assert n > 0


def test_every_question_type_occurs(demo):
  questions = {r["conversations"][0]["value"].split("\n")[-1] for r in _load(demo["train"])}
  assert questions == {"What color is the shape?", "What shape is the object?", "What is in the image?",
                       "What color is the shape in the first image?", "What color is the shape in the second image?"}


def test_answers_are_short(demo):
  for split in ("train", "validation", "test"):
    for r in _load(demo[split]):
      assert all(len(c["value"].split()) <= 2 for c in r["conversations"][1::2]), r["id"]


def test_generation_is_deterministic(demo, tmp_path):
  again = demo_data.ensure_demo_data(str(tmp_path), num_train=60, num_val=10, num_test=20)
  for split in ("train", "validation", "test"):
    assert _load(again[split]) == _load(demo[split])


def test_demo_preset_labels_only_the_answers(demo):
  """The demo preset scores each answer and its <|eot_id|> (not the headers, BOS or "\\n\\n")."""
  from configs.finetune import get_config
  from lladav_jax.data import template
  from lladav_jax.data.tokenizer import Tokenizer
  from lladav_jax.training import run_config

  tok = Tokenizer.from_dir(demo["tokenizer_dir"])
  cfg = run_config.data_config(get_config("demo").data).labels
  eot = tok.encode(tok.special_strings["eot"])
  for r in _load(demo["train"])[:20]:
    msgs = [(c["from"], c["value"]) for c in r["conversations"]]
    ids, labels = template.render_training(tok, template.normalize_image_tags(msgs, cfg), cfg)
    want = [t for _, a in msgs[1::2] for t in tok.encode(a) + eot]
    assert [t for t in labels if t != template.IGNORE_INDEX] == want, r["id"]
    assert len(ids) == len(labels)
