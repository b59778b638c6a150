"""model/attention.py: every implementation that runs on CPU (dense, blockwise, splash and the Pallas GPU op
in interpret mode) against an independent float64 NumPy softmax and the dense path, forward and gradients,
with segment ids, padding, grouped-query heads and cached keys; the blockwise jaxpr holds no [T, S] array;
the selection logic; the training loss and the sampler's tokens with attention_impl=blockwise."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lladav_jax import config, sharding
from lladav_jax.inference import generation
from lladav_jax.model import attention as A
from lladav_jax.training import loss as L, state as st, step as stp, synthetic
from tests.models import host_params, random_model
from tests.train_helpers import optim_cfg

B, T, N, K, H = 2, 37, 4, 2, 16  # 37: no block size divides it (padding to whole blocks is exercised)


def _case(seed=0, s0=0):
  """q / k / v with GQA (4 query heads over 2 KV heads), queries in three segments plus padding, a query
  whose segment has no key, and `s0` cached keys of their own segments ahead of the new ones."""
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
  q, k, v = f(B, T, N, H), f(B, T, K, H), f(B, T, K, H)
  qs = np.ones((B, T), np.int32)
  qs[0, 15:30], qs[0, 30:] = 2, 3
  qs[1, 25:] = 0  # right padding
  qs[1, :3] = 0  # and left padding
  ks = qs.copy()
  ks[0, 30:] = 0  # segment 3's queries have no key among the new ones ...
  cached = None
  if s0:
    cs = np.zeros((B, s0), np.int32)
    cs[0, :4], cs[1, 2:] = 1, 1  # ... nor among the cached ones: a query with nothing to attend
    cached = (f(B, s0, K, H), f(B, s0, K, H), jnp.asarray(cs))
  return q, k, v, jnp.asarray(qs), jnp.asarray(ks), cached


def _full_kv(k, v, ks, cached):
  if cached is None:
    return k, v, ks
  return (jnp.concatenate([cached[0], k], 1), jnp.concatenate([cached[1], v], 1),
          jnp.concatenate([cached[2], ks], 1))


IMPL_KW = {"dense": {}, "blockwise": dict(block_q=8, block_kv=16), "splash": dict(block_q=128, block_kv=128,
                                                                                  interpret=True)}


def _loss(impl, q, k, v, ck, cv, qs, ks, cs):
  cached = None if ck is None else (ck, cv, cs)
  out = A.attention(q, k, v, qs, ks, impl=impl, cached=cached, **IMPL_KW[impl])
  return jnp.sum(jnp.sin(3 * out)), out


@pytest.mark.parametrize("s0", [0, 9])
@pytest.mark.parametrize("impl", ["dense", "blockwise", "splash"])
def test_forward_and_gradients_match(impl, s0):
  q, k, v, qs, ks, cached = _case(1, s0)
  fk, fv, fks = _full_kv(k, v, ks, cached)
  want = A.numpy_reference(q, fk, fv, qs, fks)
  assert np.abs(want[0, 30:]).max() == 0 and np.abs(want[1, 25:]).max() == 0  # nothing to attend: zeros
  assert np.abs(want[0, :30]).min(axis=(-1, -2)).max() > 0
  args = (q, k, v) + ((None, None) if cached is None else cached[:2]) + (qs, ks, None if cached is None else cached[2])
  (_, out), grads = jax.value_and_grad(_loss, argnums=(1, 2, 3, 4, 5), has_aux=True)(impl, *args)
  np.testing.assert_allclose(np.asarray(out), want, atol=1e-5)
  assert len(jax.tree.leaves(grads)) == (5 if s0 else 3)
  if impl != "dense":
    (_, _), ref = jax.value_and_grad(_loss, argnums=(1, 2, 3, 4, 5), has_aux=True)("dense", *args)
    for name, a, b in zip(("dq", "dk", "dv", "dk0", "dv0"), jax.tree.leaves(grads), jax.tree.leaves(ref)):
      assert np.abs(np.asarray(b)).max() > 1e-3, name
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, err_msg=name)
  # segments really separate: changing segment 2's values leaves segment 1's queries unchanged
  v2 = v.at[0, 15:30].multiply(-2.0)
  out2 = A.attention(q, k, v2, qs, ks, impl=impl, cached=cached, **IMPL_KW[impl])
  np.testing.assert_allclose(np.asarray(out2[0, :15]), np.asarray(out[0, :15]), atol=1e-6)
  assert np.abs(np.asarray(out2[0, 15:30] - out[0, 15:30])).max() > 1e-3


def test_splash_inside_shard_map_on_a_mesh():
  """On a (data 2, fsdp 2, tensor 2) mesh: rows over data x fsdp, KV heads over tensor, one kernel a shard."""
  rng = np.random.default_rng(7)
  q = jnp.asarray(rng.normal(size=(4, 40, 4, 16)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(4, 40, 2, 16)), jnp.float32) for _ in range(2))
  seg = np.ones((4, 40), np.int32)
  seg[1, 30:], seg[2, 10:] = 0, 2
  seg = jnp.asarray(seg)
  mesh = sharding.make_mesh(2, 2, 2)
  fn = jax.jit(lambda q, k, v, s: A.attention(q, k, v, s, s, impl="splash", block_q=128, block_kv=128,
                                              interpret=True))
  with jax.set_mesh(mesh):
    text = fn.lower(q, k, v, seg).as_text()
    out = fn(q, k, v, seg)
  assert "shard_map" in text or "sdy.manual_computation" in text
  np.testing.assert_allclose(np.asarray(out), A.numpy_reference(q, k, v, seg, seg), atol=1e-5)


def test_dense_gradients_match_numpy_finite_differences():
  """The dense reference's own gradient (which the others are compared to) against central differences
  of the float64 NumPy attention, on a few entries of dq, dk and dv."""
  q, k, v, qs, ks, _ = _case(2)
  w = np.random.default_rng(3).normal(size=(B, T, N, H))
  grads = jax.grad(lambda q, k, v: jnp.sum(A.attention(q, k, v, qs, ks, impl="dense") * w), argnums=(0, 1, 2))(q, k, v)
  f = lambda q, k, v: np.sum(A.numpy_reference(q, k, v, qs, ks) * w)  # noqa: E731
  rng = np.random.default_rng(4)
  for i, g in enumerate(grads):
    args = [np.asarray(x, np.float64) for x in (q, k, v)]
    for _ in range(4):
      idx = tuple(rng.integers(0, d) for d in args[i].shape)
      eps = 1e-5
      hi, lo = [a.copy() for a in args], [a.copy() for a in args]
      hi[i][idx] += eps
      lo[i][idx] -= eps
      np.testing.assert_allclose(float(g[idx]), (f(*hi) - f(*lo)) / (2 * eps), atol=1e-4)


def test_pallas_gpu_op_matches_in_interpret_mode():
  q, k, v, qs, _, _ = _case(5)
  want = A.numpy_reference(q, k, v, qs, qs)
  fn = lambda q: A.attention(q, k, v, qs, qs, impl="pallas_gpu", block_q=16, block_kv=16, interpret=True)  # noqa: E731
  np.testing.assert_allclose(np.asarray(fn(q)), want, atol=1e-5)
  g = jax.grad(lambda q: jnp.sum(jnp.sin(fn(q))))(q)
  gd = jax.grad(lambda q: jnp.sum(jnp.sin(A.attention(q, k, v, qs, qs, impl="dense"))))(q)
  np.testing.assert_allclose(np.asarray(g), np.asarray(gd), atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_blockwise_close_to_dense(dtype):
  """float16 goes in as float32 (exact upcast) in every implementation; bfloat16 keeps its dtype."""
  q, k, v, qs, ks, _ = _case(6)
  q, k, v = (x.astype(dtype) for x in (q, k, v))
  d = A.attention(q, k, v, qs, ks, impl="dense")
  b = A.attention(q, k, v, qs, ks, impl="blockwise", block_q=8, block_kv=16)
  assert d.dtype == b.dtype == dtype
  tol = 1e-3 if dtype == jnp.float16 else 2e-2
  np.testing.assert_allclose(np.asarray(b, np.float32), np.asarray(d, np.float32), atol=tol)


def _largest(jaxpr):
  """The largest array (elements) any equation makes, sub-jaxprs (scan bodies, custom VJPs) included."""
  best = 0
  for eqn in jaxpr.eqns:
    for v in eqn.outvars:
      best = max(best, int(np.prod(getattr(v.aval, "shape", ()) or (1,))))
    for p in eqn.params.values():
      for sub in (p if isinstance(p, (list, tuple)) else (p,)):
        inner = getattr(sub, "jaxpr", None)
        if inner is not None:
          best = max(best, _largest(getattr(inner, "jaxpr", inner)))
        elif hasattr(sub, "eqns"):
          best = max(best, _largest(sub))
  return best


def test_blockwise_never_makes_a_score_matrix():
  """Forward and backward: no intermediate as large as one row's [heads, T, S] scores; the largest is
  linear in L (q, k, v-sized), where dense holds B * N * T * S."""
  b, l, n, k, h, blk = 1, 1024, 4, 2, 8, 64
  q = jax.ShapeDtypeStruct((b, l, n, h), jnp.float32)
  kv = jax.ShapeDtypeStruct((b, l, k, h), jnp.float32)
  seg = jax.ShapeDtypeStruct((b, l), jnp.int32)

  def grad_of(impl):
    f = lambda q, k, v, s: jnp.sum(A.attention(q, k, v, s, s, impl=impl, block_q=blk, block_kv=blk))  # noqa: E731
    return jax.make_jaxpr(jax.grad(f, argnums=(0, 1, 2)))(q, kv, kv, seg).jaxpr

  dense, blockwise = _largest(grad_of("dense")), _largest(grad_of("blockwise"))
  assert dense >= b * n * l * l
  assert blockwise <= max(b * n * l * h, b * n * blk * blk), blockwise
  assert blockwise < n * l * l // 16


def test_blockwise_mask_is_not_hoisted_out_of_a_layer_scan():
  """The gradient of a scan over layers (as the model runs them): the segment-id mask is the same in every layer,
  and JAX's scan partial evaluation hoists loop-invariant work out of the loop; the kernel keeps each block's mask
  inside its step, so no value is as large as every block's mask together ([L / bq, L / bk, .., bq, bk])."""
  b, l, n, h, blk = 1, 1024, 4, 8, 64
  q = jax.ShapeDtypeStruct((b, l, n, h), jnp.float32)
  seg = jax.ShapeDtypeStruct((b, l), jnp.int32)

  def f(q, s):
    body = lambda x, _: (x + A.attention(x, x[:, :, :2], x[:, :, :2], s, s, impl="blockwise", block_q=blk,  # noqa: E731
                                         block_kv=blk), None)
    return jnp.sum(jax.lax.scan(body, q, None, length=2)[0])

  largest = _largest(jax.make_jaxpr(jax.grad(f))(q, seg).jaxpr)
  assert largest < n * l * l // 16, largest


