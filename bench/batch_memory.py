r"""Bytes and collate time of one training batch's pixels: float32 normalised tiles (before) against uint8
tiles normalised on device (now), at the stage-2 shape (64 rows x 8192 tokens x 16 tiles of 384 px).

    python bench/batch_memory.py [--rows 64] [--tiles 16] [--length 8192]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lladav_jax import batch as batch_lib  # noqa: E402
from lladav_jax.config import TAPS  # noqa: E402
from lladav_jax.multimodal import Expanded, ImageConfig  # noqa: E402


def samples(rows: int, tiles: int, length: int, icfg: ImageConfig, dtype) -> list[Expanded]:
  rng = np.random.default_rng(0)
  s = icfg.image_size
  pixels = rng.integers(0, 256, (tiles, s, s, 3), dtype=np.uint8)
  if dtype == np.float32:  # what the host used to hold: the processor's normalised values
    pixels = (pixels.astype(np.float32) * np.float32(1 / 255) - 0.5) / 0.5
  n = length - 16
  return [Expanded(tokens=np.zeros(n, np.int32), labels=np.zeros(n, np.int32), pixels=pixels,
                   merge_idx=np.zeros((n, TAPS), np.int32), merge_w=np.zeros((n, TAPS), np.float32))] * rows


def collate_pixels(exp: list[Expanded], tiles: int, icfg: ImageConfig, dtype) -> tuple[float, int]:
  """The pixel part of the collate (the rest is unchanged): allocate the batch array, copy each row's tiles."""
  t = time.perf_counter()
  s = icfg.image_size
  out = np.zeros((len(exp), tiles, s, s, 3), dtype)
  for i, e in enumerate(exp):
    out[i, :e.pixels.shape[0]] = e.pixels
  return time.perf_counter() - t, out.nbytes


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--rows", type=int, default=64)
  p.add_argument("--tiles", type=int, default=16)
  p.add_argument("--length", type=int, default=8192)
  a = p.parse_args()
  icfg = ImageConfig()
  print(f"| pixels | bytes a batch | collate s ({a.rows} rows x {a.tiles} tiles) | share of the batch's bytes |")
  print("|---|---|---|---|")
  for name, dtype in (("float32 (before)", np.float32), ("uint8 (now)", np.uint8)):
    exp = samples(a.rows, a.tiles, a.length, icfg, dtype)
    dt, nbytes = collate_pixels(exp, a.tiles, icfg, dtype)
    rest = a.rows * a.length * (4 * 4 + 2 * TAPS * 4 + 1)  # tokens, positions, labels, merge plan, valid
    print(f"| {name} | {nbytes / 2 ** 30:.2f} GiB | {dt:.2f} | {nbytes / (nbytes + rest):.0%} |")
  b = batch_lib.collate_train(samples(2, 2, 64, icfg, np.uint8), icfg, length=64, tiles=2)
  assert b.inputs.pixels.dtype == np.uint8  # the real collate makes uint8 batches


if __name__ == "__main__":
  main()
