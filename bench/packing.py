r"""Useful-token fraction of training batches with sequence packing off and on (data.packing).

    python bench/packing.py                      # the demo set and a synthetic LLaVA-like length mix
    python bench/packing.py --batches 200 --rows 1 8 32

Useful tokens = a conversation's own tokens (segment > 0, the original's EOS padding not counted: it is
filler, though the original trains on it) / all B x L positions of the compiled shapes. Both runs go
through the pipeline's own batching (`pipeline.BatchIterator`: EOS padding, buckets, greedy first-fit):
  demo       the built-in demo set (data kind demo) through the whole Grain pipeline, at the demo preset's
             shape (80 tokens, 2 tiles a row) and at rows of 320 tokens / 8 tiles
  lognormal  text-only conversations of lognormal length (median 700, sigma 1, clipped to 100..8192: a
             LLaVA-like instruction mix), rows of 8192 tokens, unpacked with buckets (1024, 2048, 4096, 8192)
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import grain  # noqa: E402
import numpy as np  # noqa: E402

from lladav_jax import multimodal  # noqa: E402
from lladav_jax.config import IGNORE_INDEX, TAPS  # noqa: E402
from lladav_jax.data import demo_data, pipeline  # noqa: E402
from lladav_jax.data.tokenizer import Tokenizer  # noqa: E402


def useful(batches, eos_id: int) -> float:
  """Conversation tokens / all positions; a row's trailing EOS run past its last labelled non-EOS token
  (the original's EOS padding) is not counted."""
  used = total = 0
  for b in batches:
    x = b.inputs
    total += x.tokens.size
    for r in range(x.rows):
      for s in range(1, int(x.segments[r].max()) + 1):
        tok = x.tokens[r][x.segments[r] == s]
        n = len(tok)
        while n and tok[n - 1] == eos_id:  # EOS padding (the template ends a turn with <|eot_id|>, not EOS)
          n -= 1
        used += n
  return used / max(total, 1)


def demo(batches: int, rows: int):
  root = os.path.join(tempfile.gettempdir(), "lladav_bench_packing_demo")
  paths = demo_data.ensure_demo_data(root)
  tok = Tokenizer.from_dir(paths["tokenizer_dir"])
  base = demo_data.demo_data_config(paths)
  out = []
  for label, kw in [("demo 80 tok / 2 tiles", {}), ("demo 320 tok / 8 tiles", dict(seq_len=320, buckets=(320,),
                                                                                      tile_budget=8))]:
    for packing in (False, True):
      it = pipeline.build_train_iterator(base.replace(packing=packing, **kw), tok, demo_data.demo_image_config(),
                                         batch_size_per_process=rows, process_index=0, process_count=1, seed=0)
      bs = [next(it) for _ in range(batches)]
      convs = sum(int(b.inputs.segments.max(axis=1).sum()) for b in bs)
      out.append((label, rows, packing, useful(bs, tok.eos_id), convs / batches))
  return out


def lognormal(batches: int, rows: int, seed: int = 0, seq_len: int = 8192):
  rng = np.random.default_rng(seed)
  n = batches * rows * 16
  lengths = np.clip(np.exp(rng.normal(np.log(700), 1.0, n)).astype(int), 100, seq_len)
  icfg = multimodal.ImageConfig()
  eos = 2

  def sample(i, m):
    toks = rng.integers(10, 1000, m).astype(np.int32)
    labels = np.where(np.arange(m) >= m // 2, toks, IGNORE_INDEX).astype(np.int32)
    e = multimodal.Expanded(tokens=toks, labels=labels, pixels=np.zeros((0, 384, 384, 3), np.uint8),
                            merge_idx=np.ones((m, TAPS), np.int32), merge_w=np.zeros((m, TAPS), np.float32))
    return pipeline.Sample(e, pre_len=m, id=str(i))

  samples = [sample(i, int(m)) for i, m in enumerate(lengths)]
  out = []
  for packing in (False, True):
    data = pipeline.DataConfig(buckets=(1024, 2048, 4096, seq_len), seq_len=seq_len, tile_budget=0, pad_group_size=1,
                               packing=packing, max_skip_fraction=1.0, skip_check_min_samples=0, drop_remainder=True)
    spec = pipeline.Batching(data, batch_size=rows, image_cfg=icfg, pad_id=0, eos_id=eos)
    parent = grain.MapDataset.source(samples).to_iter_dataset().__iter__()
    it = pipeline.BatchIterator(parent, spec, log_first=0)
    bs = [next(it) for _ in range(batches)]
    convs = sum(int(b.inputs.segments.max(axis=1).sum()) for b in bs)
    out.append((f"lognormal 100..{seq_len}", rows, packing, useful(bs, eos), convs / batches))
  return out


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batches", type=int, default=50)
  ap.add_argument("--rows", type=int, nargs="+", default=[1, 8])
  a = ap.parse_args()
  print(f"{'data':26s} {'rows':>4s} {'packing':>7s} {'useful':>7s} {'conv/batch':>10s}")
  for rows in a.rows:
    for label, r, packing, frac, convs in demo(a.batches, rows) + lognormal(a.batches, rows):
      print(f"{label:26s} {r:4d} {str(packing):>7s} {frac:7.1%} {convs:10.1f}")


if __name__ == "__main__":
  main()
