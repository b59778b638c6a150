"""What the inference code reads from a model: `InferenceModel` (the public `LLaDAV` is one)."""
from __future__ import annotations

from typing import Any, Optional, Protocol

from lladav_jax.config import ModelConfig
from lladav_jax.data.tokenizer import Tokenizer
from lladav_jax.multimodal import ImageConfig


class InferenceModel(Protocol):
  cfg: ModelConfig  # mask_token_id, max_position_embeddings
  graphdef: Any  # nnx.GraphDef of LLaDAVModel (a jit static argument)
  state: Any  # its parameters (nnx.State), on `mesh`
  mesh: Any  # jax.sharding.Mesh the engine's rows are sharded over
  tokenizer: Optional[Tokenizer]  # None: token-level generation only
  image_cfg: ImageConfig  # how images become tiles and merge plans
