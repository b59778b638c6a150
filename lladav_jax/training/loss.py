"""The masked-diffusion training objective of LLaDA-V, exactly as the original computes it.

REFERENCE.md section 4 (`modeling_llada.py::LLaDAModelLM.forward`). For sequence b of the global
batch, with L_ans(b) = #positions whose label is not IGNORE (-100) and eps = 1e-3:

    t_b ~ U(0, 1)                    one time per sequence (or antithetic, `antithetic=True`)
    p_b = (1 - eps) * t_b + eps
    masked_bi = (u_bi < p_b) & (label_bi != -100) & valid_bi          u_bi ~ U(0, 1)
    loss = (1 / B) * sum_b sum_{i masked} CE(logits_bi, label_bi) / p_b / L_ans(b)

with float32 logits. The original replaces the *input embedding* of masked positions by the
embedding of the mask token after the image features are spliced in. Only positions with a label
are ever masked, and image positions always carry label -100 (they are also excluded explicitly
here), so replacing the token id by `mask_token_id` before `model.embed` gives bit-identical inputs:
the spliced image features are untouched and a masked text position gets exactly
`embed_tokens(mask_token_id)`.

The noise (t, u) is drawn on device for the whole *global* batch from
`fold_in(key, step)`; gradient accumulation slices the same draws, so a step's loss does not depend
on the number of micro-batches, the mesh, or an interruption (a resumed run redraws the same noise).

The LM head + cross-entropy runs in chunks of positions under `jax.checkpoint`, so the float32
[tokens, vocab] logits are never materialised at once (126k vocab x 8k positions would be 4 GB per
sequence); the backward pass recomputes one chunk's logits at a time.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lladav_jax import sharding as shd
from lladav_jax.config import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from lladav_jax.model import common


@dataclasses.dataclass(frozen=True)
class LossConfig:
  eps: float = 1e-3
  antithetic: bool = False  # md4: t_b = (t0 + b / B) mod 1 over the global batch
  logits_chunk: int = 1024  # positions per LM-head chunk; <= 0 = one chunk (unchunked)


def draw_noise(key, batch: int, length: int, antithetic: bool = False):
  """(t [B], u [B, L]) float32 for a global batch: t per sequence, u per position."""
  k_t, k_u = jax.random.split(key)
  if antithetic:
    t0 = jax.random.uniform(k_t, (), jnp.float32)
    t = jnp.mod(t0 + jnp.arange(batch, dtype=jnp.float32) / batch, 1.0)
  else:
    t = jax.random.uniform(k_t, (batch,), jnp.float32)
  u = jax.random.uniform(k_u, (batch, length), jnp.float32)
  return t, u


def corrupt(tokens_BL, labels_BL, valid_BL, t_B, u_BL, mask_token_id: int, eps: float):
  """-> (noisy tokens, masked [B, L] bool, p [B], weights [B, L] = masked / p / L_ans)."""
  answer = (labels_BL != IGNORE_INDEX) & valid_BL & (tokens_BL != IMAGE_TOKEN_INDEX)
  p_B = (1.0 - eps) * t_B + eps
  masked = (u_BL < p_B[:, None]) & answer
  noisy = jnp.where(masked, jnp.asarray(mask_token_id, tokens_BL.dtype), tokens_BL)
  l_ans = jnp.maximum(answer.sum(axis=1), 1).astype(jnp.float32)
  weights = masked.astype(jnp.float32) / (p_B * l_ans)[:, None]
  return noisy, masked, p_B, weights


def weighted_ce(h_BLD, head_DV, labels_BL, weights_BL, *, chunk: int, dtype=None):
  """sum_{b,i} weights_bi * CE(h_bi @ head, label_bi) with float32 logits, in chunks of positions.

  Returns (weighted CE sum, unweighted CE sum over weights > 0, #correct argmax over weights > 0).
  """
  b, l, d = h_BLD.shape
  dtype = dtype or h_BLD.dtype
  labels_BL = jnp.where(labels_BL < 0, 0, labels_BL)
  c = l if chunk <= 0 or chunk >= l else chunk
  n = -(-l // c)
  if n * c != l:  # pad positions to a multiple of the chunk (weight 0)
    pad = n * c - l
    h_BLD = jnp.pad(h_BLD, ((0, 0), (0, pad), (0, 0)))
    labels_BL = jnp.pad(labels_BL, ((0, 0), (0, pad)))
    weights_BL = jnp.pad(weights_BL, ((0, 0), (0, pad)))

  @jax.checkpoint
  def one(head, h_BCD, lab_BC, w_BC):
    logits = shd.constrain(common.einsum_f32("BCD,DV->BCV", h_BCD.astype(dtype), head.astype(dtype)), shd.BLV)
    lse = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, lab_BC[..., None], axis=-1)[..., 0]
    ce = lse - tgt
    on = w_BC > 0
    correct = jnp.argmax(logits, axis=-1) == lab_BC
    return (jnp.sum(ce * w_BC), jnp.sum(jnp.where(on, ce, 0.0)),
            jnp.sum((on & correct).astype(jnp.float32)))

  if n == 1:
    return one(head_DV, h_BLD, labels_BL, weights_BL)
  split = lambda x: jnp.moveaxis(x.reshape((b, n, c) + x.shape[2:]), 1, 0)

  def body(acc, xs):
    out = one(head_DV, *xs)
    return jax.tree.map(jnp.add, acc, out), None

  zero = (jnp.zeros((), jnp.float32),) * 3
  acc, _ = jax.lax.scan(body, zero, (split(h_BLD), split(labels_BL), split(weights_BL)))
  return acc


def diffusion_loss(model, batch, t_B, u_BL, *, mask_token_id: int, cfg: LossConfig, global_batch: int,
                   dropout_key=None):
  """Sum over this (micro-)batch's sequences of the per-sequence term, divided by the *global*
  batch size, so micro-batch losses (and their gradients) add up to the formula on the global batch.
  `dropout_key`: the LoRA dropout's (None: none). Returns (loss, aux dict of sums for logging)."""
  x, labels = batch.inputs, batch.labels
  noisy, masked, p_B, w_BL = corrupt(x.tokens, labels, x.valid, t_B, u_BL, mask_token_id, cfg.eps)
  emb = model.embed(noisy, x.pixels, x.merge_idx, x.merge_w)
  h = model.llm(emb, x.positions, x.segments, dropout_key=dropout_key)
  wsum, ce_sum, correct = weighted_ce(h, model.llm.lm_head[...], labels, w_BL,
                                      chunk=cfg.logits_chunk, dtype=model.llm.dtype)
  answer = ((labels != IGNORE_INDEX) & x.valid).sum()
  aux = {"masked_tokens": masked.sum().astype(jnp.float32), "answer_tokens": answer.astype(jnp.float32),
         "ce_sum": ce_sum, "correct": correct, "valid_tokens": x.valid.sum().astype(jnp.float32)}
  return wsum / global_batch, aux
