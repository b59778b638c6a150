"""The masked-diffusion sampler as an engine of rows, each at its own place in its own request.

    state = init(graphdef, cfg, shapes, weights)                  # empty rows
    feats = encode(graphdef, weights, pixels)                     # the vision tower: tiles -> features
    state = insert(graphdef, cfg, weights, state, row, request)   # the prompt (features spliced), row reset
    state = advance(graphdef, cfg, weights, state, max_steps)     # one jitted lax.while_loop
    state = drop(state, row)                                      # an abandoned row stops running

A server's engine is several such states, lanes of their own shapes (prompt and answer buckets, `runner.Lane`);
the host advances each lane that has a running row (a group of `forward_rows` rows without one is skipped at
run time). `advance` runs denoising steps over every row until `max_steps` or until a row finishes (returns
then, so that the host reads the row out and refills it: continuous batching). A row that finished
stays readable until the next `advance`, which frees it. Only shapes (`EngineShapes`) and
`EngineConfig` (token ids, the longest block, cache mode, CFG on/off) are static; each row carries its
own prompt length, answer length, block length, block index, step within the block, step counts, stop,
RNG seed and settings (`RowParams`), so a request's tokens do not depend on its batch neighbours or on
when it arrived (its random stream is key(seed) folded with its own step count).

Each row follows the original's `generate_with_embeds` (docs/ORIGINAL.md, "Generation"):
  * blocks [s, s + block_length) in order; a block starts with the counts of its masked positions
    (`RowParams.table`); the row leaves it after `steps_per_block` steps (threshold / factor:
    when it has no mask left), when it has no mask left, or when a stop was found and no mask is
    left before it; the row is finished when its blocks are exhausted or a stop lies at or before
    the next block's start;
  * per step: the hidden states of the current block only (every eligible position lies in it:
    before a stop the block limit holds, and a stop always lies in the current block), eligible =
    masked, before the block end or, once a stop was found, before the stop; the lean decision of
    `decode.decide_block` on the eligible positions only (CFG as un + (scale + 1)(cond - un), the
    unconditional pass seeing the mask embedding at every prompt position, images included; banned
    ids at -inf); commit per
    `decode.select`; then the stop sequences are searched (`decode.update_stop`).

Documented deviations from the original:
  * float32 instead of float64 for the Gumbel noise and the softmax (see decode.py); JAX's random
    streams.
  * where fewer positions are eligible than the step's count (only after a stop), only eligible
    positions are committed; the original's top-k also commits masked positions beyond the stop
    at -inf confidence (cut from the output, but visible to later forwards).
  * ties in confidence are broken towards the lower position (torch's top-k order is unspecified).
Not a deviation: x0 may be the mask id itself; that position then stays masked, as in the original.

Caches (EngineConfig.cache; every row refreshes at the first step of each of its blocks and every
`refresh` steps after; a step where only some rows refresh runs both passes and picks per row, so a
row's tokens never depend on its neighbours' schedule):
  * "prefix" (Fast-dLLM prefix cache): a full forward stores every position's rotated K/V; other
    steps run a window of static length answer bucket + suffix from the row's block start against
    the cached K/V of the positions before it.
  * "dual" (Fast-dLLM DualCache): other steps run only the current block against the cached K/V
    of every other position.
  Neither is exact (attention is bidirectional) unless refresh = 1. With CFG both passes are cached.
  * "dllm" (dLLM-Cache, the LLaDA-V demo's; `dllm_cache.py`): per layer K, V, attention and FFN
    outputs of every position, the prompt's and the response's (answer + suffix) apart; with the row's step counted from 1 over its whole request (as the
    original's counter), the prompt's features are refreshed when (step - 1) % prompt_interval == 0,
    the response's when (step - 1) % gen_interval == 0; at other steps the row's
    int(transfer_ratio * len(response)) response positions whose V moved most are recomputed. The
    four forms (both / response / prompt / neither refreshed) run as separate passes, each only when
    some row takes it. Exact (the no-cache tokens) when prompt_interval = 1 and transfer_ratio = 1
    or gen_interval = 1; a cached prompt's attention output saw the response of its refresh step,
    so gen_interval = 1 or transfer_ratio = 1 alone is not. With CFG the unconditional rows are cached
    alongside (one step of the counter, as the original's batched [cond; uncond] forward).
Every cache is carried through the layer scan and each layer's rows are written in place where the row
refreshes, so a pass holds no second copy of the cache.
`nfe` counts forward passes per row (2 a step with CFG); `query_tokens` the positions run through
the transformer (dllm: the queries of its form).

The decision (`decode.decide_block`) runs the LM head only on the positions that can still be
committed: each row's eligible positions of its current block (never committed ones, never later
blocks) are gathered in ascending order into Q' slots, Q' the smallest rung of the static ladder
block_length, block_length / 2 (`EngineConfig.head_rungs`, default 2; `decode.ladder`: a third rung
block_length / 4, ...) that holds the largest eligible count over the rows; one `lax.switch` branch a
rung inside the same program (no recompile). At a uniform schedule of one commit a step (and for every
row alike) the head does 0.75 of the whole block's work (about 0.69 with three rungs, 0.67 with
unboundedly many; each rung is another copy of the decision to compile: bench/sampler.py's notes);
threshold / factor decoding, which empties a block faster, saves more. The rung is the largest over
the running rows, so one row at the start of its block keeps its neighbours at the whole block; a
position's decision does not depend on the rung (its noise is a function of the row's key and its
absolute answer position, `decode.py`), so neither do the tokens. `head_tokens` counts Q' per row.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lladav_jax.inference.engine import decode
from lladav_jax.inference.engine.config import EngineConfig
from lladav_jax.inference.engine.forward import Forward
from lladav_jax.inference.engine.state import TRACE_COUNTS, EngineState, Request, by_row


# ----------------------------------------------------------------------------- row bookkeeping

def _normalize(st: EngineState, cfg: EngineConfig) -> EngineState:
  """Moves each running row to the block its next step works on, or marks it done (idempotent)."""
  bl, g = st.row_params.block_length, st.commit_step.shape[1]  # bl: each row's own [B]
  j = jnp.arange(g)[None]
  masked = (st.response[:, :g] == cfg.mask_id) & (j < st.row_params.answer_len[:, None])

  def in_block(block):
    s = (block * bl)[:, None]
    return masked & (j >= s) & (j < s + bl[:, None])

  running = st.live & ~st.done
  found = st.stop < g
  limit = jnp.where(st.row_params.mode == 0, st.row_params.steps_per_block, bl)
  leave = ((st.block_step >= limit) | ~jnp.any(in_block(st.block), axis=-1)
           | (found & ~jnp.any(masked & (j < st.stop[:, None]), axis=-1)))
  leave = running & leave
  block = st.block + leave
  done = st.done | (running & ((block * bl >= st.row_params.answer_len) | (found & (st.stop <= block * bl))))
  n = jnp.sum(in_block(block), axis=-1)
  table = st.row_params.table
  counts = jnp.where(leave[:, None], jnp.take_along_axis(table, n[:, None, None], axis=1)[:, 0], st.counts)
  return st.replace(block=block, block_step=jnp.where(leave, 0, st.block_step), counts=counts, done=done)


# ----------------------------------------------------------------------------- the engine

def _insert(graphdef, cfg: EngineConfig, weights, st: EngineState, row, req: Request) -> EngineState:
  TRACE_COUNTS["insert", cfg] += 1
  model = nnx.merge(graphdef, weights)
  pr = req.prompt
  if pr.tokens.shape[0] != st.prompt_valid.shape[1]:
    raise ValueError(f"the request's prompt has {pr.tokens.shape[0]} positions but the engine's bucket is "
                     f"{st.prompt_valid.shape[1]}")
  table = model.feature_table(jnp.asarray(req.features, model.llm.dtype)[None])
  emb = model.embed_table(pr.tokens[None], table, pr.merge_idx[None], pr.merge_w[None])[0]
  g = st.commit_step.shape[1]
  response = jnp.concatenate([jnp.full((g,), cfg.mask_id, jnp.int32), req.suffix.astype(jnp.int32)])
  put = lambda a, v: a.at[row].set(jnp.asarray(v, a.dtype))  # noqa: E731
  st = st.replace(
      prompt_emb=put(st.prompt_emb, emb), prompt_valid=put(st.prompt_valid, pr.valid),
      prompt_positions=put(st.prompt_positions, pr.positions), prompt_len=put(st.prompt_len, jnp.sum(pr.valid)),
      response=put(st.response, response), suffix_len=put(st.suffix_len, req.suffix_len),
      stop_ids=put(st.stop_ids, req.stop_ids), stop_lens=put(st.stop_lens, req.stop_lens),
      seed=put(st.seed, req.seed), row_params=jax.tree.map(put, st.row_params, req.row_params),
      live=put(st.live, True), done=put(st.done, False), block=put(st.block, -1), block_step=put(st.block_step, 0),
      stop=put(st.stop, g), commit_step=put(st.commit_step, -1), nfe=put(st.nfe, 0), steps=put(st.steps, 0),
      query_tokens=put(st.query_tokens, 0), head_tokens=put(st.head_tokens, 0))
  return _normalize(st, cfg)


def _step(model, cfg: EngineConfig, st: EngineState) -> EngineState:
  """One denoising step of every running row."""
  st = by_row(st)
  fw = Forward(model, cfg, st)
  b, g, bl = fw.b, fw.g, fw.bl  # bl: the engine's max_block_length, the decision's static length
  row_params = st.row_params
  own = row_params.block_length  # each row's block length [B]
  active = st.live & ~st.done
  s = jnp.maximum(st.block, 0) * own
  keys = jax.vmap(lambda seed, n: jax.random.fold_in(jax.random.key(seed), n))(st.seed, st.steps)
  full_len = fw.p + fw.lg
  dup = (lambda a: jnp.concatenate([a, a])) if cfg.guidance else (lambda a: a)  # noqa: E731
  if cfg.cache is None:
    h, cache = fw.full()
    q_len = jnp.full((b,), full_len)
  elif cfg.cache == "dllm":
    # the original's step counter: forwards since the request started, from 1 (st.steps is that - 1)
    rp = active & (st.steps % row_params.prompt_interval == 0)
    rg = active & (st.steps % row_params.gen_interval == 0)
    forms = ((rp & rg, True, True, full_len), (rg & ~rp, False, True, fw.lg),
             (rp & ~rg, True, False, fw.p + fw.slots), (active & ~rp & ~rg, False, False, fw.slots))
    h = jnp.zeros((fw.b * fw.mult, bl, fw.llm.cfg.hidden_size), fw.llm.dtype)
    cache, q_len = st.cache, jnp.zeros((b,), jnp.int32)
    for rows, prompt_q, gen_all, n in forms:  # each form only when some row takes it; rows pick their own
      pick = dup(rows)
      h_f, cache = jax.lax.cond(jnp.any(rows), lambda c: fw.dllm(c, pick, prompt_q, gen_all),
                                lambda c: (jnp.zeros_like(h), c), cache)
      h = jnp.where(pick[:, None, None], h_f, h)
      q_len = jnp.where(rows, n, q_len)
  else:
    refresh = active & (st.block_step % row_params.refresh == 0)
    pick = dup(refresh)

    # full passes for the refreshing rows (their cache rows replaced in place), then windows for the others
    # (which see their own, untouched cache rows); each pass only when some row needs it
    h_shape = jax.eval_shape(lambda c: fw.window(c, pick), st.cache)
    zeros = jnp.zeros(h_shape.shape, h_shape.dtype)
    h_full, cache = jax.lax.cond(jnp.any(refresh), lambda c: fw.full(c, pick), lambda c: (zeros, c), st.cache)
    h_win = jax.lax.cond(jnp.any(active & ~refresh), lambda: fw.window(cache, dup(active & ~refresh)), lambda: zeros)
    h = jnp.where(pick[:, None, None], h_full, h_win)
    q_len = jnp.where(refresh, full_len, fw.window_len)
  # eligible = masked, before the block end or, once a stop was found, before the stop (inside the block)
  j = jnp.arange(g)[None]
  in_blk = (j >= s[:, None]) & (j < (s + own)[:, None])
  ans = st.response[:, :g]
  masked = ans == cfg.mask_id
  limit = jnp.minimum(st.stop, s + own)
  eligible = active[:, None] & masked & in_blk & (j < limit[:, None])
  blk = s[:, None] + jnp.arange(bl)[None]  # the block's positions, [B, bl] (past the row's own: never eligible)
  eligible_blk = jnp.take_along_axis(eligible, jnp.minimum(blk, g - 1), axis=1) & (blk < g)
  # the decision on the eligible positions only, in the smallest static length that holds them
  x0_q, conf_q, head_q = decode.decide_block(
      h, eligible_blk, s, fw.llm.lm_head[...], keys, row_params.temperature, row_params.cfg_scale,
      row_params.random_remask,
      sizes=decode.ladder(bl, cfg.head_rungs), banned_ids=cfg.banned_ids,
      chunk=cfg.vocab_chunk or decode.chunk_size(fw.llm.lm_head.shape[1]), guidance=cfg.guidance, dtype=fw.llm.dtype)
  # the block [s, s + bl) of each row -> answer space [B, G]
  q = jnp.clip(j - s[:, None], 0, bl - 1)
  x0 = jnp.take_along_axis(x0_q, q, axis=1)
  conf = jnp.take_along_axis(conf_q, q, axis=1)
  k = jnp.take_along_axis(st.counts, jnp.minimum(st.block_step, bl - 1)[:, None], axis=1)[:, 0]
  k = jnp.where(st.block_step < bl, k, 0)
  chosen = decode.select(conf, eligible, k, row_params.mode, row_params.value)
  ans = jnp.where(chosen, x0, ans)
  occ = decode.first_occurrences(ans, st.stop_ids, st.stop_lens)
  stop = jnp.where(active, decode.update_stop(st.stop, occ, row_params.original_stops, g), st.stop)
  act = active.astype(jnp.int32)
  passes = 1 + (row_params.cfg_scale > 0).astype(jnp.int32) if cfg.guidance else 1
  st = st.replace(response=st.response.at[:, :g].set(ans),
                  commit_step=jnp.where(chosen, st.steps[:, None], st.commit_step), stop=stop,
                  nfe=st.nfe + act * passes, steps=st.steps + act, query_tokens=st.query_tokens + act * passes * q_len,
                  head_tokens=st.head_tokens + act * head_q, block_step=st.block_step + act, cache=cache)
  return _normalize(st, cfg)


def _advance(graphdef, cfg: EngineConfig, weights, st: EngineState, max_steps) -> EngineState:
  TRACE_COUNTS["advance", cfg] += 1
  model = nnx.merge(graphdef, weights)
  st = by_row(st.replace(live=st.live & ~st.done))  # rows finished before this call are free now

  def cond(c):
    n, st = c
    return (n < max_steps) & jnp.any(st.live & ~st.done) & ~jnp.any(st.live & st.done)

  _, st = jax.lax.while_loop(cond, lambda c: (c[0] + 1, _step(model, cfg, c[1])), (jnp.int32(0), st))
  return st


def _encode(graphdef, weights, pixels):
  """The vision tower and projector: uint8 tiles [N, S, S, 3] -> features [N, tile tokens, D]."""
  TRACE_COUNTS["encode", pixels.shape[0]] += 1
  return nnx.merge(graphdef, weights).encode_tiles(pixels)


def _drop(st: EngineState, row) -> EngineState:
  """Frees a running row (its request was abandoned): `advance` no longer steps it."""
  return st.replace(live=st.live.at[row].set(False))


drop = jax.jit(_drop, donate_argnums=(0,))
insert = jax.jit(_insert, static_argnums=(0, 1), donate_argnums=(3,))
advance = jax.jit(_advance, static_argnums=(0, 1), donate_argnums=(3,))
encode = jax.jit(_encode, static_argnums=(0,))
