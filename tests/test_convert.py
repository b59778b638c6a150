"""hf -> orbax -> hf conversion: bit-exact round trip (names, dtypes, bytes), errors that list every offending
key with its expected shape, and atomic output (nothing half-written after a failure)."""
import json
import os
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest

from lladav_jax import convert, sharding, weights
from tests.test_parity_lladav import build_torch_lladav, write_hf_dir

AUX = {"tokenizer.json": '{"version": "1.0", "model": {}}', "tokenizer_config.json": '{"add_bos_token": false}',
       "special_tokens_map.json": '{"eos_token": "<|endoftext|>"}', "generation_config.json": '{"bos_token_id": 1}'}


def read_hf(path: str) -> dict[str, np.ndarray]:
  d = weights.SafetensorsDir(path)
  return {k: d.get(k) for k in d.names}


def assert_bit_identical(a: dict, b: dict):
  assert sorted(a) == sorted(b)
  for k in a:
    assert a[k].dtype == b[k].dtype, (k, a[k].dtype, b[k].dtype)
    assert a[k].shape == b[k].shape, k
    assert a[k].tobytes() == b[k].tobytes(), k


def no_leftovers(parent: str, name: str):
  return not [f for f in os.listdir(parent) if f.startswith(name)]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  """A sharded tiny LLaDA-V checkpoint: bf16 weights, float32 norms, a stacked parameter whose layers
  have different dtypes (f16 / bf16), extras, tokenizer files."""
  ref = build_torch_lladav(seed=7)
  t = ref.tensors()
  dtypes = {k: (np.float32 if "norm" in k else ml_dtypes.bfloat16) for k in t}
  dtypes["model.layers.0.mlp.up_proj.weight"] = np.float16
  d = write_hf_dir(str(tmp_path_factory.mktemp("src") / "hf"), t, ref.config_json(), shards=3, dtypes=dtypes,
                   extra_files=AUX)
  return d


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory):
  dst = str(tmp_path_factory.mktemp("orbax") / "ck")
  convert.hf_to_orbax(source, dst)
  return dst


def test_round_trip_is_bit_identical(source, converted, tmp_path):
  files = set(os.listdir(converted))
  assert {"params", "lladav_config.json", "hf_manifest.json", "extras.safetensors", "config.json"} <= files
  assert set(AUX) <= files
  # parameters are stored at the source dtype (bf16 stays bf16; mixed layers widen exactly)
  meta = weights.orbax_metadata(converted)
  assert meta["llm.layers.attn.q_proj"][1] == ml_dtypes.bfloat16
  assert meta["llm.layers.attn_norm"][1] == np.float32
  assert meta["llm.layers.mlp.up_proj"][1] == np.float32
  back = str(tmp_path / "hf")
  convert.orbax_to_hf(converted, back, shard_size="40KB")
  src, out = read_hf(source), read_hf(back)
  assert_bit_identical(src, out)
  with open(os.path.join(back, weights.INDEX_FILE)) as f:
    index = json.load(f)
  assert index["metadata"]["total_size"] == sum(v.nbytes for v in out.values())
  assert len(set(index["weight_map"].values())) > 2
  for fname in list(AUX) + ["config.json"]:
    with open(os.path.join(source, fname), "rb") as a, open(os.path.join(back, fname), "rb") as b:
      assert a.read() == b.read(), fname
  assert no_leftovers(str(tmp_path), "hf.tmp-")


def test_orbax_dir_loads_same_state_as_hf_dir(source, converted):
  cfg = weights.load_model_config(converted)
  assert cfg == weights.load_model_config(source)
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  a = weights.flat_params(weights.load_state(source, cfg, mesh))
  b = weights.flat_params(weights.load_state(converted, cfg, mesh))
  assert sorted(a) == sorted(b)
  for k in a:
    assert a[k].dtype == b[k].dtype == np.float32
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)
  # a config that does not fit the stored shapes is refused with every mismatch listed
  bad = cfg.replace(llm=cfg.llm.__class__(**{**cfg.llm.__dict__, "intermediate_size": 96}))
  with pytest.raises(weights.CheckpointMismatchError) as e:
    weights.load_state(converted, bad, mesh)
  msg = str(e.value)
  for p in ("gate_proj", "up_proj", "down_proj"):
    assert f"wrong shape: llm.layers.mlp.{p}" in msg


