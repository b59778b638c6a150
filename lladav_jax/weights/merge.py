"""LoRA merge for export: W + (alpha / rank) A B in float32, cast back to W's dtype; the adapters dropped and
the config's `lora` reset, so an exported model is a plain LLaDA-V (loadable anywhere, HF layout included)."""
from __future__ import annotations

import jax.numpy as jnp

from lladav_jax.config import LoraConfig, ModelConfig
from lladav_jax.model.lora import delta_weight
from lladav_jax.weights.names import flat_params


def adapted(name: str) -> tuple[str, str] | None:
  """("llm.layers.attn.q_proj", "a" | "b") for an adapter parameter's flat name, else None."""
  parts = name.split(".")
  if len(parts) < 2 or not parts[-2].endswith("_lora") or parts[-1] not in ("a", "b"):
    return None
  return ".".join(parts[:-2] + [parts[-2][:-len("_lora")] + "_proj"]), parts[-1]


def merge_lora(cfg: ModelConfig, params) -> tuple[ModelConfig, dict]:
  """(the config without adapters, {flat name: array}) of `params` (nnx.State or nested dict) with every
  adapter folded into its weight; a config without LoRA returns the parameters unchanged."""
  flat = flat_params(params)
  if not cfg.lora.enabled:
    return cfg, flat
  pairs: dict[str, dict[str, object]] = {}
  out = {}
  for k, v in flat.items():
    a = adapted(k)
    if a is None:
      out[k] = v
    else:
      pairs.setdefault(a[0], {})[a[1]] = v
  for w_name, ab in pairs.items():
    w = out[w_name]
    n_lead = 1 if w_name.startswith("llm.layers.") else 0  # the stacked layers' leading axis
    out[w_name] = (w.astype(jnp.float32) + delta_weight(ab["a"], ab["b"], cfg.lora.scale, n_lead)).astype(w.dtype)
  return cfg.replace(lora=LoraConfig()), out
