"""A tiny synthetic test split for the `demo` task: one coloured shape per image, "what colour /
which shape" questions with one-word answers. Deterministic for a seed; used for smoke runs of the
CLI and for checking that a fine-tuned checkpoint still answers simple visual questions."""
from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image, ImageDraw

COLORS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 60, 220), "yellow": (235, 210, 20)}
SHAPES = ("square", "circle", "triangle")


def make_image(color: str, shape: str, size: int = 128) -> Image.Image:
  img = Image.new("RGB", (size, size), (255, 255, 255))
  d = ImageDraw.Draw(img)
  a, b = size // 5, size - size // 5
  if shape == "square":
    d.rectangle([a, a, b, b], fill=COLORS[color])
  elif shape == "circle":
    d.ellipse([a, a, b, b], fill=COLORS[color])
  else:
    d.polygon([(size // 2, a), (a, b), (b, b)], fill=COLORS[color])
  return img


def write_demo_split(out_dir: str, n: int = 16, seed: int = 0) -> str:
  """Writes out_dir/demo_test.jsonl and out_dir/images/*.png; returns the JSONL path."""
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
  path = os.path.join(out_dir, "demo_test.jsonl")
  with open(path, "w") as f:
    for i in range(n):
      color = list(COLORS)[rng.integers(len(COLORS))]
      shape = SHAPES[rng.integers(len(SHAPES))]
      rel = os.path.join("images", f"{i:04d}.png")
      make_image(color, shape).save(os.path.join(out_dir, rel))
      if i % 2 == 0:
        q, a = "What color is the shape in the image? Answer with one word.", color
      else:
        q, a = "Which shape is shown in the image? Answer with one word.", shape
      f.write(json.dumps({"id": f"demo-{i:04d}", "image": rel, "question": q, "answers": [a]}) + "\n")
  return path
