"""Stage 0: LLaDA-8B-Instruct (original `model.transformer.*` names, or LLaMA names) + a pretrained SigLIP
(`SiglipModel` with both towers, or `SiglipVisionModel`, saved by transformers) assembled by
`convert hf-to-orbax LLM DST --vision-tower SIGLIP` into the checkpoint that stage 1 starts from.

Tiny widths at the released geometry (384 px tiles, 14 px patches, vocabulary 126464 with the real
special ids); the LLM in bf16 as released, the tower in float32."""
import json
import os
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import SiglipConfig, SiglipModel

from configs import finetune
from lladav_jax import LLaDAV, convert, sharding, weights
from lladav_jax.model.vision import normalize_pixels
from lladav_jax.training import run_config, state as state_lib, step as step_lib, synthetic
from tests.released import VOCAB, demo_data_vocab
from tests.test_parity_lladav import VISION, tiny_siglip
from tests.test_parity_llm import tiny_llama

KEEP = 2  # vision layers kept; the SigLIP checkpoints have one more
SEED = 5


def _llm_tensors(llama) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().astype(ml_dtypes.bfloat16) for k, v in llama.state_dict().items()}


def _write_llm(path, tensors, config_json, tokenizer_from=None):
  os.makedirs(path)
  save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config_json, f)
  if tokenizer_from is None:
    demo_data_vocab(path)  # tokenizer.json + tokenizer_config.json (chat template) + special_tokens_map.json
  else:
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
      shutil.copy(os.path.join(tokenizer_from, f), path)
  with open(os.path.join(path, "generation_config.json"), "w") as f:
    json.dump({"bos_token_id": 126080, "eos_token_id": 126081}, f)
  return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  root = tmp_path_factory.mktemp("stage0")
  llama = tiny_llama(num_kv_heads=2, seed=3, vocab=VOCAB)
  c = llama.config
  llm = _llm_tensors(llama)
  # LLaDA-8B-Instruct as published: OLMo-style names and config keys
  to_orig = {e.name("llada_v", i): e.name("llada", i) for e in weights.MAPPING if e.group == "llm"
             for i in range(c.num_hidden_layers if e.stacked else 1)}
  olmo = _write_llm(str(root / "LLaDA-8B-Instruct"), {to_orig[k]: v for k, v in llm.items()}, dict(
      architectures=["LLaDAModelLM"], d_model=c.hidden_size, n_heads=c.num_attention_heads,
      n_kv_heads=c.num_key_value_heads, n_layers=c.num_hidden_layers, mlp_hidden_size=c.intermediate_size,
      embedding_size=VOCAB, vocab_size=VOCAB, rope_theta=10000.0, rms_norm_eps=c.rms_norm_eps,
      max_sequence_length=4096, mask_token_id=126336, eos_token_id=126081, pad_token_id=126081,
      block_type="llama", weight_tying=False, torch_dtype="bfloat16"))
  llama_dir = _write_llm(str(root / "LLaDA-8B-Instruct-HF"), llm, dict(c.to_dict(), mask_token_id=126336),
                         tokenizer_from=olmo)
  # The same pretrained tower saved both ways: SiglipVisionModel, and inside a SiglipModel with a text tower.
  vis = tiny_siglip(KEEP + 1, seed=4)
  vis.save_pretrained(str(root / "siglip-vision"))
  full = SiglipModel(SiglipConfig(
      text_config=dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, max_position_embeddings=16, bos_token_id=1, eos_token_id=2,
                       pad_token_id=0),
      vision_config=dict(VISION, num_hidden_layers=KEEP + 1)))
  full.vision_model.load_state_dict({k.removeprefix("vision_model."): v for k, v in vis.state_dict().items()})
  full.save_pretrained(str(root / "siglip2-so400m-patch14-384"))
  return dict(root=root, olmo=olmo, llama=llama_dir, vision=vis, siglip_vision=str(root / "siglip-vision"),
              siglip=str(root / "siglip2-so400m-patch14-384"))


@pytest.fixture(scope="module")
def assembled(sources):
  dst = str(sources["root"] / "stage0")
  assert convert.main(["hf-to-orbax", sources["olmo"], dst, "--vision-tower", sources["siglip"],
                       "--seed", str(SEED)]) == 0
  return dst


def _orbax_params(path):
  return {p: weights.read_orbax_param(path, p) for p in weights.orbax_metadata(path)}


