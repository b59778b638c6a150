"""The masked-diffusion training objective of LLaDA-V, exactly as the original computes it.

The original's `modeling_llada.py::LLaDAModelLM.forward` (docs/ORIGINAL.md, "Training objective"). For
conversation b of the global batch, with L_ans(b) = #positions of b whose label is not IGNORE (-100) and
eps = 1e-3:

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

The LM head + cross-entropy runs in chunks of positions, so the float32 [tokens, vocab] logits are never
materialised at once (126k vocab x 8k positions would be 4 GB per sequence). Under differentiation each
chunk also takes its gradients in the same pass (`_ce_sums`, a custom VJP): the head's three matmuls per
chunk (logits, d hidden, d head) run once, and no chunk's logits are kept or recomputed for the backward.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from lladav_jax import sharding as shd
from lladav_jax.config import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from lladav_jax.model import common


@dataclasses.dataclass(frozen=True)
class LossConfig:
  eps: float = 1e-3
  antithetic: bool = False  # md4: t_b = (t0 + b / B) mod 1 over the global batch
  logits_chunk: int = 1024  # positions per LM-head chunk; <= 0 = one chunk (unchunked)
  # Label ids that are padding, not answer words (the tokenizer's EOS and <|eot_id|>: the original labels the
  # EOS padding and each turn's end): the metric `answer_acc` leaves them out. The loss does not read it.
  padding_ids: tuple[int, ...] = ()


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


def weighted_ce(h_BLD, head_DV, labels_BL, weights_BL, *, chunk: int, dtype=None, padding_ids=()):
  """sum_{b,i} weights_bi * CE(h_bi @ head, label_bi) with float32 logits, in chunks of positions.

  Returns (weighted CE sum, unweighted CE sum over weights > 0, #positions over weights > 0 whose label has the
  largest logit, the same count over those whose label is not one of `padding_ids`); only the first is
  differentiable (the others are metrics).
  """
  l = h_BLD.shape[1]
  dtype = jnp.dtype(dtype or h_BLD.dtype)
  labels_BL = jnp.where(labels_BL < 0, 0, labels_BL)
  c = l if chunk <= 0 or chunk >= l else chunk
  pad = -l % c
  if pad:  # positions padded to a multiple of the chunk (weight 0)
    h_BLD = jnp.pad(h_BLD, ((0, 0), (0, pad), (0, 0)))
    labels_BL = jnp.pad(labels_BL, ((0, 0), (0, pad)))
    weights_BL = jnp.pad(weights_BL, ((0, 0), (0, pad)))
  wsum, ce_sum, correct, answer_correct = _ce_sums(h_BLD, head_DV, labels_BL, weights_BL, c, dtype,
                                                   tuple(int(i) for i in padding_ids))
  return (wsum, jax.lax.stop_gradient(ce_sum), jax.lax.stop_gradient(correct), jax.lax.stop_gradient(answer_correct))


def _chunks(x, c):
  """[B, n * c, ...] -> [n, B, c, ...]: the chunk scan's leading axis."""
  return jnp.moveaxis(x.reshape((x.shape[0], x.shape[1] // c, c) + x.shape[2:]), 1, 0)


def not_padding(labels, padding_ids):
  """Where a label is none of `padding_ids` (a static tuple)."""
  out = jnp.ones(labels.shape, bool)
  for i in padding_ids:
    out &= labels != i
  return out


def _chunk_ce(head_DV, h_BCD, lab_BC, w_BC, dtype, padding_ids):
  """One chunk (the head already in the compute dtype): (float32 logits, log-sum-exp, per-position CE,
  (weighted sum, CE sum, #correct, #correct but padding) per row)."""
  logits = shd.constrain(common.einsum_f32("BCD,DV->BCV", h_BCD.astype(dtype), head_DV), shd.BLV)
  lse = jax.nn.logsumexp(logits, axis=-1)
  label_logit = jnp.take_along_axis(logits, lab_BC[..., None], axis=-1)[..., 0]
  ce = lse - label_logit
  on = w_BC > 0
  # the label's logit is the largest (argmax == label but for exact ties): the max is logsumexp's own, where an
  # argmax would be one more pass over the [B, C, V] logits carrying indices
  correct = (label_logit >= logits.max(axis=-1)) & on
  # per row: summed over the batch after the chunk scan, so that the scan's only cross-device sum is d head's
  answer_correct = correct & not_padding(lab_BC, padding_ids)
  return logits, lse, ce, ((ce * w_BC).sum(1), jnp.where(on, ce, 0.0).sum(1), correct.astype(jnp.float32).sum(1),
                           answer_correct.astype(jnp.float32).sum(1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _ce_sums(h_BLD, head_DV, labels_BL, weights_BL, c, dtype, padding_ids):
  head_DV = head_DV.astype(dtype)

  def body(_, xs):
    return None, _chunk_ce(head_DV, *xs, dtype, padding_ids)[3]

  sums = jax.lax.scan(body, None, (_chunks(h_BLD, c), _chunks(labels_BL, c), _chunks(weights_BL, c)))[1]
  return tuple(x.sum() for x in sums)


def _ce_sums_fwd(h_BLD, head_DV, labels_BL, weights_BL, c, dtype, padding_ids):
  """The sums and, per unit cotangent of the weighted sum, its gradients: d logits = w * (softmax - onehot),
  rounded to the compute dtype as a half-precision head's backward takes it (both matmuls half x half with
  float32 accumulation); d head accumulates over chunks in float32, sharded as the head."""
  head_dtype = jnp.zeros((0,), head_DV.dtype)  # the cotangent's dtype (residuals are arrays)
  head_DV = head_DV.astype(dtype)  # one cast (and one FSDP gather) for both matmuls

  def body(dhead, xs):
    h_BCD, lab_BC, w_BC = xs
    logits, lse, ce, sums = _chunk_ce(head_DV, h_BCD, lab_BC, w_BC, dtype, padding_ids)
    vocab = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2)
    p = jnp.exp(logits - lse[..., None])
    g_BCV = shd.constrain((w_BC[..., None] * jnp.where(vocab == lab_BC[..., None], p - 1.0, p)).astype(dtype),
                          shd.BLV)
    dh = common.einsum_f32("BCV,DV->BCD", g_BCV, head_DV).astype(h_BCD.dtype)
    dhead = dhead + shd.constrain(common.einsum_f32("BCD,BCV->DV", h_BCD.astype(dtype), g_BCV), ("embed", "vocab"),
                                  parameter=True)
    return dhead, (sums, dh, ce)

  dhead0 = shd.constrain(jnp.zeros(head_DV.shape, jnp.float32), ("embed", "vocab"), parameter=True)
  dhead, (sums, dh, ce) = jax.lax.scan(body, dhead0, (_chunks(h_BLD, c), _chunks(labels_BL, c), _chunks(weights_BL, c)))
  unchunk = lambda x: jnp.moveaxis(x, 0, 1).reshape(h_BLD.shape[:2] + x.shape[3:])
  return tuple(x.sum() for x in sums), (unchunk(dh), dhead, head_dtype, unchunk(ce))


def _ce_sums_bwd(c, dtype, padding_ids, res, g):
  dh, dhead, head_dtype, ce = res
  g_w = g[0]  # the CE sum and the counts are metrics (stop_gradient in weighted_ce): their cotangents are zero
  return ((g_w * dh).astype(dh.dtype), (g_w * dhead).astype(head_dtype.dtype),
          np.zeros(ce.shape, jax.dtypes.float0), g_w * ce)  # labels: integers, [B, L] as the CE


_ce_sums.defvjp(_ce_sums_fwd, _ce_sums_bwd)


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
  wsum, ce_sum, correct, answer_correct = weighted_ce(h, model.llm.lm_head[...], labels, w_BL, chunk=cfg.logits_chunk,
                                                      dtype=model.llm.dtype, padding_ids=cfg.padding_ids)
  answer = ((labels != IGNORE_INDEX) & x.valid).sum()
  aux = {"masked_tokens": masked.sum().astype(jnp.float32), "answer_tokens": answer.astype(jnp.float32),
         "ce_sum": ce_sum, "correct": correct, "valid_tokens": x.valid.sum().astype(jnp.float32),
         # the masked positions that are answer words (their label not padding), and how many of them are right
         "answer_masked": (masked & not_padding(labels, cfg.padding_ids)).sum().astype(jnp.float32),
         "answer_correct": answer_correct,
         "conversations": x.segments.max(axis=1).sum().astype(jnp.float32)}
  return wsum / jnp.maximum(conversations, 1).astype(jnp.float32), aux
