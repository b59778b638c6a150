"""The small public API: load a checkpoint, compute logits, generate answers.

    from lladav_jax import LLaDAV
    model = LLaDAV.from_pretrained(path, dtype="float32")   # Hugging Face or converted Orbax dir
    logits = model.logits(input_ids, images=[[img], []])     # numpy [B, L_expanded, V]
    outs = model.generate(["What is in the image?"], images=[[img]], params=SamplingParams(gen_length=64))
"""
from __future__ import annotations

import json
import os
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from lladav_jax import batch as batch_lib
from lladav_jax import inference, multimodal, sharding, weights
from lladav_jax.batch import ModelInputs
from lladav_jax.config import IMAGE_TOKEN_INDEX, ModelConfig
from lladav_jax.data.tokenizer import Tokenizer
from lladav_jax.inference import GenerationResult, SamplingParams, elbo
from lladav_jax.inference.prompts import check_images
from lladav_jax.model import LLaDAVModel, abstract_model, init_sharded


def _check_vocab(cfg: ModelConfig, tokenizer, where: str = "the model"):
  """Every id the tokenizer can produce needs an embedding row (ids are not contiguous: the released
  specials sit at 126080-126348, so the vocabulary is the largest id + 1, not the entry count)."""
  if tokenizer is not None and tokenizer.vocab_size > cfg.llm.vocab_size:
    raise ValueError(f"{where}: the tokenizer's largest id is {tokenizer.vocab_size - 1} but the model has "
                     f"vocab_size={cfg.llm.vocab_size} embedding rows")