def test_mismatched_keys_and_shapes_are_all_listed(source, tmp_path):
  t = read_hf(source)
  t["model.layers.1.mlp.up_proj.weight"] = t["model.layers.1.mlp.up_proj.weight"][:, :32]  # wrong shape
  del t["model.layers.0.self_attn.k_proj.weight"]  # missing
  del t["model.mm_projector.2.bias"]  # missing
  t["model.layers.0.self_attn.qq_proj.weight"] = np.zeros((4, 4), np.float32)  # unexpected
  with open(os.path.join(source, "config.json")) as f:
    cfg_json = json.load(f)
  bad = write_hf_dir(str(tmp_path / "bad"), t, cfg_json)
  dst = str(tmp_path / "out")
  with pytest.raises(weights.CheckpointMismatchError) as e:
    convert.hf_to_orbax(bad, dst)
  msg = str(e.value)
  assert "wrong shape: model.layers.1.mlp.up_proj.weight has [128, 32], expected [128, 64]" in msg
  assert "missing: model.layers.0.self_attn.k_proj.weight (expected shape [32, 64])" in msg
  assert "missing: model.mm_projector.2.bias (expected shape [64])" in msg
  assert "unexpected: model.layers.0.self_attn.qq_proj.weight (shape [4, 4])" in msg
  assert len(e.value.problems) == 4
  assert not os.path.exists(dst) and no_leftovers(str(tmp_path), "out")


def test_layers_beyond_the_config_are_errors_naming_both_counts(source, tmp_path):
  """The original drops the last vision layer (select layer -2), so a checkpoint may hold it or not; a
  config that claims fewer layers than the checkpoint holds is an error, for the LLM as for the tower."""
  t = read_hf(source)
  with open(os.path.join(source, "config.json")) as f:
    cfg_json = json.load(f)
  n = cfg_json["vision_config"]["num_hidden_layers"]  # 3: the model runs 2, layer 2 is the dropped one
  assert "model.vision_tower.vision_tower.vision_model.encoder.layers.2.mlp.fc1.weight" in t
  few = dict(cfg_json, num_hidden_layers=1, vision_config=dict(cfg_json["vision_config"], num_hidden_layers=n - 1))
  with pytest.raises(weights.CheckpointMismatchError) as e:
    weights.plan_hf(write_hf_dir(str(tmp_path / "few"), t, few), weights.model_config_from_hf(few))
  msg = str(e.value)
  assert ("unexpected: model.vision_tower.vision_tower.vision_model.encoder.layers.2.mlp.fc1.weight (shape [64, 32]) "
          "[vision encoder layer 2, but the vision config has num_hidden_layers=2 (the model uses 1; the original "
          "drops the last)]") in msg, msg
  assert "vision_model.encoder.layers.1.mlp.fc1.weight" not in msg  # the dropped layer is an extra
  assert "unexpected: model.layers.1.mlp.up_proj.weight (shape [128, 64]) [llm layer 1, but the config has num_hidden_layers=1]" in msg
  # the dropped layer may be absent
  t = {k: v for k, v in t.items() if ".encoder.layers.2." not in k}
  plan = weights.plan_hf(write_hf_dir(str(tmp_path / "absent"), t, cfg_json), weights.model_config_from_hf(cfg_json))
  assert not any(".encoder.layers." in k for k in plan.extras)


