"""SigLIP vision tower (siglip2-so400m-patch14-384 as LLaDA-V loads it).

Returns the hidden states after `cfg.num_layers` encoder layers, before any post-layernorm: the
reference deletes the last of the 27 layers and reads `hidden_states[-1]`. No CLS token, no head.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from lladav_jax import sharding as shd
from lladav_jax.config import VisionConfig
from lladav_jax.model import attention as attn
from lladav_jax.model import common

init_normal = jax.nn.initializers.normal(0.02)
zeros, ones = jax.nn.initializers.zeros, jax.nn.initializers.ones


class VisionBlock(nnx.Module):
  def __init__(self, cfg: VisionConfig, dtype, param_dtype, *, attention: attn.AttentionConfig = attn.AttentionConfig(),
               rngs: nnx.Rngs):
    d, n, f = cfg.hidden_size, cfg.num_heads, cfg.intermediate_size
    h = d // n
    p = lambda init, shape, axes: common.param(rngs, init, shape, axes, param_dtype)
    self.ln1_scale, self.ln1_bias = p(ones, (d,), ("replicated",)), p(zeros, (d,), ("replicated",))
    self.q_proj, self.q_bias = p(init_normal, (d, n, h), ("vit_embed", "vit_heads", None)), p(zeros, (n, h), ("vit_heads", None))
    self.k_proj, self.k_bias = p(init_normal, (d, n, h), ("vit_embed", "vit_heads", None)), p(zeros, (n, h), ("vit_heads", None))
    self.v_proj, self.v_bias = p(init_normal, (d, n, h), ("vit_embed", "vit_heads", None)), p(zeros, (n, h), ("vit_heads", None))
    self.o_proj, self.o_bias = p(init_normal, (n, h, d), ("vit_heads", None, "vit_embed")), p(zeros, (d,), ("replicated",))
    self.ln2_scale, self.ln2_bias = p(ones, (d,), ("replicated",)), p(zeros, (d,), ("replicated",))
    self.fc1, self.fc1_bias = p(init_normal, (d, f), ("vit_embed", "vit_mlp")), p(zeros, (f,), ("vit_mlp",))
    self.fc2, self.fc2_bias = p(init_normal, (f, d), ("vit_mlp", "vit_embed")), p(zeros, (d,), ("replicated",))
    self.eps = cfg.layer_norm_eps
    self.dtype = dtype
    self.attention = attention

  def __call__(self, x_BPD):
    # B here counts tiles (samples x tiles, batch-major): sharded as the batch.
    x_BPD = shd.constrain(x_BPD, shd.BLD)
    dt = self.dtype
    w = lambda v: v[...].astype(dt)
    y = common.layer_norm(x_BPD, self.ln1_scale[...], self.ln1_bias[...], self.eps)
    q, k, v = (shd.constrain(common.dense(y, w(p)) + w(b), shd.BLNH)
               for p, b in ((self.q_proj, self.q_bias), (self.k_proj, self.k_bias), (self.v_proj, self.v_bias)))
    one = jnp.ones(x_BPD.shape[:2], jnp.int32)  # a tile attends all its own patches
    ctx = self.attention(q, k, v, one, one)
    ctx = checkpoint_name(ctx, "context")
    x_BPD = x_BPD + common.dense(ctx, w(self.o_proj), 2) + w(self.o_bias)
    y = common.layer_norm(x_BPD, self.ln2_scale[...], self.ln2_bias[...], self.eps)
    y = shd.constrain(jax.nn.gelu(common.dense(y, w(self.fc1)) + w(self.fc1_bias), approximate=True),
                      shd.BLF)
    y = common.dense(y, w(self.fc2)) + w(self.fc2_bias)
    return x_BPD + checkpoint_name(y, "mlp_out")


def normalize_pixels(pixels, cfg: VisionConfig):
  """uint8 RGB tiles -> the tower's float32 input, (x * (1/255) - mean) / std as the image processor computes
  it. Host batches stay uint8 (a quarter of the bytes); the 256 values per channel are computed here in NumPy
  and looked up, so the result is exact on every backend (a fused multiply-add would round differently)."""
  v = np.arange(256, dtype=np.float32)[:, None] * np.float32(1 / 255)
  table = (v - np.asarray(cfg.pixel_mean, np.float32)) / np.asarray(cfg.pixel_std, np.float32)  # [256, 3]
  return jnp.asarray(table)[pixels.astype(jnp.int32), jnp.arange(3)]


class SigLIPVision(nnx.Module):
  def __init__(self, cfg: VisionConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               attention: attn.AttentionConfig = attn.AttentionConfig(),
               scan_layers: bool = True, remat_policy: str = "none", rngs: nnx.Rngs):
    self.cfg = cfg
    self.dtype = dtype
    self.scan_layers = scan_layers
    self.remat_policy = remat_policy
    pdim = cfg.patch_size * cfg.patch_size * 3
    # Conv2d(3, D, patch, stride=patch) as a matmul over (py, px, c)-flattened patches.
    self.patch_kernel = common.param(rngs, init_normal, (pdim, cfg.hidden_size), (None, "vit_embed"), param_dtype)
    self.patch_bias = common.param(rngs, zeros, (cfg.hidden_size,), ("replicated",), param_dtype)
    self.pos_embed = common.param(rngs, init_normal, (cfg.tokens_per_tile, cfg.hidden_size), (None, "vit_embed"),
                                  param_dtype)
    self.layers = common.stacked(lambda r: VisionBlock(cfg, dtype, param_dtype, attention=attention, rngs=r),
                                 cfg.num_layers, rngs)

  def __call__(self, pixels_NHWC):
    """[N, S, S, 3] normalised pixels -> [N, (S // p)^2, hidden] features.

    The original's Conv2d(kernel p, stride p, padding "valid") never reads the last S % p pixel rows
    and columns (384 px / 14 px: 27 patches a side, 6 px unused), so they are cropped here."""
    n, s, _, c = pixels_NHWC.shape
    p, g = self.cfg.patch_size, s // self.cfg.patch_size
    x = pixels_NHWC[:, :g * p, :g * p].astype(self.dtype)
    x = x.reshape(n, g, p, g, p, c).transpose(0, 1, 3, 2, 4, 5)
    x = shd.constrain(x.reshape(n, g * g, p * p * c), shd.BLD)
    x = common.dense(x, self.patch_kernel[...].astype(self.dtype)) + self.patch_bias[...].astype(self.dtype)
    x = x + self.pos_embed[...].astype(self.dtype)
    x, _ = common.run_stacked(self.layers, lambda blk, h, _: (blk(h), None), x, None,
                              scan=self.scan_layers, remat_policy=self.remat_policy)
    return x