def test_vision_tensors_are_the_siglips_bit_for_bit(sources, assembled):
  cfg = weights.load_model_config(assembled)
  v = cfg.vision
  assert (v.num_layers, v.image_size, v.patch_size, v.hidden_size, v.tokens_per_tile) == (KEEP, 384, 14, 32, 729)
  sd = {k.removeprefix("vision_model."): t.detach().numpy() for k, t in sources["vision"].state_dict().items()}
  params = _orbax_params(assembled)
  for e in weights.MAPPING:
    if e.group != "vision":
      continue
    layers = range(KEEP) if e.stacked else [None]
    for i in layers:
      ours = weights.to_hf(e, params[e.param][i] if e.stacked else params[e.param])
      want = sd[e.name("llada_v", i)[len(weights.VISION_PREFIX):]]
      assert ours.dtype == want.dtype == np.float32 and ours.tobytes() == want.tobytes(), (e.param, i)
  # what the original drops (last layer, head) or leaves unused (post_layernorm) is kept as extras, verbatim
  extras = load_file(os.path.join(assembled, weights.EXTRAS_FILE))
  vp = weights.VISION_PREFIX
  assert {vp + "post_layernorm.weight", vp + f"encoder.layers.{KEEP}.mlp.fc1.weight", vp + "head.probe"} <= set(extras)
  for k, x in extras.items():
    assert x.tobytes() == sd[k[len(vp):]].tobytes(), k
  man = weights.read_manifest(assembled)
  assert not [t for t in man["tensors"] if "text_model" in t["name"] or "logit" in t["name"]]
  assert man["vision_tower"] == os.path.abspath(sources["siglip"]) and man["seed"] == SEED
  assert man["initialized_groups"] == ["image_newline", "projector"]

  # LLaMA-named LLM + SiglipVisionModel: the same checkpoint, parameter for parameter
  other = convert.hf_to_orbax(sources["llama"], str(sources["root"] / "stage0_llama"),
                              vision_tower=sources["siglip_vision"], seed=SEED)
  again = _orbax_params(other)
  assert sorted(again) == sorted(params)
  for p in params:
    assert again[p].dtype == params[p].dtype and again[p].tobytes() == params[p].tobytes(), p
  assert params["llm.layers.attn.q_proj"].dtype == ml_dtypes.bfloat16  # the LLM stays at its source dtype


@pytest.fixture(scope="module")
def model(assembled):
  return LLaDAV.from_pretrained(assembled, dtype="float32")


def test_vision_features_equal_transformers_hidden_states(sources, model):
  tiles = np.random.default_rng(0).integers(0, 256, (2, 384, 384, 3), np.uint8)
  px = normalize_pixels(tiles, model.cfg.vision)
  mod = model.module
  ours = np.asarray(jax.jit(lambda x: mod.vision(x))(px))
  with torch.no_grad():
    out = sources["vision"](pixel_values=torch.from_numpy(np.array(px)).permute(0, 3, 1, 2),
                            output_hidden_states=True)
  ref = out.hidden_states[-2].numpy()
  assert ours.shape == ref.shape == (2, 729, 32) and ref.std() > 0.1
  np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
  assert np.abs(ours - out.hidden_states[-1].numpy()).max() > 1e-2  # the last layer really is dropped


def test_projector_and_newline_follow_the_originals_init(assembled):
  p = _orbax_params(assembled)
  for name, fan_in in (("fc1", 32), ("fc1_bias", 32), ("fc2", 64), ("fc2_bias", 64)):
    x = p[f"projector.{name}"].astype(np.float64).ravel()
    bound = fan_in ** -0.5  # nn.Linear's default: kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert np.abs(x).max() <= bound and np.abs(x).max() > 0.85 * bound, name
    if x.size > 1000:  # the moments of U(-b, b): mean 0, variance b^2 / 3
      assert abs(x.mean()) < 4 * bound / np.sqrt(3 * x.size), name
      np.testing.assert_allclose(x.var(), bound ** 2 / 3, rtol=0.1, err_msg=name)
  # image_newline = randn(D) / sqrt(D): 64 values here, and the same init at the released width
  nl = p["image_newline"].astype(np.float64)
  np.testing.assert_allclose(nl.std(), 64 ** -0.5, rtol=0.35)
  cfg = weights.load_model_config(assembled)
  np.testing.assert_array_equal(nl, weights.init_params(cfg, ["image_newline"], seed=SEED)["image_newline"])
  wide = cfg.replace(llm=cfg.llm.__class__(**{**cfg.llm.__dict__, "hidden_size": 4096}))
  x = weights.init_params(wide, ["image_newline"], seed=SEED)["image_newline"].astype(np.float64)
  np.testing.assert_allclose(x.std(), 4096 ** -0.5, rtol=0.05)
  assert abs(x.mean()) < 4 / 4096 and 2.7 < np.mean(x ** 4) / x.var() ** 2 < 3.3  # normal, not uniform


