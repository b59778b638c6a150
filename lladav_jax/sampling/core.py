"""The masked-diffusion sampler as ONE jitted function: vision once, then nested lax.while_loops.

`sample(graphdef, state, inputs, settings)` runs LLaDA-V's `generate_with_embeds` (REFERENCE.md
sections 6 and 13) for a batch of left-padded prompts:

  * prompt embeddings (image features spliced in) are computed once, before the loop; inside the
    loop only the answer (and suffix) tokens are embedded;
  * outer while_loop over blocks [s, e) of `block_length`, inner while_loop over the steps of a
    block; the batch shares the block index (a sample whose block is done idles, unchanged, until
    the others finish it), each sample keeps its own counts, stop position, NFE and step count;
  * per step: logits in float32; CFG as `un + (scale + 1) * (cond - un)` with the unconditional
    pass seeing the mask embedding at every prompt position (images included); banned ids at
    -inf; x0 = argmax (with Gumbel noise when temperature > 0); confidence = softmax probability
    of x0 (`low_confidence`) or U(0, 1) (`random`);
  * eligible positions: masked ones before the current block end, or, once a stop sequence was
    found, before the stop (suffix positions never); commit the top-k of the step's count;
  * after each commit the answer is searched for the stop sequences (`eot_id` always) and the
    stop is the earliest occurrence; a sample is finished once nothing masked remains before its
    stop; the loop ends when every sample is finished or the blocks are exhausted.

Documented deviations from the original:
  * float32 instead of float64 for the Gumbel noise and the softmax. The Gumbel-max is computed in
    log space, argmax(logits + T * Gumbel), which is the original's argmax(exp(logits) /
    (-log u)^T) without its overflow (exp of a float32 logit above 88 is inf); the confidence is
    exp(logit[x0] - logsumexp(logits)). At temperature 0 x0 is the plain argmax, as in the
    original. Random streams are JAX's (per sample: key(seed), folded with the sample's step).
  * where fewer positions are eligible than the step's count (only possible after a stop), only
    eligible positions are committed. The original's top-k then also commits masked positions
    beyond the stop at -inf confidence (in torch's tie order); they are cut from the output, but
    they are visible to later forwards, so rare outputs can differ. (Without that quirk every
    committed position lies before the current block end, so a stop is always found inside the
    current block and lifting the block limit after a stop never widens the eligible set; this
    is also why the dual cache, which only sees the current block, loses nothing there.)
  * ties in confidence are broken towards the lower position (torch's top-k order is unspecified).
Not a deviation: x0 may be the mask id itself; that position then stays masked, as in the
original (which finds masks by comparing embeddings with the mask embedding).

Accelerations (each a switch in SamplerSettings; NFE counts forward passes per sample, 2 per
step with CFG; `query_tokens` counts the positions run through the transformer):
  * threshold (Fast-dLLM `get_transfer_index`): commit every eligible position with
    conf >= threshold, and always the most confident one; the step counts are ignored and a
    block runs until it has no mask left.
  * factor (Fast-dLLM `get_transfer_index_dynamic`): with confidences sorted c_1 >= c_2 >= ...,
    commit the largest n with c_j >= 1 - factor / (j + 1) for all j <= n (j = 1 always passes).
    Fast-dLLM's loop also commits all when only the last candidate fails (an off-by-one that
    always commits both of the last two masks); that quirk is not reproduced.
  * cache="prefix" (Fast-dLLM prefix cache, as LLaDA-V's fast_dllm hook): a full forward at block
    start and every `refresh_interval` steps of a block stores the rotated K/V of the whole
    sequence; other steps run only a window of static length gen_length + suffix starting at the
    block start (positions past the end are key-masked padding) against the cached K/V of
    positions before the block start (prompt + committed answer). `refresh_interval` is passed
    to the compiled loop as a value (changing it does not recompile).
  * cache="dual" (Fast-dLLM DualCache): the same full forwards store all K/V; other steps run only
    the current block (static length block_length) against the cached K/V of every other
    position, the block's own stale K/V masked out (= replaced).
    Neither cache is exact: attention is bidirectional, so a cached position's K/V depend on
    tokens committed after it was cached. They are exact only when every step refreshes
    (refresh_interval=1) - or for a prompt cache under a prefix-LM mask (LaViDa), which LLaDA-V
    was not trained with. With CFG both passes are cached (the batch is stacked as [cond; uncond]).
  * schedule="shift": LaViDa's timestep-shift counts (see sampling/schedule.py).
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
from lladav_jax.sampling.schedule import count_table

NEG_INF = -jnp.inf
# Number of times the sampler body was traced, per static settings (tests assert no retrace per bucket).
TRACE_COUNTS: collections.Counter = collections.Counter()


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
  """Static sampler settings (hashable: a jit static argument). Token ids come from the tokenizer."""
  mask_id: int
  banned_ids: tuple = ()  # set to -inf at masked positions (the original: eos, bos, start/end header)
  eot_id: Optional[int] = None  # always a stop sequence
  gen_length: int = 128
  block_length: int = 128
  steps: int = 128
  temperature: float = 0.0
  remasking: str = "low_confidence"  # | "random"
  cfg_scale: float = 0.0
  threshold: Optional[float] = None
  factor: Optional[float] = None
  cache: Optional[str] = None  # None | "prefix" | "dual"
  refresh_interval: int = 32
  schedule: str = "uniform"  # | "shift"
  shift: float = 1 / 3

  @property
  def num_blocks(self) -> int:
    return self.gen_length // self.block_length

  @property
  def steps_per_block(self) -> int:
    return self.steps // self.num_blocks

  @property
  def parallel(self) -> bool:
    return self.threshold is not None or self.factor is not None

  def validate(self) -> "SamplerSettings":
    errs = []
    if self.gen_length <= 0 or self.block_length <= 0 or self.gen_length % self.block_length:
      errs.append(f"gen_length={self.gen_length} must be a positive multiple of block_length={self.block_length}")
    elif self.steps <= 0 or self.steps % self.num_blocks:
      errs.append(f"steps={self.steps} must be a positive multiple of the number of blocks {self.num_blocks}")
    if self.remasking not in ("low_confidence", "random"):
      errs.append(f"remasking={self.remasking!r} must be 'low_confidence' or 'random'")
    if self.threshold is not None and self.factor is not None:
      errs.append("give threshold or factor, not both")
    if self.cache not in (None, "prefix", "dual"):
      errs.append(f"cache={self.cache!r} must be None, 'prefix' or 'dual'")
    if self.refresh_interval < 1:
      errs.append(f"refresh_interval={self.refresh_interval} must be >= 1")
    if self.schedule not in ("uniform", "shift"):
      errs.append(f"schedule={self.schedule!r} must be 'uniform' or 'shift'")
    if self.schedule == "shift" and not self.shift > 0:
      errs.append(f"shift={self.shift} must be > 0")
    if self.temperature < 0 or self.cfg_scale < 0:
      errs.append("temperature and cfg_scale must be >= 0")
    if self.mask_id in self.banned_ids or self.mask_id == self.eot_id:
      errs.append("mask_id must be neither banned nor the eot id")
    if errs:
      raise ValueError("invalid sampler settings:\n  " + "\n  ".join(errs))
    return self


@struct.dataclass
class SamplerInputs:
  """One batch, all static shapes. Prompts are left-padded (all end at column P)."""
  prompt: ModelInputs  # [B, P]; positions 0 at each sample's first real token
  suffix: jax.Array  # int32 [B, Ls]; fixed tokens after the answer (Ls may be 0)
  stop_ids: jax.Array  # int32 [B, NS, LS]; extra stop sequences (eot_id is implicit)
  stop_lens: jax.Array  # int32 [B, NS]; 0 = unused slot
  seeds: jax.Array  # uint32 [B]
  live: jax.Array  # bool [B]; False = a padding row (finished from the start)


@struct.dataclass
class SamplerOutput:
  tokens: jax.Array  # int32 [B, G]; the answer positions (mask_id where never committed)
  stop: jax.Array  # int32 [B]; earliest stop-sequence start in the answer, G if none
  commit_step: jax.Array  # int32 [B, G]; the sample's step that committed each position, -1 if none
  nfe: jax.Array  # int32 [B]; forward evaluations (2 per step with CFG)
  steps: jax.Array  # int32 [B]; denoising steps taken
  query_tokens: jax.Array  # int32 [B]; positions run through the transformer, summed over forwards


@struct.dataclass
class _Carry:
  gen: jax.Array  # int32 [B, G + Ls]
  commit_step: jax.Array
  stop: jax.Array
  nfe: jax.Array
  steps: jax.Array
  query_tokens: jax.Array
  block: jax.Array  # int32 scalar
  i: jax.Array  # int32 scalar, step within the block
  counts: jax.Array  # int32 [B, S]: this block's schedule per sample
  cache: Optional[KVCache]


# ----------------------------------------------------------------------------- per-step pieces

def find_stop(ans_BG, stop_ids, stop_lens, eot_id):
  """Earliest start of any stop sequence in each answer row (G if none)."""
  b, g = ans_BG.shape
  pos = jnp.arange(g)
  best = jnp.full((b,), g, jnp.int32)
  if eot_id is not None:
    best = jnp.min(jnp.where(ans_BG == eot_id, pos, g), axis=-1).astype(jnp.int32)
  ns, ls = stop_ids.shape[1:]
  if ns and ls:
    match = jnp.broadcast_to(stop_lens[:, :, None] > 0, (b, ns, g))
    for t in range(ls):
      shifted = jnp.pad(ans_BG[:, t:], ((0, 0), (0, t)), constant_values=-1)[:, None, :]
      ok = (shifted == stop_ids[:, :, t, None]) | (t >= stop_lens[:, :, None])
      match = match & ok
    first = jnp.min(jnp.where(match, pos, g), axis=(1, 2)).astype(jnp.int32)
    best = jnp.minimum(best, first)
  return best


def rank_desc(conf_BG):
  """Rank of each position by confidence, 0 = highest; ties go to the lower position."""
  order = jnp.argsort(-conf_BG, axis=-1, stable=True)
  return jnp.argsort(order, axis=-1), order


def select(conf_BG, eligible_BG, k_B, st: SamplerSettings):
  """Which eligible positions to commit this step."""
  conf = jnp.where(eligible_BG, conf_BG, NEG_INF)
  rank, order = rank_desc(conf)
  if st.threshold is not None:
    chosen = (rank == 0) | (conf >= st.threshold)
  elif st.factor is not None:
    srt = jnp.take_along_axis(conf, order, axis=-1)
    j = jnp.arange(conf.shape[-1])
    thr = jnp.where(j == 0, NEG_INF, 1.0 - st.factor / (j + 2.0))
    ok = (srt >= thr) & jnp.take_along_axis(eligible_BG, order, axis=-1)
    n = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=-1), axis=-1)
    chosen = rank < n[:, None]
  else:
    chosen = rank < k_B[:, None]
  return chosen & eligible_BG


def decide(logits_BQV, keys_B, st: SamplerSettings):
  """Per position: x0 (argmax, Gumbel-max at temperature > 0) and its confidence."""
  if st.banned_ids:
    logits_BQV = logits_BQV.at[..., jnp.asarray(st.banned_ids)].set(NEG_INF)
  q, v = logits_BQV.shape[1:]
  k_noise = jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys_B)
  k_conf = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys_B)
  score = logits_BQV
  if st.temperature > 0:
    g = jax.vmap(lambda k: jax.random.gumbel(k, (q, v), jnp.float32))(k_noise)
    score = logits_BQV + st.temperature * g
  x0 = jnp.argmax(score, axis=-1).astype(jnp.int32)
  if st.remasking == "low_confidence":
    lse = jax.nn.logsumexp(logits_BQV, axis=-1)
    conf = jnp.exp(jnp.take_along_axis(logits_BQV, x0[..., None], axis=-1)[..., 0] - lse)
  else:
    conf = jax.vmap(lambda k: jax.random.uniform(k, (q,), jnp.float32))(k_conf)
  return x0, conf


def to_answer_space(a_BQ, offset, g: int, fill):
  """Row q of a query window starting at answer position `offset` -> answer position offset + q.
  Returns [B, G] values (`fill` where the window does not reach) and where the window reaches."""
  q = a_BQ.shape[1]
  idx = jnp.arange(g) - offset
  have = (idx >= 0) & (idx < q)
  out = jnp.take(a_BQ, jnp.clip(idx, 0, q - 1), axis=1)
  return jnp.where(have[None], out, fill), jnp.broadcast_to(have[None], (a_BQ.shape[0], g))


# ----------------------------------------------------------------------------- forward passes

class Forward:
  """The model passes of one batch. Prompt embeddings (vision tower, projector, splice) are
  computed once, here; the passes embed only answer/suffix tokens. With CFG every pass runs on
  the batch stacked as [cond; uncond] and returns the combined logits."""

  def __init__(self, model, st: SamplerSettings, inp: SamplerInputs):
    self.llm, self.st = model.llm, st
    llm = self.llm
    prompt = inp.prompt
    self.b, self.p = prompt.tokens.shape
    self.g, self.bl = st.gen_length, st.block_length
    self.lg = self.g + inp.suffix.shape[1]  # answer + suffix
    self.cfg = st.cfg_scale > 0
    self.mult = 2 if self.cfg else 1
    prompt_emb = model.embed(prompt.tokens, prompt.pixels, prompt.merge_idx, prompt.merge_w)
    plen = jnp.sum(prompt.valid, axis=-1).astype(jnp.int32)
    gen_pos = plen[:, None] + jnp.arange(self.lg, dtype=jnp.int32)[None]
    valid, pos = prompt.valid, prompt.positions
    if self.cfg:  # unconditional pass: the mask embedding at every prompt position, images included
      mask_emb = llm.embed_tokens(jnp.full((1, 1), st.mask_id, jnp.int32)).astype(prompt_emb.dtype)
      prompt_emb = jnp.concatenate([prompt_emb, jnp.where(prompt.valid[..., None], mask_emb, prompt_emb)])
      valid, pos, gen_pos = (jnp.concatenate([a, a]) for a in (valid, pos, gen_pos))
    self.prompt_emb, self.valid, self.pos, self.gen_pos = prompt_emb, valid, pos, gen_pos
    self.window_len = {None: 0, "prefix": self.lg, "dual": self.bl}[st.cache]

  def _x(self, a):
    return jnp.concatenate([a, a]) if self.cfg else a

  def _combine(self, logits):
    if not self.cfg:
      return logits
    c, u = jnp.split(logits, 2)
    return u + (self.st.cfg_scale + 1.0) * (c - u)

  def empty_cache(self) -> Optional[KVCache]:
    if self.st.cache is None:
      return None
    c = self.llm.cfg
    z = jnp.zeros((c.num_layers, self.b * self.mult, self.p + self.lg, c.num_kv_heads, c.head_dim), self.llm.dtype)
    return KVCache(z, z)

  def full(self, gen):
    """The whole sequence -> answer logits [B, G, V] and (with a cache mode) every position's K/V."""
    llm, xb = self.llm, self.b * self.mult
    x = jnp.concatenate([self.prompt_emb, llm.embed_tokens(self._x(gen))], axis=1)
    keymask = jnp.concatenate([self.valid, jnp.ones((xb, self.lg), bool)], axis=1)
    out = llm(x, jnp.concatenate([self.pos, self.gen_pos], axis=1), keymask[:, None, :], None,
              return_kv=self.st.cache is not None)
    h, kv = out if self.st.cache is not None else (out, None)
    return self._combine(llm.logits(h[:, self.p:self.p + self.g])), kv

  def window(self, gen, cache: KVCache, s):
    """Only a window starting at answer position `s`, against `cache` (from `full`): logits of
    answer positions s + q, [B, Q, V] (Q = G for "prefix", block_length for "dual")."""
    llm, xb, lg, g = self.llm, self.b * self.mult, self.lg, self.g
    ans_pos = jnp.arange(lg)
    if self.st.cache == "prefix":  # answer positions [s, s + lg), key-masked padding past the end
      q_len = lg
      padded = jnp.concatenate([self._x(gen), jnp.full((xb, g), self.st.mask_id, jnp.int32)], axis=1)
      q_tok = jax.lax.dynamic_slice_in_dim(padded, s, q_len, axis=1)
      cached = ans_pos < s
      q_valid = (s + jnp.arange(q_len)) < lg
    else:  # dual: only the block [s, s + bl); every other position comes from the cache
      q_len = self.bl
      q_tok = jax.lax.dynamic_slice_in_dim(self._x(gen), s, q_len, axis=1)
      cached = (ans_pos < s) | (ans_pos >= s + self.bl)
      q_valid = jnp.ones((q_len,), bool)
    keymask = jnp.concatenate([self.valid, jnp.broadcast_to(cached, (xb, lg)), jnp.broadcast_to(q_valid, (xb, q_len))],
                              axis=1)
    pos_ext = jnp.concatenate([self.gen_pos, self.gen_pos[:, -1:] + 1 + jnp.arange(g, dtype=jnp.int32)], axis=1)
    q_pos = jax.lax.dynamic_slice_in_dim(pos_ext, s, q_len, axis=1)
    h = llm(llm.embed_tokens(q_tok), q_pos, keymask[:, None, :], cache)
    return self._combine(llm.logits(h[:, :min(q_len, g)]))


