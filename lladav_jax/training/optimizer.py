"""AdamW with the original's schedule, parameter groups, and frozen parameters without state.

HF Trainer settings of every LLaDA-V stage (docs/ORIGINAL.md, "Training stages"): AdamW (0.9, 0.999, 1e-8),
weight decay 0, global-norm clipping at 1.0, linear warmup over ceil(0.03 * steps) then cosine to
0 (`get_cosine_schedule_with_warmup`: the first update uses lr 0, as optax's count 0 does).

Parameter groups follow LLaVA-OneVision's `mm_tunable_parts` (train.py) and LLaVATrainer's LR map:
  vision     `vision/...`                      (mm_vision_tower; lr `mm_vision_tower_lr` = 2e-6)
  projector  `projector/...`                   (mm_mlp_adapter)
  llm        `llm/...` and `image_newline`      (mm_language_model: every parameter whose name has
                                                 neither "vision_tower" nor "mm_projector", so
                                                 `model.image_newline` trains with the LLM)
Stage 1 (`mm_tunable_parts=mm_mlp_adapter`) trains the projector only; image_newline stays at its
init (it is unused there anyway: stage 1 is `square` / `flat`, no newline).
  lora       `llm/layers/*/<target>_lora/{a,b}`  the low-rank adapters (model.lora); the LLM's base
                                                 weights stay frozen under them

Frozen parameters are split off before the optimizer sees anything: gradients are taken only with
respect to the trainable tree and the optimizer state covers only it.

A step whose loss or gradient is not finite is skipped inside the optimizer (`adamw`'s `finite` argument):
moments, count and parameters stay exactly as they were.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

GROUPS = ("vision", "projector", "llm", "lora")
FULL = ("vision", "projector", "llm")  # every base parameter: the stages' default
SCHEDULES = ("cosine", "linear", "constant")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """The `optim` section of the training config; the defaults are the HF Trainer settings above."""
  trainable: tuple[str, ...] = FULL
  lr: float = 1e-5
  group_lr: Mapping[str, float] = dataclasses.field(default_factory=dict)  # peak LR by group (others: lr)
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.0
  clip_norm: float = 1.0  # 0: no clipping
  warmup_ratio: float = 0.03
  schedule: str = "cosine"  # one of SCHEDULES


def config_problems(ocfg: OptimConfig) -> list[str]:
  """Every bad field of `ocfg`, each named as in the training config."""
  problems = []
  if set(ocfg.trainable) - set(GROUPS) or not ocfg.trainable:
    problems.append(f"optim.trainable={list(ocfg.trainable)} must be a non-empty subset of {list(GROUPS)}")
  bad = set(ocfg.group_lr) - set(GROUPS)
  if bad:
    problems.append(f"optim.group_lr has unknown groups {sorted(bad)}; known: {list(GROUPS)}")
  if ocfg.schedule not in SCHEDULES:
    problems.append(f"optim.schedule={ocfg.schedule!r} must be 'cosine', 'linear' or 'constant'")
  return problems


def group_of(path: Sequence[str]) -> str:
  if any(str(p).endswith("_lora") for p in path):
    return "lora"
  head = str(path[0])
  if head == "vision":
    return "vision"
  if head == "projector":
    return "projector"
  if head in ("llm", "image_newline"):
    return "llm"
  raise ValueError(f"parameter {'/'.join(map(str, path))} belongs to no parameter group")


def split_params(params: Mapping, trainable: Sequence[str]):
  """Nested param dict -> (trainable, frozen) nested dicts by group."""
  bad = set(trainable) - set(GROUPS)
  if bad:
    raise ValueError(f"optim.trainable has unknown groups {sorted(bad)}; known: {list(GROUPS)}")
  flat = traverse_util.flatten_dict(dict(params))
  tr = {k: v for k, v in flat.items() if group_of(k) in trainable}
  fr = {k: v for k, v in flat.items() if group_of(k) not in trainable}
  return traverse_util.unflatten_dict(tr) if tr else {}, traverse_util.unflatten_dict(fr) if fr else {}


def merge_params(trainable: Mapping, frozen: Mapping) -> dict:
  flat = traverse_util.flatten_dict(dict(trainable)) if trainable else {}
  flat.update(traverse_util.flatten_dict(dict(frozen)) if frozen else {})
  return traverse_util.unflatten_dict(flat)


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
  return math.ceil(total_steps * warmup_ratio)  # HF TrainingArguments.get_warmup_steps


def schedule(peak_lr: float, total_steps: int, warmup_ratio: float, kind: str = "cosine"):
  w = warmup_steps(total_steps, warmup_ratio)
  if kind == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, peak_lr, w, max(total_steps, w + 1), end_value=0.0)
  if kind == "linear":
    return optax.join_schedules([optax.linear_schedule(0.0, peak_lr, w),
                                 optax.linear_schedule(peak_lr, 0.0, max(total_steps - w, 1))], [w])
  if kind == "constant":
    return optax.join_schedules([optax.linear_schedule(0.0, peak_lr, w), optax.constant_schedule(peak_lr)], [w])
  raise ValueError(f"optim.schedule={kind!r} must be 'cosine', 'linear' or 'constant'")


def group_lrs(ocfg: OptimConfig) -> dict[str, float]:
  return {g: float(ocfg.group_lr.get(g, ocfg.lr)) for g in GROUPS}


_NO_DECAY = re.compile(r"bias|norm|^ln\d|_scale$")


def decay_mask(params):
  """True where weight decay applies: as the HF Trainer, not to biases and norm weights."""
  return jax.tree_util.tree_map_with_path(lambda path, _: not _NO_DECAY.search(str(path[-1].key)), params)


def make(ocfg: OptimConfig, total_steps: int, trainable_params: Mapping):
  """(optax transform over the trainable tree, {group: schedule}) from the `optim` config.

  Groups sharing a learning rate share one AdamW (one label); the schedules dict has one entry per
  distinct learning rate, keyed by the first such group in (llm, lora, projector, vision) order."""
  problems = config_problems(ocfg)
  if problems:
    raise ValueError("; ".join(problems))
  lrs = group_lrs(ocfg)
  flat = traverse_util.flatten_dict(dict(trainable_params))
  present = [g for g in ("llm", "lora", "projector", "vision") if any(group_of(k) == g for k in flat)]
  canon = {}
  for g in present:
    canon[g] = next(h for h in present if lrs[h] == lrs[g])
  labels_used = sorted(set(canon.values()), key=present.index)
  scheds = {g: schedule(lrs[g], total_steps, ocfg.warmup_ratio, ocfg.schedule) for g in labels_used}

  def group_adamw(g):
    return adamw(scheds[g], b1=ocfg.b1, b2=ocfg.b2, eps=ocfg.eps, weight_decay=ocfg.weight_decay)

  if len(labels_used) == 1:
    inner = group_adamw(labels_used[0])
  else:
    labels = traverse_util.unflatten_dict({k: canon[group_of(k)] for k in flat})
    inner = optax.multi_transform({g: group_adamw(g) for g in labels_used}, labels)
  chain = [inner] if not ocfg.clip_norm else [optax.clip_by_global_norm(ocfg.clip_norm), inner]
  return optax.chain(*chain), scheds


class AdamWState(NamedTuple):
  count: jax.Array  # applied (finite) steps
  mu: Any
  nu: Any


def adamw(learning_rate, *, b1: float, b2: float, eps: float, weight_decay: float):
  """`optax.adamw(learning_rate, b1, b2, eps, weight_decay=..., mask=decay_mask)`, the same arithmetic in the
  same order, with the non-finite guard inside: `update(..., finite=False)` keeps the moments and count and
  returns zero updates. A `jnp.where(finite, new, old)` over the state after the fact would keep old and new
  moments alive together and split each parameter's update into several passes over memory; here it is one
  (the guard only changes scalars, and the gradient is zeroed where it is read)."""

  def init(params):
    zeros = lambda: jax.tree.map(jnp.zeros_like, params)
    return AdamWState(jnp.zeros([], jnp.int32), zeros(), zeros())

  def update(grads, state, params, *, finite=True, **_):
    ok = jnp.asarray(finite, bool)
    # a skipped step weighs the old moment by 1 and the (zeroed) gradient by 0: the moment exactly
    c1, d1 = jnp.where(ok, 1 - b1, 0.0), jnp.where(ok, b1, 1.0)
    c2, d2 = jnp.where(ok, 1 - b2, 0.0), jnp.where(ok, b2, 1.0)
    count_inc = optax.safe_increment(state.count)  # the bias correction's count, finite on a skipped first step
    step_size = jnp.where(ok, -learning_rate(state.count), 0.0)
    decay = decay_mask(params)

    def one(g, m, v, p, wd):
      g = jnp.where(ok, g, jnp.zeros_like(g))
      m = c1.astype(g.dtype) * g + d1.astype(m.dtype) * m
      v = c2.astype(g.dtype) * g ** 2 + d2.astype(v.dtype) * v
      m_hat = m / (1 - b1 ** count_inc).astype(m.dtype)
      v_hat = v / (1 - b2 ** count_inc).astype(v.dtype)
      u = m_hat / (jnp.sqrt(v_hat) + eps)  # optax's eps_root is 0
      if wd and weight_decay:
        u = u + weight_decay * p
      return step_size.astype(u.dtype) * u, m, v

    out = jax.tree.map(one, grads, state.mu, state.nu, params, decay)
    pick = lambda i: jax.tree.map(lambda _, o: o[i], grads, out)
    return pick(0), AdamWState(jnp.where(ok, count_inc, state.count), pick(1), pick(2))

  return optax.GradientTransformationExtraArgs(init, update)
