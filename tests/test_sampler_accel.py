"""Accelerations: LaViDa's shift schedule, Fast-dLLM threshold / factor decoding, prefix and dual
KV caches. Each against the NumPy reference where it has exact semantics, and each must run and
report fewer NFE (parallel decoding) or fewer positions per forward (caches)."""
from __future__ import annotations

import functools
from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from lladav_jax.inference import engine, generation, prompts as prompt_lib
from lladav_jax.inference.engine import EngineShapes
from lladav_jax.inference.engine.forward import Forward
from lladav_jax.inference.features import TileFeatures
from lladav_jax.inference.engine.schedule import count_table, shift_counts
from tests.test_sampler import (BUCKETS, IMAGES, PROMPTS, SUFFIX, assert_same, model, run_reference,  # noqa: F401
                                settings, stop_setup)


def lavida_shift_counts(n, steps, shift):
  """LaViDa's get_num_transfer_tokens_sch(schedule='shift') for one sample, in torch (float32)."""
  steps = int(min(steps, n))
  t = torch.linspace(0, 1, steps + 1)
  sig = shift * t / (1 + (shift - 1) * t)
  v = (sig * torch.tensor([n])).to(torch.int64)
  v = torch.clamp(v[1:] - v[:-1], 1, None)
  delta = int(v.sum()) - n
  if delta < 0:
    return None  # LaViDa asserts here
  j = 0
  while delta > 0:
    j %= len(v)
    if v[j] == 1:
      j += 1
      continue
    delta -= 1
    v[j] -= 1
    j += 1
  return v.flip(-1).tolist()


def test_shift_schedule_example_and_torch_parity():
  # 32 tokens in 16 steps, shift 1/3: early steps commit more
  assert shift_counts(32, 16, 1 / 3) == [6, 4, 4, 2, 3, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1]
  # the often-quoted [6,4,4,2,3,2,2,1,2,1,...] (sum 33) is the clamped vector, reversed, before the surplus is removed
  t = torch.linspace(0, 1, 17)
  v = ((1 / 3) * t / (1 + (1 / 3 - 1) * t) * 32).to(torch.int64)
  assert torch.clamp(v[1:] - v[:-1], 1, None).flip(0).tolist() == [6, 4, 4, 2, 3, 2, 2, 1, 2, 1, 1, 1, 1, 1, 1, 1]
  for n in range(1, 70):
    for steps in (1, 2, 3, 4, 8, 16, 32):
      for shift in (1 / 3, 3.0, 0.5):
        ref = lavida_shift_counts(n, steps, shift)
        ours = shift_counts(n, steps, shift)
        assert sum(ours) == n and len(ours) == steps
        if ref is not None:
          assert ours[:len(ref)] == ref and not any(ours[len(ref):]), (n, steps, shift)
  table = count_table(8, 4, "uniform")
  assert table[7].tolist() == [2, 2, 2, 1] and table[0].tolist() == [0, 0, 0, 0]


@pytest.mark.slow  # the CI budget: the schedule's own torch parity test above stays in the default run
def test_shift_schedule_in_the_sampler_matches_reference(model):
  st = settings(schedule="shift", shift=1 / 3, gen_length=24, block_length=24, steps=12)
  outs = generation.generate_ids(model, PROMPTS[:2], IMAGES[:2], params=st, suffix_ids=SUFFIX,
                                 return_trajectory=True, **BUCKETS)
  refs = run_reference(model, st, PROMPTS[:2], IMAGES[:2], suffix=SUFFIX,
                       counts_fn=lambda n, s: shift_counts(n, s, 1 / 3))
  assert_same(outs, refs)
  per_step = np.bincount(np.asarray(outs[0].trajectory.commit_step), minlength=12).tolist()
  assert per_step == shift_counts(24, 12, 1 / 3) == [6, 3, 3, 3, 2, 1, 1, 1, 1, 1, 1, 1]


@pytest.mark.parametrize("kw", [pytest.param(dict(threshold=0.7), marks=pytest.mark.slow), dict(factor=2.0)],
                         ids=["threshold", "factor"])  # threshold slow (the CI budget): the same decision, another rule
def test_parallel_decoding_matches_reference_and_cuts_nfe(model, kw):
  st = settings(gen_length=24, block_length=8, steps=24, **kw)
  outs = generation.generate_ids(model, PROMPTS, IMAGES, params=st, suffix_ids=SUFFIX, batch_size=4, **BUCKETS)
  refs = run_reference(model, st, PROMPTS, IMAGES, suffix=SUFFIX, **kw)
  assert_same(outs, refs)
  assert all(len(o.token_ids) == 24 + 2 for o in outs)
  assert all(o.nfe < 24 for o in outs) and sum(o.nfe for o in outs) < 3 * 20


