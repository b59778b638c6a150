"""The engine's dLLM-Cache mode against a NumPy transcription of the original's hook
(`cache_hook_LLaDA_V.py` + `Cache.py`: the four refresh cases, the cosine choice over V, the scatter of
K, V, attention and FFN outputs) driving the original's generate loop (tests/test_sampler.py's
reference): the tokens and, after every step, every cached feature. Then the settings under which
the cache is exact, and that its settings are values (no compile)."""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from lladav_jax.inference import engine, prompts as prompt_lib, runner as runner_lib
from lladav_jax.inference.engine import EngineShapes
from lladav_jax.inference.features import TileFeatures
from tests.test_sampler import BUCKETS, model, reference_generate, settings  # noqa: F401
from tests.test_sampler_engine import COMPILES, PROMPTS

SUFFIX = [60, 61]


def _rms(x, w, eps):
  return w * (x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps))


def _rope(x, pos, theta):  # x [L, N, H]
  h = x.shape[-1]
  inv = 1.0 / (theta ** (np.arange(0, h, 2, dtype=np.float32) / h))
  f = pos[:, None].astype(np.float32) * inv
  emb = np.concatenate([f, f], -1)[:, None]
  x1, x2 = np.split(x, 2, -1)
  return x * np.cos(emb) + np.concatenate([-x2, x1], -1) * np.sin(emb)


class NumpyDllmCache:
  """The hook, for one unpadded sequence [prompt | answer | suffix] at positions 0..S-1 (float32).
  `fwd(tail)` is one model forward as the original's generate calls it; it returns the answer's logits
  and appends a copy of the cache (per layer: k, v, attn, ffn [S, ...]) to `snapshots`."""

  def __init__(self, model, prompt_emb, gen_length, kp, kr, ratio):
    llm = nnx.merge(model.graphdef, model.state).llm
    self.c = llm.cfg
    a = lambda x: np.asarray(x[...], np.float32)  # noqa: E731
    ly = llm.layers
    self.w = dict(embed=a(llm.embed), final_norm=a(llm.final_norm), lm_head=a(llm.lm_head),
                  attn_norm=a(ly.attn_norm), q=a(ly.attn.q_proj), k=a(ly.attn.k_proj), v=a(ly.attn.v_proj),
                  o=a(ly.attn.o_proj), mlp_norm=a(ly.mlp_norm), gate=a(ly.mlp.gate_proj), up=a(ly.mlp.up_proj),
                  down=a(ly.mlp.down_proj))
    self.prompt_emb, self.p, self.g = prompt_emb, len(prompt_emb), gen_length
    self.kp, self.kr, self.ratio = kp, kr, ratio
    self.step, self.cache, self.snapshots = 0, None, []

  def fwd(self, tail, uncond=False):
    assert not uncond
    w, c, p = self.w, self.c, self.p
    self.step += 1  # the original's counter: forwards so far, from 1
    rp, rg = (self.step - 1) % self.kp == 0, (self.step - 1) % self.kr == 0
    x = np.concatenate([self.prompt_emb, w["embed"][np.asarray(tail)]]).astype(np.float32)
    s = len(x)
    pos = np.arange(s)
    if self.cache is None:
      assert rp and rg
      self.cache = [dict(k=np.zeros((s, c.num_kv_heads, c.head_dim), np.float32), v=None, attn=None, ffn=None)
                    for _ in range(c.num_layers)]
    eps, rep = c.rms_norm_eps, c.num_heads // c.num_kv_heads
    for li, cl in enumerate(self.cache):
      xn = _rms(x, w["attn_norm"][li], eps)
      v_all = np.einsum("ld,dkh->lkh", xn, w["v"][li])  # one product: an unchanged input gives the cached bits
      if rp and rg:
        q_rows = np.arange(s)
      elif rg:
        q_rows = np.arange(p, s)
      else:  # refresh_index: int(len * ratio) lowest cos(v_new, v_cached), ties to the lower position
        v_now = v_all[p:].reshape(s - p, -1)
        v_old = cl["v"][p:].reshape(s - p, -1)
        cos = (v_now * v_old).sum(-1) / np.maximum(np.linalg.norm(v_now, axis=-1) * np.linalg.norm(v_old, axis=-1),
                                                   1e-8)
        cos[(v_now == v_old).all(-1)] = 1.0  # an unchanged V (its input unchanged): exactly 1
        chosen = p + np.argsort(cos, kind="stable")[:int((s - p) * self.ratio)]
        q_rows = np.concatenate([np.arange(p), chosen]) if rp else chosen
      if rp and rg:
        for f in ("v", "attn", "ffn"):
          cl[f] = np.zeros((s,) + ((c.num_kv_heads, c.head_dim) if f == "v" else (c.hidden_size,)), np.float32)
      xq = xn[q_rows]
      q = _rope(np.einsum("ld,dnh->lnh", xq, w["q"][li]), pos[q_rows], c.rope_theta)
      cl["k"][q_rows] = _rope(np.einsum("ld,dkh->lkh", xq, w["k"][li]), pos[q_rows], c.rope_theta)
      cl["v"][q_rows] = v_all[q_rows]
      kk, vv = np.repeat(cl["k"], rep, 1), np.repeat(cl["v"], rep, 1)
      sc = np.einsum("qnh,snh->nqs", q, kk) / np.sqrt(c.head_dim)
      pr = np.exp(sc - sc.max(-1, keepdims=True))
      pr /= pr.sum(-1, keepdims=True)
      cl["attn"][q_rows] = np.einsum("nqh,nhd->qd", np.einsum("nqs,snh->nqh", pr, vv), w["o"][li])
      x = x + cl["attn"]  # every position: its cached or new attention output
      hn = _rms(x[q_rows], w["mlp_norm"][li], eps)
      gate = hn @ w["gate"][li]
      cl["ffn"][q_rows] = (gate / (1 + np.exp(-gate)) * (hn @ w["up"][li])) @ w["down"][li]
      x = x + cl["ffn"]
    self.snapshots.append([{f: a.copy() for f, a in cl.items()} for cl in self.cache])
    h = _rms(x, w["final_norm"], eps)
    return h[p:p + self.g] @ w["lm_head"]


