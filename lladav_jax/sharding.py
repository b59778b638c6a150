"""Meshes, the one logical-axis vocabulary, and the layouts (presets) that map it onto a mesh.

Parameters and activations carry logical axis names (model/common.param; `constrain` on
activations). `RULES` maps each name to mesh axis names. A preset is the mesh's own axis names, so one
table serves every layout and a jitted function's cache (keyed on the mesh) never mixes layouts:

  "fsdp_tp"  (data, fsdp, tensor)  weights sharded over fsdp (embed dims) and tensor (heads / mlp / vocab);
                                    activations: the batch over data x fsdp, heads / mlp / vocab over tensor
  "fsdp"     (data, fsdp, fsdp_b)  pure FSDP over fsdp x fsdp_b: weights sharded over two of their dims (a
                                    factored axis: 256 = 128 x 2 shards the 1152-wide tower), the batch over all
  "dp"       (data,)                pure data parallelism: weights replicated, the batch over data

A parameter dimension that its mesh axis does not divide gives that axis to another dimension it
divides; failing that the parameter is replicated over it, which `check_layout` allows only below a
small size (and logs); a larger one is an error naming the parameter and the mesh shapes that work.
"""
from __future__ import annotations

import logging
import math
from typing import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, AxisType, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

PRESETS: Mapping[str, tuple[str, ...]] = {
    "fsdp_tp": ("data", "fsdp", "tensor"),
    "fsdp": ("data", "fsdp", "fsdp_b"),
    "dp": ("data",),
}

RULES: Mapping[str, str | tuple[str, ...] | None] = {
    "layers": None,
    "vocab": ("tensor", "fsdp_b"),
    "embed": "fsdp",
    "heads": ("tensor", "fsdp_b"),
    "kv_heads": ("tensor", "fsdp_b"),
    "head_dim": None,
    "mlp": ("tensor", "fsdp_b"),
    "replicated": None,  # norms, biases: small, every device holds them whole
    "lora_rank": None,  # LoRA's rank axis (A [.., r], B [r, ..]): small; the weight-side axes shard
    "vit_embed": "fsdp",
    "vit_heads": ("tensor", "fsdp_b"),
    "vit_mlp": ("tensor", "fsdp_b"),
    # Activations: the batch over every axis that is not tensor parallel, so FSDP divides the work and
    # each layer gathers its weights.
    "activation_batch": ("data", "fsdp", "fsdp_b"),
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

# A parameter larger than this may not be replicated over a weight-sharding axis (check_layout).
REPLICATE_LIMIT_BYTES = 4 << 20


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence | None = None,
              preset: str = "fsdp_tp") -> jax.sharding.Mesh:
  """A mesh of `preset`'s axes, sized (data, fsdp, tensor) — for "fsdp" the third size is fsdp_b, for
  "dp" only `data` counts; one size may be -1 to take the remaining devices."""
  if preset not in PRESETS:
    raise ValueError(f"mesh: unknown preset {preset!r}; one of {sorted(PRESETS)}")
  devices = list(devices) if devices is not None else jax.devices()
  shape = [data, fsdp, tensor][:len(PRESETS[preset])]
  if preset == "dp" and (fsdp not in (1, -1) or tensor != 1):
    raise ValueError(f"mesh: preset 'dp' takes only data (got fsdp={fsdp}, tensor={tensor})")
  if shape.count(-1) > 1:
    raise ValueError(f"mesh: at most one of data/fsdp/tensor may be -1, got {shape}")
  if -1 in shape:
    rest = math.prod(s for s in shape if s != -1)
    if len(devices) % rest:
      raise ValueError(f"mesh: {len(devices)} devices are not divisible by data*fsdp*tensor={rest}")
    shape[shape.index(-1)] = len(devices) // rest
  if math.prod(shape) != len(devices):
    raise ValueError(f"mesh: {'*'.join(PRESETS[preset])} = {'*'.join(map(str, shape))} = {math.prod(shape)} "
                     f"but there are {len(devices)} devices")
  axes = PRESETS[preset]
  return jax.make_mesh(tuple(shape), axes, axis_types=(AxisType.Auto,) * len(axes), devices=devices)


def _names(rule) -> tuple[str, ...]:
  return () if rule is None else (rule if isinstance(rule, tuple) else (rule,))


def _axis_size(mesh, names) -> int:
  return math.prod(mesh.shape[n] for n in _names(names) if n in mesh.shape)