def test_missing_shard_file_lists_its_keys(source, tmp_path):
  import shutil
  d = str(tmp_path / "partial")
  shutil.copytree(source, d)
  with open(os.path.join(d, weights.INDEX_FILE)) as f:
    wm = json.load(f)["weight_map"]
  gone = "model-00002-of-00003.safetensors"
  os.remove(os.path.join(d, gone))
  keys = [k for k, v in wm.items() if v == gone]
  shapes = weights.expected_hf_shapes(weights.load_model_config(d))
  with pytest.raises(weights.CheckpointMismatchError) as e:
    convert.hf_to_orbax(d, str(tmp_path / "out"))
  msg = str(e.value)
  for k in keys:
    if k in shapes:
      assert f"missing: {k} (expected shape [{', '.join(map(str, shapes[k]))}]) [shard file {gone}" in msg
    else:
      assert f"missing: {k} (unused by the model, kept on convert) [shard file {gone}" in msg
  assert len([k for k in keys if k in shapes]) > 3 and len(e.value.problems) == len(keys)
  assert no_leftovers(str(tmp_path), "out")


def test_failure_midway_leaves_nothing(source, tmp_path, monkeypatch):
  calls = []
  real = weights.read_param

  def flaky(plan, param, *a, **kw):
    calls.append(param)
    if len(calls) == 5:
      raise OSError("disk on fire")
    return real(plan, param, *a, **kw)
  monkeypatch.setattr(weights, "read_param", flaky)
  with pytest.raises(OSError, match="disk on fire"):
    convert.hf_to_orbax(source, str(tmp_path / "out"))
  assert os.listdir(tmp_path) == []


def test_existing_destination_and_overwrite(source, converted, tmp_path):
  dst = str(tmp_path / "hf")
  os.makedirs(dst)
  with pytest.raises(FileExistsError):
    convert.orbax_to_hf(converted, dst)
  assert os.listdir(dst) == []
  assert convert.main(["orbax-to-hf", converted, dst, "--overwrite", "--shard-size", "1GB"]) == 0
  assert_bit_identical(read_hf(source), read_hf(dst))
  assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_llm_only_source_needs_a_tower_and_exports_as_llada_v(tmp_path):
  """An LLM-only source is refused unless --random-vision-tower (stage 0 brings a pretrained one in:
  tests/test_stage0.py); the result exports as a whole LLaDA-V checkpoint, the LLM tensors unchanged."""
  ref = build_torch_lladav(seed=8)
  t = {k: v for k, v in ref.tensors().items() if k.startswith(("model.layers", "model.embed", "model.norm", "lm_head"))}
  src = write_hf_dir(str(tmp_path / "llm"), t, ref.config_json())
  with pytest.raises(weights.CheckpointMismatchError, match="model.image_newline .expected shape .64.."):
    convert.hf_to_orbax(src, str(tmp_path / "strict"), strict=True)
  with pytest.raises(ValueError, match="--vision-tower SIGLIP_DIR"):
    convert.hf_to_orbax(src, str(tmp_path / "ck"))
  assert not os.path.exists(tmp_path / "strict") and not os.path.exists(tmp_path / "ck")
  assert convert.main(["hf-to-orbax", src, str(tmp_path / "ck"), "--random-vision-tower", "--seed", "3"]) == 0
  man = weights.read_manifest(str(tmp_path / "ck"))
  assert man["initialized_groups"] == ["image_newline", "projector", "vision"] and man["seed"] == 3
  convert.orbax_to_hf(str(tmp_path / "ck"), str(tmp_path / "back"))
  back = read_hf(str(tmp_path / "back"))
  assert set(weights.expected_hf_shapes(weights.load_model_config(str(tmp_path / "ck")))) == set(back)
  assert_bit_identical(t, {k: back[k] for k in t})
  with open(tmp_path / "back" / "config.json") as f:
    assert json.load(f)["model_type"] == "llava_llada"


def test_cli_module_runs():
  out = subprocess.run([sys.executable, "-m", "lladav_jax.convert", "--help"], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=60)
  assert out.returncode == 0 and "hf-to-orbax" in out.stdout and "orbax-to-hf" in out.stdout
