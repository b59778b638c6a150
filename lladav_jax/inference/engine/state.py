"""The engine's state: its static shapes (`EngineShapes`), one row's request (`Request`), the rows
(`EngineState`) and the empty state (`init`)."""
from __future__ import annotations

import collections
import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx, struct

from lladav_jax import sharding as shd
from lladav_jax.batch import ModelInputs
from lladav_jax.inference.engine.config import EngineConfig, RowParams
from lladav_jax.inference.engine.dllm_cache import DllmCache, FeatureCache
from lladav_jax.model.llm import KVCache

# Traces of the engine's jitted functions, by name and static config (tests count them).
TRACE_COUNTS: collections.Counter = collections.Counter()


@dataclasses.dataclass(frozen=True)
class EngineShapes:
  """The buckets: rows, prompt positions, answer positions, suffix positions, stop sequences and their
  longest length, image tiles a row's prompt may hold (their features, `Request.features`)."""
  rows: int
  prompt_len: int
  answer_len: int
  suffix_len: int = 0
  stops: int = 1
  stop_len: int = 1
  tiles: int = 0


@struct.dataclass
class Request:
  """One row's request (no row axis): a left-padded prompt of the engine's prompt bucket, the projected
  features of its image tiles (the engine's `tiles` of them, the prompt's merge plan indexing
  [features | newline | zero]; `runner.with_features` makes them from the prompt's pixels), a suffix of the
  suffix bucket with its length, stop sequences, seed and sampling values."""
  prompt: ModelInputs  # its pixels are not read by the engine (None there)
  features: Optional[jax.Array]  # [tiles * tile tokens, D]
  suffix: jax.Array  # int32 [Ls]
  suffix_len: jax.Array  # int32
  stop_ids: jax.Array  # int32 [NS, LS]
  stop_lens: jax.Array  # int32 [NS]; 0 = unused slot
  seed: jax.Array  # uint32
  row_params: RowParams


@struct.dataclass
class EngineState:
  """Every row's request and progress (B rows, P prompt positions, G answer positions, Ls suffix)."""
  prompt_emb: jax.Array  # [B, P, D] prompt embeddings, image features spliced in
  prompt_valid: jax.Array  # bool [B, P]: real (not padding) prompt positions
  prompt_positions: jax.Array  # int32 [B, P]: RoPE positions
  prompt_len: jax.Array  # int32 [B]: real prompt positions
  response: jax.Array  # int32 [B, G + Ls]: the answer bucket, then the suffix bucket (mask_id = not committed)
  suffix_len: jax.Array  # int32 [B]
  stop_ids: jax.Array  # int32 [B, NS, LS]
  stop_lens: jax.Array  # int32 [B, NS]; 0 = unused slot
  seed: jax.Array  # uint32 [B]
  row_params: RowParams  # [B] values
  live: jax.Array  # bool [B]: holds a request
  done: jax.Array  # bool [B]: finished
  block: jax.Array  # int32 [B]: the block the next step works on (-1 before the first)
  block_step: jax.Array  # int32 [B]: steps taken in that block
  counts: jax.Array  # int32 [B, max_block_length]: the positions each step of this block commits
  stop: jax.Array  # int32 [B]: earliest stop start in the answer, G if none
  commit_step: jax.Array  # int32 [B, G]: the row's step that committed each position, -1 if none
  nfe: jax.Array  # int32 [B]: forward evaluations
  steps: jax.Array  # int32 [B]: denoising steps
  query_tokens: jax.Array  # int32 [B]: positions run through the transformer, summed over passes
  head_tokens: jax.Array  # int32 [B]: the decision's length (positions through the LM head) summed over steps
  cache: Optional[KVCache | DllmCache]  # [layers, B (x2 with CFG), P + G + Ls (dllm: P and G + Ls), ...]

  @property
  def answer_bucket(self) -> int:
    return self.commit_step.shape[1]


def by_row(tree):
  """Per-row state stays sharded by row, as the activations are (a no-op off a mesh)."""
  return jax.tree.map(lambda x: shd.constrain(x, ("activation_batch",) + (None,) * (x.ndim - 1)) if x.ndim else x,
                      tree)


def _init(graphdef, cfg: EngineConfig, shapes: EngineShapes, weights) -> EngineState:
  TRACE_COUNTS["init", cfg] += 1
  model = nnx.merge(graphdef, weights)
  c = model.llm.cfg
  b, p, g, ls, bl = shapes.rows, shapes.prompt_len, shapes.answer_len, shapes.suffix_len, cfg.max_block_length
  if bl > g:
    raise ValueError(f"max_block_length={bl} is longer than the answer bucket {g}")
  i32 = lambda *s: jnp.zeros(s, jnp.int32)  # noqa: E731
  f32 = lambda *s: jnp.zeros(s, jnp.float32)  # noqa: E731
  row_params = RowParams(
      answer_len=i32(b), block_length=jnp.ones((b,), jnp.int32), steps_per_block=i32(b), table=i32(b, bl + 1, bl), temperature=f32(b), cfg_scale=f32(b),
      random_remask=jnp.zeros((b,), bool), mode=i32(b), value=f32(b), refresh=jnp.ones((b,), jnp.int32),
      prompt_interval=jnp.ones((b,), jnp.int32), gen_interval=jnp.ones((b,), jnp.int32), transfer_ratio=f32(b),
      original_stops=jnp.zeros((b,), bool))
  cache = None
  if cfg.cache is not None:
    r, s = b * (2 if cfg.guidance else 1), p + g + ls
    z = jnp.zeros((c.num_layers, r, s, c.num_kv_heads, c.head_dim), model.llm.dtype)
    cache = KVCache(z, z)
    if cfg.cache == "dllm":
      seg = lambda n: FeatureCache(*(jnp.zeros((c.num_layers, r, n) + tail, model.llm.dtype)  # noqa: E731
                                     for tail in [(c.num_kv_heads, c.head_dim)] * 2 + [(c.hidden_size,)] * 2))
      cache = DllmCache(seg(p), seg(g + ls))
  st = EngineState(
      prompt_emb=jnp.zeros((b, p, c.hidden_size), model.llm.dtype), prompt_valid=jnp.zeros((b, p), bool),
      prompt_positions=i32(b, p), prompt_len=i32(b), response=jnp.full((b, g + ls), cfg.mask_id, jnp.int32),
      suffix_len=i32(b), stop_ids=jnp.full((b, shapes.stops, shapes.stop_len), -1, jnp.int32),
      stop_lens=i32(b, shapes.stops), seed=jnp.zeros((b,), jnp.uint32), row_params=row_params,
      live=jnp.zeros((b,), bool), done=jnp.zeros((b,), bool), block=i32(b), block_step=i32(b), counts=i32(b, bl),
      stop=jnp.full((b,), g, jnp.int32), commit_step=jnp.full((b, g), -1, jnp.int32), nfe=i32(b), steps=i32(b),
      query_tokens=i32(b), head_tokens=i32(b), cache=None)
  return by_row(st).replace(cache=cache)


init = jax.jit(_init, static_argnums=(0, 1, 2))
