"""common.dense: a projection whose custom backward is laid out for XLA:CPU's fast matmul kernel. Its value and
gradients against float64 NumPy, for both backward layouts (input transposed, or cotangent and result), one and
two contracted axes, with arrays small and large enough for the transposes to be built in row blocks (a row count
that 32 does not divide); the row-block loop on one device and not under a mesh of several; and in the compiled
backward of a SwiGLU MLP no matmul contracts its left operand's leading (token) axis, the orientation XLA:CPU runs
as a slow Eigen dot."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lladav_jax.model import common


@pytest.mark.parametrize("x_shape, w_shape, n_in", [
    ((2, 5, 6), (6, 3), 1),  # a wide input (down projection): the cotangent and the result are transposed
    ((2, 5, 3), (3, 7), 1),  # a narrow one (gate / up): the input is transposed
    ((2, 5, 2, 3), (2, 3, 4), 2),  # the attention output projection: [B, L, N, H] x [N, H, D]
    ((2, 5, 4), (4, 2, 3), 1),  # q / k / v: [B, L, D] x [D, N, H]
    ((3, 347, 1024), (1024, 1100), 1),  # the input transposed in row blocks: 1041 rows, 32 x 32 + 17
    ((3, 347, 1100), (1100, 1024), 1),  # the cotangent and the result [1024, 1100] in row blocks
])
def test_value_and_gradients_match_numpy(x_shape, w_shape, n_in):
  rng = np.random.default_rng(0)
  x, w = rng.normal(size=x_shape), rng.normal(size=w_shape)
  out_shape = x_shape[:len(x_shape) - n_in] + w_shape[n_in:]
  c = rng.normal(size=out_shape)  # loss = sum(c * dense(x, w)): its gradients are c's contractions

  def loss(x, w):
    return jnp.sum(jnp.asarray(c, jnp.float32) * common.dense(x, w, n_in))

  val, (dx, dw) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(jnp.asarray(x, jnp.float32),
                                                                      jnp.asarray(w, jnp.float32))
  y = np.tensordot(x, w, axes=n_in)
  out_axes = list(range(len(x_shape) - n_in, len(out_shape)))
  batch_axes = list(range(len(x_shape) - n_in))
  np.testing.assert_allclose(val, np.sum(c * y), rtol=1e-5)
  for got, want in ((dx, np.tensordot(c, w, axes=(out_axes, list(range(n_in, w.ndim))))),
                    (dw, np.tensordot(x, c, axes=(batch_axes, batch_axes)))):
    # float32 sums of ~1000 products (the large shapes): the rounding scales with the largest entry (~160 there)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(want).max() / 10))


def test_large_transposes_loop_over_row_blocks_on_one_cpu_device_only():
  x, w = jnp.zeros((3, 347, 1024), jnp.float32), jnp.zeros((1024, 1100), jnp.float32)
  grad = jax.jit(jax.grad(lambda x, w: jnp.sum(common.dense(x, w) ** 2), argnums=(0, 1)))
  assert x.size >= common.BLOCKED_TRANSPOSE_MIN
  assert re.search(r" while\(", grad.lower(x, w).compile().as_text())
  with jax.set_mesh(jax.make_mesh((jax.device_count(),), ("fsdp",))):  # a loop over a sharded axis would gather it
    hlo = grad.lower(x, w).compile().as_text()
  assert jax.device_count() == 1 or not re.search(r" while\(", hlo)


def test_mlp_backward_has_no_token_leading_matmul_on_cpu():
  b, l, d, f = 2, 40, 32, 112
  rng = np.random.default_rng(1)
  params = [jnp.asarray(rng.normal(size=s) * 0.1, jnp.float32) for s in ((d, f), (d, f), (f, d))]
  x = jnp.asarray(rng.normal(size=(b, l, d)), jnp.float32)

  def loss(params, x):
    wg, wu, wd = params
    return jnp.sum(common.dense(jax.nn.silu(common.dense(x, wg)) * common.dense(x, wu), wd) ** 2)

  hlo = jax.jit(jax.grad(loss)).lower(params, x).compile().as_text()
  lhs = re.findall(r" dot\(%[\w.\-]+, %[\w.\-]+\), lhs_contracting_dims=\{(\d+)\}", hlo)
  assert len(lhs) >= 6, hlo  # the forward's 3, the weight gradients' 3, the input gradients' (XLA may merge them)
  assert "0" not in lhs, [ln for ln in hlo.splitlines() if "lhs_contracting_dims={0}" in ln]
