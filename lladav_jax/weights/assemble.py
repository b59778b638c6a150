"""Stage 0: an LLM checkpoint (LLaDA-8B-Instruct, original `model.transformer.*` or LLaMA names) and a
pretrained SigLIP checkpoint (`SiglipModel` with both towers, or `SiglipVisionModel`) read as one source.

The SigLIP directory's `vision_model.*` tensors (bare `embeddings.*`, `encoder.*`, ... in a SiglipVisionModel
saved by transformers 5) appear under LLaDA-V's names
(`model.vision_tower.vision_tower.vision_model.*`); its text tower (`text_model.*`, `logit_scale`,
`logit_bias`) is not read. What the model does not use of the tower (the last encoder layer, the head,
post_layernorm) are extras, as in a released LLaDA-V checkpoint.
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from lladav_jax.weights.hf_read import SafetensorsDir
from lladav_jax.weights.names import VISION_PREFIX

SIGLIP_PREFIX = "vision_model."  # SiglipModel, and SiglipVisionModel saved by transformers 4
_BARE = ("embeddings.", "encoder.", "post_layernorm.", "head.")  # SiglipVisionModel saved by transformers 5
# transformers' SiglipVisionConfig defaults: transformers 4 saved only the values that differ from them.
SIGLIP_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              num_channels=3, image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh",
                              layer_norm_eps=1e-6)


def siglip_vision_config(path: str) -> dict[str, Any]:
  """The vision config of a SigLIP directory's config.json (`vision_config` of a SiglipModel, or the
  whole file of a SiglipVisionModel), with transformers' defaults filled in."""
  f = os.path.join(path, "config.json")
  if not os.path.exists(f):
    raise FileNotFoundError(f"--vision-tower {path}: no config.json (expected a SiglipModel or SiglipVisionModel "
                            f"directory, e.g. google/siglip2-so400m-patch14-384)")
  with open(f) as fh:
    c = json.load(fh)
  kind = c.get("model_type")
  if kind not in ("siglip", "siglip_vision_model"):
    raise ValueError(f"{f}: model_type={kind!r}; the vision tower must be a fixed-resolution SigLIP "
                     f"('siglip' or 'siglip_vision_model', as google/siglip2-so400m-patch14-384)")
  v = (c.get("vision_config") or {}) if kind == "siglip" else c
  out = {**SIGLIP_VISION_DEFAULTS, **{k: v[k] for k in v if k in SIGLIP_VISION_DEFAULTS}}
  if out["hidden_act"] != "gelu_pytorch_tanh" or out["num_channels"] != 3:
    raise ValueError(f"{f}: hidden_act={out['hidden_act']!r}, num_channels={out['num_channels']}; the tower "
                     f"runs gelu_pytorch_tanh on RGB")
  return dict(out, model_type="siglip_vision_model")


def _vision_name(name: str) -> str | None:
  """LLaDA-V's name of a SigLIP checkpoint's vision tensor; None for the text tower."""
  if name.startswith(SIGLIP_PREFIX):
    return VISION_PREFIX + name[len(SIGLIP_PREFIX):]
  return VISION_PREFIX + name if name.startswith(_BARE) else None


class AssembledTensors:
  """The tensors of an LLM directory and of a SigLIP directory's vision tower, under LLaDA-V's names:
  what `verify.plan_hf` reads (the interface of `SafetensorsDir`)."""

  def __init__(self, llm_dir: str, siglip_dir: str):
    self.path = llm_dir
    self._dirs = (SafetensorsDir(llm_dir), SafetensorsDir(siglip_dir))
    llm, vis = self._dirs
    self.metadata = llm.metadata
    self._src: dict[str, tuple[SafetensorsDir, str]] = {n: (llm, n) for n in llm.names}
    clash = [n for n in llm.names if n.startswith(VISION_PREFIX)]
    if clash:
      raise ValueError(f"{llm_dir} already holds a vision tower ({clash[0]}, ...); --vision-tower is for an "
                       f"LLM-only checkpoint such as LLaDA-8B-Instruct")
    for n in vis.names:
      if _vision_name(n):
        self._src[_vision_name(n)] = (vis, n)
    if len(self._src) == len(llm.names):
      raise ValueError(f"{siglip_dir}: no vision tower tensors ({SIGLIP_PREFIX}* or {', '.join(_BARE)}...; expected a "
                       f"SiglipModel or SiglipVisionModel checkpoint)")
    self.names = list(self._src)
    self.file_of = {n: os.path.join(d.path, d.file_of[k]) for n, (d, k) in self._src.items()}
    self.missing_files = {os.path.join(llm.path, f): ks for f, ks in llm.missing_files.items()}
    for f, ks in vis.missing_files.items():
      ks = [_vision_name(k) for k in ks if _vision_name(k)]
      if ks:
        self.missing_files[os.path.join(vis.path, f)] = ks

  def shape(self, name: str) -> tuple[int, ...]:
    d, k = self._src[name]
    return d.shape(k)

  def dtype(self, name: str) -> np.dtype:
    d, k = self._src[name]
    return d.dtype(k)

  def get(self, name: str) -> np.ndarray:
    d, k = self._src[name]
    return d.get(k)
