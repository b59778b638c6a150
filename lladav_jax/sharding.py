"""Meshes and the one table that maps logical axis names to mesh axes.

Every parameter carries logical axis names (see model/common.param). `RULES` maps them onto the
mesh axes ("data", "fsdp", "tensor"); FSDP shards the embed dimension of every weight. A dimension
that the mesh axis does not divide is replicated instead (tiny test models on 8 devices).
"""
from __future__ import annotations

import functools
import math
from typing import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

RULES: Mapping[str, str | tuple[str, ...] | None] = {
    "layers": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "norm": None,
    "vit_embed": "fsdp",
    "vit_heads": "tensor",
    "vit_mlp": "tensor",
    # Activations: the batch over data and fsdp, so FSDP divides the work and each layer gathers its weights.
    "activation_batch": ("data", "fsdp"),
    "activation_length": None,
    "activation_embed": None,
    "activation_heads": "tensor",
    "activation_kv_heads": "tensor",
    "activation_mlp": "tensor",
    "activation_vocab": "tensor",
}

# Logical axes of the activations the model constrains (x_BLD, q_BLNH, ...).
BLD = ("activation_batch", "activation_length", "activation_embed")
BLNH = ("activation_batch", "activation_length", "activation_heads", None)
BLKH = ("activation_batch", "activation_length", "activation_kv_heads", None)
BLF = ("activation_batch", "activation_length", "activation_mlp")
BLV = ("activation_batch", "activation_length", "activation_vocab")


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence | None = None) -> jax.sharding.Mesh:
  """A (data, fsdp, tensor) mesh; one size may be -1 to take the remaining devices."""
  devices = list(devices) if devices is not None else jax.devices()
  shape = [data, fsdp, tensor]
  if shape.count(-1) > 1:
    raise ValueError(f"mesh: at most one of data/fsdp/tensor may be -1, got {shape}")
  if -1 in shape:
    rest = math.prod(s for s in shape if s != -1)
    if len(devices) % rest:
      raise ValueError(f"mesh: {len(devices)} devices are not divisible by data*fsdp*tensor={rest}")
    shape[shape.index(-1)] = len(devices) // rest
  if math.prod(shape) != len(devices):
    raise ValueError(f"mesh: data*fsdp*tensor = {'*'.join(map(str, shape))} = {math.prod(shape)} "
                     f"but there are {len(devices)} devices")
  return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def _axis_size(mesh, axis) -> int:
  if axis is None:
    return 1
  names = axis if isinstance(axis, tuple) else (axis,)
  return math.prod(mesh.shape[n] for n in names)


def logical_to_spec(axes: Sequence[str | None] | None, shape: Sequence[int], mesh) -> P:
  """PartitionSpec for one array from its logical axis names and shape."""
  if not axes:
    return P()
  spec, used = [], set()
  for name, dim in zip(axes, shape):
    axis = RULES.get(name) if name is not None else None
    if name is not None and name not in RULES:
      raise KeyError(f"logical axis {name!r} has no rule in lladav_jax.sharding.RULES")
    names = () if axis is None else (axis if isinstance(axis, tuple) else (axis,))
    names = tuple(n for n in names if n not in used and mesh.shape[n] > 1)
    if not names or dim % _axis_size(mesh, names):
      spec.append(None)
      continue
    used.update(names)
    spec.append(names[0] if len(names) == 1 else names)
  return P(*spec)


def state_shardings(state, mesh):
  """NamedShardings for an nnx.State (abstract or concrete), from each Variable's logical axes."""
  def one(v):
    axes = v.get_metadata().get("out_sharding") if isinstance(v, nnx.Variable) else None
    return NamedSharding(mesh, logical_to_spec(axes, v.shape, mesh))
  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def constrain(x, axes: Sequence[str | None]):
  """`with_sharding_constraint` of an activation by its logical axes under the mesh set with
  `jax.set_mesh` (the train step compiles under it); a no-op without a mesh of several devices."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, mesh))


def batch_sharding(mesh, ndim: int = 2) -> NamedSharding:
  """Batch-major arrays: the leading axis over data and fsdp, the rest replicated."""
  return NamedSharding(mesh, P(RULES["activation_batch"], *([None] * (ndim - 1))))


def put_rows(tree, mesh):
  """Places host arrays on `mesh` with their leading (row) axis over (data, fsdp) where it divides,
  replicated otherwise: the sampler's inputs."""
  def one(x):
    x = np.asarray(x)
    if x.ndim and x.shape[0] % _axis_size(mesh, RULES["activation_batch"]) == 0:
      return jax.device_put(x, batch_sharding(mesh, x.ndim))
    return jax.device_put(x, replicated(mesh))
  return jax.tree.map(one, tree)


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


@functools.lru_cache(maxsize=8)
def _eval_shape(cfg):
  from lladav_jax.model import LLaDAVModel
  return nnx.split(nnx.eval_shape(lambda: LLaDAVModel(cfg, rngs=nnx.Rngs(0))))


def abstract_model(cfg, mesh=None):
  """(graphdef, nnx.State of Variables holding ShapeDtypeStructs) of LLaDAVModel(cfg), allocating
  nothing; with `mesh`, each ShapeDtypeStruct carries its NamedSharding. The state is a fresh copy
  (callers may fill it in place)."""
  graphdef, state = _eval_shape(cfg)
  if mesh is None:
    return graphdef, jax.tree.map(lambda x: x, state)

  def one(v):
    s = NamedSharding(mesh, logical_to_spec(v.get_metadata().get("out_sharding"), v.shape, mesh))
    return v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s))
  return graphdef, jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def init_sharded(cfg, mesh=None, *, seed: int = 0, only: Sequence[str] | None = None):
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
def _init_fn(cfg, mesh, seed, only):
  from lladav_jax.model import LLaDAVModel

  def init():
    state = nnx.split(LLaDAVModel(cfg, rngs=nnx.Rngs(seed)))[1]
    return state if only is None else _subset(state, only)
  if mesh is None:
    return jax.jit(init)
  shardings = state_shardings(_eval_shape(cfg)[1], mesh)
  return jax.jit(init, out_shardings=shardings if only is None else _subset(shardings, only))


def to_host(tree):
  return jax.tree.map(lambda a: np.asarray(jax.device_get(a)), tree)
