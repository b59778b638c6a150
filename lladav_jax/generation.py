"""Host side of generation: text -> chat template -> image expansion -> bucketed left-padded prompts
-> requests run by the sampler engine (lladav_jax.sampling) -> decoded answers; and the Monte-Carlo ELBO.

Shapes are bucketed so that a new prompt rarely recompiles: the expanded prompt length is rounded
up to a multiple of `length_multiple` (64), the tile count to one of TILE_BUCKETS (every tile an
image or video needs is run: none is dropped), the engine's rows to `batch_size` (or the next power of
two of the prompt count), the answer to `answer_bucket`. Every setting of a request is a value (no
compile). Requests wait for a free row and go in as soon as one finishes (continuous batching). Prompt i
of a call gets the seed `seed + i`, so its answer does not depend on how the prompts are batched.
"""
from __future__ import annotations

import dataclasses
import hashlib
import warnings
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lladav_jax import batch as batch_lib
from lladav_jax import multimodal
from lladav_jax.batch import ModelInputs
from lladav_jax.data import template
from lladav_jax.sampling import engine
from lladav_jax.sampling.engine import EngineShapes, Request, SamplerInputs
from lladav_jax.sampling.settings import EngineConfig, RowSettings, SamplerSettings, row_settings


@dataclasses.dataclass
class Trajectory:
  """The whole answer region of one sample and when each position was committed."""
  tokens: list  # G answer-position ids (mask_id where never committed)
  commit_step: list  # the step (0-based) that committed each position, -1 if never
  stop: int  # answer position where the stop sequence starts (G if none)
  mask_id: int


@dataclasses.dataclass
class GenerationResult:
  text: str  # decoded token_ids ("" without a tokenizer)
  token_ids: list  # the answer before the stop, then the suffix
  nfe: int  # forward evaluations (2 per step with CFG)
  steps: int  # denoising steps
  query_tokens: int = 0  # positions run through the transformer, summed over forwards
  trajectory: Optional[Trajectory] = None


