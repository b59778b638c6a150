"""Model configs of checkpoints: Hugging Face config.json (LLaDA-V / LLaMA or original LLaDA) and our
lladav_config.json -> `ModelConfig`; the dtype a checkpoint stores its parameters at."""
from __future__ import annotations

import collections
import json
import math
import os
from typing import Any, Mapping

import ml_dtypes
import numpy as np

from lladav_jax import multimodal
from lladav_jax.config import LLMConfig, ModelConfig, VisionConfig
from lladav_jax.weights.hf_read import SafetensorsDir
from lladav_jax.weights.names import CONFIG_FILE, INDEX_FILE
from lladav_jax.weights.orbax_io import is_orbax_dir, orbax_metadata

DEFAULT_MASK_TOKEN_ID = 126336


def _rope_theta(c: Mapping[str, Any], default: float) -> float:
  rp = c.get("rope_parameters") or {}
  if isinstance(rp, dict) and rp.get("rope_theta") is not None:
    return float(rp["rope_theta"])
  return float(c.get("rope_theta", default))


def _vision_from_hf(v: Mapping[str, Any] | None, mm_hidden_size: int | None) -> VisionConfig:
  """A SigLIP config (vision_config or a siglip config.json) -> our VisionConfig. LLaDA-V deletes the
  last encoder layer and reads the output before post_layernorm, so num_layers = layers - 1."""
  base = VisionConfig()
  if not v:
    if mm_hidden_size is not None and int(mm_hidden_size) != base.hidden_size:
      raise ValueError(f"mm_hidden_size={mm_hidden_size} without a vision_config: pass the vision tower's "
                       f"config.json (vision_json) so that its shape is known")
    return base
  v = dict(v.get("vision_config", v))
  n = int(v.get("num_hidden_layers", base.num_layers + 1))
  return VisionConfig(
      hidden_size=int(v.get("hidden_size", base.hidden_size)),
      intermediate_size=int(v.get("intermediate_size", base.intermediate_size)),
      num_layers=n - 1,
      num_heads=int(v.get("num_attention_heads", base.num_heads)),
      patch_size=int(v.get("patch_size", base.patch_size)),
      image_size=int(v.get("image_size", base.image_size)),
      layer_norm_eps=float(v.get("layer_norm_eps", base.layer_norm_eps)))


