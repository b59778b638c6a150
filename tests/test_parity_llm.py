"""LLM parity: a tiny transformers LlamaForCausalLM (bidirectional via an all-zero 4-D mask), saved with
save_pretrained and loaded through weights.load_state, against our LLaDA language model."""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from lladav_jax import config, sharding, weights
from lladav_jax.model import abstract_model

TOL = 1e-4
MASK_ID = 500


def tiny_llama(num_kv_heads: int, seed: int = 0, num_heads: int = 4, vocab: int = 512, hidden: int = 64,
               layers: int = 2, head_dim: int = 16, inter: int = 128, theta: float = 10000.0) -> LlamaForCausalLM:
  """A random tiny LLaMA whose norms are not all ones (so a swapped norm would show)."""
  torch.manual_seed(seed)
  c = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                  num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, head_dim=head_dim,
                  rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": theta},
                  attention_bias=False, mlp_bias=False, tie_word_embeddings=False, max_position_embeddings=256,
                  initializer_range=0.08, mask_token_id=MASK_ID)
  c._attn_implementation = "eager"
  m = LlamaForCausalLM(c).eval()
  with torch.no_grad():
    for name, p in m.named_parameters():
      if "norm" in name:
        p.copy_(1 + 0.3 * torch.randn_like(p))
  return m


def hf_logits(m, ids: np.ndarray, valid: np.ndarray | None = None, inputs_embeds=None) -> np.ndarray:
  """HF forward with a bidirectional additive mask [B, 1, L, L] (min at padded keys)."""
  b, l = (ids.shape if ids is not None else inputs_embeds.shape[:2])
  mask = torch.zeros(b, 1, l, l)
  if valid is not None:
    mask[torch.from_numpy(~valid)[:, None, None, :].expand(b, 1, l, l)] = torch.finfo(torch.float32).min
  with torch.no_grad():
    if inputs_embeds is not None:
      out = m(inputs_embeds=inputs_embeds, attention_mask=mask)
    else:
      out = m(torch.from_numpy(ids).long(), attention_mask=mask)
  return out.logits.float().numpy()


@functools.partial(jax.jit, static_argnums=0)
def _llm_forward(graphdef, state, ids, segments):
  model = nnx.merge(graphdef, state)
  pos = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
  return model.llm.logits(model.llm(model.llm.embed_tokens(ids), pos, segments))


def our_llm_logits(cfg, state, ids, valid=None):
  graphdef, _ = abstract_model(cfg)
  segments = None if valid is None else jnp.asarray(valid, jnp.int32)
  return np.asarray(_llm_forward(graphdef, state, jnp.asarray(ids), segments))


def to_original_llada(src: str, dst: str, cfg) -> None:
  """Rewrites a LLaMA-named checkpoint with the original LLaDA names and config (model.transformer.*)."""
  os.makedirs(dst)
  d = weights.SafetensorsDir(src)
  inv = {}
  for e in weights.MAPPING:
    if e.group != "llm":
      continue
    for i in range(cfg.llm.num_layers if e.stacked else 1):
      inv[e.name("llada_v", i)] = e.name("llada", i)
  save_file({inv[k]: d.get(k) for k in d.names}, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(src, "config.json")) as f:
    c = json.load(f)
  orig = dict(d_model=c["hidden_size"], n_layers=c["num_hidden_layers"], n_heads=c["num_attention_heads"],
              n_kv_heads=c["num_key_value_heads"], mlp_hidden_size=c["intermediate_size"],
              embedding_size=c["vocab_size"], vocab_size=c["vocab_size"],
              rope_theta=c["rope_parameters"]["rope_theta"], rms_norm_eps=c["rms_norm_eps"],
              max_sequence_length=c["max_position_embeddings"], mask_token_id=MASK_ID, block_type="llama", weight_tying=False,
              init_std=c["initializer_range"])
  with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump(orig, f)


def _cfg_from_dir(path):
  # The LLaMA config has no vision tower: use the tiny one (its weights come from init).
  cfg = weights.load_model_config(path)
  return cfg.replace(vision=config.tiny().vision, dtype="float32", param_dtype="float32")


