"""The LLaDA language model: a LLaMA-shaped transformer with fully bidirectional attention.

Pre-norm blocks (RMSNorm in float32), RoPE in the rotate-half layout, SwiGLU MLP, no biases,
untied LM head; multi-head or grouped-query attention with segment ids through `model.attention`.
Layers are stacked on a leading axis and run by `common.run_stacked` (scan or unrolled).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jax.ad_checkpoint import checkpoint_name

from lladav_jax import sharding as shd
from lladav_jax.config import LLMConfig
from lladav_jax.model import attention as attn
from lladav_jax.model import common


@struct.dataclass
class KVCache:
  """Rotated keys and values of earlier positions, per layer: [layers, B, S, K, H]."""
  k: jax.Array
  v: jax.Array


def rope(x_BLNH, positions_BL, theta: float):
  """Rotary embedding, NeoX/rotate-half layout, inverse frequencies in float32."""
  head_dim = x_BLNH.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  freqs = positions_BL.astype(jnp.float32)[..., None] * inv_freq  # [B, L, H/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(emb).astype(x_BLNH.dtype), jnp.sin(emb).astype(x_BLNH.dtype)
  x1, x2 = jnp.split(x_BLNH, 2, axis=-1)
  return x_BLNH * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


class Attention(nnx.Module):
  def __init__(self, cfg: LLMConfig, attention: attn.Settings, dtype, param_dtype, *, rngs: nnx.Rngs):
    d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    init_normal = jax.nn.initializers.normal(cfg.initializer_range)
    self.q_proj = common.param(rngs, init_normal, (d, n, h), ("embed", "heads", "head_dim"), param_dtype)
    self.k_proj = common.param(rngs, init_normal, (d, k, h), ("embed", "kv_heads", "head_dim"), param_dtype)
    self.v_proj = common.param(rngs, init_normal, (d, k, h), ("embed", "kv_heads", "head_dim"), param_dtype)
    self.o_proj = common.param(rngs, init_normal, (n, h, d), ("heads", "head_dim", "embed"), param_dtype)
    self.theta = cfg.rope_theta
    self.attention = attention
    self.dtype = dtype

  def __call__(self, x_BLD, positions_BL, q_segments_BL, kv_segments_BS, cache_kv=None):
    """Segment ids (int, 0 = padding; see model/attention.py): `q_segments_BL` of these positions,
    `kv_segments_BS` of the keys, the cached ones first. `cache_kv`: optional (k, v) of earlier positions
    [B, S0, K, H], already rotated; the new keys follow them. Returns the output and this call's rotated
    (k, v) for caching."""
    dt = self.dtype
    q = jnp.einsum("BLD,DNH->BLNH", x_BLD, self.q_proj[...].astype(dt))
    k = jnp.einsum("BLD,DKH->BLKH", x_BLD, self.k_proj[...].astype(dt))
    v = jnp.einsum("BLD,DKH->BLKH", x_BLD, self.v_proj[...].astype(dt))
    q = shd.constrain(q, shd.BLNH)
    k, v = shd.constrain(k, shd.BLKH), shd.constrain(v, shd.BLKH)
    q, k, v = (checkpoint_name(t, "qkv") for t in (q, k, v))
    q, k = rope(q, positions_BL, self.theta), rope(k, positions_BL, self.theta)
    new_kv = (k, v)
    cached = None
    if cache_kv is not None:
      s0 = cache_kv[0].shape[1]
      cached = (cache_kv[0], cache_kv[1], kv_segments_BS[:, :s0])
      kv_segments_BS = kv_segments_BS[:, s0:]
    ctx = self.attention(q, k, v, q_segments_BL, kv_segments_BS, cached)
    ctx = checkpoint_name(ctx, "context")
    out = shd.constrain(jnp.einsum("BLNH,NHD->BLD", ctx, self.o_proj[...].astype(dt)), shd.BLD)
    return checkpoint_name(out, "attn_out"), new_kv


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x)); LLaDA's ff_proj is the gate (SiLU) branch."""

  def __init__(self, cfg: LLMConfig, dtype, param_dtype, *, rngs: nnx.Rngs):
    d, f = cfg.hidden_size, cfg.intermediate_size
    init_normal = jax.nn.initializers.normal(cfg.initializer_range)
    self.gate_proj = common.param(rngs, init_normal, (d, f), ("embed", "mlp"), param_dtype)
    self.up_proj = common.param(rngs, init_normal, (d, f), ("embed", "mlp"), param_dtype)
    self.down_proj = common.param(rngs, init_normal, (f, d), ("mlp", "embed"), param_dtype)
    self.dtype = dtype

  def __call__(self, x_BLD):
    dt = self.dtype
    gate = shd.constrain(jnp.einsum("BLD,DF->BLF", x_BLD, self.gate_proj[...].astype(dt)), shd.BLF)
    up = shd.constrain(jnp.einsum("BLD,DF->BLF", x_BLD, self.up_proj[...].astype(dt)), shd.BLF)
    gate, up = checkpoint_name(gate, "mlp_wi"), checkpoint_name(up, "mlp_wi")
    out = jnp.einsum("BLF,FD->BLD", jax.nn.silu(gate) * up, self.down_proj[...].astype(dt))
    return checkpoint_name(shd.constrain(out, shd.BLD), "mlp_out")


