"""The per-step decision, lean: LM head + banned ids + CFG + Gumbel noise + argmax + confidence over
vocabulary chunks with an online max / log-sum-exp, so that no [rows, positions, V] float32 array
exists (only [rows, positions, chunk]); then which positions to commit, and where the answer stops.

x0 = argmax(logits + T * Gumbel) (the plain argmax at T = 0; the log-space form of the original's
argmax(exp(logits) / (-log u)^T), without its float overflow); confidence = exp(logit[x0] - LSE)
(`low_confidence`) or U(0, 1) (`random`). The noise is a function of (row key, absolute answer
position, vocabulary chunk) only: the Gumbel noise of position j in chunk c is drawn from
fold_in(fold_in(fold_in(key, 0), j), c), the `random` confidence of position j from
fold_in(fold_in(key, 1), j); so a position's draw does not depend on where it sits in the decision's
[rows, positions] array (see `decide_block`). A different stream from one draw over the whole
vocabulary, the same distribution.

`decide_block` runs the decision only on the positions of each row's block that can still be
committed: they are gathered (ascending) into Q' slots, Q' the smallest rung of a short static ladder
(`ladder`: the block, then halves) that holds the rows' largest eligible count, one `lax.switch`
branch a rung (no recompile), and the results go back to their block positions. The decision of a
position does not depend on the rung (the per-position noise above); at temperature 0 the tokens are
the full block's, up to the rounding of a matmul of another shape (no difference seen on CPU).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lladav_jax.model import common

NEG_INF = -jnp.inf


def chunk_size(vocab: int, target: int = 8192) -> int:
  """The largest divisor of `vocab` that is at most `target` (126464 -> 7904)."""
  return max(c for c in range(1, min(vocab, target) + 1) if vocab % c == 0)


def ladder(block_length: int, rungs: int = 2) -> tuple:
  """The static decision lengths of `decide_block`: the block, then halves (rounded up), at most
  `rungs` of them (32 -> 32, 16; three rungs: 32, 16, 8; 2 -> 2, 1)."""
  out = [block_length]
  while len(out) < max(rungs, 1) and out[-1] > 1:
    out.append(-(-out[-1] // 2))
  return tuple(out)


def _per_position(keys_B, positions_BQ, tag: int):
  """[B, Q] keys fold_in(fold_in(key, tag), position)."""
  return jax.vmap(lambda k, p: jax.vmap(lambda j: jax.random.fold_in(k, j))(p))(
      jax.vmap(lambda k: jax.random.fold_in(k, tag))(keys_B), positions_BQ)


def decide(h_RQD, lm_head_DV, keys, temperature, cfg_scale, random_remask, *, banned_ids: tuple, chunk: int,
           guidance: bool, dtype, positions=None):
  """x0 and confidence [B, Q] of the hidden states `h_RQD` (R = B, or 2B stacked [cond; uncond]
  with `guidance`); per-row `keys`, `temperature`, `cfg_scale`, `random_remask` [B]; `positions` [B, Q]:
  the absolute answer position of each slot, which (with the row's key) picks its noise (default:
  0 .. Q - 1)."""
  r, q, _ = h_RQD.shape
  b = r // 2 if guidance else r
  v = lm_head_DV.shape[1]
  if v % chunk:
    raise ValueError(f"vocab_chunk={chunk} does not divide the vocabulary {v}")
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(q, dtype=jnp.int32), (b, q))
  banned = jnp.asarray(banned_ids, jnp.int32) if banned_ids else None
  k_noise = _per_position(keys, positions, 0)  # [B, Q]
  k_conf = _per_position(keys, positions, 1)
  noisy = jnp.any(temperature > 0)

  def body(c, carry):
    best, best_idx, best_logit, m, s = carry
    w = jax.lax.dynamic_slice_in_dim(lm_head_DV, c * chunk, chunk, axis=1).astype(dtype)
    logits = common.einsum_f32("RQD,DC->RQC", h_RQD, w)  # the model's head (float16: rounded as the original's)
    if guidance:  # un + (scale + 1) (cond - un) where the row asks for CFG, else the conditional logits
      cond, un = logits[:b], logits[b:]
      scale = cfg_scale[:, None, None]
      logits = jnp.where(scale > 0, un + (scale + 1.0) * (cond - un), cond)
    ids = c * chunk + jnp.arange(chunk, dtype=jnp.int32)
    if banned is not None:
      logits = jnp.where(jnp.any(ids[:, None] == banned[None], axis=1), NEG_INF, logits)
    noise = jax.lax.cond(
        noisy, lambda: jax.vmap(jax.vmap(lambda k: jax.random.gumbel(jax.random.fold_in(k, c), (chunk,))))(k_noise),
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
  uniform = jax.vmap(jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32)))(k_conf)
  return x0.astype(jnp.int32), jnp.where(random_remask[:, None], uniform, conf)


def decide_block(h_RLD, eligible_BL, start_B, lm_head_DV, keys, temperature, cfg_scale, random_remask, *,
                 sizes: tuple, banned_ids: tuple, chunk: int, guidance: bool, dtype):
  """`decide` over a block of L positions [s, s + L) of each row, run only on its eligible ones:
  x0 [B, L], confidence [B, L] (-inf where not eligible) and the decision's length Q' (int32), the
  smallest of `sizes` (static, `ladder`; the largest must be L) that holds every row's eligible
  count. Each row's eligible positions are gathered in ascending order into Q' slots (the slots past
  its count are padding), the [R, Q', D] hidden states (both CFG halves alike) go through `decide`
  with their absolute positions, and the results back to their block positions."""
  b, l = eligible_BL.shape
  sizes = tuple(sorted(set(sizes), reverse=True))
  if sizes[0] != l:
    raise ValueError(f"the largest decision length {sizes[0]} must be the block length {l}")
  count = jnp.sum(eligible_BL, axis=-1, dtype=jnp.int32)
  rung = jnp.sum(jnp.asarray(sizes[1:], jnp.int32) >= jnp.max(count), dtype=jnp.int32)  # the smallest that holds
  order = jnp.argsort(jnp.where(eligible_BL, 0, 1), axis=-1, stable=True).astype(jnp.int32)  # eligible first
  slot_of = jnp.argsort(order, axis=-1).astype(jnp.int32)  # each block position's slot
  kw = dict(banned_ids=banned_ids, chunk=chunk, guidance=guidance, dtype=dtype)

  def branch(q):
    def run():
      if q == l:  # the whole block in place
        x0, conf = decide(h_RLD, lm_head_DV, keys, temperature, cfg_scale, random_remask,
                          positions=start_B[:, None] + jnp.arange(l, dtype=jnp.int32)[None], **kw)
        return x0, jnp.where(eligible_BL, conf, NEG_INF)
      idx = order[:, :q]
      h = jnp.take_along_axis(h_RLD, (jnp.concatenate([idx, idx]) if guidance else idx)[..., None], axis=1)
      x0, conf = decide(h, lm_head_DV, keys, temperature, cfg_scale, random_remask,
                        positions=start_B[:, None] + idx, **kw)
      conf = jnp.where(jnp.arange(q)[None] < count[:, None], conf, NEG_INF)
      back = jnp.minimum(slot_of, q - 1)
      x0 = jnp.take_along_axis(x0, back, axis=1)
      return x0, jnp.where(slot_of < q, jnp.take_along_axis(conf, back, axis=1), NEG_INF)
    return run

  x0, conf = jax.lax.switch(rung, [branch(q) for q in sizes])
  return x0, conf, jnp.asarray(sizes, jnp.int32)[rung]


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
