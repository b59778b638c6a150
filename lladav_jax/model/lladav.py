"""LLaDA-V: SigLIP features -> mlp2x_gelu projector -> spliced into LLaDA's token embeddings.

The splice is static-shape. For every sequence position the host supplies up to `TAPS` feature
indices and weights (a "merge plan", see lladav_jax/multimodal.py) into a per-sample table
    [tile 0 tokens | tile 1 tokens | ... | image_newline | zero]
so one gather + weighted sum covers the base image, anyres unpadding, the bilinear downscale,
row newlines, the multi-image path and pooled video frames.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lladav_jax import sharding as shd
from lladav_jax.config import IMAGE_TOKEN_INDEX, ModelConfig
from lladav_jax.model import attention as attn
from lladav_jax.model import common
from lladav_jax.model.llm import KVCache, LLaDA
from lladav_jax.model.vision import SigLIPVision, normalize_pixels


class Projector(nnx.Module):
  """mlp2x_gelu: Linear(vision -> llm) -> GELU (exact erf) -> Linear(llm -> llm), with biases."""

  def __init__(self, d_in: int, d_out: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    # The original builds it from nn.Linear after loading the LLM, so PyTorch's default init
    # applies: weight and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)). (A normal(0.02) init makes
    # the image tokens ~4x smaller than the text embeddings of config.small: slow to be used.)
    def uniform(fan_in):
      bound = fan_in ** -0.5
      return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)
    self.fc1 = common.param(rngs, uniform(d_in), (d_in, d_out), ("vit_embed", "embed"), param_dtype)
    self.fc1_bias = common.param(rngs, uniform(d_in), (d_out,), ("replicated",), param_dtype)
    self.fc2 = common.param(rngs, uniform(d_out), (d_out, d_out), ("mlp", "embed"), param_dtype)
    self.fc2_bias = common.param(rngs, uniform(d_out), (d_out,), ("replicated",), param_dtype)
    self.dtype = dtype

  def __call__(self, x):
    dt = self.dtype
    x = common.dense(x.astype(dt), self.fc1[...].astype(dt)) + self.fc1_bias[...].astype(dt)
    x = jax.nn.gelu(x, approximate=False)
    return common.dense(x, self.fc2[...].astype(dt)) + self.fc2_bias[...].astype(dt)


class LLaDAVModel(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    attention = attn.AttentionConfig.from_config(cfg)
    self.vision = SigLIPVision(cfg.vision, dtype=dtype, param_dtype=pdtype, attention=attention,
                               scan_layers=cfg.scan_layers, remat_policy=cfg.remat_policy, rngs=rngs)
    self.projector = Projector(cfg.vision.hidden_size, cfg.llm.hidden_size, dtype=dtype, param_dtype=pdtype,
                               rngs=rngs)
    self.image_newline = common.param(rngs, jax.nn.initializers.normal(cfg.llm.hidden_size ** -0.5),
                                      (cfg.llm.hidden_size,), ("replicated",), pdtype)
    self.llm = LLaDA(cfg.llm, dtype=dtype, param_dtype=pdtype, attention=attention,
                     scan_layers=cfg.scan_layers, remat_policy=cfg.remat_policy, lora=cfg.lora,
                     rngs=rngs)

  def encode_tiles(self, pixels_NHWC):
    """Projected features of uint8 tiles: [N, P, D] (P features a tile)."""
    if pixels_NHWC.dtype != jnp.uint8:
      raise TypeError(f"pixels must be uint8 RGB tiles (normalised on device), got {pixels_NHWC.dtype}")
    return self.projector(self.vision(normalize_pixels(pixels_NHWC, self.cfg.vision)))

  def image_table(self, pixels_BTHWC):
    """Projected features of every uint8 tile plus the newline and a zero row: [B, T*P + 2, D]."""
    b, t = pixels_BTHWC.shape[:2]
    feats = self.encode_tiles(pixels_BTHWC.reshape((b * t,) + pixels_BTHWC.shape[2:]))
    return self.feature_table(shd.constrain(feats.reshape(b, -1, feats.shape[-1]), shd.BLD))

  def feature_table(self, feats_BFD):
    """[B, F, D] tile features -> the merge plan's table [B, F + 2, D]: the features, the newline, a zero row."""
    b, dt = feats_BFD.shape[0], feats_BFD.dtype
    tail = jnp.stack([self.image_newline[...].astype(dt), jnp.zeros_like(self.image_newline[...], dt)])
    return jnp.concatenate([feats_BFD, jnp.broadcast_to(tail, (b,) + tail.shape)], axis=1)

  def embed(self, tokens_BL, pixels_BTHWC=None, merge_idx_BLK=None, merge_w_BLK=None):
    """Token embeddings with image features spliced in where tokens == IMAGE_TOKEN_INDEX."""
    if pixels_BTHWC is None or pixels_BTHWC.shape[1] == 0:
      return self.embed_table(tokens_BL)
    return self.embed_table(tokens_BL, self.image_table(pixels_BTHWC), merge_idx_BLK, merge_w_BLK)

  def embed_table(self, tokens_BL, table_BFD=None, merge_idx_BLK=None, merge_w_BLK=None):
    """`embed` from an image table already made (`image_table` / `feature_table`)."""
    is_image = tokens_BL == IMAGE_TOKEN_INDEX
    text = self.llm.embed_tokens(jnp.where(is_image, 0, tokens_BL))
    if table_BFD is None:
      return text
    b, l, k = merge_idx_BLK.shape
    gathered = jnp.take_along_axis(table_BFD, merge_idx_BLK.reshape(b, l * k, 1), axis=1).reshape(b, l, k, -1)
    image = jnp.einsum("BLKD,BLK->BLD", gathered, merge_w_BLK.astype(gathered.dtype))
    return shd.constrain(jnp.where(is_image[..., None], image.astype(text.dtype), text), shd.BLD)

  def __call__(self, tokens_BL, positions_BL, segments_BL=None, pixels_BTHWC=None, merge_idx_BLK=None,
               merge_w_BLK=None):
    """Full forward to float32 logits [B, L, V]; `segments_BL`: segment ids (0 = padding), None = one."""
    x = self.embed(tokens_BL, pixels_BTHWC, merge_idx_BLK, merge_w_BLK)
    return self.llm.logits(self.llm(x, positions_BL, segments_BL))


__all__ = ["LLaDAVModel", "Projector", "KVCache"]
