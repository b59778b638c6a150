"""The per-step decision, lean: LM head + banned ids + CFG + Gumbel noise + argmax + confidence over
vocabulary chunks with an online max / log-sum-exp, so that no [rows, positions, V] float32 array
exists (only [rows, positions, chunk]); then which positions to commit, and where the answer stops.

x0 = argmax(logits + T * Gumbel) (the plain argmax at T = 0; the log-space form of the original's
argmax(exp(logits) / (-log u)^T), without its float overflow); confidence = exp(logit[x0] - LSE)
(`low_confidence`) or U(0, 1) (`random`). The Gumbel noise of chunk c is drawn from fold_in(key, c):
a different stream from one draw over the whole vocabulary, the same distribution.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lladav_jax.model import common

NEG_INF = -jnp.inf


def chunk_size(vocab: int, target: int = 8192) -> int:
  """The largest divisor of `vocab` that is at most `target` (126464 -> 7904)."""
  return max(c for c in range(1, min(vocab, target) + 1) if vocab % c == 0)


def decide(h_RQD, lm_head_DV, keys, temperature, cfg_scale, random_remask, *, banned_ids: tuple, chunk: int,
           cfg: bool, dtype):
  """x0 and confidence [B, Q] of the hidden states `h_RQD` (R = B, or 2B stacked [cond; uncond]
  with `cfg`); per-row `keys`, `temperature`, `cfg_scale`, `random_remask` [B]."""
  r, q, _ = h_RQD.shape
  b = r // 2 if cfg else r
  v = lm_head_DV.shape[1]
  if v % chunk:
    raise ValueError(f"vocab_chunk={chunk} does not divide the vocabulary {v}")
  banned = jnp.asarray(banned_ids, jnp.int32) if banned_ids else None
  k_noise = jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys)
  k_conf = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
  noisy = jnp.any(temperature > 0)

  def body(c, carry):
    best, best_idx, best_logit, m, s = carry
    w = jax.lax.dynamic_slice_in_dim(lm_head_DV, c * chunk, chunk, axis=1).astype(dtype)
    logits = common.einsum_f32("RQD,DC->RQC", h_RQD, w)  # the model's head (float16: rounded as the original's)
    if cfg:  # un + (scale + 1) (cond - un) where the row asks for CFG, else the conditional logits
      cond, un = logits[:b], logits[b:]
      scale = cfg_scale[:, None, None]
      logits = jnp.where(scale > 0, un + (scale + 1.0) * (cond - un), cond)
    ids = c * chunk + jnp.arange(chunk, dtype=jnp.int32)
    if banned is not None:
      logits = jnp.where(jnp.any(ids[:, None] == banned[None], axis=1), NEG_INF, logits)
    noise = jax.lax.cond(
        noisy, lambda: jax.vmap(lambda k: jax.random.gumbel(jax.random.fold_in(k, c), (q, chunk)))(k_noise),
        lambda: jnp.zeros((b, q, chunk), jnp.float32))
    score = logits + temperature[:, None, None] * noise
    arg = jnp.argmax(score, axis=-1)
    top = jnp.take_along_axis(score, arg[..., None], axis=-1)[..., 0]
    top_logit = jnp.take_along_axis(logits, arg[..., None], axis=-1)[..., 0]
    better = top > best  # strict: the earlier chunk keeps a tie, as one argmax over the vocabulary does
    m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
    ref = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    s = s * jnp.exp(m - ref) + jnp.sum(jnp.exp(logits - ref[..., None]), axis=-1)
    return (jnp.where(better, top, best), jnp.where(better, c * chunk + arg, best_idx),
            jnp.where(better, top_logit, best_logit), m_new, s)

  neg = jnp.full((b, q), NEG_INF, jnp.float32)
  init = (neg, jnp.zeros((b, q), jnp.int32), neg, neg, jnp.zeros((b, q), jnp.float32))
  _, x0, x0_logit, m, s = jax.lax.fori_loop(0, v // chunk, body, init)
  conf = jnp.exp(x0_logit - (m + jnp.log(s)))
  uniform = jax.vmap(lambda k: jax.random.uniform(k, (q,), jnp.float32))(k_conf)
  return x0.astype(jnp.int32), jnp.where(random_remask[:, None], uniform, conf)


def select(conf_BQ, eligible_BQ, k_B, mode_B, value_B):
  """Which eligible positions a step commits, per row: the k most confident (mode 0); every one
  with conf >= threshold and always the most confident (mode 1, Fast-dLLM); the largest n with
  c_j >= 1 - factor / (j + 1) for the sorted confidences c_1 >= c_2 >= ... (mode 2). Ties in
  confidence go to the lower position."""
  conf = jnp.where(eligible_BQ, conf_BQ, NEG_INF)
  order = jnp.argsort(-conf, axis=-1, stable=True)
  rank = jnp.argsort(order, axis=-1)
  srt = jnp.take_along_axis(conf, order, axis=-1)
  j = jnp.arange(conf.shape[-1])
  thr = jnp.where(j == 0, NEG_INF, 1.0 - value_B[:, None] / (j + 2.0))
  ok = (srt >= thr) & jnp.take_along_axis(eligible_BQ, order, axis=-1)
  n_factor = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=-1), axis=-1)
  by_threshold = (rank == 0) | (conf >= value_B[:, None])
  chosen = jnp.select([mode_B[:, None] == 1, mode_B[:, None] == 2],
                      [by_threshold, rank < n_factor[:, None]], rank < k_B[:, None])
  return chosen & eligible_BQ


def first_occurrences(ans_BG, stop_ids, stop_lens):
  """[B, NS]: the first start of each stop sequence in each answer row (G if absent or unused)."""
  b, g = ans_BG.shape
  ns, ls = stop_ids.shape[1:]
  pos = jnp.arange(g)
  match = jnp.broadcast_to(stop_lens[:, :, None] > 0, (b, ns, g))
  padded = jnp.pad(ans_BG, ((0, 0), (0, ls)), constant_values=-1)  # stop slots may be longer than the answer
  for t in range(ls):
    shifted = padded[:, None, t:t + g]
    match = match & ((shifted == stop_ids[:, :, t, None]) | (t >= stop_lens[:, :, None]))
  return jnp.min(jnp.where(match, pos, g), axis=-1).astype(jnp.int32)


def update_stop(stop_B, occ_BS, original_B, g: int):
  """The stop after a commit (g = none yet). Default: the earliest occurrence of any sequence.
  `original_B`: the original generate's rule (the sequences in order, the first one present sets
  the stop; once set, only the first sequence is searched again)."""
  earliest = jnp.minimum(stop_B, jnp.min(occ_BS, axis=-1))
  present = occ_BS < g
  first = jnp.take_along_axis(occ_BS, jnp.argmax(present, axis=-1)[:, None], axis=-1)[:, 0]
  quirk = jnp.where(stop_B < g, jnp.minimum(stop_B, occ_BS[:, 0]), jnp.where(jnp.any(present, -1), first, g))
  return jnp.where(original_B, quirk, earliest)
