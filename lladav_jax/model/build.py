"""The model's two builders, one path each: its abstract twin (shapes, dtypes and shardings; nothing
allocated) and its random init, compiled so each parameter lands on its devices directly."""
from __future__ import annotations

import functools
from typing import Sequence

import jax
from flax import nnx

from lladav_jax import sharding
from lladav_jax.config import ModelConfig
from lladav_jax.model.lladav import LLaDAVModel


@functools.lru_cache(maxsize=8)
def _eval_shape(cfg: ModelConfig):
  return nnx.split(nnx.eval_shape(lambda: LLaDAVModel(cfg, rngs=nnx.Rngs(0))))


def abstract_model(cfg: ModelConfig, mesh=None):
  """(graphdef, nnx.State of Variables holding ShapeDtypeStructs) of LLaDAVModel(cfg), allocating
  nothing; with `mesh`, each ShapeDtypeStruct carries its NamedSharding (sharding.state_shardings:
  a layout that would leave a large parameter whole is refused). The state is a fresh copy (callers
  may fill it in place)."""
  graphdef, state = _eval_shape(cfg)
  if mesh is None:
    return graphdef, jax.tree.map(lambda x: x, state)
  shardings = sharding.state_shardings(state, mesh)
  one = lambda v, s: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s))
  return graphdef, jax.tree.map(one, state, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))


def init_sharded(cfg: ModelConfig, mesh=None, *, seed: int = 0, only: Sequence[str] | None = None):
  """Random init of LLaDAVModel(cfg, rngs=nnx.Rngs(seed)) as one compiled function whose outputs land
  straight on `mesh` with each parameter's sharding (no full copy on one device; no mesh: the default
  device). `only` (flat names such as "llm.embed") keeps those parameters: XLA drops the rest of the
  init and the values stay those of the full init. Returns (graphdef, nnx.State)."""
  graphdef, _ = _eval_shape(cfg)
  return graphdef, _init_fn(cfg, mesh, seed, None if only is None else tuple(only))()


def _subset(state, only):
  keep = set(only)
  return nnx.from_flat_state([(p, v) for p, v in nnx.to_flat_state(state) if ".".join(map(str, p)) in keep])


@functools.lru_cache(maxsize=16)
def _init_fn(cfg: ModelConfig, mesh, seed: int, only):
  def init():
    state = nnx.split(LLaDAVModel(cfg, rngs=nnx.Rngs(seed)))[1]
    return state if only is None else _subset(state, only)
  if mesh is None:
    return jax.jit(init)
  shardings = sharding.state_shardings(_eval_shape(cfg)[1], mesh)
  return jax.jit(init, out_shardings=shardings if only is None else _subset(shardings, only))