def _engine_rows(model, st, prompt_ids, cfg, answer_bucket):
  """One request (no CFG) in an engine of one row; returns (init state after insert, config, shapes)."""
  inp = prompt_lib.prepare_inputs(model, [prompt_ids], [[]], suffix_ids=SUFFIX, stop_ids=[], seeds=[0], rows=1,
                                  **BUCKETS)
  req = prompt_lib.requests(inp, st.row_params(answer_bucket, st.block_length), len(SUFFIX))[0]
  shapes = EngineShapes(rows=1, prompt_len=inp.prompt.length, answer_len=answer_bucket, suffix_len=len(SUFFIX),
                        stops=inp.stop_ids.shape[1], stop_len=inp.stop_ids.shape[2])
  state = engine.init(model.graphdef, cfg, shapes, model.state)
  return engine.insert(model.graphdef, cfg, model.state, state, np.int32(0), TileFeatures(model).attach(req, 0)), shapes


def test_dllm_cache_follows_the_numpy_transcription_of_the_hook(model):
  # steps 1..8: both refreshed (1), response (4, 7), prompt (6), neither (the rest); 4 of 18 response
  # positions recomputed, from 6 static slots over a response bucket of 24 + 2 (padding never picked)
  st = settings(gen_length=16, block_length=8, steps=8, cache="dllm", prompt_interval=5, gen_interval=3,
                transfer_ratio=0.25)
  cfg = st.engine_config()
  state, shapes = _engine_rows(model, st, PROMPTS[0], cfg, answer_bucket=24)
  p, plen = shapes.prompt_len, len(PROMPTS[0])
  ref = NumpyDllmCache(model, np.asarray(state.prompt_emb[0, p - plen:], np.float32), 16, 5, 3, 0.25)
  ids, nfe, taken = reference_generate(ref.fwd, gen_length=16, block_length=8, steps=8, banned=st.banned_ids,
                                       stops=[], suffix=SUFFIX)
  assert taken == nfe == 8 == len(ref.snapshots)
  # engine columns of the reference's [prompt | answer | suffix]: the prompt segment's, then the response's
  cols = np.concatenate([np.arange(p - plen, p), p + np.arange(16), p + 24 + np.arange(len(SUFFIX))])
  for n in range(8):
    state = engine.advance(model.graphdef, cfg, model.state, state, np.int32(1))
    assert int(state.steps[0]) == n + 1
    c = state.cache
    got = jax.tree.map(lambda a, b: np.concatenate([a, b], axis=2)[:, 0][:, cols].astype(np.float32),
                       c.prompt, c.response)
    for f in ("k", "v", "attn", "ffn"):
      want = np.stack([snap[f] for snap in ref.snapshots[n]])
      scale = np.abs(want).max()
      np.testing.assert_allclose(getattr(got, f), want, rtol=0, atol=1e-5 * scale, err_msg=f"step {n + 1}: {f}")
  assert bool(state.done[0])
  assert np.asarray(state.response[0, :16]).tolist() + SUFFIX == ids
  # queries run: both (every position), response (2x: 16 + 8 answer bucket padding + 2), prompt (+ 6 slots), neither
  assert int(state.query_tokens[0]) == (p + 26) + 2 * 26 + (p + 6) + 4 * 6


