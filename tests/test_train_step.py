"""The train step: mesh invariance, gradient accumulation, stage-1 freezing, loss going down."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from lladav_jax import config, sharding
from lladav_jax.training import loss as L, optimizer, state as st, step as stp, synthetic
from tests.models import host_params
from tests.train_helpers import optim_cfg


def _setup(mesh, trainable=optimizer.GROUPS, lr=1e-3, cfg=None):
  return st.make_setup(cfg or config.tiny(), mesh, optim_cfg(trainable, lr=lr), total_steps=100)


def _global(batch, mesh):
  return jax.tree.map(lambda v: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)), batch)


def _loss_and_grad(setup, state, batch, accum):
  fn = stp.make_loss_and_grad(setup, L.LossConfig(logits_chunk=8), accum=accum)
  bs = stp.batch_shardings(setup.mesh, batch)
  rep = sharding.replicated(setup.mesh)
  f = jax.jit(fn, in_shardings=(setup.shardings, bs),
              out_shardings=(rep, rep, setup.shardings["params"]))
  return jax.device_get(f(state, _global(batch, setup.mesh)))


def test_sharded_accumulated_step_equals_single_device():
  """Loss and gradients on a (data 2, fsdp 2, tensor 2) mesh of fake CPU devices with 2
  micro-batches equal those of one device and one micro-batch: the reduction is the formula on
  the global batch whatever the mesh or accumulation."""
  batch = synthetic.make_batch(np.random.default_rng(0), batch=8, seq_len=32, vocab_size=512, mask_token_id=500)
  mesh1 = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  mesh8 = sharding.make_mesh(2, 2, 2)
  s1, s8 = _setup(mesh1), _setup(mesh8)
  params = host_params(s1)
  st1 = st.init_state(s1, seed=0, params=params)
  st8 = st.init_state(s8, seed=0, params=params)
  assert st8["params"]["llm"]["lm_head"].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  l1, a1, g1 = _loss_and_grad(s1, st1, batch, accum=1)
  l8, a8, g8 = _loss_and_grad(s8, st8, batch, accum=2)
  np.testing.assert_allclose(l8, l1, rtol=1e-6)
  for k in ("masked_tokens", "answer_tokens"):
    assert a8[k] == a1[k]
  flat1, flat8 = traverse_util.flatten_dict(g1), traverse_util.flatten_dict(g8)
  assert flat1.keys() == flat8.keys()
  for k in flat1:  # float32 sums in another order: within 2e-4 relative, or 1e-6 of the tensor's largest entry
    atol = max(2e-7, 1e-6 * np.abs(flat1[k]).max())
    np.testing.assert_allclose(flat8[k], flat1[k], rtol=2e-4, atol=atol, err_msg="/".join(k))


def test_stage1_freezes_everything_but_the_projector():
  mesh = sharding.make_mesh(2, 2, 2)
  setup = _setup(mesh, trainable=("projector",), lr=1e-2)
  assert set(setup.abstract["params"]) == {"projector"}
  assert set(setup.abstract["frozen"]) == {"llm", "vision", "image_newline"}
  # the optimizer state holds nothing for frozen parameters: its array leaves are the projector's
  proj_shapes = sorted(tuple(a.shape) for a in jax.tree.leaves(setup.abstract["params"]))
  opt_shapes = sorted(tuple(a.shape) for a in jax.tree.leaves(setup.abstract["opt_state"]) if a.shape)
  assert opt_shapes == sorted(proj_shapes * 2)  # Adam mu and nu
  state = st.init_state(setup, seed=0, params=host_params(setup))
  before = jax.device_get(state)
  batch = synthetic.make_batch(np.random.default_rng(1), batch=8, seq_len=32, vocab_size=512, mask_token_id=500)
  compiled, _ = stp.compile_train_step(setup, L.LossConfig(logits_chunk=0), accum=1,
                                       batch_shapes=jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), batch))
  for _ in range(3):
    state, m = compiled(state, _global(batch, mesh))
  after = jax.device_get(state)
  assert float(m["finite"]) == 1.0
  for k, v in traverse_util.flatten_dict(before["frozen"]).items():
    np.testing.assert_array_equal(traverse_util.flatten_dict(after["frozen"])[k], v, err_msg="/".join(k))
  changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(after["params"]), jax.tree.leaves(before["params"]))]
  assert all(changed)
  assert int(after["step"]) == 3
  # a non-finite step (NaN weights) reports finite=0 and leaves params and optimizer state unchanged
  bad = jax.device_get(state)
  bad["params"]["projector"]["fc2"] = bad["params"]["projector"]["fc2"] * np.float32("nan")
  bad = jax.device_put(bad, setup.shardings)
  kept = jax.device_get(bad)
  bad, m = compiled(bad, _global(batch, mesh))
  assert float(m["finite"]) == 0.0
  for a, b in zip(jax.tree.leaves(jax.device_get(bad)["opt_state"]), jax.tree.leaves(kept["opt_state"])):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(jax.device_get(bad)["params"]["projector"]["fc1"], kept["params"]["projector"]["fc1"])


def test_weight_decay_skips_biases_and_norms():
  """With weight_decay > 0 and zero gradients, AdamW shrinks matrices only (HF Trainer groups)."""
  params = {"llm": {"embed": jnp.ones((3, 2)), "final_norm": jnp.ones(2), "layers": {"attn_norm": jnp.ones((2, 2))}},
            "projector": {"fc1": jnp.ones((2, 2)), "fc1_bias": jnp.ones(2)},
            "vision": {"layers": {"ln1_scale": jnp.ones((2, 2)), "ln1_bias": jnp.ones((2, 2)), "q_proj": jnp.ones((2, 2))}}}
  ocfg = dataclasses.replace(optim_cfg(lr=0.1), weight_decay=0.5)
  tx, _ = optimizer.make(ocfg, 10, params)
  grads = jax.tree.map(jnp.zeros_like, params)
  upd, _ = tx.update(grads, tx.init(params), params)
  new = traverse_util.flatten_dict(jax.tree.map(lambda p, u: p + u, params, upd), sep="/")
  decayed = {k for k, v in new.items() if float(v.reshape(-1)[0]) < 1.0}
  assert decayed == {"llm/embed", "projector/fc1", "vision/layers/q_proj"}


def test_adamw_equals_optax_and_skips_non_finite_steps_exactly():
  """optimizer.adamw against optax.adamw (schedule, weight decay mask) over 4 steps, to float32 rounding (XLA may
  contract the two programs' multiply-adds differently); a step with finite=False, first or later, returns zero
  updates and leaves the state exactly as it was."""
  rng = np.random.default_rng(0)
  params = {"llm": {"embed": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32),
                    "final_norm": jnp.asarray(rng.normal(size=3), jnp.float32)}}
  sched = optimizer.schedule(1e-2, 10, 0.2)
  ours = optimizer.adamw(sched, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.1)
  ref = optax.adamw(sched, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.1, mask=optimizer.decay_mask)
  s, r, p, q = ours.init(params), ref.init(params), params, params
  skipped_first = ours.update(params, s, p, finite=jnp.asarray(False))
  assert all(not np.any(np.asarray(u)) for u in jax.tree.leaves(skipped_first[0]))
  for a, b in zip(jax.tree.leaves(skipped_first[1]), jax.tree.leaves(s)):
    np.testing.assert_array_equal(a, b)
  step = jax.jit(lambda g, s, p, ok: ours.update(g, s, p, finite=ok))
  for i in range(4):
    g = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
    u, s = step(g, s, p, jnp.asarray(True))
    v, r = jax.jit(ref.update)(g, r, q)
    p, q = optax.apply_updates(p, u), optax.apply_updates(q, v)
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(q)):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7, err_msg=f"step {i}")
  nan = jax.tree.map(lambda x: x * np.float32("nan"), params)
  u, s2 = step(nan, s, p, jnp.asarray(False))
  assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(u))
  np.testing.assert_array_equal(s2.count, s.count)
  for a, b in zip(jax.tree.leaves(s2), jax.tree.leaves(s)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(optax.apply_updates(p, u)), jax.tree.leaves(p)):
    np.testing.assert_array_equal(a, b)
