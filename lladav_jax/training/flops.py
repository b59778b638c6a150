"""Model FLOPs of one training step (for TFLOP/s and MFU), and peak FLOP/s per device kind.

Counted on the static shapes the step computes (every position of [B, L], every tile of
[B, T]), as MaxText does; rematerialisation is not counted (MFU, not HFU).

Per matmul weight of shape [m, n] applied to one token: 2mn forward, 2mn backward to the input
(needed when anything upstream trains), 2mn backward to the weight (when the weight trains).
  LLM, per token:  q/k/v/o + gate/up/down + lm_head (the embedding lookup is not a matmul);
                   attention is bidirectional, so QK^T and AV cost the full 2 * 2 * L^2 * N * H per
                   layer and sequence forward (no causal halving). With the batch's segment ids
                   (`attention_pairs(segments)`: packed rows, padding) a row counts the (query, key)
                   pairs its segments need, sum_s len_s^2, instead of L^2 (padding none); the matmuls
                   still count every position of [B, L].
  Vision, per tile of P patches: patch embedding, q/k/v/o, fc1/fc2 per patch, attention
                   2 * 2 * P^2 * D_v per layer; projector fc1/fc2 per tile token.
Frozen parts in front of every trainable part (the vision tower in stage 1) cost forward only.
"""
from __future__ import annotations

import time

import jax
import numpy as np

from lladav_jax.config import ModelConfig

# bf16 dense peak per device (no sparsity).
PEAK_FLOPS = {
    "h100": 989e12, "h200": 989e12, "gh200": 989e12, "a100": 312e12, "l4": 121e12,
    "tpu v5p": 459e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12, "tpu v4": 275e12, "tpu v6 lite": 918e12,
    "tpu v6e": 918e12,
}


def peak_flops(device_kind: str) -> float | None:
  k = device_kind.lower()
  for name in sorted(PEAK_FLOPS, key=len, reverse=True):
    if name in k:
      return PEAK_FLOPS[name]
  return None


def measure_matmul_flops(n: int = 1024, dtype: str = "float32", repeats: int = 5, clock=time.perf_counter) -> float:
  """Best-of-N FLOP/s of a jitted n^3 matmul on the default device (the CPU 'peak'); per second of `clock`
  (`time.process_time`: per CPU-second of this process, the figure to compare on a shared machine)."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)  # random data: zeros / ones can run faster on a GPU
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = clock()
    f(a, a).block_until_ready()
    best = min(best, clock() - t)
  return 2 * n ** 3 / best


def _factor(trains_weight: bool, needs_input_grad: bool) -> int:
  return 2 + (2 if needs_input_grad else 0) + (2 if trains_weight else 0)


def attention_pairs(segments) -> int:
  """The (query, key) pairs the attention of a host batch's rows needs: sum over rows and segments of
  len^2 (segment ids int [B, L], 0 = padding, not counted; ids need not be contiguous). NumPy, on host."""
  seg = np.asarray(segments)
  if seg.ndim != 2:
    raise ValueError(f"segment ids must be [B, L], got shape {seg.shape}")
  b, l = seg.shape
  ids = seg.astype(np.int64) + np.arange(b, dtype=np.int64)[:, None] * (l + 1)
  counts = np.bincount(ids.ravel(), minlength=b * (l + 1)).reshape(b, l + 1)[:, 1:]
  return int((counts.astype(np.int64) ** 2).sum())


def step_flops(cfg: ModelConfig, *, batch: int, seq_len: int, tiles: int, trainable=("vision", "projector", "llm"),
               attention_pairs: int | None = None) -> dict:
  """Model FLOPs of one training step over a global batch [batch, seq_len] with `tiles` tiles per
  sample. `attention_pairs`: the (query, key) pairs the LLM's attention needs over the global batch
  (`attention_pairs(segments)`); None: batch * seq_len^2 (every row one full-length segment).
  Returns {"llm", "vision", "projector", "total"}."""
  tr = set(trainable)
  llm, v = cfg.llm, cfg.vision
  # LLM: the gradient must flow through it whenever anything trains (it sits on top).
  d, n, k, h, f = llm.hidden_size, llm.num_heads, llm.num_kv_heads, llm.head_dim, llm.intermediate_size
  per_layer = d * n * h + 2 * d * k * h + n * h * d + 3 * d * f
  tokens = batch * seq_len
  llm_w = "llm" in tr
  any_below = bool(tr & {"vision", "projector"})
  fac = _factor(llm_w, any_below or llm_w)
  llm_mm = fac * (llm.num_layers * per_layer + d * llm.vocab_size) * tokens
  # attention: fwd 2*L^2*N*H (scores) + 2*L^2*N*H (values) per layer per sequence; same factors
  # with activation grads (the attention has no weights: bwd = 2x fwd whenever a grad passes).
  att_fac = 2 + (4 if (any_below or llm_w) else 0)
  pairs = batch * seq_len * seq_len if attention_pairs is None else attention_pairs
  llm_att = att_fac * 2 * pairs * n * h * llm.num_layers
  # Projector
  dv, p = v.hidden_size, v.tokens_per_tile
  n_tiles = batch * tiles
  proj_fac = _factor("projector" in tr, "vision" in tr)
  proj = proj_fac * (dv * d + d * d) * p * n_tiles
  # Vision tower
  vis_fac = _factor("vision" in tr, "vision" in tr)
  vis_layer = 4 * dv * dv + 2 * dv * v.intermediate_size
  patch = v.patch_size * v.patch_size * 3 * dv
  vis_mm = vis_fac * (v.num_layers * vis_layer + patch) * p * n_tiles
  vis_att = (2 + (4 if "vision" in tr else 0)) * 2 * p * p * dv * v.num_layers * n_tiles
  out = {"llm": float(llm_mm + llm_att), "vision": float(vis_mm + vis_att), "projector": float(proj)}
  out["total"] = sum(out.values())
  return out


def count_params(cfg: ModelConfig) -> dict:
  llm, v = cfg.llm, cfg.vision
  d, n, k, h, f = llm.hidden_size, llm.num_heads, llm.num_kv_heads, llm.head_dim, llm.intermediate_size
  per_layer = d * n * h + 2 * d * k * h + n * h * d + 3 * d * f + 2 * d
  llm_p = llm.num_layers * per_layer + 2 * d * llm.vocab_size + d
  dv = v.hidden_size
  vis_layer = 4 * dv * dv + 4 * dv + 2 * dv * v.intermediate_size + v.intermediate_size + dv + 4 * dv
  vis_p = v.num_layers * vis_layer + v.patch_size ** 2 * 3 * dv + dv + v.tokens_per_tile * dv
  proj = dv * d + d + d * d + d
  return {"llm": llm_p, "vision": vis_p, "projector": proj, "image_newline": d,
          "total": llm_p + vis_p + proj + d}
