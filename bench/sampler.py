"""Sampler benchmark on the local devices: seconds per answer, tokens/s and NFE.

    PYTHONPATH=. python bench/sampler.py [--configs tiny,mid] [--quick]

For each model config (random weights, LM head scaled to a logit spread of ~15 so that
confidences are not flat; parallel-decoding NFE on random weights is only indicative), one prompt of
64 text tokens + one image (a single 'square' tile: 16 tokens for tiny, 256 for mid), and:
  (a) eager: the original's structure, a Python loop of per-step jitted forwards at batch 1 (the
      prompt embedded once; the step logic, as the original's torch ops, on the host in NumPy);
  (b) loop: the one-jit lax.while_loop sampler at batch 1 and batched;
  (c) the accelerations: threshold, factor, prefix cache, dual cache, dual cache + factor, and the
      shift schedule at half the steps.
Compile time is excluded (each variant is compiled ahead of time); the best of REPS timed runs. Tokens/s counts
answer tokens before the stop (EOS is banned by the sampler, so there is no EOS padding to exclude).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lladav_jax import config, generation, multimodal  # noqa: E402
from lladav_jax.api import LLaDAV  # noqa: E402
from lladav_jax.model import abstract_model  # noqa: E402
from lladav_jax.model.common import random_like  # noqa: E402
from lladav_jax.sampling import SamplerSettings, core  # noqa: E402
from lladav_jax.sampling.schedule import uniform_counts  # noqa: E402


REPS = 1


def random_model(cfg, seed=0, logit_std=15.0):
  """Random weights; the LM head scaled so that logits have about `logit_std` spread."""
  head_scale = logit_std / (0.02 * cfg.llm.hidden_size ** 0.5)
  graphdef, abstract = abstract_model(cfg)
  icfg = multimodal.ImageConfig(image_size=cfg.vision.image_size, patch_size=cfg.vision.patch_size, aspect="square")
  state = jax.tree.map(jnp.asarray, random_like(abstract, seed, scales={"lm_head": head_scale}))
  return LLaDAV(cfg, graphdef, state, image_cfg=icfg)


def prompt(cfg, n_text=64, seed=0):
  rng = np.random.default_rng(seed)
  ids = [int(i) for i in rng.integers(10, cfg.llm.vocab_size - 10, n_text)]
  ids.insert(8, -200)
  s = cfg.vision.image_size
  img = Image.fromarray(rng.integers(0, 255, (s, s, 3), np.uint8))
  return ids, [img]


# ----------------------------------------------------------------------------- (a) eager baseline

def eager_generate(model, ids, imgs, st: SamplerSettings):
  """The original's loop: one jitted forward per step, the step logic on the host."""
  icfg = model.image_cfg
  e = multimodal.expand(ids, multimodal.process_sample_images(imgs, icfg), icfg)
  p, g = len(e.tokens), st.gen_length

  @jax.jit
  def embed(params, tokens, pixels, idx, w):
    return nnx.merge(model.graphdef, params).embed(tokens, pixels, idx, w)

  @jax.jit
  def forward(params, prompt_emb, ans):
    m = nnx.merge(model.graphdef, params)
    x = jnp.concatenate([prompt_emb, m.llm.embed_tokens(ans)], axis=1)
    h = m.llm(x, jnp.arange(x.shape[1])[None])
    return m.llm.logits(h[:, p:])[0]

  def run():
    emb = embed(model.state, e.tokens[None], e.pixels[None], e.merge_idx[None], e.merge_w[None])
    ans = np.full(g, st.mask_id, np.int64)
    spb, nfe, stop = st.steps_per_block, 0, None
    for blk in range(st.num_blocks):
      s, en = blk * st.block_length, (blk + 1) * st.block_length
      if stop is not None and stop <= s:
        break
      counts = uniform_counts(int((ans[s:en] == st.mask_id).sum()), spb)
      for i in range(spb):
        masked = ans == st.mask_id
        if (stop is not None and not masked[:stop].any()) or not masked[s:en].any():
          break
        logits = np.asarray(forward(model.state, emb, jnp.asarray(ans[None], jnp.int32))).astype(np.float64)
        nfe += 1
        logits[np.ix_(masked, list(st.banned_ids))] = -np.inf
        x0 = logits.argmax(-1)
        z = logits - logits.max(-1, keepdims=True)
        conf = np.exp(z[np.arange(g), x0]) / np.exp(z).sum(-1)
        eligible = masked & (np.arange(g) < (stop if stop is not None else en))
        order = [q for q in np.argsort(-np.where(eligible, conf, -np.inf), kind="stable") if eligible[q]]
        take = order[:counts[i]]
        ans[take] = x0[take]
        hits = np.nonzero(ans == st.eot_id)[0]
        stop = int(hits[0]) if len(hits) else None
    return ans[:stop if stop is not None else g], nfe

  emb = embed(model.state, e.tokens[None], e.pixels[None], e.merge_idx[None], e.merge_w[None])  # compile both
  forward(model.state, emb, jnp.zeros((1, g), jnp.int32)).block_until_ready()
  best = float("inf")
  for _ in range(REPS):
    t = time.perf_counter()
    toks, nfe = run()
    best = min(best, time.perf_counter() - t)
  return best, len(toks), nfe, toks


