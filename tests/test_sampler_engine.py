"""The engine: settings are values (no compile in a sweep), a request's tokens do not depend on its
batch neighbours or its arrival time, the chunked decision equals the full one, and the two stop
rules against a NumPy transcription of the original's stop search, and the lean decision (the head
on the eligible positions only) against the full block's. One compiled engine (CFG on, dual cache)
serves the engine tests (and one more with the lean decision off)."""
from __future__ import annotations

import dataclasses
import functools
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lladav_jax.inference import engine, generation, prompts as prompt_lib, runner as runner_lib
from lladav_jax.inference.engine import TRACE_COUNTS, EngineShapes, decode
from lladav_jax.inference.features import TileFeatures
from lladav_jax.inference.engine.decode import decide, first_occurrences, update_stop
from tests.test_sampler import BUCKETS, model, settings  # noqa: F401

COMPILES = []
jax.monitoring.register_event_duration_secs_listener(
    lambda name, *a, **k: COMPILES.append(name) if name == "/jax/core/compile/backend_compile_duration" else None)

BASE = settings(gen_length=24, block_length=8, steps=12, cfg_scale=1.0, cache="dual", refresh_interval=2)
RUN = dict(answer_bucket=24, batch_size=2, suffix_ids=[60, 61], stop_ids=[[7, 8]], **BUCKETS)
# text prompts keep the prompt bucket at 64 positions (images are covered by test_sampler.py)
PROMPTS = [[7, 8, 9, 10, 11, 12], [30, 31, 32, 33, 34, 35, 36, 37, 38, 39], [40, 41, 42, 43], [70, 71, 72]]


def test_a_sweep_of_every_value_setting_compiles_nothing(model):
  warm = generation.generate_ids(model, PROMPTS[:2], None, params=BASE, **RUN)
  before = len(COMPILES)
  sweep = dict(temperature=dict(temperature=0.8), random=dict(remasking="random", temperature=0.5),
               cfg=dict(cfg_scale=2.5), threshold=dict(threshold=0.0), factor=dict(factor=100.0), steps24=dict(steps=24),
               steps3=dict(steps=3), gen16=dict(gen_length=16, steps=8), gen8=dict(gen_length=8, steps=4),
               shift=dict(schedule="shift", shift=0.5), refresh=dict(refresh_interval=1),
               original=dict(stop_rule="original"))
  outs = {name: generation.generate_ids(model, PROMPTS[:2], None, params=dataclasses.replace(BASE, seed=5, **kw),
                                        **RUN) for name, kw in sweep.items()}
  assert len(COMPILES) == before, COMPILES[before:]
  # the values reached the compiled loop
  assert outs["steps24"][0].nfe == 2 * 24 and outs["steps24"][0].steps == 24 > warm[0].steps == 12
  assert outs["steps3"][0].steps <= 3
  assert outs["gen16"][0].steps <= 8 and len(outs["gen16"][0].token_ids) <= 16 + 2
  assert outs["gen8"][0].steps <= 4 and len(outs["gen8"][0].token_ids) <= 8 + 2
  assert outs["threshold"][0].steps <= 3 and outs["factor"][0].steps <= 3  # a block a step: every position passes
  assert outs["temperature"][0].token_ids != warm[0].token_ids
  assert outs["cfg"][0].token_ids != warm[0].token_ids


def _requests(model):
  """Five requests of different settings, prompts and seeds."""
  kinds = [dict(), dict(temperature=0.9), dict(gen_length=16, steps=8, remasking="random", temperature=0.3),
           dict(threshold=0.5, refresh_interval=1), dict(gen_length=8, steps=4, cfg_scale=0.0)]
  prompts = PROMPTS + [PROMPTS[1]]
  inp = prompt_lib.prepare_inputs(model, prompts, [[]] * 5, suffix_ids=[60, 61], stop_ids=[[7, 8]],
                                  seeds=[11, 12, 13, 14, 15], rows=5, **BUCKETS)
  rows = [prompt_lib.requests(inp, dataclasses.replace(BASE, **kw).row_params(24, 8), 2)[k]
          for k, kw in enumerate(kinds)]
  return rows, EngineShapes(rows=2, prompt_len=inp.prompt.length, answer_len=24, suffix_len=2, stops=1, stop_len=2)


