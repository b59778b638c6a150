"""dLLM-Cache (the LLaDA-V demo's cache: `train/llava/hooks/cache_hook_LLaDA_V.py`, `cache/Cache.py`) as one
transformer layer over a row's feature cache, with static shapes.

Per layer the cache holds, for every position, the rotated K, the V, and the attention and FFN outputs
as added to the residual stream (h = x + attn; out = h + ffn). The original keeps them per segment
(prompt = the prompt positions; response = everything after them: answer and suffix); here both
segments are one array, the prompt first. The residual stream itself is never cached: every layer
adds the (partly cached) attention and FFN outputs to its actual input, as the hook does.

A layer runs in one of four static forms (per-row choice by the caller, `engine.Forward.dllm`):
  * prompt and response refreshed: a plain layer over every position;
  * response refreshed: queries = every response position; the prompt's K/V, attention and FFN
    outputs from the cache;
  * prompt refreshed: queries = the prompt + the response slots below;
  * neither: queries = the response slots.
Slots (the two last forms): V of every response position is computed from the layer's input; the
`n_use` response positions of lowest cosine similarity (over the flattened V, torch's
`cosine_similarity`, eps 1e-8; exactly 1 where V is unchanged, bit for bit: V is always the same
product over the response, so an unchanged input gives the cached bits) between that V and the cached
one are recomputed: their Q/K/V,
attention against every position's K/V (the cache with the prompt's, if refreshed, and the slots'
replaced) and FFN, all scattered into the cache. The number of slots is static (`slots`); a row uses
the first `n_use` of them (the original's int(len(response) * ratio)); ties in cosine go to the lower
position (lax.top_k; torch's topk order on ties is unspecified).
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import struct

from lladav_jax import sharding as shd
from lladav_jax.model import common
from lladav_jax.model.llm import rope


@struct.dataclass
class FeatureCache:
  """Per layer, every position: rotated K and V [layers, R, S, K, H]; attention and FFN outputs as
  added to the residual stream [layers, R, S, D]."""
  k: jax.Array
  v: jax.Array
  attn: jax.Array
  ffn: jax.Array


def cosine(a_RLKH, b_RLKH):
  """torch.nn.functional.cosine_similarity over the flattened heads, in float32."""
  a = a_RLKH.reshape(a_RLKH.shape[:2] + (-1,)).astype(jnp.float32)
  b = b_RLKH.reshape(b_RLKH.shape[:2] + (-1,)).astype(jnp.float32)
  norm = jnp.sqrt(jnp.sum(a * a, -1) * jnp.sum(b * b, -1))
  return jnp.sum(a * b, -1) / jnp.maximum(norm, 1e-8)


def layer(block, h_RSD, c: FeatureCache, *, p: int, pos_RS, keymask_RS, n_use_R, prompt_q: bool,
          slots: Optional[int]):
  """One layer under dLLM-Cache. `h_RSD`: the residual stream entering the layer (S = p prompt
  positions, then the response); `c`: this layer's cache rows; `prompt_q`: the prompt is refreshed;
  `slots`: None = the whole response is refreshed, else the static number of recompute slots, of
  which row r uses `n_use_R[r]`. Returns the stream leaving the layer and the updated cache."""
  a, dt = block.attn, block.attn.dtype
  eps = block.eps
  h_RSD = shd.constrain(h_RSD, shd.BLD)
  xn = common.rms_norm(h_RSD, block.attn_norm[...], eps)
  # V of the response from the same-shaped product in every form: an unchanged input gives the cached bits
  v_resp = jnp.einsum("BLD,DKH->BLKH", xn[:, p:], a.v_proj[...].astype(dt))
  idx = ok = None
  if slots is not None:  # the response positions whose V moved most (lowest cosine) get recomputed
    same = jnp.all(v_resp == c.v[:, p:].astype(dt), axis=(2, 3))
    cos = jnp.where(same, 1.0, cosine(v_resp, c.v[:, p:]))  # unchanged: exactly 1, not 1 +- rounding
    cos = jnp.where(keymask_RS[:, p:], cos, jnp.inf)  # padding is never picked
    idx = jax.lax.top_k(-cos, slots)[1]
    ok = jnp.arange(slots)[None] < n_use_R[:, None]

  def queries(prompt, resp):  # the queries' rows: the prompt (if refreshed), then the response slots
    if idx is not None:
      resp = jnp.take_along_axis(resp, idx.reshape(idx.shape + (1,) * (resp.ndim - 2)), axis=1)
    return jnp.concatenate([prompt, resp], axis=1) if prompt_q else resp

  gather = lambda x: queries(x[:, :p], x[:, p:])  # noqa: E731

  def put(x, new):  # the queries' new values into x [R, S, ...]; unused slots keep the cached values
    new = new.astype(x.dtype)
    prompt = new[:, :p] if prompt_q else x[:, :p]
    g = new[:, p:] if prompt_q else new
    if idx is not None:
      col = idx.reshape(idx.shape + (1,) * (g.ndim - 2))
      g = jnp.where(ok.reshape(ok.shape + (1,) * (g.ndim - 2)), g, jnp.take_along_axis(x[:, p:], col, axis=1))
      g = jax.vmap(lambda row, i, u: row.at[i].set(u))(x[:, p:], idx, g)
    return jnp.concatenate([prompt, g], axis=1)

  xq, qpos = gather(xn), gather(pos_RS)
  q = jnp.einsum("BLD,DNH->BLNH", xq, a.q_proj[...].astype(dt))
  k = jnp.einsum("BLD,DKH->BLKH", xq, a.k_proj[...].astype(dt))
  v = queries(jnp.einsum("BLD,DKH->BLKH", xn[:, :p], a.v_proj[...].astype(dt)) if prompt_q else None, v_resp)
  q, k = rope(q, qpos, a.theta), rope(k, qpos, a.theta)
  k_all, v_all = put(c.k, k), put(c.v, v)
  ctx = common.attention(q, k_all.astype(dt), v_all.astype(dt), keymask_RS[:, None, None, :], a.impl)
  attn_all = put(c.attn, jnp.einsum("BLNH,NHD->BLD", ctx, a.o_proj[...].astype(dt)))
  h_RSD = h_RSD + attn_all.astype(h_RSD.dtype)
  ffn_all = put(c.ffn, block.mlp(common.rms_norm(gather(h_RSD), block.mlp_norm[...], eps)))
  return h_RSD + ffn_all.astype(h_RSD.dtype), FeatureCache(k_all, v_all, attn_all, ffn_all)
