"""Sampler benchmark: the original's loop vs the engine in one process, and the 8B memory plan.

    PYTHONPATH=. python bench/sampler.py [--config mid] [--prompts 8] [--rows 8] [--accel]
    PYTHONPATH=. python bench/sampler.py --memory     # AOT only, nothing allocated

(a) original: the original's `generate_with_embeds` structure in PyTorch eager at batch 1: the prompt
    embedded once (our JAX embedding, vision tower included, handed over as a tensor), then per step
    a full forward of the LLM over prompt + answer, float64 softmax confidence, top-k, stop search;
    the LLM is a torch transcription of LLaDA's blocks run on our weights.
(b) engine: `inference.generate_ids` on the same prompts with `--rows` rows (compile excluded).
Both at temperature 0 with the same settings; the answers are compared token by token.
(c) `--accel`: the engine with threshold / factor / prefix / dual cache.
`--arrivals`: continuous batching, Poisson arrivals, against full fixed batches.
`--memory`: `advance` of the 8B config at 64 rows x 256 answer x 1024 prompt, compiled ahead of time,
bf16 without a cache and float32 per cache mode (`--caches`): bytes of weights, of the cache, of the
rest of the engine state, temporaries;
the passes over groups of `forward_rows` rows (all 64 at once: 71 GiB of temporaries, the attention
scores of 64 x 1280 x 1280 positions). XLA:CPU has no bf16 matmul: it converts the bf16 weights to a
float32 copy (32 GiB of temporaries that a GPU does not make), so the float32 plan, whose activations
are twice bf16's, is the upper bound reported beside it.
Random weights, the LM head scaled to a logit spread of ~15 so that confidences are not flat.

Notes (`EngineConfig.head_rungs`): at a uniform schedule of one commit a step the LM head's decision does
0.75 of the whole block's work with two rungs (the default), 0.69 with three, 0.67 with unboundedly many;
each rung is one more copy of the decision to compile, ~1-2 s an engine program on config.tiny's CPU compile.
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
import torch
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lladav_jax import config, multimodal  # noqa: E402
from lladav_jax.api import LLaDAV  # noqa: E402
from lladav_jax.model import abstract_model  # noqa: E402
from lladav_jax.model.common import random_like  # noqa: E402
from lladav_jax.inference import SamplingParams, engine, generation, prompts as prompt_lib, runner as runner_lib  # noqa: E402
from lladav_jax.inference.engine import EngineConfig, EngineShapes, state as engine_state  # noqa: E402
from lladav_jax.inference.engine.schedule import uniform_counts  # noqa: E402
from lladav_jax.training.step import ANALYSIS_ONLY, memory_stats  # noqa: E402

from PIL import Image  # noqa: E402


def random_model(cfg, seed=0, logit_std=15.0):
  head_scale = logit_std / (0.02 * cfg.llm.hidden_size ** 0.5)
  graphdef, abstract = abstract_model(cfg)
  icfg = multimodal.ImageConfig(image_size=cfg.vision.image_size, patch_size=cfg.vision.patch_size, aspect="square")
  state = jax.tree.map(jnp.asarray, random_like(abstract, seed, scales={"lm_head": head_scale}))
  return LLaDAV(cfg, graphdef, state, image_cfg=icfg)


def prompts(cfg, n, n_text=48):
  rng = np.random.default_rng(0)
  out = []
  for _ in range(n):
    ids = [int(i) for i in rng.integers(10, cfg.llm.vocab_size - 10, n_text)]
    ids.insert(8, -200)
    s = cfg.vision.image_size
    out.append((ids, [Image.fromarray(rng.integers(0, 255, (s, s, 3), np.uint8))]))
  return out


# ----------------------------------------------------------------------------- (a) the original's loop

class TorchLLaDA:
  """LLaDA's blocks in torch eager (float32): RMSNorm, rotate-half RoPE, bidirectional SDPA, SwiGLU."""

  def __init__(self, model: LLaDAV, device: str = "cpu"):
    p = jax.tree.map(lambda x: torch.from_numpy(np.array(x, np.float32)).to(device),
                     nnx.to_pure_dict(model.state)["llm"])
    self.p, self.c, self.device = p, model.cfg.llm, device

  def _norm(self, x, w):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.c.rms_norm_eps))

  def __call__(self, x):  # [1, L, D] -> logits [L, V]
    c, lay = self.c, self.p["layers"]
    n = x.shape[1]
    dev = self.device
    inv = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float32, device=dev) / c.head_dim))
    f = torch.arange(n, dtype=torch.float32, device=dev)[:, None] * inv
    cos, sin = torch.cat([f, f], -1).cos(), torch.cat([f, f], -1).sin()

    def rope(t):  # [1, H, L, Dh]
      a, b = t.chunk(2, -1)
      return t * cos + torch.cat([-b, a], -1) * sin
    for i in range(c.num_layers):
      h = self._norm(x, lay["attn_norm"][i])
      q, k, v = ((h @ lay["attn"][nm][i].flatten(1)).unflatten(-1, lay["attn"][nm][i].shape[1:]).transpose(1, 2)
                 for nm in ("q_proj", "k_proj", "v_proj"))
      rep = c.num_heads // c.num_kv_heads
      k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
      o = torch.nn.functional.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=False)
      x = x + o.transpose(1, 2).flatten(2) @ lay["attn"]["o_proj"][i].flatten(0, 1)
      h = self._norm(x, lay["mlp_norm"][i])
      m = lay["mlp"]
      x = x + (torch.nn.functional.silu(h @ m["gate_proj"][i]) * (h @ m["up_proj"][i])) @ m["down_proj"][i]
    return self._norm(x, self.p["final_norm"])[0] @ self.p["lm_head"]