class Block(nnx.Module):
  def __init__(self, cfg: LLMConfig, attention: attn.Settings, dtype, param_dtype, *, rngs: nnx.Rngs):
    ones = jax.nn.initializers.ones
    self.attn_norm = common.param(rngs, ones, (cfg.hidden_size,), ("replicated",), param_dtype)
    self.attn = Attention(cfg, attention, dtype, param_dtype, rngs=rngs)
    self.mlp_norm = common.param(rngs, ones, (cfg.hidden_size,), ("replicated",), param_dtype)
    self.mlp = MLP(cfg, dtype, param_dtype, rngs=rngs)
    self.eps = cfg.rms_norm_eps

  def __call__(self, x, positions, q_segments, kv_segments, cache_kv=None):
    x = shd.constrain(x, shd.BLD)
    h, kv = self.attn(common.rms_norm(x, self.attn_norm[...], self.eps), positions, q_segments, kv_segments,
                      cache_kv)
    x = x + h
    x = x + self.mlp(common.rms_norm(x, self.mlp_norm[...], self.eps))
    return x, kv


class LLaDA(nnx.Module):
  def __init__(self, cfg: LLMConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               attention: attn.Settings = attn.Settings(), scan_layers: bool = True, remat_policy: str = "none",
               rngs: nnx.Rngs):
    self.cfg = cfg
    self.dtype = dtype
    self.scan_layers = scan_layers
    self.remat_policy = remat_policy
    init_normal = jax.nn.initializers.normal(cfg.initializer_range)
    self.embed = common.param(rngs, init_normal, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"),
                              param_dtype)
    self.layers = common.stacked(lambda r: Block(cfg, attention, dtype, param_dtype, rngs=r),
                                 cfg.num_layers, rngs)
    self.final_norm = common.param(rngs, jax.nn.initializers.ones, (cfg.hidden_size,), ("replicated",),
                                   param_dtype)
    self.lm_head = common.param(rngs, init_normal, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"),
                                param_dtype)

  def embed_tokens(self, tokens_BL):
    return shd.constrain(jnp.take(self.embed[...], tokens_BL, axis=0).astype(self.dtype), shd.BLD)

  def __call__(self, x_BLD, positions_BL, q_segments_BL=None, kv_segments_BS=None, cache: KVCache | None = None,
               return_kv: bool = False):
    """Runs the blocks over input embeddings; returns final-normed hidden states [B, L, D]
    (and, with `return_kv`, this call's rotated K/V per layer as a KVCache).

    Segment ids (int, 0 = padding, attention only within equal ids): `q_segments_BL` of these positions
    (None: one segment), `kv_segments_BS` of the keys, the cache's first (None: the queries' own)."""
    if q_segments_BL is None:
      q_segments_BL = jnp.ones(x_BLD.shape[:2], jnp.int32)
    if kv_segments_BS is None:
      if cache is not None:
        raise ValueError("kv_segments_BS is required with a cache (the cached keys' ids come first)")
      kv_segments_BS = q_segments_BL
    want = x_BLD.shape[1] + (0 if cache is None else cache.k.shape[2])
    if kv_segments_BS.shape[1] != want:
      raise ValueError(f"kv_segments_BS has {kv_segments_BS.shape[1]} positions, expected {want} (cache + new)")

    def body(block, x, layer_cache):
      x, kv = block(x, positions_BL, q_segments_BL, kv_segments_BS, layer_cache)
      return x, (kv if return_kv else None)

    xs = None if cache is None else (cache.k, cache.v)
    x, kv = common.run_stacked(self.layers, body, x_BLD.astype(self.dtype), xs,
                               scan=self.scan_layers, remat_policy=self.remat_policy)
    x = common.rms_norm(x, self.final_norm[...], self.cfg.rms_norm_eps)
    return (x, KVCache(*kv)) if return_kv else x

  def logits(self, h_BLD):
    """LM head with float32 logits."""
    return shd.constrain(common.einsum_f32("BLD,DV->BLV", h_BLD, self.lm_head[...].astype(self.dtype)), shd.BLV)
