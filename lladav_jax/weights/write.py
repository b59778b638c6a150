"""Writing: a model directory that every entry point loads (`save_model`: Orbax params, our config, the
tokenizer files) and our parameters as HF tensors (the export direction of the name table)."""
from __future__ import annotations

import os
import shutil
from typing import Iterator

import jax
import numpy as np

from lladav_jax.config import ModelConfig
from lladav_jax.weights.names import CONFIG_FILE, ENTRIES, PARAMS_DIR, aux_files, flat_params, nest, to_hf


def save_model(path: str, cfg: ModelConfig, params, tokenizer_dir: str | None = None) -> str:
  """Writes `params` (an nnx.State or nested dict, sharded arrays fine) as a model directory that
  `LLaDAV.from_pretrained`, `lladav_jax.eval` and `lladav_jax.generate` load: Orbax params, our
  config, and the tokenizer (and HF config) files of `tokenizer_dir`. Every process calls it (Orbax saves sharded arrays collectively
  and commits atomically); process 0 writes the small files, the config last (through a rename),
  so a directory without it is never taken for a model."""
  import orbax.checkpoint as ocp
  path = os.path.abspath(path)
  cfg_file = os.path.join(path, CONFIG_FILE)
  if jax.process_index() == 0 and os.path.exists(cfg_file):
    os.remove(cfg_file)  # invalid until the new params are committed
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(path, PARAMS_DIR), nest(flat_params(params)), force=True)
    ckptr.wait_until_finished()
  if jax.process_index() == 0:
    for f in aux_files(tokenizer_dir) if tokenizer_dir else ():
      shutil.copy2(os.path.join(tokenizer_dir, f), os.path.join(path, f))
    with open(cfg_file + ".tmp", "w") as f:
      f.write(cfg.to_json())
    os.replace(cfg_file + ".tmp", cfg_file)
  return path


def iter_hf_tensors(param: str, value: np.ndarray, scheme: str = "llada_v") -> Iterator[tuple[str, np.ndarray]]:
  """(HF name, HF-layout array) for each layer slice of one of our parameters."""
  e = ENTRIES[param]
  if e.stacked:
    for i in range(value.shape[0]):
      yield e.name(scheme, i), to_hf(e, value[i])
  else:
    yield e.name(scheme), to_hf(e, value)
