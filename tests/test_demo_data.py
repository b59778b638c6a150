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


def test_count_answers_match_the_image(demo):
  n = 0
  for split in ("train", "test"):
    for r in _load(demo[split]):
      if r["conversations"][0]["value"].endswith("How many shapes are there?"):
        shapes = sum(c is not None for c in _cells_from_pixels(os.path.join(demo["image_folder"], r["image"])))
        assert r["conversations"][1]["value"] == demo_data.NUMBERS[shapes], r["id"]
        n += 1
  assert n > 0


def test_answers_are_short(demo):
  for split in ("train", "validation", "test"):
    for r in _load(demo[split]):
      assert all(len(c["value"].split()) <= 2 for c in r["conversations"][1::2]), r["id"]


def test_generation_is_deterministic(demo, tmp_path):
  again = demo_data.ensure_demo_data(str(tmp_path), num_train=60, num_val=10, num_test=20)
  for split in ("train", "validation", "test"):
    assert _load(again[split]) == _load(demo[split])
