"""Checkpoint names, transforms and loading: Hugging Face LLaDA-V / LLaDA safetensors and converted Orbax.

One declarative table (`MAPPING`) ties every parameter of `LLaDAVModel` to its Hugging Face
tensor name(s) and the layout transform between them. Per-layer HF tensors (`{i}` in the name)
are stacked on the leading "layers" axis of our parameter.

    HF Linear [out, in]            -> our kernel [in, out]            ("linear")
    HF q/k/v Linear [N*H, D]       -> our [D, N, H]                   ("qkv")
    HF o Linear [D, N*H]           -> our [N, H, D]                   ("out")
    HF q/k/v bias [N*H]            -> our [N, H]                      ("heads_bias")
    HF Conv2d [D, 3, p, p]         -> our [p*p*3, D]  (permute 2,3,1,0 then reshape)  ("patch")
    everything else                   copied                          ("copy")

Two LLM naming schemes are understood: LLaDA-V / LLaMA (`model.layers.{i}.self_attn.q_proj...`)
and the original LLaDA (`model.transformer.blocks.{i}.q_proj...`). A checkpoint without the
vision tower / projector / image_newline (an original LLaDA or a plain LLaMA directory) gets
those from init, with a log line (an error with `strict=True`).

Tensors a checkpoint carries that the model does not use (SigLIP's post_layernorm and head,
vision layers beyond `cfg.vision.num_layers`, rotary inv_freq buffers, position_ids) are
"extras": ignored when loading, kept verbatim by the converter. Any other unexpected key, a
missing key or a mis-shaped tensor fails with one error that lists every such key.

Loading streams tensor by tensor: each HF tensor is read alone (safetensors slices), transformed,
cast to the parameter dtype and placed on the mesh with its sharding from
`sharding.state_shardings`. Stacked parameters are filled layer by layer into a donated device
buffer, so host memory holds one layer tensor at a time (small stacks are assembled on the host).
Converted Orbax directories are restored into the abstract sharded target, never without one.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import re
import shutil
from typing import Any, Callable, Iterable, Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from lladav_jax import sharding as shd
from lladav_jax.config import LLMConfig, ModelConfig, VisionConfig

log = logging.getLogger(__name__)

CONFIG_FILE = "lladav_config.json"  # our ModelConfig, in a converted Orbax directory
MANIFEST_FILE = "hf_manifest.json"  # HF names, shapes and dtypes of the source, for orbax -> hf
EXTRAS_FILE = "extras.safetensors"  # unused source tensors, kept verbatim
PARAMS_DIR = "params"  # the Orbax checkpoint inside a converted directory
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MASK_TOKEN_ID = 126336

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
_VISION_LAYER = re.compile(re.escape(_V) + r"encoder\.layers\.(\d+)\.(.+)$")
_VISION_LAYER_SUFFIXES = {e.hf[len(_VL):] for e in MAPPING if e.hf.startswith(_VL)}


def is_extra(name: str, cfg: ModelConfig) -> bool:
  """Whether `name` is a known tensor that our model does not use (kept verbatim on convert)."""
  if any(p.match(name) for p in _EXTRA_PATTERNS):
    return True
  m = _VISION_LAYER.match(name)
  return bool(m and int(m.group(1)) >= cfg.vision.num_layers and m.group(2) in _VISION_LAYER_SUFFIXES)


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


# ----------------------------------------------------------------------------- configs

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


def is_orbax_dir(path: str) -> bool:
  return os.path.exists(os.path.join(path, CONFIG_FILE)) and _orbax_params_dir(path) is not None


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


# ----------------------------------------------------------------------------- checkpoint errors

class CheckpointMismatchError(ValueError):
  """The checkpoint's tensors do not match the model config; `problems` lists every offender."""

  def __init__(self, path: str, problems: list[str]):
    self.problems = problems
    super().__init__(f"checkpoint {path} does not match the model config ({len(problems)} problem(s)):\n  "
                     + "\n  ".join(problems))


def _fmt(shape) -> str:
  return "[" + ", ".join(str(int(d)) for d in shape) + "]"


# ----------------------------------------------------------------------------- abstract model

