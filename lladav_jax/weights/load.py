"""`load_state`: the parameters of a model config from an HF safetensors directory or a converted Orbax
directory, placed on the mesh with the shardings of the parameters' logical axes; `init_params`: the
random-init values of the groups a checkpoint lacks."""
from __future__ import annotations

import logging
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lladav_jax.config import ModelConfig
from lladav_jax.model import abstract_model, init_sharded
from lladav_jax.weights.hf_read import place_hf
from lladav_jax.weights.names import ENTRIES, flat_params, nest
from lladav_jax.weights.orbax_io import is_orbax_dir, load_orbax
from lladav_jax.weights.verify import plan_hf

log = logging.getLogger(__name__)


def init_params(cfg: ModelConfig, params: Iterable[str], mesh=None, seed: int = 0) -> dict:
  """Random-init values of some parameters only (`model.init_sharded`: one compiled init, XLA skips
  the rest of the model), the same values as a full `LLaDAVModel(cfg, rngs=nnx.Rngs(seed))`. On `mesh`
  with the parameters' shardings when given, else as host arrays."""
  params = tuple(params)
  if not params:
    return {}
  flat = flat_params(init_sharded(cfg, mesh, seed=seed, only=params)[1])
  if mesh is not None:
    return {p: flat[p] for p in params}
  return {p: np.asarray(jax.device_get(flat[p])) for p in params}


def _replace_values(abstract, flat_values: Mapping[str, Any]):
  nnx.replace_by_pure_dict(abstract, nest(flat_values))
  return abstract


def load_state(path: str, cfg: ModelConfig, mesh, dtype=None, *, strict: bool = False, seed: int = 0,
               host_stack_bytes: int = 256 << 20) -> nnx.State:
  """Parameters of LLaDAVModel(cfg) from an HF safetensors directory or a converted Orbax directory,
  placed on `mesh` with the shardings of `model.abstract_model`, at `dtype` (default
  cfg.param_dtype; bf16 sources are cast exactly). Returns an nnx.State for `nnx.merge`.

  HF: streamed one tensor at a time; stacked parameters above `host_stack_bytes` are filled layer
  by layer on the devices. Groups absent from the checkpoint come from init with `seed` (a warning),
  or raise with `strict`. Orbax: restored into the abstract sharded target.
  """
  dtype = np.dtype(jnp.dtype(dtype or cfg.param_dtype))
  _, abstract = abstract_model(cfg, mesh)
  shardings = {k: v.sharding for k, v in flat_params(abstract).items()}
  if is_orbax_dir(path):
    values = load_orbax(path, abstract, shardings, dtype, strict=strict)
  else:
    plan = plan_hf(path, cfg, strict=strict)
    values = place_hf(plan, shardings, dtype, host_stack_bytes)
    if plan.initialized:
      log.warning("%s has no %s weights: those %d parameters come from random init (seed %d); pass strict=True "
                  "to make this an error", path, "/".join(sorted({ENTRIES[p].group for p in plan.initialized})),
                  len(plan.initialized), seed)
      init = init_params(cfg, plan.initialized, mesh, seed=seed)
      values.update({k: v if v.dtype == dtype else v.astype(dtype) for k, v in init.items()})
  return _replace_values(abstract, values)
