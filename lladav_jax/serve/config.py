"""What a server fixes at launch (the command line's flags, `python -m lladav_jax.serve --help`)."""
from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class ServeConfig:
  served_model_name: str
  api_key: Optional[str] = None
  image_root: Optional[str] = None
  max_num_seqs: int = 8  # engine rows (running answers in all)
  max_queue: int = 64  # answers waiting for a row; beyond: 429
  max_image_bytes: int = 20 << 20
  max_body_bytes: int = 64 << 20  # a request with its data: URLs (beyond: 413)
  max_image_pixels: int = 89478485  # PIL's decompression-bomb limit, as the training data's default
  retry_after_s: int = 1
  cache: Optional[str] = None  # the engines' cache mode: None, "prefix" or "dual" (a request may not pick another)
  enable_cfg: bool = False  # engines run the unconditional pass: requests may set cfg_scale > 0
  min_answer_bucket: int = 16  # answers run in power-of-two buckets from this many positions