@functools.lru_cache(maxsize=8)
def _abstract_state(cfg: ModelConfig):
  from lladav_jax.model import LLaDAVModel
  return nnx.split(nnx.eval_shape(lambda: LLaDAVModel(cfg, rngs=nnx.Rngs(0))))


def abstract_state(cfg: ModelConfig):
  """(graphdef, nnx.State of Variables holding ShapeDtypeStructs) of LLaDAVModel(cfg); allocates nothing.
  The state is a fresh copy (callers may fill it in place)."""
  graphdef, state = _abstract_state(cfg)
  return graphdef, jax.tree.map(lambda x: x, state)


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


def _check_table_covers(shapes: Mapping[str, Any]) -> None:
  missing = sorted(set(shapes) - set(ENTRIES))
  if missing:
    raise RuntimeError(f"weights.MAPPING has no entry for model parameters {missing}")


# ----------------------------------------------------------------------------- reading safetensors

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

  def close(self):
    pass


_ST_DTYPES = {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
              "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
              "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
              "BOOL": np.dtype(np.bool_), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
              "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2)}


# ----------------------------------------------------------------------------- the plan

@dataclasses.dataclass
class ParamSource:
  entry: Entry
  shape: tuple[int, ...]  # our full shape (layers first when stacked)
  names: list[str]  # HF names, one per layer (or one)

  @property
  def layer_shape(self):
    return self.shape[1:] if self.entry.stacked else self.shape


@dataclasses.dataclass
class Plan:
  """What an HF directory provides for a model config: every parameter's sources, the extras, and the
  groups (vision / projector / image_newline) that must come from init."""
  path: str
  scheme: str  # "llada_v" (LLaMA names) or "llada" (model.transformer.*)
  params: dict[str, ParamSource]  # only the parameters read from the checkpoint, in model order
  initialized: list[str]  # parameters taken from init (whole groups absent from the checkpoint)
  extras: list[str]
  files: SafetensorsDir


def plan_hf(path: str, cfg: ModelConfig, *, strict: bool = False) -> Plan:
  """Matches an HF directory against `cfg`; raises CheckpointMismatchError listing every missing,
  unexpected and mis-shaped key (with the expected shape)."""
  files = SafetensorsDir(path)
  present = set(files.names) | {k for ks in files.missing_files.values() for k in ks}
  scheme = "llada" if any(k.startswith("model.transformer.") for k in present) else "llada_v"
  shapes = {k: tuple(v.shape) for k, v in flat_params(_abstract_state(cfg)[1]).items()}
  _check_table_covers(shapes)
  expected: dict[str, tuple[str, tuple[int, ...]]] = {}  # hf name -> (param, hf shape)
  sources: dict[str, ParamSource] = {}
  for param, shape in shapes.items():
    e = ENTRIES[param]
    n = shape[0] if e.stacked else None
    names = [e.name(scheme, i) for i in range(n)] if e.stacked else [e.name(scheme)]
    sources[param] = ParamSource(e, shape, names)
    hs = hf_shape(e, shape[1:] if e.stacked else shape)
    for name in names:
      expected[name] = (param, hs)

  # Groups with no tensor at all in the checkpoint come from init (LLM-only checkpoints).
  initialized, problems = [], []
  for group in GROUPS[1:]:
    names = [nm for p, s in sources.items() if ENTRIES[p].group == group for nm in s.names]
    if not any(nm in present for nm in names) and not any(
        k.startswith(_V) for k in present if group == "vision"):
      if strict:
        problems += [f"missing: {nm} (expected shape {_fmt(expected[nm][1])}) [no {group} tensors in the "
                     f"checkpoint; strict]" for nm in names]
      initialized += [p for p in sources if ENTRIES[p].group == group]
  init_set = set(initialized)

  missing_file_of = {k: f for f, ks in files.missing_files.items() for k in ks}
  for name, (param, hs) in expected.items():
    if param in init_set:
      continue
    if name in missing_file_of:
      problems.append(f"missing: {name} (expected shape {_fmt(hs)}) [shard file {missing_file_of[name]} "
                      f"listed in {INDEX_FILE} does not exist]")
    elif name not in files.file_of:
      problems.append(f"missing: {name} (expected shape {_fmt(hs)})")
    else:
      got = files.shape(name)
      if got != hs:
        problems.append(f"wrong shape: {name} has {_fmt(got)}, expected {_fmt(hs)}")
      elif not np.issubdtype(files.dtype(name), np.floating) and files.dtype(name) != ml_dtypes.bfloat16:
        problems.append(f"wrong dtype: {name} is {files.dtype(name)}, expected a floating dtype")
  extras = []
  for name in files.names:
    if name in expected:
      continue
    if is_extra(name, cfg):
      extras.append(name)
    else:
      problems.append(f"unexpected: {name} (shape {_fmt(files.shape(name))})")
  for f, ks in files.missing_files.items():
    for k in ks:
      if k in expected:
        continue
      if is_extra(k, cfg):
        problems.append(f"missing: {k} (unused by the model, kept on convert) [shard file {f} listed in "
                        f"{INDEX_FILE} does not exist]")
      else:
        problems.append(f"unexpected: {k} [its shard file {f} does not exist]")
  if problems:
    raise CheckpointMismatchError(path, problems)
  if initialized:
    groups = sorted({ENTRIES[p].group for p in initialized})
    log.warning("%s has no %s weights: those %d parameters come from random init (seeded); "
                "pass strict=True to make this an error", path, "/".join(groups), len(initialized))
  params = {p: s for p, s in sources.items() if p not in init_set}
  return Plan(path, scheme, params, initialized, extras, files)


def read_param(plan: Plan, param: str, layers: Iterable[int] | None = None, dtype=None) -> np.ndarray:
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


def _place_stacked(plan: Plan, param: str, sharding: NamedSharding, dtype, host_limit: int) -> jax.Array:
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


def init_params(cfg: ModelConfig, params: Iterable[str], shardings=None, seed: int = 0) -> dict:
  """Random-init values of some parameters only (one compiled init; XLA skips the rest of the model),
  the same values as a full `LLaDAVModel(cfg, rngs=nnx.Rngs(seed))`. On the devices with
  `shardings` ({param: sharding}) when given, else as host arrays."""
  params = tuple(params)
  if not params:
    return {}
  if shardings is not None:
    return _init_fn(cfg, params, seed, tuple(shardings[p] for p in params))()
  return {k: np.asarray(v) for k, v in jax.device_get(_init_fn(cfg, params, seed, None)()).items()}


@functools.lru_cache(maxsize=16)
def _init_fn(cfg, params, seed, shardings):
  from lladav_jax.model import LLaDAVModel

  def init():
    flat = flat_params(nnx.split(LLaDAVModel(cfg, rngs=nnx.Rngs(seed)))[1])
    return {p: flat[p] for p in params}
  if shardings is None:
    return jax.jit(init)
  return jax.jit(init, out_shardings=dict(zip(params, shardings)))


def _replace_values(abstract, flat_values: Mapping[str, Any]):
  nnx.replace_by_pure_dict(abstract, nest(flat_values))
  return abstract


def load_state(path: str, cfg: ModelConfig, mesh, dtype=None, *, strict: bool = False, seed: int = 0,
               host_stack_bytes: int = 256 << 20) -> nnx.State:
  """Parameters of LLaDAVModel(cfg) from an HF safetensors directory or a converted Orbax directory,
  placed on `mesh` with the shardings of `sharding.state_shardings`, at `dtype` (default
  cfg.param_dtype; bf16 sources are cast exactly). Returns an nnx.State for `nnx.merge`.

  HF: streamed one tensor at a time; stacked parameters above `host_stack_bytes` are filled layer
  by layer on the devices. Groups absent from the checkpoint come from init with `seed` (a warning),
  or raise with `strict`. Orbax: restored into the abstract sharded target.
  """
  dtype = np.dtype(jnp.dtype(dtype or cfg.param_dtype))
  _, abstract = abstract_state(cfg)
  shardings = flat_params(shd.state_shardings(abstract, mesh))
  if is_orbax_dir(path):
    values = _load_orbax(path, cfg, abstract, shardings, dtype, strict=strict)
  else:
    values = _load_hf(path, cfg, shardings, dtype, strict=strict, seed=seed, host_limit=host_stack_bytes)
  return _replace_values(abstract, values)


def _load_hf(path, cfg, shardings, dtype, *, strict, seed, host_limit) -> dict:
  plan = plan_hf(path, cfg, strict=strict)
  values = {}
  try:
    for param, src in plan.params.items():
      if src.entry.stacked:
        values[param] = _place_stacked(plan, param, shardings[param], dtype, host_limit)
      else:
        values[param] = _put(read_param(plan, param, dtype=dtype), shardings[param])
  finally:
    plan.files.close()
  if plan.initialized:
    init = init_params(cfg, plan.initialized, shardings=shardings, seed=seed)
    values.update({k: v if v.dtype == dtype else v.astype(dtype) for k, v in init.items()})
  return values


# ----------------------------------------------------------------------------- orbax

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


def _load_orbax(path, cfg, abstract, shardings, dtype, *, strict) -> dict:
  import orbax.checkpoint as ocp
  stored = orbax_metadata(path)
  want = {k: tuple(v.shape) for k, v in flat_params(abstract).items()}
  problems = []
  for k, shape in want.items():
    if k not in stored:
      problems.append(f"missing: {k} (expected shape {_fmt(shape)})")
    elif stored[k][0] != shape:
      problems.append(f"wrong shape: {k} has {_fmt(stored[k][0])}, expected {_fmt(shape)}")
  problems += [f"unexpected: {k} (shape {_fmt(stored[k][0])})" for k in stored if k not in want]
  if problems:
    raise CheckpointMismatchError(path, problems)
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


def aux_files(src: str) -> list[str]:
  """Config, tokenizer, generation config, remote-code files...: every plain top-level file of
  `src` that is neither weights nor one of ours."""
  ours = {CONFIG_FILE, MANIFEST_FILE, EXTRAS_FILE, PARAMS_DIR}
  return [f for f in sorted(os.listdir(src))
          if os.path.isfile(os.path.join(src, f)) and not f.endswith(_WEIGHT_SUFFIXES)
          and f != INDEX_FILE and f not in ours]


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


def read_orbax_param(path: str, param: str) -> np.ndarray:
  """One parameter of a converted Orbax directory as a host array at its stored dtype."""
  import orbax.checkpoint as ocp
  item = nest({param: 0})
  args = nest({param: ocp.RestoreArgs(restore_type=np.ndarray)})
  out = ocp.PyTreeCheckpointer().restore(_orbax_params_dir(path), args=ocp.args.PyTreeRestore(
      item=item, restore_args=args, partial_restore=True))
  return np.asarray(flat_params(out)[param])


# ----------------------------------------------------------------------------- export

def iter_hf_tensors(param: str, value: np.ndarray, scheme: str = "llada_v") -> Iterator[tuple[str, np.ndarray]]:
  """(HF name, HF-layout array) for each layer slice of one of our parameters."""
  e = ENTRIES[param]
  if e.stacked:
    for i in range(value.shape[0]):
      yield e.name(scheme, i), to_hf(e, value[i])
  else:
    yield e.name(scheme), to_hf(e, value)


def expected_hf_shapes(cfg: ModelConfig, scheme: str = "llada_v") -> dict[str, tuple[int, ...]]:
  """Every HF tensor name that LLaDAVModel(cfg) reads, with its shape (no allocation)."""
  _, abstract = abstract_state(cfg)
  out = {}
  for param, v in flat_params(abstract).items():
    e = ENTRIES[param]
    if e.stacked:
      for i in range(v.shape[0]):
        out[e.name(scheme, i)] = hf_shape(e, v.shape[1:])
    else:
      out[e.name(scheme)] = hf_shape(e, v.shape)
  return out


__all__ = [
    "MAPPING", "Entry", "ENTRIES", "TRANSFORMS", "CheckpointMismatchError", "Plan", "SafetensorsDir",
    "model_config_from_hf", "load_model_config", "load_state", "plan_hf", "read_param", "is_extra",
    "is_orbax_dir", "orbax_metadata", "read_orbax_param", "read_manifest", "init_params",
    "iter_hf_tensors", "expected_hf_shapes", "hf_shape", "to_ours", "to_hf", "abstract_state",
    "flat_params", "nest", "common_dtype",
]
