"""Presets load, and `resolve` names the offending field of every bad setting."""
import json
import subprocess

import pytest

from configs import finetune
from lladav_jax.training import run_config
from tests.train_helpers import PYTHON, REPO, subprocess_env


def _problems(cfg, devices=8):
  with pytest.raises(run_config.ConfigError) as e:
    run_config.resolve(cfg, num_devices=devices, process_count=1)
  return str(e.value)


@pytest.mark.parametrize("preset", finetune.PRESETS)
def test_presets_carry_the_original_hyperparameters(preset):
  c = finetune.get_config(preset)
  assert c.optim.b1 == 0.9 and c.optim.b2 == 0.999 and c.optim.eps == 1e-8
  assert c.optim.weight_decay == 0.0 and c.optim.clip_norm == 1.0 and c.optim.warmup_ratio == 0.03
  assert c.optim.schedule == "cosine" and c.loss.eps == 1e-3
  if preset == "stage1":
    assert c.optim.lr == 1e-3 and tuple(c.optim.trainable) == ("projector",) and c.train.global_batch_size == 64
    assert c.image.aspect == "square" and c.data.format == "plain"
    assert c.data.pad_group_size == 16  # llada_v_pretrain.sh: per_device_train_batch_size 16
  elif preset == "lora":  # the original's --lora_enable defaults; LLaVA's finetune_lora.sh learning rates
    assert (c.model.lora.rank, c.model.lora.alpha, c.model.lora.dropout) == (64, 16.0, 0.05)
    assert tuple(c.optim.trainable) == ("lora", "projector") and c.optim.lr == 2e-4 and c.optim.group_lr.projector == 2e-5
    assert c.init.checkpoint == finetune.get_config("finetune").init.checkpoint
  elif preset != "demo":
    assert c.optim.lr == 1e-5 and c.optim.group_lr.vision == 2e-6 and len(c.optim.trainable) == 3
    assert c.train.global_batch_size == (64 if preset == "finetune" else 256)
    assert c.data.seq_len == (16384 if preset == "stage2_ov" else 8192)
    assert c.model.remat_policy == "minimal" and c.model.dtype == "bfloat16" and c.model.param_dtype == "float32"
    assert c.data.pad_group_size == 1  # 1 row a GPU: the original never EOS-pads a stage-2/3 sample
  # packing only where the paper is not reproduced (our fine-tuning); a runlocal run is synthetic: unpacked
  assert c.data.packing == (preset == "finetune")
  assert not finetune.get_config(f"{preset},runlocal").data.packing
  # runlocal: the stages shrink to config.tiny (the released image geometry); the demo keeps its own model
  assert finetune.get_config(f"{preset},runlocal").model.preset == ("small" if preset == "demo" else "tiny")


def test_validation_names_each_bad_field(tmp_path):
  c = finetune.get_config("finetune,runlocal")
  c.mesh.data, c.mesh.fsdp = 3, 1
  c.model.mask_token_id = 600
  c.train.global_batch_size = 7
  c.loss.eps = 0.0
  c.optim.trainable = ("vision", "decoder")
  msg = _problems(c)
  for field in ("mesh.data", "model.mask_token_id", "train.global_batch_size", "loss.eps", "optim.trainable"):
    assert field in msg, (field, msg)


def test_eval_image_path():
  """Evals and the saved model take the original's eval path for several images (pad_flat); the demo, our own
  model, is evaluated on the path it is trained on."""
  r = run_config.resolve(finetune.get_config("stage2_si,runlocal"), num_devices=8, process_count=1)
  assert (r.image.multi_image, r.eval_image.multi_image) == ("pad", "pad_flat")
  c = finetune.get_config("stage2_si,runlocal")
  c.image.eval_multi_image = "flat"
  assert "image.eval_multi_image='flat' must be one of" in _problems(c)


def test_packing_is_validated_by_name():
  c = finetune.get_config("finetune,runlocal")
  c.data.packing = True  # synthetic data
  assert "data.packing needs data.kind" in _problems(c)


def test_pad_group_must_divide_the_process_batch():
  c = finetune.get_config("stage1,runlocal")
  c.data.pad_group_size = 3
  assert "data.pad_group_size=3 must divide the 8 rows" in _problems(c)


def test_missing_checkpoint_and_data_paths(tmp_path):
  c = finetune.get_config("finetune")
  c.init.checkpoint = str(tmp_path / "LLaDA-V-orbax")
  msg = _problems(c)
  assert "init.checkpoint" in msg and "python -m lladav_jax.convert hf-to-orbax" in msg
  c = finetune.get_config("finetune,runlocal")
  c.data.kind = "llava"
  c.data.path = str(tmp_path / "nope.json")
  c.tokenizer_dir = str(tmp_path)
  msg = _problems(c)
  assert "data.path" in msg and "tokenizer_dir" in msg