def test_select():
  kw = dict(batch=2, q_len=1024, kv_len=1024, heads=32, head_dim=128, dtype=jnp.bfloat16, cached=False)
  assert A.select("auto", backend="tpu", **kw) == "splash"
  assert A.select("auto", backend="gpu", **kw) == "cudnn"
  # half precision and a head_dim cuDNN does not take: the Pallas op (one segment array: no cache)
  assert A.select("auto", backend="gpu", **{**kw, "head_dim": 256}) == "pallas_gpu"
  # float32 on GPU: XLA, whose dots follow the matmul precision (the Triton kernel's float32 dot is TF32)
  assert A.select("auto", backend="gpu", **{**kw, "dtype": jnp.float32}) == "dense"
  assert A.select("auto", backend="gpu", **{**kw, "dtype": jnp.float32, "q_len": 8192, "kv_len": 8192}) == "blockwise"
  assert A.select("auto", backend="gpu", **{**kw, "dtype": jnp.float32, "cached": True, "kv_len": 2048}) == "dense"
  assert A.select("pallas_gpu", backend="gpu", **{**kw, "cached": True, "kv_len": 2048}) == "cudnn"
  assert A.select("auto", backend="cpu", **kw) == "dense"  # 2 * 32 * 1024^2 * 4 bytes = 256 MiB fits
  assert A.select("auto", backend="cpu", **{**kw, "q_len": 8192, "kv_len": 8192}) == "blockwise"
  assert A.select("auto", backend="cpu", dense_limit_bytes=1 << 20, **kw) == "blockwise"
  assert A.select("xla", backend="gpu", **kw) == "dense"
  with pytest.raises(ValueError, match="attention_impl='flash'"):
    A.select("flash", backend="cpu", **kw)
  with pytest.raises(ValueError, match="attention_impl"):
    config.tiny(attention_impl="flash").validate()
  with pytest.raises(ValueError, match="attention_block_kv"):
    config.tiny(attention_block_kv=0).validate()
  q, k, v, qs, ks, _ = _case()
  with pytest.raises(ValueError, match="splash.*TPU"):
    A.attention(q, k, v, qs, ks, impl="splash")
  with pytest.raises(ValueError, match="segment ids"):
    A.attention(q, k, v, qs[:, 1:], ks, impl="blockwise")