@pytest.fixture(scope="module")
def mesh1():
  return sharding.make_mesh(devices=jax.devices()[:1])


@pytest.fixture(scope="module", params=[2, 4], ids=["gqa", "mha"])
def llama_dir(request, tmp_path_factory, mesh1):
  """(HF model, its save_pretrained dir, our config, our state loaded from it)."""
  m = tiny_llama(num_kv_heads=request.param)
  d = str(tmp_path_factory.mktemp(f"llama_kv{request.param}"))
  m.save_pretrained(d)
  cfg = _cfg_from_dir(d)
  return m, d, cfg, weights.load_state(d, cfg, mesh1)


def test_llm_logits_match_hf_bidirectional(llama_dir, mesh1):
  m, d, cfg, state = llama_dir
  assert cfg.llm.num_kv_heads == m.config.num_key_value_heads and cfg.llm.rope_theta == 10000.0
  ids = np.random.default_rng(0).integers(0, 512, (2, 13))
  ref = hf_logits(m, ids)
  ours = our_llm_logits(cfg, state, ids)
  diff = np.abs(ours - ref).max()
  print(f"llm parity ({cfg.llm.num_heads}/{cfg.llm.num_kv_heads} heads): max abs diff {diff:.3g}, "
        f"logit std {ref.std():.3g}")
  assert ref.std() > 0.1
  assert diff <= TOL
  # bidirectional: the first position sees a later token (HF's default causal mask would not)
  ids2 = ids.copy()
  ids2[:, -1] = (ids2[:, -1] + 1) % 512
  assert np.abs(our_llm_logits(cfg, state, ids2)[:, 0] - ours[:, 0]).max() > 1e-3


def test_llm_key_padding_matches_hf(llama_dir, mesh1):
  m, d, cfg, state = llama_dir
  ids = np.random.default_rng(1).integers(0, 512, (2, 11))
  valid = np.ones(ids.shape, bool)
  valid[1, 7:] = False
  ref = hf_logits(m, ids, valid)
  ours = our_llm_logits(cfg, state, ids, valid)
  diff = np.abs(ours - ref)[valid].max()
  print(f"llm key-padding parity: max abs diff {diff:.3g}")
  assert diff <= TOL
  # the padded keys really are ignored: changing them leaves the valid positions unchanged
  ids2 = ids.copy()
  ids2[1, 7:] = 3
  np.testing.assert_allclose(our_llm_logits(cfg, state, ids2, valid)[1, :7], ours[1, :7], atol=1e-5)


def test_original_llada_names_give_identical_logits(llama_dir, mesh1, tmp_path):
  m, d, cfg, state = llama_dir
  orig = str(tmp_path / "llada")
  to_original_llada(d, orig, cfg)
  cfg2 = _cfg_from_dir(orig)
  assert cfg2.llm == cfg.llm and cfg2.mask_token_id == MASK_ID
  plan = weights.plan_hf(orig, cfg2)
  assert plan.scheme == "llada" and plan.params["llm.layers.mlp.gate_proj"].names[0] == \
      "model.transformer.blocks.0.ff_proj.weight"
  ids = np.random.default_rng(2).integers(0, 512, (2, 9))
  a = our_llm_logits(cfg, state, ids)
  b = our_llm_logits(cfg2, weights.load_state(orig, cfg2, mesh1), ids)
  np.testing.assert_array_equal(a, b)
  assert np.abs(b - hf_logits(m, ids)).max() <= TOL


def test_llm_only_checkpoint_strict_lists_every_vision_key(llama_dir, mesh1):
  _, d, cfg, _ = llama_dir
  with pytest.raises(weights.CheckpointMismatchError) as e:
    weights.load_state(d, cfg, mesh1, strict=True)
  msg = str(e.value)
  assert "model.mm_projector.2.weight (expected shape [64, 64])" in msg
  assert "model.image_newline (expected shape [64])" in msg
  assert "encoder.layers.1.self_attn.q_proj.weight (expected shape [32, 32])" in msg
  assert "embeddings.patch_embedding.weight (expected shape [32, 3, 14, 14])" in msg
