"""Random test models, built from `model.abstract_model` with NumPy values (no init compile; the model's own
RNG init is `model.init_sharded`, tested through `LLaDAV.init_random` and the trainer)."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lladav_jax import weights
from lladav_jax.api import LLaDAV
from lladav_jax.model import abstract_model
from lladav_jax.model.common import random_like
from lladav_jax.training import state as st


def random_model(cfg, seed: int = 0, scales=None, **kw) -> LLaDAV:
  """A random LLaDAV on the default device: N(0, 0.02) weights times `scales[name]`, ones for norm scales,
  zeros for biases."""
  graphdef, abstract = abstract_model(cfg)
  return LLaDAV(cfg, graphdef, jax.tree.map(jnp.asarray, random_like(abstract, seed, scales=scales)), **kw)


def random_state(cfg, mesh, seed=0):
  """Random parameters (norm scales around one) placed on `mesh` with the model's shardings."""
  rng = np.random.default_rng(seed)
  _, abstract = abstract_model(cfg, mesh)
  values = {}
  for k, v in weights.flat_params(abstract).items():
    x = rng.standard_normal(v.shape).astype(np.float32)
    x = 1 + 0.2 * x if ("norm" in k or "scale" in k) else 0.1 * x
    values[k] = jax.device_put(x, v.sharding)
  nnx.replace_by_pure_dict(abstract, weights.nest(values))
  return abstract


def host_params(setup, seed=0):
  """Random host parameters of the whole model of a train `Setup` (a nested dict)."""
  return random_like(st.full_params(setup.abstract), seed)
