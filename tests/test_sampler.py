"""The jitted sampler against a plain NumPy implementation of the original's algorithm.

The reference below follows docs/ORIGINAL.md, "Generation", step by step, for one prompt: per-block counts,
banned ids, CFG, argmax + float64 softmax confidence, eligibility, top-k, stop sequences, suffix.
Only the forward pass is JAX (a jitted call on the exact, unpadded sequence). The tiny random
model's weights are scaled up so that outputs are diverse and confidences well separated (ties in
float32 vs float64 would otherwise decide the order).
"""
from __future__ import annotations

import collections
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from lladav_jax import config, multimodal
from lladav_jax.api import LLaDAV
from lladav_jax.config import IMAGE_TOKEN_INDEX as IMG
from lladav_jax.inference import SamplingParams, generation
from lladav_jax.inference.engine import TRACE_COUNTS
from lladav_jax.inference.engine.schedule import uniform_counts
from tests.models import random_model

MASK = 500
SUFFIX = [60, 61]
BUCKETS = dict(length_multiple=64, tiles=4)  # every test batch has the same shapes


SCALES = {"lm_head": 50.0, "q_proj": 4.0, "k_proj": 4.0, "v_proj": 4.0, "o_proj": 4.0, "gate_proj": 3.0,
          "up_proj": 3.0, "down_proj": 3.0}


@functools.lru_cache(maxsize=None)
def make_model(seed: int = 0) -> LLaDAV:
  return random_model(config.tiny(), seed, SCALES)


@pytest.fixture(scope="session")
def model():
  return make_model()


def images(seed, *sizes):
  rng = np.random.default_rng(seed)
  return [Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8)) for w, h in sizes]


# Three prompts of different lengths: text only, one image (anyres), two images (pad path).
PROMPTS = [[7, 8, 9, 10, 11, 12],
           [30, IMG, 31, 32, 33, 34, 35, 36, 37, 38, 39],
           [40, IMG, 41, IMG, 42, 43]]
IMAGES = [[], images(1, (110, 56)), images(2, (60, 60), (50, 80))]


# ----------------------------------------------------------------------------- the NumPy reference

@functools.partial(jax.jit, static_argnums=(0, 6, 7, 8))
def _ref_logits(graphdef, params, tokens, pixels, merge_idx, merge_w, n_prompt, gen_length, uncond):
  model = nnx.merge(graphdef, params)
  x = model.embed(tokens, pixels, merge_idx, merge_w)
  if uncond:  # every prompt position (images included) -> the mask embedding
    mask_emb = model.llm.embed_tokens(jnp.full((1, 1), MASK, jnp.int32))
    x = x.at[:, :n_prompt].set(jnp.broadcast_to(mask_emb, x[:, :n_prompt].shape))
  h = model.llm(x, jnp.arange(x.shape[1])[None])
  return model.llm.logits(h[:, n_prompt:n_prompt + gen_length])[0]


def reference_forward(model, prompt_ids, imgs, gen_length):
  """fwd(answer_and_suffix_ids, uncond) -> float32 logits [G, V] of the exact sequence."""
  icfg = model.image_cfg
  e = multimodal.expand(prompt_ids, multimodal.process_sample_images(imgs, icfg) if imgs else [], icfg)
  p, t = len(e.tokens), e.pixels.shape[0]
  zero = t * icfg.tokens_per_tile + 1

  def fwd(tail, uncond=False):
    tokens = np.concatenate([e.tokens, np.asarray(tail, np.int32)])[None]
    idx = np.concatenate([e.merge_idx, np.full((len(tail), 4), zero, np.int32)])[None]
    w = np.concatenate([e.merge_w, np.zeros((len(tail), 4), np.float32)])[None]
    return np.asarray(_ref_logits(model.graphdef, model.state, tokens, e.pixels[None], idx, w, p, gen_length, uncond))
  return fwd


def earliest_stop(ans, stops):
  best = None
  for seq in stops:
    for j in range(len(ans) - len(seq) + 1):
      if list(ans[j:j + len(seq)]) == list(seq):
        best = j if best is None else min(best, j)
        break
  return best


