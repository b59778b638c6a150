"""The train state: a plain pytree of global arrays, with its shardings and abstract twin.

    {"step": int32[], "rng": uint32[2] (raw key data), "params": trainable params,
     "frozen": frozen params, "opt_state": optax state over `params` only}

`params` / `frozen` are nested dicts with the model's parameter paths (nnx.to_pure_dict layout);
the model is rebuilt inside the jitted step with `nnx.merge(graphdef, State(params | frozen))`.
Shardings come from each parameter's logical axes (lladav_jax.sharding); optimizer moments take
their parameter's sharding (`like_params_shardings`, by key path), scalars are replicated.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, traverse_util

from lladav_jax import sharding as shd
from lladav_jax import weights
from lladav_jax.config import ModelConfig
from lladav_jax.model import abstract_model, init_sharded
from lladav_jax.training import optimizer as opt

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Setup:
  """Everything static about a run's state: model graph, optimizer, shardings, abstract state."""
  model_cfg: ModelConfig
  mesh: Any
  graphdef: Any
  tx: optax.GradientTransformation
  schedules: dict[str, Callable]
  trainable: tuple[str, ...]
  abstract: dict  # ShapeDtypeStructs with .sharding, the train state's structure
  shardings: dict  # NamedShardings of the train state


def _sds(x, sharding):
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def abstract_params(model_cfg: ModelConfig, mesh):
  """(graphdef, nested dict of ShapeDtypeStructs with shardings) of LLaDAVModel(model_cfg)."""
  graphdef, state = abstract_model(model_cfg, mesh)
  return graphdef, nnx.to_pure_dict(state)


def like_params_shardings(tree, param_shardings, default):
  """Shardings for an optimizer-state-like tree: a leaf whose key path ends with a parameter's
  path (and has its shape) takes that parameter's sharding; anything else gets `default`."""
  flat = traverse_util.flatten_dict(dict(param_shardings)) if param_shardings else {}
  n_max = max((len(k) for k in flat), default=0)

  def one(path, leaf):
    names = tuple(getattr(p, "key", getattr(p, "name", None)) for p in path)
    for n in range(min(n_max, len(names)), 0, -1):
      s = flat.get(names[-n:])
      if s is not None and hasattr(leaf, "shape"):
        return s
    return default

  return jax.tree_util.tree_map_with_path(one, tree)


def make_setup(model_cfg: ModelConfig, mesh, optim_cfg: opt.OptimConfig, total_steps: int) -> Setup:
  trainable = tuple(optim_cfg.trainable)
  graphdef, params = abstract_params(model_cfg, mesh)
  tr, fr = opt.split_params(params, trainable)
  if not jax.tree.leaves(tr):
    raise ValueError(f"optim.trainable={list(trainable)} selects no parameter")
  tx, schedules = opt.make(optim_cfg, total_steps, tr)
  rep = shd.replicated(mesh)
  opt_abs = jax.eval_shape(tx.init, tr)
  tr_shard = jax.tree.map(lambda a: a.sharding, tr)
  opt_abs = jax.tree.map(_sds, opt_abs, like_params_shardings(opt_abs, tr_shard, rep))
  abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),
              "rng": jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep),
              "params": tr, "frozen": fr, "opt_state": opt_abs}
  shardings = jax.tree.map(lambda a: a.sharding, abstract)
  return Setup(model_cfg=model_cfg, mesh=mesh, graphdef=graphdef, tx=tx, schedules=schedules,
               trainable=trainable, abstract=abstract, shardings=shardings)


def init_state(setup: Setup, *, seed: int, init_checkpoint: str = "", params=None) -> dict:
  """A fresh train state on the mesh: random init, weights from a converted/HF checkpoint
  (lladav_jax.weights.load_state, sharded straight onto the mesh), or given `params` (a nested
  dict of host or device arrays in the model's layout)."""
  if params is not None:
    params = jax.device_put(params, opt.merge_params(setup.shardings["params"], setup.shardings["frozen"]))
  elif init_checkpoint:
    params = nnx.to_pure_dict(weights.load_state(init_checkpoint, setup.model_cfg, setup.mesh))
  else:
    params = nnx.to_pure_dict(init_sharded(setup.model_cfg, setup.mesh, seed=seed)[1])
  tr, fr = opt.split_params(params, setup.trainable)
  # put each leaf exactly where the train state expects it (a loader may pick another layout)
  tr = jax.device_put(tr, setup.shardings["params"])
  fr = jax.device_put(fr, setup.shardings["frozen"])
  opt_state = jax.jit(setup.tx.init, out_shardings=setup.shardings["opt_state"])(tr)
  rep = setup.shardings["step"]
  rng = jax.random.key_data(jax.random.key(seed)).astype(jnp.uint32)
  return {"step": jax.device_put(jnp.zeros((), jnp.int32), rep), "rng": jax.device_put(rng, rep),
          "params": tr, "frozen": fr, "opt_state": opt_state}


def full_params(state: dict) -> dict:
  return opt.merge_params(state["params"], state["frozen"])


def num_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
