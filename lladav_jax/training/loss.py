"""The masked-diffusion training objective of LLaDA-V, exactly as the original computes it.

REFERENCE.md section 4 (`modeling_llada.py::LLaDAModelLM.forward`). For conversation b of the global
batch, with L_ans(b) = #positions of b whose label is not IGNORE (-100) and eps = 1e-3:

    t_b ~ U(0, 1)                    one time per conversation (or antithetic, `antithetic=True`)
    p_b = (1 - eps) * t_b + eps
    masked_bi = (u_bi < p_b) & (label_bi != -100) & valid_bi          u_bi ~ U(0, 1)
    loss = (1 / B) * sum_b sum_{i masked} CE(logits_bi, label_bi) / p_b / L_ans(b)

A conversation is a segment (`ModelInputs.segments`): one a row unpacked, several a row packed
(`data.packing`); B counts conversations, not rows, so a packed batch gives the unpacked loss.

with float32 logits. The original replaces the *input embedding* of masked positions by the
embedding of the mask token after the image features are spliced in. Only positions with a label
are ever masked, and image positions always carry label -100 (they are also excluded explicitly
here), so replacing the token id by `mask_token_id` before `model.embed` gives bit-identical inputs:
the spliced image features are untouched and a masked text position gets exactly
`embed_tokens(mask_token_id)`.

The noise (t, u) is drawn on device for the whole *global* batch from `fold_in(key, step)`; gradient
accumulation slices the same draws, so a step's loss does not depend on the number of micro-batches,
the mesh, or an interruption (a resumed run redraws the same noise). t is a function of the
conversation's number in the global batch (row-major, segment order) and u of (that number, the
token's position in its conversation), never of the row or column: the same conversations in the same
order draw the same noise packed or unpacked (packing reorders conversations, so a packed run and an
unpacked run see the same noise per conversation *number*, not per record).

The LM head + cross-entropy runs in chunks of positions under `jax.checkpoint`, so the float32
[tokens, vocab] logits are never materialised at once (126k vocab x 8k positions would be 4 GB per
sequence); the backward pass recomputes one chunk's logits at a time.
"""
from __future__ import annotations

import dataclasses
import functools

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


def conversations(segments_BL):
  """(conversation number [B, L] int32: row-major, segment order, -1 at padding; the count).
  Segment ids run 1..k within a row (`batch.collate`), so a row holds max(segments) conversations."""
  per_row = segments_BL.max(axis=1)
  start = jnp.cumsum(per_row) - per_row
  return jnp.where(segments_BL > 0, start[:, None] + segments_BL - 1, -1), per_row.sum()


def _uniform_at(key, *indices):
  """float32 U(0, 1) per element, a function of (key, the elements' indices) only: counter-based, so it depends
  neither on the array's shape nor on where the element sits (vmapped per axis: the batch keeps its sharding)."""
  def one(*ix):
    k = key
    for i in ix:
      k = jax.random.fold_in(k, i)
    return jax.random.uniform(k, (), jnp.float32)
  f = one
  for _ in range(indices[0].ndim):
    f = jax.vmap(f)
  return f(*indices)


def draw_noise(key, segments_BL, positions_BL, antithetic: bool = False):
  """(t [B, L], u [B, L]) float32 for a global batch: t per conversation (each position holds its
  conversation's), u per (conversation, position in it)."""
  conv, count = conversations(segments_BL)
  conv = jnp.maximum(conv, 0)  # padding: any value, never masked
  k_t, k_u = jax.random.split(key)
  if antithetic:
    t0 = jax.random.uniform(k_t, (), jnp.float32)
    t = jnp.mod(t0 + conv.astype(jnp.float32) / jnp.maximum(count, 1).astype(jnp.float32), 1.0)
  else:
    t = _uniform_at(k_t, conv)
  return t, _uniform_at(k_u, conv, positions_BL)


def _segment_total(x_BL, segments_BL):
  """[B, L]: at each position, the sum of x over its (row, segment); row by row (the rows keep their sharding)."""
  l = x_BL.shape[1]
  return jax.vmap(lambda x, s: jax.ops.segment_sum(x, s, num_segments=l + 1)[s])(x_BL, segments_BL)