def test_stage1_runlocal_trains_only_the_projector(assembled):
  """The stage1,runlocal preset resolved on the assembled checkpoint: the trainer's setup, its state
  from init.checkpoint and its compiled step, on short synthetic rows (the preset's 1536 tokens, at
  the real vocabulary, take minutes on CPU; test_released_checkpoint runs the whole train CLI)."""
  c = finetune.get_config(f"stage1,runlocal,model.preset=checkpoint,init.checkpoint={assembled},"
                          "train.global_batch_size=2")
  r = run_config.resolve(c, num_devices=1, process_count=1)  # one device: the compile is the cost here
  assert r.optim.trainable == ("projector",) and r.tokenizer_dir == assembled and r.init_checkpoint == assembled
  mesh = sharding.make_mesh(*r.mesh.shape, preset=r.mesh.preset, devices=jax.devices()[:1])
  setup = state_lib.make_setup(r.model, mesh, r.optim, r.train.num_steps)
  state = state_lib.init_state(setup, seed=r.seed, init_checkpoint=r.init_checkpoint)
  batch = synthetic.make_batch(np.random.default_rng(0), batch=2, seq_len=64, vocab_size=r.model.llm.vocab_size,
                               mask_token_id=r.model.mask_token_id)
  shapes = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), batch)
  step, _ = step_lib.compile_train_step(setup, r.loss, accum=1, batch_shapes=shapes)
  batch = jax.tree.map(lambda v: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)), batch)
  for _ in range(2):
    state, m = step(state, batch)
  assert float(m["finite"]) == 1.0 and np.isfinite(float(m["loss"]))
  before = _orbax_params(assembled)
  after = weights.flat_params(jax.device_get(state_lib.full_params(state)))
  changed = {k for k in before if not np.array_equal(np.asarray(before[k], np.float32), after[k])}
  assert changed == {"projector.fc1", "projector.fc1_bias", "projector.fc2", "projector.fc2_bias"}


def test_export_is_the_released_layout_and_reloads_with_identical_logits(sources, assembled, model, tmp_path):
  back = convert.orbax_to_hf(assembled, str(tmp_path / "LLaDA-V-stage0"))
  with open(os.path.join(back, "config.json")) as f:
    c = json.load(f)
  assert c["model_type"] == "llava_llada" and c["mm_projector_type"] == "mlp2x_gelu" and "d_model" not in c
  v = c["vision_config"]
  assert (c["mm_hidden_size"], c["mm_vision_select_layer"], v["num_hidden_layers"]) == (32, -2, KEEP + 1)
  files = weights.SafetensorsDir(back)
  assert weights.expected_hf_shapes(model.cfg).keys() <= set(files.names)
  assert not [n for n in files.names if "transformer" in n or "text_model" in n]
  assert files.dtype("model.layers.0.self_attn.q_proj.weight") == ml_dtypes.bfloat16  # as LLaDA-8B-Instruct
  with open(os.path.join(back, "tokenizer_config.json")) as f:
    assert "<|start_header_id|>" in json.load(f)["chat_template"]
  assert weights.load_model_config(back).replace(dtype="float32", param_dtype="float32") == model.cfg
  reloaded = LLaDAV.from_pretrained(back, dtype="float32")
  assert reloaded.image_cfg == model.image_cfg and reloaded.image_cfg.aspect == "anyres_max_4"
  # every parameter equal, so every input gives identical logits; shown on a short prompt (an image would
  # make [L > 729, 126464] float32 logits: slow here, and the tower is covered above)
  a, b = weights.flat_params(model.state), weights.flat_params(reloaded.state)
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)
  tok = model.tokenizer
  ids = [tok.bos_id] + tok.encode("What color is the shape?") + [tok.mask_id] * 4
  la, lb = model.logits([ids]), reloaded.logits([ids])
  assert la.shape == (1, len(ids), VOCAB) and la.std() > 0.1
  np.testing.assert_array_equal(la, lb)


def test_bad_sources_are_errors_that_name_the_fix(sources, tmp_path):
  dst = str(tmp_path / "out")
  with pytest.raises(ValueError, match="--vision-tower SIGLIP_DIR") as e:
    convert.hf_to_orbax(sources["olmo"], dst)
  assert "--random-vision-tower" in str(e.value) and not os.path.exists(dst)
  with pytest.raises(ValueError, match="already holds a vision tower"):
    convert.hf_to_orbax(assembled_like(sources, tmp_path), dst, vision_tower=sources["siglip"])
  assert not os.path.exists(dst)
  # a config.json written by transformers 4 leaves out the values equal to SiglipVisionConfig's defaults
  old = tmp_path / "siglip_v4"
  old.mkdir()
  (old / "config.json").write_text(json.dumps({"model_type": "siglip", "vision_config": {"hidden_size": 1152}}))
  v = weights.siglip_vision_config(str(old))
  assert (v["hidden_size"], v["patch_size"], v["image_size"], v["num_hidden_layers"]) == (1152, 16, 224, 12)
  (old / "config.json").write_text(json.dumps({"model_type": "siglip2"}))
  with pytest.raises(ValueError, match="fixed-resolution SigLIP"):
    weights.siglip_vision_config(str(old))


def assembled_like(sources, tmp_path):
  """An LLM directory that already has a tower (a LLaDA-V checkpoint)."""
  d = str(tmp_path / "with_tower")
  t = weights.SafetensorsDir(sources["llama"])
  x = {k: t.get(k) for k in t.names}
  x[weights.VISION_PREFIX + "post_layernorm.weight"] = np.ones(32, np.float32)
  with open(os.path.join(sources["llama"], "config.json")) as f:
    return _write_llm(d, x, json.load(f), tokenizer_from=sources["llama"])
