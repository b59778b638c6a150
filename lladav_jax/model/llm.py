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
from lladav_jax.config import LLMConfig, LoraConfig
from lladav_jax.model import attention as attn
from lladav_jax.model import common, lora as lora_lib


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
  def __init__(self, cfg: LLMConfig, attention: attn.AttentionConfig, dtype, param_dtype, *, rngs: nnx.Rngs,
               lora: LoraConfig = LoraConfig()):
    d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    init_normal = jax.nn.initializers.normal(cfg.initializer_range)
    self.q_proj = common.param(rngs, init_normal, (d, n, h), ("embed", "heads", "head_dim"), param_dtype)
    self.k_proj = common.param(rngs, init_normal, (d, k, h), ("embed", "kv_heads", "head_dim"), param_dtype)
    self.v_proj = common.param(rngs, init_normal, (d, k, h), ("embed", "kv_heads", "head_dim"), param_dtype)
    self.o_proj = common.param(rngs, init_normal, (n, h, d), ("heads", "head_dim", "embed"), param_dtype)
    ad = lambda name, i, ia, o, oa: lora_lib.maybe(name, lora, i, ia, o, oa, dtype, param_dtype, rngs)
    self.q_lora = ad("q_proj", (d,), ("embed",), (n, h), ("heads", "head_dim"))
    self.k_lora = ad("k_proj", (d,), ("embed",), (k, h), ("kv_heads", "head_dim"))
    self.v_lora = ad("v_proj", (d,), ("embed",), (k, h), ("kv_heads", "head_dim"))
    self.o_lora = ad("o_proj", (n, h), ("heads", "head_dim"), (d,), ("embed",))
    self.theta = cfg.rope_theta
    self.attention = attention
    self.dtype = dtype

  def __call__(self, x_BLD, positions_BL, q_segments_BL, kv_segments_BS, cache_kv=None, dropout_key=None):
    """Segment ids (int, 0 = padding; see model/attention.py): `q_segments_BL` of these positions,
    `kv_segments_BS` of the keys, the cached ones first. `cache_kv`: optional (k, v) of earlier positions
    [B, S0, K, H], already rotated; the new keys follow them. `dropout_key`: the LoRA dropout's (training
    only). Returns the output and this call's rotated (k, v) for caching."""
    dt = self.dtype
    q = _plus(common.dense(x_BLD, self.q_proj[...].astype(dt)), self.q_lora, x_BLD, dropout_key)
    k = _plus(common.dense(x_BLD, self.k_proj[...].astype(dt)), self.k_lora, x_BLD, dropout_key)
    v = _plus(common.dense(x_BLD, self.v_proj[...].astype(dt)), self.v_lora, x_BLD, dropout_key)
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
    out = _plus(common.dense(ctx, self.o_proj[...].astype(dt), 2), self.o_lora, ctx, dropout_key)
    out = shd.constrain(out, shd.BLD)
    return checkpoint_name(out, "attn_out"), new_kv


def _plus(y, adapter, x, dropout_key):
  """A projection's output plus its LoRA delta (if adapted)."""
  return y if adapter is None else y + adapter(x, dropout_key)


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x)); LLaDA's ff_proj is the gate (SiLU) branch."""

  def __init__(self, cfg: LLMConfig, dtype, param_dtype, *, rngs: nnx.Rngs, lora: LoraConfig = LoraConfig()):
    d, f = cfg.hidden_size, cfg.intermediate_size
    init_normal = jax.nn.initializers.normal(cfg.initializer_range)
    self.gate_proj = common.param(rngs, init_normal, (d, f), ("embed", "mlp"), param_dtype)
    self.up_proj = common.param(rngs, init_normal, (d, f), ("embed", "mlp"), param_dtype)
    self.down_proj = common.param(rngs, init_normal, (f, d), ("mlp", "embed"), param_dtype)
    ad = lambda name, i, ia, o, oa: lora_lib.maybe(name, lora, i, ia, o, oa, dtype, param_dtype, rngs)
    self.gate_lora = ad("gate_proj", (d,), ("embed",), (f,), ("mlp",))
    self.up_lora = ad("up_proj", (d,), ("embed",), (f,), ("mlp",))
    self.down_lora = ad("down_proj", (f,), ("mlp",), (d,), ("embed",))
    self.dtype = dtype

  def __call__(self, x_BLD, dropout_key=None):
    dt = self.dtype
    gate = _plus(common.dense(x_BLD, self.gate_proj[...].astype(dt)), self.gate_lora, x_BLD, dropout_key)
    up = _plus(common.dense(x_BLD, self.up_proj[...].astype(dt)), self.up_lora, x_BLD, dropout_key)
    gate, up = shd.constrain(gate, shd.BLF), shd.constrain(up, shd.BLF)
    gate, up = checkpoint_name(gate, "mlp_wi"), checkpoint_name(up, "mlp_wi")
    hidden = jax.nn.silu(gate) * up
    out = _plus(common.dense(hidden, self.down_proj[...].astype(dt)), self.down_lora, hidden, dropout_key)
    return checkpoint_name(shd.constrain(out, shd.BLD), "mlp_out")