def _run(model, reqs, shapes, order, rng, cfg=None, head=False):
  """Requests arrive in `order`, each after a random number of steps of the running ones. `head`: also
  each request's head_tokens and steps."""
  cfg = cfg or BASE.engine_config()
  st = engine.init(model.graphdef, cfg, shapes, model.state)
  out, running, queue = {}, {}, list(order)
  while queue or running:
    free = [r for r in range(shapes.rows) if r not in running]
    if queue and free:
      k = queue.pop(0)
      st = engine.insert(model.graphdef, cfg, model.state, st, np.int32(free[0]),
                         TileFeatures(model).attach(reqs[k], shapes.tiles))
      running[free[0]] = k
    st = engine.advance(model.graphdef, cfg, model.state, st, np.int32(rng.integers(1, 4) if queue else 1 << 20))
    for r in np.nonzero(np.asarray(st.live & st.done))[0]:
      out[running.pop(int(r))] = (np.asarray(st.response[r]).tolist(), int(st.stop[r]), int(st.nfe[r])) + (
          (int(st.head_tokens[r]), int(st.steps[r])) if head else ())
  return out


def test_tokens_do_not_depend_on_neighbours_or_arrival(model):
  reqs, shapes = _requests(model)
  alone = {k: _run(model, [r], shapes, [0], np.random.default_rng(0))[0] for k, r in enumerate(reqs)}
  assert len({tuple(a[0]) for a in alone.values()}) == 5
  rng = np.random.default_rng(1)
  for order in ([0, 1, 2, 3, 4], [4, 2, 0, 3, 1], list(rng.permutation(5))):
    assert _run(model, reqs, shapes, order, rng) == alone, order


def test_the_lean_head_gives_the_full_blocks_tokens(model):
  """The engine with the decision on the eligible positions only (the default ladder 8, 4) and with
  the whole block always (head_rungs=1): the same tokens at temperature 0 and > 0 (seeded, random
  remasking, threshold), with less of the head."""
  reqs, shapes = _requests(model)
  lean = _run(model, reqs, shapes, [0, 1, 2, 3, 4], np.random.default_rng(1), head=True)
  full = _run(model, reqs, shapes, [0, 1, 2, 3, 4], np.random.default_rng(1),
              cfg=dataclasses.replace(BASE.engine_config(), head_rungs=1), head=True)
  assert {k: v[:3] for k, v in lean.items()} == {k: v[:3] for k, v in full.items()}
  for k in full:  # the decision's length is the largest over the running rows: a neighbour may keep it at 8
    assert lean[k][3] <= full[k][3] == 8 * full[k][4], (k, lean[k], full[k])
  assert sum(v[3] for v in lean.values()) < sum(v[3] for v in full.values())
  # alone, 2 commits a step: 8, 6, 4, 2 eligible positions -> lengths 8, 8, 4, 4 in each of the 3 blocks
  alone = _run(model, reqs[:1], shapes, [0], np.random.default_rng(0), head=True)[0]
  assert alone[:3] == lean[0][:3] and alone[3:] == (3 * (8 + 8 + 4 + 4), 12)


# ----------------------------------------------------------------------------- the chunked decision

V, D = 512, 16


def _numpy_logits(h, w, scale):
  """float64 logits with CFG (rows [cond; uncond]) and ids 3, 4 banned."""
  lg = np.einsum("rqd,dv->rqv", h.astype(np.float64), w.astype(np.float64))
  b = len(scale)
  c, u = lg[:b], lg[b:]
  out = np.where(scale[:, None, None] > 0, u + (scale[:, None, None] + 1) * (c - u), c)
  out[..., [3, 4]] = -np.inf
  return out


