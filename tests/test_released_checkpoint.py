"""Every entry point on a tiny checkpoint in the released GSAI-ML/LLaDA-V layout (tests/released.py: 384 px
tiles, 14 px patches, vocabulary 126464 with the real special ids, the trainer's config.json keys): the
Python API, the convert CLI both ways, the generate CLI, the eval CLI with the real model, and the train
CLI fine-tuning from the converted checkpoint on LLaVA-format data."""
import json
import math
import os
import subprocess

import numpy as np
import pytest
from PIL import Image

from lladav_jax import LLaDAV, config, weights
from lladav_jax.data.demo_data import ensure_demo_data, qa_items
from lladav_jax.eval.__main__ import main as eval_main
from lladav_jax.eval.tasks import get_task
from lladav_jax.inference import SamplingParams
from tests.released import VOCAB, write_released_checkpoint
from tests.train_helpers import PYTHON, REPO, inference_env, subprocess_env

KW = dict(gen_length=16, block_length=8, steps=8)
QUESTIONS = ["What color is the shape?", "What shape is the object?"]


@pytest.fixture(scope="module")
def released(tmp_path_factory):
  root = tmp_path_factory.mktemp("released")
  _, hf = write_released_checkpoint(str(root / "LLaDA-V"))
  rng = np.random.default_rng(0)
  images = {"wide.png": (500, 300), "small_wide.png": (300, 200), "small_tall.png": (200, 300)}
  for name, (w, h) in images.items():
    Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(root / name)
  return root, hf


@pytest.fixture(scope="module")
def model(released):
  return LLaDAV.from_pretrained(released[1], dtype="float32")


@pytest.fixture(scope="module")
def answers(model, released):
  """LLaDAV.generate on the HF directory: one anyres image, one text-only question."""
  root, _ = released
  return model.generate(QUESTIONS, [[Image.open(root / "wide.png")], []], SamplingParams(**KW))


@pytest.fixture(scope="module")
def orbax(released, tmp_path_factory):
  """The convert CLI's hf-to-orbax of the released directory, once for the module (the round trip and the
  train CLI both start from it)."""
  tmp = tmp_path_factory.mktemp("orbax")
  run(["lladav_jax.convert", "hf-to-orbax", released[1], str(tmp / "orbax")])
  return tmp / "orbax"


def run(args, timeout=600, env=None):
  """`python -m ARGS`; the inference entry points' environment unless `env` (the trainer: one device)."""
  r = subprocess.run([PYTHON, "-m", *args], cwd=REPO, env=env or inference_env(), capture_output=True,
                     text=True, timeout=timeout)
  assert r.returncode == 0, r.stderr[-3000:]
  return r


def test_the_released_geometry_and_ids_load(model):
  cfg = model.cfg
  assert (cfg.vision.image_size, cfg.vision.patch_size, cfg.vision.tokens_per_tile) == (384, 14, 729)
  assert cfg.llm.vocab_size == VOCAB and cfg.mask_token_id == 126336  # the default: the file names none
  tok = model.tokenizer
  assert (tok.bos_id, tok.eos_id, tok.mask_id, tok.start_header_id, tok.end_header_id, tok.eot_id) == \
      (126080, 126081, 126336, 126346, 126347, 126348)
  assert tok.vocab_size == 126349  # the largest id + 1, not the number of entries
  assert model.image_cfg.aspect == "anyres_max_4" and len(model.image_cfg.grid_pinpoints) == 36
  assert model.image_cfg.grid_pinpoints[7] == (2, 2)  # [768, 768] px in the file


def test_generate_answers_in_words(answers, model):
  assert all(a.text.strip() and len(a.token_ids) <= KW["gen_length"] for a in answers)
  banned = {126080, 126081, 126346, 126347}
  assert not banned & {t for a in answers for t in a.token_ids}
  assert answers[0].query_tokens > 729 + 27 * 28  # the anyres image: base tile + grid + newlines


def test_config_without_vision_config_means_so400m(released, tmp_path):
  """The released config.json names the tower in mm_vision_tower only: the tower is siglip2-so400m (26 of
  27 layers kept, 384 / 14), and that preset validates. Loading the tiny tower under it names the tensors."""
  _, hf = released
  with open(os.path.join(hf, "config.json")) as f:
    c = json.load(f)
  del c["vision_config"]
  c["mm_hidden_size"] = 1152  # as released
  cfg = weights.model_config_from_hf(c)
  assert cfg.vision == config.llada_v_8b().vision
  cfg.validate()
  config.llada_v_8b().validate()
  d = tmp_path / "no_vision_config"
  d.mkdir()
  for f in os.listdir(hf):
    if f != "config.json":
      os.symlink(os.path.join(hf, f), d / f)
  (d / "config.json").write_text(json.dumps(c))
  with pytest.raises(weights.CheckpointMismatchError, match=r"vision_model\.embeddings\.patch_embedding\.weight.*1152"):
    LLaDAV.from_pretrained(str(d), dtype="float32")


