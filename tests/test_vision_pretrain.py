"""The vision tower's pre-training (training/vision_pretrain.py): it reads LLaVA image-caption records as training
does (bad ones skipped by reason, nothing outside the image folder opened), learns to tell the captions'
pictures apart, and is deterministic in its seed."""
import json
import logging
import random

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from lladav_jax import config as model_config
from lladav_jax.data import demo_data
from lladav_jax.data.pipeline import DataConfig
from lladav_jax.data.tokenizer import Tokenizer
from lladav_jax.model import init_sharded
from lladav_jax.training import vision_pretrain

COLORS = ("red", "green", "blue", "yellow")
MAX_PIXELS = DataConfig().max_image_pixels


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """200 pictures of random shapes in four colours, captioned with their colour, + a tokenizer."""
  d = tmp_path_factory.mktemp("captions")
  (d / "images").mkdir()
  rng = random.Random(0)
  recs = []
  for i in range(200):
    color = COLORS[i % len(COLORS)]
    demo_data.draw_scene(demo_data.random_scene(rng, color)).save(d / "images" / f"{i}.png")
    recs.append({"id": str(i), "image": f"images/{i}.png",
                 "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": color}]})
  (d / "captions.json").write_text(json.dumps(recs))
  demo_data.build_tokenizer(demo_data._corpus_texts(), str(d / "tokenizer"))
  return d


def _pairs(d, name="captions.json"):
  tok = Tokenizer.from_dir(str(d / "tokenizer"))
  return vision_pretrain.load_pairs(str(d / name), str(d), tok, demo_data.demo_image_config(14),
                                    max_pixels=MAX_PIXELS), tok


def _model_cfg(tok):
  return model_config.small(vocab_size=tok.vocab_size, mask_token_id=tok.mask_id)


def _tower(mc, seed=0):
  _, state = init_sharded(mc, seed=seed, only=None)
  return jax.device_get(nnx.to_pure_dict(state)["vision"])


def test_bad_records_are_skipped_by_reason(data, caplog):
  """Paths relative to the images folder: "../" leaves it, and is not opened."""
  recs = json.loads((data / "captions.json").read_text())[:6]
  for r in recs:
    r["image"] = r["image"].removeprefix("images/")
  recs[1]["image"] = "missing.png"
  recs[2]["image"] = "../captions.json"
  recs[3]["conversations"] = recs[3]["conversations"][:1]  # no answer
  recs[4]["image"] = ["4.png", "5.png"]
  (data / "images" / "corrupt.png").write_bytes(b"not a png")
  recs.append(dict(recs[0], image="corrupt.png"))
  (data / "bad.json").write_text(json.dumps(recs))
  tok = Tokenizer.from_dir(str(data / "tokenizer"))
  with caplog.at_level(logging.WARNING):
    pairs = vision_pretrain.load_pairs(str(data / "bad.json"), str(data / "images"), tok, demo_data.demo_image_config(14),
                                       max_pixels=MAX_PIXELS)
  for reason in ("missing_image", "outside_image_folder", "no_caption", "not_one_image", "corrupt_image"):
    assert reason in caplog.text, (reason, caplog.text)
  assert pairs.tiles.shape == (2, 56, 56, 3) and pairs.tiles.dtype == np.uint8  # records 0 and 5
  assert [pairs.captions[c] for c in pairs.caption_id] == ["red", "green"]


def test_too_few_pairs_is_an_error_naming_the_file(data):
  (data / "empty.json").write_text("[]")
  with pytest.raises(ValueError, match="empty.json.*0 usable"):
    _pairs(data, "empty.json")


def test_pretraining_learns_the_captions(data):
  """Held-out retrieval of each picture's caption among the four: chance (about 25%) at the random init, near
  100% after 60 steps."""
  pairs, tok = _pairs(data)
  mc = _model_cfg(tok)
  cfg = vision_pretrain.VisionPretrainConfig(steps=60, batch_size=32, lr=3e-3, held_out=0.2)
  untrained = vision_pretrain.VisionPretrainConfig(steps=0, batch_size=32, held_out=0.2)
  _, before = vision_pretrain.pretrain(_tower(mc), mc, tok.vocab_size, pairs, untrained, seed=0, progress=False)
  params, after = vision_pretrain.pretrain(_tower(mc), mc, tok.vocab_size, pairs, cfg, seed=0, progress=False)
  assert after["held_out"] == 40
  assert before["held_out_retrieval"] < 0.6 and after["held_out_retrieval"] >= 0.9, (before, after)
  assert jax.tree.structure(params) == jax.tree.structure(_tower(mc))


def test_pretraining_is_deterministic(data):
  pairs, tok = _pairs(data)
  mc = _model_cfg(tok)
  cfg = vision_pretrain.VisionPretrainConfig(steps=3, batch_size=16)
  a, _ = vision_pretrain.pretrain(_tower(mc), mc, tok.vocab_size, pairs, cfg, seed=1, progress=False)
  b, _ = vision_pretrain.pretrain(_tower(mc), mc, tok.vocab_size, pairs, cfg, seed=1, progress=False)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  start = _tower(mc)
  assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(start)))


def test_the_tower_keeps_the_runs_dtypes(data):
  """A run with bfloat16 weights gets its tower back in bfloat16, the structure the train state expects."""
  pairs, tok = _pairs(data)
  mc = _model_cfg(tok).replace(dtype="bfloat16", param_dtype="bfloat16")
  start = _tower(mc)
  params, _ = vision_pretrain.pretrain(start, mc, tok.vocab_size, pairs,
                                       vision_pretrain.VisionPretrainConfig(steps=2, batch_size=8), seed=0, progress=False)
  assert jax.tree.structure(params) == jax.tree.structure(start)
  assert {str(x.dtype) for x in jax.tree.leaves(params)} == {"bfloat16"}


def test_pairs_at_the_released_geometry(data, tmp_path):
  """384 px tiles of 14 px patches, anyres: each picture's pair holds its base tile (the whole picture resized),
  as `process_image` makes it for training."""
  from lladav_jax import multimodal
  img = np.random.default_rng(0).integers(0, 256, (300, 500, 3), np.uint8)
  Image.fromarray(img).save(tmp_path / "wide.png")
  (tmp_path / "c.json").write_text(json.dumps([
      {"id": str(i), "image": "wide.png", "conversations": [{"from": "gpt", "value": c}]} for i, c in enumerate(COLORS)]))
  icfg = multimodal.ImageConfig(image_size=384, patch_size=14)
  tok = Tokenizer.from_dir(str(data / "tokenizer"))
  pairs = vision_pretrain.load_pairs(str(tmp_path / "c.json"), str(tmp_path), tok, icfg, max_pixels=MAX_PIXELS)
  assert pairs.tiles.shape == (4, 384, 384, 3)
  np.testing.assert_array_equal(pairs.tiles[0], multimodal.process_image(Image.open(tmp_path / "wide.png"), icfg).tiles[0])
  assert pairs.captions == list(COLORS) and pairs.caption_id.tolist() == [0, 1, 2, 3]
