"""Converted Orbax directories (`python -m lladav_jax.convert hf-to-orbax` or `save_model`): what they hold
(metadata, the HF manifest), restoring the parameters into the abstract sharded target (never without
one), and reading one parameter on the host (orbax -> hf export)."""
from __future__ import annotations

import json
import logging
import os

import jax
import numpy as np

from lladav_jax.weights.names import CONFIG_FILE, MANIFEST_FILE, PARAMS_DIR, flat_params, nest
from lladav_jax.weights.verify import CheckpointMismatchError, check_orbax

log = logging.getLogger(__name__)


def is_orbax_dir(path: str) -> bool:
  return os.path.exists(os.path.join(path, CONFIG_FILE)) and _orbax_params_dir(path) is not None


def _orbax_params_dir(path: str) -> str | None:
  """The Orbax checkpoint inside `path`, as an absolute path (Orbax refuses relative ones)."""
  for cand in (os.path.join(path, PARAMS_DIR, "state"), os.path.join(path, PARAMS_DIR), path):
    if os.path.exists(os.path.join(cand, "_METADATA")):
      return os.path.abspath(cand)
  return None


def orbax_metadata(path: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """{param: (shape, dtype)} stored in a converted Orbax directory."""
  import orbax.checkpoint as ocp
  d = _orbax_params_dir(path)
  if d is None:
    raise FileNotFoundError(f"{path}: no Orbax checkpoint (looked for {PARAMS_DIR}/state, {PARAMS_DIR}, .)")
  from etils import epath
  meta = ocp.PyTreeCheckpointHandler().metadata(epath.Path(d))
  tree = getattr(meta, "tree", meta)
  return {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in flat_params(tree).items()}


def read_manifest(path: str) -> dict | None:
  f = os.path.join(path, MANIFEST_FILE)
  if not os.path.exists(f):
    return None
  with open(f) as fh:
    return json.load(fh)


def load_orbax(path: str, abstract, shardings, dtype, *, strict: bool) -> dict:
  """{param: array on the mesh} restored into the abstract sharded target, at `dtype`; raises
  CheckpointMismatchError on any missing / unexpected / mis-shaped parameter."""
  import orbax.checkpoint as ocp
  stored = orbax_metadata(path)
  want = {k: tuple(v.shape) for k, v in flat_params(abstract).items()}
  check_orbax(path, stored, want)
  manifest = read_manifest(path) or {}
  if manifest.get("initialized"):
    msg = (f"{path}: {len(manifest['initialized'])} parameters ({', '.join(manifest['initialized_groups'])}) "
           f"were random-initialised at conversion (the source had no such weights)")
    if strict:
      raise CheckpointMismatchError(path, [msg])
    log.warning("%s", msg)
  target = nest({k: jax.ShapeDtypeStruct(want[k], dtype, sharding=shardings[k]) for k in want})
  restored = ocp.StandardCheckpointer().restore(_orbax_params_dir(path), target)
  return flat_params(restored)


def read_orbax_param(path: str, param: str) -> np.ndarray:
  """One parameter of a converted Orbax directory as a host array at its stored dtype."""
  import orbax.checkpoint as ocp
  item = nest({param: 0})
  args = nest({param: ocp.RestoreArgs(restore_type=np.ndarray)})
  out = ocp.PyTreeCheckpointer().restore(_orbax_params_dir(path), args=ocp.args.PyTreeRestore(
      item=item, restore_args=args, partial_restore=True))
  return np.asarray(flat_params(out)[param])
