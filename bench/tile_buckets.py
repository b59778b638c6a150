r"""Tile-buffer utilisation: real tiles / tile slots of the batches, a fixed budget vs per-batch tile buckets.

    python bench/tile_buckets.py                 # a synthetic stage-2 OV-like mix + the demo data
    python bench/tile_buckets.py --rows 4 --samples 20000

The synthetic mix (host only, the anyres rule of multimodal.select_best_resolution on the stage presets'
anyres_max_4 pinpoints): 55% single images of random sizes (100-3000 px a side, aspect 1:3 to 3:1: base +
grid tiles), 15% two to four images (pad: one tile each), 15% videos (8-32 frames: a tile each), 15% text
only. Batches of `--rows` rows (the rows one device holds of a micro-batch: 1 in the stage-2/3 recipes).
For each layout: samples skipped (more tiles than the budget) and tile slots used by real tiles.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lladav_jax import batch as batch_lib  # noqa: E402
from lladav_jax.multimodal import ImageConfig, select_best_resolution  # noqa: E402


def synthetic_tiles(n: int, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  icfg = ImageConfig(image_size=384, patch_size=14, aspect="anyres_max_4")
  cands = [(i * 384, j * 384) for i, j in icfg.grid_pinpoints]
  out = []
  for u in rng.random(n):
    if u < 0.55:
      w = int(rng.uniform(100, 3000))
      h = int(np.clip(w * np.exp(rng.uniform(np.log(1 / 3), np.log(3))), 50, 4000))
      cw, ch = select_best_resolution((w, h), cands)
      out.append(1 + (cw // 384) * (ch // 384))
    elif u < 0.70:
      out.append(int(rng.integers(2, 5)))
    elif u < 0.85:
      out.append(int(rng.integers(8, 33)))
    else:
      out.append(0)
  return np.asarray(out)


def utilisation(tiles: np.ndarray, rows: int, budget: int, buckets=None) -> tuple[float, float]:
  """(fraction skipped, used slots / slots) with a fixed budget (buckets None) or per-batch buckets."""
  kept = tiles[tiles <= budget]
  skipped = 1 - len(kept) / len(tiles)
  n = len(kept) // rows * rows
  batches = kept[:n].reshape(-1, rows)
  slots = 0
  for b in batches:
    t = budget if buckets is None else next(x for x in buckets if x >= max(int(b.max()), 1))
    slots += t * rows
  return skipped, batches.sum() / max(slots, 1)


def demo_batches(rows: int) -> tuple[float, int]:
  """(used tile slots / slots, batches) of the demo's training set through the real pipeline (eval order)."""
  from lladav_jax.data import demo_data, pipeline
  from lladav_jax.data.tokenizer import Tokenizer
  paths = demo_data.ensure_demo_data(os.path.expanduser("~/.cache/lladav_jax/demo"))
  cfg = demo_data.demo_data_config(paths)
  it = pipeline.build_eval_iterator(cfg, Tokenizer.from_dir(paths["tokenizer_dir"]), demo_data.demo_image_config(28),
                                    batch_size_per_process=rows, process_index=0, process_count=1)
  used = slots = n = 0
  for b in it:
    px = b.inputs.pixels
    used += int((px.reshape(px.shape[0], px.shape[1], -1).max(-1) > 0).sum())
    slots += px.shape[0] * px.shape[1]
    n += 1
  return used / max(slots, 1), n


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--samples", type=int, default=20000)
  p.add_argument("--rows", default="1,4")
  p.add_argument("--demo", action="store_true", help="also the demo data (generates it on first use)")
  a = p.parse_args()
  mixes = {"synthetic OV mix": synthetic_tiles(a.samples)}
  for name, tiles in mixes.items():
    print(f"{name}: {len(tiles)} samples, tiles a sample: mean {tiles.mean():.1f}, max {tiles.max()}, "
          f">16: {np.mean(tiles > 16):.1%}")
    print("| rows a batch | layout | skipped | tile slots used |")
    print("|---|---|---|---|")
    for rows in (int(r) for r in a.rows.split(",")):
      for label, budget, buckets in (("fixed 16 (before)", 16, None), ("fixed 37", 37, None),
                                     ("buckets up to 37 (now)", 37, batch_lib.TILE_BUCKETS)):
        s, u = utilisation(tiles, rows, budget, buckets)
        print(f"| {rows} | {label} | {s:.1%} | {u:.1%} |")
  if a.demo:  # the demo's budget is 2 tiles (buckets 1, 2): one-image questions fill half a fixed budget
    for rows in (int(r) for r in a.rows.split(",")):
      u, n = demo_batches(rows)
      print(f"demo data, {rows} rows a batch, buckets (1, 2): {u:.1%} of tile slots used ({n} batches)")


if __name__ == "__main__":
  main()