@functools.partial(jax.jit, static_argnums=(0, 1))
def _full_and_window(graphdef, cfg, params, state):
  fw = Forward(nnx.merge(graphdef, params), cfg, state)
  full, kv = fw.full(state.cache)
  return full, fw.window(kv)


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_window_pass_on_a_fresh_cache_equals_the_full_pass(model, mode):
  """The cached passes' positions, RoPE offsets and key masks: with a cache of the same tokens, the
  window's hidden states of each row's block equal the full pass's (left padding, images, CFG, a
  suffix, rows at different blocks, of different answer lengths and of different block lengths included:
  a row of block 4 in an engine of blocks up to 8, whose dual window past its block is padding)."""
  st = settings(cache=mode, cfg_scale=0.5, gen_length=24, block_length=8, steps=12)
  inp = prompt_lib.prepare_inputs(model, PROMPTS, IMAGES, suffix_ids=SUFFIX, seeds=[0, 1, 2], rows=3)
  shapes = EngineShapes(rows=3, prompt_len=inp.prompt.length, answer_len=24, suffix_len=2,
                        tiles=inp.prompt.pixels.shape[1])
  cfg = st.engine_config()
  state = engine.init(model.graphdef, cfg, shapes, model.state)
  lengths, blocks = (24, 16, 24), (8, 8, 4)
  for k, r in enumerate(prompt_lib.requests(inp, st.row_params(24, 8), 2)):
    r = r.replace(row_params=r.row_params.replace(answer_len=np.int32(lengths[k]), block_length=np.int32(blocks[k])))
    state = engine.insert(model.graphdef, cfg, model.state, state, np.int32(k), TileFeatures(model).attach(r, shapes.tiles))
  rng = np.random.default_rng(0)
  gen = rng.integers(5, 400, (3, 26)).astype(np.int32)
  gen[:, 9:24] = 500  # committed first block + a bit, masked rest, then the suffix
  gen[:, 24:] = SUFFIX
  gen[1, 16:24] = 500  # row 1 has 16 answer positions
  state = state.replace(response=jnp.asarray(gen), block=jnp.asarray([0, 1, 2], jnp.int32))
  full, win = _full_and_window(model.graphdef, cfg, model.state, state)
  own = np.arange(8)[None, :, None] < np.asarray(blocks * 2)[:, None, None]  # [cond; uncond] rows: a row's own block
  np.testing.assert_allclose(np.where(own, win, 0), np.where(own, full, 0), rtol=2e-4, atol=2e-4)
  assert np.abs(np.asarray(full)[:3] - np.asarray(full)[3:]).max() > 1e-2  # the unconditional rows differ
  # the passes over groups of rows (forward_rows) give the same hidden states
  full_g, win_g = _full_and_window(model.graphdef, replace(cfg, forward_rows=2), model.state, state)
  np.testing.assert_allclose(np.asarray(full_g), np.asarray(full), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.where(own, win_g, 0), np.where(own, win, 0), rtol=1e-5, atol=1e-5)


# prefix: slow (the CI budget); [dual] runs the same loop with the prefix's cache and more, and the prefix
# window pass stays in the default suite (test_window_pass_on_a_fresh_cache_equals_the_full_pass[prefix])
@pytest.mark.parametrize("mode", [pytest.param("prefix", marks=pytest.mark.slow), "dual"])
def test_caches_exact_at_refresh_1_and_cheaper_otherwise(model, stop_setup, mode):
  st = settings(banned_ids=stop_setup["banned"], eot_id=stop_setup["eot"])
  kw = dict(stop_ids=stop_setup["stops"], suffix_ids=stop_setup["suffix"], batch_size=4, **BUCKETS)
  ref = generation.generate_ids(model, PROMPTS, IMAGES, params=st, **kw)
  exact = generation.generate_ids(model, PROMPTS, IMAGES, params=replace(st, cache=mode, refresh_interval=1), **kw)
  assert [(o.token_ids, o.nfe, o.query_tokens) for o in exact] == [(o.token_ids, o.nfe, o.query_tokens) for o in ref]
  fast = generation.generate_ids(model, PROMPTS, IMAGES, params=replace(st, cache=mode, refresh_interval=32),
                                 return_trajectory=True, **kw)
  assert any(f.trajectory.stop > 0 for f in fast)
  for f in fast:  # runs to completion: nothing masked before the stop
    assert all(s >= 0 for s in f.trajectory.commit_step[:f.trajectory.stop])
  # one full pass per block, then windows only: far fewer positions per forward
  per_fwd = sum(o.query_tokens for o in fast) / sum(o.nfe for o in fast)
  assert per_fwd < 0.6 * sum(o.query_tokens for o in ref) / sum(o.nfe for o in ref)
