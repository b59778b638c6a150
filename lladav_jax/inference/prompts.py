"""Prompts into the engine's shapes: image expansion, left padding, length and tile buckets, stop slots, and
one `Request` a prompt.

Shapes are bucketed so that a new prompt rarely recompiles: the expanded prompt length is rounded up to a
multiple of `length_multiple` (64), the tile count to one of TILE_BUCKETS (every tile an image or video
needs is run: none is dropped)."""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import numpy as np
from flax import struct
from PIL import Image

from lladav_jax import batch as batch_lib
from lladav_jax import multimodal
from lladav_jax.batch import ModelInputs
from lladav_jax.inference.engine import Request, RowParams
from lladav_jax.inference.model import InferenceModel

TILE_BUCKETS = batch_lib.TILE_BUCKETS  # one set for training and inference (batch.py)
bucket_tiles = batch_lib.bucket_tiles


def bucket_length(n: int, multiple: int = 64) -> int:
  return max(multiple, -(-n // multiple) * multiple)


def bucket_pow2(n: int) -> int:
  return 0 if n <= 0 else 1 << (n - 1).bit_length()


def check_texts(texts, name: str = "prompts") -> list[str]:
  """A list of strings, one a request (a lone string would be read as its characters)."""
  if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence):
    raise TypeError(f"{name}: a list of strings, one a request, not {type(texts).__name__}"
                    + (f" (for one: [{texts!r}])" if isinstance(texts, str) else ""))
  for i, t in enumerate(texts):
    if not isinstance(t, str):
      raise TypeError(f"{name}[{i}]: a string, not {type(t).__name__}")
  return list(texts)


def check_images(images, n: int) -> list[list]:
  """One list of PIL images per prompt (or, for a video, one list holding its frames), None for none."""
  if images is None:
    return [[] for _ in range(n)]
  if isinstance(images, (str, bytes, Image.Image)) or not isinstance(images, Sequence):
    raise TypeError(f"images: a list with one list of PIL images a prompt, not {type(images).__name__}")
  if len(images) != n:
    raise ValueError(f"{n} prompts but {len(images)} image lists (images: one list a prompt, [] for none)")
  out = []
  for i, ims in enumerate(images):
    ims = [] if ims is None else ims
    if isinstance(ims, (str, bytes, Image.Image)) or not isinstance(ims, Sequence):
      raise TypeError(f"images[{i}]: a list of PIL images (prompt {i}'s), not {type(ims).__name__}")
    video = len(ims) == 1 and isinstance(ims[0], (list, tuple))
    for j, im in enumerate(ims[0] if video else ims):
      if not isinstance(im, Image.Image):
        where = f"images[{i}][0][{j}] (a video frame)" if video else f"images[{i}][{j}]"
        raise TypeError(f"{where}: a PIL.Image.Image, not {type(im).__name__} (open a file with PIL.Image.open)")
      if im.width < 1 or im.height < 1:
        raise ValueError(f"images[{i}][{j}]: an image of {im.width} x {im.height} pixels (it needs at least one)")
    out.append(list(ims))
  return out


@struct.dataclass
class PromptBatch:
  """A prepared batch of prompts (host side; `requests` turns its live rows into `Request`s). Prompts are
  left-padded (all end at column P)."""
  prompt: ModelInputs  # [B, P]; positions 0 at each sample's first real token
  suffix: jax.Array  # int32 [B, Ls]; fixed tokens after the answer (Ls may be 0)
  stop_ids: jax.Array  # int32 [B, NS, LS]; stop sequences, in order
  stop_lens: jax.Array  # int32 [B, NS]; 0 = unused slot
  seeds: jax.Array  # uint32 [B]
  live: jax.Array  # bool [B]; False = a padding row


def prepare_inputs(model: InferenceModel, prompt_ids: Sequence[Sequence[int]], images: Sequence[Sequence], *,
                   suffix_ids=(), stop_ids: Sequence[Sequence[int]] = (), seeds: Sequence[int], rows: int,
                   length_multiple: int = 64, length: Optional[int] = None, tiles: Optional[int] = None,
                   stop_shape=(1, 1)) -> PromptBatch:
  """Expands, left-pads and buckets one batch into a NumPy PromptBatch with `rows` rows of `length`
  positions (default: the batch's longest prompt rounded up to `length_multiple`) and `tiles` image tiles
  per row (default: the tile bucket of the batch's largest need); the stops padded to at least
  `stop_shape` (sequences, longest length: an engine's fixed stop bucket)."""
  icfg = model.image_cfg
  exps = [multimodal.expand(ids, multimodal.process_sample_images(ims, icfg) if ims else [], icfg)
          for ids, ims in zip(prompt_ids, images)]
  n = len(exps)
  if n > rows:
    raise ValueError(f"{n} prompts but {rows} rows")
  exps += [multimodal.expand([0], [], icfg)] * (rows - n)
  longest = max(len(e.tokens) for e in exps)
  if length is not None and longest > length:
    raise ValueError(f"a prompt has {longest} positions (images included), more than length={length}")
  length = bucket_length(longest, length_multiple) if length is None else length
  need = max(e.pixels.shape[0] for e in exps)
  if tiles is not None and need > tiles:
    raise ValueError(f"a prompt's images need {need} tiles, more than tiles={tiles} (tiles=None buckets them)")
  tiles = bucket_tiles(need) if tiles is None else tiles
  prompt = batch_lib.collate(exps, icfg, length=length, tiles=tiles, left=True)
  ns = max(len(stop_ids), stop_shape[0])
  ls = max([len(s) for s in stop_ids] + [stop_shape[1]])
  stops = np.full((rows, ns, ls), -1, np.int32)
  lens = np.zeros((rows, ns), np.int32)
  for k, s in enumerate(stop_ids):
    stops[:, k, :len(s)] = s
    lens[:, k] = len(s)
  suffix = np.broadcast_to(np.asarray(list(suffix_ids), np.int32)[None], (rows, len(suffix_ids))).copy()
  seeds_arr = np.zeros((rows,), np.uint32)
  seeds_arr[:n] = np.asarray(seeds, np.int64) % (1 << 32)
  return PromptBatch(prompt=prompt, suffix=suffix, stop_ids=stops, stop_lens=lens, seeds=seeds_arr,
                     live=np.arange(rows) < n)


def widen(model: InferenceModel, inputs: PromptBatch, length: int) -> PromptBatch:
  """The same prompts left-padded to `length` positions (an engine lane's prompt bucket), as `collate`
  pads: token 0, position 0, segment 0, the merge plan's zero row at weight 0."""
  pr = inputs.prompt
  n = length - pr.tokens.shape[1]
  if n < 0:
    raise ValueError(f"the prompts have {pr.tokens.shape[1]} positions, more than length={length}")
  zero = pr.pixels.shape[1] * model.image_cfg.tokens_per_tile + 1

  def pad(a, value=0):
    a = np.asarray(a)
    return np.pad(a, ((0, 0), (n, 0)) + ((0, 0),) * (a.ndim - 2), constant_values=value)

  return inputs.replace(prompt=pr.replace(tokens=pad(pr.tokens), positions=pad(pr.positions),
                                          segments=pad(pr.segments), merge_idx=pad(pr.merge_idx, zero),
                                          merge_w=pad(pr.merge_w)))


def requests(inputs: PromptBatch, row_params: RowParams, suffix_len: int) -> list[Request]:
  """The engine's requests of a prepared batch: one a live row."""
  out = []
  for k in np.nonzero(np.asarray(inputs.live))[0]:
    row = jax.tree.map(lambda a: np.asarray(a)[k], inputs)
    out.append(Request(prompt=row.prompt, features=None, suffix=row.suffix, suffix_len=np.int32(suffix_len), stop_ids=row.stop_ids,
                       stop_lens=row.stop_lens, seed=row.seeds, row_params=row_params))
  return out