# ----------------------------------------------------------------------------- the model with blockwise

BLOCKWISE = dict(attention_impl="blockwise", attention_block_q=64, attention_block_kv=64)  # several blocks a row


def _loss_and_grad(cfg, batch, params):
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  setup = st.make_setup(cfg, mesh, optim_cfg(), total_steps=10)
  state = st.init_state(setup, seed=0, params=params)
  fn = stp.make_loss_and_grad(setup, L.LossConfig(logits_chunk=16), accum=1)
  return jax.device_get(jax.jit(fn)(state, batch))


def test_training_loss_and_gradients_blockwise_equal_dense():
  """A batch with an image tile (the tower's 729 patches run blockwise too) and padding: the loss within 1e-5
  and every gradient within float32 summation-order error of the dense model's."""
  batch = synthetic.make_batch(np.random.default_rng(0), batch=2, seq_len=96, vocab_size=512, mask_token_id=500,
                               pad_frac=0.3)
  assert (batch.inputs.segments == 0).any()
  dense_cfg = config.tiny(attention_impl="dense")
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  params = host_params(st.make_setup(dense_cfg, mesh, optim_cfg(), total_steps=10))
  ld, _, gd = _loss_and_grad(dense_cfg, batch, params)
  lb, _, gb = _loss_and_grad(config.tiny(**BLOCKWISE), batch, params)
  assert abs(float(lb) - float(ld)) <= 1e-5, (lb, ld)
  for path, a, b in zip(jax.tree_util.tree_flatten_with_path(gd)[0], jax.tree.leaves(gd), jax.tree.leaves(gb)):
    atol = max(1e-7, 1e-5 * np.abs(a).max())
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=atol, err_msg=jax.tree_util.keystr(path[0]))


