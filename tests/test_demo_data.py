"""The built-in demo set: answers agree with the drawn pixels (colour and shape read back from the PNG), shapes
take many sizes and places, the text alone answers at chance, answers are short, and generation is
deterministic."""
import collections
import json
import os

import numpy as np
import pytest
from PIL import Image

from lladav_jax.data import demo_data


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
  return demo_data.ensure_demo_data(str(tmp_path_factory.mktemp("demo")), num_train=300, num_val=10, num_test=60)


def _read_scene(path):
  """(colour, shape, box) read from the pixels: the shape's pixels are those with a channel below 120 (every
  colour has one, the light background none: demo_data.COLORS), its colour the palette's nearest to their
  mean, its shape from the share of its bounding box it fills (square 1, circle pi/4, triangle 1/2)."""
  a = np.asarray(Image.open(path).convert("RGB")).astype(np.float64)
  mask = a.min(-1) < 120
  ys, xs = np.nonzero(mask)
  box = (xs.min(), ys.min(), xs.max(), ys.max())
  mean = a[mask].mean(0)
  color = min(demo_data.COLORS, key=lambda c: np.sum((np.asarray(demo_data.COLORS[c]) - mean) ** 2))
  fill = mask.sum() / ((box[2] - box[0] + 1) * (box[3] - box[1] + 1))
  shape = "square" if fill > 0.93 else "circle" if fill > 0.65 else "triangle"
  assert mask[box[1]:box[3] + 1, box[0]:box[2] + 1].sum() == mask.sum()  # one shape, nothing outside its box
  return color, shape, box


def _load(path):
  with open(path) as f:
    return json.load(f)


def _question(r):
  return r["conversations"][0]["value"].split("\n")[-1]


def test_answers_match_the_pixels(demo):
  """Every answer agrees with the one shape drawn in its image (read back from the PNG); the two images of a
  two-image question differ in colour."""
  boxes = []
  for split in ("train", "test"):
    for r in _load(demo[split]):
      images = r["image"] if isinstance(r["image"], list) else [r["image"]]
      scenes = [_read_scene(os.path.join(demo["image_folder"], p)) for p in images]
      boxes += [s[2] for s in scenes]
      q, a = _question(r), r["conversations"][1]["value"]
      (color, shape, _), = scenes[:1] if len(scenes) == 1 else [scenes[0 if "first" in q else 1]]
      want = {"What color is the shape?": color, "What shape is the object?": shape,
              "What is in the image?": f"{color} {shape}"}.get(q, color)
      assert a == want, (r["id"], q, a, scenes)
      if len(scenes) == 2:
        assert scenes[0][0] != scenes[1][0], r["id"]
  # any size and place: widths over most of SIZE_RANGE, left edges over most of the picture
  widths = {b[2] - b[0] + 1 for b in boxes}
  lefts = {b[0] for b in boxes}
  lo, hi = demo_data.SIZE_RANGE
  assert min(widths) <= lo + 3 and max(widths) >= hi - 3 and len(widths) > (hi - lo) // 2
  assert min(lefts) <= 2 and max(lefts) >= demo_data.IMAGE_SIZE - lo - 4


def test_captions_describe_each_training_picture_and_no_test_picture(demo):
  """captions.json (what the vision tower is pre-trained on): one "<colour> <shape>" a training picture, as its
  pixels read; no picture of another split."""
  caps = _load(demo["captions"])
  train_images = {p for r in _load(demo["train"]) for p in (r["image"] if isinstance(r["image"], list) else [r["image"]])}
  assert sorted(c["image"] for c in caps) == sorted(train_images)
  for c in caps[:150]:
    color, shape, _ = _read_scene(os.path.join(demo["image_folder"], c["image"]))
    assert c["conversations"] == [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": f"{color} {shape}"}], c


def test_every_question_type_occurs(demo):
  assert {_question(r) for r in _load(demo["train"])} == set(demo_data.QUESTIONS.values())


def test_the_text_alone_answers_at_chance(demo):
  """Each question's answers are balanced: every colour (shape, pair) about equally often, so the best guess
  from the question alone (its most frequent training answer) scores about chance on the test split."""
  train, test = _load(demo["train"]), _load(demo["test"])
  answers = collections.defaultdict(collections.Counter)
  for r in train:
    answers[_question(r)][r["conversations"][1]["value"]] += 1
  chance = {"What shape is the object?": 1 / len(demo_data.SHAPES),
            "What is in the image?": 1 / (len(demo_data.COLORS) * len(demo_data.SHAPES))}
  for q, counts in answers.items():
    k = round(1 / chance.get(q, 1 / len(demo_data.COLORS)))
    n = sum(counts.values())
    assert len(counts) == k, (q, counts)  # every answer occurs
    # drawn from shuffled decks of every answer: the counts differ by at most a deck's share
    assert max(counts.values()) - min(counts.values()) <= max(2, n // k // 2), (q, counts)
  guess = {q: c.most_common(1)[0][0] for q, c in answers.items()}
  right = sum(guess[_question(r)] == r["conversations"][1]["value"] for r in test)
  expected = sum(chance.get(_question(r), 1 / len(demo_data.COLORS)) for r in test)
  assert right <= expected + 2 * np.sqrt(expected) + 1, (right, expected)


def test_answers_are_short(demo):
  for split in ("train", "validation", "test"):
    for r in _load(demo[split]):
      assert all(len(c["value"].split()) <= 2 for c in r["conversations"][1::2]), r["id"]


def test_generation_is_deterministic(demo, tmp_path):
  again = demo_data.ensure_demo_data(str(tmp_path), num_train=300, num_val=10, num_test=60)
  for split in ("train", "validation", "test"):
    assert _load(again[split]) == _load(demo[split])
    for r in _load(demo[split])[:20]:
      for p in r["image"] if isinstance(r["image"], list) else [r["image"]]:
        with open(os.path.join(demo["image_folder"], p), "rb") as f, open(os.path.join(again["image_folder"], p), "rb") as g:
          assert f.read() == g.read(), p


def test_an_older_version_is_not_reused(demo):
  """The generated folder is named by the version: a set an older generator left in the same root is not read."""
  assert os.path.basename(demo["dir"]).startswith(f"demo-v{demo_data.VERSION}-")
  assert demo_data.VERSION >= 6  # v5: shapes of any size and place, eight colours, light backgrounds, noise; v6: captions


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
    assert tok.token_to_id("<|unk|>") not in ids