def forward_flops(cfg, positions: int, head_positions: int) -> float:
  """Matmul FLOPs of one LLM forward over `positions` (bidirectional attention: full L^2) with the LM head
  on `head_positions` of them (the embedding lookup and norms not counted)."""
  c = cfg.llm
  per_layer = c.hidden_size * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim + c.num_heads * c.head_dim * \
      c.hidden_size + 3 * c.hidden_size * c.intermediate_size
  attn = 2 * 2 * positions ** 2 * c.num_heads * c.head_dim
  return c.num_layers * (2 * per_layer * positions + attn) + 2 * c.hidden_size * c.vocab_size * head_positions


def original_generate(tmodel, prompt_emb, st: SamplingParams, forwards=None):
  """generate_with_embeds for one prompt (temperature 0, low_confidence, uniform counts, eot stop);
  `forwards` (a list) gets the number of forwards run."""
  g, bl, dev = st.gen_length, st.block_length, tmodel.device
  x = torch.full((g,), st.mask_id, dtype=torch.long, device=dev)
  p = prompt_emb.shape[1]
  stop = None
  for blk in range(st.num_blocks):
    s, e = blk * bl, (blk + 1) * bl
    if stop is not None and stop <= s:
      break
    counts = uniform_counts(int((x[s:e] == st.mask_id).sum()), st.steps_per_block)
    for i in range(st.steps_per_block):
      masked = x == st.mask_id
      if (stop is not None and not masked[:stop].any()) or not masked[s:e].any():
        break
      logits = tmodel(torch.cat([prompt_emb, tmodel.p["embed"][x][None]], 1))[p:].double()
      if forwards is not None:
        forwards.append(p + g)
      logits[:, list(st.banned_ids)] = torch.where(masked[:, None], -torch.inf, logits[:, list(st.banned_ids)])
      x0 = logits.argmax(-1)
      conf = torch.gather(torch.softmax(logits, -1), -1, x0[:, None])[:, 0]
      limit = stop if stop is not None else e
      conf = torch.where(masked & (torch.arange(g, device=dev) < limit), conf, -torch.inf)
      take = torch.topk(conf, counts[i]).indices
      take = take[torch.isfinite(conf[take])]
      x[take] = x0[take]
      hits = torch.nonzero(x == st.eot_id)
      stop = int(hits[0]) if len(hits) else None
  return x[:stop if stop is not None else g].tolist()


