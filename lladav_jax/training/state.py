"""The train state: a plain pytree of global arrays, with its shardings and abstract twin.

    {"step": int32[], "rng": uint32[2] (raw key data), "params": trainable params,
     "frozen": frozen params, "opt_state": optax state over `params` only}

With LoRA (model.lora) the checkpoint holds `checkpoint_tree(state)`: the state without "frozen" (the base
weights, unchanged by training) plus "frozen_digest" (per-parameter sums); a restore reloads the base from
where the run started (`init.checkpoint` or the seeded init) and refuses one whose digest differs.

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
from lladav_jax.config import LoraConfig, ModelConfig
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


def _names_of(tree, pick) -> list[str]:
  return [".".join(map(str, k)) for k in traverse_util.flatten_dict(dict(tree)) if pick(k)]


def initial_params(setup: Setup, *, seed: int, init_checkpoint: str = "", only: str = "all") -> dict:
  """The run's starting parameters (nested dict on the mesh): a converted/HF checkpoint (its model has no
  adapters: they start from the seeded init, B = 0) or the seeded random init. `only="frozen"`: just the
  frozen groups (a LoRA restore), loading or computing nothing else."""
  mc = setup.model_cfg
  _, abstract = abstract_params(mc, setup.mesh)
  frozen_only = only == "frozen"
  keep = lambda k: opt.group_of(k) not in setup.trainable if frozen_only else True
  if init_checkpoint:
    params = nnx.to_pure_dict(weights.load_state(init_checkpoint, mc.replace(lora=LoraConfig()), setup.mesh))
    adapters = _names_of(abstract, lambda k: opt.group_of(k) == "lora" and keep(k))
    if adapters:
      params = opt.merge_params(params, nnx.to_pure_dict(init_sharded(mc, setup.mesh, seed=seed, only=adapters)[1]))
  else:
    names = None if not frozen_only else _names_of(abstract, keep)
    params = nnx.to_pure_dict(init_sharded(mc, setup.mesh, seed=seed, only=names)[1])
  if frozen_only:
    return opt.split_params(params, setup.trainable)[1]
  return params


def init_state(setup: Setup, *, seed: int, init_checkpoint: str = "", params=None) -> dict:
  """A fresh train state on the mesh: random init, weights from a converted/HF checkpoint
  (lladav_jax.weights.load_state, sharded straight onto the mesh; LoRA adapters from the seeded init),
  or given `params` (a nested dict of host or device arrays in the model's layout)."""
  if params is not None:
    params = jax.device_put(params, opt.merge_params(setup.shardings["params"], setup.shardings["frozen"]))
  else:
    params = initial_params(setup, seed=seed, init_checkpoint=init_checkpoint)
  tr, fr = opt.split_params(params, setup.trainable)
  # put each leaf exactly where the train state expects it (a loader may pick another layout)
  tr = jax.device_put(tr, setup.shardings["params"])
  fr = jax.device_put(fr, setup.shardings["frozen"])
  opt_state = jax.jit(setup.tx.init, out_shardings=setup.shardings["opt_state"])(tr)
  rep = setup.shardings["step"]
  rng = jax.random.key_data(jax.random.key(seed)).astype(jnp.uint32)
  return {"step": jax.device_put(jnp.zeros((), jnp.int32), rep), "rng": jax.device_put(rng, rep),
          "params": tr, "frozen": fr, "opt_state": opt_state}


# ----------------------------------------------------------------------------- what a checkpoint holds

def saves_frozen(setup: Setup) -> bool:
  """False under LoRA: the frozen base is the starting checkpoint's, so the train checkpoint leaves it out."""
  return not setup.model_cfg.lora.enabled


@jax.jit
def frozen_digest(frozen) -> jax.Array:
  """[n, 2] float32: (sum, sum of squares) of each frozen parameter, in flattened-key order."""
  leaves = [v for _, v in sorted(traverse_util.flatten_dict(dict(frozen)).items())] if frozen else []
  rows = [jnp.stack([jnp.sum(x.astype(jnp.float32)), jnp.sum(jnp.square(x.astype(jnp.float32)))]) for x in leaves]
  return jnp.stack(rows) if rows else jnp.zeros((0, 2), jnp.float32)


def checkpoint_tree(setup: Setup, state: dict) -> dict:
  """What the train checkpoint stores of `state`."""
  if saves_frozen(setup):
    return state
  out = {k: v for k, v in state.items() if k != "frozen"}
  out["frozen_digest"] = jax.device_put(frozen_digest(state["frozen"]), setup.shardings["step"])
  return out


def checkpoint_abstract(setup: Setup) -> dict:
  """The abstract twin of `checkpoint_tree` (the restore target)."""
  if saves_frozen(setup):
    return setup.abstract
  out = {k: v for k, v in setup.abstract.items() if k != "frozen"}
  n = len(traverse_util.flatten_dict(dict(setup.abstract["frozen"]))) if setup.abstract["frozen"] else 0
  out["frozen_digest"] = jax.ShapeDtypeStruct((n, 2), jnp.float32, sharding=setup.shardings["step"])
  return out


class BaseMismatchError(ValueError):
  pass


def from_checkpoint(setup: Setup, saved: dict, *, seed: int, init_checkpoint: str = "") -> dict:
  """The train state from a restored `checkpoint_tree`: under LoRA the frozen base is reloaded from where the
  run started and checked against the saved digest (another base would silently change the model)."""
  if saves_frozen(setup):
    return saved
  frozen = jax.device_put(initial_params(setup, seed=seed, init_checkpoint=init_checkpoint, only="frozen"),
                          setup.shardings["frozen"])
  want, got = np.asarray(jax.device_get(saved["frozen_digest"])), np.asarray(jax.device_get(frozen_digest(frozen)))
  # the sums are reduced in a mesh-dependent order: equal weights agree to float32 rounding
  if want.shape != got.shape or not np.allclose(got, want, rtol=1e-4, atol=1e-6):
    source = f"init.checkpoint={init_checkpoint!r}" if init_checkpoint else f"the random init of seed={seed}"
    raise BaseMismatchError(f"the LoRA checkpoint was trained on other base weights than {source}: resume with "
                            "the init.checkpoint (and seed) the run started from")
  state = {k: v for k, v in saved.items() if k != "frozen_digest"}
  state["frozen"] = frozen
  return state


def full_params(state: dict) -> dict:
  return opt.merge_params(state["params"], state["frozen"])


def num_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
