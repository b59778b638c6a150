"""Shared building blocks: parameters with logical axes, norms, stacked layers, remat policies."""
from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lladav_jax.config import REMAT_POLICIES


def param(rngs: nnx.Rngs, init: Callable, shape: Sequence[int], axes: Sequence[str | None],
          dtype) -> nnx.Param:
  """A parameter carrying logical axis names (mapped to mesh axes by lladav_jax.sharding)."""
  assert len(axes) == len(shape), (shape, axes)
  return nnx.Param(init(rngs.params(), tuple(shape), dtype), out_sharding=tuple(axes), eager_sharding=False)


def rms_norm(x, scale, eps: float):
  """RMSNorm in float32, then `weight * x.to(input_dtype)` as LLaMA/LLaDA do."""
  dtype = x.dtype
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return scale.astype(dtype) * x32.astype(dtype)


def layer_norm(x, scale, bias, eps: float):
  """LayerNorm computed in float32."""
  dtype = x.dtype
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  y = (x32 - mean) * jax.lax.rsqrt(var + eps)
  return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(dtype)


def stacked(make_layer: Callable[[nnx.Rngs], nnx.Module], num_layers: int, rngs: nnx.Rngs) -> nnx.Module:
  """Creates `num_layers` copies of a layer with every parameter stacked on a leading 'layers' axis."""
  @nnx.split_rngs(splits=num_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def make(r):
    return make_layer(r)
  return make(rngs)


def run_stacked(layers: nnx.Module, body: Callable, carry, xs=None, *, scan: bool, remat_policy: str):
  """Applies a stack of layers: `body(layer, carry, x) -> (carry, y)` for each layer in turn.

  With `scan` the stack runs as one lax.scan (one compiled layer); otherwise as an unrolled loop
  over per-layer slices of the same stacked parameters. Both see the same parameter layout.
  """
  graphdef, state = nnx.split(layers)

  def step(c, inp):
    layer_state, x = inp
    return body(nnx.merge(graphdef, layer_state), c, x)

  saved = REMAT_POLICIES[remat_policy]
  if saved is not None:
    step = jax.checkpoint(step, policy=jax.checkpoint_policies.save_only_these_names(*saved), prevent_cse=not scan)
  if scan:
    return jax.lax.scan(step, carry, (state, xs))
  n = jax.tree.leaves(state)[0].shape[0]
  ys = []
  for i in range(n):
    carry, y = step(carry, jax.tree.map(lambda a: a[i], (state, xs)))
    ys.append(y)
  ys = None if ys[0] is None else jax.tree.map(lambda *a: jnp.stack(a), *ys)
  return carry, ys


def random_like(abstract, seed: int = 0, std: float = 0.02, scales: dict[str, float] | None = None):
  """NumPy random values for a tree of shape/dtype leaves (an abstract model state or params dict),
  without compiling the model's init (tests, benchmarks): N(0, std * scales[name]) for the weight
  named `name` in its path, ones for norm scales, zeros for biases."""
  rng = np.random.default_rng(seed)
  scales = scales or {}

  def fill(path, x):
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    if any("norm" in n or "scale" in n for n in names):
      return np.ones(x.shape, x.dtype)
    if any("bias" in n for n in names):
      return np.zeros(x.shape, x.dtype)
    f = next((scales[n] for n in reversed(names) if n in scales), 1.0)
    return rng.normal(0.0, std * f, x.shape).astype(x.dtype)

  return jax.tree_util.tree_map_with_path(fill, abstract)


def einsum_f32(eq: str, x, w):
  """A float32 result (logits). From float16 operands the product is rounded to float16 first, as the
  original's fp16 head does (XLA's CPU dot also has no f16 x f16 -> f32 form)."""
  if x.dtype == jnp.float16:
    return jnp.einsum(eq, x, w).astype(jnp.float32)
  return jnp.einsum(eq, x, w, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def dense(x, w, n_in: int = 1):
  """`jnp.tensordot(x, w, n_in)`: x's trailing `n_in` axes against w's leading ones (a projection), with a
  backward laid out for XLA:CPU's fast matmul kernel (see _dense_bwd)."""
  return jnp.tensordot(x, w, axes=n_in)


def _dense_fwd(x, w, n_in):
  return jnp.tensordot(x, w, axes=n_in), (x, w)


def _dense_bwd(n_in, res, g):
  x, w = res
  nb = x.ndim - n_in
  # dx as one 2-D contraction: over several axes XLA:CPU would transpose the weight first
  g2 = g.reshape(g.shape[:nb] + (-1,))
  dx = jax.lax.dot_general(g2, w.reshape(int(np.prod(w.shape[:n_in])), -1), (((nb,), (1,)), ((), ())))
  # The weight gradient contracts the token axes, which lead both operands. XLA:CPU runs that orientation as a
  # slow Eigen dot fed by a transposing copy of the (larger) cotangent; with one operand moved to [features,
  # tokens] first it is a plain matmul in XLA:CPU's fast kernel (figures: bench/train.py's notes). Other
  # backends fold the transpose into the dot for free.
  tokens = tuple(range(nb))
  if x.size <= g.size:
    dw = jax.lax.dot_general(_transposed(x, nb), g, ((tuple(range(n_in, x.ndim)), tokens), ((), ())))
    return dx.reshape(x.shape), dw
  # A wide input (the MLP's down projection) is recomputed under remat, and in a scan read back through dynamic
  # slices of the stacked residuals: XLA:CPU's loop that recomputes it transposed is much slower than a plain
  # transpose. The cotangent (fresh) and the weight-sized result are transposed instead.
  no = g.ndim - nb
  dwt = jax.lax.dot_general(_transposed(g, nb), x, ((tuple(range(no, g.ndim)), tokens), ((), ())))  # [out, in]
  return dx.reshape(x.shape), _transposed(dwt, no, after=True)


def _transposed(a, k: int, after: bool = False):
  """`a` with its first k axes moved last ([tokens..., features...] -> [features..., tokens...]). On CPU the
  transpose is kept apart from the dot that reads it (`after`: that writes it): XLA would fold it back into the
  dot's dimension numbers, the orientation this layout avoids. A large one on one device is built in row blocks
  (`_row_blocks_transposed`)."""
  perm = tuple(range(k, a.ndim)) + tuple(range(k))
  out_shape = tuple(a.shape[i] for i in perm)

  def cpu(v):
    mesh = jax.sharding.get_abstract_mesh()
    if v.size >= BLOCKED_TRANSPOSE_MIN and (mesh.empty or mesh.size == 1):  # a loop over a sharded axis would gather it
      return _row_blocks_transposed(v.reshape(math.prod(v.shape[:k]), -1)).reshape(out_shape)
    if after:
      return jax.lax.optimization_barrier(v).transpose(perm)
    return jax.lax.optimization_barrier(v.transpose(perm))

  return jax.lax.platform_dependent(a, cpu=cpu, default=lambda v: v.transpose(perm))


# XLA:CPU emits a transpose fused with its producer or consumer (the recompute of a layer's input from the scan's
# stacked residuals, the weight gradient's write into the stacked gradient) as a loop over the output elements that
# reads the input a row apart, a page apart for wide rows. Built from blocks of 32 rows (a loop XLA keeps, so nothing
# is fused into it) the reads stay in cache and the TLB (figures: bench/train.py's notes). On one device only.
BLOCKED_TRANSPOSE_MIN = 1 << 20  # elements; smaller arrays stay in cache either way
_BLOCK_ROWS = 32


def _row_blocks_transposed(a):
  """[R, C] -> [C, R], 32 rows at a time."""
  r, c = a.shape
  n, b = r // _BLOCK_ROWS, _BLOCK_ROWS

  def block(i, out):
    return jax.lax.dynamic_update_slice_in_dim(out, jax.lax.dynamic_slice_in_dim(a, i * b, b, 0).T, i * b, 1)

  out = jax.lax.fori_loop(0, n, block, jnp.zeros((c, r), a.dtype))
  return out if r % b == 0 else out.at[:, n * b:].set(a[n * b:].T)


dense.defvjp(_dense_fwd, _dense_bwd)