@pytest.fixture(scope="module")
def head():
  rng = np.random.default_rng(0)
  return rng.normal(size=(D, V)).astype(np.float32) * 1.5, rng.normal(size=(2, 6, D)).astype(np.float32)


def _decide(h, w, keys, temp, scale, chunk):
  return jax.jit(lambda h, w, k, t, s: decide(h, w, k, t, s, jnp.zeros(t.shape, bool), banned_ids=(3, 4), chunk=chunk,
                                              guidance=True, dtype=jnp.float32))(h, w, keys, temp, scale)


def test_chunked_decision_equals_the_full_one_at_temperature_0(head):
  w, h1 = head
  h = np.concatenate([h1, np.random.default_rng(1).normal(size=h1.shape).astype(np.float32)])  # [cond; uncond]
  scale = np.asarray([0.0, 1.5], np.float32)
  ref = _numpy_logits(h, w, scale)
  prob = np.exp(ref - ref.max(-1, keepdims=True))
  prob /= prob.sum(-1, keepdims=True)
  keys = jax.vmap(jax.random.key)(jnp.arange(2))
  for chunk in (64, 512):
    x0, conf = _decide(h, w, keys, np.zeros(2, np.float32), scale, chunk)
    np.testing.assert_array_equal(np.asarray(x0), ref.argmax(-1))
    np.testing.assert_allclose(np.asarray(conf), np.take_along_axis(prob, ref.argmax(-1)[..., None], -1)[..., 0],
                               rtol=1e-4)


def test_chunked_gumbel_samples_the_tempered_softmax(head):
  """x0 at temperature T is a draw from softmax(logits / T): 20000 rows of one position."""
  w, _ = head
  n, temp = 20000, 0.7
  h = np.broadcast_to(np.random.default_rng(2).normal(size=(1, 1, D)).astype(np.float32) * 0.35, (2 * n, 1, D))
  scale = np.zeros(n, np.float32)
  keys = jax.vmap(jax.random.key)(jnp.arange(n))
  x0, _ = _decide(np.ascontiguousarray(h), w, keys, np.full(n, temp, np.float32), scale, 64)
  lg = _numpy_logits(h[:2], w, scale[:1])[0, 0] / temp
  p = np.exp(lg - lg.max())
  p /= p.sum()
  freq = np.bincount(np.asarray(x0)[:, 0], minlength=V) / n
  assert p.max() < 0.9 and (p > 0.02).sum() >= 3  # a distribution worth testing
  big = p > 0.01  # each likely token its own bin, the tail one bin (the tail's many rare ids only add noise)
  tv = 0.5 * (np.abs(freq[big] - p[big]).sum() + abs(freq[~big].sum() - p[~big].sum()))
  assert tv < 0.02, tv  # about 0.005 expected from 20000 draws
  assert freq[3] == freq[4] == 0


@functools.partial(jax.jit, static_argnums=(8,))
def _decide_block(h, w, elig, start, keys, temp, scale, rand, sizes):
  return decode.decide_block(h, elig, start, w, keys, temp, scale, rand, sizes=sizes, banned_ids=(3, 4), chunk=64,
                             guidance=True, dtype=jnp.float32)


