"""What a compiled engine fixes (`EngineConfig`, a jit static argument) and the per-row values it reads
at run time (`RowParams`). Everything in `RowParams` is an array, so a new temperature, cfg_scale,
threshold, factor, remasking, step count, answer length, refresh interval, schedule or stop rule never
recompiles. `SamplingParams` (inference/params.py) makes both from a request.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
from flax import struct

MODES = {"steps": 0, "threshold": 1, "factor": 2}  # how a row picks the positions a step commits
STOP_RULES = ("earliest", "original")
CACHES = (None, "prefix", "dual", "dllm")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
  """What a compiled engine fixes: the model's token ids, the longest block a row may use
  (`max_block_length`: each row's own block length is a value, `RowParams.block_length`), the cache mode
  and whether the unconditional classifier-free-guidance pass runs (`guidance`). `vocab_chunk`: vocabulary columns
  per step of the chunked LM head (None: the largest divisor of the vocabulary up to 8192).
  `forward_rows`: the forward passes run on groups of this many rows in turn (None: all at once;
  fewer temporaries, for large batches on one device; it must divide the rows of a pass).
  `max_transfer_ratio` (cache "dllm"): the static number of response positions a cached step
  recomputes is floor(max_transfer_ratio * response bucket); a row's own transfer_ratio (a value, at
  most this) picks how many of those slots it uses. `head_rungs`: the LM head's decision runs only
  on the positions that can still be committed, gathered into the smallest of this many static
  lengths (the longest block, then halves: `decode.ladder`) that holds them; 1: the longest block always
  (each rung is one more copy of the decision to compile: bench/sampler.py's notes)."""
  mask_id: int
  banned_ids: tuple = ()
  max_block_length: int = 32
  cache: Optional[str] = None
  guidance: bool = False
  vocab_chunk: Optional[int] = None
  forward_rows: Optional[int] = None
  max_transfer_ratio: float = 0.0
  head_rungs: int = 2

  def __post_init__(self):
    if self.cache not in CACHES:
      raise ValueError(f"cache={self.cache!r} must be one of {CACHES}")
    if not 0.0 <= self.max_transfer_ratio <= 1.0:
      raise ValueError(f"max_transfer_ratio={self.max_transfer_ratio} must be in [0, 1]")
    if self.max_block_length < 1:
      raise ValueError(f"max_block_length={self.max_block_length} must be >= 1")
    if self.head_rungs < 1:
      raise ValueError(f"head_rungs={self.head_rungs} must be >= 1")


@struct.dataclass
class RowParams:
  """One request's sampling values as the engine reads them ([B] arrays in the engine, scalars in a
  request)."""
  answer_len: jax.Array  # int32: answer positions of this row (a multiple of block_length, <= the bucket)
  block_length: jax.Array  # int32: this row's block length (<= the engine's max_block_length)
  steps_per_block: jax.Array  # int32
  table: jax.Array  # int32 [max_block_length + 1, max_block_length]: step counts by the masked count at block start
  temperature: jax.Array  # float32
  cfg_scale: jax.Array  # float32 (0: the conditional logits only)
  random_remask: jax.Array  # bool
  mode: jax.Array  # int32, MODES
  value: jax.Array  # float32: the threshold or the factor
  refresh: jax.Array  # int32: full forwards every `refresh` steps of a block (prefix / dual)
  prompt_interval: jax.Array  # int32: dllm Kp
  gen_interval: jax.Array  # int32: dllm Kr
  transfer_ratio: jax.Array  # float32: dllm rho
  original_stops: jax.Array  # bool: stop_rule == "original"