def corrupt(tokens_BL, labels_BL, segments_BL, t_BL, u_BL, mask_token_id: int, eps: float):
  """-> (noisy tokens, masked [B, L] bool, p [B, L], weights [B, L] = masked / p / L_ans of the conversation)."""
  answer = (labels_BL != IGNORE_INDEX) & (segments_BL > 0) & (tokens_BL != IMAGE_TOKEN_INDEX)
  p_BL = (1.0 - eps) * t_BL + eps
  masked = (u_BL < p_BL) & answer
  noisy = jnp.where(masked, jnp.asarray(mask_token_id, tokens_BL.dtype), tokens_BL)
  l_ans = jnp.maximum(_segment_total(answer.astype(jnp.float32), segments_BL), 1.0)
  weights = masked.astype(jnp.float32) / (p_BL * l_ans)
  return noisy, masked, p_BL, weights


@jax.custom_vjp
def _bf16_logits(h_BCD, head_DV):
  """float32 logits of bfloat16 operands whose backward takes the logits' cotangent in bfloat16, as a bf16 head's
  does (the original's): both backward matmuls are bf16 x bf16 with float32 accumulation. JAX's own transpose
  would promote the bf16 head to float32 to meet the float32 cotangent, and the FSDP all-gather of the head in
  the backward would then move (and hold) a float32 copy [D, V]: 1.9 GiB for the 8B model instead of 0.95."""
  return common.einsum_f32("BCD,DV->BCV", h_BCD, head_DV)


def _bf16_logits_fwd(h_BCD, head_DV):
  return _bf16_logits(h_BCD, head_DV), (h_BCD, head_DV)


def _bf16_logits_bwd(res, g_BCV):
  h_BCD, head_DV = res
  g_BCV = g_BCV.astype(h_BCD.dtype)
  dh = jnp.einsum("BCV,DV->BCD", g_BCV, head_DV, preferred_element_type=jnp.float32).astype(h_BCD.dtype)
  dhead = jnp.einsum("BCD,BCV->DV", h_BCD, g_BCV, preferred_element_type=jnp.float32).astype(head_DV.dtype)
  return dh, dhead


_bf16_logits.defvjp(_bf16_logits_fwd, _bf16_logits_bwd)


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

  matmul = _bf16_logits if jnp.dtype(dtype) == jnp.bfloat16 else functools.partial(common.einsum_f32, "BCD,DV->BCV")

  @jax.checkpoint
  def one(head, h_BCD, lab_BC, w_BC):
    logits = shd.constrain(matmul(h_BCD.astype(dtype), head.astype(dtype)), shd.BLV)
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


def diffusion_loss(model, batch, t_BL, u_BL, *, mask_token_id: int, cfg: LossConfig, conversations,
                   dropout_key=None):
  """Sum over this (micro-)batch's conversations of the per-conversation term, divided by the number of
  `conversations` in the *global* batch (`conversations(segments)[1]`), so micro-batch losses (and their
  gradients) add up to the formula on the global batch. `dropout_key`: the LoRA dropout's (None: none).
  Returns (loss, aux dict of sums for logging)."""
  x, labels = batch.inputs, batch.labels
  noisy, masked, _, w_BL = corrupt(x.tokens, labels, x.segments, t_BL, u_BL, mask_token_id, cfg.eps)
  emb = model.embed(noisy, x.pixels, x.merge_idx, x.merge_w)
  h = model.llm(emb, x.positions, x.segments, dropout_key=dropout_key)
  wsum, ce_sum, correct = weighted_ce(h, model.llm.lm_head[...], labels, w_BL,
                                      chunk=cfg.logits_chunk, dtype=model.llm.dtype)
  answer = ((labels != IGNORE_INDEX) & x.valid).sum()
  aux = {"masked_tokens": masked.sum().astype(jnp.float32), "answer_tokens": answer.astype(jnp.float32),
         "ce_sum": ce_sum, "correct": correct, "valid_tokens": x.valid.sum().astype(jnp.float32),
         "conversations": x.segments.max(axis=1).sum().astype(jnp.float32)}
  return wsum / jnp.maximum(conversations, 1).astype(jnp.float32), aux