def bench_vs_original(args):
  cfg = {"tiny": config.tiny(), "mid": config.mid()}[args.config]
  model = random_model(cfg)
  st = SamplingParams(mask_id=cfg.mask_token_id, banned_ids=(1, 2, 3, 4), eot_id=5, gen_length=args.gen,
                       block_length=args.block, steps=args.steps)
  ps = prompts(cfg, args.prompts)
  n = len(ps)
  tmodel = TorchLLaDA(model, args.torch_device)
  embs, embs_len = [], []
  embed = nnx.jit(lambda m, *a: m.embed(*a))  # one compile (equal prompt shapes), not op-by-op dispatch
  for ids, imgs in ps:
    e = multimodal.expand(ids, multimodal.process_sample_images(imgs, model.image_cfg), model.image_cfg)
    emb = embed(model.module, e.tokens[None], e.pixels[None], e.merge_idx[None], e.merge_w[None])
    embs.append(torch.from_numpy(np.array(emb, np.float32)).to(args.torch_device))
    embs_len.append(e.tokens)
  torch.set_num_threads(args.torch_threads)  # on this shared 2-core machine 2 threads ran 40x slower than 1
  original_generate(tmodel, embs[0], st)  # warm-up (CUDA context, kernels); not timed
  t = time.perf_counter()
  forwards = []
  ref = [original_generate(tmodel, emb, st, forwards) for emb in embs]  # .tolist() syncs each answer
  t_orig = time.perf_counter() - t
  print(f"  original loop: {t_orig:.1f} s for {n} answers", flush=True)
  flops_orig = sum(forward_flops(cfg, n, n) for n in forwards)  # its head runs over every position
  run = lambda **kw: generation.generate_ids(model, [i for i, _ in ps], [m for _, m in ps], params=st,  # noqa: E731
                                             batch_size=args.rows, **kw)
  t = time.perf_counter()
  run()  # compile
  print(f"  engine: compiled and ran once in {time.perf_counter() - t:.1f} s", flush=True)
  t = time.perf_counter()
  outs = run()
  t_eng = time.perf_counter() - t
  same = sum(o.token_ids == r for o, r in zip(outs, ref))
  prompt_bucket = prompt_lib.bucket_length(max(len(e) for e in embs_len))
  steps_run = max(o.nfe for o in outs)  # every row of a batch runs until the batch's last one finishes
  flops_eng = steps_run * -(-n // args.rows) * args.rows * forward_flops(cfg, prompt_bucket + args.gen, args.block)
  print(f"{args.config}: {n} prompts, gen {args.gen}, block {args.block}, steps {args.steps}, "
        f"torch threads {args.torch_threads} on {args.torch_device}, JAX {jax.devices()[0].device_kind} "
        f"(matmul precision {jax.config.jax_default_matmul_precision or 'default'}), {os.cpu_count()} cores")
  print(f"  (a) original loop, torch eager, batch 1: {n / t_orig:7.2f} answers/s, "
        f"{flops_orig / n / 1e9:7.1f} GFLOP an answer, {flops_orig / t_orig / 1e9:6.1f} GFLOP/s")
  print(f"  (b) engine, {args.rows} rows:               {n / t_eng:7.2f} answers/s, "
        f"{flops_eng / n / 1e9:7.1f} GFLOP an answer, {flops_eng / t_eng / 1e9:6.1f} GFLOP/s   "
        f"ratio {t_orig / t_eng:.2f}x, identical answers {same}/{n}")
  if args.accel:
    for label, kw in (("threshold 0.9", dict(threshold=0.9)), ("factor 1.0", dict(factor=1.0)),
                      ("prefix cache", dict(cache="prefix")), ("dual cache", dict(cache="dual")),
                      ("dLLM-Cache", dict(cache="dllm"))):
      s2 = SamplingParams(**{**st.__dict__, **kw})
      go = lambda: generation.generate_ids(model, [i for i, _ in ps], [m for _, m in ps], params=s2,  # noqa: E731
                                           batch_size=args.rows)
      go()
      t = time.perf_counter()
      o2 = go()
      dt = time.perf_counter() - t
      agree = np.mean([np.mean(np.asarray(a.token_ids[:len(r)]) == np.asarray(r[:len(a.token_ids)]))
                       if min(len(a.token_ids), len(r)) else 1.0 for a, r in zip(o2, ref)])
      print(f"  (c) {label:14s}: {n / dt:7.2f} answers/s ({t_orig / dt:.2f}x), NFE/answer "
            f"{np.mean([o.nfe for o in o2]):.1f}, token agreement with (a) {agree:.2f}")


# ----------------------------------------------------------------------------- the demo task

def bench_demo(args):
  """The trained demo model (`python -m lladav_jax.train --config=configs/finetune.py:demo`) on the demo
  test split with the task's settings, per cache mode: exact match and answers/s (a warm-up batch
  compiles first; the timed pass is the whole split, the best of `--repeat`)."""
  from lladav_jax.data.demo_data import ensure_demo_data
  from lladav_jax.eval import run as R
  from lladav_jax.eval.readers import read_samples
  from lladav_jax.eval.tasks import get_task
  model = LLaDAV.from_pretrained(args.demo)
  if not os.path.exists(os.path.join(args.demo, "image_config.json")):  # saved before models carried it
    model.image_cfg = dataclasses.replace(model.image_cfg, multi_image="pad")  # the demo preset's eval path
  task = get_task("demo")
  paths = ensure_demo_data(os.path.expanduser("~/.cache/lladav_jax/demo"))
  samples = read_samples(paths["test"], task).samples
  kw = R.resolve_gen_kwargs(task)
  print(f"demo test: {len(samples)} samples, gen {kw['gen_length']}, block {kw['block_length']}, steps "
        f"{kw['steps']}, batch {args.rows}")
  for cache in (None, "prefix", "dual", "dllm"):
    R.evaluate(task, samples[:args.rows], model.generate, gen_kwargs={"cache": cache}, batch_size=args.rows)
    res = [R.evaluate(task, samples, model.generate, gen_kwargs={"cache": cache}, batch_size=args.rows)
           for _ in range(args.repeat)]
    t = min(r["seconds"]["generate_total"] for r in res)  # the best pass: the CPU is shared
    res = res[0]
    print(f"  cache={str(cache):6s}: exact match {res['metrics']['exact_match']:5.1f}%, "
          f"{len(samples) / t:7.1f} answers/s, NFE/answer {res['nfe']['mean']:.2f}", flush=True)


# ----------------------------------------------------------------------------- 8B memory plan

def memory(rows=64, answer=256, prompt=1024, block=32, caches=(None, "prefix", "dual", "dllm")):
  print(f"8B advance, {rows} rows x {answer} answer x {prompt} prompt, block {block}")
  runs = [("bfloat16", None, 2)] + [("float32", c, 2) for c in caches]
  for dtype, cache, groups in runs:
    cfg = config.llada_v_8b().replace(dtype=dtype, param_dtype=dtype)
    graphdef, params = abstract_model(cfg)
    weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    ec = EngineConfig(mask_id=cfg.mask_token_id, banned_ids=(126081, 126080, 126346, 126347), max_block_length=block,
                      cache=cache, forward_rows=groups, max_transfer_ratio=0.25 if cache == "dllm" else 0.0)
    shapes = EngineShapes(rows=rows, prompt_len=prompt, answer_len=answer)
    state = jax.eval_shape(lambda p: engine_state._init(graphdef, ec, shapes, p), params)
    kv = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.cache))
    rest = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)) - kv
    t = time.perf_counter()
    m = memory_stats(engine.advance.lower(graphdef, ec, params, state, np.int32(1)).compile(ANALYSIS_ONLY))
    gb = lambda b: f"{b / 2**30:6.2f} GiB"  # noqa: E731
    print(f"  {dtype} cache={cache}, forward_rows={groups}: weights {gb(weights)}, cache {gb(kv)}, "
          f"other state {gb(rest)}, temporaries {gb(m['temp_size_in_bytes'])} "
          f"(compiled in {time.perf_counter() - t:.0f} s)", flush=True)