class Block(nnx.Module):
  def __init__(self, cfg: LLMConfig, attention: attn.AttentionConfig, dtype, param_dtype, *, rngs: nnx.Rngs,
               lora: LoraConfig = LoraConfig()):
    ones = jax.nn.initializers.ones
    self.attn_norm = common.param(rngs, ones, (cfg.hidden_size,), ("replicated",), param_dtype)
    self.attn = Attention(cfg, attention, dtype, param_dtype, rngs=rngs, lora=lora)
    self.mlp_norm = common.param(rngs, ones, (cfg.hidden_size,), ("replicated",), param_dtype)
    self.mlp = MLP(cfg, dtype, param_dtype, rngs=rngs, lora=lora)
    self.eps = cfg.rms_norm_eps

  def __call__(self, x, positions, q_segments, kv_segments, cache_kv=None, dropout_key=None):
    x = shd.constrain(x, shd.BLD)
    h, kv = self.attn(common.rms_norm(x, self.attn_norm[...], self.eps), positions, q_segments, kv_segments,
                      cache_kv, dropout_key)
    x = x + h
    x = x + self.mlp(common.rms_norm(x, self.mlp_norm[...], self.eps), dropout_key)
    return x, kv


class LLaDA(nnx.Module):
  def __init__(self, cfg: LLMConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               attention: attn.AttentionConfig = attn.AttentionConfig(), scan_layers: bool = True, remat_policy: str = "none",
               lora: LoraConfig = LoraConfig(), rngs: nnx.Rngs):
    self.cfg = cfg
    self.dtype = dtype
    self.scan_layers = scan_layers
    self.remat_policy = remat_policy
    init_normal = jax.nn.initializers.normal(cfg.initializer_range)
    self.embed = common.param(rngs, init_normal, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"),
                              param_dtype)
    self.layers = common.stacked(lambda r: Block(cfg, attention, dtype, param_dtype, rngs=r, lora=lora),
                                 cfg.num_layers, rngs)
    self.final_norm = common.param(rngs, jax.nn.initializers.ones, (cfg.hidden_size,), ("replicated",),
                                   param_dtype)
    self.lm_head = common.param(rngs, init_normal, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"),
                                param_dtype)

  def embed_tokens(self, tokens_BL):
    return shd.constrain(jnp.take(self.embed[...], tokens_BL, axis=0).astype(self.dtype), shd.BLD)

  def __call__(self, x_BLD, positions_BL, q_segments_BL=None, kv_segments_BS=None, cache: KVCache | None = None,
               return_kv: bool = False, dropout_key=None):
    """Runs the blocks over input embeddings; returns final-normed hidden states [B, L, D]
    (and, with `return_kv`, this call's rotated K/V per layer as a KVCache). `dropout_key`: LoRA
    dropout (training); each layer gets its own.

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

    def body(block, x, layer_xs):
      layer_cache, layer_key = layer_xs
      key = None if layer_key is None else jax.random.wrap_key_data(layer_key)
      x, kv = block(x, positions_BL, q_segments_BL, kv_segments_BS, layer_cache, key)
      return x, (kv if return_kv else None)

    n = self.cfg.num_layers
    keys = None if dropout_key is None else jax.random.key_data(jax.random.split(dropout_key, n))
    xs = (None if cache is None else (cache.k, cache.v), keys)
    x, kv = common.run_stacked(self.layers, body, x_BLD.astype(self.dtype), xs,
                               scan=self.scan_layers, remat_policy=self.remat_policy)
    x = common.rms_norm(x, self.final_norm[...], self.cfg.rms_norm_eps)
    return (x, KVCache(*kv)) if return_kv else x

  def logits(self, h_BLD):
    """LM head with float32 logits."""
    return shd.constrain(common.einsum_f32("BLD,DV->BLV", h_BLD, self.lm_head[...].astype(self.dtype)), shd.BLV)