def test_convert_cli_round_trip_and_generate_cli(released, orbax, answers, tmp_path):
  root, hf = released
  back = tmp_path / "hf_again"
  run(["lladav_jax.convert", "orbax-to-hf", str(orbax), str(back)])
  a, b = weights.SafetensorsDir(hf), weights.SafetensorsDir(str(back))
  assert sorted(a.names) == sorted(b.names)
  for k in a.names:
    assert a.get(k).tobytes() == b.get(k).tobytes(), k
  # the converted directory answers with the same tokens
  again = LLaDAV.from_pretrained(str(orbax), dtype="float32").generate(
      QUESTIONS, [[Image.open(root / "wide.png")], []], SamplingParams(**KW))
  assert [x.token_ids for x in again] == [x.token_ids for x in answers]
  # the generate CLI on the released directory prints the API's answer
  r = run(["lladav_jax.generate", "--checkpoint", hf, "--image", str(root / "wide.png"), "--prompt", QUESTIONS[0],
           "--dtype", "float32", "--json", "--no_live", *[f"--{k}={v}" for k, v in KW.items()]])
  out = json.loads(r.stdout)
  assert out["token_ids"] == answers[0].token_ids and out["text"] == answers[0].text


def test_eval_cli_with_the_real_model(released, model, tmp_path):
  paths = ensure_demo_data(str(tmp_path / "demo"), num_train=4, num_val=1, num_test=3)
  output = str(tmp_path / "eval" / "demo.json")
  eval_main(["--checkpoint", released[1], "--task", "demo", "--data", paths["test"], "--batch_size", "2",
             "--dtype", "float32", "--output", output])
  saved = json.load(open(output))
  items = qa_items(paths["test"])
  assert saved["num_samples"] == len(items) and saved["num_skipped"] == 0
  task = get_task("demo")
  for it, pred in zip(items, saved["predictions"]):
    imgs = [Image.open(os.path.join(paths["image_folder"], p)) for p in it["images"]]
    direct = model.generate([it["question"]], [imgs], task.sampling_params())[0]
    assert pred["prediction"] == direct.text.strip().rstrip("."), (pred, direct.text)


def test_train_cli_fine_tunes_the_converted_checkpoint(released, orbax, tmp_path):
  root, hf = released
  data = [{"id": "a", "image": "small_wide.png", "conversations": [{"from": "human", "value": "<image>\nWhat color is the shape?"},
                                                             {"from": "gpt", "value": "red"}]},
          {"id": "b", "image": "small_tall.png", "conversations": [{"from": "human", "value": "What shape is the object?\n<image>"},
                                                             {"from": "gpt", "value": "a blue circle"}]}]
  (tmp_path / "train.json").write_text(json.dumps(data))
  wd = tmp_path / "run"
  run(["lladav_jax.train", "--config=configs/finetune.py:finetune,runlocal", f"--workdir={wd}",
       "--config.model.preset=checkpoint", f"--config.init.checkpoint={orbax}", "--config.data.kind=llava",
       f"--config.data.path={tmp_path / 'train.json'}", f"--config.data.image_folder={root}",
       # seq_len holds the largest anyres_max_4 image (4419 tokens); these samples fit the 1536 bucket
       "--config.data.seq_len=4480", "--config.data.buckets=(1536,4480)", "--config.data.tile_budget=8",
       "--config.train.global_batch_size=2",
       "--config.train.num_steps=2", "--config.checkpoint.every_steps=2", "--config.log.progress=False",
       "--config.log.tensorboard=False"], env=subprocess_env())
  rows = [json.loads(line) for line in open(wd / "metrics.jsonl")]
  losses = [r["loss"] for r in rows if "loss" in r]
  assert len(losses) == 2 and all(math.isfinite(x) and x > 0 for x in losses)
  trained = LLaDAV.from_pretrained(str(wd / "model"), dtype="float32")
  assert trained.cfg == weights.load_model_config(str(orbax), dtype="float32", param_dtype="float32")
  before = weights.flat_params(LLaDAV.from_pretrained(str(orbax), dtype="float32").state)
  after = weights.flat_params(trained.state)
  assert np.abs(np.asarray(after["vision.patch_kernel"]) - np.asarray(before["vision.patch_kernel"])).max() > 0
