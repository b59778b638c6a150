"""The jitted train step: noise from fold_in(key, step), gradient accumulation, AdamW update.

    compiled = compile_train_step(setup, loss_cfg, accum=accum, batch_shapes=abstract_batch)
    state, metrics = compiled(state, batch)       # state donated

One `jax.jit(train_step, donate_argnums=0, in_shardings, out_shardings)` over the
(data, fsdp, tensor) mesh, compiled ahead of time. The global batch [B, ...] is viewed as
[A, B/A, ...] micro-batches (row j*A + a goes to micro-batch a, so every device holds an equal
slice of every micro-batch); each micro-batch's loss is already divided by the global B, so the
summed losses and gradients equal the formula on the global batch.
A step whose loss or gradient norm is not finite leaves params and optimizer state unchanged and
reports `finite = 0`; the host loop stops there.
"""
from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lladav_jax import sharding as shd
from lladav_jax.training import loss as loss_lib
from lladav_jax.training import optimizer as opt
from lladav_jax.training.state import Setup

log = logging.getLogger(__name__)

def batch_shardings(mesh, batch_like):
  """Every batch array sharded by rows over (data, fsdp) (a TrainBatch of arrays or shapes)."""
  return jax.tree.map(lambda v: shd.batch_sharding(mesh, len(v.shape)), batch_like)


def abstract_batch(mesh, shapes):
  """`shapes` (batch.shapes(...), global sizes) with the batch shardings attached."""
  return jax.tree.map(lambda v, sh: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sh), shapes,
                      batch_shardings(mesh, shapes))


def _to_micro(x, accum: int):
  b = x.shape[0]
  return jnp.moveaxis(x.reshape((b // accum, accum) + x.shape[1:]), 1, 0)


DROPOUT_STREAM = 0x4C6F5241  # fold_in constant of the LoRA dropout key ("LoRA")
AUX_KEYS = ("masked_tokens", "answer_tokens", "ce_sum", "correct", "valid_tokens", "conversations", "answer_masked",
            "answer_correct")


def make_loss_and_grad(setup: Setup, loss_cfg: loss_lib.LossConfig, *, accum: int):
  """`fn(state, batch) -> (loss, aux sums, grads wrt state["params"])` for one global batch:
  noise from fold_in(key, step) over the whole batch, micro-batches of B / accum rows."""
  graphdef, mesh = setup.graphdef, setup.mesh
  mask_id = setup.model_cfg.mask_token_id

  def constrain(tree):
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, shd.batch_sharding(mesh, x.ndim)), tree)

  lora = setup.model_cfg.lora
  dropout = lora.enabled and lora.dropout > 0

  def loss_fn(params, frozen, mb, t, u, count, drop_key):
    model = nnx.merge(graphdef, nnx.State(opt.merge_params(params, frozen)))
    return loss_lib.diffusion_loss(model, mb, t, u, mask_token_id=mask_id, cfg=loss_cfg, conversations=count,
                                   dropout_key=drop_key)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def fn(state, batch):
    key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    x = batch.inputs
    t, u = loss_lib.draw_noise(key, x.segments, x.positions, loss_cfg.antithetic)
    count = loss_lib.conversations(x.segments)[1]  # over the global batch: the mean's denominator
    # LoRA dropout: its own stream of the step's key (the noise draws stay those of a run without it)
    drop = jax.random.fold_in(key, DROPOUT_STREAM) if dropout else None
    params, frozen = state["params"], state["frozen"]
    if accum == 1:
      (loss, aux), grads = grad_fn(params, frozen, batch, t, u, count, drop)
      return loss, aux, grads
    micro = jax.tree.map(lambda x: _to_micro(x, accum), (batch, t, u))

    def body(carry, xs):
      (mb, tt, uu), i = constrain(xs[0]), xs[1]
      (l_, a_), g_ = grad_fn(params, frozen, mb, tt, uu, count,
                             None if drop is None else jax.random.fold_in(drop, i))
      return jax.tree.map(jnp.add, carry, (l_, a_, g_)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    aux0 = {k: jnp.zeros((), jnp.float32) for k in AUX_KEYS}
    (loss, aux, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), aux0, zeros),
                                         (micro, jnp.arange(accum)))
    return loss, aux, grads

  return fn


