"""What a server fixes at launch (the command line's flags, `python -m lladav_jax.serve --help`), and the
engine lanes that follow from its limits."""
from __future__ import annotations

import dataclasses
from typing import Optional


def _ladder(first: int, last: int, factor: int) -> tuple[int, ...]:
  """first, factor first, factor^2 first, ... below `last`, then `last`."""
  out, n = [], first
  while n < last:
    out.append(n)
    n *= factor
  return tuple(out) + (last,)


@dataclasses.dataclass(frozen=True)
class ServeConfig:
  served_model_name: str
  api_key: Optional[str] = None
  image_root: Optional[str] = None
  max_num_seqs: int = 8  # answers running at once (each lane has this many rows)
  max_queue: int = 64  # answers waiting for a row; beyond: 429
  max_image_bytes: int = 20 << 20
  max_body_bytes: int = 64 << 20  # a request with its data: URLs (beyond: 413)
  max_image_pixels: int = 89478485  # PIL's decompression-bomb limit, as the training data's default
  retry_after_s: int = 1
  cache: Optional[str] = None  # the engine's cache mode: None, "prefix" or "dual" (a request may not pick another)
  enable_cfg: bool = False  # the engine runs the unconditional pass: requests may set cfg_scale > 0
  # The limits a request must fit (beyond one: 400 naming its flag) and the lanes they make.
  max_model_len: int = 4096  # prompt positions (image features included) + max_tokens
  max_answer_tokens: int = 512  # max_tokens
  max_tiles: int = 10  # image tiles of one request's prompt
  max_block_length: int = 32  # the dual cache's window: the longest block_length (other caches: any)
  prompt_buckets: tuple = ()  # the lanes' prompt positions (default: 64, 128, 256, ... then max_model_len)
  answer_buckets: tuple = ()  # the lanes' answer positions (default: 32, 128, 512, ... then max_answer_tokens)
  row_group: int = 1  # rows a forward pass runs at a time (a group without a running row is skipped)
  mm_cache_bytes: int = 4 << 30  # the vision tower's features by tile, kept for reuse

  def __post_init__(self):
    for name in ("max_num_seqs", "max_queue", "max_model_len", "max_answer_tokens", "max_block_length",
                 "row_group"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
    if self.max_tiles < 0 or self.mm_cache_bytes < 0:
      raise ValueError("max_tiles and mm_cache_bytes must be >= 0")
    if self.max_num_seqs % self.row_group:
      raise ValueError(f"row_group={self.row_group} must divide max_num_seqs={self.max_num_seqs}")

  @property
  def prompt_lanes(self) -> tuple[int, ...]:
    got = tuple(sorted(set(self.prompt_buckets))) or _ladder(64, self.max_model_len, 2)
    return tuple(p for p in got if p < self.max_model_len) + (self.max_model_len,)

  @property
  def answer_lanes(self) -> tuple[int, ...]:
    got = tuple(sorted(set(self.answer_buckets))) or _ladder(32, self.max_answer_tokens, 4)
    return tuple(g for g in got if g < self.max_answer_tokens) + (self.max_answer_tokens,)