def test_image_tokens_must_fit_the_sequence(tmp_path):
  from lladav_jax.data import demo_data
  tok_dir = str(tmp_path / "tok")
  demo_data.build_tokenizer(demo_data._corpus_texts(), tok_dir)
  data = tmp_path / "d.json"
  data.write_text(json.dumps([{"id": "0", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yes"}]}]))
  c = finetune.get_config("finetune,runlocal")
  c.data.kind, c.data.path, c.tokenizer_dir, c.data.image_folder = "llava", str(data), tok_dir, str(tmp_path)
  c.data.seq_len = 4096  # anyres_max_4 on 384 px tiles: up to 729 + 3528 + 162 tokens for one image
  c.model.vocab_from_tokenizer = True
  msg = _problems(c)
  assert "image.aspect='anyres_max_4'" in msg and "up to 4419 tokens" in msg and "data.seq_len=4096" in msg, msg
  c.data.seq_len = 4480
  r = run_config.resolve(c, num_devices=8, process_count=1)
  assert r.model.llm.vocab_size == r.tokenizer.vocab_size and r.model.mask_token_id == r.tokenizer.mask_id


def test_cli_reports_config_errors(tmp_path):
  r = subprocess.run([PYTHON, "-m", "lladav_jax.train", "--config=configs/finetune.py:finetune",
                      f"--workdir={tmp_path}", f"--config.init.checkpoint={tmp_path}/missing"],
                     cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
  assert r.returncode == 2, r.stderr
  assert "init.checkpoint" in r.stderr and "hf-to-orbax" in r.stderr


def test_mesh_presets():
  """The layout is a config value; the batch axes it names must divide the micro-batch."""
  c = finetune.get_config("finetune,runlocal")
  c.mesh.preset = "zero3"
  assert "mesh.preset='zero3'" in _problems(c)
  c.mesh.preset = "dp"  # the default sizes (fsdp=-1) would shard the weights
  assert "mesh.data=-1 mesh.fsdp=1" in _problems(c)
  c.mesh.data, c.mesh.fsdp = -1, 1
  r = run_config.resolve(c, num_devices=8, process_count=1)
  assert (r.mesh.preset, r.mesh.shape) == ("dp", (8, 1, 1))
  c = finetune.get_config("finetune,runlocal")
  c.mesh.preset, c.mesh.fsdp, c.mesh.tensor = "fsdp", 4, 2  # pure FSDP over 4 x 2: rows over all 8 devices
  c.train.global_batch_size = 4
  assert "rows per micro-batch is not a multiple of the devices = 8" in _problems(c)


def test_image_and_video_fields_are_checked():
  c = finetune.get_config("finetune,runlocal")
  c.image.multi_image = "flat"
  msg = _problems(c)
  assert "image.multi_image='flat' must be one of ('pad', 'pad_flat')" in msg, msg
  from lladav_jax.data import pipeline
  bad = pipeline.DataConfig(path="x.json", force_sample=True, frames_upbound=0)
  assert pipeline.config_problems(bad) == ["data.force_sample needs data.frames_upbound > 0 (the number of "
                                           "frames it samples)"]


def test_vision_pretrain_fields_are_checked(tmp_path):
  """The demo fills in its captions; a run with pre-training steps needs its data, a batch that contrasts pairs,
  and no LoRA (whose frozen base is reloaded from init.checkpoint on resume)."""
  c = finetune.get_config(f"demo,runlocal,data.demo_root={tmp_path / 'demo'}")
  r = run_config.resolve(c, num_devices=1, process_count=1)
  assert r.vision_pretrain.steps == 4 and r.vision_pretrain.data.endswith("captions.json")
  c = finetune.get_config("finetune,runlocal")
  c.vision_pretrain.steps = 10
  c.vision_pretrain.batch_size = 1
  c.vision_pretrain.image_folder = str(tmp_path / "nope")
  c.model.lora.rank = 4
  c.optim.trainable = ("projector", "lora")
  msg = _problems(c)
  for want in ("vision_pretrain.steps=10 needs vision_pretrain.data", "vision_pretrain.batch_size=1",
               "vision_pretrain.image_folder=", "vision_pretrain.steps > 0 with LoRA"):
    assert want in msg, (want, msg)
  c.vision_pretrain.data = str(tmp_path / "captions.json")
  assert "vision_pretrain.data=" in _problems(c)
