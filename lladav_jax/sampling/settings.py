"""Sampler settings: what a request asks for (`SamplerSettings`), what the compiled engine fixes
(`EngineConfig`: token ids, block length, cache mode, CFG on/off) and the per-row values the engine
reads at run time (`RowSettings`). Everything in `RowSettings` is an array, so a new temperature,
cfg_scale, threshold, factor, remasking, step count, answer length, refresh interval, schedule or
stop rule never recompiles.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import numpy as np
from flax import struct

from lladav_jax.sampling.schedule import count_table

MODES = {"steps": 0, "threshold": 1, "factor": 2}  # how a row picks the positions a step commits
STOP_RULES = ("earliest", "original")
CACHES = (None, "prefix", "dual", "dllm")


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
  """One request's settings. Token ids come from the tokenizer (`generation.sampler_settings`).

  `stop_rule`: "earliest" (default) stops at the earliest occurrence of any stop sequence;
  "original" reproduces the original generate's multi-stop quirk: sequences are searched in order
  and the first one found anywhere sets the stop; once a stop is set only the first sequence is
  searched again."""
  mask_id: int
  banned_ids: tuple = ()  # set to -inf at masked positions (the original: eos, bos, start/end header)
  eot_id: Optional[int] = None  # a stop sequence, appended to the stop list when it is not in it
  gen_length: int = 128
  block_length: int = 128
  steps: int = 128
  temperature: float = 0.0
  remasking: str = "low_confidence"  # | "random"
  cfg_scale: float = 0.0
  threshold: Optional[float] = None
  factor: Optional[float] = None
  cache: Optional[str] = None  # None | "prefix" | "dual" | "dllm"
  refresh_interval: int = 32  # prefix / dual: a full forward every this many steps of a block
  prompt_interval: int = 25  # dllm: prompt features refreshed when (step - 1) % this == 0 (the LLaDA-V demo's Kp)
  gen_interval: int = 7  # dllm: response features refreshed when (step - 1) % this == 0 (Kr)
  transfer_ratio: float = 0.25  # dllm: the fraction of response positions recomputed at other steps (rho)
  schedule: str = "uniform"  # | "shift"
  shift: float = 1 / 3
  stop_rule: str = "earliest"  # | "original"

  @property
  def num_blocks(self) -> int:
    return self.gen_length // self.block_length

  @property
  def steps_per_block(self) -> int:
    return self.steps // self.num_blocks

  @property
  def parallel(self) -> bool:
    return self.threshold is not None or self.factor is not None

  def validate(self) -> "SamplerSettings":
    errs = []
    if self.gen_length <= 0 or self.block_length <= 0 or self.gen_length % self.block_length:
      errs.append(f"gen_length={self.gen_length} must be a positive multiple of block_length={self.block_length}")
    elif self.steps <= 0 or self.steps % self.num_blocks:
      errs.append(f"steps={self.steps} must be a positive multiple of the number of blocks {self.num_blocks}")
    if self.remasking not in ("low_confidence", "random"):
      errs.append(f"remasking={self.remasking!r} must be 'low_confidence' or 'random'")
    if self.threshold is not None and self.factor is not None:
      errs.append("give threshold or factor, not both")
    if self.cache not in CACHES:
      errs.append(f"cache={self.cache!r} must be one of {CACHES}")
    if self.refresh_interval < 1:
      errs.append(f"refresh_interval={self.refresh_interval} must be >= 1")
    if self.prompt_interval < 1 or self.gen_interval < 1:
      errs.append(f"prompt_interval={self.prompt_interval} and gen_interval={self.gen_interval} must be >= 1")
    if not 0.0 <= self.transfer_ratio <= 1.0:
      errs.append(f"transfer_ratio={self.transfer_ratio} must be in [0, 1]")
    if self.schedule not in ("uniform", "shift"):
      errs.append(f"schedule={self.schedule!r} must be 'uniform' or 'shift'")
    if self.schedule == "shift" and not self.shift > 0:
      errs.append(f"shift={self.shift} must be > 0")
    if self.temperature < 0 or self.cfg_scale < 0:
      errs.append("temperature and cfg_scale must be >= 0")
    if self.mask_id in self.banned_ids or self.mask_id == self.eot_id:
      errs.append("mask_id must be neither banned nor the eot id")
    if self.stop_rule not in STOP_RULES:
      errs.append(f"stop_rule={self.stop_rule!r} must be one of {STOP_RULES}")
    if errs:
      raise ValueError("invalid sampler settings:\n  " + "\n  ".join(errs))
    return self

  def engine(self, vocab_chunk: Optional[int] = None, forward_rows: Optional[int] = None,
             max_transfer_ratio: Optional[float] = None) -> "EngineConfig":
    """The static part. `max_transfer_ratio` (dllm): the largest transfer_ratio the engine's rows may
    ask for (default: this request's); rows asking less leave some recompute slots unused."""
    ratio = 0.0 if self.cache != "dllm" else self.transfer_ratio if max_transfer_ratio is None else max_transfer_ratio
    return EngineConfig(mask_id=self.mask_id, banned_ids=tuple(self.banned_ids), block_length=self.block_length,
                        cache=self.cache, cfg=self.cfg_scale > 0, vocab_chunk=vocab_chunk, forward_rows=forward_rows,
                        max_transfer_ratio=ratio)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
  """What a compiled engine fixes (a jit static argument): the model's token ids, the block length,
  the cache mode and whether the unconditional CFG pass runs. `vocab_chunk`: vocabulary columns per
  step of the chunked LM head (None: the largest divisor of the vocabulary up to 8192).
  `forward_rows`: the forward passes run on groups of this many rows in turn (None: all at once;
  fewer temporaries, for large batches on one device; it must divide the rows of a pass).
  `max_transfer_ratio` (cache "dllm"): the static number of response positions a cached step
  recomputes is floor(max_transfer_ratio * response bucket); a row's own transfer_ratio (a value, at
  most this) picks how many of those slots it uses. `head_rungs`: the LM head's decision runs only
  on the positions that can still be committed, gathered into the smallest of this many static
  lengths (the block, then halves: `decode.ladder`) that holds them; 1: the whole block always."""
  mask_id: int
  banned_ids: tuple = ()
  block_length: int = 32
  cache: Optional[str] = None
  cfg: bool = False
  vocab_chunk: Optional[int] = None
  forward_rows: Optional[int] = None
  max_transfer_ratio: float = 0.0
  head_rungs: int = 2  # 3 did 0.69 of the block's head work instead of 0.75, for a third more decision to compile

  def __post_init__(self):
    if self.cache not in CACHES:
      raise ValueError(f"cache={self.cache!r} must be one of {CACHES}")
    if not 0.0 <= self.max_transfer_ratio <= 1.0:
      raise ValueError(f"max_transfer_ratio={self.max_transfer_ratio} must be in [0, 1]")
    if self.head_rungs < 1:
      raise ValueError(f"head_rungs={self.head_rungs} must be >= 1")


@struct.dataclass
class RowSettings:
  """Per-row settings, as values ([B] arrays in the engine, scalars in a request)."""
  answer_len: jax.Array  # int32: answer positions of this row (a multiple of block_length, <= the bucket)
  steps_per_block: jax.Array  # int32
  table: jax.Array  # int32 [block_length + 1, block_length]: step counts by the masked count at block start
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


def row_settings(st: SamplerSettings, answer_bucket: int, block_length: int) -> RowSettings:
  """Host NumPy values of one request for an engine of `block_length` and `answer_bucket` positions."""
  st.validate()
  if st.block_length != block_length:
    raise ValueError(f"block_length={st.block_length} but the engine runs blocks of {block_length}")
  if st.gen_length > answer_bucket:
    raise ValueError(f"gen_length={st.gen_length} is longer than the engine's answer bucket {answer_bucket}")
  bl, spb = block_length, st.steps_per_block
  table = np.zeros((bl + 1, bl), np.int32)  # steps past block_length commit nothing (the block is full by then)
  t = count_table(bl, spb, st.schedule, float(st.shift))
  table[:, :min(spb, bl)] = t[:, :bl]
  mode = "threshold" if st.threshold is not None else "factor" if st.factor is not None else "steps"
  value = st.threshold if st.threshold is not None else st.factor if st.factor is not None else 0.0
  return RowSettings(answer_len=np.int32(st.gen_length), steps_per_block=np.int32(spb), table=table,
                     temperature=np.float32(st.temperature), cfg_scale=np.float32(st.cfg_scale),
                     random_remask=np.bool_(st.remasking == "random"), mode=np.int32(MODES[mode]),
                     value=np.float32(value), refresh=np.int32(st.refresh_interval),
                     prompt_interval=np.int32(st.prompt_interval), gen_interval=np.int32(st.gen_interval),
                     transfer_ratio=np.float32(st.transfer_ratio),
                     original_stops=np.bool_(st.stop_rule == "original"))
