"""Low-rank adapters (LoRA) on a projection: y = x W + scale * (dropout(x) A) B.

The delta is added to the projection's output, so the base weight is never copied or modified (it stays
frozen in the train state). A is [*in, r] and B [r, *out] with the weight's own logical axes on the
in / out sides and `lora_rank` (replicated) for r; inside the stacked layers they gain the leading
`layers` axis like every weight. B starts at zero, so an adapted model starts equal to its base.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from lladav_jax.config import LoraConfig
from lladav_jax.model import common

# Per-target fold_in offsets: q, k, v (and gate, up) read the same x but draw their own dropout masks,
# as PEFT's one nn.Dropout per adapted module does.
_TARGET_SALT = {"q_proj": 1, "k_proj": 2, "v_proj": 3, "o_proj": 4, "gate_proj": 5, "up_proj": 6, "down_proj": 7}


class Adapter(nnx.Module):
  def __init__(self, name: str, in_dims: Sequence[int], in_axes: Sequence[str], out_dims: Sequence[int],
               out_axes: Sequence[str], cfg: LoraConfig, dtype, param_dtype, *, rngs: nnx.Rngs):
    fan_in = 1
    for d in in_dims:
      fan_in *= d
    bound = fan_in ** -0.5  # PEFT: kaiming_uniform_(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    uniform = lambda key, shape, dt: jax.random.uniform(key, shape, dt, -bound, bound)
    r = cfg.rank
    self.a = common.param(rngs, uniform, (*in_dims, r), (*in_axes, "lora_rank"), param_dtype)
    self.b = common.param(rngs, jax.nn.initializers.zeros, (r, *out_dims), ("lora_rank", *out_axes), param_dtype)
    self.n_in = len(in_dims)
    self.scale = cfg.scale
    self.rate = cfg.dropout
    self.salt = _TARGET_SALT[name]
    self.dtype = dtype

  def __call__(self, x, dropout_key=None):
    """The delta for input `x` [..., *in]; dropout on x when `dropout_key` is given (training)."""
    dt = self.dtype
    if dropout_key is not None and self.rate > 0:
      keep = jax.random.bernoulli(jax.random.fold_in(dropout_key, self.salt), 1.0 - self.rate, x.shape)
      x = jnp.where(keep, x / (1.0 - self.rate), 0).astype(x.dtype)
    h = jnp.tensordot(x, self.a[...].astype(dt), axes=self.n_in)
    return jnp.tensordot(h * jnp.asarray(self.scale, dt), self.b[...].astype(dt), axes=1)


def maybe(name: str, cfg: LoraConfig, in_dims, in_axes, out_dims, out_axes, dtype, param_dtype, rngs):
  """An Adapter for `name` if LoRA targets it, else None."""
  if not cfg.enabled or name not in cfg.targets:
    return None
  return Adapter(name, in_dims, in_axes, out_dims, out_axes, cfg, dtype, param_dtype, rngs=rngs)


def delta_weight(a, b, scale: float, n_lead: int = 1):
  """scale * A B in the weight's layout [*lead, *in, *out], float32 (the merge W + scale A B of an export).
  `a` [*lead, *in, r], `b` [*lead, r, *out]; `n_lead` leading dims (the stacked `layers`) are shared."""
  a32, b32 = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  lead, ins, outs = a32.shape[:n_lead], a32.shape[n_lead:-1], b32.shape[n_lead + 1:]
  r = a32.shape[-1]
  d = jnp.einsum("...ir,...ro->...io", a32.reshape(lead + (-1, r)), b32.reshape(lead + (r, -1)),
                 precision=jax.lax.Precision.HIGHEST)
  return scale * d.reshape(lead + ins + outs)