def logical_to_spec(axes: Sequence[str | None] | None, shape: Sequence[int], mesh, *, parameter: bool = False) -> P:
  """PartitionSpec for one array from its logical axis names and shape. For a parameter, a mesh axis
  that its own dimension does not divide shards another dimension that it divides (largest first)."""
  if not axes:
    return P()
  spec: list[list[str]] = [[] for _ in shape]
  used = set()
  for i, (name, dim) in enumerate(zip(axes, shape)):
    if name is None:
      continue
    if name not in RULES:
      raise KeyError(f"logical axis {name!r} has no rule in lladav_jax.sharding.RULES")
    names = tuple(n for n in _names(RULES[name]) if n in mesh.shape and n not in used and mesh.shape[n] > 1)
    if names and dim % _axis_size(mesh, names) == 0:
      spec[i] = list(names)
      used.update(names)
  if parameter and any(a is not None and _names(RULES[a]) for a in axes):  # a sharded kind of weight
    for n in mesh.axis_names:
      if n == "data" or n in used or mesh.shape[n] == 1:
        continue
      for i in sorted(range(len(shape)), key=lambda i: -shape[i] // max(1, _axis_size(mesh, tuple(spec[i])))):
        if axes[i] != "layers" and shape[i] % (_axis_size(mesh, tuple(spec[i])) * mesh.shape[n]) == 0:
          spec[i].append(n)
          used.add(n)
          break
  return P(*[None if not s else (s[0] if len(s) == 1 else tuple(s)) for s in spec])


def _axes(v) -> tuple | None:
  return v.get_metadata().get("out_sharding") if isinstance(v, nnx.Variable) else None


def _whole(state, mesh) -> list[tuple[str, tuple, int, list[str]]]:
  """(name, shape, bytes, axes) of every parameter that some weight axis of `mesh` (any axis but data)
  leaves whole."""
  weight_axes = [n for n in mesh.axis_names if n != "data" and mesh.shape[n] > 1]
  out = []
  for path, v in jax.tree_util.tree_leaves_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
    spec = logical_to_spec(_axes(v), v.shape, mesh, parameter=True)
    used = {n for s in spec if s for n in _names(s)}
    missing = [n for n in weight_axes if n not in used]
    if missing:
      name = ".".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
      out.append((name, tuple(v.shape), math.prod(v.shape) * np.dtype(v.dtype).itemsize, missing))
  return out


class LayoutError(ValueError):
  pass


def check_layout(state, mesh, limit_bytes: int = REPLICATE_LIMIT_BYTES) -> list[tuple[str, int]]:
  """Logs the parameters that a weight axis of `mesh` leaves whole, with their bytes; raises LayoutError
  if one is larger than `limit_bytes`, naming it and the mesh shapes of the same device count that
  shard it. Returns [(name, bytes)] of the (small) replicated ones."""
  whole = _whole(state, mesh)
  small = [w for w in whole if w[2] <= limit_bytes]
  big = [w for w in whole if w[2] > limit_bytes]
  if small:
    log.info("left whole by a weight axis (each below %.0f MiB): %d parameters, %.2f MiB", limit_bytes / 2 ** 20,
             len(small), sum(w[2] for w in small) / 2 ** 20)
  if big:
    rows = [f"{name} {list(shape)} ({b / 2 ** 20:.0f} MiB): not divisible over {'/'.join(m)}"
            for name, shape, b, m in big[:8]] + ([f"... and {len(big) - 8} more"] if len(big) > 8 else [])
    ok = working_meshes(state, mesh.size, limit_bytes)
    raise LayoutError(
        f"mesh {dict(mesh.shape)} would hold these parameters whole on every device:\n  " + "\n  ".join(rows) +
        f"\nmesh shapes of {mesh.size} devices that split every parameter above {limit_bytes / 2 ** 20:.0f} MiB "
        "(weight shards in brackets): " + (", ".join(ok[:6]) if ok else "none") +
        "\n(set mesh.preset and mesh.data / mesh.fsdp / mesh.tensor)")
  return [(w[0], w[2]) for w in small]


def working_meshes(state, devices: int, limit_bytes: int = REPLICATE_LIMIT_BYTES) -> list[str]:
  """The presets and sizes of `devices` devices under which no parameter above `limit_bytes` is left
  whole by a weight axis, the most weight shards first, then the widest fsdp ("fsdp_tp: data=3 fsdp=8
  tensor=1 [8]")."""
  out = []
  for preset, names in PRESETS.items():
    if preset == "dp":
      continue
    for f in range(1, devices + 1):
      for t in range(1, devices // f + 1):
        if devices % (f * t) == 0:
          sizes = (devices // (f * t), f, t)
          if all(w[2] <= limit_bytes for w in _whole(state, AbstractMesh(sizes, names))):
            out.append(((-f * t, -f), f"{preset}: data={sizes[0]} fsdp={f} {names[2]}={t} [{f * t}]"))
  return [s for _, s in sorted(out, key=lambda x: x[0])]


def state_shardings(state, mesh):
  """NamedShardings for an nnx.State (abstract or concrete), from each Variable's logical axes;
  refuses a layout that would replicate a large parameter (check_layout)."""
  check_layout(state, mesh)
  one = lambda v: NamedSharding(mesh, logical_to_spec(_axes(v), v.shape, mesh, parameter=True))
  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def constrain(x, axes: Sequence[str | None], *, parameter: bool = False):
  """`with_sharding_constraint` of an activation (or, `parameter`, of a parameter-shaped value such as a
  gradient) by its logical axes under the mesh set with `jax.set_mesh` (the train step compiles under it);
  a no-op without a mesh of several devices."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, mesh, parameter=parameter))


def batch_axes(mesh) -> tuple[str, ...]:
  """The mesh axes that split the batch (rows)."""
  return tuple(n for n in _names(RULES["activation_batch"]) if n in mesh.shape)


def batch_sharding(mesh, ndim: int = 2) -> NamedSharding:
  """Batch-major arrays: the leading axis over the batch axes, the rest replicated."""
  return NamedSharding(mesh, P(batch_axes(mesh), *([None] * (ndim - 1))))


def put_rows(tree, mesh):
  """Places host arrays on `mesh` with their leading (row) axis over the batch axes where it divides,
  replicated otherwise: the sampler's inputs."""
  def one(x):
    x = np.asarray(x)
    if x.ndim and x.shape[0] % _axis_size(mesh, batch_axes(mesh)) == 0:
      return jax.device_put(x, batch_sharding(mesh, x.ndim))
    return jax.device_put(x, replicated(mesh))
  return jax.tree.map(one, tree)


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
