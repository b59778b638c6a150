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
  """One segment's features, per layer: rotated K and V [layers, R, positions, K, H]; attention and FFN
  outputs as added to the residual stream [layers, R, positions, D]."""
  k: jax.Array
  v: jax.Array
  attn: jax.Array
  ffn: jax.Array


@struct.dataclass
class DllmCache:
  """The two segments apart, as the original keeps them: a pass that refreshes only the response reads the
  prompt's arrays and writes the response's (one array for both would be copied by XLA in such a pass)."""
  prompt: FeatureCache  # [layers, R, P, ...]
  response: FeatureCache  # [layers, R, G + Ls, ...]


def cosine(a_RLKH, b_RLKH):
  """torch.nn.functional.cosine_similarity over the flattened heads, in float32."""
  a = a_RLKH.reshape(a_RLKH.shape[:2] + (-1,)).astype(jnp.float32)
  b = b_RLKH.reshape(b_RLKH.shape[:2] + (-1,)).astype(jnp.float32)
  norm = jnp.sqrt(jnp.sum(a * a, -1) * jnp.sum(b * b, -1))
  return jnp.sum(a * b, -1) / jnp.maximum(norm, 1e-8)


def layer(block, h, cp: FeatureCache, cr: FeatureCache, *, pos_RS, keymask_RS, n_use_R, prompt_q: bool,
          slots: Optional[int]):
  """One layer under dLLM-Cache. `h`: the residual stream entering the layer of the positions this form
  updates: every position [R, S, D] (p prompt positions, then the response) when the prompt is
  refreshed (`prompt_q`), else the response's only [R, S - p, D] (the prompt's stream is then read by
  nothing); `cp` / `cr`: this layer's prompt / response cache rows; `slots`: None = the whole response
  is refreshed, else the static number of recompute slots, of which row r uses `n_use_R[r]`. Returns
  the stream leaving the layer and the new cache rows: (prompt, response) with `prompt_q`, else the
  response's."""
  a, dt = block.attn, block.attn.dtype
  adapters = [getattr(a, f"{n}_lora") for n in "qkvo"] + [getattr(block.mlp, f"{n}_lora") for n in ("gate", "up", "down")]
  if any(x is not None for x in adapters):  # this form runs the projections itself, without adapters
    raise ValueError("cache='dllm' runs on merged weights: save the LoRA model (weights.save_model merges "
                     "its adapters) and load that, or use cache='none' / 'prefix' / 'dual'")
  eps = block.eps
  p = cp.k.shape[1]
  h = shd.constrain(h, shd.BLD)
  xn = common.rms_norm(h, block.attn_norm[...], eps)
  resp = (lambda x: x[:, p:]) if prompt_q else (lambda x: x)  # noqa: E731  the response part of h-shaped x
  # V of the response from the same-shaped product in every form: an unchanged input gives the cached bits
  v_resp = jnp.einsum("BLD,DKH->BLKH", resp(xn), a.v_proj[...].astype(dt))
  idx = ok = None
  if slots is not None:  # the response positions whose V moved most (lowest cosine) get recomputed
    same = jnp.all(v_resp == cr.v.astype(dt), axis=(2, 3))
    cos = jnp.where(same, 1.0, cosine(v_resp, cr.v))  # unchanged: exactly 1, not 1 +- rounding
    cos = jnp.where(keymask_RS[:, p:], cos, jnp.inf)  # padding is never picked
    idx = jax.lax.top_k(-cos, slots)[1]
    ok = jnp.arange(slots)[None] < n_use_R[:, None]

  def queries(prompt, response):  # the queries' rows: the prompt (if refreshed), then the response slots
    if idx is not None:
      response = jnp.take_along_axis(response, idx.reshape(idx.shape + (1,) * (response.ndim - 2)), axis=1)
    return jnp.concatenate([prompt, response], axis=1) if prompt_q else response

  def put(old_prompt, old_resp, new):  # the queries' new values: (prompt, response) rows of the cache
    new = new.astype(old_resp.dtype)
    g = new[:, p:] if prompt_q else new
    if idx is not None:  # scattered into the response; unused slots keep the cached values
      col = idx.reshape(idx.shape + (1,) * (g.ndim - 2))
      g = jnp.where(ok.reshape(ok.shape + (1,) * (g.ndim - 2)), g, jnp.take_along_axis(old_resp, col, axis=1))
      g = jax.vmap(lambda row, i, u: row.at[i].set(u))(old_resp, idx, g)
    return (new[:, :p] if prompt_q else old_prompt), g

  xq, qpos = queries(xn[:, :p], resp(xn)), queries(pos_RS[:, :p], pos_RS[:, p:])
  q = jnp.einsum("BLD,DNH->BLNH", xq, a.q_proj[...].astype(dt))
  k = jnp.einsum("BLD,DKH->BLKH", xq, a.k_proj[...].astype(dt))
  v = queries(jnp.einsum("BLD,DKH->BLKH", xn[:, :p], a.v_proj[...].astype(dt)) if prompt_q else None, v_resp)
  q, k = rope(q, qpos, a.theta), rope(k, qpos, a.theta)
  k_p, k_r = put(cp.k, cr.k, k)
  v_p, v_r = put(cp.v, cr.v, v)
  both = lambda x, y: jnp.concatenate([x, y], axis=1).astype(dt)  # noqa: E731
  q_seg = jnp.ones(q.shape[:2], jnp.int32)  # every query attends the row's attendable keys
  ctx = a.attention(q, both(k_p, k_r), both(v_p, v_r), q_seg, keymask_RS.astype(jnp.int32))
  a_p, a_r = put(cp.attn, cr.attn, jnp.einsum("BLNH,NHD->BLD", ctx, a.o_proj[...].astype(dt)))
  h = h + (jnp.concatenate([a_p, a_r], axis=1) if prompt_q else a_r).astype(h.dtype)
  f_p, f_r = put(cp.ffn, cr.ffn, block.mlp(common.rms_norm(queries(h[:, :p], resp(h)), block.mlp_norm[...], eps)))
  h = h + (jnp.concatenate([f_p, f_r], axis=1) if prompt_q else f_r).astype(h.dtype)
  new_r = FeatureCache(k_r, v_r, a_r, f_r)
  return h, ((FeatureCache(k_p, v_p, a_p, f_p), new_r) if prompt_q else new_r)
