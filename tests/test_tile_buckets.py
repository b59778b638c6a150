"""Per-batch tile buckets: a batch's pixels take the smallest bucket that holds its largest sample, so a 6x6 anyres
grid (37 tiles) and a 32-frame video train under the stage presets instead of being skipped; compiled shapes stay
within the bucket set; padding a batch to a larger bucket leaves the model's inputs unchanged."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from configs import finetune
from lladav_jax import batch as batch_lib, config, multimodal
from lladav_jax.data import pipeline, template
from lladav_jax.data.demo_data import ensure_demo_data
from lladav_jax.data.tokenizer import Tokenizer
from lladav_jax.model.lladav import LLaDAVModel

ICFG = multimodal.ImageConfig(image_size=384, patch_size=14, aspect="anyres_max_4")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return Tokenizer.from_dir(ensure_demo_data(str(tmp_path_factory.mktemp("demo")), num_train=8, num_val=2,
                                             num_test=2)["tokenizer_dir"])


@pytest.fixture(scope="module")
def media(tmp_path_factory):
  """A 2304 px square image (the 6x6 anyres grid + base: 37 tiles), a 32-frame folder video, a 384 px image (2)."""
  d = tmp_path_factory.mktemp("media")
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 255, (2304, 2304, 3), np.uint8)).save(d / "big.png")
  Image.fromarray(rng.integers(0, 255, (384, 384, 3), np.uint8)).save(d / "small.png")
  os.makedirs(d / "clip")
  for i in range(40):
    Image.fromarray(np.full((64, 96, 3), 10 + i * 6, np.uint8)).save(d / "clip" / f"{i:03d}.jpg")
  qa = lambda q: [{"from": "human", "value": q}, {"from": "gpt", "value": "a red circle"}]
  recs = [{"id": "grid6", "image": "big.png", "conversations": qa("<image>\nWhat is here?")},
          {"id": "video32", "video": "clip", "conversations": qa("<image>\nWhat happens?")},
          {"id": "small", "image": "small.png", "conversations": qa("<image>\nWhat is here?")}]
  with open(d / "data.json", "w") as f:
    json.dump(recs, f)
  return d


def test_stage_presets_train_6x6_grids_and_32_frame_videos(tok, media):
  """The stage presets' tile budget (37) with the default buckets: each sample goes through the real pipeline
  with no skip, in a batch of its own bucket (37 for the 6x6 grid, 32 for the video, 2 for a small image)."""
  c = finetune.get_config("stage2_ov")
  assert c.data.tile_budget == 37 and tuple(c.data.tile_buckets) == ()
  cfg = pipeline.DataConfig(path=str(media / "data.json"), image_folder=str(media), seq_len=16384, tile_budget=37,
                            force_sample=True, frames_upbound=32, shuffle=False, max_skip_fraction=0.0,
                            skip_check_min_samples=1)
  assert pipeline.tile_buckets(cfg) == [1, 2, 5, 10, 17, 26, 32, 37]
  it = pipeline.build_eval_iterator(cfg, tok, ICFG, batch_size_per_process=1, process_index=0, process_count=1)
  got = {}
  for b in it:
    rid = it.last_ids[0]
    x = b.inputs
    used = int((x.pixels.reshape(x.pixels.shape[0], x.tiles, -1).max(-1) > 0).sum())
    got[rid] = (x.tiles, used, int((x.tokens == -200).sum()))
  assert sorted(t for t, _, _ in got.values()) == [2, 32, 37], got
  for tiles, used, image_tokens in got.values():
    assert used == tiles and image_tokens > 0  # every tile holds an image: the bucket is exactly the need here
  assert not it._skipped  # nothing skipped


def test_pad_tiles_keeps_the_model_inputs():
  """pad_tiles (processes agreeing on a bucket) appends zero tiles and moves the merge plan's newline / zero
  entries: the spliced embeddings are bit-identical."""
  cfg = config.tiny()
  m = LLaDAVModel(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(1)
  img = Image.fromarray(rng.integers(0, 255, (500, 900, 3), np.uint8))
  inp = multimodal.process_sample_images([img], ICFG)
  ids = np.array([1, 2, -200, 3, 4], np.int64)
  e = multimodal.expand(ids, inp, ICFG, labels=ids)
  b = batch_lib.collate_train([e], ICFG)
  assert (b.inputs.merge_idx >= b.inputs.tiles * ICFG.tokens_per_tile).any()  # the plan reads the newline
  p = batch_lib.pad_tiles(b, batch_lib.bucket_tiles(b.inputs.tiles + 1), ICFG.tokens_per_tile)
  assert p.inputs.tiles > b.inputs.tiles
  emb = lambda x: np.asarray(m.embed(jnp.asarray(x.tokens), jnp.asarray(x.pixels), jnp.asarray(x.merge_idx),
                                     jnp.asarray(x.merge_w)))
  np.testing.assert_array_equal(emb(p.inputs), emb(b.inputs))
  with pytest.raises(ValueError, match="more than"):
    batch_lib.pad_tiles(p, 1, ICFG.tokens_per_tile)


def test_compiles_once_per_tile_bucket():
  """Batches of 1..37 tiles compile the (vision) step once per bucket they land in, never per tile count."""
  cfg = config.tiny()
  m = LLaDAVModel(cfg, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(m)
  traces = []

  @jax.jit
  def table(state, pixels):
    traces.append(pixels.shape)
    return nnx.merge(graphdef, state).image_table(pixels).sum()

  data = pipeline.DataConfig(buckets=(8,), seq_len=8, tile_budget=37, tile_buckets=(1, 2, 5, 10, 17, 26, 32, 37),
                             labels=template.LabelConfig(pad_with_eos=False, label_eos_padding=False))
  spec = pipeline.Batching(data, batch_size=1, image_cfg=ICFG, pad_id=0, eos_id=0)
  for n in (1, 2, 3, 4, 2, 37, 30, 33, 1):
    e = multimodal.Expanded(tokens=np.arange(1, 9, dtype=np.int32), labels=np.full(8, -100, np.int32),
                            merge_idx=np.zeros((8, 4), np.int32), merge_w=np.zeros((8, 4), np.float32),
                            pixels=np.zeros((n, 384, 384, 3), np.uint8))
    b = pipeline.collate([pipeline.Sample(e, pre_len=8, id=str(n))], spec)
    assert b.inputs.tiles == batch_lib.bucket_tiles(n)
    table(state, jnp.asarray(b.inputs.pixels))
  assert sorted(t[1] for t in traces) == [1, 2, 5, 32, 37]  # 9 batches, 5 buckets: one compile each