def _requests(model, st, bound):
  inp = prompt_lib.prepare_inputs(model, PROMPTS[:2], [[]] * 2, suffix_ids=SUFFIX, stop_ids=[], seeds=[3, 4],
                                  rows=2, **BUCKETS)
  shapes = EngineShapes(rows=2, prompt_len=inp.prompt.length, answer_len=24, suffix_len=len(SUFFIX), stops=1,
                        stop_len=1)
  reqs = prompt_lib.requests(inp, st.row_params(24, st.block_length), len(SUFFIX))
  return reqs, st.engine_config(max_transfer_ratio=bound), shapes


def test_dllm_cache_is_exact_when_prompt_and_response_refresh_and_its_settings_are_values(model):
  base = settings(gen_length=24, block_length=8, steps=12, cfg_scale=1.0, temperature=0.5)
  reqs, cfg, shapes = _requests(model, base, 0.0)
  want = [r.response.tolist() for r in runner_lib.run_engine(model, reqs, cfg, shapes)]
  dl = dataclasses.replace(base, cache="dllm")
  runs = {}
  for name, kw in dict(exact_ratio=dict(prompt_interval=1, gen_interval=7, transfer_ratio=1.0),
                       exact_gen=dict(prompt_interval=1, gen_interval=1, transfer_ratio=0.25),
                       demo=dict(), other=dict(prompt_interval=4, gen_interval=2, transfer_ratio=0.5)).items():
    reqs, cfg, shapes = _requests(model, dataclasses.replace(dl, **kw), 1.0)
    runs[name] = [r.response.tolist() for r in runner_lib.run_engine(model, reqs, cfg, shapes)]
    if name == "exact_ratio":
      before = len(COMPILES)
  assert len(COMPILES) == before, COMPILES[before:]  # Kp, Kr and rho under the engine's bound are values
  assert runs["exact_ratio"] == want and runs["exact_gen"] == want
  assert runs["demo"] != want and runs["other"] != runs["demo"]  # the cache is in use and the values reach it
  # the passes over groups of rows (each group's cache rows written in place at its offset): the same cache and
  # tokens over the first pass (every feature written) and the first cached step. Only to float rounding, and not
  # for the whole answer: XLA:CPU's row reductions (RMSNorm) may round differently for another number of rows, and
  # this model's repeated tokens have near-equal confidences and cache similarities, so that at LLVM -O1 a later
  # step commits or refreshes another position.
  reqs, cfg, shapes = _requests(model, dl, 1.0)
  whole, grouped = (runner_lib.EngineRunner(model, [runner_lib.Lane(c, shapes)])
                   for c in (cfg, dataclasses.replace(cfg, forward_rows=2)))
  for r in reqs:
    assert whole.insert(r) == grouped.insert(r)
  for n in range(2):
    (a,), (b,) = whole.advance(1), grouped.advance(1)
    np.testing.assert_array_equal(b.response, a.response)
    for seg in ("prompt", "response"):
      for f in ("k", "v", "attn", "ffn"):
        u, v = (np.asarray(getattr(getattr(r.states[0].cache, seg), f), np.float32) for r in (whole, grouped))
        np.testing.assert_allclose(v, u, rtol=0, atol=1e-5 * max(np.abs(u).max(), 1.0), err_msg=f"step {n + 1}: {seg}.{f}")


def test_transfer_ratio_above_the_engines_bound_is_refused(model):
  reqs, cfg, shapes = _requests(model, settings(cache="dllm", transfer_ratio=0.5), 0.25)
  with pytest.raises(ValueError, match="transfer_ratio=0.5 is above the engine's max_transfer_ratio=0.25"):
    runner_lib.run_engine(model, reqs, cfg, shapes)
  with pytest.raises(ValueError, match="transfer_ratio"):
    settings(cache="dllm", transfer_ratio=1.5).validate()