SCALES = {"lm_head": 50.0, "q_proj": 4.0, "k_proj": 4.0, "v_proj": 4.0, "o_proj": 4.0, "gate_proj": 3.0,
          "up_proj": 3.0, "down_proj": 3.0}


@functools.lru_cache(maxsize=None)
def _model(impl):
  kw = BLOCKWISE if impl == "blockwise" else dict(attention_impl="dense")
  return random_model(config.tiny(**kw), 0, SCALES)


# slow (the CI budget): the kernel's numerics are the forward / gradient and training tests' in the default run
@pytest.mark.slow
@pytest.mark.parametrize("cache", [None, "dual"])
def test_sampler_tokens_blockwise_equal_dense(cache):
  from tests.test_sampler import settings
  prompts = [[7, 8, 9, 10, 11, 12], [30, 31, 32, 33, 34, 35, 36, 37, 38, 39], [40, 41, 42, 43]]
  s = settings(gen_length=24, block_length=8, steps=12, cache=cache, refresh_interval=2, temperature=0.0)
  run = dict(params=s, batch_size=4, length_multiple=64, tiles=1)
  dense = generation.generate_ids(_model("dense"), prompts, None, **run)
  block = generation.generate_ids(_model("blockwise"), prompts, None, **run)
  assert [o.token_ids for o in block] == [o.token_ids for o in dense]
  assert len({tuple(o.token_ids) for o in dense}) == 3  # the answers differ: the comparison has teeth