def test_the_lean_decision_equals_the_full_blocks(head):
  """decide_block on the eligible positions only (Q' from the three-rung ladder 16, 8, 4) equals `decide` on the
  whole block with each position's absolute index: x0 and confidence exactly at the eligible positions, at
  temperature 0 and > 0 and with random remasking (per-position noise); -inf confidence elsewhere."""
  w, _ = head
  rng = np.random.default_rng(3)
  b, l = 3, 16
  h = rng.normal(size=(2 * b, l, D)).astype(np.float32)
  keys = jax.vmap(jax.random.key)(jnp.arange(b) + 7)
  start = np.asarray([0, 32, 16], np.int32)
  scale = np.asarray([0.0, 1.5, 0.5], np.float32)
  temp = np.asarray([0.0, 0.8, 1.3], np.float32)
  rand = np.asarray([False, False, True])
  full_x0, full_conf = jax.jit(lambda *a: decide(*a, banned_ids=(3, 4), chunk=64, guidance=True, dtype=jnp.float32,
                                                 positions=start[:, None] + np.arange(l)[None]))(
      h, w, keys, temp, scale, rand)
  for counts, want in (([3, 0, 2], 4), ([7, 5, 1], 8), ([1, 0, 1], 4), ([16, 3, 9], 16), ([9, 2, 2], 16)):
    elig = np.zeros((b, l), bool)
    for r, n in enumerate(counts):
      elig[r, rng.choice(l, n, replace=False)] = True
    x0, conf, q = _decide_block(h, w, elig, start, keys, temp, scale, rand, decode.ladder(l, 3))
    assert int(q) == want, counts
    np.testing.assert_array_equal(np.asarray(conf)[~elig], -np.inf)
    np.testing.assert_array_equal(np.asarray(x0)[elig], np.asarray(full_x0)[elig])
    np.testing.assert_array_equal(np.asarray(conf)[elig], np.asarray(full_conf)[elig])
  assert len({int(t) for t in np.asarray(full_x0)[1:].ravel()}) > 5  # the noise moved the tokens


def test_the_lean_decision_runs_the_head_on_each_rung():
  """One head matmul of [2B, Q', chunk] per rung in the compiled program (a branch each: no recompile)."""
  b, l, d, v = 2, 32, 8, 128
  f = lambda h, e: decode.decide_block(  # noqa: E731
      h, e, jnp.zeros(b, jnp.int32), jnp.ones((d, v)), jax.vmap(jax.random.key)(jnp.arange(b)), jnp.zeros(b),
      jnp.zeros(b), jnp.zeros(b, bool), sizes=decode.ladder(l, 3), banned_ids=(), chunk=64, guidance=True, dtype=jnp.float32)
  jaxpr = jax.make_jaxpr(f)(jnp.ones((2 * b, l, d)), jnp.ones((b, l), bool))
  shapes = []

  def walk(jx):
    for eq in jx.eqns:
      if eq.primitive.name == "dot_general":
        shapes.append(tuple(eq.outvars[0].aval.shape))
      for p in eq.params.values():
        for sub in (p if isinstance(p, (list, tuple)) else [p]):
          if hasattr(sub, "jaxpr"):
            walk(sub.jaxpr if hasattr(sub.jaxpr, "eqns") else sub.jaxpr.jaxpr)
  walk(jaxpr.jaxpr)
  assert decode.ladder(l, 3) == (32, 16, 8) and decode.ladder(l) == (32, 16) and decode.ladder(2) == (2, 1)
  assert decode.ladder(8, 1) == (8,)
  assert sorted(shapes) == [(2 * b, q, 64) for q in (8, 16, 32)], shapes


# ----------------------------------------------------------------------------- stop rules

def original_stop(ans, stop_tokens, found, stop):
  """The original generate's search after a commit (modeling_llada.py, generate_with_embeds)."""
  for seq in stop_tokens:
    for start in range(len(ans) - len(seq) + 1):
      if list(ans[start:start + len(seq)]) == list(seq):
        if not found or start < stop:
          stop, found = start, True
        break
    if found:
      break
  return found, stop