def reference_generate(fwd, *, gen_length, block_length, steps, banned, stops, suffix=(), cfg_scale=0.0,
                       counts_fn=uniform_counts, threshold=None, factor=None):
  """The original's generate_with_embeds for one prompt (temperature 0, low_confidence).
  Returns (answer before the stop + suffix, nfe, steps taken)."""
  g = gen_length
  ans = np.full(g, MASK, np.int64)
  num_blocks = g // block_length
  spb = steps // num_blocks
  stop, nfe, taken = None, 0, 0
  for blk in range(num_blocks):
    s, e = blk * block_length, (blk + 1) * block_length
    if stop is not None and stop <= s:
      break
    counts = counts_fn(int((ans[s:e] == MASK).sum()), spb)
    i = 0
    while i < (g if (threshold or factor) else spb):
      masked = ans == MASK
      if stop is not None and not masked[:stop].any():
        break
      if not masked[s:e].any():
        break
      tail = list(ans) + list(suffix)
      logits = fwd(tail).astype(np.float64)
      nfe += 1
      if cfg_scale > 0:
        un = fwd(tail, uncond=True).astype(np.float64)
        nfe += 1
        logits = un + (cfg_scale + 1) * (logits - un)
      logits[np.ix_(masked, list(banned))] = -np.inf
      x0 = logits.argmax(-1)
      prob = np.exp(logits - logits.max(-1, keepdims=True))
      prob /= prob.sum(-1, keepdims=True)
      conf = prob[np.arange(g), x0]
      limit = stop if stop is not None else e
      eligible = masked & (np.arange(g) < limit)
      conf = np.where(eligible, conf, -np.inf)
      order = [q for q in np.argsort(-conf, kind="stable") if eligible[q]]
      if threshold is not None:
        take = order[:1] + [q for q in order[1:] if conf[q] >= threshold]
      elif factor is not None:
        n = 1
        while n < len(order) and conf[order[n]] >= 1 - factor / (n + 2):
          n += 1
        take = order[:n]
      else:
        take = order[:counts[i]]
      ans[take] = x0[take]
      stop = earliest_stop(ans, stops)
      taken += 1
      i += 1
  cut = g if stop is None else stop
  return [int(t) for t in ans[:cut]] + list(suffix), nfe, taken


def run_reference(model, settings: SamplingParams, prompts, imgs, stops=(), suffix=(), **kw):
  all_stops = [list(s) for s in stops] + ([[settings.eot_id]] if settings.eot_id is not None else [])
  return [reference_generate(reference_forward(model, p, im, settings.gen_length), gen_length=settings.gen_length,
                             block_length=settings.block_length, steps=settings.steps, banned=settings.banned_ids,
                             stops=all_stops, suffix=suffix, cfg_scale=settings.cfg_scale, **kw)
          for p, im in zip(prompts, imgs)]


def settings(**kw):
  base = dict(mask_id=MASK, banned_ids=(1, 2), eot_id=None, gen_length=24, block_length=8, steps=12)
  base.update(kw)
  return SamplingParams(**base)


def assert_same(outs, refs):
  for k, (o, (ids, nfe, taken)) in enumerate(zip(outs, refs)):
    assert o.token_ids == ids, f"sample {k}: {o.token_ids} != {ids}"
    assert (o.nfe, o.steps) == (nfe, taken), f"sample {k}"


# ----------------------------------------------------------------------------- tests

@pytest.fixture(scope="session")
def stop_setup(model):
  """Banned ids, eot and a two-token stop chosen from the model's own outputs (via the reference),
  so that banning and both kinds of stop actually change what is generated."""
  suffix = SUFFIX
  first = reference_forward(model, PROMPTS[0], IMAGES[0], 24)([MASK] * 24 + suffix).argmax(-1)
  banned = tuple(int(t) for t, _ in collections.Counter(first.tolist()).most_common(2))  # step-1 favourites
  base = run_reference(model, settings(banned_ids=banned), PROMPTS, IMAGES, suffix=suffix)
  eot = base[0][0][10]
  a1 = base[1][0]
  bigram = next([a1[j], a1[j + 1]] for j in range(8, 20) if eot not in (a1[j], a1[j + 1]))
  return dict(banned=banned, eot=int(eot), stops=[bigram], suffix=suffix)


