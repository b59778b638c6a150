"""Pre-training of a from-scratch vision tower on image-caption pairs with SigLIP's sigmoid loss, run before
the first step (`vision_pretrain.steps > 0`; the demo preset does).

The released tower comes pre-trained this way (siglip2 on image-text pairs) and LLaDA-V's stages start from
it. A tower at its random init trained only through the diffusion loss learns colours but not shapes in the
demo's steps (bench/demo_steps.py's notes), so the demo gives its tower this stage first, in miniature: the
image side is the tower, mean-pooled over patches and projected; the text side a mean of learned token
embeddings (the run's tokenizer) and a projection; each pair's logit is t * <image, text> + b, with the labels
+1 where two captions are the same text (a batch may hold several pictures of one caption), -1 elsewhere.

    params["vision"], report = pretrain(params["vision"], model_cfg, pairs, cfg, seed=0)
"""
from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lladav_jax import multimodal
from lladav_jax.config import ModelConfig
from lladav_jax.data import records
from lladav_jax.model import attention as attn
from lladav_jax.model.vision import SigLIPVision, normalize_pixels

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class VisionPretrainConfig:
  steps: int = 0  # 0: no pre-training
  batch_size: int = 128
  lr: float = 1e-3
  embed_dim: int = 64  # the shared image-text space
  data: str = ""  # LLaVA JSON: each record one image, its first answer the caption
  image_folder: str = ""  # its relative image paths ("": the data file's folder)
  held_out: float = 0.05  # the pairs kept out of training to measure caption retrieval on


@dataclasses.dataclass
class Pairs:
  tiles: np.ndarray  # [N, S, S, 3] uint8: each image's first tile under the run's image config
  text: np.ndarray  # [N, T] int32 token ids, 0-padded
  text_len: np.ndarray  # [N]
  caption_id: np.ndarray  # [N]: equal for equal captions
  captions: list[str]  # by caption_id


def load_pairs(path: str, image_folder: str, tokenizer, icfg: multimodal.ImageConfig, *, max_pixels: int,
               max_text: int = 16) -> Pairs:
  """The (image, caption) pairs of a LLaVA JSON file, every tile held in memory (a demo-sized caption set: 4,400
  pictures of 56 px are 41 MB); a record that has no single image or no answer, or whose image cannot be read
  (missing, outside `image_folder`, corrupt, over `max_pixels`: training's reasons), is skipped and counted by
  reason."""
  with open(path) as f:
    recs = json.load(f)
  if not isinstance(recs, list):
    raise ValueError(f"vision_pretrain.data={path!r}: a JSON list of records, not {type(recs).__name__}")
  tiles, texts, caption_ids, by_text, skipped = [], [], [], {}, {}
  for i, rec in enumerate(recs):
    try:
      if not isinstance(rec, dict) or not isinstance(rec.get("image"), str):
        raise records.Skip("not_one_image", "the record's `image` is not one path")
      answers = [t.get("value") for t in rec.get("conversations") or [] if isinstance(t, dict) and t.get("from") == "gpt"]
      if not answers or not isinstance(answers[0], str) or not answers[0].strip():
        raise records.Skip("no_caption", "the record has no answer to take as its caption")
      ref = rec["image"]
      img = records.open_image(records.Opener(rec, image_folder).data(ref), ref, max_pixels=max_pixels)
      caption = answers[0].strip()
      ids = tokenizer.encode(caption)[:max_text]
    except records.Skip as e:
      skipped.setdefault(e.reason, []).append(i)
      continue
    tiles.append(multimodal.process_image(img, icfg).tiles[0])
    texts.append(ids)
    caption_ids.append(by_text.setdefault(caption, len(by_text)))
  for reason, idx in skipped.items():
    log.warning("vision pre-training: skipped %d records of %s (%s), the first record %d", len(idx), path, reason, idx[0])
  if len(tiles) < 2:
    raise ValueError(f"vision_pretrain.data={path!r}: {len(tiles)} usable image-caption pairs (it needs at least 2)")
  text = np.zeros((len(texts), max(map(len, texts))), np.int32)
  for k, ids in enumerate(texts):
    text[k, :len(ids)] = ids
  return Pairs(np.stack(tiles), text, np.asarray([len(t) for t in texts], np.int32), np.asarray(caption_ids, np.int32),
               list(by_text))


