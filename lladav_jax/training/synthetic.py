"""Synthetic training batches in the pipeline's exact format (for tests and performance runs).

`make_batch` builds one host batch: per sample, an image placeholder run (-200, with a merge plan
into the tile table), prompt text (label -100), then an answer span (labelled), EOS padding and
bucket padding (segment 0). `SyntheticIterator` is a checkpointable grain DatasetIterator of such
batches: batch i of process p depends only on (seed, i, p), so it resumes exactly.
"""
from __future__ import annotations

import grain
import numpy as np

from lladav_jax.batch import ModelInputs, TrainBatch
from lladav_jax.config import IGNORE_INDEX, IMAGE_TOKEN_INDEX, TAPS


def make_batch(rng: np.random.Generator, *, batch: int, seq_len: int, vocab_size: int, mask_token_id: int,
               tiles: int = 1, image_size: int = 384, patch_size: int = 14, answer_frac: float = 0.3,
               pad_frac: float = 0.1, eos_id: int | None = None) -> TrainBatch:
  p = (image_size // patch_size) ** 2
  n_img = min(tiles * p, seq_len // 2)
  zero = tiles * p + 1
  text_vocab = [i for i in range(vocab_size) if i != mask_token_id]
  eos = eos_id if eos_id is not None else text_vocab[-1]
  out = {
      "tokens": np.zeros((batch, seq_len), np.int32),
      "labels": np.full((batch, seq_len), IGNORE_INDEX, np.int32),
      "segments": np.zeros((batch, seq_len), np.int32),
      "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)).copy(),
      "pixels": rng.integers(0, 256, (batch, tiles, image_size, image_size, 3), dtype=np.uint8),
      "merge_idx": np.full((batch, seq_len, TAPS), zero, np.int32),
      "merge_w": np.zeros((batch, seq_len, TAPS), np.float32),
  }
  for b in range(batch):
    n_valid = seq_len - int(rng.integers(0, max(1, int(pad_frac * seq_len)) + 1))
    n_valid = max(n_valid, n_img + 4)
    start = 1
    toks = rng.choice(text_vocab, size=seq_len).astype(np.int32)
    out["tokens"][b] = toks
    out["tokens"][b, start:start + n_img] = IMAGE_TOKEN_INDEX
    out["merge_idx"][b, start:start + n_img, 0] = np.arange(n_img)
    out["merge_w"][b, start:start + n_img, 0] = 1.0
    n_ans = max(1, int(answer_frac * (n_valid - n_img - start)))
    a0 = n_valid - n_ans
    out["labels"][b, a0:n_valid] = out["tokens"][b, a0:n_valid]
    # a little EOS padding inside the answer span, labelled like the original's
    n_eos = int(rng.integers(0, max(1, n_ans // 4) + 1))
    if n_eos:
      out["tokens"][b, n_valid - n_eos:n_valid] = eos
      out["labels"][b, n_valid - n_eos:n_valid] = eos
    out["segments"][b, :n_valid] = 1
    out["tokens"][b, n_valid:] = eos
  labels = out.pop("labels")
  return TrainBatch(ModelInputs(**out), labels)


class SyntheticIterator(grain.DatasetIterator):
  """Infinite, checkpointable iterator of `make_batch` batches (state: the next batch index)."""

  def __init__(self, *, seed: int = 0, process_index: int = 0, **batch_kw):
    super().__init__()
    self.seed, self.process_index, self.kw = seed, process_index, batch_kw
    self.index = 0

  def __next__(self):
    rng = np.random.default_rng([self.seed, self.process_index, self.index])
    self.index += 1
    return make_batch(rng, **self.kw)

  def get_state(self):
    return {"index": self.index}

  def set_state(self, state):
    self.index = int(state["index"])

  def __str__(self):
    return f"SyntheticIterator(seed={self.seed}, process={self.process_index})"