# ----------------------------------------------------------------------------- (b, c) the jitted sampler

def loop_generate(model, ids, imgs, st: SamplerSettings, batch: int):
  inp = generation.prepare_inputs(model, [ids] * batch, [imgs] * batch, seeds=list(range(batch)), rows=batch)
  inp = jax.tree.map(jnp.asarray, inp)
  static = dataclasses.replace(st, refresh_interval=1)
  r = jnp.int32(st.refresh_interval)
  compiled = core._sample_jit.lower(model.graphdef, static, model.state, inp, r).compile()
  dt = float("inf")
  for _ in range(REPS):
    t = time.perf_counter()
    out = jax.block_until_ready(compiled(model.state, inp, r))
    dt = min(dt, time.perf_counter() - t)
  out = jax.tree.map(np.asarray, out)
  toks = int(np.minimum(out.stop, st.gen_length).sum())
  return dt, toks, int(out.nfe.sum()), out.tokens[0][:int(out.stop[0])]


def bench(name, cfg, gen, block, steps, batch, quick):
  model = random_model(cfg)
  ids, imgs = prompt(cfg)
  base = dict(mask_id=cfg.mask_token_id, banned_ids=(1, 2, 3, 4), eot_id=5, gen_length=gen, block_length=block,
              steps=steps)
  st = SamplerSettings(**base)
  rows = []

  def add(label, b, res):
    dt, toks, nfe, _ = res
    rows.append((name, label, b, dt / b, toks / dt, nfe / b))
    print(f"  {name:5s} {label:32s} B={b:<3d} {dt / b:8.3f} s/answer {toks / dt:9.1f} tok/s  NFE {nfe / b:6.1f}",
          flush=True)
    return res

  ea = add("(a) eager loop, per-step jit", 1, eager_generate(model, ids, imgs, st))
  lo = add("(b) while_loop", 1, loop_generate(model, ids, imgs, st, 1))
  same = np.array_equal(np.asarray(ea[3]), np.asarray(lo[3]))
  print(f"  eager and while_loop answers identical: {same}", flush=True)
  add("(b) while_loop", batch, loop_generate(model, ids, imgs, st, batch))
  variants = [("(c) threshold 0.9", dict(threshold=0.9)), ("(c) factor 1.0", dict(factor=1.0)),
              ("(c) prefix cache (refresh 32)", dict(cache="prefix")), ("(c) dual cache", dict(cache="dual")),
              ("(c) dual cache + factor 1.0", dict(cache="dual", factor=1.0)),
              ("(c) shift 1/3, steps/2", dict(schedule="shift", steps=steps // 2))]
  for label, kw in variants[:2] if quick else variants:
    add(label, 1, loop_generate(model, ids, imgs, SamplerSettings(**{**base, **kw}), 1))
  return rows, same


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--configs", default="tiny,mid")
  ap.add_argument("--quick", action="store_true")
  args = ap.parse_args()
  # name: (config, gen_length, block_length, steps, batch, timed repetitions (best counts))
  setups = {"tiny": (config.tiny(), 64, 32, 64, 16, 3), "mid": (config.mid(), 64, 32, 32, 4, 1)}
  all_rows = []
  print(f"devices: {jax.devices()}", flush=True)
  t0 = time.perf_counter()
  for name in args.configs.split(","):
    global REPS
    cfg, gen, block, steps, batch, REPS = setups[name]
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_model(cfg)[1]))
    print(f"{name}: {n / 1e6:.1f}M params, gen {gen}, block {block}, steps {steps}", flush=True)
    rows, _ = bench(name, cfg, gen, block, steps, batch, args.quick)
    all_rows += rows
  print(f"\ntotal {time.perf_counter() - t0:.0f} s\n")
  print("| config | sampler | batch | s / answer | tokens/s | NFE / answer |")
  print("|---|---|---|---|---|---|")
  for name, label, b, spa, tps, nfe in all_rows:
    print(f"| {name} | {label} | {b} | {spa:.3f} | {tps:.1f} | {nfe:.1f} |")


if __name__ == "__main__":
  main()