class _Towers(nnx.Module):
  def __init__(self, model_cfg: ModelConfig, vocab_size: int, embed_dim: int, rngs: nnx.Rngs):
    v = model_cfg.vision
    self.cfg = v
    # the run's tower as the model builds it (its dtypes, attention, layer scan), so its params go back unchanged
    self.vision = SigLIPVision(v, dtype=jnp.dtype(model_cfg.dtype), param_dtype=jnp.dtype(model_cfg.param_dtype),
                               attention=attn.AttentionConfig.from_config(model_cfg),
                               scan_layers=model_cfg.scan_layers, remat_policy=model_cfg.remat_policy, rngs=rngs)
    self.image_proj = nnx.Linear(v.hidden_size, embed_dim, rngs=rngs)
    self.words = nnx.Embed(vocab_size, embed_dim, rngs=rngs)
    # SigLIP's initial temperature and bias (strongly typed: a weak-typed scalar would retrace after an update)
    self.log_t = nnx.Param(jnp.asarray(np.log(10.0), jnp.float32))
    self.b = nnx.Param(jnp.asarray(-10.0, jnp.float32))

  def image(self, tiles):
    z = self.image_proj(self.vision(normalize_pixels(tiles, self.cfg)).mean(1).astype(jnp.float32))
    return z / jnp.linalg.norm(z, axis=-1, keepdims=True)

  def text(self, ids, lens):
    valid = (jnp.arange(ids.shape[1]) < lens[:, None])[..., None]
    z = jnp.sum(self.words(ids) * valid, 1) / lens[:, None]
    return z / jnp.linalg.norm(z, axis=-1, keepdims=True)


def _loss(m: _Towers, tiles, ids, lens, caption_id):
  logits = m.image(tiles) @ m.text(ids, lens).T * jnp.exp(m.log_t[...]) + m.b[...]
  labels = jnp.where(caption_id[:, None] == caption_id[None, :], 1.0, -1.0)
  return -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / tiles.shape[0]


@nnx.jit
def _step(m, opt, tiles, ids, lens, caption_id):
  loss, grads = nnx.value_and_grad(_loss)(m, tiles, ids, lens, caption_id)
  opt.update(m, grads)
  return loss


@nnx.jit
def _retrieve(m, tiles, ids, lens):
  """Each image's best caption among `ids`."""
  return jnp.argmax(m.image(tiles) @ m.text(ids, lens).T, axis=-1)


def retrieval_accuracy(m: _Towers, pairs: Pairs, rows: np.ndarray) -> float:
  """The share of `rows` whose image picks its own caption among every distinct caption."""
  first = np.asarray([int(np.flatnonzero(pairs.caption_id == c)[0]) for c in range(len(pairs.captions))])
  hits = 0
  for a in range(0, len(rows), 256):
    r = rows[a:a + 256]
    got = np.asarray(_retrieve(m, pairs.tiles[r], pairs.text[first], pairs.text_len[first]))
    hits += int(np.sum(got == pairs.caption_id[r]))
  return hits / max(1, len(rows))


def pretrain(vision_params: dict, model_cfg: ModelConfig, vocab_size: int, pairs: Pairs, cfg: VisionPretrainConfig,
             *, seed: int, progress: bool = True) -> tuple[dict, dict]:
  """`cfg.steps` steps of Adam (warm-up, cosine) on the sigmoid loss from `vision_params` (the tower's nested
  dict); returns the trained tower's params (host arrays) and a report (loss, held-out retrieval accuracy,
  seconds). Deterministic in `seed`."""
  t0 = time.perf_counter()
  m = _Towers(model_cfg, vocab_size, cfg.embed_dim, nnx.Rngs(seed))
  state = nnx.state(m.vision, nnx.Param)
  nnx.replace_by_pure_dict(state, jax.device_get(vision_params))
  nnx.update(m.vision, state)
  warmup = max(1, cfg.steps // 20)
  sched = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, max(cfg.steps, warmup + 1))
  opt = nnx.Optimizer(m, optax.adam(sched), wrt=nnx.Param)
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(pairs.caption_id))
  n_out = int(len(order) * cfg.held_out) if len(order) >= 40 else 0
  held, train = order[:n_out], order[n_out:]
  bs = min(cfg.batch_size, len(train))
  bar = None
  if progress:
    from tqdm import tqdm
    bar = tqdm(total=cfg.steps, desc="vision pre-training", unit="step", dynamic_ncols=True, file=sys.stderr,
               mininterval=1.0)
  perm, at, loss = rng.permutation(train), 0, float("nan")
  for step in range(cfg.steps):
    if at + bs > len(perm):
      perm, at = rng.permutation(train), 0
    rows = np.sort(perm[at:at + bs])
    at += bs
    loss = _step(m, opt, pairs.tiles[rows], pairs.text[rows], pairs.text_len[rows], pairs.caption_id[rows])
    if bar is not None:
      bar.update(1)
      if step % 20 == 0:
        bar.set_postfix(loss=f"{float(loss):.4g}", refresh=False)
  if bar is not None:
    bar.close()
  report = {"loss": float(loss), "seconds": time.perf_counter() - t0, "pairs": len(train), "held_out": len(held)}
  if n_out:
    report["held_out_retrieval"] = retrieval_accuracy(m, pairs, held)
  return nnx.to_pure_dict(nnx.state(m.vision, nnx.Param)), report
