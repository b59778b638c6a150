"""`SamplingParams`: everything one request sets, each with its one default and one `validate()`; it makes
the engine's static part (`engine_config`) and the row's values (`row_params`). The offline API, the
eval CLI, the lmms-eval plugin, the `generate` CLI and the server all build one of these."""
from __future__ import annotations

import dataclasses
import warnings
from typing import Optional

import numpy as np

from lladav_jax.inference.engine.config import CACHES, MODES, STOP_RULES, EngineConfig, RowParams
from lladav_jax.inference.engine.schedule import count_table

DEFAULT_LENGTH = 128  # answer positions when a request names none (also its block length and step count)


class ParamsError(ValueError):
  """Invalid sampling parameters; `field` names the first offending one (the server maps it to its own name)."""

  def __init__(self, problems: list[tuple[str, str]]):
    self.problems = problems
    self.field = problems[0][0]
    super().__init__("invalid sampling parameters:\n  " + "\n  ".join(m for _, m in problems))


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """One request's sampling settings.

  `block_length` and `steps` default to `gen_length` (one block, a token a step). The token ids
  (`mask_id`, `banned_ids`, `eot_id`) come from the model (`for_model`); set them only for a model
  without a tokenizer. `stop_rule`: "earliest" (default) stops at the earliest occurrence of any stop
  sequence; "original" reproduces the original generate's multi-stop quirk: sequences are searched in
  order and the first one found anywhere sets the stop; once a stop is set only the first sequence is
  searched again. Under "earliest" the answer's text is also cut at the earliest stop string, as OpenAI's
  stops (`text.finished_text`: never a stop string in the text, however it is tokenised); under "original"
  stops are token ids only, as the original's (`text_stops`)."""
  gen_length: int = DEFAULT_LENGTH
  block_length: Optional[int] = None  # None: gen_length
  steps: Optional[int] = None  # None: gen_length
  temperature: float = 0.0
  remasking: str = "low_confidence"  # | "random"
  cfg_scale: float = 0.0
  threshold: Optional[float] = None  # Fast-dLLM: commit every position with confidence >= threshold
  factor: Optional[float] = None  # Fast-dLLM's factor rule (LLaDA-V's hook uses 1)
  cache: Optional[str] = None  # None | "prefix" | "dual" | "dllm"
  refresh_interval: int = 32  # prefix / dual: a full forward every this many steps of a block
  prompt_interval: int = 25  # dllm: prompt features refreshed when (step - 1) % this == 0 (the LLaDA-V demo's Kp)
  gen_interval: int = 7  # dllm: response features refreshed when (step - 1) % this == 0 (Kr)
  transfer_ratio: float = 0.25  # dllm: the fraction of response positions recomputed at other steps (rho)
  schedule: str = "uniform"  # | "shift"
  shift: float = 1 / 3
  stop_rule: str = "earliest"  # | "original"
  stop: tuple = ()  # stop strings, searched in order; "<|eot_id|>" always stops after them (text.stop_list)
  suffix: Optional[str] = None  # fixed text after the answer positions (never overwritten, appended to the answer)
  seed: int = 0  # prompt i of a call draws from seed + i
  skip_special_tokens: bool = True  # in the answer's text
  mask_id: Optional[int] = None
  banned_ids: Optional[tuple] = None  # set to -inf at masked positions (the original: eos, bos, start/end header)
  eot_id: Optional[int] = None  # a stop sequence, appended to the stop list when it is not in it

  def __post_init__(self):
    if self.block_length is None:
      object.__setattr__(self, "block_length", self.gen_length)
    if self.steps is None:
      object.__setattr__(self, "steps", self.gen_length)
    if isinstance(self.stop, str):
      object.__setattr__(self, "stop", (self.stop,))
    object.__setattr__(self, "stop", tuple(self.stop or ()))
    if self.banned_ids is not None:
      object.__setattr__(self, "banned_ids", tuple(int(i) for i in self.banned_ids))

  @property
  def text_stops(self) -> tuple:
    """The stop strings that cut the answer's text: all of them, none under stop_rule="original"."""
    return () if self.stop_rule == "original" else self.stop

  @property
  def num_blocks(self) -> int:
    return self.gen_length // self.block_length

  @property
  def steps_per_block(self) -> int:
    return self.steps // self.num_blocks

  @property
  def parallel(self) -> bool:
    return self.threshold is not None or self.factor is not None

  def for_model(self, model) -> "SamplingParams":
    """These parameters with the token ids of `model` (an `InferenceModel`): the mask id from its config,
    the banned ids (eos, bos, start/end header) and eot from its tokenizer; ids set here win."""
    tok = model.tokenizer
    ids = {"mask_id": model.cfg.mask_token_id}
    if tok is not None:
      ids["banned_ids"] = (tok.eos_id, tok.bos_id, tok.start_header_id, tok.end_header_id)
      ids["eot_id"] = tok.eot_id
      if tok.mask_id != model.cfg.mask_token_id:
        warnings.warn(f"tokenizer mask id {tok.mask_id} != model mask_token_id {model.cfg.mask_token_id}; "
                      "the sampler uses the model's")
    ids.update({k: getattr(self, k) for k in ("mask_id", "banned_ids", "eot_id") if getattr(self, k) is not None})
    return dataclasses.replace(self, **ids).validate()

  def problems(self) -> list[tuple[str, str]]:
    """(field, message) for every invalid setting."""
    errs = []
    if self.gen_length <= 0 or self.block_length <= 0 or self.gen_length % self.block_length:
      errs.append(("block_length", f"gen_length={self.gen_length} must be a positive multiple of "
                                   f"block_length={self.block_length}"))
    elif self.steps <= 0 or self.steps % self.num_blocks:
      errs.append(("steps", f"steps={self.steps} must be a positive multiple of the number of blocks "
                            f"{self.num_blocks}"))
    if self.remasking not in ("low_confidence", "random"):
      errs.append(("remasking", f"remasking={self.remasking!r} must be 'low_confidence' or 'random'"))
    if self.threshold is not None and self.factor is not None:
      errs.append(("threshold", "give threshold or factor, not both"))
    if self.cache not in CACHES:
      errs.append(("cache", f"cache={self.cache!r} must be one of {CACHES}"))
    if self.refresh_interval < 1:
      errs.append(("refresh_interval", f"refresh_interval={self.refresh_interval} must be >= 1"))
    if self.prompt_interval < 1 or self.gen_interval < 1:
      errs.append(("prompt_interval", f"prompt_interval={self.prompt_interval} and gen_interval="
                                      f"{self.gen_interval} must be >= 1"))
    if not 0.0 <= self.transfer_ratio <= 1.0:
      errs.append(("transfer_ratio", f"transfer_ratio={self.transfer_ratio} must be in [0, 1]"))
    if self.schedule not in ("uniform", "shift"):
      errs.append(("schedule", f"schedule={self.schedule!r} must be 'uniform' or 'shift'"))
    if self.schedule == "shift" and not self.shift > 0:
      errs.append(("shift", f"shift={self.shift} must be > 0"))
    if self.temperature < 0 or self.cfg_scale < 0:
      errs.append(("temperature" if self.temperature < 0 else "cfg_scale",
                   "temperature and cfg_scale must be >= 0"))
    if self.mask_id is not None and (self.mask_id in (self.banned_ids or ()) or self.mask_id == self.eot_id):
      errs.append(("mask_id", "mask_id must be neither banned nor the eot id"))
    if any(not s for s in self.stop):
      errs.append(("stop", "a stop string is empty"))
    if self.stop_rule not in STOP_RULES:
      errs.append(("stop_rule", f"stop_rule={self.stop_rule!r} must be one of {STOP_RULES}"))
    return errs

  def validate(self) -> "SamplingParams":
    errs = self.problems()
    if errs:
      raise ParamsError(errs)
    return self

  def engine_config(self, vocab_chunk: Optional[int] = None, forward_rows: Optional[int] = None,
                    max_transfer_ratio: Optional[float] = None, max_block_length: Optional[int] = None,
                    head_rungs: int = 2, guidance: Optional[bool] = None) -> EngineConfig:
    """The static part. `max_transfer_ratio` (dllm): the largest transfer_ratio the engine's rows may
    ask for (default: this request's); rows asking less leave some recompute slots unused. The same for
    `max_block_length` (default: this request's block length). `guidance`: whether the engine runs the
    unconditional pass (default: this request's cfg_scale > 0; a row of cfg_scale 0 in such an engine
    takes the conditional logits, its tokens the same)."""
    if self.mask_id is None:
      raise ValueError("mask_id is not set: SamplingParams.for_model(model) sets the model's token ids")
    ratio = 0.0 if self.cache != "dllm" else self.transfer_ratio if max_transfer_ratio is None else max_transfer_ratio
    return EngineConfig(mask_id=self.mask_id, banned_ids=tuple(self.banned_ids or ()),
                        max_block_length=max_block_length or self.block_length, cache=self.cache,
                        guidance=self.cfg_scale > 0 if guidance is None else guidance, vocab_chunk=vocab_chunk, forward_rows=forward_rows,
                        max_transfer_ratio=ratio, head_rungs=head_rungs)

  def row_params(self, answer_bucket: int, max_block_length: int) -> RowParams:
    """Host NumPy values of this request for an engine of `answer_bucket` answer positions whose blocks are
    at most `max_block_length` long."""
    self.validate()
    if self.block_length > max_block_length:
      raise ValueError(f"block_length={self.block_length} is longer than the engine's max_block_length="
                       f"{max_block_length}")
    if self.gen_length > answer_bucket:
      raise ValueError(f"gen_length={self.gen_length} is longer than the engine's answer bucket {answer_bucket}")
    bl, spb, mbl = self.block_length, self.steps_per_block, max_block_length
    table = np.zeros((mbl + 1, mbl), np.int32)  # steps past block_length commit nothing (the block is full by then)
    t = count_table(bl, spb, self.schedule, float(self.shift))
    table[:bl + 1, :min(spb, bl)] = t[:, :bl]
    mode = "threshold" if self.threshold is not None else "factor" if self.factor is not None else "steps"
    value = self.threshold if self.threshold is not None else self.factor if self.factor is not None else 0.0
    return RowParams(answer_len=np.int32(self.gen_length), block_length=np.int32(bl), steps_per_block=np.int32(spb),
                     table=table,
                     temperature=np.float32(self.temperature), cfg_scale=np.float32(self.cfg_scale),
                     random_remask=np.bool_(self.remasking == "random"), mode=np.int32(MODES[mode]),
                     value=np.float32(value), refresh=np.int32(self.refresh_interval),
                     prompt_interval=np.int32(self.prompt_interval), gen_interval=np.int32(self.gen_interval),
                     transfer_ratio=np.float32(self.transfer_ratio),
                     original_stops=np.bool_(self.stop_rule == "original"))
