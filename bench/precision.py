"""Inference precision: float32 vs bfloat16 vs float16 (the original's eval dtype) on the parity fixture.

A tiny checkpoint in the released layout (tests/released.py: 384 px tiles, 14 px patches, vocabulary 126464,
float32 weights, answers in words) is loaded at each dtype. Printed per dtype against float32: the largest
logit difference on prompts with anyres images (absolute, and relative to the largest |logit|), and the share
of answers (temperature 0) whose tokens are identical to float32's. Numbers for docs/FIDELITY.md.

    PYTHONPATH=. python bench/precision.py [--prompts 16]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lladav_jax import LLaDAV  # noqa: E402
from lladav_jax.inference import SamplingParams  # noqa: E402
from tests.released import write_released_checkpoint  # noqa: E402

QUESTIONS = ["What color is the shape?", "What shape is the object?", "Describe the image.", "Is there a circle?"]
SIZES = [(85, 136), (38, 152), (300, 300), (640, 480)]  # (w, h)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--prompts", type=int, default=16)
  ap.add_argument("--gen_length", type=int, default=16)
  args = ap.parse_args()
  rng = np.random.default_rng(0)
  images = [[Image.fromarray(rng.integers(0, 256, SIZES[i % len(SIZES)][::-1] + (3,), np.uint8))]
            for i in range(args.prompts)]
  prompts = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.prompts)]
  ids = [[126080, 5 + i, -200, 7, 8 + i] for i in range(2)]
  with tempfile.TemporaryDirectory() as d:
    write_released_checkpoint(os.path.join(d, "ck"))
    out = {}
    for dtype in ("float32", "bfloat16", "float16"):
      m = LLaDAV.from_pretrained(os.path.join(d, "ck"), dtype=dtype)
      logits = [m.logits([r], [im])[0] for r, im in zip(ids, images)]  # a row at a time: [L, 126464] each
      toks = [o.token_ids for o in m.generate(prompts, images, SamplingParams(gen_length=args.gen_length))]
      out[dtype] = (logits, toks)
  ref_logits, ref_toks = out["float32"]
  scale = max(float(np.abs(x).max()) for x in ref_logits)
  print(f"{'dtype':<9} {'max |dlogit|':>13} {'relative':>9} {'answers identical to float32':>30}")
  for dtype, (lg, toks) in out.items():
    diff = max(float(np.abs(a - b).max()) for a, b in zip(lg, ref_logits))
    same = sum(a == b for a, b in zip(toks, ref_toks))
    print(f"{dtype:<9} {diff:>13.3e} {diff / scale:>9.2e} {same:>22} / {len(toks)}")


if __name__ == "__main__":
  main()