# ----------------------------------------------------------------------------- continuous batching

def bench_arrivals(args, n=24, rows=8):
  """Requests of 32 or 64 answer positions arrive one by one (Poisson, at a rate that keeps the
  engine busy): the engine (refilled as rows finish) vs the same requests as full fixed batches
  (a batch starts once `rows` requests have arrived and ends with its slowest row)."""
  cfg = config.tiny() if args.config == "tiny" else config.mid()
  model = random_model(cfg)
  rng = np.random.default_rng(0)
  ids = [[int(i) for i in rng.integers(10, cfg.llm.vocab_size - 10, 24)] for _ in range(n)]
  lens = [32 if k % 2 else 64 for k in range(n)]
  base = SamplingParams(mask_id=cfg.mask_token_id, banned_ids=(1, 2, 3, 4), gen_length=64, block_length=32, steps=32)
  sts = [SamplingParams(**{**base.__dict__, "gen_length": g, "steps": g // 2}) for g in lens]
  inp = prompt_lib.prepare_inputs(model, ids, [[]] * n, seeds=list(range(n)), rows=n)
  reqs = [prompt_lib.requests(inp, st.row_params(64, 32), 0)[k] for k, st in enumerate(sts)]
  ec = base.engine_config()
  shapes = EngineShapes(rows=rows, prompt_len=inp.prompt.length, answer_len=64, stops=1, stop_len=1,
                       tiles=inp.prompt.pixels.shape[1])

  def fixed(arrive):
    t0, now, done = time.perf_counter(), 0.0, {}
    for b0 in range(0, n, rows):
      now = max(now, arrive[b0 + rows - 1])
      while time.perf_counter() - t0 < now:
        time.sleep(0.001)
      runner_lib.run_engine(model, reqs[b0:b0 + rows], ec, shapes)
      now = time.perf_counter() - t0
      done.update({k: now for k in range(b0, b0 + rows)})
    return now, done

  def continuous(arrive):
    t0, done, running = time.perf_counter(), {}, {}
    runner = runner_lib.EngineRunner(model, [runner_lib.Lane(ec, shapes)])
    nxt = 0
    while len(done) < n:
      now = time.perf_counter() - t0
      while nxt < n and arrive[nxt] <= now and runner.free[0]:
        running[runner.insert(reqs[nxt])] = nxt
        nxt += 1
      if not running:
        time.sleep(0.001)
        continue
      (got,) = runner.advance(4)
      for r in got.finished():
        done[running.pop(r)] = time.perf_counter() - t0
        runner.release(r)
    return time.perf_counter() - t0, done

  fixed(np.zeros(n))  # compile
  continuous(np.zeros(n))
  t_batch, _ = fixed(np.zeros(n))
  rate = n / t_batch  # arrivals at the fixed batches' own throughput keep both busy
  arrive = np.cumsum(rng.exponential(1 / rate, n))
  for name, fn in (("fixed batches", fixed), ("engine, refilled", continuous)):
    total, done = fn(arrive)
    lat = np.median([done[k] - arrive[k] for k in range(n)])
    print(f"  {name:17s}: {n / total:6.2f} answers/s, median latency {lat:6.2f} s")


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--config", default="mid", choices=["tiny", "mid"])
  ap.add_argument("--prompts", type=int, default=8)
  ap.add_argument("--rows", type=int, default=8)
  ap.add_argument("--gen", type=int, default=64)
  ap.add_argument("--block", type=int, default=32)
  ap.add_argument("--steps", type=int, default=32)
  ap.add_argument("--torch_threads", type=int, default=1)
  ap.add_argument("--torch_device", default="cpu", help="where the original's loop runs (cuda on a GPU machine)")
  ap.add_argument("--precision", default=None,
                  help="jax_default_matmul_precision; 'highest' on a GPU (float32 as torch's, not TF32)")
  ap.add_argument("--accel", action="store_true")
  ap.add_argument("--memory", action="store_true")
  ap.add_argument("--caches", default="none,prefix,dual,dllm", help="--memory: the cache modes planned (float32)")
  ap.add_argument("--arrivals", action="store_true")
  ap.add_argument("--demo", default=None, help="a trained demo model directory: the demo task per cache mode")
  ap.add_argument("--repeat", type=int, default=3, help="--demo: timed passes per mode (the best counts)")
  args = ap.parse_args()
  if args.precision:
    jax.config.update("jax_default_matmul_precision", args.precision)
  print(f"devices: {jax.devices()}")
  if args.memory:
    memory(caches=tuple(None if c == "none" else c for c in args.caches.split(",")))
  elif args.demo:
    bench_demo(args)
  elif args.arrivals:
    bench_arrivals(args)
  else:
    bench_vs_original(args)


if __name__ == "__main__":
  main()
