"""The Monte-Carlo ELBO of log p(answer | prompt, images): LLaDA's `get_log_likelihood`, each request seeded
by a hash of its own ids (`request_seed`), so its score is the same alone or batched."""
from __future__ import annotations

import hashlib
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lladav_jax import batch as batch_lib
from lladav_jax import multimodal
from lladav_jax.batch import ModelInputs
from lladav_jax.data import template
from lladav_jax.inference.model import InferenceModel
from lladav_jax.inference.prompts import bucket_length, bucket_tiles, check_images, check_texts

def mc_masks(answer_len: int, num_samples: int, rng: np.random.Generator, group: int = 16):
  """LLaDA's `forward_process` for `num_samples` rows in groups of `group`: per group a random
  k in [1, T]; row r of the group masks exactly x_r = ((round(k + r * T / group) - 1) mod T) + 1
  positions, chosen uniformly; p_r = x_r / T. Returns bool [N, T] and float [N]."""
  t = answer_len
  masks, ps = [], []
  for g0 in range(0, num_samples, group):
    b = min(group, num_samples - g0)
    k = int(rng.integers(1, t + 1))
    x = np.round(np.linspace(float(k), k + (b - 1) * (t / b), b)).astype(np.int64)
    x = ((x - 1) % t) + 1
    for xi in x:
      m = np.zeros(t, bool)
      m[rng.permutation(t)[:xi]] = True
      masks.append(m)
      ps.append(xi / t)
  return np.stack(masks), np.asarray(ps, np.float32)


def _elbo_terms(graphdef, weights, prompt: ModelInputs, answer, ans_valid, ans_mask, p_mask, mask_id):
  """sum over masked answer positions of CE / p, per MC row [N]. Prompt embeddings computed once;
  `ans_valid` marks the real answer positions (the rest is bucket padding, never attended)."""
  model = nnx.merge(graphdef, weights)
  llm = model.llm
  emb = model.embed(prompt.tokens, prompt.pixels, prompt.merge_idx, prompt.merge_w)  # [1, P, D]
  n, t = ans_mask.shape
  noisy = jnp.where(ans_mask, mask_id, answer[None])  # [N, T]
  x = jnp.concatenate([jnp.broadcast_to(emb, (n,) + emb.shape[1:]), llm.embed_tokens(noisy)], axis=1)
  ans_pos = jnp.sum(prompt.valid) + jnp.arange(t)
  pos = jnp.concatenate([jnp.broadcast_to(prompt.positions, (n, prompt.length)), jnp.broadcast_to(ans_pos, (n, t))], 1)
  # the answer joins the prompt's segment (collate writes one sample a row); its bucket padding is id 0
  ans_seg = jnp.where(ans_valid, jnp.max(prompt.segments), 0)
  seg = jnp.concatenate([jnp.broadcast_to(prompt.segments, (n, prompt.length)), jnp.broadcast_to(ans_seg, (n, t))], 1)
  h = llm(x, pos, seg)
  logp = jax.nn.log_softmax(llm.logits(h[:, prompt.length:]), axis=-1)
  ce = -jnp.take_along_axis(logp, jnp.broadcast_to(answer[None, :, None], (n, t, 1)), axis=-1)[..., 0]
  return jnp.sum(jnp.where(ans_mask, ce, 0.0), axis=-1) / p_mask


_elbo_jit = jax.jit(_elbo_terms, static_argnums=(0, 7))


def elbo_ids(model: InferenceModel, prompt_ids: Sequence[int], images: Sequence, answer_ids: Sequence[int], *,
             num_samples: int = 128, seed: int = 0, group: int = 16, length_multiple: int = 64) -> float:
  """Monte-Carlo ELBO of log p(answer | prompt) for one prompt (ids with image placeholders):
  -(1/N) sum_rows sum_{masked} CE / p, as LLaDA's get_log_likelihood (rows in groups of `group`). `seed`
  draws the masks as given (`elbo` passes each request its own `request_seed`)."""
  t = len(answer_ids)
  if not t:
    return 0.0
  icfg = model.image_cfg
  e = multimodal.expand(list(prompt_ids), multimodal.process_sample_images(list(images), icfg) if images else [],
                        icfg)
  limit = model.cfg.llm.max_position_embeddings
  if len(e.tokens) + t > limit:
    raise ValueError(f"elbo: the expanded prompt ({len(e.tokens)} tokens) and the answer ({t} tokens) are longer "
                     f"than the model's max_position_embeddings={limit}")
  prompt = batch_lib.collate([e], icfg, length=bucket_length(len(e.tokens), length_multiple),
                             tiles=bucket_tiles(e.pixels.shape[0]), left=True)
  prompt = jax.tree.map(jnp.asarray, prompt)
  masks, ps = mc_masks(t, num_samples, np.random.default_rng(seed), group)
  tb = bucket_length(t, 16)
  ans = np.zeros(tb, np.int32)
  ans[:t] = answer_ids
  ans, ans_valid = jnp.asarray(ans), jnp.asarray(np.arange(tb) < t)
  groups = []
  for g0 in range(0, num_samples, group):  # one compiled shape: rows padded to `group`
    m, p = masks[g0:g0 + group], ps[g0:g0 + group]
    rows = m.shape[0]
    mb = np.zeros((group, tb), bool)
    mb[:rows, :t] = m
    pb = np.ones(group, np.float32)
    pb[:rows] = p
    terms = _elbo_jit(model.graphdef, model.state, prompt, ans, ans_valid, jnp.asarray(mb), jnp.asarray(pb),
                      model.cfg.mask_token_id)
    groups.append((terms, rows))  # dispatched asynchronously: one host sync below, not one a group
  total = 0.0
  for terms, rows in jax.device_get(groups):
    total += float(np.sum(terms[:rows]))
  return -total / num_samples


def request_seed(seed: int, prompt_ids: Sequence[int], answer_ids: Sequence[int]) -> int:
  """The ELBO noise seed of one request: a stable hash (sha256, not Python's salted hash) of `seed` and its
  own token ids, never its place in a batch, so its score is the same alone or batched in any order. The
  masks cover answer positions only; the images do not enter."""
  ids = np.asarray([seed, len(prompt_ids), *prompt_ids, *answer_ids], np.int64)  # the length: no ambiguous split
  return int.from_bytes(hashlib.sha256(ids.tobytes()).digest()[:16], "little")


def elbo(model: InferenceModel, prompts: Sequence[str], images: Optional[Sequence[Sequence]], answers: Sequence[str],
         *, num_samples: int = 128, seed: int = 0, group: int = 16, system: Optional[str] = "default") -> list[float]:
  """LLaDA's `get_log_likelihood` for each (prompt, answer): the Monte-Carlo masked-diffusion lower
  bound -E[sum_{masked} CE / p] with LLaDA's stratified mask counts, `num_samples` rows each. Each
  request's masks come from `request_seed(seed, its ids)`: its value does not depend on the batch."""
  tok = model.tokenizer
  if tok is None:
    raise ValueError("the model has no tokenizer; use elbo_ids")
  prompts, answers = check_texts(prompts), check_texts(answers, "answers")
  if len(answers) != len(prompts):
    raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers (one answer a prompt)")
  images = check_images(images, len(prompts))
  sys_msg = template.DEFAULT_SYSTEM if system == "default" else system
  out = []
  for q, ims, a in zip(prompts, images, answers):
    ids, ans = template.inference_prompt_ids(tok, q, len(ims), system=sys_msg), tok.encode(a)
    out.append(elbo_ids(model, ids, ims, ans, num_samples=num_samples, seed=request_seed(seed, ids, ans), group=group))
  return out