def bucket_length(n: int, multiple: int = 64) -> int:
  return max(multiple, -(-n // multiple) * multiple)


def bucket_pow2(n: int) -> int:
  return 0 if n <= 0 else 1 << (n - 1).bit_length()


TILE_BUCKETS = batch_lib.TILE_BUCKETS  # one set for training and inference (batch.py)
bucket_tiles = batch_lib.bucket_tiles


def sampler_settings(model, **kw) -> SamplerSettings:
  """Settings with the token ids of `model`: mask from the model config, the banned ids (eos, bos,
  start/end header) and eot from its tokenizer. Explicit `mask_id`/`banned_ids`/`eot_id` win."""
  tok = model.tokenizer
  ids = {"mask_id": model.cfg.mask_token_id}
  if tok is not None:
    ids["banned_ids"] = (tok.eos_id, tok.bos_id, tok.start_header_id, tok.end_header_id)
    ids["eot_id"] = tok.eot_id
    if tok.mask_id != model.cfg.mask_token_id:
      warnings.warn(f"tokenizer mask id {tok.mask_id} != model mask_token_id {model.cfg.mask_token_id}; "
                    "the sampler uses the model's")
  ids.update({k: v for k, v in kw.items() if k in ("mask_id", "banned_ids", "eot_id")})
  rest = {k: v for k, v in kw.items() if k not in ids}
  if "banned_ids" in ids:
    ids["banned_ids"] = tuple(int(i) for i in ids["banned_ids"])
  return SamplerSettings(**ids, **rest).validate()


def prepare_inputs(model, prompt_ids: Sequence[Sequence[int]], images: Sequence[Sequence], *, suffix_ids=(),
                   stop_ids: Sequence[Sequence[int]] = (), seeds: Sequence[int], rows: int,
                   length_multiple: int = 64, tiles: Optional[int] = None, stop_shape=(1, 1)) -> SamplerInputs:
  """Expands, left-pads and buckets one batch into numpy SamplerInputs with `rows` rows and
  `tiles` image tiles per row (default: the tile bucket of the batch's largest need); the stops padded to
  at least `stop_shape` (sequences, longest length: an engine's fixed stop bucket)."""
  icfg = model.image_cfg
  exps = [multimodal.expand(ids, multimodal.process_sample_images(ims, icfg) if ims else [], icfg)
          for ids, ims in zip(prompt_ids, images)]
  n = len(exps)
  if n > rows:
    raise ValueError(f"{n} prompts but {rows} rows")
  exps += [multimodal.expand([0], [], icfg)] * (rows - n)
  length = bucket_length(max(len(e.tokens) for e in exps), length_multiple)
  need = max(e.pixels.shape[0] for e in exps)
  if tiles is not None and need > tiles:
    raise ValueError(f"a prompt's images need {need} tiles, more than tiles={tiles} (tiles=None buckets them)")
  tiles = bucket_tiles(need) if tiles is None else tiles
  prompt = batch_lib.collate(exps, icfg, length=length, tiles=tiles, left=True)
  ns = max(len(stop_ids), stop_shape[0])
  ls = max([len(s) for s in stop_ids] + [stop_shape[1]])
  stops = np.full((rows, ns, ls), -1, np.int32)
  lens = np.zeros((rows, ns), np.int32)
  for k, s in enumerate(stop_ids):
    stops[:, k, :len(s)] = s
    lens[:, k] = len(s)
  suffix = np.broadcast_to(np.asarray(list(suffix_ids), np.int32)[None], (rows, len(suffix_ids))).copy()
  seeds_arr = np.zeros((rows,), np.uint32)
  seeds_arr[:n] = np.asarray(seeds, np.int64) % (1 << 32)
  return SamplerInputs(prompt=prompt, suffix=suffix, stop_ids=stops, stop_lens=lens, seeds=seeds_arr,
                       live=np.arange(rows) < n)


def requests(inputs: SamplerInputs, settings: RowSettings, suffix_len: int) -> list[Request]:
  """The engine's requests of a prepared batch: one a live row."""
  out = []
  for k in np.nonzero(np.asarray(inputs.live))[0]:
    row = jax.tree.map(lambda a: np.asarray(a)[k], inputs)
    out.append(Request(prompt=row.prompt, suffix=row.suffix, suffix_len=np.int32(suffix_len), stop_ids=row.stop_ids,
                       stop_lens=row.stop_lens, seed=row.seeds, settings=settings))
  return out


# The per-row values a host reads after each `advance` (small; no per-count gather).
READ_FIELDS = ("live", "done", "gen", "stop", "commit_step", "nfe", "steps", "query_tokens")


class EngineRunner:
  """The host side of one engine of `shapes.rows` rows: which rows are free, `insert` into one, `advance`
  and read every row's progress back. `run_engine` runs a fixed list of requests with it; the server
  (lladav_jax.serve) runs one a request group with a small `max_steps`, to stream and admit between calls."""

  def __init__(self, model, cfg: EngineConfig, shapes: EngineShapes):
    self.model, self.cfg, self.shapes = model, cfg, shapes
    self.free = list(range(shapes.rows))[::-1]
    with jax.set_mesh(model.mesh):  # rows sharded over (data, fsdp) like the activations
      self.state = engine.init(model.graphdef, cfg, shapes, model.state)

  @property
  def busy(self) -> int:
    return self.shapes.rows - len(self.free)

  def insert(self, req: Request) -> int:
    """Puts `req` into a free row (the vision tower runs here); returns the row."""
    row = self.free.pop()
    m = self.model
    with jax.set_mesh(m.mesh):
      self.state = engine.insert(m.graphdef, self.cfg, m.state, self.state, np.int32(row), req)
    return row

  def advance(self, max_steps: int = 1 << 30) -> dict:
    """Runs until `max_steps` steps or a row finishes; returns READ_FIELDS as host arrays [rows, ...].
    A row with live and done is finished: read it, then `release` it."""
    m = self.model
    with jax.set_mesh(m.mesh):
      self.state = engine.advance(m.graphdef, self.cfg, m.state, self.state, np.int32(max_steps))
      return jax.device_get({f: getattr(self.state, f) for f in READ_FIELDS})

  def release(self, row: int, running: bool = False) -> None:
    """Frees `row`; `running`: it has not finished (its client left), so the engine stops working on it."""
    if running:
      with jax.set_mesh(self.model.mesh):
        self.state = engine.drop(self.state, np.int32(row))
    self.free.append(row)


def run_engine(model, reqs: Sequence[Request], cfg: EngineConfig, shapes: EngineShapes) -> list[dict]:
  """Runs `reqs` through an engine of `shapes.rows` rows: each request goes into a free row as soon as
  one is free (continuous batching); returns per request its answer row, stop and counters."""
  if cfg.cache == "dllm":
    for r in reqs:
      if float(r.settings.transfer_ratio) > cfg.max_transfer_ratio:
        raise ValueError(f"transfer_ratio={float(r.settings.transfer_ratio)} is above the engine's "
                         f"max_transfer_ratio={cfg.max_transfer_ratio}")
  out: list[Optional[dict]] = [None] * len(reqs)
  pending = list(range(len(reqs)))[::-1]
  runner = EngineRunner(model, cfg, shapes)
  running: dict[int, int] = {}
  while pending or running:
    while runner.free and pending:
      k = pending.pop()
      running[runner.insert(reqs[k])] = k
    got = runner.advance()
    for row in np.nonzero(got["live"] & got["done"])[0]:
      out[running.pop(int(row))] = {f: got[f][row] for f in READ_FIELDS[2:]}
      runner.release(int(row))
  return out


def stop_list(settings: SamplerSettings, stop_ids: Sequence[Sequence[int]]) -> list[list[int]]:
  """The stops of a request, the one place they are built (generate, generate_ids, the eval CLI and
  plugin, the server): `stop_ids` in order, empty ones and repeats dropped, then `settings.eot_id`
  unless it is one of them (the original always adds "<|eot_id|>" after its stopping_criteria, once;
  callers pass only their own stops)."""
  out = []
  for s in [list(s) for s in stop_ids] + ([[settings.eot_id]] if settings.eot_id is not None else []):
    if s and s not in out:  # a repeat finds nothing new; it would only take a stop slot
      out.append(s)
  return out


def answer_ids(row: dict, gen_length: int, suffix_ids: Sequence[int] = ()) -> list[int]:
  """A finished row's answer: the ids before the stop, then the suffix."""
  return row["gen"][:gen_length].tolist()[:min(int(row["stop"]), gen_length)] + list(suffix_ids)


def answer_text(tok, ids: Sequence[int], mask_id: int, skip_special_tokens: bool = True) -> str:
  """The text of answer ids: masks (never committed) and ids past the tokenizer's vocabulary are not text."""
  return tok.decode([i for i in ids if i != mask_id and 0 <= i < tok.vocab_size], skip_special=skip_special_tokens)


def generate_ids(model, prompt_ids: Sequence[Sequence[int]], images: Optional[Sequence[Sequence]] = None, *,
                 settings: SamplerSettings, stop_ids: Sequence[Sequence[int]] = (), suffix_ids: Sequence[int] = (),
                 seed: int = 0, batch_size: Optional[int] = None, length_multiple: int = 64,
                 tiles: Optional[int] = None, answer_bucket: Optional[int] = None, vocab_chunk: Optional[int] = None,
                 return_trajectory: bool = False) -> list[GenerationResult]:
  """Token-level generation: prompt ids (IMAGE_TOKEN_INDEX where images go) -> results (no text).
  `length_multiple` and `tiles` set the prompt buckets (see prepare_inputs), `answer_bucket` the
  answer positions compiled for (default gen_length; any gen_length up to it runs without a new
  compile), `batch_size` the engine's rows (default: the next power of two of the prompt count).
  Prompt i gets the seed `seed + i`, whatever the batching. The stops: `stop_list(settings, stop_ids)`."""
  prompt_ids = [list(p) for p in prompt_ids]
  images = [list(i) for i in images] if images is not None else [[] for _ in prompt_ids]
  if len(images) != len(prompt_ids):
    raise ValueError(f"{len(prompt_ids)} prompts but {len(images)} image lists")
  if not prompt_ids:
    return []
  n = len(prompt_ids)
  stop_ids = stop_list(settings, stop_ids)
  bucket = answer_bucket or settings.gen_length
  rs = row_settings(settings, bucket, settings.block_length)
  inputs = prepare_inputs(model, prompt_ids, images, suffix_ids=suffix_ids, stop_ids=stop_ids,
                          seeds=[seed + i for i in range(n)], rows=n, length_multiple=length_multiple, tiles=tiles)
  shapes = EngineShapes(rows=batch_size or bucket_pow2(n), prompt_len=inputs.prompt.length, answer_len=bucket,
                        suffix_len=len(suffix_ids), stops=inputs.stop_ids.shape[1], stop_len=inputs.stop_ids.shape[2])
  res = run_engine(model, requests(inputs, rs, len(suffix_ids)), settings.engine(vocab_chunk), shapes)
  g = settings.gen_length
  out = []
  for r in res:
    traj = (Trajectory(r["gen"][:g].tolist(), r["commit_step"][:g].tolist(), min(int(r["stop"]), g), settings.mask_id)
            if return_trajectory else None)
    out.append(GenerationResult(text="", token_ids=answer_ids(r, g, suffix_ids), nfe=int(r["nfe"]),
                                steps=int(r["steps"]), query_tokens=int(r["query_tokens"]), trajectory=traj))
  return out


def generate(model, prompts: Sequence[str], images: Optional[Sequence[Sequence]] = None, gen_length: int = 128,
             block_length: int = 128, steps: int = 128, temperature: float = 0.0,
             remasking: str = "low_confidence", cfg_scale: float = 0.0, threshold: Optional[float] = None,
             factor: Optional[float] = None, cache: Optional[str] = None, refresh_interval: int = 32,
             prompt_interval: int = 25, gen_interval: int = 7, transfer_ratio: float = 0.25,
             schedule: str = "uniform", shift: float = 1 / 3, stop_rule: str = "earliest",
             stop_strings: Optional[Sequence[str]] = None,
             suffix: Optional[str] = None, seed: int = 0, batch_size: Optional[int] = None,
             return_trajectory: bool = False, system: Optional[str] = "default",
             skip_special_tokens: bool = True, length_multiple: int = 64,
             tiles: Optional[int] = None) -> list[GenerationResult]:
  """Answers to user questions about images (one list of PIL images per prompt).

  The chat template (system prompt, `<image>` tags, assistant header) is applied as the
  original's demo/eval do; `stop_strings` are tokenised and stop, then `<|eot_id|>` (always; see stop_list);
  `suffix` is a fixed text after the answer positions (never overwritten, appended to the
  output). Settings are those of SamplerSettings; see lladav_jax.sampling for their meaning.
  """
  tok = model.tokenizer
  if tok is None:
    raise ValueError("the model has no tokenizer (tokenizer.json next to the checkpoint); use generate_ids")
  images = [list(i) for i in images] if images is not None else [[] for _ in prompts]
  if len(images) != len(prompts):
    raise ValueError(f"{len(prompts)} prompts but {len(images)} image lists")
  sys_msg = template.DEFAULT_SYSTEM if system == "default" else system
  prompt_ids = [template.inference_prompt_ids(tok, q, len(ims), system=sys_msg) for q, ims in zip(prompts, images)]
  settings = sampler_settings(model, gen_length=gen_length, block_length=block_length, steps=steps,
                              temperature=float(temperature), remasking=remasking, cfg_scale=float(cfg_scale),
                              threshold=threshold, factor=factor, cache=cache, refresh_interval=refresh_interval,
                              prompt_interval=prompt_interval, gen_interval=gen_interval,
                              transfer_ratio=float(transfer_ratio),
                              schedule=schedule, shift=float(shift), stop_rule=stop_rule)
  stop_ids = tok.encode_stop_strings(list(stop_strings or []))
  suffix_ids = tok.encode(suffix) if suffix else []
  outs = generate_ids(model, prompt_ids, images, settings=settings, stop_ids=stop_ids, suffix_ids=suffix_ids,
                      seed=seed, batch_size=batch_size, return_trajectory=return_trajectory,
                      length_multiple=length_multiple, tiles=tiles)
  for o in outs:
    o.text = answer_text(tok, o.token_ids, settings.mask_id, skip_special_tokens)
  return outs


# ----------------------------------------------------------------------------- ELBO

def mc_masks(answer_len: int, num_samples: int, rng: np.random.Generator, group: int = 16):
  """LLaDA's `forward_process` for `num_samples` rows in groups of `group`: per group a random
  k in [1, T]; row r of the group masks exactly x_r = ((round(k + r * T / group) - 1) mod T) + 1
  positions, chosen uniformly; p_r = x_r / T. Returns bool [N, T] and float [N]."""
  t = answer_len
  masks, ps = [], []
  for g0 in range(0, num_samples, group):
    b = min(group, num_samples - g0)
    k = int(rng.integers(1, t + 1))
    x = np.round(np.linspace(float(k), k + (b - 1) * (t / b), b)).astype(np.int64)
    x = ((x - 1) % t) + 1
    for xi in x:
      m = np.zeros(t, bool)
      m[rng.permutation(t)[:xi]] = True
      masks.append(m)
      ps.append(xi / t)
  return np.stack(masks), np.asarray(ps, np.float32)


def _elbo_terms(graphdef, params, prompt: ModelInputs, answer, ans_valid, ans_mask, p_mask, mask_id):
  """sum over masked answer positions of CE / p, per MC row [N]. Prompt embeddings computed once;
  `ans_valid` marks the real answer positions (the rest is bucket padding, never attended)."""
  model = nnx.merge(graphdef, params)
  llm = model.llm
  emb = model.embed(prompt.tokens, prompt.pixels, prompt.merge_idx, prompt.merge_w)  # [1, P, D]
  n, t = ans_mask.shape
  noisy = jnp.where(ans_mask, mask_id, answer[None])  # [N, T]
  x = jnp.concatenate([jnp.broadcast_to(emb, (n,) + emb.shape[1:]), llm.embed_tokens(noisy)], axis=1)
  ans_pos = jnp.sum(prompt.valid) + jnp.arange(t)
  pos = jnp.concatenate([jnp.broadcast_to(prompt.positions, (n, prompt.length)), jnp.broadcast_to(ans_pos, (n, t))], 1)
  # the answer joins the prompt's segment (collate writes one sample a row); its bucket padding is id 0
  ans_seg = jnp.where(ans_valid, jnp.max(prompt.segments), 0)
  seg = jnp.concatenate([jnp.broadcast_to(prompt.segments, (n, prompt.length)), jnp.broadcast_to(ans_seg, (n, t))], 1)
  h = llm(x, pos, seg)
  logp = jax.nn.log_softmax(llm.logits(h[:, prompt.length:]), axis=-1)
  ce = -jnp.take_along_axis(logp, jnp.broadcast_to(answer[None, :, None], (n, t, 1)), axis=-1)[..., 0]
  return jnp.sum(jnp.where(ans_mask, ce, 0.0), axis=-1) / p_mask


_elbo_jit = jax.jit(_elbo_terms, static_argnums=(0, 7))


def elbo_ids(model, prompt_ids: Sequence[int], images: Sequence, answer_ids: Sequence[int], *, num_samples: int = 128,
             seed: int = 0, group: int = 16, length_multiple: int = 64) -> float:
  """Monte-Carlo ELBO of log p(answer | prompt) for one prompt (ids with image placeholders):
  -(1/N) sum_rows sum_{masked} CE / p, as LLaDA's get_log_likelihood (rows in groups of `group`). `seed`
  draws the masks as given (`elbo` passes each request its own `request_seed`)."""
  t = len(answer_ids)
  if not t:
    return 0.0
  icfg = model.image_cfg
  e = multimodal.expand(list(prompt_ids), multimodal.process_sample_images(list(images), icfg) if images else [],
                        icfg)
  limit = model.cfg.llm.max_position_embeddings
  if len(e.tokens) + t > limit:
    raise ValueError(f"elbo: the expanded prompt ({len(e.tokens)} tokens) and the answer ({t} tokens) are longer "
                     f"than the model's max_position_embeddings={limit}")
  prompt = batch_lib.collate([e], icfg, length=bucket_length(len(e.tokens), length_multiple),
                             tiles=bucket_tiles(e.pixels.shape[0]), left=True)
  prompt = jax.tree.map(jnp.asarray, prompt)
  masks, ps = mc_masks(t, num_samples, np.random.default_rng(seed), group)
  tb = bucket_length(t, 16)
  ans = np.zeros(tb, np.int32)
  ans[:t] = answer_ids
  ans, ans_valid = jnp.asarray(ans), jnp.asarray(np.arange(tb) < t)
  groups = []
  for g0 in range(0, num_samples, group):  # one compiled shape: rows padded to `group`
    m, p = masks[g0:g0 + group], ps[g0:g0 + group]
    rows = m.shape[0]
    mb = np.zeros((group, tb), bool)
    mb[:rows, :t] = m
    pb = np.ones(group, np.float32)
    pb[:rows] = p
    terms = _elbo_jit(model.graphdef, model.state, prompt, ans, ans_valid, jnp.asarray(mb), jnp.asarray(pb),
                      model.cfg.mask_token_id)
    groups.append((terms, rows))  # dispatched asynchronously: one host sync below, not one a group
  total = 0.0
  for terms, rows in jax.device_get(groups):
    total += float(np.sum(terms[:rows]))
  return -total / num_samples


def request_seed(seed: int, prompt_ids: Sequence[int], answer_ids: Sequence[int]) -> int:
  """The ELBO noise seed of one request: a stable hash (sha256, not Python's salted hash) of `seed` and its
  own token ids, never its place in a batch, so its score is the same alone or batched in any order. The
  masks cover answer positions only; the images do not enter."""
  ids = np.asarray([seed, len(prompt_ids), *prompt_ids, *answer_ids], np.int64)  # the length: no ambiguous split
  return int.from_bytes(hashlib.sha256(ids.tobytes()).digest()[:16], "little")


def elbo(model, prompts: Sequence[str], images: Optional[Sequence[Sequence]], answers: Sequence[str], *,
         num_samples: int = 128, seed: int = 0, group: int = 16, system: Optional[str] = "default") -> list[float]:
  """LLaDA's `get_log_likelihood` for each (prompt, answer): the Monte-Carlo masked-diffusion lower
  bound -E[sum_{masked} CE / p] with LLaDA's stratified mask counts, `num_samples` rows each. Each
  request's masks come from `request_seed(seed, its ids)`: its value does not depend on the batch."""
  tok = model.tokenizer
  if tok is None:
    raise ValueError("the model has no tokenizer; use elbo_ids")
  images = [list(i) for i in images] if images is not None else [[] for _ in prompts]
  sys_msg = template.DEFAULT_SYSTEM if system == "default" else system
  out = []
  for q, ims, a in zip(prompts, images, answers):
    ids, ans = template.inference_prompt_ids(tok, q, len(ims), system=sys_msg), tok.encode(a)
    out.append(elbo_ids(model, ids, ims, ans, num_samples=num_samples, seed=request_seed(seed, ids, ans), group=group))
  return out