class LLaDAV:
  """A loaded LLaDA-V: model config, image config, tokenizer, and sharded parameters."""

  def __init__(self, cfg: ModelConfig, graphdef, state, *, tokenizer=None,
               image_cfg: multimodal.ImageConfig | None = None, mesh=None):
    self.cfg = cfg
    self.graphdef = graphdef
    self.state = state
    self.tokenizer = tokenizer
    self.image_cfg = image_cfg or multimodal.ImageConfig(image_size=cfg.vision.image_size,
                                                         patch_size=cfg.vision.patch_size, multi_image="pad_flat")
    if (self.image_cfg.image_size, self.image_cfg.patch_size) != (cfg.vision.image_size, cfg.vision.patch_size):
      raise ValueError(f"image_cfg makes {self.image_cfg.image_size} px tiles of {self.image_cfg.patch_size} px "
                       f"patches but the vision tower takes {cfg.vision.image_size} px / {cfg.vision.patch_size} px")
    _check_vocab(cfg, tokenizer)
    self.mesh = mesh or sharding.make_mesh(devices=jax.devices()[:1])
    self._logits_fn = jax.jit(_forward_logits, static_argnums=0)

  # ---------------------------------------------------------------- construction
  @classmethod
  def from_pretrained(cls, path: str, dtype: str | None = None, mesh=None, **cfg_overrides) -> "LLaDAV":
    """Loads a Hugging Face LLaDA-V / LLaDA directory or a converted Orbax directory.

    `dtype` is the parameter and compute dtype ("float32": float32 compute). None keeps the
    parameters at the checkpoint's own dtype (bf16 for the released model: 15.7 GiB, not 31.4) and
    the config's compute dtype. Norms, softmax and logits are float32 either way."""
    if not os.path.isdir(path):
      raise FileNotFoundError(f"checkpoint directory not found: {path}")
    cfg = weights.load_model_config(path)
    if dtype is not None:
      cfg = cfg.replace(dtype=dtype, param_dtype=dtype)
    else:
      cfg = cfg.replace(param_dtype=weights.checkpoint_dtype(path) or cfg.param_dtype)
    cfg = cfg.replace(**cfg_overrides)
    cfg.validate()
    mesh = mesh or sharding.make_mesh(devices=jax.devices()[:1])
    tokenizer = _maybe_tokenizer(path)
    _check_vocab(cfg, tokenizer, path)  # before reading gigabytes of weights
    graphdef, _ = abstract_model(cfg)
    state = weights.load_state(path, cfg, mesh)
    return cls(cfg, graphdef, state, tokenizer=tokenizer, image_cfg=_image_config(path, cfg), mesh=mesh)

  @classmethod
  def init_random(cls, cfg: ModelConfig, *, seed: int = 0, tokenizer=None, image_cfg=None, mesh=None):
    """A randomly initialised model (tests, demos, benchmarks)."""
    cfg.validate()
    mesh = mesh or sharding.make_mesh(devices=jax.devices()[:1])
    graphdef, state = init_sharded(cfg, mesh, seed=seed)
    return cls(cfg, graphdef, state, tokenizer=tokenizer, image_cfg=image_cfg, mesh=mesh)

  @property
  def module(self) -> LLaDAVModel:
    return nnx.merge(self.graphdef, self.state)

  # ---------------------------------------------------------------- inputs
  def prepare(self, input_ids, images: Sequence[Sequence[Image.Image]] | None = None):
    """Token ids with IMAGE_TOKEN_INDEX placeholders (+ PIL images per sample) -> padded batch.

    Samples are expanded (each placeholder -> that image's tokens) and right-padded to the longest;
    padded keys are masked out. Returns host `ModelInputs`.
    """
    rows = [np.asarray(r) for r in (input_ids if not isinstance(input_ids, np.ndarray)
                                    or input_ids.ndim == 2 else [input_ids])]
    images = check_images(images, len(rows))
    rows = [_checked_ids(i, r, ims, self.cfg.llm.vocab_size) for i, (r, ims) in enumerate(zip(rows, images))]
    exp = [multimodal.expand(r, multimodal.process_sample_images(ims, self.image_cfg) if ims else [],
                             self.image_cfg) for r, ims in zip(rows, images)]
    return batch_lib.collate(exp, self.image_cfg)

  def logits(self, input_ids, images: Sequence[Sequence[Image.Image]] | None = None) -> np.ndarray:
    """Float32 logits [B, L_expanded, V] (rows shorter than the longest are right-padded)."""
    out = self._logits_fn(self.graphdef, self.state, jax.tree.map(jnp.asarray, self.prepare(input_ids, images)))
    return np.asarray(out)

  def generate(self, prompts: Sequence[str], images: Sequence[Sequence[Image.Image]] | None = None,
               params: SamplingParams | None = None, **kw) -> list[GenerationResult]:
    """Answers for `prompts` (user questions; the chat template and <image> tags are added), sampled with
    `params` (default: `SamplingParams()`). Keyword arguments: `inference.generate`'s batching and
    template options (batch_size, return_trajectory, system, length_multiple, tiles)."""
    return inference.generate(self, prompts, images, params, **kw)

  def elbo(self, prompts: Sequence[str], images, answers: Sequence[str], **kw) -> list[float]:
    """Monte-Carlo lower bound of log p(answer | prompt, images), as the original's loglikelihood."""
    return elbo.elbo(self, prompts, images, answers, **kw)


