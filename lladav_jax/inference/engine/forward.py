"""The model passes of one denoising step: the whole sequence, a window against the prefix / dual KV cache,
or one of dLLM-Cache's four forms; each gives the hidden states of every row's current block."""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import struct

from lladav_jax.inference.engine.config import EngineConfig
from lladav_jax.inference.engine.dllm_cache import DllmCache, layer as dllm_layer
from lladav_jax.inference.engine.state import EngineState
from lladav_jax.model import common
from lladav_jax.model.llm import KVCache


@struct.dataclass
class PassRows:
  """The rows of a pass (R = B, or 2B with CFG: [cond; uncond]) as the layers read them."""
  prompt_emb: jax.Array  # [R, P, D]; the unconditional rows see the mask embedding at every prompt position
  prompt_valid: jax.Array  # bool [R, P]
  prompt_positions: jax.Array  # int32 [R, P]
  response: jax.Array  # int32 [R, G + Ls]: answer, then suffix
  response_positions: jax.Array  # int32 [R, G + Ls]: RoPE positions (the suffix right after the row's answer)
  response_valid: jax.Array  # bool [R, G + Ls]: answer columns < the row's answer length, the suffix's length
  block_start: jax.Array  # int32 [R]: the current block's first answer column
  block_length: jax.Array  # int32 [R]: the row's own block length (<= the engine's max_block_length)
  recompute: jax.Array  # int32 [R]: dllm: response positions recomputed at a step without refresh


def _segments(keymask, q_len):
  """Segment ids of a pass: every query attends the row's attendable keys (one segment, id 1); keys
  outside `keymask` (padding, positions not yet valid) are id 0."""
  return jnp.ones((keymask.shape[0], q_len), jnp.int32), keymask.astype(jnp.int32)