def test_matches_numpy_reference_with_stops_suffix_images_and_batch(model, stop_setup):
  st = settings(banned_ids=stop_setup["banned"], eot_id=stop_setup["eot"])
  outs = generation.generate_ids(model, PROMPTS, IMAGES, params=st, stop_ids=stop_setup["stops"],
                                 suffix_ids=stop_setup["suffix"], batch_size=4, return_trajectory=True, **BUCKETS)
  refs = run_reference(model, st, PROMPTS, IMAGES, stops=stop_setup["stops"], suffix=stop_setup["suffix"])
  assert_same(outs, refs)
  stops = [o.trajectory.stop for o in outs]
  assert stops[0] < st.gen_length and outs[0].trajectory.tokens[stops[0]] == stop_setup["eot"]
  assert stops[1] < st.gen_length and outs[1].trajectory.tokens[stops[1]:stops[1] + 2] == stop_setup["stops"][0]
  for o in outs:
    t = o.trajectory
    assert o.token_ids[-2:] == stop_setup["suffix"]
    assert all(cs >= 0 for cs in t.commit_step[:t.stop]), "masks left before the stop"
    assert max(t.commit_step) == o.steps - 1
    # semi-AR: a position of a later block is never committed before one of an earlier block
    blocks = np.arange(st.gen_length) // st.block_length
    cs = np.asarray(t.commit_step)
    for b in range(1, st.num_blocks):
      if (cs[blocks == b] >= 0).any() and (cs[blocks == b - 1] >= 0).any():
        assert cs[blocks == b][cs[blocks == b] >= 0].min() > cs[blocks == b - 1].max()


def test_other_prompts_of_the_same_buckets_do_not_retrace(model, stop_setup):
  # batched == one by one: test_matches_numpy_reference_... compares the batch of 4 with the reference run row by row
  st = settings(banned_ids=stop_setup["banned"], eot_id=stop_setup["eot"])
  kw = dict(params=st, stop_ids=stop_setup["stops"], suffix_ids=stop_setup["suffix"], batch_size=4, **BUCKETS)
  generation.generate_ids(model, PROMPTS, IMAGES, **kw)
  before = sum(TRACE_COUNTS.values())
  other = [[13, 14, 15], [16, IMG, 17, 18, 19, 20, 21, 22, 23, 24, 25], [26, IMG, 27, IMG]]
  again = generation.generate_ids(model, other, IMAGES, **kw)  # other lengths, tiles and row count: same buckets
  assert sum(TRACE_COUNTS.values()) == before
  assert len(again) == 3


def test_cfg_matches_reference(model):
  st = settings(cfg_scale=1.5)
  outs = generation.generate_ids(model, PROMPTS[:2], IMAGES[:2], params=st, suffix_ids=SUFFIX, **BUCKETS)
  refs = run_reference(model, st, PROMPTS[:2], IMAGES[:2], suffix=SUFFIX)
  assert_same(outs, refs)
  assert outs[0].nfe == 2 * outs[0].steps == 24


@pytest.mark.slow  # the CI budget: test_sampler_engine checks seeded temperatures against neighbours and arrival
def test_temperature_and_random_remasking_are_seeded(model):
  st = settings(temperature=1.0, remasking="random", eot_id=None)
  def run(prompts, imgs, seed):
    return generation.generate_ids(model, prompts, imgs, params=dataclasses.replace(st, seed=seed), batch_size=4,
                                   **BUCKETS)

  a = run(PROMPTS, IMAGES, seed=3)
  b = run(PROMPTS, IMAGES, seed=3)
  c = run(PROMPTS, IMAGES, seed=4)
  assert [o.token_ids for o in a] == [o.token_ids for o in b]
  assert [o.token_ids for o in a] != [o.token_ids for o in c]
  # sample i uses seed + i whatever the batching: alone with seed 3 + i gives the same answer
  alone = run([PROMPTS[2]], [IMAGES[2]], seed=3 + 2)[0]
  assert alone.token_ids == a[2].token_ids


def test_settings_validation():
  with pytest.raises(ValueError, match="multiple of block_length"):
    settings(gen_length=10, block_length=4).validate()
  with pytest.raises(ValueError, match="multiple of the number of blocks"):
    settings(gen_length=16, block_length=4, steps=6).validate()
  with pytest.raises(ValueError, match="remasking"):
    settings(remasking="entropy").validate()
  with pytest.raises(ValueError, match="cache"):
    settings(cache="full").validate()


def test_video_visual_matches_reference(model):
  # a visual that is a list of frames (lmms-eval video tasks) is one pooled video placeholder
  frames = images(5, (60, 40), (60, 40), (60, 40))
  prompt = [30, IMG, 31, 32, 33]
  n_video = multimodal.process_video(frames, model.image_cfg).num_tokens
  assert len(multimodal.expand(prompt, multimodal.process_sample_images([frames], model.image_cfg),
                               model.image_cfg).tokens) == len(prompt) - 1 + n_video
  st = settings()
  outs = generation.generate_ids(model, [prompt], [[frames]], params=st, batch_size=1, **BUCKETS)
  assert_same(outs, run_reference(model, st, [prompt], [[frames]]))
