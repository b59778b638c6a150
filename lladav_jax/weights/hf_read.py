"""Reading Hugging Face safetensors directories, tensor by tensor, straight onto the mesh.

Headers are read once; each HF tensor is read alone (safetensors slices), transformed to our layout,
cast to the parameter dtype and placed on the mesh with its sharding. Stacked parameters are filled
layer by layer into a donated device buffer, so host memory holds one layer tensor at a time (small
stacks are assembled on the host). Which tensor feeds which parameter is a `verify.Plan`.
"""
from __future__ import annotations

import json
import math
import os
from typing import Iterable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from lladav_jax.weights.names import EXTRAS_FILE, INDEX_FILE, to_ours


class SafetensorsDir:
  """The tensors of an HF directory (one model.safetensors, several files, or an index.json shard set).
  Headers are read once; each `get` opens, reads one tensor and closes its file again, so no mapping
  of the whole checkpoint stays resident."""

  def __init__(self, path: str):
    from safetensors import safe_open
    self.path = path
    self._open = safe_open
    self.missing_files: dict[str, list[str]] = {}  # file -> its keys, per the index
    self.file_of: dict[str, str] = {}
    self._info: dict[str, tuple[tuple[int, ...], str]] = {}
    self.metadata: dict[str, str] | None = None
    index = os.path.join(path, INDEX_FILE)
    if os.path.exists(index):
      with open(index) as f:
        weight_map: dict[str, str] = json.load(f)["weight_map"]
      files = list(dict.fromkeys(weight_map.values()))
      for fname in files:
        if not os.path.exists(os.path.join(path, fname)):
          self.missing_files[fname] = [k for k, v in weight_map.items() if v == fname]
      files = [f for f in files if f not in self.missing_files]
    else:
      files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors") and f != EXTRAS_FILE)
      if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors files and no {INDEX_FILE}")
    for fname in files:
      with self._open(os.path.join(path, fname), framework="np") as h:
        if self.metadata is None:
          self.metadata = h.metadata()
        for key in h.keys():
          sl = h.get_slice(key)
          self.file_of[key] = fname
          self._info[key] = (tuple(sl.get_shape()), sl.get_dtype())
    self.names = list(self.file_of)

  def shape(self, name: str) -> tuple[int, ...]:
    return self._info[name][0]

  def dtype(self, name: str) -> np.dtype:
    return _ST_DTYPES[self._info[name][1]]

  def get(self, name: str) -> np.ndarray:
    with self._open(os.path.join(self.path, self.file_of[name]), framework="np") as h:
      return h.get_tensor(name)


_ST_DTYPES = {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
              "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
              "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
              "BOOL": np.dtype(np.bool_), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
              "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2)}


def read_param(plan, param: str, layers: Iterable[int] | None = None, dtype=None) -> np.ndarray:
  """Our layout of one parameter (all layers, or the given ones stacked), at `dtype` (default: the
  source dtype, or float32 when the layers' dtypes differ)."""
  src = plan.params[param]
  if not src.entry.stacked:
    x = to_ours(src.entry, plan.files.get(src.names[0]), src.layer_shape)
    return np.ascontiguousarray(x if dtype is None else x.astype(dtype))
  idx = list(range(src.shape[0]) if layers is None else layers)
  if dtype is None:
    dtype = common_dtype([plan.files.dtype(src.names[i]) for i in idx])
  out = np.empty((len(idx),) + tuple(src.layer_shape), dtype)
  for j, i in enumerate(idx):
    out[j] = to_ours(src.entry, plan.files.get(src.names[i]), src.layer_shape)
  return out


def common_dtype(dtypes: Iterable[np.dtype]) -> np.dtype:
  """The one dtype that holds every given float dtype exactly."""
  ds = {np.dtype(d) for d in dtypes}
  if len(ds) == 1:
    return ds.pop()
  return np.dtype(np.float64) if np.dtype(np.float64) in ds else np.dtype(np.float32)


# ----------------------------------------------------------------------------- placement

def _set_layer_impl(buf, x, i):
  return jax.lax.dynamic_update_index_in_dim(buf, x.astype(buf.dtype), i, 0)


_set_layer = jax.jit(_set_layer_impl, donate_argnums=0)


def _put(host: np.ndarray, sharding: NamedSharding) -> jax.Array:
  return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def _place_stacked(plan, param: str, sharding: NamedSharding, dtype, host_limit: int) -> jax.Array:
  src = plan.params[param]
  n = src.shape[0]
  if n * math.prod(src.layer_shape) * np.dtype(dtype).itemsize <= host_limit:
    return _put(read_param(plan, param, dtype=dtype), sharding)
  spec = tuple(sharding.spec) + (None,) * (len(src.shape) - len(sharding.spec))
  if spec[0] is not None:
    raise ValueError(f"{param}: the layers axis is sharded ({spec}); per-layer loading needs it replicated")
  layer_sharding = NamedSharding(sharding.mesh, P(*spec[1:]))
  buf = jax.jit(lambda: jnp.zeros(src.shape, dtype), out_shardings=sharding)()
  for i in range(n):
    x = read_param(plan, param, [i], dtype=dtype)[0]
    buf = _set_layer(buf, _put(x, layer_sharding), jnp.int32(i))
    del x
  return buf


def place_hf(plan, shardings, dtype, host_limit: int) -> dict:
  """{param: array on the mesh} of every parameter `plan` reads from the checkpoint, at `dtype`; stacked
  parameters above `host_limit` bytes are filled layer by layer on the devices."""
  values = {}
  for param, src in plan.params.items():
    if src.entry.stacked:
      values[param] = _place_stacked(plan, param, shardings[param], dtype, host_limit)
    else:
      values[param] = _put(read_param(plan, param, dtype=dtype), shardings[param])
  return values