class Forward:
  """The model passes of one step over R rows (R = 2B with CFG, stacked [cond; uncond]). `full`: the
  whole sequence (its K/V replace the cache's rows where `pick`); `window`: a window from each row's
  block start against the cache. Both give the hidden states of each row's current block [R, bl, D], bl the
  engine's max_block_length (a row's positions past its own block length are there, never committed).
  With `EngineConfig.forward_rows` the passes run on groups of that many rows in turn (the cache
  updated in place), so that the temporaries are those of one group."""

  def __init__(self, model, cfg: EngineConfig, st: EngineState):
    self.llm, self.cfg = model.llm, cfg
    llm = self.llm
    self.b, self.p = st.prompt_valid.shape
    self.g = st.commit_step.shape[1]
    self.lg = st.response.shape[1]
    self.bl = cfg.max_block_length
    col = jnp.arange(self.lg)
    glen = st.row_params.answer_len[:, None]
    # answer columns < the row's answer length, then the suffix right after them (RoPE positions)
    col_valid = jnp.where(col < self.g, col < glen, (col - self.g) < st.suffix_len[:, None])
    gen_pos = st.prompt_len[:, None] + jnp.where(col < self.g, col, glen + col - self.g)
    emb = st.prompt_emb
    self.mult = 2 if cfg.guidance else 1
    if cfg.guidance:  # unconditional pass: the mask embedding at every prompt position, images included
      mask_emb = llm.embed_tokens(jnp.full((1, 1), cfg.mask_id, jnp.int32)).astype(emb.dtype)
      emb = jnp.concatenate([emb, jnp.where(st.prompt_valid[..., None], mask_emb, emb)])
    x = lambda a: jnp.concatenate([a, a]) if cfg.guidance else a  # noqa: E731
    self.active = x(st.live & ~st.done)
    # dllm: recompute slots (static) and the ones each row uses: int(len(response) * ratio), as the original
    self.slots = max(1, int(cfg.max_transfer_ratio * self.lg))
    n_use = jnp.floor(st.row_params.transfer_ratio * (glen[:, 0] + st.suffix_len)).astype(jnp.int32)
    self.rows = PassRows(prompt_emb=emb, prompt_valid=x(st.prompt_valid), prompt_positions=x(st.prompt_positions),
                         response=x(st.response), response_positions=x(gen_pos), response_valid=x(col_valid),
                         block_start=x(jnp.maximum(st.block, 0) * st.row_params.block_length),
                         block_length=x(st.row_params.block_length), recompute=x(jnp.minimum(n_use, self.slots)))

  @property
  def window_len(self) -> int:
    return {None: 0, "prefix": self.lg, "dual": self.bl}[self.cfg.cache]

  def _grouped(self, fn, cache, pick, need=None):
    """fn(rows, cache, row0, sel) -> (h [r, bl, D], cache) over groups of r rows in turn, row0 the group's
    first cache row, sel [r] the rows whose cache rows take the new values (fn writes them in place).
    A group with no row that needs the pass (`need`; default: `pick`, else the running rows) is skipped
    at run time: the work of a pass follows the rows that run, not the rows an engine has."""
    r = self.b * self.mult
    k = self.cfg.forward_rows or r
    if r % k:
      raise ValueError(f"forward_rows={k} does not divide the {r} rows of a pass")
    pick = jnp.ones((r,), bool) if pick is None else pick
    need = (pick & self.active) if need is None else need

    def one(i, cache):
      take = lambda a: jax.lax.dynamic_slice_in_dim(a, i * k, k)  # noqa: E731
      return fn(jax.tree.map(take, self.rows), cache, i * k, take(pick))

    if k == r:
      return one(0, cache)
    h0 = jax.eval_shape(lambda c: one(0, c)[0], cache)

    def body(i, carry):
      h_all, cache = carry
      h, cache = jax.lax.cond(jnp.any(jax.lax.dynamic_slice_in_dim(need, i * k, k)), one,
                              lambda i, c: (jnp.zeros(h0.shape, h0.dtype), c), i, cache)
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
    idx = (self.p if start is None else start) + rw.block_start[:, None] + jnp.arange(self.bl)[None]
    return jnp.take_along_axis(h, jnp.minimum(idx, h.shape[1] - 1)[..., None], axis=1)  # past the end: not committed

  def _sequence(self, rw):
    """Embeddings, RoPE positions and key mask of [prompt | response]."""
    x = jnp.concatenate([rw.prompt_emb, self.llm.embed_tokens(rw.response)], axis=1)
    pos = jnp.concatenate([rw.prompt_positions, rw.response_positions], axis=1)
    return x, pos, jnp.concatenate([rw.prompt_valid, rw.response_valid], axis=1)

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
      kw = dict(pos_RS=pos, keymask_RS=keymask, n_use_R=rw.recompute, prompt_q=prompt_q, slots=slots)
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

  def window(self, cache: KVCache, need=None):
    """The query window of each row against its cached K/V (read only); `need`: the rows that take it
    (default: the running ones)."""
    llm, lg, bl, mode, mask_id = self.llm, self.lg, self.bl, self.cfg.cache, self.cfg.mask_id

    def fn(rw, cache, row0, sel):
      s, col_valid = rw.block_start[:, None], rw.response_valid
      col = jnp.arange(lg)[None]
      if mode == "prefix":  # columns [s, s + lg); past the end: key-masked padding
        q_col = s + jnp.arange(lg)[None]
        qc = jnp.minimum(q_col, lg - 1)
        q_valid = (q_col < lg) & jnp.take_along_axis(col_valid, qc, axis=1)
        cached = col_valid & (col < s)
        q_pos = jnp.take_along_axis(rw.response_positions, qc, axis=1) + jnp.maximum(q_col - (lg - 1), 0)
      else:  # dual: only the row's block [s, s + its length); every other position comes from the cache
        q_col = s + jnp.arange(bl)[None]
        own = rw.block_length[:, None]
        qc = jnp.minimum(q_col, lg - 1)
        q_valid = (q_col < s + own) & (q_col < lg)  # the window past the row's block: key-masked padding
        cached = col_valid & ((col < s) | (col >= s + own))
        q_pos = jnp.take_along_axis(rw.response_positions, qc, axis=1)
      q_tok = jnp.where(q_valid, jnp.take_along_axis(rw.response, qc, axis=1), mask_id)
      keymask = jnp.concatenate([rw.prompt_valid, cached, q_valid], axis=1)  # the cache's keys, then the window's

      def body(block, x, rows, _):
        return block(x, q_pos, *_segments(keymask, x.shape[1]), (rows.k, rows.v))[0], None

      h, _ = self._layers(body, llm.embed_tokens(q_tok), cache, row0, sel)
      return h[:, :bl], cache

    return self._grouped(fn, cache, None, need)[0]