def model_config_from_hf(config_json: Mapping[str, Any], vision_json: Mapping[str, Any] | None = None,
                         **overrides) -> ModelConfig:
  """Our ModelConfig from a Hugging Face config.json (LLaDA-V / LLaMA style or original LLaDA).

  The vision tower comes from `vision_json` (a SigLIP config.json) or the config's `vision_config`;
  otherwise the siglip2-so400m defaults. `overrides` replace ModelConfig fields (dtype, ...).
  """
  c = dict(config_json)
  if "d_model" in c:  # original LLaDA (OLMo-style config)
    heads = int(c["n_heads"])
    d = int(c["d_model"])
    llm = LLMConfig(
        vocab_size=int(c.get("embedding_size") or c["vocab_size"]),
        hidden_size=d, num_layers=int(c["n_layers"]), num_heads=heads,
        num_kv_heads=int(c.get("n_kv_heads") or heads), head_dim=d // heads,
        intermediate_size=int(c.get("mlp_hidden_size") or c.get("mlp_ratio", 4) * d),
        rope_theta=_rope_theta(c, 10000.0),
        rms_norm_eps=float(c.get("rms_norm_eps", c.get("layer_norm_eps", 1e-5))),
        max_position_embeddings=int(c.get("max_sequence_length", c.get("max_position_embeddings", 4096))),
        initializer_range=float(c.get("init_std", 0.02)))
  else:
    heads = int(c["num_attention_heads"])
    d = int(c["hidden_size"])
    llm = LLMConfig(
        vocab_size=int(c["vocab_size"]), hidden_size=d, num_layers=int(c["num_hidden_layers"]),
        num_heads=heads, num_kv_heads=int(c.get("num_key_value_heads") or heads),
        head_dim=int(c.get("head_dim") or d // heads), intermediate_size=int(c["intermediate_size"]),
        rope_theta=_rope_theta(c, 10000.0), rms_norm_eps=float(c.get("rms_norm_eps", 1e-5)),
        max_position_embeddings=int(c.get("max_position_embeddings", 4096)),
        initializer_range=float(c.get("initializer_range", 0.02)))
  vision = _vision_from_hf(vision_json or c.get("vision_config"), c.get("mm_hidden_size"))
  mask = c.get("mask_token_id")
  kw = dict(llm=llm, vision=vision, mask_token_id=int(DEFAULT_MASK_TOKEN_ID if mask is None else mask))
  kw.update(overrides)
  return ModelConfig(**kw)


def load_model_config(path: str, **overrides) -> ModelConfig:
  """ModelConfig of a converted Orbax directory (lladav_config.json) or an HF directory (config.json)."""
  own = os.path.join(path, CONFIG_FILE)
  if os.path.exists(own):
    with open(own) as f:
      cfg = ModelConfig.from_dict(json.load(f))
    return cfg.replace(**overrides) if overrides else cfg
  hf = os.path.join(path, "config.json")
  if not os.path.exists(hf):
    raise FileNotFoundError(f"{path}: neither {CONFIG_FILE} nor config.json found")
  with open(hf) as f:
    return model_config_from_hf(json.load(f), **overrides)


def checkpoint_dtype(path: str) -> str | None:
  """The dtype that holds most of a checkpoint's floating-point values ("bfloat16" for the released
  model): from the Orbax metadata of a converted directory, else the safetensors headers, else
  config.json's torch_dtype; None when none of them says."""
  counts: collections.Counter = collections.Counter()
  if is_orbax_dir(path):
    for shape, dtype in orbax_metadata(path).values():
      counts[np.dtype(dtype)] += math.prod(shape)
  elif any(f.endswith(".safetensors") for f in os.listdir(path)) or os.path.exists(os.path.join(path, INDEX_FILE)):
    files = SafetensorsDir(path)
    for name in files.names:
      counts[files.dtype(name)] += math.prod(files.shape(name))
  counts = {d: n for d, n in counts.items() if np.issubdtype(d, np.floating) or d == ml_dtypes.bfloat16}
  if counts:
    name = max(counts, key=counts.get).name
  else:
    hf = os.path.join(path, "config.json")
    if not os.path.exists(hf):
      return None
    with open(hf) as f:
      c = json.load(f)
    name = c.get("torch_dtype") or c.get("dtype")  # transformers 5 writes "dtype"
    if not isinstance(name, str):
      return None
  return "float32" if name == "float64" else name  # JAX runs without x64


def lladav_hf_config(cfg: ModelConfig, *, torch_dtype: str, vision_tower: str,
                     token_ids: Mapping[str, int | None]) -> dict[str, Any]:
  """config.json of an assembled model in the released GSAI-ML/LLaDA-V layout (LLaMA-style LLM keys,
  the original trainer's `mm_*` keys), plus the tower's `vision_config` (its full layer count: the
  last is dropped on load) and `mask_token_id`, so that `model_config_from_hf` reads back `cfg`."""
  l, v = cfg.llm, cfg.vision
  im = multimodal.ImageConfig(image_size=v.image_size, patch_size=v.patch_size)  # the released image settings
  pin = [[i * v.image_size, j * v.image_size] for i, j in im.grid_pinpoints]
  return dict(
      architectures=["LlavaLLaDAModelLM"], model_type="llava_llada", torch_dtype=torch_dtype,
      vocab_size=l.vocab_size, hidden_size=l.hidden_size, intermediate_size=l.intermediate_size,
      num_hidden_layers=l.num_layers, num_attention_heads=l.num_heads, num_key_value_heads=l.num_kv_heads,
      head_dim=l.head_dim, hidden_act="silu", rms_norm_eps=l.rms_norm_eps, rope_theta=l.rope_theta,
      max_position_embeddings=l.max_position_embeddings, initializer_range=l.initializer_range,
      attention_bias=False, mlp_bias=False, tie_word_embeddings=False, use_cache=False,
      **{k: i for k, i in token_ids.items() if i is not None}, mask_token_id=cfg.mask_token_id,
      image_aspect_ratio=im.aspect, image_grid_pinpoints=pin, mm_hidden_size=v.hidden_size,
      mm_newline_position=im.video_newline, mm_patch_merge_type="spatial_unpad", mm_projector_type="mlp2x_gelu",
      mm_spatial_pool_mode="bilinear", mm_spatial_pool_stride=im.video_pool_stride, mm_use_im_patch_token=False,
      mm_use_im_start_end=False, mm_vision_select_feature="patch", mm_vision_select_layer=-2,
      mm_vision_tower=vision_tower, tokenizer_padding_side="right",
      vision_config=dict(model_type="siglip_vision_model", hidden_size=v.hidden_size,
                         intermediate_size=v.intermediate_size, num_hidden_layers=v.num_layers + 1,
                         num_attention_heads=v.num_heads, image_size=v.image_size, patch_size=v.patch_size,
                         layer_norm_eps=v.layer_norm_eps, hidden_act="gelu_pytorch_tanh", num_channels=3))
