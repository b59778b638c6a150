"""The names: every parameter of `LLaDAVModel`, its Hugging Face tensor name(s) and the layout transform
between them (`MAPPING`), the tensors a checkpoint may carry unused ("extras"), and the files of a model
directory.

Per-layer HF tensors (`{i}` in the name) are stacked on the leading "layers" axis of our parameter.

    HF Linear [out, in]            -> our kernel [in, out]            ("linear")
    HF q/k/v Linear [N*H, D]       -> our [D, N, H]                   ("qkv")
    HF o Linear [D, N*H]           -> our [N, H, D]                   ("out")
    HF q/k/v bias [N*H]            -> our [N, H]                      ("heads_bias")
    HF Conv2d [D, 3, p, p]         -> our [p*p*3, D]  (permute 2,3,1,0 then reshape)  ("patch")
    everything else                   copied                          ("copy")

Two LLM naming schemes are understood: LLaDA-V / LLaMA (`model.layers.{i}.self_attn.q_proj...`)
and the original LLaDA (`model.transformer.blocks.{i}.q_proj...`).

Tensors a checkpoint carries that the model does not use (SigLIP's post_layernorm and head,
vision layers beyond `cfg.vision.num_layers`, rotary inv_freq buffers, position_ids) are
"extras": ignored when loading, kept verbatim by the converter.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any, Callable, Mapping

import numpy as np
from flax import nnx

from lladav_jax.config import ModelConfig
from lladav_jax.model import abstract_model

CONFIG_FILE = "lladav_config.json"  # our ModelConfig, in a converted Orbax directory
IMAGE_CONFIG_FILE = "image_config.json"  # the image settings a trained model is used with (save_model)
MANIFEST_FILE = "hf_manifest.json"  # HF names, shapes and dtypes of the source, for orbax -> hf
EXTRAS_FILE = "extras.safetensors"  # unused source tensors, kept verbatim
PARAMS_DIR = "params"  # the Orbax checkpoint inside a converted directory
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
INDEX_FILE = "model.safetensors.index.json"

VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."
GROUPS = ("llm", "vision", "projector", "image_newline")


# ----------------------------------------------------------------------------- the table

@dataclasses.dataclass(frozen=True)
class Entry:
  """One parameter of ours. `hf` (LLaDA-V / LLaMA names) and `hf_llada` (original LLaDA names;
  None: same as `hf`) contain `{i}` when the parameter is stacked over layers."""
  param: str
  hf: str
  transform: str
  hf_llada: str | None = None

  @property
  def group(self) -> str:
    return self.param.split(".")[0]

  @property
  def stacked(self) -> bool:
    return "{i}" in self.hf

  def name(self, scheme: str, layer: int | None = None) -> str:
    tmpl = self.hf_llada if (scheme == "llada" and self.hf_llada) else self.hf
    return tmpl.format(i=layer) if self.stacked else tmpl


_L, _LL = "model.layers.{i}.", "model.transformer.blocks.{i}."
_V = VISION_PREFIX
_VL = _V + "encoder.layers.{i}."

MAPPING: tuple[Entry, ...] = (
    # language model
    Entry("llm.embed", "model.embed_tokens.weight", "copy", "model.transformer.wte.weight"),
    Entry("llm.layers.attn_norm", _L + "input_layernorm.weight", "copy", _LL + "attn_norm.weight"),
    Entry("llm.layers.attn.q_proj", _L + "self_attn.q_proj.weight", "qkv", _LL + "q_proj.weight"),
    Entry("llm.layers.attn.k_proj", _L + "self_attn.k_proj.weight", "qkv", _LL + "k_proj.weight"),
    Entry("llm.layers.attn.v_proj", _L + "self_attn.v_proj.weight", "qkv", _LL + "v_proj.weight"),
    Entry("llm.layers.attn.o_proj", _L + "self_attn.o_proj.weight", "out", _LL + "attn_out.weight"),
    Entry("llm.layers.mlp_norm", _L + "post_attention_layernorm.weight", "copy", _LL + "ff_norm.weight"),
    Entry("llm.layers.mlp.gate_proj", _L + "mlp.gate_proj.weight", "linear", _LL + "ff_proj.weight"),
    Entry("llm.layers.mlp.up_proj", _L + "mlp.up_proj.weight", "linear", _LL + "up_proj.weight"),
    Entry("llm.layers.mlp.down_proj", _L + "mlp.down_proj.weight", "linear", _LL + "ff_out.weight"),
    Entry("llm.final_norm", "model.norm.weight", "copy", "model.transformer.ln_f.weight"),
    Entry("llm.lm_head", "lm_head.weight", "linear", "model.transformer.ff_out.weight"),
    # SigLIP vision tower
    Entry("vision.patch_kernel", _V + "embeddings.patch_embedding.weight", "patch"),
    Entry("vision.patch_bias", _V + "embeddings.patch_embedding.bias", "copy"),
    Entry("vision.pos_embed", _V + "embeddings.position_embedding.weight", "copy"),
    Entry("vision.layers.ln1_scale", _VL + "layer_norm1.weight", "copy"),
    Entry("vision.layers.ln1_bias", _VL + "layer_norm1.bias", "copy"),
    Entry("vision.layers.q_proj", _VL + "self_attn.q_proj.weight", "qkv"),
    Entry("vision.layers.q_bias", _VL + "self_attn.q_proj.bias", "heads_bias"),
    Entry("vision.layers.k_proj", _VL + "self_attn.k_proj.weight", "qkv"),
    Entry("vision.layers.k_bias", _VL + "self_attn.k_proj.bias", "heads_bias"),
    Entry("vision.layers.v_proj", _VL + "self_attn.v_proj.weight", "qkv"),
    Entry("vision.layers.v_bias", _VL + "self_attn.v_proj.bias", "heads_bias"),
    Entry("vision.layers.o_proj", _VL + "self_attn.out_proj.weight", "out"),
    Entry("vision.layers.o_bias", _VL + "self_attn.out_proj.bias", "copy"),
    Entry("vision.layers.ln2_scale", _VL + "layer_norm2.weight", "copy"),
    Entry("vision.layers.ln2_bias", _VL + "layer_norm2.bias", "copy"),
    Entry("vision.layers.fc1", _VL + "mlp.fc1.weight", "linear"),
    Entry("vision.layers.fc1_bias", _VL + "mlp.fc1.bias", "copy"),
    Entry("vision.layers.fc2", _VL + "mlp.fc2.weight", "linear"),
    Entry("vision.layers.fc2_bias", _VL + "mlp.fc2.bias", "copy"),
    # mlp2x_gelu projector and the newline vector
    Entry("projector.fc1", "model.mm_projector.0.weight", "linear"),
    Entry("projector.fc1_bias", "model.mm_projector.0.bias", "copy"),
    Entry("projector.fc2", "model.mm_projector.2.weight", "linear"),
    Entry("projector.fc2_bias", "model.mm_projector.2.bias", "copy"),
    Entry("image_newline", "model.image_newline", "copy"),
)
ENTRIES: dict[str, Entry] = {e.param: e for e in MAPPING}

# Source tensors that the model does not use but that the converter keeps ("extras").
_EXTRA_PATTERNS = (
    re.compile(re.escape(_V) + r"post_layernorm\.(weight|bias)$"),
    re.compile(re.escape(_V) + r"head\..+$"),
    re.compile(re.escape(_V) + r"embeddings\.position_ids$"),
    re.compile(r".*rotary_emb\.inv_freq$"),
)
# Every stacked per-layer name of either scheme as a pattern, with its group (llm or vision).
_LAYER_PATTERNS = tuple(
    (re.compile(re.escape(t).replace(re.escape("{i}"), r"(\d+)") + "$"), e.group)
    for e in MAPPING if e.stacked for t in {e.hf, e.hf_llada or e.hf})


def layer_of(name: str) -> tuple[str, int] | None:
  """(group, layer index) of a per-layer tensor name of either scheme; None for other names."""
  for pat, group in _LAYER_PATTERNS:
    m = pat.match(name)
    if m:
      return group, int(m.group(1))
  return None


def is_extra(name: str, cfg: ModelConfig) -> bool:
  """Whether `name` is a known tensor that our model does not use (kept verbatim on convert). Of the
  vision layers only the one the original drops is: it reads the features of the second-to-last layer
  (mm_vision_select_layer -2), so the checkpoint may hold layer `cfg.vision.num_layers` or not."""
  if any(p.match(name) for p in _EXTRA_PATTERNS):
    return True
  layer = layer_of(name)
  return layer == ("vision", cfg.vision.num_layers)


def beyond_config(name: str, cfg: ModelConfig) -> str | None:
  """Why a per-layer tensor the model does not read is an error, naming both numbers; None otherwise."""
  layer = layer_of(name)
  if layer is None:
    return None
  group, i = layer
  if group == "vision":
    n = cfg.vision.num_layers + 1
    return (f"vision encoder layer {i}, but the vision config has num_hidden_layers={n} (the model uses "
            f"{n - 1}; the original drops the last)")
  return f"{group} layer {i}, but the config has num_hidden_layers={cfg.llm.num_layers}"


# ----------------------------------------------------------------------------- transforms
# Each transform: (hf_shape(ours_shape), to_ours(hf_array, ours_shape), to_hf(our_array)).
# They are pure transposes/reshapes, hence exact in every dtype.

def _patch_size(shape):
  return math.isqrt(shape[0] // 3)


TRANSFORMS: dict[str, tuple[Callable, Callable, Callable]] = {
    "copy": (lambda s: tuple(s), lambda x, s: x, lambda x: x),
    "linear": (lambda s: (s[1], s[0]), lambda x, s: x.T, lambda x: x.T),
    "qkv": (lambda s: (s[1] * s[2], s[0]), lambda x, s: x.T.reshape(s),
            lambda x: x.reshape(x.shape[0], -1).T),
    "out": (lambda s: (s[2], s[0] * s[1]), lambda x, s: x.T.reshape(s),
            lambda x: x.reshape(-1, x.shape[-1]).T),
    "heads_bias": (lambda s: (s[0] * s[1],), lambda x, s: x.reshape(s), lambda x: x.reshape(-1)),
    "patch": (lambda s: (s[1], 3, _patch_size(s), _patch_size(s)),
              lambda x, s: x.transpose(2, 3, 1, 0).reshape(s),
              lambda x: x.reshape(_patch_size(x.shape), _patch_size(x.shape), 3, x.shape[1]).transpose(3, 2, 0, 1)),
}


def hf_shape(entry: Entry, ours_shape) -> tuple[int, ...]:
  """The HF tensor shape of one (per-layer) slice of our parameter."""
  return tuple(int(d) for d in TRANSFORMS[entry.transform][0](tuple(ours_shape)))


def to_ours(entry: Entry, x: np.ndarray, ours_shape) -> np.ndarray:
  return TRANSFORMS[entry.transform][1](x, tuple(ours_shape))


def to_hf(entry: Entry, x: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(TRANSFORMS[entry.transform][2](x))


def expected_hf_shapes(cfg: ModelConfig, scheme: str = "llada_v") -> dict[str, tuple[int, ...]]:
  """Every HF tensor name that LLaDAVModel(cfg) reads, with its shape (no allocation)."""
  _, abstract = abstract_model(cfg)
  out = {}
  for param, v in flat_params(abstract).items():
    e = ENTRIES[param]
    if e.stacked:
      for i in range(v.shape[0]):
        out[e.name(scheme, i)] = hf_shape(e, v.shape[1:])
    else:
      out[e.name(scheme)] = hf_shape(e, v.shape)
  return out


# ----------------------------------------------------------------------------- trees and files

def flat_params(state) -> dict[str, Any]:
  """{"llm.layers.attn.q_proj": leaf} of an nnx.State (Variables unwrapped) or a nested dict."""
  if isinstance(state, nnx.State):
    return {".".join(map(str, p)): (v.get_value() if isinstance(v, nnx.Variable) else v)
            for p, v in nnx.to_flat_state(state)}
  out = {}

  def walk(d, prefix):
    for k, v in d.items():
      if isinstance(v, Mapping):
        walk(v, prefix + (str(k),))
      else:
        out[".".join(prefix + (str(k),))] = v
  walk(state, ())
  return out


def nest(flat: Mapping[str, Any]) -> dict:
  out: dict = {}
  for k, v in flat.items():
    d = out
    parts = k.split(".")
    for p in parts[:-1]:
      d = d.setdefault(p, {})
    d[parts[-1]] = v
  return out


def check_table_covers(shapes: Mapping[str, Any]) -> None:
  missing = sorted(set(shapes) - set(ENTRIES))
  if missing:
    raise RuntimeError(f"weights.MAPPING has no entry for model parameters {missing}")


def aux_files(src: str) -> list[str]:
  """Config, tokenizer, generation config, remote-code files...: every plain top-level file of
  `src` that is neither weights nor one of ours."""
  ours = {CONFIG_FILE, MANIFEST_FILE, EXTRAS_FILE, PARAMS_DIR}
  return [f for f in sorted(os.listdir(src))
          if os.path.isfile(os.path.join(src, f)) and not f.endswith(_WEIGHT_SUFFIXES)
          and f != INDEX_FILE and f not in ours]
