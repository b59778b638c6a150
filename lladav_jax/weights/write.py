"""Writing a model directory that every entry point loads (`save_model`: Orbax params, our config, the
tokenizer files). The HF export is `convert.orbax_to_hf`."""
from __future__ import annotations

import json
import os
import shutil

import jax

from lladav_jax.config import ModelConfig
from lladav_jax.weights.merge import merge_lora
from lladav_jax.weights.names import CONFIG_FILE, IMAGE_CONFIG_FILE, PARAMS_DIR, aux_files, flat_params, nest


def save_model(path: str, cfg: ModelConfig, params, tokenizer_dir: str | None = None, image_cfg=None) -> str:
  """Writes `params` (an nnx.State or nested dict, sharded arrays fine) as a model directory that
  `LLaDAV.from_pretrained`, `lladav_jax.eval` and `lladav_jax.generate` load: Orbax params, our
  config, and the tokenizer (and HF config) files of `tokenizer_dir`. Every process calls it (Orbax saves sharded arrays collectively
  and commits atomically); process 0 writes the small files, the config last (through a rename),
  so a directory without it is never taken for a model. `image_cfg` (a multimodal.ImageConfig): the image
  settings inference uses with this model, saved as image_config.json. LoRA adapters (cfg.lora) are merged
  into their weights (weights.merge_lora): the directory holds a plain model."""
  cfg, params = merge_lora(cfg, params)
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
    if image_cfg is not None:
      with open(os.path.join(path, IMAGE_CONFIG_FILE), "w") as f:
        json.dump(image_cfg.to_dict(), f, indent=1)
    with open(cfg_file + ".tmp", "w") as f:
      f.write(cfg.to_json())
    os.replace(cfg_file + ".tmp", cfg_file)
  return path
