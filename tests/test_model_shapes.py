"""The released 8B shape: abstract (no allocation) parameter counts per module, the HF names and shapes the
mapping table expects for it, and config.json parsing of LLaDA-V and original LLaDA configs."""
import dataclasses
import math

import jax
import numpy as np
import pytest
from flax import nnx

from lladav_jax import config, weights
from lladav_jax.model import abstract_model, init_sharded


@pytest.fixture(scope="module")
def abstract_8b():
  return weights.flat_params(abstract_model(config.llada_v_8b())[1])


def count(flat, prefix):
  return sum(math.prod(v.shape) for k, v in flat.items() if k.startswith(prefix))


def test_8b_preset_validates_and_has_the_released_geometry():
  cfg = config.llada_v_8b()
  cfg.validate()  # 384 px tiles of 14 px patches: not a multiple, and valid
  assert (cfg.vision.image_size, cfg.vision.patch_size, cfg.vision.grid, cfg.vision.tokens_per_tile) == (384, 14, 27, 729)
  assert cfg.vision.num_layers == 26  # of siglip2-so400m's 27


def test_preset_validation_rejects_a_tile_smaller_than_a_patch():
  cfg = config.tiny()
  with pytest.raises(ValueError, match="vision.patch_size=400 must be between 1 and vision.image_size=384"):
    cfg.replace(vision=dataclasses.replace(cfg.vision, patch_size=400)).validate()


def test_8b_parameter_counts_without_allocating(abstract_8b):
  assert all(isinstance(v, jax.ShapeDtypeStruct) for v in abstract_8b.values())
  # the released parts, counted from siglip2-so400m's and LLaDA-8B's shapes
  d, f, dv, fv = 4096, 12288, 1152, 4304
  vision_layer = 4 * (dv * dv + dv) + 2 * dv * fv + fv + dv + 4 * dv
  assert count(abstract_8b, "vision.") == 26 * vision_layer + 14 * 14 * 3 * dv + dv + 729 * dv
  assert count(abstract_8b, "llm.") == 2 * 126464 * d + 32 * (4 * d * d + 3 * d * f + 2 * d) + d
  assert count(abstract_8b, "projector.") == dv * d + d + d * d + d
  assert count(abstract_8b, "llm.") == 8_015_581_184
  assert count(abstract_8b, "vision.") == 397_745_440
  assert count(abstract_8b, "projector.") == 21_504_000
  assert count(abstract_8b, "image_newline") == 4096
  assert abstract_8b["llm.layers.attn.q_proj"].shape == (32, 4096, 32, 128)
  assert abstract_8b["vision.patch_kernel"].shape == (14 * 14 * 3, 1152)


def test_8b_hf_names_and_shapes():
  shapes = weights.expected_hf_shapes(config.llada_v_8b())
  v = weights.VISION_PREFIX
  assert shapes["model.layers.31.self_attn.q_proj.weight"] == (4096, 4096)
  assert shapes["model.layers.0.mlp.gate_proj.weight"] == (12288, 4096)
  assert shapes["model.layers.0.mlp.down_proj.weight"] == (4096, 12288)
  assert shapes["lm_head.weight"] == shapes["model.embed_tokens.weight"] == (126464, 4096)
  assert shapes[v + "embeddings.patch_embedding.weight"] == (1152, 3, 14, 14)
  assert shapes[v + "embeddings.position_embedding.weight"] == (729, 1152)
  assert shapes[v + "encoder.layers.25.self_attn.out_proj.weight"] == (1152, 1152)
  assert v + "encoder.layers.26.mlp.fc1.weight" not in shapes
  assert shapes["model.mm_projector.0.weight"] == (4096, 1152)
  assert shapes["model.image_newline"] == (4096,)
  llm = {k: s for k, s in shapes.items() if not k.startswith(("model.vision_tower", "model.mm_projector", "model.image"))}
  assert len(llm) == 3 + 32 * 9
  # the released LLaDA index: total_size 16,031,162,368 bytes of bf16
  assert sum(2 * math.prod(s) for s in llm.values()) == 16_031_162_368
  orig = weights.expected_hf_shapes(config.llada_v_8b(), scheme="llada")
  assert orig["model.transformer.blocks.3.ff_proj.weight"] == shapes["model.layers.3.mlp.gate_proj.weight"]
  assert orig["model.transformer.ff_out.weight"] == (126464, 4096)
  assert weights.is_extra(v + "encoder.layers.26.mlp.fc1.weight", config.llada_v_8b())
  assert weights.is_extra(v + "post_layernorm.bias", config.llada_v_8b())
  assert not weights.is_extra(v + "encoder.layers.25.mlp.fc1.weight", config.llada_v_8b())