def test_stop_rules_against_the_original_search():
  rng = np.random.default_rng(0)
  g, seqs = 12, [[5, 6], [7], [6]]
  ids = np.full((1, 3, 2), -1, np.int32)
  lens = np.asarray([[2, 1, 1]], np.int32)
  for k, s in enumerate(seqs):
    ids[0, k, :len(s)] = s
  differ = 0
  for _ in range(60):  # tokens committed a few at a time, the stop searched after each commit
    ans = np.full(g, 0, np.int32)
    order = rng.permutation(g)
    found, ref, earliest, quirk = False, g, g, g
    for c in range(0, g, 3):
      ans[order[c:c + 3]] = rng.integers(4, 9, 3)
      found, ref = original_stop(ans.tolist(), seqs, found, ref)
      occ = first_occurrences(jnp.asarray(ans[None]), jnp.asarray(ids), jnp.asarray(lens))
      quirk = int(update_stop(jnp.asarray([quirk]), occ, jnp.asarray([True]), g)[0])
      earliest = int(update_stop(jnp.asarray([earliest]), occ, jnp.asarray([False]), g)[0])
      assert quirk == (ref if found else g)
      all_occ = [j for s in seqs for j in range(g - len(s) + 1) if ans[j:j + len(s)].tolist() == s]
      assert earliest == min(all_occ + [g])
      differ += quirk != earliest
  assert differ > 5  # the rules do differ on these answers


def test_stop_slots_longer_than_the_answer():
  """An engine's stop bucket may be wider than a short answer (the server's fixed 16-token slots, 8 positions)."""
  ans = jnp.asarray([[3, 5, 6, 9], [5, 6, 5, 6]], jnp.int32)
  ids = np.full((2, 2, 6), -1, np.int32)
  ids[:, 0, :2] = [5, 6]
  ids[:, 1, :5] = [1, 2, 3, 4, 5]  # longer than the answer: never found
  lens = np.asarray([[2, 5], [2, 5]], np.int32)
  occ = first_occurrences(ans, jnp.asarray(ids), jnp.asarray(lens))
  assert occ.tolist() == [[1, 4], [0, 4]]


def test_block_length_is_a_row_value(model):
  """Requests of blocks 4, 8 and 24 (with a temperature, a threshold) run in one engine of blocks up to 24 and
  each gives its tokens alone, in an engine of its own block length; the mixed engine compiles once for all."""
  inp = prompt_lib.prepare_inputs(model, PROMPTS[:3], [[]] * 3, suffix_ids=[60, 61], stop_ids=[[7, 8]],
                                  seeds=[21, 22, 23], rows=3, **BUCKETS)
  base = dataclasses.replace(BASE, cache=None)
  ps = [dataclasses.replace(base, block_length=4), dataclasses.replace(base, block_length=8, temperature=0.7),
        dataclasses.replace(base, block_length=24, threshold=0.5)]
  shapes = EngineShapes(rows=2, prompt_len=inp.prompt.length, answer_len=24, suffix_len=2, stops=1, stop_len=2)
  mixed = [prompt_lib.requests(inp, p.row_params(24, 24), 2)[k] for k, p in enumerate(ps)]
  cfg = base.engine_config(max_block_length=24)
  got = runner_lib.run_engine(model, mixed, cfg, shapes)
  assert TRACE_COUNTS["advance", cfg] == 1
  for k, p in enumerate(ps):
    (alone,) = runner_lib.run_engine(model, [prompt_lib.requests(inp, p.row_params(24, p.block_length), 2)[k]],
                                     p.engine_config(), shapes)
    assert got[k].response.tolist() == alone.response.tolist(), k
    assert (got[k].stop, got[k].nfe, got[k].steps) == (alone.stop, alone.nfe, alone.steps), k
    assert got[k].commit_step.tolist() == alone.commit_step.tolist(), k
  # the blocks were the rows' own: a row of block 4 never committed past its block's end before leaving it
  cs = got[0].commit_step
  for b in range(1, 6):
    if (cs[4 * b:4 * b + 4] >= 0).any() and (cs[4 * b - 4:4 * b] >= 0).any():
      assert cs[4 * b:4 * b + 4][cs[4 * b:4 * b + 4] >= 0].min() > cs[4 * b - 4:4 * b].max()