def _checked_ids(i: int, ids: np.ndarray, images, vocab_size: int) -> np.ndarray:
  """Sample i's token ids as int64, checked on the host: inside the jitted forward an id outside the
  embedding table raises nothing (ids past it give non-finite logits, negative ones another row's)."""
  if ids.ndim != 1:
    raise ValueError(f"input_ids[{i}]: expected a 1-D sequence of token ids per sample, got shape {ids.shape} "
                     f"(one sample is [[id, ...]])")
  if ids.size and ids.dtype.kind not in "iu":
    raise ValueError(f"input_ids[{i}]: token ids must be integers, got dtype {ids.dtype}")
  ids = ids.astype(np.int64)
  bad = np.flatnonzero(((ids < 0) & (ids != IMAGE_TOKEN_INDEX)) | (ids >= vocab_size))
  if bad.size:
    pos = int(bad[0])
    more = f" ({bad.size - 1} more bad ids in this sample)" if bad.size > 1 else ""
    raise ValueError(f"input_ids[{i}][{pos}] = {int(ids[pos])} is not a token id of this model: valid ids are "
                     f"0..{vocab_size - 1} (vocab_size={vocab_size}), or {IMAGE_TOKEN_INDEX} for an image{more}")
  n_ph, n_im = int((ids == IMAGE_TOKEN_INDEX).sum()), len(images) if images else 0
  if n_ph != n_im:
    raise ValueError(f"input_ids[{i}] has {n_ph} image placeholders ({IMAGE_TOKEN_INDEX}) but images[{i}] "
                     f"has {n_im} images: each image needs one placeholder where it goes")
  return ids


def _forward_logits(graphdef, state, x: ModelInputs):
  model = nnx.merge(graphdef, state)
  return model(x.tokens, x.positions, x.segments, x.pixels, x.merge_idx, x.merge_w)


def _maybe_tokenizer(path: str):
  if not os.path.exists(os.path.join(path, "tokenizer.json")):
    return None
  return Tokenizer.from_dir(path)


def _image_config(path: str, cfg: ModelConfig) -> multimodal.ImageConfig:
  """Image settings from the checkpoint's config.json where present (aspect, pinpoints, video). Several
  images take the original's inference path (its lmms-eval model): "pad_flat". A model the trainer saved
  carries its own (image_config.json: the run's image settings with image.eval_multi_image)."""
  own = os.path.join(path, weights.IMAGE_CONFIG_FILE)
  if os.path.exists(own):
    with open(own) as fh:
      return multimodal.ImageConfig.from_dict(json.load(fh))
  base = multimodal.ImageConfig(image_size=cfg.vision.image_size, patch_size=cfg.vision.patch_size,
                                multi_image="pad_flat")
  f = os.path.join(path, "config.json")
  if not os.path.exists(f):
    return base
  with open(f) as fh:
    hf = json.load(fh)
  kw = {}
  if isinstance(hf.get("image_aspect_ratio"), str):
    kw["aspect"] = hf["image_aspect_ratio"]
  if hf.get("mm_spatial_pool_stride"):
    kw["video_pool_stride"] = int(hf["mm_spatial_pool_stride"])
  if isinstance(hf.get("mm_newline_position"), str):
    kw["video_newline"] = hf["mm_newline_position"]
  if hf.get("image_grid_pinpoints"):
    kw["grid_pinpoints"] = _grid_pinpoints(hf["image_grid_pinpoints"], base.image_size, f)
  return multimodal.ImageConfig(**{**base.__dict__, **kw})


def _grid_pinpoints(value, tile: int, source: str) -> tuple:
  """config.json's image_grid_pinpoints -> (cols, rows) multiples of the tile: the training scripts' string
  "(1x1),...,(6x6)" (a range, as LLaVA expands it) or the pixel pairs the trainer saves ([[384, 768], ...])."""
  if isinstance(value, str):
    pairs = [tuple(map(int, m)) for m in re.findall(r"\((\d+)x(\d+)\)", value)]
    if not pairs:
      raise ValueError(f"{source}: image_grid_pinpoints={value!r} is not of the form '(1x1),...,(6x6)'")
    (i0, j0), (i1, j1) = pairs[0], pairs[-1]
    return tuple((i, j) for i in range(i0, i1 + 1) for j in range(j0, j1 + 1))
  out = []
  for pair in value:
    w, h = (int(x) for x in pair)
    if w % tile or h % tile:
      raise ValueError(f"{source}: image_grid_pinpoints entry {list(pair)} is not a multiple of the {tile} px tile")
    out.append((w // tile, h // tile))
  return tuple(out)


__all__ = ["LLaDAV", "SamplingParams", "IMAGE_TOKEN_INDEX"]