# ----------------------------------------------------------------------------- the sampler

def _sample(graphdef, settings: SamplerSettings, params, inp: SamplerInputs, refresh_interval) -> SamplerOutput:
  TRACE_COUNTS[settings] += 1
  st = settings
  fw = Forward(nnx.merge(graphdef, params), st, inp)
  b, p, g, bl, lg = fw.b, fw.p, fw.g, fw.bl, fw.lg
  keys = jax.vmap(jax.random.key)(inp.seeds)
  table = jnp.asarray(count_table(bl, st.steps_per_block, st.schedule, st.shift))

  def full_step(gen, cache, step_keys):
    logits, kv = fw.full(gen)
    x0, conf = decide(logits, step_keys, st)
    return x0, conf, jnp.ones((b, g), bool), (cache if kv is None else kv)

  def window_step(gen, cache, step_keys, s):
    x0_q, conf_q = decide(fw.window(gen, cache, s), step_keys, st)
    x0, have = to_answer_space(x0_q, s, g, st.mask_id)
    conf, _ = to_answer_space(conf_q, s, g, NEG_INF)
    return x0, conf, have, cache

  def status(c):
    """(done, active, masked): done = finished or a padding row; active = takes this step."""
    masked = c.gen[:, :g] == st.mask_id
    j = jnp.arange(g)[None]
    finished = (c.stop < g) & ~jnp.any(masked & (j < c.stop[:, None]), axis=-1)
    s = c.block * bl
    block_masked = jnp.any(masked & (j >= s) & (j < s + bl), axis=-1)
    return finished | ~inp.live, inp.live & ~finished & block_masked, masked

  def rows(c: _Carry) -> _Carry:
    """The per-row bookkeeping stays sharded by row, as the activations are (a no-op off a mesh)."""
    by_row = lambda x: shd.constrain(x, ("activation_batch",) + (None,) * (x.ndim - 1))
    return c.replace(**{k: by_row(getattr(c, k)) for k in ("gen", "commit_step", "stop", "nfe", "steps",
                                                           "query_tokens", "counts")})

  def step(c: _Carry) -> _Carry:
    c = rows(c)
    _, active, masked = status(c)
    s = c.block * bl
    step_keys = jax.vmap(jax.random.fold_in)(keys, c.steps)
    if st.cache is None:
      x0, conf, have, cache = full_step(c.gen, c.cache, step_keys)
      q_len = p + lg
    else:
      refresh = (c.i % refresh_interval) == 0
      x0, conf, have, cache = jax.lax.cond(refresh, full_step, lambda *a: window_step(*a, s),
                                           c.gen, c.cache, step_keys)
      q_len = jnp.where(refresh, p + lg, fw.window_len)
    j = jnp.arange(g)[None]
    limit = jnp.where(c.stop < g, c.stop, s + bl)  # before a stop: the block end; after: the stop
    eligible = active[:, None] & masked & have & (j < limit[:, None])
    k = c.counts[:, jnp.minimum(c.i, c.counts.shape[1] - 1)]
    chosen = select(conf, eligible, k, st)
    ans = jnp.where(chosen, x0, c.gen[:, :g])
    stop = jnp.minimum(c.stop, find_stop(ans, inp.stop_ids, inp.stop_lens, st.eot_id))
    act = active.astype(jnp.int32)
    return c.replace(
        gen=c.gen.at[:, :g].set(ans), commit_step=jnp.where(chosen, c.steps[:, None], c.commit_step),
        stop=stop, nfe=c.nfe + act * fw.mult, steps=c.steps + act,
        query_tokens=c.query_tokens + act * fw.mult * q_len, i=c.i + 1, cache=cache)

  # Standard schedule: S steps per block. Threshold/factor: until the block has no mask left
  # (each step commits at least one eligible position, so G steps always suffice).
  max_inner = g if st.parallel else st.steps_per_block

  def block(c: _Carry) -> _Carry:
    s = c.block * bl
    j = jnp.arange(g)[None]
    n = jnp.sum((c.gen[:, :g] == st.mask_id) & (j >= s) & (j < s + bl), axis=-1)
    c = c.replace(i=jnp.int32(0), counts=table[n])
    c = jax.lax.while_loop(lambda c: (c.i < max_inner) & jnp.any(status(c)[1]), step, c)
    return c.replace(block=c.block + 1)

  gen0 = jnp.concatenate([jnp.full((b, g), st.mask_id, jnp.int32), inp.suffix.astype(jnp.int32)], axis=1)
  zeros = jnp.zeros((b,), jnp.int32)
  c0 = _Carry(gen=gen0, commit_step=jnp.full((b, g), -1, jnp.int32), stop=jnp.full((b,), g, jnp.int32),
              nfe=zeros, steps=zeros, query_tokens=zeros, block=jnp.int32(0), i=jnp.int32(0),
              counts=jnp.zeros((b, table.shape[1]), jnp.int32), cache=fw.empty_cache())
  c0 = rows(c0)
  c = jax.lax.while_loop(lambda c: (c.block < st.num_blocks) & ~jnp.all(status(c)[0]), block, c0)
  return SamplerOutput(tokens=c.gen[:, :g], stop=c.stop, commit_step=c.commit_step, nfe=c.nfe, steps=c.steps,
                       query_tokens=c.query_tokens)


_sample_jit = jax.jit(_sample, static_argnums=(0, 1))


def sample(graphdef, params, inputs: SamplerInputs, settings: SamplerSettings) -> SamplerOutput:
  """Runs the whole denoising of one batch as one compiled call, compiled once per settings,
  graph and input shapes (bucket the prompt length, tile count and batch size). The refresh
  interval is passed as a value, so changing it does not recompile."""
  settings.validate()
  static = dataclasses.replace(settings, refresh_interval=1)
  return _sample_jit(graphdef, static, params, inputs, jnp.int32(settings.refresh_interval))
