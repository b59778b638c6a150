"""Image tiles -> the engine's features: the vision tower and projector run once per distinct tile.

A request's prompt carries uint8 tiles and a merge plan into [tile features | newline | zero]
(`multimodal.expand`). `TileFeatures.attach` runs the tower on the tiles the plan reads that are not in
its cache (keyed by the tile's bytes, so a multi-turn chat that re-sends its image, or two requests with
the same picture, encode it once), lays the features out for an engine that holds `tiles` tiles a row
and moves the plan's newline / zero indices past them. The cache is bounded in bytes (least recently
used out first) and counts hits and misses by tile. Encoding runs in tile buckets (`batch.TILE_BUCKETS`),
so a server compiles one program a bucket at warm-up.
"""
from __future__ import annotations

import collections
import hashlib

import jax
import jax.numpy as jnp
import numpy as np

from lladav_jax.inference import engine
from lladav_jax.inference.engine import Request
from lladav_jax.inference.model import InferenceModel
from lladav_jax.inference.prompts import bucket_tiles


class TileFeatures:
  """The tower's features of tiles, cached up to `max_bytes` (0: no cache, each request encodes its own)."""

  def __init__(self, model: InferenceModel, max_bytes: int = 0):
    self.model, self.max_bytes = model, max_bytes
    self.cache: collections.OrderedDict[bytes, np.ndarray] = collections.OrderedDict()
    self.bytes = 0
    self.hits = 0  # tiles found in the cache
    self.misses = 0  # tiles encoded

  @property
  def tile_tokens(self) -> int:
    return self.model.image_cfg.tokens_per_tile

  def encode(self, pixels: np.ndarray) -> np.ndarray:
    """uint8 tiles [N, S, S, 3] -> host features [N, tile tokens, D], run in the tile bucket of N."""
    n = pixels.shape[0]
    padded = np.zeros((bucket_tiles(n),) + pixels.shape[1:], np.uint8)
    padded[:n] = pixels
    m = self.model
    with jax.set_mesh(m.mesh):
      return np.asarray(jax.device_get(engine.encode(m.graphdef, m.state, padded)))[:n]

  def _store(self, key: bytes, feats: np.ndarray):
    if feats.nbytes > self.max_bytes:
      return
    self.cache[key] = feats
    self.bytes += feats.nbytes
    while self.bytes > self.max_bytes:
      self.bytes -= self.cache.popitem(last=False)[1].nbytes

  def attach(self, req: Request, tiles: int) -> Request:
    """`req` with the features of its prompt's tiles for an engine of `tiles` tiles a row (its pixels
    dropped); a prompt whose images need more tiles is a ValueError."""
    pr = req.prompt
    pixels, idx, w = np.asarray(pr.pixels), np.asarray(pr.merge_idx), np.asarray(pr.merge_w)
    p, have = self.tile_tokens, pixels.shape[0]
    read = idx[(w != 0) & (idx < have * p)] // p
    used = np.unique(read)
    need = int(used.max()) + 1 if used.size else 0
    if need > tiles:
      raise ValueError(f"the prompt's images need {need} tiles, more than the engine's {tiles}")
    d = self.model.cfg.llm.hidden_size
    feats = np.zeros((tiles * p, d), jnp.dtype(self.model.cfg.dtype))  # the features' own dtype (one insert program)
    keys = {int(t): hashlib.blake2b(pixels[t].tobytes(), digest_size=16).digest() for t in used}
    todo = []
    for t, key in keys.items():
      got = self.cache.get(key)
      if got is None:
        todo.append(t)
        continue
      self.cache.move_to_end(key)
      self.hits += 1
      feats[t * p:(t + 1) * p] = got
    if todo:
      new = self.encode(pixels[todo])
      self.misses += len(todo)
      for t, f in zip(todo, new):
        feats[t * p:(t + 1) * p] = f
        if self.max_bytes:
          self._store(keys[t], f)
    # the newline and zero rows follow the engine's `tiles` tiles instead of the prompt's `have`
    idx = np.where(idx >= have * p, idx + (tiles - have) * p, idx).astype(idx.dtype)
    return req.replace(prompt=pr.replace(pixels=None, merge_idx=idx), features=feats)
