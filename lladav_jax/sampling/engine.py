"""The masked-diffusion sampler as an engine of rows, each at its own place in its own request.

    state = init(graphdef, cfg, params, shapes)          # empty rows
    state = insert(graphdef, cfg, params, state, row, request)   # vision tower + prompt, row reset
    state = advance(graphdef, cfg, params, state, max_steps)     # one jitted lax.while_loop
    state = drop(state, row)                             # an abandoned row stops running

`advance` runs denoising steps over every row until `max_steps` or until a row finishes (returns
then, so that the host reads the row out and refills it: continuous batching). A row that finished
stays readable until the next `advance`, which frees it. Only shapes (`EngineShapes`) and
`EngineConfig` (token ids, block length, cache mode, CFG on/off) are static; each row carries its
own prompt length, answer length, block index, step within the block, step counts, stop, RNG seed
and settings (`RowSettings`), so a request's tokens do not depend on its batch neighbours or on
when it arrived (its random stream is key(seed) folded with its own step count).

Each row follows the original's `generate_with_embeds` (REFERENCE.md sections 6 and 13):
  * blocks [s, s + block_length) in order; a block starts with the counts of its masked positions
    (`RowSettings.table`); the row leaves it after `steps_per_block` steps (threshold / factor:
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
unboundedly many; each rung is another copy of the decision to compile, ~1-2 s an engine program on
config.tiny's CPU compile);
threshold / factor decoding, which empties a block faster, saves more. The rung is the largest over
the running rows, so one row at the start of its block keeps its neighbours at the whole block; a
position's decision does not depend on the rung (its noise is a function of the row's key and its
absolute answer position, `decode.py`), so neither do the tokens. `head_tokens` counts Q' per row.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx, struct

from lladav_jax import sharding as shd
from lladav_jax.batch import ModelInputs
from lladav_jax.model.llm import KVCache
from lladav_jax.model import common
from lladav_jax.sampling import decode
from lladav_jax.sampling.dllm_cache import DllmCache, FeatureCache, layer as dllm_layer
from lladav_jax.sampling.settings import EngineConfig, RowSettings

# Traces of the engine's jitted functions, by name and static config (tests count them).
TRACE_COUNTS: collections.Counter = collections.Counter()


@dataclasses.dataclass(frozen=True)
class EngineShapes:
  """The buckets: rows, prompt positions, answer positions (a multiple of the block length), suffix
  positions, stop sequences and their longest length."""
  rows: int
  prompt_len: int
  answer_len: int
  suffix_len: int = 0
  stops: int = 1
  stop_len: int = 1


@struct.dataclass
class SamplerInputs:
  """A prepared batch of prompts (host side; `generation.requests` turns its live rows into
  `Request`s). Prompts are left-padded (all end at column P)."""
  prompt: ModelInputs  # [B, P]; positions 0 at each sample's first real token
  suffix: jax.Array  # int32 [B, Ls]; fixed tokens after the answer (Ls may be 0)
  stop_ids: jax.Array  # int32 [B, NS, LS]; stop sequences, in order
  stop_lens: jax.Array  # int32 [B, NS]; 0 = unused slot
  seeds: jax.Array  # uint32 [B]
  live: jax.Array  # bool [B]; False = a padding row


@struct.dataclass
class Request:
  """One row's request (no row axis): a left-padded prompt of the engine's prompt bucket (any tile
  count), a suffix of the suffix bucket with its length, stop sequences, seed, settings."""
  prompt: ModelInputs
  suffix: jax.Array  # int32 [Ls]
  suffix_len: jax.Array  # int32
  stop_ids: jax.Array  # int32 [NS, LS]
  stop_lens: jax.Array  # int32 [NS]; 0 = unused slot
  seed: jax.Array  # uint32
  settings: RowSettings


@struct.dataclass
class EngineState:
  prompt_emb: jax.Array  # [B, P, D] prompt embeddings, image features spliced in
  valid: jax.Array  # bool [B, P]
  pos: jax.Array  # int32 [B, P]
  plen: jax.Array  # int32 [B] real prompt positions
  gen: jax.Array  # int32 [B, G + Ls]: answer bucket, then suffix bucket
  suffix_len: jax.Array  # int32 [B]
  stop_ids: jax.Array
  stop_lens: jax.Array
  seed: jax.Array  # uint32 [B]
  rs: RowSettings  # [B] values
  live: jax.Array  # bool [B]: holds a request
  done: jax.Array  # bool [B]: finished
  block: jax.Array  # int32 [B]
  i: jax.Array  # int32 [B]: step within the block
  counts: jax.Array  # int32 [B, bl]: this block's per-step counts
  stop: jax.Array  # int32 [B]: earliest stop start in the answer, G if none
  commit_step: jax.Array  # int32 [B, G]: the row's step that committed each position, -1 if none
  nfe: jax.Array  # int32 [B]
  steps: jax.Array  # int32 [B]
  query_tokens: jax.Array  # int32 [B]
  head_tokens: jax.Array  # int32 [B]: the decision's length (positions through the LM head) summed over steps
  cache: Optional[KVCache | DllmCache]  # [layers, B (x2 with CFG), P + G + Ls (dllm: P and G + Ls), ...]


def _by_row(tree):
  """Per-row state stays sharded by row, as the activations are (a no-op off a mesh)."""
  return jax.tree.map(lambda x: shd.constrain(x, ("activation_batch",) + (None,) * (x.ndim - 1)) if x.ndim else x,
                      tree)


# ----------------------------------------------------------------------------- forward passes

def _segments(keymask, q_len):
  """Segment ids of a pass: every query attends the row's attendable keys (one segment, id 1); keys
  outside `keymask` (padding, positions not yet valid) are id 0."""
  return jnp.ones((keymask.shape[0], q_len), jnp.int32), keymask.astype(jnp.int32)


class Forward:
  """The model passes of one step over R rows (R = 2B with CFG, stacked [cond; uncond]). `full`: the
  whole sequence (its K/V replace the cache's rows where `pick`); `window`: a window from each row's
  block start against the cache. Both give the hidden states of each row's current block [R, bl, D].
  With `EngineConfig.forward_rows` the passes run on groups of that many rows in turn (the cache
  updated in place), so that the temporaries are those of one group."""

  def __init__(self, model, cfg: EngineConfig, st: EngineState):
    self.llm, self.cfg = model.llm, cfg
    llm = self.llm
    self.b, self.p = st.valid.shape
    self.g = st.commit_step.shape[1]
    self.lg = st.gen.shape[1]
    self.bl = cfg.block_length
    col = jnp.arange(self.lg)
    glen = st.rs.answer_len[:, None]
    # answer columns < the row's answer length, then the suffix right after them (RoPE positions)
    col_valid = jnp.where(col < self.g, col < glen, (col - self.g) < st.suffix_len[:, None])
    gen_pos = st.plen[:, None] + jnp.where(col < self.g, col, glen + col - self.g)
    emb = st.prompt_emb
    self.mult = 2 if cfg.cfg else 1
    if cfg.cfg:  # unconditional pass: the mask embedding at every prompt position, images included
      mask_emb = llm.embed_tokens(jnp.full((1, 1), cfg.mask_id, jnp.int32)).astype(emb.dtype)
      emb = jnp.concatenate([emb, jnp.where(st.valid[..., None], mask_emb, emb)])
    x = lambda a: jnp.concatenate([a, a]) if cfg.cfg else a  # noqa: E731
    # dllm: recompute slots (static) and the ones each row uses: int(len(response) * ratio), as the original
    self.slots = max(1, int(cfg.max_transfer_ratio * self.lg))
    n_use = jnp.floor(st.rs.transfer_ratio * (glen[:, 0] + st.suffix_len)).astype(jnp.int32)
    self.rows = dict(emb=emb, valid=x(st.valid), pos=x(st.pos), gen=x(st.gen), gen_pos=x(gen_pos),
                     col_valid=x(col_valid), s=x(jnp.maximum(st.block, 0) * self.bl),
                     n_use=x(jnp.minimum(n_use, self.slots)))

  @property
  def window_len(self) -> int:
    return {None: 0, "prefix": self.lg, "dual": self.bl}[self.cfg.cache]

  def _grouped(self, fn, cache, pick):
    """fn(rows, cache, row0, sel) -> (h [r, bl, D], cache) over groups of r rows in turn, row0 the group's
    first cache row, sel [r] the rows whose cache rows take the new values (fn writes them in place)."""
    r = self.b * self.mult
    k = self.cfg.forward_rows or r
    if r % k:
      raise ValueError(f"forward_rows={k} does not divide the {r} rows of a pass")
    pick = jnp.ones((r,), bool) if pick is None else pick

    def one(i, cache):
      take = lambda a: jax.lax.dynamic_slice_in_dim(a, i * k, k)  # noqa: E731
      return fn(jax.tree.map(take, self.rows), cache, i * k, take(pick))

    if k == r:
      return one(0, cache)
    h0 = jax.eval_shape(lambda c: one(0, c)[0], cache)

    def body(i, carry):
      h_all, cache = carry
      h, cache = one(i, cache)
      return jax.lax.dynamic_update_slice_in_dim(h_all, h, i * k, axis=0), cache

    h_all = jnp.zeros((r,) + h0.shape[1:], h0.dtype)
    return jax.lax.fori_loop(0, r // k, body, (h_all, cache))

  def _layers(self, body, x, cache, row0, sel, const=None):
    """body(block, x, rows, const rows) -> (x, new rows or None) over the stacked layers, `cache` carried
    through them: `rows` are this layer's rows of the group [r, ...] of `cache` (new rows go back where
    `sel`, in place: no per-layer outputs stacked beside the cache) and of `const` (read only).
    Returns the final-normed x and the cache."""
    llm = self.llm
    r = sel.shape[0]

    def step(block, carry, l):
      x, cache = carry
      at = lambda a: (l, row0) + (0,) * (a.ndim - 2)  # noqa: E731
      read = lambda t: jax.tree.map(lambda a: jax.lax.dynamic_slice(a, at(a), (1, r) + a.shape[2:])[0], t)  # noqa
      rows = read(cache)
      x, new = body(block, x, rows, read(const))
      if new is not None:
        cache = jax.tree.map(lambda a, n, o: jax.lax.dynamic_update_slice(
            a, jnp.where(sel.reshape((r,) + (1,) * (a.ndim - 2)), n.astype(a.dtype), o)[None], at(a)),
            cache, new, rows)
      return (x, cache), None

    (x, cache), _ = common.run_stacked(llm.layers, step, (x.astype(llm.dtype), cache), jnp.arange(llm.cfg.num_layers),
                                       scan=llm.scan_layers, remat_policy=llm.remat_policy)
    return common.rms_norm(x, llm.final_norm[...], llm.cfg.rms_norm_eps), cache

  def _block_rows(self, h, rw, start: Optional[int] = None):
    """The hidden states of each row's current block [r, bl, D] of h over [prompt | response] (h over
    the response only: `start` = 0)."""
    idx = (self.p if start is None else start) + rw["s"][:, None] + jnp.arange(self.bl)[None]
    return jnp.take_along_axis(h, idx[..., None], axis=1)

  def _sequence(self, rw):
    """Embeddings, RoPE positions and key mask of [prompt | response]."""
    x = jnp.concatenate([rw["emb"], self.llm.embed_tokens(rw["gen"])], axis=1)
    pos = jnp.concatenate([rw["pos"], rw["gen_pos"]], axis=1)
    return x, pos, jnp.concatenate([rw["valid"], rw["col_valid"]], axis=1)

  def full(self, cache=None, pick=None):
    """Every position; with a cache, its rotated K/V go into the cache rows where `pick`."""
    llm = self.llm

    def fn(rw, cache, row0, sel):
      x, pos, keymask = self._sequence(rw)
      if cache is None:
        return self._block_rows(llm(x, pos, *_segments(keymask, x.shape[1])), rw), None

      def body(block, x, rows, _):
        x, kv = block(x, pos, *_segments(keymask, x.shape[1]))
        return x, KVCache(*kv)

      h, cache = self._layers(body, x, cache, row0, sel)
      return self._block_rows(h, rw), cache

    return self._grouped(fn, cache, pick)

  def dllm(self, cache: DllmCache, pick, prompt_q: bool, gen_all: bool):
    """dLLM-Cache: one of its four layer forms (dllm_cache.layer) over every layer; the cache rows
    where `pick` take the new features. Without a prompt refresh only the response's stream and
    features move (the prompt's arrays are read only)."""
    slots = None if gen_all else self.slots

    def fn(rw, cache, row0, sel):
      x, pos, keymask = self._sequence(rw)
      kw = dict(pos_RS=pos, keymask_RS=keymask, n_use_R=rw["n_use"], prompt_q=prompt_q, slots=slots)
      if prompt_q:
        def body(block, x, rows, _):
          x, (new_p, new_r) = dllm_layer(block, x, rows.prompt, rows.response, **kw)
          return x, DllmCache(new_p, new_r)

        h, cache = self._layers(body, x, cache, row0, sel)
        return self._block_rows(h, rw), cache

      def body_r(block, x, rows, prompt_rows):
        return dllm_layer(block, x, prompt_rows, rows, **kw)

      h, resp = self._layers(body_r, x[:, self.p:], cache.response, row0, sel, const=cache.prompt)
      return self._block_rows(h, rw, 0), cache.replace(response=resp)

    return self._grouped(fn, cache, pick)

  def window(self, cache: KVCache):
    """The query window of each row against its cached K/V (read only)."""
    llm, lg, bl, mode, mask_id = self.llm, self.lg, self.bl, self.cfg.cache, self.cfg.mask_id

    def fn(rw, cache, row0, sel):
      s, col_valid = rw["s"][:, None], rw["col_valid"]
      col = jnp.arange(lg)[None]
      if mode == "prefix":  # columns [s, s + lg); past the end: key-masked padding
        q_col = s + jnp.arange(lg)[None]
        qc = jnp.minimum(q_col, lg - 1)
        q_valid = (q_col < lg) & jnp.take_along_axis(col_valid, qc, axis=1)
        cached = col_valid & (col < s)
        q_pos = jnp.take_along_axis(rw["gen_pos"], qc, axis=1) + jnp.maximum(q_col - (lg - 1), 0)
      else:  # dual: only the block [s, s + bl); every other position comes from the cache
        qc = s + jnp.arange(bl)[None]
        q_valid = jnp.ones(qc.shape, bool)
        cached = col_valid & ((col < s) | (col >= s + bl))
        q_pos = jnp.take_along_axis(rw["gen_pos"], qc, axis=1)
      q_tok = jnp.where(q_valid, jnp.take_along_axis(rw["gen"], qc, axis=1), mask_id)
      keymask = jnp.concatenate([rw["valid"], cached, q_valid], axis=1)  # the cache's keys, then the window's

      def body(block, x, rows, _):
        return block(x, q_pos, *_segments(keymask, x.shape[1]), (rows.k, rows.v))[0], None

      h, _ = self._layers(body, llm.embed_tokens(q_tok), cache, row0, sel)
      return h[:, :bl], cache

    return self._grouped(fn, cache, None)[0]


# ----------------------------------------------------------------------------- row bookkeeping

def _normalize(st: EngineState, cfg: EngineConfig) -> EngineState:
  """Moves each running row to the block its next step works on, or marks it done (idempotent)."""
  bl, g = cfg.block_length, st.commit_step.shape[1]
  j = jnp.arange(g)[None]
  masked = (st.gen[:, :g] == cfg.mask_id) & (j < st.rs.answer_len[:, None])

  def in_block(block):
    s = (block * bl)[:, None]
    return masked & (j >= s) & (j < s + bl)

  running = st.live & ~st.done
  found = st.stop < g
  limit = jnp.where(st.rs.mode == 0, st.rs.steps_per_block, bl)
  leave = ((st.i >= limit) | ~jnp.any(in_block(st.block), axis=-1)
           | (found & ~jnp.any(masked & (j < st.stop[:, None]), axis=-1)))
  leave = running & leave
  block = st.block + leave
  done = st.done | (running & ((block * bl >= st.rs.answer_len) | (found & (st.stop <= block * bl))))
  n = jnp.sum(in_block(block), axis=-1)
  counts = jnp.where(leave[:, None], jnp.take_along_axis(st.rs.table, n[:, None, None], axis=1)[:, 0], st.counts)
  return st.replace(block=block, i=jnp.where(leave, 0, st.i), counts=counts, done=done)


# ----------------------------------------------------------------------------- the engine

def _init(graphdef, cfg: EngineConfig, shapes: EngineShapes, params) -> EngineState:
  TRACE_COUNTS["init", cfg] += 1
  model = nnx.merge(graphdef, params)
  c = model.llm.cfg
  b, p, g, ls, bl = shapes.rows, shapes.prompt_len, shapes.answer_len, shapes.suffix_len, cfg.block_length
  if g % bl:
    raise ValueError(f"answer bucket {g} is not a multiple of block_length={bl}")
  i32 = lambda *s: jnp.zeros(s, jnp.int32)  # noqa: E731
  f32 = lambda *s: jnp.zeros(s, jnp.float32)  # noqa: E731
  rs = RowSettings(answer_len=i32(b), steps_per_block=i32(b), table=i32(b, bl + 1, bl), temperature=f32(b),
                   cfg_scale=f32(b), random_remask=jnp.zeros((b,), bool), mode=i32(b), value=f32(b),
                   refresh=jnp.ones((b,), jnp.int32), prompt_interval=jnp.ones((b,), jnp.int32),
                   gen_interval=jnp.ones((b,), jnp.int32), transfer_ratio=f32(b), original_stops=jnp.zeros((b,), bool))
  cache = None
  if cfg.cache is not None:
    r, s = b * (2 if cfg.cfg else 1), p + g + ls
    z = jnp.zeros((c.num_layers, r, s, c.num_kv_heads, c.head_dim), model.llm.dtype)
    cache = KVCache(z, z)
    if cfg.cache == "dllm":
      seg = lambda n: FeatureCache(*(jnp.zeros((c.num_layers, r, n) + tail, model.llm.dtype)  # noqa: E731
                                     for tail in [(c.num_kv_heads, c.head_dim)] * 2 + [(c.hidden_size,)] * 2))
      cache = DllmCache(seg(p), seg(g + ls))
  st = EngineState(prompt_emb=jnp.zeros((b, p, c.hidden_size), model.llm.dtype), valid=jnp.zeros((b, p), bool),
                   pos=i32(b, p), plen=i32(b), gen=jnp.full((b, g + ls), cfg.mask_id, jnp.int32), suffix_len=i32(b),
                   stop_ids=jnp.full((b, shapes.stops, shapes.stop_len), -1, jnp.int32), stop_lens=i32(b, shapes.stops),
                   seed=jnp.zeros((b,), jnp.uint32), rs=rs, live=jnp.zeros((b,), bool), done=jnp.zeros((b,), bool),
                   block=i32(b), i=i32(b), counts=i32(b, bl), stop=jnp.full((b,), g, jnp.int32),
                   commit_step=jnp.full((b, g), -1, jnp.int32), nfe=i32(b), steps=i32(b), query_tokens=i32(b),
                   head_tokens=i32(b),
                   cache=None)
  return _by_row(st).replace(cache=cache)


def _insert(graphdef, cfg: EngineConfig, params, st: EngineState, row, req: Request) -> EngineState:
  TRACE_COUNTS["insert", cfg] += 1
  model = nnx.merge(graphdef, params)
  pr = req.prompt
  if pr.tokens.shape[0] != st.valid.shape[1]:
    raise ValueError(f"the request's prompt has {pr.tokens.shape[0]} positions but the engine's bucket is "
                     f"{st.valid.shape[1]}")
  emb = model.embed(pr.tokens[None], pr.pixels[None], pr.merge_idx[None], pr.merge_w[None])[0]
  g = st.commit_step.shape[1]
  gen = jnp.concatenate([jnp.full((g,), cfg.mask_id, jnp.int32), req.suffix.astype(jnp.int32)])
  put = lambda a, v: a.at[row].set(jnp.asarray(v, a.dtype))  # noqa: E731
  st = st.replace(
      prompt_emb=put(st.prompt_emb, emb), valid=put(st.valid, pr.valid), pos=put(st.pos, pr.positions),
      plen=put(st.plen, jnp.sum(pr.valid)), gen=put(st.gen, gen), suffix_len=put(st.suffix_len, req.suffix_len),
      stop_ids=put(st.stop_ids, req.stop_ids), stop_lens=put(st.stop_lens, req.stop_lens),
      seed=put(st.seed, req.seed), rs=jax.tree.map(put, st.rs, req.settings), live=put(st.live, True),
      done=put(st.done, False), block=put(st.block, -1), i=put(st.i, 0), stop=put(st.stop, g),
      commit_step=put(st.commit_step, -1), nfe=put(st.nfe, 0), steps=put(st.steps, 0),
      query_tokens=put(st.query_tokens, 0), head_tokens=put(st.head_tokens, 0))
  return _normalize(st, cfg)


def _step(model, cfg: EngineConfig, st: EngineState) -> EngineState:
  """One denoising step of every running row."""
  st = _by_row(st)
  fw = Forward(model, cfg, st)
  b, g, bl = fw.b, fw.g, fw.bl
  active = st.live & ~st.done
  s = jnp.maximum(st.block, 0) * bl
  keys = jax.vmap(lambda seed, n: jax.random.fold_in(jax.random.key(seed), n))(st.seed, st.steps)
  full_len = fw.p + fw.lg
  dup = (lambda a: jnp.concatenate([a, a])) if cfg.cfg else (lambda a: a)  # noqa: E731
  if cfg.cache is None:
    h, cache = fw.full()
    q_len = jnp.full((b,), full_len)
  elif cfg.cache == "dllm":
    # the original's step counter: forwards since the request started, from 1 (st.steps is that - 1)
    rp = active & (st.steps % st.rs.prompt_interval == 0)
    rg = active & (st.steps % st.rs.gen_interval == 0)
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
    refresh = active & (st.i % st.rs.refresh == 0)
    pick = dup(refresh)

    # full passes for the refreshing rows (their cache rows replaced in place), then windows for the others
    # (which see their own, untouched cache rows); each pass only when some row needs it
    h_shape = jax.eval_shape(fw.window, st.cache)
    zeros = jnp.zeros(h_shape.shape, h_shape.dtype)
    h_full, cache = jax.lax.cond(jnp.any(refresh), lambda c: fw.full(c, pick), lambda c: (zeros, c), st.cache)
    h_win = jax.lax.cond(jnp.any(active & ~refresh), lambda: fw.window(cache), lambda: zeros)
    h = jnp.where(pick[:, None, None], h_full, h_win)
    q_len = jnp.where(refresh, full_len, fw.window_len)
  # eligible = masked, before the block end or, once a stop was found, before the stop (inside the block)
  j = jnp.arange(g)[None]
  in_blk = (j >= s[:, None]) & (j < s[:, None] + bl)
  ans = st.gen[:, :g]
  masked = ans == cfg.mask_id
  limit = jnp.minimum(st.stop, s + bl)
  eligible = active[:, None] & masked & in_blk & (j < limit[:, None])
  blk = s[:, None] + jnp.arange(bl)[None]  # the block's positions, [B, bl]
  eligible_blk = jnp.take_along_axis(eligible, jnp.minimum(blk, g - 1), axis=1) & (blk < g)
  # the decision on the eligible positions only, in the smallest static length that holds them
  x0_q, conf_q, head_q = decode.decide_block(
      h, eligible_blk, s, fw.llm.lm_head[...], keys, st.rs.temperature, st.rs.cfg_scale, st.rs.random_remask,
      sizes=decode.ladder(bl, cfg.head_rungs), banned_ids=cfg.banned_ids,
      chunk=cfg.vocab_chunk or decode.chunk_size(fw.llm.lm_head.shape[1]), cfg=cfg.cfg, dtype=fw.llm.dtype)
  # the block [s, s + bl) of each row -> answer space [B, G]
  q = jnp.clip(j - s[:, None], 0, bl - 1)
  x0 = jnp.take_along_axis(x0_q, q, axis=1)
  conf = jnp.take_along_axis(conf_q, q, axis=1)
  k = jnp.take_along_axis(st.counts, jnp.minimum(st.i, bl - 1)[:, None], axis=1)[:, 0]
  k = jnp.where(st.i < bl, k, 0)
  chosen = decode.select(conf, eligible, k, st.rs.mode, st.rs.value)
  ans = jnp.where(chosen, x0, ans)
  occ = decode.first_occurrences(ans, st.stop_ids, st.stop_lens)
  stop = jnp.where(active, decode.update_stop(st.stop, occ, st.rs.original_stops, g), st.stop)
  act = active.astype(jnp.int32)
  passes = 1 + (st.rs.cfg_scale > 0).astype(jnp.int32) if cfg.cfg else 1
  st = st.replace(gen=st.gen.at[:, :g].set(ans), commit_step=jnp.where(chosen, st.steps[:, None], st.commit_step),
                  stop=stop, nfe=st.nfe + act * passes, steps=st.steps + act,
                  query_tokens=st.query_tokens + act * passes * q_len, head_tokens=st.head_tokens + act * head_q,
                  i=st.i + act, cache=cache)
  return _normalize(st, cfg)


def _advance(graphdef, cfg: EngineConfig, params, st: EngineState, max_steps) -> EngineState:
  TRACE_COUNTS["advance", cfg] += 1
  model = nnx.merge(graphdef, params)
  st = _by_row(st.replace(live=st.live & ~st.done))  # rows finished before this call are free now

  def cond(c):
    n, st = c
    return (n < max_steps) & jnp.any(st.live & ~st.done) & ~jnp.any(st.live & st.done)

  _, st = jax.lax.while_loop(cond, lambda c: (c[0] + 1, _step(model, cfg, c[1])), (jnp.int32(0), st))
  return st


def _drop(st: EngineState, row) -> EngineState:
  """Frees a running row (its request was abandoned): `advance` no longer steps it."""
  return st.replace(live=st.live.at[row].set(False))


init = jax.jit(_init, static_argnums=(0, 1, 2))
drop = jax.jit(_drop, donate_argnums=(0,))
insert = jax.jit(_insert, static_argnums=(0, 1), donate_argnums=(3,))
advance = jax.jit(_advance, static_argnums=(0, 1), donate_argnums=(3,))
