"""The one batch layout: what the model reads (`ModelInputs`) and what training adds (`TrainBatch`).

Training (the Grain pipeline), inference (the sampler, logits, the ELBO), the demo and the tests all
build batches with `collate`, from `multimodal.Expanded` samples (ids with the image placeholders
already expanded, a merge plan, uint8 tiles). Shapes are static: B rows, L positions, T tiles of
S x S pixels, TAPS merge taps.

  tokens    int32 [B, L]        ids; IMAGE_TOKEN_INDEX (-200) at image-feature positions
  positions int32 [B, L]        RoPE positions: 0 at each sample's first token (counting on through right
                                padding, 0 on left padding; padding is never attended)
  segments  int32 [B, L]        segment ids: 0 at padding (never attended, attends nothing), 1.. per
                                sample (conversation); attention only within equal ids
  pixels    uint8 [B, T, S, S, 3]  RGB tiles (normalised on device); zeros where unused
  merge_idx int32 [B, L, TAPS]  the merge plan into each row's [T*P tile features | newline | zero]
  merge_w   float32 [B, L, TAPS]
  labels    int32 [B, L]        training only: IGNORE_INDEX (-100) = not trained on

Sequence packing (`collate` given a sequence of samples for a row) writes several samples into one row with
ids 1, 2, ... in `segments` (positions restart at each; tiles concatenated, each plan offset to its tiles);
otherwise one sample a row (id 1).

T comes from a small set (`TILE_BUCKETS`): training and inference both pick the smallest bucket that holds
the batch's largest sample, so compiled shapes stay few and no sample the original trains on is dropped.
"""
from __future__ import annotations

from typing import Any, Sequence, Union

import jax
import numpy as np
from flax import struct

from lladav_jax.config import IGNORE_INDEX, TAPS
from lladav_jax.multimodal import Expanded, ImageConfig


# Tiles a row, the compiled sizes: base + k x k anyres grids (k = 1..6; 37 = anyres_max_4's largest, a 6x6
# grid) and 32 (the original's video frames); past 37, multiples of 37.
TILE_BUCKETS = (1, 2, 5, 10, 17, 26, 32, 37)