def make_train_step(setup: Setup, loss_cfg: loss_lib.LossConfig, *, accum: int):
  tx = setup.tx
  lr_group = next(iter(setup.schedules))
  loss_and_grad = make_loss_and_grad(setup, loss_cfg, accum=accum)

  def train_step(state, batch):
    with jax.named_scope("train_step"):
      loss, aux, grads = loss_and_grad(state, batch)
      params = state["params"]
      gnorm = optax.tree.norm(grads)
      ok = jnp.isfinite(loss) & jnp.isfinite(gnorm)
      updates, new_opt = tx.update(grads, state["opt_state"], params, finite=ok)  # not ok: zero updates, same state
      new_state = {"step": state["step"] + 1, "rng": state["rng"], "params": optax.apply_updates(params, updates),
                   "frozen": state["frozen"], "opt_state": new_opt}
      masked = jnp.maximum(aux["masked_tokens"], 1.0)
      metrics = {"loss": loss, "grad_norm": gnorm, "finite": ok.astype(jnp.float32),
                 "lr": setup.schedules[lr_group](state["step"]),
                 "masked_ce": aux["ce_sum"] / masked, "masked_acc": aux["correct"] / masked,
                 # masked_acc counts the EOS padding and <|eot_id|> too (easy: most of a short answer's labels);
                 # answer_acc only the answer's own tokens (loss.padding_ids left out)
                 "answer_acc": aux["answer_correct"] / jnp.maximum(aux["answer_masked"], 1.0),
                 "answer_masked": aux["answer_masked"],
                 "masked_tokens": aux["masked_tokens"], "answer_tokens": aux["answer_tokens"],
                 "valid_tokens": aux["valid_tokens"], "conversations": aux["conversations"], "param_norm": optax.tree.norm(new_state["params"])}
      for g, s in setup.schedules.items():
        if g != lr_group:
          metrics[f"lr_{g}"] = s(state["step"])
      return new_state, metrics

  return train_step


def jit_train_step(setup: Setup, loss_cfg, *, accum: int, batch_example):
  fn = make_train_step(setup, loss_cfg, accum=accum)
  rep = shd.replicated(setup.mesh)
  return jax.jit(fn, donate_argnums=0, in_shardings=(setup.shardings, batch_shardings(setup.mesh, batch_example)),
                 out_shardings=(setup.shardings, rep))


# Compiler options for a program that is only inspected (memory plans, HLO checks) and never run: the backend
# skips LLVM's optimisations, a large share of a CPU compile; the HLO, buffer assignment and memory stats are the same.
ANALYSIS_ONLY = {"xla_backend_optimization_level": 0}


def compile_train_step(setup: Setup, loss_cfg, *, accum: int, batch_shapes, analysis_only: bool = False):
  """Ahead-of-time compile for one batch shape (`batch.shapes(...)`, global sizes); returns
  (compiled, memory stats dict or None). `analysis_only`: the program will not be run (ANALYSIS_ONLY)."""
  abs_batch = abstract_batch(setup.mesh, batch_shapes)
  jitted = jit_train_step(setup, loss_cfg, accum=accum, batch_example=abs_batch)
  with jax.set_mesh(setup.mesh):
    compiled = jitted.lower(setup.abstract, abs_batch).compile(ANALYSIS_ONLY if analysis_only else None)
  return compiled, memory_stats(compiled)


def memory_stats(compiled) -> dict | None:
  try:
    m = compiled.memory_analysis()
  except Exception:  # not every backend implements it
    return None
  if m is None:
    return None
  keys = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
          "generated_code_size_in_bytes")
  out = {k: int(getattr(m, k, 0) or 0) for k in keys}
  out["peak_estimate_bytes"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"]
                                - out["alias_size_in_bytes"] + out["temp_size_in_bytes"])
  return out