@pytest.mark.parametrize("transform,shape", [("copy", (5, 3)), ("linear", (6, 4)), ("qkv", (8, 2, 3)),
                                             ("out", (2, 3, 8)), ("heads_bias", (2, 3)), ("patch", (14 * 14 * 3, 5))])
def test_transforms_invert(transform, shape):
  e = weights.Entry("x", "x", transform)
  ours = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
  hf = weights.to_hf(e, ours)
  assert hf.shape == weights.hf_shape(e, shape)
  np.testing.assert_array_equal(weights.to_ours(e, hf, shape), ours)


def test_patch_transform_is_the_conv():
  """Our patch matmul over (py, px, c)-flattened patches equals the HF Conv2d [D, 3, p, p] on one patch."""
  rng = np.random.default_rng(1)
  conv = rng.standard_normal((5, 3, 14, 14)).astype(np.float32)
  e = weights.ENTRIES["vision.patch_kernel"]
  kernel = weights.to_ours(e, conv, (14 * 14 * 3, 5))
  patch_hwc = rng.standard_normal((14, 14, 3)).astype(np.float32)
  np.testing.assert_allclose(patch_hwc.reshape(-1) @ kernel, np.einsum("dcyx,yxc->d", conv, patch_hwc), rtol=1e-5)


def test_config_from_hf_json():
  llada_v = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                 intermediate_size=12288, vocab_size=126464, rope_theta=500000.0, rms_norm_eps=1e-5,
                 max_position_embeddings=16384, mm_hidden_size=1152,
                 mm_vision_tower="model/siglip2-so400m-patch14-384")
  assert weights.model_config_from_hf(llada_v) == config.llada_v_8b()
  siglip = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                patch_size=14, image_size=384, layer_norm_eps=1e-6)
  assert weights.model_config_from_hf(llada_v, siglip) == config.llada_v_8b()
  original = dict(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, mlp_hidden_size=12288, vocab_size=126464,
                  embedding_size=126464, rope_theta=500000.0, rms_norm_eps=1e-5, max_sequence_length=4096,
                  mask_token_id=126336)
  c = weights.model_config_from_hf(original)
  assert c.llm == config.llada_v_8b().llm.__class__(**{**config.llada_v_8b().llm.__dict__,
                                                        "max_position_embeddings": 4096})
  assert c.mask_token_id == 126336
  with pytest.raises(ValueError, match="vision_json"):
    weights.model_config_from_hf(dict(llada_v, mm_hidden_size=768))


@pytest.mark.slow  # ~20 s on 2 cores; the CI budget
def test_initializer_range_sets_the_weight_std():
  """LLMConfig.initializer_range (HF initializer_range / LLaDA init_std) is the std of every LLM weight."""
  for std in (0.02, 0.06):
    cfg = config.tiny()
    cfg = cfg.replace(llm=dataclasses.replace(cfg.llm, initializer_range=std))
    flat = weights.flat_params(init_sharded(cfg)[1])
    for name in ("llm.embed", "llm.layers.attn.q_proj", "llm.layers.mlp.down_proj", "llm.lm_head"):
      assert float(np.std(np.asarray(flat[name]))) == pytest.approx(std, rel=0.1), (name, std)
  hf = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=256,
            initializer_range=0.05, mm_hidden_size=1152)
  assert weights.model_config_from_hf(hf).llm.initializer_range == 0.05
  llada = dict(d_model=64, n_layers=2, n_heads=4, mlp_hidden_size=128, vocab_size=256, init_std=0.03)
  assert weights.model_config_from_hf(llada).llm.initializer_range == 0.03


def test_projector_init_is_torch_linear_default():
  """The original creates the projector with nn.Linear: weight and bias ~ U(+-1/sqrt(fan_in))."""
  cfg = config.tiny()
  proj = nnx.merge(*init_sharded(cfg)).projector
  for w, b, fan_in in ((proj.fc1, proj.fc1_bias, cfg.vision.hidden_size), (proj.fc2, proj.fc2_bias, cfg.llm.hidden_size)):
    bound = fan_in ** -0.5
    for x in (np.asarray(w[...]), np.asarray(b[...])):
      assert np.abs(x).max() <= bound and np.abs(x).max() > 0.9 * bound
    np.testing.assert_allclose(np.asarray(w[...]).std(), bound / math.sqrt(3), rtol=0.1)