def bucket_tiles(n: int, buckets: Sequence[int] = TILE_BUCKETS) -> int:
  """The smallest of `buckets` that holds `n` tiles (0 for none); past the last, multiples of it."""
  if n <= 0:
    return 0
  top = buckets[-1]
  return next((b for b in buckets if n <= b), -(-n // top) * top)


@struct.dataclass
class ModelInputs:
  tokens: Any
  positions: Any
  segments: Any
  pixels: Any
  merge_idx: Any
  merge_w: Any

  @property
  def valid(self):
    """bool [B, L]: False only at padding."""
    return self.segments > 0

  @property
  def rows(self) -> int:
    return self.tokens.shape[0]

  @property
  def length(self) -> int:
    return self.tokens.shape[1]

  @property
  def tiles(self) -> int:
    return self.pixels.shape[1]


@struct.dataclass
class TrainBatch:
  inputs: ModelInputs
  labels: Any


def shapes(rows: int, length: int, tiles: int, image_size: int, *, labels: bool = True):
  """A batch of `jax.ShapeDtypeStruct`s (ahead-of-time compiles, memory plans); no allocation."""
  s = jax.ShapeDtypeStruct
  inputs = ModelInputs(tokens=s((rows, length), np.int32), positions=s((rows, length), np.int32),
                       segments=s((rows, length), np.int32), pixels=s((rows, tiles, image_size, image_size, 3), np.uint8),
                       merge_idx=s((rows, length, TAPS), np.int32), merge_w=s((rows, length, TAPS), np.float32))
  return TrainBatch(inputs, s((rows, length), np.int32)) if labels else inputs


Row = Union[Expanded, Sequence[Expanded]]


def _row(r: Row) -> list[Expanded]:
  return [r] if isinstance(r, Expanded) else list(r)


def collate(samples: Sequence[Row], image_cfg: ImageConfig, *, length: int | None = None,
            tiles: int | None = None, rows: int | None = None, pad_id: int = 0, left: bool = False) -> ModelInputs:
  """Stacks samples into `rows` rows (default: one per element; extra rows are all padding) of `length`
  positions and `tiles` tiles (defaults: what the rows need). An element is one sample, or a sequence of
  samples packed into one row: segments 1, 2, ..., positions restarting at 0 at each, their tiles
  concatenated. `left` pads on the left (sampler prompts all end at the same column). Each sample's merge
  plan points into its own [t*P | newline | zero] table; it is remapped into the row's
  [tiles*P | newline | zero] at its tiles' offset."""
  packs = [_row(r) for r in samples]
  rows = len(packs) if rows is None else rows
  length = max([sum(len(e.tokens) for e in r) for r in packs], default=1) if length is None else length
  tiles = max([sum(e.pixels.shape[0] for e in r) for r in packs], default=0) if tiles is None else tiles
  if len(packs) > rows:
    raise ValueError(f"{len(packs)} samples but {rows} rows")
  p, s = image_cfg.tokens_per_tile, image_cfg.image_size
  zero = tiles * p + 1
  out = ModelInputs(tokens=np.full((rows, length), pad_id, np.int32), positions=np.zeros((rows, length), np.int32),
                    segments=np.zeros((rows, length), np.int32), pixels=np.zeros((rows, tiles, s, s, 3), np.uint8),
                    merge_idx=np.full((rows, length, TAPS), zero, np.int32),
                    merge_w=np.zeros((rows, length, TAPS), np.float32))
  for i, r in enumerate(packs):
    n, t_all = sum(len(e.tokens) for e in r), sum(e.pixels.shape[0] for e in r)
    if n > length:
      raise ValueError(f"sample {i} has {n} tokens, more than the length {length}")
    if t_all > tiles:
      raise ValueError(f"sample {i} needs {t_all} tiles, more than {tiles}")
    col = length - n if left else 0
    out.positions[i] = np.maximum(np.arange(length) - col, 0)  # counts on through right padding
    t0 = 0
    for seg, e in enumerate(r, start=1):
      m, t = len(e.tokens), e.pixels.shape[0]
      sl = slice(col, col + m)
      out.tokens[i, sl], out.segments[i, sl], out.positions[i, sl] = e.tokens, seg, np.arange(m)
      out.pixels[i, t0:t0 + t] = e.pixels
      idx = e.merge_idx
      out.merge_idx[i, sl] = np.where(idx < t * p, idx + t0 * p, idx - t * p + tiles * p)
      out.merge_w[i, sl] = e.merge_w
      col, t0 = col + m, t0 + t
  return out


def collate_train(samples: Sequence[Row], image_cfg: ImageConfig, **kw) -> TrainBatch:
  """`collate` plus the samples' labels (IGNORE_INDEX on padding). Right-padded."""
  inputs = collate(samples, image_cfg, **kw)
  labels = np.full(inputs.tokens.shape, IGNORE_INDEX, np.int32)
  for i, r in enumerate(samples):
    lab = np.concatenate([e.labels for e in _row(r)] or [np.zeros(0, np.int32)])
    labels[i, :len(lab)] = lab
  return TrainBatch(inputs, labels)


def pad_length(batch: TrainBatch, length: int, tokens_per_tile: int) -> TrainBatch:
  """Right-pads a host batch to `length` positions (segment 0, unlabelled): one compiled shape."""
  x = batch.inputs
  n = length - x.length
  if n < 0:
    raise ValueError(f"batch of length {x.length} is longer than {length}")
  if n == 0:
    return batch
  pad = lambda a, value=0: np.pad(a, ((0, 0), (0, n)) + ((0, 0),) * (a.ndim - 2), constant_values=value)
  positions = np.concatenate([x.positions, x.positions[:, -1:] + 1 + np.arange(n)], axis=1)
  inputs = ModelInputs(tokens=pad(x.tokens), positions=positions, segments=pad(x.segments), pixels=x.pixels,
                       merge_idx=pad(x.merge_idx, x.tiles * tokens_per_tile + 1), merge_w=pad(x.merge_w))
  return TrainBatch(inputs, pad(batch.labels, IGNORE_INDEX))


def pad_tiles(batch: TrainBatch, tiles: int, tokens_per_tile: int) -> TrainBatch:
  """A host batch with `tiles` tiles a row (zero tiles appended; each row's newline / zero entries of the
  merge plan move past the new tiles): several processes agree on one compiled shape."""
  x = batch.inputs
  n = tiles - x.tiles
  if n < 0:
    raise ValueError(f"batch of {x.tiles} tiles a row has more than {tiles}")
  if n == 0:
    return batch
  pixels = np.pad(x.pixels, ((0, 0), (0, n)) + ((0, 0),) * (x.pixels.ndim - 2))
  first_tail = x.tiles * tokens_per_tile  # the newline entry; the zero entry follows it
  merge_idx = np.where(x.merge_idx >= first_tail, x.merge_idx + n * tokens_per_tile, x.merge_idx).astype(np.int32)
  return TrainBatch(x.replace(pixels=pixels, merge_idx=merge_idx), batch.labels)


def extend(e: Expanded, n: int, token: int, label: int, tokens_per_tile: int) -> Expanded:
  """`e` with `n` more text tokens (the original's EOS padding before image expansion)."""
  if n <= 0:
    return e
  zero = e.pixels.shape[0] * tokens_per_tile + 1
  return Expanded(tokens=np.concatenate([e.tokens, np.full(n, token, np.int32)]),
                  labels=None if e.labels is None else np.concatenate([e.labels, np.full(n, label, np.int32)]),
                  pixels=e.pixels, merge_idx=np.concatenate([e.merge_idx, np.full((n, TAPS), zero, np.int32)]),
                  merge_w=np.concatenate([e.merge_w, np.zeros((n, TAPS), np.float32)]))


def truncate(e: Expanded, n: int) -> Expanded:
  """The first `n` positions of `e` (the original's truncation to model_max_length after expansion)."""
  return Expanded(tokens=e.tokens[:n], labels=None if e.labels is None else e.labels[:n], pixels=e.pixels,
                  merge_idx=e.merge_idx[:n], merge_w=e.merge_w[:n])
